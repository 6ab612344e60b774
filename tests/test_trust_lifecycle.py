"""The error catalogue's run-lifecycle and release-integrity rows (docs/ERRORS.md, issue 22): `release --check` as
an integrity check, memory refused before the first layer, SIGTERM like Ctrl-C, the crash log and caches on a
read-only disk, export onto a full disk. Same contract as tests/test_trust.py::test_catalogue (whose Box and
snapshot this file reuses): the exit code, one `inf-quant: ...` line naming the object and the fix, no traceback,
every file under the test's root hashing the same before and after unless the row says otherwise.

Cost: the release/memory/export rows are milliseconds to ~3 s each (no model work, or a tiny quantization); the
SIGTERM round trip ~1 min (a real subprocess on the bundled model, then --resume).
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers import cli
from inf_quant.core.paths import REPO_ROOT
from test_trust import FAST, Box, quantized_src, registrar, run_case, snapshot  # noqa: F401  (quantized_src: the shared fixture)


CASES: dict = {}
case = registrar(CASES)  # for rc 0: one logged WARNING line containing the fragments (run_case)


# ---- release --check: a published release against its manifest --------------------------------------------------
def _release(t: Box, name: str = "rel") -> Path:
    """A release directory as `inf-quant release` writes it: two variants, each listed file by file (sha256, size)
    in manifest.json by the release's own files_table, and a .rejected/ variant (never published)."""
    from inf_quant.release import MANIFEST, files_table

    rel = t.root / name
    variants = {}
    for v in ("tiny-awq", "tiny-gptq"):
        d = rel / v
        d.mkdir(parents=True)
        (d / "config.json").write_text(json.dumps({"model_type": "inflm", "variant": v}))
        (d / "model.safetensors").write_bytes(hashlib.sha256(v.encode()).digest() * 64)
        (d / "verify.json").write_text("{}")
        variants[v] = {"recipe": {}, "files": files_table(d)}
    (rel / ".rejected" / "tiny-rtn").mkdir(parents=True)
    (rel / ".rejected" / "tiny-rtn" / "report.md").write_text("failed a gate")
    (rel / MANIFEST).write_text(json.dumps({"format": 1, "variants": variants, "rejected": {"tiny-rtn": ["x"]}}))
    return rel


def _edit_manifest(rel: Path, edit) -> None:
    m = json.loads((rel / "manifest.json").read_text())
    edit(m)
    (rel / "manifest.json").write_text(json.dumps(m))


@case("release-check-extra-file", 1, "tiny-gptq/evil.py: not in the manifest")
def _(t):
    rel = _release(t)
    (rel / "tiny-gptq" / "evil.py").write_text("import os\n")
    return ["release", "--check", rel]


@case("release-check-extra-variant", 1, "tiny-extra/: not in the manifest")
def _(t):
    rel = _release(t)
    shutil.copytree(rel / "tiny-gptq", rel / "tiny-extra")
    return ["release", "--check", rel]


@case("release-check-extra-subdir", 1, "tiny-awq/sub/: not in the manifest")
def _(t):
    rel = _release(t)
    (rel / "tiny-awq" / "sub").mkdir()
    (rel / "tiny-awq" / "sub" / "x.bin").write_bytes(b"x")
    return ["release", "--check", rel]


@case("release-check-changed-file", 1, "tiny-awq/model.safetensors: sha256 or size differs", "another sha256")
def _(t):
    rel = _release(t)
    p = rel / "tiny-awq" / "model.safetensors"
    data = bytearray(p.read_bytes())
    data[100] ^= 0x01
    p.write_bytes(bytes(data))
    return ["release", "--check", rel]


@case("release-check-size-mismatch", 1, "tiny-gptq/config.json: sha256 or size differs", "listed")
def _(t):
    rel = _release(t)
    with open(rel / "tiny-gptq" / "config.json", "a") as f:
        f.write(" ")
    return ["release", "--check", rel]


@case("release-check-missing-file", 1, "tiny-gptq/verify.json: missing")
def _(t):
    rel = _release(t)
    (rel / "tiny-gptq" / "verify.json").unlink()
    return ["release", "--check", rel]


@case("release-check-symlink-out", 1, "tiny-gptq/model.safetensors: a symlink, not a file")
def _(t):
    rel = _release(t)
    outside = t.write("outside.bin", (rel / "tiny-gptq" / "model.safetensors").read_bytes())
    (rel / "tiny-gptq" / "model.safetensors").unlink()
    (rel / "tiny-gptq" / "model.safetensors").symlink_to(outside)  # same bytes, but outside the release
    return ["release", "--check", rel]


@case("release-check-path-escape", 2, "manifest.json: not a valid manifest", "variant name '../../..'",
      "restore it")
def _(t):
    rel = _release(t)
    t.write("secret.txt", "outside the release")
    _edit_manifest(rel, lambda m: m["variants"].__setitem__("../../..", m["variants"]["tiny-gptq"]))
    return ["release", "--check", rel]


@case("release-check-absolute-path", 2, "manifest.json: not a valid manifest", "file name '/etc/passwd'",
      "restore it")
def _(t):
    rel = _release(t)
    _edit_manifest(rel, lambda m: m["variants"]["tiny-gptq"]["files"].__setitem__(
        "/etc/passwd", {"sha256": "0" * 64, "size": 1}))
    return ["release", "--check", rel]


@case("release-check-entry-without-size", 2, "manifest.json: not a valid manifest",
      "variants['tiny-awq'].files['config.json'] has no 'size'", "restore it")
def _(t):
    rel = _release(t)
    _edit_manifest(rel, lambda m: m["variants"]["tiny-awq"]["files"]["config.json"].pop("size"))
    return ["release", "--check", rel]


@case("release-check-wrong-types", 2, "manifest.json: not a valid manifest", "variants['tiny-gptq'] has no 'files'")
def _(t):
    rel = _release(t)
    _edit_manifest(rel, lambda m: m["variants"]["tiny-gptq"].__setitem__("files", ["config.json"]))
    return ["release", "--check", rel]


def test_an_intact_release_checks_clean_and_rejected_variants_are_not_published(tmp_path, monkeypatch, capsys,
                                                                                quantized_src):
    t = Box(tmp_path, monkeypatch, quantized_src)
    rel = _release(t)
    code, out, err = cli("release", "--check", rel, capsys=capsys)
    assert code == 0 and "every file matches manifest.json" in out, (out, err)
    (rel / "tiny-gptq" / "verify.json").write_text("[]")  # same size, other bytes: the check reads content
    code, out, _ = cli("release", "--check", rel, "--json", capsys=capsys)
    assert code == 1 and json.loads(out)["problems"] == [
        "tiny-gptq/verify.json: sha256 or size differs from the manifest (same size, another sha256)"]


# ---- SIGTERM: like Ctrl-C --------------------------------------------------------------------------------------
def _at_layer(t: Box, act, layer: int = 1) -> None:
    """Run act() when the pipeline reaches `layer` (layer 0 is finished and handed to the writer by then)."""
    import inf_quant.pipeline as pipeline

    real = pipeline.quantize_layer

    def quantize_layer(ctx, block, i, hidden, rope):
        if i == layer:
            act()
        return real(ctx, block, i, hidden, rope)

    t.mp.setattr(pipeline, "quantize_layer", quantize_layer)


@case("sigterm", 143, "terminated (SIGTERM)", "finished layers kept in", "rerun with --resume to continue")
def _(t):
    _at_layer(t, lambda: os.kill(os.getpid(), signal.SIGTERM))  # a real signal, delivered to this process
    t.changes_ok = True  # the finished layer is kept on purpose; the lock is not (checked below)
    return _gptq(t)


def _gptq(t: Box, *extra) -> list:
    return ["gptq", "--model", t.model(), *FAST, "--out", t.root / "q", *extra]


@pytest.mark.slow  # two quantization runs, ~17 s
def test_sigterm_mid_quantization_keeps_the_work_releases_the_lock_and_resume_gives_the_same_bytes(tmp_path):
    """A real `kill -TERM` of `inf-quant gptq` after its first finished layer: exit 143 with one line, the work
    directory kept (and nothing else), the lock released; --resume then finishes with an uninterrupted run's bytes."""
    model = tmp_path / "m"
    shutil.copytree(REPO_ROOT / "models" / "inf-tiny", model)  # 6 layers: time to signal between layers
    args = ["--model", str(model), "--group-size", "32", "--samples", "8", "--seqlen", "64", "-q"]
    assert cli("gptq", *args, "--out", tmp_path / "ref")[0] == 0
    p = subprocess.Popen([sys.executable, "-m", "inf_quant", "gptq", *args, "--out", str(tmp_path / "q")],
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while p.poll() is None and time.monotonic() < deadline and \
            not (tmp_path / ".q.partial" / "layer-00000.safetensors").exists():
        time.sleep(0.02)
    p.send_signal(signal.SIGTERM)
    err = p.communicate(timeout=300)[1]
    assert p.returncode == 143, err[-3000:]
    lines = [line for line in err.splitlines() if line.startswith("inf-quant")]
    assert len(lines) == 1 and "terminated (SIGTERM)" in lines[0] and "--resume" in lines[0], err[-3000:]
    assert "Traceback" not in err
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left == [".q.partial", "m", "ref"], left   # no lock, no output: exactly the resumable work directory
    assert (tmp_path / ".q.partial" / "layer-00000.safetensors").is_file()
    assert cli("gptq", *args, "--out", tmp_path / "q", "--resume")[0] == 0
    ref, got = snapshot(tmp_path / "ref"), snapshot(tmp_path / "q")
    ref.pop("inf_quant.json"), got.pop("inf_quant.json")
    assert ref == got and not (tmp_path / ".q.lock").exists() and not (tmp_path / ".q.partial").exists()


# ---- memory: foreseen is enforced; an OOM that still happens is exit 2 with the flags that size the run --------
@case("memory-refused-quantize", 2, "not enough memory: --samples 100000000 x --seqlen 512", "expected peak of",
      "available", "use --samples", "or fewer (the largest that fits)", "lower --seqlen")
def _(t):
    return ["gptq", "--model", t.model(), "--group-size", "32", "--samples", "100000000", "--seqlen", "512", "-q",
            "--out", t.root / "q"]   # 2 x 1e8 x 512 x 64 x 4 B = 26 TB of hidden states: more than any machine here


@case("memory-refused-verify", 2, "not enough memory: verify of", "--baseline-gib 2", "expected peak of",
      "a 1 MiB test machine has 0.00 GiB available", "lower --baseline-gib or --seqlen")
def _(t):
    import inf_quant.verify as verify

    t.mp.setattr(verify, "available_bytes", lambda device: (2**20, "a 1 MiB test machine"))
    q = t.quantized()
    return ["verify", q, "--baseline", t.model(), "--seqlen", "32", "--max-windows", "2"]


def _allocate_exabytes():
    import torch

    torch.empty(2**62, dtype=torch.uint8)  # torch's CPU allocator refuses: RuntimeError, not MemoryError


@case("host-oom-torch-allocator", 2, "out of memory (RuntimeError)", "--forward-batch", "--samples or --seqlen",
      "finished layers kept in", "--resume")
def _(t):
    _at_layer(t, _allocate_exabytes)   # a real failed allocation (was exit 3: "internal error")
    t.changes_ok = True  # the finished layer is kept on purpose, for --resume
    return _gptq(t)


@case("verify-oom", 2, "out of memory (RuntimeError)", "lower --baseline-gib or --seqlen", "nothing was written")
def _(t):
    import inf_quant.verify as verify

    def quantized_stats(model, windows, base, *a, **kw):
        _allocate_exabytes()

    t.mp.setattr(verify, "quantized_stats", quantized_stats)
    return ["verify", t.quantized(), "--baseline", t.model(), "--seqlen", "32", "--max-windows", "2",
            "--cache-dir", t.logs / "cache"]


def test_the_refusal_advises_the_largest_samples_that_fit(tmp_path, monkeypatch, capsys):
    """The bundled model with --samples 100000 on a 23 GiB machine (expected 97.7 GiB): refused before any work,
    and the advised --samples is the largest whose expected peak is within what is available."""
    import inf_quant.pipeline as pipeline
    from inf_quant.core.paths import DEFAULT_MODEL
    from inf_quant.engine.memory import expected_quantize_peak
    from inf_quant.read.load import open_checkpoint

    avail = 23 * 2**30
    monkeypatch.setattr(pipeline, "available_bytes", lambda device: (avail, "a 23 GiB machine"))
    code, _, err = cli("gptq", "--samples", "100000", "--out", tmp_path / "q", "-q", capsys=capsys)
    assert code == 2 and "expected peak of 97.69 GiB" in err, err
    n = int(re.search(r"use --samples (\d+) or fewer", err).group(1))
    ckpt = open_checkpoint(DEFAULT_MODEL)

    def expected(s):
        return expected_quantize_peak(ckpt.layer_map, ckpt.config, s, 512, 4, 4, True, on_host=True,
                                      awq_samples=min(s, 4096 // 512)).total   # 4-bit GPTQ smooths: its captures

    assert expected(n) <= avail < expected(n + 1), (n, expected(n), expected(n + 1))
    assert list(tmp_path.iterdir()) == []


# ---- environment: logs and caches on a disk that cannot be written; export onto a full disk --------------------
def _unwritable(t: Box, name: str) -> Path:
    """A directory path that cannot be created or written, even by root: its parent is a regular file."""
    return t.write("blocker", "a file, not a directory") / name


@case("crash-log-dir-not-writable", 3, "internal error: RuntimeError: boom", "traceback in", "is not writable",
      "pass --log-dir or set INF_QUANT_LOG_DIR", "please report it")
def _(t):
    import tempfile

    t.mp.setenv("INF_QUANT_LOG_DIR", str(_unwritable(t, "logs")))  # was: "traceback in None"
    t.mp.setattr(tempfile, "tempdir", str(t.logs.parent / "tmp"))  # the fallback, outside the hashed root

    def boom():
        raise RuntimeError("boom")

    _at_layer(t, boom)
    return _gptq(t)


@case("cache-not-writable", 0, "cannot write the file-hash memo", "going on without it",
      "set XDG_CACHE_HOME to a writable directory")
def _(t):
    t.mp.setenv("XDG_CACHE_HOME", str(_unwritable(t, "cache")))  # was: exit 3 (ENOTDIR) or a wrong hint (EROFS)
    return ["gptq", "--model", t.model(), *FAST, "--out", t.logs.parent / "q"]   # the output outside the root


@case("export-disk-too-small", 2, "the export needs about", "GB free", "free space or choose an output on another disk")
def _(t):
    q = t.quantized()
    t.mp.setattr(shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10**9, 10**9, 10**6))
    return ["export", "--as", "stablelm", q, t.root / "s"]


@case("export-disk-full-mid-copy", 2, "disk full writing", ".s.partial/model.safetensors",
      "the unfinished export (.s.partial) was removed")
def _(t):
    q = t.quantized()
    real = shutil.copyfile

    def no_link(src, dst, *a, **kw):
        raise OSError(errno.EXDEV, "Invalid cross-device link", str(src), None, str(dst))

    def copyfile(src, dst, *a, **kw):  # the disk fills half-way through the shard (the error names src, then dst)
        if Path(src).suffix != ".safetensors":
            return real(src, dst, *a, **kw)
        Path(dst).write_bytes(Path(src).read_bytes()[:1000])
        raise OSError(errno.ENOSPC, "No space left on device", str(src), None, str(dst))

    t.mp.setattr(os, "link", no_link)   # another file system: every file is copied
    t.mp.setattr(shutil, "copyfile", copyfile)
    return ["export", "--as", "stablelm", q, t.root / "s"]


# ---- the catalogue runner ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("cid", list(CASES))
def test_catalogue(cid, tmp_path, monkeypatch, capsys, quantized_src):
    t = Box(tmp_path, monkeypatch, quantized_src)
    line = run_case(CASES[cid], t, capsys)
    assert not list(t.root.glob(".*.lock")), "a lock was left behind"
    if CASES[cid][1] == 3:
        log = Path(re.search(r"traceback in (\S+);", line).group(1))
        assert "Traceback" in log.read_text() and "boom" in log.read_text()
        assert log.parent == t.logs.parent / "tmp" / "inf-quant-logs"
