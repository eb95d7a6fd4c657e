"""The module a distillation run trains: the student and its K/V objective, one micro-batch's loss per forward.

:func:`build_objective` builds the objective (projectors, fusion) for the store's teachers and the student's
attention geometry; :class:`DistillModule` runs the student once per micro-batch, its K/V captured on the way by
:func:`kava.extract.capture.attention_capture`, and returns cross-entropy plus the K/V objective.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from safetensors.torch import save_file, save_model
from torch import nn

from kava.core.errors import ConfigError
from kava.extract.capture import attention_capture, attention_geometry, rotary_module
from kava.extract.rope import rope_params
from kava.kvstore.manifest import SEGMENT_NAMES

from .config import DistillConfig
from .logit_kd import logit_divergence
from .losses import weighted_mean
from .objective import KVObjective, StudentKV

if TYPE_CHECKING:
    from collections.abc import Sequence

    from .loader import Batch
    from .run_data import LogitTeacher, RunData
    from .student import Student

_COMPLETION = (SEGMENT_NAMES.index("reasoning"), SEGMENT_NAMES.index("answer"))


def build_objective(cfg: DistillConfig, data: RunData, student: Student) -> KVObjective:
    """The K/V objective for the run's teacher plans and the student's attention geometry (random init: seed first)."""
    _, heads, kv_heads, head_dim = attention_geometry(student.config)
    return KVObjective(data.plans, (heads, kv_heads, head_dim), data.kv_layers, cfg.objective, cfg.teacher_fusion)


def completion_targets(input_ids: torch.Tensor, attention_mask: torch.Tensor, segment_ids: torch.Tensor,
                       on: str) -> torch.Tensor:
    """``[B, T]`` bool: which tokens cross-entropy predicts. ``completion``: every real token from the first
    reasoning/answer token on (the EOS after the answer included, the prompt excluded); ``all``: every real token
    after the first."""
    real = attention_mask.bool()
    if on == "all":
        targets = real.clone()
    else:
        is_completion = (segment_ids == _COMPLETION[0]) | (segment_ids == _COMPLETION[1])
        targets = (is_completion.long().cummax(dim=1).values.bool()) & real
    targets[:, 0] = False  # nothing predicts the first token
    return targets


def logit_term(logits: torch.Tensor, targets: torch.Tensor, teachers: Sequence[LogitTeacher],
               batch: Batch, *, divergence: str = "auto", temperature: float = 1.0,
               skew: float = 0.1) -> torch.Tensor:
    """Logit distillation against the teachers' stored top-k: the mean over teachers of each one's weighted mean.

    ``logits[:, t]`` and the teacher's stored row at ``t`` both predict the text after token ``t``'s last character,
    so position ``t`` counts where the teacher has a row there and token ``t + 1`` is a cross-entropy target.

    Args:
        logits: ``[B, T, V]`` the student's logits.
        targets: ``[B, T]`` bool, ``completion_targets``.
        divergence, temperature, skew: ``logit_divergence``'s (``auto`` at 1: top-k KL / ULD's distance).

    Returns:
        A scalar (0 when no position counts).
    """
    per_teacher = []
    for teacher in teachers:
        tb = batch.teachers[teacher.name]
        assert tb.logit_ids is not None and tb.logit_logp is not None  # requested by RunData.loader_config
        ids, logp = tb.logit_ids[:, :-1], tb.logit_logp[:, :-1]  # [B, T-1, k]
        weight = ((ids[..., 0] >= 0) & targets[:, 1:]).float()  # [B, T-1]
        per_token = logit_divergence(logits[:, :-1], ids.clamp(min=0), logp, same_tokenizer=teacher.same_tokenizer,
                                     divergence=divergence, temperature=temperature, skew=skew)
        per_teacher.append(weighted_mean(per_token, weight))
    return torch.stack(per_teacher).mean()


TERMS = ("ce", "kv", "logit")
"""The loss terms a DistillModule sums, in order."""


class DistillModule(nn.Module):
    """Student plus objective; ``forward(batch)`` → ``(loss, terms)``: one forward pass of the student, its K/V
    captured on the way, CE on its logits, the K/V objective on the captured tensors and logit distillation against
    the ``logit_teachers``' stored top-k."""

    term_scales: torch.Tensor  # buffers, registered under --balance gradnorm only
    scales_set: torch.Tensor

    def __init__(self, student: Student, objective: KVObjective | None, cfg: DistillConfig, *,
                 logit_teachers: Sequence[LogitTeacher] = ()) -> None:
        super().__init__()
        self.student = student.model
        self.objective = objective
        self._inner = [student.inner]  # the same modules as self.student; a list keeps them out of state_dict twice
        options = cfg.objective
        self.ce_weight, self.kv_weight, self.ce_on = options.ce_weight, options.kv_weight, options.ce_on
        self.logit_options, self.logit_teachers = options.logits, list(logit_teachers)
        self.logit_weight = options.logits.logit_weight
        # --balance gradnorm: per-term scales set on the first step (``set_scales``); a buffer, so a checkpoint
        # carries them and a resumed run continues with the same ones. Absent otherwise (older checkpoints load).
        self.balance = options.balance == "gradnorm"
        if self.balance:
            self.register_buffer("term_scales", torch.ones(len(TERMS)))
            self.register_buffer("scales_set", torch.zeros(()))
        self.parts: dict[str, torch.Tensor] = {}
        """The last forward's unweighted terms (``ce``, ``kv``, ``logit``), still in the graph: what
        ``kava.distill.balance`` takes gradients of."""
        # Checked now rather than at the first forward: the capture records the rotation through this module.
        if objective is not None and rope_params(student.inner.config) is not None \
                and rotary_module(student.inner) is None:
            raise ConfigError(f"Expected {type(student.inner).__name__} to expose its rotary module as "
                              "`rotary_emb`. Got none, so its pre-RoPE keys can't be recovered. Use another "
                              "student.")

    def forward(self, batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The micro-batch's loss (a scalar in the graph) and its detached terms (scalars, ``loss/...`` and the
        objective's logs)."""
        batch = batch.decoded()  # teacher K/V/Q arrive as stored (fp16, bf16, int8 + scales): floats on this device
        inputs = dict(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False)
        kv: torch.Tensor | None = None
        logs: dict[str, torch.Tensor] = {}
        if self.objective is None:
            logits = self.student(**inputs).logits
        else:
            layers = self.objective.kv_layers
            with_q = self.objective.attn_layers if self.objective.alpha_attn > 0 else False
            # Captured as attended (post-RoPE): the attention term uses Q/K as they are, and pre-RoPE keys are the
            # exact inverse of the rotation recorded with them, computed only where a teacher's K is stored pre-RoPE.
            with attention_capture(self._inner[0], layers=layers, with_q=with_q, k_rope="post", with_rotation=True,
                                   training=True) as rec:
                logits = self.student(**inputs).logits
            student_kv = StudentKV(keys=rec.keys, values=rec.values, queries=rec.queries, scaling=rec.scaling,
                                   lengths=batch.attention_mask.sum(dim=1), rotation=rec.rotation)
            kv, logs = self.objective(student_kv, batch)
        targets = completion_targets(batch.input_ids, batch.attention_mask, batch.segment_ids, self.ce_on)
        # logits[:, t] predicts token t+1. Summed then divided, so a batch with no completion tokens gives 0, not NaN.
        labels = batch.input_ids[:, 1:].masked_fill(~targets[:, 1:], -100)
        ce_sum = F.cross_entropy(logits[:, :-1].float().flatten(0, 1), labels.flatten(), ignore_index=-100,
                                 reduction="sum")
        ce = ce_sum / targets.sum().clamp(min=1)
        self.parts = {"ce": ce}
        terms = {"loss/ce": ce.detach()}
        if kv is not None:
            self.parts["kv"] = kv
            terms["loss/kv"] = kv.detach()
            terms.update(logs)
        if self.logit_teachers:
            o = self.logit_options
            logit = logit_term(logits, targets, self.logit_teachers, batch, divergence=o.logit_divergence,
                               temperature=o.logit_temperature, skew=o.logit_skew)
            self.parts["logit"] = logit
            terms["loss/logit"] = logit.detach()
        total = self.total()
        terms["loss/total"] = total.detach()
        return total, terms

    def weighted_parts(self) -> dict[str, torch.Tensor]:
        """The last forward's terms as they enter the loss: weight × (balance scale) × term."""
        weights = {"ce": self.ce_weight, "kv": self.kv_weight, "logit": self.logit_weight}
        out = {}
        for name, part in self.parts.items():
            out[name] = weights[name] * part
            if self.balance:
                out[name] = out[name] * self.term_scales[TERMS.index(name)]
        return out

    def total(self) -> torch.Tensor:
        """The loss of the last forward: the sum of ``weighted_parts`` in a fixed order (CE, K/V, logits)."""
        parts = self.weighted_parts()
        total = parts["ce"]
        for name in TERMS[1:]:
            if name in parts:
                total = total + parts[name]
        return total

    def set_scales(self, scales: dict[str, float]) -> None:
        """Fix --balance gradnorm's per-term scales (from ``kava.distill.balance.balance_scales``)."""
        for name, value in scales.items():
            self.term_scales[TERMS.index(name)] = value
        self.scales_set.fill_(1.0)

    def save_heads(self, out: Path, weights: dict[str, torch.Tensor] | None = None) -> None:
        """Projector and router weights as safetensors (nothing without a K/V objective). ``weights``: this
        module's full state dict, gathered to rank 0 when the module itself holds shards (FSDP)."""
        if self.objective is None:
            return
        path = out / "projectors.safetensors"
        if weights is None:
            save_model(self.objective, str(path))
        else:
            save_file({k[len("objective."):]: v.contiguous() for k, v in weights.items() if k.startswith("objective.")},
                      str(path))
