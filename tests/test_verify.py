"""verify: streamed baseline, its cache, bad-input exits, and gate failures on a damaged checkpoint."""

from __future__ import annotations

import json

import pytest
import torch

import inf_quant  # noqa: F401
from helpers import cli
from inf_quant.evaluate.baseline import baseline_stats, streamed_logprobs
from inf_quant.evaluate.verify_report import VerifyReport
from inf_quant.read.load import open_checkpoint
from tiny import build_tiny_checkpoint
from tolerances import STREAMED_VS_FULL_LOGP_ATOL

pytestmark = pytest.mark.slow  # quantizes and verifies tiny checkpoints through the CLI

FAST = ("--group-size", "32", "--samples", "8", "--seqlen", "64", "-q")


def test_streamed_baseline_equals_full_model(inflm_ckpt):
    from transformers import AutoModelForCausalLM

    windows = torch.randint(0, 8192, (3, 40), generator=torch.Generator().manual_seed(0))
    target, top_lp, top_id = streamed_logprobs(open_checkpoint(inflm_ckpt), windows, 8, torch.device("cpu"),
                                               torch.float32)
    model = AutoModelForCausalLM.from_pretrained(inflm_ckpt, dtype=torch.float32).eval()
    with torch.no_grad():
        logp = torch.log_softmax(model(windows).logits[:, :-1].float(), -1)
    want = logp.gather(-1, windows[:, 1:, None])[..., 0]
    assert (target - want).abs().max() < STREAMED_VS_FULL_LOGP_ATOL
    assert torch.equal(top_id[..., 0].long(), logp.argmax(-1))


def test_baseline_cache_is_reused_and_invalidated(tmp_path, inflm_ckpt):
    ckpt = open_checkpoint(inflm_ckpt)
    w = torch.randint(0, 8192, (2, 16), generator=torch.Generator().manual_seed(1))
    run = lambda c, x: baseline_stats(c, x, 4, torch.device("cpu"), torch.float32, str(tmp_path))  # noqa: E731
    first = run(ckpt, w)
    again = run(ckpt, w)
    assert not first.cached and again.cached and torch.equal(first.target_logp, again.target_logp)
    assert not run(ckpt, w.flip(0)).cached  # other eval tokens -> other key
    # change one weight of the baseline (same file names and size): its hash, hence the key, changes
    from safetensors.torch import load_file, save_file

    shard = ckpt.weight_map["model.layers.0.mlp.up_proj.weight"]
    tensors = load_file(inflm_ckpt / shard)
    tensors["model.layers.0.mlp.up_proj.weight"][0, 0] += 1
    save_file(tensors, str(inflm_ckpt / shard), metadata={"format": "pt"})
    changed = run(open_checkpoint(inflm_ckpt), w)
    assert not changed.cached and changed.key != first.key


@pytest.fixture(scope="module")
def tiny_pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("verify")
    base = build_tiny_checkpoint(root / "bf16", "inflm")
    out = root / "w4"
    assert cli("gptq", "--bits", "4", "--model", base, "--out", out, *FAST)[0] == 0
    return base, out


def _verify(capsys, quant, base, *extra):
    return cli("verify", quant, "--baseline", base, "--max-windows", "6", "--seqlen", "64",
               "--cache-dir", str(quant.parent / "cache"), *extra, capsys=capsys)


def test_verify_writes_report_and_gates_decide_exit_code(tiny_pair, capsys):
    base, out = tiny_pair
    code, stdout, _ = _verify(capsys, out, base, "--min-top1-agreement", "0", "--json")
    data = json.loads(stdout)
    assert code == 0 and data["passed"]
    assert {"all", "en", "zh", "code", "math"} <= set(data["metrics"])
    assert (out / "verify.json").is_file() and (out / "report.md").is_file() and (out / "vram.png").is_file()
    assert data["vram"]["analytic"]["kv_bytes_per_token"] == 2 * 2 * 2 * 8 * 2  # layers*kv_heads*head_dim*K,V*fp16
    assert data["versions"]["gptqmodel"] and data["backend"]["kernel"] != "none"
    stored = json.loads((out / "verify.json").read_text())   # verify.json is the report's to_json(), read back whole
    again = json.dumps(VerifyReport.read(out / "verify.json").to_json(), indent=2, sort_keys=True, ensure_ascii=False)
    assert again + "\n" == (out / "verify.json").read_text() and stored["metrics"] == data["metrics"]
    code, _, err = _verify(capsys, out, base, "--max-kl", "0", "--min-top1-agreement", "0")
    assert code == 1


@pytest.mark.parametrize("case", ["missing", "not-quantized", "baseline-quantized", "other-architecture"])
def test_bad_input_exits_2_with_one_line(tiny_pair, tmp_path, capsys, case):
    base, out = tiny_pair
    quant, baseline, message = {
        "missing": (tmp_path / "nope", base, "not a directory"),
        "not-quantized": (base, base, "not a quantized checkpoint"),
        "baseline-quantized": (out, out, "the baseline is itself quantized"),
        "other-architecture": (out, build_tiny_checkpoint(tmp_path / "llama", "llama"), "differ in architecture (model_type inflm vs llama)"),
    }[case]
    code, _, err = cli("verify", quant, "--baseline", baseline, capsys=capsys)
    lines = [x for x in err.splitlines() if x.startswith("inf-quant")]
    assert code == 2 and len(lines) == 1 and message in lines[0], err


@pytest.mark.parametrize("flag, value", [("--baseline-gib", "0"), ("--top-k", "0"), ("--vram-gib", "-1")])
def test_bad_settings_exit_2_naming_the_flag_before_any_work(tiny_pair, capsys, flag, value):
    base, out = tiny_pair
    code, _, err = cli("verify", out, "--baseline", base, flag, value, capsys=capsys)
    lines = [x for x in err.splitlines() if x.startswith("inf-quant")]
    assert code == 2 and len(lines) == 1 and f"{flag} must be" in lines[0], err
