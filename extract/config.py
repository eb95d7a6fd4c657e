"""`kava extract` options as one typed dataclass; click flags and YAML keys load into the same fields.

A command's config composes small groups (``data: DataSource``, the rows it reads) instead of repeating their fields;
flags, YAML keys and ``to_dict()`` stay flat (``--dataset``, ``dataset:``), one name per field, with the group
resolved by :func:`config_fields`. List options are typed lists, parsed once in ``__post_init__`` from whatever the
flag or YAML gave (``'0,5,9'`` or ``[0, 5, 9]``). Every cross-field rule lives in ``validate()``, which reports all
problems at once in the flags' own spelling before any model loads or file is written.

Scale-out options (``--cluster``, ``--scheduler``, ``--slurm-*``) are not extraction's: ``pipelines/cluster_config.py``
holds them, and only the cluster launcher reads them.
"""

from __future__ import annotations

import dataclasses
import re
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar, TypeVar

from kava.core.errors import ConfigError
from kava.kvstore.manifest import KV_DTYPES, check_teacher_name

from .data import DataSource

_SHARD = re.compile(r"^(\d+)/(\d+)$")
T = TypeVar("T")


# ---------------------------------------------------------------------------------------------------------------------
# The flat view of a config: one name per field, groups resolved


@dataclass(frozen=True)
class ConfigField:
    """One option of a config: a field of the config itself, or of one of its groups (``group`` names the field
    holding it)."""

    name: str
    """The option's name: the field's, as flags (``--data-files``) and YAML keys (``data_files``) spell it."""
    group: str | None
    hint: Any
    """The field's resolved type annotation."""
    default: Any
    """Its default in this config (a group's default instance decides it), or ``dataclasses.MISSING``."""
    owner: type
    """The dataclass that declares it (its attribute docstring is the help text)."""
    help_prefix: str | None = None
    """Set on a group field with ``metadata={"help_prefix": ...}`` (e.g. "Without --store")."""

    @property
    def required(self) -> bool:
        return self.default is dataclasses.MISSING

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


def config_fields(cls: type) -> list[ConfigField]:
    """Every option of ``cls`` in declaration order, a group's fields where the group sits."""
    hints = typing.get_type_hints(cls)
    out: list[ConfigField] = []
    for f in fields(cls):
        hint = hints[f.name]
        if not (isinstance(hint, type) and dataclasses.is_dataclass(hint)):
            out.append(ConfigField(f.name, None, hint, _default(f), cls))
            continue
        inner, inner_hints = _default(f), typing.get_type_hints(hint)
        for g in fields(hint):
            default = dataclasses.MISSING if inner is dataclasses.MISSING else getattr(inner, g.name)
            out.append(ConfigField(g.name, f.name, inner_hints[g.name], default, hint, f.metadata.get("help_prefix")))
    names = [c.name for c in out]
    assert len(set(names)) == len(names), f"{cls.__name__}: a group field shadows another option"
    return out


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """The flat mapping of option names to values (what ``config.yaml`` holds and ``--config`` reads back)."""
    return {c.name: getattr(getattr(cfg, c.group) if c.group else cfg, c.name) for c in config_fields(type(cfg))}


def option_names(cls: type) -> set[str]:
    """Every name ``config_from_dict`` accepts for ``cls``: its options and their old spellings (``ALIASES``)."""
    return {c.name for c in config_fields(cls)} | set(getattr(cls, "ALIASES", {}))


def canonical_names(cls: type, data: Mapping[str, Any], problems: list[str]) -> dict[str, Any]:
    """``data`` with ``_`` for ``-`` and every old spelling (``cls.ALIASES``) under its option's name; both names at
    once is a problem appended to ``problems``."""
    out = {str(k).replace("-", "_"): v for k, v in data.items()}
    for old, new in getattr(cls, "ALIASES", {}).items():
        if old in out:
            if new in out:
                problems.append(f"Can't set both --{old.replace('_', '-')} and --{new.replace('_', '-')} (the old "
                                f"and the new name of one option). Keep --{new.replace('_', '-')}.")
            out[new] = out.pop(old)
    return out


def config_from_dict(cls: type, data: Mapping[str, Any], *, source: str = "--config") -> Any:
    """``cls`` from flat option names (``-`` or ``_``), old spellings included; the groups are built from their own
    defaults in ``cls``. Raises one ConfigError naming every missing or unknown option (``source`` says where they
    came from)."""
    problems: list[str] = []
    data = canonical_names(cls, data, problems)
    options = config_fields(cls)
    missing = [c.flag for c in options if c.required and c.name not in data]
    unknown = sorted(set(data) - {c.name for c in options})
    problems += [f"Missing option {m}." for m in missing] + [f"Unknown option {u!r} in {source}." for u in unknown]
    if problems:
        raise ConfigError(" ".join(problems))
    top: dict[str, Any] = {}
    grouped: dict[str, dict[str, Any]] = {}
    for c in options:
        if c.name in data:
            (grouped.setdefault(c.group, {}) if c.group else top)[c.name] = data[c.name]
    for f in fields(cls):
        if f.name in grouped:
            base = _default(f)
            top[f.name] = dataclasses.replace(base, **grouped[f.name])
    return cls(**top)


# ---------------------------------------------------------------------------------------------------------------------
# List options: parsed once, from a flag's text or a YAML value


def parse_list(value: Any, item: Callable[[Any], T], flag: str, example: str, problems: list[str]) -> list[T] | None:
    """``value`` as a list: None stays None; ``'0,2,3'`` (a flag), ``[0, 2, 3]`` or ``5`` (YAML) become lists of
    ``item(x)``. On a bad entry it appends "<flag>: expected <example>. Got ... instead." to ``problems`` and
    returns None, so ``validate()`` reports it with everything else."""
    if value is None:
        return None
    if isinstance(value, str):
        parts: list[Any] = [p.strip() for p in value.split(",") if p.strip()]
    elif isinstance(value, (list, tuple)):
        parts = list(value)
    else:
        parts = [value]
    try:
        return [item(p) for p in parts]
    except (TypeError, ValueError):
        problems.append(f"{flag}: expected {example}. Got {value!r} instead.")
        return None


def as_int(x: Any) -> int:
    """An integer from a flag's text or a YAML integer (never a bool or a fractional number)."""
    if isinstance(x, bool) or not isinstance(x, (int, str)):
        raise TypeError(x)
    return int(x)


def as_float(x: Any) -> float:
    if isinstance(x, bool) or not isinstance(x, (int, float, str)):
        raise TypeError(x)
    return float(x)


def as_name(x: Any) -> str:
    if not isinstance(x, str) or not x.strip():
        raise TypeError(x)
    return x.strip()


def format_list(values: list[Any] | None) -> str:
    """A list option as its flag spells it: ``[0, 2]`` → ``'0,2'``."""
    return ",".join(str(v) for v in values or [])


# ---------------------------------------------------------------------------------------------------------------------
# kava extract


@dataclass
class ExtractConfig:
    """Run one teacher once over a dataset and write its aligned K/V into a store."""

    teacher: str
    """Preset name (see --list-teachers), local model directory, or hub id."""
    store: str
    """The store directory (created on first use)."""
    name: str | None = None
    """The teacher's name inside the store (default: preset or directory name, plus the template when not plain)."""
    data: DataSource = field(default_factory=DataSource)
    """The rows: --dataset, --split, --limit, --data-files, --data-seed, ..."""
    student_template: str = "plain"
    """Template of the student's text (plain, chat, cot or a file): the grid every teacher lines up with, fixed when
    the store is created."""
    prompt_template: str | None = None
    """Template the teacher reads (default: the student's). The same model under another template is another
    teacher ("dual prompt"); its rows are mapped onto the student's text piece by piece."""
    student_tokenizer: str | None = None
    """Tokenizer of the student (name or path); default: the teacher's own."""
    student: str | None = None
    """Student model (path or id), needed for --layer-map cka (teacher×student CKA) and its layer count."""
    student_layers: int | None = None
    """Number of student layers for the layer map, when no --student is given (default: the teacher's)."""
    load_in_4bit: bool = False
    """Load the teacher in bitsandbytes nf4."""
    load_in_8bit: bool = False
    """Load the teacher in bitsandbytes int8."""
    dtype: str | None = None
    """Teacher compute dtype (float32, bfloat16, float16, auto)."""
    device: str | None = None
    """cpu (default) or cuda[:N]."""
    revision: str | None = None
    """Hub revision of the teacher."""
    trust_remote_code: bool = False
    """Allow modelling code shipped with the checkpoint."""
    with_q: bool = False
    """Also store queries."""
    q_layers: list[int] | None = None
    """Teacher layers whose queries are stored, e.g. '0,5,9' (default with --with-q: the stored K/V layers)."""
    logit_top_k: int = 0
    """Also store the teacher's top-K next-token log-probabilities per student token, for logit distillation
    (K ids and log-probabilities: 6 x K bytes per token); 0 stores none."""
    k_rope: str = "pre"
    """Store keys before RoPE (pre, default) or as the cache holds them (post)."""
    layer_map: str = "proportional"
    """proportional, cka, or an explicit list of teacher layers per student layer ('0,4,8' or '0:0.5+1:0.5,...')."""
    cka_top_k: int = 2
    """With --layer-map cka: teacher layers per student layer."""
    calibration_samples: int = 32
    """Samples used for the stored CKA matrices (at least 4; 0 skips them, except with --layer-map cka)."""
    alignment: str = "soft"
    """Tokenizer alignment: soft (IoU weights over overlapping teacher tokens) or hard (the best one)."""
    kv_dtype: str = "float16"
    """Storage dtype: float16, bfloat16, float32, int8 (lossy, ~0.5% error), int4 or int2 (packed groups; lossy,
    cosine to the teacher's K/V >= 0.995 and 0.90-0.99)."""
    compress: bool = True
    """Compress chunks (blosc zstd); off stores raw bytes plus checksums."""
    max_length: int = 1024
    """Longest student sequence; longer samples are cut at a segment boundary or skipped (--on-too-long)."""
    on_too_long: str = "truncate"
    """truncate (at a segment boundary, recorded) or skip (recorded)."""
    on_nonfinite: str = "quarantine"
    """A teacher output with NaN/Inf: quarantine the sample (recorded, run goes on) or error."""
    batch_size: int = 8
    """Samples per teacher forward pass."""
    shard_tokens: int = 32768
    """Target student tokens per shard (fixed when the store is created)."""
    resume: bool = False
    """Keep complete shards of this teacher and redo the rest."""
    shard: str | None = None
    """Extract only shards s with s % n == i, written 'i/n' (job arrays)."""
    teacher_generates: bool = False
    """The teacher writes its own chain of thought greedily first; its K/V are time-warped onto the student text."""
    max_new_tokens: int = 256
    """Generation budget with --teacher-generates."""
    progress: bool = True
    """Show a progress bar on stderr."""
    threads: int | None = None
    """CPU threads for torch (default: torch's choice; on a cluster, each worker's share of its cores)."""
    command: str = ""
    """The command line, recorded in the store."""
    extra: dict[str, Any] = field(default_factory=dict)
    """Free-form details recorded with the teacher."""

    ALIASES: ClassVar[dict[str, str]] = {"seed": "data_seed"}
    """Old spellings still accepted (flag and YAML key): ``--seed`` was the synthetic dataset's seed."""

    def __post_init__(self) -> None:
        self._parse_problems: list[str] = []
        self.q_layers = parse_list(self.q_layers, as_int, "--q-layers", "comma-separated layer numbers",
                                   self._parse_problems)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ExtractConfig:
        """From flat option names, as flags, YAML and ``to_dict()`` spell them."""
        return config_from_dict(cls, data)

    def to_dict(self) -> dict[str, Any]:
        return config_to_dict(self)

    @property
    def teacher_template(self) -> str:
        return self.prompt_template or self.student_template

    @property
    def shard_slice(self) -> tuple[int, int] | None:
        if self.shard is None:
            return None
        m = _SHARD.match(self.shard)
        assert m is not None  # validate() guarantees it
        return int(m.group(1)), int(m.group(2))

    def validate(self) -> None:
        """Raise one ConfigError listing every problem, in the flags' spelling."""
        p: list[str] = list(self._parse_problems)
        if self.load_in_4bit and self.load_in_8bit:
            p.append("Can't set both --load-in-4bit and --load-in-8bit. Choose one.")
        if self.kv_dtype not in KV_DTYPES:
            p.append(f"--kv-dtype: expected one of {', '.join(KV_DTYPES)}. Got {self.kv_dtype!r} instead.")
        if self.k_rope not in ("pre", "post"):
            p.append(f"--k-rope: expected pre or post. Got {self.k_rope!r} instead.")
        if self.alignment not in ("soft", "hard"):
            p.append(f"--alignment: expected soft or hard. Got {self.alignment!r} instead.")
        if self.on_too_long not in ("truncate", "skip"):
            p.append(f"--on-too-long: expected truncate or skip. Got {self.on_too_long!r} instead.")
        if self.on_nonfinite not in ("quarantine", "error"):
            p.append(f"--on-nonfinite: expected quarantine or error. Got {self.on_nonfinite!r} instead.")
        for flag, value, low in (("--batch-size", self.batch_size, 1), ("--max-length", self.max_length, 2),
                                 ("--shard-tokens", self.shard_tokens, 1), ("--cka-top-k", self.cka_top_k, 1),
                                 ("--calibration-samples", self.calibration_samples, 0),
                                 ("--max-new-tokens", self.max_new_tokens, 1),
                                 ("--logit-top-k", self.logit_top_k, 0)):
            if not isinstance(value, int) or value < low:
                p.append(f"{flag}: expected an integer >= {low}. Got {value!r} instead.")
        if self.threads is not None and self.threads < 1:
            p.append(f"--threads: expected a positive integer. Got {self.threads!r} instead.")
        p += self.data.problems()
        if self.student_layers is not None and self.student_layers < 1:
            p.append(f"--student-layers: expected a positive integer. Got {self.student_layers!r} instead.")
        if self.student_layers is not None and self.student is not None:
            p.append("Can't set both --student and --student-layers (the student's config has its layer count). "
                     "Choose one.")
        if 0 < self.calibration_samples < 4:
            p.append(f"--calibration-samples: expected 0 (no CKA) or at least 4 (the unbiased estimator needs 4). "
                     f"Got {self.calibration_samples} instead.")
        if self.layer_map == "cka" and self.calibration_samples == 0:
            p.append("--layer-map cka needs CKA: --calibration-samples must be at least 4.")
        if self.layer_map == "cka" and self.student is None:
            p.append("--layer-map cka needs --student (CKA compares teacher and student layers).")
        if self.q_layers is not None and not self.with_q:
            p.append("--q-layers needs --with-q.")
        if self.shard is not None:
            m = _SHARD.match(self.shard)
            if not m or not int(m.group(2)) >= 1 or not 0 <= int(m.group(1)) < int(m.group(2)):
                p.append(f"--shard: expected 'i/n' with 0 <= i < n. Got {self.shard!r} instead.")
        if self.name is not None:
            try:
                check_teacher_name(self.name)
            except ConfigError as e:
                p.append(f"--name: {e}")
        if not self.store:
            p.append("--store: expected a directory path. Got nothing.")
        if p:
            raise ConfigError.from_problems(p)
