"""What a distillation run reads: the store (or a grid tokenized from --dataset), its teachers, and what each
contributes.

:func:`resolve_data` opens the store and checks the run's teacher and layer flags against it, before any model
loads; the :class:`RunData` it returns builds the loader's request and checks the student against the store.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from kava.core.errors import ConfigError, SchemaError
from kava.core.models import load_fast_tokenizer, load_tokenizer, resolve_model
from kava.extract.capture import attention_geometry
from kava.extract.grid import create_grid_store, tokenizer_fingerprint
from kava.extract.templates import load_template
from kava.kvstore import KVStore
from kava.kvstore.manifest import TeacherSpec

from .config import DistillConfig
from .loader import LoaderConfig, TeacherRequest
from .objective import TeacherPlan
from .student import PRESETS, tokenizer_from_files

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from .student import Student


@dataclass(frozen=True)
class LogitTeacher:
    """A teacher whose stored top-k logits the run distils from, and which loss compares them."""

    name: str
    same_tokenizer: bool
    """The teacher's ids are the student's tokens (its tokenizer fingerprint is the store's student tokenizer's):
    ``topk_kl``; otherwise ``sorted_prob_distance``, which needs no vocabulary mapping."""


@dataclass
class RunData:
    """The store a run trains on and what it takes from it."""

    store: KVStore
    path: str
    tokenizer: PreTrainedTokenizerBase | None
    """The tokenizer a preset student is built on (the grid's); None for a pretrained student, which brings its own."""
    template: str | dict[str, str]
    """The grid's template as ``kava.json`` records it: a name, or ``{"name", "format"}`` when the name alone does
    not give it back (``kava.extract.templates.template_record``)."""
    plans: list[TeacherPlan]
    kv_layers: tuple[int, ...]
    student_layers: int | None
    """The layer count of the store's layer maps (None without teachers)."""
    logit_teachers: list[LogitTeacher] = field(default_factory=list)
    """Teachers whose top-k logits the run reads (with --logit-weight)."""

    @property
    def teacher_names(self) -> list[str]:
        return [p.name for p in self.plans]

    def loader_config(self, cfg: DistillConfig, *, rank: int, world_size: int) -> LoaderConfig:
        kv = {p.name: p for p in self.plans}
        logits = {t.name for t in self.logit_teachers}
        names = list(kv) + [t.name for t in self.logit_teachers if t.name not in kv]
        requests = tuple(TeacherRequest(n, layers=kv[n].read_layers if n in kv else None,
                                        with_q=n in kv and kv[n].with_q, with_logits=n in logits, with_kv=n in kv)
                         for n in names)
        t = cfg.trainer
        return LoaderConfig(store=self.path,
                            teachers=requests, batch_size=t.batch_size, max_tokens=t.max_tokens,
                            buffer_shards=t.buffer_shards, seed=t.seed, rank=rank, world_size=world_size,
                            num_workers=t.workers, allow_incomplete=cfg.reads.allow_incomplete)

    def check_student(self, student: Student) -> None:
        """Refuse a student whose tokenizer or depth doesn't match the store."""
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
    details = store.manifest.dataset.details
    template: str | dict[str, str] = str(details.get("student_template", "plain"))
    if "student_template_format" in details:  # a file or chat:tokenizer template: its text, recorded by the grid
        template = {"name": template, "format": str(details["student_template_format"])}
    if not cfg.uses_kv and not cfg.uses_logits:
        return RunData(store, path, tokenizer, template, [], (), _ce_depth(cfg, store))

    have = store.teachers
    names = cfg.reads.teachers
    if names is None:
        if len(have) != 1:
            listing = ", ".join(sorted(have)) or "none"
            raise SchemaError(
                f"{store.where}: expected one teacher to learn from. The store has {len(have)}: {listing}. "
                + ("Run `kava extract` into it first, or train CE only with --kv-weight 0 and --logit-weight 0."
                   if not have else
                   "Pick with --teachers NAME[,NAME...].")
            )
        names = list(have)
    missing = [n for n in names if n not in have]
    if missing:
        raise SchemaError(f"{store.where}: no teacher {', '.join(map(repr, missing))}. The store has: "
                          f"{', '.join(sorted(have)) or 'none'}. Pick with --teachers.")
    specs = [have[n] for n in names]
    logit_teachers = [_logit_teacher(spec, store, cfg) for spec in specs] if cfg.uses_logits else []
    if not cfg.uses_kv:  # logits only: no K/V read, the student built as for CE only
        return RunData(store, path, tokenizer, template, [], (), _ce_depth(cfg, store), logit_teachers)
    depths = {s.name: s.layer_map.student_layers for s in specs}
    if len(set(depths.values())) != 1:
        raise SchemaError(f"{store.where}: the teachers' layer maps are for students of different depths {depths}. "
                          "Pick teachers mapped for the same student.")
    depth = next(iter(depths.values()))
    kv_layers = tuple(cfg.reads.kv_layers or range(depth))
    out_of_range = [layer for layer in kv_layers if layer >= depth]
    if out_of_range:
        raise ConfigError(f"--kv-layers {out_of_range}: the store's layer map has student layers 0-{depth - 1}.")
    attn_layers = tuple(cfg.reads.attn_layers or kv_layers)
    outside = [layer for layer in attn_layers if layer not in kv_layers]
    if outside:
        raise ConfigError(f"--attn-layers {outside}: not among the aligned student layers {list(kv_layers)}.")
    plans = [_teacher_plan(spec, kv_layers, attn_layers if cfg.uses_attention else (), store) for spec in specs]
    return RunData(store, path, tokenizer, template, plans, kv_layers, depth, logit_teachers)


def _ce_depth(cfg: DistillConfig, store: KVStore) -> int | None:
    """A run without K/V on a store with teachers builds the same preset student as the K/V run it is compared
    with: the depth of the teachers' layer maps (or --layers)."""
    depths = {spec.layer_map.student_layers for spec in store.teachers.values()}
    return cfg.fine_tune.layers if cfg.fine_tune.layers is not None else depths.pop() if len(depths) == 1 else None


def _logit_teacher(spec: TeacherSpec, store: KVStore, cfg: DistillConfig) -> LogitTeacher:
    if spec.logits is None:
        raise SchemaError(
            f"{store.where}: expected teacher {spec.name!r} to store its top-k logits for --logit-weight "
            f"{cfg.objective.logits.logit_weight}. Got none instead. Re-extract it with --logit-top-k K (e.g. 8), or "
            "set --logit-weight 0."
        )
    return LogitTeacher(spec.name, spec.logits.tokenizer_fingerprint == store.manifest.student_tokenizer.fingerprint)


def _teacher_plan(spec: TeacherSpec, kv_layers: tuple[int, ...], attn_layers: tuple[int, ...],
                  store: KVStore) -> TeacherPlan:
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


def _grid_store(cfg: DistillConfig, out: Path, log: Callable[[str], None]) -> tuple[KVStore, PreTrainedTokenizerBase]:
    """CE-only without a store: tokenize --dataset into ``<out>/grid.zarr`` once (reused on resume); return the
    store and the tokenizer it was cut with."""
    path = out / "grid.zarr"
    preset = cfg.student.lower() in PRESETS
    if preset and cfg.fine_tune.tokenizer is None:
        raise ConfigError(f"--student {cfg.student} is a preset: without --store it needs --tokenizer to build on.")
    tok_name = cfg.fine_tune.tokenizer if preset else cfg.student
    if preset:
        tokenizer = load_fast_tokenizer(tok_name)
    else:
        tokenizer = load_tokenizer(resolve_model(tok_name, role="student", trust_remote_code=cfg.trust_remote_code))
    d = cfg.data
    f = cfg.fine_tune
    template = load_template(f.student_template, tokenizer=tokenizer, system_prompt=f.system_prompt,
                             flag="--student-template", who=f"the tokenizer ({tok_name})")
    store, grid = create_grid_store(path, d.load(), tokenizer, template,
                                    tokenizer_name=tok_name, dataset=d.dataset, split=d.split,
                                    max_length=cfg.fine_tune.max_length,
                                    on_too_long="truncate", shard_tokens=32768, command=cfg.command,
                                    details=d.details())
    log(f"tokenized {len(grid)} samples of {d.dataset}:{d.split} into {path}")
    return KVStore.open(path), tokenizer
