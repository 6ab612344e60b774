"""Issue 22, the input side: the catalogue rows of docs/ERRORS.md's block "Inputs proven before work" (exit code,
one `inf-quant: …` line naming the object and the fix, no traceback, every file under the test root unchanged),
plus the lock-first, `--force`-scope and recipe behaviours they stand for.

Cost: ~15 s on 2 cores: 33 pre-flight cases at milliseconds each, 2 that quantize the tiny model part-way (NaN),
a few full tiny runs (--force, lock order, recipe paths, export), one pair of concurrent CLI processes (~6 s).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers import cli
from inf_quant.save.lock import lock_path
from test_trust import FAST, Box, _gptq, _rewrite_shard, _shard, registrar, run_case, snapshot
from tiny import build_tiny_checkpoint

CASES: dict = {}
case = registrar(CASES)


def _edit_config(m: Path, **values) -> Path:
    p = m / "config.json"
    cfg = json.loads(p.read_text())
    cfg.update(values)
    p.write_text(json.dumps(cfg))  # json writes float('inf') as Infinity, which config readers accept
    return m


def _recipes(t: Box, **files: str) -> Path:
    d = t.root / "recipes"
    d.mkdir(exist_ok=True)
    for name, text in files.items():
        (d / name.replace("__", ".")).write_text(text)
    return d


# ---- the checkpoint is what config.json says: dtypes and layer count --------------------------------------------
@case("tensor-int8-lm-head", 2, "model-00003-of-00003.safetensors: tensor lm_head.weight is stored as I8",
      "holds only BF16, F16, F32", "pass the original bf16 checkpoint")
def _(t):
    import torch

    m = t.model()
    name = "lm_head.weight"
    _rewrite_shard(_shard(m, name), lambda d: d.__setitem__(name, torch.zeros_like(d[name], dtype=torch.int8)))
    return _gptq(t, "--out", t.root / "q", model=m)


@case("tensor-fp8", 2, "tensor model.layers.1.mlp.up_proj.weight is stored as F8_E4M3", "BF16, F16, F32")
def _(t):
    import torch

    m = t.model()
    name = "model.layers.1.mlp.up_proj.weight"
    _rewrite_shard(_shard(m, name), lambda d: d.__setitem__(name, d[name].to(torch.float8_e4m3fn)))
    return _gptq(t, "--out", t.root / "q", model=m)


@case("layers-config-fewer", 2, "num_hidden_layers=1, but the shards hold tensors of model.layers.1",
      "set num_hidden_layers to the layers the checkpoint holds")
def _(t):
    return _gptq(t, "--out", t.root / "q", model=_edit_config(t.model(), num_hidden_layers=1))


@case("layers-config-more", 2, "num_hidden_layers=4, but the shards hold no tensors of model.layers.2..3",
      "restore the missing shards")
def _(t):
    return _gptq(t, "--out", t.root / "q", model=_edit_config(t.model(), num_hidden_layers=4))


# ---- config.json values: type and range ------------------------------------------------------------------------
@case("config-layers-negative", 2, "config.json: num_hidden_layers=-1 must be a positive integer",
      "correct it in config.json")
def _(t):
    return _gptq(t, "--out", t.root / "q", model=_edit_config(t.model(), num_hidden_layers=-1))


@case("config-int-as-string", 2, "config.json: hidden_size='64' must be a positive integer", "without quotes")
def _(t):
    return _gptq(t, model=_edit_config(t.model(), hidden_size="64"))


@case("config-int-fraction", 2, "config.json: intermediate_size=192.9 must be a positive integer", "or decimals")
def _(t):
    return _gptq(t, model=_edit_config(t.model(), intermediate_size=192.9))


@case("config-int-bool", 2, "config.json: num_attention_heads=True must be a positive integer")
def _(t):
    return _gptq(t, model=_edit_config(t.model(), num_attention_heads=True))


@case("config-max-positions-text", 2, "config.json: max_position_embeddings='lots' must be a positive integer")
def _(t):
    return _gptq(t, model=_edit_config(t.model(), max_position_embeddings="lots"))


@case("config-vocab-zero", 2, "config.json: vocab_size=0 must be a positive integer")
def _(t):
    return _gptq(t, model=_edit_config(t.model(), vocab_size=0))


@case("config-rope-theta-infinite", 2, "config.json: rope_parameters.rope_theta=inf must be a finite number > 0",
      "correct it in config.json")
def _(t):
    return _gptq(t, model=_edit_config(t.model(), rope_parameters={"rope_theta": float("inf"), "rope_type": "default"}))


@case("config-rope-theta-text", 2, "config.json: rope_theta='1e4' must be a finite number > 0")
def _(t):
    return _gptq(t, model=_edit_config(t.model(), rope_theta="1e4"))


@case("config-eps-zero", 2, "config.json: layer_norm_eps=0 must be a finite number > 0")
def _(t):
    return _gptq(t, model=_edit_config(t.model(), layer_norm_eps=0))


@case("config-eps-nan", 2, "config.json: rms_norm_eps=nan must be a finite number > 0")
def _(t):
    return _gptq(t, model=_edit_config(t.model(), rms_norm_eps=float("nan")))


@case("config-kv-heads-not-dividing", 2, "config.json: num_key_value_heads=3 must be a divisor of "
      "num_attention_heads=8")
def _(t):
    return _gptq(t, model=_edit_config(t.model(), num_key_value_heads=3))


@case("config-tie-not-bool", 2, "config.json: tie_word_embeddings='no' must be true or false")
def _(t):
    return _gptq(t, model=_edit_config(t.model(), tie_word_embeddings="no"))


@case("config-model-type-not-string", 2, "config.json: model_type=['inflm'] must be a string", "e.g. 'inflm'")
def _(t):
    return _gptq(t, model=_edit_config(t.model(), model_type=["inflm"]))


@case("config-rope-parameters-not-object", 2, "config.json: rope_parameters=500000.0 must be an object")
def _(t):
    return _gptq(t, model=_edit_config(t.model(), rope_parameters=500000.0))


# ---- other malformed values -------------------------------------------------------------------------------------
@case("seed-too-large", 2, "calibration.seed (--seed) must be in 0..4294967295", "got 12345678901234567890123")
def _(t):
    return _gptq(t, "--seed", "12345678901234567890123")


@case("seed-negative", 2, "calibration.seed (--seed) must be in 0..4294967295", "got -1")
def _(t):
    return _gptq(t, "--seed", "-1")


@case("model-symlink-loop", 2, "loop", "a symlink loop", "fix or remove the link")
def _(t):
    (t.root / "loop").symlink_to(t.root / "loop")
    return ["gptq", "--model", t.root / "loop", *FAST]


@case("out-is-cwd", 2, "--out . is the current directory or one above it", "choose a new directory")
def _(t):
    t.write("here/keep.txt", "precious")
    t.mp.chdir(t.root / "here")
    return _gptq(t, "--out", ".", "--force")


@case("out-is-cwd-ancestor", 2, "is the current directory or one above it", "choose a new directory")
def _(t):
    t.write("a/inf_quant.json", "{}")  # even an inf-quant output is not swapped out from under the shell
    (t.root / "a" / "b").mkdir()
    t.mp.chdir(t.root / "a" / "b")
    return _gptq(t, "--out", t.root / "a", "--force")


@case("recipe-top-level-list", 2, "r.yaml: a recipe is a mapping of sections", "top level is a list",
      "write it as 'key: value' lines")
def _(t):
    return ["release", "--recipes", _recipes(t, r__yaml="- method: gptq\n- gptq: {bits: 4}\n"), "--out", t.root / "rel"]


# ---- recipes: duplicate keys, .yml, paths relative to the recipe -----------------------------------------------
@case("recipe-duplicate-key", 2, "r.yaml:3: duplicate key 'gptq' (first on line 2)", "keep one of them")
def _(t):
    d = _recipes(t, r__yaml="method: gptq\ngptq: {bits: 4}\ngptq: {bits: 8}\n")
    return ["release", "--recipes", d, "--out", t.root / "rel"]


@case("recipe-duplicate-nested-key", 2, "r.yml:4: duplicate key 'bits' (first on line 3)", "keep one of them")
def _(t):
    d = _recipes(t, r__yml="method: gptq\ngptq:\n  bits: 4\n  bits: 8\n")
    return ["release", "--recipes", d, "--out", t.root / "rel"]


@case("recipe-yaml-and-yml-same-name", 2, "r.yaml and r.yml both define recipe 'r'", "keep one of them")
def _(t):
    d = _recipes(t, r__yaml="method: gptq\n", r__yml="method: awq\n")
    return ["release", "--recipes", d, "--out", t.root / "rel"]


@case("recipe-relative-model-path", 2, "recipes/models/m", "is not a directory")
def _(t):
    t.model()  # root/m exists; the recipe's relative models/m means root/recipes/models/m, not the cwd's
    t.mp.chdir(t.root)
    d = _recipes(t, r__yaml="method: gptq\nmodel: {path: models/m}\n")
    return ["release", "--recipes", d, "--out", t.root / "rel"]


# ---- --force replaces only what inf-quant wrote ----------------------------------------------------------------
@case("force-foreign-dir", 2, "already exists and is not an inf-quant output (no inf_quant.json in it)",
      "even with --force", "remove it yourself")
def _(t):
    t.write("src/setup.py", "precious")
    return _gptq(t, "--out", t.root / "src", "--force")


@case("resume-foreign-dir", 2, "already exists and is not an inf-quant output", "remove it yourself")
def _(t):
    t.write("src/setup.py", "precious")
    return _gptq(t, "--out", t.root / "src", "--resume")


@case("export-force-foreign-dir", 2, "already exists and is not an inf-quant output")
def _(t):
    t.write("s/notes.txt", "precious")
    return ["export", "--as", "stablelm", t.model(), t.root / "s", "--force"]


@case("release-out-foreign-dir", 2, "already exists and is not an inf-quant release directory (no manifest.json",
      "remove it yourself")
def _(t):
    t.write("home/notes.txt", "precious")
    d = _recipes(t, r__yaml=f"method: gptq\nmodel: {{path: {t.model()}}}\ngptq: {{group_size: 32}}\n")
    return ["release", "--recipes", d, "--out", t.root / "home", "--force"]


@case("release-variant-foreign-dir", 2, "is not a variant inf-quant published (no inf_quant.json in it)",
      "would be replaced by recipe r")
def _(t):
    t.write("rel/manifest.json", json.dumps({"format": 1, "variants": {}}))
    t.write("rel/r/thesis.tex", "precious")
    d = _recipes(t, r__yaml=f"method: gptq\nmodel: {{path: {t.model()}}}\ngptq: {{group_size: 32}}\n")
    return ["release", "--recipes", d, "--out", t.root / "rel", "--force"]


# ---- NaN / inf named when read ---------------------------------------------------------------------------------
def _poison(m: Path, name: str, value: float) -> Path:
    def edit(d):
        d[name][3, 5] = value

    _rewrite_shard(_shard(m, name), edit)
    return m


@case("nan-weight", 2, "model-00002-of-00003.safetensors: tensor model.layers.1.mlp.down_proj.weight holds NaN or inf",
      "first at index [3, 5]", "re-download or restore it", "the unfinished run (.q.partial) was removed")
def _(t):
    m = _poison(t.model(), "model.layers.1.mlp.down_proj.weight", float("nan"))
    return _gptq(t, "--out", t.root / "q", model=m)


@case("inf-embedding", 2, "tensor model.embed_tokens.weight holds NaN or inf", "first at index [3, 5]")
def _(t):
    m = _poison(t.model(), "model.embed_tokens.weight", float("inf"))
    return ["awq", "--model", m, *FAST, "--out", t.root / "q"]


@pytest.mark.parametrize("cid", list(CASES))
def test_catalogue(cid, tmp_path, monkeypatch, capsys):
    run_case(CASES[cid], Box(tmp_path, monkeypatch, tmp_path), capsys)


# ---- behaviours behind the rows -------------------------------------------------------------------------------
def test_force_replaces_an_inf_quant_output_and_an_empty_directory(tmp_path):
    m = build_tiny_checkpoint(tmp_path / "m", "inflm")
    (tmp_path / "empty").mkdir()
    assert cli("gptq", "--model", m, "--out", tmp_path / "empty", *FAST)[0] == 2  # exists: still needs --force
    assert cli("gptq", "--model", m, "--out", tmp_path / "empty", "--force", *FAST)[0] == 0
    first = snapshot(tmp_path / "empty")
    assert "inf_quant.json" in first
    assert cli("gptq", "--model", m, "--out", tmp_path / "empty", "--force", *FAST)[0] == 0
    assert snapshot(tmp_path / "empty") == first


def test_the_lock_is_taken_before_the_tokenizer_or_any_tensor_is_read(tmp_path, monkeypatch):
    import inf_quant.pipeline as pipeline

    m, out = build_tiny_checkpoint(tmp_path / "m", "inflm"), tmp_path / "q"
    seen = []
    real = pipeline.load_tokenizer

    def load_tokenizer(*a, **kw):
        seen.append(lock_path(out).is_file())
        return real(*a, **kw)

    monkeypatch.setattr(pipeline, "load_tokenizer", load_tokenizer)
    assert cli("gptq", "--model", m, "--out", out, *FAST)[0] == 0
    assert seen == [True] and not lock_path(out).exists()


@pytest.mark.slow  # two concurrent quantization runs, ~14 s
def test_a_second_run_on_the_same_output_is_refused_while_the_first_succeeds(tmp_path):
    """Two CLI processes, the second started once the first holds the lock (which it now takes in pre-flight, in
    well under a second, not after tokenizing ~10 s in): one line, exit 2, and the first run finishes."""
    m = build_tiny_checkpoint(tmp_path / "m", "inflm")
    out = tmp_path / "q"
    argv = [sys.executable, "-m", "inf_quant", "gptq", "--model", str(m), "--out", str(out), "--force", *FAST]
    env = {**os.environ, "INF_QUANT_LOG_DIR": str(tmp_path / "logs")}
    first = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.monotonic() + 60
    while not lock_path(out).exists() and first.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert lock_path(out).exists(), "the first run never took the lock"
    time.sleep(1)
    second = subprocess.run(argv, capture_output=True, text=True, timeout=120, env=env)
    stdout, stderr = first.communicate(timeout=300)
    assert second.returncode == 2 and second.stdout == "", second.stderr
    assert second.stderr.count("\n") == 1 and "Traceback" not in second.stderr
    assert "is being written by another inf-quant run" in second.stderr and f"pid {first.pid}" in second.stderr
    assert first.returncode == 0, stderr
    assert (out / "inf_quant.json").is_file() and not lock_path(out).exists()


def test_relative_recipe_paths_are_relative_to_the_recipe_file(tmp_path, monkeypatch):
    from inf_quant.core.recipe_file import load_recipe

    d = tmp_path / "project" / "recipes"
    d.mkdir(parents=True)
    (d / "r.yml").write_text("method: gptq\nmodel: {path: ../models/m}\ncalibration: {source: data/c.jsonl}\n"
                             "output: {dir: out/r}\nverify: {eval: /abs/e.jsonl}\n")
    monkeypatch.chdir(tmp_path)
    r = load_recipe(d / "r.yml")
    assert Path(r.model.path) == d / ".." / "models" / "m"
    assert Path(r.calibration.source) == d / "data" / "c.jsonl"
    assert Path(r.output.dir) == d / "out" / "r"
    assert r.verify.eval == "/abs/e.jsonl"
    (d / "b.yaml").write_text("method: awq\nmodel: {path: bundled}\ncalibration: {source: bundled-mix}\n")
    b = load_recipe(d / "b.yaml")
    assert (b.model.path, b.calibration.source, b.output.dir) == ("bundled", "bundled-mix", "")


def test_a_recipes_directory_reads_yml_and_its_relative_paths_work_from_anywhere(tmp_path, monkeypatch):
    """A .yml recipe naming its model and calibration file relative to itself, loaded from another directory:
    the paths it resolves to quantize."""
    from inf_quant.release import load_recipes

    proj = tmp_path / "proj"
    build_tiny_checkpoint(proj / "models" / "m", "inflm")
    (proj / "data").mkdir()
    (proj / "data" / "c.jsonl").write_text(json.dumps({"text": "hello world, a calibration text. " * 300}) + "\n")
    d = proj / "recipes"
    d.mkdir()
    (d / "r.yml").write_text("method: gptq\nmodel: {path: ../models/m}\ncalibration: {source: ../data/c.jsonl}\n")
    monkeypatch.chdir(tmp_path)
    [r] = load_recipes(d)
    assert r.name == "r" and Path(r.model.path).resolve() == (proj / "models" / "m").resolve()
    argv = ["gptq", "--model", r.model.path, "--calib", r.calibration.source, "--out", tmp_path / "q", *FAST]
    assert cli(*argv)[0] == 0


def test_nan_is_named_when_its_layer_is_read_not_when_it_is_solved(tmp_path, monkeypatch, capsys):
    """The poisoned layer 1 is read ahead while layer 0 computes; it fails when asked for, before its solve."""
    import inf_quant.pipeline as pipeline

    m = _poison(build_tiny_checkpoint(tmp_path / "m", "inflm"), "model.layers.1.self_attn.q_proj.weight", float("nan"))
    solved = []
    real = pipeline.quantize_layer
    monkeypatch.setattr(pipeline, "quantize_layer", lambda ctx, block, i, *a: solved.append(i) or real(ctx, block, i, *a))
    code, _, err = cli("gptq", "--model", m, "--out", tmp_path / "q", *FAST, capsys=capsys)
    assert code == 2 and solved == [0], err
    assert "model.layers.1.self_attn.q_proj.weight holds NaN or inf" in err
    assert not (tmp_path / ".q.partial").exists() and not (tmp_path / "q").exists()


def test_an_export_is_marked_as_inf_quant_output_so_force_may_replace_it(tmp_path):
    """export writes inf_quant.json for a bf16 source too: a re-export with --force replaces its own output."""
    m = build_tiny_checkpoint(tmp_path / "m", "inflm")
    assert cli("export", "--as", "stablelm", m, tmp_path / "s")[0] == 0
    assert json.loads((tmp_path / "s" / "inf_quant.json").read_text())["layout"] == "stablelm"
    first = snapshot(tmp_path / "s")
    assert cli("export", "--as", "stablelm", m, tmp_path / "s", "--force")[0] == 0
    assert snapshot(tmp_path / "s") == first
