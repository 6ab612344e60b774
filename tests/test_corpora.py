"""The bundled calibration and eval sets: size, language mix, provenance, disjointness, integrity."""

import hashlib
import json

from inf_quant.paths import CALIBRATION, EVAL, REPO_ROOT
from inf_quant.tokenizer import load_tokenizer
from inf_quant.paths import DEFAULT_MODEL


def rows(path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_calibration_is_large_mixed_and_mostly_licensed():
    calib = rows(CALIBRATION)
    assert CALIBRATION.stat().st_size >= 1_000_000
    assert {r["lang"] for r in calib} == {"en", "zh", "code", "math"}
    tok = load_tokenizer(DEFAULT_MODEL)
    n = {}
    for r in calib:
        n[r["lang"]] = n.get(r["lang"], 0) + len(tok(r["text"])["input_ids"])
    assert n["zh"] / sum(n.values()) >= 0.30, n


def test_no_benchmark_test_split_and_eval_is_disjoint():
    calib, evals = rows(CALIBRATION), rows(EVAL)
    assert not any("test" in r["source"] for r in calib + evals)
    assert not {(r["source"], r["doc"]) for r in calib} & {(r["source"], r["doc"]) for r in evals}
    assert {r["lang"] for r in evals} == {"en", "zh", "code", "math"}


def test_every_source_has_provenance_and_manifest_matches():
    manifest = json.loads((REPO_ROOT / "calibration" / "MANIFEST.json").read_text())
    for name, path in (("calibration", CALIBRATION), ("eval", EVAL)):
        assert manifest[name]["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    provenance = (REPO_ROOT / "calibration" / "PROVENANCE.md").read_text(encoding="utf-8")
    for r in rows(CALIBRATION) + rows(EVAL):
        assert f"`{r['source']}`" in provenance, f"source {r['source']} has no PROVENANCE entry"
        assert (REPO_ROOT / "calibration" / "licenses").joinpath(r["source"] + ".txt").is_file(), r["source"]
