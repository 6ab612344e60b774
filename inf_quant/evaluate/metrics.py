"""Accuracy metrics of a quantized model against its bf16 baseline, as pure functions over log-probabilities.

The baseline of a 34B is computed once (layer-streamed) and cached as, per predicted token, its top-k
log-probabilities and their token ids. KL(bf16 || quantized) is then evaluated on the top-k support plus one
"tail" bucket holding the remaining mass: by the log-sum inequality this is a lower bound of the exact KL that
becomes exact when k covers the vocabulary (tested), and is tight when the tail mass is small.
Shapes: P = predicted positions (flattened windows), k = top-k kept, V = vocabulary.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .verify_report import DomainMetrics


def topk_logprobs(logits: Tensor, targets: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor]:
    """From logits [P, V] (any float) and targets [P] int64: target log-prob [P] fp32, top-k log-probs [P, k] fp32
    (descending) and their ids [P, k] int32."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    top = logp.topk(min(k, logp.shape[-1]), dim=-1)
    return logp.gather(-1, targets[:, None])[:, 0], top.values, top.indices.to(torch.int32)


def kl_topk(base_topk_logp: Tensor, base_topk_idx: Tensor, quant_logp: Tensor) -> Tensor:
    """Per-position KL(base || quant) on the top-k support + tail bucket: [P] fp32 (nats).

    base_topk_logp: [P, k] fp32   base_topk_idx: [P, k] int   quant_logp: [P, V] fp32 (log_softmax)
    """
    p = base_topk_logp.exp()
    q_logp = quant_logp.gather(-1, base_topk_idx.long())
    head = (p * (base_topk_logp - q_logp)).sum(-1)
    p_tail = (1 - p.sum(-1)).clamp_min(0)
    q_tail = (1 - q_logp.exp().sum(-1)).clamp_min(1e-12)
    tail = torch.where(p_tail > 1e-12, p_tail * (p_tail.clamp_min(1e-12).log() - q_tail.log()), torch.zeros_like(p_tail))
    return (head + tail).clamp_min(0)


def top1_agreement(base_topk_idx: Tensor, quant_logp: Tensor) -> Tensor:
    """Per position, 1.0 where the quantized model's argmax equals the baseline's: [P] fp32."""
    return (quant_logp.argmax(-1) == base_topk_idx[:, 0].long()).float()


def perplexity(target_logp: Tensor) -> float:
    """exp(-mean log p(target)) over all positions."""
    return math.exp(-target_logp.double().mean().item())


def summarize(base_target: Tensor, quant_target: Tensor, kl: Tensor, agree: Tensor) -> DomainMetrics:
    """Metrics of one domain: every argument is [P] over that domain's predicted positions."""
    pb, pq = perplexity(base_target), perplexity(quant_target)
    return DomainMetrics(tokens=int(base_target.numel()), ppl_baseline=pb, ppl_quantized=pq,
                         ppl_increase_pct=100.0 * (pq / pb - 1.0), kl_mean=kl.double().mean().item(),
                         top1_agreement=agree.double().mean().item())
