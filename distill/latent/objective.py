"""One batch's loss in self-distillation: the same model in teacher mode (question · CoT · answer) and in student
mode (question · M latents · answer).

Teacher mode runs once, with gradient when its CoT cross-entropy is trained (``cot_weight > 0``); what the student
is pulled towards is detached from it: the hidden states of the answer prefix's last token at every layer (CODI)
and, per layer and KV head, the ``M`` CoT rows R-KV keeps (``losses.compress_rkv``), scored by the answer tokens'
attention as the teacher computed it. Keys are compared before RoPE by default (``kv_rope="pre"``): the teacher's
CoT rows and the student's latents sit at different positions, and a comparison of rotated keys would compare
rotations, not content.

With ``store_kv`` (``--teacher store``, see ``offline``) the K/V term's targets are a CoT teacher's rows read from a
compressed store instead; teacher mode still gives the CoT cross-entropy and CODI's hidden states.

``mode`` picks the run: ``latent`` (the KaVa objective), ``cot`` (teacher mode's cross-entropy alone: CoT SFT) or
``direct`` (the same on batches without the CoT: no-CoT SFT).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, replace
from typing import Any, Literal

import torch

from kava.extract.capture import attention_capture
from kava.extract.rope import invert_rope, rotate_half

from .data import LatentBatch
from .losses import Distance, answer_ce, codi_loss, compress_rkv, gather_rows, kv_loss, sequence_ce
from .model import LatentReasoner

Mode = Literal["latent", "cot", "direct"]
MODES: tuple[Mode, ...] = ("latent", "cot", "direct")


@dataclass(frozen=True)
class Weights:
    """The objective's weights and term kinds (``LatentConfig`` spells them as flags)."""

    cot: float = 1.0
    codi: float = 10.0
    kv: float = 1.0
    codi_loss: Distance = "l1"
    codi_norm: bool = True
    kv_loss: Distance = "mse"
    kv_norm: bool = False
    kv_rope: Literal["pre", "post"] = "pre"


@dataclass
class TeacherTargets:
    """What teacher mode gives the step. ``ce``: its CoT cross-entropy (with gradient) or None; ``hidden``
    ``[L, B, d]`` at the CODI token; ``keys``/``values`` ``[L, B, H, M, D]`` the kept CoT rows, ``valid`` ``[B, M]``
    (None when the K/V term is off)."""

    ce: torch.Tensor | None
    hidden: torch.Tensor | None
    keys: torch.Tensor | None
    values: torch.Tensor | None
    valid: torch.Tensor | None


def _rotate_of(model: Any) -> Any:
    """The model's own ``rotate_half`` (its channel-pair layout), from its modeling file."""
    return getattr(sys.modules.get(type(model).__module__), "rotate_half", rotate_half)


def teacher_targets(model: Any, batch: LatentBatch, *, budget: int, weights: Weights) -> TeacherTargets:
    """Run teacher mode once over ``batch`` and collect what the weights ask for."""
    want_ce, want_hidden, want_kv = weights.cot > 0, weights.codi > 0, weights.kv > 0
    with torch.set_grad_enabled(want_ce and torch.is_grad_enabled()):
        if want_kv:
            # Post-RoPE K/Q: R-KV scores with the attention the teacher computed; the rotation undoes RoPE after.
            with attention_capture(model, with_q=True, k_rope="post", with_rotation=True, training=True) as recorder:
                out = model(
                    input_ids=batch.teacher_ids,
                    attention_mask=batch.teacher_mask,
                    use_cache=False,
                    output_hidden_states=want_hidden,
                )
        else:
            recorder = None
            out = model(
                input_ids=batch.teacher_ids,
                attention_mask=batch.teacher_mask,
                use_cache=False,
                output_hidden_states=want_hidden,
            )
    ce = sequence_ce(out.logits, batch.teacher_labels) if want_ce else None
    hidden = None
    if want_hidden:
        rows = torch.arange(batch.teacher_ids.shape[0], device=batch.teacher_ids.device)
        hidden = torch.stack([h[rows, batch.teacher_codi] for h in out.hidden_states[1:]]).detach()  # [L, B, d]
    keys = values = valid = None
    if recorder is not None:
        rotation = recorder.rotation
        kept_k, kept_v = [], []
        for layer in sorted(recorder.keys):
            k, v = recorder.keys[layer].detach(), recorder.values[layer].detach()  # [B, H, T, D], post-RoPE K
            q = recorder.queries[layer].detach()  # [B, Hq, T, D]
            positions, valid = compress_rkv(k, q, batch.cot, batch.window, budget, scale=recorder.scaling[layer])
            if weights.kv_rope == "pre" and rotation is not None:
                k = rotation.invert(k)
            kept_k.append(gather_rows(k, positions))  # [B, H, M, D]
            kept_v.append(gather_rows(v, positions))
        keys, values = torch.stack(kept_k), torch.stack(kept_v)  # [L, B, H, M, D]
    return TeacherTargets(ce, hidden, keys, values, valid)


def student_keys(reasoner: LatentReasoner, keys: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """The latents' cached keys ``[L, B, H, M, D]`` (post-RoPE) with RoPE undone at ``positions`` ``[B, M]``,
    using the model's own rotary module; a model without one returns them as they are."""
    rotary = getattr(reasoner.base, "rotary_emb", None)
    if rotary is None:
        return keys
    cos, sin = rotary(keys[0].float(), positions)  # [B, M, R]
    rotate = _rotate_of(reasoner.model)
    return torch.stack([invert_rope(k, cos, sin, rotate=rotate) for k in keys])


def latent_loss(
    reasoner: LatentReasoner,
    batch: LatentBatch,
    weights: Weights,
    mode: Mode = "latent",
    store_kv: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """The step's total loss and each term's value (``loss/answer``, ``loss/cot``, ``loss/codi``, ``loss/kv``).

    ``store_kv``: the batch's K/V targets from a store, ``[L, B, H, M, D]`` keys and values and ``[B, M]`` valid
    slots (``StoreTargets.batch``), in place of teacher mode's compressed CoT rows."""
    model = reasoner.model
    if mode != "latent":
        out = model(input_ids=batch.teacher_ids, attention_mask=batch.teacher_mask, use_cache=False)
        ce = sequence_ce(out.logits, batch.teacher_labels)
        return ce, {"loss/cot" if mode == "cot" else "loss/answer": float(ce.detach()), "loss": float(ce.detach())}
    needs_teacher = weights.cot > 0 or weights.codi > 0 or weights.kv > 0
    own = replace(weights, kv=0.0) if store_kv is not None else weights  # the store gives the K/V targets
    teacher = teacher_targets(model, batch, budget=reasoner.latents, weights=own) if needs_teacher else None
    if teacher is not None and store_kv is not None:
        teacher.keys, teacher.values, teacher.valid = store_kv
    student = reasoner(batch.question_ids, batch.question_mask, batch.answer_ids, batch.answer_mask)
    total = answer_ce(student.logits, batch.answer_ids, batch.answer_mask)
    terms = {"loss/answer": float(total.detach())}
    if teacher is not None and teacher.ce is not None:
        total = total + weights.cot * teacher.ce
        terms["loss/cot"] = float(teacher.ce.detach())
    if teacher is not None and teacher.hidden is not None:
        rows = torch.arange(batch.answer_ids.shape[0], device=batch.answer_ids.device)
        mine = torch.stack([h[rows, batch.student_codi] for h in student.hidden])  # [L, B, d]
        codi = codi_loss(mine, teacher.hidden, kind=weights.codi_loss, normalize=weights.codi_norm)
        total = total + weights.codi * codi
        terms["loss/codi"] = float(codi.detach())
    if teacher is not None and teacher.keys is not None and teacher.values is not None and teacher.valid is not None:
        keys = student.keys if weights.kv_rope == "post" else student_keys(reasoner, student.keys, student.positions)
        kv = kv_loss(
            keys,
            student.values,
            teacher.keys,
            teacher.values,
            teacher.valid,
            kind=weights.kv_loss,
            normalize=weights.kv_norm,
        )
        total = total + weights.kv * kv
        terms["loss/kv"] = float(kv.detach())
    terms["loss"] = float(total.detach())
    return total, terms
