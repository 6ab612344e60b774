"""GPTQ for one decoder layer, on the block loop of pipeline.py (the twin of awq_block.py).

The layer map's linear groups go in order, each seeing the earlier groups quantized (true sequential); each group
is solved as one stacked problem, its linears sharing one H (rows are independent: the codes of each solved alone,
tested). Each group captures its input from its half's input: the layer input for attention, and for the MLP the
attention half's output, computed once after the attention groups are quantized. Where a half's last group is its
output linear (LayerMap.half_outputs) and that linear's input has the hidden states' shape (o_proj), its captured
input is kept in the buffer that becomes the half's output, and the half is finished as x + o_proj(kept) instead
of running attention again. The last half's output, written in place, is the layer's output.

Extra memory: one [S, T, D] buffer (the attention half's output), one group's H [K, K] fp32 and its stacked
weights [sum N, K] fp32 plus gptq_quantize's workspace (gptq.py).
"""

from __future__ import annotations

import torch
from torch import nn

from .config import CudaPath, Method
from .forward import capture_inputs, run_half, run_half_all
from .qformat import from_tensors, to_tensors
from .quant.gptq import gptq_quantize, hessian_add_, hessian_finish_


def _half_of(lmap, group) -> int:
    return next(k for k, (_, name) in enumerate(lmap.halves) if group.names[0].startswith(name + "."))


def gptq_block(ctx, block: nn.Module, i: int, hidden: torch.Tensor, rope: tuple, cfg=None,
               method: Method = Method.GPTQ):
    """Quantize layer i: (checkpoint tensors, proxy loss per linear, notes, the layer's output [S, T, D]); the
    block's weights become their dequantized values. hidden: [S, T, D], the layer's input (not modified).
    cfg/method: another grid and format (AWQ's solve=gptq: its scaled weights, asymmetric, the AWQ gemm format)."""
    tensors, losses, notes = {}, {}, []
    lmap, cfg, batch = ctx.lmap, cfg or ctx.recipe.gptq, ctx.recipe.run.forward_batch
    prefix = lmap.block_prefix(i)
    unproven = ctx.recipe.run.unproven_cuda
    bf16_gemm, graphs = CudaPath.BF16_HESSIAN in unproven, CudaPath.GRAPH_COLUMNS in unproven
    x, done, kept = hidden, 0, None   # x: the current half's input; kept: a half's output buffer, filled
    for gi, group in enumerate(lmap.groups):
        k = _half_of(lmap, group)
        while done < k:               # finish the halves before this group's
            x = kept if kept is not None else run_half_all(block, lmap.halves[done], x, rope, batch,
                                                           in_place=x is not hidden)
            kept, done = None, done + 1
        mods = [block.get_submodule(n) for n in group.names]
        skipped = {n for n in group.names if f"{prefix}{n}" in ctx.skip}
        for name, mod in zip(group.names, mods):
            if name in skipped:
                tensors[f"{prefix}{name}.weight"] = keep_bf16(ctx, mod, f"{prefix}{name}.weight")
        if len(skipped) == len(mods):
            continue
        last_of_half = gi + 1 == len(lmap.groups) or _half_of(lmap, lmap.groups[gi + 1]) != k
        keep = (last_of_half and group.names == (lmap.half_outputs[k],) and not skipped
                and mods[0].in_features == x.shape[-1])
        buf = torch.empty_like(x) if keep else None
        k_in = mods[0].in_features
        state = {"h": torch.zeros(k_in, k_in, dtype=torch.float32, device=mods[0].weight.device), "n": 0}

        def consume(inp, start, state=state, buf=buf):
            state["n"] += hessian_add_(state["h"], inp, bf16_gemm)
            if buf is not None:
                buf[start: start + len(inp)] = inp

        half = lmap.halves[k]
        capture_inputs(block, mods[0], x, rope, batch, consume, run=lambda c, half=half: run_half(block, half, c, rope))
        solved = [(n, m) for n, m in zip(group.names, mods) if n not in skipped]
        label = f"{prefix}{'+'.join(n for n, _ in solved)}"
        h = hessian_finish_(state["h"], state["n"])
        stacked = gptq_quantize(torch.cat([m.weight.float() for _, m in solved]), h, cfg, name=label,
                                cuda_graphs=graphs)
        del state, h
        if stacked.damp > cfg.damp:
            notes.append(f"{label}: damping raised to {stacked.damp:g}")
        for (name, mod), q in zip(solved, stacked.split_rows([m.out_features for _, m in solved])):
            t = to_tensors(q, method, f"{prefix}{name}")
            tensors.update({f"{prefix}{name}.{s}": v for s, v in t.items()})
            set_weight(mod, from_tensors(t, method, cfg.bits, mod.in_features))
            losses[name] = q.proxy_loss
        if keep:                      # the half's output: x + out_linear(kept input), written over the input
            for s in range(0, len(x), batch):
                buf[s: s + batch] = x[s: s + batch] + mods[0](buf[s: s + batch])
            kept = buf
    while done < len(lmap.halves):
        x = kept if kept is not None else run_half_all(block, lmap.halves[done], x, rope, batch,
                                                       in_place=x is not hidden)
        kept, done = None, done + 1
    return tensors, losses, notes, x


def keep_bf16(ctx, mod: nn.Linear, name: str) -> torch.Tensor:
    """A skipped linear's weight as written: the checkpoint's dtype (an AWQ scale may have gone into it); the
    module then computes with exactly that, as a resumed run (which reads it back) would."""
    stored = mod.weight.detach().to(ctx.ckpt.dtype(name)).cpu()
    set_weight(mod, stored)
    return stored


def set_weight(mod: nn.Linear, w: torch.Tensor) -> None:
    mod.weight.data = w.to(device=mod.weight.device, dtype=mod.weight.dtype)
