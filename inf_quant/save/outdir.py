"""Pre-flight of a command's output directory, without torch: where it may be (never an input, inside one or around
one; not a file; not the current directory when it is replaced), what an existing one may be replaced from (only
what inf-quant wrote: OUTPUT_MARKER), whether its parent is writable, and whether its disk has room."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from ..core.errors import ConfigError
from ..core.paths import resolved

OUTPUT_MARKER = "inf_quant.json"       # in every output inf-quant writes (output.write_configs, export)
DISK_MARGIN = 1.1
DISK_SLACK = 64 * 2**20


def check_output(out: str | Path, inputs: dict[str, Path], force: bool, resume: bool = False,
                 what: str = "--out", replaced: bool = True) -> Path:
    """The resolved output directory: not an input, not inside or around one, not a file, its parent writable,
    not already there unless force/resume. replaced: the run swaps the whole directory for its result (quantize,
    export), so an existing one must be an inf-quant output (OUTPUT_MARKER) or empty, and it may not be the current
    directory or one above it; otherwise (verify --report, release) files are written into it."""
    o = resolved(out)
    for label, inp in inputs.items():
        i = resolved(inp)
        if o == i:
            raise ConfigError(f"{what} {out} is the {label} itself; writing there would destroy it: choose "
                              "another output directory")
        if o.is_relative_to(i) and i.is_dir():
            raise ConfigError(f"{what} {out} lies inside the {label} {inp}; choose an output directory outside it")
        if i.is_relative_to(o):
            raise ConfigError(f"{what} {out} contains the {label} {inp}; replacing it would destroy the input: "
                              "choose another output directory")
    if o.exists() and not o.is_dir():
        raise ConfigError(f"{what} {out} is a file, not a directory; remove it or choose another output directory")
    try:
        cwd = Path.cwd().resolve()
    except OSError:  # the working directory was removed: nothing of it to protect
        cwd = None
    if replaced and cwd is not None and cwd.is_relative_to(o):
        raise ConfigError(f"{what} {out} is the current directory or one above it ({cwd}); the finished output "
                          "replaces that directory by a rename, which would pull it out from under this shell: "
                          "choose a new directory, e.g. --out ./quantized")
    foreign = replaced and o.is_dir() and not (o / OUTPUT_MARKER).is_file() and any(o.iterdir())
    if foreign:
        raise ConfigError(f"{what} {out} already exists and is not an inf-quant output (no {OUTPUT_MARKER} in it); "
                          "inf-quant replaces only directories it wrote, even with --force: remove it yourself or "
                          f"choose another {what}")
    if o.exists() and not (force or resume):
        raise ConfigError(f"{out} already exists; pass --force to replace it, or choose another {what}")
    _check_parent(o, out, what)
    return o


def _check_parent(o: Path, out: str | Path, what: str) -> None:
    """The nearest existing parent of o (resolved; out as given) is a directory this process can write."""
    parent = o.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise ConfigError(f"{what} {out}: {parent} is a file, not a directory; choose another output directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ConfigError(f"{what} {out}: {parent} is not writable (read-only or no permission); choose an output "
                          "directory you can write")


def check_disk(out: Path, need: int, what: str) -> None:
    """Free space on out's file system >= need x DISK_MARGIN + DISK_SLACK."""
    parent = out
    while not parent.exists():
        parent = parent.parent
    free = shutil.disk_usage(parent).free
    want = int(need * DISK_MARGIN) + DISK_SLACK
    if free < want:
        raise ConfigError(f"{out}: {what} needs about {want / 1e9:.2f} GB free on {parent}'s file system "
                          f"({need / 1e9:.2f} GB estimated x {DISK_MARGIN} + 64 MiB), {free / 1e9:.2f} GB is free; "
                          "free space or choose --out on another disk")


def check_release_dir(o: Path, out: str, names: list[str]) -> None:
    """release writes into --out and replaces its variants <name>/: an existing --out must be a release directory
    (manifest.json, or the .staging of an interrupted first release) or empty, and each existing variant an
    inf-quant output."""
    if not o.is_dir() or not any(o.iterdir()):
        return
    if not ((o / "manifest.json").is_file() or (o / ".staging").is_dir()):
        raise ConfigError(f"--out {out} already exists and is not an inf-quant release directory (no manifest.json "
                          "in it); release writes only into its own directories: remove it yourself or choose "
                          "another --out")
    for name in names:
        v = o / name
        if v.exists() and not (v / OUTPUT_MARKER).is_file():
            raise ConfigError(f"--out {out}: {v} is not a variant inf-quant published (no {OUTPUT_MARKER} in it) but "
                              f"would be replaced by recipe {name}: remove it yourself or choose another --out")
