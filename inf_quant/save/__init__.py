"""Save: the finished layers as a checkpoint directory, published in one step.

Takes: an output path (checked before torch is imported: where it may be, what it may replace, its disk; `outdir.py`),
the run's lock on it (`lock.py`: one run per output, stale when its process is gone), and each layer's tensors as
engine/ finishes it. Gives: a work directory the run writes into layer by layer and resumes from, then the
checkpoint assembled there in the layout the recipe asks for, with the resolved recipe in `inf_quant.json`, and
renamed into place atomically (`output.py`). The files themselves are written deterministically by `write.py`:
safetensors shards + index, JSON configs, the modeling files copied from models/.
"""
