"""Quantization math: pure functions over tensors.

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
