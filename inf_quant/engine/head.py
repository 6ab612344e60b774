"""GPTQ for the lm_head (opt-in, `gptq --lm-head`): the last step of the block loop.

The lm_head's input is the final norm's output. The block loop leaves the last layer's outputs for the calibration
windows in `hidden` [S, T, D]; normed chunk by chunk, they form H [D, D] like any block linear's input, and the head
[V, D] is solved with the recipe's GPTQ settings and written in GPTQ v1 under `lm_head.` (qweight, qzeros, scales,
g_idx), with `lm_head: true` in the quantization config (the key GPTQModel and vLLM read). A model whose head is
tied to its embedding (SmolLM2) gets an untied quantized head; the embedding stays as stored.

INF-34B: W [96512, 8192] fp32 = 3.2 GB and its solve copy, H 256 MiB; memory.expected_quantize_peak counts it.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..core.config import GPTQConfig, Method
from ..quant.gptq import gptq_quantize, hessian_add_, hessian_finish_
from ..quant.qformat import from_tensors, to_tensors
from ..read.load import Checkpoint, load_named
from .context import Context

HEAD = "lm_head"


def head_hessian(norm: nn.Module, hidden: Tensor, batch: int) -> Tensor:
    """H = 2/n X^T X of the head's input X = norm(hidden), [D, D] fp32. hidden: [S, T, D], not modified."""
    d = hidden.shape[-1]
    acc, n = torch.zeros(d, d, dtype=torch.float32, device=hidden.device), 0
    for s in range(0, len(hidden), batch):
        n += hessian_add_(acc, norm(hidden[s: s + batch]))
    return hessian_finish_(acc, n)


def solve_head(w: Tensor, h: Tensor, cfg: GPTQConfig) -> tuple[dict[str, Tensor], Tensor, float, float]:
    """(checkpoint tensors of `lm_head.`, the dequantized head [V, D] fp32 the loaders compute with, proxy loss,
    damp used). w: [V, D] float, not modified; h: [D, D] fp32 from head_hessian."""
    q = gptq_quantize(w.float(), h, cfg, name=HEAD)
    t = to_tensors(q, Method.GPTQ, HEAD)
    return t, from_tensors(t, Method.GPTQ, cfg.bits, w.shape[1]), q.proxy_loss, q.damp


def head_weight(ckpt: Checkpoint, skel: nn.Module, device: torch.device, dtype: torch.dtype) -> Tensor:
    """The head's weight [V, D] in the compute dtype: lm_head.weight, or the embedding when they are tied."""
    lm = ckpt.layer_map
    name = lm.lm_head if f"{lm.lm_head}.weight" in ckpt.weight_map else lm.embed
    return load_named(ckpt, skel, name, device, dtype).weight.detach()


def quantize_head(ctx: Context, skel: nn.Module, hidden: Tensor) -> tuple[dict[str, Tensor], float, list[str]]:
    """(tensors under `lm_head.`, proxy loss, notes) for the calibration outputs `hidden` [S, T, D] of the last
    layer (not modified)."""
    cfg = ctx.recipe.gptq
    norm = load_named(ctx.ckpt, skel, ctx.lmap.final_norm, ctx.device, ctx.dtype)
    h = head_hessian(norm, hidden, ctx.recipe.run.forward_batch)
    del norm
    t, _, loss, damp = solve_head(head_weight(ctx.ckpt, skel, ctx.device, ctx.dtype), h, cfg)
    notes = [f"{HEAD}: damping raised to {damp:g}"] if damp > cfg.damp else []
    return {f"{HEAD}.{k}": v for k, v in t.items()}, loss, notes


__all__ = ["head_hessian", "solve_head", "head_weight", "quantize_head", "HEAD"]
