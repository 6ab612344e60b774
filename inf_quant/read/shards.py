"""safetensors files without torch: the one dtype table and the one header reader.

A safetensors file is 8 bytes of little-endian header length n, n bytes of JSON header (tensor name -> dtype,
shape, data_offsets relative to the data; plus an optional `__metadata__` of strings), then the data. Every reader
in the package parses headers here (pre-flight's checks, load's reads, fit's sizes, the work files' sizes), and
write.py names dtypes from the same table, so a dtype is spelled, sized and mapped to torch in one place.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

from ..core.errors import CheckpointError


class Dtype(NamedTuple):
    itemsize: int  # bytes per element
    torch: str     # the torch.dtype's attribute name (load.torch_dtype and load.ST_NAMES map them)


DTYPES = {"BF16": Dtype(2, "bfloat16"), "F16": Dtype(2, "float16"), "F32": Dtype(4, "float32"),
          "F64": Dtype(8, "float64"), "I8": Dtype(1, "int8"), "U8": Dtype(1, "uint8"), "I16": Dtype(2, "int16"),
          "U16": Dtype(2, "uint16"), "I32": Dtype(4, "int32"), "U32": Dtype(4, "uint32"), "I64": Dtype(8, "int64"),
          "U64": Dtype(8, "uint64"), "BOOL": Dtype(1, "bool"), "F8_E4M3": Dtype(1, "float8_e4m3fn"),
          "F8_E5M2": Dtype(1, "float8_e5m2")}
MAX_HEADER = 100 * 2**20   # the safetensors reference's own limit
REDOWNLOAD = "the file is damaged or truncated; re-download or re-copy it"


@dataclass(frozen=True)
class Tensor:
    dtype: str               # a DTYPES key
    shape: tuple[int, ...]
    start: int = field(default=0, compare=False)  # byte range of its data in the file (absolute offsets)
    stop: int = field(default=0, compare=False)

    @property
    def nbytes(self) -> int:
        n = DTYPES[self.dtype].itemsize
        for d in self.shape:
            n *= d
        return n


def read_header(path: Path) -> dict[str, Tensor]:
    """A safetensors file's tensors from its header, checked against the file's length (nothing else is read)."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            n = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
            if not 0 < n <= min(MAX_HEADER, size - 8):
                raise CheckpointError(f"{path}: not a safetensors file (header length {n}, file {size} bytes); "
                                      + REDOWNLOAD)
            raw = f.read(n)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot be read ({e.strerror})") from None
    try:
        header = json.loads(raw)
    except ValueError:  # UnicodeDecodeError included
        header = None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: the safetensors header is not valid JSON; {REDOWNLOAD}")
    payload, out = size - 8 - n, {}
    for name, v in header.items():
        if name == "__metadata__":
            continue
        try:
            t = Tensor(v["dtype"], tuple(int(d) for d in v["shape"]))
            begin, end = (int(o) for o in v["data_offsets"])
            ok = t.dtype in DTYPES and all(d >= 0 for d in t.shape) and end - begin == t.nbytes and begin >= 0
        except (KeyError, TypeError, ValueError):
            ok = False
        if not ok:
            raise CheckpointError(f"{path}: tensor {name} has a malformed header entry {v}; {REDOWNLOAD}")
        if end > payload:
            raise CheckpointError(f"{path}: tensor {name} needs bytes up to {end + 8 + n:,} but the file has "
                                  f"{size:,}; {REDOWNLOAD}")
        out[name] = Tensor(t.dtype, t.shape, 8 + n + begin, 8 + n + end)
    return out
