"""sbatch scripts rendered from the same configs the commands take: an extraction job array, a verify job, and a
multi-node torchrun distillation job.

Each stage option becomes the flag ``kava extract`` / ``kava distill`` reads back into the same dataclass (only the
fields that differ from their defaults, spelled as ``pipelines/options.py`` spells them, every value shell-quoted),
so a script runs exactly the config it was rendered from. The tests parse the rendered flags back through the real
click commands to prove it.

- ``render_extract``: a job array; task ``i`` of ``n`` runs ``--shard i/n --resume``, so the tasks write disjoint
  shards of one store and a requeued task keeps what it finished and redoes only the rest of its slice.
- ``render_verify``: ``kava store verify`` of that teacher as its own small job, chained after the whole array with
  ``sbatch --dependency=afterok:<array job id>`` (``afterok`` on an array waits for every task to succeed). It is a
  separate script rather than a last array task because array tasks run in any order and at once.
- ``render_distill``: ``nodes`` nodes, one ``srun`` task per node starting ``torchrun`` with one process per GPU and a
  c10d rendezvous on the first node. The script adds ``--resume`` once ``<out>/checkpoints/step-*/state.json``
  exists: the first run starts fresh, a requeued or resubmitted one continues, and one requeued before the first
  checkpoint starts again from step 0 (``kava distill`` restarts a run that has no checkpoint).
- ``render_from_run_config``: the scripts of one stage of a ``kava run`` experiment, built with the configs the
  runner builds (``stage_extract_config``, ``stage_distill_config``) and at the runner's paths.

Under torchrun every process is one DDP rank (``distill/ddp.py``); ``device: cuda`` becomes ``cuda:LOCAL_RANK`` on
each. ``kava run`` adopts what these scripts make (a complete store, a finished student with the config it would
train), so running it afterwards only evaluates and reports.
"""

from __future__ import annotations

import dataclasses
import re
import shlex
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from kava.core.config import config_fields, config_to_dict
from kava.core.errors import ConfigError
from kava.distill.config import DistillConfig
from kava.extract.config import ExtractConfig

from . import splits
from .config import RunConfig, stage_distill_config, stage_extract_config

NOT_FLAGS = ("command", "extra")
"""Config fields with no flag: the command line is recorded by the command itself; ``extra`` is free-form."""

_TIME = re.compile(r"^(\d+-)?\d+(:\d+){0,2}$")  # minutes, m:s, h:m:s, d-h, d-h:m, d-h:m:s
_MEM = re.compile(r"^\d+[KMGT]?$")  # sbatch --mem: megabytes, or a K/M/G/T suffix
_INDENT = "    "


@dataclass
class SlurmOptions:
    """Where and how a rendered script runs: the ``#SBATCH`` lines and the shell setup before the command."""

    job_name: str = "kava"
    """Job name (``%x`` in log patterns); scripts rendered from a run config append their unit to it."""
    partition: str | None = None
    """Partition (queue) to submit to (default: the cluster's)."""
    account: str | None = None
    """Account charged for the job."""
    nodes: int = 1
    """Nodes of a distillation job (an extraction array task always takes one)."""
    gpus_per_node: int = 1
    """GPUs per node: one per extraction task; one torchrun process each for distillation. 0: a CPU job."""
    cpus_per_task: int | None = None
    """CPU cores per task (per node): loader workers and the store's writer thread need some."""
    mem: str | None = None
    """Memory per node, e.g. 64G."""
    time: str | None = None
    """Walltime, e.g. 12:00:00 or 1-00:00:00."""
    output: str | None = None
    """Log file pattern (default: %x-%A_%a.out for arrays, %x-%j.out otherwise; relative to the job's directory)."""
    chdir: str | None = None
    """Directory the job runs in (default: where sbatch was called). The configs' relative paths start there."""
    array_limit: int | None = None
    """At most this many extraction tasks at once (``--array=0-7%N``)."""
    rdzv_port: int = 29500
    """TCP port of torchrun's c10d rendezvous on the job's first node."""
    extra: list[str] = field(default_factory=list)
    """More ``#SBATCH`` lines, e.g. '--qos=high' or '--requeue' (a leading '#SBATCH' is accepted)."""
    setup: list[str] = field(default_factory=list)
    """Shell lines run before the command, e.g. 'module load cuda' and 'source .venv/bin/activate'."""

    def __post_init__(self) -> None:
        # A click option or a YAML scalar gives one string: one line per line of it.
        for name in ("extra", "setup"):
            value = getattr(self, name)
            if isinstance(value, str):
                setattr(self, name, [line for line in value.splitlines() if line.strip()])
            else:
                setattr(self, name, list(value))
        self.extra = [re.sub(r"^\s*#SBATCH\s+", "", line).strip() for line in self.extra]

    def problems(self) -> list[str]:
        """Every problem, in the flags' spelling (empty when the options are usable)."""
        p: list[str] = []
        for flag, value in (("--job-name", self.job_name), ("--partition", self.partition),
                            ("--account", self.account), ("--mem", self.mem), ("--time", self.time),
                            ("--output", self.output), ("--chdir", self.chdir)):
            # An #SBATCH line is split on whitespace by sbatch: a value can't hold any.
            if value is not None and (not value or re.search(r"\s", value)):
                p.append(f"{flag}: expected a value without spaces. Got {value!r} instead.")
        for flag, value, low in (("--nodes", self.nodes, 1), ("--gpus-per-node", self.gpus_per_node, 0),
                                 ("--cpus-per-task", self.cpus_per_task, 1), ("--array-limit", self.array_limit, 1),
                                 ("--rdzv-port", self.rdzv_port, 1)):
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < low):
                p.append(f"{flag}: expected an integer >= {low}. Got {value!r} instead.")
        if isinstance(self.rdzv_port, int) and self.rdzv_port > 65535:
            p.append(f"--rdzv-port: expected a TCP port (1-65535). Got {self.rdzv_port} instead.")
        if self.time is not None and self.time.strip() and not _TIME.match(self.time):
            p.append(f"--time: expected minutes, HH:MM:SS or D-HH:MM:SS. Got {self.time!r} instead.")
        if self.mem is not None and self.mem.strip() and not _MEM.match(self.mem):
            p.append(f"--mem: expected a size like 64G or 500M. Got {self.mem!r} instead.")
        for line in self.extra:
            if not line.startswith("-") or "\n" in line:
                p.append(f"--extra: expected sbatch options like '--qos=high', one per line. Got {line!r} instead.")
        return p


# ---------------------------------------------------------------------------------------------------------------------
# Flags from a config


def config_flags(cfg: ExtractConfig | DistillConfig, *, omit: Sequence[str] = ()) -> list[str]:
    """The command-line arguments that rebuild ``cfg`` (a stage config dataclass) through its click command.

    Required options always, others only where they differ from their default (a group's options included, flat,
    as ``options.config_options`` spells them); booleans as ``--flag`` (default False) or ``--no-flag`` (default
    True); lists comma-joined and mappings as ``name=value`` pairs, as the config parses them back; floats by
    ``repr`` so they read back exactly. Raises ConfigError for a value no flag can express (a None over a non-None
    default, free-form ``extra`` details).
    """
    values = config_to_dict(cfg)
    args: list[str] = []
    problems: list[str] = []
    for c in config_fields(type(cfg)):
        if c.name in omit or c.name == "command":
            continue
        value = values[c.name]
        if c.name == "extra":
            if value:
                problems.append(f"extra: free-form details have no flag. Got {value!r}; drop them to render.")
            continue
        if not c.required and value == c.default and type(value) is type(c.default):
            continue
        kind = [a for a in typing.get_args(c.hint) if a is not type(None)] or [c.hint]
        if kind[0] is bool:
            if bool(value) != bool(c.default):
                args.append(c.flag if c.default is False else "--no-" + c.name.replace("_", "-"))
        elif value is None:
            problems.append(f"{c.flag}: None can't be given as a flag (its default is {c.default!r}).")
        else:
            args += [c.flag, _flag_text(value)]
    if problems:
        raise ConfigError.from_problems(problems)
    return args


def _flag_text(value: Any) -> str:
    """A value as its flag's text: the config parses it back into the same value."""
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, dict):
        return ",".join(f"{k}={_flag_text(v)}" for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return ",".join(_flag_text(v) for v in value)
    return str(value)


def _command(words: list[str], tail: Sequence[str] = ()) -> str:
    """``words`` shell-quoted, one flag (with its value) per continued line; ``tail`` is appended as shell code."""
    lines = [shlex.quote(words[0])]
    for w in words[1:]:
        if w.startswith("-"):
            lines.append(shlex.quote(w))
        else:  # a flag's value, or the program's subcommand
            lines[-1] += " " + shlex.quote(w)
    lines += list(tail)
    return f" \\\n{_INDENT}".join(lines)


# ---------------------------------------------------------------------------------------------------------------------
# Script pieces


def _sbatch_lines(slurm: SlurmOptions, *, job_name: str, gpus: int, array: str | None = None,
                  nodes: int = 1) -> list[str]:
    opts: list[tuple[str, Any]] = [("job-name", job_name), ("partition", slurm.partition),
                                   ("account", slurm.account), ("nodes", nodes), ("ntasks-per-node", 1),
                                   ("gpus-per-node", gpus or None), ("cpus-per-task", slurm.cpus_per_task),
                                   ("mem", slurm.mem), ("time", slurm.time), ("chdir", slurm.chdir),
                                   ("array", array),
                                   ("output", slurm.output or ("%x-%A_%a.out" if array else "%x-%j.out"))]
    return ["#!/bin/bash"] + [f"#SBATCH --{k}={v}" for k, v in opts if v is not None] + \
        [f"#SBATCH {line}" for line in slurm.extra]


def _prologue(slurm: SlurmOptions) -> list[str]:
    lines = [
        "set -euo pipefail",
        "",
        "# Compute nodes are often offline: the models and data must then be in the Hugging Face cache (`kava doctor`",
        "# checks). sbatch passes the environment on, so `HF_HUB_OFFLINE=0 sbatch ...` allows downloads and HF_HOME",
        "# picks the cache.",
        'export HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-1}"',
        'export HF_DATASETS_OFFLINE="${HF_DATASETS_OFFLINE:-1}"',
    ]
    if slurm.setup:
        # Some activation scripts (conda's, older venvs') read unset variables, which `set -u` would turn fatal.
        lines += ["", "set +u", *slurm.setup, "set -u"]
    return lines


def _script(head: list[str], notes: list[str], slurm: SlurmOptions, body: list[str]) -> str:
    comments = ["#"] + [f"# {n}" if n else "#" for n in notes]
    return "\n".join(head + comments + [""] + _prologue(slurm) + [""] + body) + "\n"


def _check(problems: list[str]) -> None:
    if problems:
        raise ConfigError.from_problems(problems)


# ---------------------------------------------------------------------------------------------------------------------
# Extraction


def render_extract(cfg: ExtractConfig, slurm: SlurmOptions, *, jobs: int, notes: Sequence[str] = (),
                   preflight: Sequence[str] = ()) -> str:
    """An sbatch job array of ``jobs`` tasks extracting ``cfg``'s teacher into one store, task ``i`` running
    ``kava extract <cfg's flags> --shard ${SLURM_ARRAY_TASK_ID}/jobs --resume``.

    ``notes`` are extra header comment lines; ``preflight`` shell lines run before the command. Raises ConfigError
    listing every problem: the config's own (``ExtractConfig.validate``), ``--shard`` already set (the array sets
    it), more than one node or GPU per task (the teacher runs in one process on one device: use more ``jobs``), a
    GPU requested for a CPU extraction or the reverse.

    Expected CLI: ``kava slurm extract [every kava extract option] --jobs 8 [--partition gpu --gpus-per-node 1
    --time 12:00:00 --setup 'module load cuda' ...] [--out-dir DIR]``, writing (or printing) this script and the
    one of :func:`render_verify`.
    """
    problems = slurm.problems()
    if not isinstance(jobs, int) or jobs < 1:
        problems.append(f"--jobs: expected an integer >= 1. Got {jobs!r} instead.")
    if cfg.shard is not None:
        problems.append(f"--shard {cfg.shard}: the job array sets each task's shard itself; drop --shard.")
    if slurm.nodes != 1:
        problems.append(f"--nodes {slurm.nodes}: an extraction task runs one process on one node; "
                        "use more --jobs instead.")
    if slurm.gpus_per_node > 1:
        problems.append(f"--gpus-per-node {slurm.gpus_per_node}: an extraction task runs the teacher on one "
                        "device; use more --jobs instead.")
    problems += _device_problems(cfg.device, slurm.gpus_per_node, default="cpu")
    try:  # the config's own rules, with the shard a task will get
        n = jobs if isinstance(jobs, int) and jobs > 0 else 1
        dataclasses.replace(cfg, shard=f"0/{n}").validate()
    except ConfigError as e:
        problems.append(str(e))
    _check(problems)

    words = ["kava", "extract", *config_flags(cfg, omit=("shard", "resume"))]
    array = f"0-{jobs - 1}" + (f"%{slurm.array_limit}" if slurm.array_limit else "")
    head = _sbatch_lines(slurm, job_name=slurm.job_name, gpus=slurm.gpus_per_node, array=array)
    notes = [
        *notes,
        f"kava extract as a job array of {jobs}: task i writes the store's shards s with s % {jobs} == i, so the",
        "tasks never share a file. --resume keeps the shards a task finished: a requeued or resubmitted task redoes",
        "only the rest of its slice.",
        "Check the store once every task has succeeded, with the verify script rendered beside this one:",
        "  jid=$(sbatch --parsable <this script>) && sbatch --dependency=afterok:$jid <verify script>",
        "Relative paths start in the job's directory (where sbatch was called, or --chdir).",
    ]
    body = [*preflight, _command(words, [f'--shard "${{SLURM_ARRAY_TASK_ID}}/{jobs}"', "--resume"])]
    return _script(head, notes, slurm, body)


def render_verify(cfg: ExtractConfig, slurm: SlurmOptions, *, notes: Sequence[str] = ()) -> str:
    """A one-node CPU job running ``kava store verify <store> --teacher <name>`` for ``cfg``'s teacher: submit it
    with ``--dependency=afterok:<array job id>`` after :func:`render_extract`'s array. It exits 1, failing the job,
    when a shard is missing or a chunk's checksum is wrong."""
    _check(slurm.problems())
    if cfg.name is not None:
        name = cfg.name
    else:
        # The name extraction gives the teacher; the recipe module loads torch, which rendering a script never needs.
        from kava.extract.recipe import default_teacher_name  # noqa: PLC0415 - keeps `kava slurm` free of torch

        name = default_teacher_name(cfg)
    head = _sbatch_lines(slurm, job_name=f"{slurm.job_name}-verify", gpus=0)
    notes = [*notes, f"Checks teacher {name} of the store: schema, every shard complete, every chunk's crc32c.",
             "Submit it after the extraction array: sbatch --dependency=afterok:$jid <this script>"]
    body = [_command(["kava", "store", "verify", cfg.store, "--teacher", name])]
    return _script(head, notes, slurm, body)


# ---------------------------------------------------------------------------------------------------------------------
# Distillation


def render_distill(cfg: DistillConfig, slurm: SlurmOptions, *, notes: Sequence[str] = ()) -> str:
    """One sbatch job of ``slurm.nodes`` nodes training ``cfg``'s student: ``srun`` starts one ``torchrun`` per
    node (``--ntasks-per-node=1``), each with one process per GPU, meeting at a c10d rendezvous on the first node.

    ``--resume`` is added only when ``cfg.out`` already holds a complete checkpoint: the first run starts fresh, a
    requeued one continues, and one requeued before its first checkpoint starts over (the trainer restarts a run
    without a checkpoint). Raises ConfigError listing
    every problem (the config's own, the Slurm options', a GPU count that does not match ``--device``).

    Expected CLI: ``kava slurm distill [every kava distill option] [--nodes 2 --gpus-per-node 4 --time ...]
    [--out-dir DIR]``.
    """
    problems = slurm.problems() + _device_problems(cfg.device, slurm.gpus_per_node, default=None)
    if cfg.device is not None and re.match(r"^cuda:\d+$", cfg.device) and slurm.gpus_per_node > 1:
        problems.append(f"--device {cfg.device}: pins every process to one GPU; use --device cuda with "
                        f"{slurm.gpus_per_node} GPUs per node.")
    try:
        cfg.validate()
    except ConfigError as e:
        problems.append(str(e))
    _check(problems)

    procs = max(1, slurm.gpus_per_node)
    head = _sbatch_lines(slurm, job_name=slurm.job_name, gpus=slurm.gpus_per_node, nodes=slurm.nodes)
    notes = [
        *notes,
        f"kava distill on {slurm.nodes} node(s), {procs} process(es) each: srun starts one torchrun per node, torchrun",
        "one process per GPU; they meet at a c10d rendezvous on the job's first node.",
        "A requeued or resubmitted job continues from the latest checkpoint in --out (--resume is added once one",
        "exists; the first run starts fresh). After extraction:",
        "  sbatch --dependency=afterok:$extract_job distill.sbatch",
    ]
    body = [
        f"out={shlex.quote(cfg.out)}",
        "resume=()",
        'if compgen -G "$out/checkpoints/step-*/state.json" > /dev/null; then',
        f"{_INDENT}resume=(--resume)",
        "fi",
        'head_node=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)',
        "",
        _command(["srun", "torchrun"], [
            '--nnodes "$SLURM_NNODES"', f"--nproc-per-node {procs}", '--rdzv-id "$SLURM_JOB_ID"',
            "--rdzv-backend c10d", f'--rdzv-endpoint "$head_node:{slurm.rdzv_port}"',
            _command(["-m", "kava.pipelines.cli", "distill", *config_flags(cfg, omit=("resume",))],
                     ['"${resume[@]}"']),
        ]),
    ]
    return _script(head, notes, slurm, body)


def _device_problems(device: str | None, gpus: int, *, default: str | None) -> list[str]:
    """A job's GPUs and the stage's --device must agree: GPUs nobody uses, or CUDA on a node without one.
    ``default`` is what an unset --device means (None: whatever the node has, so anything goes)."""
    if device is None and default is None:
        return []
    on_gpu = (device or default or "").startswith("cuda")
    if on_gpu and gpus < 1:
        return [f"--device {device or default}: the job needs a GPU. Set --gpus-per-node (or --device cpu)."]
    if not on_gpu and gpus > 0:
        return [f"--gpus-per-node {gpus}: the stage runs on {device or default}; set --device cuda, or "
                "--gpus-per-node 0 for a CPU job."]
    return []


# ---------------------------------------------------------------------------------------------------------------------
# A `kava run` experiment


def render_from_run_config(run: RunConfig, slurm: SlurmOptions, *, stage: Literal["extract", "distill"],
                           jobs: int = 1, config: str | None = None) -> list[tuple[str, str]]:
    """The scripts of one stage of a ``kava run`` experiment, as ``(name, script)`` pairs, at the runner's paths.

    ``extract``: per teacher, ``extract-<teacher>`` (a job array of ``jobs`` tasks into ``<out>/<name>/kv.zarr``) and
    ``verify-<teacher>`` (run it after the array). The runner extracts over its student-train split file, written
    by its data stage; the array checks it exists first. A teacher trained by ``kava run`` (``train:``) has no model
    until the runner trains it, so it can't be rendered: ConfigError.
    ``distill``: ``distill-<variant>-seed-<seed>`` per variant and seed, into ``<out>/<name>/students/...``.

    Job names are ``slurm.job_name`` plus the script's name. ``config`` (the YAML path the run came from) is named in
    the headers and in the data-stage hint. Expected CLI: ``kava slurm run CONFIG --stage extract|distill [--jobs 8]
    [Slurm options] --out-dir DIR`` writing ``DIR/<name>.sbatch``.
    """
    where = f"kava run config {config}" if config else f"kava run experiment {run.name}"
    scripts: list[tuple[str, str]] = []
    if stage == "extract":
        trained = [t.name for t in run.teachers if t.train is not None]
        if trained:
            raise ConfigError(f"Teachers {', '.join(trained)} are trained by `kava run` (train:), so they have no "
                              "model to extract until it has run; extract them with `kava run`, or give them a "
                              "pretrained model:.")
        data = str(splits.split_path(run.root, "student-train"))
        hint = (f"python -c 'import sys; from kava.pipelines.config import load_config; from kava.pipelines.runner "
                f"import Runner; Runner(load_config(sys.argv[1])).data()' {shlex.quote(config or 'CONFIG')}")
        message = f"error: {data} is missing: the data stage of kava run writes it. Run that first: {hint}"
        preflight = [f"if [ ! -f {shlex.quote(data)} ]; then", f"{_INDENT}echo {shlex.quote(message)} >&2",
                     f"{_INDENT}exit 1", "fi", ""]
        for t in run.teachers:
            cfg = stage_extract_config(run, t)
            notes = [f"From {where}, teacher {t.name}."]
            own = dataclasses.replace(slurm, job_name=f"{slurm.job_name}-extract-{t.name}")
            scripts.append((f"extract-{t.name}", render_extract(cfg, own, jobs=jobs, notes=notes,
                                                               preflight=preflight)))
            verify = dataclasses.replace(slurm, job_name=f"{slurm.job_name}-{t.name}")
            scripts.append((f"verify-{t.name}", render_verify(cfg, verify, notes=notes)))
        return scripts
    if stage == "distill":
        store = str(run.root / "kv.zarr")
        for v in run.variants:
            for seed in run.seeds:
                name = f"distill-{v.name}-seed-{seed}"
                cfg = stage_distill_config(run, v, seed=seed, store=store,
                                           out=str(run.root / "students" / v.name / f"seed-{seed}"))
                notes = [f"From {where}, variant {v.name}, seed {seed}."]
                scripts.append((name, render_distill(cfg, dataclasses.replace(slurm,
                                                                              job_name=f"{slurm.job_name}-{name}"),
                                                     notes=notes)))
        return scripts
    raise ConfigError(f"--stage: expected extract or distill. Got {stage!r} instead.")
