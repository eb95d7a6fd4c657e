"""The K/V objective: the student's captured K/V (and attention) against each teacher's stored rows.

For every aligned student layer ``s`` and teacher ``i`` the store's layer map names teacher layers and weights;
the target is their weighted sum (``[B, H_t, T, D_t]``). A projector per (teacher, layer, K|V) brings one side into
the other's space (``--project student``: the student is mapped into the teacher's space and the target stays
fixed; ``--project teacher``: the teacher is mapped into the student's). Each term is a per-token ``[B, T]`` value;
teachers are fused per token by the fusion module, and tokens are weighted by the stored alignment weight and the
segment weight. Everything here takes tensors and returns tensors; the trainer owns devices and logging.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import nn

from kava.core.errors import ConfigError
from kava.extract.rope import apply_rope, cos_sin
from kava.kvstore.manifest import TeacherSpec

from .config import FusionOptions, ObjectiveOptions
from .fusion import build_fusion, router_entropy
from .kept_attention import attention_kl_kept
from .losses import (
    TeacherAttention,
    attention_kl_blockwise,
    per_head_terms,
    per_token_cosine,
    per_token_mercator,
    per_token_mse,
    weighted_mean,
)
from .projectors import KVProjectors
from .routing import OracleRouter, PolicyRouter, SampleFamilies, family_routes, pool_features

if TYPE_CHECKING:
    from kava.extract.capture import Rotation

    from .loader import Batch, TeacherBatch


@dataclass(frozen=True)
class TeacherPlan:
    """What the run takes from one teacher: per aligned student layer, the (teacher layer, weight) pairs of the
    store's layer map, and for the attention term the pairs whose queries are stored (renormalised)."""

    spec: TeacherSpec
    sources: dict[int, tuple[tuple[int, float], ...]]
    attn_sources: dict[int, tuple[tuple[int, float], ...]]

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def read_layers(self) -> tuple[int, ...]:
        """Teacher K/V layers to read from the store: only those the aligned student layers use."""
        return tuple(sorted({t for src in self.sources.values() for t, _ in src}))

    @property
    def with_q(self) -> bool:
        return any(self.attn_sources.values())


@dataclass
class StudentKV:
    """The student's side of one forward pass, as it attended: K/Q after RoPE (what attention uses directly).

    ``keys``/``values``: layer → ``[B, kv_heads, T, head_dim]``; ``queries``: layer → ``[B, heads, T, head_dim]``;
    ``lengths``: ``[B]`` real tokens per row; ``rotation``: the RoPE of this forward as the capture recorded it, None
    for a model without RoPE. Pre-RoPE keys, for teachers stored pre-RoPE, are its exact inverse, computed once per
    layer when first asked.
    """

    keys: dict[int, torch.Tensor]
    values: dict[int, torch.Tensor]
    queries: dict[int, torch.Tensor]
    scaling: dict[int, float]
    lengths: torch.Tensor
    rotation: Rotation | None
    _pre: dict[int, torch.Tensor] = field(default_factory=dict)

    def key(self, layer: int, k_rope: str) -> torch.Tensor:
        """Layer ``layer``'s keys ``[B, kv_heads, T, head_dim]``, after RoPE (``"post"``) or before (``"pre"``)."""
        if k_rope == "post" or self.rotation is None:
            return self.keys[layer]  # without RoPE, pre and post are the same tensors
        if layer not in self._pre:
            self._pre[layer] = self.rotation.invert(self.keys[layer])
        return self._pre[layer]


def _kept_in_all(kept: torch.Tensor, layers: tuple[int, ...], pairs: Sequence[tuple[int, float]]) -> torch.Tensor:
    """A compressed teacher's mask of the layer map's mix: kept in every layer it mixes, ``[B, L, H, T]`` →
    ``[B, H, T]`` (a mix with an evicted row would be part of a target)."""
    out = None
    for layer, _ in pairs:
        term = kept[:, layers.index(layer)]
        out = term if out is None else out & term
    assert out is not None
    return out


def _mix(stack: torch.Tensor, layers: tuple[int, ...], pairs: Sequence[tuple[int, float]]) -> torch.Tensor:
    """``Σ w · stack[:, layers.index(l)]`` for the layer map's pairs: ``[B, L, H, T, D]`` → ``[B, H, T, D]``."""
    out = None
    for layer, weight in pairs:
        term = stack[:, layers.index(layer)] * weight
        out = term if out is None else out + term
    assert out is not None
    return out


@dataclass
class RouteDecision:
    """What ``--fusion rl`` chose for one micro-batch, kept for the policy's update after the step (detached)."""

    pooled: torch.Tensor  # [B, F] the features the policy read
    family: torch.Tensor | None  # [B] long, when the policy reads the family tag
    actions: torch.Tensor  # [B] long, -1 for a sample with no teacher
    allowed: torch.Tensor  # [B, N] bool


class KVObjective(nn.Module):
    """Projectors, fusion and the K/V loss terms for a run. ``forward(student, batch)`` → ``(loss, terms)``.

    Args:
        plans: one per teacher, in the order of the fusion weights.
        student_geometry: ``(num_heads, kv_heads, head_dim)`` of the student.
        kv_layers: the aligned student layers.
        objective: the projector, loss, alphas and segment weights (``--projector``, ``--loss``, ``--alpha-*``,
            ``--segment-weights``, ...); its cross-entropy and logit options are the training module's.
        fusion: how the teachers combine (``--fusion`` and its mode's option).
    """

    segment_weights: torch.Tensor  # buffer [num segments]

    def __init__(self, plans: Sequence[TeacherPlan], student_geometry: tuple[int, int, int], kv_layers: Sequence[int],
                 objective: ObjectiveOptions, fusion: FusionOptions) -> None:
        super().__init__()
        self.plans = list(plans)
        self.kv_layers = tuple(kv_layers)
        self.loss, self.project = objective.loss, objective.project
        self.alpha_k, self.alpha_v = objective.alpha_k, objective.alpha_v
        self.alpha_attn = objective.alpha_attn if objective.loss == "structural" else 0.0
        _, s_kv, s_dim = student_geometry
        compressed = [p.name for p in self.plans if p.spec.eviction is not None]
        if compressed and self.project != "student":
            raise ConfigError(
                f"--project {self.project}: teacher(s) {compressed} keep other rows in each head (a compressed "
                "store), and a projector onto the student's heads would mix kept rows with evicted ones. Use "
                "--project student."
            )
        self.projectors = nn.ModuleDict()
        for plan in self.plans:
            t = plan.spec
            src, dst = ((s_kv, s_dim), (t.kv_heads, t.head_dim)) if self.project == "student" else \
                ((t.kv_heads, t.head_dim), (s_kv, s_dim))
            self.projectors[plan.name] = KVProjectors(objective.projector, self.kv_layers, src[0], src[1], dst[0],
                                                      dst[1], init_uniform=objective.init_uniform,
                                                      share_dim=objective.share_dim_proj)
        self.fusion = build_fusion(fusion.fusion, len(self.plans), weights=fusion.fusion_weights,
                                   temperature=fusion.fusion_temperature, feature_dim=s_dim,
                                   hidden=fusion.router_hidden, baseline_decay=fusion.rl_baseline)
        # Per-sample routing (rl, oracle) and the per-family logs read each sample's family: set by attach_families.
        self.families: SampleFamilies | None = None
        self.rl_family = fusion.rl_family
        self.family_teacher_map = fusion.family_teacher_map
        self.decisions: list[RouteDecision] = []
        """``--fusion rl``'s choices of the micro-batches since the last policy update (training only)."""
        self.register_buffer("segment_weights", torch.tensor(objective.segment_weight_list, dtype=torch.float32),
                             persistent=False)

    def attach_families(self, families: SampleFamilies) -> None:
        """Read each sample's family from ``families`` (indexed by the batch's ``sample_indices``): the oracle routes
        by it, the rl policy reads it with ``--rl-family``, and the logs count each family's samples per teacher.
        Call before the optimizer is built: with ``--rl-family`` it adds the policy's per-family logits."""
        self.families = families
        self.register_buffer("family_of_sample", families.of_sample.clone(), persistent=False)
        if isinstance(self.fusion, OracleRouter):
            targets = families.teacher_targets([p.name for p in self.plans], self.family_teacher_map,
                                               flag="--family-teachers")
            self.register_buffer("family_teacher", targets, persistent=False)
        if isinstance(self.fusion, PolicyRouter) and self.rl_family:
            self.fusion.family = nn.Embedding(len(families.names), len(self.plans))
            nn.init.zeros_(self.fusion.family.weight)

    def _route_samples(self, features: torch.Tensor, available: torch.Tensor, batch: Batch,
                       family: torch.Tensor | None) -> torch.Tensor:
        """Weights ``[B, T, N]`` of the per-sample routers (oracle, rl) from per-token features ``[B, T, F]``."""
        if isinstance(self.fusion, OracleRouter):
            if family is None:
                raise ConfigError("--fusion oracle needs each sample's family: give --sample-families.")
            target = torch.where(family >= 0, self.family_teacher[family.clamp(min=0)], torch.full_like(family, -1))
            return self.fusion(available, target)
        pooled = pool_features(features.detach().float(), batch.attention_mask.bool())  # [B, F]
        shown = family if self.rl_family else None
        weights, actions, allowed = self.fusion(available, pooled, shown)
        if self.training:
            self.decisions.append(RouteDecision(pooled, shown, actions, allowed))
        return weights

    @property
    def attn_layers(self) -> tuple[int, ...]:
        """Student layers with an attention term for some teacher (their queries are captured)."""
        return tuple(layer for layer in self.kv_layers if any(p.attn_sources.get(layer) for p in self.plans))

    def parameter_counts(self) -> dict[str, int]:
        out = {f"projector/{name}": sum(p.numel() for p in m.parameters()) for name, m in self.projectors.items()}
        out["router"] = sum(p.numel() for p in self.fusion.parameters())
        return out

    def token_weight(self, segment_ids: torch.Tensor) -> torch.Tensor:
        """``[B, T]`` segment weight; padding (segment -1) gets 0."""
        seg = segment_ids.clamp(min=0)
        return torch.where(segment_ids >= 0, self.segment_weights[seg], torch.zeros((), device=seg.device))

    def forward(self, student: StudentKV, batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The fused K/V loss (a scalar in the graph) and detached per-term logs (scalars)."""
        per_teacher: list[dict[str, torch.Tensor]] = []
        target_var: list[torch.Tensor] = []
        for plan in self.plans:
            tb = batch.teachers[plan.name]
            terms = self._teacher_terms(plan, tb, student, target_var)
            per_teacher.append(terms)

        # Fusion over teachers, per token. available: [B, T, N]; weights: [B, T, N]. A compressed teacher has
        # nothing to say about a token none of its heads kept.
        align = torch.stack([batch.teachers[p.name].align_weight * t.get("kept", 1.0)
                             for p, t in zip(self.plans, per_teacher)], dim=-1)
        similarity = torch.stack([t["similarity"] for t in per_teacher], dim=-1)
        last = self.kv_layers[-1]
        features = student.key(last, "pre").mean(dim=1)  # [B, T, D_s]: the student's own view of each token
        family = self.family_of_sample[batch.sample_indices] if self.families is not None else None  # [B]
        if isinstance(self.fusion, (OracleRouter, PolicyRouter)):
            weights = self._route_samples(features, align > 0, batch, family)
        else:
            weights = self.fusion(similarity, features, align > 0)
        token_w = self.token_weight(batch.segment_ids) * (weights * align).sum(-1)  # [B, T]

        def fused(key: str) -> torch.Tensor:
            return sum(weights[..., i] * t[key] for i, t in enumerate(per_teacher))  # [B, T]

        loss = weighted_mean(fused("total"), token_w)
        logs: dict[str, torch.Tensor] = {}
        with torch.no_grad():
            for key in ("k", "v") + (("attn",) if self.alpha_attn > 0 else ()):
                logs[f"loss/{key}"] = weighted_mean(fused(key), token_w)
            for layer in self.kv_layers:
                logs[f"cos_k/L{layer}"] = weighted_mean(fused(f"cos_k/{layer}"), token_w)
                logs[f"cos_v/L{layer}"] = weighted_mean(fused(f"cos_v/{layer}"), token_w)
            logs["target_var"] = torch.stack(target_var).mean()
            if len(self.plans) > 1:
                mask = token_w > 0
                for i, plan in enumerate(self.plans):
                    logs[f"router/{plan.name}"] = weighted_mean(weights[..., i], mask.float())
                logs["router/entropy"] = router_entropy(weights, mask)
                if self.families is not None and family is not None:
                    # Samples of each family sent to each teacher (fractional for soft weights): their ratio over
                    # steps is the share the report plots; sums stay right when a family is absent from a batch.
                    routes = family_routes(weights, mask, family, len(self.families.names))  # [K, N]
                    for k, fam in enumerate(self.families.names):
                        for i, plan in enumerate(self.plans):
                            logs[f"route/{fam}/{plan.name}"] = routes[k, i]
        return loss, logs

    def _teacher_terms(self, plan: TeacherPlan, tb: TeacherBatch, student: StudentKV,
                       target_var: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        """Per-token ``[B, T]`` terms of one teacher, averaged over the aligned layers (and their heads).

        A compressed teacher (``tb.kept``) kept other rows in each layer and head: its terms are the mean over the
        (layer, head) entries it kept at each token, ``Σ m·ℓ / Σ m`` with ``m`` ``[B, H, T]`` per layer (kept in
        every layer the map mixes), and ``kept`` says which tokens have any (the others weigh nothing). Where it
        kept everything this is the dense mean over layers and heads.
        """
        if tb.kept is not None:
            return self._kept_terms(plan, tb, student, target_var)
        per_token = per_token_mse if self.loss == "mse" else per_token_mercator
        out: dict[str, torch.Tensor] = {}
        k_sum = v_sum = cos_sum = None
        mask = tb.align_weight > 0  # [B, T]
        for layer in self.kv_layers:
            pred_k, pred_v, tgt_k, tgt_v = self._targets(plan, tb, student, layer)
            lk, lv = per_token(pred_k, tgt_k), per_token(pred_v, tgt_v)
            with torch.no_grad():
                if self.loss == "mse":
                    ck, cv = per_token_cosine(pred_k, tgt_k), per_token_cosine(pred_v, tgt_v)
                else:  # the loss is 1 - cosine already: no second pass over [B, H, T, D]
                    ck, cv = 1 - lk.detach(), 1 - lv.detach()
                target_var.append(_token_variance(tgt_k, mask))
            out[f"cos_k/{layer}"], out[f"cos_v/{layer}"] = ck, cv
            k_sum = lk if k_sum is None else k_sum + lk
            v_sum = lv if v_sum is None else v_sum + lv
            cos_sum = ck if cos_sum is None else cos_sum + ck
        assert k_sum is not None and v_sum is not None and cos_sum is not None  # kv_layers is never empty
        n = len(self.kv_layers)
        out["k"], out["v"] = k_sum / n, v_sum / n
        out["similarity"] = cos_sum / n
        out["total"] = self.alpha_k * out["k"] + self.alpha_v * out["v"]
        if self.alpha_attn > 0:
            out["attn"] = self._attention_term(plan, tb, student)
            out["total"] = out["total"] + self.alpha_attn * out["attn"]
        return out

    def _targets(self, plan: TeacherPlan, tb: TeacherBatch, student: StudentKV, layer: int
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(pred_k, pred_v, target_k, target_v)`` of one aligned layer, each ``[B, H, T, D]`` in one space."""
        proj, pairs = self.projectors[plan.name], plan.sources[layer]
        t_k, t_v = _mix(tb.k, tb.layers, pairs), _mix(tb.v, tb.layers, pairs)  # [B, H_t, T, D_t]
        s_k, s_v = student.key(layer, plan.spec.k_rope), student.values[layer]
        if self.project == "student":
            return proj("k", layer, s_k), proj("v", layer, s_v), t_k, t_v
        return s_k, s_v, proj("k", layer, t_k), proj("v", layer, t_v)

    def _kept_terms(self, plan: TeacherPlan, tb: TeacherBatch, student: StudentKV,
                    target_var: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        """:meth:`_teacher_terms` of a compressed teacher: each (token, layer, head) it kept weighs the same."""
        assert tb.kept is not None
        out: dict[str, torch.Tensor] = {}
        k_num = v_num = cos_num = den = None
        for layer in self.kv_layers:
            pred_k, pred_v, tgt_k, tgt_v = self._targets(plan, tb, student, layer)
            m = _kept_in_all(tb.kept, tb.layers, plan.sources[layer]).to(pred_k.dtype)  # [B, H, T]
            lk, ck = per_head_terms(pred_k, tgt_k, self.loss)
            lv, cv = per_head_terms(pred_v, tgt_v, self.loss)
            heads = m.sum(1)  # [B, T] kept heads at each token
            with torch.no_grad():
                out[f"cos_k/{layer}"] = (ck * m).sum(1) / heads.clamp_min(1)
                out[f"cos_v/{layer}"] = (cv * m).sum(1) / heads.clamp_min(1)
                target_var.append(_token_variance(tgt_k, (tb.align_weight > 0) & (heads > 0)))
            k_layer, v_layer, c_layer = (lk * m).sum(1), (lv * m).sum(1), (ck.detach() * m).sum(1)
            k_num = k_layer if k_num is None else k_num + k_layer
            v_num = v_layer if v_num is None else v_num + v_layer
            cos_num = c_layer if cos_num is None else cos_num + c_layer
            den = heads if den is None else den + heads
        assert k_num is not None and v_num is not None and cos_num is not None and den is not None
        count = den.clamp_min(1)
        out["k"], out["v"], out["similarity"] = k_num / count, v_num / count, cos_num / count
        out["kept"] = (den > 0).to(k_num.dtype)
        out["total"] = self.alpha_k * out["k"] + self.alpha_v * out["v"]
        if self.alpha_attn > 0:
            out["attn"] = self._kept_attention_term(plan, tb, student)
            out["total"] = out["total"] + self.alpha_attn * out["attn"]
        return out

    def _kept_attention_term(self, plan: TeacherPlan, tb: TeacherBatch, student: StudentKV) -> torch.Tensor:
        """:meth:`_attention_term` of a compressed teacher: per query token ``[B, T]``, the mean over (aligned layer,
        student head) pairs whose query the teacher kept of KL(its attention renormalised over its kept keys ‖ the
        student's over the same keys) (``kava.distill.kept_attention``)."""
        assert tb.q is not None and tb.kept is not None
        cs = cos_sin(plan.spec.rope, torch.arange(tb.k.shape[-2], device=tb.k.device)) \
            if plan.spec.rope is not None and plan.spec.k_rope == "pre" else None
        total = heads = None
        for layer in self.kv_layers:
            pairs = plan.attn_sources.get(layer) or ()
            if not pairs:
                continue
            queries, keys, kept = [], [], []
            for t_layer, _ in pairs:
                q, k = tb.q[:, tb.q_layers.index(t_layer)], tb.k[:, tb.layers.index(t_layer)]
                if cs is not None:
                    q, k = apply_rope(q, *cs), apply_rope(k, *cs)
                queries.append(q)
                keys.append(k)
                kept.append(tb.kept[:, tb.layers.index(t_layer)])
            kl, n = attention_kl_kept(queries, keys, kept, [w for _, w in pairs], queries[0].shape[-1] ** -0.5,
                                      student.queries[layer], student.keys[layer], student.lengths,
                                      student.scaling[layer])
            total, heads = (kl, n) if total is None or heads is None else (total + kl, heads + n)
        assert total is not None and heads is not None
        return total / heads.clamp_min(1)

    def _attention_term(self, plan: TeacherPlan, tb: TeacherBatch, student: StudentKV) -> torch.Tensor:
        """KL(teacher attention ‖ student attention) per query token ``[B, T]``, averaged over aligned layers.

        Each side's attention is computed with its own RoPE (the teacher's from the store's parameters) at the
        positions of the student grid, which is where the stored teacher rows live.
        """
        assert tb.q is not None  # the plan asked for this teacher's queries (TeacherPlan.with_q)
        steps = tb.k.shape[-2]
        lengths = student.lengths
        t_rope = plan.spec.rope
        cs = None
        if t_rope is not None:
            positions = torch.arange(steps, device=tb.k.device)
            cs = cos_sin(t_rope, positions)
        total, count = None, 0
        for layer in self.kv_layers:
            pairs = plan.attn_sources.get(layer) or ()
            if not pairs:
                continue
            # The target: the layer map's teacher layers, mixed onto the student's heads block by block inside the
            # loss (never a [B, H, T, T] tensor), with no gradient.
            queries, keys = [], []
            for t_layer, _ in pairs:
                q = tb.q[:, tb.q_layers.index(t_layer)]
                k = tb.k[:, tb.layers.index(t_layer)]
                if plan.spec.k_rope == "pre" and cs is not None:
                    q, k = apply_rope(q, *cs), apply_rope(k, *cs)
                queries.append(q)
                keys.append(k)
            teacher = TeacherAttention(queries, keys, [w for _, w in pairs], queries[0].shape[-1] ** -0.5)
            s_q, s_k = student.queries[layer], student.keys[layer]  # post-RoPE, as the student attended
            kl = attention_kl_blockwise(teacher, s_q, s_k, lengths, student.scaling[layer])
            total = kl if total is None else total + kl
            count += 1
        assert total is not None
        return total / count


def _token_variance(target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Variance across the valid tokens of ``target [B, H, T, D]``, averaged over (H, D): the collapse watch."""
    x = target.permute(0, 2, 1, 3).reshape(target.shape[0] * target.shape[2], -1)[mask.reshape(-1)]
    if x.shape[0] < 2:
        return torch.zeros((), device=target.device)
    return x.float().var(dim=0).mean()
