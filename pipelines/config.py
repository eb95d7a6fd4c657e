"""The experiment config of `kava run`: typed dataclasses read from YAML, with every problem reported at once.

An experiment is data → teachers (trained here, or pretrained) → one store → students (variant × seed) → eval →
report. The stage configs (`ExtractConfig`, `DistillConfig`, `EvalConfig`) are built from this one, so a key here
is either a section field below or, under ``extract:`` / ``distill:``, a field of that stage's config.

Equal compute is structural: steps, batch and length live in ``train:`` and are the same for every variant; a
variant that tries to set one of them is refused.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kava.core.config import config_fields, option_names
from kava.core.errors import ConfigError, short_repr
from kava.core.safe_yaml import load_yaml
from kava.core.synthetic import difficulty_problems, family_problems
from kava.distill.config import MAX_SEED, DistillConfig
from kava.distill.student import PRESETS as STUDENT_PRESETS
from kava.distill.trackers import TRACKERS
from kava.extract.config import ExtractConfig
from kava.extract.templates import TOKENIZER_CHAT, check_template_name
from kava.kvstore.manifest import is_teacher_name

from . import splits
from .contrasts import contrast_problems

STAGES = ("data", "teachers", "extract", "tune", "distill", "eval", "report")
"""The stages of `kava run`, in order; ``--force NAME`` redoes one."""

COMPUTE_FIELDS = ("steps", "epochs", "batch_size", "grad_accum", "max_tokens", "max_length")
"""DistillConfig fields that decide a student's compute: set once in ``train:``, never per variant."""

RUNNER_FIELDS = ("student", "out", "store", "teachers", "seed", "dataset", "split", "limit", "data_files", "difficulty",
                 "tokenizer", "resume", "progress", "command", "threads", "device", "sample_families", "tracker",
                 "tracker_project", "tracker_name")
"""DistillConfig fields the runner sets itself."""


@dataclass
class DataSpec:
    dataset: str = "synthetic"
    """synthetic, gsm8k, or a JSONL/Parquet file of question/answer records."""
    data_files: str | None = None
    """For gsm8k: a local file instead of the hub (one file per split: use pool_files / eval_files)."""
    eval_files: str | None = None
    """For gsm8k: the local file of the evaluation split."""
    seed: int = 0
    """Seed of the synthetic generator and of the pool's shuffle."""
    difficulty: str = "default"
    """Difficulty of the synthetic generator: a preset (default, easy) or key=value pairs such as
    steps=1-2,ops=+-,start=2-9,operand=1-9. Recorded in splits.json; it names the rows' source ids."""
    pool_split: str = "train"
    """The split the teacher-training and student-training rows are drawn from."""
    pool_size: int | None = 2000
    """Rows of the pool (None: all of it)."""
    teacher_fraction: float = 0.8
    """Share of the pool that trains the teachers (the rest trains the students); 0 when no teacher is trained."""
    eval_split: str = "test"
    """A separate split for evaluation: never seen by a teacher or a student."""
    eval_size: int | None = 200
    """Rows evaluated (None: the whole split)."""
    validation_size: int = 0
    """Rows carved from the student share of the pool into a validation split: never trained on, never part of the
    store, read only by ``tune:`` (the eval split is never used to choose a setting)."""
    families: dict[str, str] = field(default_factory=dict)
    """Task families of the synthetic data: name → difficulty (as ``difficulty``), e.g. {add: 'ops=+', sub: 'ops=-'}.
    The pool and the eval split mix them equally, every row is tagged with its family, a teacher may train on one
    (``teachers[i].train.family``) and the report gives accuracy per family."""


@dataclass
class TeacherTrainSpec:
    preset: str = "tiny-llama"
    """The architecture preset trained from scratch (see `kava distill --student`)."""
    layers: int | None = None
    """Its depth (None: the preset's)."""
    vocab_size: int = 512
    """Its byte-level BPE, trained on the teacher split (unless tokenizer is set)."""
    steps: int = 600
    batch_size: int = 16
    lr: float = 2e-3
    seed: int = 0
    tokenizer: str | None = None
    """An existing tokenizer (a directory or hub id; $KAVA_ASSETS/... names the shared assets) instead of a BPE
    trained here: e.g. one with a chat template, for template chat:tokenizer."""
    template: str = "plain"
    """The template it is trained on: plain, chat, cot, chat:tokenizer (its tokenizer's chat template) or a file."""
    system_prompt: str | None = None
    """With template chat:tokenizer: the system message (default: the chat template's own)."""
    family: str | None = None
    """Train on the teacher split's rows of this task family alone (one of data.families): a specialist."""

    def key(self) -> dict[str, Any]:
        """What its cache key digests: every setting, without the tokenizer options left at their defaults (so a
        teacher cached before they existed keeps its key)."""
        new = {"tokenizer": None, "template": "plain", "system_prompt": None, "family": None}
        return {k: v for k, v in self.__dict__.items() if k not in new or v != new[k]}


@dataclass
class TeacherSpec:
    name: str
    """The teacher's name in the store."""
    model: str | None = None
    """A registry name, hub id or directory of a pretrained teacher (or use ``train:``)."""
    train: TeacherTrainSpec | None = None
    """Train this teacher here, CE only, on the teacher split (cached by its settings)."""
    extract: dict[str, Any] = field(default_factory=dict)
    """`kava extract` options for this teacher (with_q, layer_map, alignment, kv_dtype, ...)."""


FAMILIES_FILE = "families.json"
"""``<run>/data/families.json``: the student split's sample id → task family (with data.families), written by the
data stage for `kava distill --sample-families`."""

TEACHER_TOKENIZER = "teacher:"
"""``student.tokenizer: teacher:NAME`` takes the tokenizer of the teacher ``NAME`` trained here."""


@dataclass
class StudentSpec:
    model: str = "tiny-qwen2"
    """A preset (built at random on the student tokenizer) or a pretrained model directory / hub id."""
    layers: int | None = 3
    """A preset's depth (the store's layer map is made for it)."""
    tokenizer: str | None = None
    """A preset's tokenizer (directory or hub id), or ``teacher:NAME`` for the BPE a teacher trained here was given
    (so teacher and student share ids and logit KD compares the same tokens); None trains a byte-level BPE of
    ``vocab_size`` here."""
    vocab_size: int = 384

    @property
    def is_preset(self) -> bool:
        return self.model.lower() in STUDENT_PRESETS

    @property
    def trains_tokenizer(self) -> bool:
        """A preset without a tokenizer gets a BPE trained in the data stage."""
        return self.is_preset and self.tokenizer is None

    @property
    def teacher_tokenizer(self) -> str | None:
        """The teacher whose tokenizer the student takes (``tokenizer: teacher:NAME``), else None."""
        if self.tokenizer is not None and self.tokenizer.startswith(TEACHER_TOKENIZER):
            return self.tokenizer[len(TEACHER_TOKENIZER):]
        return None


@dataclass
class TrainSpec:
    """Compute, the same for every variant: the report shows it is."""

    steps: int = 150
    batch_size: int = 16
    grad_accum: int = 1
    max_length: int = 512
    distill: dict[str, Any] = field(default_factory=dict)
    """Other `kava distill` options shared by every variant (lr, warmup_steps, workers, ...)."""


@dataclass
class VariantSpec:
    name: str
    teachers: list[str] = field(default_factory=list)
    """Teachers whose K/V the variant learns from; none is CE-only."""
    distill: dict[str, Any] = field(default_factory=dict)
    """`kava distill` options of this variant (loss, projector, fusion, ...); compute options are refused."""


@dataclass
class TuneSpec:
    """A small grid search on the validation split: one student per grid point, the best point's options applied to
    ``apply_to``'s variants before they train."""

    variant: str
    """The variant whose `kava distill` options each grid point extends (e.g. the logit-KD baseline)."""
    grid: dict[str, list[Any]] = field(default_factory=dict)
    """`kava distill` option → the values tried; every combination is trained (e.g. logit_temperature: [1, 2])."""
    apply_to: list[str] = field(default_factory=list)
    """Variants that take the chosen options (default: ``variant`` alone)."""
    metric: str = "accuracy"
    """What chooses on the validation split: accuracy (ties broken by lower NLL) or nll."""
    seed: int | None = None
    """The tuning students' seed (default: the first of ``seeds``)."""
    steps: int | None = None
    """Steps of each tuning student (default: train.steps)."""


@dataclass
class EvalSpec:
    batch_size: int = 50
    max_new_tokens: int = 200
    teachers: bool = True
    """Evaluate the teachers too (the ceiling the students are compared with)."""
    checkpoint_rows: int = 50
    """Task accuracy at each kept checkpoint (a learning curve) is measured on the first N eval rows; 0: none."""
    budgets: list[int] = field(default_factory=list)
    """Steps at which the report compares the variants (paired, Holm) from their checkpoints on the first
    ``checkpoint_rows`` eval rows, with the compute ratio against the baseline; only these checkpoints are
    evaluated. Each must be a checkpoint step (a multiple of checkpoint_every) or train.steps."""


@dataclass
class RunConfig:
    name: str = "default"
    """Outputs go to ``<out>/<name>/``."""
    out: str = "runs"
    seeds: list[int] = field(default_factory=lambda: [42, 43, 44])
    baseline: str = "ce"
    """The variant every other one is tested against."""
    contrasts: list[str] = field(default_factory=list)
    """Variant against variant, beside the baseline tables: ``"fusion-learnable vs fusion-fixed"``."""
    data: DataSpec = field(default_factory=DataSpec)
    teachers: list[TeacherSpec] = field(default_factory=list)
    student: StudentSpec = field(default_factory=StudentSpec)
    train: TrainSpec = field(default_factory=TrainSpec)
    variants: list[VariantSpec] = field(default_factory=list)
    tune: TuneSpec | None = None
    """A grid search on the validation split before the students train (needs data.validation_size)."""
    eval: EvalSpec = field(default_factory=EvalSpec)
    device: str | None = None
    """cpu (default), cuda[:N] or mps, for every stage."""
    threads: int | None = None
    """CPU threads for torch in every stage."""
    trackers: list[str] = field(default_factory=list)
    """Experiment trackers (wandb, mlflow, tensorboard: `kava distill --tracker`) every student logs to; the run
    itself logs its config, the report's figures and each variant's accuracy to a tracker run of its own."""
    tracker_project: str = "kava"
    """With trackers: the wandb project or MLflow experiment of the students and the run."""

    @property
    def root(self) -> Path:
        return Path(self.out) / self.name

    @property
    def student_tokenizer(self) -> str:
        """The tokenizer the store is cut with: a preset's (given, or trained in the data stage), else the
        pretrained student's own."""
        if self.student.trains_tokenizer or self.student.teacher_tokenizer is not None:
            return str(self.root / "data" / "student-tokenizer")  # trained in the data stage, or the teacher's copied
        return self.student.tokenizer or self.student.model

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def teacher(self, name: str) -> TeacherSpec:
        return next(t for t in self.teachers if t.name == name)

    def variant(self, name: str) -> VariantSpec:
        return next(v for v in self.variants if v.name == name)


def check_force(force: tuple[str, ...]) -> None:
    """``--force``'s stage names, checked before anything runs (`kava run --check` too)."""
    bad = [s for s in force if s not in STAGES]
    if bad:
        raise ConfigError(f"--force: expected stages from {', '.join(STAGES)}. Got {', '.join(bad)} instead.")


def digest(value: Any) -> str:
    """A short stable hash of a JSON-able value: stage outputs are reused only when their inputs hash the same."""
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:16]


# ---------------------------------------------------------------------------------------------------------------------
# YAML → dataclasses, collecting problems instead of stopping at the first


def _convert(tp: Any, value: Any, where: str, problems: list[str]) -> Any:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        return _convert(next(a for a in args if a is not type(None)), value, where, problems)
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, where, problems)
    if origin is list:
        if not isinstance(value, list):
            problems.append(f"{where}: expected a list. Got {value!r} instead.")
            return []
        return [_convert(args[0], v, f"{where}[{i}]", problems) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            problems.append(f"{where}: expected a mapping. Got {value!r} instead.")
            return {}
        return {str(k).replace("-", "_"): v for k, v in value.items()}
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is str and isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)  # YAML reads `kv_budget: 0.25` or `shard: 64` as numbers; the option takes their text
    if tp in (int, float, str, bool) and (not isinstance(value, tp) or (tp is int and isinstance(value, bool))):
        problems.append(f"{where}: expected {tp.__name__}. Got {value!r} instead.")
    return value


def _build(cls: type, data: Any, where: str, problems: list[str]) -> Any:
    if not isinstance(data, dict):
        problems.append(f"{where}: expected a mapping. Got {data!r} instead.")
        data = {}
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    data = {str(k).replace("-", "_"): v for k, v in data.items()}
    for key in sorted(set(data) - set(names)):
        problems.append(f"{where or 'config'}: unknown key {key!r}. Expected one of: {', '.join(names)}.")
    values = {}
    for f in dataclasses.fields(cls):
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        if f.name in data:
            before = len(problems)
            value = _convert(hints[f.name], data[f.name], f"{where}.{f.name}".lstrip("."), problems)
            # A badly typed value keeps the default, so the meaning checks still run and report the rest.
            if len(problems) == before or required:
                values[f.name] = value
        elif required:
            problems.append(f"{where or 'config'}: missing key {f.name!r}.")
            values[f.name] = None
    return cls(**values)


def parse_config(data: Any, *, source: str = "config") -> RunConfig:
    """A RunConfig from a YAML mapping; raises one ConfigError with every problem (types and meaning)."""
    problems: list[str] = []
    cfg = _build(RunConfig, data if data is not None else {}, "", problems)
    if not problems:
        _expand_paths(cfg)
    try:
        problems += semantic_problems(cfg)
    except (TypeError, AttributeError, ValueError):  # a required value is missing or mistyped: already reported
        if not problems:
            raise
    if problems:
        raise ConfigError.from_problems([f"{source}: {p}" for p in problems])
    return cfg


def _expand_paths(cfg: RunConfig) -> None:
    """``$VAR`` and ``${VAR}`` in the config's paths (dataset files, tokenizers, models) from the environment, so a
    config names the shared assets as ``$KAVA_ASSETS/gsm8k/train.jsonl``; an unset variable is left as written
    (the path then does not exist, and the stage that reads it says so)."""
    def expand(value: str | None) -> str | None:
        return None if value is None else os.path.expandvars(value)

    d = cfg.data
    d.dataset = expand(d.dataset) or d.dataset
    d.data_files, d.eval_files = expand(d.data_files), expand(d.eval_files)
    cfg.student.model = expand(cfg.student.model) or cfg.student.model
    cfg.student.tokenizer = expand(cfg.student.tokenizer)
    for t in cfg.teachers:
        t.model = expand(t.model)
        if t.train is not None:
            t.train.tokenizer = expand(t.train.tokenizer)


def load_config(path: str | Path | None) -> RunConfig:
    """The config at ``path`` (or a shipped config by name), or the embedded default
    (``pipelines/configs/default.yaml``) for None."""
    data, source = config_data(path)
    if is_latent_data(data):
        raise ConfigError(f"{source}: a latent-reasoning experiment (kind: latent), which only `kava run` takes. "
                          "Pass a distillation config here.")
    return parse_config(data, source=source)


def is_latent_data(data: Any) -> bool:
    """Whether a config's YAML is a latent-reasoning experiment (``kind: latent``, :mod:`.latent_run`)."""
    return isinstance(data, dict) and data.get("kind") == "latent"


def distill_configs() -> list[str]:
    """The shipped configs of distillation experiments (every one but ``kind: latent``)."""
    return [n for n in shipped_configs()
            if not is_latent_data(load_yaml((configs_dir() / f"{n}.yaml").read_text(), n))]


def config_data(path: str | Path | None) -> tuple[Any, str]:
    """The YAML of the config at ``path`` (resolved as :func:`load_config` does), and its path; `kava run` reads
    ``kind`` from it to choose the parser (``kind: latent``: :mod:`.latent_run`)."""
    path = Path(path) if path is not None else default_config_path()
    if not path.is_file() and str(path) in shipped_configs():
        path = configs_dir() / f"{path}.yaml"  # a shipped config by name: `kava run ablation`
    if not path.is_file():
        raise ConfigError(f"Config {str(path)!r} does not exist. Pass a YAML file, or none for the embedded default "
                          f"(shipped configs: {', '.join(shipped_configs())}).")
    if path.stat().st_size > MAX_CONFIG_BYTES:
        raise ConfigError(f"{path}: {path.stat().st_size:,} bytes; a config is at most {MAX_CONFIG_BYTES:,}. "
                          "Pass the experiment's YAML file.")
    return load_yaml(path.read_text(), path), str(path)


MAX_CONFIG_BYTES = 1 << 20
"""A config is a page of YAML; anything larger is not one."""


def configs_dir() -> Path:
    return Path(__file__).parent / "configs"


def default_config_path() -> Path:
    return configs_dir() / "default.yaml"


def shipped_configs() -> list[str]:
    return sorted(p.stem for p in configs_dir().glob("*.yaml"))


# ---------------------------------------------------------------------------------------------------------------------
# Meaning: what no type check catches


def semantic_problems(cfg: RunConfig) -> list[str]:
    """Every problem of a well-typed config, including those of the stage configs built from it."""
    p: list[str] = []
    d = cfg.data
    # Every name below becomes a folder under the run's own (<out>/<name>/students/<variant>/seed-N): the rule of
    # `kava extract --name`, so no name can point outside it.
    rule = "a name of letters, digits and '._+-' (at most 100, no '..', no path separators)"
    if not is_teacher_name(cfg.name):
        p.append(f"name: expected {rule}. Got {short_repr(cfg.name)} instead.")
    for kind, names in (("teachers", [t.name for t in cfg.teachers]), ("variants", [v.name for v in cfg.variants])):
        p += [f"{kind}: expected {rule}. Got {short_repr(n)} instead." for n in names if not is_teacher_name(n)]
    if not cfg.seeds or len(set(cfg.seeds)) != len(cfg.seeds):
        p.append(f"seeds: expected distinct integers, at least one. Got {short_repr(cfg.seeds)} instead.")
    bad_seeds = [s for s in cfg.seeds if not isinstance(s, int) or not 0 <= s <= MAX_SEED]
    if bad_seeds:  # the rule of `kava distill --seed`, which each student is trained with
        p.append(f"seeds: expected integers in [0, 2**32 - 1]. Got {short_repr(bad_seeds)} instead.")
    if d.dataset not in ("synthetic", "gsm8k") and not Path(d.dataset).is_file():
        p.append(f"data.dataset: expected synthetic, gsm8k or an existing JSONL/Parquet file. Got {d.dataset!r}.")
    trained = [t.name for t in cfg.teachers if t.train is not None]
    if trained and not 0 < d.teacher_fraction < 1:
        p.append(f"data.teacher_fraction: teachers {trained} are trained here, so it must be in (0, 1). "
                 f"Got {d.teacher_fraction} instead.")
    if not trained and d.teacher_fraction != 0:
        p.append(f"data.teacher_fraction: no teacher is trained here, so the whole pool trains students: set it "
                 f"to 0. Got {d.teacher_fraction} instead.")
    for key, value in (("data.pool_size", d.pool_size), ("data.eval_size", d.eval_size)):
        if value is not None and value < 1:
            p.append(f"{key}: expected a positive integer or null. Got {value} instead.")
    p += difficulty_problems("data.difficulty", d.difficulty, d.dataset)
    p += family_problems("data.families", d.families, d.dataset, d.difficulty)
    if d.dataset != "gsm8k" and d.pool_split == d.eval_split and d.dataset == "synthetic":
        p.append(f"data.eval_split: it must differ from data.pool_split ({d.pool_split!r}); evaluation data is "
                 "never trained on.")

    names = [t.name for t in cfg.teachers]
    if not names:
        p.append("teachers: expected at least one teacher.")
    if len(set(names)) != len(names):
        p.append(f"teachers: names must be distinct. Got {names}.")
    extract_fields = option_names(ExtractConfig)
    own = {"teacher", "store", "name", "dataset", "split", "limit", "data_files", "difficulty", "student_tokenizer",
           "student_layers", "student", "resume", "progress", "command"}
    for t in cfg.teachers:
        w = f"teachers[{t.name}]"
        if (t.model is None) == (t.train is None):
            p.append(f"{w}: set exactly one of model (pretrained) and train (trained here).")
        for key in sorted(set(t.extract) - extract_fields):
            p.append(f"{w}.extract: unknown option {key!r} (see `kava extract --help`).")
        _typed(ExtractConfig, t.extract, f"{w}.extract", p)
        for key in sorted(set(t.extract) & own):
            p.append(f"{w}.extract: {key!r} is set by the runner; remove it.")
        if t.train is not None and t.train.steps < 1:
            p.append(f"{w}.train.steps: expected a positive integer. Got {t.train.steps}.")
        if t.train is not None:
            p += _train_template_problems(t.train, f"{w}.train")
        if t.train is not None and t.train.family is not None and t.train.family not in d.families:
            p.append(f"{w}.train.family: {t.train.family!r} is not a family of data.families. Families: "
                     f"{', '.join(d.families) or 'none (set data.families)'}.")
        who = {"student_layers": cfg.student.layers} if cfg.student.is_preset else {"student": cfg.student.model}
        try:  # the known options, by extraction's own rules
            ExtractConfig.from_dict({"teacher": "t", "store": "s", **who,
                                     **{k: v for k, v in t.extract.items() if k in extract_fields - own}}).validate()
        except ConfigError as e:
            p.append(f"{w}.extract: {e}")

    distill_fields = option_names(DistillConfig)
    for key in sorted(set(cfg.train.distill) - distill_fields):
        p.append(f"train.distill: unknown option {key!r} (see `kava distill --help`).")
    _typed(DistillConfig, cfg.train.distill, "train.distill", p)
    for key in sorted(set(cfg.train.distill) & set(COMPUTE_FIELDS + RUNNER_FIELDS)):
        p.append(f"train.distill: {key!r} is set by train.{key} or the runner; remove it.")
    vnames = [v.name for v in cfg.variants]
    if not vnames:
        p.append("variants: expected at least the baseline variant.")
    if len(set(vnames)) != len(vnames):
        p.append(f"variants: names must be distinct. Got {vnames}.")
    if vnames and cfg.baseline not in vnames:
        p.append(f"baseline: {cfg.baseline!r} is not a variant. Variants: {', '.join(vnames)}.")
    p += contrast_problems(cfg.contrasts, vnames)
    shared = cfg.student.teacher_tokenizer
    if shared is not None and shared not in trained:
        p.append(f"student.tokenizer: teacher:{shared} names no teacher trained here. Teachers trained here: "
                 f"{', '.join(trained) or 'none'}.")
    p += tune_problems(cfg, distill_fields)
    p += [f"trackers: expected names from {', '.join(TRACKERS)}. Got {short_repr(t)} instead."
          for t in cfg.trackers if t not in TRACKERS]
    p += budget_problems(cfg)
    for v in cfg.variants:
        w = f"variants[{v.name}]"
        for key in sorted(set(v.distill) - distill_fields):
            p.append(f"{w}.distill: unknown option {key!r} (see `kava distill --help`).")
        _typed(DistillConfig, v.distill, f"{w}.distill", p)
        for key in sorted(set(v.distill) & set(COMPUTE_FIELDS)):
            p.append(f"{w}.distill: {key!r} sets compute, which every variant shares for a fair comparison; "
                     f"set it once in train.{key}.")
        for key in sorted(set(v.distill) & set(RUNNER_FIELDS)):
            p.append(f"{w}.distill: {key!r} is set by the runner; remove it.")
        unknown = [t for t in v.teachers if t not in names]
        if unknown:
            p.append(f"{w}.teachers: no teacher {unknown}. Teachers: {', '.join(names) or 'none'}.")
        if not v.distill.keys() - distill_fields:
            try:
                stage_distill_config(cfg, v, seed=0, store="s", out="o").validate()
            except ConfigError as e:
                p.append(f"{w}: {e}")
    return p


def _train_template_problems(t: TeacherTrainSpec, where: str) -> list[str]:
    """What is wrong with a trained teacher's template options."""
    p: list[str] = []
    chat = t.template == TOKENIZER_CHAT
    if chat and t.tokenizer is None:
        p.append(f"{where}.template: {TOKENIZER_CHAT} needs {where}.tokenizer, one with a chat template (a BPE "
                 "trained here has none).")
    if not chat:
        try:
            check_template_name(t.template, flag=f"{where}.template")
        except ConfigError as e:
            p.append(str(e))
    if t.system_prompt is not None and not chat:
        p.append(f"{where}.system_prompt is for template {TOKENIZER_CHAT}. Got template {t.template!r}: drop it.")
    return p


def tune_problems(cfg: RunConfig, distill_fields: set[str]) -> list[str]:
    """What is wrong with ``tune:`` (nothing when there is none)."""
    t, p = cfg.tune, []
    if t is None:
        if cfg.data.validation_size:
            p.append("data.validation_size: set, but there is no tune: section to read the validation split.")
        return p
    vnames = [v.name for v in cfg.variants]
    if t.variant not in vnames:
        p.append(f"tune.variant: {t.variant!r} is not a variant. Variants: {', '.join(vnames)}.")
    for name in t.apply_to:
        if name not in vnames:
            p.append(f"tune.apply_to: {name!r} is not a variant. Variants: {', '.join(vnames)}.")
    if not t.grid:
        p.append("tune.grid: expected at least one option with the values to try.")
    for key, values in t.grid.items():
        if key not in distill_fields:
            p.append(f"tune.grid: unknown option {key!r} (see `kava distill --help`).")
        elif key in COMPUTE_FIELDS or key in RUNNER_FIELDS:
            p.append(f"tune.grid: {key!r} is compute or set by the runner; tune the objective's options only.")
        if not isinstance(values, list) or not values:
            p.append(f"tune.grid.{key}: expected a non-empty list of values. Got {values!r} instead.")
    if t.metric not in ("accuracy", "nll"):
        p.append(f"tune.metric: expected accuracy or nll. Got {t.metric!r} instead.")
    if t.seed is not None and not 0 <= t.seed <= MAX_SEED:
        p.append(f"tune.seed: expected an integer in [0, 2**32 - 1]. Got {short_repr(t.seed)} instead.")
    if cfg.data.validation_size < 1:
        p.append("data.validation_size: tune: needs validation rows carved from the student share; set it (e.g. "
                 "100). The eval split is never used to choose a setting.")
    if t.steps is not None and t.steps < 1:
        p.append(f"tune.steps: expected a positive integer. Got {t.steps} instead.")
    if not p and t.variant in vnames:
        for point in tune_points(t):
            variant = cfg.variant(t.variant)
            trial = dataclasses.replace(variant, distill={**variant.distill, **point})
            try:
                stage_distill_config(cfg, trial, seed=0, store="s", out="o").validate()
            except ConfigError as e:
                p.append(f"tune.grid point {point}: {e}")
                break
    return p


def tune_points(t: TuneSpec) -> list[dict[str, Any]]:
    """Every combination of the grid's values, in the grid's key order (the first key varies slowest)."""
    points: list[dict[str, Any]] = [{}]
    for key, values in t.grid.items():
        points = [{**point, key: value} for point in points for value in (values if isinstance(values, list) else [])]
    return points


def budget_problems(cfg: RunConfig) -> list[str]:
    """``eval.budgets`` must name steps that a checkpoint is kept at (or the last step)."""
    budgets, p = cfg.eval.budgets, []
    if not budgets:
        return p
    steps = cfg.train.steps
    every = cfg.train.distill.get("checkpoint_every", 100)
    keep = cfg.train.distill.get("keep_checkpoints", 2)
    bad = [b for b in budgets if not isinstance(b, int) or b < 1 or b > steps
           or (b != steps and (not every or b % every))]
    if bad:
        p.append(f"eval.budgets: {bad} are not checkpoint steps. Expected steps up to train.steps ({steps}) that are "
                 f"multiples of train.distill.checkpoint_every ({every}), or train.steps itself.")
    if isinstance(every, int) and every > 0 and isinstance(keep, int) and keep < steps // every:
        p.append(f"eval.budgets: train.distill.keep_checkpoints {keep} drops early checkpoints before they are "
                 f"evaluated; keep at least {steps // every}.")
    if cfg.eval.checkpoint_rows < 1:
        p.append("eval.budgets: the budgets are evaluated on the first eval.checkpoint_rows rows; set it (e.g. to "
                 "data.eval_size).")
    return p


def _typed(cls: type, options: dict[str, Any], where: str, problems: list[str]) -> None:
    """Type-check a stage's options against its config's fields (values of the wrong type are dropped). List and
    mapping options are left to the config, which parses them from a YAML list or a flag's text ('0,2,3')."""
    hints = {c.name: c.hint for c in config_fields(cls)
             if typing.get_origin(_optional(c.hint)) not in (list, dict)}
    for key in [k for k in options if k in hints]:
        before = len(problems)
        options[key] = _convert(hints[key], options[key], f"{where}.{key}", problems)
        if len(problems) > before:
            del options[key]


def _optional(tp: Any) -> Any:
    """``X`` of ``X | None``."""
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    return args[0] if typing.get_origin(tp) in (typing.Union, types.UnionType) and len(args) == 1 else tp


def stage_distill_config(cfg: RunConfig, variant: VariantSpec, *, seed: int, store: str, out: str) -> DistillConfig:
    """The DistillConfig one (variant, seed) trains with: shared compute and options, then the variant's own."""
    t = cfg.train
    options: dict[str, Any] = {k: v for k, v in {**t.distill, **variant.distill}.items()
                               if k not in COMPUTE_FIELDS + RUNNER_FIELDS}  # refused by semantic_problems
    if not variant.teachers:
        options["kv_weight"] = 0.0  # CE only, on the same store grid: same tokens, same batches
    elif cfg.data.families:  # each sample's family: oracle and rl routing read it, and the metrics log its routes
        options["sample_families"] = str(cfg.root / "data" / FAMILIES_FILE)
        trained_on = {t.train.family: t.name for t in cfg.teachers
                      if t.train is not None and t.train.family is not None and t.name in variant.teachers}
        if trained_on and options.get("fusion") == "oracle" and "family_teachers" not in options:
            options["family_teachers"] = [f"{f}={t}" for f, t in trained_on.items()]
    return DistillConfig.from_dict(dict(
        student=cfg.student.model, out=out, store=store, seed=seed,
        teachers=list(variant.teachers) or None, steps=t.steps, batch_size=t.batch_size,
        grad_accum=t.grad_accum, max_length=t.max_length, device=cfg.device, threads=cfg.threads,
        progress=False, **_tracker_options(cfg, out), **options,
    ))


def _tracker_options(cfg: RunConfig, out: str) -> dict[str, Any]:
    """With ``trackers:``, a student's --tracker options: the run's trackers and project, and a run name that says
    which run, variant and seed it is (``tiny/kv/seed-1``)."""
    if not cfg.trackers:
        return {}
    where = Path(out)
    name = "/".join(part for part in (cfg.name, where.parent.name, where.name) if part)
    return {"tracker": list(cfg.trackers), "tracker_project": cfg.tracker_project, "tracker_name": name}


def stage_extract_config(cfg: RunConfig, teacher: TeacherSpec, *, model: str | None = None,
                         resume: bool = False) -> ExtractConfig:
    """The ExtractConfig `kava run` extracts ``teacher`` with: into ``<root>/kv.zarr``, over the student-train split
    file, on the student's tokenizer grid and layer count, then the teacher's own ``extract:`` options.

    ``model`` is the teacher to load (default: its ``model:``); a teacher trained here passes its trained directory.
    """
    model = model if model is not None else teacher.model
    if model is None:
        raise ConfigError(f"teachers[{teacher.name}] is trained by `kava run` (train:): pass its trained model "
                          "directory to extract it.")
    root, preset = cfg.root, cfg.student.is_preset
    return ExtractConfig.from_dict(dict(
        teacher=model, store=str(root / "kv.zarr"), name=teacher.name,
        dataset=str(splits.split_path(root, "student-train")), split=splits.FILE_SPLIT["student-train"],
        student_tokenizer=cfg.student_tokenizer, student_layers=cfg.student.layers if preset else None,
        student=None if preset else cfg.student.model, device=cfg.device, threads=cfg.threads, progress=False,
        resume=resume, **teacher.extract,
    ))
