"""AWQ for one decoder layer (Lin et al. 2023; scales in AutoAWQ's order of operations), on the block loop of
pipeline.py.

Per layer, in this order:

1. Capture, once. One forward of the layer as it arrives (its own weights unquantized; layers 0..i-1 already
   quantized) on n = min(S, max(1, awq.search_tokens // T)) calibration samples, evenly spaced, records every
   group's input as whole sequences [n, T, K] in the compute dtype (exactly what the linears read; bf16 on CUDA,
   half the bytes of an fp32 copy), and the keyword arguments its `inspect` module is called
   with (rope cos/sin, attention_mask=None, i.e. causal). Nothing is re-captured later: a fold keeps the fp
   function, and a folded group's own captured input is divided by its scale instead.
2. Scales, group by group in layer-map order, all before any weight is quantized (as AutoAWQ: the groups are
   NOT quantized true-sequentially; a later group's search sees the earlier groups scaled, in full precision).
   A group with `inspect` (q/k/v -> self_attn incl. o_proj; gate/up -> mlp incl. down_proj) scores each
   candidate s by the MSE of that module's output, run on the n whole sequences, against its output with the
   current weights; the other groups score the linears' own outputs (GPTQ's smoothing, smooth_block, scores every
   group by awq.diag_output_loss instead unless gptq.smooth_loss is module). The best s is folded into `input_from`
   (a norm: weight AND bias for LayerNorm; a linear: its output rows, only where shapes allow).
3. Quantize, by awq.solve:
   - `gptq` (default): with every scale folded (norms rounded to the checkpoint's bf16 first, as written), the
     layer is quantized by gptq_block.solve_layer on the AWQ grid (asymmetric, AWQ's group size, group-aware order,
     so groups stay i // G as the gemm format needs) -- true sequential: each group's Hessian comes from all S
     samples run through the earlier groups already quantized. Written in the same AWQ gemm format.
   - `rtn` (AutoAWQ's): linear by linear, the clip threshold is searched on the group's scaled input (skipped
     for the group's `no_clip` linears, q/k), applied, and the weight rounded to nearest on AWQ's grid.
   Either way the block's weights are replaced by their dequantized values.

The block ends with the dequantized weights and folded norms; forward.forward_all then runs it on all S samples,
so layer i+1 is calibrated on this quantized layer's outputs. Extra memory per layer: the captured inputs,
n T sum_groups(K) in the compute dtype (1.4 GiB in bf16 for INF-34B at search_tokens=16384: 16384 x
(3 x 8192 + 22016) x 2 B), one inspect module's reference output [n, T, D] fp32 (512 MiB) and its activations
for forward_batch samples.
"""

from __future__ import annotations

import logging
import statistics
from dataclasses import replace

import torch
from torch import nn

from ..core.config import Method, SmoothLoss, WeightSolve
from ..quant.awq import (apply_clip, awq_quantize, diag_output_loss, fold_index, fold_scale_into_linear_outputs,
                         fold_scale_into_norm, scale_linear_inputs, search_clip, search_scale)
from ..quant.qformat import from_tensors, to_tensors
from ..read.layermap import head_dim
from .context import BlockResult, Context
from .forward import run_block
from .gptq_block import keep_bf16, solve_layer

log = logging.getLogger(__name__)


def search_samples(s: int, t: int, search_tokens: int) -> torch.Tensor:
    """Indices of the n = min(S, max(1, search_tokens // T)) whole samples the scale search uses, evenly spaced."""
    n = min(s, max(1, search_tokens // t))
    return torch.arange(n) * s // n


def capture_group_inputs(block: nn.Module, groups, hidden: torch.Tensor, rope: tuple,
                         batch: int) -> tuple[list[torch.Tensor], list[dict]]:
    """One pass of the layer on hidden: [n, T, D]. Returns each group's input [n, T, K] in the compute dtype and
    the keyword arguments its `inspect` module was called with ({} for groups without one)."""
    store: list[list[torch.Tensor]] = [[] for _ in groups]
    kwargs: list[dict] = [{} for _ in groups]
    handles = []
    for gi, group in enumerate(groups):
        def hook(_mod, args, gi=gi):
            store[gi].append(args[0].detach())
        handles.append(block.get_submodule(group.names[0]).register_forward_pre_hook(hook))
        if group.inspect:
            def kw_hook(_mod, _args, kw, gi=gi):
                kwargs[gi] = {k: v for k, v in kw.items() if k != "hidden_states"}
            handles.append(block.get_submodule(group.inspect).register_forward_pre_hook(kw_hook, with_kwargs=True))
    try:
        for s in range(0, len(hidden), batch):
            run_block(block, hidden[s: s + batch], rope)
    finally:
        for h in handles:
            h.remove()
    return [torch.cat(chunks) for chunks in store], kwargs


def _call(module: nn.Module, x: torch.Tensor, kwargs: dict) -> torch.Tensor:
    """module(x, **kwargs) in the module's dtype, as fp32; the first element if it returns a tuple (attention)."""
    out = module(x.to(next(module.parameters()).dtype), **kwargs)
    return (out[0] if isinstance(out, tuple) else out).float()


def module_output_loss(module: nn.Module, linears: list[nn.Linear], x: torch.Tensor, kwargs: dict, batch: int):
    """The loss AutoAWQ scores a scale with: MSE of `module`'s output when `linears` hold the candidate weights.

    module: e.g. self_attn (q/k/v -> attention -> o_proj) or mlp; x: [n, T, D] (compute dtype), its input; not modified.
    The reference output (current weights) is computed once, [n, T, D_out] fp32. The returned callable sets each
    linear's weight to its candidate ([N_i, K] fp32, cast to the module's dtype), runs the module on x in chunks of
    `batch` samples, and restores the weights (also on error): mean over n T D_out of (out - reference)^2.
    """
    chunks = [x[s: s + batch] for s in range(0, len(x), batch)]
    ref = [_call(module, xc, kwargs) for xc in chunks]   # [b, T, D_out] fp32 each
    numel = sum(r.numel() for r in ref)

    def loss(candidates: list[torch.Tensor]) -> float:
        originals = [m.weight.data for m in linears]
        try:
            for m, q in zip(linears, candidates):
                m.weight.data = q.to(m.weight)
            err = sum(float((_call(module, xc, kwargs) - r).pow(2).sum()) for xc, r in zip(chunks, ref))
        finally:
            for m, w in zip(linears, originals):
                m.weight.data = w
        return err / numel

    return loss


def _fold_(block: nn.Module, group, prefix: str, x: torch.Tensor, kwargs: dict, cfg, batch: int,
           head_dim: int, notes: list[str], sym: bool = False, loss_kind: SmoothLoss = SmoothLoss.MODULE):
    """Search and fold the group's scale, each candidate scored by loss_kind: module (AutoAWQ's: the output of the
    module the group feeds where it names one, else the linears' own outputs) or diag (awq.diag_output_loss).
    Returns (the group's input as the scaled weights now see it: x itself, divided by the scale in place,
    ScaleResult or None if no scale could be folded)."""
    mods = [block.get_submodule(n) for n in group.names]
    prev = block.get_submodule(group.input_from)
    tie = None
    if isinstance(prev, nn.Linear):
        tie = fold_index(prev.out_features, mods[0].in_features, head_dim)
        if tie is None:
            notes.append(f"{prefix}{group.input_from} -> {', '.join(group.names)}: scale not folded "
                         f"(out_features {prev.out_features} do not map onto in_features {mods[0].in_features})")
            return x, None
        tie = tie.to(x.device)
    ws = [m.weight.float() for m in mods]   # one fp32 copy (none on CPU), shared by the loss and the search
    if loss_kind is SmoothLoss.DIAG:
        loss = diag_output_loss(x.reshape(-1, x.shape[-1]), ws)
    else:
        loss = module_output_loss(block.get_submodule(group.inspect), mods, x, kwargs, batch) if group.inspect else None
    res = search_scale(x, ws, cfg, loss, tie, sym)
    s = res.scales.to(x.device)
    with torch.no_grad():
        if isinstance(prev, nn.Linear):  # every column sharing a tie has the same scale: scatter picks it
            s_prev = torch.ones(prev.out_features, device=x.device).scatter_(0, tie, s)
            prev.weight.data = fold_scale_into_linear_outputs(prev.weight.data, s_prev.to(prev.weight.device))
        else:
            w, b = fold_scale_into_norm(prev.weight.data, getattr(prev, "bias", None), s.to(prev.weight.device))
            prev.weight.data = w
            if b is not None:
                prev.bias.data = b
        for m in mods:
            m.weight.data = scale_linear_inputs(m.weight.data, s.to(m.weight.device))
    flat = x.view(-1, x.shape[-1])   # x / s, in place, a chunk of rows at a time in fp32
    for r in range(0, len(flat), 4096):
        flat[r: r + 4096] = flat[r: r + 4096].float() / s
    return x, res


def group_label(group) -> str:
    """'q_proj+k_proj+v_proj': the group's linears without their module path."""
    return "+".join(n.rsplit(".", 1)[-1] for n in group.names)


def _search_and_fold(ctx: Context, block: nn.Module, i: int, hidden: torch.Tensor, rope: tuple, cfg,
                     sym: bool, loss_kind: SmoothLoss) -> tuple[list[torch.Tensor], list[str], dict]:
    """Steps 1 and 2 of the module docstring: capture, then each group's scale searched (on the symmetric grid if
    sym, else AWQ's; scored by loss_kind) and folded. Returns (each group's input as its scaled weights now see it
    [n, T, K], notes, the chosen scale per group: label -> (form, alpha), or ("none", 0.0) where no scale could be folded)."""
    prefix, groups, batch = ctx.lmap.block_prefix(i), ctx.lmap.groups, ctx.recipe.run.forward_batch
    hd = head_dim(ctx.ckpt.config)
    idx = search_samples(hidden.shape[0], hidden.shape[1], cfg.search_tokens).to(hidden.device)
    xs, kwargs = capture_group_inputs(block, groups, hidden[idx], rope, batch)   # [n, T, K] per group
    notes: list[str] = []
    scales = {}
    for gi, group in enumerate(groups):
        if sym and any(prefix + n in ctx.skip for n in group.names):  # GPTQ's skips stay the source's weights
            notes.append(f"{prefix}{group_label(group)}: not smoothed (it holds a --skip linear)")
            scales[group_label(group)] = ("none", 0.0)
            continue
        xs[gi], res = _fold_(block, group, prefix, xs[gi], kwargs[gi], cfg, batch, hd, notes, sym, loss_kind)
        scales[group_label(group)] = (res.form, res.alpha) if res else ("none", 0.0)
    return xs, notes, scales


def smooth_block(ctx: Context, block: nn.Module, i: int, hidden: torch.Tensor,
                 rope: tuple) -> tuple[dict[str, torch.Tensor], list[str], dict[str, tuple[str, float]]]:
    """GPTQ's smoothing (gptq.smooth: awq, or auto at 4 bits), before gptq_block: AWQ's scales (the recipe's awq:
    search settings, GPTQ's group size, on gptq.smooth_tokens calibration tokens), searched on GPTQ's symmetric
    grid, each candidate scored by gptq.smooth_loss (diag by default: no forward per candidate), and folded
    (LayerNorm weight and bias for q/k/v and gate/up, v_proj's rows for o_proj, up_proj's for down_proj). Returns
    (the folded norms as written, in the checkpoint's dtype, notes, the scale per group). The block's weights are left scaled, unquantized: gptq_block then solves them on all samples
    as usual, and the output is plain GPTQ (the inverse scale lives in the norms/linears before)."""
    cfg = replace(ctx.recipe.awq, group_size=ctx.recipe.gptq.group_size, search_tokens=ctx.recipe.gptq.smooth_tokens)
    xs, notes, scales = _search_and_fold(ctx, block, i, hidden, rope, cfg, sym=True,
                                         loss_kind=ctx.recipe.gptq.smooth_loss)
    del xs
    return _with_folded_norms(ctx, block, ctx.lmap.block_prefix(i), {}), notes, scales


def awq_block(ctx: Context, block: nn.Module, i: int, hidden: torch.Tensor, rope: tuple) -> BlockResult:
    """Quantize layer i with AWQ (see the module docstring for the order of operations); gptq_block's twin.

    hidden: [S, T, D], the layer's input (not modified). The result's scales: the chosen scale per group,
    label -> (form, alpha), or ("none", 0.0) where no scale could be folded; its output: the layer's output
    [S, T, D] (solve=gptq) or None (solve=rtn: the caller runs the layer).
    """

    cfg, prefix, groups = ctx.recipe.awq, ctx.lmap.block_prefix(i), ctx.lmap.groups
    xs, notes, scales = _search_and_fold(ctx, block, i, hidden, rope, cfg, sym=False, loss_kind=SmoothLoss.MODULE)
    if cfg.solve is WeightSolve.GPTQ:  # the scaled layer, quantized by GPTQ group by group (true sequential)
        del xs
        folded = _with_folded_norms(ctx, block, prefix, {})  # rounded to bf16 first: GPTQ sees what is written
        solved = solve_layer(ctx, block, i, hidden, rope, cfg.gptq(ctx.recipe.gptq), Method.AWQ)
        return replace(solved, tensors={**solved.tensors, **folded}, notes=(*notes, *solved.notes), scales=scales)
    no_clip = replace(cfg, clip_max_shrink=0.0)  # only ratio 1: nothing clipped, the same loss reported
    tensors, losses = {}, {}
    for group, x in zip(groups, xs):
        x = x.reshape(-1, x.shape[-1])
        for name in group.names:
            mod = block.get_submodule(name)
            if prefix + name in ctx.skip:  # left in bf16, with the group's scale folded in
                tensors[f"{prefix}{name}.weight"] = keep_bf16(ctx, mod, f"{prefix}{name}.weight")
                continue
            clip = search_clip(x, mod.weight.float(), no_clip if name in group.no_clip else cfg)
            q = awq_quantize(apply_clip(mod.weight.float(), clip), cfg)
            t = to_tensors(q, Method.AWQ, prefix + name)
            tensors.update({f"{prefix}{name}.{k}": v for k, v in t.items()})
            mod.weight.data = from_tensors(t, Method.AWQ, cfg.bits, mod.in_features).to(mod.weight)
            losses[name] = clip.loss
    return BlockResult(_with_folded_norms(ctx, block, prefix, tensors), losses, tuple(notes), None, scales)


def _with_folded_norms(ctx: Context, block: nn.Module, prefix: str, tensors: dict) -> dict:
    """tensors plus the folded norms (and any other non-quantized module a scale went into)."""
    for group in ctx.lmap.groups:
        prev = block.get_submodule(group.input_from)
        if not isinstance(prev, nn.Linear):
            for pname, p in prev.named_parameters():
                full = f"{prefix}{group.input_from}.{pname}"
                stored = p.detach().to(ctx.ckpt.dtype(full)).cpu()  # the checkpoint's dtype (bf16)
                tensors[full] = stored
                p.data = stored.to(p)  # propagate with exactly what is written (a resumed run reads it back)
    return tensors


def scale_summary(per_layer: list[dict]) -> str:
    """One line over all layers: per group, the median alpha, its range and how often each form won."""
    parts = []
    for label in dict.fromkeys(k for d in per_layer for k in d):
        chosen = [d[label] for d in per_layer if label in d]
        alphas = [a for f, a in chosen if f != "none"]
        forms = {f: sum(c[0] == f for c in chosen) for f in dict.fromkeys(c[0] for c in chosen)}
        span = f"alpha median {statistics.median(alphas):.2f} [{min(alphas):.2f}, {max(alphas):.2f}], " if alphas else ""
        parts.append(f"{label}: {span}" + " ".join(f"{f} {n}" for f, n in forms.items()))
    return "; ".join(parts)
