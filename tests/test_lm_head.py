"""`gptq --lm-head`: the head solved by GPTQ after the last layer, written in GPTQ v1, loaded by transformers (the
copied modeling code's GPTQHead) and refused by name where a layout or model type cannot carry it.
vLLM's side (lm_head_quantized through the plugin) is tests/test_vllm.py. ~1 min on the 2-core box."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from helpers import cli, run_clean
from inf_quant.core.config import GPTQConfig, Method
from inf_quant.core.paths import DEFAULT_MODEL
from inf_quant.engine.head import head_hessian, solve_head
from inf_quant.quant.grid import dequantize_weight, rtn_quantize
from inf_quant.quant.qformat import from_tensors
from tiny import build_tiny_checkpoint

pytestmark = pytest.mark.slow  # quantizes with --lm-head and loads the result in fresh interpreters (~1 min)

QUICK = ("--samples", "8", "--seqlen", "64", "-q")
IDS = [[5, 17, 250, 1024, 7, 3000, 42, 99, 512, 8000, 6, 77]]


@pytest.fixture(scope="module")
def with_head(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("head") / "q"
    assert cli("gptq", "--bits", "4", "--lm-head", "--out", out, *QUICK)[0] == 0
    return out


def test_the_head_is_written_in_gptq_v1(with_head):
    cfg = json.loads((with_head / "config.json").read_text())
    assert cfg["quantization_config"]["lm_head"] is True and cfg["tie_word_embeddings"] is False
    t = load_file(with_head / "model.safetensors")
    assert "lm_head.weight" not in t and "model.embed_tokens.weight" in t
    v, d = cfg["vocab_size"], cfg["hidden_size"]
    assert t["lm_head.qweight"].shape == (d // 8, v) and t["lm_head.scales"].shape == (d // 128, v)
    assert t["lm_head.g_idx"].shape == (d,)
    src = load_file(DEFAULT_MODEL / "model-00003-of-00003.safetensors")
    head = src["lm_head.weight"].float() if "lm_head.weight" in src else None
    if head is not None:  # the dequantized head is a 4-bit approximation of the source head, not something else
        w = from_tensors({k[8:]: v for k, v in t.items() if k.startswith("lm_head.")}, Method.GPTQ, 4, d)
        assert (w - head).abs().max() < 0.6 * head.abs().max()


def test_transformers_loads_the_quantized_head(with_head):
    """A clean interpreter (no inf_quant) loads the output through its copied modeling code: the head is a
    GPTQHead computing with exactly inf-quant's dequantized weight, and the logits are the body's hidden states
    times that weight."""
    code = f"""
import json, torch, transformers
from safetensors.torch import load_file
m = transformers.AutoModelForCausalLM.from_pretrained({str(with_head)!r}, dtype=torch.float32, device_map="cpu",
                                                      trust_remote_code=True)
ids = torch.tensor({IDS})
with torch.no_grad():
    logits = m(ids).logits[0]
    hidden = m.model(ids).last_hidden_state[0]
print(json.dumps({{"cls": type(m.lm_head).__name__, "w": m.lm_head.dequantized().tolist(),
                  "diff": float((logits - hidden @ m.lm_head.dequantized().T).abs().max())}}))
"""
    r = run_clean(code)
    t = load_file(with_head / "model.safetensors")
    ours = from_tensors({k[8:]: v for k, v in t.items() if k.startswith("lm_head.")}, Method.GPTQ, 4,
                        t["lm_head.g_idx"].shape[0])
    assert r["cls"] == "GPTQHead" and torch.equal(torch.tensor(r["w"]), ours) and r["diff"] <= 1e-4


def test_verify_scores_the_quantized_head(with_head, tmp_path, capsys):
    """verify loads the output (the head is a GPTQHead) and scores it; fit counts the packed head's bytes."""
    code, out, err = cli("verify", with_head, "--max-windows", "6", "--report", tmp_path, "-q", capsys=capsys)
    assert code == 0, err
    data = json.loads((tmp_path / "verify.json").read_text())
    assert data["metrics"]["all"]["top1_agreement"] > 0.8
    head_bytes = sum(v.numel() * v.element_size() for k, v in load_file(with_head / "model.safetensors").items()
                     if k.startswith("lm_head."))
    assert head_bytes < 0.3 * 8192 * 256 * 2  # the packed head, not a bf16 one
    assert data["vram"]["vllm"]["weights_bytes"] == sum(
        v.numel() * v.element_size() for v in load_file(with_head / "model.safetensors").values())


def test_gptq_head_beats_round_to_nearest():
    """solve_head on correlated inputs: the head's output error is well below RTN's on the same grid."""
    g = torch.Generator().manual_seed(0)
    d, v, n = 128, 512, 2048
    x = torch.randn(n, d, generator=g) @ torch.randn(d, d, generator=g) * 0.3
    w = torch.randn(v, d, generator=g)
    h = head_hessian(torch.nn.Identity(), x[None], 1)
    cfg = GPTQConfig(group_size=64)
    _, wq, _, _ = solve_head(w, h, cfg)
    rtn = dequantize_weight(rtn_quantize(w, 4, 64, True))
    err = lambda q: float(((x @ (w - q).T) ** 2).sum())  # noqa: E731
    assert err(wq) < 0.75 * err(rtn)


@pytest.mark.parametrize("case", ["stablelm-layout", "llama", "export-stablelm"])
def test_refused_where_a_loader_would_drop_it(case, tmp_path, capsys, with_head):
    if case == "stablelm-layout":
        args = ("gptq", "--lm-head", "--serve-as", "stablelm", "--out", tmp_path / "o", *QUICK)
        want = "needs the inflm layout"
    elif case == "llama":
        llama = build_tiny_checkpoint(tmp_path / "llama", "llama")
        args = ("gptq", "--lm-head", "--model", llama, "--group-size", "32", "--out", tmp_path / "o", *QUICK)
        want = "model_type 'llama'"
    else:
        args = ("export", "--as", "stablelm", with_head, tmp_path / "o")
        want = "quantized lm_head"
    code, _, err = cli(*args, capsys=capsys)
    lines = [ln for ln in err.strip().splitlines() if ln.startswith("inf-quant:")]
    assert code == 2 and len(lines) == 1 and want in lines[0], err
    assert not (tmp_path / "o").exists()


def test_awq_has_no_lm_head_flag(capsys):
    with pytest.raises(SystemExit) as e:
        cli("awq", "--lm-head")
    assert e.value.code == 2 and "--lm-head" in capsys.readouterr().err


if __name__ == "__main__":
    sys.exit(pytest.main([__file__]))
