"""A store on object storage past one process, against a real S3 API server (moto, as in test_store_remote): two
dask workers extract the real stories260K into a bucket, interrupted twice (the network cut while they write, then a
worker SIGKILLed mid-shard while the driver stops) and resumed each time; two DDP ranks distill from it; `kava cka`
reads it; verify catches flipped bytes in its objects.

Every process reaches the server through a TCP proxy the tests can cut (every connection dropped, the port closed)
and open again on the same port; the checks read the bucket directly. The dask workers get the endpoint and the
credentials the way workers started elsewhere do: from their environment (here inherited from this process)."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from dataclasses import replace

import numpy as np
import pytest
from helpers import ENV, asset_path
from object_storage import Proxy, s3_server
from test_cluster import blosc_semaphore, configs, release_semaphore
from test_ddp import RTOL, TERMS, TORCHRUN, flags, metrics, reference_steps
from test_extract import assert_same_store

from kava.core.errors import ChecksumError
from kava.extract.config import ExtractConfig
from kava.extract.recipe import run_extract
from kava.kvstore import KVStore, remote, verify_store
from kava.kvstore.create import copy_store
from kava.pipelines.cluster import run_extract_cluster

pytestmark = pytest.mark.integration  # a server, a dask cluster and torchrun: real processes throughout
ONE_TORCH_THREAD = True  # see conftest.one_torch_thread

BUCKET = "kava-scale"
TEACHER = "stories260K_hf_derived"
OPTIONS = {"limit": 16, "shard_tokens": 640, "batch_size": 8, "progress": False, "calibration_samples": 0,
           "with_q": True, "threads": 1}
"""16 samples in 5 shards, with Q (the DDP run's structural loss reads it)."""
NUM_SHARDS = 5
CUT_SHARD = 2
"""The shard being written when the network is cut (after shard 0 or 1 is complete)."""
STEPS = 2
"""DDP steps: each rank 2 x 2 micro-batches of 2 samples (test_ddp's RUN)."""


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """The moto server behind a proxy (:class:`object_storage.Proxy`): yields the environment that reaches it
    through the proxy (also set in os.environ meanwhile, for this process and the workers it starts), a boto3 client
    straight to the server, and the proxy. Requests are tried twice (AWS_MAX_ATTEMPTS): a cut network fails fast."""
    pytest.importorskip("moto", reason="moto[server] (the test extra) runs the S3 API server these tests use")
    pytest.importorskip("s3fs", reason="s3fs (the s3 extra) opens s3:// URLs")
    with s3_server(tmp_path_factory.mktemp("aws"), BUCKET, env=ENV) as (env, client), \
            pytest.MonkeyPatch.context() as mp:
        proxy = Proxy(int(env["AWS_ENDPOINT_URL"].rsplit(":", 1)[1])).open()
        env = {**env, "AWS_ENDPOINT_URL": proxy.url, "AWS_MAX_ATTEMPTS": "2"}
        for name, value in env.items():
            mp.setenv(name, value)
        yield env, client, proxy


@pytest.fixture(scope="module")
def cluster(s3):
    """Two dask worker processes (started after the environment above is set: it is theirs) and a client."""
    from distributed import Client, LocalCluster

    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, memory_limit=0,
                      dashboard_address="127.0.0.1:0") as dask_cluster, Client(dask_cluster) as client:
        yield dask_cluster, client


@pytest.fixture(scope="module")
def single(s3, tmp_path_factory):
    """`kava extract` in one process (the stage, in this process) into the bucket, the network cut as the writer
    sends shard CUT_SHARD's first V chunk (it writes shards in order: the ones before are complete), then the
    network back and the same extraction with --resume. Returns the URL, the error, the complete shards after the
    cut, the resumed run's result and a local copy of the finished store: the reference the dask store must equal."""
    _, _, proxy = s3
    url = f"s3://{BUCKET}/single.zarr"
    cfg = ExtractConfig.from_dict(dict(teacher=str(asset_path(f"models/{TEACHER}")), store=url, **OPTIONS))
    proxy.cut_on(f"/single.zarr/teachers/{TEACHER}/shards/{CUT_SHARD:06d}/v/c/".encode())
    try:
        with pytest.raises(remote.RemoteStoreError) as failed:
            run_extract(cfg, log=lambda _: None)
    finally:
        proxy.open()
    after_cut = KVStore.open(url).complete_shards(TEACHER)
    resumed = run_extract(replace(cfg, resume=True), log=lambda _: None)
    local = tmp_path_factory.mktemp("single") / "kv.zarr"
    copy_store(url, local, verify=False)
    assert KVStore.open(local).num_shards == NUM_SHARDS
    return {"url": url, "error": str(failed.value), "after_cut": after_cut, "resumed": resumed, "local": local}


class Stopped(Exception):
    """The driver stopped by the test."""


def settle(client, workers: int | None = 2, timeout: float = 90) -> None:
    """Wait until ``workers`` workers (None: any) are up and none runs a task (a cancelled task still runs to its
    end: a new run must not write a shard it is writing)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if workers is None or len(client.scheduler_info()["workers"]) == workers:
            if not any(client.run(lambda dask_worker: len(dask_worker.state.executing)).values()):
                return
        time.sleep(0.2)
    pytest.fail("the dask cluster did not settle")


def shard_objects(client, url: str, shard: int) -> list[str]:
    prefix = url.removeprefix(f"s3://{BUCKET}/") + f"/teachers/{TEACHER}/shards/{shard:06d}/"
    return [o["Key"] for o in client.list_objects_v2(Bucket=BUCKET, Prefix=prefix).get("Contents", [])]


@pytest.fixture(scope="module")
def dask_store(s3, cluster, tmp_path_factory):
    """Two workers extract into the bucket, interrupted twice and resumed each time:

    1. the network is cut as the writer of shard CUT_SHARD sends its first V chunk: the requests in flight fail
       after the retries and the driver raises (kept: its one-line error, how long it took, what is left in the
       bucket); the network comes back;
    2. ``--resume``: as its first shard lands, a worker busy writing another is SIGKILLed and the driver stops (a
       killed `kava extract`); the nanny restarts the worker;
    3. ``--resume`` finishes the store.

    Returns the URL, the complete shards after each interruption, the error, the killed worker's shards and the
    results, and a local copy of the finished store."""
    _, bucket, proxy = s3
    dask_cluster, client = cluster
    url = f"s3://{BUCKET}/dask.zarr"
    cfg, where = configs(teacher=str(asset_path(f"models/{TEACHER}")), store=url,
                         scheduler=dask_cluster.scheduler_address, **OPTIONS)
    seen: dict[str, object] = {}
    # Cut as the writer of shard CUT_SHARD sends its first V chunk: that shard is written part way.
    proxy.cut_on(f"/dask.zarr/teachers/{TEACHER}/shards/{CUT_SHARD:06d}/v/c/".encode())
    started = time.monotonic()
    try:
        with pytest.raises(remote.RemoteStoreError) as failed:
            run_extract_cluster(cfg, where, log=lambda _: None)
        seen["error"], seen["error_after_s"] = str(failed.value), time.monotonic() - started
        settle(client)  # the other worker's task too has failed (or finished) by now
    finally:
        proxy.open()
    seen["after_cut"] = KVStore.open(url).complete_shards(TEACHER)
    seen["left_behind"] = {s: shard_objects(bucket, url, s) for s in range(NUM_SHARDS)
                           if s not in seen["after_cut"]}

    pids, semaphores = client.run(os.getpid), client.run(blosc_semaphore)

    def kill_and_stop(shard: int) -> None:
        busy = {w: keys for w, keys in client.processing().items() if keys}
        assert busy, "every shard task finished before the kill"
        address, keys = sorted(busy.items())[0]
        os.kill(pids[address], signal.SIGKILL)
        seen.update(killed=address, killed_shards=[int(k.split("-")[2]) for k in keys
                                                   if k.startswith("kava-shard-")], landed_again=shard)
        raise Stopped

    resume = replace(cfg, resume=True)
    with pytest.raises(Stopped):
        run_extract_cluster(resume, where, log=lambda _: None, on_shard=kill_and_stop)
    release_semaphore(semaphores[seen["killed"]])
    settle(client, workers=None)  # the last run starts while the nanny restarts the killed worker
    seen["after_kill"] = KVStore.open(url).complete_shards(TEACHER)
    lines: list[str] = []
    seen["last"] = run_extract_cluster(resume, where, log=lines.append)
    seen["lines"] = lines
    local = tmp_path_factory.mktemp("down") / "kv.zarr"
    copy_store(url, local, verify=False)
    return {"url": url, "local": local, **seen}


def test_dask_workers_interrupted_twice_resume_into_the_bucket(dask_store, single):
    kept_after_cut, kept_after_kill = dask_store["after_cut"], dask_store["after_kill"]
    assert kept_after_cut and CUT_SHARD not in kept_after_cut
    assert dask_store["landed_again"] in kept_after_kill and set(kept_after_cut) < set(kept_after_kill)
    assert not set(dask_store["killed_shards"]) & set(kept_after_kill)  # the killed worker's shard was not finished
    last = dask_store["last"]
    assert last.shards_kept == kept_after_kill
    assert last.shards_written == [s for s in range(NUM_SHARDS) if s not in kept_after_kill]
    assert dask_store["lines"][0].startswith("kava extract: on the dask cluster at tcp://")
    report = verify_store(dask_store["url"])
    assert report.ok and report.shards_complete == {TEACHER: NUM_SHARDS}, report.problems
    assert_same_store(dask_store["local"], single["local"], TEACHER)  # array for array the one-process store


def test_network_cut_while_workers_write_is_one_line_naming_the_object(dask_store):
    """What the cut in :func:`dask_store` raised: one line naming the worker, the store, the object, the retries
    and the fix, within bounded time. What it left behind (objects of unfinished shards, no marker) was rewritten
    by the resumed runs (the test above)."""
    message, url = dask_store["error"], dask_store["url"]
    assert "\n" not in message and message.startswith("on dask worker tcp://127.0.0.1:")
    # The object: the shard's array being written, or what the other worker was reading (a marker, the grid).
    # (a listing names no object: the store and the endpoint then)
    assert re.search(rf"{url}: (?:\S+: )?can't reach {os.environ['AWS_ENDPOINT_URL']}(?: for \S+)?, after retries "
                     r"with backoff "
                     r"\(.+\)\. Check the network and AWS_ENDPOINT_URL, then run .* with --resume", message), message
    assert "a worker reads AWS_* from its own environment" in message
    assert dask_store["error_after_s"] < 60
    # What the cut left: the complete shards, and the shard being written, part way (its K, no V chunk, no marker).
    left = dask_store["left_behind"][CUT_SHARD]
    assert any("/k/c/" in key for key in left) and not any("/v/c/" in key for key in left), left


def test_flipped_bytes_in_workers_objects_are_caught_in_shard_order(s3, dask_store):
    """A byte flipped in a K chunk of shard 3 and of shard 1: verify (its shards checked at once, on several
    threads) names both, in shard order; reading either shard fails its checksum."""
    _, bucket, _ = s3
    url = dask_store["url"]
    originals = {}
    for shard in (3, 1):
        key = next(k for k in shard_objects(bucket, url, shard) if "/k/c/" in k)
        originals[key] = data = bucket.get_object(Bucket=BUCKET, Key=key)["Body"].read()
        flipped = bytearray(data)
        flipped[len(flipped) // 2] ^= 0x04
        bucket.put_object(Bucket=BUCKET, Key=key, Body=bytes(flipped))
    try:
        report = verify_store(url)
        assert [(p.where, "crc32c" in p.message) for p in report.problems] == [
            (f"teachers/{TEACHER}/shards/{shard:06d}/k", True) for shard in (1, 3)]
        assert report.shards_complete == {TEACHER: NUM_SHARDS}
        with pytest.raises(ChecksumError, match="crc32c does not match"):
            KVStore.open(url).read_shard(1)
    finally:
        for key, data in originals.items():
            bucket.put_object(Bucket=BUCKET, Key=key, Body=data)


def test_ddp_ranks_stream_their_shards_from_the_bucket(s3, dask_store, tmp_path):
    """Two gloo ranks read their shards from the bucket; the losses are test_ddp's one-process reference of the
    same DDP run on the local store (which the bucket's equals, above): the same batches, in the same order."""
    env, _, _ = s3
    out = tmp_path / "bucket"
    proc = subprocess.run([*TORCHRUN, "-m", "kava.pipelines.cli", "distill",
                           *flags(dask_store["url"], out, steps=STEPS, checkpoint_every=0)],
                          capture_output=True, text=True, env={**ENV, **env}, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = metrics(out)
    want = reference_steps(dask_store["local"], tmp_path / "reference", world_size=2, steps=STEPS)
    assert [m["step"] for m in got] == list(range(1, STEPS + 1))
    for a, b in zip(got, want):
        assert a["tokens"] == b["tokens"]
        for key in TERMS:
            assert a[key] == pytest.approx(b[key], rel=RTOL), (a["step"], key)
    # The check has teeth: the two ranks' batches give losses far apart (one rank's shards alone would fail it).
    first = want[0]["rank_terms"]
    assert abs(first[0]["loss/total"] - first[1]["loss/total"]) > 10 * RTOL * first[0]["loss/total"]


def test_cka_reads_a_store_url(dask_store):
    """`kava cka --store URL` (its computation, given the URL as the command gives it: dask reads the bucket's
    chunks on its threads) gives the local copy's matrix."""
    from kava.analysis.cka import store_cka

    got = store_cka(dask_store["url"], TEACHER, block_tokens=512)
    want = store_cka(dask_store["local"], TEACHER, block_tokens=512)
    np.testing.assert_array_equal(got.matrix, want.matrix)
    assert got.tokens == want.tokens > 0 and got.matrix.shape == (5, 5)


def test_network_cut_in_one_process_is_one_line_and_a_rerun_resumes(single):
    """What the cut in :func:`single` raised: one line naming the store, the object and the fix; the shards before
    the cut one were kept, and --resume wrote the rest."""
    url, message = single["url"], single["error"]
    assert "\n" not in message
    # The object: the first of the cut shard's chunks in flight after the cut (V's, or Q's sent beside it).
    assert message.startswith(f"{url}: can't reach {os.environ['AWS_ENDPOINT_URL']} for teachers/{TEACHER}/shards/"
                              f"{CUT_SHARD:06d}/"), message
    assert message.endswith("then run the same command again with --resume (the shards completed before are kept).")
    assert single["after_cut"] == list(range(CUT_SHARD))
    assert single["resumed"].shards_kept == list(range(CUT_SHARD))
    assert single["resumed"].shards_written == list(range(CUT_SHARD, NUM_SHARDS))
    assert verify_store(url).ok
