"""Projectors: map one model's per-layer K or V onto another model's head layout.

A projector takes ``[B, H_in, T, D_in]`` (any number of leading dims before the heads) and returns
``[B, H_out, T, D_out]``. Two kinds:

* ``StructuredProjector`` keeps the head structure: a head mixer ``[H_out, H_in]`` followed by a ``D_in -> D_out``
  map (shared by all output heads, or one per output head). It starts as plain head averaging: each output head is
  the mean of the share of input heads that covers it (``head_share_matrix``), so training begins from a sensible
  map instead of noise, and it has far fewer parameters than the flat baseline.
* ``FlatProjector`` is the baseline: one dense map from all heads and channels of a token to all of the other's.

``KVProjectors`` holds one K and one V projector per student layer. Inputs must already have the parameters'
dtype (and device): casting is the caller's job.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import cast

import torch
from torch import nn

from kava.core.errors import ConfigError, ShapeError

PROJECTOR_KINDS = ("structured", "flat")


def _check_positive(name: str, value: int) -> None:
    # bool is an int subclass; True heads is never what the caller meant
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"Expected {name} to be a positive integer. Got {value!r} instead. Pass the model's {name}.")


def head_share_matrix(in_heads: int, out_heads: int) -> torch.Tensor:
    """How much of each input head each output head covers, with rows normalised to sum to 1.

    Both head ranges are laid on ``[0, 1)``: output head ``j`` covers ``[j/out_heads, (j+1)/out_heads)`` and input
    head ``i`` covers ``[i/in_heads, (i+1)/in_heads)``. Entry ``(j, i)`` is the length of their overlap divided by
    the length of output head ``j``'s interval. So ``4 -> 2`` gives row 0 ``[.5, .5, 0, 0]``, ``3 -> 2`` gives row 0
    ``[2/3, 1/3, 0]``, and ``2 -> 4`` copies the one input head covering each output head.

    Args:
        in_heads: number of input heads.
        out_heads: number of output heads.

    Returns:
        ``[out_heads, in_heads]`` float32, non-negative, each row summing to 1.
    """
    _check_positive("in_heads", in_heads)
    _check_positive("out_heads", out_heads)
    # In units of 1 / (in_heads * out_heads) every endpoint is an integer, so the overlaps are exact.
    j = torch.arange(out_heads, dtype=torch.int64).unsqueeze(1)  # [O, 1]
    i = torch.arange(in_heads, dtype=torch.int64).unsqueeze(0)  # [1, I]
    lo = torch.maximum(j * in_heads, i * out_heads)
    hi = torch.minimum((j + 1) * in_heads, (i + 1) * out_heads)
    overlap = (hi - lo).clamp_min(0)  # [O, I]; each row sums to in_heads
    return overlap.to(torch.float64).div(in_heads).to(torch.float32)


class StructuredProjector(nn.Module):
    """Head mixer followed by a per-channel map; keeps heads as heads.

    ``y[..., j, t, :] = W_j @ sum_i M[j, i] x[..., i, t, :]`` with ``M`` ``[out_heads, in_heads]`` and ``W_j``
    ``[out_dim, in_dim]`` (the same ``W`` for every ``j`` when ``share_dim``). No bias: K and V carry no offset
    worth learning, and a zero input should map to zero.

    Args:
        in_heads, in_dim: heads and head_dim of the input side.
        out_heads, out_dim: heads and head_dim of the output side.
        init_uniform: start the mixer as ``head_share_matrix(in_heads, out_heads)`` (each output head the mean of its
            share of input heads); otherwise draw it from ``N(0, 1/in_heads)``.
        share_dim: one ``[out_dim, in_dim]`` map for all output heads, else one per output head.

    The channel map starts as the identity when ``in_dim == out_dim`` (so with ``init_uniform`` the projector starts
    as exact head averaging), else as a semi-orthogonal matrix, which preserves norms as far as the shapes allow.
    """

    def __init__(
        self,
        in_heads: int,
        in_dim: int,
        out_heads: int,
        out_dim: int,
        *,
        init_uniform: bool = True,
        share_dim: bool = True,
    ) -> None:
        super().__init__()
        for name, value in (("in_heads", in_heads), ("in_dim", in_dim), ("out_heads", out_heads), ("out_dim", out_dim)):
            _check_positive(name, value)
        self.in_heads, self.in_dim, self.out_heads, self.out_dim = in_heads, in_dim, out_heads, out_dim
        self.share_dim = share_dim
        self.head_mix = nn.Parameter(torch.empty(out_heads, in_heads))
        dim_shape = (out_dim, in_dim) if share_dim else (out_heads, out_dim, in_dim)
        self.dim_proj = nn.Parameter(torch.empty(dim_shape))
        self._init_weights(init_uniform)

    @torch.no_grad()
    def _init_weights(self, init_uniform: bool) -> None:
        if init_uniform:
            self.head_mix.copy_(head_share_matrix(self.in_heads, self.out_heads))
        else:
            nn.init.normal_(self.head_mix, std=1.0 / math.sqrt(self.in_heads))
        # orthogonal_ flattens trailing dims, so initialise each head's [out_dim, in_dim] slice on its own
        slices = [self.dim_proj] if self.share_dim else list(self.dim_proj)
        for w in slices:
            if self.in_dim == self.out_dim:
                w.copy_(torch.eye(self.out_dim))
            else:
                nn.init.orthogonal_(w)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` ``[..., in_heads, T, in_dim]`` -> ``[..., out_heads, T, out_dim]``."""
        _check_input(x, self.in_heads, self.in_dim)
        mixed = torch.einsum("ji,...itd->...jtd", self.head_mix, x)  # [..., O, T, D_in]
        if self.share_dim:
            return torch.einsum("...jtd,ed->...jte", mixed, self.dim_proj)
        return torch.einsum("...jtd,jed->...jte", mixed, self.dim_proj)

    def extra_repr(self) -> str:
        return (
            f"in_heads={self.in_heads}, in_dim={self.in_dim}, out_heads={self.out_heads}, out_dim={self.out_dim}, "
            f"share_dim={self.share_dim}"
        )


class FlatProjector(nn.Module):
    """Baseline: all heads and channels of a token through one dense map.

    ``[..., in_heads, T, in_dim]`` -> concat heads per token ``[..., T, in_heads*in_dim]`` -> ``Linear`` (no bias,
    default init) -> ``[..., T, out_heads*out_dim]`` -> ``[..., out_heads, T, out_dim]``.
    """

    def __init__(self, in_heads: int, in_dim: int, out_heads: int, out_dim: int) -> None:
        super().__init__()
        for name, value in (("in_heads", in_heads), ("in_dim", in_dim), ("out_heads", out_heads), ("out_dim", out_dim)):
            _check_positive(name, value)
        self.in_heads, self.in_dim, self.out_heads, self.out_dim = in_heads, in_dim, out_heads, out_dim
        self.linear = nn.Linear(in_heads * in_dim, out_heads * out_dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` ``[..., in_heads, T, in_dim]`` -> ``[..., out_heads, T, out_dim]``."""
        _check_input(x, self.in_heads, self.in_dim)
        tokens = x.transpose(-3, -2).flatten(-2)  # [..., T, H_in*D_in], head-major per token
        out = self.linear(tokens)
        return out.unflatten(-1, (self.out_heads, self.out_dim)).transpose(-3, -2)


def _check_input(x: torch.Tensor, heads: int, dim: int) -> None:
    if x.dim() < 3 or x.shape[-3] != heads or x.shape[-1] != dim:
        raise ShapeError(
            f"Expected a tensor [..., {heads}, T, {dim}] (heads, tokens, head_dim). Got shape {tuple(x.shape)} "
            "instead. Pass K or V as [B, H, T, D] with the heads and head_dim the projector was built for."
        )


def build_projector(
    kind: str,
    in_heads: int,
    in_dim: int,
    out_heads: int,
    out_dim: int,
    *,
    init_uniform: bool = True,
    share_dim: bool = True,
) -> nn.Module:
    """Build one projector: ``kind`` is ``"structured"`` or ``"flat"`` (``init_uniform``/``share_dim`` apply to
    the structured one only)."""
    if kind == "structured":
        return StructuredProjector(in_heads, in_dim, out_heads, out_dim, init_uniform=init_uniform, share_dim=share_dim)
    if kind == "flat":
        return FlatProjector(in_heads, in_dim, out_heads, out_dim)
    raise ConfigError(
        f"Expected --projector to be one of {', '.join(PROJECTOR_KINDS)}. Got {kind!r} instead. Choose one of those."
    )


class KVProjectors(nn.Module):
    """One K projector and one V projector per student layer.

    Stored as ``self.projectors["k"][str(layer)]`` / ``["v"][str(layer)]`` so state dicts name the layer.

    Args:
        kind: ``"structured"`` or ``"flat"``.
        layers: the student layers that get projectors (distinct, non-negative).
        in_heads, in_dim, out_heads, out_dim, init_uniform, share_dim: as for ``build_projector``.
    """

    def __init__(
        self,
        kind: str,
        layers: Sequence[int],
        in_heads: int,
        in_dim: int,
        out_heads: int,
        out_dim: int,
        *,
        init_uniform: bool = True,
        share_dim: bool = True,
    ) -> None:
        super().__init__()
        layers = list(layers)
        bad = [x for x in layers if isinstance(x, bool) or not isinstance(x, int) or x < 0]
        if not layers or bad or len(set(layers)) != len(layers):
            raise ConfigError(
                f"Expected a non-empty list of distinct non-negative layer indices. Got {layers!r} instead. "
                "Pass each student layer once."
            )
        self.kind = kind
        self.layers = tuple(layers)

        def make() -> nn.Module:
            return build_projector(
                kind, in_heads, in_dim, out_heads, out_dim, init_uniform=init_uniform, share_dim=share_dim
            )

        self.projectors = nn.ModuleDict(
            {which: nn.ModuleDict({str(layer): make() for layer in layers}) for which in ("k", "v")}
        )

    def forward(self, which: str, layer: int, x: torch.Tensor) -> torch.Tensor:
        """Project ``x`` ``[B, in_heads, T, in_dim]`` with layer ``layer``'s ``which`` (``"k"``/``"v"``) projector.

        Returns ``[B, out_heads, T, out_dim]``.
        """
        if which not in ("k", "v"):
            raise ConfigError(f"Expected which to be 'k' or 'v'. Got {which!r} instead. Pass 'k' or 'v'.")
        if layer not in self.layers:
            raise ConfigError(
                f"Expected one of the projected layers {list(self.layers)}. Got layer {layer!r} instead. "
                "Build KVProjectors with every student layer you distil into."
            )
        by_layer = cast(nn.ModuleDict, self.projectors[which])
        return by_layer[str(layer)](x)

    def num_parameters(self) -> int:
        """Total number of parameters of all K and V projectors."""
        return count_parameters(self)


def count_parameters(module: nn.Module, *, trainable_only: bool = False) -> int:
    """Number of scalar parameters in ``module`` (only those with ``requires_grad`` when ``trainable_only``)."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)
