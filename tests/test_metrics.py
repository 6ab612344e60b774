"""KL / top-1 agreement / perplexity math against hand computations."""

import math

import torch

from inf_quant.evaluate.metrics import kl_topk, perplexity, summarize, top1_agreement, topk_logprobs
from tolerances import KL_ATOL


def test_kl_hand_example_with_tail_bucket():
    # p = [0.5, 0.3, 0.2], q = [0.4, 0.4, 0.2]; top-2 of p = ids {0, 1}, tail {2} has p = q = 0.2:
    # KL = 0.5 ln(0.5/0.4) + 0.3 ln(0.3/0.4) + 0.2 ln(0.2/0.2) = 0.0252672...
    p, q = torch.tensor([[0.5, 0.3, 0.2]]), torch.tensor([[0.4, 0.4, 0.2]])
    _, top_lp, top_id = topk_logprobs(p.log(), torch.tensor([0]), 2)
    got = kl_topk(top_lp, top_id, q.log())
    want = 0.5 * math.log(0.5 / 0.4) + 0.3 * math.log(0.3 / 0.4)
    assert abs(got.item() - want) < KL_ATOL and abs(want - 0.0252672) < 1e-6


def test_kl_is_exact_with_full_support_and_a_lower_bound_otherwise():
    g = torch.Generator().manual_seed(0)
    base, quant = torch.randn(50, 40, generator=g) * 2, torch.randn(50, 40, generator=g) * 2
    lp, lq = torch.log_softmax(base, -1), torch.log_softmax(quant, -1)
    exact = (lp.exp() * (lp - lq)).sum(-1)
    _, top_lp, top_id = topk_logprobs(base, torch.zeros(50, dtype=torch.long), 40)
    assert torch.allclose(kl_topk(top_lp, top_id, lq), exact, atol=KL_ATOL)
    _, top_lp, top_id = topk_logprobs(base, torch.zeros(50, dtype=torch.long), 5)
    approx = kl_topk(top_lp, top_id, lq)
    assert (approx <= exact + KL_ATOL).all() and (approx > 0).all()
    assert kl_topk(top_lp, top_id, lp).abs().max() < KL_ATOL  # identical models: zero


def test_top1_agreement_and_perplexity_by_hand():
    base_idx = torch.tensor([[2, 0], [1, 0], [0, 1]], dtype=torch.int32)
    quant = torch.log_softmax(torch.tensor([[0.0, 1.0, 3.0], [0.0, 0.5, 0.1], [2.0, 0.0, 0.0]]), -1)
    assert top1_agreement(base_idx, quant).tolist() == [1.0, 1.0, 1.0]
    quant2 = torch.log_softmax(torch.tensor([[3.0, 1.0, 0.0], [0.0, 0.5, 0.1], [2.0, 0.0, 0.0]]), -1)
    assert top1_agreement(base_idx, quant2).tolist() == [0.0, 1.0, 1.0]
    tgt = torch.tensor([math.log(0.5), math.log(0.25)])
    assert abs(perplexity(tgt) - math.sqrt(8)) < 1e-6  # fp32 log-probs; exp(-(ln .5 + ln .25)/2) = 2**1.5
    m = summarize(tgt, tgt + math.log(0.5), torch.zeros(2), torch.ones(2))
    assert abs(m.ppl_increase_pct - 100.0) < 1e-4 and m.tokens == 2 and m.top1_agreement == 1.0
