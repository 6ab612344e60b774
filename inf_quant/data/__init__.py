"""Calibrate: text in, token windows out.

Takes: a calibration source (a bundled mix, or a user's `.jsonl`/`.txt` file of text or chat records) and the
checkpoint's tokenizer. Gives: seeded, document-aligned token windows sampled without reuse, and the eval set's
windows by domain (`calibrate.py`); one `load_tokenizer` for every checkpoint, INF's INFLMTokenizer natively
(`tokenizer.py`); and INF's fast tokenizer, `tokenizer.json` converted from `tokenizer.model` with the same ids,
which every output carries (`fast_tokenizer.py`).
"""
