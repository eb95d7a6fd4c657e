"""The KaVa objective's terms as tensor functions, and the on-the-fly R-KV compression of the teacher's CoT cache.

``loss = ce(answer | latents, question) + w_cot · ce(CoT, answer | question) + α₁ · codi + α₂ · kv``

- ``answer_ce`` / ``sequence_ce``: mean token cross-entropy over the real target tokens.
- ``codi_loss``: the hidden states of the token right before the answer, at every layer, student against teacher
  (CODI); the teacher side carries no gradient. Each layer's term may be divided by the teacher's standard
  deviation at that layer (CODI's and PCCoT's normalisation), so layers of different scale weigh alike.
- ``kv_loss``: the student's K/V at its ``M`` latent positions against the teacher's R-KV-compressed CoT K/V, ``M``
  rows per layer and head in time order: ``½ (mean ℓ(K̃ᵗ − Kˢ) + mean ℓ(Ṽᵗ − Vˢ))`` over layers, heads, valid rows
  and channels, optionally each layer divided by the teacher's std there.
- ``compress_rkv``: which ``M`` CoT rows each layer and KV head keeps under R-KV (``kava.extract.evict.keep``).
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F

from kava.core.errors import ConfigError, ShapeError
from kava.extract.evict import keep

Distance = Literal["l1", "mse", "smooth-l1"]
DISTANCES: tuple[Distance, ...] = ("l1", "mse", "smooth-l1")


def elementwise(kind: Distance, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """The distance ``kind`` per element, same shape as the inputs."""
    if kind == "l1":
        return (student - teacher).abs()
    if kind == "mse":
        return (student - teacher).square()
    if kind == "smooth-l1":
        return F.smooth_l1_loss(student, teacher, reduction="none")
    raise ConfigError(f"Expected a distance of {', '.join(DISTANCES)}. Got {kind!r} instead.")


def answer_ce(logits: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of ``ids`` ``[B, A]`` under ``logits`` ``[B, A, V]`` (``logits[:, j]`` predicts
    ``ids[:, j]``) over the tokens where ``mask`` is 1."""
    per_token = F.cross_entropy(logits.float().flatten(0, 1), ids.flatten(), reduction="none").view_as(ids)
    weight = mask.to(per_token.dtype)
    return (per_token * weight).sum() / weight.sum().clamp_min(1)


def sequence_ce(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy: ``logits[:, t]`` ``[B, T, V]`` predicts ``labels[:, t + 1]``; -100 is skipped."""
    return F.cross_entropy(logits[:, :-1].float().flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)


def codi_loss(
    student: torch.Tensor, teacher: torch.Tensor, *, kind: Distance = "l1", normalize: bool = True
) -> torch.Tensor:
    """CODI's hidden-state term: ``student``, ``teacher`` ``[L, B, d]`` (each layer's state of one token per row).
    Per layer the mean distance over ``B·d``, divided by the teacher's std over them when ``normalize``; then the
    mean over layers. The teacher is detached."""
    if student.shape != teacher.shape or student.ndim != 3:
        raise ShapeError(
            f"Expected student and teacher hidden states of one shape [L, B, d]. Got "
            f"{tuple(student.shape)} and {tuple(teacher.shape)} instead."
        )
    teacher = teacher.detach().float()
    per_layer = elementwise(kind, student.float(), teacher).flatten(1).mean(-1)  # [L]
    if normalize:
        per_layer = per_layer / teacher.flatten(1).std(-1).clamp_min(1e-6)
    return per_layer.mean()


def _kv_term(
    student: torch.Tensor, teacher: torch.Tensor, valid: torch.Tensor, kind: Distance, normalize: bool
) -> torch.Tensor:
    """One of K or V: ``[L, B, H, M, D]`` each, ``valid`` ``[B, M]``."""
    teacher = teacher.detach().float()
    weight = valid[None, :, None, :, None].to(teacher.dtype).expand_as(teacher)  # [L, B, H, M, D]
    count = weight[0].sum().clamp_min(1)
    per_layer = (elementwise(kind, student.float(), teacher) * weight).flatten(1).sum(-1) / count  # [L]
    if normalize:
        mean = (teacher * weight).flatten(1).sum(-1) / count
        var = (((teacher - mean[:, None, None, None, None]) * weight).square()).flatten(1).sum(-1) / count
        per_layer = per_layer / var.sqrt().clamp_min(1e-6)
    return per_layer.mean()


def kv_loss(
    student_k: torch.Tensor,
    student_v: torch.Tensor,
    teacher_k: torch.Tensor,
    teacher_v: torch.Tensor,
    valid: torch.Tensor,
    *,
    kind: Distance = "mse",
    normalize: bool = False,
) -> torch.Tensor:
    """KaVa's K/V term: ``½ (term(K) + term(V))``; each of the four tensors ``[L, B, H, M, D]``, ``valid`` ``[B, M]``
    marks the rows with a teacher row (a CoT shorter than ``M`` has fewer). Per layer the mean distance over the
    valid rows, heads and channels (divided by the teacher's std over them when ``normalize``), then the mean over
    layers. A batch with no valid row gives 0."""
    shapes = {tuple(t.shape) for t in (student_k, student_v, teacher_k, teacher_v)}
    if len(shapes) != 1 or student_k.ndim != 5 or tuple(valid.shape) != (student_k.shape[1], student_k.shape[3]):
        raise ShapeError(
            f"Expected K/V of one shape [L, B, H, M, D] and valid [B, M]. Got {sorted(shapes)} and "
            f"{tuple(valid.shape)} instead."
        )
    return 0.5 * (
        _kv_term(student_k, teacher_k, valid, kind, normalize) + _kv_term(student_v, teacher_v, valid, kind, normalize)
    )


def compress_rkv(
    keys: torch.Tensor,
    queries: torch.Tensor,
    cot: torch.Tensor,
    window: torch.Tensor,
    budget: int,
    *,
    scale: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """R-KV's choice of each row's CoT cache, per KV head: the positions ``[B, H, M]`` (time order) and ``valid``
    ``[B, M]``.

    Args:
        keys: ``[B, H, T, D]`` one layer's keys after RoPE (as the teacher attended with them).
        queries: ``[B, Hq, T, D]`` the same layer's queries after RoPE.
        cot: ``[B, T]`` bool, the CoT tokens (the segment compressed).
        window: ``[B, T]`` bool, the observation window (the answer's tokens) whose attention scores the CoT.
        budget: ``M``, rows kept per head. A row whose CoT has ``S < M`` tokens keeps all ``S``; its other slots
            point at position 0 and are marked invalid.
        scale: the softmax scale of the layer (default ``1/sqrt(D)``).
    """
    b, h, _, _ = keys.shape
    positions = torch.zeros(b, h, budget, dtype=torch.long)
    valid = torch.zeros(b, budget, dtype=torch.bool)
    for i in range(b):
        length = int(cot[i].nonzero().max()) + 1 if bool(cot[i].any()) else 0
        at = window[i].nonzero().flatten()
        if length == 0 or not len(at):
            continue
        end = max(length, int(at.max()) + 1)
        kept = keep(
            "r-kv",
            keys[i, :, :end].float(),
            cot[i, :end].cpu(),
            budget,
            queries=queries[i][:, at].float(),
            query_at=at.cpu(),
            scale=scale,
        )  # [H, N - S + M']
        chosen = kept[cot[i, :end].cpu()[kept]].view(h, -1)  # [H, M'], time order
        positions[i, :, : chosen.shape[1]] = chosen
        valid[i, : chosen.shape[1]] = True
    return positions.to(keys.device), valid.to(keys.device)


def gather_rows(x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """``x`` ``[B, H, T, D]`` at ``positions`` ``[B, H, M]`` → ``[B, H, M, D]``."""
    return x.gather(2, positions[..., None].expand(-1, -1, -1, x.shape[-1]))


def default_scale(head_dim: int) -> float:
    return 1 / math.sqrt(head_dim)
