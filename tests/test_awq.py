"""AWQ: folding leaves the fp32 function unchanged; the searches never lose to the identity; module-output scoring
matches a hand-written causal attention / MLP; both scale forms are searched; q/k are not clipped."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from inf_quant.core.config import AWQConfig, ScaleForms, WeightSolve
from inf_quant.core.errors import ConfigError, NumericalError
from inf_quant.engine import awq_block as block_mod
from inf_quant.engine.awq_block import capture_group_inputs, module_output_loss, scale_summary, search_samples
from inf_quant.quant import awq
from inf_quant.quant.awq import (
    activation_stats, apply_clip, can_fold_into_linear, fold_scale_into_linear_outputs,
    diag_output_loss, fold_index, fold_scale_into_norm, linear_output_loss, scale_candidates, scale_linear_inputs,
    search_clip, search_scale, weight_stats,
)
from inf_quant.read.layermap import LAYER_MAPS
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
# SDPA vs the hand-written attention differ by fp32 rounding (~1e-6 of the output); the loss is the MSE of a
# ~1e-2 relative quantization change, so it can move by ~1e-4 relative; 1e-3 still catches a wrong mask or rope.
MODULE_LOSS_RTOL = 1e-3

D, FFN = 48, 96
CFG = AWQConfig(group_size=16)
FULL = AWQConfig(group_size=16, scale_forms=ScaleForms.BOTH, coarse_step=1)  # every candidate, both forms


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


def test_fold_index_maps_query_heads_to_their_kv_head():
    assert torch.equal(fold_index(192, 192, 64), torch.arange(192))
    tie = fold_index(4, 12, 2)  # 2 KV heads of width 2 serve 6 query heads: query heads 0-2 -> KV 0, 3-5 -> KV 1
    assert tie.tolist() == [0, 1, 0, 1, 0, 1, 2, 3, 2, 3, 2, 3]
    assert fold_index(1024, 8192, 128).shape == (8192,) and int(fold_index(1024, 8192, 128).max()) == 1023
    assert fold_index(24, 64, 16) is None and fold_index(48, 64, 8) is None


@torch.no_grad()
def test_gqa_fold_v_into_o_keeps_attention_output():
    """A tied scale divided out of v_proj's rows and multiplied into o_proj's columns leaves attention unchanged."""
    block, rotary = _tiny_layer()
    attn = block.self_attn
    x = torch.randn(2, 10, 64, generator=_gen(50))
    cos, sin = rotary(x[:1], torch.arange(10)[None])
    w = [m.weight.detach().clone() for m in (attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj)]
    tie = fold_index(16, 64, 8)
    s_v = _positive_scales(16, 51)
    v_folded, o_scaled = fold_scale_into_linear_outputs(w[2], s_v), scale_linear_inputs(w[3], s_v[tie])
    _assert_fold_close(_attention_ref(x, w[0], w[1], v_folded, o_scaled, cos, sin), _attention_ref(x, *w, cos, sin))


def test_tied_scale_search_shares_one_scale_per_tie():
    tie = fold_index(16, D, 8)  # D=48: 6 query heads of width 8 on 2 KV heads
    x, w = _outlier_x(128, D, 52), [torch.randn(D, D, generator=_gen(53)) / D**0.5]
    result = search_scale(x, w, CFG, tie=tie)
    s_free = torch.ones(16).scatter_(0, tie, result.scales)
    assert torch.equal(result.scales, s_free[tie]) and result.loss <= result.loss_unscaled


# --- fake quant and statistics --------------------------------------------------------------------

@pytest.mark.parametrize("zero_point", [True, False])
def test_fake_quant_error_within_half_step(zero_point):
    w = torch.randn(8, 64, generator=_gen(8))
    q = awq._fake_quant(w, 4, 16, zero_point)
    wg, qg = w.reshape(-1, 16), q.reshape(-1, 16)
    if zero_point:
        step = (wg.amax(1, keepdim=True) - wg.amin(1, keepdim=True)) / 15
    else:  # GPTQ's symmetric grid: [-amax, amax] in 15 steps
        step = 2 * wg.abs().amax(1, keepdim=True) / 15
    assert ((wg - qg).abs() <= step / 2 + GRID_HALF_STEP_SLACK * step).all()
    assert all(len(torch.unique(row)) <= 16 for row in qg)  # at most 2**bits levels per group


def test_symmetric_fake_quant_is_rtn_quantize_dequantized():
    """The sym fake quant (GPTQ's smoothing scores candidates with it) gives exactly the floats of
    grid.rtn_quantize + dequantize_weight, the grid the GPTQ output is written on."""
    from inf_quant.quant.grid import dequantize_weight, rtn_quantize
    w = torch.randn(40, D, generator=_gen(41))
    w[:, 5] *= 30
    for g in (16, 48):
        assert torch.equal(awq._fake_quant(w, 4, g, False), dequantize_weight(rtn_quantize(w, 4, g, sym=True)))


def test_diag_loss_is_the_output_loss_on_orthogonal_inputs_and_ranks_like_it():
    """diag_output_loss = linear_output_loss when x's columns are orthogonal (x^T x diagonal); on correlated outlier
    activations it is a different number, and the scale it picks still cuts the full output error."""
    q, _ = torch.linalg.qr(torch.randn(256, D, generator=_gen(42)))   # [256, D], orthonormal columns
    x = q * torch.exp(torch.randn(D, generator=_gen(43)))             # orthogonal, unequal column norms
    weights = _qkv(44)
    cands = [awq._fake_quant(w, 4, 16, False) for w in weights]
    assert diag_output_loss(x, weights)(cands) == pytest.approx(linear_output_loss(x, weights)(cands), rel=LOSS_RTOL)
    x = _outlier_x(256, D, 45) + torch.randn(256, 1, generator=_gen(46))   # correlated channels
    diag, full = diag_output_loss(x, weights), linear_output_loss(x, weights)
    unscaled = [awq._fake_quant(w, 4, 16, False) for w in weights]
    r = search_scale(x, weights, CFG, loss=diag, sym=True)
    scaled = [awq._fake_quant(w * r.scales, 4, 16, False) / r.scales for w in weights]
    assert diag(unscaled) != full(unscaled)
    assert r.alpha > 0 and full(scaled) < OUTLIER_MIN_GAIN * full(unscaled)


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


def test_scale_search_tries_both_forms_and_keeps_the_best():
    x, weights = _outlier_x(256, D, 10), _qkv(11)
    both = search_scale(x, weights, FULL)
    forms = [f for f, _, _ in both.tried]
    assert forms == ["plain"] * CFG.grid_points + ["duo"] * CFG.grid_points
    assert both.tried[0][:2] == ("plain", 0.0) and both.tried[0][2] == both.loss_unscaled
    assert (both.form, both.alpha, both.loss) == min(both.tried, key=lambda t: t[2])
    plain, duo = (search_scale(x, weights, AWQConfig(group_size=16, scale_forms=f, coarse_step=1))
                  for f in (ScaleForms.PLAIN, ScaleForms.DUO))
    assert {f for f, _, _ in plain.tried} == {"plain"} and len(plain.tried) == CFG.grid_points
    assert [f for f, _, _ in duo.tried] == ["plain"] + ["duo"] * CFG.grid_points  # the identity is always tried
    assert both.loss == min(plain.loss, duo.loss) and duo.loss <= duo.loss_unscaled


@pytest.mark.parametrize("forms", [ScaleForms.PLAIN, ScaleForms.BOTH])
def test_coarse_to_fine_scores_every_other_alpha_then_the_best_ones_neighbours(forms):
    x, weights = _outlier_x(256, D, 10), _qkv(11)
    full = search_scale(x, weights, AWQConfig(group_size=16, scale_forms=forms, coarse_step=1))
    fast = search_scale(x, weights, AWQConfig(group_size=16, scale_forms=forms))  # coarse_step=2
    for form in {f for f, _, _ in fast.tried}:
        alphas = [a for f, a, _ in fast.tried if f == form]
        coarse = [i / 20 for i in range(0, 20, 2)]
        assert alphas[:10] == coarse
        losses = {a: v for f, a, v in fast.tried if f == form}
        best = min(coarse, key=losses.get)
        assert sorted(alphas[10:]) == [(round(best * 20) + d) / 20 for d in (-1, 1) if 0 <= round(best * 20) + d < 20]
    assert len(fast.tried) <= 12 * len({f for f, _, _ in fast.tried})
    assert fast.loss_unscaled == full.loss_unscaled and fast.loss >= full.loss
    assert fast.alpha == full.alpha and fast.form == full.form  # a smooth loss: the same argmin here


def test_duo_candidates_follow_autoawq():
    """s = x_mean^a / (w_mean^(1-a) + 1e-4), w_mean from |w| over each group's max, normalised by sqrt(max min)."""
    x, weights = _outlier_x(64, D, 30), _qkv(31)
    act_mean = activation_stats(x)
    w = torch.cat(weights).abs()
    w_mean = (w.reshape(-1, 16) / (w.reshape(-1, 16).amax(1, keepdim=True) + 1e-6)).reshape(w.shape).mean(0)
    assert_close(weight_stats(weights, 16), w_mean, atol=0.0, rtol=LOSS_RTOL, what="w_mean")
    cands = {(f, a): s for f, a, s in scale_candidates(act_mean, w_mean, FULL)}
    s = (act_mean.pow(0.35) / (w_mean.pow(0.65) + 1e-4)).clamp(min=1e-4)
    assert_close(cands[("duo", 0.35)], s / (s.max() * s.min()).sqrt(), atol=0.0, rtol=LOSS_RTOL, what="duo")
    assert torch.equal(cands[("plain", 0.0)], torch.ones(D))


def test_scale_search_with_a_custom_loss_scores_the_candidates():
    """The loss callable sees exactly Q(W s)/s for every candidate, in candidate order."""
    x, weights = _outlier_x(64, D, 32), _qkv(33)
    seen = []

    def loss(cands):
        seen.append([c.clone() for c in cands])
        return float(len(seen) == 7)  # every candidate but the 7th ties at 0: the first (identity) wins ties

    result = search_scale(x, weights, FULL, loss)
    assert len(seen) == 2 * CFG.grid_points and result.alpha == 0.0 and result.form == "plain"
    _, _, s = scale_candidates(activation_stats(x), weight_stats(weights, 16), FULL)[5]
    for c, w in zip(seen[5], weights):
        assert torch.equal(c, awq._fake_quant(w * s, 4, 16, True) / s)


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


# --- module-output scoring (AutoAWQ's module2inspect) on a tiny decoder layer ----------------------

def _tiny_layer(model_type: str = "llama"):
    """Layer 0 of the seeded tiny model (D=64, 8 query / 2 KV heads, FFN 192) and its rotary embedding."""
    from tiny import tiny_model

    model = tiny_model(model_type)
    return model.model.layers[0], model.model.rotary_emb


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return x * cos + torch.cat([-x[..., half:], x[..., :half]], dim=-1) * sin


def _attention_ref(x, wq, wk, wv, wo, cos, sin, n_heads=8, n_kv=2):
    """Causal GQA attention with rope, written out: x [B, T, D] fp32; cos, sin [1, T, head_dim]."""
    b, t, _ = x.shape
    hd = wq.shape[0] // n_heads
    q, k, v = ((x @ w.T).view(b, t, -1, hd).transpose(1, 2) for w in (wq, wk, wv))  # [B, heads, T, hd]
    q, k = _rotate(q, cos[:, None], sin[:, None]), _rotate(k, cos[:, None], sin[:, None])
    k, v = (z.repeat_interleave(n_heads // n_kv, dim=1) for z in (k, v))
    scores = (q @ k.transpose(-1, -2)) / hd**0.5
    scores = scores.masked_fill(torch.ones(t, t, dtype=torch.bool).triu(1), float("-inf"))
    return (scores.softmax(-1) @ v).transpose(1, 2).reshape(b, t, -1) @ wo.T


def _mlp_ref(x, wg, wu, wd):
    return (F.silu(x @ wg.T) * (x @ wu.T)) @ wd.T


def _captured(seed: int, model_type: str = "llama"):
    block, rotary = _tiny_layer(model_type)
    hidden = torch.randn(3, 12, 64, generator=_gen(seed))
    rope = rotary(hidden[:1], torch.arange(12)[None])
    xs, kwargs = capture_group_inputs(block, LAYER_MAPS["llama"].groups, hidden, rope, batch=2)
    return block, hidden, rope, xs, kwargs


@torch.no_grad()
def test_capture_keeps_whole_sequences_and_the_attention_call():
    block, hidden, _, xs, kwargs = _captured(40)
    assert [tuple(x.shape) for x in xs] == [(3, 12, 64)] * 3 + [(3, 12, 192)]
    assert_close(xs[0], block.input_layernorm(hidden), atol=0.0, rtol=0.0, what="q/k/v input")
    assert kwargs[0]["attention_mask"] is None and len(kwargs[0]["position_embeddings"]) == 2
    assert kwargs[1] == {} and kwargs[3] == {}  # groups without `inspect` keep nothing
    assert search_samples(128, 2048, 16384).tolist() == [0, 16, 32, 48, 64, 80, 96, 112]
    assert search_samples(16, 512, 16384).tolist() == list(range(16))
    assert search_samples(4, 4096, 16).tolist() == [0]  # at least one whole sample


@torch.no_grad()
def test_module_output_loss_matches_hand_written_attention_and_mlp():
    block, _, (cos, sin), xs, kwargs = _captured(41)
    attn, mlp, s64, s_ffn = block.self_attn, block.mlp, _positive_scales(64, 42), _positive_scales(64, 43)
    cases = [(attn, [attn.q_proj, attn.k_proj, attn.v_proj], xs[0], kwargs[0], s64,
              lambda w: _attention_ref(xs[0], *w, attn.o_proj.weight, cos, sin)),
             (mlp, [mlp.gate_proj, mlp.up_proj], xs[2], kwargs[2], s_ffn,
              lambda w: _mlp_ref(xs[2], *w, mlp.down_proj.weight))]
    for module, linears, x, kw, s, ref_fn in cases:
        orig = [m.weight.detach().clone() for m in linears]
        cands = [awq._fake_quant(w * s, 4, 16, True) / s for w in orig]
        loss = module_output_loss(module, linears, x, kw, batch=2)
        expected = float((ref_fn(cands) - ref_fn(orig)).pow(2).mean())
        assert expected > 0
        assert loss(cands) == pytest.approx(expected, rel=MODULE_LOSS_RTOL)
        assert loss(orig) == 0.0
        assert all(torch.equal(m.weight, w) for m, w in zip(linears, orig)), "weights not restored"


@torch.no_grad()
def test_module_scored_search_never_loses_and_reports_its_loss():
    block, _, (cos, sin), xs, kwargs = _captured(44)
    attn = block.self_attn
    linears = [attn.q_proj, attn.k_proj, attn.v_proj]
    orig = [m.weight.detach().clone() for m in linears]
    result = search_scale(xs[0], orig, FULL, module_output_loss(attn, linears, xs[0], kwargs[0], batch=2))
    assert len(result.tried) == 2 * CFG.grid_points and result.loss <= result.loss_unscaled
    cands = [awq._fake_quant(w * result.scales, 4, 16, True) / result.scales for w in orig]
    expected = float((_attention_ref(xs[0], *cands, attn.o_proj.weight, cos, sin)
                      - _attention_ref(xs[0], *orig, attn.o_proj.weight, cos, sin)).pow(2).mean())
    assert result.loss == pytest.approx(expected, rel=MODULE_LOSS_RTOL)


@torch.no_grad()
def test_awq_block_skips_q_k_clip_and_reports_scales(monkeypatch):
    from types import SimpleNamespace

    block, rotary = _tiny_layer()
    hidden = torch.randn(3, 12, 64, generator=_gen(45))
    rope = rotary(hidden[:1], torch.arange(12)[None])
    shrink = {}
    real_clip = block_mod.search_clip

    def spy(x, w, cfg):
        shrink[len(shrink)] = cfg.clip_max_shrink
        return real_clip(x, w, cfg)

    monkeypatch.setattr(block_mod, "search_clip", spy)
    rtn = AWQConfig(group_size=16, solve=WeightSolve.RTN)  # the clip search belongs to AutoAWQ's rounding
    ctx = SimpleNamespace(recipe=SimpleNamespace(awq=rtn, run=SimpleNamespace(forward_batch=2)),
                          lmap=LAYER_MAPS["llama"],
                          ckpt=SimpleNamespace(dtype=lambda _: torch.float32, config=block.self_attn.config.to_dict()),
                          skip=frozenset())
    done = block_mod.awq_block(ctx, block, 0, hidden, rope)
    losses, notes, scales = done.losses, done.notes, done.scales
    names = LAYER_MAPS["llama"].linears
    assert {n: shrink[i] for i, n in enumerate(names)} == {
        n: 0.0 if n in ("self_attn.q_proj", "self_attn.k_proj") else CFG.clip_max_shrink for n in names}
    assert set(losses) == set(names) and all(v >= 0 for v in losses.values())
    assert list(scales) == ["q_proj+k_proj+v_proj", "o_proj", "gate_proj+up_proj", "down_proj"]
    assert notes == ()  # GQA v -> o folds with a tied scale
    assert all(f in ("plain", "duo") and 0 <= a < 1 for f, a in scales.values())


def test_scale_summary_aggregates_over_layers():
    per_layer = [{"q+k+v": ("duo", 0.4), "o": ("none", 0.0)}, {"q+k+v": ("plain", 0.2), "o": ("none", 0.0)},
                 {"q+k+v": ("duo", 0.6), "o": ("none", 0.0)}]
    assert scale_summary(per_layer) == "q+k+v: alpha median 0.40 [0.20, 0.60], duo 2 plain 1; o: none 3"


@pytest.mark.parametrize("model_type", ["inflm", "llama"])
@torch.no_grad()
def test_folding_every_group_keeps_the_layer_output(model_type):
    """All four searched scales folded (LayerNorm + bias / RMSNorm, GQA v -> o, up -> down), nothing quantized."""
    from inf_quant.engine.forward import run_block

    block, hidden, rope, xs, kwargs = _captured(54, model_type)
    expected = run_block(block, hidden, rope)
    for group, x, kw in zip(LAYER_MAPS["llama"].groups, xs, kwargs):
        _, res = block_mod._fold_(block, group, "", x, kw, FULL, 2, 8, notes := [])
        assert res is not None and not notes and not torch.equal(res.scales, torch.ones_like(res.scales))
    _assert_fold_close(run_block(block, hidden, rope), expected)


def test_the_awq_format_refuses_codes_whose_groups_are_not_i_over_g():
    """--solve gptq writes GPTQ codes in the AWQ gemm format, which has no g_idx: only g_idx = i // G may pass."""
    import torch

    from inf_quant.core.config import Method
    from inf_quant.quant.grid import QuantizedWeight
    from inf_quant.quant.qformat import to_tensors

    n, k, g = 8, 64, 32
    q = QuantizedWeight(codes=torch.zeros(n, k, dtype=torch.uint8), scale=torch.ones(n, k // g),
                        zero=torch.full((n, k // g), 8, dtype=torch.int32), g_idx=(torch.arange(k) // g).int(),
                        perm=None, bits=4, proxy_loss=0.0, damp=0.0)
    assert set(to_tensors(q, Method.AWQ, "x")) == {"qweight", "qzeros", "scales"}
    shuffled = QuantizedWeight(**{**q.__dict__, "g_idx": (torch.arange(k).flip(0) // g).int()})
    with pytest.raises(ValueError, match="no g_idx"):
        to_tensors(shuffled, Method.AWQ, "x")


# --- bf16 runs: captures in the compute dtype, the output-error GEMM in bf16 ------------------------------------

def test_bf16_output_error_gemm_is_bf16_and_close_to_fp32():
    """bf16 captures make linear_output_loss multiply in bf16 (fp32 accumulation): not the fp32 GEMM's value,
    within 1 % of it, and the search picks the same candidate on outlier data (SmolLM2's real layers:
    bench/awq_bf16_search.py)."""
    x, weights = _outlier_x(256, D, 31).to(torch.bfloat16), _qkv(32)
    cands = [awq._fake_quant(w, 4, 16, True) for w in weights]
    l16, l32 = linear_output_loss(x, weights)(cands), linear_output_loss(x.float(), weights)(cands)
    assert l16 != l32 and l16 == pytest.approx(l32, rel=1e-2)
    r16, r32 = search_scale(x, weights, CFG), search_scale(x.float(), weights, CFG)
    assert (r16.form, r16.alpha) == (r32.form, r32.alpha)


@torch.no_grad()
def test_bf16_captures_are_the_exact_inputs_and_the_fold_divides_them_in_place():
    block, rotary = _tiny_layer("llama")
    block = block.to(torch.bfloat16)
    hidden = torch.randn(3, 12, 64, generator=_gen(33)).to(torch.bfloat16)
    rope = tuple(r.to(torch.bfloat16) for r in rotary(hidden[:1], torch.arange(12)[None]))
    groups = LAYER_MAPS["llama"].groups
    xs, kwargs = capture_group_inputs(block, groups, hidden, rope, batch=2)
    assert all(x.dtype == torch.bfloat16 for x in xs)
    assert torch.equal(xs[0], block.input_layernorm(hidden))
    before = xs[0].clone()
    out, res = block_mod._fold_(block, groups[0], "", xs[0], kwargs[0], FULL, 2, 8, [])
    assert out is xs[0] and out.dtype == torch.bfloat16
    assert torch.equal(out, (before.float() / res.scales).to(torch.bfloat16))
