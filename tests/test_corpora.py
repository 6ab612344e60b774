"""The bundled calibration, chat and eval sets: size, language mix, provenance, disjointness, integrity."""

import hashlib
import json

import pytest

from inf_quant.core.hashing import files_sha256
from inf_quant.core.paths import CALIBRATION, DEFAULT_MODEL, EVAL, REPO_ROOT
from inf_quant.data.calibrate import CHAT, MIXES, document_ids, window_starts
from inf_quant.data.tokenizer import load_tokenizer


def rows(path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


@pytest.fixture(scope="module")
def tokens():
    """Per bundled file: (lang, token count incl. EOS) per record, with the bundled model's tokenizer."""
    tok = load_tokenizer(DEFAULT_MODEL)
    return {p: [(r["lang"], len(ids)) for r, ids in zip(rows(p), document_ids(tok, (p,)))] for p in (CALIBRATION, CHAT)}


def test_calibration_is_large_mixed_and_mostly_licensed(tokens):
    calib = rows(CALIBRATION)
    assert CALIBRATION.stat().st_size >= 1_000_000
    assert {r["lang"] for r in calib} == {"en", "zh", "code", "math"}
    for mix, files in MIXES.items():
        n = {}
        for lang, k in (x for f in files for x in tokens[f]):
            n[lang] = n.get(lang, 0) + k
        assert n["zh"] / sum(n.values()) >= 0.30, (mix, n)


@pytest.mark.parametrize("mix", ["bundled", "bundled-mix"])
def test_enough_text_for_128_distinct_2048_token_windows(tokens, mix):
    """INF-34B's recipes take 128 x 2048 tokens: the bundled model's tokenizer finds that many disjoint windows."""
    lengths = [k for f in MIXES[mix] for _, k in tokens[f]]
    assert len(window_starts(lengths, 2048)) >= 128


def test_chat_portion_is_chat_from_documents_no_other_set_uses():
    chat, others = rows(CHAT), rows(CALIBRATION) + rows(EVAL)
    assert 100_000 <= CHAT.stat().st_size <= 500_000
    assert {r["lang"] for r in chat} == {"en", "zh"} and not any("text" in r for r in chat)
    for r in chat:
        roles = [m["role"] for m in r["messages"]]
        assert roles == ["user", "assistant"] * (len(roles) // 2) and roles, r["doc"]
    assert not {(r["source"], r["doc"]) for r in chat} & {(r["source"], r["doc"]) for r in others}


def test_no_benchmark_test_split_and_eval_is_disjoint():
    calib, evals = rows(CALIBRATION), rows(EVAL)
    assert not any("test" in r["source"] for r in calib + evals)
    assert not {(r["source"], r["doc"]) for r in calib} & {(r["source"], r["doc"]) for r in evals}
    assert {r["lang"] for r in evals} == {"en", "zh", "code", "math"}


def test_every_source_has_provenance_and_manifest_matches():
    manifest = json.loads((REPO_ROOT / "calibration" / "MANIFEST.json").read_text())
    for name, path in (("calibration", CALIBRATION), ("eval", EVAL), ("chat", CHAT)):
        assert manifest[name]["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert manifest["mixes"] == {mix: files_sha256(files) for mix, files in MIXES.items()}
    provenance = (REPO_ROOT / "calibration" / "PROVENANCE.md").read_text(encoding="utf-8")
    for r in rows(CALIBRATION) + rows(EVAL) + rows(CHAT):
        assert f"`{r['source']}`" in provenance, f"source {r['source']} has no PROVENANCE entry"
        assert (REPO_ROOT / "calibration" / "licenses").joinpath(r["source"] + ".txt").is_file(), r["source"]


def test_heldout_set_is_other_sources_with_provenance():
    """eval/heldout.jsonl (bench/peers.py's and the CI gate's accuracy text): at least three sources, none of them a
    calibration source, each with its licence file and enough text to score on, and bytes the manifest names."""
    heldout = REPO_ROOT / "eval" / "heldout.jsonl"
    manifest = json.loads((REPO_ROOT / "eval" / "HELDOUT.json").read_text())
    assert manifest["sha256"] == hashlib.sha256(heldout.read_bytes()).hexdigest()
    recs = rows(heldout)
    sources = {r["source"] for r in recs}
    calib_sources = {r["source"] for r in rows(CALIBRATION) + rows(CHAT) + rows(EVAL)}
    assert len(sources) >= 3 and not sources & calib_sources, sources & calib_sources
    assert {r["lang"] for r in recs} >= {"en", "zh", "code"}
    for name in sources:
        got = [r for r in recs if r["source"] == name]
        m = manifest["sources"][name]
        assert (m["records"], m["chars"]) == (len(got), sum(len(r["text"]) for r in got)), name
        assert m["chars"] >= 15_000 and len(m["files"]) >= 4, name
        assert all(r["license"] == m["license"] for r in got), name
        assert (REPO_ROOT / "eval" / "licenses" / f"{name}.txt").stat().st_size > 500, name
