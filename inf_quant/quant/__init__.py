"""Quantize (the math): pure functions over tensors, no modules, hooks or files.

Takes: one Linear's weight [N, K] and its calibration statistics (GPTQ's H [K, K], AWQ's activations). Gives:
integer codes with their scales and zeros (QuantizedWeight), by round-to-nearest (`grid.py`), GPTQ (`gptq.py`) or
AWQ (`awq.py`: scale and clip searches, scale folding); and those codes as a checkpoint's packed tensors and back,
GPTQ v1 and AWQ gemm (`qformat.py`, over the int32 word layouts of `pack.py`, the only place the on-disk layout is
described). Running this over a model's layers is engine/.

Dimension letters used in every docstring of this package:

| letter | meaning |
|---|---|
| N | out_features (rows of a Linear weight) |
| K | in_features (columns of a Linear weight) |
| G | group size (columns sharing one scale/zero); K // G groups per row |
| S | calibration samples |
| T | tokens per sample |
| D | hidden size |
"""
