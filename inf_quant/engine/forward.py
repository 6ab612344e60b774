"""Forward passes of one decoder layer over the calibration (or eval) hidden states, chunk by chunk.

hidden: [S, T, D], S windows of T tokens; every pass runs `batch` windows at a time, causal attention with no
padding at positions 0..T-1. A chunk's output depends only on that chunk's input, so outputs may be written over
inputs the caller owns (in_place), and no pass holds more than one [S, T, D] result.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn


class _Stop(Exception):
    """Raised by a capture hook: nothing after the hooked module is needed for this pass."""


def _positions(x: torch.Tensor) -> torch.Tensor:
    return torch.arange(x.shape[1], device=x.device)[None]


def run_block(block: nn.Module, x: torch.Tensor, rope: tuple) -> torch.Tensor:
    """One decoder layer on x: [B, T, D] -> [B, T, D]."""
    out = block(x, attention_mask=None, position_embeddings=rope, position_ids=_positions(x))
    return out[0] if isinstance(out, tuple) else out


def run_half(block: nn.Module, half: tuple[str, str], x: torch.Tensor, rope: tuple) -> torch.Tensor:
    """One residual half of a decoder layer (LayerMap.halves): x + module(norm(x)), x: [B, T, D]. The two halves
    in order are exactly run_block (tested)."""
    norm, name = half
    h = block.get_submodule(norm)(x)
    if name.endswith("attn"):
        h = block.get_submodule(name)(hidden_states=h, attention_mask=None, position_ids=_positions(x),
                                      position_embeddings=rope)[0]
    else:
        h = block.get_submodule(name)(h)
    return x + h


def forward_all(block: nn.Module, hidden: torch.Tensor, rope: tuple, batch: int, in_place: bool = False) -> torch.Tensor:
    """The layer's outputs for all windows: [S, T, D]; in_place writes them over `hidden` (which the caller owns),
    else into one new tensor."""
    out = hidden if in_place else torch.empty_like(hidden)
    for s in range(0, len(hidden), batch):
        out[s: s + batch] = run_block(block, hidden[s: s + batch], rope)
    return out


def run_half_all(block: nn.Module, half: tuple[str, str], x: torch.Tensor, rope: tuple, batch: int,
                 in_place: bool) -> torch.Tensor:
    """run_half over all windows; in_place writes over x (a tensor the caller owns), else into a new tensor."""
    out = x if in_place else torch.empty_like(x)
    for s in range(0, len(x), batch):
        out[s: s + batch] = run_half(block, half, x[s: s + batch], rope)
    return out


def capture_inputs(block: nn.Module, module: nn.Module, hidden: torch.Tensor, rope: tuple, batch: int,
                   consume: Callable[[torch.Tensor, int], None], run: Callable | None = None) -> None:
    """Feed `module`'s input, chunk by chunk, to consume(input, first window of the chunk); each pass stops right
    after that input is seen. run(chunk): what is run on each chunk of `hidden` (default: the whole layer)."""
    start = 0

    def hook(_mod, args):
        consume(args[0], start)
        raise _Stop

    run = run or (lambda x: run_block(block, x, rope))
    handle = module.register_forward_pre_hook(hook)
    try:
        for start in range(0, len(hidden), batch):
            try:
                run(hidden[start: start + batch])
            except _Stop:
                pass
    finally:
        handle.remove()
