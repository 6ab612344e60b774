"""Where the bundled data lives (the repository checkout; inf-quant is installed editable, see README), and how a
user's path is resolved."""

from __future__ import annotations

import errno
from pathlib import Path

from .errors import ConfigError

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_MODEL = REPO_ROOT / "models" / "inf-tiny"
CALIBRATION = REPO_ROOT / "calibration" / "calib.jsonl"
EVAL = REPO_ROOT / "eval" / "eval.jsonl"
MODELING_DIR = Path(__file__).resolve().parents[1] / "models"


def resolve_model_path(path: str) -> Path:
    """'bundled' is the bundled default model; '' means the recipe left the model to the caller."""
    if path == "bundled":
        return DEFAULT_MODEL
    if not path:
        raise ConfigError("no model given: pass --model DIR (the recipe leaves model.path empty)")
    return Path(path)


def default_out_dir(model_dir: Path, recipe) -> Path:
    """out/<model>-<method>-w<bits>g<group> (g c: per-channel)."""
    g = "c" if recipe.group_size == -1 else recipe.group_size
    return Path("out") / f"{model_dir.resolve().name}-{recipe.method.value}-w{recipe.bits}g{g}"


def resolved(path: str | Path) -> Path:
    """path with ~ expanded and every symlink followed; a loop or an unreadable component is a ConfigError."""
    try:
        return Path(path).expanduser().resolve()
    except (RuntimeError, OSError) as e:  # a loop: RuntimeError before Python 3.13, OSError(ELOOP) after
        if isinstance(e, OSError) and e.errno != errno.ELOOP:
            raise ConfigError(f"{path}: cannot be resolved ({e.strerror}); pass a path you can read") from None
        raise ConfigError(f"{path}: a symlink loop (following its links comes back to itself); fix or remove the "
                          "link, or pass the real directory") from None
