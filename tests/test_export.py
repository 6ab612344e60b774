"""The stablelm layout: `inf-quant export --as stablelm` and `--serve-as stablelm`, loaded with no remote code.

The bundled model's bf16, GPTQ-4, GPTQ-8 and AWQ checkpoints are exported; clean interpreters load the exports
without trust_remote_code (and the inflm originals with it) and must give the same logits and greedy tokens, and
the fast tokenizer must give the slow tokenizer's ids on every bundled record. Cost measured on the 2-core CI
machine while it was busy (load average ~5.7): 7 min 45 s for the module — the fixture's three quantizations of the
bundled model 3 min (nearly all GPTQ's column solves, which do not shrink with fewer calibration samples), the clean
process loading four models through gptqmodel plus the in-process inflm references 2.6 min, two small verify runs
1 min, the --serve-as test 30 s; the rest is under a second each.
"""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors import safe_open

from helpers import cli, run_clean, tree_hashes
from inf_quant.core.paths import CALIBRATION, DEFAULT_MODEL, EVAL
from inf_quant.data.tokenizer import load_tokenizer
from inf_quant.evaluate.fit import fit_checkpoint
from tiny import build_tiny_checkpoint
from tolerances import LAYOUT_LOGITS_ATOL

pytestmark = pytest.mark.slow  # quantizes the bundled model three ways and loads each layout in fresh interpreters

QUICK = ("--samples", "4", "--seqlen", "32", "-q")  # layout equivalence, not accuracy: minimal calibration
VARIANTS = {"gptq-w4": ("gptq", "--bits", "4"), "gptq-w8": ("gptq", "--bits", "8"), "awq-w4": ("awq",)}
IDS = [[5, 17, 250, 1024, 7, 3000, 42, 99, 512, 8000, 6, 77, 1200, 33]]

LOAD = """
import json, sys, torch, transformers
spec = json.load(open(sys.argv[1]))
out = {}
for name, d in spec["dirs"].items():
    dtype = torch.float32 if name == "bf16" else torch.bfloat16
    m = transformers.AutoModelForCausalLM.from_pretrained(d, device_map="cpu", dtype=dtype,
                                                          trust_remote_code=spec["remote"])
    ids = torch.tensor(spec["ids"])
    with torch.no_grad():
        logits = m(ids).logits[0].float()
    gen = m.generate(ids, max_new_tokens=8, do_sample=False)
    r = {"cls": type(m).__name__, "kernel": type(m.model.layers[0].mlp.down_proj).__name__,
         "logits": logits.tolist(), "gen": gen[0].tolist()}
    if spec.get("records"):
        tok = transformers.AutoTokenizer.from_pretrained(d, trust_remote_code=spec["remote"])
        texts, want = json.load(open(spec["records"]))
        got = [tok(t)["input_ids"] for t in texts]
        r["tok"] = type(tok).__name__
        r["bad_ids"] = [i for i, (a, b) in enumerate(zip(got, want)) if a != b]
        r["bad_text"] = [i for i, (a, t) in enumerate(zip(got, texts)) if tok.decode(a) != t]
    out[name] = r
out["remote_modules"] = sorted(k for k in sys.modules if k.startswith("transformers_modules"))
out["inf_quant_imported"] = "inf_quant" in sys.modules
print(json.dumps(out))
"""


def _records() -> list[str]:
    return [json.loads(line)["text"] for f in (CALIBRATION, EVAL) for line in f.read_text(encoding="utf-8").splitlines()]


@pytest.fixture(scope="module")
def layouts(tmp_path_factory):
    """name -> (inflm dir, stablelm export) for the bundled bf16 model and its three quantized variants."""
    root = tmp_path_factory.mktemp("export")
    before = tree_hashes(DEFAULT_MODEL)
    out = {"bf16": (DEFAULT_MODEL, root / "bf16-stablelm")}
    assert cli("export", "--as", "stablelm", DEFAULT_MODEL, root / "bf16-stablelm")[0] == 0
    for name, args in VARIANTS.items():
        assert cli(*args, "--out", root / name, *QUICK)[0] == 0
        assert cli("export", "--as", "stablelm", root / name, root / f"{name}-stablelm")[0] == 0
        out[name] = (root / name, root / f"{name}-stablelm")
    assert tree_hashes(DEFAULT_MODEL) == before  # hard links never write through to the source
    return out


def _tensors(d) -> dict[str, torch.Tensor]:
    t = {}
    for f in sorted(d.glob("*.safetensors")):
        with safe_open(str(f), "pt") as h:
            t.update({k: h.get_tensor(k) for k in h.keys()})
    return t


def test_export_is_the_same_tensors_with_a_stablelm_config(layouts):
    for name, (src, exp) in layouts.items():
        cfg = json.loads((exp / "config.json").read_text())
        assert cfg["model_type"] == "stablelm" and cfg["architectures"] == ["StableLmForCausalLM"], name
        assert (cfg["partial_rotary_factor"], cfg["use_qkv_bias"], cfg["qk_layernorm"],
                cfg["use_parallel_residual"]) == (1.0, False, False, False)
        assert "auto_map" not in cfg and not list(exp.glob("*.py")), name
        src_cfg = json.loads((src / "config.json").read_text())
        assert cfg.get("quantization_config") == src_cfg.get("quantization_config")
        for f in [*exp.glob("*.safetensors"), exp / "tokenizer.model"]:
            assert os.path.samefile(f, src / f.name), f  # unchanged bytes, hard-linked
        tcfg = json.loads((exp / "tokenizer_config.json").read_text())
        assert tcfg["tokenizer_class"] == "PreTrainedTokenizerFast" and "auto_map" not in tcfg
        if name != "bf16":
            assert json.loads((exp / "inf_quant.json").read_text())["layout"] == "stablelm"
            assert json.loads((src / "inf_quant.json").read_text())["layout"] == "inflm"
            # every output carries the fast tokenizer, also in the default inflm layout
            assert (src / "tokenizer.json").read_bytes() == (exp / "tokenizer.json").read_bytes()


def _inflm_reference(model_dir, name: str) -> dict:
    """The inflm layout as `import inf_quant` loads it (the same modeling code the checkpoints ship)."""
    from transformers import AutoModelForCausalLM

    import inf_quant  # noqa: F401  (registers inflm)

    dtype = torch.float32 if name == "bf16" else torch.bfloat16
    m = AutoModelForCausalLM.from_pretrained(str(model_dir), device_map="cpu", dtype=dtype).eval()
    ids = torch.tensor(IDS)
    with torch.no_grad():
        logits = m(ids).logits[0].float()
    gen = m.generate(ids, max_new_tokens=8, do_sample=False)
    return {"cls": type(m).__name__, "kernel": type(m.model.layers[0].mlp.down_proj).__name__, "logits": logits,
            "gen": gen[0].tolist()}


def test_exports_load_and_generate_without_remote_code_like_the_inflm_layout(layouts, tmp_path):
    slow = load_tokenizer(DEFAULT_MODEL)
    texts = _records()
    (tmp_path / "records.json").write_text(json.dumps([texts, [slow(t)["input_ids"] for t in texts]]))
    spec = {"ids": IDS, "remote": False, "records": str(tmp_path / "records.json"),
            "dirs": {n: str(exp) for n, (_, exp) in layouts.items()}}
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    (tmp_path / "load.py").write_text(LOAD)
    got = run_clean(f"import sys; sys.argv = ['x', {str(tmp_path / 'spec.json')!r}]; "
                    f"exec(open({str(tmp_path / 'load.py')!r}).read())")
    assert got.pop("remote_modules") == [] and not got.pop("inf_quant_imported")
    for name, (src, _) in layouts.items():
        g, r = got[name], _inflm_reference(src, name)
        assert (g["cls"], r["cls"]) == ("StableLmForCausalLM", "INFLMForCausalLM"), name
        assert g["kernel"] == r["kernel"] and (name == "bf16") == (g["kernel"] == "Linear"), (name, g["kernel"])
        diff = (torch.tensor(g["logits"]) - r["logits"]).abs().max().item()
        assert diff <= LAYOUT_LOGITS_ATOL, f"{name}: stablelm vs inflm logits max |diff| {diff}"
        assert g["gen"] == r["gen"] and len(g["gen"]) == len(IDS[0]) + 8, name
        assert g["tok"] in ("PreTrainedTokenizerFast", "TokenizersBackend"), g["tok"]
        assert g["bad_ids"] == [] and g["bad_text"] == [], (name, g["bad_ids"][:5], g["bad_text"][:5])


def test_verify_accepts_the_export_and_a_stablelm_baseline_gives_the_same_numbers(layouts, tmp_path, capsys):
    """`verify` on the GPTQ-8 export against the bundled inflm baseline, then against its bf16 stablelm export
    (layer-streamed through StableLM's decoder layers): both pass with the same numbers."""
    _, exp = layouts["gptq-w8"]
    common = ("--max-windows", "4", "--seqlen", "128", "--cache-dir", tmp_path / "cache", "--json")
    runs = {}
    for name, base in (("inflm-baseline", DEFAULT_MODEL), ("stablelm-baseline", layouts["bf16"][1])):
        code, out, err = cli("verify", exp, "--baseline", base, "--report", tmp_path / name, *common, capsys=capsys)
        assert code == 0, err[-2000:]
        runs[name] = json.loads(out)
    assert runs["inflm-baseline"]["quantized"]["layout"] == "stablelm"
    a, b = runs["inflm-baseline"]["metrics"]["all"], runs["stablelm-baseline"]["metrics"]["all"]
    for k in ("ppl_baseline", "ppl_quantized", "kl_mean", "top1_agreement"):
        assert b[k] == pytest.approx(a[k], rel=1e-5, abs=1e-9), k


def test_fit_reads_both_layouts_alike(layouts):
    for name, (src, exp) in layouts.items():
        a, b = fit_checkpoint(src, 24, 512).to_dict(), fit_checkpoint(exp, 24, 512).to_dict()
        assert {k: v for k, v in a.items() if k != "model"} == {k: v for k, v in b.items() if k != "model"}, name


def test_serve_as_stablelm_writes_the_export_directly_and_a_stablelm_input_requantizes_alike(tmp_path, capsys):
    model = build_tiny_checkpoint(tmp_path / "bf16", "inflm")
    fast = ("--group-size", "32", "--samples", "8", "--seqlen", "64", "-q")
    assert cli("gptq", "--model", model, "--out", tmp_path / "inflm", *fast, capsys=capsys)[0] == 0
    assert cli("export", "--as", "stablelm", tmp_path / "inflm", tmp_path / "exported", capsys=capsys)[0] == 0
    assert cli("gptq", "--model", model, "--out", tmp_path / "direct", "--serve-as", "stablelm", *fast,
               capsys=capsys)[0] == 0
    exported, direct = tree_hashes(tmp_path / "exported"), tree_hashes(tmp_path / "direct")
    assert set(exported) == set(direct)
    # the shard's metadata and inf_quant.json hold the recipe, whose output.serve_as differs; nothing else does
    assert {n for n in exported if exported[n] != direct[n]} <= {"model.safetensors", "inf_quant.json"}
    want = _tensors(tmp_path / "inflm")
    assert all(torch.equal(want[k], v) for k, v in _tensors(tmp_path / "direct").items())
    # a stablelm bf16 input quantizes to the same codes as its inflm original (same ids, same hidden states)
    assert cli("export", "--as", "stablelm", model, tmp_path / "bf16-stablelm", capsys=capsys)[0] == 0
    assert cli("gptq", "--model", tmp_path / "bf16-stablelm", "--out", tmp_path / "re", "--serve-as", "stablelm",
               *fast, capsys=capsys)[0] == 0
    again = _tensors(tmp_path / "re")
    assert set(again) == set(want) and all(torch.equal(want[k], v) for k, v in again.items())


def _one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.startswith("inf-quant")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def test_layout_errors_exit_2_with_one_line(tmp_path, capsys):
    llama = build_tiny_checkpoint(tmp_path / "llama", "llama")
    inflm = build_tiny_checkpoint(tmp_path / "inflm", "inflm")
    fast = ("--group-size", "32", "--samples", "4", "-q")
    code, _, err = cli("gptq", "--model", llama, "--out", tmp_path / "o", "--serve-as", "stablelm", *fast,
                       capsys=capsys)
    assert code == 2 and "serve_as=stablelm applies to INF-architecture" in _one_error_line(err)
    code, _, err = cli("export", "--as", "stablelm", llama, tmp_path / "e", capsys=capsys)
    assert code == 2 and "takes an inflm checkpoint" in _one_error_line(err)
    assert cli("export", "--as", "stablelm", inflm, tmp_path / "s", capsys=capsys)[0] == 0
    code, _, err = cli("export", "--as", "stablelm", inflm, tmp_path / "s", capsys=capsys)
    assert code == 2 and "already exists" in _one_error_line(err) and "--force" in err
    code, _, err = cli("gptq", "--model", tmp_path / "s", "--out", tmp_path / "o", *fast, capsys=capsys)
    assert code == 2 and "already in the stablelm layout" in _one_error_line(err) and "--serve-as stablelm" in err
    cfg = json.loads((tmp_path / "s" / "config.json").read_text())
    cfg["partial_rotary_factor"] = 0.25  # StableLM's own default: not INF's function
    cfg["rope_parameters"]["partial_rotary_factor"] = 0.25
    (tmp_path / "s" / "config.json").write_text(json.dumps(cfg))
    code, _, err = cli("gptq", "--model", tmp_path / "s", "--out", tmp_path / "o", "--serve-as", "stablelm", *fast,
                       capsys=capsys)
    assert code == 2 and "supported only in INF's settings" in _one_error_line(err)
    assert not (tmp_path / "o").exists() and not (tmp_path / "e").exists()


@pytest.mark.parametrize("change, message", [
    ({"attention_bias": True}, "cannot be expressed as StableLM: attention_bias=true"),
    ({"hidden_act": "gelu"}, "cannot be expressed as StableLM: hidden_act='gelu'"),
    ({"rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 500000.0}}, "rope scaling"),
])
def test_settings_stablelm_cannot_express_are_refused_before_any_work(tmp_path, capsys, change, message):
    model = build_tiny_checkpoint(tmp_path / "m", "inflm")
    cfg = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**cfg, **change}))
    code, _, err = cli("export", "--as", "stablelm", model, tmp_path / "e", capsys=capsys)
    assert code == 2 and message in _one_error_line(err) and not (tmp_path / "e").exists()
    code, _, err = cli("gptq", "--model", model, "--out", tmp_path / "o", "--serve-as", "stablelm", "--group-size", "32",
                       "-q", capsys=capsys)
    assert code == 2 and message in _one_error_line(err) and not (tmp_path / ".o.partial").exists()


def test_a_head_dim_stablelm_cannot_derive_is_refused():
    """StableLM derives head_dim as hidden_size / num_attention_heads: an explicit one equal to that is carried
    over, any other is refused by name (layermap.head_dim is the one derivation)."""
    from inf_quant.core.errors import ConfigError
    from inf_quant.read.layout import stablelm_config

    cfg = {"model_type": "inflm", "hidden_size": 64, "num_attention_heads": 8, "rope_theta": 10000.0}
    assert stablelm_config({**cfg, "head_dim": 8}, "m")["model_type"] == "stablelm"
    with pytest.raises(ConfigError, match="cannot be expressed as StableLM: head_dim=16 != hidden_size/num_attention"):
        stablelm_config({**cfg, "head_dim": 16}, "m")
