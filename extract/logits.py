"""The teacher's next-token distribution, kept compactly for logit distillation: its top-k log-probabilities per
student token, and which teacher token a student token can take them from.

A student token ``t`` predicts the text after its last character. A teacher token predicts the text after *its*
last character. The two distributions condition on the same text only where the two tokens end at the same
character, so a student token takes the distribution of the teacher token that ends exactly where it ends (the last
such teacher token, when zero-width ones share the end) and has no target where the boundaries differ. With one
tokenizer every token has its twin; across tokenizers, the boundaries the two agree on (word starts, digits,
newlines) carry the signal. What the distributions are over differs across tokenizers; the loss that compares them
(``kava.distill.logit_kd``) handles that, not this module.

Everything takes and returns arrays; the recipe owns devices and I/O.
"""

from __future__ import annotations

import numpy as np
import torch

from kava.core.errors import ConfigError

NO_TARGET = -1
"""``boundary_rows`` entry of a student token whose end no teacher token shares."""


def topk_logprobs(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` most likely next tokens and their log-probabilities.

    Args:
        logits: ``[..., V]`` (any float dtype; the softmax is taken in float32).
        k: how many to keep, ``1 <= k <= V``.

    Returns:
        ``(ids, logp)``: int64 ``[..., k]`` and float32 ``[..., k]``, most likely first. ``1 - exp(logp).sum(-1)``
        is the mass of every other token (the tail the losses keep as one bucket).
    """
    if not 1 <= k <= logits.shape[-1]:
        raise ConfigError(f"Expected --logit-top-k between 1 and the vocabulary size {logits.shape[-1]}. "
                          f"Got {k} instead.")
    logp = torch.log_softmax(logits.float(), dim=-1)
    values, ids = torch.topk(logp, k, dim=-1)  # sorted, largest first
    return ids, values


def boundary_rows(student_spans: np.ndarray, teacher_spans: np.ndarray) -> np.ndarray:
    """For each student token, the teacher token that ends at the same character (``NO_TARGET`` when none does).

    Args:
        student_spans: int ``[T_s, 2]`` half-open character spans over the text (see ``align.token_spans``).
        teacher_spans: int ``[T_t, 2]`` over the same text (or moved into it with ``align.remap_spans``).

    Returns:
        int64 ``[T_s]``: teacher token indices, or ``NO_TARGET``. Zero-width spans (BOS, glue text with no
        counterpart) never match and are never matched: their position says nothing about what they have read.
        Among teacher tokens that end at the same character, the last one is taken (it has read the most).
    """
    s = np.asarray(student_spans, dtype=np.int64).reshape(-1, 2)
    t = np.asarray(teacher_spans, dtype=np.int64).reshape(-1, 2)
    out = np.full(len(s), NO_TARGET, dtype=np.int64)
    t_live = np.flatnonzero(t[:, 1] > t[:, 0])
    if not len(t_live) or not len(s):
        return out
    ends = t[t_live, 1]
    # The last live teacher token ending at each end position: ends are nondecreasing in token order, so a stable
    # sort keeps the order and searchsorted(..., "right") - 1 finds the last of each run.
    order = np.argsort(ends, kind="stable")
    ends_sorted = ends[order]
    s_live = s[:, 1] > s[:, 0]
    pos = np.searchsorted(ends_sorted, s[:, 1], side="right") - 1
    hit = s_live & (pos >= 0)
    hit[hit] &= ends_sorted[pos[hit]] == s[hit, 1]
    out[hit] = t_live[order[pos[hit]]]
    return out
