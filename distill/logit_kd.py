"""Logit distillation from a teacher's stored top-k log-probabilities: the baseline K/V distillation is measured
against.

The store keeps, per student token, the teacher's ``k`` most likely next tokens and their log-probabilities (see
``kava.extract.logits``). Two per-token losses read them:

- ``topk_kl``, when teacher and student share a tokenizer (the ids mean the same tokens): KL(teacher ‖ student)
  between the two distributions coarsened to the teacher's ``k`` tokens plus one bucket for everything else. It is a
  true KL between distributions over ``k + 1`` outcomes, 0 exactly when the student gives each of those tokens the
  teacher's probability.
- ``sorted_prob_distance``, across tokenizers, where ids of one vocabulary mean nothing in the other: the distance
  of Universal Logit Distillation (Boizard et al., 2024), the L1 distance between the two distributions' probabilities
  sorted in decreasing order (the 1-Wasserstein distance between them once the vocabularies are matched by rank).
  It needs no vocabulary mapping, and it is computed on the top ``k`` of each side plus the tail mass, so it compares
  how peaked the predictions are, not which token each side predicts.

``logit_divergence`` is the general form practitioners tune: both sides coarsened to ``k + 1`` buckets (the
teacher's top ``k`` by id when the tokenizers agree, each side's own top ``k`` sorted when they don't, plus the
tail), softened by a temperature ``T`` on those buckets (``q ∝ p^(1/T)``, scaled by ``T²`` so gradients keep their
size as ``T`` grows, as in Hinton et al.), and compared by one of ``DIVERGENCES``: forward KL(t ‖ s), reverse KL(s ‖
t), skew KL(t ‖ α·t + (1-α)·s) (DistiLLM), Jensen-Shannon, or total variation. ``auto`` at ``T = 1`` is exactly
``topk_kl`` / ``sorted_prob_distance``. The stored top-k holds only the teacher's probabilities at ``T = 1``, so the
temperature acts on the coarsened distribution (the tail is one bucket), not on the full vocabulary; with ``k`` of
32-128 the tail is small and the two nearly agree.

All return ``[B, T]`` for ``weighted_mean`` with the stored per-token weight (0 where no teacher token ends where
the student token ends). Nothing here produces NaN for all-masked rows or for a teacher that puts all its mass in the
top ``k`` (the tail bucket is then 0 and ``0 * log 0`` is taken as 0).
"""

from __future__ import annotations

import math

import torch

from kava.core.errors import ShapeError

TAIL_FLOOR = 1e-6
"""Smallest tail mass a log is taken of: a student tail that rounds to 0 would otherwise give ``log 0``."""

DIVERGENCES = ("auto", "forward-kl", "reverse-kl", "skew-kl", "jsd", "tvd")
"""``--logit-divergence`` choices; ``auto`` is forward KL on shared ids and ULD's sorted L1 across tokenizers (the
same tuple as ``kava.distill.config.DIVERGENCES``, which a test checks; the config module stays free of torch)."""


def _check(student_logits: torch.Tensor, teacher_logp: torch.Tensor) -> None:
    if student_logits.dim() != 3 or teacher_logp.dim() != 3 or student_logits.shape[:2] != teacher_logp.shape[:2]:
        raise ShapeError(
            f"Expected student logits [B, T, V] and teacher log-probabilities [B, T, k] on the same tokens. Got "
            f"{tuple(student_logits.shape)} and {tuple(teacher_logp.shape)} instead."
        )
    if teacher_logp.shape[-1] > student_logits.shape[-1]:
        raise ShapeError(f"Expected at most {student_logits.shape[-1]} (the student's vocabulary) teacher "
                          f"log-probabilities per token. Got {teacher_logp.shape[-1]} instead.")


def _tail(logp: torch.Tensor) -> torch.Tensor:
    """``[..., k]`` log-probabilities → ``[...]`` the mass outside them, in ``[0, 1]``."""
    return (1.0 - logp.exp().sum(-1)).clamp(0.0, 1.0)


def topk_kl(student_logits: torch.Tensor, teacher_ids: torch.Tensor, teacher_logp: torch.Tensor) -> torch.Tensor:
    """KL(teacher ‖ student) over the teacher's top-k tokens plus one tail bucket, per token.

    Args:
        student_logits: ``[B, T, V]`` logits at each position (predicting the next token).
        teacher_ids: int ``[B, T, k]`` the teacher's top-k token ids at the same positions (same vocabulary).
        teacher_logp: ``[B, T, k]`` their log-probabilities.

    Returns:
        ``[B, T]``, ``>= 0``.
    """
    _check(student_logits, teacher_logp)
    s_logp = torch.log_softmax(student_logits.float(), dim=-1)
    ids = teacher_ids.long().clamp(0, student_logits.shape[-1] - 1)
    s_top = s_logp.gather(-1, ids)  # [B, T, k]
    t_logp = teacher_logp.float()
    p = t_logp.exp()
    head = (p * (t_logp - s_top)).sum(-1)
    t_tail, s_tail = _tail(t_logp), _tail(s_top)
    tail_term = torch.where(
        t_tail > 0,
        t_tail * (t_tail.clamp_min(TAIL_FLOOR).log() - s_tail.clamp_min(TAIL_FLOOR).log()),
        torch.zeros_like(t_tail),
    )
    return (head + tail_term).clamp_min(0.0)


def sorted_prob_distance(student_logits: torch.Tensor, teacher_logp: torch.Tensor) -> torch.Tensor:
    """Universal Logit Distillation's distance on the top-k: ``Σ_i |p_t(i) - p_s(i)| + |tail_t - tail_s|`` with each
    side's probabilities sorted in decreasing order.

    Args:
        student_logits: ``[B, T, V]``.
        teacher_logp: ``[B, T, k]`` the teacher's top-k log-probabilities, sorted (as ``topk_logprobs`` gives them).

    Returns:
        ``[B, T]`` in ``[0, 2]``.
    """
    _check(student_logits, teacher_logp)
    k = teacher_logp.shape[-1]
    s_top = torch.log_softmax(student_logits.float(), dim=-1).topk(k, dim=-1).values  # sorted, largest first
    t_logp = teacher_logp.float().sort(dim=-1, descending=True).values
    head = (t_logp.exp() - s_top.exp()).abs().sum(-1)
    return head + (_tail(t_logp) - _tail(s_top)).abs()


def _bucket_logp(top_logp: torch.Tensor, *, floor_tail: bool) -> torch.Tensor:
    """``[..., k]`` log-probabilities → ``[..., k + 1]``: the ``k``, then the log of the tail mass.

    The tail's log is floored at ``log TAIL_FLOOR`` where ``floor_tail`` (the student, whose tail must stay
    differentiable), else it is ``-inf`` where the tail is exactly 0 (a teacher with all its mass in the top ``k``).
    """
    tail = _tail(top_logp)
    log_tail = tail.clamp_min(TAIL_FLOOR).log() if floor_tail else torch.where(
        tail > 0, tail.clamp_min(TAIL_FLOOR).log(), torch.full_like(tail, -math.inf))
    return torch.cat([top_logp, log_tail.unsqueeze(-1)], dim=-1)


def _xlogy_diff(p: torch.Tensor, log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """``Σ p · (log p - log q)`` over the last dim, with ``0 · (anything)`` taken as 0."""
    return torch.where(p > 0, p * (log_p - log_q), torch.zeros_like(p)).sum(-1)


def logit_divergence(student_logits: torch.Tensor, teacher_ids: torch.Tensor, teacher_logp: torch.Tensor, *,
                     same_tokenizer: bool, divergence: str = "auto", temperature: float = 1.0,
                     skew: float = 0.1) -> torch.Tensor:
    """A divergence between the teacher's stored top-k and the student's prediction, per token.

    Args:
        student_logits: ``[B, T, V]`` logits at each position (predicting the next token).
        teacher_ids: int ``[B, T, k]`` the teacher's top-k token ids (read only when ``same_tokenizer``; >= 0).
        teacher_logp: ``[B, T, k]`` their log-probabilities at temperature 1, sorted (as stored).
        same_tokenizer: the ids mean the same tokens on both sides (else each side's sorted top-k is compared).
        divergence: one of ``DIVERGENCES``.
        temperature: ``T > 0``; the buckets are softened to ``p^(1/T)`` (renormalised) and the result scaled by T².
        skew: ``α`` of skew KL, in ``(0, 1)``.

    Returns:
        ``[B, T]``, ``>= 0`` (``auto``/``tvd`` across tokenizers: in ``[0, 2]`` / ``[0, 1]``).
    """
    if divergence not in DIVERGENCES:
        raise ValueError(f"Expected a divergence in {DIVERGENCES}. Got {divergence!r} instead.")
    if not temperature > 0 or not 0 < skew < 1:
        raise ValueError(f"Expected temperature > 0 and 0 < skew < 1. Got {temperature} and {skew} instead.")
    if divergence == "auto" and temperature == 1.0:
        return (topk_kl(student_logits, teacher_ids, teacher_logp) if same_tokenizer
                else sorted_prob_distance(student_logits, teacher_logp))
    _check(student_logits, teacher_logp)
    k = teacher_logp.shape[-1]
    s_full = torch.log_softmax(student_logits.float(), dim=-1)
    if same_tokenizer:
        s_top = s_full.gather(-1, teacher_ids.long().clamp(0, student_logits.shape[-1] - 1))  # [B, T, k]
        t_top = teacher_logp.float()
    else:
        s_top = s_full.topk(k, dim=-1).values  # ranks matched, as ULD does
        t_top = teacher_logp.float().sort(dim=-1, descending=True).values
    log_t = _bucket_logp(t_top, floor_tail=False)  # [B, T, k + 1]
    log_s = _bucket_logp(s_top, floor_tail=True)
    if temperature != 1.0:
        log_t = torch.log_softmax(log_t / temperature, dim=-1)
        log_s = torch.log_softmax(log_s / temperature, dim=-1)
    p, q = log_t.exp(), log_s.exp()
    if divergence == "auto":
        divergence = "forward-kl" if same_tokenizer else "l1"
    if divergence == "forward-kl":
        out = _xlogy_diff(p, log_t, log_s)
    elif divergence == "reverse-kl":
        # the teacher's empty tail would make this infinite wherever the student puts mass there: floor it
        out = _xlogy_diff(q, log_s, log_t.clamp_min(math.log(TAIL_FLOOR)))
    elif divergence == "skew-kl":
        out = _xlogy_diff(p, log_t, (skew * p + (1 - skew) * q).clamp_min(TAIL_FLOOR).log())
    elif divergence == "jsd":
        log_m = (0.5 * (p + q)).clamp_min(TAIL_FLOOR).log()
        out = 0.5 * _xlogy_diff(p, log_t, log_m) + 0.5 * _xlogy_diff(q, log_s, log_m)
    elif divergence == "tvd":
        out = 0.5 * (p - q).abs().sum(-1)
    else:  # ULD's L1 between sorted probabilities, at this temperature
        out = (p - q).abs().sum(-1)
    return out.clamp_min(0.0) * temperature**2
