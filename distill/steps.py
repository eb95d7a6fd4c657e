"""The pieces the distillation recipe composes: what to read from the store, the module that computes one
micro-batch's loss, the optimizer and the learning-rate schedule."""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from kava.extract.capture import rotary_module, attention_capture, attention_geometry
from kava.extract.rope import rope_params
from kava.kvstore import KVStore
from kava.core.errors import ConfigError, SchemaError
from kava.kvstore.manifest import SEGMENT_NAMES

from .config import DistillConfig
from .loader import LoaderConfig, TeacherRequest
from .objective import KVObjective, StudentKV, TeacherPlan

_COMPLETION = (SEGMENT_NAMES.index("reasoning"), SEGMENT_NAMES.index("answer"))


# -------------------------------------------------------------------------------------------------------------
# What the run reads


@dataclass
class RunData:
    """The store a run trains on and what it takes from it."""

    store: KVStore
    path: str
    tokenizer: Any
    template: str
    plans: list[TeacherPlan]
    kv_layers: tuple[int, ...]
    student_layers: int | None
    """The layer count of the store's layer maps (None without teachers)."""

    @property
    def teacher_names(self) -> list[str]:
        return [p.name for p in self.plans]

    def loader_config(self, cfg: DistillConfig, *, rank: int, world_size: int) -> LoaderConfig:
        requests = tuple(TeacherRequest(p.name, layers=p.read_layers, with_q=p.with_q) for p in self.plans)
        return LoaderConfig(store=self.path,
                            teachers=requests, batch_size=cfg.batch_size, max_tokens=cfg.max_tokens,
                            buffer_shards=cfg.buffer_shards, seed=cfg.seed, rank=rank, world_size=world_size,
                            num_workers=cfg.workers, allow_incomplete=cfg.allow_incomplete)

    def check_student(self, student: Any) -> None:
        """Refuse a student whose tokenizer or depth doesn't match the store."""
        from kava.extract.grid import tokenizer_fingerprint

        problems = []
        want = self.store.manifest.student_tokenizer
        if student.preset is None and tokenizer_fingerprint(student.tokenizer) != want.fingerprint:
            problems.append(
                f"the store's grid was cut with the tokenizer of {want.name!r} (fingerprint {want.fingerprint[:12]}), "
                f"and {student.name!r} has another. Re-extract with --student-tokenizer {student.name}, or train "
                "a student that shares the store's tokenizer"
            )
        layers = attention_geometry(student.config)[0]
        if self.student_layers is not None and layers != self.student_layers:
            problems.append(
                f"the store's layer map is for a {self.student_layers}-layer student; {student.name!r} has {layers} "
                f"layers. Re-extract with --student {student.name} (or --student-layers {layers})"
            )
        if problems:
            raise ConfigError(f"{self.store.where}: " + "; ".join(problems) + ".")


def resolve_data(cfg: DistillConfig, out: Path, log: Callable[[str], None]) -> RunData:
    """Open the store (or build a grid-only one from --dataset) and plan what each teacher contributes."""
    from .student import PRESETS, tokenizer_from_files

    preset = cfg.student.lower() in PRESETS
    path = str(out / "grid.zarr") if cfg.store is None else cfg.store
    if cfg.store is None:
        store, tokenizer = _grid_store(cfg, out, log)
    else:
        store, tokenizer = KVStore.open(path), None
        if preset:
            tokenizer = tokenizer_from_files(store.tokenizer_files())
    # A preset is built on the grid's tokenizer; a pretrained student brings its own (checked against the grid).
    tokenizer = tokenizer if preset else None
    template = str(store.manifest.dataset.details.get("student_template", "plain"))
    if not cfg.uses_kv:
        # A CE-only run on a store with teachers builds the same preset student as the K/V run it is compared with.
        depths = {spec.layer_map.student_layers for spec in store.teachers.values()}
        depth = cfg.layers if cfg.layers is not None else depths.pop() if len(depths) == 1 else None
        return RunData(store, path, tokenizer, template, [], (), depth)

    have = store.teachers
    names = cfg.teacher_names
    if names is None:
        if len(have) != 1:
            listing = ", ".join(sorted(have)) or "none"
            raise SchemaError(
                f"{store.where}: expected one teacher to learn from. The store has {len(have)}: {listing}. "
                + ("Run `kava extract` into it first, or train CE only with --kv-weight 0." if not have else
                   "Pick with --teachers NAME[,NAME...].")
            )
        names = list(have)
    missing = [n for n in names if n not in have]
    if missing:
        raise SchemaError(f"{store.where}: no teacher {', '.join(map(repr, missing))}. The store has: "
                          f"{', '.join(sorted(have)) or 'none'}. Pick with --teachers.")
    specs = [have[n] for n in names]
    depths = {s.name: s.layer_map.student_layers for s in specs}
    if len(set(depths.values())) != 1:
        raise SchemaError(f"{store.where}: the teachers' layer maps are for students of different depths {depths}. "
                          "Pick teachers mapped for the same student.")
    depth = next(iter(depths.values()))
    kv_layers = tuple(cfg.kv_layer_list or range(depth))
    out_of_range = [layer for layer in kv_layers if layer >= depth]
    if out_of_range:
        raise ConfigError(f"--kv-layers {out_of_range}: the store's layer map has student layers 0-{depth - 1}.")
    attn_layers = tuple(cfg.attn_layer_list or kv_layers)
    outside = [layer for layer in attn_layers if layer not in kv_layers]
    if outside:
        raise ConfigError(f"--attn-layers {outside}: not among the aligned student layers {list(kv_layers)}.")
    plans = [_teacher_plan(spec, kv_layers, attn_layers if cfg.uses_attention else (), store) for spec in specs]
    return RunData(store, path, tokenizer, template, plans, kv_layers, depth)


def _teacher_plan(spec: Any, kv_layers: tuple[int, ...], attn_layers: tuple[int, ...], store: KVStore) -> TeacherPlan:
    """``attn_layers``: the student layers whose attention is matched (empty: no attention term)."""
    sources = {s: tuple(spec.layer_map.sources[s]) for s in kv_layers}
    attn: dict[int, tuple[tuple[int, float], ...]] = {}
    if attn_layers:
        if not spec.has_q:
            raise SchemaError(
                f"{store.where}: teacher {spec.name!r} has no stored queries, and the structural loss's attention "
                "term needs them. Re-extract it with --with-q, or set --alpha-attn 0 (or --loss mercator)."
            )
        for s in attn_layers:
            with_q = [(t, w) for t, w in sources[s] if t in spec.q_layers]
            total = sum(w for _, w in with_q)
            attn[s] = tuple((t, w / total) for t, w in with_q) if total > 0 else ()
        if not any(attn.values()):
            raise SchemaError(
                f"{store.where}: teacher {spec.name!r} stores queries of layers {list(spec.q_layers)}, none of which "
                f"the aligned student layers {list(kv_layers)} map to. Re-extract with --q-layers covering "
                f"{sorted({t for p in sources.values() for t, _ in p})}, or set --alpha-attn 0."
            )
    return TeacherPlan(spec=spec, sources=sources, attn_sources=attn)


def _grid_store(cfg: DistillConfig, out: Path, log: Callable[[str], None]) -> tuple[KVStore, Any]:
    """CE-only without a store: tokenize --dataset into ``<out>/grid.zarr`` once (reused on resume); return the
    store and the tokenizer it was cut with."""
    from kava.extract.data import load_rows
    from kava.extract.grid import create_grid_store
    from kava.extract.synthetic import difficulty_details
    from kava.core.models import load_fast_tokenizer, load_tokenizer, resolve_model
    from kava.extract.templates import load_template

    from .student import PRESETS

    path = out / "grid.zarr"
    preset = cfg.student.lower() in PRESETS
    if preset and cfg.tokenizer is None:
        raise ConfigError(f"--student {cfg.student} is a preset: without --store it needs --tokenizer to build on.")
    tok_name = cfg.tokenizer if preset else cfg.student
    if preset:
        tokenizer = load_fast_tokenizer(tok_name)
    else:
        tokenizer = load_tokenizer(resolve_model(tok_name, role="student", trust_remote_code=cfg.trust_remote_code))
    rows = load_rows(cfg.dataset, split=cfg.split, limit=cfg.limit, data_files=cfg.data_files, seed=cfg.data_seed,
                     difficulty=cfg.difficulty)
    store, grid = create_grid_store(path, rows, tokenizer, load_template(cfg.template), tokenizer_name=tok_name,
                                    dataset=cfg.dataset, split=cfg.split, max_length=cfg.max_length,
                                    on_too_long="truncate", shard_tokens=32768, command=cfg.command,
                                    details={"limit": cfg.limit, "seed": cfg.data_seed,
                                             **difficulty_details(cfg.dataset, cfg.difficulty)})
    log(f"tokenized {len(grid)} samples of {cfg.dataset}:{cfg.split} into {path}")
    return KVStore.open(path), tokenizer


# -------------------------------------------------------------------------------------------------------------
# One micro-batch


def build_objective(cfg: DistillConfig, data: RunData, student: Any) -> KVObjective:
    _, heads, kv_heads, head_dim = attention_geometry(student.config)
    segments = cfg.segment_weight_map()
    return KVObjective(
        data.plans, (heads, kv_heads, head_dim), data.kv_layers, loss=cfg.loss, alpha_k=cfg.alpha_k,
        alpha_v=cfg.alpha_v, alpha_attn=cfg.alpha_attn, projector=cfg.projector, project=cfg.project,
        init_uniform=cfg.init_uniform, share_dim=cfg.share_dim_proj, fusion=cfg.fusion,
        fusion_weights=cfg.fusion_weight_list(), temperature=cfg.fusion_temperature,
        router_hidden=cfg.router_hidden, segment_weights=[segments[n] for n in SEGMENT_NAMES],
    )


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


class DistillModule(nn.Module):
    """Student plus objective; ``forward(batch)`` → ``(loss, terms)``: one forward pass of the student, its K/V
    captured on the way, CE on its logits and the K/V objective on the captured tensors."""

    def __init__(self, student: Any, objective: KVObjective | None, cfg: DistillConfig) -> None:
        super().__init__()
        self.student = student.model
        self.objective = objective
        self._inner = [student.inner]  # the same modules as self.student; a list keeps them out of state_dict twice
        self.ce_weight, self.kv_weight, self.ce_on = cfg.ce_weight, cfg.kv_weight, cfg.ce_on
        modeling = sys.modules.get(type(student.inner).__module__)
        self._rotate = getattr(modeling, "rotate_half", None)
        # Found once: the rotary module whose cos/sin each forward records (None for a model without RoPE).
        self._rotary = None
        if objective is not None and rope_params(student.inner.config) is not None:
            self._rotary = rotary_module(student.inner)
            if self._rotary is None:
                raise ConfigError(f"Expected {type(student.inner).__name__} to expose its rotary module as "
                                  "`rotary_emb`. Got none, so its pre-RoPE keys can't be recovered. Use another "
                                  "student.")

    def forward(self, batch: Any) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        inputs = dict(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False)
        kv = logs = None
        if self.objective is None:
            logits = self.student(**inputs).logits
        else:
            layers = self.objective.kv_layers
            with_q = self.objective.attn_layers if self.objective.alpha_attn > 0 else False
            # Captured as attended (post-RoPE): the attention term uses Q/K as they are, and pre-RoPE keys are the
            # exact inverse of the rotation recorded here, computed only where a teacher's K is stored pre-RoPE.
            rotation: list[tuple[torch.Tensor, torch.Tensor]] = []
            hook = None if self._rotary is None else self._rotary.register_forward_hook(
                lambda _m, _a, out: rotation.append((out[0], out[1])))
            try:
                with attention_capture(self._inner[0], layers=layers, with_q=with_q, k_rope="post",
                                       training=True) as rec:
                    logits = self.student(**inputs).logits
            finally:
                if hook is not None:
                    hook.remove()
            student_kv = StudentKV(keys=rec.keys, values=rec.values, queries=rec.queries, scaling=rec.scaling,
                                   lengths=batch.attention_mask.sum(dim=1),
                                   cos_sin=rotation[0] if rotation else None, rotate=self._rotate)
            kv, logs = self.objective(student_kv, batch)
        targets = completion_targets(batch.input_ids, batch.attention_mask, batch.segment_ids, self.ce_on)
        # logits[:, t] predicts token t+1. Summed then divided, so a batch with no completion tokens gives 0, not NaN.
        labels = batch.input_ids[:, 1:].masked_fill(~targets[:, 1:], -100)
        ce_sum = F.cross_entropy(logits[:, :-1].float().flatten(0, 1), labels.flatten(), ignore_index=-100,
                                 reduction="sum")
        ce = ce_sum / targets.sum().clamp(min=1)
        total = self.ce_weight * ce
        terms = {"loss/ce": ce.detach()}
        if kv is not None:
            total = total + self.kv_weight * kv
            terms["loss/kv"] = kv.detach()
            terms.update(logs)
        terms["loss/total"] = total.detach()
        return total, terms

    def save_heads(self, out: Path) -> None:
        """Projector and router weights as safetensors (nothing without a K/V objective)."""
        if self.objective is None:
            return
        from safetensors.torch import save_model

        save_model(self.objective, str(out / "projectors.safetensors"))


# -------------------------------------------------------------------------------------------------------------
# Optimizer and schedule


def make_optimizer(module: nn.Module, cfg: DistillConfig) -> torch.optim.Optimizer:
    """AdamW over everything trainable; norms, biases and other vectors get no weight decay."""
    decay, no_decay = [], []
    for p in module.parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=cfg.lr, betas=(0.9, 0.95))


def lr_factor(step: int, total: int, warmup: int, min_ratio: float) -> float:
    """Multiplier of the peak lr for optimizer step ``step`` (0-based): linear warmup, then cosine to min_ratio."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def make_schedule(optimizer: torch.optim.Optimizer, total: int, warmup: int, min_ratio: float) -> Any:
    from functools import partial

    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, partial(lr_factor, total=total, warmup=warmup, min_ratio=min_ratio))
