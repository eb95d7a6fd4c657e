"""Stores on object storage: ``s3://`` URLs against a real S3 API server (moto's server mode, started here on a free
local port with authentication on), and ``memory://`` URLs in process.

The S3 tests extract the real stories260K into a bucket once per module, then read, verify, corrupt, resume,
distill and copy it through the same entry points users take (the `kava` CLI in a subprocess where the output
itself is under test). Errors are one line on stderr: a missing bucket, bad credentials, an unreachable endpoint.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
from helpers import ENV, KAVA, asset_path
from object_storage import free_port, s3_server

from kava.core.errors import ChecksumError, ConfigError, NotAStoreError, StoreError
from kava.kvstore import (
    DatasetSpec,
    KVStore,
    LayerMap,
    StorageSpec,
    TeacherSpec,
    create_store,
    remote,
    summary,
    verify_store,
)
from kava.kvstore.create import copy_store
from kava.kvstore.manifest import TokenizerSpec

BUCKET = "kava-test"
TEACHER = "stories260K_hf_derived"
OPTIONS = {"limit": 16, "shard_tokens": 1024, "batch_size": 8, "progress": False, "calibration_samples": 0}
ONE_TORCH_THREAD = True  # see conftest.one_torch_thread: the moto server and the CLI subprocesses share two cores


# ---------------------------------------------------------------------------------------------------------------------
# URLs (no server)


def test_urls_are_told_from_paths():
    assert remote.is_url("s3://bucket/kv.zarr") and remote.is_url("memory://kv") and remote.is_url("gs://b/k")
    assert not remote.is_url("runs/kv.zarr") and not remote.is_url("/abs/kv.zarr")
    assert not remote.is_url("file:///tmp/kv.zarr") and not remote.is_url("C:/runs/kv.zarr")
    assert not remote.is_url(Path("s3://bucket/kv.zarr"))  # a Path has lost its '//': it is a path


def test_credentials_in_a_url_are_refused_and_never_shown():
    with pytest.raises(ConfigError, match=r"credentials in a store URL are refused") as caught:
        KVStore.open("s3://AKIAEXAMPLE:s3cr3t@bucket/kv.zarr")
    assert "s3cr3t" not in str(caught.value) and "AKIAEXAMPLE" not in str(caught.value)
    assert "s3://***@bucket/kv.zarr" in str(caught.value)
    with pytest.raises(ConfigError, match=r"without '\?' or '#'"):
        KVStore.open("s3://bucket/kv.zarr?endpoint=x")
    with pytest.raises(ConfigError, match=r"no filesystem for nosuchfs:// URLs"):
        KVStore.open("nosuchfs://bucket/kv.zarr")


def test_a_network_failure_names_the_object_and_the_fix():
    """What botocore raises once its retries are spent, path-style and virtual-host-style, as the one line a write
    (``remote.writing``) and a read give; a local path is left alone."""
    from botocore.exceptions import EndpointConnectionError

    for address in ("http://127.0.0.1:9/bucket/runs/kv.zarr/teachers/t/shards/000001/v/c/0/0/0/0",
                    "https://bucket.s3.amazonaws.com/runs/kv.zarr/teachers/t/shards/000001/v/c/0/0/0/0"):
        with pytest.raises(remote.RemoteStoreError) as caught, remote.writing("s3://bucket/runs/kv.zarr",
                                                                               then=remote.RESUME_FIX):
            raise OSError("the write failed") from EndpointConnectionError(endpoint_url=address)
        message = str(caught.value)
        assert message.startswith("s3://bucket/runs/kv.zarr: can't reach ") and "\n" not in message
        assert " for teachers/t/shards/000001/v/c/0/0/0/0, after retries with backoff (" in message
        assert message.endswith(f"then {remote.RESUME_FIX}.")
    read = remote.remote_problem("s3://bucket/runs/kv.zarr: teacher 't' shard 1",
                                 EndpointConnectionError(endpoint_url="http://h/bucket/runs/kv.zarr/zarr.json"))
    assert read is not None and " for zarr.json, " in str(read) and "(an extraction with --resume)" in str(read)
    with pytest.raises(ConnectionError, match="not translated"), remote.writing("runs/kv.zarr"):
        raise ConnectionError("not translated")


def test_chunk_crc_check():
    import crc32c

    body = b"some encoded chunk bytes"
    chunk = body + crc32c.crc32c(body).to_bytes(4, "little")
    assert remote.chunk_crc_ok(chunk)
    assert not remote.chunk_crc_ok(bytes([chunk[0] ^ 1]) + chunk[1:])
    assert remote.is_chunk_key("teachers/t/shards/000001/k/c/0/0") and remote.is_chunk_key("grid/offsets/c/0")
    assert not remote.is_chunk_key("teachers/t/shards/000001/k/zarr.json") and not remote.is_chunk_key("index.parquet")


# ---------------------------------------------------------------------------------------------------------------------
# memory:// (an fsspec URL, in process)


def _small_store(location: str) -> KVStore:
    """12 samples in 4 shards of a synthetic grid, one teacher written whole."""
    lengths = [7, 0, 13, 4, 9, 11, 2, 15, 6, 8, 10, 3]
    rng = np.random.default_rng(1)
    store = create_store(
        location, sample_ids=[f"s{i}" for i in range(len(lengths))],
        input_ids=[rng.integers(0, 100, n) for n in lengths], segment_ids=[np.zeros(n, int) for n in lengths],
        student_tokenizer=TokenizerSpec(name="tiny", fingerprint="e" * 64, vocab_size=100),
        dataset=DatasetSpec(name="synthetic", split="test", fingerprint="f" * 64), shard_tokens=20,
    )
    store.add_teacher(TeacherSpec(
        name="t", model={"id": "tiny/t"}, num_layers=2, layers=(0, 1), num_heads=2, kv_heads=2, head_dim=8,
        layer_map=LayerMap("proportional", (((0, 1.0),), ((1, 1.0),))),
        storage=StorageSpec(dtype="float16", compressor={}, chunk_tokens=8, chunk_layers=2),
    ))
    for s in range(store.num_shards):
        w = store.shard_writer("t", s)
        for i in store.shard_samples(s):
            n = int(store.offsets[i + 1] - store.offsets[i])
            w.add(rng.standard_normal((n, 2, 2, 8)).astype(np.float32),
                  rng.standard_normal((n, 2, 2, 8)).astype(np.float32), align_weight=np.ones(n, np.float32), sample=i)
        w.close()
    return store


def test_memory_url_store_round_trip(tmp_path, capsys):
    url = f"memory://kava-{os.getpid()}-{time.monotonic_ns()}/kv.zarr"
    _small_store(url)
    assert "has no file locks" in capsys.readouterr().err  # the unlocked-writer note, once
    store = KVStore.open(url)
    assert store.where == url
    assert verify_store(url).ok
    report = copy_store(url, tmp_path / "kv.zarr")
    assert report.chunks_checked > 0 and report.objects_kept == 0
    # `kava store info` counts the bytes stored at a URL as it counts a directory's: the copy's are the same.
    assert summary(store)["bytes_on_disk"] == summary(KVStore.open(tmp_path / "kv.zarr"))["bytes_on_disk"] > 0
    a, b = KVStore.open(url), KVStore.open(tmp_path / "kv.zarr")
    for s in range(a.num_shards):
        np.testing.assert_array_equal(a.read_shard(s).teachers["t"].k, b.read_shard(s).teachers["t"].k)
    with pytest.raises(StoreError, match=r"a store \(or another zarr hierarchy\) is already here"):
        copy_store(url, tmp_path / "kv.zarr")


def test_interrupted_creation_in_place_is_refused_then_built_over():
    url = f"memory://kava-{os.getpid()}-{time.monotonic_ns()}/kv.zarr"
    _small_store(url)
    store = remote.open_url(url, read_only=False)
    from kava.kvstore import zarr_io

    # What a creation killed before its last write leaves: the grid, the index, a root group without the manifest.
    zarr_io.delete_prefix(store, "teachers")
    zarr_io.set_bytes(store, "zarr.json", json.dumps({"zarr_format": 3, "node_type": "group"}).encode())
    with pytest.raises(NotAStoreError, match=r"not a KaVa store"):
        KVStore.open(url)
    rebuilt = _small_store(url)
    assert rebuilt.complete_shards("t") == list(range(rebuilt.num_shards)) and verify_store(url).ok


def test_copy_refuses_a_corrupted_source_chunk(tmp_path):
    url = f"memory://kava-{os.getpid()}-{time.monotonic_ns()}/kv.zarr"
    _small_store(url)
    store = remote.open_url(url, read_only=False)
    from kava.kvstore import zarr_io

    key = next(k for k in zarr_io.list_prefix(store, "teachers/t/shards/") if "/k/c/" in k)
    data = bytearray(zarr_io.get_bytes(store, key) or b"")
    data[len(data) // 2] ^= 0x10
    zarr_io.set_bytes(store, key, bytes(data))
    with pytest.raises(ChecksumError, match=r"crc32c does not match.*nothing corrupted was copied"):
        copy_store(url, tmp_path / "kv.zarr")
    assert not (tmp_path / "kv.zarr" / "zarr.json").exists()  # never an openable store


# ---------------------------------------------------------------------------------------------------------------------
# s3:// against a real S3 API server


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """A moto S3 server on a free port, with authentication on: its IAM user's keys work, others are refused.
    Yields the environment that reaches it (also set in os.environ meanwhile) and a boto3 client; ends the server."""
    pytest.importorskip("moto", reason="moto[server] (the test extra) runs the S3 API server these tests use")
    pytest.importorskip("s3fs", reason="s3fs (the s3 extra) opens s3:// URLs")
    with s3_server(tmp_path_factory.mktemp("aws"), BUCKET, env=ENV) as (env, client), \
            pytest.MonkeyPatch.context() as mp:
        for name, value in env.items():
            mp.setenv(name, value)
        yield env, client


@pytest.fixture(scope="module")
def bucket_store(s3) -> str:
    """The real stories260K extracted into the bucket, in this process (16 samples, 4 shards)."""
    from kava.extract.config import ExtractConfig
    from kava.extract.recipe import run_extract

    url = f"s3://{BUCKET}/kv.zarr"
    stories = asset_path("models/stories260K_hf_derived")
    result = run_extract(ExtractConfig.from_dict(dict(teacher=str(stories), store=url, **OPTIONS)),
                         log=lambda _: None)
    assert result.shards_written == list(range(KVStore.open(url).num_shards))
    return url


def kava(*args: str, env: dict[str, str], timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([*KAVA, *args], capture_output=True, text=True, env={**ENV, **env}, timeout=timeout)


def one_line_error(proc: subprocess.CompletedProcess) -> str:
    """The stderr of a failed command, which must be one ``error:`` line and nothing else."""
    assert proc.returncode == 1, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    return lines[0]


@pytest.mark.integration
def test_info_and_verify_through_the_cli(s3, bucket_store):
    env, client = s3
    info = kava("store", "info", bucket_store, "--json", env=env)
    assert info.returncode == 0, info.stderr
    shown = json.loads(info.stdout)
    assert shown["path"] == bucket_store and shown["shards"] == 4 and list(shown["teachers"]) == [TEACHER]
    # The bytes in the bucket, as for a directory the bytes on disk: the whole store and the teacher's objects.
    sizes = {o["Key"]: o["Size"] for o in client.list_objects_v2(Bucket=BUCKET, Prefix="kv.zarr/")["Contents"]}
    assert shown["bytes_on_disk"] == sum(sizes.values()) > 0
    assert shown["teachers"][TEACHER]["bytes_on_disk"] == sum(
        n for key, n in sizes.items() if key.startswith(f"kv.zarr/teachers/{TEACHER}/")) > 0
    verify = kava("store", "verify", bucket_store, env=env)
    assert verify.returncode == 0, verify.stderr
    assert verify.stdout.strip().endswith(f"{TEACHER}: 4/4 shards") and "sound" in verify.stdout
    assert verify.stderr == ""  # no asyncio noise at exit


@pytest.mark.integration
def test_flipped_byte_in_a_chunk_object_is_caught(s3, bucket_store):
    _, client = s3
    url = f"s3://{BUCKET}/flipped.zarr"
    copy_store(bucket_store, url, verify=False)
    key = next(o["Key"] for o in client.list_objects_v2(Bucket=BUCKET, Prefix="flipped.zarr/teachers/")["Contents"]
               if "/shards/000002/v/c/" in o["Key"])
    data = bytearray(client.get_object(Bucket=BUCKET, Key=key)["Body"].read())
    data[len(data) // 3] ^= 0x01
    client.put_object(Bucket=BUCKET, Key=key, Body=bytes(data))
    report = verify_store(url)
    assert not report.ok
    assert any("shards/000002/v" in p.where and "crc32c" in p.message for p in report.problems), report.problems
    with pytest.raises(ChecksumError):
        KVStore.open(url).read_shard(2)


@pytest.mark.integration
def test_extraction_resumes_after_an_interruption(s3, bucket_store):
    """Shard 1 lost its completion marker (killed before its last write) and shard 3 half its chunks: --resume
    writes exactly those two again, and the store ends equal to the uninterrupted one."""
    from kava.extract.config import ExtractConfig
    from kava.extract.recipe import run_extract

    _, client = s3
    url = f"s3://{BUCKET}/resumed.zarr"
    copy_store(bucket_store, url, verify=False)
    shards = "resumed.zarr/teachers/" + TEACHER + "/shards/"
    client.delete_object(Bucket=BUCKET, Key=f"{shards}000001/zarr.json")
    for o in client.list_objects_v2(Bucket=BUCKET, Prefix=f"{shards}000003/")["Contents"]:
        if "/k/" in o["Key"] or o["Key"].endswith("000003/zarr.json"):
            client.delete_object(Bucket=BUCKET, Key=o["Key"])
    assert KVStore.open(url).missing_shards(TEACHER) == [1, 3]
    stories = asset_path("models/stories260K_hf_derived")
    result = run_extract(ExtractConfig.from_dict(dict(teacher=str(stories), store=url, resume=True, **OPTIONS)),
                         log=lambda _: None)
    assert result.shards_written == [1, 3] and result.shards_kept == [0, 2]
    assert verify_store(url).ok
    a, b = KVStore.open(url), KVStore.open(bucket_store)
    for s in range(b.num_shards):
        ra, rb = a.read_shard(s).teachers[TEACHER], b.read_shard(s).teachers[TEACHER]
        np.testing.assert_array_equal(ra.k, rb.k)
        np.testing.assert_array_equal(ra.v, rb.v)


@pytest.mark.integration
def test_distill_streams_from_the_bucket(bucket_store, tmp_path):
    """`kava distill` in one process (the stage the command calls, in this process) for two steps."""
    from kava.distill.config import DistillConfig
    from kava.distill.trainer import run_distill

    out = tmp_path / "run"
    result = run_distill(DistillConfig.from_dict(dict(
        out=str(out), store=bucket_store, student="tiny-llama", steps=2, batch_size=4, progress=False,
        checkpoint_every=0)), log=lambda _: None)
    assert result.steps == 2 and result.teachers == [TEACHER]
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(metrics) == 2 and all(np.isfinite(m["loss/ce"]) for m in metrics)


@pytest.mark.integration
def test_copy_local_s3_local_round_trip_is_bit_for_bit(s3, bucket_store, tmp_path):
    first, second = tmp_path / "a.zarr", tmp_path / "b.zarr"
    url = f"s3://{BUCKET}/copied.zarr"
    copy_store(bucket_store, first, verify=False)  # compared bit for bit below; the others verify
    env, _ = s3
    up = kava("store", "cp", str(first), url, env=env)  # through the CLI once
    assert up.returncode == 0, up.stderr
    assert "verified sound" in up.stdout
    copy_store(url, second)
    # Streaming from the bucket (shards read ahead on several threads) gives what the local copy gives, in order.
    streamed = list(KVStore.open(url).iter_shards(dtype=np.float16))
    assert [r.shard for r in streamed] == list(range(4))
    for rows, local in zip(streamed, KVStore.open(first).iter_shards(dtype=np.float16)):
        np.testing.assert_array_equal(rows.teachers[TEACHER].k, local.teachers[TEACHER].k)
        np.testing.assert_array_equal(rows.input_ids, local.input_ids)
    files_a = sorted(p.relative_to(first) for p in first.rglob("*") if p.is_file())
    files_b = sorted(p.relative_to(second) for p in second.rglob("*") if p.is_file())
    assert files_a == files_b and len(files_a) > 20
    assert all((first / f).read_bytes() == (second / f).read_bytes() for f in files_a)
    with pytest.raises(StoreError, match=r"a store \(or another zarr hierarchy\) is already here"):
        copy_store(first, url)


@pytest.mark.integration
def test_an_interrupted_copy_resumes(s3, bucket_store):
    src = remote.open_url(bucket_store, read_only=True)
    url = f"s3://{BUCKET}/partial.zarr"
    dst = remote.open_url(url, read_only=False)
    keys, _ = remote.copy_plan(src, dst, where=url)
    done = keys[: len(keys) // 2]  # killed half way: chunks first, so no root zarr.json yet
    remote.copy_objects(src, dst, done, remote.CopyReport(bucket_store, url))
    from kava.kvstore import zarr_io

    zarr_io.set_bytes(dst, done[-1], b"torn")  # one object cut short by the kill
    with pytest.raises(NotAStoreError):
        KVStore.open(url)
    report = copy_store(bucket_store, url)
    assert report.objects_kept == len(done) - 1 and report.objects_copied == len(keys) - len(done) + 1
    assert verify_store(url).ok


@pytest.mark.integration
def test_missing_bucket_is_one_line(s3):
    env, _ = s3
    line = one_line_error(kava("store", "info", "s3://no-such-bucket-kava/kv.zarr", env=env))
    assert "bucket 'no-such-bucket-kava' does not exist" in line
    with pytest.raises(NotAStoreError, match=r"no store here \(no zarr.json\)"):
        KVStore.open(f"s3://{BUCKET}/nothing-here.zarr")


@pytest.mark.integration
def test_bad_credentials_are_one_line(s3, bucket_store):
    env, _ = s3
    line = one_line_error(kava("store", "info", bucket_store, env={**env, "AWS_SECRET_ACCESS_KEY": "wrong"}))
    assert "access denied" in line and "AWS_SECRET_ACCESS_KEY" in line and env["AWS_SECRET_ACCESS_KEY"] not in line


@pytest.mark.integration
def test_unreachable_endpoint_is_one_line_within_bounded_time(s3):
    env, _ = s3
    started = time.monotonic()
    line = one_line_error(kava("store", "info", f"s3://{BUCKET}/kv.zarr",
                               env={**env, "AWS_ENDPOINT_URL": f"http://127.0.0.1:{free_port()}",
                                    "AWS_MAX_ATTEMPTS": "3"}))
    assert "can't reach http://127.0.0.1:" in line and "after retries with backoff" in line
    assert time.monotonic() - started < 30
