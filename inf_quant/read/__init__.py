"""Read: the input checkpoint, one decoder layer at a time.

Takes: a checkpoint directory (config.json, a safetensors index and shards, or one file). Gives: every shard
header parsed and checked without torch (`shards.py`, `checkpoint.py`: the CheckedCheckpoint that pre-flight hands
on), the architecture as one table keyed by `model_type` (`layermap.py`), the loader-facing layout's rules
(`layout.py`: `inflm` or `stablelm`, torch-free), and the model as a meta-device skeleton whose layers, embedding,
final norm and lm_head are materialised one at a time straight from the shards' bytes (`load.py`).
"""
