"""grid: codes stay in range, |w - dequant(quant(w))| <= scale/2, and bad group sizes are rejected."""

import pytest
import torch

from inf_quant.core.errors import ConfigError
from inf_quant.quant.grid import dequantize_weight, expand_groups, qparams, quantize, rtn_quantize
from tolerances import EXACT, GRID_HALF_STEP_SLACK, assert_close


def _weight(n=16, k=256, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g)
    w[0] = w[0].abs()          # a row with no negative values (asymmetric zero point 0)
    w[1] = -w[1].abs()         # a row with no positive values (zero point 2**bits - 1)
    w[2, :] = 0.0              # an all-zero row: scale must not be 0
    w[3] *= 1e-30              # a row of tiny values
    return w


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("group_size", [32, 128, -1])
def test_rtn_error_within_half_step(bits, sym, group_size):
    w = _weight()
    q = rtn_quantize(w, bits, group_size, sym)
    n_groups = 256 // (256 if group_size == -1 else group_size)
    assert q.codes.dtype == torch.uint8 and q.codes.shape == w.shape
    assert q.scale.shape == (16, n_groups) and q.zero.shape == (16, n_groups)
    assert int(q.codes.max()) <= 2**bits - 1
    assert int(q.zero.min()) >= 0 and int(q.zero.max()) <= 2**bits - 1
    assert bool((q.scale > 0).all())
    scale = expand_groups(q.scale, q.g_idx)
    err = (w - dequantize_weight(q)).abs()
    bound = scale * (0.5 + GRID_HALF_STEP_SLACK)
    assert_close(torch.clamp(err - bound, min=0), torch.zeros_like(err), EXACT, EXACT, "excess over scale/2")


def test_rtn_codes_use_the_whole_grid():
    # asymmetric: the row min maps to code 0 and the row max to code 2**bits - 1
    w = _weight()
    q = rtn_quantize(w, 4, -1, sym=False)
    rows = [4, 5, 6]
    assert q.codes[rows].amin(dim=1).tolist() == [0, 0, 0]
    assert q.codes[rows].amax(dim=1).tolist() == [15, 15, 15]


def test_zero_is_exact():
    w = _weight()
    w[:, ::7] = 0.0
    for sym in (True, False):
        deq = dequantize_weight(rtn_quantize(w, 4, 32, sym))
        assert_close(deq[:, ::7], torch.zeros_like(deq[:, ::7]), EXACT, EXACT, f"dequantized zeros, sym={sym}")


def test_qparams_per_row_and_hand_example():
    w = torch.tensor([[-1.0, 0.5, 2.0], [0.0, 0.0, 0.0]])
    scale, zero = qparams(w, 2, sym=False)       # row 0: range [-1, 2] in 3 steps -> scale 1, zero 1
    assert_close(scale, torch.tensor([1.0, 2.0 / 3.0]), 1e-7, EXACT, "scale")
    assert zero.tolist() == [1, 2] and zero.dtype == torch.int32
    assert quantize(w, scale, zero, 2)[0].tolist() == [0, 1, 3]   # 0.5 / 1 rounds to even: 0
    scale, zero = qparams(w, 4, sym=True)        # row 0: amax 2 -> scale 4/15, zero 8
    assert_close(scale[0], torch.tensor(4.0 / 15.0), 1e-7, EXACT, "sym scale")
    assert zero.tolist() == [8, 8]


@pytest.mark.parametrize("group_size", [24, 0, -2])
def test_bad_group_size_raises(group_size):
    with pytest.raises(ConfigError, match=r"mlp\.down_proj: in_features=256 .*group_size=" + str(group_size)):
        rtn_quantize(_weight(), 4, group_size, True, name="mlp.down_proj")


def test_rtn_does_not_modify_input():
    w = _weight()
    before = w.clone()
    rtn_quantize(w, 4, 32, False)
    assert torch.equal(w, before)


@pytest.mark.parametrize("bits", [0, 9])
def test_bits_outside_uint8_codes_are_refused(bits):
    with pytest.raises(ConfigError, match=rf"bits must be 1, 2, 3, 4, 5, 6, 7 or 8 \(codes are stored as uint8\), "
                                          rf"got {bits}"):
        qparams(torch.ones(2, 8), bits, True)
