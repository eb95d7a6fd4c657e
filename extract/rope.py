"""Rotary position embedding (RoPE): describe it, apply it, undo it.

The store keeps K before RoPE by default (``kvstore/FORMAT.md``): teacher and student rotate at different
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
from transformers import LlamaConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from kava.core.errors import ConfigError, ShapeError

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
        raise ShapeError(
            f"Expected floating-point cos/sin. Got {cos.dtype} instead. The rotary module casts cos/sin to the dtype "
            "of its first argument: pass it a float tensor (e.g. the hidden states), not the token ids."
        )
    rotary_dim = cos.shape[-1]
    head_dim = x.shape[-1]
    if rotary_dim > head_dim or rotary_dim % 2:
        raise ShapeError(
            f"Expected an even number of rotary channels no larger than head_dim={head_dim}. "
            f"Got cos/sin with {rotary_dim} channels instead. The model's rotary module does not match its "
            "attention heads; capture with k_rope='post' for this architecture."
        )
    if cos.shape[-2] != x.shape[-2]:
        raise ShapeError(
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


def cos_sin(
    params: dict[str, Any],
    positions: torch.Tensor,
    *,
    layer_type: str | None = None,
    dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rebuild the model's own ``(cos, sin)`` for ``positions`` from a ``rope_params`` description.

    ``"default"`` RoPE is computed here; every other type (``linear``, ``llama3``, ``yarn``, ``longrope``, ...) goes
    through transformers' ``ROPE_INIT_FUNCTIONS`` on a minimal config, so the frequencies and the attention factor
    are the library's own. ``dynamic`` is refused: it rescales from the longest sequence the module has seen so far,
    so its cos/sin are not a function of the positions alone.

    Args:
        params: what ``rope_params(config)`` returned (not ``None``).
        positions: ``[T]`` or ``[B, T]`` integer positions (the model's ``position_ids``).
        layer_type: which layer type's RoPE, for ``{"type": "per_layer_type", ...}`` descriptions.
        dtype: dtype of the result (the model casts to its hidden states' dtype).

    Returns:
        ``(cos, sin)``, each ``[B or 1, T, R]`` with ``R`` the rotary channels, scaled by the attention factor.
    """
    if params.get("type") == "per_layer_type":
        types = params.get("layer_types", {})
        if layer_type not in types:
            raise ConfigError(
                f"Expected layer_type to be one of {sorted(types)}. Got {layer_type!r} instead. "
                "This model has one RoPE per layer type: pass the type of the layer you rotate for."
            )
        params = types[layer_type]
    if positions.dim() not in (1, 2) or positions.is_floating_point() or positions.dtype == torch.bool:
        raise ShapeError(
            f"Expected integer positions of shape [T] or [B, T]. Got {positions.dtype} of shape "
            f"{tuple(positions.shape)} instead. Pass the position_ids the model saw."
        )
    position_ids = positions if positions.dim() == 2 else positions.unsqueeze(0)  # [B|1, T]
    rope_type = params["type"]
    rotary_dim = int(params["rotary_dim"])
    if rope_type == "default":
        exponents = torch.arange(0, rotary_dim, 2, dtype=torch.int64).float() / rotary_dim
        inv_freq = 1.0 / (params["theta"] ** exponents)
        attention_factor = 1.0
    else:
        inv_freq, attention_factor = _library_inv_freq(params, position_ids)
    inv_freq = inv_freq.to(device=positions.device, dtype=torch.float32)
    # Elementwise product, not a matmul, exactly as the rotary modules do it, so the values match bit for bit.
    freqs = position_ids[..., None].float() * inv_freq  # [B|1, T, R/2]
    emb = torch.cat((freqs, freqs), dim=-1)
    return (emb.cos() * attention_factor).to(dtype), (emb.sin() * attention_factor).to(dtype)


def _library_inv_freq(params: dict[str, Any], position_ids: torch.Tensor) -> tuple[torch.Tensor, float]:
    """Inverse frequencies ``[R/2]`` and attention factor of a non-default RoPE, from transformers itself."""
    rope_type = params["type"]
    if rope_type == "dynamic":
        raise ConfigError(
            "Expected a RoPE whose cos/sin depend on the positions only. Got 'dynamic' (NTK) instead, which "
            "rescales from the longest sequence the model has seen so far. Capture with --k-rope post."
        )
    if rope_type not in ROPE_INIT_FUNCTIONS:
        raise ConfigError(
            f"Expected a RoPE type transformers knows ({', '.join(['default', *ROPE_INIT_FUNCTIONS])}). "
            f"Got {rope_type!r} instead. Capture with --k-rope post."
        )
    head_dim = int(params["head_dim"])
    rope_parameters = {
        "rope_type": rope_type,
        "rope_theta": params["theta"],
        "partial_rotary_factor": params["partial_rotary_factor"],
        **params["scaling"],
    }
    # The init functions read only head_dim, hidden_size/num_attention_heads, max_position_embeddings and
    # rope_parameters from the config; a one-head Llama config carries exactly those.
    config_kwargs: dict[str, Any] = {
        "hidden_size": head_dim,
        "num_attention_heads": 1,
        "num_key_value_heads": 1,
        "head_dim": head_dim,
        "rope_parameters": rope_parameters,
    }
    if params.get("max_position_embeddings") is not None:
        config_kwargs["max_position_embeddings"] = int(params["max_position_embeddings"])
    config = LlamaConfig(**config_kwargs)
    # LongRoPE switches to its long factors once a sequence outgrows the original context, judged by the largest
    # position in the call; the other types ignore seq_len.
    seq_len = int(position_ids.max()) + 1 if position_ids.numel() else None
    inv_freq, attention_factor = ROPE_INIT_FUNCTIONS[rope_type](config, None, seq_len=seq_len)
    return inv_freq, float(attention_factor)
