"""AWQ for one decoder layer (Lin et al. 2023), on the shared block loop of pipeline.py.

Per layer: one forward of the bf16 layer captures every group's input; then, group by group in layer-map order,
the activation-aware scale is searched and folded into the group's `input_from` (a norm: weight AND bias for
LayerNorm; a linear: its output rows, only where shapes allow); then each linear's clip is searched on its
scaled input and the weight is quantized on AWQ's asymmetric grid. The block ends with the dequantized weights
and folded norms, so the next layer is calibrated on this layer's quantized outputs (as with GPTQ).
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from .config import Method
from .qformat import from_tensors, to_tensors
from .quant.awq import (apply_clip, awq_quantize, can_fold_into_linear, fold_scale_into_linear_outputs,
                        fold_scale_into_norm, scale_linear_inputs, search_clip, search_scale)

log = logging.getLogger(__name__)


def capture_group_inputs(block: nn.Module, groups, hidden: torch.Tensor, rope: tuple, batch: int,
                         max_rows: int) -> list[torch.Tensor]:
    """Each group's input rows from one pass of the unquantized layer: list of [M, K] fp32, M <= max_rows.

    Rows are taken with a fixed stride over all calibration tokens (deterministic, no RNG).
    """
    from .pipeline import run_block

    total = hidden.shape[0] * hidden.shape[1]
    stride = max(1, -(-total // max_rows))
    store: list[list[torch.Tensor]] = [[] for _ in groups]
    handles = []
    for gi, group in enumerate(groups):
        def hook(_mod, args, gi=gi):
            store[gi].append(args[0].reshape(-1, args[0].shape[-1])[::stride].float())
        handles.append(block.get_submodule(group.names[0]).register_forward_pre_hook(hook))
    try:
        for s in range(0, len(hidden), batch):
            run_block(block, hidden[s: s + batch], rope)
    finally:
        for h in handles:
            h.remove()
    return [torch.cat(rows) for rows in store]


def _fold(block: nn.Module, group, prefix: str, x: torch.Tensor, cfg, notes: list[str]) -> torch.Tensor:
    """Search and fold the group's scale; returns the group's input as the scaled weights now see it."""
    mods = [block.get_submodule(n) for n in group.names]
    prev = block.get_submodule(group.input_from)
    if isinstance(prev, nn.Linear) and not can_fold_into_linear(prev.out_features, mods[0].in_features):
        notes.append(f"{prefix}{group.input_from} -> {', '.join(group.names)}: scale not folded "
                     f"(out_features {prev.out_features} != in_features {mods[0].in_features}, GQA)")
        return x
    res = search_scale(x, [m.weight.float() for m in mods], cfg)
    s = res.scales.to(x.device)
    with torch.no_grad():
        if isinstance(prev, nn.Linear):
            prev.weight.data = fold_scale_into_linear_outputs(prev.weight.data, s.to(prev.weight.device))
        else:
            w, b = fold_scale_into_norm(prev.weight.data, getattr(prev, "bias", None), s.to(prev.weight.device))
            prev.weight.data = w
            if b is not None:
                prev.bias.data = b
        for m in mods:
            m.weight.data = scale_linear_inputs(m.weight.data, s.to(m.weight.device))
    return x / s


def awq_block(ctx, block: nn.Module, i: int, hidden: torch.Tensor, rope: tuple):
    """Quantize one layer with AWQ. Returns (checkpoint tensors, per-linear clip loss, notes)."""
    cfg, prefix, groups = ctx.recipe.awq, ctx.lmap.block_prefix(i), ctx.lmap.groups
    xs = capture_group_inputs(block, groups, hidden, rope, ctx.recipe.run.forward_batch, cfg.search_tokens)
    notes: list[str] = []
    xs = [_fold(block, g, prefix, x, cfg, notes) for g, x in zip(groups, xs)]
    tensors, losses = {}, {}
    for group, x in zip(groups, xs):
        for name in group.names:
            mod = block.get_submodule(name)
            clip = search_clip(x, mod.weight.float(), cfg)
            q = awq_quantize(apply_clip(mod.weight.float(), clip), cfg)
            t = to_tensors(q, Method.AWQ, prefix + name)
            tensors.update({f"{prefix}{name}.{k}": v for k, v in t.items()})
            mod.weight.data = from_tensors(t, Method.AWQ, cfg.bits, mod.in_features).to(mod.weight)
            losses[name] = clip.loss
    for group in groups:  # folded norms (and any other non-quantized module a scale went into) are saved
        prev = block.get_submodule(group.input_from)
        if not isinstance(prev, nn.Linear):
            for pname, p in prev.named_parameters():
                full = f"{prefix}{group.input_from}.{pname}"
                stored = p.detach().to(ctx.ckpt.info(full).dtype).cpu()  # the checkpoint's dtype (bf16)
                tensors[full] = stored
                p.data = stored.to(p)  # propagate with exactly what is written (a resumed run reads it back)
    return tensors, losses, notes
