"""AWQ: activation-aware scale search, clip search and scale folding (Lin et al. 2023).

AWQ protects the weights that see large activations. For a group of Linears sharing one input x,
it searches a per-input-channel scale s, multiplies the Linears' input columns by s and divides
the previous op's output by s, so the fp32 function is unchanged but quantization error moves away
from salient channels. Two forms of s are searched over one exponent grid (AWQConfig.scale_forms):
the paper's s = x_mean ** a (Eq. 5) and AutoAWQ's duo scaling s = x_mean ** a / w_mean ** (1 - a).
Each candidate is scored by a loss over the candidate weights Q(W s)/s: by default the Linears' own
output error, or any callable (the pipeline passes the output error of the whole module the group
feeds, AutoAWQ's module2inspect). A second search shrinks each group's max |w| (AutoAWQ's clip
search). Results are frozen dataclasses that can be saved and applied later.

Loss conventions follow AutoAWQ (`quantizer.py`: `_search_best_scale`, `_compute_best_scale`,
`_search_best_clip`); every search evaluates the identity candidate (plain a = 0, clip ratio = 1),
so its result never loses to it on its own data. Every function works on the device of its inputs
(pass them on one device) and never modifies its arguments. The math is fp32, except the output-error GEMM of
linear_output_loss, which runs in the captures' dtype: bf16 captures (a bf16 run's exact inputs) are multiplied
with the bf16-rounded weight error in bf16 with fp32 accumulation, and the squares summed in fp32 (checked
against the fp32 GEMM on SmolLM2's real layers: bench/awq_bf16_search.py, bench/RESULTS.md).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from ..core.config import AWQConfig, ScaleForms
from ..core.errors import ConfigError, NumericalError
from .grid import QuantizedWeight, dequantize, qparams, quantize

__all__ = [
    "ScaleResult", "ClipResult", "activation_stats", "weight_stats", "scale_candidates", "linear_output_loss",
    "diag_output_loss", "search_scale", "search_clip", "apply_clip",
    "fold_scale_into_norm", "fold_scale_into_linear_outputs", "scale_linear_inputs",
    "can_fold_into_linear", "fold_index",
]

_ROWS_PER_CHUNK = 4096   # calibration rows per matmul in the searches; bounds peak memory only
_CLIP_OUT_CHANNELS = 256  # output channels per clip-search batch (AutoAWQ's oc_batch_size)


@dataclass(frozen=True)
class ScaleResult:
    scales: Tensor        # [K] fp32: divide the previous op's output by these,
                          # multiply the linears' input columns by them
    form: str             # "plain" (x_mean ** a) or "duo" (x_mean ** a / w_mean ** (1 - a)) at the best loss
    alpha: float          # best exponent a
    loss: float           # the loss at the best candidate
    loss_unscaled: float  # the same at scale = 1 (plain, a = 0)
    tried: tuple[tuple[str, float, float], ...] = ()  # (form, a, loss) of every candidate, in search order


@dataclass(frozen=True)
class ClipResult:
    max_val: Tensor        # [N, K // G] fp32 per-group clip threshold: w is clamped to [-max_val, max_val]
    loss: float            # mean over (N, K // G) of the best per-group output error
    loss_unclipped: float  # the same without clipping (ratio 1)


def _group_size(k: int, group_size: int) -> int:
    """The effective G for K input features (group_size = -1 means one group per row)."""
    g = k if group_size == -1 else group_size
    if k % g:
        raise ConfigError(
            f"awq: in_features={k} is not divisible by group_size={group_size}; "
            "use a group_size that divides it, or -1"
        )
    return g


def _asym_qparams(wg: Tensor, bits: int) -> tuple[Tensor, Tensor]:
    """AutoAWQ's asymmetric grid per row of wg: [R, G] fp32 -> scale [R, 1] fp32, zero [R, 1] fp32 (integer-valued).

    Why not grid.qparams(sym=False): this is AutoAWQ's pseudo_quantize_tensor grid, range [min, max] (not widened
    to contain 0), scale clamped at 1e-5. `--solve rtn` writes exactly it, so that path gives AutoAWQ's codes for
    AutoAWQ's scales; the scale search scores candidates on it for both solves. The default `--solve gptq` writes
    its codes from grid.py's asymmetric grid (range widened to contain 0), so search and write grids differ there
    wherever a group's weights are all of one sign; whether searching on grid.py's range picks better scales has
    not been measured (changing it changes every AWQ output's bytes). gptq.smooth: awq searches on grid.py's
    symmetric grid, the one its solve writes (_fake_quant with zero_point=False)."""
    max_int = 2**bits - 1
    w_max, w_min = wg.amax(dim=1, keepdim=True), wg.amin(dim=1, keepdim=True)
    scale = (w_max - w_min).clamp(min=1e-5) / max_int
    zero = (-torch.round(w_min / scale)).clamp(0, max_int)
    return scale, zero


def _fake_quant(w: Tensor, bits: int, group_size: int, zero_point: bool) -> Tensor:
    """Per-group round-to-nearest quantize then dequantize (AutoAWQ's pseudo_quantize_tensor).

    w: [N, K] fp32    not modified
    returns [N, K] fp32, each group of G columns on its own grid: asymmetric min/max with an integer
    zero point in [0, 2**bits - 1] if zero_point, else GPTQ's symmetric grid (grid.rtn_quantize, sym: range
    [-max|w|, max|w|] in 2**bits - 1 steps, zero 2**(bits-1)), the grid gptq.smooth: awq's solve writes.
    """
    n, k = w.shape
    g = _group_size(k, group_size)
    if not zero_point:  # rtn_quantize's arithmetic (the same floats) without its per-column gather
        wg = w.to(torch.float32).reshape(n, k // g, g)
        scale, zero = qparams(wg, bits, sym=True)
        scale, zero = scale.unsqueeze(-1), zero.unsqueeze(-1)
        return dequantize(quantize(wg, scale, zero, bits), scale, zero).reshape(n, k)
    wg = w.to(torch.float32).reshape(-1, g)
    max_int = 2**bits - 1
    scale, zero = _asym_qparams(wg, bits)
    q = (torch.clamp(torch.round(wg / scale) + zero, 0, max_int) - zero) * scale
    return q.reshape(n, k)


def awq_quantize(w: Tensor, cfg: AWQConfig) -> QuantizedWeight:
    """The final integer quantization of an (already scaled and clipped) weight, on the grid the search used.

    w: [N, K] fp32   not modified
    Returns codes [N, K] uint8, scale / zero [N, K // G] (fp32 / int32), g_idx = i // G: the same values
    `_fake_quant(w, ..., zero_point=True)` dequantizes to.
    """
    if not cfg.zero_point:
        raise ConfigError("awq.zero_point must be true: the AWQ gemm format stores a zero point per group")
    n, k = w.shape
    g = _group_size(k, cfg.group_size)
    wg = w.to(torch.float32).reshape(-1, g)                          # [N * K/G, G]
    scale, zero = _asym_qparams(wg, cfg.bits)
    codes = torch.clamp(torch.round(wg / scale) + zero, 0, 2**cfg.bits - 1)
    g_idx = (torch.arange(k, device=w.device) // g).to(torch.int32)
    return QuantizedWeight(codes.to(torch.uint8).reshape(n, k), scale.reshape(n, k // g),
                           zero.to(torch.int32).reshape(n, k // g), g_idx, None, cfg.bits, 0.0, 0.0)


def activation_stats(x: Tensor) -> Tensor:
    """Mean |x| per input channel: AutoAWQ's x_max ("input feat") statistic, s_X in the paper.

    x: [M, K] any float dtype, M = S*T calibration tokens; not modified
    returns [K] fp32 on x's device. Accumulated in fp32 over row chunks (no full fp32 copy of x).
    """
    return _channel_mean(x, Tensor.abs)


def _channel_mean(x: Tensor, f: Callable[[Tensor], Tensor]) -> Tensor:
    """mean over rows of f(x), per column: x: [M, K] any float dtype -> [K] fp32, f applied to fp32 row chunks."""
    total = torch.zeros(x.shape[1], dtype=torch.float32, device=x.device)
    for start in range(0, x.shape[0], _ROWS_PER_CHUNK):
        total += f(x[start:start + _ROWS_PER_CHUNK].to(torch.float32)).sum(dim=0)
    return total / x.shape[0]


def weight_stats(weights: list[Tensor], group_size: int) -> Tensor:
    """Mean over output rows of |w| normalised by its quantization group's max |w| (AutoAWQ's w_mean for duo scaling).

    weights: list of [N_i, K] any float dtype   the group's Linears; not modified
    returns [K] fp32: concatenate the rows, view as groups of G columns, divide each group's |w| by its max
    (+ 1e-6, as AutoAWQ), mean over the sum N_i rows. Peak extra memory: one [sum N_i, K] fp32 tensor.
    """
    w = torch.cat([w.to(torch.float32) for w in weights]).abs()        # [sum N_i, K] fp32
    n, k = w.shape
    wg = w.reshape(-1, _group_size(k, group_size))
    return (wg / (wg.amax(dim=1, keepdim=True) + 1e-6)).reshape(n, k).mean(dim=0)


def _normalise(s: Tensor) -> Tensor:
    """AutoAWQ's clamp at 1e-4 and division by sqrt(max * min), so the scale is centred around 1."""
    s = s.clamp(min=1e-4)
    return s / (s.max() * s.min()).sqrt()


def scale_candidates(act_mean: Tensor, w_mean: Tensor, cfg: AWQConfig) -> list[tuple[str, float, Tensor]]:
    """Every (form, a, s) the scale search tries, plain first (so a = 0 plain, exactly ones, comes first).

    act_mean: [K] fp32 (activation_stats), w_mean: [K] fp32 (weight_stats); returns s: [K] fp32 each.
    plain: s = x_mean ** a; duo: s = x_mean ** a / (w_mean ** (1 - a) + 1e-4) (AutoAWQ); both then _normalise'd,
    for a in {0, 1/n, ..., (n-1)/n}, n = cfg.grid_points. The plain a = 0 identity is always included.
    """
    alphas = [step / cfg.grid_points for step in range(cfg.grid_points)]
    out = []
    if cfg.scale_forms is not ScaleForms.DUO:
        out += [("plain", a, _normalise(act_mean.pow(a))) for a in alphas]
    else:
        out.append(("plain", 0.0, torch.ones_like(act_mean)))
    if cfg.scale_forms is not ScaleForms.PLAIN:
        out += [("duo", a, _normalise(act_mean.pow(a) / (w_mean.pow(1 - a) + 1e-4))) for a in alphas]
    return out


def _output_sq_error(x: Tensor, delta: Tensor) -> float:
    """sum ||x delta^T||^2 over row chunks; x: [M, K] fp32 or bf16/fp16, delta: [N, K] fp32.

    fp32 x: an fp32 GEMM. A 16-bit x: delta is rounded to x's dtype and the GEMM runs in it (fp32 accumulation
    inside the GEMM, the output rounded to x's dtype), squares summed in fp32: each term carries a relative
    error of about 2**-8, which the search's argmin tolerates (bench/awq_bf16_search.py measures it)."""
    err = 0.0
    d = delta if x.dtype == torch.float32 else delta.to(x.dtype)
    for start in range(0, x.shape[0], _ROWS_PER_CHUNK):
        err += float((x[start:start + _ROWS_PER_CHUNK] @ d.T).float().pow(2).sum())
    return err


def linear_output_loss(x: Tensor, weights: list[Tensor]) -> Callable[[list[Tensor]], float]:
    """The loss of candidate weights on the Linears' own outputs: sum_i ||x W_i^T - x Wq_i^T||^2 / (M sum_i N_i).

    x: [M, K] fp32, or bf16/fp16 for a 16-bit GEMM (_output_sq_error) (kept by reference, read in
       _ROWS_PER_CHUNK-row chunks; not modified)
    weights: list of [N_i, K] the original weights. The returned callable takes the candidates Wq_i = Q(W_i s)/s
    ([N_i, K] fp32) and computes ||x delta^T||^2 with delta = concat_i(W_i - Wq_i): [sum N_i, K] fp32 (one matmul,
    no cancellation between two large outputs). Peak extra: delta (320 MiB for INF-34B q/k/v: 10240 x 8192), one
    [chunk, K] fp32 copy of x and one [chunk, sum N_i] fp32 output (160 MiB at chunk=4096); never an [M, N] tensor.
    """
    ws32 = [w.to(torch.float32) for w in weights]  # no copy when already fp32
    n_out = x.shape[0] * sum(w.shape[0] for w in weights)

    def loss(candidates: list[Tensor]) -> float:
        delta = torch.cat([w - q for w, q in zip(ws32, candidates)])  # [sum N_i, K] fp32
        return _output_sq_error(x, delta) / n_out

    return loss


def diag_output_loss(x: Tensor, weights: list[Tensor]) -> Callable[[list[Tensor]], float]:
    """linear_output_loss with the input's Gram matrix cut to its diagonal: sum_j mean_m(x_mj^2) |W_i - Wq_i|_:j^2
    summed over the Linears' rows, / sum_i N_i (the "imatrix" weighting: each input channel's squared weight error
    times its mean squared input). Equal to linear_output_loss when x's columns are orthogonal; it ignores how
    channels co-vary, which is what makes it cheap: an elementwise pass over the candidates, no GEMM with x.

    x: [M, K] any float dtype (read once here, in row chunks; not kept); weights: list of [N_i, K] the original
    weights (kept by reference when fp32, as search_scale's are). The returned callable takes the candidates Wq_i
    ([N_i, K] fp32). Peak extra: one [N_i, K] fp32.
    """
    d = _channel_mean(x, torch.square)   # [K] fp32: mean_m x_mj^2
    ws32 = [w.to(torch.float32) for w in weights]
    n_rows = sum(w.shape[0] for w in weights)

    def loss(candidates: list[Tensor]) -> float:
        return sum(float((w - q).pow_(2).mul_(d).sum()) for w, q in zip(ws32, candidates)) / n_rows

    return loss


def _tied_mean(v: Tensor, tie: Tensor) -> Tensor:
    """v: [K] fp32, tie: [K] int64 in [0, K_free) -> [K_free] fp32, the mean of v over the channels of each tie."""
    k_free = int(tie.max()) + 1
    total = torch.zeros(k_free, dtype=v.dtype, device=v.device).index_add_(0, tie, v)
    return total / torch.bincount(tie, minlength=k_free).to(v.dtype)


def search_scale(x: Tensor, weights: list[Tensor], cfg: AWQConfig,
                 loss: Callable[[list[Tensor]], float] | None = None, tie: Tensor | None = None,
                 sym: bool = False) -> ScaleResult:
    """Grid search for the AWQ per-channel scale (Lin et al. 2023, Sec. 3.2, Eq. 4-5; AutoAWQ duo scaling).

    x:       [..., K] bf16/fp32   the group's shared input, e.g. [M, K] or [n, T, K]; not modified
    weights: list of [N_i, K] fp32  Linears that read x (e.g. q, k, v); not modified
    loss:    maps the candidate weights [Q(W_i s)/s for each i] (each [N_i, K] fp32) to a float; default
             linear_output_loss(x, weights). The pipeline passes the MSE of the module the group feeds.
    tie:     [K] int64 or None (fold_index): channels with equal tie[c] must share one scale (GQA v -> o); the
             statistics are averaged over each tie, candidates built on those, and s = s_free[tie].
    sym:     score candidates on the symmetric grid (GPTQ's, for gptq.smooth: awq) instead of AWQ's asymmetric one
    The candidates are scale_candidates(activation_stats(x), weight_stats(weights), cfg). Per form, every
    cfg.coarse_step-th alpha is scored first (a = 0 included), then the coarse_step - 1 grid neighbours on each
    side of that form's best; coarse_step = 1 scores the whole grid (AutoAWQ). With the default 2 and 20 points
    that is 12 scores instead of 20; on SmolLM2-135M it found the full grid's argmin in 93 % of groups, with
    0.17 % higher loss on average. The argmin over everything scored is returned (the first on ties, so the
    plain a = 0 identity wins ties). Peak extra memory beyond what `loss` uses: the candidate weights,
    sum_i N_i x K fp32.
    """
    k = x.shape[-1]
    for w in weights:
        if w.shape[1] != k:
            raise ValueError(f"search_scale: weight {tuple(w.shape)} does not read x of shape {tuple(x.shape)}")
    x2 = x.reshape(-1, k)
    act_mean = activation_stats(x2)
    loss = loss or linear_output_loss(x2, weights)
    ws32 = [w.to(torch.float32) for w in weights]
    w_mean = weight_stats(ws32, cfg.group_size)
    if tie is not None:
        act_mean, w_mean = _tied_mean(act_mean, tie), _tied_mean(w_mean, tie)
    forms: dict[str, list] = {}
    for form, alpha, s in scale_candidates(act_mean, w_mean, cfg):
        forms.setdefault(form, []).append((alpha, s if tie is None else s[tie]))
    tried, best, step = [], None, cfg.coarse_step

    def score(form: str, alpha: float, s: Tensor) -> float:
        nonlocal best
        value = loss([_fake_quant(w * s, cfg.bits, cfg.group_size, not sym) / s for w in ws32])
        tried.append((form, alpha, value))
        if best is None or value < best[3]:
            best = (form, alpha, s, value)
        return value

    for form, grid in forms.items():
        coarse = {j: score(form, *grid[j]) for j in range(0, len(grid), step)}
        j_best = min(coarse, key=lambda j: coarse[j] if math.isfinite(coarse[j]) else math.inf)
        for j in range(max(0, j_best - step + 1), min(len(grid), j_best + step)):
            if j not in coarse:
                score(form, *grid[j])
    if not math.isfinite(tried[0][2]):
        raise NumericalError(f"search_scale: unscaled output error is {tried[0][2]}; x or the weights hold inf/nan; "
                             "check the calibration activations of this layer")
    return ScaleResult(scales=best[2], form=best[0], alpha=best[1], loss=best[3], loss_unscaled=tried[0][2],
                       tried=tuple(tried))


def _clip_ratios(cfg: AWQConfig) -> list[float]:
    """Shrink ratios 1, 1 - 1/n, ..., down to 1 - cfg.clip_max_shrink (inclusive), n = cfg.clip_grid."""
    steps = int(cfg.clip_max_shrink * cfg.clip_grid + 1e-9)
    return [1 - i / cfg.clip_grid for i in range(steps + 1)]


def _clip_block(xg: Tensor, wg: Tensor, cfg: AWQConfig) -> tuple[Tensor, Tensor, Tensor]:
    """Per-group best clip for one block of output channels.

    xg: [T, K // G, G] fp32 sampled tokens; wg: [B, K // G, G] fp32 weight block
    returns (max_val, err, err_unclipped), each [B, K // G] fp32; err is the mean over T of the
    squared error of the group's partial output sum_j x[t, g, j] w[b, g, j].
    """
    b, n_groups, g = wg.shape
    org_out = torch.einsum("tgj,bgj->btg", xg, wg)  # [B, T, K // G] fp32
    org_max = wg.abs().amax(dim=-1)  # [B, K // G]
    best_max, best_err, err_unclipped = org_max.clone(), None, None
    for ratio in _clip_ratios(cfg):
        max_val = org_max * ratio
        cur = torch.clamp(wg, -max_val.unsqueeze(-1), max_val.unsqueeze(-1))
        q = _fake_quant(cur.reshape(b, n_groups * g), cfg.bits, g, cfg.zero_point).reshape(b, n_groups, g)
        err = (torch.einsum("tgj,bgj->btg", xg, q) - org_out).pow(2).mean(dim=1)
        if best_err is None:
            best_err, err_unclipped = err, err
            continue
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_max = torch.where(better, max_val, best_max)
    return best_max, best_err, err_unclipped


def search_clip(x: Tensor, w: Tensor, cfg: AWQConfig) -> ClipResult:
    """AWQ clip search (AutoAWQ auto_clip): per-group max|w| shrink that minimises output error.

    x: [M, K] bf16/fp32   the Linear's input; not modified. At most cfg.clip_tokens evenly
                          spaced rows are used (deterministic, no RNG).
    w: [N, K] fp32        already scaled by search_scale if AWQ scaling is used; not modified
    returns ClipResult with max_val [N, K // G] fp32. Memory: per block of _CLIP_OUT_CHANNELS
    rows, two [B, T, K // G] fp32 outputs (32 MiB at B=256, T=512, K//G=64).
    """
    n, k = w.shape
    if x.shape[1] != k:
        raise ValueError(f"search_clip: weight {tuple(w.shape)} does not read x of shape {tuple(x.shape)}")
    g = _group_size(k, cfg.group_size)
    t = min(x.shape[0], cfg.clip_tokens)
    rows = torch.arange(t, device=x.device) * x.shape[0] // t  # evenly spaced, first row is 0
    xg = x[rows].to(torch.float32).reshape(t, k // g, g)
    w32 = w.to(torch.float32).reshape(n, k // g, g)
    starts = range(0, n, _CLIP_OUT_CHANNELS)
    blocks = [_clip_block(xg, w32[i:i + _CLIP_OUT_CHANNELS], cfg) for i in starts]
    max_val, err, err_unclipped = (torch.cat(parts) for parts in zip(*blocks))
    return ClipResult(max_val=max_val, loss=float(err.mean()), loss_unclipped=float(err_unclipped.mean()))


def apply_clip(w: Tensor, clip: ClipResult) -> Tensor:
    """A copy of w with each group clamped to [-max_val, max_val].

    w: [N, K] any float dtype; clip.max_val: [N, K // G] fp32. returns [N, K] in w's dtype.
    """
    n, k = w.shape
    n_groups = clip.max_val.shape[1]
    if clip.max_val.shape[0] != n or k % n_groups:
        raise ValueError(f"apply_clip: max_val {tuple(clip.max_val.shape)} does not fit weight {tuple(w.shape)}")
    mv = clip.max_val.unsqueeze(-1)  # [N, K // G, 1]
    wg = w.to(torch.float32).reshape(n, n_groups, k // n_groups)
    return torch.clamp(wg, -mv, mv).reshape(n, k).to(w.dtype)


def fold_scale_into_norm(weight: Tensor, bias: Tensor | None, scales: Tensor) -> tuple[Tensor, Tensor | None]:
    """Divide a norm's output by s: LayerNorm (weight and bias) or RMSNorm (bias None).

    weight: [K], bias: [K] or None, scales: [K] fp32 (ScaleResult.scales); none modified.
    returns new (weight / s, bias / s or None) in the inputs' dtypes; math in fp32.
    Both must be divided: norm(x) = w * xhat + b, and (w * xhat + b) / s = (w/s) * xhat + b/s.
    """
    s = scales.to(torch.float32)
    new_weight = (weight.to(torch.float32) / s).to(weight.dtype)
    new_bias = None if bias is None else (bias.to(torch.float32) / s).to(bias.dtype)
    return new_weight, new_bias


def fold_scale_into_linear_outputs(w_prev: Tensor, scales: Tensor) -> Tensor:
    """Divide the previous Linear's output rows by s (v_proj -> o_proj, up_proj -> down_proj).

    w_prev: [K, K_prev]  previous Linear's weight; its out_features are the scaled group's K
    scales: [K] fp32. returns a new [K, K_prev] in w_prev's dtype; math in fp32.
    A bias on the previous Linear would need the same division (Llama-style blocks have none).
    Check can_fold_into_linear first.
    """
    s = scales.to(torch.float32)
    return (w_prev.to(torch.float32) / s.unsqueeze(1)).to(w_prev.dtype)


def scale_linear_inputs(w: Tensor, scales: Tensor) -> Tensor:
    """Multiply a Linear's input columns by s: W' = W diag(s).

    w: [N, K], scales: [K] fp32. returns a new [N, K] in w's dtype; math in fp32.
    """
    s = scales.to(torch.float32)
    return (w.to(torch.float32) * s).to(w.dtype)


def can_fold_into_linear(prev_out_features: int, next_in_features: int) -> bool:
    """The shape rule without head structure: a scale with one entry per next_in_features column folds into a
    previous Linear's output rows only if it produces exactly those features (see fold_index for GQA)."""
    return prev_out_features == next_in_features


def fold_index(prev_out_features: int, next_in_features: int, head_dim: int) -> Tensor | None:
    """The one shape rule for folding a scale into a previous Linear: tie [K] int64, the previous Linear's output
    row that each of the next Linear's K input columns reads, or None if the scale cannot be folded.

    Equal widths (up_proj -> down_proj, v_proj -> o_proj without GQA): the identity.
    GQA v_proj -> o_proj (next = n_rep * prev, both multiples of head_dim): query head h reads KV head h // n_rep
    (transformers' repeat_kv), so o's column h * head_dim + d reads v's row (h // n_rep) * head_dim + d; the scale
    is exact if it is equal over the n_rep columns that read one row (search_scale(tie=...) keeps it so).
    Otherwise None: the caller logs the skip and leaves the next Linear unscaled.
    """
    c = torch.arange(next_in_features)
    if prev_out_features == next_in_features:
        return c
    if next_in_features % prev_out_features or prev_out_features % head_dim:
        return None
    n_rep = next_in_features // prev_out_features
    return (c // head_dim) // n_rep * head_dim + c % head_dim
