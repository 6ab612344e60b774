"""report.py: report.md and the two PNGs from a `verify` report: content, validity, and byte determinism.
The reports are written as verify.json dicts (VerifyReport.to_json) and read back with VerifyReport.from_json."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from inf_quant.core.errors import InfQuantError
from inf_quant.evaluate.report import PPL_PNG, VRAM_PNG, diff_pct, ordered_domains, signed_pct, write_report
from inf_quant.evaluate.verify_report import VerifyReport

GIB = 2**30
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
REPO = Path(__file__).resolve().parents[1]


def _metrics(tokens: int, base: float, quant: float, kl: float, top1: float) -> dict:
    return {"ppl_baseline": base, "ppl_quantized": quant, "ppl_increase_pct": 100 * (quant / base - 1),
            "kl_mean": kl, "top1_agreement": top1, "tokens": tokens}


def _gates(metrics: dict) -> list[dict]:
    """The three gates over every domain, in the order verify checks them (defaults of config.Gates)."""
    out = []
    for domain, m in metrics.items():
        for name, value, threshold, ok in (
                ("max_ppl_increase_pct", m["ppl_increase_pct"], 3.0, m["ppl_increase_pct"] <= 3.0),
                ("max_kl", m["kl_mean"], 0.05, m["kl_mean"] <= 0.05),
                ("min_top1_agreement", m["top1_agreement"], 0.90, m["top1_agreement"] >= 0.90)):
            out.append({"name": name, "domain": domain, "threshold": threshold, "value": value, "passed": ok})
    return out


def passing_report() -> dict:
    """A realistic INF-34B GPTQ w4g128 verify result on a 24 GiB card, with a CUDA measurement."""
    metrics = {"all": _metrics(61_440, 6.412, 6.571, 0.0213, 0.9412),
               "en": _metrics(16_384, 7.105, 7.262, 0.0198, 0.9437),
               "zh": _metrics(16_384, 9.871, 10.104, 0.0251, 0.9318),
               "code": _metrics(16_384, 2.318, 2.361, 0.0164, 0.9581),
               "math": _metrics(12_288, 3.902, 3.997, 0.0237, 0.9299)}
    return {
        "passed": True,
        "quantized": {"path": "/data/out/INF-34B-Chat-gptq-w4g128", "quant_method": "gptq", "bits": 4,
                      "group_size": 128, "layout": "inflm",
                      "files_sha256": {"model-00002-of-00004.safetensors": "b" * 64,
                                       "model-00001-of-00004.safetensors": "a1" * 32,
                                       "config.json": "0123456789abcdef" * 4}},
        "baseline": {"path": "/models/INF-34B-Chat", "sha256": "fe" * 32},
        "eval": {"source": "bundled-eval", "sha256": "c0ffee" * 10 + "abcd", "seqlen": 2048,
                 "tokens": {"en": 16_384, "zh": 16_384, "code": 16_384, "math": 12_288}},
        "metrics": metrics,
        "gates": _gates(metrics),
        "vram": {"analytic": {
            "budget_bytes": 24 * GIB, "context": 32_768, "batch": 1, "kv_dtype": "fp16",
            "weights_bytes": 18_253_611_008, "kv_bytes_per_token": 122_880, "kv_bytes": 4_026_531_840,
            "activation_bytes": 1_073_741_824, "logits_bytes": 262_144_000, "overhead_bytes": 1_288_490_189,
            "total_bytes": 24_904_518_861, "fits": True, "max_context": 32_768,
            "verdict": "fits 24.0 GiB at context 32768 (uses 23.2 GiB); largest context that fits: 32768 "
                       "(the model's max_position_embeddings)"},
            "measured": {"device": "NVIDIA H100 80GB HBM3", "context": 4096,
                         "peak_allocated_bytes": 19_862_000_000, "peak_reserved_bytes": 20_342_374_400,
                         "process_used_bytes": 20_987_000_000}},
        "versions": {"torch": "2.13.0+cu128", "transformers": "5.20.1", "gptqmodel": "7.6.0", "optimum": "2.3.0",
                     "inf_quant": "0.1.0", "python": "3.11.9"},
        "backend": {"kernel": "marlin", "device": "cuda:0 (NVIDIA H100 80GB HBM3)"},
    }


def failing_report() -> dict:
    """The same model as AWQ with zh degraded past two gates, no `math` domain, no measurement, not fitting."""
    r = passing_report()
    r["quantized"].update(path="/data/out/INF-34B-Chat-awq-w4g128", quant_method="awq")
    del r["metrics"]["math"], r["eval"]["tokens"]["math"]
    r["metrics"]["zh"] = _metrics(16_384, 9.871, 10.412, 0.0631, 0.9105)
    r["gates"] = _gates(r["metrics"])
    r["passed"] = False
    a = r["vram"]["analytic"]
    a.update(budget_bytes=20 * GIB, fits=False, max_context=11_264,
             verdict="does NOT fit 20.0 GiB at context 32768 (needs 23.2 GiB); largest context that fits: 11264 "
                     "— use a shorter context, fp8 KV, or a card with >= 24 GiB for context 32768")
    r["vram"]["measured"] = None
    r["versions"]["gptqmodel"] = None
    return r


def _render(report: dict, out: Path) -> dict[str, bytes]:
    paths = write_report(VerifyReport.from_json(report), out)
    return {p.name: p.read_bytes() for p in paths}


def test_writes_three_files_in_order(tmp_path):
    paths = write_report(VerifyReport.from_json(passing_report()), tmp_path / "new" / "dir")
    assert [p.name for p in paths] == ["report.md", PPL_PNG, VRAM_PNG]
    assert all(p.is_file() and p.stat().st_size > 0 for p in paths)


@pytest.mark.parametrize("make", [passing_report, failing_report])
def test_pngs_are_valid_and_sized(tmp_path, make):
    from matplotlib.image import imread

    write_report(VerifyReport.from_json(make()), tmp_path)
    for png, (h, w) in ((PPL_PNG, (450, 800)), (VRAM_PNG, (400, 900))):
        path = tmp_path / png
        assert path.read_bytes()[:8] == PNG_SIGNATURE
        img = imread(path)
        assert img.shape == (h, w, 4), f"{png}: {img.shape}"
        assert img[..., :3].std() > 0.05, f"{png} looks blank"   # a chart, not a flat image


def test_markdown_pass(tmp_path):
    write_report(VerifyReport.from_json(passing_report()), tmp_path)
    md = (tmp_path / "report.md").read_text("utf-8")
    assert md.startswith("# INF-34B-Chat-gptq-w4g128: ✅ PASS\n")
    assert "All 15 gates passed." in md and "❌" not in md
    for domain in ("all", "en", "zh", "code", "math"):
        assert f"\n| {domain} | " in md, domain
    assert "| en | 16,384 | 7.105 | 7.262 | +2.21 % | 0.0198 | 94.37 % |" in md
    assert "**Verdict (transformers generate(), one-shot prefill):** ✅ fits 24.0 GiB at context 32768" in md
    assert "**Largest context that fits in 24.00 GiB:** 32,768 tokens." in md
    assert f"]({PPL_PNG})" in md and f"]({VRAM_PNG})" in md


def test_markdown_fail_lists_failing_gates_first(tmp_path):
    write_report(VerifyReport.from_json(failing_report()), tmp_path)
    md = (tmp_path / "report.md").read_text("utf-8")
    assert md.startswith("# INF-34B-Chat-awq-w4g128: ❌ FAIL\n")
    assert "**2 of 12 gates failed**" in md
    gate_rows = [ln for ln in md.split("## Gates")[1].split("##")[0].splitlines() if ln.startswith("| `")]
    assert gate_rows[0] == "| `max_ppl_increase_pct` | zh | ≤ 3.00 % | +5.48 % | ❌ FAIL |"
    assert gate_rows[1] == "| `max_kl` | zh | ≤ 0.0500 | 0.0631 | ❌ FAIL |"
    assert all(row.endswith("✅ pass |") for row in gate_rows[2:]) and len(gate_rows) == 12
    assert "| zh | 16,384 | 9.871 | 10.412 | +5.48 % ❌ | 0.0631 ❌ | 91.05 % |" in md
    assert "\n| math | " not in md
    assert "**Verdict (transformers generate(), one-shot prefill):** ❌ does NOT fit 20.0 GiB at context 32768" in md
    assert "**Largest context that fits in 20.00 GiB:** 11,264 tokens." in md
    assert "| gptqmodel | not installed |" in md


def test_markdown_vram_breakdown_and_measured(tmp_path):
    write_report(VerifyReport.from_json(passing_report()), tmp_path)
    md = (tmp_path / "report.md").read_text("utf-8")
    assert "| weights | 17.00 | 73.3 % |" in md
    assert "| KV cache at context 32,768 | 3.75 | 16.2 % |" in md
    assert "| **total** | **23.19** |  |" in md and "| budget | 24.00 |  |" in md
    assert "**Measured** on NVIDIA H100 80GB HBM3 at context 4,096:" in md
    assert "| peak allocated (torch) | 18.50 | -20.2 % |" in md
    assert "| process used (driver) | 19.55 | -15.7 % |" in md
    assert "ran at context 4,096, the estimate at 32,768" in md


def test_markdown_measured_absent(tmp_path):
    write_report(VerifyReport.from_json(failing_report()), tmp_path)
    md = (tmp_path / "report.md").read_text("utf-8")
    assert "**Measured:** not measured in this run" in md
    assert "peak allocated" not in md


def test_markdown_inputs_are_shortened_and_sorted(tmp_path):
    write_report(VerifyReport.from_json(passing_report()), tmp_path)
    md = (tmp_path / "report.md").read_text("utf-8")
    inputs = md.split("## Inputs")[1].split("##")[0]
    assert "`fefefefefefe…`" in inputs and "fe" * 13 not in inputs
    names = [n for n in ("config.json", "model-00001-of-00004", "model-00002-of-00004") if n in inputs]
    assert names == sorted(names) and len(names) == 3
    assert inputs.index("config.json") < inputs.index("model-00001") < inputs.index("model-00002")


def test_report_is_not_modified(tmp_path):
    r = VerifyReport.from_json(failing_report())
    before = copy.deepcopy(r.to_json())
    write_report(r, tmp_path)
    assert r.to_json() == before


def test_helpers():
    assert ordered_domains({"math": 1, "zz": 1, "all": 1, "en": 1, "aa": 1}) == ["all", "en", "math", "aa", "zz"]
    assert diff_pct(110, 100) == pytest.approx(10.0)
    assert diff_pct(90, 100) == pytest.approx(-10.0)


@pytest.mark.parametrize("make", [passing_report, failing_report])
def test_deterministic_in_process(tmp_path, make):
    first, second = _render(make(), tmp_path / "a"), _render(make(), tmp_path / "b")
    assert first == second


def test_deterministic_across_processes(tmp_path):
    """A fresh interpreter, given the dict through JSON as verify.json would, writes identical bytes."""
    report = passing_report()
    (tmp_path / "verify.json").write_text(json.dumps(report))
    code = ("import json, sys; from pathlib import Path; from inf_quant.evaluate.report import write_report; "
            "from inf_quant.evaluate.verify_report import VerifyReport; "
            "write_report(VerifyReport.read(Path(sys.argv[1])), Path(sys.argv[2]))")
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "MPLBACKEND": "pdf"}
    r = subprocess.run([sys.executable, "-c", code, str(tmp_path / "verify.json"), str(tmp_path / "sub")],
                       capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    here = _render(report, tmp_path / "here")
    there = {name: (tmp_path / "sub" / name).read_bytes() for name in here}
    for name in here:
        assert here[name] == there[name], f"{name} differs between processes"


def test_pngs_differ_when_data_differs(tmp_path):
    """Determinism must not come from ignoring the data: the measured bar changes vram.png."""
    with_measured = _render(passing_report(), tmp_path / "a")
    r = passing_report()
    r["vram"]["measured"] = None
    without = _render(r, tmp_path / "b")
    assert with_measured[VRAM_PNG] != without[VRAM_PNG]
    assert with_measured[PPL_PNG] == without[PPL_PNG]


def test_missing_matplotlib_names_the_fix(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)   # makes `import matplotlib` raise ImportError
    with pytest.raises(InfQuantError, match=r"needs matplotlib.*pip install 'matplotlib>=3.7'"):
        write_report(VerifyReport.from_json(passing_report()), tmp_path)


def test_import_has_no_matplotlib_side_effects():
    """Importing the module neither imports matplotlib nor selects a backend."""
    code = ("import sys, inf_quant.evaluate.report, json; "
            "print(json.dumps([m for m in sys.modules if m.split('.')[0] == 'matplotlib']))")
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env, cwd=REPO)
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads(r.stdout.strip().splitlines()[-1]) == []


def test_percentages_that_round_to_zero_are_never_negative_zero():
    assert signed_pct(-0.04, 1) == "+0.0 %" and signed_pct(-0.004, 2) == "+0.00 %"
    assert signed_pct(-0.06, 1) == "-0.1 %" and signed_pct(2.345, 2) == "+2.35 %" and signed_pct(0.0, 1) == "+0.0 %"


def test_verify_json_is_the_report_as_data(tmp_path):
    """VerifyReport.to_json() is what verify writes to verify.json, and from_json gives back the same report; a
    file that is not one is a ConfigError naming it."""
    from inf_quant.core.errors import ConfigError

    d = passing_report()
    d["vram"] = {**d["vram"], "vllm": None, "verify": None}   # verify writes all four parts
    r = VerifyReport.from_json(d)
    assert json.dumps(r.to_json(), sort_keys=True) == json.dumps(d, sort_keys=True)
    assert VerifyReport.from_json(r.to_json()) == r
    assert r.gates[0].name == "max_ppl_increase_pct" and r.metrics["en"].tokens == 16_384
    (tmp_path / "verify.json").write_text(json.dumps({**d, "gates": [{"name": "max_kl"}]}))
    with pytest.raises(ConfigError, match=r"verify.json: not a verify.json of this inf-quant version"):
        VerifyReport.read(tmp_path / "verify.json")
