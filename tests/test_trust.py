"""The error catalogue (docs/ERRORS.md): every hostile input or fault, its exit code, its one line naming the object
and the fix, and that nothing was left behind or changed (sha256 of every file under the test's root, before and
after). Plus the lock, resume fingerprints, fast start and release bookkeeping.

Cost: ~70 pre-flight cases at milliseconds each (no model work), 8 that run a tiny quantization part-way (~3 s
each), 4 release/resume runs (~1 min together).
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import cli
from inf_quant.core.errors import ConfigError
from inf_quant.core.paths import REPO_ROOT
from inf_quant.save.lock import start_tick, lock_path, output_lock
from tiny import build_tiny_checkpoint

FAST = ("--group-size", "32", "--samples", "4", "--seqlen", "32", "-q")
CASES: dict = {}


def registrar(cases: dict):
    """The `case` decorator of one catalogue file (this one and each tests/test_trust_*.py): @case(id, rc, *expect)
    registers setup(t) -> argv in `cases`; the run must exit rc with one line containing every `expect` (run_case)."""
    def case(cid: str, rc: int, *expect: str):
        def deco(f):
            assert cid not in cases, cid
            cases[cid] = (f, rc, expect)
            return f
        return deco
    return case


case = registrar(CASES)


class Box:
    """A test's world: root/ (hashed before and after), a log dir outside it, model/quantized builders."""

    def __init__(self, tmp: Path, monkeypatch, quantized_src: Path):
        self.root, self.mp, self._q = tmp / "root", monkeypatch, quantized_src
        self.root.mkdir()
        self.logs = tmp / "logs"
        monkeypatch.setenv("INF_QUANT_LOG_DIR", str(self.logs))
        self.changes_ok = False

    def model(self, name: str = "m", model_type: str = "inflm") -> Path:
        return build_tiny_checkpoint(self.root / name, model_type)

    def quantized(self, name: str = "q") -> Path:
        dst = self.root / name
        shutil.copytree(self._q, dst)
        return dst

    def write(self, name: str, data: bytes | str) -> Path:
        p = self.root / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data if isinstance(data, bytes) else data.encode())
        return p


def snapshot(root: Path) -> dict:
    """relative path -> sha256 of every file, and every directory (including hidden work/lock leftovers)."""
    out = {}
    for p in sorted(root.rglob("*")):
        rel = str(p.relative_to(root))
        out[rel] = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() and not p.is_symlink() else p.is_dir()
    return out


@pytest.fixture(scope="module")
def quantized_src(tmp_path_factory):
    """One tiny GPTQ output (its bf16 source beside it) copied into the verify/export cases."""
    root = tmp_path_factory.mktemp("qsrc")
    model = build_tiny_checkpoint(root / "m", "inflm")
    assert cli("gptq", "--model", model, "--out", root / "q", *FAST)[0] == 0
    return root / "q"


def _gptq(t: Box, *extra, model=None) -> list:
    m = model or t.model()
    return ["gptq", "--model", m, *FAST, *extra]


def _shard(m: Path, tensor: str = "model.layers.0.mlp.up_proj.weight") -> Path:
    wm = json.loads((m / "model.safetensors.index.json").read_text())["weight_map"]
    return m / wm[tensor]


def _rewrite_shard(shard: Path, edit) -> None:
    """Rewrite a shard with edit(dict of tensors) applied (a real, valid safetensors file)."""
    from safetensors.torch import load_file, save_file

    t = {k: v.clone() for k, v in load_file(shard).items()}
    edit(t)
    save_file(t, shard, metadata={"format": "pt"})


# ---- output paths -----------------------------------------------------------------------------------------------
@case("out-is-input", 2, "is the input model itself", "choose another output")
def _(t):
    m = t.model()
    return _gptq(t, "--out", m, "--force", model=m)


@case("out-inside-input", 2, "lies inside the input model", "outside it")
def _(t):
    m = t.model()
    return _gptq(t, "--out", m / "q", model=m)


@case("out-contains-input", 2, "contains the input model", "choose another output")
def _(t):
    t.model("models/m")
    return _gptq(t, "--out", t.root / "models", "--force", model=t.root / "models" / "m")


@case("out-symlink-to-input", 2, "is the input model itself")
def _(t):
    m = t.model()
    (t.root / "link").symlink_to(m)
    return _gptq(t, "--out", t.root / "link", "--force", model=m)


@case("model-symlink-out-is-target", 2, "is the input model itself")
def _(t):
    m = t.model()
    (t.root / "link").symlink_to(m)
    return _gptq(t, "--out", m, "--force", model=t.root / "link")


@case("out-is-file", 2, "is a file, not a directory", "remove it or choose another")
def _(t):
    f = t.write("x", "precious")
    return _gptq(t, "--out", f, "--force")


@case("out-parent-is-file", 2, "is a file, not a directory")
def _(t):
    f = t.write("x", "precious")
    return _gptq(t, "--out", f / "q")


@case("out-exists-no-force", 2, "already exists", "--force")
def _(t):
    t.write("q/keep.txt", "precious")
    return _gptq(t, "--out", t.root / "q")


@case("out-is-calibration-file", 2, "is the calibration file itself")
def _(t):
    c = t.write("c.jsonl", json.dumps({"text": "hello world " * 400}) + "\n")
    return _gptq(t, "--calib", c, "--out", c, "--force")


@case("out-not-writable", 2, "is not writable", "choose an output directory you can write")
def _(t):
    t.mp.setattr(os, "access", lambda p, mode: False)  # root ignores chmod; see the tmpfs test
    return _gptq(t, "--out", t.root / "q")


@case("disk-too-small", 2, "needs about", "GB free", "free space or choose --out on another disk")
def _(t):
    t.mp.setattr(shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10**9, 10**9, 10**6))
    return _gptq(t, "--out", t.root / "q")


@case("lock-held", 2, "is being written by another inf-quant run", f"pid {os.getpid()}", "wait for it")
def _(t):
    out = t.root / "q"
    lock_path(out).write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                          "tick": start_tick(os.getpid()), "started": "now"}))
    return _gptq(t, "--out", out)


# ---- the input checkpoint ---------------------------------------------------------------------------------------
@case("model-missing", 2, "/nonexistent/m", "is not a directory", "pass a checkpoint directory")
def _(t):
    return ["gptq", "--model", "/nonexistent/m", *FAST]


@case("config-missing", 2, "config.json is missing")
def _(t):
    m = t.model()
    (m / "config.json").unlink()
    return _gptq(t, model=m)


@case("config-not-json", 2, "config.json is not valid JSON", "restore the file")
def _(t):
    m = t.model()
    (m / "config.json").write_text("{not json")
    return _gptq(t, model=m)


@case("config-lacks-dims", 2, "config.json lacks or mangles", "hidden_size")
def _(t):
    m = t.model()
    cfg = json.loads((m / "config.json").read_text())
    del cfg["hidden_size"]
    (m / "config.json").write_text(json.dumps(cfg))
    return _gptq(t, model=m)


@case("model-type-unsupported", 2, "model_type='gpt2' is not supported", "supported:")
def _(t):
    m = t.model()
    cfg = json.loads((m / "config.json").read_text())
    cfg["model_type"] = "gpt2"
    (m / "config.json").write_text(json.dumps(cfg))
    return _gptq(t, model=m)


@case("index-not-json", 2, "model.safetensors.index.json is not valid JSON")
def _(t):
    m = t.model()
    (m / "model.safetensors.index.json").write_text("[[[")
    return _gptq(t, model=m)


@case("index-no-weight-map", 2, "no 'weight_map'", "restore the file")
def _(t):
    m = t.model()
    (m / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}}))
    return _gptq(t, model=m)


@case("shard-missing", 2, "names shard files that are missing")
def _(t):
    m = t.model()
    _shard(m).unlink()
    return _gptq(t, model=m)


@case("shard-truncated", 2, "needs bytes up to", "re-download")
def _(t):
    m = t.model()
    s = _shard(m)
    s.write_bytes(s.read_bytes()[: s.stat().st_size // 2])
    return _gptq(t, model=m)


@case("shard-empty", 2, "not a safetensors file", "re-download")
def _(t):
    m = t.model()
    _shard(m).write_bytes(b"")
    return _gptq(t, model=m)


@case("shard-header-length-garbage", 2, "not a safetensors file", "header length")
def _(t):
    m = t.model()
    s = _shard(m)
    s.write_bytes(b"\xff" * 8 + s.read_bytes()[8:])
    return _gptq(t, model=m)


@case("shard-header-not-json", 2, "header is not valid JSON", "re-download")
def _(t):
    m = t.model()
    s = _shard(m)
    data = bytearray(s.read_bytes())
    data[8] = ord("!")
    s.write_bytes(bytes(data))
    return _gptq(t, model=m)


@case("index-names-tensor-not-in-shard", 2, "not in the shard it gives", "restore the index or the shard")
def _(t):
    m = t.model()
    p = m / "model.safetensors.index.json"
    idx = json.loads(p.read_text())
    idx["weight_map"]["model.layers.0.mlp.ghost.weight"] = idx["weight_map"]["model.layers.0.mlp.up_proj.weight"]
    p.write_text(json.dumps(idx))
    return _gptq(t, model=m)


@case("tensor-missing", 2, "model.layers.1.mlp.down_proj.weight is missing", "does not match its config.json")
def _(t):
    m = t.model()
    name = "model.layers.1.mlp.down_proj.weight"
    _rewrite_shard(_shard(m, name), lambda d: d.pop(name))
    p = m / "model.safetensors.index.json"
    idx = json.loads(p.read_text())
    del idx["weight_map"][name]
    p.write_text(json.dumps(idx))
    return _gptq(t, model=m)


@case("tensor-wrong-shape", 2, "model.layers.1.self_attn.k_proj.weight has shape [32, 64]", "implies [16, 64]")
def _(t):
    import torch

    m = t.model()
    name = "model.layers.1.self_attn.k_proj.weight"
    _rewrite_shard(_shard(m, name), lambda d: d.__setitem__(name, torch.zeros(32, 64, dtype=torch.bfloat16)))
    return _gptq(t, model=m)


@case("pickle-weights", 2, "torch pickle files", "--allow-pickle")
def _(t):
    m = t.model()
    for p in m.glob("*.safetensors*"):
        p.unlink()
    (m / "pytorch_model.bin").write_bytes(b"not really")
    return _gptq(t, model=m)


@case("group-size-not-dividing", 2, "in_features=64 is not divisible by group_size=48", "use 16, 32, 64 or -1")
def _(t):
    return ["gptq", "--model", t.model(), "--group-size", "48", "-q"]


# ---- calibration text -------------------------------------------------------------------------------------------
@case("calib-missing", 2, "/nonexistent.jsonl", "no such file")
def _(t):
    return _gptq(t, "--calib", "/nonexistent.jsonl")


@case("calib-wrong-suffix", 2, "expected a .jsonl", ".txt")
def _(t):
    return _gptq(t, "--calib", t.write("c.csv", "a,b\n"))


@case("calib-empty", 2, "no text (the file is empty or whitespace only)")
def _(t):
    return _gptq(t, "--calib", t.write("c.txt", ""))


@case("calib-whitespace-only", 2, "no text (the file is empty or whitespace only)")
def _(t):
    return _gptq(t, "--calib", t.write("c.jsonl", "\n   \n\t\n"))


@case("calib-binary", 2, "not UTF-8 text", "offset", "convert it to UTF-8")
def _(t):
    return _gptq(t, "--calib", t.write("c.txt", bytes(range(256)) * 8))


@case("calib-nul-bytes", 2, "a binary file (NUL byte")
def _(t):
    return _gptq(t, "--calib", t.write("c.txt", "text\x00more text"))


@case("calib-bad-json-line", 2, "c.jsonl:2: not valid JSON")
def _(t):
    return _gptq(t, "--calib", t.write("c.jsonl", json.dumps({"text": "ok"}) + "\n{oops\n"))


@case("calib-record-without-text", 2, "c.jsonl:1: each line needs exactly one of 'text'")
def _(t):
    return _gptq(t, "--calib", t.write("c.jsonl", json.dumps({"body": "x"}) + "\n"))


@case("calib-bad-messages", 2, "'messages' must be a non-empty list")
def _(t):
    return _gptq(t, "--calib", t.write("c.jsonl", json.dumps({"messages": "hi"}) + "\n"))


@case("calib-too-few-tokens", 2, "fewer than one window of seqlen=512", "larger --calib file")
def _(t):
    return ["gptq", "--model", t.model(), "--group-size", "32", "--samples", "4", "--seqlen", "512", "-q",
            "--calib", t.write("c.jsonl", json.dumps({"text": "a short text"}) + "\n")]


@case("calib-sha-mismatch-recipe", 2, "has sha256", "restore the file or update the recipe")
def _(t):
    m = t.model()
    d = t.root / "recipes"
    d.mkdir()
    (d / "r.yaml").write_text(f"method: gptq\nmodel: {{path: {m}}}\ncalibration: {{samples: 4, seqlen: 32, "
                              f"sha256: '{'f' * 64}'}}\ngptq: {{group_size: 32}}\n")
    return ["release", "--recipes", d, "--out", t.root / "rel", "-q"]


# ---- flags ------------------------------------------------------------------------------------------------------
@case("seqlen-too-small", 2, "--seqlen", "must be >= 16 tokens", "got 1")
def _(t):
    return ["gptq", "--model", t.model(), "--seqlen", "1", "-q"]


@case("seqlen-too-large", 2, "--seqlen 100000 exceeds the model's max_position_embeddings=512", "use <= 512")
def _(t):
    return ["gptq", "--model", t.model(), "--seqlen", "100000", "--group-size", "32", "-q"]


@case("bits-2", 2, "--bits: invalid choice: 2", "--help")
def _(t):
    return ["gptq", "--bits", "2"]


@case("unknown-flag", 2, "unrecognized arguments: --bitz", "--help")
def _(t):
    return ["gptq", "--bitz", "4"]


@case("no-command", 2, "the following arguments are required: COMMAND", "--help")
def _(t):
    return []


@case("damp-out-of-range", 2, "gptq.damp must be in (0, 1)")
def _(t):
    return ["gptq", "--model", t.model(), "--damp", "2", "-q"]


@case("samples-zero", 2, "calibration.samples must be >= 1")
def _(t):
    return ["gptq", "--model", t.model(), "--samples", "0", "-q"]


@case("device-cuda-without-gpu", 2, "--device cuda was requested but torch sees no CUDA device", "--device cpu")
def _(t):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    return _gptq(t, "--device", "cuda", "--out", t.root / "q")


@case("skip-unknown-module", 2, "skip: 'mlp.down'", "is not a quantized linear", "mlp.down_proj")
def _(t):
    return _gptq(t, "--skip", "mlp.down")


@case("skip-one-layer-gptq", 2, "names one layer, but GPTQ outputs can only skip a module in every layer",
      "use 'mlp.down_proj'")
def _(t):
    return _gptq(t, "--skip", "model.layers.0.mlp.down_proj")


@case("skip-layer-out-of-range", 2, "model.layers.9.mlp.down_proj", "the model has layers 0..1")
def _(t):
    return ["awq", "--model", t.model(), *FAST, "--skip", "model.layers.9.mlp.down_proj"]


@case("skip-everything", 2, "every linear would be skipped")
def _(t):
    names = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
             "mlp.up_proj", "mlp.down_proj"]
    return _gptq(t, "--skip", *names)


# ---- faults during the run (injected) ---------------------------------------------------------------------------
def _fail_at_layer(t: Box, exc: BaseException, layer: int = 1) -> None:
    import inf_quant.pipeline as pipeline

    real = pipeline.quantize_layer

    def quantize_layer(ctx, block, i, hidden, rope):
        if i == layer:
            raise exc
        return real(ctx, block, i, hidden, rope)

    t.mp.setattr(pipeline, "quantize_layer", quantize_layer)


@case("disk-full-mid-run", 2, "disk full writing", "free space or choose --out on another disk",
      "the unfinished run (.q.partial) was removed")
def _(t):
    m = t.model()
    assert cli(*_gptq(t, "--out", t.root / "q", model=m))[0] == 0  # a previous output: must survive untouched
    import inf_quant.save.output as output

    real, calls = output.save_file, []

    def save_file(tensors, path, metadata=None):
        calls.append(path)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real(tensors, path, metadata=metadata)

    t.mp.setattr(output, "save_file", save_file)
    return _gptq(t, "--out", t.root / "q", "--force", model=m)


@case("read-only-mid-run", 2, "cannot write", "Read-only file system", "choose an output location you can write")
def _(t):
    import inf_quant.save.output as output

    def save_file(tensors, path, metadata=None):
        raise OSError(errno.EROFS, "Read-only file system", str(path))

    t.mp.setattr(output, "save_file", save_file)
    return _gptq(t, "--out", t.root / "q")


@case("unexpected-exception", 3, "internal error: RuntimeError: boom", "traceback in", "please report it",
      "the unfinished run (.q.partial) was removed")
def _(t):
    _fail_at_layer(t, RuntimeError("boom"))
    return _gptq(t, "--out", t.root / "q")


@case("host-oom", 2, "out of memory (MemoryError)", "--forward-batch", "--samples or --seqlen",
      "finished layers kept in", "--resume")
def _(t):
    _fail_at_layer(t, MemoryError())
    t.changes_ok = True  # the finished layer is kept on purpose, for --resume (checked below)
    return _gptq(t, "--out", t.root / "q")


@case("cuda-oom", 2, "out of memory (OutOfMemoryError)", "--forward-batch", "finished layers kept in")
def _(t):
    import torch

    _fail_at_layer(t, torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB"))
    t.changes_ok = True
    return _gptq(t, "--out", t.root / "q")


@case("interrupt", 130, "interrupted; rerun with --resume to continue")
def _(t):
    _fail_at_layer(t, KeyboardInterrupt())
    t.changes_ok = True
    return _gptq(t, "--out", t.root / "q")


# ---- verify -----------------------------------------------------------------------------------------------------
def _verify(t: Box, *extra, q=None, base=None) -> list:
    q = q or t.quantized()
    return ["verify", q, "--baseline", base or t.model(), "--seqlen", "32", "--max-windows", "2", *extra]


@case("verify-not-quantized", 2, "no quantization_config", "not a quantized checkpoint")
def _(t):
    m = t.model()
    return _verify(t, q=m, base=m)


@case("verify-quantized-missing", 2, "/nonexistent/q", "is not a directory")
def _(t):
    return _verify(t, q="/nonexistent/q")


@case("verify-baseline-missing", 2, "/nonexistent/b", "--baseline is not a directory")
def _(t):
    return _verify(t, base="/nonexistent/b")


@case("verify-quantized-truncated", 2, "needs bytes up to", "re-download")
def _(t):
    q = t.quantized()
    s = q / "model.safetensors"
    s.write_bytes(s.read_bytes()[:-100])
    return _verify(t, q=q)


@case("verify-eval-empty", 2, "eval file", "no text")
def _(t):
    return _verify(t, "--eval", t.write("e.jsonl", ""))


@case("verify-eval-binary", 2, "eval file", "not UTF-8 text")
def _(t):
    return _verify(t, "--eval", t.write("e.txt", b"\xff\xfe\x00\x01" * 100))


@case("verify-eval-no-text-field", 2, "e.jsonl:1: each line needs a string field 'text'")
def _(t):
    return _verify(t, "--eval", t.write("e.jsonl", json.dumps({"messages": []}) + "\n"))


@case("verify-seqlen-too-small", 2, "verify.seqlen (--seqlen) must be >= 16 tokens")
def _(t):
    return ["verify", t.quantized(), "--seqlen", "4"]


@case("verify-baseline-is-quantized", 2, "the baseline is itself quantized", "pass the bf16 source")
def _(t):
    q = t.quantized()
    return _verify(t, q=q, base=q)


# ---- release ----------------------------------------------------------------------------------------------------
@case("release-check-manifest-not-json", 2, "manifest.json: not a valid manifest", "restore it")
def _(t):
    t.write("rel/manifest.json", "{truncated")
    return ["release", "--check", t.root / "rel"]


@case("release-check-no-manifest", 2, "no manifest.json", "inf-quant release")
def _(t):
    (t.root / "rel").mkdir()
    return ["release", "--check", t.root / "rel"]


@case("release-recipes-missing", 2, "no such recipes directory")
def _(t):
    return ["release", "--recipes", t.root / "nope", "--out", t.root / "rel"]


@case("release-only-unknown", 2, "--only nope: no such recipe")
def _(t):
    return ["release", "--recipes", REPO_ROOT / "recipes" / "ci", "--out", t.root / "rel", "--only", "nope"]


@case("release-out-is-model", 2, "is the recipe r's model itself")
def _(t):
    m = t.model()
    d = t.root / "recipes"
    d.mkdir()
    (d / "r.yaml").write_text(f"method: gptq\nmodel: {{path: {m}}}\ngptq: {{group_size: 32}}\n")
    return ["release", "--recipes", d, "--out", m]


@case("release-recipe-bad-key", 2, "r.yaml.gptq.bitz: unknown key")
def _(t):
    d = t.root / "recipes"
    d.mkdir()
    (d / "r.yaml").write_text("method: gptq\ngptq: {bitz: 4}\n")
    return ["release", "--recipes", d, "--out", t.root / "rel"]


@case("release-needs-args", 2, "release needs --recipes DIR and --out DIR")
def _(t):
    return ["release"]


# ---- export and fit ---------------------------------------------------------------------------------------------
@case("export-out-is-src", 2, "is the source checkpoint itself")
def _(t):
    q = t.quantized()
    return ["export", "--as", "stablelm", q, q, "--force"]


@case("export-out-inside-src", 2, "lies inside the source checkpoint")
def _(t):
    q = t.quantized()
    return ["export", "--as", "stablelm", q, q / "s"]


@case("export-out-exists", 2, "already exists", "--force")
def _(t):
    t.write("s/keep", "x")
    return ["export", "--as", "stablelm", t.quantized(), t.root / "s"]


@case("fit-missing", 2, "/nonexistent/m", "not a directory")
def _(t):
    return ["fit", "/nonexistent/m"]


def run_case(case: tuple, t: Box, capsys) -> str:
    """One catalogue row (CASES[id] of this file or a test_trust_*.py sibling): its command exits with the row's
    code, prints no traceback and exactly one line naming every expected fragment — on stderr as `inf-quant: ...`
    (exit 2/3), on stdout as the check's problem line (exit 1), or as one logged WARNING (exit 0) — and every file
    under the test root hashes as before (unless the row says changes are fine). Returns that line."""
    setup, rc, expect = case
    argv = setup(t)
    capsys.readouterr()
    before = snapshot(t.root)
    try:
        code = cli(*argv)[0]
    except SystemExit as e:  # argparse
        code = e.code
    out, err = capsys.readouterr()
    assert code == rc, err
    assert "Traceback" not in err
    if rc == 1:  # a check that found problems: each on stdout, naming the file
        lines = [line for line in out.splitlines() if any(e in line for e in expect)]
        assert not [line for line in err.splitlines() if line.startswith("inf-quant")], err
    else:
        lines = [line for line in err.splitlines() if line.startswith("inf-quant" if rc else "WARNING inf_quant")]
    assert len(lines) == 1, out + err
    for e in expect:
        assert e in lines[0], (e, lines[0])
    if not t.changes_ok:
        assert snapshot(t.root) == before, "an input, a previous output or a leftover changed"
    return lines[0]


@pytest.mark.parametrize("cid", list(CASES))
def test_catalogue(cid, tmp_path, monkeypatch, capsys, quantized_src):
    t = Box(tmp_path, monkeypatch, quantized_src)
    line = run_case(CASES[cid], t, capsys)
    if CASES[cid][1] == 3:
        log = Path(re.search(r"traceback in (\S+);", line).group(1))
        assert log.parent == t.logs and "Traceback" in log.read_text() and "boom" in log.read_text()


def all_cases() -> list[str]:
    """The ids of this file's CASES and of its siblings' (tests/test_trust_*.py, each with its own CASES)."""
    import importlib

    ids = list(CASES)
    for p in sorted(Path(__file__).parent.glob("test_trust_*.py")):
        ids += list(importlib.import_module(p.stem).CASES)
    return ids


def test_catalogue_matches_the_documented_table():
    doc = (REPO_ROOT / "docs" / "ERRORS.md").read_text()
    rows = re.findall(r"^\| `([a-z0-9-]+)` \|", doc, flags=re.M)
    ids = all_cases()
    assert sorted(rows) == sorted(ids) and len(rows) == len(set(rows)) == len(set(ids)) >= 40


def test_oom_keeps_the_finished_layers_and_resume_finishes_with_the_same_bytes(tmp_path, monkeypatch):
    m = build_tiny_checkpoint(tmp_path / "m", "inflm")
    assert cli("gptq", "--model", m, "--out", tmp_path / "ref", *FAST)[0] == 0
    box = Box(tmp_path, monkeypatch, tmp_path)
    _fail_at_layer(box, MemoryError())
    assert cli("gptq", "--model", m, "--out", tmp_path / "q", *FAST)[0] == 2
    assert (tmp_path / ".q.partial" / "layer-00000.safetensors").is_file() and not (tmp_path / ".q.lock").exists()
    monkeypatch.undo()
    assert cli("gptq", "--model", m, "--out", tmp_path / "q", "--resume", *FAST)[0] == 0
    ref, got = snapshot(tmp_path / "ref"), snapshot(tmp_path / "q")
    ref.pop("inf_quant.json"), got.pop("inf_quant.json")
    assert ref == got and not (tmp_path / ".q.partial").exists()


def test_resume_refuses_a_refreshed_checkpoint_of_the_same_shapes(tmp_path, monkeypatch, capsys):
    m = build_tiny_checkpoint(tmp_path / "m", "inflm")
    box = Box(tmp_path, monkeypatch, tmp_path)
    _fail_at_layer(box, KeyboardInterrupt())
    assert cli("gptq", "--model", m, "--out", tmp_path / "q", *FAST)[0] == 130
    monkeypatch.undo()
    _rewrite_shard(_shard(m), lambda d: d.__setitem__("model.layers.0.mlp.up_proj.weight",
                                                      d["model.layers.0.mlp.up_proj.weight"] * 1.5))
    code, _, err = cli("gptq", "--model", m, "--out", tmp_path / "q", "--resume", *FAST, capsys=capsys)
    assert code == 2 and "different recipe, model or calibration" in err


def test_a_stale_lock_is_taken_over_and_a_live_one_is_not(tmp_path):
    out = tmp_path / "q"
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()  # a pid that is gone
    lock_path(out).write_text(json.dumps({"pid": p.pid, "host": socket.gethostname(), "tick": "1", "started": "x"}))
    with output_lock(out) as lock:
        assert json.loads(lock.read_text())["pid"] == os.getpid()
        with pytest.raises(ConfigError, match="being written by another inf-quant run"):
            with output_lock(out):
                pass
    assert not lock.exists() and tmp_path.is_dir()
    recycled = {"pid": os.getpid(), "host": socket.gethostname(), "tick": "not-our-start-tick", "started": "x"}
    lock_path(out).write_text(json.dumps(recycled))  # our pid, but another process's start: a recycled pid
    with output_lock(out):
        pass


def test_an_empty_lock_left_by_a_killed_writer_is_waited_for_then_taken(tmp_path, monkeypatch):
    """A SIGKILL between creating the lock and writing its JSON leaves an empty file (seen in a release killed with
    kill -9 and resumed at once): the next run waits out the grace period, then takes it; it never hangs."""
    import time

    from inf_quant.save import lock as lock_mod

    monkeypatch.setattr(lock_mod, "EMPTY_LOCK_GRACE_S", 0.6)
    out = tmp_path / "q"
    lock_path(out).write_text("")
    t0 = time.monotonic()
    with output_lock(out) as lock:
        assert json.loads(lock.read_text())["pid"] == os.getpid()
    assert 0.4 < time.monotonic() - t0 < 1.6 and not lock.exists()


def test_real_disk_too_small_is_refused_before_any_work(tmp_path):
    """On a real 1 MiB tmpfs (needs root / CAP_SYS_ADMIN; skipped elsewhere)."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1M", "tmpfs", str(mnt)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here")
    try:
        m = build_tiny_checkpoint(tmp_path / "m", "inflm")
        r = subprocess.run([sys.executable, "-m", "inf_quant", "gptq", "--model", str(m), "--out", str(mnt / "q"),
                            *FAST], capture_output=True, text=True, timeout=120)
        assert r.returncode == 2 and "GB free" in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
        assert list(mnt.iterdir()) == []
    finally:
        subprocess.run(["umount", str(mnt)])


def test_help_and_argument_errors_start_without_torch_and_print_no_library_lines():
    code = ("import sys\nfrom inf_quant.cli import main\n"
            "rc = main(['gptq', '--model', '/nonexistent/model'])\n"
            "print(rc, 'torch' in sys.modules, 'transformers' in sys.modules)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.stdout.split() == ["2", "False", "False"] and r.stderr.count("\n") == 1, r.stderr
    r = subprocess.run([sys.executable, "-m", "inf_quant", "--help"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stderr == "" and "gptq" in r.stdout


def test_import_inf_quant_still_registers_inflm_with_transformers():
    code = ("import sys, inf_quant\nassert 'transformers' not in sys.modules\n"
            "from transformers import AutoConfig\nprint(type(AutoConfig.for_model('inflm')).__name__)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.stdout.strip() == "INFLMConfig", r.stderr[-2000:]


def test_per_layer_adjustments_are_one_line_per_kind():
    from inf_quant.pipeline import summarize_notes

    notes = [f"model.layers.{i}.self_attn.v_proj -> self_attn.o_proj: scale not folded (GQA)" for i in range(48)]
    notes += ["model.layers.3.mlp.down_proj: damping raised to 0.1", "model.layers.7.mlp.down_proj: damping raised to 0.1"]
    assert summarize_notes(notes) == [
        "model.layers.*.self_attn.v_proj -> self_attn.o_proj: scale not folded (GQA) (in 48 layers: 0-47)",
        "model.layers.*.mlp.down_proj: damping raised to 0.1 (in 2 layers: 3, 7)"]


@pytest.mark.parametrize("method, skip", [("gptq", "mlp.down_proj"), ("awq", "model.layers.1.self_attn.o_proj")])
def test_skipped_linears_stay_bf16_and_load_so_in_plain_transformers(tmp_path, method, skip):
    """The loaders honour what the config names: transformers (optimum / gptqmodel kernels) keeps the skipped
    linears as nn.Linear holding exactly the written bf16 weights, and quantizes every other one."""
    import torch
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    m = build_tiny_checkpoint(tmp_path / "m", "inflm")
    out = tmp_path / "q"
    assert cli(method, "--model", m, "--out", out, "--skip", skip, *FAST)[0] == 0
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        written = {k: f.get_tensor(k) for k in f.keys()}
    model = AutoModelForCausalLM.from_pretrained(out, device_map="cpu", dtype=torch.bfloat16)
    plain, quantized = [], []
    for name, mod in model.named_modules():
        if ".layers." in name and name.rsplit(".", 1)[-1].endswith("_proj"):
            (plain if type(mod) is torch.nn.Linear else quantized).append(name)
    want = [f"model.layers.{i}.mlp.down_proj" for i in range(2)] if method == "gptq" else [skip]
    assert plain == want and len(quantized) == 14 - len(want)
    for name in want:
        assert f"{name}.qweight" not in written
        assert torch.equal(model.get_submodule(name).weight, written[f"{name}.weight"])
    if method == "gptq":  # the untouched bf16 input weight (no AWQ scale goes into a GPTQ skip)
        from safetensors.torch import load_file

        src = {}
        for p in m.glob("*.safetensors"):
            src.update(load_file(p))
        assert torch.equal(written["model.layers.0.mlp.down_proj.weight"], src["model.layers.0.mlp.down_proj.weight"])
    with torch.no_grad():
        assert torch.isfinite(model(torch.tensor([[5, 17, 250, 1024]])).logits).all()


@pytest.mark.slow  # two quantization runs, ~14 s
def test_kill_9_mid_quantization_then_resume_gives_the_same_bytes(tmp_path):
    """A real SIGKILL of `inf-quant gptq` after its first finished layer: the lock it leaves is stale, --resume
    takes it over and finishes with the bytes of an uninterrupted run."""
    import signal
    import time

    model = tmp_path / "m"
    shutil.copytree(REPO_ROOT / "models" / "inf-tiny", model)  # 6 layers: time to kill between layers
    args = ["--model", str(model), "--group-size", "32", "--samples", "8", "--seqlen", "64", "-q"]
    assert cli("gptq", *args, "--out", tmp_path / "ref")[0] == 0
    p = subprocess.Popen([sys.executable, "-m", "inf_quant", "gptq", *args, "--out", str(tmp_path / "q")],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while p.poll() is None and time.monotonic() < deadline and not (tmp_path / ".q.partial" / "layer-00000.safetensors").exists():
        time.sleep(0.02)
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert p.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    assert (tmp_path / ".q.lock").exists() and not (tmp_path / "q").exists()
    assert cli("gptq", *args, "--out", tmp_path / "q", "--resume")[0] == 0
    ref, got = snapshot(tmp_path / "ref"), snapshot(tmp_path / "q")
    ref.pop("inf_quant.json"), got.pop("inf_quant.json")
    assert ref == got and not (tmp_path / ".q.lock").exists() and not (tmp_path / ".q.partial").exists()
