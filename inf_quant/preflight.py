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
Each job has its module: checkpoint.py (config, index, shard headers through shards.py, the tensors a bf16 input
must hold), outdir.py (paths, replacement, disk) and here the recipe's own checks (skip, group sizes, lm_head,
sequence length, the estimated output size) and one entry point per command, whose plan carries the parsed
checkpoint on to the command so its headers are read once. Nothing here imports torch, transformers or safetensors.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from .core.config import resolve_group_size
from .core.errors import CheckpointError, ConfigError
from .core.paths import default_out_dir, resolve_model_path
from .read.checkpoint import CheckedCheckpoint, check_checkpoint, check_tensors
from .read.layermap import LayerMap, layer_map_for
from .save.outdir import check_disk, check_output, check_release_dir


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
    from .data.calibrate import MIXES, calibration_files

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
    from .data.calibrate import check_text_file

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


@dataclass(frozen=True)
class VerifyPlan:
    quantized: CheckedCheckpoint  # cfg.quantized
    baseline: CheckedCheckpoint   # cfg.baseline (resolved: "bundled" is the bundled model)


def for_verify(cfg) -> VerifyPlan:
    """verify: the quantized checkpoint and its baseline parse, the eval text is usable."""
    from .data.calibrate import check_text_file, resolve_text_file

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
    return VerifyPlan(q, b)


def for_export(src: str, out: str, force: bool) -> CheckedCheckpoint:
    """export: the source checkpoint parses (returned, for export_layout) and the output may be written."""
    ck = check_checkpoint(src, bf16_input=False, what="source checkpoint")
    check_output(out, {"source checkpoint": Path(src)}, force)
    return ck


def for_release(recipes: list, out: str) -> Path:
    """release: every recipe's model and calibration, and the release directory (which may exist: --resume)."""
    from .data.calibrate import check_text_file

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
