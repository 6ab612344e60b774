"""GPTQ for one decoder layer, on the block loop of pipeline.py (the twin of awq_block.py).

The layer map's linear groups go in order, each seeing the earlier groups quantized (true sequential); each group
is solved as one stacked problem, its linears sharing one H (rows are independent: the codes of each solved alone,
tested). Each group captures its input from its half's input: the layer input for attention, and for the MLP the
attention half's output, computed once after the attention groups are quantized. Where a half's last group is its
output linear (LayerMap.half_outputs) and that linear's input has the hidden states' shape (o_proj), its captured
input is kept in the buffer that becomes the half's output, and the half is finished as x + o_proj(kept) instead
of running attention again. The last half's output, written in place, is the layer's output.

Per group, in named steps: run_halves (finish the halves before the group's), group_hessian (its H, and its
input kept where it finishes its half), solve_group_ (one stacked GPTQ solve, the weights replaced by their
dequantized values), finish_half_ (x + o_proj(kept)).

Extra memory: one [S, T, D] buffer (the attention half's output), one group's H [K, K] fp32 and its stacked
weights [sum N, K] fp32 plus gptq_quantize's workspace (gptq.py).
"""

from __future__ import annotations

import torch
from torch import nn

from ..core.config import CudaPath, GPTQConfig, Method
from ..quant.gptq import gptq_quantize, hessian_add_, hessian_finish_
from ..quant.qformat import from_tensors, to_tensors
from ..read.layermap import LayerMap, LinearGroup
from .context import BlockResult, Context
from .forward import capture_inputs, run_half, run_half_all


def gptq_block(ctx: Context, block: nn.Module, i: int, hidden: torch.Tensor, rope: tuple) -> BlockResult:
    """Quantize layer i with the recipe's GPTQ settings; the block's weights become their dequantized values.
    hidden: [S, T, D], the layer's input (not modified); the result carries the layer's output [S, T, D]."""
    return solve_layer(ctx, block, i, hidden, rope, ctx.recipe.gptq, Method.GPTQ)


def solve_layer(ctx: Context, block: nn.Module, i: int, hidden: torch.Tensor, rope: tuple, cfg: GPTQConfig,
                method: Method) -> BlockResult:
    """gptq_block on any grid and format: `cfg` and `method` are also AWQ's solve=gptq (its scaled weights,
    asymmetric, written in the AWQ gemm format)."""
    lmap, batch, prefix = ctx.lmap, ctx.recipe.run.forward_batch, ctx.lmap.block_prefix(i)
    unproven = ctx.recipe.run.unproven_cuda
    bf16_gemm, graphs = CudaPath.BF16_HESSIAN in unproven, CudaPath.GRAPH_COLUMNS in unproven
    tensors, losses, notes = {}, {}, []
    x, done = hidden, 0   # x: the input of half `done`, the first half not finished
    for gi, group in enumerate(lmap.groups):
        k = _half_of(lmap, group)
        x, done = run_halves(block, lmap.halves[done:k], x, hidden, rope, batch), k
        mods = [block.get_submodule(n) for n in group.names]
        solved = []
        for name, mod in zip(group.names, mods):
            if f"{prefix}{name}" in ctx.skip:
                tensors[f"{prefix}{name}.weight"] = keep_bf16(ctx, mod, f"{prefix}{name}.weight")
            else:
                solved.append((name, mod))
        if not solved:
            continue
        keep = _is_half_output(lmap, gi, mods[0], x)
        h, kept = group_hessian(block, lmap.halves[k], mods[0], x, rope, batch, bf16_gemm, keep)
        group_tensors, group_losses, group_notes = solve_group_(solved, prefix, h, cfg, method, graphs)
        del h
        tensors.update(group_tensors)
        losses.update(group_losses)
        notes += group_notes
        if kept is not None:
            x, done = finish_half_(mods[0], x, kept, batch), k + 1
    x = run_halves(block, lmap.halves[done:], x, hidden, rope, batch)
    return BlockResult(tensors, losses, tuple(notes), x)


def _half_of(lmap: LayerMap, group: LinearGroup) -> int:
    return next(k for k, (_, name) in enumerate(lmap.halves) if group.names[0].startswith(name + "."))


def _is_half_output(lmap: LayerMap, gi: int, mod: nn.Linear, x: torch.Tensor) -> bool:
    """Group gi is the last of its half and is just the half's output linear (LayerMap.half_outputs), `mod`,
    reading the hidden states' width (o_proj): the half's output is x + mod(its input)."""
    groups, k = lmap.groups, _half_of(lmap, lmap.groups[gi])
    last = gi + 1 == len(groups) or _half_of(lmap, groups[gi + 1]) != k
    return last and groups[gi].names == (lmap.half_outputs[k],) and mod.in_features == x.shape[-1]


def run_halves(block: nn.Module, halves: tuple[tuple[str, str], ...], x: torch.Tensor, hidden: torch.Tensor,
               rope: tuple, batch: int) -> torch.Tensor:
    """Run these residual halves in order over all windows from x, the first one's input: the last one's output
    (x itself where there are none). Each output is written over its input, except over `hidden`, the layer's
    input, which is never modified."""
    for half in halves:
        x = run_half_all(block, half, x, rope, batch, in_place=x is not hidden)
    return x


def group_hessian(block: nn.Module, half: tuple[str, str], mod: nn.Linear, x: torch.Tensor, rope: tuple, batch: int,
                  bf16_gemm: bool, keep: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """H = 2/n X^T X of mod's input X over all windows, [K, K] fp32, and with keep X itself, [S, T, K] in x's
    dtype (a new buffer, where finish_half_ builds the half's output). Each chunk of x: [S, T, D], the half's
    input (not modified), runs the half only as far as mod's input (forward.capture_inputs)."""
    h = torch.zeros(mod.in_features, mod.in_features, dtype=torch.float32, device=mod.weight.device)
    kept = torch.empty_like(x) if keep else None
    n = 0

    def consume(inp: torch.Tensor, start: int) -> None:
        nonlocal n
        n += hessian_add_(h, inp, bf16_gemm)
        if kept is not None:
            kept[start: start + len(inp)] = inp

    capture_inputs(block, mod, x, rope, batch, consume, run=lambda c: run_half(block, half, c, rope))
    return hessian_finish_(h, n), kept


def solve_group_(solved: list[tuple[str, nn.Linear]], prefix: str, h: torch.Tensor, cfg: GPTQConfig,
                 method: Method, cuda_graphs: bool) -> tuple[dict[str, torch.Tensor], dict[str, float], list[str]]:
    """GPTQ for linears sharing one H, as one stacked [sum N, K] problem (rows are independent: each linear's
    codes are those of its own solve); each weight becomes its dequantized value. Returns (checkpoint tensors,
    proxy loss per linear, notes). h: [K, K] fp32 from group_hessian (not modified)."""
    label = f"{prefix}{'+'.join(n for n, _ in solved)}"
    stacked = gptq_quantize(torch.cat([m.weight.float() for _, m in solved]), h, cfg, name=label,
                            cuda_graphs=cuda_graphs)
    notes = [f"{label}: damping raised to {stacked.damp:g}"] if stacked.damp > cfg.damp else []
    tensors, losses = {}, {}
    for (name, mod), q in zip(solved, stacked.split_rows([m.out_features for _, m in solved])):
        t = to_tensors(q, method, f"{prefix}{name}")
        tensors.update({f"{prefix}{name}.{s}": v for s, v in t.items()})
        set_weight(mod, from_tensors(t, method, cfg.bits, mod.in_features))
        losses[name] = q.proxy_loss
    return tensors, losses, notes


def finish_half_(out_linear: nn.Linear, x: torch.Tensor, kept: torch.Tensor, batch: int) -> torch.Tensor:
    """The output of a half whose module ends in out_linear, x + out_linear(kept) over all windows, written over
    kept (out_linear's captured input) and returned. x: [S, T, D], the half's input (not modified)."""
    for s in range(0, len(x), batch):
        kept[s: s + batch] = x[s: s + batch] + out_linear(kept[s: s + batch])
    return kept


def keep_bf16(ctx: Context, mod: nn.Linear, name: str) -> torch.Tensor:
    """A skipped linear's weight as written: the checkpoint's dtype (an AWQ scale may have gone into it); the
    module then computes with exactly that, as a resumed run (which reads it back) would."""
    stored = mod.weight.detach().to(ctx.ckpt.dtype(name)).cpu()
    set_weight(mod, stored)
    return stored


def set_weight(mod: nn.Linear, w: torch.Tensor) -> None:
    mod.weight.data = w.to(device=mod.weight.device, dtype=mod.weight.dtype)
