"""`kava extract` on dask.distributed: a LocalCluster, dask-jobqueue's SLURMCluster, or a running scheduler.

The driver runs the extraction recipe's two pieces as tasks: ``prepare_extract`` once (store, layer map and the
teacher's spec; the CKA calibration needs the model, so it runs on a worker), then ``write_shards`` for one shard per
task. Each worker keeps its teacher loaded between tasks (``TeacherCache``, a WorkerPlugin keyed by the teacher's
source). A task writes a whole shard, and a shard is visible only once its completion marker is written, so running a
task again is safe: ``retries`` covers a task that raised, and dask reschedules the tasks of a lost worker onto the
others, whose shard writer deletes the half-written shard and writes it anew.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from distributed import Client, Future, LocalCluster, Worker, WorkerPlugin, as_completed, get_worker

from kava.core.errors import ConfigError, KavaError
from kava.core.log import Log, log_stderr
from kava.core.models import ModelSource, load_model, load_tokenizer
from kava.extract.config import ExtractConfig
from kava.extract.grid import GridSample
from kava.extract.recipe import (
    ExtractPlan,
    ExtractResult,
    LoadedTeacher,
    configure_process,
    prepare_extract,
    progress_bar,
    summary_line,
    validate_and_resolve,
    write_shards,
)
from kava.kvstore import KVStore, remote

from .cluster_config import ClusterConfig

PLUGIN = "kava-teacher"
"""The name the worker plugin is registered under."""
RETRIES = 2
"""How often a task that raised is run again (a killed process, a flaky file system). A KavaError is not retried:
it is the input's fault and would only repeat."""
SLURM_RESOURCE = "teacher"
"""A SLURM worker has a job's cores as threads but one teacher: this resource lets it run one shard task at a time."""


class TeacherCache(WorkerPlugin):
    """Per worker: torch's thread count, no transformers progress bars, and the loaded teacher kept between tasks."""

    def __init__(self, threads: int | None) -> None:
        self.threads = threads

    def setup(self, worker: Worker) -> None:
        # Made here, on the worker: the plugin itself travels pickled, and a lock does not pickle.
        self._teachers: dict[ModelSource, LoadedTeacher] = {}
        self._lock = threading.Lock()
        configure_process(self.threads, progress=False)  # the driver's bar is the only one
        remote.silence_notes()  # and the driver's the one note that a store on object storage has no lock

    def teardown(self, worker: Worker) -> None:
        self._teachers.clear()

    def get(self, source: ModelSource) -> LoadedTeacher:
        """The teacher of ``source``, loaded on first use."""
        # Torch keeps its thread count per thread; tasks run on executor threads, so set it on the caller's too.
        configure_process(self.threads, progress=False)
        with self._lock:  # a worker with several threads loads its teacher once
            if source not in self._teachers:
                self._teachers.clear()  # one teacher at a time in a worker's memory
                tokenizer = load_tokenizer(source)
                self._teachers[source] = LoadedTeacher(load_model(source), tokenizer)
            return self._teachers[source]


@dataclass
class _Failed:
    """A task's KavaError, returned rather than raised so dask does not retry it."""

    error: KavaError


def run_extract_cluster(cfg: ExtractConfig, cluster: ClusterConfig, *, log: Log = log_stderr,
                        on_shard: Callable[[int], None] | None = None) -> ExtractResult:
    """Extract one teacher into ``cfg.store`` on the dask cluster that ``cluster`` (``--cluster`` or
    ``--scheduler``) names.

    Writes the store ``run_extract`` writes and returns the same result, logging the same lines (plus one naming
    the cluster); ``on_shard(s)`` is called here, on the driver, as each shard's marker lands. Closes the cluster
    and client it started (a ``--scheduler`` cluster stays up; its workers drop the teacher). Raises KavaError on
    bad input or when a shard fails for good; complete shards are kept, and ``--resume`` finishes the rest.
    """
    started = time.perf_counter()
    if not cluster.active:
        raise ConfigError("run_extract_cluster needs --cluster or --scheduler; without them run_extract runs the "
                          "extraction in this process.")
    # 1. Everything that can be checked here, before any worker starts: both configs' problems at once.
    problems = cluster.problems(shard=cfg.shard)
    try:
        cfg.validate()
    except ConfigError as e:
        problems.insert(0, str(e))
    if problems:
        raise ConfigError.from_problems(problems)
    source = _resolve_for_workers(cfg, cluster)
    if remote.is_url(cfg.store):
        _check_bucket(cfg.store, cluster)
    client, close = _connect(cluster, log)
    try:
        return _extract(client, cfg, cluster, source, log, started, on_shard)
    finally:
        close()


def render_slurm_cluster_kwargs(cfg: ClusterConfig) -> dict[str, Any]:
    """``dask_jobqueue.SLURMCluster`` keyword arguments from the --slurm-* options: one worker process per job."""
    directives = list(cfg.slurm_extra or [])
    if cfg.slurm_gpus:
        directives.append(f"--gpus-per-node={cfg.slurm_gpus}")
    kwargs: dict[str, Any] = {
        "cores": cfg.slurm_cores,
        "processes": 1,  # one teacher per job: a second process would load a second copy
        "memory": cfg.slurm_memory,
        "walltime": cfg.slurm_walltime,
        "job_name": "kava-extract",
        "job_extra_directives": directives,
        # The worker gets the job's cores as threads; the resource keeps it to one shard task at a time.
        "worker_extra_args": ["--resources", f"{SLURM_RESOURCE}=1"],
    }
    if cfg.slurm_queue is not None:  # else the partition of the user's jobqueue config, or SLURM's default
        kwargs["queue"] = cfg.slurm_queue
    return kwargs


# ---------------------------------------------------------------------------------------------------------------------
# The driver's pieces


def _resolve_for_workers(cfg: ExtractConfig, cluster: ClusterConfig) -> ModelSource:
    """``validate_and_resolve``, except that CUDA is checked where the teacher loads: a SLURM login node or a remote
    scheduler's client often has no GPU of its own."""
    device = (cfg.device or "cpu").strip().lower()
    if cluster.local_workers is not None or not device.startswith("cuda"):
        return validate_and_resolve(cfg)
    source = validate_and_resolve(replace(cfg, device="cpu"))
    return replace(source, device="cuda:0" if device == "cuda" else device)  # the worker's load_model checks it


def _check_bucket(url: str, cluster: ClusterConfig) -> None:
    """A store on object storage, before any worker starts: the bucket, the credentials and the network, asked here
    once (one error line rather than one per worker) where the workers inherit this process's environment (a local
    cluster, SLURM jobs); a running cluster's workers have their own, and report a problem themselves. Gives the
    note that the store is written without a lock, once for all workers."""
    store = remote.open_url(url, read_only=True)
    if cluster.scheduler is None:
        remote.probe(store, must_exist=False)
    remote.note_unlocked(remote.describe(store))


def worker_threads(cfg: ExtractConfig, cluster: ClusterConfig) -> int | None:
    """Torch threads per worker: --threads, else the worker's share of its machine's cores (never more)."""
    if cfg.threads is not None:
        return cfg.threads
    if cluster.local_workers is not None:
        return max(1, (os.cpu_count() or 1) // cluster.local_workers)
    if cluster.cluster == "slurm":
        return cluster.slurm_cores
    return None  # a running cluster's workers: their own setting (dask's nanny starts them at one)


def _connect(cfg: ClusterConfig, log: Log) -> tuple[Client, Callable[[], None]]:
    """A client of the cluster ``cfg`` names, and how to let go of it afterwards."""
    if cfg.scheduler is not None:
        try:
            client = Client(cfg.scheduler)
        except (OSError, TimeoutError) as e:
            raise ConfigError(f"--scheduler {cfg.scheduler}: could not connect ({e}). Check the address and that "
                              "the scheduler is running.") from e

        def release() -> None:
            try:  # the workers stay up for others: free the teacher's memory on them
                client.unregister_worker_plugin(PLUGIN)
            except OSError:  # a worker lost meanwhile (its connection closed) holds nothing more
                pass
            finally:
                client.close()

        log(f"kava extract: on the dask cluster at {cfg.scheduler}, "
            f"{len(client.scheduler_info()['workers'])} worker(s) now")
        return client, release

    if cfg.cluster == "slurm":
        try:
            from dask_jobqueue import SLURMCluster  # noqa: PLC0415 - an optional package, only for --cluster slurm
        except ImportError as e:
            raise ConfigError("--cluster slurm needs the package dask-jobqueue, which is not installed. "
                              "Run `pip install dask-jobqueue` (or `pip install 'kava[slurm]'`).") from e
        cluster = SLURMCluster(**render_slurm_cluster_kwargs(cfg))
        cluster.scale(jobs=cfg.slurm_jobs)
        what = f"SLURM, {cfg.slurm_jobs} job(s) of {cfg.slurm_cores} cores"
    else:
        cluster = LocalCluster(
            n_workers=cfg.local_workers, threads_per_worker=1, processes=True,
            # The teacher's weights are not dask data: a memory limit would only make the nanny pause or restart
            # workers that hold a large model.
            memory_limit=0,
            # The scheduler serves HTTP in any case: on a free port (a fixed one clashes with other runs), on this
            # machine only, like the scheduler itself.
            dashboard_address="127.0.0.1:0",
        )
        what = f"local, {cfg.local_workers} worker process(es)"
    try:
        client = Client(cluster)
    except BaseException:
        cluster.close()
        raise

    def close() -> None:
        try:
            client.close()
        finally:
            # The nanny kills a worker process still tearing down after 4 s (torch's exit is slow on a busy
            # machine) and warns; every shard is written by then, so that warning would only alarm.
            nanny = logging.getLogger("distributed.nanny")
            level = nanny.level
            nanny.setLevel(logging.ERROR)
            try:
                cluster.close()
            finally:
                nanny.setLevel(level)

    # Without bokeh the dashboard's page only says to install it.
    dashboard = f", dashboard {client.dashboard_link}" if importlib.util.find_spec("bokeh") else ""
    log(f"kava extract: dask cluster ({what}) at {cluster.scheduler_address}{dashboard}")
    return client, close


def _extract(client: Client, cfg: ExtractConfig, cluster: ClusterConfig, source: ModelSource, log: Log, started: float,
             on_shard: Callable[[int], None] | None) -> ExtractResult:
    run = uuid.uuid4().hex[:8]  # task keys unique to this run, readable on the dashboard
    resources = {SLURM_RESOURCE: 1} if cluster.cluster == "slurm" else None
    client.register_plugin(TeacherCache(worker_threads(cfg, cluster)), name=PLUGIN)

    # 2-6. Store, teacher, layer map and spec: one task, whose worker keeps the teacher for its shards.
    prepared = client.submit(_prepare_task, cfg, source, key=f"kava-prepare-{run}", retries=RETRIES,
                             resources=resources, pure=False)
    plan, shard_samples, lines = _outcome(prepared, "Preparing the store and teacher")
    # Let go of results once read: dask recomputes the lost results of a dead worker that someone still holds.
    prepared.release()
    for line in lines:
        log(line)

    # 7. One task per shard; the bar counts the samples of finished shards over all workers.
    result = plan.new_result()
    bar = progress_bar(plan.samples_to_write, cfg.progress)
    loop_started = time.perf_counter()
    futures = {client.submit(shard_task, plan, shard, shard_samples[shard], key=f"kava-shard-{shard:06d}-{run}",
                             retries=RETRIES, resources=resources, pure=False): shard for shard in plan.todo}
    try:
        for future in as_completed(futures):
            shard = futures[future]
            part = _outcome(future, f"Shard {shard} of teacher {plan.name!r}")
            future.release()
            for name in ("samples", "student_tokens", "teacher_tokens", "quarantined", "bytes_logical",
                         "forward_seconds", "write_wait_seconds"):
                setattr(result, name, getattr(result, name) + getattr(part, name))
            result.shards_written += part.shards_written
            bar.update(part.samples)
            rate = result.student_tokens / max(1e-9, time.perf_counter() - loop_started)
            bar.set_postfix_str(f"{rate:,.0f} tok/s", refresh=False)
            if on_shard is not None:
                on_shard(shard)
    except BaseException:
        client.cancel([f for f in futures if f.status == "pending"])
        raise
    finally:
        bar.close()
    result.shards_written.sort()
    result.loop_seconds = time.perf_counter() - loop_started
    result.seconds = time.perf_counter() - started
    log(summary_line(result))
    return result


def _outcome(future: Future, what: str) -> Any:
    """A task's value; its KavaError raised as is, anything else that stopped it as a KavaError."""
    try:
        value = future.result()
    except Exception as e:  # out of retries, or its workers kept dying (KilledWorker)
        raise KavaError(f"{what} failed on the cluster: {e!r}. Complete shards are kept: run again with --resume "
                        "to finish the rest.") from e
    if isinstance(value, _Failed):
        raise value.error
    return value


# ---------------------------------------------------------------------------------------------------------------------
# Tasks (run on the workers)


def _cache() -> TeacherCache:
    return get_worker().plugins[PLUGIN]


def _prepare_task(cfg: ExtractConfig, source: ModelSource
                  ) -> tuple[ExtractPlan, dict[int, list[GridSample]], list[str]] | _Failed:
    """``prepare_extract`` on a worker: the plan, the grid samples of each shard to write, and the log lines."""
    lines: list[str] = []
    cache = _cache()
    try:
        with remote.writing(cfg.store, then=remote.RESUME_FIX):
            plan, grid, _ = prepare_extract(cfg, source, log=lines.append, load_model=lambda s: cache.get(s).model)
    except KavaError as e:
        return _Failed(_on_worker(e))
    return plan, {s: [grid[i] for i in plan.shard_samples(s)] for s in plan.todo}, lines


def shard_task(plan: ExtractPlan, shard: int, samples: list[GridSample]) -> ExtractResult | _Failed:
    """Write one whole shard with this worker's teacher; returns its counters."""
    part = ExtractResult(store=plan.store, teacher=plan.name)
    try:
        with remote.writing(plan.cfg.store, then=remote.RESUME_FIX):
            marker = KVStore.open(plan.cfg.store).shard_marker(plan.name, shard)
            if marker is not None:
                # An earlier run of this task wrote the marker, but its worker died before the result reached the
                # scheduler. The shard is complete; its teacher tokens are not recorded in the marker.
                part.shards_written = [shard]
                part.samples = marker["samples"][1] - marker["samples"][0]
                part.student_tokens = marker["tokens"][1] - marker["tokens"][0]
                part.quarantined = len(marker["quarantined"])
                part.bytes_logical = marker["bytes_logical"]
                return part
            write_shards(plan, _cache().get(plan.source), [(shard, samples)], part)
    except KavaError as e:
        return _Failed(_on_worker(e))
    return part


def _on_worker(error: KavaError) -> KavaError:
    """``error`` as the driver reports it: a failed request to object storage names the worker it failed on, whose
    own environment holds the credentials and endpoint it used."""
    if not isinstance(error, remote.RemoteStoreError):
        return error
    return remote.RemoteStoreError(f"on dask worker {get_worker().address}: {error} (a worker reads AWS_* from its "
                                   "own environment: see docs/scale-out.md, \"Object storage\")")
