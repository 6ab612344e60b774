"""Content hashes of files and checkpoints, and the cache directory that memoises them.

Shared by calibration (calibration.sha256), resume fingerprints (output.py), the verify baseline's cache key
(baseline.py) and release manifests. Torch-free; a checkpoint enters as its directory and weight file names.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
from pathlib import Path

log = logging.getLogger(__name__)

UNCACHED = ("cannot write {what} {path} ({why}): going on without it ({cost}); to keep it, pass --cache-dir DIR "
            "or set XDG_CACHE_HOME to a writable directory")


def write_cache(path: Path, write, what: str, cost: str) -> None:
    """Best-effort write of a cache file: write(tmp) then an atomic rename onto `path`; when the location cannot be
    written, the temporary file is removed and one UNCACHED warning says what is lost (`cost`) instead of failing
    the run."""
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    except OSError as e:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        log.warning(UNCACHED.format(what=what, path=path, why=e.strerror or e, cost=cost))


def file_sha256(path: Path) -> str:
    return files_sha256((path,))


def files_sha256(paths: tuple[Path, ...]) -> str:
    """sha256 of the files' bytes read one after another (`cat A B | sha256sum`); one file: its own sha256."""
    h = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


def default_cache_root() -> Path:
    """$XDG_CACHE_HOME/inf-quant, else ~/.cache/inf-quant: where inf-quant keeps what it can rebuild (memos, crash
    logs, vLLM's test venv) unless --cache-dir says otherwise. The one rule; bench/ uses it too."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "inf-quant"


def cache_root(cache_dir: str) -> Path:
    """The cache directory (cache_dir, else default_cache_root()), created if possible. It only holds memos (file
    hashes, baseline results): where it cannot be written, work goes on without them and says so (UNCACHED)."""
    root = Path(cache_dir) if cache_dir else default_cache_root()
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError:
        pass  # reported by the first write that fails
    return root


def checkpoint_sha256(model_dir: Path, files: list[str], root: Path) -> str:
    """sha256 over model_dir's config.json and its weight `files` (name + content), memoised by (path, size, mtime)
    in root/file-hashes.json when root can be written."""
    memo_file = root / "file-hashes.json"
    try:
        memo = json.loads(memo_file.read_text()) if memo_file.is_file() else {}
    except (OSError, ValueError):
        memo = {}
    if not isinstance(memo, dict):
        memo = {}
    h = hashlib.sha256()
    for name in ["config.json", *files]:
        p = (model_dir / name).resolve()
        st = p.stat()
        key = f"{p}|{st.st_size}|{st.st_mtime_ns}"
        if key not in memo:
            memo[key] = file_sha256(p)
        h.update(f"{name}:{memo[key]}\n".encode())
    write_cache(memo_file, lambda tmp: tmp.write_text(json.dumps(memo, sort_keys=True)), "the file-hash memo",
                "the checkpoint is re-read for its sha256 on every run")
    return h.hexdigest()
