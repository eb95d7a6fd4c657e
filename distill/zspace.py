"""Z-space: teachers of different architectures (decoder, encoder, encoder-decoder parts) and the student met in one
shared latent space of width ``Z``.

Each model's K (and V) differ in layer count, heads, head width and what the attention did with them (causal,
bidirectional, cross; RoPE or not), so no one model's layout can be the common one. Instead every model gets its own
linear map per *layer group* into ``Z``:

* A model's stored layers are cut into ``G`` contiguous groups (:func:`layer_groups`, proportional); a token's
  feature for group ``g`` is its K (or V) over that group's layers, heads and channels, flattened
  (:func:`group_features`: ``[N, L, H, D]`` → ``G × [N, |g|·H·D]``). Group ``g`` of every model is matched with
  group ``g`` of every other: the same depth fraction, the simplest layer map across architectures (a CKA-chosen map
  can replace it by passing other groups).
* :class:`ZSpace` holds one ``Linear(F, Z, bias=False)`` per model, group and K/V.
* :func:`zspace_losses` computes, per teacher and group, the K/V term in Z (``1 - cos`` between the student's and the
  teacher's projection of each token, weighted by the teacher's ``align_weight``) and the *agreement* term that makes
  Z shared: ``1 - linear CKA`` between two teachers' projections of the tokens both cover. CKA is scale-invariant,
  so neither term is won by shrinking projections, and a projection collapsed to one point has CKA 0 (loss 1).

Components take tensors and return tensors; gathering a teacher's rows onto the student's tokens (the store does)
and choosing the term weights (the trainer) happen elsewhere.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import NamedTuple

import torch
from torch import nn

from kava.core.errors import ConfigError, ShapeError

SIDES = ("k", "v")


def layer_groups(num_layers: int, groups: int) -> list[tuple[int, ...]]:
    """Cut layer positions ``0..num_layers-1`` into ``groups`` contiguous, near-equal groups (earlier groups take
    the remainder). ``layer_groups(5, 2) == [(0, 1, 2), (3, 4)]``.

    Raises:
        ConfigError: ``groups`` not in ``[1, num_layers]``.
    """
    if isinstance(groups, bool) or not isinstance(groups, int) or not 1 <= groups <= num_layers:
        raise ConfigError(f"Expected a Z-space group count in [1, {num_layers}] (the model's stored layers). Got "
                          f"{groups!r} instead. Use fewer groups.")
    size, extra = divmod(num_layers, groups)
    out, start = [], 0
    for g in range(groups):
        stop = start + size + (g < extra)
        out.append(tuple(range(start, stop)))
        start = stop
    return out


def group_features(x: torch.Tensor, groups: Sequence[Sequence[int]]) -> list[torch.Tensor]:
    """``[N, L, H, D]`` (a token's K or V over its stored layers) → per group ``[N, |g|·H·D]``."""
    if x.ndim != 4:
        raise ShapeError(f"Expected K/V of shape [N, L, H, D]. Got {tuple(x.shape)} instead.")
    return [x[:, list(g)].flatten(1) for g in groups]


def group_widths(num_layers: int, heads: int, head_dim: int, groups: int) -> tuple[int, ...]:
    """The feature width of each group of a model with ``num_layers`` stored layers of ``heads × head_dim``."""
    return tuple(len(g) * heads * head_dim for g in layer_groups(num_layers, groups))


class ZSpace(nn.Module):
    """Per model, per layer group, per K/V: a linear map of that group's features into the shared width ``Z``.

    Args:
        widths: model name (each teacher, and the student) → the feature width of each of its ``G`` groups
            (:func:`group_widths`); every model has the same ``G``.
        width: ``Z``.
    """

    def __init__(self, widths: Mapping[str, Sequence[int]], width: int) -> None:
        super().__init__()
        if isinstance(width, bool) or not isinstance(width, int) or width < 1:
            raise ConfigError(f"Expected a positive Z-space width. Got {width!r} instead.")
        counts = {name: len(w) for name, w in widths.items()}
        if len(widths) < 2 or len(set(counts.values())) != 1 or 0 in counts.values():
            raise ConfigError(f"Expected two or more models with the same number of layer groups (at least 1). Got "
                              f"{counts} instead. Cut every model into the same number of groups.")
        bad = {name: list(w) for name, w in widths.items() if any(not isinstance(f, int) or f < 1 for f in w)}
        if bad:
            raise ConfigError(f"Expected positive feature widths per group. Got {bad} instead.")
        self.width = width
        self.groups = next(iter(counts.values()))
        self.widths = {name: tuple(w) for name, w in widths.items()}
        # maps[name][side][g]: Linear(F_g, Z). ModuleDict keys can't hold '.', which teacher names may.
        self.maps = nn.ModuleDict({
            self._key(name): nn.ModuleDict({side: nn.ModuleList([nn.Linear(f, width, bias=False) for f in w])
                                            for side in SIDES})
            for name, w in self.widths.items()})

    @staticmethod
    def _key(name: str) -> str:
        return name.replace(".", "__")

    def project(self, name: str, side: str, group: int, x: torch.Tensor) -> torch.Tensor:
        """``[N, F_g]`` features of model ``name``'s group ``group`` → ``[N, Z]``."""
        if name not in self.widths:
            raise ConfigError(f"Expected a model among {sorted(self.widths)}. Got {name!r} instead.")
        expected = self.widths[name][group]
        if x.ndim != 2 or x.shape[1] != expected:
            raise ShapeError(f"Expected {name} group {group} features [N, {expected}]. Got {tuple(x.shape)} instead.")
        return self.maps[self._key(name)][side][group](x)


def linear_cka(x: torch.Tensor, y: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """Differentiable linear CKA of ``[N, A]`` and ``[N, B]`` features of the same ``N`` tokens: a scalar in [0, 1],
    1 when one is an orthogonal transform and scaling of the other, 0 when either is constant."""
    if x.ndim != 2 or y.ndim != 2 or x.shape[0] != y.shape[0] or x.shape[0] < 2:
        raise ShapeError(f"Expected [N, A] and [N, B] features of the same N >= 2 tokens. Got {tuple(x.shape)} and "
                         f"{tuple(y.shape)} instead.")
    x = x - x.mean(0, keepdim=True)
    y = y - y.mean(0, keepdim=True)
    cross = (y.T @ x).square().sum()
    return cross / ((x.T @ x).square().sum().sqrt() * (y.T @ y).square().sum().sqrt() + eps)


class ZLosses(NamedTuple):
    """The Z-space terms, each a scalar: ``kv`` (student vs teachers in Z) and ``agreement`` (teachers vs each
    other); ``per_teacher`` the K/V term of each teacher, for logging."""

    kv: torch.Tensor
    agreement: torch.Tensor
    per_teacher: dict[str, torch.Tensor]


def zspace_losses(space: ZSpace, student: str, features: Mapping[str, Mapping[str, Sequence[torch.Tensor]]],
                  weights: Mapping[str, torch.Tensor], *, eps: float = 1e-8) -> ZLosses:
    """The K/V and agreement terms in Z.

    Args:
        space: the projectors.
        student: the student's name in ``space`` and ``features``.
        features: model → side (``"k"``, ``"v"``) → per group ``[N, F_g]`` (:func:`group_features`); all on the
            student's ``N`` tokens (a teacher's rows as the store aligned them).
        weights: teacher → ``[N]`` its ``align_weight`` (0 where it has no row: another part, another segment).

    Returns:
        :class:`ZLosses`. ``kv`` is the mean over teachers, sides and groups of the ``align_weight``-weighted mean of
        ``1 - cos(student z, teacher z)``; ``agreement`` the mean over teacher pairs, sides and groups of
        ``1 - linear_cka`` on the tokens both teachers cover (zero when there is one teacher, or the pair shares
        fewer than 2 tokens).
    """
    teachers = [name for name in features if name != student]
    if student not in features or not teachers:
        raise ConfigError(f"Expected features of the student {student!r} and at least one teacher. Got "
                          f"{sorted(features)} instead.")
    missing = sorted(set(teachers) - set(weights))
    if missing:
        raise ConfigError(f"Expected an align_weight for every teacher. Got none for {missing}.")
    z = {name: {side: [space.project(name, side, g, f) for g, f in enumerate(features[name][side])]
                for side in SIDES} for name in features}
    per_teacher: dict[str, torch.Tensor] = {}
    for name in teachers:
        w = weights[name]
        terms = []
        for side in SIDES:
            for zs, zt in zip(z[student][side], z[name][side]):
                distance = 1 - nn.functional.cosine_similarity(zs, zt, dim=-1, eps=eps)  # [N]
                terms.append((distance * w).sum() / w.sum().clamp_min(eps))
        per_teacher[name] = torch.stack(terms).mean()
    kv = torch.stack(list(per_teacher.values())).mean()

    pairs = []
    for i, a in enumerate(teachers):
        for b in teachers[i + 1:]:
            both = (weights[a] > 0) & (weights[b] > 0)
            if int(both.sum()) < 2:
                continue
            for side in SIDES:
                for za, zb in zip(z[a][side], z[b][side]):
                    pairs.append(1 - linear_cka(za[both], zb[both]))
    agreement = torch.stack(pairs).mean() if pairs else kv.new_zeros(())
    return ZLosses(kv, agreement, per_teacher)
