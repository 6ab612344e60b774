"""On-disk integer layouts, and their exact inverses. This is the only file that describes them.

Both formats store a Linear with weight [N, K] (N = out_features, K = in_features, G = group size,
n_groups = K // G) as integer codes q in [0, 2**bits) with w ~= scale * (q - zero). Every packed
word is an int32 (read as 32 raw bits), filled lowest bits first: field f of a word holds bits
[f * bits, (f + 1) * bits).

GPTQ v1 (quantization_config `quant_method: gptq`, `checkpoint_format: gptq`; what transformers,
optimum and gptqmodel load):
    qweight [K * bits // 32, N] int32  word [r, n] holds codes[n, r*P : (r+1)*P], P = 32 // bits
                                       consecutive input rows, the first in the lowest bits
    qzeros  [n_groups, N * bits // 32] word [g, c] holds zero[c*P : (c+1)*P, g] - 1, each masked to
                                       bits (the v1 off-by-one; a zero of 0 is stored as 2**bits - 1)
    scales  [n_groups, N] fp16;  g_idx [K] int32 (group of each input column)
    Matched against AutoGPTQ/AutoGPTQ `auto_gptq/nn_modules/qlinear/qlinear_cuda_old.py` (QuantLinear.pack:
    `qweight[row] |= intweight[j] << (bits * (j - i))`; `zeros -= 1` then the same packing along N;
    the torch forward unpacks `(qzeros >> shift) & maxq` and adds 1) and gptqmodel 7.6
    `gptqmodel/utils/model.py` (convert_gptq_v1_to_v2_format_module adds 0x11111111 for 4 bits:
    "v1 checkpoint format used to do `qzeros -= 1` before serialization").
    Caveat: gptqmodel's v1 -> v2 conversion adds that constant as one integer, so a stored field of
    2**bits - 1 (zero == 0, asymmetric only) carries into the next field there; see pack_gptq.

AWQ gemm (quantization_config `quant_method: awq`, `version: gemm`), 4-bit only:
    qweight [K, N // 8] int32  word [k, c] holds codes[c*8 + AWQ_ORDER[f], k] in field f
    qzeros  [n_groups, N // 8] int32  word [g, c] holds zero[c*8 + AWQ_ORDER[f], g] in field f, as is
    scales  [n_groups, N] fp16
    with AWQ_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]: the 8 nibbles of a word hold output columns in that order.
    Matched against casper-hansen/AutoAWQ `awq/modules/linear/gemm.py` (WQLinear_GEMM.from_linear:
    `order_map = [0, 2, 4, 6, 1, 3, 5, 7]`, `qweight[:, col] |= intweight[:, col * 8 + order_map[i]] << (i * 4)`,
    zeros packed the same way with no offset) and `awq/utils/packing_utils.py` (AWQ_ORDER,
    AWQ_REVERSE_ORDER = [0, 4, 1, 5, 2, 6, 3, 7] used to unpack); gptqmodel 7.6 ships the same
    (`gptqmodel/nn_modules/qlinear/gemm_awq.py`, `gptqmodel/quantization/awq/utils/packing_utils.py`).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..core.config import check_bits
from ..core.errors import CheckpointError, ConfigError, NumericalError

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)          # field f of an AWQ word holds column AWQ_ORDER[f]
AWQ_REVERSE_ORDER = (0, 4, 1, 5, 2, 6, 3, 7)  # column c of a group of 8 sits in field AWQ_REVERSE_ORDER[c]
FP16_MAX = 65504.0


def _per_word(bits: int) -> int:
    check_bits("packing bits", bits, (2, 4, 8), "whole fields per int32")
    return 32 // bits


def _check_range(t: Tensor, bits: int, what: str) -> None:
    if t.numel() and (int(t.min()) < 0 or int(t.max()) >= 2**bits):
        raise ConfigError(f"{what} must be in [0, {2**bits}) for bits={bits}, got [{int(t.min())}, {int(t.max())}]; "
                          f"pack with the bits used to quantize")


def _pack_last(fields: Tensor, bits: int) -> Tensor:
    """Pack the last dim (P fields of `bits` each) into one int32, field f at bits [f*bits, (f+1)*bits).

    fields: [..., P] integer in [0, 2**bits) -> [...] int32 (the 32 bits reinterpreted as signed)
    Computed on fields' device in int32 (a shift into the sign bit wraps, as two's complement does): one
    [...] int32 word tensor and one field at a time, no int64 temporaries.
    """
    words = fields[..., 0].to(torch.int32)
    for f in range(1, fields.shape[-1]):
        words |= fields[..., f].to(torch.int32) << (bits * f)
    return words


def _unpack_last(words: Tensor, bits: int) -> Tensor:
    """Inverse of _pack_last: [...] int32 -> [..., 32 // bits] int32 in [0, 2**bits), on words' device."""
    shifts = torch.arange(0, 32, bits, dtype=torch.int32, device=words.device)
    return (words.to(torch.int32).unsqueeze(-1) >> shifts) & (2**bits - 1)  # arithmetic shift, then masked


def _check_multiple(what: str, value: int, p: int, fmt: str) -> None:
    if value % p:
        raise ConfigError(f"{fmt} packs {p} values per int32, so {what} must be a multiple of {p}, got {value}; "
                          f"this layer cannot be written in this format")


def pack_gptq(codes: Tensor, zero: Tensor, bits: int) -> tuple[Tensor, Tensor]:
    """GPTQ v1 qweight and qzeros (layout in the module docstring).

    codes: [N, K] uint8 in [0, 2**bits);  zero: [N, n_groups] int32 in [0, 2**bits)
    returns qweight [K * bits // 32, N] int32, qzeros [n_groups, N * bits // 32] int32
    zero == 0 is stored as 2**bits - 1 (v1 wrap). Loaders that add 1 per field (AutoGPTQ, exllama
    kernels, unpack_gptq_qzeros) read it back as 0 only if they mask; gptqmodel's integer add
    carries into the next field. Symmetric quantization (zero = 2**(bits-1)) never hits this.
    """
    p = _per_word(bits)
    (n, k), n_groups = codes.shape, zero.shape[1]
    if zero.shape[0] != n:
        raise ConfigError(f"pack_gptq: codes {tuple(codes.shape)} and zero {tuple(zero.shape)} disagree on N")
    _check_multiple("in_features", k, p, f"GPTQ {bits}-bit qweight")
    _check_multiple("out_features", n, p, f"GPTQ {bits}-bit qzeros")
    _check_range(codes, bits, "codes")
    _check_range(zero, bits, "zero")
    qweight = _pack_last(codes.T.reshape(k // p, p, n).transpose(1, 2), bits)          # [K/P, N]
    stored = (zero.to(torch.int32) - 1) & (2**bits - 1)                                # v1 off-by-one
    qzeros = _pack_last(stored.T.reshape(n_groups, n // p, p), bits)                   # [n_groups, N/P]
    return qweight, qzeros


def unpack_gptq_qweight(qweight: Tensor, bits: int, k: int) -> Tensor:
    """Inverse of pack_gptq for qweight: [K * bits // 32, N] int32 -> codes [N, K] uint8."""
    p = _per_word(bits)
    if qweight.dim() != 2 or qweight.shape[0] * p != k:
        raise CheckpointError(f"GPTQ {bits}-bit qweight of shape {tuple(qweight.shape)} cannot hold "
                              f"in_features={k}; expected [{k} * {bits} / 32 = {k * bits / 32:g}, N]")
    fields = _unpack_last(qweight, bits)                                               # [K/P, N, P]
    return fields.transpose(1, 2).reshape(k, -1).T.to(torch.uint8).contiguous()


def unpack_gptq_qzeros(qzeros: Tensor, bits: int, n: int) -> Tensor:
    """Inverse of pack_gptq for qzeros: [n_groups, N * bits // 32] int32 -> zero [N, n_groups] int32."""
    p = _per_word(bits)
    if qzeros.dim() != 2 or qzeros.shape[1] * p != n:
        raise CheckpointError(f"GPTQ {bits}-bit qzeros of shape {tuple(qzeros.shape)} cannot hold "
                              f"out_features={n}; expected [n_groups, {n} * {bits} / 32 = {n * bits / 32:g}]")
    stored = _unpack_last(qzeros, bits).reshape(qzeros.shape[0], n)                    # [n_groups, N]
    return ((stored + 1) & (2**bits - 1)).T.to(torch.int32).contiguous()


def pack_awq(codes: Tensor, zero: Tensor) -> tuple[Tensor, Tensor]:
    """AWQ gemm 4-bit qweight and qzeros (layout in the module docstring).

    codes: [N, K] uint8 in [0, 16);  zero: [N, n_groups] int32 in [0, 16)
    returns qweight [K, N // 8] int32, qzeros [n_groups, N // 8] int32
    """
    (n, k), n_groups = codes.shape, zero.shape[1]
    if zero.shape[0] != n:
        raise ConfigError(f"pack_awq: codes {tuple(codes.shape)} and zero {tuple(zero.shape)} disagree on N")
    _check_multiple("out_features", n, 8, "AWQ gemm (4-bit)")
    _check_range(codes, 4, "codes")
    _check_range(zero, 4, "zero")
    order = torch.tensor(AWQ_ORDER, device=codes.device)
    qweight = _pack_last(codes.T.reshape(k, n // 8, 8)[..., order], 4)               # [K, N/8]
    qzeros = _pack_last(zero.T.reshape(n_groups, n // 8, 8)[..., order], 4)          # [n_groups, N/8]
    return qweight, qzeros


def _unpack_awq(words: Tensor, what: str) -> Tensor:
    """[R, N // 8] int32 AWQ words -> [N, R] int32 in natural column order."""
    if words.dim() != 2:
        raise CheckpointError(f"AWQ {what} must be 2-D [rows, N // 8], got shape {tuple(words.shape)}")
    reverse = torch.tensor(AWQ_REVERSE_ORDER, device=words.device)
    fields = _unpack_last(words, 4)[..., reverse]                                      # [R, N/8, 8]
    return fields.reshape(words.shape[0], -1).T


def unpack_awq_qweight(qweight: Tensor) -> Tensor:
    """Inverse of pack_awq for qweight: [K, N // 8] int32 -> codes [N, K] uint8."""
    return _unpack_awq(qweight, "qweight").to(torch.uint8).contiguous()


def unpack_awq_qzeros(qzeros: Tensor) -> Tensor:
    """Inverse of pack_awq for qzeros: [n_groups, N // 8] int32 -> zero [N, n_groups] int32."""
    return _unpack_awq(qzeros, "qzeros").to(torch.int32).contiguous()


def fp16_checked(t: Tensor, name: str) -> Tensor:
    """t as fp16, or NumericalError naming the tensor if fp16 would not hold it.

    Raises where a value is NaN/inf, |x| > 65504 (fp16 max), or a nonzero value rounds to 0.
    """
    bad = ~torch.isfinite(t)
    if bad.any():
        raise NumericalError(f"{name}: {int(bad.sum())} non-finite values; cannot store as fp16")
    big = t.abs() > FP16_MAX
    if big.any():
        raise NumericalError(f"{name}: {int(big.sum())} values exceed the fp16 maximum {FP16_MAX:g} "
                             f"(largest |x| = {float(t.abs().max()):.4g}); the layer's range is too wide "
                             f"for fp16 scales")
    half = t.to(torch.float16)
    lost = (half == 0) & (t != 0)
    if lost.any():
        raise NumericalError(f"{name}: {int(lost.sum())} nonzero values underflow to 0 in fp16 "
                             f"(smallest |x| = {float(t[t != 0].abs().min()):.4g}); the layer would dequantize to 0")
    return half
