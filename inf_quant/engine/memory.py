"""Memory, stated then measured: the expected peak of a quantization run and of a verify run from shapes and
settings, and the measured peaks (process RSS high-water mark, torch's CUDA peak allocation).

The expectations count what the code holds at its peak, term by term, in bytes on the compute device (on CPU
that is host RAM, on top of what the process held before the work started: its `base`). They are sums of
named terms so a report can say where the memory goes; the test on a mid-size checkpoint (tests/test_memory.py)
holds the measured increment to within MEMORY_MARGIN of the quantize prediction.
"""

from __future__ import annotations

import os
import resource
import sys
from dataclasses import dataclass

import torch

from ..read.layermap import LayerMap, config_dims

BASELINE_GIB = 2.0    # hidden states [S, T, D] of one pass of the layer-streamed baseline (more windows: more passes)
LOGIT_CHUNK_BYTES = 256 * 2**20  # fp32 logits [C, V] of one chunk of positions when verify scores the quantized model
MEMORY_MARGIN = 0.25  # measured / expected increment of a quantization run on CPU stays within 1 +- this (tested)


def peak_rss_bytes() -> int:
    """The process' resident-set high-water mark: VmHWM on Linux (PeakMemory.reset lowers it), else ru_maxrss
    (KiB on Linux, bytes on macOS)."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))
    except (OSError, StopIteration):
        r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return r if sys.platform == "darwin" else r * 1024


def rss_bytes() -> int:
    """The process' resident set now (Linux /proc; elsewhere the high-water mark)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return peak_rss_bytes()


def _malloc_trim() -> None:
    """Give glibc's free heap back to the OS (no-op elsewhere)."""
    if sys.platform.startswith("linux"):
        import ctypes

        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):
            pass


class PeakMemory:
    """Peaks from now on: torch's CUDA peak allocation, and on the host the RSS high-water mark above `base_rss`
    (what the process held when this started or was last reset)."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.device = device
        self._reset_cuda()
        self.hwm_reset = False   # the host high-water mark is the process' own, earlier peaks included
        self.base_rss = rss_bytes()

    def _reset_cuda(self) -> None:
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(self.device)

    def reset(self) -> None:
        """Start a new phase: CUDA peak stats reset; freed heap returned to the OS (glibc's malloc_trim, so the
        phase starts from its working set, not from whatever slack the last phase left); the host high-water mark
        lowered to the RSS now (Linux /proc/self/clear_refs; where that is not allowed, `hwm_reset` is False and
        peaks include earlier ones)."""
        self._reset_cuda()
        _malloc_trim()
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self.hwm_reset = True
        except OSError:
            self.hwm_reset = False
        self.base_rss = rss_bytes()

    def read(self) -> tuple[int, int]:
        """(peak RSS bytes, peak CUDA bytes allocated by torch; 0 on CPU)."""
        vram = torch.cuda.max_memory_allocated(self.device) if self.cuda else 0
        return peak_rss_bytes(), vram


@dataclass(frozen=True)
class Expected:
    """An expected peak as named terms (bytes): their sum (held together), or their max (phases one after the
    other)."""
    terms: dict
    phases: bool = False

    @property
    def total(self) -> int:
        return max(self.terms.values()) if self.phases else sum(self.terms.values())

    def describe(self) -> str:
        return ", ".join(f"{k} {gib(v)}" for k, v in self.terms.items() if v)


def windows_per_pass(seqlen: int, hidden: int, itemsize: int, budget_gib: float = BASELINE_GIB) -> int:
    """Eval windows whose hidden states [S, T, D] fit budget_gib: one pass of baseline.streamed_logprobs (>= 1)."""
    return max(1, int(budget_gib * 2**30) // (seqlen * hidden * itemsize))


def _layer_params(lmap: LayerMap, d: dict) -> int:
    return sum(d[o] * d[k] for o, k in lmap.shapes.values()) + 4 * d["hidden"]


def _forward_bytes(d: dict, heads: int, batch: int, seqlen: int, itemsize: int, flash_attention: bool) -> int:
    """One forward chunk of `batch` windows: the MLP's 3 x FFN-wide activations, or the [B, H, T, T] attention
    scores and probabilities where attention is not flash/memory-efficient, whichever is larger."""
    mlp = 3 * batch * seqlen * d["ffn"]
    attn = 0 if flash_attention else 2 * batch * heads * seqlen * seqlen
    return max(mlp, attn) * itemsize


def expected_quantize_peak(lmap: LayerMap, config: dict, samples: int, seqlen: int, batch: int,
                           itemsize: int, flash_attention: bool, awq_samples: int = 0,
                           on_host: bool = True, lm_head: bool = False) -> Expected:
    """The device bytes a quantization run (pipeline.quantize) holds at its peak, beyond the process' base.

    hidden      2 x [S, T, D]                 the layer's input and the attention half's output buffer
    layer       one decoder layer in the compute dtype, + its bf16 bytes as read from the shards
    read-ahead  the next layer's bf16 bytes, read on a background thread (load.LayerReader); host memory, so
                counted only when the compute device is the host (on_host)
    work        the larger of: a forward chunk [B, T, .] (3 x FFN wide in the MLP; the [B, H, T, T] scores and
                probabilities unless attention is flash/memory-efficient), and the largest solve: 4 x H [K, K] fp32
                (the running sum, gptq_quantize's private copy, its Cholesky factor and inverse) + 2 x the stacked
                weights [sum N, K] fp32 + codes [sum N, K] uint8; the embedding table as stored (bf16) at the start;
                AWQ (awq_samples = n > 0): its captures, n x T x sum over groups of K in the compute dtype, + one module's
                reference output [n, T, D] fp32; with lm_head (gptq --lm-head, head.py), its solve: 4 x H [D, D]
                fp32 + the head as read in the compute dtype + 2 x [V, D] fp32 + codes [V, D] uint8
    itemsize: bytes per element of the compute dtype (4 on CPU: fp32, 2 on CUDA: bf16).
    """
    d = config_dims(config)
    S, T, D = samples, seqlen, d["hidden"]
    heads = int(config["num_attention_heads"])
    hidden = 2 * S * T * D * itemsize
    layer = _layer_params(lmap, d) * (itemsize + 2)
    forward = _forward_bytes(d, heads, batch, T, itemsize, flash_attention)
    solves = []
    for g in lmap.groups:
        n = sum(d[lmap.shapes[name][0]] for name in g.names)
        k = d[lmap.shapes[g.names[0]][1]]
        solves.append(4 * k * k * 4 + n * k * (2 * 4 + 1))
    if lm_head:
        solves.append(4 * D * D * 4 + d["vocab"] * D * (itemsize + 2 * 4 + 1))
    table = d["vocab"] * D * 2
    awq = awq_samples * T * (sum(d[lmap.shapes[g.names[0]][1]] for g in lmap.groups) * itemsize + D * 4)
    ahead = _layer_params(lmap, d) * 2 if on_host else 0
    return Expected({"hidden states": hidden, "layer": layer, "read-ahead": ahead,
                     "forward/solve workspace": max(forward, max(solves), table, awq)})


def expected_verify_peak(lmap: LayerMap, config: dict, quant_weight_bytes: int, windows: int, seqlen: int,
                         batch: int, itemsize: int, flash_attention: bool, baseline_gib: float = BASELINE_GIB,
                         logit_chunk_bytes: int = LOGIT_CHUNK_BYTES, on_host: bool = True) -> Expected:
    """The device bytes `verify` holds at its peak, beyond the process' base: the larger of its two phases.

    baseline    one bf16-source layer + embedding, final norm and lm_head in the compute dtype + one pass of hidden
                states [S', T, D] (S' = windows per pass for baseline_gib, at most `windows`) + a forward chunk
                + one window's logits and log-probs [T, V] fp32; + the next layer as stored, read ahead
                (load.LayerReader), where the compute device is the host (on_host)
    quantized   the quantized model (quant_weight_bytes, as loaded) + one window's forward (batch 1, no KV cache)
                + 3 x a chunk of logits [C, V] fp32 (logit_chunk_bytes)
    Neither grows with the number of eval windows beyond `windows per pass`; the per-position results (a few
    floats per token) go to the host.
    """
    d = config_dims(config)
    T, D, V = seqlen, d["hidden"], d["vocab"]
    heads = int(config["num_attention_heads"])
    per = min(windows, windows_per_pass(T, D, itemsize, baseline_gib))
    heads_io = (1 if config.get("tie_word_embeddings") else 2) * V * D * itemsize

    base = (_layer_params(lmap, d) * (itemsize + 2) + heads_io + per * T * D * itemsize
            + _forward_bytes(d, heads, batch, T, itemsize, flash_attention) + 2 * T * V * 4
            + (_layer_params(lmap, d) * 2 if on_host else 0))
    quant = (quant_weight_bytes + T * D * itemsize * 4 + _forward_bytes(d, heads, 1, T, itemsize, flash_attention)
             + 3 * min(logit_chunk_bytes, T * V * 4))
    return Expected({"baseline pass": base, "quantized model": quant}, phases=True)


def _read_int(path: str) -> int | None:
    try:
        with open(path) as f:
            text = f.read().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def _cgroup_free() -> int | None:
    """The memory cgroup's limit minus its usage (page cache that can be dropped, inactive_file, not counted as
    used); None where there is no limit. cgroup v2 (/proc/self/cgroup '0::/path'), else v1."""
    dirs = []
    try:
        with open("/proc/self/cgroup") as f:
            dirs += [f"/sys/fs/cgroup{line.strip()[3:]}".rstrip("/") for line in f if line.startswith("0::")]
    except OSError:
        pass
    for d, limit, usage, stat, inactive in [*((d, "memory.max", "memory.current", "memory.stat", "inactive_file")
                                              for d in dirs),
                                            ("/sys/fs/cgroup/memory", "memory.limit_in_bytes", "memory.usage_in_bytes",
                                             "memory.stat", "total_inactive_file")]:
        lim, used = _read_int(f"{d}/{limit}"), _read_int(f"{d}/{usage}")
        if lim is None or used is None or lim >= 2**60:
            continue
        cache = 0
        try:
            with open(f"{d}/{stat}") as f:
                cache = next((int(line.split()[1]) for line in f if line.split()[0] == inactive), 0)
        except OSError:
            pass
        return max(0, lim - used + cache)
    return None


def available_bytes(device: torch.device) -> tuple[int | None, str]:
    """(bytes a run can still take on `device`, what that figure is): on CUDA the free VRAM; on the host
    MemAvailable (/proc/meminfo), or the memory cgroup's free share when that is lower. (None, ...) where it
    cannot be read (then nothing is refused)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0], f"{device} (free VRAM)"
    host = None
    try:
        with open("/proc/meminfo") as f:
            host = next((int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:")), None)
    except OSError:
        pass
    cg = _cgroup_free()
    if cg is not None and (host is None or cg < host):
        return cg, "this machine (its memory cgroup's limit less its usage)"
    return host, "this machine (MemAvailable)"


def largest_fitting(expected, upper: int, available: int) -> int:
    """The largest n in [0, upper] with expected(n) <= available (expected: n -> bytes, non-decreasing)."""
    lo, hi = 0, upper
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if expected(mid) <= available else (lo, mid - 1)
    return lo


def gib(n: int | float) -> str:
    return f"{n / 2**30:.2f} GiB"
