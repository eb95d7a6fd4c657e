"""`kava run` for latent reasoning: a config with ``kind: latent`` trains `kava latent` students, variant × seed,
at equal compute, and reports them with the same paired statistics as every other run.

A config names the options every student shares (``latent:``, `kava latent`'s own keys), the variants (each a few
of those keys: ``mode``, ``kv_weight``, ``jacobi``, ``teacher``...), the seeds, the baseline and the contrasts.
Steps and batch size live in ``latent:`` only: a variant that sets one is refused (equal compute). When a variant
reads ``teacher: store``, the run first trains the CoT teacher (``teacher:``, `kava latent --mode cot` options),
exports the training rows, and extracts the teacher with R-KV at the students' budget ``M`` into ``kv.zarr``. A
variant may start from that teacher's weights with ``student: "@teacher"``.

Stages and folders under ``<out>/<name>/``: ``teacher/`` and ``data/`` and ``kv.zarr`` (only with a store variant),
``students/<variant>/seed-N/`` (each with its ``eval.json``/``eval.jsonl``), ``report.md``, ``report.json`` and
``figures/``. Each unit is skipped when its ``stage.json`` digest matches (``Runner._unit``).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from kava.core.errors import ConfigError, KavaError
from kava.distill.latent.config import LatentConfig

from .config import digest, is_latent_data
from .contrasts import contrast_problems

KIND = "latent"
is_latent_config = is_latent_data
COMPUTE = ("steps", "batch_size")
"""Options that decide a student's compute: set in ``latent:`` for all, never per variant."""
RUNNER_SET = ("out", "seed", "store", "store_teacher", "export_rows", "progress")
"""Options the runner sets itself."""
PATHS = ("student", "tokenizer", "data_files", "eval_files")
"""Options that name files: ``$VAR`` in them is read from the environment."""
TEACHER_REF = "@teacher"
"""``student: "@teacher"``: start from the run's CoT teacher."""


@dataclass
class LatentVariant:
    name: str
    options: dict[str, Any] = field(default_factory=dict)
    """`kava latent` options of this variant, over ``latent:``."""


@dataclass
class LatentRunConfig:
    name: str
    out: str = "runs"
    kind: str = KIND
    seeds: list[int] = field(default_factory=lambda: [0])
    baseline: str = ""
    contrasts: list[str] = field(default_factory=list)
    latent: dict[str, Any] = field(default_factory=dict)
    """`kava latent` options every student shares (student, tokenizer, data, M, T, steps, batch size, lr...)."""
    teacher: dict[str, Any] = field(default_factory=dict)
    """`kava latent --mode cot` options of the CoT teacher (over ``latent:``), trained when a variant needs it."""
    variants: list[LatentVariant] = field(default_factory=list)

    @property
    def root(self) -> Path:
        return Path(self.out) / self.name

    @property
    def needs_teacher(self) -> bool:
        return any(v.options.get("teacher") == "store" or v.options.get("student") == TEACHER_REF
                   for v in self.variants)

    def student_config(self, variant: LatentVariant, seed: int, *, teacher: str | None = None,
                       store: str | None = None) -> LatentConfig:
        options = {**self.latent, **variant.options, "seed": seed, "progress": False,
                   "out": str(self.root / "students" / variant.name / f"seed-{seed}")}
        if options.get("student") == TEACHER_REF:
            options["student"] = teacher or "(the run's teacher)"
        if options.get("teacher") == "store":
            options["store"] = store or "(the run's store)"
        return LatentConfig.from_dict(options)

    def teacher_config(self) -> LatentConfig:
        return LatentConfig.from_dict({**self.latent, "eval_size": 0, "seed": 0, **self.teacher, "mode": "cot",
                                       "teacher": "self", "kv_weight": 1.0, "progress": False,
                                       "out": str(self.root / "teacher")})

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def parse_latent_config(data: dict[str, Any], *, source: str) -> LatentRunConfig:
    """The typed config, every problem reported at once (the students' own options validated by LatentConfig)."""
    p: list[str] = []
    known = {f.name for f in dataclasses.fields(LatentRunConfig)}
    if unknown := sorted(set(data) - known):
        p.append(f"{source}: unknown keys {unknown}. Expected {sorted(known)}.")
    variants = []
    for i, v in enumerate(data.get("variants") or []):
        if not isinstance(v, dict) or not isinstance(v.get("name"), str):
            p.append(f"{source}: variants[{i}]: expected a mapping with a name. Got {v!r}.")
            continue
        options = {k: x for k, x in v.items() if k != "name"}
        for k in sorted(set(options) & set(COMPUTE)):
            p.append(f"{source}: variant {v['name']!r} sets {k}; steps and batch_size are set once, in latent: "
                     "(equal compute).")
        for k in sorted(set(options) & set(RUNNER_SET)):
            p.append(f"{source}: variant {v['name']!r} sets {k}, which the run sets itself. Drop it.")
        variants.append(LatentVariant(v["name"], options))
    for key in ("latent", "teacher"):
        if not isinstance(data.get(key, {}), dict):
            p.append(f"{source}: {key}: expected a mapping of `kava latent` options. Got {data.get(key)!r}.")
    if p:
        raise ConfigError.from_problems(p)
    cfg = LatentRunConfig(**{**{k: v for k, v in data.items() if k != "variants"}, "variants": variants})
    for options in (cfg.latent, cfg.teacher, *(v.options for v in cfg.variants)):
        for key in PATHS:  # $KAVA_ASSETS/... names the shared assets, as in every other run config
            if isinstance(options.get(key), str):
                options[key] = os.path.expandvars(options[key])
    names = [v.name for v in cfg.variants]
    if not names:
        p.append(f"{source}: variants: expected at least one.")
    if len(set(names)) != len(names):
        p.append(f"{source}: variants: names must be distinct. Got {names}.")
    if cfg.baseline not in names:
        p.append(f"{source}: baseline: expected one of the variants {names}. Got {cfg.baseline!r}.")
    if not cfg.seeds or len(set(cfg.seeds)) != len(cfg.seeds):
        p.append(f"{source}: seeds: expected distinct integers. Got {cfg.seeds!r}.")
    p += contrast_problems(cfg.contrasts, names)
    for v in cfg.variants:
        try:
            cfg.student_config(v, cfg.seeds[0] if cfg.seeds else 0).validate()
        except ConfigError as e:
            p.append(f"variant {v.name!r}: {e}")
    if cfg.needs_teacher:
        try:
            cfg.teacher_config().validate()
        except ConfigError as e:
            p.append(f"teacher: {e}")
    if p:
        raise ConfigError.from_problems(p)
    return cfg


class LatentRunner:
    """Teacher, rows and store (when a variant reads them), students, report; see the module docstring."""

    def __init__(self, cfg: LatentRunConfig, *, force: tuple[str, ...] = (), log: Any = None) -> None:
        from .runner import Runner  # noqa: PLC0415 - torch and transformers, once a run starts

        self.cfg = cfg
        self.units = Runner(cfg, force=force, log=log)  # type: ignore[arg-type]  # uses root, force, log only
        self.root = cfg.root

    def run(self) -> Any:
        self.root.mkdir(parents=True, exist_ok=True)
        (self.root / "config.yaml").write_text(yaml.safe_dump(self.cfg.to_dict(), sort_keys=False))
        teacher = store = None
        if self.cfg.needs_teacher:
            teacher = self.teacher()
            if any(v.options.get("teacher") == "store" for v in self.cfg.variants):
                store = self.extract(teacher)
        records = {(v.name, s): self.student(v, s, teacher, store) for v in self.cfg.variants for s in self.cfg.seeds}
        from .latent_report import write_latent_report  # noqa: PLC0415 - scipy and matplotlib

        write_latent_report(self.cfg, self.root, records)
        self.units.result.report = self.root / "report.md"
        return self.units.result

    def teacher(self) -> dict[str, Any]:
        cfg = self.cfg.teacher_config()
        where = Path(cfg.out)

        def work() -> dict[str, Any]:
            from kava.distill.latent.train import train_latent  # noqa: PLC0415

            shutil.rmtree(where, ignore_errors=True)
            result = train_latent(cfg)
            return {"model": str(where), "seconds_trained": result.seconds, "last": result.last,
                    "settings": cfg.to_dict()}

        record = self.units._unit(where, "teachers", "teacher cot", digest(cfg.to_dict()), work,
                                  check=lambda: (where / "latent.json").is_file())
        return {**record, "key": digest([record["digest"], record.get("made")])}

    def extract(self, teacher: dict[str, Any]) -> dict[str, Any]:
        from kava.extract.config import ExtractConfig  # noqa: PLC0415
        from kava.extract.recipe import run_extract  # noqa: PLC0415
        from kava.kvstore import KVStore  # noqa: PLC0415

        rows = self.cfg.teacher_config()
        data, path = self.root / "data", self.root / "kv.zarr"
        budget = self.cfg.student_config(self.cfg.variants[0], 0).latent
        options = {"budget": budget, **{k: getattr(rows, k) for k in ("dataset", "data_files", "chain_steps",
                                                                        "train_size", "data_seed", "kv_rope")}}
        key = digest({"teacher": teacher["key"], **options})

        def work() -> dict[str, Any]:
            from kava.distill.latent.train import train_latent  # noqa: PLC0415

            shutil.rmtree(path, ignore_errors=True)
            train_latent(dataclasses.replace(rows, export_rows=str(data)))
            config = ExtractConfig.from_dict(dict(
                teacher=teacher["model"], dataset=str(data / "train.jsonl"), store=str(path),
                student_template=str(data / "template.txt"), evict="r-kv", kv_budget=str(budget),
                k_rope=rows.kv_rope, calibration_samples=0, progress=False, threads=rows.threads,
            ))
            result = run_extract(config, log=lambda line: None)
            return {"samples": result.samples, "settings": config.to_dict()}

        def check() -> bool:
            try:
                store = KVStore.open(path)
            except KavaError:  # no store, or one that doesn't open: extract again (a bug propagates)
                return False
            return bool(store.teachers) and not any(store.missing_shards(name) for name in store.teachers)

        record = self.units._unit(self.root / "stages" / "extract", "extract", "extract cot", key, work, check)
        return {"path": str(path), "key": digest([record["digest"], record.get("made")])}

    def student(self, variant: LatentVariant, seed: int, teacher: dict[str, Any] | None,
                store: dict[str, Any] | None) -> dict[str, Any]:
        cfg = self.cfg.student_config(variant, seed, teacher=teacher and teacher["model"],
                                      store=store and store["path"])
        where = Path(cfg.out)
        inputs = {"teacher": teacher and teacher["key"] if cfg.student.startswith(str(self.root)) else None,
                  "store": store and store["key"] if cfg.teacher == "store" else None}
        key = digest({"config": cfg.to_dict(), **inputs})

        def work() -> dict[str, Any]:
            from kava.distill.latent.train import train_latent  # noqa: PLC0415

            shutil.rmtree(where, ignore_errors=True)
            result = train_latent(cfg)
            return {"variant": variant.name, "seed": seed, "seconds_trained": result.seconds, "last": result.last,
                    "eval": result.eval, "settings": cfg.to_dict()}

        return self.units._unit(where, "distill", f"latent {variant.name} seed {seed}", key, work,
                                check=lambda: (where / "eval.jsonl").is_file() or not cfg.eval_size)


def load_items(where: Path) -> dict[str, dict[str, Any]]:
    """A student's eval items by sample id."""
    lines = (where / "eval.jsonl").read_text(encoding="utf-8").splitlines()
    return {item["sample_id"]: item for item in map(json.loads, lines)}
