"""The block loop: load one decoder layer, calibrate, quantize, propagate, save, free.

Layer i is calibrated on the outputs of the already-quantized layers 0..i-1 (sequential). Inside a layer, GPTQ takes
the linear groups of the layer map in order, each seeing the earlier groups quantized (true sequential), each group
solved as one stacked problem (its linears share H); the MLP groups capture from the attention half's output,
computed once (LayerMap.halves), and the MLP half's output, written over it, is the layer's output. AWQ searches
every group's scale first, then quantizes the scaled layer the same way (solve=gptq) or by AutoAWQ's rounding
(see awq_block). Memory is one decoder layer + the calibration activations [S, T, D] (twice: inputs and outputs)
+ one group's H and its stacked weights.
Finished layers are saved to a work directory, so `resume` rebuilds them from disk instead of re-solving.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from . import output, preflight
from .calibrate import calibration_files, document_ids, files_sha256, sample_windows
from .config import Device, DType, Method, Recipe
from .errors import CheckpointError, ConfigError
from .export import check_layout
from .layermap import LayerMap
from .load import Checkpoint, hf_config, load_block, load_named, open_checkpoint, rotary, skeleton
from .memory import PeakMemory
from .lock import output_lock
from .qformat import from_tensors, to_tensors
from .quant.gptq import accumulate_hessian, gptq_quantize
from .tokenizer import load_tokenizer

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LayerResult:
    index: int
    seconds: float
    losses: dict[str, float]  # proxy loss per quantized linear (GPTQ) or output MSE (AWQ)
    notes: tuple[str, ...]    # adjustments made in this layer (damping raised, folds skipped)
    peak_rss: int             # bytes, process peak so far
    peak_vram: int            # bytes, torch peak allocated so far (0 on CPU)
    resumed: bool             # rebuilt from the work directory, not re-quantized
    scales: dict[str, tuple[str, float]] = field(default_factory=dict)  # AWQ: group -> chosen (form, alpha)


@dataclass(frozen=True)
class Context:
    """Everything resolved before the first layer: validated inputs and calibration batches."""

    recipe: Recipe
    model_dir: Path
    ckpt: Checkpoint
    config: object
    lmap: LayerMap
    device: torch.device
    dtype: torch.dtype
    ids: torch.Tensor        # [S, T] int64 calibration windows
    calib_sha256: str
    out_dir: Path
    skip: frozenset = frozenset()  # full names of linears left in bf16 (recipe.skip, resolved)


def resolve_device(dev: Device, dtype: DType = DType.AUTO) -> tuple[torch.device, torch.dtype]:
    """The compute device and forward dtype; AUTO dtype is bf16 on CUDA, fp32 on CPU (exact upcast of bf16)."""
    if dev is Device.CUDA and not torch.cuda.is_available():
        raise ConfigError("--device cuda was requested but torch sees no CUDA device; use --device cpu")
    if dev is Device.AUTO:
        dev = Device.CUDA if torch.cuda.is_available() else Device.CPU
    device = torch.device(dev.value)
    if dtype is DType.AUTO:
        return device, torch.bfloat16 if device.type == "cuda" else torch.float32
    return device, getattr(torch, dtype.value)


def prepare(recipe: Recipe) -> Context:
    """Pre-flight (preflight.for_quantize: paths, shards, disk, text), then the config, tokenizer and windows."""
    plan = preflight.for_quantize(recipe)
    model_dir, out_dir = plan.model_dir, plan.out_dir
    ckpt = open_checkpoint(model_dir, recipe.model.allow_pickle)
    lmap = ckpt.layer_map
    config = hf_config(ckpt, recipe.model.trust_remote_code)
    check_layout(ckpt.config, recipe.output.serve_as, str(model_dir))
    device, dtype = resolve_device(recipe.run.device, recipe.run.dtype)
    max_pos = int(getattr(config, "max_position_embeddings", 2048))
    seqlen = recipe.calibration.seqlen or min(2048, max_pos)
    calib_files = calibration_files(recipe.calibration.source)
    sha = files_sha256(calib_files)
    if recipe.calibration.sha256 and sha != recipe.calibration.sha256:
        raise ConfigError(f"calibration {' + '.join(map(str, calib_files))} has sha256 {sha}, the recipe expects "
                          f"{recipe.calibration.sha256}; restore the file or update the recipe")
    tok = load_tokenizer(model_dir, recipe.model.trust_remote_code)
    docs = document_ids(tok, calib_files)
    top = max(max(d) for d in docs)
    if top >= config.vocab_size:
        raise CheckpointError(f"{model_dir}: the tokenizer produces id {top} but the model's "
                              f"vocab_size is {config.vocab_size}; the tokenizer files do not belong to this model")
    log.info("calibration: %d documents, %d tokens; %d windows of %d tokens; output about %.2f GB, peak disk "
             "about %.2f GB", len(docs), sum(map(len, docs)), recipe.calibration.samples, seqlen,
             plan.output_bytes / 1e9, plan.disk_bytes / 1e9)
    ids = sample_windows(docs, recipe.calibration.samples, seqlen, recipe.calibration.seed)
    return Context(recipe, model_dir, ckpt, config, lmap, device, dtype, ids, sha, out_dir, plan.skip)


class _Stop(Exception):
    """Raised by a capture hook: nothing after the hooked module is needed for this pass."""


def run_block(block: nn.Module, x: torch.Tensor, rope: tuple) -> torch.Tensor:
    """One decoder layer on x: [B, T, D]; causal attention (no padding), positions 0..T-1."""
    cos, sin = rope
    pos = torch.arange(x.shape[1], device=x.device)[None]
    out = block(x, attention_mask=None, position_embeddings=(cos, sin), position_ids=pos)
    return out[0] if isinstance(out, tuple) else out


def run_half(block: nn.Module, half: tuple[str, str], x: torch.Tensor, rope: tuple) -> torch.Tensor:
    """One residual half of a decoder layer (LayerMap.halves): x + module(norm(x)), x: [B, T, D]. The two halves
    in order are exactly run_block (tested)."""
    norm, name = half
    h = block.get_submodule(norm)(x)
    if name.endswith("attn"):
        cos, sin = rope
        pos = torch.arange(x.shape[1], device=x.device)[None]
        h = block.get_submodule(name)(hidden_states=h, attention_mask=None, position_ids=pos,
                                      position_embeddings=(cos, sin))[0]
    else:
        h = block.get_submodule(name)(h)
    return x + h


def forward_all(block: nn.Module, hidden: torch.Tensor, rope: tuple, batch: int) -> torch.Tensor:
    """The layer's outputs for all calibration samples, in chunks: [S, T, D] (a new tensor)."""
    return torch.cat([run_block(block, hidden[s: s + batch], rope) for s in range(0, len(hidden), batch)])


def capture_inputs(block: nn.Module, module: nn.Module, hidden: torch.Tensor, rope: tuple, batch: int,
                   consume: Callable[[torch.Tensor], None], run: Callable | None = None) -> None:
    """Feed `module`'s input, chunk by chunk, to `consume`; each pass stops right after that input is seen.
    run(chunk): what is run on each chunk of `hidden` (default: the whole layer, run_block)."""

    def hook(_mod, args):
        consume(args[0])
        raise _Stop

    run = run or (lambda x: run_block(block, x, rope))
    handle = module.register_forward_pre_hook(hook)
    try:
        for s in range(0, len(hidden), batch):
            try:
                run(hidden[s: s + batch])
            except _Stop:
                pass
    finally:
        handle.remove()


def _half_of(lmap: LayerMap, group) -> int:
    return next(k for k, (_, name) in enumerate(lmap.halves) if group.names[0].startswith(name + "."))


def gptq_block(ctx: Context, block: nn.Module, i: int, hidden: torch.Tensor, rope: tuple, cfg=None,
               method: Method = Method.GPTQ):
    """Quantize one layer with GPTQ, group by group; the block's weights become their dequantized values.
    cfg/method: another grid and format (AWQ's solve=gptq: its scaled weights, asymmetric, the AWQ gemm format)."""
    tensors, losses, notes = {}, {}, []
    cfg = cfg or ctx.recipe.gptq
    batch = ctx.recipe.run.forward_batch
    # Each half's groups capture from that half's input: the layer input for attention, and for the MLP the
    # attention half's output, computed once after its groups are quantized (not re-run per capture). The last
    # half's output, written in place over its input, is the layer's output.
    x, done = hidden, 0
    for group in ctx.lmap.groups:
        k = _half_of(ctx.lmap, group)
        while done < k:  # the halves before this group's, with their groups quantized
            x = _run_half_all(block, ctx.lmap.halves[done], x, rope, batch, in_place=x is not hidden)
            done += 1
        mods = [block.get_submodule(n) for n in group.names]
        kept = {n for n in group.names if f"{ctx.lmap.block_prefix(i)}{n}" in ctx.skip}
        for name, mod in zip(group.names, mods):
            if name in kept:
                full = f"{ctx.lmap.block_prefix(i)}{name}"
                tensors[f"{full}.weight"] = keep_bf16(ctx, mod, f"{full}.weight")
        if len(kept) == len(mods):
            continue
        state = {"h": None, "n": 0}

        def consume(x, state=state):
            state["h"], state["n"] = accumulate_hessian(state["h"], state["n"], x)

        half = ctx.lmap.halves[k]
        capture_inputs(block, mods[0], x, rope, batch, consume, run=lambda c, half=half: run_half(block, half, c, rope))
        solved = [(n, m) for n, m in zip(group.names, mods) if n not in kept]
        label = f"{ctx.lmap.block_prefix(i)}{'+'.join(n for n, _ in solved)}"
        # one solve for the group: the linears share H, rows are independent (same codes as one by one)
        stacked = gptq_quantize(torch.cat([m.weight.float() for _, m in solved]), state["h"], cfg, name=label)
        if stacked.damp > cfg.damp:
            notes.append(f"{label}: damping raised to {stacked.damp:g}")
        for (name, mod), q in zip(solved, stacked.split_rows([m.out_features for _, m in solved])):
            full = f"{ctx.lmap.block_prefix(i)}{name}"
            t = to_tensors(q, method, full)
            tensors.update({f"{full}.{k}": v for k, v in t.items()})
            set_weight(mod, from_tensors(t, method, cfg.bits, mod.in_features))
            losses[name] = q.proxy_loss
        del state
    while done < len(ctx.lmap.halves):
        x = _run_half_all(block, ctx.lmap.halves[done], x, rope, batch, in_place=x is not hidden)
        done += 1
    return tensors, losses, notes, x


def _run_half_all(block: nn.Module, half, x: torch.Tensor, rope: tuple, batch: int, in_place: bool) -> torch.Tensor:
    """run_half over all samples in chunks of `batch`; in_place writes over x (a tensor this layer owns)."""
    out = x if in_place else torch.empty_like(x)
    for s in range(0, len(x), batch):
        out[s: s + batch] = run_half(block, half, x[s: s + batch], rope)
    return out


def keep_bf16(ctx: Context, mod: nn.Linear, name: str) -> torch.Tensor:
    """A skipped linear's weight as written: the checkpoint's dtype (an AWQ scale may have gone into it); the
    module then computes with exactly that, as a resumed run (which reads it back) would."""
    stored = mod.weight.detach().to(ctx.ckpt.info(name).dtype).cpu()
    set_weight(mod, stored)
    return stored


def set_weight(mod: nn.Linear, w: torch.Tensor) -> None:
    mod.weight.data = w.to(device=mod.weight.device, dtype=mod.weight.dtype)


def apply_saved(ctx: Context, block: nn.Module, i: int, tensors: dict[str, torch.Tensor]) -> None:
    """Give a freshly loaded block the weights a finished (saved) layer stands for."""
    method = ctx.recipe.method
    for name in ctx.lmap.linears:
        full = f"{ctx.lmap.block_prefix(i)}{name}"
        mod = block.get_submodule(name)
        t = {k.rsplit(".", 1)[1]: v for k, v in tensors.items() if k.rsplit(".", 1)[0] == full}
        set_weight(mod, t["weight"] if full in ctx.skip else from_tensors(t, method, ctx.recipe.bits, mod.in_features))
    prefix = ctx.lmap.block_prefix(i)
    for k, v in tensors.items():  # non-linear tensors a method changed (AWQ-folded norms)
        rel = k[len(prefix):]
        if not any(rel.startswith(n + ".") for n in ctx.lmap.linears):
            block.get_parameter(rel).data = v.to(block.get_parameter(rel))


def quantize_layer(ctx: Context, block: nn.Module, i: int, hidden: torch.Tensor, rope: tuple):
    """(checkpoint tensors, losses, notes, AWQ scale per group, the layer's output [S, T, D] or None) for one
    layer; None: the caller runs the quantized layer (forward_all)."""
    if ctx.recipe.method is Method.GPTQ:
        tensors, losses, notes, out = gptq_block(ctx, block, i, hidden, rope)
        return tensors, losses, notes, {}, out
    from .awq_block import awq_block

    return awq_block(ctx, block, i, hidden, rope)


def quantize(recipe: Recipe, progress: Callable[[LayerResult, int], None] | None = None) -> output.QuantizeReport:
    """Quantize recipe.model with recipe.method into recipe.output.dir (atomically). See module docstring."""
    t0 = time.monotonic()
    ctx = prepare(recipe)
    with output_lock(ctx.out_dir):
        work = output.open_work_dir(ctx)
        try:
            results, peak = _layers(ctx, work, progress)
            return output.publish(ctx, work, results, time.monotonic() - t0, peak)
        except BaseException as e:
            output.abandon(work, e)
            raise


def _layers(ctx: Context, work: output.WorkDir, progress) -> tuple[list[LayerResult], PeakMemory]:
    recipe = ctx.recipe
    peak = PeakMemory(ctx.device)
    skel = skeleton(ctx.config)
    rope_mod = rotary(ctx.config, ctx.device)
    with torch.no_grad():
        embed = load_named(ctx.ckpt, skel, ctx.lmap.embed, ctx.device, ctx.dtype)
        hidden = embed(ctx.ids.to(ctx.device))  # [S, T, D]; e.g. 128 x 2048 x 8192 bf16 = 4 GiB for INF-34B
        del embed
        rope = rope_mod(hidden[:1], torch.arange(hidden.shape[1], device=ctx.device)[None])
        results = []
        for i in range(ctx.ckpt.num_layers):
            t_layer = time.monotonic()
            block = load_block(ctx.ckpt, skel, i, ctx.device, ctx.dtype)
            saved = work.layer_file(i)
            out = None
            if saved.is_file():
                apply_saved(ctx, block, i, load_file(saved))
                losses, notes, scales, resumed = {}, [], {}, True
            else:
                tensors, losses, notes, scales, out = quantize_layer(ctx, block, i, hidden, rope)
                work.save_layer(i, tensors, ctx)
                resumed = False
            hidden = out if out is not None else forward_all(block, hidden, rope, recipe.run.forward_batch)
            del block
            rss, vram = peak.read()
            results.append(LayerResult(i, time.monotonic() - t_layer, losses, tuple(notes), rss, vram, resumed, scales))
            if progress:
                progress(results[-1], ctx.ckpt.num_layers)
        del hidden
    for line in summarize_notes([n for r in results for n in r.notes]):
        log.warning(line)
    if any(r.scales for r in results):
        from .awq_block import scale_summary

        log.info("AWQ scales: %s", scale_summary([r.scales for r in results if r.scales]))
    return results, peak


def summarize_notes(notes: list[str]) -> list[str]:
    """Per-layer adjustments, one line per kind: 'model.layers.*.x: what (in 48 layers: 0-47)'."""
    kinds: dict[str, list[int]] = {}
    for n in notes:
        m = re.search(r"\.layers\.(\d+)\.", n)
        key = re.sub(r"\.layers\.\d+\.", ".layers.*.", n) if m else n
        kinds.setdefault(key, []).append(int(m.group(1)) if m else -1)
    return [f"{k} (in {len(v)} layer{'s' * (len(v) > 1)}: {_ranges(v)})" if v[0] >= 0 else k
            for k, v in kinds.items()]


def _ranges(idx: list[int]) -> str:
    idx, out = sorted(set(idx)), []
    for i in idx:
        if out and i == out[-1][1] + 1:
            out[-1][1] = i
        else:
            out.append([i, i])
    return ", ".join(f"{a}" if a == b else f"{a}-{b}" for a, b in out)


__all__ = ["quantize", "prepare", "LayerResult", "Context"]
