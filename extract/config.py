"""`kava extract` options as one typed dataclass of small groups; click flags and YAML keys load into the same fields.

The config composes groups (``data: DataSource``, the rows it reads; ``grid``, the student's side; ``loading``,
``capture``, ``mapping``, ``writing``, ``generation``) instead of listing 39 options flat; flags, YAML keys and
``to_dict()`` stay flat (``--dataset``, ``dataset:``), one name per option, with the group resolved by
:func:`kava.core.config.config_fields`. List options are typed lists, parsed once in ``__post_init__`` from whatever
the flag or YAML gave (``'0,5,9'`` or ``[0, 5, 9]``). Every cross-field rule lives in ``validate()``, which reports
all problems at once in the flags' own spelling before any model loads or file is written.

Scale-out options (``--cluster``, ``--scheduler``, ``--slurm-*``) are not extraction's: ``pipelines/cluster_config.py``
holds them, and only the cluster launcher reads them.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

from kava.core.config import as_int, config_from_dict, config_to_dict, flat_options, parse_list
from kava.core.data import DataSource
from kava.core.errors import ConfigError
from kava.extract.templates import TOKENIZER_CHAT, PromptTemplate, is_tokenizer_template, load_template
from kava.kvstore.manifest import EVICTION_RULES, KV_DTYPES, SEGMENT_NAMES, EvictionSpec, check_teacher_name

_SHARD = re.compile(r"^(\d+)/(\d+)$")


# ---------------------------------------------------------------------------------------------------------------------
# The groups, in the order their options appear in `kava extract --help` and config.yaml


@dataclass
class GridOptions:
    """The student's side: the text and tokenizer every teacher lines up with, and the layers it maps onto."""

    student_template: str = "plain"
    """Template of the student's text (plain, chat, cot, chat:tokenizer for the student tokenizer's own chat
    template, or a file): the grid every teacher lines up with, fixed when the store is created."""
    prompt_template: str | None = None
    """Template the teacher reads (default: the student's; chat:tokenizer is the teacher tokenizer's chat template).
    The same model under another template is another teacher ("dual prompt"); its rows are mapped onto the
    student's text piece by piece."""
    system_prompt: str | None = None
    """System message for the chat:tokenizer templates (student's and teacher's); default: the chat template's own."""
    student_tokenizer: str | None = None
    """Tokenizer of the student (name or path); default: the teacher's own."""
    student: str | None = None
    """Student model (path or id), needed for --layer-map cka (teacher×student CKA) and its layer count."""
    student_layers: int | None = None
    """Number of student layers for the layer map, when no --student is given (default: the teacher's)."""


@dataclass
class TeacherLoading:
    """How the teacher model is loaded, and where it runs."""

    load_in_4bit: bool = False
    """Load the teacher in bitsandbytes nf4."""
    load_in_8bit: bool = False
    """Load the teacher in bitsandbytes int8."""
    dtype: str | None = None
    """Teacher compute dtype (float32, bfloat16, float16, auto)."""
    device: str | None = None
    """cpu (default) or cuda[:N]."""
    device_map: str | None = None
    """Spread the teacher's layers over devices: auto, balanced, balanced_low_0, sequential (GPUs, then CPU, then
    disk) or a JSON object of module names to devices; the store is the same as on one device."""
    max_memory: str | None = None
    """With --device-map: the most each device may hold, e.g. '0=70GiB,1=70GiB,cpu=200GiB'."""
    revision: str | None = None
    """Hub revision of the teacher."""
    trust_remote_code: bool = False
    """Allow modelling code shipped with the checkpoint."""


@dataclass
class CaptureOptions:
    """What is taken from the teacher's forward pass besides K/V."""

    with_q: bool = False
    """Also store queries."""
    q_layers: list[int] | None = None
    """Teacher layers whose queries are stored, e.g. '0,5,9' (default with --with-q: the stored K/V layers)."""
    logit_top_k: int = 0
    """Also store the teacher's top-K next-token log-probabilities per student token, for logit distillation
    (K ids and log-probabilities: 6 x K bytes per token); 0 stores none."""
    k_rope: str = "pre"
    """Store keys before RoPE (pre, default) or as the cache holds them (post)."""

    def __post_init__(self) -> None:
        self._parse_problems: list[str] = []
        self.q_layers = parse_list(self.q_layers, as_int, "--q-layers", "comma-separated layer numbers",
                                   self._parse_problems)


@dataclass
class MappingOptions:
    """How the teacher's layers and tokens map onto the student's."""

    layer_map: str = "proportional"
    """proportional, cka, or an explicit list of teacher layers per student layer ('0,4,8' or '0:0.5+1:0.5,...')."""
    cka_top_k: int = 2
    """With --layer-map cka: teacher layers per student layer."""
    calibration_samples: int = 32
    """Samples used for the stored CKA matrices (at least 4; 0 skips them, except with --layer-map cka)."""
    alignment: str = "soft"
    """Tokenizer alignment: soft (IoU weights over overlapping teacher tokens) or hard (the best one)."""


@dataclass
class WriteOptions:
    """How rows are written: their encoding, the length and non-finite policies, batches and shards."""

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


@dataclass
class EvictionOptions:
    """A compressed teacher: keep only some rows of a segment per layer and KV head (format version 4)."""

    kv_budget: str | None = None
    """Rows kept of each sample's --evict-segments rows, per layer and KV head: a fraction ('0.1': 10%, rounded up)
    or a count ('64'); the rest of the sample is kept whole. Default: keep every row."""
    evict: str = "r-kv"
    """With --kv-budget, which rows: r-kv (attention from the answer plus novelty, as the KaVa paper), attention
    (H2O/SnapKV), streaming (the first 4 and the most recent), or random (the control)."""
    evict_segments: list[str] | None = None
    """Segments the budget applies to, e.g. 'reasoning' (default) or 'reasoning,answer'."""
    prefill_chunk: int | None = None
    """With --kv-budget as a count M: run the teacher over each sample this many tokens at a time, every layer's cache
    cut to M rows of --evict-segments after each chunk, so samples longer than one forward pass fits extract in
    bounded memory (one sample at a time). Default: one full pass per batch."""

    def __post_init__(self) -> None:
        self._parse_problems: list[str] = []
        self.evict_segments = parse_list(self.evict_segments, str, "--evict-segments", "comma-separated segment names",
                                         self._parse_problems)

    def _budget(self) -> int | float | None:
        """--kv-budget as a count (digits only) or a fraction; None when it is neither."""
        text = str(self.kv_budget).strip()
        try:
            budget: int | float = int(text) if re.fullmatch(r"\d+", text) else float(text)
        except ValueError:
            return None
        ok = (isinstance(budget, int) and budget >= 1) or (isinstance(budget, float) and 0 < budget <= 1)
        return budget if ok else None

    def problems(self) -> list[str]:
        """Every problem with these options, in the flags' spelling."""
        p = list(self._parse_problems) + self._prefill_problems()
        if self.kv_budget is None:
            return p
        if self._budget() is None:
            p.append(f"--kv-budget: expected a fraction in (0, 1] ('0.1') or a count >= 1 ('64'). Got "
                     f"{self.kv_budget!r} instead.")
        if self.evict not in EVICTION_RULES:
            p.append(f"--evict: expected one of {', '.join(EVICTION_RULES)}. Got {self.evict!r} instead.")
        segments = self.evict_segments or ["reasoning"]
        if any(s not in SEGMENT_NAMES for s in segments) or len(set(segments)) != len(segments):
            p.append(f"--evict-segments: expected distinct names of {', '.join(SEGMENT_NAMES)}. Got "
                     f"{','.join(segments)!r} instead.")
        return p

    def _prefill_problems(self) -> list[str]:
        chunk = self.prefill_chunk
        if chunk is None:
            return []
        p = []
        if not isinstance(chunk, int) or isinstance(chunk, bool) or chunk < 1:
            p.append(f"--prefill-chunk: expected an integer >= 1 (tokens per forward pass). Got {chunk!r} instead.")
        if self.kv_budget is None:
            p.append("--prefill-chunk needs --kv-budget as a count of rows ('--kv-budget 512'): the cache is cut to "
                     "that many rows after each chunk. Add --kv-budget, or drop --prefill-chunk.")
        elif isinstance(self._budget(), float):
            p.append(f"--prefill-chunk needs --kv-budget as a count of rows ('512'), not a fraction: a share of a "
                     f"sample's rows is unknown until its last chunk. Got {self.kv_budget!r} instead.")
        if "special" in (self.evict_segments or ()):
            p.append("--prefill-chunk with --evict-segments special: the end-of-sequence token the grid appends is "
                     "read by no teacher, so a chunked pass cannot score it. Evict prompt, reasoning or answer rows.")
        return p

    def eviction(self) -> EvictionSpec | None:
        """The store's record of these options (None without --kv-budget); a ConfigError naming every bad flag."""
        if self.kv_budget is None:
            return None
        if problems := self.problems():
            raise ConfigError.from_problems(problems)
        budget = self._budget()
        assert budget is not None  # problems() refused anything else
        return EvictionSpec(rule=self.evict, budget=budget, segments=tuple(self.evict_segments or ("reasoning",)))


@dataclass
class GenerationOptions:
    """With --teacher-generates: the teacher writes the text it is extracted on."""

    teacher_generates: bool = False
    """The teacher writes its own chain of thought greedily first; its K/V are time-warped onto the student text."""
    max_new_tokens: int = 256
    """Generation budget with --teacher-generates."""


# ---------------------------------------------------------------------------------------------------------------------
# kava extract


@flat_options
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
    grid: GridOptions = field(default_factory=GridOptions)
    """The student's side: --student-template, --prompt-template, --student-tokenizer, --student, --student-layers."""
    loading: TeacherLoading = field(default_factory=TeacherLoading)
    """The teacher model: --load-in-4bit, --load-in-8bit, --dtype, --device, --revision, --trust-remote-code."""
    capture: CaptureOptions = field(default_factory=CaptureOptions)
    """What is stored besides K/V: --with-q, --q-layers, --logit-top-k, --k-rope."""
    mapping: MappingOptions = field(default_factory=MappingOptions)
    """Layers and tokens: --layer-map, --cka-top-k, --calibration-samples, --alignment."""
    writing: WriteOptions = field(default_factory=WriteOptions)
    """--kv-dtype, --compress, --max-length, --on-too-long, --on-nonfinite, --batch-size, --shard-tokens."""
    evicting: EvictionOptions = field(default_factory=EvictionOptions)
    """A compressed teacher: --kv-budget, --evict, --evict-segments, --prefill-chunk."""
    resume: bool = False
    """Keep complete shards of this teacher and redo the rest."""
    shard: str | None = None
    """Extract only shards s with s % n == i, written 'i/n' (job arrays)."""
    generation: GenerationOptions = field(default_factory=GenerationOptions)
    """--teacher-generates, --max-new-tokens."""
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

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ExtractConfig:
        """From flat option names, as flags, YAML and ``to_dict()`` spell them."""
        return config_from_dict(cls, data)

    def to_dict(self) -> dict[str, Any]:
        return config_to_dict(self)

    @property
    def teacher_template(self) -> str:
        return self.prompt_template or self.student_template

    def resolve_templates(self, student_tokenizer: Any, teacher_tokenizer: Any) -> tuple[PromptTemplate,
                                                                                        PromptTemplate]:
        """(the student's template, the teacher's): by name or file, a ``chat:tokenizer`` one from the student's
        or the teacher's tokenizer respectively, with --system-prompt."""
        def resolve(name: str, tokenizer: Any, flag: str, who: str) -> PromptTemplate:
            chat = is_tokenizer_template(name)
            return load_template(name, tokenizer=tokenizer, system_prompt=self.system_prompt if chat else None,
                                 flag=flag, who=who)

        student = resolve(self.student_template, student_tokenizer, "--student-template",
                          f"the student tokenizer ({self.student_tokenizer or self.teacher})")
        if self.prompt_template is None:
            return student, student
        return student, resolve(self.prompt_template, teacher_tokenizer, "--prompt-template",
                                f"the teacher's tokenizer ({self.teacher})")

    @property
    def shard_slice(self) -> tuple[int, int] | None:
        if self.shard is None:
            return None
        m = _SHARD.match(self.shard)
        assert m is not None  # validate() guarantees it
        return int(m.group(1)), int(m.group(2))

    def validate(self) -> None:
        """Raise one ConfigError listing every problem, in the flags' spelling."""
        p: list[str] = list(self.capture._parse_problems) + self.evicting.problems()
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
        if self.prefill_chunk is not None and self.teacher_generates:
            p.append("Can't set both --prefill-chunk and --teacher-generates (a generated text is time-warped onto the "
                     "student's, which rows kept chunk by chunk cannot follow exactly). Choose one.")
        if self.prefill_chunk is not None and self.prompt_template not in (None, self.student_template):
            p.append("--prefill-chunk needs the teacher to read the student's own text: drop --prompt-template (rows "
                     "kept chunk by chunk are the teacher's own tokens, with no alignment onto another text).")
        if self.q_layers is not None and not self.with_q:
            p.append("--q-layers needs --with-q.")
        if self.system_prompt is not None and TOKENIZER_CHAT not in (self.student_template, self.prompt_template):
            p.append(f"--system-prompt is for the {TOKENIZER_CHAT} templates: set --student-template or "
                     f"--prompt-template {TOKENIZER_CHAT}, or drop --system-prompt.")
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
