"""Recipes (typed schema) and the release job: publish, manifest, --check, determinism, crash safety, gates."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from helpers import cli
from inf_quant.core.config import Order
from inf_quant.core.errors import ConfigError
from inf_quant.core.hashing import file_sha256, files_sha256
from inf_quant.core.paths import CALIBRATION, REPO_ROOT
from inf_quant.core.recipe_file import load_recipe
from inf_quant.data.calibrate import calibration_files
from inf_quant.release import release
from tiny import build_tiny_checkpoint
from tolerances import RELEASE_TINY_MAX_KL, RELEASE_TINY_MAX_PPL_INCREASE_PCT, RELEASE_TINY_MIN_TOP1

RECIPE = """method: {method}
model: {{path: {model}}}
calibration: {{samples: 8, seqlen: 64}}
{method}: {{bits: 4, group_size: 32}}
verify: {{seqlen: 64, max_windows: 6, gates: {{max_ppl_increase_pct: {ppl}, max_kl: {kl}, min_top1_agreement: {top1}}}}}
"""
# YAML 1.1 reads 2e-06 as a string: the KL gate is written with a decimal point
GATES = {"ppl": RELEASE_TINY_MAX_PPL_INCREASE_PCT, "kl": f"{RELEASE_TINY_MAX_KL:.1e}", "top1": RELEASE_TINY_MIN_TOP1}


@pytest.fixture(scope="module")
def recipes(tmp_path_factory):
    root = tmp_path_factory.mktemp("release")
    model = build_tiny_checkpoint(root / "bf16", "inflm")
    d = root / "recipes"
    d.mkdir()
    for method in ("gptq", "awq"):
        (d / f"tiny-{method}.yaml").write_text(RECIPE.format(method=method, model=model, **GATES))
    return d


def test_repository_recipes_are_valid_and_pin_the_calibration_set():
    files = sorted((REPO_ROOT / "recipes").glob("*.yaml")) + sorted((REPO_ROOT / "recipes" / "ci").glob("*.yaml"))
    names = {p.stem for p in files}
    assert {"inf34b-chat-gptq-w4g128", "inf34b-chat-gptq-w8g128", "inf34b-chat-awq-w4g128"} <= names
    assert len(list((REPO_ROOT / "recipes" / "ci").glob("*.yaml"))) >= 3
    for p in files:
        r = load_recipe(p)
        assert r.calibration.sha256 == files_sha256(calibration_files(r.calibration.source)), p
    w4 = load_recipe(REPO_ROOT / "recipes" / "inf34b-chat-gptq-w4g128.yaml")
    assert (w4.gptq.bits, w4.gptq.group_size, w4.gptq.sym, w4.gptq.order) == (4, 128, True, Order.GROUP_AWARE)
    assert w4.model.path == ""  # the 34B recipes take --model
    assert all(load_recipe(p).model.path == "bundled" for p in (REPO_ROOT / "recipes" / "ci").glob("*.yaml"))


@pytest.mark.parametrize("text, message", [
    ("method: gptq\ngptq: {bitz: 4}\n", "x.yaml.gptq.bitz: unknown key"),
    ("method: gptq\ncolour: red\n", "x.yaml.colour: unknown key"),
    ("method: gptq\ngptq: {bits: 3}\n", "gptq.bits must be 4 or 8 (the bit widths Marlin/vLLM and gptqmodel load), got 3"),
    ("method: gptq\ngptq: {bits: 8, smooth: awq}\n",
     "gptq.bits with smooth: awq (--smooth awq) must be 4 (8-bit GPTQ loses ~0 already), got 8"),
    ("method: gptq\ngptq: {smooth_tokens: 0}\n", "gptq.smooth_tokens must be >= 1, got 0"),
    ("method: gptq\ngptq: {bits: four}\n", "x.yaml.gptq.bits: expected int, got 'four'"),
    ("method: gptqq\n", "x.yaml.method: 'gptqq' is not one of 'gptq', 'awq'"),
    ("name: other\n", "name 'other' must match the file name 'x'"),
    ("verify: {quantized: /tmp/q}\n", "x.yaml.verify.quantized: set by `inf-quant release`"),
    ("method: awq\nverify: {gates: {max_kl: yes}}\n", "x.yaml.verify.gates.max_kl: expected float, got True"),
])
def test_recipe_schema_errors_name_the_key(tmp_path, text, message):
    p = tmp_path / "x.yaml"
    p.write_text(text)
    with pytest.raises(ConfigError) as e:
        load_recipe(p)
    assert message in str(e.value)


def _tree(d: Path) -> dict:
    return {str(p.relative_to(d)): file_sha256(p) for p in sorted(d.rglob("*")) if p.is_file()}


@pytest.mark.slow  # runs whole releases
def test_release_publishes_checks_and_is_deterministic(tmp_path, recipes, capsys):
    a, b = tmp_path / "a", tmp_path / "b"
    assert cli("release", "--recipes", recipes, "--out", a, "-q", capsys=capsys)[0] == 0
    assert cli("release", "--recipes", recipes, "--out", b, "-q", capsys=capsys)[0] == 0
    manifest = json.loads((a / "manifest.json").read_text())
    assert set(manifest["variants"]) == {"tiny-gptq", "tiny-awq"} and not manifest["rejected"]
    v = manifest["variants"]["tiny-gptq"]
    assert {"model.safetensors", "config.json", "verify.json", "report.md"} <= set(v["files"])
    assert v["recipe"]["gptq"]["bits"] == 4 and v["passed"] and v["calibration_sha256"] == file_sha256(CALIBRATION)
    assert v["layout"] == "inflm" and v["recipe"]["output"]["serve_as"] == "inflm"  # the default, as INF ships it
    assert manifest["input_models_sha256"] and manifest["versions"]["torch"]
    assert all(e["metrics"]["all"]["top1_agreement"] >= RELEASE_TINY_MIN_TOP1 for e in manifest["variants"].values())
    assert (a / "manifest.json").read_bytes() == (b / "manifest.json").read_bytes()
    assert _tree(a) == _tree(b)
    assert not (a / ".staging").exists()
    code, out, _ = cli("release", "--check", a, capsys=capsys)
    assert code == 0 and "every file matches" in out
    shard = a / "tiny-awq" / "model.safetensors"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x01  # one flipped bit in the middle of the weights
    shard.write_bytes(bytes(data))
    code, out, _ = cli("release", "--check", a, capsys=capsys)
    assert code == 1 and "tiny-awq/model.safetensors: sha256 or size differs" in out
    code, _, err = cli("release", "--recipes", recipes, "--out", a, "-q", capsys=capsys)
    assert code == 2 and "already exist" in err


@pytest.mark.slow  # runs whole releases
def test_interrupted_release_keeps_published_variants_and_resumes_to_same_bytes(tmp_path, recipes):
    ref = tmp_path / "ref"
    release(recipes, ref)
    out = tmp_path / "out"
    calls = []

    def crash(result, total):  # variants build in name order: tiny-awq, then tiny-gptq; die inside tiny-gptq
        calls.append(result.index)
        if len(calls) == total + 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        release(recipes, out, progress=crash)
    assert (out / "tiny-awq" / "verify.json").is_file() and not (out / "tiny-gptq").exists()
    before = _tree(out / "tiny-awq")
    report = release(recipes, out, resume=True)
    assert report.ok and _tree(out / "tiny-awq") == before
    assert (out / "manifest.json").read_bytes() == (ref / "manifest.json").read_bytes()
    assert _tree(out) == _tree(ref)


@pytest.mark.slow  # runs whole releases
def test_only_merges_into_the_manifest_and_resume_rebuilds_a_variant_whose_recipe_changed(tmp_path, recipes):
    import shutil

    ref = tmp_path / "ref"
    release(recipes, ref)
    out = tmp_path / "out"
    shutil.copytree(ref, out)
    release(recipes, out, only=("tiny-gptq",), force=True)  # rebuild one: the other stays in the manifest
    assert (out / "manifest.json").read_bytes() == (ref / "manifest.json").read_bytes()
    assert _tree(out) == _tree(ref)
    changed = tmp_path / "recipes"
    shutil.copytree(recipes, changed)
    p = changed / "tiny-awq.yaml"
    p.write_text(p.read_text().replace("samples: 8", "samples: 6"))
    report = release(changed, out, resume=True)
    assert report.ok
    built = json.loads((out / "tiny-awq" / "inf_quant.json").read_text())["recipe"]["calibration"]["samples"]
    manifest = json.loads((out / "manifest.json").read_text())
    assert built == 6 and manifest["variants"]["tiny-awq"]["recipe"]["calibration"]["samples"] == 6
    assert manifest["variants"]["tiny-gptq"] == json.loads((ref / "manifest.json").read_text())["variants"]["tiny-gptq"]


@pytest.mark.slow  # runs whole releases
def test_a_failing_gate_rejects_the_variant_and_exits_1(tmp_path, recipes, capsys):
    d = tmp_path / "strict"
    d.mkdir()
    text = (recipes / "tiny-gptq.yaml").read_text().replace(f"min_top1_agreement: {RELEASE_TINY_MIN_TOP1}",
                                                            "min_top1_agreement: 1.0")
    assert "min_top1_agreement: 1.0" in text
    (d / "tiny-gptq.yaml").write_text(text)
    out = tmp_path / "rel"
    code, stdout, _ = cli("release", "--recipes", d, "--out", out, "-q", capsys=capsys)
    assert code == 1 and "REJECTED tiny-gptq" in stdout and "min_top1_agreement" in stdout
    assert not (out / "tiny-gptq").exists() and (out / ".rejected" / "tiny-gptq" / "report.md").is_file()
    assert json.loads((out / "manifest.json").read_text())["variants"] == {}


@pytest.mark.slow  # runs whole releases
def test_kill_9_during_a_release_then_resume_gives_the_same_bytes(tmp_path, recipes):
    """A real SIGKILL (no cleanup runs) right after the first variant is published."""
    import os
    import signal
    import subprocess
    import sys
    import time

    ref = tmp_path / "ref"
    release(recipes, ref)
    out = tmp_path / "out"
    p = subprocess.Popen([sys.executable, "-m", "inf_quant", "release", "--recipes", str(recipes), "--out", str(out),
                          "-q"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ})
    deadline = time.monotonic() + 600
    while p.poll() is None and time.monotonic() < deadline and not (out / "tiny-awq").exists():
        time.sleep(0.02)
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert p.returncode == -signal.SIGKILL, "the release finished before it could be killed"
    assert (out / "tiny-awq" / "verify.json").is_file() and not (out / "manifest.json").exists()
    published = _tree(out / "tiny-awq")
    report = release(recipes, out, resume=True)
    assert report.ok and _tree(out / "tiny-awq") == published
    assert _tree(out) == _tree(ref)


@pytest.mark.slow  # runs whole releases
def test_recipes_choose_the_layout_and_the_manifest_records_it(tmp_path, recipes, capsys):
    """`output: {serve_as: stablelm}` in a recipe, and `release --serve-as` over every recipe (~30 s: one variant)."""
    d = tmp_path / "recipes"
    d.mkdir()
    (d / "tiny-gptq.yaml").write_text((recipes / "tiny-gptq.yaml").read_text() + "output: {serve_as: stablelm}\n")
    from inf_quant.core.config import Layout

    assert load_recipe(d / "tiny-gptq.yaml").output.serve_as is Layout.STABLELM
    (d / "bad.yaml").write_text("output: {serve_as: vllm}\n")
    with pytest.raises(ConfigError) as e:
        load_recipe(d / "bad.yaml")
    assert "bad.yaml.output.serve_as: 'vllm' is not one of 'inflm', 'stablelm'" in str(e.value)
    (d / "bad.yaml").unlink()
    out = tmp_path / "rel"
    assert cli("release", "--recipes", recipes, "--out", out, "--only", "tiny-gptq", "--serve-as", "stablelm", "-q",
               capsys=capsys)[0] == 0
    v = json.loads((out / "manifest.json").read_text())["variants"]["tiny-gptq"]
    assert v["layout"] == "stablelm" and v["recipe"]["output"]["serve_as"] == "stablelm"
    assert "modeling_inflm.py" not in v["files"] and "tokenizer.json" in v["files"]
    assert json.loads((out / "tiny-gptq" / "config.json").read_text())["model_type"] == "stablelm"
    assert cli("release", "--check", out, capsys=capsys)[0] == 0
