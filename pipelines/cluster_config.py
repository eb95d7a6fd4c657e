"""`kava extract`'s scale-out options: a dask cluster (local processes, dask-jobqueue's SLURMCluster, or a running
scheduler) that extracts the shards. Only the cluster launcher (``pipelines/cluster.py``) reads them; the extraction
recipe never sees them.

Kept apart from ``cluster.py`` so that building `kava extract`'s options does not import dask.distributed.
"""

from __future__ import annotations

import importlib.util
import re
from dataclasses import dataclass, fields

from kava.core.errors import ConfigError

_LOCAL = re.compile(r"^local:(\d+)$")
_ADDRESS = re.compile(r"^([a-z][a-z0-9+]*://\S+|[^\s/:]+:\d+)$")
_WALLTIME = re.compile(r"^(\d+-)?\d+(:\d+){0,2}$")


@dataclass
class ClusterConfig:
    """Where `kava extract` runs its shards: here (the default), or on a dask cluster."""

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
    slurm_extra: list[str] | None = None
    """Extra #SBATCH directives, ';'-separated, e.g. '--account=proj;--constraint=a100'."""
    slurm_jobs: int = 1
    """SLURM worker jobs to start, one worker each."""

    def __post_init__(self) -> None:
        if isinstance(self.slurm_extra, str):  # a flag's text (a YAML list is taken as it is)
            self.slurm_extra = slurm_directives(self.slurm_extra)

    @property
    def active(self) -> bool:
        """A cluster or scheduler is named: the extraction runs on dask."""
        return self.cluster is not None or self.scheduler is not None

    @property
    def local_workers(self) -> int | None:
        """N of --cluster local:N (None for other clusters)."""
        m = _LOCAL.match(self.cluster or "")
        return int(m.group(1)) if m else None

    def problems(self, *, shard: str | None = None) -> list[str]:
        """Every problem, in the flags' spelling: what goes together and what each option accepts. ``shard`` is
        the extraction's --shard (a cluster hands out the shards itself)."""
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
        if scale_out and shard is not None:
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
        from dask.utils import parse_bytes  # noqa: PLC0415 - keeps `kava --help` and `kava extract --help` free of dask

        try:
            parse_bytes(self.slurm_memory)
        except (ValueError, TypeError):
            p.append(f"--slurm-memory: expected a size such as 16GB. Got {self.slurm_memory!r} instead.")
        if not _WALLTIME.match(str(self.slurm_walltime)):
            p.append(f"--slurm-walltime: expected HH:MM:SS or D-HH:MM:SS. Got {self.slurm_walltime!r} instead.")
        bad = [d for d in self.slurm_extra or [] if not str(d).startswith("-")]
        if bad:
            p.append(f"--slurm-extra: expected ';'-separated #SBATCH options such as '--account=proj'. Got {bad} "
                     "instead.")
        # Imported only when the cluster starts; checked here so it is reported with everything else.
        if importlib.util.find_spec("dask_jobqueue") is None:
            p.append("--cluster slurm needs the package dask-jobqueue, which is not installed. "
                     "Run `pip install dask-jobqueue` (or `pip install 'kava[slurm]'`).")
        return p

    def validate(self, *, shard: str | None = None) -> None:
        """Raise one ConfigError listing every problem."""
        p = self.problems(shard=shard)
        if p:
            raise ConfigError.from_problems(p)


def slurm_directives(extra: str | None) -> list[str]:
    """--slurm-extra's ';'-separated #SBATCH options, stripped, empty ones dropped (parsed once, by ClusterConfig)."""
    return [d.strip() for d in (extra or "").split(";") if d.strip()]
