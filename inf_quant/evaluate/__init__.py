"""Verify: is a quantized checkpoint as good as its bf16 baseline, and does it fit the card?

Takes: the quantized checkpoint, its bf16 baseline and the eval token windows (data/), or for `fit` only the
checkpoint's headers and config.json. Gives: the baseline's top-k log-probabilities, computed layer-streamed and
cached by content hash (`baseline.py`); KL, top-1 agreement and perplexity as pure functions of the two models'
log-probabilities (`metrics.py`); the memory a checkpoint needs at a given context, from shapes alone, in
transformers' one-shot prefill (`fit.py`) and in vLLM's own accounting (`fit_vllm.py`); what verify found as frozen
data, verify.json (`verify_report.py`), and rendered as report.md and its charts (`report.py`); and our own
dequantized reference model that tests hold the loaders' kernels to (`reference.py`). The `verify` command that
runs them in order is verify.py.
"""
