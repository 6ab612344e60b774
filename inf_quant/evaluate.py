"""Language-model metrics over token windows: perplexity, per-token log-probs."""

from __future__ import annotations

import math

import torch


@torch.no_grad()
def token_logprobs(model, ids: torch.Tensor, batch: int = 4) -> torch.Tensor:
    """log p(x_t | x_<t) for t >= 1 of every window: ids [S, T] int64 -> [S, T-1] fp32."""
    out = []
    dev = next(model.parameters()).device
    for s in range(0, len(ids), batch):
        x = ids[s: s + batch].to(dev)
        logits = model(x).logits.float()
        out.append(torch.log_softmax(logits[:, :-1], -1).gather(-1, x[:, 1:, None])[..., 0].cpu())
    return torch.cat(out)


def perplexity(model, ids: torch.Tensor, batch: int = 4) -> float:
    """exp(mean negative log-likelihood) over all predicted tokens of ids [S, T]."""
    return math.exp(-token_logprobs(model, ids, batch).double().mean().item())


def eval_windows(tokenizer, texts: list[str], seqlen: int) -> torch.Tensor:
    """The eval texts as consecutive non-overlapping windows: [S, seqlen] int64 (the tail is dropped)."""
    from .calibrate import token_stream

    stream = token_stream(tokenizer, texts)
    n = len(stream) // seqlen
    return stream[: n * seqlen].view(n, seqlen)
