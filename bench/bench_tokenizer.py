"""Tokenizer speed: INF's slow INFLMTokenizer vs the converted fast tokenizer (tokenizer.json), on the bundled corpora.

    python bench/bench_tokenizer.py [--repeat 3]

Encodes every record of calibration/calib.jsonl + eval/eval.jsonl (checks that both give the same ids first) and
prints characters/s and tokens/s for: the slow tokenizer (`tok(text)` per record), the fast one through
transformers (`tok(text)` per record, and one batched call), and the `tokenizers` library directly (one thread and
all threads). Best of --repeat runs. Not a test: timings vary with machine load; record them in bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from inf_quant.core.paths import CALIBRATION, DEFAULT_MODEL, EVAL  # noqa: E402
from inf_quant.data.fast_tokenizer import fast_tokenizer, fast_tokenizer_config, write_fast_tokenizer  # noqa: E402
from inf_quant.data.tokenizer import load_tokenizer  # noqa: E402


def best(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeat", type=int, default=3)
    a = ap.parse_args()
    from transformers import PreTrainedTokenizerFast

    texts = [json.loads(line)["text"] for f in (CALIBRATION, EVAL) for line in f.read_text(encoding="utf-8").splitlines()]
    slow = load_tokenizer(DEFAULT_MODEL)
    raw = fast_tokenizer(slow)
    with tempfile.TemporaryDirectory() as d:
        cfg = json.loads((DEFAULT_MODEL / "tokenizer_config.json").read_text())
        (Path(d) / "tokenizer_config.json").write_text(json.dumps(fast_tokenizer_config(cfg)))
        write_fast_tokenizer(DEFAULT_MODEL, Path(d))
        fast = PreTrainedTokenizerFast.from_pretrained(d)
    ids = [slow(t)["input_ids"] for t in texts]
    assert [fast(t)["input_ids"] for t in texts] == ids, "fast and slow ids differ"
    chars, tokens = sum(map(len, texts)), sum(map(len, ids))

    runs = {
        "slow INFLMTokenizer, tok(text) per record": lambda: [slow(t) for t in texts],
        "fast via transformers, tok(text) per record": lambda: [fast(t) for t in texts],
        "fast via transformers, tok(texts) batched": lambda: fast(texts),
        "tokenizers encode() per record (1 thread)": lambda: [raw.encode(t, add_special_tokens=False) for t in texts],
        f"tokenizers encode_batch ({os.cpu_count()} threads)": lambda: raw.encode_batch(texts, add_special_tokens=False),
    }
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; python "
          f"{platform.python_version()}; {len(texts)} records, {chars:,} characters, {tokens:,} tokens; "
          f"best of {a.repeat}")
    print("| path | seconds | chars/s | tokens/s | speed-up |\n|---|---:|---:|---:|---:|")
    base = None
    for name, fn in runs.items():
        s = best(fn, a.repeat)
        base = base or s
        print(f"| {name} | {s:.3f} | {chars / s:,.0f} | {tokens / s:,.0f} | {base / s:.1f}x |")


if __name__ == "__main__":
    main()
