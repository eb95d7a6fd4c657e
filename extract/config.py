"""`kava extract` options as one typed dataclass; click flags and YAML keys load into the same fields.

Every cross-field rule lives in ``validate()``, which reports all problems at once in the flags' own spelling
before any model loads or file is written.
"""

from __future__ import annotations

import importlib.util
import re
from dataclasses import dataclass, field, fields
from typing import Any

from kava.core.errors import ConfigError
from kava.kvstore.manifest import KV_DTYPES, check_teacher_name

_SHARD = re.compile(r"^(\d+)/(\d+)$")
_LOCAL = re.compile(r"^local:(\d+)$")
_ADDRESS = re.compile(r"^([a-z][a-z0-9+]*://\S+|[^\s/:]+:\d+)$")
_WALLTIME = re.compile(r"^(\d+-)?\d+(:\d+){0,2}$")


@dataclass
class ExtractConfig:
    """Run one teacher once over a dataset and write its aligned K/V into a store."""

    teacher: str
    """Preset name (see --list-teachers), local model directory, or hub id."""
    store: str
    """The store directory (created on first use)."""
    name: str | None = None
    """The teacher's name inside the store (default: preset or directory name, plus the template when not plain)."""
    dataset: str = "synthetic"
    """``synthetic`` (generated, seeded), ``gsm8k``, or a JSONL/Parquet file."""
    split: str = "train"
    """Dataset split."""
    limit: int | None = None
    """Use only the first N rows (synthetic: how many to generate; default 2000)."""
    data_files: str | None = None
    """Local files holding the rows of --split (for --dataset gsm8k)."""
    question_field: str = "question"
    """Field holding the question (file datasets)."""
    answer_field: str = "answer"
    """Field holding the reasoning lines and '#### N' (file datasets)."""
    seed: int = 0
    """Seed of the synthetic dataset."""
    strip_calculator: bool = False
    """Remove GSM8K's <<a*b=c>> calculator notes from the text."""
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
    q_layers: str | None = None
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
    """Storage dtype: float16, bfloat16, float32 or int8 (lossy, ~0.5% error)."""
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
    cluster: str | None = None
    """Extract on dask.distributed: 'local:N' (N worker processes here) or 'slurm' (dask-jobqueue's SLURMCluster,
    see --slurm-*). Each worker loads the teacher once and writes whole shards."""
    scheduler: str | None = None
    """Address of a running dask scheduler whose workers extract, e.g. tcp://HOST:8786 (instead of --cluster).
    Start its workers with one thread each (dask worker --nthreads 1) and set --threads for torch."""
    slurm_queue: str | None = None
    """SLURM partition of the worker jobs (default: the cluster's default partition)."""
    slurm_cores: int = 4
    """CPU cores per SLURM worker job; also the worker's torch threads unless --threads is set."""
    slurm_memory: str = "16GB"
    """Memory per SLURM worker job, e.g. 32GB."""
    slurm_walltime: str = "04:00:00"
    """Time limit per SLURM worker job (HH:MM:SS or D-HH:MM:SS)."""
    slurm_gpus: int = 0
    """GPUs per SLURM worker job (#SBATCH --gpus-per-node); use with --device cuda."""
    slurm_extra: str | None = None
    """Extra #SBATCH directives, ';'-separated, e.g. '--account=proj;--constraint=a100'."""
    slurm_jobs: int = 1
    """SLURM worker jobs to start, one worker each."""
    command: str = ""
    """The command line, recorded in the store."""
    extra: dict[str, Any] = field(default_factory=dict)
    """Free-form details recorded with the teacher."""

    @property
    def teacher_template(self) -> str:
        return self.prompt_template or self.student_template

    @property
    def local_workers(self) -> int | None:
        """N of --cluster local:N (None for other clusters)."""
        m = _LOCAL.match(self.cluster or "")
        return int(m.group(1)) if m else None

    @property
    def shard_slice(self) -> tuple[int, int] | None:
        if self.shard is None:
            return None
        m = _SHARD.match(self.shard)
        assert m is not None  # validate() guarantees it
        return int(m.group(1)), int(m.group(2))

    def validate(self) -> None:
        """Raise one ConfigError listing every problem, in the flags' spelling."""
        p: list[str] = []
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
        if self.limit is not None and self.limit < 1:
            p.append(f"--limit: expected a positive integer. Got {self.limit!r} instead.")
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
        p += self._cluster_problems()
        if self.name is not None:
            try:
                check_teacher_name(self.name)
            except ConfigError as e:
                p.append(f"--name: {e}")
        if not self.store:
            p.append("--store: expected a directory path. Got nothing.")
        if p:
            raise ConfigError.from_problems(p)

    def _cluster_problems(self) -> list[str]:
        """--cluster, --scheduler and --slurm-*: what goes together and what each accepts."""
        p: list[str] = []
        if self.cluster is not None and self.scheduler is not None:
            p.append("Can't set both --cluster and --scheduler. Choose one.")
        if self.cluster is not None and self.cluster != "slurm" and not (self.local_workers or 0) >= 1:
            p.append(f"--cluster: expected 'local:N' (N >= 1 worker processes) or 'slurm'. Got {self.cluster!r} "
                     "instead.")
        if self.scheduler is not None and not _ADDRESS.match(self.scheduler):
            p.append(f"--scheduler: expected a scheduler address such as tcp://HOST:8786. Got {self.scheduler!r} "
                     "instead.")
        scale_out = "--cluster" if self.cluster is not None else "--scheduler" if self.scheduler is not None else None
        if scale_out and self.shard is not None:
            p.append(f"Can't set both --shard and {scale_out}: the cluster hands out the shards itself. Choose one.")
        defaults = {f.name: f.default for f in fields(self) if f.name.startswith("slurm_")}
        changed = [name for name, default in defaults.items() if getattr(self, name) != default]
        if changed and self.cluster != "slurm":
            flags = ", ".join("--" + name.replace("_", "-") for name in changed)
            p.append(f"{flags} {'needs' if len(changed) == 1 else 'need'} --cluster slurm.")
        if self.cluster != "slurm":
            return p
        for flag, value, low in (("--slurm-cores", self.slurm_cores, 1), ("--slurm-gpus", self.slurm_gpus, 0),
                                 ("--slurm-jobs", self.slurm_jobs, 1)):
            if not isinstance(value, int) or value < low:
                p.append(f"{flag}: expected an integer >= {low}. Got {value!r} instead.")
        from dask.utils import parse_bytes

        try:
            parse_bytes(self.slurm_memory)
        except (ValueError, TypeError):
            p.append(f"--slurm-memory: expected a size such as 16GB. Got {self.slurm_memory!r} instead.")
        if not _WALLTIME.match(str(self.slurm_walltime)):
            p.append(f"--slurm-walltime: expected HH:MM:SS or D-HH:MM:SS. Got {self.slurm_walltime!r} instead.")
        bad = [d for d in slurm_directives(self.slurm_extra) if not d.startswith("-")]
        if bad:
            p.append(f"--slurm-extra: expected ';'-separated #SBATCH options such as '--account=proj'. Got {bad} "
                     "instead.")
        # Imported only when the cluster starts; checked here so it is reported with everything else.
        if importlib.util.find_spec("dask_jobqueue") is None:
            p.append("--cluster slurm needs the package dask-jobqueue, which is not installed. "
                     "Run `pip install dask-jobqueue` (or `pip install 'kava[slurm]'`).")
        return p


def slurm_directives(extra: str | None) -> list[str]:
    """--slurm-extra's ';'-separated #SBATCH options, stripped, empty ones dropped."""
    return [d.strip() for d in (extra or "").split(";") if d.strip()]
