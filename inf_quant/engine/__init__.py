"""Quantize (the run): the math of quant/ applied to one decoder layer at a time, on the compute device.

Takes: a resolved run (`context.py`'s Context: the recipe, the opened checkpoint, its layer map, the device and
dtype of `device.py`, the calibration windows), one decoder layer as read/ materialised it, and the hidden states
[S, T, D] that the already-quantized layers before it produced. Gives: a BlockResult, the same from either twin,
GPTQ (`gptq_block.py`) or AWQ (`awq_block.py`): the layer's checkpoint tensors (packed linears, AWQ's folded norms),
its weights left as the values those tensors encode, and the losses and adjustments to report. `forward.py` runs
the layer over the windows chunk by chunk, capturing a group's inputs and carrying the hidden states on to the
next layer in place; `head.py` is the lm_head's GPTQ solve after the last layer; `memory.py` states a run's peak
memory from shapes before it starts and measures it while it runs. The loop over the layers is pipeline.py.
"""
