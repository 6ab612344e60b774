"""Calibration data: document-aligned token windows, sampled without replacement, from a bundled mix or user files.

A calibration file is a .jsonl of records, each either plain text `{"text": ...}` or a chat
`{"messages": [{"role": ..., "content": ...}, ...]}` (rendered with the checkpoint's chat template), or a .txt
file whose blank-line-separated blocks are plain-text records. Every record is one document.
"""

from __future__ import annotations

import bisect
import json
import logging
from collections.abc import Iterator
from pathlib import Path

from ..core.errors import ConfigError
from ..core.paths import CALIBRATION, EVAL

log = logging.getLogger(__name__)

CHAT = CALIBRATION.parent / "chat.jsonl"
# bundled-eval: held-out documents of the calibration sources; bundled-heldout: sources calibration never draws on
BUNDLED = {"bundled": CALIBRATION, "bundled-eval": EVAL, "bundled-heldout": EVAL.parent / "heldout.jsonl"}
# calibration.source names of the bundled mixes: plain text (the default model's training text), the chat
# portion (question/answer conversations from other documents of the same licensed sources), or both
MIXES = {"bundled": (CALIBRATION,), "bundled-chat": (CHAT,), "bundled-mix": (CALIBRATION, CHAT)}


def resolve_text_file(source: str) -> Path:
    """'bundled' (the calibration set), 'bundled-eval', 'bundled-heldout', or a path to a .jsonl (field `text`) or
    .txt file."""
    path = BUNDLED.get(source, Path(source))
    if not path.is_file():
        raise ConfigError(f"text source {source!r}: no such file; use 'bundled', 'bundled-eval', 'bundled-heldout' "
                          "or a path to .jsonl/.txt")
    if path.suffix not in (".jsonl", ".txt"):
        raise ConfigError(f"text source {path}: expected a .jsonl (one {{'text': ...}} per line) or .txt file")
    return path


def calibration_files(source: str) -> tuple[Path, ...]:
    """The files of calibration.source: a bundled mix (see MIXES) or one user .jsonl / .txt path."""
    if source in MIXES:
        return MIXES[source]
    path = Path(source)
    if not path.is_file():
        raise ConfigError(f"calibration source {source!r}: no such file; use one of {', '.join(MIXES)} "
                          "or a path to .jsonl/.txt")
    if path.suffix not in (".jsonl", ".txt"):
        raise ConfigError(f"calibration source {path}: expected a .jsonl (one {{'text': ...}} or "
                          "{'messages': [...]} per line) or .txt file")
    return (path,)


def read_text(path: Path, what: str = "text file") -> str:
    """The file's text; not UTF-8, or binary (NUL bytes), is a one-line ConfigError naming the offset."""
    try:
        data = path.read_bytes()
    except OSError as e:
        raise ConfigError(f"{what} {path}: cannot be read ({e.strerror})") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{what} {path}: not UTF-8 text (byte 0x{data[e.start]:02x} at offset {e.start}); "
                          "convert it to UTF-8 (e.g. iconv -t utf-8) or pass another file") from None
    if "\x00" in text:
        raise ConfigError(f"{what} {path}: a binary file (NUL byte at offset {text.index(chr(0))}), not text; "
                          "pass a .jsonl or .txt file")
    return text


def check_text_file(path: Path, what: str, chat: bool) -> tuple[int, int]:
    """Pre-flight of a calibration (chat=True: {'text'} or {'messages'} records) or eval file (chat=False: {'text'}
    only): UTF-8, every record well-formed, some text. Returns (records, characters of text); nothing is tokenized."""
    if path.suffix == ".txt":
        blocks = [t for t in read_text(path, what).split("\n\n") if t.strip()]
        n, chars = len(blocks), sum(len(t) for t in blocks)
    else:
        n, chars = 0, 0
        for where, rec in _jsonl(path, what):
            if chat and "messages" in rec and "text" not in rec:
                chars += sum(len(m["content"]) for m in _chat_messages(where, rec))
            elif not isinstance(rec.get("text"), str) or (chat and "messages" in rec):
                raise ConfigError(f"{where}: each line needs " + ("exactly one of 'text' (a string) or 'messages'"
                                                                 if chat else "a string field 'text'"))
            else:
                chars += len(rec["text"].strip())
            n += 1
    if not chars:
        raise ConfigError(f"{what} {path}: no text (the file is empty or whitespace only); pass a file with text")
    return n, chars


def _jsonl(path: Path, what: str = "text file") -> Iterator[tuple[str, dict]]:
    """(where, record) per non-blank line; `where` is 'path:line'."""
    for n, line in enumerate(read_text(path, what).splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}:{n}: not valid JSON ({e})") from e
        if not isinstance(rec, dict):
            raise ConfigError(f"{path}:{n}: each line must be a JSON object")
        yield f"{path}:{n}", rec


def read_records(path: Path) -> list[dict]:
    """Plain-text records {'text', optional 'lang', ...}: one per jsonl line, or one per blank-line-separated
    .txt block (used for eval text, which has no chat records)."""
    if path.suffix == ".txt":
        return [{"text": t} for t in read_text(path).split("\n\n") if t.strip()]
    out = []
    for where, rec in _jsonl(path):
        if not isinstance(rec.get("text"), str):
            raise ConfigError(f"{where}: each line needs a string field 'text'")
        out.append(rec)
    return out


def _chat_messages(where: str, rec: dict) -> list[dict]:
    msgs = rec["messages"]
    ok = isinstance(msgs, list) and msgs and all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in msgs)
    if not ok:
        raise ConfigError(f"{where}: 'messages' must be a non-empty list of {{'role': str, 'content': str}}")
    return msgs


def document_ids(tokenizer, paths: tuple[Path, ...]) -> list[list[int]]:
    """Every record of the files as one document's token ids, each followed by EOS (no BOS, like INF).

    A {'text'} record is tokenized as is. A {'messages'} record is rendered by the tokenizer's chat template
    (apply_chat_template(tokenize=False)) and that string is tokenized without adding special tokens: the
    template already writes any it wants, so this gives exactly apply_chat_template(tokenize=True)'s ids.
    """
    texts = []
    for path in paths:
        if path.suffix == ".txt":
            texts += [r["text"] for r in read_records(path)]
        else:
            texts += [_record_text(tokenizer, where, rec) for where, rec in _jsonl(path)]
    eos = tokenizer.eos_token_id
    return [tokenizer(t, add_special_tokens=False, verbose=False)["input_ids"] + [eos] for t in texts]


def _record_text(tokenizer, where: str, rec: dict) -> str:
    if ("text" in rec) == ("messages" in rec):
        raise ConfigError(f"{where}: each line needs exactly one of 'text' (a string) or 'messages' "
                          "(a list of {'role', 'content'})")
    if "text" in rec:
        if not isinstance(rec["text"], str):
            raise ConfigError(f"{where}: 'text' must be a string")
        return rec["text"]
    msgs = _chat_messages(where, rec)
    if not getattr(tokenizer, "chat_template", None):
        raise ConfigError(f"{where}: a chat record ('messages'), but the model's tokenizer has no chat template; "
                          "add one to tokenizer_config.json or calibrate on plain {'text'} records")
    return tokenizer.apply_chat_template(msgs, tokenize=False)


def token_stream(tokenizer, texts: list[str]) -> torch.Tensor:
    """All texts tokenized (no BOS, like INF) and joined with EOS: [L] int64."""
    import torch

    eos = tokenizer.eos_token_id
    ids: list[int] = []
    for t in texts:
        ids.extend(tokenizer(t, add_special_tokens=False, verbose=False)["input_ids"])
        ids.append(eos)
    return torch.tensor(ids, dtype=torch.int64)


def eval_windows(tokenizer, texts: list[str], seqlen: int):
    """The texts as consecutive non-overlapping windows of token_stream: [S, seqlen] int64 (the tail is dropped)."""
    stream = token_stream(tokenizer, texts)
    n = len(stream) // seqlen
    return stream[: n * seqlen].view(n, seqlen)


def window_starts(lengths: list[int], seqlen: int) -> list[int]:
    """Offsets of non-overlapping seqlen-token windows in the documents laid end to end (lengths: [n_docs]).

    A window starts at a document start. If it ends inside the document it started in (a document longer than
    seqlen), the next window continues that document; otherwise (short documents are packed, the last one cut
    off) the next window starts at the next document start, and the cut-off rest is left unused.
    """
    doc_starts = [0]
    for n in lengths:
        doc_starts.append(doc_starts[-1] + n)
    total, out, pos = doc_starts[-1], [], 0
    while pos + seqlen <= total:
        out.append(pos)
        end = pos + seqlen
        doc_end = doc_starts[bisect.bisect_right(doc_starts, pos)]  # end of the document `pos` lies in
        pos = end if end < doc_end else doc_starts[bisect.bisect_left(doc_starts, end)]  # next document start
    return out


def sample_windows(docs: list[list[int]], samples: int, seqlen: int, seed: int) -> torch.Tensor:
    """`samples` calibration windows of `seqlen` tokens, chosen without replacement: [S, T] int64.

    docs: token ids per document, each already ending with EOS (document_ids). The windows are the
    document-aligned ones of window_starts; a seeded permutation picks S of them, so no token position is used
    twice. Only when S exceeds the number of windows are windows reused (successive permutations, each window
    used at most ceil(S / windows) times); that, and asking for more than half of all tokens, is logged.
    Deterministic in `seed`.
    """
    import torch

    total = sum(len(d) for d in docs)
    if total < seqlen:
        raise ConfigError(f"the calibration text has {total} tokens, fewer than one window of seqlen={seqlen}; "
                          "use a smaller --seqlen or a larger --calib file")
    stream = torch.tensor([i for d in docs for i in d], dtype=torch.int64)  # [L] int64
    starts = torch.tensor(window_starts([len(d) for d in docs], seqlen))
    g = torch.Generator().manual_seed(seed)
    rounds = -(-samples // len(starts))
    pick = torch.cat([starts[torch.randperm(len(starts), generator=g)] for _ in range(rounds)])[:samples]
    asked = samples * seqlen
    if rounds > 1:
        log.warning("calibration asks %d x %d = %d tokens, but the %d tokens of text give only %d distinct "
                    "document-aligned windows: %d windows are reused; add text or lower --samples/--seqlen",
                    samples, seqlen, asked, total, len(starts), samples - len(starts))
    elif 2 * asked > total:
        log.warning("calibration asks %d x %d = %d tokens, more than half of the %d tokens of text; windows "
                    "differ little between seeds", samples, seqlen, asked, total)
    return stream[pick[:, None] + torch.arange(seqlen)]
