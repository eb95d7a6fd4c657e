"""Capture per-layer Q/K/V of a Hugging Face causal LM in one forward pass (transformers 5.x).

Mechanism: for the duration of a capture the model's attention implementation is switched to a wrapper registered
with ``transformers.AttentionInterface``. Every attention layer that dispatches through the interface hands the
wrapper exactly the query/key/value it attends with (after RoPE, after q/k norms, before GQA repetition); the wrapper
records them for the requested layers and then calls the implementation the model had (``sdpa`` or ``eager``), so
the forward's numbers do not change. Why this rather than hooks on ``k_proj``: it gives Q for free, sees fused
projections (GPT-2 ``c_attn``) and q/k norms (Qwen3) without per-architecture code, and the K it records is by
construction what the KV cache would hold.

Pre-RoPE K/Q (the store's default) are obtained by undoing the rotation with the exact cos/sin the model used: a
forward hook on the model's rotary module records its output, the model's own ``rotate_half`` is looked up in its
modeling file, and ``rope.invert_rope`` applies the exact inverse (valid for every rotary scaling, including YaRN's
attention factor, and for partial rotary). Undoing rather than capturing before rotation keeps one code path for
every architecture: where the rotation happens inside the layer (and whether a norm precedes it) differs from model
to model, the interface call does not. The recorded rotation is exposed as a :class:`Rotation` (``with_rotation``),
so a caller that keeps post-RoPE K/Q (the student's trainer) can undo it later, only where it needs to.

Masks: transformers builds the attention mask from ``config._attn_implementation``; an unknown name gets no mask at
all, which would silently drop the padding mask. The wrapper names are therefore also registered with
``AttentionMaskInterface``, mapped to the mask builder of the implementation they wrap.
"""

from __future__ import annotations

import contextvars
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, Protocol

import torch
from torch import nn
from transformers import AttentionInterface
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from kava.core.errors import ConfigError, KavaError, ShapeError
from kava.extract.rope import RotateHalf, apply_rope, invert_rope, rope_params
from kava.extract.rope import rotate_half as default_rotate_half

if TYPE_CHECKING:
    from transformers import PretrainedConfig, PreTrainedModel

KRope = Literal["pre", "post"]

# Implementations the wrapper knows how to call back into. Flash/flex/kernels are left out on purpose: modeling code
# branches on their names (padding-free paths, block masks), which a renamed implementation would not take.
_WRAPPABLE = ("sdpa", "eager")
_PREFIX = "kava_capture_"

# The recorder of the capture now running in this thread/task; None outside a capture, so a model left on the
# wrapper by a crash still runs correctly (it only stops recording).
_ACTIVE: contextvars.ContextVar[Recorder | None] = contextvars.ContextVar("kava_capture_recorder", default=None)


class Recorder(Protocol):
    """What the registered wrapper hands each attention call to: :class:`CaptureRecorder` for a decoder, the parts
    recorder of :mod:`kava.extract.parts` for encoders and encoder-decoders."""

    def record(self, module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
               scaling: float | None) -> None: ...


def attention_geometry(config: PretrainedConfig) -> tuple[int, int, int, int]:
    """Return ``(num_layers, num_heads, num_kv_heads, head_dim)`` of a decoder config.

    Handles GPT-2 (``n_layer``, ``n_head``, ``n_embd``; no KV-head count, so ``num_kv_heads == num_heads``) and
    the Llama family (``num_key_value_heads`` for GQA, explicit ``head_dim`` when set, e.g. Qwen3). Composite
    configs are read through their text config.
    """
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    values: dict[str, Any] = {}
    for name, aliases in (
        ("num_layers", ("num_hidden_layers", "n_layer")),
        ("num_heads", ("num_attention_heads", "n_head")),
        ("hidden_size", ("hidden_size", "n_embd")),
    ):
        values[name] = next((getattr(text, a) for a in aliases if getattr(text, a, None) is not None), None)
    values["num_kv_heads"] = getattr(text, "num_key_value_heads", None) or values["num_heads"]
    head_dim = getattr(text, "head_dim", None)
    if head_dim is None and values["num_heads"] and values["hidden_size"]:
        if values["hidden_size"] % values["num_heads"]:
            raise ConfigError(
                f"Expected hidden_size divisible by num_attention_heads in {type(text).__name__}. "
                f"Got {values['hidden_size']} and {values['num_heads']} instead. Set head_dim in the config."
            )
        head_dim = values["hidden_size"] // values["num_heads"]
    values["head_dim"] = head_dim
    bad = {k: v for k, v in values.items() if k != "hidden_size" and (not isinstance(v, int) or v <= 0)}
    if bad:
        raise ConfigError(
            f"Expected positive integer attention sizes in {type(text).__name__}. Got {bad} instead. "
            "This config does not look like a decoder-only transformer KaVa can read."
        )
    if values["num_heads"] % values["num_kv_heads"]:
        raise ConfigError(
            f"Expected num_attention_heads to be a multiple of num_key_value_heads. "
            f"Got {values['num_heads']} and {values['num_kv_heads']} instead. Fix the model config."
        )
    return values["num_layers"], values["num_heads"], values["num_kv_heads"], values["head_dim"]


@dataclass(frozen=True)
class Rotation:
    """The RoPE one forward applied: what turns its pre-RoPE K/Q ``[B, H, T, D]`` into those it attended with.

    Attributes:
        cos, sin: ``[B|1, T, R]`` (``R <= head_dim``), exactly as the model's rotary module returned them.
        rotate: the model's own ``rotate_half`` (its channel-pair layout), from its modeling file.
    """

    cos: torch.Tensor
    sin: torch.Tensor
    rotate: RotateHalf

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """Pre-RoPE ``[B, H, T, D]`` → post-RoPE, as the model rotates."""
        return apply_rope(x, self.cos, self.sin, rotate=self.rotate)

    def invert(self, x: torch.Tensor) -> torch.Tensor:
        """Post-RoPE ``[B, H, T, D]`` → pre-RoPE: the exact inverse (``rope.invert_rope``)."""
        return invert_rope(x, self.cos, self.sin, rotate=self.rotate)


@dataclass(frozen=True)
class QKVCapture:
    """What one forward pass recorded. Layer indices are the model's own (0-based).

    Attributes:
        keys: layer -> ``[B, kv_heads, T, head_dim]``, before RoPE when ``k_rope == "pre"``.
        values: layer -> ``[B, kv_heads, T, head_dim]``.
        queries: layer -> ``[B, num_heads, T, head_dim]`` (same RoPE choice as keys); empty when Q was not asked for.
        scaling: layer -> the softmax scale the layer used (``softmax(q @ k.T * scaling)``).
        lengths: ``[B]`` valid (unpadded) tokens per row; rows are right-padded, positions are ``0..T-1``.
        k_rope: ``"pre"`` or ``"post"``; for a model without RoPE both are the same tensors.
        rope: ``rope_params(config)``, ``None`` when the model has no RoPE.
        rotation: the rotation this forward applied, when recorded (``k_rope="pre"`` or ``with_rotation``) and the
            model has RoPE; ``None`` otherwise.
    """

    keys: dict[int, torch.Tensor]
    values: dict[int, torch.Tensor]
    queries: dict[int, torch.Tensor]
    scaling: dict[int, float]
    lengths: torch.Tensor
    k_rope: KRope
    rope: dict[str, Any] | None
    rotation: Rotation | None = None
    logits: torch.Tensor | None = None
    """``[B, T, V]`` the LM head's output, only when asked for (``with_logits``); None otherwise."""


@dataclass
class CaptureRecorder:
    """Per-capture state the registered attention wrapper writes into (yielded by ``attention_capture``).

    ``keys``/``values``/``queries``/``scaling`` map layer index to what that layer attended with, shapes as in
    ``QKVCapture``; they fill during the forward run inside the ``attention_capture`` block, and so does
    ``rotation`` when it is recorded.
    """

    layers: frozenset[int]
    q_layers: frozenset[int]
    k_rope: KRope
    has_rope: bool
    keys: dict[int, torch.Tensor] = field(default_factory=dict)
    values: dict[int, torch.Tensor] = field(default_factory=dict)
    queries: dict[int, torch.Tensor] = field(default_factory=dict)
    scaling: dict[int, float] = field(default_factory=dict)
    # (cos, sin), each [B|1, T, R], as the model's rotary module returned them during this forward.
    rope_cos_sin: tuple[torch.Tensor, torch.Tensor] | None = None
    rotary_calls: int = 0
    # The model's rotate_half, looked up in the modeling file of the first attention module recorded.
    rotate: RotateHalf | None = None

    @property
    def rotation(self) -> Rotation | None:
        """The rotation of this forward: None before the rotary module ran, without RoPE, or when not recorded."""
        if self.rope_cos_sin is None:
            return None
        return Rotation(*self.rope_cos_sin, rotate=self.rotate or default_rotate_half)

    def on_rotary(self, module: nn.Module, args: Any, output: Any) -> None:
        self.rotary_calls += 1
        if self.rotary_calls > 1:
            # A second call means several RoPEs (e.g. one per layer type) or several forwards inside the capture:
            # which cos/sin belong to which layer is then unknown, and a wrong inverse would be silent.
            raise KavaError(
                f"Expected the rotary module {type(module).__name__} to run once per capture. It ran "
                f"{self.rotary_calls} times. Run one forward per capture, or capture this architecture with "
                "k_rope='post'."
            )
        self.rope_cos_sin = (output[0], output[1])

    def record(self, module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
               scaling: float | None) -> None:
        if getattr(module, "is_cross_attention", False):
            return  # GPT-2-style cross-attention shares layer_idx with self-attention; only self-attention counts
        layer = getattr(module, "layer_idx", None)
        if layer is None:
            raise KavaError(
                f"Expected the attention module {type(module).__name__} to carry its layer_idx. Got none. "
                "This architecture cannot be captured layer by layer."
            )
        if layer not in self.layers:
            return
        if layer in self.keys:
            raise KavaError(
                f"Expected layer {layer} to attend once per capture. It attended twice. "
                "Run one forward per capture, with use_cache off."
            )
        if self.rotate is None:
            # The model's own rotate_half fixes the channel-pair layout (half-split or interleaved).
            self.rotate = getattr(sys.modules.get(type(module).__module__), "rotate_half", default_rotate_half)
        if self.k_rope == "pre" and self.has_rope:
            rotation = self.rotation
            if rotation is None:
                raise KavaError(
                    f"Expected the rotary module to run before layer {layer}'s attention. It had not. "
                    "Capture this architecture with k_rope='post'."
                )
            key = rotation.invert(key)
            if layer in self.q_layers:
                query = rotation.invert(query)
        # .contiguous(): K/V usually arrive as transposed views of the projection output (or of GPT-2's fused
        # c_attn output, 3x larger); a compact copy lets that buffer be freed after the layer.
        self.keys[layer] = key.contiguous()
        self.values[layer] = value.contiguous()
        if layer in self.q_layers:
            self.queries[layer] = query.contiguous()
        self.scaling[layer] = float(scaling) if scaling is not None else query.shape[-1] ** -0.5


def _wrapper_for(original: str) -> Callable[..., Any]:
    """The attention function registered as ``kava_capture_<original>``: record, then attend as before."""

    def attend(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
               attention_mask: torch.Tensor | None, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
        recorder = _ACTIVE.get()
        if recorder is not None:
            recorder.record(module, query, key, value, kwargs.get("scaling", getattr(module, "scaling", None)))
        return _original_attention(original, module)(module, query, key, value, attention_mask, **kwargs)

    attend.__name__ = f"{_PREFIX}{original}"
    return attend


def _original_attention(original: str, module: nn.Module) -> Callable[..., Any]:
    if original != "eager":
        return ALL_ATTENTION_FUNCTIONS[original]
    # "eager" is not in the interface: each modeling file passes its own eager_attention_forward as the default.
    modeling = sys.modules.get(type(module).__module__)
    if getattr(module, "reorder_and_upcast_attn", False) and hasattr(module, "_upcast_and_reordered_attn"):
        # GPT-2 with reorder_and_upcast_attn takes this fp32 path instead of the interface when on eager.
        def upcast(mod: nn.Module, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                   **_: Any) -> tuple[torch.Tensor, torch.Tensor]:
            return mod._upcast_and_reordered_attn(q, k, v, mask)

        return upcast
    eager = getattr(modeling, "eager_attention_forward", None)
    if eager is None:
        raise KavaError(
            f"Expected {type(module).__module__} to define eager_attention_forward. Got none. "
            "Load the model with attn_implementation='sdpa' for capture."
        )
    return eager


def _ensure_registered(original: str) -> str:
    """Register ``kava_capture_<original>`` (attention + mask) once; return the name. Idempotent."""
    name = f"{_PREFIX}{original}"
    if name not in ALL_ATTENTION_FUNCTIONS:
        AttentionInterface.register(name, _wrapper_for(original))
        # Same mask as the wrapped implementation (sdpa: bool or None for plain causal; eager: additive float).
        AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[original])
    return name


def rotary_module(model: nn.Module) -> nn.Module | None:
    base = getattr(model, "base_model", model)
    for owner in (base, model):
        rotary = getattr(owner, "rotary_emb", None)
        if isinstance(rotary, nn.Module):
            return rotary
    return None


def _check_layers(name: str, layers: Sequence[int], num_layers: int) -> frozenset[int]:
    bad = [i for i in layers if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < num_layers]
    if bad:
        raise ConfigError(
            f"Expected {name} indices in [0, {num_layers}) for a model with {num_layers} layers. "
            f"Got {bad} instead. Use 0-based layer indices."
        )
    if len(set(layers)) != len(layers):
        raise ConfigError(f"Expected distinct {name} indices. Got {list(layers)} instead. Drop the duplicates.")
    return frozenset(layers)


@contextmanager
def attention_capture(
    model: PreTrainedModel,
    *,
    layers: Sequence[int] | None = None,
    with_q: bool | Sequence[int] = False,
    k_rope: KRope = "pre",
    with_rotation: bool = False,
    training: bool = False,
) -> Iterator[CaptureRecorder]:
    """Record Q/K/V of ``layers`` during the forward run inside the block; restore the model on exit.

    The model's attention implementation is switched to the capture wrapper and switched back on exit, also when
    the block raises. Prefer ``capture_qkv``, which runs the forward and checks the result; use this directly to
    drive the forward yourself (one forward per block, ``use_cache`` off).

    Args:
        model: a transformers 5.x causal LM (or its base model) in eval mode, on sdpa or eager attention.
        layers: layer indices to keep; ``None`` keeps all. Layers not listed are never stored.
        with_q: ``True`` for Q of every kept layer, a sequence for Q of those layers only (a subset of
            ``layers``), ``False`` for none.
        k_rope: ``"pre"`` (default) stores K and Q with the rotation undone, ``"post"`` as the model attends.
        with_rotation: record the forward's rotation (``recorder.rotation``) with ``k_rope="post"`` too; with
            ``"pre"`` it is always recorded. For a model without RoPE there is none to record.
        training: allow a model in training mode. Extraction keeps this off (dropout would make the teacher's K/V
            noise); a student's trainer turns it on and records its K/V with the autograd graph attached.

    Yields:
        The recorder; its ``keys``/``values``/``queries``/``scaling`` dicts fill during the forward.
    """
    if k_rope not in ("pre", "post"):
        raise ConfigError(f"Expected k_rope to be 'pre' or 'post'. Got {k_rope!r} instead.")
    config = model.config
    num_layers = attention_geometry(config)[0]
    kept = _check_layers("layers", list(range(num_layers)) if layers is None else list(layers), num_layers)
    if isinstance(with_q, bool):
        q_layers = kept if with_q else frozenset()
    else:
        q_layers = _check_layers("with_q", list(with_q), num_layers)
        if not q_layers <= kept:
            raise ConfigError(
                f"Expected with_q layers to be a subset of the captured layers {sorted(kept)}. "
                f"Got {sorted(q_layers - kept)} outside it. Add them to layers, or drop them from with_q."
            )
    if model.training and not training:
        raise ConfigError(
            "Expected the model in eval mode (no dropout) for capture. Got training mode. Call model.eval() first."
        )
    check_wrappable(model)

    has_rope = rope_params(config) is not None
    rotary = rotary_module(model) if has_rope else None
    record_rotation = has_rope and (k_rope == "pre" or with_rotation)
    if record_rotation and rotary is None:
        raise ConfigError(
            f"Expected {type(model).__name__} to expose its rotary module as `rotary_emb` for pre-RoPE capture "
            "(or with_rotation). Got none. Capture with k_rope='post' (and no rotation) for this architecture."
        )

    recorder = CaptureRecorder(layers=kept, q_layers=q_layers, k_rope=k_rope, has_rope=has_rope)
    handle = rotary.register_forward_hook(recorder.on_rotary) if record_rotation and rotary is not None else None
    try:
        with recording(model, recorder):
            yield recorder
    finally:
        if handle is not None:
            handle.remove()


def check_wrappable(model: PreTrainedModel) -> None:
    """Raise unless ``model`` can be switched to the capture wrapper: on sdpa or eager, through the interface, and
    not inside another capture."""
    previous = model.config._attn_implementation
    if previous is not None and previous.startswith(_PREFIX):
        raise KavaError(
            f"Expected no capture already running on this model. Its attention is {previous!r}. "
            "Finish the outer capture first; captures do not nest."
        )
    if previous not in _WRAPPABLE:
        raise ConfigError(
            f"Expected the model on attention implementation 'sdpa' or 'eager'. Got {previous!r} instead. "
            "Load it with attn_implementation='sdpa' (or call model.set_attn_implementation('sdpa')) for extraction."
        )
    if hasattr(model, "_can_set_attn_implementation") and not model._can_set_attn_implementation():
        raise ConfigError(
            f"Expected {type(model).__name__} to route attention through transformers' AttentionInterface. "
            "It does not, so its Q/K/V cannot be captured. Use an architecture ported to the attention interface "
            "(Llama, Qwen2/3, Mistral, GPT-2, BERT, T5, BART, ...) or a newer transformers release."
        )


@contextmanager
def recording(model: PreTrainedModel, recorder: Recorder) -> Iterator[None]:
    """Run the block with ``model``'s attention switched to the capture wrapper and ``recorder`` receiving every
    attention call; switch back on exit, also when the block raises. The one mechanism under every capture."""
    check_wrappable(model)
    config = model.config
    previous = config._attn_implementation
    name = _ensure_registered(previous)
    # Switch order matters for cleanup: each step is undone in the finally block only once it has happened.
    token = _ACTIVE.set(recorder)
    switched = False
    try:
        model.set_attn_implementation(name)
        switched = True
        if config._attn_implementation != name:
            raise KavaError(
                f"Expected attention implementation {name!r} after switching. Got "
                f"{config._attn_implementation!r} instead. {type(model).__name__} does not let its attention "
                "implementation change at run time; it cannot be captured."
            )
        yield
    finally:
        if switched:
            model.set_attn_implementation(previous)
        _ACTIVE.reset(token)


def _check_inputs(input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """Validate ``input_ids [B, T]`` and a right-padded ``attention_mask [B, T]``; return ``lengths [B]``."""
    if not isinstance(input_ids, torch.Tensor) or input_ids.ndim != 2 or 0 in input_ids.shape:
        shape = tuple(input_ids.shape) if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__
        raise ShapeError(f"Expected input_ids of shape [B, T] with B, T >= 1. Got {shape} instead.")
    if input_ids.dtype not in (torch.int32, torch.int64):
        raise ShapeError(f"Expected integer token ids in input_ids. Got dtype {input_ids.dtype} instead.")
    if attention_mask is None:
        return torch.full((input_ids.shape[0],), input_ids.shape[1], dtype=torch.long, device=input_ids.device)
    if attention_mask.shape != input_ids.shape:
        raise ShapeError(
            f"Expected attention_mask of the same shape as input_ids {tuple(input_ids.shape)}. "
            f"Got {tuple(attention_mask.shape)} instead."
        )
    mask = attention_mask.to(torch.long)
    if ((mask != 0) & (mask != 1)).any():
        raise ShapeError("Expected an attention_mask of 0s and 1s. Got other values instead.")
    lengths = mask.sum(dim=1)
    # Right padding: row b is 1 exactly on its first lengths[b] positions. Left padding would shift positions.
    positions = torch.arange(mask.shape[1], device=mask.device)
    if not torch.equal(mask, (positions[None, :] < lengths[:, None]).to(mask.dtype)):
        raise ShapeError(
            "Expected a right-padded attention_mask (each row 1...1 then 0...0). Got left padding or holes instead. "
            "Tokenize with padding_side='right'."
        )
    if (lengths == 0).any():
        raise ShapeError(
            f"Expected at least one token per row. Got empty rows {torch.nonzero(lengths == 0).flatten().tolist()} "
            "instead. Drop empty samples before capture."
        )
    return lengths


def capture_qkv(
    model: PreTrainedModel,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    *,
    layers: Sequence[int] | None = None,
    with_q: bool | Sequence[int] = False,
    k_rope: KRope = "pre",
    with_rotation: bool = False,
    with_logits: bool = False,
) -> QKVCapture:
    """Run one forward pass of ``model`` and return per-layer K, V (and optionally Q).

    Runs the base model only (no LM head, no logits), under ``torch.no_grad()`` with ``use_cache=False``;
    ``with_logits`` runs the whole causal LM instead and returns its logits too (``[B, T, V]``: large, drop them
    soon).

    Args:
        model: a transformers 5.x causal LM in eval mode, on ``sdpa`` or ``eager`` attention.
        input_ids: ``[B, T]`` token ids.
        attention_mask: ``[B, T]`` of 0/1, right padding; ``None`` means no padding.
        layers: layer indices to keep (``None``: all).
        with_q: ``True`` / a subset of ``layers`` / ``False``: which layers' Q to keep.
        k_rope: ``"pre"`` (default) or ``"post"``; Q follows the same choice.
        with_rotation: also return the rotation with ``k_rope="post"`` (see ``attention_capture``).

    Returns:
        ``QKVCapture`` with K/V ``[B, kv_heads, T, head_dim]`` and Q ``[B, num_heads, T, head_dim]`` per layer.
        Values at padded positions are whatever the model computed there; use ``lengths`` to ignore them.
    """
    lengths = _check_inputs(input_ids, attention_mask)
    _, num_heads, num_kv_heads, head_dim = attention_geometry(model.config)
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    base = getattr(model, "base_model", model)
    with attention_capture(model, layers=layers, with_q=with_q, k_rope=k_rope,
                           with_rotation=with_rotation) as recorder, torch.no_grad():
        out = (model if with_logits else base)(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)

    missing = sorted(recorder.layers - recorder.keys.keys())
    if missing:
        raise KavaError(
            f"Expected every requested layer to attend through the AttentionInterface. Layers {missing} of "
            f"{type(model).__name__} never did. This architecture computes attention outside the interface; "
            "it cannot be captured."
        )
    batch, steps = input_ids.shape
    for layer, k in recorder.keys.items():
        expected = (batch, num_kv_heads, steps, head_dim)
        q = recorder.queries.get(layer)
        if k.shape != expected or recorder.values[layer].shape != expected or (
            q is not None and q.shape != (batch, num_heads, steps, head_dim)
        ):
            raise KavaError(
                f"Expected layer {layer} K/V of shape {expected} (and Q with {num_heads} heads) from the config. "
                f"Got K {tuple(k.shape)}, V {tuple(recorder.values[layer].shape)}"
                f"{'' if q is None else f', Q {tuple(q.shape)}'} instead. The config's attention geometry does not "
                "match the model's layers."
            )
    order = sorted(recorder.keys)
    return QKVCapture(
        keys={i: recorder.keys[i] for i in order},
        values={i: recorder.values[i] for i in order},
        queries={i: recorder.queries[i] for i in sorted(recorder.queries)},
        scaling={i: recorder.scaling[i] for i in order},
        lengths=lengths,
        k_rope=k_rope,
        rope=rope_params(model.config),
        rotation=recorder.rotation,
        logits=out.logits if with_logits else None,
    )
