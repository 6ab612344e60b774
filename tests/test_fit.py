"""`inf-quant fit`'s memory model on INF-34B's real shapes, from sparse checkpoints that are headers only."""

import json
import struct

import pytest

from inf_quant.core.errors import CheckpointError, ConfigError
from inf_quant.evaluate.fit import (CUDA_CONTEXT_BYTES, FRAGMENTATION_PERCENT, GIB, fit_checkpoint, fit_from_shapes,
                                    max_context, memory_model, total_bytes)
from tolerances import EXACT, INF34B_WEIGHTS_GB_ATOL

GB = 10**9
D, I, L, V, KV_DIM = 8192, 22016, 48, 96512, 1024   # INF-34B: hidden, FFN, layers, vocab, 8 KV heads x 128
INF34B = dict(model_type="inflm", hidden_size=D, intermediate_size=I, num_hidden_layers=L, num_attention_heads=64,
              num_key_value_heads=8, vocab_size=V, max_position_embeddings=32768, tie_word_embeddings=False,
              dtype="bfloat16")
LINEARS = {"self_attn.q_proj": (D, D), "self_attn.k_proj": (KV_DIM, D), "self_attn.v_proj": (KV_DIM, D),
           "self_attn.o_proj": (D, D), "mlp.gate_proj": (I, D), "mlp.up_proj": (I, D), "mlp.down_proj": (D, I)}
ELEMENT_BYTES = {"BF16": 2, "F16": 2, "I32": 4}


def linear_tensors(method: str, bits: int, n: int, k: int, g: int = 128) -> dict[str, tuple[str, list[int]]]:
    """Checkpoint tensors of one Linear [N, K]: suffix -> (safetensors dtype, shape)."""
    per_word = 32 // bits
    if method == "bf16":
        return {"weight": ("BF16", [n, k])}
    if method == "gptq":
        return {"qweight": ("I32", [k // per_word, n]), "qzeros": ("I32", [k // g, n // per_word]),
                "scales": ("F16", [k // g, n]), "g_idx": ("I32", [k])}
    return {"qweight": ("I32", [k, n // per_word]), "qzeros": ("I32", [k // g, n // per_word]),
            "scales": ("F16", [k // g, n])}


def inf34b_tensors(method: str, bits: int = 16) -> dict[str, tuple[str, list[int]]]:
    out = {"model.embed_tokens.weight": ("BF16", [V, D]), "lm_head.weight": ("BF16", [V, D]),
           "model.norm.weight": ("BF16", [D]), "model.norm.bias": ("BF16", [D])}
    for i in range(L):
        for norm in ("input_layernorm", "post_attention_layernorm"):
            out.update({f"model.layers.{i}.{norm}.{p}": ("BF16", [D]) for p in ("weight", "bias")})
        for lin, (n, k) in LINEARS.items():
            out.update({f"model.layers.{i}.{lin}.{s}": v for s, v in linear_tensors(method, bits, n, k).items()})
    return out


def nbytes(dtype: str, shape: list[int]) -> int:
    n = ELEMENT_BYTES[dtype]
    for d in shape:
        n *= d
    return n


def write_sparse_shard(path, tensors: dict[str, tuple[str, list[int]]]) -> int:
    """A safetensors file whose header lists `tensors` back to back; the data is a hole (no bytes written)."""
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, (dtype, shape) in tensors.items():
        end = offset + nbytes(dtype, shape)
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, end]}
        offset = end
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)  # safetensors pads the header to 8 bytes
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)) + blob)
        f.truncate(8 + len(blob) + offset)
    return offset


def write_sparse_checkpoint(out, config: dict, tensors: dict[str, tuple[str, list[int]]], shards: int = 4):
    """config.json, a sharded index and sparse shards (~20-70 GB apparent size, a few KiB on disk)."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(config))
    names = list(tensors)
    weight_map, total = {}, 0
    for s in range(shards):
        fname = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        part = names[s * len(names) // shards:(s + 1) * len(names) // shards]
        total += write_sparse_shard(out / fname, {n: tensors[n] for n in part})
        weight_map.update(dict.fromkeys(part, fname))
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index))
    return out


def inf34b(tmp_path, method: str, bits: int = 16):
    config = dict(INF34B)
    if method != "bf16":
        config["quantization_config"] = {"quant_method": method, "bits": bits, "group_size": 128}
    return write_sparse_checkpoint(tmp_path / f"inf34b-{method}-{bits}", config, inf34b_tensors(method, bits))


def expected_weights(method: str, bits: int) -> int:
    """Tensor bytes by hand: 16-bit embed + lm_head + norms, plus per-Linear packed sizes."""
    total = 2 * V * D * 2 + (4 * L + 2) * D * 2
    for n, k in LINEARS.values():
        if method == "bf16":
            per = n * k * 2
        else:  # codes + int32 zero points (32/bits per word) + fp16 scales, one per 128 columns
            per = n * k * bits // 8 + (k // 128) * (n * bits // 32) * 4 + (k // 128) * n * 2
            per += 4 * k if method == "gptq" else 0     # g_idx
        total += L * per
    return total


def test_gptq_4bit_weights_and_kv(tmp_path):
    r = fit_checkpoint(inf34b(tmp_path, "gptq", 4), vram_gib=24, context=32768)
    assert r.weights_bytes == expected_weights("gptq", 4)
    assert abs(r.weights_bytes - 20.4 * GB) <= INF34B_WEIGHTS_GB_ATOL
    embed_and_head = 2 * V * D * 2                      # 3.16 GB of 16-bit embeddings and lm_head
    assert r.weights_bytes - embed_and_head == expected_weights("gptq", 4) - embed_and_head
    assert embed_and_head == 3_162_505_216
    assert r.kv_bytes_per_token == 196608 == L * 8 * 128 * 2 * 2
    assert r.kv_bytes == 6 * GIB
    assert r.context == 32768 and r.budget_bytes == 24 * GIB
    assert r.total_bytes == sum((r.weights_bytes, r.kv_bytes, r.activation_bytes, r.logits_bytes,
                                 r.overhead_bytes))
    assert not r.fits and 0 < r.max_context < 32768
    assert f"does NOT fit 24.0 GiB at context 32768 (needs {r.total_bytes / GIB:.1f} GiB)" in r.to_text()
    d = json.loads(json.dumps(r.to_dict()))
    for key in ("weights_bytes", "kv_bytes_per_token", "overhead_bytes", "max_context", "fits", "total_bytes",
                "context", "budget_bytes"):
        assert d[key] == getattr(r, key)


def test_gptq_4bit_fits_at_short_context(tmp_path):
    ckpt = inf34b(tmp_path, "gptq", 4)
    r = fit_checkpoint(ckpt, vram_gib=24, context=4096)
    assert r.fits and r.max_context >= 4096
    assert r.to_text().splitlines()[-1] == (f"fits 24.0 GiB at context 4096 (uses {r.total_bytes / GIB:.1f} GiB); "
                                            f"largest context that fits: {r.max_context}")
    big = fit_checkpoint(ckpt, vram_gib=80)                     # context None: max_position_embeddings
    assert big.context == 32768 and big.fits and big.max_context == 32768 and big.context_capped
    assert "(the model's max_position_embeddings)" in big.to_text()


def test_gptq_8bit_does_not_fit_24gib(tmp_path):
    r = fit_checkpoint(inf34b(tmp_path, "gptq", 8), vram_gib=24, context=32768)
    assert r.weights_bytes == expected_weights("gptq", 8)
    assert abs(r.weights_bytes - 37.2 * GB) <= INF34B_WEIGHTS_GB_ATOL
    assert not r.fits and r.max_context == 0
    verdict = r.to_text().splitlines()[-1]
    assert verdict.startswith("does NOT fit 24.0 GiB: the weights alone need 37.2 GB (34.6 GiB)")
    assert f">= {-(-r.total_bytes // GIB)} GiB for context 32768 or a 4-bit checkpoint" in verdict


def test_bf16_does_not_fit(tmp_path):
    r = fit_checkpoint(inf34b(tmp_path, "bf16"), vram_gib=24)
    assert r.weights_bytes == expected_weights("bf16", 16)
    assert abs(r.weights_bytes - 69.6 * GB) <= INF34B_WEIGHTS_GB_ATOL
    assert r.quant == "bfloat16" and not r.fits and r.max_context == 0
    assert r.activation_bytes < fit_checkpoint(inf34b(tmp_path, "gptq", 4)).activation_bytes  # no dequant buffer
    assert "does NOT fit 24.0 GiB: the weights alone need 69.6 GB" in r.to_text()


def test_awq_sizes_from_headers(tmp_path):
    r = fit_checkpoint(inf34b(tmp_path, "awq", 4), vram_gib=24, context=1)
    assert r.weights_bytes == expected_weights("awq", 4)
    gptq = fit_checkpoint(inf34b(tmp_path, "gptq", 4), vram_gib=24, context=1)
    assert gptq.weights_bytes - r.weights_bytes == L * 4 * (6 * D + I)   # GPTQ's g_idx, [K] int32 per Linear
    assert r.activation_bytes == gptq.activation_bytes                   # same largest Linear: I x D fp16


def inf34b_model(bits: int = 4, kv_dtype: str = "fp16", batch: int = 1):
    config = dict(INF34B, quantization_config={"quant_method": "gptq", "bits": bits, "group_size": 128})
    return memory_model(config, expected_weights("gptq", bits), I * D * 2, batch, kv_dtype)


@pytest.mark.parametrize("kv_dtype", ["fp16", "fp8"])
def test_max_context_is_the_largest_fitting_n_inf34b(kv_dtype):
    m = inf34b_model(kv_dtype=kv_dtype)
    budget = 24 * GIB
    fitting = [n for n in range(1, m.max_position_embeddings + 1) if total_bytes(m, n) <= budget]
    assert max_context(m, budget) == max(fitting) == len(fitting)


def test_max_context_brute_force_small_model():
    config = dict(hidden_size=64, intermediate_size=192, num_hidden_layers=2, num_attention_heads=8,
                  num_key_value_heads=2, vocab_size=256, max_position_embeddings=4096)
    m = memory_model(config, weights_bytes=123_457, dequant_bytes=0)
    totals = [total_bytes(m, n) for n in range(1, 4097)]
    assert all(a < b for a, b in zip(totals, totals[1:])), "total_bytes must be strictly increasing"
    for budget in (totals[0] - 1, totals[0], totals[1000] - 1, totals[1000], totals[2500] + 7, totals[-1],
                   totals[-1] * 2):
        expected = max((n for n, t in enumerate(totals, 1) if t <= budget), default=0)
        assert max_context(m, budget) == expected, budget


def test_kv_scales_with_dtype_and_batch():
    fp16 = fit_from_shapes(INF34B, 10 * GB, context=1024)
    assert fp16.kv_bytes_per_token == 196608
    assert fit_from_shapes(INF34B, 10 * GB, context=1024, kv_dtype="fp8").kv_bytes_per_token == 196608 // 2
    b2 = fit_from_shapes(INF34B, 10 * GB, context=1024, batch=2)
    assert b2.kv_bytes_per_token == 2 * 196608
    assert b2.logits_bytes == 2 * fp16.logits_bytes
    assert b2.activation_bytes - fp16.activation_bytes - fp16.activation_bytes == EXACT  # unquantized: no dequant


def test_errors(tmp_path):
    with pytest.raises(CheckpointError, match="not a directory"):
        fit_checkpoint(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="config.json is missing"):
        fit_checkpoint(tmp_path / "empty")
    ckpt = inf34b(tmp_path, "gptq", 4)
    with pytest.raises(ConfigError, match="context=0"):
        fit_checkpoint(ckpt, context=0)
    with pytest.raises(ConfigError, match="max_position_embeddings=32768"):
        fit_checkpoint(ckpt, context=40000)
    with pytest.raises(ConfigError, match="kv_dtype='int3'.*fp16, bf16, fp8"):
        fit_checkpoint(ckpt, kv_dtype="int3")
    with pytest.raises(ConfigError, match="batch=0"):
        fit_checkpoint(ckpt, batch=0)
    with pytest.raises(ConfigError, match="vram_gib=-1"):
        fit_checkpoint(ckpt, vram_gib=-1)
    with pytest.raises(ConfigError, match="quant_method='bitsandbytes'"):
        fit_from_shapes(dict(INF34B, quantization_config={"quant_method": "bitsandbytes"}), GB)
    with pytest.raises(ConfigError, match="hidden_size=None"):
        fit_from_shapes({k: v for k, v in INF34B.items() if k != "hidden_size"}, GB)
    with pytest.raises(ConfigError, match=r"awq quantization_config.bits must be 2, 3, 4 or 8 \(the widths fit can "
                                          r"size\), got 5"):
        fit_from_shapes(dict(INF34B, quantization_config={"quant_method": "awq", "bits": 5}), GB)
    stale = write_sparse_checkpoint(tmp_path / "stale", dict(INF34B, quantization_config={
        "quant_method": "gptq", "bits": 4, "group_size": 128}), {"lm_head.weight": ("BF16", [V, D])}, shards=1)
    with pytest.raises(CheckpointError, match="no tensor ends in '.qweight'"):
        fit_checkpoint(stale)


@pytest.mark.parametrize("kv_dtype", ["fp16", "fp8"])
def test_inf34b_4bit_on_24gib_matches_closed_form(kv_dtype):
    """max_context by hand: (budget - CUDA context) / 1.05 = fixed + N * per_token, within the ceil's 1 token."""
    config = dict(INF34B, quantization_config={"quant_method": "gptq", "bits": 4, "group_size": 128})
    r = fit_from_shapes(config, expected_weights("gptq", 4), vram_gib=24, context=32768, kv_dtype=kv_dtype)
    kv = L * KV_DIM * 2 * (2 if kv_dtype == "fp16" else 1)
    per_token = kv + (3 * I + 4 * D + 2 * 128) * 2                  # KV + MLP-peak activations + rope, bf16
    fixed = expected_weights("gptq", 4) + I * D * 2 + V * 6          # weights, fp16 gate_proj copy, logits
    usable = (24 * GIB - CUDA_CONTEXT_BYTES) * 100 / (100 + FRAGMENTATION_PERCENT)
    assert abs(r.max_context - int((usable - fixed) // per_token)) <= 1
    assert not r.fits and 0 < r.max_context < 32768
    assert ("fp8 KV" in r.to_text().splitlines()[-1]) == (kv_dtype == "fp16")  # suggested unless in use


def test_cli_fit_exit_codes_and_json(tmp_path, capsys):
    """`inf-quant fit`: exit 0 when it fits, 1 when it does not (8-bit on 24 GiB), 2 on bad input."""
    from helpers import cli

    w4, w8 = inf34b(tmp_path / "w4", "gptq", 4), inf34b(tmp_path / "w8", "gptq", 8)
    code, out, _ = cli("fit", w4, "--engine", "transformers", "--vram-gib", "24", "--context", "4096", "--json",
                       capsys=capsys)
    data = json.loads(out)
    assert code == 0 and data["fits"] and data["kv_bytes_per_token"] == 196608 and data["max_context"] >= 4096
    code, out, _ = cli("fit", w8, "--engine", "transformers", "--vram-gib", "24", "--context", "4096", capsys=capsys)
    assert code == 1 and "does NOT fit" in out
    code, _, err = cli("fit", tmp_path / "missing", capsys=capsys)
    assert code == 2 and err.startswith("inf-quant: error:")
