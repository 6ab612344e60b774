"""Where the bundled data lives (the repository checkout; inf-quant is installed editable, see README)."""

from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_MODEL = REPO_ROOT / "models" / "inf-tiny"
CALIBRATION = REPO_ROOT / "calibration" / "calib.jsonl"
EVAL = REPO_ROOT / "eval" / "eval.jsonl"
MODELING_DIR = Path(__file__).resolve().parent / "models"
