"""`inf-quant fit --engine vllm`: vLLM's KV-block accounting on INF-34B's real shapes (header-only checkpoints),
checked against hand-computed cases and a brute-force search over contexts."""

import json

import pytest

from helpers import cli
from inf_quant.core.errors import ConfigError
from inf_quant.evaluate.fit_vllm import (BLOCK_TOKENS, CUDAGRAPH_BYTES, LADDER, NCCL_BYTES, NON_TORCH_BYTES,
                                         SAMPLER_BYTES_PER_LOGIT, VllmSettings, fit_checkpoint_vllm, fit_shapes,
                                         what_fits)
from test_fit import INF34B, expected_weights, inf34b, inf34b_tensors, nbytes

GIB = 2**30
D, I, L, V = 8192, 22016, 48, 96512


def shapes(method="gptq", bits=4):
    cfg = dict(INF34B, quantization_config={"quant_method": method, "bits": bits, "group_size": 128})
    return cfg, {k: nbytes(*v) for k, v in inf34b_tensors(method, bits).items()}


def test_inf34b_4bit_by_hand():
    """Every term of the default 24 GiB case computed here, independently of the module's formula."""
    cfg, sizes = shapes()
    r = fit_shapes(cfg, sizes, 24, 4096)
    assert r.weights_bytes == expected_weights("gptq", 4)
    assert r.kv_bytes_per_token == L * 8 * 128 * 2 * 2 == 196_608          # 192 KiB, bf16 K and V
    assert r.requested_bytes == int(24 * GIB * 0.9)
    forward = 2048 * (3 * I + 4 * D + 2 * 128) * 2                       # MLP peak per token, bf16, 2048-token chunk
    sampler = 256 * V * SAMPLER_BYTES_PER_LOGIT                           # 256 dummy requests' logits
    assert r.activation_bytes == max(forward, sampler)
    budget = int(24 * GIB * 0.9) - expected_weights("gptq", 4) - max(forward, sampler) - NON_TORCH_BYTES \
        - CUDAGRAPH_BYTES
    assert r.kv_budget_bytes == budget
    assert r.max_model_len == budget // (196_608 * 16) * 16
    assert r.fits and r.command().endswith("--max-model-len 4096")


def test_brute_force_max_model_len():
    """max_model_len is the largest n whose ceil(n / 16) blocks fit the KV budget, capped at max_position_embeddings:
    found by walking n, for budgets on both sides of the cap and both KV dtypes."""
    for card in (21.0, 21.5, 22.0, 24.0, 26.0, 40.0):
        for kv in ("auto", "fp8"):
            cfg, sizes = shapes()
            r = fit_shapes(cfg, sizes, card, 1, VllmSettings(kv_dtype=kv))
            block = BLOCK_TOKENS * r.kv_bytes_per_token
            best = 0
            for n in range(1, cfg["max_position_embeddings"] + 1):
                if -(-n // BLOCK_TOKENS) * block <= r.kv_budget_bytes:
                    best = n
            assert r.max_model_len == best, (card, kv)


def test_fp8_halves_kv_and_doubles_context():
    cfg, sizes = shapes()
    a, b = fit_shapes(cfg, sizes, 24, 1), fit_shapes(cfg, sizes, 24, 1, VllmSettings(kv_dtype="fp8"))
    assert b.kv_bytes_per_token * 2 == a.kv_bytes_per_token
    assert b.max_model_len in (2 * a.max_model_len, 2 * a.max_model_len + BLOCK_TOKENS)


def test_enforce_eager_frees_the_graph_pool():
    cfg, sizes = shapes()
    a, b = fit_shapes(cfg, sizes, 24, 1), fit_shapes(cfg, sizes, 24, 1, VllmSettings(enforce_eager=True))
    assert a.cudagraph_bytes == CUDAGRAPH_BYTES and b.cudagraph_bytes == 0
    assert b.kv_budget_bytes - a.kv_budget_bytes == CUDAGRAPH_BYTES


def test_8bit_needs_two_cards():
    """8-bit (~37 GB) never fits one 24 GiB card; with --tensor-parallel-size 2 each card holds half of every Linear
    and of the vocab-parallel embedding / lm_head, the norms whole, and half of the 8 KV heads."""
    cfg, sizes = shapes("gptq", 8)
    one = fit_shapes(cfg, sizes, 24, 4096)
    assert not one.fits and one.max_model_len == 0 and "no room for one KV block" in one.verdict
    two = fit_shapes(cfg, sizes, 24, 16384, VllmSettings(tensor_parallel_size=2))
    norms = sum(n for k, n in sizes.items() if "norm" in k)
    assert two.weights_bytes == -(-(sum(sizes.values()) - norms) // 2) + norms
    assert two.kv_bytes_per_token == L * 4 * 128 * 2 * 2
    assert two.non_torch_bytes == NON_TORCH_BYTES + NCCL_BYTES
    assert two.fits and "--tensor-parallel-size 2" in two.command()
    with pytest.raises(ConfigError, match="choose a divisor"):
        fit_shapes(cfg, sizes, 24, 16384, VllmSettings(tensor_parallel_size=3))


def test_ladder_finds_the_first_settings_that_fit():
    """32K on one 24 GiB card with the bf16 lm_head: not at vLLM's defaults; what_fits climbs LADDER and stops at
    the first rung that fits, and every earlier rung did not."""
    cfg, sizes = shapes()
    assert not fit_shapes(cfg, sizes, 24, 32768).fits
    best = what_fits(cfg, sizes, 24, 32768)
    assert best.fits
    settings, rungs = VllmSettings(), 0
    for key, value in LADDER:
        if fit_shapes(cfg, sizes, 24, 32768, settings).fits:
            break
        settings = VllmSettings(**{**settings.__dict__, key: value})
        rungs += 1
    assert best.settings == settings and rungs >= 1


@pytest.mark.parametrize("bad", [dict(gpu_memory_utilization=0), dict(gpu_memory_utilization=1.5),
                                 dict(kv_dtype="int4"), dict(max_num_seqs=0), dict(tensor_parallel_size=True)])
def test_bad_settings_are_config_errors(bad):
    with pytest.raises(ConfigError):
        VllmSettings(**bad)


def test_context_beyond_the_model_is_refused():
    cfg, sizes = shapes()
    with pytest.raises(ConfigError, match="max_position_embeddings"):
        fit_shapes(cfg, sizes, 24, 40000)


def test_cli_fit_vllm_is_the_default(tmp_path, capsys):
    """`inf-quant fit` answers for vLLM by default: exit 0 when the context fits, 1 with the flags that would make it
    fit, 2 on bad input; --json carries the ready command."""
    w4 = inf34b(tmp_path, "gptq", 4)
    code, out, _ = cli("fit", w4, "--context", "4096", "--json", capsys=capsys)
    data = json.loads(out)
    assert code == 0 and data["engine"] == "vllm" and data["fits"] and data["fits_with"] is None
    assert data["command"] == f"vllm serve {w4} --max-model-len 4096"
    code, out, _ = cli("fit", w4, "--context", "32768", capsys=capsys)
    assert code == 1 and "does NOT fit" in out
    assert out.strip().splitlines()[-1].startswith(f"fits with: vllm serve {w4} --max-model-len 32768")
    assert fit_checkpoint_vllm(w4, 24, 32768).fits
    code, _, err = cli("fit", w4, "--gpu-memory-utilization", "2", capsys=capsys)
    assert code == 2 and "--gpu-memory-utilization" in err
