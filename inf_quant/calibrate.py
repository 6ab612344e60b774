"""Calibration data: seeded token windows from the bundled set or a user file, and block-0 inputs."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from .errors import ConfigError
from .paths import CALIBRATION, EVAL

BUNDLED = {"bundled": CALIBRATION, "bundled-eval": EVAL}


def resolve_text_file(source: str) -> Path:
    """'bundled' (the calibration set), 'bundled-eval', or a path to a .jsonl (field `text`) or .txt file."""
    path = BUNDLED.get(source, Path(source))
    if not path.is_file():
        raise ConfigError(f"calibration source {source!r}: no such file; use 'bundled' or a path to .jsonl/.txt")
    if path.suffix not in (".jsonl", ".txt"):
        raise ConfigError(f"calibration source {path}: expected a .jsonl (one {{'text': ...}} per line) or .txt file")
    return path


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def read_records(path: Path) -> list[dict]:
    """Records {'text', optional 'lang', ...}: one per jsonl line, or one per blank-line-separated .txt block."""
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".txt":
        return [{"text": t} for t in text.split("\n\n") if t.strip()]
    out = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}:{n}: not valid JSON ({e})") from e
        if not isinstance(rec, dict) or not isinstance(rec.get("text"), str):
            raise ConfigError(f"{path}:{n}: each line needs a string field 'text'")
        out.append(rec)
    return out


def token_stream(tokenizer, texts: list[str]) -> torch.Tensor:
    """All texts tokenized (no BOS, like INF) and joined with EOS: [L] int64."""
    eos = tokenizer.eos_token_id
    ids: list[int] = []
    for t in texts:
        ids.extend(tokenizer(t, add_special_tokens=False, verbose=False)["input_ids"])
        ids.append(eos)
    return torch.tensor(ids, dtype=torch.int64)


def sample_windows(stream: torch.Tensor, samples: int, seqlen: int, seed: int) -> torch.Tensor:
    """`samples` windows of `seqlen` tokens at seeded random offsets: [S, T] int64. Deterministic in `seed`."""
    if len(stream) < seqlen:
        raise ConfigError(
            f"the calibration text has {len(stream)} tokens, fewer than one window of seqlen={seqlen}; "
            "use a smaller --seqlen or a larger --calib file"
        )
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(stream) - seqlen + 1, (samples,), generator=g)
    return torch.stack([stream[s: s + seqlen] for s in starts.tolist()])
