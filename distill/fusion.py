"""Multi-teacher fusion: per token, how much each of N teachers counts.

Every router has the same signature, ``forward(similarity, features, available) -> weights``:

* ``similarity`` ``[B, T, N]``: how close the student is to each teacher at each token (e.g. cosine of keys);
* ``features`` ``[B, T, F]``: what a learned router looks at (e.g. the student's hidden states);
* ``available`` ``[B, T, N]`` bool: whether teacher ``n`` has a target at that token (alignment gaps, missing
  teachers);
* ``weights`` ``[B, T, N]``: non-negative, summing to 1 over the available teachers of each token, 0 for unavailable
  teachers and all 0 on tokens with no teacher at all.

``rl`` and ``oracle`` route whole samples instead (one teacher for every token of a sample): they are in
:mod:`.routing`, built here by :func:`build_fusion`, and the objective calls them with per-sample inputs.

Routing is never trained through its inputs: ``similarity`` and ``features`` are detached, so the distillation
loss cannot lower itself by moving the student towards whichever teacher is easiest to match.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from kava.core.errors import ConfigError, ShapeError
from kava.distill.losses import weighted_mean
from kava.distill.routing import ROUTING_KINDS, OracleRouter, PolicyRouter

FUSION_KINDS = ("fixed", "similarity", "learnable")
"""The per-token fusions; ``build_fusion`` also builds the per-sample routers of ``ROUTING_KINDS``."""

# Logit for unavailable teachers; finite so that a token with no teacher gives 0/1 = 0 rather than NaN.
_UNAVAILABLE_LOGIT = -1e9


def masked_softmax(logits: torch.Tensor, available: torch.Tensor) -> torch.Tensor:
    """Softmax over the last dim restricted to ``available``; all-zero where nothing is available.

    Args:
        logits: ``[..., N]``.
        available: ``[..., N]`` bool.

    Returns:
        ``[..., N]``, summing to 1 over available entries (0 where none).
    """
    logits = logits.masked_fill(~available, _UNAVAILABLE_LOGIT)
    shifted = logits - logits.amax(dim=-1, keepdim=True).detach()
    e = shifted.exp() * available.to(logits.dtype)
    total = e.sum(dim=-1, keepdim=True)
    return e / torch.where(total > 0, total, torch.ones_like(total))


def _check_inputs(
    similarity: torch.Tensor, features: torch.Tensor, available: torch.Tensor, num_teachers: int | None, flag: str
) -> None:
    if similarity.dim() != 3 or available.shape != similarity.shape or available.dtype != torch.bool:
        raise ShapeError(
            f"Expected similarity [B, T, N] and a bool mask available of the same shape. Got {tuple(similarity.shape)} "
            f"and {available.dtype} {tuple(available.shape)} instead. Pass one entry per token and teacher."
        )
    if features.dim() != 3 or features.shape[:2] != similarity.shape[:2]:
        raise ShapeError(
            f"Expected features [B, T, F] for the same {tuple(similarity.shape[:2])} tokens. "
            f"Got {tuple(features.shape)} instead. Pass the student's per-token features."
        )
    if num_teachers is not None and similarity.shape[-1] != num_teachers:
        raise ConfigError(
            f"Expected {num_teachers} teachers (from {flag}). Got inputs for {similarity.shape[-1]} instead. "
            f"Give {flag} one entry per teacher."
        )


class FixedFusion(nn.Module):
    """Constant teacher weights, renormalised over the teachers available at each token.

    Tokens whose available teachers all have weight 0 get all-zero weights, like tokens with no teacher.

    Args:
        weights: one non-negative weight per teacher, at least one positive (normalised to sum 1).
    """

    def __init__(self, weights: Sequence[float]) -> None:
        super().__init__()
        values = [float(w) for w in weights]
        if not values or any(not math.isfinite(w) or w < 0 for w in values) or not any(w > 0 for w in values):
            raise ConfigError(
                f"Expected --fusion-weights to be finite, non-negative and not all zero. Got {list(weights)!r} "
                "instead. Give one weight per teacher, e.g. --fusion-weights 1 1."
            )
        w = torch.tensor(values, dtype=torch.float64)
        self.weights: torch.Tensor
        self.register_buffer("weights", (w / w.sum()).float(), persistent=False)

    def forward(self, similarity: torch.Tensor, features: torch.Tensor, available: torch.Tensor) -> torch.Tensor:
        """``[B, T, N]`` x3 (``features`` ``[B, T, F]``) -> weights ``[B, T, N]``; the first two are unused."""
        _check_inputs(similarity, features, available, self.weights.numel(), "--fusion-weights")
        dtype = similarity.dtype if similarity.is_floating_point() else torch.float32
        w = self.weights.to(dtype) * available.to(dtype)  # [B, T, N]
        total = w.sum(dim=-1, keepdim=True)
        return w / torch.where(total > 0, total, torch.ones_like(total))


class SimilarityFusion(nn.Module):
    """Softmax of ``similarity / temperature`` over the available teachers: the closest teacher leads.

    Args:
        temperature: ``> 0``; small values approach picking the most similar teacher, large ones uniform.
    """

    def __init__(self, temperature: float = 0.1) -> None:
        super().__init__()
        if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature > 0):
            raise ConfigError(f"Expected --fusion-temperature > 0. Got {temperature!r} instead. Use e.g. 0.1.")
        self.temperature = float(temperature)

    def forward(self, similarity: torch.Tensor, features: torch.Tensor, available: torch.Tensor) -> torch.Tensor:
        """``similarity`` ``[B, T, N]``, ``features`` ``[B, T, F]`` (unused), ``available`` -> ``[B, T, N]``."""
        _check_inputs(similarity, features, available, None, "--fusion")
        return masked_softmax(similarity.detach() / self.temperature, available)

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}"


class LearnedRouter(nn.Module):
    """A small MLP on per-token features gives one logit per teacher; softmax over the available ones.

    ``Linear(F, hidden) -> GELU -> Linear(hidden, N)``. The last layer starts at zero, so training starts from
    uniform weights and the router moves away from them only as far as the loss asks.

    Args:
        num_teachers: N, ``>= 1``.
        feature_dim: F, ``>= 1``.
        hidden: width of the hidden layer, ``>= 1``.
    """

    def __init__(self, num_teachers: int, feature_dim: int, hidden: int = 64) -> None:
        super().__init__()
        for name, value in (("num_teachers", num_teachers), ("feature_dim", feature_dim), ("hidden", hidden)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"Expected {name} to be a positive integer. Got {value!r} instead. Pass {name} >= 1.")
        self.num_teachers = num_teachers
        self.feature_dim = feature_dim
        hidden_layer, out_layer = nn.Linear(feature_dim, hidden), nn.Linear(hidden, num_teachers)  # in this order
        self.mlp = nn.Sequential(hidden_layer, nn.GELU(), out_layer)
        nn.init.zeros_(out_layer.weight)
        nn.init.zeros_(out_layer.bias)

    def forward(self, similarity: torch.Tensor, features: torch.Tensor, available: torch.Tensor) -> torch.Tensor:
        """``similarity`` ``[B, T, N]`` (unused), ``features`` ``[B, T, F]``, ``available`` -> ``[B, T, N]``."""
        _check_inputs(similarity, features, available, self.num_teachers, "--fusion")
        if features.shape[-1] != self.feature_dim:
            raise ShapeError(
                f"Expected features with {self.feature_dim} channels. Got {features.shape[-1]} instead. "
                "Build the router with the student's hidden size as feature_dim."
            )
        logits = self.mlp(features.detach())  # [B, T, N]
        return masked_softmax(logits, available)


def router_entropy(weights: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean entropy (nats) of the per-token teacher weights; a regulariser and a collapse diagnostic.

    Args:
        weights: ``[B, T, N]`` as returned by a router.
        mask: ``[B, T]`` bool or float; tokens to average over (float values act as weights).

    Returns:
        Scalar: mean over tokens that are in ``mask`` and have any teacher available; 0 when there are none.
    """
    if weights.dim() != 3 or mask.shape != weights.shape[:2]:
        raise ShapeError(
            f"Expected weights [B, T, N] and mask [B, T]. Got {tuple(weights.shape)} and {tuple(mask.shape)} "
            "instead. Pass the router output and the token mask of the same batch."
        )
    positive = weights > 0
    safe = torch.where(positive, weights, torch.ones_like(weights))  # log(1) = 0 where the weight is 0
    entropy = -(torch.where(positive, weights * safe.log(), torch.zeros_like(weights))).sum(-1)  # [B, T]
    has_teacher = positive.any(dim=-1)
    token_weight = mask.to(entropy.dtype) * has_teacher.to(entropy.dtype)
    return weighted_mean(entropy, token_weight)


def build_fusion(
    kind: str,
    num_teachers: int,
    *,
    weights: Sequence[float] | None = None,
    temperature: float = 0.1,
    feature_dim: int | None = None,
    hidden: int = 64,
    num_families: int = 0,
    baseline_decay: float = 0.9,
) -> nn.Module:
    """Build the router named by ``kind`` (``"fixed"``, ``"similarity"``, ``"learnable"``, ``"rl"`` or
    ``"oracle"``).

    ``weights`` (fixed; default uniform) must have ``num_teachers`` entries; ``feature_dim`` is required for
    ``"learnable"`` and ``"rl"``; ``num_families`` > 0 shows the rl policy the family tag.
    """
    if isinstance(num_teachers, bool) or not isinstance(num_teachers, int) or num_teachers < 1:
        raise ConfigError(
            f"Expected at least one teacher. Got num_teachers={num_teachers!r} instead. Pass one or more teachers."
        )
    if kind == "fixed":
        if weights is None:
            weights = [1.0] * num_teachers
        if len(weights) != num_teachers:
            raise ConfigError(
                f"Expected --fusion-weights to have one entry per teacher ({num_teachers}). Got {len(weights)} "
                f"({list(weights)!r}) instead. Give exactly {num_teachers} weights."
            )
        return FixedFusion(weights)
    if kind == "similarity":
        return SimilarityFusion(temperature)
    if kind == "learnable":
        if feature_dim is None:
            raise ConfigError(
                "Expected feature_dim for --fusion learnable. Got None instead. "
                "Pass the student's hidden size as feature_dim."
            )
        return LearnedRouter(num_teachers, feature_dim, hidden)
    if kind == "rl":
        if feature_dim is None:
            raise ConfigError("Expected feature_dim for --fusion rl. Got None instead. Pass the student's head dim.")
        return PolicyRouter(num_teachers, feature_dim, num_families, baseline_decay)
    if kind == "oracle":
        return OracleRouter()
    raise ConfigError(
        f"Expected --fusion to be one of {', '.join(FUSION_KINDS)}. Got {kind!r} instead. Choose one of those, or a "
        f"per-sample router: {', '.join(ROUTING_KINDS)}."
    )
