"""pack: unpack(pack(x)) == x bitwise for every format and odd shapes, hand-computed words for each
layout, the public reference pack loops, fp16 scale checks, and shape errors."""

import pytest
import torch

from inf_quant.core.errors import CheckpointError, ConfigError, NumericalError
from inf_quant.quant.pack import (fp16_checked, pack_awq, pack_gptq, unpack_awq_qweight, unpack_awq_qzeros,
                                  unpack_gptq_qweight, unpack_gptq_qzeros)
from tolerances import EXACT, FP16_RTOL, assert_close


def int32(word: int) -> int:
    """A 32-bit pattern written as hex, as the signed int32 it is stored as."""
    return word - (1 << 32) if word >= 1 << 31 else word


def _random(n, k, n_groups, bits, seed=0):
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 2**bits, (n, k), generator=g).to(torch.uint8)
    zero = torch.randint(0, 2**bits, (n, n_groups), generator=g).to(torch.int32)
    zero[0, 0], zero[-1, -1] = 0, 2**bits - 1          # the v1 wrap and the top value
    codes[0, 0], codes[-1, -1] = 0, 2**bits - 1
    return codes, zero


@pytest.mark.parametrize("bits,n,k,n_groups", [
    (4, 24, 40, 5), (4, 8, 8, 1), (4, 16, 128, 1), (2, 16, 48, 3), (2, 32, 16, 1), (8, 12, 20, 5), (8, 4, 4, 1),
])
def test_gptq_roundtrip(bits, n, k, n_groups):
    codes, zero = _random(n, k, n_groups, bits)
    qweight, qzeros = pack_gptq(codes, zero, bits)
    assert qweight.dtype == torch.int32 and qweight.shape == (k * bits // 32, n)
    assert qzeros.dtype == torch.int32 and qzeros.shape == (n_groups, n * bits // 32)
    assert_close(unpack_gptq_qweight(qweight, bits, k), codes, EXACT, EXACT, "codes")
    assert_close(unpack_gptq_qzeros(qzeros, bits, n), zero, EXACT, EXACT, "zero")


@pytest.mark.parametrize("n,k,n_groups", [(24, 40, 5), (8, 8, 1), (8, 3, 1), (64, 128, 4)])
def test_awq_roundtrip(n, k, n_groups):
    codes, zero = _random(n, k, n_groups, 4)
    qweight, qzeros = pack_awq(codes, zero)
    assert qweight.dtype == torch.int32 and qweight.shape == (k, n // 8)
    assert qzeros.dtype == torch.int32 and qzeros.shape == (n_groups, n // 8)
    assert_close(unpack_awq_qweight(qweight), codes, EXACT, EXACT, "codes")
    assert_close(unpack_awq_qzeros(qzeros), zero, EXACT, EXACT, "zero")


def test_gptq_hand_example_4bit():
    codes = torch.zeros(8, 8, dtype=torch.uint8)
    codes[0] = torch.arange(1, 9)                       # output 0, inputs 0..7 hold 1..8
    codes[5, 3] = 15                                    # output 5, input 3
    zero = torch.arange(1, 9, dtype=torch.int32).reshape(8, 1)  # zero of output n is n + 1
    qweight, qzeros = pack_gptq(codes, zero, 4)
    expected = torch.zeros(1, 8, dtype=torch.int32)
    expected[0, 0] = int32(0x87654321)                  # input 0 in the lowest nibble
    expected[0, 5] = 0xF000
    assert qweight.tolist() == expected.tolist()
    assert qzeros.tolist() == [[0x76543210]]            # zero - 1, output 0 lowest
    _, wrapped = pack_gptq(codes, torch.zeros(8, 1, dtype=torch.int32), 4)
    assert wrapped.tolist() == [[-1]]                   # zero 0 -> 0xF in every nibble


def test_gptq_hand_example_2bit_and_8bit():
    codes = torch.zeros(16, 16, dtype=torch.uint8)
    codes[0, 0], codes[0, 15] = 3, 1                    # 2-bit: input 15 in bits 30-31
    zero = torch.full((16, 1), 2, dtype=torch.int32)    # symmetric 2-bit zero: stored 1 in each field
    qweight, qzeros = pack_gptq(codes, zero, 2)
    assert qweight[0, 0].item() == 0x40000003
    assert qzeros.tolist() == [[0x55555555]]
    codes8 = torch.tensor([[0x11, 0x22, 0x33, 0x44]] * 4, dtype=torch.uint8)
    qweight8, qzeros8 = pack_gptq(codes8, torch.full((4, 1), 128, dtype=torch.int32), 8)
    assert qweight8.tolist() == [[0x44332211] * 4]
    assert qzeros8.tolist() == [[0x7F7F7F7F]]


def test_awq_hand_example():
    codes = torch.arange(1, 9, dtype=torch.uint8).reshape(8, 1)  # output n holds n + 1 at input 0
    zero = torch.arange(1, 9, dtype=torch.int32).reshape(8, 1)
    qweight, qzeros = pack_awq(codes, zero)
    # nibble f holds output column [0, 2, 4, 6, 1, 3, 5, 7][f], i.e. values 1, 3, 5, 7, 2, 4, 6, 8
    assert qweight.tolist() == [[int32(0x86427531)]]
    assert qzeros.tolist() == [[int32(0x86427531)]]     # no off-by-one in AWQ


def _autogptq_loop_pack(codes, zero, bits):
    """AutoGPTQ QuantLinear.pack (qlinear_cuda_old.py) restated with Python ints, as an independent oracle."""
    p, mask = 32 // bits, 2**bits - 1
    intweight, zeros = codes.T.tolist(), ((zero.T.long() - 1) & mask).tolist()
    qweight = [[sum(intweight[r * p + j][n] << (bits * j) for j in range(p)) for n in range(len(intweight[0]))]
               for r in range(len(intweight) // p)]
    qzeros = [[sum(row[c * p + j] << (bits * j) for j in range(p)) for c in range(len(row) // p)] for row in zeros]
    return [[int32(v) for v in row] for row in qweight], [[int32(v) for v in row] for row in qzeros]


def _autoawq_loop_pack(codes, zero):
    """AutoAWQ WQLinear_GEMM.from_linear pack loop (gemm.py) restated with Python ints."""
    order_map = [0, 2, 4, 6, 1, 3, 5, 7]
    intweight, zeros = codes.T.tolist(), zero.T.tolist()
    def pack(rows):
        return [[int32(sum(row[c * 8 + order_map[i]] << (4 * i) for i in range(8))) for c in range(len(row) // 8)]
                for row in rows]
    return pack(intweight), pack(zeros)


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_gptq_matches_autogptq_loop(bits):
    codes, zero = _random(32, 64, 2, bits, seed=bits)
    qweight, qzeros = pack_gptq(codes, zero, bits)
    ref_qweight, ref_qzeros = _autogptq_loop_pack(codes, zero, bits)
    assert qweight.tolist() == ref_qweight and qzeros.tolist() == ref_qzeros


def test_awq_matches_autoawq_loop():
    codes, zero = _random(32, 24, 3, 4, seed=4)
    qweight, qzeros = pack_awq(codes, zero)
    ref_qweight, ref_qzeros = _autoawq_loop_pack(codes, zero)
    assert qweight.tolist() == ref_qweight and qzeros.tolist() == ref_qzeros


def test_fp16_checked_passes_normal_values():
    t = torch.tensor([[1e-3, 0.5, 0.0, -2.0, 65504.0, 1e-4]])
    half = fp16_checked(t, "layers.0.mlp.up_proj.scales")
    assert half.dtype == torch.float16
    assert_close(half, t, EXACT, FP16_RTOL, "fp16 scales")
    assert fp16_checked(torch.tensor([1e-7]), "s").item() > 0   # subnormal in fp16: kept, not an error


@pytest.mark.parametrize("value,reason", [(1e6, "exceed the fp16 maximum"), (-7e4, "exceed the fp16 maximum"),
                                          (float("inf"), "non-finite"), (float("nan"), "non-finite"),
                                          (1e-9, "underflow to 0")])
def test_fp16_checked_raises(value, reason):
    t = torch.tensor([0.1, value, 0.2])
    with pytest.raises(NumericalError, match=rf"layers\.0\.mlp\.up_proj\.scales: 1 .*{reason}"):
        fp16_checked(t, "layers.0.mlp.up_proj.scales")


def test_shape_errors():
    codes, zero = _random(24, 40, 5, 4)
    with pytest.raises(ConfigError, match="in_features must be a multiple of 8, got 36"):
        pack_gptq(codes[:, :36], zero, 4)
    with pytest.raises(ConfigError, match="out_features must be a multiple of 16, got 24"):
        pack_gptq(codes[:, :32] % 4, zero % 4, 2)
    with pytest.raises(ConfigError, match="AWQ gemm .* out_features must be a multiple of 8, got 12"):
        pack_awq(codes[:12], zero[:12])
    with pytest.raises(ConfigError, match=r"packing bits must be 2, 4 or 8 \(whole fields per int32\), got 3"):
        pack_gptq(codes % 8, zero % 8, 3)
    with pytest.raises(ConfigError, match=r"codes must be in \[0, 4\) for bits=2, got \[0, 15\]"):
        pack_gptq(codes[:16, :32], zero[:16] % 4, 2)
    with pytest.raises(ConfigError, match="disagree on N"):
        pack_awq(codes, zero[:16])
    qweight, qzeros = pack_gptq(codes, zero, 4)
    with pytest.raises(CheckpointError, match="cannot hold in_features=48"):
        unpack_gptq_qweight(qweight, 4, 48)
    with pytest.raises(CheckpointError, match="cannot hold out_features=32"):
        unpack_gptq_qzeros(qzeros, 4, 32)
    with pytest.raises(CheckpointError, match="must be 2-D"):
        unpack_awq_qweight(qweight.flatten())


def _reference_pack_last(fields, bits):
    """The packer before issue 9 (int64 words on the host), kept as the slow obvious reference."""
    shifts = torch.arange(0, 32, bits, dtype=torch.int64)
    words = (fields.cpu().to(torch.int64) << shifts).sum(dim=-1)
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("bits", [2, 4, 8])
def test_device_packer_is_bit_identical_to_the_int64_reference(bits, device):
    """pack_gptq / pack_awq now pack in int32 on the codes' device: the same words as the int64 host packer,
    top fields (the sign bit) included, and unpacking on the device inverts them."""
    from inf_quant.quant import pack

    n, k, n_groups = 256, 384, 3
    codes, zero = _random(n, k, n_groups, bits, seed=bits)
    codes[:, -1] = 2**bits - 1                          # every word's top field set: negative int32 words
    p = 32 // bits
    qweight, qzeros = pack_gptq(codes.to(device), zero.to(device), bits)
    assert qweight.device.type == device and qzeros.device.type == device
    want_w = _reference_pack_last(codes.T.reshape(k // p, p, n).transpose(1, 2), bits)
    want_z = _reference_pack_last(((zero.long() - 1) & (2**bits - 1)).T.reshape(n_groups, n // p, p), bits)
    assert torch.equal(qweight.cpu(), want_w) and torch.equal(qzeros.cpu(), want_z)
    assert bool((want_w < 0).any())
    assert torch.equal(unpack_gptq_qweight(qweight, bits, k).cpu(), codes)
    assert torch.equal(pack._unpack_last(qweight, bits).cpu().long(),
                       (want_w.long().unsqueeze(-1) & 0xFFFFFFFF) >> torch.arange(0, 32, bits) & (2**bits - 1))
    if bits == 4:
        qweight, qzeros = pack_awq(codes.to(device), zero.to(device))
        order = torch.tensor(pack.AWQ_ORDER)
        assert torch.equal(qweight.cpu(), _reference_pack_last(codes.T.reshape(k, n // 8, 8)[..., order], 4))
        assert torch.equal(qzeros.cpu(), _reference_pack_last(zero.T.reshape(n_groups, n // 8, 8)[..., order], 4))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("act_order", [False, True])
def test_from_tensors_is_bit_identical_to_the_gathered_formula(act_order, device):
    """from_tensors' in-place dequantization (a broadcast view for groups i // G, a gather for act-order g_idx)
    gives exactly (codes - zero[:, g_idx]) * scale[:, g_idx], on the tensors' device."""
    from inf_quant.core.config import Method
    from inf_quant.quant.qformat import from_tensors

    n, k, g, bits = 64, 256, 32, 4
    codes, zero = _random(n, k, k // g, bits, seed=5)
    zero[zero == 0] = 1
    scale = (torch.rand(n, k // g, generator=torch.Generator().manual_seed(1)) + 1e-3).half().float()
    g_idx = torch.arange(k, dtype=torch.int32) // g
    if act_order:
        g_idx = g_idx[torch.randperm(k, generator=torch.Generator().manual_seed(2))]
    qweight, qzeros = pack_gptq(codes, zero, bits)
    t = {"qweight": qweight, "qzeros": qzeros, "scales": scale.t().half(), "g_idx": g_idx}
    got = from_tensors({kk: v.to(device) for kk, v in t.items()}, Method.GPTQ, bits, k)
    want = (codes.float() - zero[:, g_idx.long()].float()) * scale[:, g_idx.long()]
    assert got.device.type == device and torch.equal(got.cpu(), want)
    if not act_order:
        aw, az = pack_awq(codes, zero)
        got = from_tensors({"qweight": aw.to(device), "qzeros": az.to(device), "scales": scale.t().half().to(device)},
                           Method.AWQ, bits, k)
        assert torch.equal(got.cpu(), want)
