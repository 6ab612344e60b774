"""Where the bundled data lives (the repository checkout; inf-quant is installed editable, see README)."""

from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_MODEL = REPO_ROOT / "models" / "inf-tiny"
CALIBRATION = REPO_ROOT / "calibration" / "calib.jsonl"
EVAL = REPO_ROOT / "eval" / "eval.jsonl"
MODELING_DIR = Path(__file__).resolve().parent / "models"


def resolve_model_path(path: str) -> Path:
    """'bundled' is the bundled default model; '' means the recipe left the model to the caller."""
    from .errors import ConfigError

    if path == "bundled":
        return DEFAULT_MODEL
    if not path:
        raise ConfigError("no model given: pass --model DIR (the recipe leaves model.path empty)")
    return Path(path)


def default_out_dir(model_dir: Path, recipe) -> Path:
    """out/<model>-<method>-w<bits>g<group> (g c: per-channel)."""
    g = "c" if recipe.group_size == -1 else recipe.group_size
    return Path("out") / f"{model_dir.resolve().name}-{recipe.method.value}-w{recipe.bits}g{g}"
