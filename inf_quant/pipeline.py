"""The block loop: load one decoder layer, calibrate, quantize, propagate, save, free.

Layer i is calibrated on the outputs of the already-quantized layers 0..i-1 (sequential); the quantization of one
layer is gptq_block.py or awq_block.py (twins), its forward passes forward.py. Memory is one decoder layer + the
calibration activations [S, T, D] (twice: the layer's input and its output buffer) + one group's H and its stacked
weights and solve workspace, + on the host the next layer as stored (memory.expected_quantize_peak states it).
I/O overlaps the compute: the next layer is read from the shards on a background thread (load.LayerReader) and a
finished layer's packed tensors (packed on the device, qformat.py) are copied to the host once and written to the
work directory on another (output.LayerWriter), so `resume` rebuilds finished layers from disk instead of
re-solving.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable
from dataclasses import replace

import torch
from safetensors.torch import load_file
from torch import nn

from . import preflight
from .core.config import Method, Recipe
from .core.errors import CheckpointError, ConfigError
from .core.hashing import files_sha256
from .data.calibrate import calibration_files, document_ids, sample_windows
from .data.tokenizer import load_tokenizer
from .engine.awq_block import awq_block, scale_summary, smooth_block
from .engine.context import BlockResult, Context, LayerResult
from .engine.device import resolve_device
from .engine.forward import forward_all
from .engine.gptq_block import gptq_block, set_weight
from .engine.head import HEAD, quantize_head
from .engine.memory import (MEMORY_MARGIN, Expected, PeakMemory, available_bytes, expected_quantize_peak, gib,
                            largest_fitting)
from .quant.qformat import from_tensors
from .read.layout import check_layout
from .read.load import Checkpoint, LayerReader, embed_ids, hf_config, open_checkpoint, rotary, skeleton
from .save import output
from .save.lock import output_lock

log = logging.getLogger(__name__)


def prepare(recipe: Recipe, plan: preflight.QuantizePlan | None = None) -> Context:
    """Pre-flight (preflight.for_quantize: paths, shards, disk, text; unless its plan is given), then the config,
    tokenizer and windows."""
    plan = plan or preflight.for_quantize(recipe)
    model_dir, out_dir = plan.model_dir, plan.out_dir
    ckpt = open_checkpoint(model_dir, recipe.model.allow_pickle, plan.checkpoint)  # pre-flight's headers
    lmap = ckpt.layer_map
    config = hf_config(ckpt, recipe.model.trust_remote_code)
    check_layout(ckpt.config, recipe.output.serve_as, str(model_dir))
    device, dtype = resolve_device(recipe.run.device, recipe.run.dtype, recipe.run.gpu)
    if recipe.run.unproven_cuda and device.type != "cuda":
        raise ConfigError(f"--unproven-cuda {' '.join(p.value for p in recipe.run.unproven_cuda)} names CUDA-only "
                          f"paths but this run is on {device.type}; drop it or use --device cuda")
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
    refuse_if_too_big(recipe, ckpt, device, dtype, seqlen)
    ids = sample_windows(docs, recipe.calibration.samples, seqlen, recipe.calibration.seed)
    return Context(recipe, model_dir, ckpt, config, lmap, device, dtype, ids, sha, out_dir, plan.skip)


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


def quantize_layer(ctx: Context, block: nn.Module, i: int, hidden: torch.Tensor, rope: tuple) -> BlockResult:
    """Layer i quantized by the recipe's method: gptq_block or awq_block, the twins (same arguments, same result);
    where GPTQ smooths (gptq.smooth: awq, or auto at 4 bits), AWQ's scales searched on GPTQ's grid are folded in
    first (awq_block.smooth_block)."""
    if ctx.recipe.method is Method.AWQ:
        return awq_block(ctx, block, i, hidden, rope)
    if not ctx.recipe.gptq.smooths:
        return gptq_block(ctx, block, i, hidden, rope)
    folded, notes, scales = smooth_block(ctx, block, i, hidden, rope)
    done = gptq_block(ctx, block, i, hidden, rope)
    return replace(done, tensors={**done.tensors, **folded}, notes=(*notes, *done.notes), scales=scales)


def quantize(recipe: Recipe, progress: Callable[[LayerResult, int], None] | None = None) -> output.QuantizeReport:
    """Quantize recipe.model with recipe.method into recipe.output.dir (atomically). See module docstring. The
    output's lock is taken right after pre-flight, before the tokenizer or any tensor is read."""
    t0 = time.monotonic()
    plan = preflight.for_quantize(recipe)
    with output_lock(plan.out_dir):
        return quantize_locked(recipe, plan, progress, t0)


def quantize_locked(recipe: Recipe, plan: preflight.QuantizePlan, progress=None,
                    t0: float | None = None) -> output.QuantizeReport:
    """quantize() for a caller that ran pre-flight (plan) and holds the output lock (lock.output_lock(plan.out_dir)),
    as the CLI does before importing torch."""
    t0 = time.monotonic() if t0 is None else t0
    ctx = prepare(recipe, plan)
    work = output.open_work_dir(ctx)
    try:
        results, peak = _layers(ctx, work, progress)
        return output.publish(ctx, work, results, time.monotonic() - t0, peak)
    except BaseException as e:
        output.abandon(work, e)
        raise


def expected_peak(ctx: Context) -> Expected:
    """memory.expected_quantize_peak for this run's shapes and settings (device bytes beyond the process' base)."""
    S, T = ctx.ids.shape
    return _expected(ctx.recipe, ctx.ckpt, ctx.device, ctx.dtype, S, T)


def _expected(r: Recipe, ckpt: Checkpoint, device: torch.device, dtype: torch.dtype, S: int, T: int) -> Expected:
    tokens = r.awq.search_tokens if r.method is Method.AWQ else r.gptq.smooth_tokens if r.gptq.smooths else 0
    awq = min(S, max(1, tokens // T)) if tokens else 0   # AWQ's scale search's captures (also GPTQ's smoothing)
    return expected_quantize_peak(ckpt.layer_map, ckpt.config, S, T, r.run.forward_batch, dtype.itemsize,
                                  flash_attention=True, awq_samples=awq, on_host=device.type == "cpu",
                                  lm_head=r.method is Method.GPTQ and r.gptq.lm_head)


def refuse_if_too_big(r: Recipe, ckpt: Checkpoint, device: torch.device, dtype: torch.dtype, seqlen: int) -> None:
    """Memory foreseen is memory enforced: before the windows are drawn, a run whose expected peak exceeds the
    memory available on its device (memory.available_bytes) by more than MEMORY_MARGIN is a ConfigError naming
    the flags that size it and the largest --samples that fits."""
    avail, where = available_bytes(device)
    S = r.calibration.samples
    want = _expected(r, ckpt, device, dtype, S, seqlen).total
    if avail is None or want <= avail * (1 + MEMORY_MARGIN):
        return
    fits = largest_fitting(lambda n: _expected(r, ckpt, device, dtype, n, seqlen).total, S, avail)
    advice = (f"use --samples {fits} or fewer (the largest that fits), or lower --seqlen" if fits else
              "even --samples 1 does not fit: lower --seqlen")
    raise ConfigError(f"not enough memory: --samples {S} x --seqlen {seqlen} (--forward-batch "
                      f"{r.run.forward_batch}) has an expected peak of {gib(want)} on {device.type}, but {where} has "
                      f"{gib(avail)} available; {advice}, or run on a machine with more memory")


def _layers(ctx: Context, work: output.WorkDir, progress) -> tuple[list[LayerResult], PeakMemory]:
    recipe = ctx.recipe
    peak = PeakMemory(ctx.device)
    want = expected_peak(ctx)
    expected = want.total + (0 if peak.cuda else peak.base_rss)
    log.info("expected peak %s: %s (%s%s)", "VRAM" if peak.cuda else "RAM", gib(expected), want.describe(),
             "" if peak.cuda else f", on top of {gib(peak.base_rss)} held before the layers")
    skel = skeleton(ctx.config)
    rope_mod = rotary(ctx.config, ctx.device)
    with torch.no_grad(), LayerReader(ctx.ckpt, skel, ctx.device, ctx.dtype) as reader, \
            output.LayerWriter(work) as writer:
        hidden = embed_ids(ctx.ckpt, ctx.ids, ctx.device, ctx.dtype)  # [S, T, D]: 128 x 2048 x 8192 bf16 = 4 GiB (INF-34B)
        rope = rope_mod(hidden[:1], torch.arange(hidden.shape[1], device=ctx.device)[None])
        results = []
        for i in range(ctx.ckpt.num_layers):
            t_layer = time.monotonic()
            block = reader.block(i)       # starts reading layer i + 1
            saved = work.layer_file(i)
            out = None
            if saved.is_file():
                apply_saved(ctx, block, i, load_file(saved))
                losses, notes, scales, resumed = {}, (), {}, True
            else:
                done = quantize_layer(ctx, block, i, hidden, rope)
                writer.save(i, done.tensors)   # written while layer i + 1 computes
                losses, notes, scales, out, resumed = done.losses, done.notes, done.scales, done.output, False
                del done                       # the device copies of the written tensors
            hidden = out if out is not None else forward_all(block, hidden, rope, recipe.run.forward_batch,
                                                             in_place=True)
            del block
            rss, vram = peak.read()
            results.append(LayerResult(i, time.monotonic() - t_layer, losses, notes, rss, vram, expected,
                                       resumed, scales))
            if progress:
                progress(results[-1], ctx.ckpt.num_layers)
        if recipe.method is Method.GPTQ and recipe.gptq.lm_head and not work.head_file().is_file():
            writer.wait()
            tensors, loss, notes = quantize_head(ctx, skel, hidden)  # the last layer's outputs: the head's input
            work.save_head(tensors)
            results[-1] = replace(results[-1], losses={**results[-1].losses, HEAD: loss},
                                  notes=results[-1].notes + tuple(notes))
        del hidden
    for line in summarize_notes([n for r in results for n in r.notes]):
        log.warning(line)
    if any(r.scales for r in results):
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


__all__ = ["quantize", "quantize_locked", "prepare", "LayerResult", "Context"]
