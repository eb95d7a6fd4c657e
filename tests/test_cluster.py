"""`kava extract` on dask.distributed: real worker processes write the store a single process writes.

A LocalCluster of two worker processes runs the real stories260K teacher over 40 synthetic problems in ~1024-token
shards (9 shards): once through ``--cluster local:2`` (the driver starts and closes its own cluster), and through
``--scheduler`` on a cluster the tests own, once with a busy worker SIGKILLed after the first shard lands and once
resuming a store that lost some shards. Every store must equal, array for array, the store ``run_extract`` writes in
this process from the same options. Bad option combinations are refused before any cluster starts.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import signal
from dataclasses import replace
from pathlib import Path

import psutil
import pytest
from helpers import ENV, KAVA

# The comparison test_extract applies to its killed-and-resumed and two-job stores: every array with its chunks and
# attributes, the index, and the shard markers' counts.
from test_extract import assert_same_store

from kava.core.errors import ConfigError
from kava.extract.config import ExtractConfig
from kava.extract.recipe import ExtractResult, run_extract, summary_line
from kava.kvstore import KVStore, verify_store
from kava.pipelines.cluster import render_slurm_cluster_kwargs, run_extract_cluster, worker_threads
from kava.pipelines.cluster_config import ClusterConfig
from kava.pipelines.options import build_configs

STORIES_NAME = "stories260K_hf_derived"
OPTIONS = {"limit": 40, "shard_tokens": 1024, "batch_size": 4, "progress": False, "calibration_samples": 4}
ONE_TORCH_THREAD = True  # see conftest.one_torch_thread; local:2 workers get half the cores each


def configs(**options) -> tuple[ExtractConfig, ClusterConfig]:
    """The extraction's and the cluster's config from one set of options, split as `kava extract` splits them."""
    return build_configs((ExtractConfig, ClusterConfig), options, None)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, stories) -> tuple[Path, ExtractResult]:
    """The single-process store and result for OPTIONS."""
    path = tmp_path_factory.mktemp("ref") / "kv.zarr"
    return path, run_extract(ExtractConfig.from_dict(dict(teacher=str(stories), store=str(path), **OPTIONS)),
                             log=lambda _: None)


def assert_same_as_single_process(path: Path, ref: Path) -> None:
    assert_same_store(path, ref, STORIES_NAME)
    a, b = KVStore.open(path), KVStore.open(ref)
    created = {"created_at"}  # when, not what
    assert {k: v for k, v in a.manifest.to_dict().items() if k not in created} == \
        {k: v for k, v in b.manifest.to_dict().items() if k not in created}
    assert a.teacher(STORIES_NAME).to_dict() == b.teacher(STORIES_NAME).to_dict()
    for s in range(b.num_shards):
        who = {"written_at", "writer"}  # when and by which host:pid
        ma, mb = a.shard_marker(STORIES_NAME, s), b.shard_marker(STORIES_NAME, s)
        assert {k: v for k, v in ma.items() if k not in who} == {k: v for k, v in mb.items() if k not in who}, s
    report = verify_store(path)
    assert report.ok, report.problems


def assert_same_result(result: ExtractResult, ref: ExtractResult, shards: int) -> None:
    assert result.shards_written == list(range(shards)) and result.shards_kept == []
    for field in ("samples", "student_tokens", "teacher_tokens", "quarantined", "truncated", "skipped",
                  "bytes_logical"):
        assert getattr(result, field) == getattr(ref, field), field


def worker_processes() -> list[psutil.Process]:
    """This process's children that are dask worker processes (multiprocessing's spawn children)."""
    out = []
    for child in psutil.Process().children(recursive=True):
        try:
            if "spawn_main" in " ".join(child.cmdline()):
                out.append(child)
        except psutil.NoSuchProcess:
            pass
    return out


@pytest.mark.integration
def test_local_cluster_writes_the_single_process_store(tmp_path, stories, reference):
    ref, ref_result = reference
    path = tmp_path / "kv.zarr"
    lines: list[str] = []
    result = run_extract_cluster(*configs(teacher=str(stories), store=str(path), cluster="local:2", **OPTIONS),
                                 log=lines.append)
    shards = KVStore.open(ref).num_shards
    assert shards >= 8
    assert_same_result(result, ref_result, shards)
    assert_same_as_single_process(path, ref)
    assert lines[0].startswith("kava extract: dask cluster (local, 2 worker process(es)) at tcp://")
    assert any(line.startswith("kava extract: layer map proportional:") for line in lines)
    assert lines[-1] == summary_line(result) and lines[-1].startswith(f"kava extract: wrote {shards} shard(s), 40 ")
    assert worker_processes() == []  # the cluster it started is closed


def blosc_semaphore() -> str:
    """The name of this process's numcodecs blosc mutex, a named POSIX semaphore (made on first use)."""
    import numcodecs.blosc

    return numcodecs.blosc.get_mutex()._semlock.name


def release_semaphore(name: str) -> None:
    """Unlink a semaphore of a SIGKILLed worker: it can't do so itself, and the resource tracker it shares with this
    process would do it at exit with a "leaked semaphore objects" warning."""
    import _multiprocessing
    from multiprocessing import resource_tracker

    resource_tracker.unregister(name, "semaphore")
    _multiprocessing.sem_unlink(name)


@pytest.fixture(scope="module")
def own_cluster():
    """A LocalCluster the tests own, given to the driver by address (--scheduler), so a test can kill its workers."""
    from distributed import Client, LocalCluster

    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, memory_limit=0,
                      dashboard_address="127.0.0.1:0") as cluster, Client(cluster) as client:
        yield cluster, client


@pytest.mark.integration
def test_a_worker_killed_mid_run_still_ends_in_the_single_process_store(tmp_path, stories, reference, own_cluster):
    ref, ref_result = reference
    cluster, client = own_cluster
    pids = client.run(os.getpid)  # worker address → pid
    semaphores = client.run(blosc_semaphore)
    killed: dict[str, object] = {}

    def kill_a_busy_worker(shard: int) -> None:
        """After the first shard lands: SIGKILL a worker process the scheduler says is writing a shard now."""
        if killed:
            return
        busy = {w: keys for w, keys in client.processing().items() if keys}
        assert busy, "every shard task finished before the kill"
        address, keys = sorted(busy.items())[0]
        os.kill(pids[address], signal.SIGKILL)
        killed.update(address=address, pid=pids[address], keys=list(keys))

    path = tmp_path / "kv.zarr"
    cfg, where = configs(teacher=str(stories), store=str(path), scheduler=cluster.scheduler_address, **OPTIONS)
    result = run_extract_cluster(cfg, where, log=lambda _: None, on_shard=kill_a_busy_worker)

    assert killed and not psutil.pid_exists(killed["pid"])
    release_semaphore(semaphores[killed["address"]])
    assert killed["address"] not in client.scheduler_info()["workers"]  # the scheduler saw it go
    # The scheduler took the killed worker's shard tasks back (processing → released) and ran them elsewhere.
    taken_back = [key for key in killed["keys"] if any(
        entry[0] == "scheduler" and entry[2:4] == ("processing", "released") for entry in client.story(key))]
    assert taken_back, killed["keys"]
    shards = KVStore.open(ref).num_shards
    assert_same_result(result, ref_result, shards)
    assert_same_as_single_process(path, ref)
    assert client.run(lambda: 1)  # the cluster given by address is still up after the run


@pytest.mark.integration
def test_resume_on_a_cluster_keeps_complete_shards_and_writes_the_rest(tmp_path, stories, reference, own_cluster):
    ref, ref_result = reference
    path = tmp_path / "kv.zarr"
    shutil.copytree(ref, path)
    shards = KVStore.open(path).num_shards
    lost = [1, 2, 5, shards - 1]
    for s in lost:  # as a killed run leaves them: absent (or unfinished, which the writer deletes likewise)
        shutil.rmtree(path / "teachers" / STORIES_NAME / "shards" / f"{s:06d}")
    cfg, where = configs(teacher=str(stories), store=str(path), scheduler=own_cluster[0].scheduler_address, **OPTIONS)

    # Refused on the worker that prepares, and reported here at once rather than retried.
    with pytest.raises(ConfigError, match=rf"already has {shards - len(lost)} complete shard\(s\).*--resume"):
        run_extract_cluster(cfg, where, log=lambda _: None)
    result = run_extract_cluster(replace(cfg, resume=True), where, log=lambda _: None)
    assert result.shards_written == lost and result.shards_kept == [s for s in range(shards) if s not in lost]
    assert result.samples == sum(len(KVStore.open(ref).shard_samples(s)) for s in lost)
    assert_same_as_single_process(path, ref)


def test_a_shard_task_run_again_after_its_marker_landed_reports_the_shard(tmp_path, stories, reference):
    """A worker that dies after a shard's marker is written but before the scheduler hears of it has its task run
    again: the rerun finds the shard complete, reports it from the marker and writes nothing."""
    from kava.extract.recipe import prepare_extract, validate_and_resolve
    from kava.pipelines.cluster import shard_task

    ref, _ = reference
    path = tmp_path / "kv.zarr"
    shutil.copytree(ref, path)
    cfg = ExtractConfig.from_dict(dict(teacher=str(stories), store=str(path), resume=True, **OPTIONS))
    plan, _, _ = prepare_extract(cfg, validate_and_resolve(cfg), log=lambda _: None)
    assert plan.todo == []
    before = KVStore.open(path).shard_marker(STORIES_NAME, 3)
    part = shard_task(plan, 3, [])  # no samples: it must not write
    assert KVStore.open(path).shard_marker(STORIES_NAME, 3) == before
    start, stop = before["tokens"]
    assert (part.shards_written, part.samples, part.student_tokens, part.bytes_logical) == (
        [3], before["samples"][1] - before["samples"][0], stop - start, before["bytes_logical"])


@pytest.mark.parametrize("options, message", [
    ({"cluster": "local:0"}, r"--cluster: expected 'local:N' \(N >= 1 worker processes\) or 'slurm'. Got 'local:0'"),
    ({"cluster": "local:2", "shard": "0/2"}, "Can't set both --shard and --cluster"),
    ({"scheduler": "tcp://127.0.0.1:8786", "shard": "1/2"}, "Can't set both --shard and --scheduler"),
    ({"cluster": "local:2", "scheduler": "tcp://127.0.0.1:8786"}, "Can't set both --cluster and --scheduler"),
    ({"scheduler": "somewhere"}, "--scheduler: expected a scheduler address such as tcp://HOST:8786"),
    ({"cluster": "slurm"}, r"--cluster slurm needs the package dask-jobqueue.*`pip install dask-jobqueue`"),
    ({"cluster": "local:2", "slurm_jobs": 4, "slurm_gpus": 1}, "--slurm-gpus, --slurm-jobs need --cluster slurm"),
    ({"cluster": "slurm", "slurm_walltime": "4h", "slurm_memory": "lots", "slurm_extra": "--account=a;qos"},
     "Found 4 problems"),
    ({"cluster": "local:x", "shard": "0/2", "slurm_cores": 8}, "Found 3 problems"),  # reported all at once
    ({}, "run_extract_cluster needs --cluster or --scheduler"),
])
def test_bad_cluster_options_are_refused_before_anything_starts(tmp_path, stories, options, message):
    if "slurm" in options.get("cluster", "") and importlib.util.find_spec("dask_jobqueue") is not None:
        pytest.skip("dask-jobqueue is installed here; this case is about it missing")
    store = tmp_path / "kv.zarr"
    before = {p.pid for p in worker_processes()}
    with pytest.raises(ConfigError, match=message):
        run_extract_cluster(*configs(teacher=str(stories), store=str(store), **options))
    assert not store.exists() and {p.pid for p in worker_processes()} <= before  # no cluster was started


def test_cluster_options_are_not_the_single_process_recipes(tmp_path, stories):
    """The cluster options live in ClusterConfig, which only the launcher reads: the recipe's config has no such
    option, so nothing has to refuse it at run time, and `kava extract` routes by it."""
    with pytest.raises(ConfigError, match="Unknown option 'cluster'"):
        ExtractConfig.from_dict(dict(teacher=str(stories), store=str(tmp_path / "kv.zarr"), cluster="local:2"))
    cfg, cluster = configs(teacher=str(stories), store=str(tmp_path / "kv.zarr"), cluster="local:2")
    assert cluster.active and cluster.local_workers == 2 and not hasattr(cfg, "cluster")
    assert not ClusterConfig().active
    assert not (tmp_path / "kv.zarr").exists()


def test_slurm_cluster_kwargs_and_worker_threads():
    cfg = ClusterConfig(cluster="slurm", slurm_queue="gpu", slurm_cores=8, slurm_memory="64GB",
                        slurm_walltime="1-00:00:00", slurm_gpus=2, slurm_extra="--account=proj; --constraint=a100;",
                        slurm_jobs=4)
    assert render_slurm_cluster_kwargs(cfg) == {
        "queue": "gpu", "cores": 8, "processes": 1, "memory": "64GB", "walltime": "1-00:00:00",
        "job_name": "kava-extract",
        "job_extra_directives": ["--account=proj", "--constraint=a100", "--gpus-per-node=2"],
        "worker_extra_args": ["--resources", "teacher=1"],
    }
    plain = render_slurm_cluster_kwargs(ClusterConfig(cluster="slurm"))
    assert "queue" not in plain and plain["job_extra_directives"] == []  # the site's default partition, no GPUs
    assert (plain["cores"], plain["memory"], plain["walltime"]) == (4, "16GB", "04:00:00")

    # Torch threads per worker: --threads, else the worker's share of the cores (never more than there are).
    extract, threads = ExtractConfig(teacher="t", store="s"), ExtractConfig(teacher="t", store="s", threads=2)
    assert worker_threads(extract, cfg) == 8
    assert worker_threads(threads, ClusterConfig(cluster="slurm")) == 2
    cores = os.cpu_count() or 1
    assert worker_threads(extract, ClusterConfig(cluster="local:2")) == max(1, cores // 2)
    assert worker_threads(extract, ClusterConfig(cluster=f"local:{4 * cores}")) == 1
    assert worker_threads(extract, ClusterConfig(scheduler="tcp://h:8786")) is None


def test_cluster_options_are_extract_flags_with_help():
    from click.testing import CliRunner

    from kava.pipelines.cli import main

    out = CliRunner().invoke(main, ["extract", "--help"], catch_exceptions=False)
    assert out.exit_code == 0
    text = " ".join(out.output.split())
    for flag in ("--cluster TEXT", "--scheduler TEXT", "--slurm-queue TEXT", "--slurm-cores INTEGER",
                 "--slurm-memory TEXT", "--slurm-walltime TEXT", "--slurm-gpus INTEGER", "--slurm-extra TEXT",
                 "--slurm-jobs INTEGER"):
        assert flag in text, flag
    assert "'local:N' (N worker processes here) or 'slurm'" in text


@pytest.mark.integration
def test_kava_extract_cluster_flag_runs_the_cluster_path(tmp_path, stories, reference):
    """The real CLI: `kava extract --cluster local:2` writes the single-process store."""
    import subprocess

    path = tmp_path / "cli.zarr"
    proc = subprocess.run([*KAVA, "extract", "--teacher", str(stories),
                           "--store", str(path), "--limit", "40", "--shard-tokens", "1024", "--batch-size", "4",
                           "--calibration-samples", "4", "--no-progress", "--cluster", "local:2"],
                          capture_output=True, text=True, env=ENV, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "dask cluster (local, 2 worker process(es))" in proc.stderr
    assert_same_store(path, reference[0], STORIES_NAME)  # the manifest differs only in the recorded command
    assert KVStore.open(path).manifest.created_by.endswith("--cluster local:2")
    assert verify_store(path).ok
