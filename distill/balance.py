"""The balance of loss terms: each term's share of the gradient on the student's own (shared) parameters, and scales
that start every term at the cross-entropy's gradient norm.

A sum of terms can let one drown the others: the measured ``logit+kv`` fell below ``kv`` alone although each term
helps on its own. The loss values say nothing about that (a term of value 0.01 can carry most of the gradient); the
gradients do. ``term_grad_norms`` takes each weighted term's gradient with respect to the parameters every term
reaches (the student's, not a projector that only the K/V term sees) by one ``autograd.grad`` per term on the graph
the step already built, so it costs one extra backward pass per term on the steps it is measured.

``--balance gradnorm`` uses the same norms once, on the first step: each non-CE term ``i`` is scaled by
``s_i = ‖∇L_ce‖ / ‖∇L_i‖`` (its raw, unweighted gradient norm), frozen for the rest of the run and saved with the
checkpoint, so its weight then reads "this term's gradient norm relative to CE's at the start". It is the
initial-gradient-norm normalisation that GradNorm (Chen et al., 2018) starts from, without GradNorm's learned
re-weighting during training.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch

__all__ = ["balance_scales", "grad_shares", "term_grad_norms"]


def term_grad_norms(terms: Mapping[str, torch.Tensor], params: Sequence[torch.Tensor]) -> dict[str, float]:
    """``{name: ‖∂ term / ∂ params‖₂}`` for each scalar term, leaving the graph in place for the real backward.

    Args:
        terms: scalar tensors attached to the graph (a term not reaching ``params`` gets 0).
        params: the parameters the norms are taken over (those with ``requires_grad``).
    """
    norms = {}
    for name, term in terms.items():
        if not term.requires_grad:
            norms[name] = 0.0
            continue
        grads = torch.autograd.grad(term, params, retain_graph=True, allow_unused=True)
        norms[name] = math.sqrt(sum(float(g.detach().float().pow(2).sum()) for g in grads if g is not None))
    return norms


def grad_shares(norms: Mapping[str, float]) -> dict[str, float]:
    """Each term's share of the summed norms, in ``[0, 1]`` (all 0 when every norm is 0)."""
    total = sum(norms.values())
    return {name: (n / total if total > 0 else 0.0) for name, n in norms.items()}


def balance_scales(raw_norms: Mapping[str, float], *, reference: str = "ce") -> dict[str, float]:
    """``{term: ‖∇ reference‖ / ‖∇ term‖}`` from unweighted norms; the reference term's scale is 1.

    Without the reference term (``--ce-weight 0``), the terms are brought to their mean norm instead. A term with no
    gradient keeps scale 1.
    """
    if reference in raw_norms and raw_norms[reference] > 0:
        target = raw_norms[reference]
    else:
        positive = [n for n in raw_norms.values() if n > 0]
        target = sum(positive) / len(positive) if positive else 1.0
    return {name: (target / n if n > 0 and name != reference else 1.0) for name, n in raw_norms.items()}
