"""Round-to-nearest integer grid: qparams, quantize, dequantize, and RTN for a whole Linear.

Pure functions. The grid is the one of the GPTQ reference code (Frantar et al. 2022,
`quant.py: Quantizer.find_params`): a value w maps to the code
    q = clamp(round(w / scale) + zero, 0, 2**bits - 1)
and back to
    w_hat = scale * (q - zero)
with an integer zero point, so w = 0 is always represented exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..core.config import check_bits, resolve_group_size

CODE_BITS = tuple(range(1, 9))  # the widths the grid computes: codes are stored as uint8


@dataclass(frozen=True)
class QuantizedWeight:
    """One quantized Linear weight, in the layout GPTQ and AWQ checkpoints start from (see pack.py)."""

    codes: Tensor         # [N, K] uint8, each in [0, 2**bits)
    scale: Tensor         # [N, n_groups] fp32
    zero: Tensor          # [N, n_groups] int32, integer zero point in [0, 2**bits)
    g_idx: Tensor         # [K] int32, group of each input column (i // G without act_order)
    perm: Tensor | None   # [K] int64 column order used by act_order, else None
    bits: int
    proxy_loss: float     # sum of GPTQ per-column losses; 0.0 for RTN
    damp: float           # damping fraction of mean(diag H) actually used; 0.0 for RTN
    row_loss: Tensor | None = None  # [N] fp32 GPTQ loss per output row (proxy_loss is its sum); None for RTN

    def split_rows(self, sizes: list[int]) -> list["QuantizedWeight"]:
        """The weights of linears stacked along N (one shared-H solve), apart again: one per size."""
        out, r = [], 0
        for n in sizes:
            rows = slice(r, r + n)
            loss = self.row_loss[rows] if self.row_loss is not None else None
            out.append(QuantizedWeight(self.codes[rows], self.scale[rows], self.zero[rows], self.g_idx, self.perm,
                                       self.bits, float(loss.sum()) if loss is not None else 0.0, self.damp, loss))
            r += n
        return out


def _check_code_bits(bits: int) -> None:
    check_bits("bits", bits, CODE_BITS, "codes are stored as uint8")


def _range(w: Tensor, sym: bool) -> tuple[Tensor, Tensor]:
    """The grid's [xmin, xmax] per row of w: [N, G] -> two [N]; always contains 0, never empty."""
    xmin = w.amin(dim=-1).clamp(max=0)
    xmax = w.amax(dim=-1).clamp(min=0)
    if sym:
        xmax = torch.maximum(-xmin, xmax)
        xmin = -xmax
    empty = (xmin == 0) & (xmax == 0)
    return torch.where(empty, -1.0, xmin), torch.where(empty, 1.0, xmax)


def _params_of_range(xmin: Tensor, xmax: Tensor, bits: int, sym: bool) -> tuple[Tensor, Tensor]:
    maxq = 2**bits - 1
    # tiny: a subnormal range divided by maxq must not round to a zero scale
    scale = ((xmax - xmin) / maxq).clamp(min=torch.finfo(xmin.dtype).tiny)
    if sym:
        zero = torch.full_like(scale, 2 ** (bits - 1), dtype=torch.int32)
    else:
        zero = torch.round(-xmin / scale).clamp(0, maxq).to(torch.int32)
    return scale, zero


def qparams(w: Tensor, bits: int, sym: bool) -> tuple[Tensor, Tensor]:
    """Scale and integer zero point of each row (or group) of w, from its min and max.

    w:     [N, G] float  (any leading dims; the reduction is over the last dim)
    scale: [N]    same dtype as w, > 0
    zero:  [N]    int32 in [0, 2**bits)
    Asymmetric: the range [min(w.min, 0), max(w.max, 0)] is split into 2**bits - 1 steps.
    Symmetric: zero = 2**(bits-1) and the range is [-amax, amax] with amax = max |w|.
    An all-zero row gets the range [-1, 1] (as in the GPTQ reference), so scale is never 0.
    """
    _check_code_bits(bits)
    return _params_of_range(*_range(w, sym), bits, sym)


def search_qparams(w: Tensor, bits: int, sym: bool, steps: int, max_shrink: float, norm: float = 2.4,
                   col_weight: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Per-row (per-group) range shrink with the least quantization error: the GPTQ reference's
    `Quantizer.find_params(mse=True)` search, on a grid of `steps` shrinks instead of a fixed 100.

    w:          [N, G] float  (any leading dims; the search is per row of the last dim); not modified
    col_weight: [G] float or None  per-column weight of the error (e.g. diag H); None = 1
    Candidates p in {1, 1 - max_shrink/steps, ..., 1 - max_shrink}: the range [p xmin, p xmax] (sym: p amax)
    with zero points as in `qparams`; each row keeps the p minimising sum_j col_weight_j |w_j - q_j|^norm.
    p = 1 is always a candidate and wins ties, so steps = 0 (or max_shrink = 0) is exactly `qparams`.
    Cost: (steps + 1) quantize/dequantize passes over w; extra memory 2 x w.
    """
    _check_code_bits(bits)
    xmin, xmax = _range(w, sym)
    scale, zero = _params_of_range(xmin, xmax, bits, sym)
    if steps == 0 or max_shrink == 0:
        return scale, zero
    best = None
    for i in range(steps + 1):
        p = 1 - max_shrink * i / steps
        s, z = _params_of_range(p * xmin, p * xmax, bits, sym)
        e = (dequantize(quantize(w, s.unsqueeze(-1), z.unsqueeze(-1), bits), s.unsqueeze(-1), z.unsqueeze(-1))
             - w).abs_().pow_(norm)
        err = (e if col_weight is None else e * col_weight).sum(dim=-1)
        if best is None:
            best = err
            continue
        better = err < best
        best = torch.where(better, err, best)
        scale, zero = torch.where(better, s, scale), torch.where(better, z, zero)
    return scale, zero


def _per_row(t: Tensor, like: Tensor) -> Tensor:
    """Broadcast per-row qparams [N] against [N, C] (no-op when t already has like's rank)."""
    return t.unsqueeze(-1) if t.dim() < like.dim() else t


def quantize(w: Tensor, scale: Tensor, zero: Tensor, bits: int) -> Tensor:
    """Codes of w on the grid (scale, zero).

    w:      [N, C] or [N] float
    scale:  [N] (one per row) or broadcastable to w
    zero:   [N] int32 (one per row) or broadcastable to w
    return: same shape as w, uint8 in [0, 2**bits)
    """
    _check_code_bits(bits)
    scale, zero = _per_row(scale, w), _per_row(zero, w)
    return torch.clamp(torch.round(w / scale) + zero, 0, 2**bits - 1).to(torch.uint8)


def dequantize(codes: Tensor, scale: Tensor, zero: Tensor) -> Tensor:
    """Values of codes on the grid (scale, zero): scale * (codes - zero).

    codes:  [N, C] or [N] uint8
    scale:  [N] or broadcastable to codes; its dtype is the result dtype
    zero:   [N] int32 or broadcastable to codes
    """
    scale, zero = _per_row(scale, codes), _per_row(zero, codes)
    return scale * (codes.to(scale.dtype) - zero.to(scale.dtype))


def expand_groups(t: Tensor, g_idx: Tensor) -> Tensor:
    """Per-group tensor to per-column: t: [N, n_groups], g_idx: [K] int -> [N, K]."""
    return t[:, g_idx.long()]


@torch.no_grad()
def rtn_quantize(w: Tensor, bits: int, group_size: int, sym: bool, name: str = "linear") -> QuantizedWeight:
    """Round-to-nearest quantization of one Linear weight, group by group.

    w: [N, K] fp32   not modified
    group_size: G, or -1 for one group over all K; K must be divisible by G.
    Returns codes [N, K], scale and zero [N, K // G], g_idx = i // G.
    """
    n, k = w.shape
    g = resolve_group_size(k, group_size, name)
    groups = w.to(torch.float32).reshape(n, k // g, g)  # [N, n_groups, G]
    scale, zero = qparams(groups, bits, sym)            # [N, n_groups]
    codes = quantize(groups, scale.unsqueeze(-1), zero.unsqueeze(-1), bits).reshape(n, k)
    g_idx = (torch.arange(k, device=w.device) // g).to(torch.int32)
    return QuantizedWeight(codes, scale, zero, g_idx, None, bits, 0.0, 0.0)


def dequantize_weight(q: QuantizedWeight) -> Tensor:
    """The fp32 weight a QuantizedWeight stands for: [N, K] fp32. Uses g_idx, so act_order works too."""
    return dequantize(q.codes, expand_groups(q.scale, q.g_idx), expand_groups(q.zero, q.g_idx))
