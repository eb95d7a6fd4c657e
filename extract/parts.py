"""Encoder and encoder-decoder teachers: what their attention parts are, and capturing each part's Q/K/V in one
forward pass (transformers 5.x).

A decoder has one kind of attention; an encoder (BERT, RoBERTa, ModernBERT) has bidirectional self-attention, and an
encoder-decoder (T5, BART) three kinds: encoder self-attention, decoder self-attention and decoder cross-attention
over the encoder's states. Each kind is a *part* (:class:`TeacherPart`), stored as its own teacher. The capture is the
decoders' (:mod:`kava.extract.capture`): the model's attention implementation is switched to the registered wrapper,
which hands every attention call to a recorder. Layer indices alone don't say which part a call belongs to (T5's
encoder and decoder both count from 0, and a decoder layer attends twice), so :class:`PartsRecorder` maps each
attention *module* to its part and layer before the forward, by where it sits in the model.

Every architecture named here dispatches through ``ALL_ATTENTION_FUNCTIONS`` in transformers 5.x, T5 included (its
relative bias reaches the attention function as a ``position_bias`` argument, which the wrapper passes on
untouched), so no per-architecture hook recomputes K/V; the tests check the capture against each attention module's
own projections of its own inputs and against its own output.

What is recorded is what the attention attended with: for RoPE models (ModernBERT) after the rotation, as the cache
would hold it (``k_rope="post"``); T5's relative bias is not in K/V at all (it is added to the scores), which the
store records as the part's ``positions``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import nn

from kava.core.errors import ConfigError, KavaError, ShapeError

from .capture import QKVCapture, _check_inputs, _check_layers, attention_geometry, recording
from .rope import rope_params

if TYPE_CHECKING:
    from transformers import PretrainedConfig, PreTrainedModel

Family = Literal["decoder", "encoder", "encoder-decoder"]
Reads = Literal["all", "prompt", "continuation"]

# Encoder-only model types captured and tested here; other masked-LM architectures are recognised by their class.
ENCODER_MODEL_TYPES = ("bert", "roberta", "modernbert", "xlm-roberta", "electra", "distilbert")
# Attribute names under which encoder-decoders (and BERT-as-decoder) keep their cross-attention modules.
CROSS_ATTENTION_NAMES = ("EncDecAttention", "encoder_attn", "crossattention")


@dataclass(frozen=True)
class TeacherPart:
    """One attention part of a teacher, stored as one teacher of the store.

    Attributes:
        part: ``"enc"``, ``"dec"`` or ``"cross"`` (``"enc"`` for an encoder-only model too).
        attention: the store's attention kind: ``bidirectional``, ``causal`` or ``cross``.
        positions: the store's positional scheme: ``rope``, ``absolute``, ``relative-bias`` or ``none``.
        reads: which text of a sample the part's rows stand for: ``all`` of it (an encoder), the ``prompt`` (an
            encoder-decoder's encoder; its cross-attention keys are the encoder's states), or the ``continuation``
            (reasoning and answer, its decoder).
        num_layers, num_heads, kv_heads, head_dim: the part's attention geometry.
    """

    part: str
    attention: str
    positions: str
    reads: Reads
    num_layers: int
    num_heads: int
    kv_heads: int
    head_dim: int


def teacher_family(config: PretrainedConfig) -> Family:
    """``encoder-decoder`` (``is_encoder_decoder``), ``encoder`` (a known encoder type, or a masked-LM class) or
    ``decoder`` (everything else: what the decoder path of extraction handles)."""
    if getattr(config, "is_encoder_decoder", False):
        return "encoder-decoder"
    architectures = getattr(config, "architectures", None) or []
    if getattr(config, "model_type", None) in ENCODER_MODEL_TYPES or any(
            a.endswith(("ForMaskedLM", "ForSequenceClassification", "ForTokenClassification")) for a in architectures):
        return "encoder"
    return "decoder"


def _first(config: PretrainedConfig, names: Sequence[str]) -> Any:
    return next((getattr(config, n) for n in names if getattr(config, n, None) is not None), None)


def _self_positions(config: PretrainedConfig) -> str:
    if rope_params(config) is not None:
        return "rope"
    if getattr(config, "relative_attention_num_buckets", None) is not None:
        return "relative-bias"  # T5 and its kin: a learned bias per relative-distance bucket on the scores
    return "absolute"


def _geometry(config: PretrainedConfig, side: Literal["encoder", "decoder"]) -> tuple[int, int, int]:
    """``(num_layers, num_heads, head_dim)`` of one side of an encoder-decoder config (T5 or BART names)."""
    layers = _first(config, ("encoder_layers", "num_layers") if side == "encoder"
                    else ("decoder_layers", "num_decoder_layers", "num_layers"))
    heads = _first(config, (f"{side}_attention_heads", "num_heads", "num_attention_heads"))
    width = _first(config, ("d_model", "hidden_size"))
    head_dim = _first(config, ("d_kv", "head_dim"))
    if head_dim is None and isinstance(width, int) and isinstance(heads, int) and heads > 0:
        head_dim = width // heads
    values = {"layers": layers, "heads": heads, "head_dim": head_dim}
    bad = {k: v for k, v in values.items() if not isinstance(v, int) or v <= 0}
    if bad:
        raise ConfigError(f"Expected positive {side} attention sizes in {type(config).__name__}. Got {bad} instead. "
                          "This config does not look like an encoder-decoder KaVa can read.")
    return layers, heads, head_dim


def teacher_parts(config: PretrainedConfig) -> tuple[TeacherPart, ...]:
    """The attention parts of an encoder (one: ``enc``) or an encoder-decoder (``enc``, ``dec``, ``cross``).

    Raises:
        ConfigError: a decoder config (extract it as a decoder), or attention sizes that can't be read.
    """
    family = teacher_family(config)
    if family == "decoder":
        raise ConfigError(f"Expected an encoder or encoder-decoder config. Got {type(config).__name__}, a decoder. "
                          "Extract it as a decoder teacher.")
    if family == "encoder":
        num_layers, num_heads, kv_heads, head_dim = attention_geometry(config)
        return (TeacherPart("enc", "bidirectional", _self_positions(config), "all", num_layers, num_heads, kv_heads,
                            head_dim),)
    enc, dec = _geometry(config, "encoder"), _geometry(config, "decoder")
    positions = _self_positions(config)
    return (
        TeacherPart("enc", "bidirectional", positions, "prompt", enc[0], enc[1], enc[1], enc[2]),
        TeacherPart("dec", "causal", positions, "continuation", dec[0], dec[1], dec[1], dec[2]),
        # Cross-attention keys are encoder states: no positions of their own, one set per decoder layer.
        TeacherPart("cross", "cross", "none", "prompt", dec[0], dec[1], dec[1], dec[2]),
    )


def attention_modules(model: nn.Module, family: Family) -> dict[int, tuple[str, int]]:
    """``id(module) → (part, layer)`` for every module carrying a ``layer_idx``, by where it sits: under a
    ``decoder`` (``dec``, or ``cross`` for the cross-attention names) or else the encoder (``enc``)."""
    out: dict[int, tuple[str, int]] = {}
    for name, module in model.named_modules():
        layer = getattr(module, "layer_idx", None)
        if not isinstance(layer, int):
            continue
        path = name.split(".")
        if family == "encoder" or "decoder" not in path:
            part = "enc"
        else:
            part = "cross" if any(p in CROSS_ATTENTION_NAMES for p in path) else "dec"
        out[id(module)] = (part, layer)
    return out


@dataclass
class PartsRecorder:
    """What the capture wrapper writes into for a multi-part model: ``keys[part][layer]`` etc., shapes as in
    :class:`QKVCapture` (``[B, heads, T_part, head_dim]``, ``T_part`` the tokens the part's keys stand for)."""

    modules: dict[int, tuple[str, int]]
    layers: Mapping[str, frozenset[int]]
    q_layers: Mapping[str, frozenset[int]]
    keys: dict[str, dict[int, torch.Tensor]] = field(default_factory=dict)
    values: dict[str, dict[int, torch.Tensor]] = field(default_factory=dict)
    queries: dict[str, dict[int, torch.Tensor]] = field(default_factory=dict)
    scaling: dict[str, dict[int, float]] = field(default_factory=dict)

    def record(self, module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
               scaling: float | None) -> None:
        where = self.modules.get(id(module))
        if where is None:
            raise KavaError(f"Expected every attention module to be a known part of the model. "
                            f"{type(module).__name__} is not (no layer_idx under an encoder or decoder). "
                            "This architecture cannot be captured part by part.")
        part, layer = where
        if layer not in self.layers.get(part, ()):
            return
        if layer in self.keys.get(part, {}):
            raise KavaError(f"Expected {part} layer {layer} to attend once per capture. It attended twice. "
                            "Run one forward per capture, with use_cache off.")
        # .contiguous(): K/V arrive as transposed views of the projection output (see capture.py).
        self.keys.setdefault(part, {})[layer] = key.contiguous()
        self.values.setdefault(part, {})[layer] = value.contiguous()
        if layer in self.q_layers.get(part, ()):
            self.queries.setdefault(part, {})[layer] = query.contiguous()
        self.scaling.setdefault(part, {})[layer] = float(scaling) if scaling is not None else query.shape[-1] ** -0.5


def capture_parts(
    model: PreTrainedModel,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    *,
    decoder_input_ids: torch.Tensor | None = None,
    decoder_attention_mask: torch.Tensor | None = None,
    layers: Mapping[str, Sequence[int]] | None = None,
    with_q: Mapping[str, Sequence[int]] | None = None,
) -> dict[str, QKVCapture]:
    """One forward pass of an encoder or encoder-decoder; per part its K, V (and Q) as a :class:`QKVCapture`.

    Runs the base model under ``torch.no_grad()``. K/Q are as the model attended with them (``k_rope="post"``).

    Args:
        model: a transformers 5.x encoder (``BertModel``, ...) or encoder-decoder (``T5Model``, ...), or one with a
            head, in eval mode, on ``sdpa`` or ``eager`` attention.
        input_ids, attention_mask: ``[B, T]`` the encoder's tokens, right-padded.
        decoder_input_ids, decoder_attention_mask: ``[B, T_d]`` the decoder's tokens (start token first),
            right-padded; required for an encoder-decoder, refused for an encoder.
        layers: part → layer indices to keep; ``None`` (or a part left out) keeps every layer of every part.
        with_q: part → layers whose Q to keep (a subset of that part's ``layers``); ``None`` keeps none.

    Returns:
        part → ``QKVCapture`` with K/V ``[B, heads, T_part, head_dim]``: ``T_part`` is the encoder's ``T`` for
        ``enc`` and ``cross`` (cross-attention keys are encoder states), the decoder's ``T_d`` for ``dec``;
        ``lengths`` counts the valid tokens of those.
    """
    parts = {p.part: p for p in teacher_parts(model.config)}
    family = teacher_family(model.config)
    lengths = {"enc": _check_inputs(input_ids, attention_mask)}
    if family == "encoder-decoder":
        if decoder_input_ids is None:
            raise ShapeError("Expected decoder_input_ids for an encoder-decoder. Got none. Pass the decoder's "
                             "tokens, its start token first.")
        lengths["dec"] = _check_inputs(decoder_input_ids, decoder_attention_mask)
        if decoder_input_ids.shape[0] != input_ids.shape[0]:
            raise ShapeError(f"Expected as many decoder rows as encoder rows ({input_ids.shape[0]}). Got "
                             f"{decoder_input_ids.shape[0]} instead.")
        lengths["cross"] = lengths["enc"]
    elif decoder_input_ids is not None:
        raise ShapeError(f"Expected no decoder_input_ids for the encoder {type(model).__name__}. Got some. Drop them.")
    unknown = sorted((set(layers or {}) | set(with_q or {})) - set(parts))
    if unknown:
        raise ConfigError(f"Expected parts among {sorted(parts)}. Got {unknown} instead.")
    kept = {name: _check_layers(f"{name} layers", list((layers or {}).get(name, range(p.num_layers))),
                                p.num_layers) for name, p in parts.items()}
    q_kept = {name: _check_layers(f"{name} with_q", list((with_q or {}).get(name, ())), p.num_layers)
              for name, p in parts.items()}
    outside = {name: sorted(q_kept[name] - kept[name]) for name in parts if q_kept[name] - kept[name]}
    if outside:
        raise ConfigError(f"Expected with_q layers among each part's captured layers. Got {outside} outside them.")
    if model.training:
        raise ConfigError("Expected the model in eval mode (no dropout) for capture. Got training mode. "
                          "Call model.eval() first.")

    recorder = PartsRecorder(attention_modules(model, family), kept, q_kept)
    base = getattr(model, "base_model", model)
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    inputs: dict[str, Any] = {"input_ids": input_ids, "attention_mask": attention_mask}
    if family == "encoder-decoder":
        assert decoder_input_ids is not None  # checked above
        inputs.update(decoder_input_ids=decoder_input_ids, use_cache=False,
                      decoder_attention_mask=torch.ones_like(decoder_input_ids) if decoder_attention_mask is None
                      else decoder_attention_mask)
    with recording(model, recorder), torch.no_grad():
        base(**inputs)

    out: dict[str, QKVCapture] = {}
    for name, part in parts.items():
        missing = sorted(kept[name] - recorder.keys.get(name, {}).keys())
        if missing:
            raise KavaError(f"Expected every requested {name} layer to attend through the AttentionInterface. "
                            f"Layers {missing} of {type(model).__name__} never did; it cannot be captured.")
        steps = int(input_ids.shape[1] if part.reads != "continuation" else decoder_input_ids.shape[1])  # type: ignore[union-attr]
        expected = (int(input_ids.shape[0]), part.kv_heads, steps, part.head_dim)
        for layer, k in recorder.keys.get(name, {}).items():
            if tuple(k.shape) != expected or tuple(recorder.values[name][layer].shape) != expected:
                raise KavaError(f"Expected {name} layer {layer} K/V of shape {expected} from the config. Got K "
                                f"{tuple(k.shape)}, V {tuple(recorder.values[name][layer].shape)} instead. The "
                                "config's attention geometry does not match the model's layers.")
        order = sorted(kept[name])
        out[name] = QKVCapture(
            keys={i: recorder.keys[name][i] for i in order},
            values={i: recorder.values[name][i] for i in order},
            queries={i: recorder.queries[name][i] for i in sorted(q_kept[name])},
            scaling={i: recorder.scaling[name][i] for i in order},
            lengths=lengths[name], k_rope="post",
            rope=rope_params(model.config) if part.positions == "rope" else None,
        )
    return out
