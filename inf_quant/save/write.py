"""Writing checkpoints: sharded safetensors + index, configs, tokenizer and modeling files, licence.

Everything written here is deterministic: tensors in a stable order, JSON with sorted keys, no timestamps.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import torch

from ..core.paths import MODELING_DIR
from ..read.load import ST_NAMES

MODELING_FILES = ("configuration_inflm.py", "modeling_inflm.py", "tokenization_inflm.py")
# config.json's pointer from the Auto classes to the copied MODELING_FILES (plain transformers, trust_remote_code)
INFLM_AUTO_MAP = {"AutoConfig": "configuration_inflm.INFLMConfig",
                  "AutoModelForCausalLM": "modeling_inflm.INFLMForCausalLM"}
INFLM_TOKENIZER_AUTO_MAP = {"AutoTokenizer": ["tokenization_inflm.INFLMTokenizer", None]}  # tokenizer_config.json
TOKENIZER_FILES = (
    "tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
    "added_tokens.json", "chat_template.jinja",
)
LICENSE_GLOBS = ("LICENSE*", "LICENCE*", "NOTICE*", "*License*.txt", "*LICENSE*.pdf")


def save_file(tensors: dict[str, torch.Tensor], path: str | Path, metadata: dict[str, str] | None = None) -> None:
    """Write a safetensors file byte-for-byte deterministically.

    safetensors' own writer serialises `__metadata__` from a Rust HashMap, whose key order changes from
    process to process, so two identical runs with more than one metadata key differ in bytes. Here the
    header is JSON with sorted keys, tensors are laid out in name order, and the header is space-padded to
    8 bytes (as the format requires); readers (safetensors, transformers) load it like any other file.
    """
    header, offset = {}, 0
    names = sorted(tensors)
    for name in names:
        t = tensors[name]
        n = t.numel() * t.element_size()
        header[name] = {"dtype": ST_NAMES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + n]}
        offset += n
    if metadata:
        header["__metadata__"] = dict(sorted(metadata.items()))
    blob = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")  # never truncate a file that may still be memory-mapped
    with open(tmp, "wb") as f:
        f.write(len(blob).to_bytes(8, "little"))
        f.write(blob)
        for name in names:
            t = tensors[name].detach().contiguous().cpu().reshape(-1)
            f.write(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    os.chmod(tmp, 0o644)  # releases are world-readable
    os.replace(tmp, path)


def plan_shards(sizes: dict[str, int], max_shard_bytes: int) -> list[list[str]]:
    """Greedy split of tensor names (in the given order) into shards of at most max_shard_bytes each."""
    shards, cur, cur_bytes = [], [], 0
    for name, n in sizes.items():
        if cur and cur_bytes + n > max_shard_bytes:
            shards.append(cur)
            cur, cur_bytes = [], 0
        cur.append(name)
        cur_bytes += n
    if cur:
        shards.append(cur)
    return shards


def shard_file_names(n: int) -> list[str]:
    if n == 1:
        return ["model.safetensors"]
    return [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]


def write_index(out_dir: Path, weight_map: dict[str, str], total_size: int) -> None:
    index = {"metadata": {"total_size": total_size}, "weight_map": dict(sorted(weight_map.items()))}
    write_json(out_dir / "model.safetensors.index.json", index)


def save_sharded(tensors: dict[str, torch.Tensor], out_dir: Path, max_shard_bytes: int,
                 metadata: dict[str, str] | None = None) -> list[str]:
    """Write in-memory `tensors` as safetensors shards (+ index when more than one). Returns the file names."""
    sizes = {k: t.numel() * t.element_size() for k, t in tensors.items()}
    return save_sharded_lazy(sizes, lambda keys: {k: tensors[k] for k in keys}, out_dir, max_shard_bytes, metadata)


def save_sharded_lazy(sizes: dict[str, int], fetch: Callable[[list[str]], dict[str, torch.Tensor]], out_dir: Path,
                      max_shard_bytes: int, metadata: dict[str, str] | None = None) -> list[str]:
    """Like save_sharded, but tensors are fetched one shard at a time: peak memory is one shard.

    sizes: tensor name -> bytes, in the order the tensors should be written.
    """
    shards = plan_shards(sizes, max_shard_bytes)
    names = shard_file_names(len(shards))
    meta = {"format": "pt", **(metadata or {})}
    weight_map = {}
    for fname, keys in zip(names, shards):
        tensors = fetch(keys)
        save_file({k: tensors[k] for k in keys}, out_dir / fname, metadata=meta)
        weight_map.update({k: fname for k in keys})
        del tensors
    if len(names) > 1:
        write_index(out_dir, weight_map, sum(sizes.values()))
    return names


def write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8")


def copy_modeling_files(out_dir: Path) -> None:
    for name in MODELING_FILES:
        shutil.copyfile(MODELING_DIR / name, out_dir / name)


def copy_side_files(src_dir: Path, out_dir: Path) -> list[str]:
    """Copy tokenizer files and licence texts that exist in src_dir. Returns the names copied."""
    copied = []
    names = [n for n in TOKENIZER_FILES if (src_dir / n).is_file()]
    for pattern in LICENSE_GLOBS:
        names += sorted(p.name for p in src_dir.glob(pattern) if p.is_file())
    for name in dict.fromkeys(names):
        shutil.copyfile(src_dir / name, out_dir / name)
        copied.append(name)
    return copied
