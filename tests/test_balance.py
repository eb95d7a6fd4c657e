"""Gradient shares of loss terms against one backward pass per term, and the balancing scales."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from kava.distill.balance import balance_scales, grad_shares, term_grad_norms


def test_term_norms_equal_a_separate_backward_per_term():
    torch.manual_seed(0)
    shared, head = nn.Linear(6, 6), nn.Linear(6, 3)  # ``head`` stands for a projector only one term reaches
    x = torch.randn(4, 6)
    h = shared(x)
    terms = {"ce": h.pow(2).mean(), "kv": 5 * head(h).abs().mean()}
    params = list(shared.parameters())
    norms = term_grad_norms(terms, params)
    for name, term in terms.items():
        shared.zero_grad()
        term.backward(retain_graph=True)
        want = torch.sqrt(sum(p.grad.pow(2).sum() for p in params))
        assert norms[name] == pytest.approx(float(want), rel=1e-6)
    # the graph is intact for the step's own backward, and the measurement left no gradient behind
    shared.zero_grad(set_to_none=True)
    term_grad_norms(terms, params)
    assert all(p.grad is None for p in params)
    sum(terms.values()).backward()
    assert all(p.grad is not None for p in params)


def test_shares_and_scales():
    assert grad_shares({"ce": 1.0, "kv": 3.0}) == {"ce": 0.25, "kv": 0.75}
    assert grad_shares({"ce": 0.0}) == {"ce": 0.0}
    assert balance_scales({"ce": 2.0, "kv": 8.0, "logit": 0.5}) == {"ce": 1.0, "kv": 0.25, "logit": 4.0}
    assert balance_scales({"kv": 1.0, "logit": 3.0}) == {"kv": 2.0, "logit": 2 / 3}  # no CE: their mean
    assert balance_scales({"ce": 1.0, "kv": 0.0}) == {"ce": 1.0, "kv": 1.0}
    assert term_grad_norms({"c": torch.tensor(1.0)}, [nn.Parameter(torch.ones(1))]) == {"c": 0.0}
