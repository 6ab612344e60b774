"""The bundled default model: saved like INF-34B, a real language model, and its quantized release's accuracy."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors import safe_open

from helpers import cli, run_clean
from inf_quant.core.paths import DEFAULT_MODEL, REPO_ROOT
from tolerances import BUNDLED_PPL_RTOL

pytestmark = pytest.mark.slow  # the bundled model's layer-streamed perplexity and its quantized release's accuracy

TRAINING = json.loads((DEFAULT_MODEL / "TRAINING.json").read_text())


def test_saved_like_inf34b():
    names = {p.name for p in DEFAULT_MODEL.iterdir()}
    assert {"config.json", "generation_config.json", "tokenizer.model", "tokenizer_config.json",
            "model.safetensors.index.json", "configuration_inflm.py", "modeling_inflm.py"} <= names
    index = json.loads((DEFAULT_MODEL / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) >= 2 and all((DEFAULT_MODEL / s).is_file() for s in shards)
    cfg = json.loads((DEFAULT_MODEL / "config.json").read_text())
    assert cfg["model_type"] == "inflm" and cfg["architectures"] == ["INFLMForCausalLM"] and "auto_map" in cfg
    assert cfg["num_attention_heads"] // cfg["num_key_value_heads"] == 4 and not cfg["tie_word_embeddings"]
    for s in shards:
        with safe_open(str(DEFAULT_MODEL / s), "pt") as f:
            assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}
    assert "model.layers.0.input_layernorm.bias" in index["weight_map"]
    assert sum((DEFAULT_MODEL / s).stat().st_size for s in shards) <= 30 * 2**20


def test_a_real_language_model_far_below_unigram():
    """Recompute the eval perplexity (bf16 weights, fp32 arithmetic, layer-streamed) and compare."""
    from inf_quant.core.paths import EVAL
    from inf_quant.data.calibrate import eval_windows, read_records
    from inf_quant.data.tokenizer import load_tokenizer
    from inf_quant.evaluate.baseline import streamed_logprobs
    from inf_quant.evaluate.metrics import perplexity
    from inf_quant.read.load import open_checkpoint

    seqlen = int(TRAINING["args"]["seqlen"])
    # the training script scores consecutive windows of seqlen+1 tokens; here windows of seqlen+1 as well
    windows = eval_windows(load_tokenizer(DEFAULT_MODEL), [r["text"] for r in read_records(EVAL)], seqlen + 1)
    target, _, _ = streamed_logprobs(open_checkpoint(DEFAULT_MODEL), windows, 1, torch.device("cpu"), torch.float32)
    ppl = perplexity(target)
    assert abs(ppl / TRAINING["eval_perplexity_bf16"] - 1) < BUNDLED_PPL_RTOL, (ppl, TRAINING)
    assert ppl < TRAINING["eval_unigram_perplexity"] / 4


def test_auto_classes_load_it_after_import_inf_quant():
    from transformers import AutoModelForCausalLM

    import inf_quant  # noqa: F401

    m = AutoModelForCausalLM.from_pretrained(DEFAULT_MODEL)
    assert type(m).__name__ == "INFLMForCausalLM" and m.dtype == torch.bfloat16


def test_loads_in_plain_transformers_and_generates():
    got = run_clean(
        "import json, sys, transformers\n"
        f"p = {str(DEFAULT_MODEL)!r}\n"
        "tok = transformers.AutoTokenizer.from_pretrained(p, trust_remote_code=True)\n"
        "m = transformers.AutoModelForCausalLM.from_pretrained(p, trust_remote_code=True)\n"
        "assert 'inf_quant' not in sys.modules\n"
        "ids = tok('def main():', return_tensors='pt').input_ids\n"
        "out = m.generate(ids, max_new_tokens=8, do_sample=False)\n"
        "print(json.dumps({'new': out.shape[1] - ids.shape[1], 'text': tok.decode(out[0])}))\n")
    assert got["new"] == 8 and got["text"].startswith("def main():")


@pytest.fixture(scope="module")
def ci_release(tmp_path_factory):
    """The bundled model's release (recipes/ci): GPTQ w4, GPTQ w8, AWQ w4, each verified against bf16."""
    out = tmp_path_factory.mktemp("bundled") / "release"
    code, _, _ = cli("release", "--recipes", REPO_ROOT / "recipes" / "ci", "--out", out, "-q")
    return code, out, json.loads((out / "manifest.json").read_text())


@pytest.mark.parametrize("name, max_rise", [("inf-tiny-gptq-w4g128", 3.0), ("inf-tiny-awq-w4g128", 3.0),
                                            ("inf-tiny-gptq-w8g128", 0.5)])
def test_quantized_perplexity_stays_within_budget(ci_release, name, max_rise):
    code, out, manifest = ci_release
    assert code == 0, manifest["rejected"]
    m = manifest["variants"][name]["metrics"]
    assert m["all"]["ppl_increase_pct"] <= max_rise, m["all"]
    assert set(m) == {"all", "en", "zh", "code", "math"}


def test_verify_fails_a_damaged_checkpoint_naming_the_gate(ci_release, tmp_path, capsys):
    """Every scale perturbed by ~30 % noise (as a packing or scale-export bug would): verify exits 1 naming a gate."""
    _, out, _ = ci_release
    bad = tmp_path / "damaged"
    shutil.copytree(out / "inf-tiny-gptq-w4g128", bad)
    from safetensors.torch import load_file

    from inf_quant.save.write import save_file

    for shard in bad.glob("*.safetensors"):
        t = {k: v.clone() for k, v in load_file(shard).items()}  # not views of the file we overwrite
        for k in [k for k in t if k.endswith(".scales")]:
            g = torch.Generator().manual_seed(0)
            t[k] = (t[k].float() * (1 + 0.3 * torch.randn(t[k].shape, generator=g))).half()
        save_file(t, shard, metadata={"format": "pt"})
    code, stdout, err = cli("verify", bad, "--cache-dir", str(tmp_path / "cache"), capsys=capsys)
    assert code == 1, stdout + err
    assert "gate failed:" in stdout and ("max_ppl_increase_pct" in stdout or "max_kl" in stdout)


def test_shipped_code_files_match_the_package():
    """The bundled checkpoint carries inf-quant's modeling/tokenizer files verbatim (they must not drift)."""
    from inf_quant.core.paths import MODELING_DIR
    from inf_quant.save.write import MODELING_FILES

    for name in MODELING_FILES:
        assert (DEFAULT_MODEL / name).read_bytes() == (MODELING_DIR / name).read_bytes(), name


@pytest.mark.parametrize("name", ["inf-tiny-gptq-w4g128", "inf-tiny-gptq-w8g128", "inf-tiny-awq-w4g128"])
def test_quantized_release_loads_in_plain_transformers_and_generates(ci_release, name):
    _, out, _ = ci_release
    got = run_clean(
        "import json, sys, torch, transformers\n"
        f"p = {str(out / name)!r}\n"
        "tok = transformers.AutoTokenizer.from_pretrained(p, trust_remote_code=True)\n"
        "m = transformers.AutoModelForCausalLM.from_pretrained(p, trust_remote_code=True, device_map='cpu',"
        " dtype=torch.bfloat16)\n"
        "assert 'inf_quant' not in sys.modules\n"
        "ids = tok('对酒当歌，', return_tensors='pt').input_ids\n"
        "out = m.generate(ids, max_new_tokens=8, do_sample=False)\n"
        "print(json.dumps({'kernel': type(m.model.layers[0].mlp.down_proj).__name__, 'new': out.shape[1] - ids.shape[1],"
        " 'text': tok.decode(out[0], skip_special_tokens=True)}))\n")
    assert got["new"] == 8 and got["text"].startswith("对酒当歌，")
    assert got["kernel"] != "Linear" and got["kernel"].endswith("Linear"), got["kernel"]  # a gptqmodel kernel
