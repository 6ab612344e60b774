"""Issue 21, recipes and the CLI meet: the catalogue rows of docs/ERRORS.md's block "Recipes on the command line"
(exit code, one `inf-quant: …` line naming the key and the fix, nothing changed), plus what they stand for:
`gptq|awq --recipe FILE` with only the typed flags overriding it, every recipe key in README's one table with a
flag that really sets it, AWQ's GPTQ solve reading `gptq:`, --log-level, --cache-dir and one cache-root rule.

Cost: ~2 s of argument and recipe checks; the two marked slow quantize (the bundled model with a CI recipe, ~20 s;
the tiny model twice with awq, ~10 s).
"""

from __future__ import annotations

import json
import logging
import re
import subprocess
from dataclasses import fields, is_dataclass

import pytest

from helpers import cli
from inf_quant import cli as cli_mod
from inf_quant.cli_args import SECTIONS, build_parser, overrides_from, recipe_from_args
from inf_quant.core.config import AWQConfig, GPTQConfig, Method, Order, Recipe, to_dict
from inf_quant.core.hashing import default_cache_root
from inf_quant.core.paths import REPO_ROOT
from inf_quant.core.recipe_file import load_recipe
from test_trust import FAST, Box, registrar, run_case
from tiny import build_tiny_checkpoint

CASES: dict = {}
case = registrar(CASES)
CI = REPO_ROOT / "recipes" / "ci"


def _recipe(t: Box, text: str, name: str = "r.yaml"):
    return t.write(f"recipes/{name}", text)


# ---- refused before any work ----------------------------------------------------------------------------------
@case("recipe-method-mismatch", 2, "inf-tiny-awq-w4g128.yaml: its method is awq, not gptq",
      "run `inf-quant awq --recipe")
def _(t):
    return ["gptq", "--recipe", CI / "inf-tiny-awq-w4g128.yaml", "--out", t.root / "q"]


@case("recipe-file-missing", 2, "nope.yaml: cannot read the recipe", "No such file")
def _(t):
    return ["awq", "--recipe", t.root / "nope.yaml"]


@case("recipe-awq-sets-gptq-grid", 2, "r.yaml: gptq.bits: method awq takes bits and group_size from awq:",
      "remove it from gptq:")
def _(t):
    return ["awq", "--recipe", _recipe(t, "method: awq\ngptq: {bits: 8}\n"), "--out", t.root / "q"]


@case("recipe-awq-sets-gptq-clip-weight", 2, "r.yaml: gptq.clip_weight: method awq's GPTQ solve does not read it",
      "remove it from gptq:")
def _(t):
    return ["awq", "--recipe", _recipe(t, "method: awq\ngptq: {clip_weight: false}\n"), "--out", t.root / "q"]


@case("gptq-clip-norm-with-clip-weight", 2, "gptq.clip_norm (--clip-norm) is the unweighted range search's exponent",
      "add --no-clip-weight")
def _(t):
    return ["gptq", "--model", t.model(), "--clip-norm", "2", *FAST, "--out", t.root / "q"]


@case("recipe-gptq-sets-awq", 2, "r.yaml: awq.grid_points: method gptq reads from the awq: section only the scale search",
      "remove it")
def _(t):
    return ["gptq", "--recipe", _recipe(t, "method: gptq\ngptq: {smooth: none}\nawq: {grid_points: 10}\n"), "--out",
            t.root / "q"]


@case("recipe-gptq-sets-awq-clip", 2,
      "r.yaml: awq.clip_grid: method gptq reads from the awq: section only the scale search",
      "remove it")
def _(t):
    return ["gptq", "--recipe", _recipe(t, "method: gptq\nawq: {clip_grid: 10}\n"), "--out", t.root / "q"]


@case("gptq-smooth-loss-without-smoothing", 2, "gptq.smooth_loss: read only when GPTQ smooths", "remove it")
def _(t):
    return ["gptq", "--model", t.model(), "--bits", "8", "--smooth-loss", "module", *FAST, "--out", t.root / "q"]


@case("awq-rtn-with-gptq-settings", 2, "gptq.damp: the gptq: section is read by awq only with solve: gptq",
      "drop solve: rtn")
def _(t):
    return ["awq", "--model", t.model(), "--solve", "rtn", "--damp", "0.02", *FAST, "--out", t.root / "q"]


@case("awq-clip-with-gptq-solve", 2, "awq.clip_grid: the clip search runs only with solve: rtn",
      "or set solve: rtn")
def _(t):
    return ["awq", "--model", t.model(), "--clip-grid", "10", *FAST, "--out", t.root / "q"]


@case("awq-order-act", 2, "gptq.order: act (--order act) unsorts g_idx, which the AWQ gemm format cannot store",
      "static_groups: true (--static-groups)")
def _(t):  # was: exit 3 ("the AWQ gemm format has no g_idx") in the first layer
    return ["awq", "--model", t.model(), "--order", "act", *FAST, "--out", t.root / "q"]


@case("log-level-env-bad", 2, "INF_QUANT_LOG='LOUD' is not a log level", "or pass --log-level")
def _(t):  # was: a ValueError traceback from logging
    t.mp.setenv("INF_QUANT_LOG", "loud")
    return ["fit", t.root / "m"]


@pytest.mark.parametrize("cid", list(CASES))
def test_catalogue(cid, tmp_path, monkeypatch, capsys):
    run_case(CASES[cid], Box(tmp_path, monkeypatch, tmp_path), capsys)


# ---- --recipe and the flags that override it ------------------------------------------------------------------
def _args(*argv):
    return build_parser().parse_args([str(a) for a in argv])


def _leaves(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        out.update(_leaves(v, f"{prefix}{k}.") if isinstance(v, dict) else {prefix + k: v})
    return out


def test_a_recipe_with_no_flags_runs_as_written_and_typed_flags_override_only_their_keys(tmp_path):
    path = CI / "inf-tiny-gptq-w4g128.yaml"
    assert recipe_from_args(_args("gptq", "--recipe", path)) == load_recipe(path)
    got = recipe_from_args(_args("gptq", "--recipe", path, "--group-size", "64", "--no-sym", "--calib", "c.jsonl",
                                 "--device", "cuda:1", "--skip", "mlp.down_proj", "--cache-dir", tmp_path))
    before, after = _leaves(to_dict(load_recipe(path))), _leaves(to_dict(got))
    changed = {k: after[k] for k in after if after[k] != before[k]}
    assert changed == {"gptq.group_size": 64, "gptq.sym": False, "calibration.source": "c.jsonl", "run.device": "cuda",
                       "run.gpu": 1, "skip": ["mlp.down_proj"], "verify.cache_dir": str(tmp_path)}
    assert got.name == "inf-tiny-gptq-w4g128" and got.calibration.samples == 64  # the recipe's, not the default


def test_without_a_recipe_the_flags_describe_the_old_recipe():
    r = recipe_from_args(_args("awq", "--bits", "4", "--samples", "8", "--solve", "rtn", "--force"))
    assert r == Recipe(method=Method.AWQ).with_overrides(
        {"awq": {"bits": 4, "solve": "rtn"}, "calibration": {"samples": 8}, "output": {"force": True}})
    assert recipe_from_args(_args("gptq")) == Recipe()  # no flag: the dataclass defaults, nothing from argparse


def test_every_flag_of_gptq_and_awq_names_a_real_recipe_key():
    recipe = Recipe()
    for command in ("gptq", "awq"):
        args = _args(command)
        for dest in vars(args):
            section, _, key = dest.partition(".")
            if section in SECTIONS:
                value = getattr(recipe, section)
                assert not key or (is_dataclass(value) and key in {f.name for f in fields(value)}), dest
    assert overrides_from(_args("gptq", "--json", "-q", "--log-level", "debug")) == {}


def _key_table() -> dict[str, str]:
    """README's recipe key table: key -> its flag column."""
    text = (REPO_ROOT / "README.md").read_text()
    block = text[text.index("| key | flag | default | notes |"):]
    rows = re.findall(r"^\| `([a-z0-9_.]+)` \| ([^|]*) \|", block.split("\n\n")[0], flags=re.M)
    return dict(rows)


def _recipe_keys(cls=Recipe, prefix: str = "") -> list[str]:
    keys = []
    for f in fields(cls):
        t = f.default_factory if f.default_factory is not None and is_dataclass(f.default_factory) else None
        keys += _recipe_keys(t, f"{prefix}{f.name}.") if t else [prefix + f.name]
    return keys


def test_readme_has_one_row_per_recipe_key_and_each_gptq_awq_flag_is_in_its_keys_row():
    table = _key_table()
    assert sorted(table) == sorted(_recipe_keys())
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command").choices
    for command in ("gptq", "awq"):
        for action in sub[command]._actions:
            if action.dest.partition(".")[0] in SECTIONS:
                assert any(f"`{flag}" in table[action.dest] for flag in action.option_strings), (command, action.dest)
    every_flag = {f for p in sub.values() for a in p._actions for f in a.option_strings}
    for key, cell in table.items():
        for flag in re.findall(r"(--[a-z][a-z0-9-]*)", cell):
            assert flag in every_flag, (key, flag)


def test_awq_solve_takes_the_gptq_section_with_the_awq_grid():
    # the settings AWQ's solve had before gptq.clip_weight became GPTQ's default (its output bytes are unchanged)
    assert AWQConfig().gptq(GPTQConfig()) == GPTQConfig(bits=4, group_size=128, sym=False, clip_weight=False)
    solve = AWQConfig(group_size=64).gptq(GPTQConfig(damp=0.05, order=Order.NATURAL, clip_steps=0, block_size=32))
    assert (solve.bits, solve.group_size, solve.sym) == (4, 64, False)
    assert (solve.damp, solve.order, solve.clip_steps, solve.block_size) == (0.05, Order.NATURAL, 0, 32)


# ---- --log-level, --cache-dir, the cache root -----------------------------------------------------------------
def test_log_level_flag_beats_the_environment_which_beats_info(monkeypatch):
    seen = []
    monkeypatch.setattr(cli_mod, "_run", lambda args, argv: seen.append(logging.getLogger("inf_quant").level) or 0)
    monkeypatch.delenv("INF_QUANT_LOG", raising=False)
    assert cli("fit", "m")[0] == 0
    monkeypatch.setenv("INF_QUANT_LOG", "debug")
    assert cli("fit", "m")[0] == 0 and cli("fit", "m", "--log-level", "error")[0] == 0
    assert seen == [logging.INFO, logging.DEBUG, logging.ERROR]


def test_cache_dir_is_a_flag_of_every_command_that_caches():
    assert recipe_from_args(_args("awq", "--cache-dir", "/c")).verify.cache_dir == "/c"
    assert _args("release", "--cache-dir", "/c").cache_dir == "/c"
    assert _args("verify", "q", "--cache-dir", "/c").cache_dir == "/c"
    from inf_quant.release import _with_overrides

    r = _with_overrides(load_recipe(CI / "inf-tiny-gptq-w4g128.yaml"), None, None, "/c")
    assert r.verify.cache_dir == "/c" and r.model.path == "bundled"


def test_one_cache_root_rule_for_the_package_bench_and_the_vllm_venv(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert default_cache_root() == tmp_path / "inf-quant"
    monkeypatch.setenv("XDG_CACHE_HOME", "")  # empty means unset, not the working directory
    assert default_cache_root() == default_cache_root().home() / ".cache" / "inf-quant"
    hits = subprocess.run(["git", "grep", "-l", "INF_QUANT_CACHE", "--", "inf_quant", "bench", "integrations",
                           "tests/*.py", ":!tests/test_trust_recipes.py"], cwd=REPO_ROOT, capture_output=True, text=True)
    assert hits.stdout == "", hits.stdout
    assert "default_cache_root" in (REPO_ROOT / "bench" / "smollm2.py").read_text()


# ---- end to end ------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_gptq_runs_one_recipe_and_records_the_overridden_bits(tmp_path):
    """`gptq --recipe recipes/ci/inf-tiny-gptq-w4g128.yaml --bits 8` (~20 s): 8-bit, the recipe's calibration."""
    out, cache = tmp_path / "q", tmp_path / "cache"
    code, _, _ = cli("gptq", "--recipe", CI / "inf-tiny-gptq-w4g128.yaml", "--bits", "8", "--out", out,
                     "--cache-dir", cache, "-q")
    assert code == 0
    recorded = json.loads((out / "inf_quant.json").read_text())["recipe"]
    assert recorded["name"] == "inf-tiny-gptq-w4g128" and recorded["gptq"]["bits"] == 8
    assert recorded["calibration"]["samples"] == 64 and recorded["calibration"]["seqlen"] == 512
    assert json.loads((out / "config.json").read_text())["quantization_config"]["bits"] == 8
    assert (cache / "file-hashes.json").is_file()  # --cache-dir reached the model-hash memo


@pytest.mark.slow
def test_awq_gptq_solve_obeys_the_gptq_flags(tmp_path):
    m = build_tiny_checkpoint(tmp_path / "m", "inflm")
    for name, extra in (("a", ()), ("b", ("--clip-steps", "0", "--damp", "0.05"))):
        assert cli("awq", "--model", m, "--out", tmp_path / name, *FAST, *extra)[0] == 0
    a, b = (json.loads((tmp_path / n / "inf_quant.json").read_text())["recipe"] for n in "ab")
    assert (b["gptq"]["clip_steps"], b["gptq"]["damp"]) == (0, 0.05) and a["gptq"] == to_dict(GPTQConfig())
    assert (tmp_path / "a" / "model.safetensors").read_bytes() != (tmp_path / "b" / "model.safetensors").read_bytes()
