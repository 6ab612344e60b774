"""Pre-flight: every input and output of a command checked in the first second, before torch is imported or any
heavy work starts. Each failure is one ConfigError/CheckpointError line naming the object and the fix.

What is checked (the catalogue in docs/ERRORS.md has a test for each):
  paths     every path resolved (symlinks too); the output never equal to, inside, or containing an input; the
            output not a file, not the current directory or above it; an existing output is replaced only if
            inf-quant wrote it (its inf_quant.json; empty directories too); the nearest existing parent writable
  config    config.json parses and every field the code reads has its type and range (check_config): counts are
            ints > 0 (not "256", 256.9 or true), rope_theta / norm eps finite floats > 0, model_type a string
  shards    every shard's safetensors header parses, its tensors' byte ranges lie inside the file (a truncated
            download is caught here) and match dtype x shape; the index names only tensors its shards hold; a bf16
            input holds only BF16/F16/F32 tensors, exactly the layers 0..num_hidden_layers-1, and every tensor the
            config implies with its shape
  disk      free space >= the run's peak use on the output's file system x 1.1 (+ 64 MiB): the work directory's
            finished layers plus the assembled output (estimate_output_bytes)
  text      calibration / eval files are UTF-8, non-empty, records well-formed (tokens are counted after the
            tokenizer loads, still before the first layer)
Nothing here imports torch, transformers or safetensors.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import struct
from dataclasses import dataclass, field
from pathlib import Path

from .config import resolve_group_size
from .errors import CheckpointError, ConfigError
from .layermap import LayerMap, check_config, expected_tensors, layer_map_for

SAFE_INDEX = "model.safetensors.index.json"
SAFE_SINGLE = "model.safetensors"
PICKLES = ("pytorch_model.bin.index.json", "pytorch_model.bin", "model.pt", "pytorch_model.pt")
ITEMSIZE = {"BF16": 2, "F16": 2, "F32": 4, "F64": 8, "I8": 1, "U8": 1, "I16": 2, "U16": 2, "I32": 4, "U32": 4,
            "I64": 8, "U64": 8, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}
FLOAT_DTYPES = ("BF16", "F16", "F32")  # what an unquantized input checkpoint may hold
OUTPUT_MARKER = "inf_quant.json"       # in every output inf-quant writes (output.write_configs, export)
MAX_HEADER = 100 * 2**20   # the safetensors reference's own limit
DISK_MARGIN = 1.1
DISK_SLACK = 64 * 2**20
REDOWNLOAD = "the file is damaged or truncated; re-download or re-copy it"


@dataclass(frozen=True)
class Tensor:
    dtype: str
    shape: tuple[int, ...]
    start: int = field(default=0, compare=False)  # byte range of its data in the file (absolute offsets)
    stop: int = field(default=0, compare=False)

    @property
    def nbytes(self) -> int:
        n = ITEMSIZE[self.dtype]
        for d in self.shape:
            n *= d
        return n


@dataclass(frozen=True)
class CheckedCheckpoint:
    path: Path                  # resolved
    config: dict
    tensors: dict[str, Tensor]  # every tensor of every shard (empty for pickle checkpoints: not inspected)
    weight_map: dict[str, str]

    @property
    def bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())


def resolved(path: str | Path) -> Path:
    try:
        return Path(path).expanduser().resolve()
    except (RuntimeError, OSError) as e:  # a loop: RuntimeError before Python 3.13, OSError(ELOOP) after
        if isinstance(e, OSError) and e.errno != errno.ELOOP:
            raise ConfigError(f"{path}: cannot be resolved ({e.strerror}); pass a path you can read") from None
        raise ConfigError(f"{path}: a symlink loop (following its links comes back to itself); fix or remove the "
                          "link, or pass the real directory") from None


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
        assert isinstance(header, dict)
    except (ValueError, AssertionError):
        raise CheckpointError(f"{path}: the safetensors header is not valid JSON; {REDOWNLOAD}") from None
    payload, out = size - 8 - n, {}
    for name, v in header.items():
        if name == "__metadata__":
            continue
        try:
            t = Tensor(v["dtype"], tuple(int(d) for d in v["shape"]))
            begin, end = (int(o) for o in v["data_offsets"])
            ok = t.dtype in ITEMSIZE and all(d >= 0 for d in t.shape) and end - begin == t.nbytes and begin >= 0
        except (KeyError, TypeError, ValueError):
            ok = False
        if not ok:
            raise CheckpointError(f"{path}: tensor {name} has a malformed header entry {v}; {REDOWNLOAD}")
        if end > payload:
            raise CheckpointError(f"{path}: tensor {name} needs bytes up to {end + 8 + n:,} but the file has "
                                  f"{size:,}; {REDOWNLOAD}")
        out[name] = Tensor(t.dtype, t.shape, 8 + n + begin, 8 + n + end)
    return out


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
        return CheckedCheckpoint(p, config, {}, {})
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
    ck = CheckedCheckpoint(p, config, tensors, wm)
    if bf16_input:
        check_tensors(ck, layer_map_for(config.get("model_type", "")))
    return ck


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


def check_output(out: str | Path, inputs: dict[str, Path], force: bool, resume: bool = False,
                 what: str = "--out", replaced: bool = True) -> Path:
    """The resolved output directory: not an input, not inside or around one, not a file, its parent writable,
    not already there unless force/resume. replaced: the run swaps the whole directory for its result (quantize,
    export), so an existing one must be an inf-quant output (OUTPUT_MARKER) or empty, and it may not be the current
    directory or one above it; otherwise (verify --report, release) files are written into it."""
    o = resolved(out)
    for label, inp in inputs.items():
        i = resolved(inp)
        if o == i:
            raise ConfigError(f"{what} {out} is the {label} itself; writing there would destroy it: choose "
                              "another output directory")
        if o.is_relative_to(i) and i.is_dir():
            raise ConfigError(f"{what} {out} lies inside the {label} {inp}; choose an output directory outside it")
        if i.is_relative_to(o):
            raise ConfigError(f"{what} {out} contains the {label} {inp}; replacing it would destroy the input: "
                              "choose another output directory")
    if o.exists() and not o.is_dir():
        raise ConfigError(f"{what} {out} is a file, not a directory; remove it or choose another output directory")
    try:
        cwd = Path.cwd().resolve()
    except OSError:  # the working directory was removed: nothing of it to protect
        cwd = None
    if replaced and cwd is not None and cwd.is_relative_to(o):
        raise ConfigError(f"{what} {out} is the current directory or one above it ({cwd}); the finished output "
                          "replaces that directory by a rename, which would pull it out from under this shell: "
                          "choose a new directory, e.g. --out ./quantized")
    foreign = replaced and o.is_dir() and not (o / OUTPUT_MARKER).is_file() and any(o.iterdir())
    if foreign:
        raise ConfigError(f"{what} {out} already exists and is not an inf-quant output (no {OUTPUT_MARKER} in it); "
                          "inf-quant replaces only directories it wrote, even with --force: remove it yourself or "
                          f"choose another {what}")
    if o.exists() and not (force or resume):
        raise ConfigError(f"{out} already exists; pass --force to replace it, or choose another {what}")
    parent = o.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise ConfigError(f"{what} {out}: {parent} is a file, not a directory; choose another output directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ConfigError(f"{what} {out}: {parent} is not writable (read-only or no permission); choose an output "
                          "directory you can write")
    return o


def check_disk(out: Path, need: int, what: str) -> None:
    """Free space on out's file system >= need x DISK_MARGIN + DISK_SLACK."""
    parent = out
    while not parent.exists():
        parent = parent.parent
    free = shutil.disk_usage(parent).free
    want = int(need * DISK_MARGIN) + DISK_SLACK
    if free < want:
        raise ConfigError(f"{out}: {what} needs about {want / 1e9:.2f} GB free on {parent}'s file system "
                          f"({need / 1e9:.2f} GB estimated x {DISK_MARGIN} + 64 MiB), {free / 1e9:.2f} GB is free; "
                          "free space or choose --out on another disk")


def estimate_output_bytes(ck: CheckedCheckpoint, lmap: LayerMap, method: str, bits: int,
                          group_size: int) -> tuple[int, int]:
    """(bytes of the quantized checkpoint's tensors, bytes of its quantized linears alone): codes bits/8 per weight,
    fp16 scales and packed zeros per group, int32 g_idx per column (GPTQ); other tensors as stored."""
    linears = {f"{lmap.block_prefix(i)}{n}.weight" for i in range(int(ck.config["num_hidden_layers"]))
               for n in lmap.linears}
    quant = other = 0
    for name, t in ck.tensors.items():
        if name not in linears:
            other += t.nbytes
            continue
        n, k = t.shape
        groups = 1 if group_size == -1 else k // group_size
        quant += n * k * bits // 8 + groups * n * 2 + groups * n * bits // 8 + (4 * k if method == "gptq" else 0)
    return other + quant, quant


def resolve_skip(skip, lmap: LayerMap, num_layers: int, method: str) -> frozenset[str]:
    """Full names (model.layers.<i>.<linear>) of the linears a recipe's `skip` leaves in bf16.

    GPTQ takes layer-relative names only: transformers' GPTQ loader (optimum) honours `modules_in_block_to_quantize`,
    one list for every layer, and ignores GPTQModel's per-module `dynamic`, so a one-layer skip would load wrongly
    there. AWQ's `modules_to_not_convert` takes either."""
    out = set()
    pattern = re.compile(rf"{re.escape(lmap.blocks)}\.(\d+)\.(.+)")
    for name in skip:
        m = pattern.fullmatch(name)
        rel, layers = (m.group(2), [int(m.group(1))]) if m else (name, range(num_layers))
        if rel not in lmap.linears:
            raise ConfigError(f"skip: {name!r} is not a quantized linear; use one of {', '.join(lmap.linears)} "
                              f"(every layer) or {lmap.blocks}.<i>.<name>")
        if m and method == "gptq":
            raise ConfigError(f"skip: {name!r} names one layer, but GPTQ outputs can only skip a module in every "
                              f"layer (transformers' GPTQ loader takes one list for all layers); use {rel!r}")
        if m and int(m.group(1)) >= num_layers:
            raise ConfigError(f"skip: {name!r}: the model has layers 0..{num_layers - 1}")
        out.update(f"{lmap.block_prefix(i)}{rel}" for i in layers)
    if len(out) == num_layers * len(lmap.linears):
        raise ConfigError("skip: every linear would be skipped; nothing would be quantized")
    return frozenset(out)


def check_group_sizes(ck: CheckedCheckpoint, lmap: LayerMap, method: str, group_size: int, skip=()) -> None:
    """Every quantized linear's in_features divides by the group size, and both dims pack into int32 words."""
    for i in range(int(ck.config["num_hidden_layers"])):
        for name in lmap.linears:
            full = f"{lmap.block_prefix(i)}{name}"
            t = ck.tensors.get(f"{full}.weight")
            if t is None or full in skip:
                continue
            n, k = t.shape
            resolve_group_size(k, group_size, full)
            if n % 8 or k % 8:
                raise ConfigError(f"{full}: shape [{n}, {k}] cannot be packed ({method} needs out and in features "
                                  "divisible by 8); this model cannot be written in GPTQ/AWQ int32 packing")


@dataclass(frozen=True)
class QuantizePlan:
    model_dir: Path
    checkpoint: CheckedCheckpoint
    out_dir: Path
    output_bytes: int   # estimated size of the written checkpoint
    disk_bytes: int     # estimated peak disk use of the run (work layers + assembled output)
    skip: frozenset = frozenset()  # full names of the linears left in bf16


def _calib_files(source: str) -> tuple[tuple[Path, ...], bool]:
    from .calibrate import MIXES, calibration_files

    return calibration_files(source), source not in MIXES


def check_quantized_head(config: dict, layout: str, what: str) -> None:
    """A GPTQ lm_head only where every loader of the output computes with it: an INF checkpoint in the inflm layout
    (vLLM through integrations/vllm; transformers through the modeling code copied into the output). transformers'
    GPTQ loader converts block linears only, so its own StableLM / Llama classes would leave the head randomly
    initialised with nothing but a warning."""
    if config.get("model_type") != "inflm":
        raise ConfigError(f"{what}: a quantized lm_head is written only for INF (model_type inflm) checkpoints; "
                          f"this one is model_type {config.get('model_type')!r}, whose transformers class would load "
                          f"the head randomly initialised; drop {what}")
    if layout != "inflm":
        raise ConfigError(f"{what}: a quantized lm_head needs the inflm layout (its modeling code dequantizes the "
                          f"head; transformers' StableLM would load it randomly initialised); drop --serve-as {layout} "
                          f"or {what}")


def for_quantize(recipe) -> QuantizePlan:
    """Everything a gptq/awq run needs checked before it starts (module docstring)."""
    from .paths import default_out_dir, resolve_model_path
    from .calibrate import check_text_file

    model_dir = resolve_model_path(recipe.model.path)
    ck = check_checkpoint(model_dir, recipe.model.allow_pickle, what="--model")
    lmap = layer_map_for(ck.config.get("model_type", ""))
    skip = resolve_skip(recipe.skip, lmap, int(ck.config["num_hidden_layers"]), recipe.method.value)
    check_group_sizes(ck, lmap, recipe.method.value, recipe.group_size, skip)
    if recipe.method.value == "gptq" and recipe.gptq.lm_head:
        check_quantized_head(ck.config, recipe.output.serve_as.value, "--lm-head")
    max_pos = int(ck.config.get("max_position_embeddings") or 2048)
    if recipe.calibration.seqlen > max_pos:
        raise ConfigError(f"--seqlen {recipe.calibration.seqlen} exceeds the model's max_position_embeddings="
                          f"{max_pos}; use <= {max_pos}")
    files, user = _calib_files(recipe.calibration.source)
    for f in files:
        check_text_file(f, "calibration file", chat=True)
    out = Path(recipe.output.dir) if recipe.output.dir else default_out_dir(model_dir, recipe)
    inputs = {"input model": model_dir, **({"calibration file": files[0]} if user else {})}
    o = check_output(out, inputs, recipe.output.force, recipe.output.resume)
    total, quant = estimate_output_bytes(ck, lmap, recipe.method.value, recipe.bits, recipe.group_size)
    if ck.tensors:
        check_disk(o, total + quant, "the quantization")
    return QuantizePlan(model_dir, ck, out, total, total + quant, skip)


def for_verify(cfg) -> None:
    """verify: the quantized checkpoint and its baseline parse, the eval text is usable."""
    from .calibrate import check_text_file, resolve_text_file
    from .paths import resolve_model_path

    q = check_checkpoint(cfg.quantized, bf16_input=False, what="quantized checkpoint")
    if "quantization_config" not in q.config:
        raise CheckpointError(f"{cfg.quantized}: config.json has no quantization_config; this is not a quantized "
                              "checkpoint")
    b = check_checkpoint(resolve_model_path(cfg.baseline), bf16_input=False, what="--baseline")
    if "quantization_config" in b.config:
        raise CheckpointError(f"{cfg.baseline}: the baseline is itself quantized; pass the bf16 source checkpoint")
    check_tensors(b, layer_map_for(b.config.get("model_type", "")))
    check_text_file(resolve_text_file(cfg.eval), "eval file", chat=False)
    if cfg.report_dir:
        check_output(cfg.report_dir, {"baseline": resolve_model_path(cfg.baseline)}, force=True, what="--report",
                     replaced=False)


def for_export(src: str, out: str, force: bool) -> Path:
    check_checkpoint(src, bf16_input=False, what="source checkpoint")
    return check_output(out, {"source checkpoint": Path(src)}, force)


def for_release(recipes: list, out: str) -> Path:
    """release: every recipe's model and calibration, and the release directory (which may exist: --resume)."""
    from .calibrate import check_text_file
    from .paths import resolve_model_path

    inputs, seen = {}, {}
    for r in recipes:
        mdir = resolve_model_path(r.model.path)
        if mdir not in seen:
            seen[mdir] = check_checkpoint(mdir, r.model.allow_pickle, what=f"recipe {r.name}: model")
        ck = seen[mdir]
        lmap = layer_map_for(ck.config.get("model_type", ""))
        skip = resolve_skip(r.skip, lmap, int(ck.config["num_hidden_layers"]), r.method.value)
        check_group_sizes(ck, lmap, r.method.value, r.group_size, skip)
        if r.method.value == "gptq" and r.gptq.lm_head:
            check_quantized_head(ck.config, r.output.serve_as.value, f"recipe {r.name}: gptq.lm_head")
        inputs[f"recipe {r.name}'s model"] = mdir
        files, user = _calib_files(r.calibration.source)
        for f in files:
            check_text_file(f, f"recipe {r.name}: calibration file", chat=True)
        if user:
            inputs[f"recipe {r.name}'s calibration file"] = files[0]
    o = check_output(out, inputs, force=True, what="--out", replaced=False)
    check_release_dir(o, out, [r.name for r in recipes])
    return o


def check_release_dir(o: Path, out: str, names: list[str]) -> None:
    """release writes into --out and replaces its variants <name>/: an existing --out must be a release directory
    (manifest.json, or the .staging of an interrupted first release) or empty, and each existing variant an
    inf-quant output."""
    if not o.is_dir() or not any(o.iterdir()):
        return
    if not ((o / "manifest.json").is_file() or (o / ".staging").is_dir()):
        raise ConfigError(f"--out {out} already exists and is not an inf-quant release directory (no manifest.json "
                          "in it); release writes only into its own directories: remove it yourself or choose "
                          "another --out")
    for name in names:
        v = o / name
        if v.exists() and not (v / OUTPUT_MARKER).is_file():
            raise ConfigError(f"--out {out}: {v} is not a variant inf-quant published (no {OUTPUT_MARKER} in it) but "
                              f"would be replaced by recipe {name}: remove it yourself or choose another --out")
