"""Will this checkpoint serve in vLLM on N GPUs, and with what `--max-model-len`? vLLM's own memory accounting.

The `vllm` engine of `inf-quant fit` (the default; `fit.py` keeps transformers' one-shot prefill). vLLM does not
grow its activations with the context: it prefills in chunks of at most `max_num_batched_tokens` tokens, measures
its peak once at start-up with a dummy batch of that size (the "profile run"), and gives whatever is left of
`gpu_memory_utilization` x the card to KV-cache blocks of 16 tokens. Per GPU, for tensor-parallel size P:

    kv_budget = card x gpu_memory_utilization - weights/P - activation peak - non-torch - CUDA-graph pool
    max_model_len = min(16 x floor(kv_budget / (16 x KV bytes per token per GPU)), max_position_embeddings)

Sources, vLLM 0.32 (vllm/v1/worker/gpu_worker.py `determine_available_memory`: requested memory = total x
utilization, minus the profiled non-KV memory and the CUDA-graph estimate; vllm/engine/arg_utils.py: the OpenAI
server's default `max_num_batched_tokens` 2048 and `max_num_seqs` 256 on cards under 70 GiB; vllm/config/cache.py:
block size 16; vllm/v1/core/kv_cache_utils.py: the engine refuses a max_model_len whose one request does not fit the
KV blocks). Terms marked ESTIMATE were not measured on a GPU here (none was lent); each is listed in
`ESTIMATES_TO_MEASURE` for the first GPU session, which reads them off vLLM's start-up log ("Model loading took",
"Available KV cache memory", "CUDA graph ... took").
Units: bytes; GiB = 2**30.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, replace

from ..core.errors import ConfigError
from .fit import GIB, KV_DTYPE_BYTES, Checked, quant_spec, activation_bytes, memory_model, tensor_sizes

BLOCK_TOKENS = 16              # vLLM's default KV block size on CUDA (vllm/config/cache.py)
GPU_MEMORY_UTILIZATION = 0.9   # vLLM's default (vllm/config/cache.py)
MAX_NUM_BATCHED_TOKENS = 2048  # OpenAI server default on a < 70 GiB card (vllm/engine/arg_utils.py)
MAX_NUM_SEQS = 256             # the same table
# ESTIMATE: the sampler's dummy run at start-up (gpu_model_runner `_dummy_sampler_run`) computes fp32 logits for
# max_num_seqs requests and samples with top-k/top-p: logits, their sorted copy, int64 sort indices and the
# probabilities are alive together, ~20 bytes per logit.
SAMPLER_BYTES_PER_LOGIT = 20
# ESTIMATE: memory of the captured CUDA graphs (vLLM profiles it: `profile_cudagraph_memory`; 0 with
# --enforce-eager). Public vLLM start-up logs: "took 0.21 GiB" (Llama-3.2-1B, vLLM PR #11349), "Estimated CUDA graph
# memory: 0.36 GiB total" (TP 2, gpustack/runner PR #251); 0.5 GiB allows for INF-34B's 48 layers.
CUDAGRAPH_BYTES = GIB // 2
# ESTIMATE: memory outside torch that grows during start-up (cuBLAS/cuBLASLt workspaces, kernel images), which
# vLLM counts against the KV budget; vLLM's log on a 32 GiB card: "non_torch_memory takes 0.33GiB" (vLLM issue
# #14452). The CUDA context itself exists before vLLM's first memory snapshot and lives in the (1 - utilization)
# headroom, which is why `gpu_memory_utilization` above ~0.97 fails on a 24 GiB card.
NON_TORCH_BYTES = 384 * 2**20
# ESTIMATE: NCCL's buffers and communicator per GPU when P > 1 (not there for P = 1).
NCCL_BYTES = 512 * 2**20
# Settings tried in this order, each on top of the previous ones, when the asked context does not fit.
LADDER = (("gpu_memory_utilization", 0.95), ("kv_dtype", "fp8"), ("enforce_eager", True),
          ("max_num_batched_tokens", 512), ("max_num_seqs", 32))
ESTIMATES_TO_MEASURE = ("activation peak (profile run)", "sampler dummy run", "CUDA-graph pool", "non-torch memory",
                        "NCCL buffers (P > 1)")


@dataclass(frozen=True)
class VllmSettings:
    """vLLM's flags that decide the KV budget, at vLLM's defaults."""

    gpu_memory_utilization: float = GPU_MEMORY_UTILIZATION
    kv_dtype: str = "auto"                 # auto = the model dtype (bf16); fp8 = --kv-cache-dtype fp8
    enforce_eager: bool = False
    max_num_batched_tokens: int = MAX_NUM_BATCHED_TOKENS
    max_num_seqs: int = MAX_NUM_SEQS
    tensor_parallel_size: int = 1

    def __post_init__(self):
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ConfigError(f"--gpu-memory-utilization {self.gpu_memory_utilization}: expected a fraction in (0, 1]")
        if self.kv_dtype not in ("auto", *KV_DTYPE_BYTES):
            raise ConfigError(f"--kv-dtype {self.kv_dtype}: expected auto, {', '.join(KV_DTYPE_BYTES)}")
        for flag in ("max_num_batched_tokens", "max_num_seqs", "tensor_parallel_size"):
            v = getattr(self, flag)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ConfigError(f"--{flag.replace('_', '-')} {v!r}: expected a positive integer")

    def flags(self) -> list[str]:
        """The `vllm serve` flags that differ from vLLM's defaults."""
        out = []
        if self.tensor_parallel_size > 1:
            out += ["--tensor-parallel-size", str(self.tensor_parallel_size)]
        if self.gpu_memory_utilization != GPU_MEMORY_UTILIZATION:
            out += ["--gpu-memory-utilization", f"{self.gpu_memory_utilization:g}"]
        if self.kv_dtype == "fp8":
            out += ["--kv-cache-dtype", "fp8"]
        if self.enforce_eager:
            out += ["--enforce-eager"]
        if self.max_num_batched_tokens != MAX_NUM_BATCHED_TOKENS:
            out += ["--max-num-batched-tokens", str(self.max_num_batched_tokens)]
        if self.max_num_seqs != MAX_NUM_SEQS:
            out += ["--max-num-seqs", str(self.max_num_seqs)]
        return out


@dataclass(frozen=True)
class VllmFit:
    """Per-GPU memory under vLLM and the largest `--max-model-len` it allows. Sizes in bytes."""

    model: str
    path: str
    settings: VllmSettings
    card_bytes: int
    requested_bytes: int          # card x gpu_memory_utilization
    weights_bytes: int            # per GPU
    activation_bytes: int         # ESTIMATE: max(forward at max_num_batched_tokens, sampler dummy run)
    non_torch_bytes: int          # ESTIMATE: cuBLAS workspaces, kernel images (+ NCCL when P > 1)
    cudagraph_bytes: int          # ESTIMATE; 0 with --enforce-eager
    kv_budget_bytes: int          # what is left for KV blocks (negative: the weights do not fit)
    kv_bytes_per_token: int       # per GPU
    max_model_len: int            # 0: not one block fits
    max_position_embeddings: int
    context: int                  # the context asked for
    fits: bool                    # context <= max_model_len

    def command(self) -> str:
        n = min(self.context, self.max_model_len) if self.max_model_len else self.context
        return " ".join(["vllm serve", self.path, "--max-model-len", str(n), *self.settings.flags()])

    def to_dict(self) -> dict:
        return {**asdict(self), "engine": "vllm", "command": self.command(), "verdict": self.verdict,
                "estimates_to_measure": list(ESTIMATES_TO_MEASURE)}

    @property
    def verdict(self) -> str:
        card = f"{self.settings.tensor_parallel_size} x {self.card_bytes / GIB:.1f} GiB"
        if self.kv_budget_bytes < self.kv_bytes_per_token * BLOCK_TOKENS:
            return (f"vLLM: does NOT fit {card}: weights {self.weights_bytes / GIB:.2f} GiB per GPU leave no room for "
                    f"one KV block at gpu_memory_utilization {self.settings.gpu_memory_utilization:g}")
        word = "fits" if self.fits else "does NOT fit"
        return (f"vLLM: {word} {card} at context {self.context}; largest --max-model-len {self.max_model_len}"
                + (" (the model's max_position_embeddings)" if self.max_model_len == self.max_position_embeddings
                   else ""))

    def to_text(self) -> str:
        s = self.settings
        rows = [(f"card x gpu_memory_utilization {s.gpu_memory_utilization:g}", self.requested_bytes),
                ("weights (as stored, per GPU)", self.weights_bytes),
                (f"activations (profile run, {s.max_num_batched_tokens} tok / {s.max_num_seqs} seqs) *",
                 self.activation_bytes),
                ("non-torch (cuBLAS workspaces" + (", NCCL" if s.tensor_parallel_size > 1 else "") + ") *",
                 self.non_torch_bytes),
                ("CUDA-graph pool *" + (" (--enforce-eager)" if s.enforce_eager else ""), self.cudagraph_bytes),
                (f"KV cache ({self.kv_bytes_per_token / 2**10:.0f} KiB/token, blocks of {BLOCK_TOKENS})",
                 self.kv_budget_bytes)]
        width = max(len(r[0]) for r in rows)
        lines = [f"{self.model} under vLLM 0.32 on {s.tensor_parallel_size} GPU(s) of {self.card_bytes / GIB:.1f} GiB"
                 f", KV {'bf16' if s.kv_dtype == 'auto' else s.kv_dtype}",
                 f"  {'':<{width}}  {'GiB':>8}"]
        lines += [f"  {name:<{width}}  {n / GIB:8.2f}" for name, n in rows]
        lines += ["  * estimate, not yet measured on a GPU", self.verdict]
        lines += [f"  {self.command()}"] if self.max_model_len else []
        return "\n".join(lines)


def _per_gpu_weights(tensor_bytes: dict[str, int], p: int) -> int:
    """vLLM splits every Linear and the vocab-parallel embedding / lm_head across P GPUs; norms are replicated."""
    split = sum(n for name, n in tensor_bytes.items() if "norm" not in name)
    return -(-split // p) + sum(n for name, n in tensor_bytes.items() if "norm" in name)


def fit_shapes(config: dict, tensor_bytes: dict[str, int], card_gib: float, context: int | None,
               settings: VllmSettings = VllmSettings(), model: str = "model", path: str = "OUT") -> VllmFit:
    """VllmFit from config.json and every tensor's stored bytes (name -> bytes), without any files."""
    if not isinstance(card_gib, (int, float)) or not math.isfinite(card_gib) or card_gib <= 0:
        raise ConfigError(f"--vram-gib {card_gib!r}: expected a positive number of GiB, e.g. 24")
    p = settings.tensor_parallel_size
    kv_dtype = "bf16" if settings.kv_dtype == "auto" else settings.kv_dtype
    m = memory_model(config, sum(tensor_bytes.values()), 0, 1, kv_dtype)
    if p > 1 and (m.num_kv_heads % p and p % m.num_kv_heads or
                  config["num_attention_heads"] % p or m.intermediate_size % p):
        raise ConfigError(f"--tensor-parallel-size {p}: vLLM splits {config['num_attention_heads']} query heads, "
                          f"{m.num_kv_heads} KV heads and FFN {m.intermediate_size} evenly; choose a divisor")
    n = m.max_position_embeddings if context is None else context
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ConfigError(f"--context {context!r}: expected a positive number of tokens")
    if n > m.max_position_embeddings:
        raise ConfigError(f"--context {n} exceeds the model's max_position_embeddings={m.max_position_embeddings}")
    card = int(card_gib * GIB)
    requested = int(card * settings.gpu_memory_utilization)
    weights = _per_gpu_weights(tensor_bytes, p)
    # forward of one chunk: hidden buffers replicated, q/kv heads and the FFN split over P (Marlin: no dequant copy)
    shard = replace(m, intermediate_size=m.intermediate_size // p)
    forward = activation_bytes(shard, settings.max_num_batched_tokens)
    sampler = min(settings.max_num_seqs, settings.max_num_batched_tokens) * m.vocab_size * SAMPLER_BYTES_PER_LOGIT
    activations = max(forward, sampler)
    non_torch = NON_TORCH_BYTES + (NCCL_BYTES if p > 1 else 0)
    graphs = 0 if settings.enforce_eager else CUDAGRAPH_BYTES
    kv_budget = requested - weights - activations - non_torch - graphs
    kv_heads = max(1, m.num_kv_heads // p)
    per_token = m.num_layers * kv_heads * m.head_dim * 2 * m.kv_dtype_bytes
    blocks = max(0, kv_budget) // (per_token * BLOCK_TOKENS)
    max_len = min(blocks * BLOCK_TOKENS, m.max_position_embeddings)
    return VllmFit(model=model, path=path, settings=settings, card_bytes=card, requested_bytes=requested,
                   weights_bytes=weights, activation_bytes=activations, non_torch_bytes=non_torch,
                   cudagraph_bytes=graphs, kv_budget_bytes=kv_budget, kv_bytes_per_token=per_token,
                   max_model_len=max_len, max_position_embeddings=m.max_position_embeddings, context=n,
                   fits=n <= max_len)


def what_fits(config: dict, tensor_bytes: dict[str, int], card_gib: float, context: int | None,
              settings: VllmSettings = VllmSettings(), **names) -> VllmFit:
    """The fit at `settings`; if `context` does not fit, the first rung of LADDER (cumulative) at which it does —
    or the last rung's fit, which then says it does not."""
    r = fit_shapes(config, tensor_bytes, card_gib, context, settings, **names)
    for key, value in LADDER:
        if r.fits:
            break
        current = getattr(settings, key)
        better = (value > current if key == "gpu_memory_utilization" else
                  value < current if key.startswith("max_num") else value != current)
        if better:
            settings = replace(settings, **{key: value})
            r = fit_shapes(config, tensor_bytes, card_gib, context, settings, **names)
    return r


def fit_checkpoint_vllm(path, card_gib: float = 24.0, context: int | None = None,
                        settings: VllmSettings = VllmSettings(), suggest: bool = True,
                        shown_as: str | None = None, checked: Checked | None = None) -> VllmFit:
    """VllmFit of a checkpoint directory from its headers; with `suggest`, the flags that make `context` fit.
    shown_as: the path the `vllm serve` command names (default: `path` as given). checked: as fit.tensor_sizes."""
    config, sizes, names = _read(path, shown_as, checked)
    return (what_fits if suggest else fit_shapes)(config, sizes, card_gib, context, settings, **names)


def _read(path, shown_as: str | None = None,
          checked: Checked | None = None) -> tuple[dict, dict[str, int], dict]:
    """(config, tensor name -> stored bytes, the model/path names a VllmFit shows) from the headers, read once."""
    from pathlib import Path

    config, sizes = tensor_sizes(path, checked)
    quant_spec(config)  # refuses a quantization method the model does not know
    return config, {k: n for k, (n, _) in sizes.items()}, {"model": Path(path).name, "path": shown_as or str(path)}


def answer(path, card_gib: float, context: int | None, settings: VllmSettings, as_json: bool) -> tuple[bool, str]:
    """`inf-quant fit --engine vllm`: (fits at `settings`, what to print). The text is the breakdown and verdict,
    the largest --max-model-len with bf16 and with fp8 KV, and when the context does not fit the first LADDER
    settings that make it fit; the JSON is VllmFit.to_dict() plus `fits_with` (that fit's dict, or None)."""
    config, sizes, names = _read(path)  # the headers once, for every fit below
    report = fit_shapes(config, sizes, card_gib, context, settings, **names)
    better = None if report.fits else what_fits(config, sizes, card_gib, context, settings, **names)
    if as_json:
        return report.fits, json.dumps({**report.to_dict(), "fits_with": better.to_dict() if better and better.fits
                                         else None}, sort_keys=True, default=str)
    kv = {d: fit_shapes(config, sizes, card_gib, None, replace(settings, kv_dtype=d), **names).max_model_len
          for d in ("auto", "fp8")}
    lines = [report.to_text(), f"largest --max-model-len at these settings: {kv['auto']:,} with bf16 KV, "
                               f"{kv['fp8']:,} with fp8 KV"]
    if better is not None:
        lines.append(f"fits with: {better.command()}" if better.fits else
                     f"does not fit even with: {' '.join(better.settings.flags())}; use more cards "
                     f"(--tensor-parallel-size N) or a smaller checkpoint")
    return report.fits, "\n".join(lines)


__all__ = ["answer", "VllmSettings", "VllmFit", "fit_shapes", "what_fits", "fit_checkpoint_vllm", "BLOCK_TOKENS",
           "LADDER"]
