"""AWQ: folding leaves the fp32 function unchanged; the searches never lose to the identity."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from inf_quant.config import AWQConfig
from inf_quant.errors import ConfigError, NumericalError
from inf_quant.quant import awq
from inf_quant.quant.awq import (
    activation_stats, apply_clip, can_fold_into_linear, fold_scale_into_linear_outputs,
    fold_scale_into_norm, scale_linear_inputs, search_clip, search_scale,
)
from tolerances import GRID_HALF_STEP_SLACK, assert_close

# AWQ-specific tolerances stay here (tests/tolerances.py is shared and owned elsewhere).

# Folding is exact in real arithmetic; fp32 rounding of one divide/multiply per element plus
# reordered dot products of <= 48 terms stays far below 1e-5 relative to the output scale.
FOLD_RTOL = 1e-5
# Dropping the bias fold shifts outputs by O(|b| (1/s - 1)) ~ O(1); 1e-2 relative is a clear miss.
UNFOLDED_BIAS_MIN_REL_DIFF = 1e-2
# A loss recomputed with the naive two-matmul formula differs only by fp32 summation order.
LOSS_RTOL = 1e-4
# With 20x outlier channels at 4 bits AWQ scaling cuts output error ~4x here (ratio 0.26); 0.9 is loose.
OUTLIER_MIN_GAIN = 0.9
# At 4 bits clipping cuts per-group output error by a few % (about 4 % here); 1 % shows it acts.
CLIP_MIN_GAIN = 0.99

D, FFN = 48, 96
CFG = AWQConfig(group_size=16)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _positive_scales(k: int, seed: int) -> torch.Tensor:
    """[K] fp32 scales in roughly [0.2, 5], like AWQ's normalised act_mean ** alpha."""
    return torch.exp(0.8 * torch.randn(k, generator=_gen(seed)))


def _assert_fold_close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """rtol FOLD_RTOL, with atol FOLD_RTOL * max|expected| for outputs that happen to be near 0."""
    atol = FOLD_RTOL * expected.abs().max().item()
    assert_close(actual, expected, atol=atol, rtol=FOLD_RTOL, what="folded output")


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Llama RMSNorm: x / sqrt(mean(x^2) + eps) * weight; x: [M, D], weight: [D]."""
    return x * torch.rsqrt(x.pow(2).mean(dim=-1, keepdim=True) + eps) * weight


def _qkv(seed: int) -> list[torch.Tensor]:
    g = _gen(seed)
    return [torch.randn(n, D, generator=g) / D**0.5 for n in (D, D // 4, D // 4)]  # GQA-like k/v


def _outlier_x(m: int, k: int, seed: int) -> torch.Tensor:
    """[M, K] fp32 activations with 4 salient channels 20x larger (the AWQ setting)."""
    x = torch.randn(m, k, generator=_gen(seed))
    x[:, [3, 17, 40, 41]] *= 20
    return x


# --- folding ------------------------------------------------------------------------------------

def test_fold_into_layernorm_keeps_qkv_outputs():
    g = _gen(0)
    x = torch.randn(10, D, generator=g)
    weight, bias = 1 + 0.5 * torch.randn(D, generator=g), torch.randn(D, generator=g)
    linears, s = _qkv(1), _positive_scales(D, 2)
    h = F.layer_norm(x, (D,), weight, bias)
    new_weight, new_bias = fold_scale_into_norm(weight, bias, s)
    h_folded = F.layer_norm(x, (D,), new_weight, new_bias)
    for w in linears:
        _assert_fold_close(h_folded @ scale_linear_inputs(w, s).T, h @ w.T)


def test_fold_into_layernorm_weight_only_changes_outputs():
    g = _gen(0)
    x = torch.randn(10, D, generator=g)
    weight, bias = 1 + 0.5 * torch.randn(D, generator=g), torch.randn(D, generator=g)
    w, s = _qkv(1)[0], _positive_scales(D, 2)
    new_weight, _ = fold_scale_into_norm(weight, bias, s)
    expected = F.layer_norm(x, (D,), weight, bias) @ w.T
    actual = F.layer_norm(x, (D,), new_weight, bias) @ scale_linear_inputs(w, s).T
    rel = (actual - expected).abs().max() / expected.abs().max()
    assert rel > UNFOLDED_BIAS_MIN_REL_DIFF, f"bias left unfolded but outputs moved only {rel:.2e}"


def test_fold_into_rmsnorm_keeps_qkv_outputs():
    g = _gen(3)
    x, weight = torch.randn(10, D, generator=g), 1 + 0.5 * torch.randn(D, generator=g)
    linears, s = _qkv(4), _positive_scales(D, 5)
    new_weight, new_bias = fold_scale_into_norm(weight, None, s)
    assert new_bias is None
    h, h_folded = _rms_norm(x, weight), _rms_norm(x, new_weight)
    for w in linears:
        _assert_fold_close(h_folded @ scale_linear_inputs(w, s).T, h @ w.T)


def test_fold_up_into_down_keeps_mlp_output():
    g = _gen(6)
    x = torch.randn(10, D, generator=g)
    gate, up = torch.randn(FFN, D, generator=g) / D**0.5, torch.randn(FFN, D, generator=g) / D**0.5
    down, s = torch.randn(D, FFN, generator=g) / FFN**0.5, _positive_scales(FFN, 7)
    expected = (F.silu(x @ gate.T) * (x @ up.T)) @ down.T
    up_folded, down_scaled = fold_scale_into_linear_outputs(up, s), scale_linear_inputs(down, s)
    _assert_fold_close((F.silu(x @ gate.T) * (x @ up_folded.T)) @ down_scaled.T, expected)


def test_can_fold_into_linear_shape_rule():
    assert can_fold_into_linear(1024, 8192) is False  # INF-34B GQA v_proj -> o_proj
    assert can_fold_into_linear(8192, 8192) is True


# --- fake quant and statistics --------------------------------------------------------------------

@pytest.mark.parametrize("zero_point", [True, False])
def test_fake_quant_error_within_half_step(zero_point):
    w = torch.randn(8, 64, generator=_gen(8))
    q = awq._fake_quant(w, 4, 16, zero_point)
    wg, qg = w.reshape(-1, 16), q.reshape(-1, 16)
    if zero_point:
        step = (wg.amax(1, keepdim=True) - wg.amin(1, keepdim=True)) / 15
    else:
        step = wg.abs().amax(1, keepdim=True) / 7
    assert ((wg - qg).abs() <= step / 2 + GRID_HALF_STEP_SLACK * step).all()
    assert all(len(torch.unique(row)) <= 16 for row in qg)  # at most 2**bits levels per group


def test_activation_stats_is_mean_abs_per_channel():
    x = _outlier_x(20, D, 9)
    xb = x.to(torch.bfloat16)
    assert_close(activation_stats(xb), xb.float().abs().mean(0), atol=0.0, rtol=LOSS_RTOL, what="act mean")


# --- scale search ------------------------------------------------------------------------------

def _naive_scale_loss(x, weights, s, cfg):
    """sum_i ||x W_i^T - (x/s) Q(W_i s)^T||^2 / (M sum N_i), the paper's objective written directly."""
    err = sum(((x @ w.T) - (x / s) @ awq._fake_quant(w * s, cfg.bits, cfg.group_size, cfg.zero_point).T)
              .pow(2).sum() for w in weights)
    return float(err) / (x.shape[0] * sum(w.shape[0] for w in weights))


def test_scale_search_beats_unscaled_on_outliers():
    x, weights = _outlier_x(256, D, 10), _qkv(11)
    result = search_scale(x, weights, CFG)
    assert result.loss <= result.loss_unscaled
    assert result.loss < OUTLIER_MIN_GAIN * result.loss_unscaled, (result.loss, result.loss_unscaled)
    assert result.alpha > 0 and result.scales.shape == (D,) and result.scales.dtype == torch.float32
    assert result.scales[[3, 17, 40, 41]].min() > result.scales.median()  # salient channels grow
    assert float(result.scales.max() * result.scales.min()) == pytest.approx(1.0, rel=LOSS_RTOL)  # AutoAWQ norm
    naive, naive_unscaled = (_naive_scale_loss(x, weights, s, CFG) for s in (result.scales, torch.ones(D)))
    assert result.loss == pytest.approx(naive, rel=LOSS_RTOL)
    assert result.loss_unscaled == pytest.approx(naive_unscaled, rel=LOSS_RTOL)


def test_scale_search_never_loses_without_outliers():
    x = torch.randn(128, D, generator=_gen(12)).to(torch.bfloat16)  # bf16 input, as from the model
    result = search_scale(x, _qkv(13), CFG)
    assert result.loss <= result.loss_unscaled


def test_scale_search_chunked_equals_unchunked(monkeypatch):
    x, weights, cfg = _outlier_x(100, D, 14), _qkv(15), AWQConfig(group_size=16, grid_points=5)
    whole = search_scale(x, weights, cfg)
    monkeypatch.setattr(awq, "_ROWS_PER_CHUNK", 32)  # 4 chunks, the last one ragged
    chunked = search_scale(x, weights, cfg)
    assert chunked.alpha == whole.alpha
    assert chunked.loss == pytest.approx(whole.loss, rel=LOSS_RTOL)
    assert_close(chunked.scales, whole.scales, atol=0.0, rtol=LOSS_RTOL, what="chunked scales")


# --- clip search ---------------------------------------------------------------------------------

def _heavy_tailed_w(n: int, k: int, seed: int) -> torch.Tensor:
    """[N, K] fp32 scale-mixture Gaussian: rare large entries make clipping worthwhile."""
    u = torch.rand(n, k, generator=_gen(seed + 1)).clamp(min=0.05)
    return torch.randn(n, k, generator=_gen(seed)) / u.sqrt()


def test_clip_search_never_loses_and_shrinks_only():
    x, w = torch.randn(600, D, generator=_gen(16)), _heavy_tailed_w(40, D, 17)  # 600 > clip_tokens
    result = search_clip(x, w, CFG)
    group_max = w.reshape(40, D // 16, 16).abs().amax(-1)
    assert result.max_val.shape == (40, D // 16)
    assert result.loss <= result.loss_unclipped
    assert result.loss < CLIP_MIN_GAIN * result.loss_unclipped, (result.loss, result.loss_unclipped)
    assert (result.max_val <= group_max).all()
    assert (result.max_val >= (1 - CFG.clip_max_shrink) * group_max * (1 - 1e-6)).all()


def test_apply_clip_clamps_a_copy():
    x, w = torch.randn(64, D, generator=_gen(18)), _heavy_tailed_w(40, D, 19)
    w_before = w.clone()
    result = search_clip(x, w, CFG)
    clipped = apply_clip(w, result)
    assert torch.equal(w, w_before)
    bound = result.max_val.repeat_interleave(16, dim=1)  # [N, K]
    assert (clipped.abs() <= bound).all()
    inside = w.abs() <= bound
    assert torch.equal(clipped[inside], w[inside]) and not torch.equal(clipped, w)


# --- determinism, purity, errors ---------------------------------------------------------------

def test_searches_are_deterministic_and_pure():
    x, weights = _outlier_x(128, D, 20), _qkv(21)
    x_before, w_before = x.clone(), [w.clone() for w in weights]
    a, b = search_scale(x, weights, CFG), search_scale(x, weights, CFG)
    assert torch.equal(a.scales, b.scales) and (a.alpha, a.loss) == (b.alpha, b.loss)
    c, d = search_clip(x, weights[0], CFG), search_clip(x, weights[0], CFG)
    assert torch.equal(c.max_val, d.max_val) and c.loss == d.loss
    assert torch.equal(x, x_before) and all(torch.equal(w, v) for w, v in zip(weights, w_before))


def test_fold_functions_do_not_mutate():
    weight, bias, w, s = torch.randn(D), torch.randn(D), torch.randn(FFN, D), _positive_scales(D, 22)
    copies = [t.clone() for t in (weight, bias, w, s)]
    fold_scale_into_norm(weight, bias, s)
    fold_scale_into_linear_outputs(w.T.contiguous(), s)
    scale_linear_inputs(w, s)
    assert all(torch.equal(t, c) for t, c in zip((weight, bias, w, s), copies))


def test_group_size_must_divide_in_features():
    with pytest.raises(ConfigError, match="not divisible by group_size=16"):
        search_scale(torch.randn(8, 40), [torch.randn(4, 40)], CFG)
    with pytest.raises(ConfigError, match="not divisible by group_size=16"):
        search_clip(torch.randn(8, 40), torch.randn(4, 40), CFG)


def test_non_finite_inputs_raise():
    x = torch.randn(8, D)
    x[0, 0] = float("inf")
    with pytest.raises(NumericalError, match="inf/nan"):
        search_scale(x, _qkv(23), CFG)


def test_mismatched_shapes_raise():
    with pytest.raises(ValueError, match="does not read x"):
        search_scale(torch.randn(8, D), [torch.randn(4, D + 16)], CFG)
    with pytest.raises(ValueError, match="does not read x"):
        search_clip(torch.randn(8, D), torch.randn(4, D + 16), CFG)
