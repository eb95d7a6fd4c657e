"""Rotary position embedding (RoPE): describe it, apply it, undo it.

The store keeps K before RoPE by default (DESIGN.md, "The store"): teacher and student rotate at different
positions with different frequencies, so a cosine between post-RoPE keys compares rotations, not content.
Capture therefore needs the exact inverse of the rotation the model applied, and the store needs a plain-dict
description of that rotation (``rope_params``) so a reader can re-apply it.

Conventions (those of every Hugging Face RoPE model):

* ``cos``/``sin`` are what the model's own rotary module returns: ``[B or 1, T, R]`` with ``R <= head_dim`` rotary
  channels (``R < head_dim`` under ``partial_rotary_factor``); YaRN/LongRoPE fold their attention factor ``m``
  into both, so ``cos**2 + sin**2 == m**2`` rather than 1.
* The rotation acts on the first ``R`` channels of each head; the rest pass through unchanged.
* ``rotate_half`` pairs channel ``i`` with ``i + R/2`` (Llama/NeoX layout). Models with the interleaved layout
  (pairs ``2i, 2i+1``) ship their own ``rotate_half``; pass it in and the same formulas hold.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from kava.kvstore.errors import ConfigError

RotateHalf = Callable[[torch.Tensor], torch.Tensor]


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """Rotate half the channels: ``[x1, x2] -> [-x2, x1]`` over the last dimension (Llama/NeoX layout)."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def _split_rotary(x: torch.Tensor, cos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Split ``x [B, H, T, D]`` into its rotary and pass-through channels; broadcast cos/sin over heads.

    Returns ``(x_rot [B, H, T, R], x_pass [B, H, T, D - R], cos [B|1, 1, T, R], R)`` with cos as float32.
    """
    if not cos.is_floating_point():
        raise ConfigError(
            f"Expected floating-point cos/sin. Got {cos.dtype} instead. The rotary module casts cos/sin to the dtype "
            "of its first argument: pass it a float tensor (e.g. the hidden states), not the token ids."
        )
    rotary_dim = cos.shape[-1]
    head_dim = x.shape[-1]
    if rotary_dim > head_dim or rotary_dim % 2:
        raise ConfigError(
            f"Expected an even number of rotary channels no larger than head_dim={head_dim}. "
            f"Got cos/sin with {rotary_dim} channels instead. The model's rotary module does not match its "
            "attention heads; capture with k_rope='post' for this architecture."
        )
    if cos.shape[-2] != x.shape[-2]:
        raise ConfigError(
            f"Expected cos/sin for {x.shape[-2]} positions. Got {cos.shape[-2]} instead. "
            "Pass the cos/sin computed for the same position_ids as the tensor."
        )
    return x[..., :rotary_dim], x[..., rotary_dim:], cos, rotary_dim


def apply_rope(
    x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, *, rotate: RotateHalf = rotate_half
) -> torch.Tensor:
    """Rotate ``x`` the way the model does: ``x*cos + rotate(x)*sin`` on the first R channels.

    Args:
        x: ``[B, H, T, D]`` queries or keys before RoPE.
        cos, sin: ``[B or 1, T, R]``, ``R <= D``, as returned by the model's rotary module.
        rotate: the model's ``rotate_half`` (layout of the channel pairs).

    Returns:
        ``[B, H, T, D]`` in ``x``'s dtype; computed in float32.
    """
    x_rot, x_pass, cos, _ = _split_rotary(x, cos)
    c = cos.float().unsqueeze(1)  # [B|1, 1, T, R]: the same rotation for every head
    s = sin.float().unsqueeze(1)
    xr = x_rot.float()
    out = xr * c + rotate(xr) * s
    return torch.cat((out.to(x.dtype), x_pass), dim=-1)


def invert_rope(
    x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, *, rotate: RotateHalf = rotate_half
) -> torch.Tensor:
    """Undo ``apply_rope``: recover the pre-RoPE tensor from the post-RoPE one.

    On each channel pair RoPE is the 2x2 matrix ``[[c, -s], [s, c]]``, a rotation scaled by ``sqrt(c²+s²)``
    (the YaRN/LongRoPE attention factor, 1 for plain RoPE). Its exact inverse is ``[[c, s], [-s, c]] / (c²+s²)``,
    i.e. ``(x*cos - rotate(x)*sin) / (cos² + sin²)``, which holds for any rotary scaling (linear, NTK, llama3,
    YaRN, LongRoPE) because the scaling only changes the cos/sin values the model hands us.

    Args:
        x: ``[B, H, T, D]`` queries or keys after RoPE.
        cos, sin: ``[B or 1, T, R]``, ``R <= D``, the exact values the model rotated with.
        rotate: the model's ``rotate_half``.

    Returns:
        ``[B, H, T, D]`` in ``x``'s dtype; computed in float32.
    """
    x_rot, x_pass, cos, _ = _split_rotary(x, cos)
    c = cos.float().unsqueeze(1)  # [B|1, 1, T, R]
    s = sin.float().unsqueeze(1)
    xr = x_rot.float()
    # rotate(rotate(v)) == -v on every pair, so rotate(x') = rotate(x)*c - x*s and the cross terms cancel.
    out = (xr * c - rotate(xr) * s) / (c * c + s * s)
    return torch.cat((out.to(x.dtype), x_pass), dim=-1)


def _head_dim(config: Any) -> int:
    num_heads = config.num_attention_heads
    return getattr(config, "head_dim", None) or config.hidden_size // num_heads


def _jsonable(value: Any) -> Any:
    """Plain JSON types only (the store's metadata is JSON): tuples become lists, tensors/numpy scalars numbers."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (bool, int, float, str)) or value is None:
        return value
    if hasattr(value, "item"):  # torch / numpy scalar
        return value.item()
    raise ConfigError(
        f"Expected RoPE parameters made of numbers, strings and lists. Got {type(value).__name__} ({value!r}) "
        "instead. Check the model config's rope_parameters."
    )


def _one_rope(params: dict[str, Any], config: Any) -> dict[str, Any]:
    params = dict(params)
    rope_type = params.pop("rope_type", None) or params.pop("type", None) or "default"
    theta = params.pop("rope_theta", None)
    if theta is None:
        theta = getattr(config, "rope_theta", None)
    if theta is None:
        raise ConfigError(
            f"Expected rope_theta in the RoPE parameters of {type(config).__name__}. Got {sorted(params)} instead. "
            "Set rope_parameters['rope_theta'] in the model config."
        )
    partial = params.pop("partial_rotary_factor", None)
    if partial is None:
        partial = getattr(config, "partial_rotary_factor", None) or 1.0
    head_dim = _head_dim(config)
    return {
        "type": str(rope_type),
        "theta": float(theta),
        # Whatever else the type needs (factor, low/high_freq_factor, original_max_position_embeddings, beta_fast,
        # short/long factors, ...), kept verbatim so a reader can rebuild the same frequencies.
        "scaling": _jsonable(params),
        "head_dim": int(head_dim),
        "rotary_dim": int(head_dim * float(partial)),
        "partial_rotary_factor": float(partial),
        "max_position_embeddings": getattr(config, "max_position_embeddings", None),
    }


def rope_params(config: Any) -> dict[str, Any] | None:
    """Describe a model's RoPE as a JSON-able dict for the store's metadata; ``None`` when it has no RoPE.

    Reads transformers 5.x ``config.rope_parameters`` (of the text config for composite models).

    Returns:
        ``{"type", "theta", "scaling", "head_dim", "rotary_dim", "partial_rotary_factor",
        "max_position_embeddings"}`` for one RoPE shared by all layers; for models with one RoPE per layer type
        (e.g. sliding vs full attention) ``{"type": "per_layer_type", "layer_types": {name: <the same dict>}}``;
        ``None`` for absolute-position models such as GPT-2.
    """
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    params = getattr(text, "rope_parameters", None)
    if not params:
        return None
    if not isinstance(params, dict):
        raise ConfigError(
            f"Expected config.rope_parameters to be a dict. Got {type(params).__name__} instead. "
            "Load the config with transformers>=5, which standardises RoPE settings into rope_parameters."
        )
    if all(isinstance(v, dict) for v in params.values()):
        return {"type": "per_layer_type", "layer_types": {k: _one_rope(v, text) for k, v in params.items()}}
    return _one_rope(params, text)
