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

Both return ``[B, T]`` for ``weighted_mean`` with the stored per-token weight (0 where no teacher token ends where
the student token ends). Nothing here produces NaN for all-masked rows or for a teacher that puts all its mass in the
top ``k`` (the tail bucket is then 0 and ``0 * log 0`` is taken as 0).
"""

from __future__ import annotations

import torch

from kava.core.errors import ShapeError

TAIL_FLOOR = 1e-6
"""Smallest tail mass a log is taken of: a student tail that rounds to 0 would otherwise give ``log 0``."""


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
