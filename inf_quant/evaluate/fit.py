"""Will this checkpoint run on one CUDA GPU, and at what context? An analytic model of inference memory.

The engine behind `inf-quant fit`. Nothing is loaded: weights are summed from the safetensors headers and the
rest follows from config.json. The model is plain transformers `generate()` on one GPU (SDPA attention,
DynamicCache, the whole prompt prefilled in one forward, `logits_to_keep=1`), for a batch of B sequences of
N tokens each:

    total(N) = weights + KV(N) + activations(N) + logits + overhead(weights + KV + activations + logits)

    weights        every checkpoint tensor as stored (GPTQ qweight/qzeros/scales/g_idx, AWQ qweight/qzeros/
                   scales, 16-bit embeddings, lm_head and norms), i.e. loaded with dtype="auto"
    KV(N)          L * H_kv * head_dim * 2 (K and V) * kv_dtype bytes * B * N
    activations(N) the prefill peak, see `activation_bytes`
    logits         B * V * (2 + 4): the last token's bf16 logits and generate()'s fp32 copy
    overhead       CUDA_CONTEXT_BYTES + FRAGMENTATION_PERCENT of everything torch allocates

Every term is non-decreasing in N, so the largest fitting context is a binary search (`max_context`).
Units: bytes everywhere; GB = 1e9 bytes, GiB = 2**30 bytes.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path

from ..core.config import VerifyConfig, check_bits
from ..core.errors import CheckpointError, ConfigError
from ..engine.memory import expected_verify_peak
from ..read.checkpoint import CheckedCheckpoint, check_checkpoint
from ..read.layermap import LAYER_MAPS, head_dim
from ..read.load import Checkpoint

GB = 10**9
GIB = 2**30
Checked = CheckedCheckpoint | Checkpoint  # a checkpoint whose config and headers were read and checked

# Bytes per stored K or V element. fp8 assumes a cache that stores 1-byte K/V (e.g. vLLM kv_cache_dtype="fp8");
# transformers' DynamicCache stores the model dtype (fp16/bf16).
KV_DTYPE_BYTES = {"fp16": 2, "bf16": 2, "fp8": 1}

ACT_BYTES = 2  # activations are bf16 (or fp16, which transformers picks for GPTQ): 2 bytes per element

# CUDA context, cuBLAS/cuBLASLt handles and workspaces, and the quantized-kernel modules: memory the GPU loses
# before torch allocates anything. Not measured here (no GPU): torch's context on CUDA 12 with lazy module
# loading shows ~0.3-0.5 GiB in nvidia-smi, cuBLAS workspaces and kernel images add ~0.1-0.3 GiB. 0.75 GiB
# sits at the top of that range; recalibrate against `verify`'s measured peak VRAM (nvidia-smi minus torch).
CUDA_CONTEXT_BYTES = 768 * 2**20

# PyTorch's caching allocator rounds every block over 1 MiB up to a 2 MiB multiple (~1 MiB lost per large
# tensor: ~2.5% of a 4-bit 34B's weights), quantized kernels repack weights after loading, and the prefill's
# temporaries and the growing DynamicCache (torch.cat per step) leave holes. 5% of every allocation is a
# conservative allowance: a false "fits" costs an OOM, a false "does not fit" costs a few hundred tokens.
FRAGMENTATION_PERCENT = 5

# Buffers alive through the MLP, in units of hidden_size per token: the embedding output (held by the model's
# forward frame), the decoder layer's input, the residual sum and the normed MLP input.
HIDDEN_BUFFERS = 4
# Peak of the attention half, in units of hidden_size per token: the three hidden buffers above (the residual
# is the layer input there), q and its rotated copy (+ rope temporaries), SDPA's output, its contiguous
# [B, N, D] reshape and o_proj's output.
ATTN_BUFFERS = 8
# The MLP's peak: act(gate(x)), up(x) and their product are alive together, each [B, N, intermediate].
MLP_BUFFERS = 3

SUPPORTED_QUANT = ("gptq", "awq")


@dataclass(frozen=True)
class MemoryModel:
    """Everything `total_bytes` needs besides the context. Sizes in bytes."""

    num_layers: int
    hidden_size: int           # D
    intermediate_size: int     # MLP width
    num_kv_heads: int
    head_dim: int
    vocab_size: int            # V
    max_position_embeddings: int
    weights_bytes: int         # exact sum of the checkpoint tensors
    dequant_bytes: int         # fp16 copy of the largest quantized Linear [N, K]; 0 when unquantized
    kv_dtype_bytes: int        # 2 (fp16/bf16) or 1 (fp8)
    batch: int                 # B


def kv_bytes_per_token(m: MemoryModel) -> int:
    """KV cache bytes per token of context: L * H_kv * head_dim * 2 (K and V) * dtype bytes * B."""
    return m.num_layers * m.num_kv_heads * m.head_dim * 2 * m.kv_dtype_bytes * m.batch


def activation_bytes(m: MemoryModel, context: int) -> int:
    """Peak prefill activations for `context` tokens per sequence, in bytes.

    B * N * 2 bytes * (max(MLP, attention) + rope) + dequant, where per token and in elements:
      MLP        = 3 * intermediate + 4 * D   (act(gate), up, their product; embeds, layer input, residual, normed)
      attention  = 8 * D + 4 * kv_dim        (see ATTN_BUFFERS; new K, V, their rotated and cache copies)
      rope       = 2 * head_dim              (cos and sin tables)
      dequant    = the largest quantized Linear dequantized to fp16 (N * K * 2 bytes): exllama/exllamav2 and
                   AWQ-gemm dequantize a whole weight and call cuBLAS for long prompts; Marlin dequantizes
                   in registers, so for it this is a ~0.34 GiB (INF-34B's gate/up) overestimate.
    Assumes SDPA picks flash or memory-efficient attention (no padding, so no [N, N] mask and no repeat_kv),
    i.e. O(N * D) workspace; the math backend would add B * heads * N^2 * 4 bytes.
    """
    kv_dim = m.num_kv_heads * m.head_dim
    mlp = MLP_BUFFERS * m.intermediate_size + HIDDEN_BUFFERS * m.hidden_size
    attn = ATTN_BUFFERS * m.hidden_size + 4 * kv_dim
    per_token = (max(mlp, attn) + 2 * m.head_dim) * ACT_BYTES
    return m.batch * context * per_token + m.dequant_bytes


def logits_bytes(m: MemoryModel) -> int:
    """Last-token logits with generate()'s logits_to_keep=1: [B, V] bf16 from lm_head plus its fp32 copy."""
    return m.batch * m.vocab_size * (ACT_BYTES + 4)


def overhead_bytes(allocated: int) -> int:
    """CUDA context (CUDA_CONTEXT_BYTES) plus FRAGMENTATION_PERCENT of `allocated` bytes, rounded up."""
    return CUDA_CONTEXT_BYTES + -(-allocated * FRAGMENTATION_PERCENT // 100)


def _allocated_bytes(m: MemoryModel, context: int) -> int:
    return m.weights_bytes + kv_bytes_per_token(m) * context + activation_bytes(m, context) + logits_bytes(m)


def total_bytes(m: MemoryModel, context: int) -> int:
    """Peak GPU bytes to generate at `context` tokens per sequence; strictly increasing in context."""
    allocated = _allocated_bytes(m, context)
    return allocated + overhead_bytes(allocated)


def max_context(m: MemoryModel, budget_bytes: int) -> int:
    """Largest N in [1, max_position_embeddings] with total_bytes(m, N) <= budget_bytes; 0 if N=1 does not fit."""
    lo, hi = 0, m.max_position_embeddings       # invariant: lo fits (0 stands for "nothing"), every n > hi fails
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if total_bytes(m, mid) <= budget_bytes:
            lo = mid
        else:
            hi = mid - 1
    return lo


@dataclass(frozen=True)
class FitReport:
    """Memory needed on one GPU at `context` tokens, and the largest context that fits. Sizes in bytes."""

    model: str
    quant: str                  # "gptq 4-bit g128", or the stored dtype when unquantized
    quant_bits: int | None      # None when unquantized
    budget_bytes: int
    context: int
    batch: int
    kv_dtype: str
    weights_bytes: int
    kv_bytes_per_token: int
    kv_bytes: int               # at `context`
    activation_bytes: int       # at `context`
    logits_bytes: int
    overhead_bytes: int         # at `context`
    total_bytes: int            # at `context`
    fits: bool
    max_context: int            # 0 if not even one token fits
    max_position_embeddings: int
    verify_seqlen: int = 0      # the eval window length `verify` runs at by default (a quantized checkpoint only)
    verify_bytes: int = 0       # what `verify` itself needs on this GPU at verify_seqlen, overhead included

    @property
    def context_capped(self) -> bool:
        """True when max_position_embeddings, not memory, limits max_context."""
        return self.max_context == self.max_position_embeddings

    @property
    def needed_gib_at_context(self) -> float:
        return self.total_bytes / GIB

    @property
    def verdict(self) -> str:
        return _verdict(self)

    def to_dict(self) -> dict:
        """JSON-able: every field plus context_capped, needed_gib_at_context and the constants used."""
        return {**asdict(self), "verdict": self.verdict, "context_capped": self.context_capped,
                "needed_gib_at_context": self.needed_gib_at_context, "budget_gib": self.budget_bytes / GIB,
                "cuda_context_bytes": CUDA_CONTEXT_BYTES, "fragmentation_percent": FRAGMENTATION_PERCENT}

    def to_text(self) -> str:
        """A breakdown table in GB and GiB, then a one-line verdict."""
        rows = [("weights", self.weights_bytes),
                (f"KV cache ({self.context} tok x {self.kv_bytes_per_token / 2**10:.1f} KiB)", self.kv_bytes),
                ("activations (prefill peak)", self.activation_bytes),
                ("logits (last token)", self.logits_bytes),
                (f"overhead (CUDA {CUDA_CONTEXT_BYTES / GIB:.2f} GiB + {FRAGMENTATION_PERCENT}%)",
                 self.overhead_bytes),
                ("total", self.total_bytes)]
        head = (f"{self.model}: {self.quant}, batch {self.batch}, {self.kv_dtype} KV, context {self.context}, "
                f"one GPU with {self.budget_bytes / GIB:.1f} GiB")
        width = max(len(name) for name, _ in rows)
        lines = [head, f"  {'':<{width}}  {'GB':>8}  {'GiB':>8}"]
        lines += [f"  {name:<{width}}  {n / GB:8.2f}  {n / GIB:8.2f}" for name, n in rows]
        return "\n".join([*lines, *([_verify_line(self)] if self.verify_bytes else []), _verdict(self)])


def _verify_line(r: FitReport) -> str:
    fits = "fits" if r.verify_bytes <= r.budget_bytes else "does NOT fit"
    return (f"`inf-quant verify` itself (batch 1, no KV cache, bf16, {r.verify_seqlen}-token windows) needs about "
            f"{r.verify_bytes / GIB:.1f} GiB: {fits} {r.budget_bytes / GIB:.1f} GiB")


def _verdict(r: FitReport) -> str:
    card = f"{r.budget_bytes / GIB:.1f} GiB"
    need = f"{r.total_bytes / GIB:.1f} GiB"
    largest = f"largest context that fits: {r.max_context}"
    if r.context_capped:
        largest += " (the model's max_position_embeddings)"
    if r.fits:
        return f"fits {card} at context {r.context} (uses {need}); {largest}"
    bigger = f"a card with >= {math.ceil(r.total_bytes / GIB)} GiB for context {r.context}"
    smaller = " or a 4-bit checkpoint" if r.quant_bits is None or r.quant_bits > 4 else ""
    if r.max_context > 0:
        fp8 = "" if r.kv_dtype == "fp8" else "fp8 KV, "
        return (f"does NOT fit {card} at context {r.context} (needs {need}); {largest} "
                f"— use a shorter context, {fp8}or {bigger}")
    if r.weights_bytes > r.budget_bytes:
        return (f"does NOT fit {card}: the weights alone need {r.weights_bytes / GB:.1f} GB "
                f"({r.weights_bytes / GIB:.1f} GiB) — use {bigger}{smaller}")
    return (f"does NOT fit {card}: even one token needs more (weights {r.weights_bytes / GIB:.1f} GiB plus "
            f"activations and CUDA overhead) — use {bigger}{smaller}")


def quant_spec(config: dict) -> tuple[str, int | None]:
    """(label, bits) from config.json's quantization_config; (stored dtype, None) when there is none."""
    qc = config.get("quantization_config")
    if qc is None:
        return str(config.get("dtype") or config.get("torch_dtype") or "unquantized"), None
    method = qc.get("quant_method")
    if method not in SUPPORTED_QUANT:
        raise ConfigError(f"quantization_config.quant_method={method!r} is not supported; "
                          f"fit models {', '.join(SUPPORTED_QUANT)} checkpoints or unquantized ones")
    bits = qc.get("bits")
    check_bits(f"{method} quantization_config.bits", bits, (2, 3, 4, 8), "the widths fit can size")
    return f"{method} {bits}-bit g{qc.get('group_size')}", bits


def _config_int(config: dict, key: str) -> int:
    value = config.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ConfigError(f"config.json {key}={value!r}: expected a positive integer")
    return value


def _largest_linear_from_config(config: dict) -> int:
    """Elements N * K of the largest Llama-shaped block Linear (q/o: D x heads*head_dim, MLP: D x I)."""
    d, heads = _config_int(config, "hidden_size"), _config_int(config, "num_attention_heads")
    return d * max(heads * head_dim(config), _config_int(config, "intermediate_size"))


def memory_model(config: dict, weights_bytes: int, dequant_bytes: int, batch: int = 1,
                 kv_dtype: str = "fp16") -> MemoryModel:
    """Validate config.json's numbers and the run settings into a MemoryModel."""
    if kv_dtype not in KV_DTYPE_BYTES:
        raise ConfigError(f"kv_dtype={kv_dtype!r} is not supported; use one of {', '.join(KV_DTYPE_BYTES)}")
    if not isinstance(batch, int) or batch < 1:
        raise ConfigError(f"batch={batch!r}: expected a positive integer")
    if not isinstance(weights_bytes, int) or weights_bytes < 0 or not isinstance(dequant_bytes, int):
        raise ConfigError(f"weights_bytes={weights_bytes!r}, dequant_bytes={dequant_bytes!r}: expected byte counts")
    heads = _config_int(config, "num_attention_heads")
    return MemoryModel(
        num_layers=_config_int(config, "num_hidden_layers"), hidden_size=_config_int(config, "hidden_size"),
        intermediate_size=_config_int(config, "intermediate_size"),
        num_kv_heads=config.get("num_key_value_heads") or heads, head_dim=head_dim(config),
        vocab_size=_config_int(config, "vocab_size"),
        max_position_embeddings=_config_int(config, "max_position_embeddings"),
        weights_bytes=weights_bytes, dequant_bytes=dequant_bytes, kv_dtype_bytes=KV_DTYPE_BYTES[kv_dtype],
        batch=batch)


def _budget_bytes(vram_gib: float) -> int:
    if not isinstance(vram_gib, (int, float)) or not math.isfinite(vram_gib) or vram_gib <= 0:
        raise ConfigError(f"vram_gib={vram_gib!r}: expected a positive number of GiB, e.g. 24")
    return int(vram_gib * GIB)


def fit_from_shapes(config: dict, weights_bytes: int, vram_gib: float = 24.0, context: int | None = None,
                    batch: int = 1, kv_dtype: str = "fp16", dequant_bytes: int | None = None,
                    model: str | None = None) -> FitReport:
    """FitReport from config.json's contents and the checkpoint's total tensor bytes, without any files.

    dequant_bytes: fp16 bytes of the largest quantized Linear; None derives it from the config's shapes
    (0 when the config has no quantization_config). context None means max_position_embeddings.
    """
    quant, bits = quant_spec(config)
    if dequant_bytes is None:
        dequant_bytes = 0 if bits is None else _largest_linear_from_config(config) * 2
    m = memory_model(config, weights_bytes, dequant_bytes, batch, kv_dtype)
    budget = _budget_bytes(vram_gib)
    n = m.max_position_embeddings if context is None else context
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ConfigError(f"context={context!r}: expected a positive number of tokens")
    if n > m.max_position_embeddings:
        raise ConfigError(f"context={n} exceeds the model's max_position_embeddings={m.max_position_embeddings}; "
                          f"use a context <= {m.max_position_embeddings}")
    allocated = _allocated_bytes(m, n)
    total = total_bytes(m, n)
    return FitReport(
        model=model or str(config.get("model_type", "model")), quant=quant, quant_bits=bits, budget_bytes=budget,
        context=n, batch=batch, kv_dtype=kv_dtype, weights_bytes=weights_bytes,
        kv_bytes_per_token=kv_bytes_per_token(m), kv_bytes=kv_bytes_per_token(m) * n,
        activation_bytes=activation_bytes(m, n), logits_bytes=logits_bytes(m),
        overhead_bytes=overhead_bytes(allocated), total_bytes=total, fits=total <= budget,
        max_context=max_context(m, budget), max_position_embeddings=m.max_position_embeddings,
        **_verify_need(config, weights_bytes, m.max_position_embeddings, bits))


def _verify_need(config: dict, weights_bytes: int, max_pos: int, bits: int | None) -> dict:
    """verify's own expected peak on a GPU (memory.expected_verify_peak + CUDA overhead), for quantized configs."""
    if bits is None or config.get("model_type") not in LAYER_MAPS:
        return {}
    seqlen = min(VerifyConfig.seqlen, max_pos)
    exp = expected_verify_peak(LAYER_MAPS[config["model_type"]], config, weights_bytes, 10**9, seqlen, 4, 2, True,
                               on_host=False)
    return {"verify_seqlen": seqlen, "verify_bytes": exp.total + overhead_bytes(exp.total)}


def tensor_sizes(path: str | Path,
                 checked: Checked | None = None) -> tuple[dict, dict[str, tuple[int, tuple[int, ...]]]]:
    """(config, name -> (stored bytes, shape)) of every tensor in a checkpoint, from the safetensors headers alone.
    checked: this directory already checked (pre-flight's check_checkpoint, or load.open_checkpoint's Checkpoint), its
    headers used as they are; None reads and checks them here."""
    ck = checked or check_checkpoint(path, bf16_input=False)
    return ck.config, {name: (ck.tensors[name].nbytes, ck.tensors[name].shape) for name in sorted(ck.weight_map)}


def checkpoint_bytes(path: str | Path, checked: Checked | None = None) -> tuple[dict, int, int]:
    """(config, sum of all tensor bytes, fp16 bytes of the largest quantized Linear) from the headers alone.

    The largest Linear's N * K comes from its qweight: 32 / bits codes per int32, in GPTQ's [K*bits/32, N]
    and AWQ's [K, N*bits/32] layouts alike. checked: as tensor_sizes.
    """
    config, sizes = tensor_sizes(path, checked)
    _, bits = quant_spec(config)
    total = sum(n for n, _ in sizes.values())
    largest = max((math.prod(shape) * 32 // bits for name, (_, shape) in sizes.items()
                   if bits is not None and name.endswith(".qweight")), default=0)
    if bits is not None and largest == 0:
        raise CheckpointError(f"{Path(path)}: config.json has a quantization_config but no tensor ends in "
                              "'.qweight'; the weights are not GPTQ/AWQ-packed, or the config is stale")
    return config, total, largest * 2


def fit_checkpoint(path: str | Path, vram_gib: float = 24.0, context: int | None = None, batch: int = 1,
                   kv_dtype: str = "fp16", checked: Checked | None = None) -> FitReport:
    """FitReport for a checkpoint directory (bf16, GPTQ or AWQ) on one GPU of `vram_gib` GiB.

    context None means the model's max_position_embeddings. Raises CheckpointError for a missing or malformed
    directory and ConfigError for bad settings (context < 1, unknown kv_dtype, ...). checked: as tensor_sizes.
    """
    config, weights, dequant = checkpoint_bytes(path, checked)
    return fit_from_shapes(config, weights, vram_gib, context, batch, kv_dtype, dequant, Path(path).name)
