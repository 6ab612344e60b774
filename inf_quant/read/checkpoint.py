"""A checkpoint directory checked without torch: config.json, the index, every shard header (shards.read_header),
and for an unquantized input that its tensors are what its config.json implies.

check_checkpoint runs once per command, in pre-flight (preflight.py); its CheckedCheckpoint (config, weight map,
every tensor's dtype, shape and byte range) is what load.open_checkpoint, fit and export read instead of the files.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from ..core.errors import CheckpointError
from ..core.paths import resolved
from .layermap import LayerMap, check_config, expected_tensors, layer_map_for
from .shards import Tensor, read_header

SAFE_INDEX = "model.safetensors.index.json"
SAFE_SINGLE = "model.safetensors"
PICKLES = ("pytorch_model.bin.index.json", "pytorch_model.bin", "model.pt", "pytorch_model.pt")
FLOAT_DTYPES = ("BF16", "F16", "F32")  # what an unquantized input checkpoint may hold


@dataclass(frozen=True)
class CheckedCheckpoint:
    path: Path                  # resolved
    config: dict
    tensors: dict[str, Tensor]  # every tensor of every shard (empty for pickle checkpoints: not inspected)
    weight_map: dict[str, str]  # tensor name -> shard file (empty for pickle checkpoints)
    pickle: bool = False        # weights in torch pickle files (allow_pickle): tensors and weight map not inspected


def _json_file(path: Path, what: str) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: {what} is not valid JSON ({e}); restore the file") from None
    except OSError as e:
        raise CheckpointError(f"{path}: cannot be read ({e.strerror})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: {what} must be a JSON object; restore the file")
    return data


def check_checkpoint(path: str | Path, allow_pickle: bool = False, bf16_input: bool = True,
                     what: str = "checkpoint") -> CheckedCheckpoint:
    """config.json, index and every shard header of a checkpoint directory (see module docstring).
    bf16_input: also require every tensor the config implies, with its shape (a quantized checkpoint has others)."""
    p = resolved(path)
    if not p.is_dir():
        raise CheckpointError(f"{path}: {what} is not a directory; pass a checkpoint directory holding config.json")
    if not (p / "config.json").is_file():
        raise CheckpointError(f"{path}: config.json is missing; this does not look like a transformers checkpoint")
    config = _json_file(p / "config.json", "config.json")
    check_config(config, p)
    if (p / SAFE_INDEX).is_file():
        wm = _json_file(p / SAFE_INDEX, SAFE_INDEX).get("weight_map")
        if not isinstance(wm, dict) or not all(isinstance(v, str) for v in wm.values()):
            raise CheckpointError(f"{p / SAFE_INDEX}: no 'weight_map' of tensor name -> shard file; restore the file")
    elif (p / SAFE_SINGLE).is_file():
        wm = None
    else:
        pickles = [n for n in PICKLES if (p / n).is_file()]
        if not pickles:
            raise CheckpointError(f"{path}: no {SAFE_INDEX} or {SAFE_SINGLE} found")
        if not allow_pickle:
            raise CheckpointError(f"{path}: weights are torch pickle files ({pickles[0]}), which can execute code "
                                  "when loaded; convert them to safetensors or pass --allow-pickle if you trust "
                                  "the source")
        return CheckedCheckpoint(p, config, {}, {}, pickle=True)
    tensors, wm = _shard_headers(path, p, wm)
    ck = CheckedCheckpoint(p, config, tensors, wm)
    if bf16_input:
        check_tensors(ck, layer_map_for(config.get("model_type", "")))
    return ck


def _shard_headers(path: str | Path, p: Path, wm: dict[str, str] | None) -> tuple[dict[str, Tensor], dict[str, str]]:
    """(every tensor of every shard, the weight map) of checkpoint p (path as given): the index's shards exist and
    hold what it says (wm None: the single SAFE_SINGLE file, whose tensors make the weight map)."""
    files = sorted(set(wm.values())) if wm is not None else [SAFE_SINGLE]
    missing = [f for f in files if not (p / f).is_file()]
    if missing:
        raise CheckpointError(f"{path}: the index names shard files that are missing: {', '.join(missing)}")
    tensors, where = {}, {}
    for f in files:
        for name, t in read_header(p / f).items():
            tensors[name], where[name] = t, f
    if wm is None:
        wm = where
    absent = [n for n, f in wm.items() if where.get(n) != f]
    if absent:
        raise CheckpointError(f"{p / SAFE_INDEX} names {len(absent)} tensor(s) that are not in the shard it gives, "
                              f"e.g. {absent[0]} in {wm[absent[0]]}; restore the index or the shard")
    return tensors, wm


def _span(idx: list[int]) -> str:
    """'2..5' for consecutive indices, else '{1, 4, 7}'."""
    if idx == list(range(idx[0], idx[-1] + 1)):
        return f"{idx[0]}" if len(idx) == 1 else f"{idx[0]}..{idx[-1]}"
    return "{" + ", ".join(map(str, idx[:8])) + (", ..." if len(idx) > 8 else "") + "}"


def check_tensors(ck: CheckedCheckpoint, lmap: LayerMap) -> None:
    """An unquantized checkpoint is what its config.json says: exactly its layers, floating-point tensors only,
    every tensor the config implies present with the implied shape."""
    if not ck.tensors:
        return
    want = ck.config["num_hidden_layers"]
    pattern = re.compile(rf"{re.escape(lmap.blocks)}\.(\d+)\.")
    held = {int(m.group(1)) for n in ck.tensors if (m := pattern.match(n))}
    if held != set(range(want)):
        extra, missing = sorted(held - set(range(want))), sorted(set(range(want)) - held)
        what = f"tensors of {lmap.blocks}.{_span(extra)}" if extra else f"no tensors of {lmap.blocks}.{_span(missing)}"
        raise CheckpointError(f"{ck.path / 'config.json'}: num_hidden_layers={want}, but the shards hold {what} "
                              f"({len(held)} layers in all); set num_hidden_layers to the layers the checkpoint "
                              "holds, or restore the missing shards")
    for name, t in ck.tensors.items():
        if t.dtype not in FLOAT_DTYPES:
            raise CheckpointError(f"{ck.path / ck.weight_map.get(name, SAFE_SINGLE)}: tensor {name} is stored as "
                                  f"{t.dtype}, but an unquantized checkpoint holds only {', '.join(FLOAT_DTYPES)} "
                                  "tensors; pass the original bf16 checkpoint (this one is damaged or already "
                                  "converted)")
    for name, shape in expected_tensors(lmap, ck.config).items():
        t = ck.tensors.get(name)
        if t is None:
            raise CheckpointError(f"{ck.path}: tensor {name} is missing (config.json implies it); the checkpoint "
                                  "is incomplete or does not match its config.json")
        if t.shape != shape:
            raise CheckpointError(f"{ck.path}: {name} has shape {list(t.shape)}, config.json implies {list(shape)}; "
                                  "the checkpoint does not match its config.json")
