"""One `load_tokenizer` path for every checkpoint: INF's INFLMTokenizer natively, anything else via AutoTokenizer."""

from __future__ import annotations

import json
from pathlib import Path

from ..core.errors import CheckpointError


def load_tokenizer(path: str | Path, trust_remote_code: bool = False):
    """Load the tokenizer of checkpoint directory `path` without executing checkpoint code by default.

    A tokenizer_config.json naming `INFLMTokenizer` (INF-34B's and the bundled model's) gets inf-quant's native
    implementation, so INF's remote `tokenization_inflm.py` never runs unless `trust_remote_code` is set.
    """
    path = Path(path)
    cfg_file = path / "tokenizer_config.json"
    cfg = json.loads(cfg_file.read_text(encoding="utf-8")) if cfg_file.is_file() else {}
    if cfg.get("tokenizer_class") == "INFLMTokenizer" and not trust_remote_code:
        from ..models.tokenization_inflm import INFLMTokenizer

        if not (path / "tokenizer.model").is_file():
            raise CheckpointError(f"{path}: tokenizer_config.json names INFLMTokenizer but tokenizer.model is missing")
        return INFLMTokenizer.from_pretrained(str(path))
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: cannot load a tokenizer ({e}); copy the tokenizer files next to config.json") from e
