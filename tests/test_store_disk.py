"""The store on disk: crashes and resume, concurrent writers, corruption, non-stores, interop, file counts.

Writers that crash or run side by side are real processes (``sys.executable`` running a small script written to
``tmp_path``), because the guarantees under test are about what another process finds on disk.
"""

from __future__ import annotations

import functools
import json
import os
import runpy
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import zarr

from kava.kvstore import (
    ChecksumError,
    DatasetSpec,
    FormatVersionError,
    KVStore,
    LayerMap,
    NotAStoreError,
    SchemaError,
    TeacherSpec,
    TokenizerSpec,
    create_store,
    default_storage,
    to_dask,
    to_xarray,
    verify_store,
)

# The writer script. The test process loads the same file with runpy (so ``__main__`` does not run) to build
# reference data with exactly the functions the subprocesses used.
WRITER_SCRIPT = r'''
import json, os, signal, sys, time
from pathlib import Path

import numpy as np

from kava.kvstore import KVStore, LayerMap, StorageSpec, TeacherSpec, create_store

COMPRESSOR = {"name": "blosc", "configuration": {"cname": "zstd", "clevel": 1, "shuffle": "shuffle"}}


def spec(name):
    # chunk_tokens=8: every shard spans several chunk rows and chunks cross sample boundaries.
    return TeacherSpec(
        name=name, model={"id": f"tiny/{name}"}, num_layers=3, layers=(0, 2), num_heads=4, kv_heads=2, head_dim=8,
        layer_map=LayerMap("proportional", (((0, 1.0),), ((2, 1.0),))), q_layers=(2,),
        storage=StorageSpec(dtype="float16", compressor=COMPRESSOR, chunk_tokens=8, chunk_layers=2),
    )


def sample(name, i, n):
    rng = np.random.default_rng([sum(map(ord, name)), i])
    return {
        "k": rng.standard_normal((n, 2, 2, 8)).astype(np.float32),
        "v": rng.standard_normal((n, 2, 2, 8)).astype(np.float32),
        "q": rng.standard_normal((n, 1, 4, 8)).astype(np.float32),
        "align_weight": rng.uniform(0, 1, n).astype(np.float32),
    }


def write(store, name, shards, crash_at=None):
    """Write whole shards; ``crash_at=(shard, j)`` SIGKILLs this process before adding the j-th sample of shard."""
    for s in shards:
        w = store.shard_writer(name, s)
        for j, i in enumerate(store.shard_samples(s)):
            if crash_at is not None and (s, j) == tuple(crash_at):
                os.kill(os.getpid(), signal.SIGKILL)
            d = sample(name, i, int(store.offsets[i + 1] - store.offsets[i]))
            w.add(d["k"], d["v"], q=d["q"], align_weight=d["align_weight"], sample=i)
        w.close()


if __name__ == "__main__":
    args = json.loads(sys.argv[1])
    if "ready" in args:  # line up with the other writers so they really run at the same time
        Path(args["ready"]).touch()
        deadline = time.monotonic() + 60
        while not Path(args["go"]).exists():
            if time.monotonic() > deadline:
                sys.exit("no go signal")
            time.sleep(0.005)
    store = KVStore.open(args["path"], mode="a")
    store.add_teacher(spec(args["teacher"]))
    write(store, args["teacher"], args["shards"], args.get("crash_at"))
'''

TOKENIZER = TokenizerSpec(name="tiny-student", fingerprint="e" * 64, vocab_size=100)
DATASET = DatasetSpec(name="synthetic", split="test", fingerprint="f" * 64)
LENGTHS = [7, 0, 13, 4, 9, 11, 2, 15, 6, 8, 10, 3]  # 88 tokens
SHARD_TOKENS = 20  # shards: [0,3) 20 | [3,6) 24 | [6,8) 17 -> [6,9) 23 | [9,12) 21


def create(path: Path, lengths=LENGTHS, shard_tokens=SHARD_TOKENS) -> KVStore:
    rng = np.random.default_rng(1)
    return create_store(
        path, sample_ids=[f"s{i}" for i in range(len(lengths))],
        input_ids=[rng.integers(0, 100, n) for n in lengths], segment_ids=[np.zeros(n, int) for n in lengths],
        student_tokenizer=TOKENIZER, dataset=DATASET, shard_tokens=shard_tokens,
    )


@pytest.fixture
def script(tmp_path) -> Path:
    path = tmp_path / "kv_writer.py"
    path.write_text(WRITER_SCRIPT)
    return path


@pytest.fixture
def writer(script):
    """The script's functions, for the reference data the test process compares against."""
    return runpy.run_path(str(script), run_name="kv_writer")


@pytest.fixture
def run_writer(script):
    """Start the writer script with JSON arguments; any process still running at teardown is killed."""
    started: list[subprocess.Popen] = []

    def start(**args) -> subprocess.Popen:
        proc = subprocess.Popen([sys.executable, str(script), json.dumps(args)], stderr=subprocess.PIPE, text=True)
        started.append(proc)
        return proc

    yield start
    for proc in started:
        if proc.poll() is None:
            proc.kill()
        proc.communicate()


def finish(proc: subprocess.Popen, timeout: float = 60) -> tuple[int, str]:
    _, err = proc.communicate(timeout=timeout)
    return proc.returncode, err


@pytest.fixture
def written(tmp_path, writer) -> tuple[Path, KVStore]:
    """A store with teacher A written completely, in this process."""
    path = tmp_path / "store"
    store = create(path)
    store.add_teacher(writer["spec"]("A"))
    writer["write"](store, "A", range(store.num_shards))
    return path, KVStore.open(path)


def assert_same_arrays(a: Path, b: Path) -> None:
    """Every array of store ``a`` equals store ``b``'s: same paths, shapes, dtypes, chunks, values, attributes."""
    def arrays(path: Path) -> dict[str, zarr.Array]:
        with warnings.catch_warnings():
            # index.parquet sits at the store's root by design (FORMAT.md); walking the hierarchy, zarr warns
            # that it "is not recognized as a component of a Zarr hierarchy".
            warnings.filterwarnings("ignore", "Object at index.parquet is not recognized", zarr.errors.ZarrUserWarning)
            members = zarr.open_group(path, mode="r").members(max_depth=None)
        return {name: node for name, node in members if isinstance(node, zarr.Array)}

    arrays_a, arrays_b = arrays(a), arrays(b)
    assert sorted(arrays_a) == sorted(arrays_b)
    assert any(name.startswith("teachers/A/shards/000001/") for name in arrays_a)
    for name, x in arrays_a.items():
        y = arrays_b[name]
        assert (x.shape, x.dtype, x.chunks, dict(x.attrs)) == (y.shape, y.dtype, y.chunks, dict(y.attrs)), name
        np.testing.assert_array_equal(x[...], y[...], err_msg=name)


def flip_byte(path: Path, position: float = 0.5) -> None:
    data = bytearray(path.read_bytes())
    data[int(len(data) * position)] ^= 0x40
    path.write_bytes(bytes(data))


# --------------------------------------------------------------------------------------------------------------
# (a) crash mid-shard, then resume


@pytest.mark.integration
def test_crash_mid_shard_then_resume(tmp_path, run_writer, writer, written):
    path = tmp_path / "crashed"
    store = create(path)
    assert store.shard_starts.tolist() == [0, 3, 6, 9, 12]
    # Shard 0 whole, then the first two samples of shard 1 (13 rows, so one 8-row chunk is already on disk).
    rc, err = finish(run_writer(path=str(path), teacher="A", shards=[0, 1], crash_at=[1, 2]))
    assert rc == -9, err
    assert (path / "teachers/A/shards/000001/k/c/0/0/0/0").exists()  # a partial shard really is on disk

    store = KVStore.open(path, mode="a")
    assert store.complete_shards("A") == [0] and store.missing_shards("A") == [1, 2, 3]
    report = verify_store(path)
    incomplete = {p.where for p in report.problems if "incomplete" in p.message}
    assert incomplete == {"teachers/A/shards/000001", "teachers/A/shards/000002", "teachers/A/shards/000003"}
    assert "samples 3-5" in str(next(p for p in report.problems if p.where.endswith("000001")))

    writer["write"](store, "A", store.missing_shards("A"))  # the resumed run
    assert verify_store(path).ok
    assert_same_arrays(path, written[0])
    resumed, reference = KVStore.open(path), written[1]
    for s in range(4):
        x, y = resumed.read_shard(s, with_q=True), reference.read_shard(s, with_q=True)
        for array in ("k", "v", "q", "align_weight", "status"):
            np.testing.assert_array_equal(getattr(x.teachers["A"], array), getattr(y.teachers["A"], array))


# --------------------------------------------------------------------------------------------------------------
# (b) concurrent writers


@pytest.mark.integration
def test_concurrent_writers(tmp_path, run_writer, writer):
    path = tmp_path / "store"
    store = create(path)
    jobs = {"a-even": ("A", [0, 2]), "a-odd": ("A", [3, 1]), "b-all": ("B", [0, 1, 2, 3])}
    procs = {
        job: run_writer(path=str(path), teacher=t, shards=shards, ready=str(tmp_path / f"ready-{job}"),
                        go=str(tmp_path / "go"))
        for job, (t, shards) in jobs.items()
    }
    deadline = time.monotonic() + 60
    while not all((tmp_path / f"ready-{job}").exists() for job in jobs):
        assert time.monotonic() < deadline and all(p.poll() is None for p in procs.values()), "a writer died early"
        time.sleep(0.01)
    (tmp_path / "go").touch()
    for job, proc in procs.items():
        rc, err = finish(proc)
        assert rc == 0, f"{job}: {err}"

    report = verify_store(path)
    assert report.ok, report.problems
    assert report.shards_complete == {"A": 4, "B": 4}
    store = KVStore.open(path)
    assert sorted(store.teachers) == ["A", "B"]
    for i in range(store.num_samples):
        rows = store.read_sample(i, with_q=True)
        for t in ("A", "B"):
            want = writer["sample"](t, i, LENGTHS[i])
            got = rows.teachers[t]
            for array in ("k", "v", "q"):
                np.testing.assert_array_equal(getattr(got, array), want[array].astype(np.float16).astype(np.float32))
            np.testing.assert_array_equal(got.align_weight, want["align_weight"])
    writers = {store.shard_marker("A", s)["writer"] for s in range(4)}
    assert len(writers) == 2  # two processes really did share teacher A


# --------------------------------------------------------------------------------------------------------------
# (c) corruption


def test_flipped_byte_in_k_chunk(written):
    path, store = written
    s1 = store.shard_samples(1)
    t0, _ = store.shard_tokens(1)
    chunk = path / "teachers/A/shards/000001/k/c/0/0/0/0"
    flip_byte(chunk)

    report = verify_store(path)
    assert not report.ok
    (problem,) = report.problems
    # Chunk 0 of shard 1 is its first 8 rows: tokens 20-27, which belong to samples 3 (4 tokens) and 4.
    first = int(np.searchsorted(store.offsets, t0, side="right") - 1)
    last = int(np.searchsorted(store.offsets, t0 + 7, side="right") - 1)
    assert (first, last) == (3, 4) and s1.start == 3
    assert problem.where == "teachers/A/shards/000001/k"
    assert "fails its crc32c checksum" in problem.message
    assert f"shard 1, tokens {t0}-{t0 + 7}, samples {first}-{last}" in problem.message

    with pytest.raises(ChecksumError, match=r"teacher 'A' shard 1 array 'k' \(samples 3-5\).*kava store verify"):
        store.read_shard(1)
    with pytest.raises(ChecksumError, match=r"teacher 'A' shard 1 array 'k' \(samples 4-4\)"):
        KVStore.open(path).read_sample("s4")
    with pytest.raises(ChecksumError, match="teacher 'A' shard 1"):
        store.read_shard(1, layers=[2])
    store.read_sample("s5")  # rows 13-23 of the shard: other chunks, still readable
    store.read_shard(1, teachers=[])  # the grid is intact
    assert store.read_shard(0).teachers["A"].k.shape == (20, 2, 2, 8)


def test_flipped_byte_in_grid_and_index(written):
    path, _ = written
    flip_byte(path / "grid/input_ids/c/0")
    with pytest.raises(ChecksumError, match="grid/input_ids"):
        KVStore.open(path).read_shard(0, teachers=[])
    flip_byte(path / "index.parquet")
    report = verify_store(path)
    where = {p.where: p.message for p in report.problems}
    assert set(where) == {"grid/input_ids", "index.parquet"}, report.problems
    assert "chunk (0,) fails its crc32c checksum: corrupted (input_ids rows 0-87)" in where["grid/input_ids"]
    assert "index.parquet is unreadable or corrupted" in where["index.parquet"]
    with pytest.raises(SchemaError, match="index.parquet is unreadable or corrupted"):
        KVStore.open(path).read_sample(0)


def test_corrupted_index_footer(written):
    """Page checksums do not cover the Parquet footer: a flipped column name is caught by the schema check."""
    path, store = written
    good = store.index_table()
    data = (path / "index.parquet").read_bytes()
    positions = [i for i in range(len(data)) if data.startswith(b"sample_id", i)]
    reported = 0
    for pos in positions:
        bad = bytearray(data)
        bad[pos] ^= 0x40  # "sample_id" -> "3ample_id"
        (path / "index.parquet").write_bytes(bytes(bad))
        problems = verify_store(path).problems
        if problems:
            assert [p.where for p in problems] == ["index.parquet"]
            with pytest.raises(SchemaError, match="index.parquet is unreadable or corrupted"):
                KVStore.open(path).index_table()
            reported += 1
        else:
            assert KVStore.open(path).index_table().equals(good)
    assert reported >= 1


def test_corrupted_metadata_is_reported(written):
    """zarr.json documents carry no checksum; a corrupted one is still a finding, not a crash."""
    path, _ = written
    meta = path / "teachers/A/shards/000001/k/zarr.json"
    text = meta.read_text()
    meta.write_text(text.replace('"chunk_shape"', '"chunk_shap"'))
    (problem,) = verify_store(path).problems
    assert problem.where == "teachers/A/shards/000001/k" and "unreadable array metadata" in problem.message
    with pytest.raises(SchemaError, match="metadata of array 'teachers/A/shards/000001/k' .* is unreadable"):
        KVStore.open(path).read_shard(1)
    meta.write_text(text)

    teacher = path / "teachers/A/zarr.json"
    teacher.write_text(teacher.read_text()[:-20])  # a torn document
    (problem,) = verify_store(path).problems
    assert problem.where == "teachers/A" and "teachers/A/zarr.json is unreadable or corrupted" in problem.message
    with pytest.raises(SchemaError, match="teachers/A/zarr.json is unreadable or corrupted"):
        KVStore.open(path).read_sample(0)


def test_deleted_chunk_is_reported_missing(written):
    path, _ = written
    (path / "teachers/A/shards/000002/v/c/1/0/0/0").unlink()
    (problem,) = verify_store(path).problems
    assert problem.where == "teachers/A/shards/000002/v"
    assert "chunk (1, 0, 0, 0) is missing (shard 2, tokens 52-59, samples 7-7)" in problem.message


# --------------------------------------------------------------------------------------------------------------
# (d) not a store


def test_not_a_store(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(NotAStoreError, match="not a KaVa store"):
        KVStore.open(empty)
    with pytest.raises(NotAStoreError, match="no such directory"):
        KVStore.open(tmp_path / "missing")
    with pytest.raises(NotAStoreError, match="no such directory"):
        verify_store(tmp_path / "missing")
    plain = tmp_path / "plain"
    zarr.open_group(plain, mode="w").attrs["something"] = 1
    with pytest.raises(NotAStoreError, match="a zarr group, but not a KaVa store.*'kava' manifest"):
        KVStore.open(plain)
    array = tmp_path / "array"
    zarr.create_array(array, shape=(3,), dtype="i4")
    with pytest.raises(NotAStoreError, match="not a KaVa store"):
        KVStore.open(array)


def test_newer_format_version(tmp_path):
    path = tmp_path / "store"
    create(path)
    root = zarr.open_group(path, mode="a")
    manifest = root.attrs["kava"]
    root.attrs["kava"] = {**manifest, "format_version": 6}
    with pytest.raises(FormatVersionError, match="format version 6; this kava reads up to 5. Upgrade kava"):
        KVStore.open(path)
    with pytest.raises(FormatVersionError, match="Upgrade"):
        verify_store(path)
    root.attrs["kava"] = {**manifest, "num_samples": "twelve"}
    with pytest.raises(SchemaError, match="bad manifest: num_samples: expected an integer. Got 'twelve' instead"):
        KVStore.open(path)


# --------------------------------------------------------------------------------------------------------------
# (e) interop by path


def test_interop(written):
    path, store = written
    shard0 = store.read_shard(0, with_q=True).teachers["A"]

    k = zarr.open_array(str(path / "teachers/A/shards/000000/k"), mode="r")
    assert k.dtype == np.float16 and k.shape == (20, 2, 2, 8)
    assert k.metadata.dimension_names == ("token", "layer", "kv_head", "head_dim")
    np.testing.assert_array_equal(k[...].astype(np.float32), shard0.k)

    import dask.array as da

    v = da.from_zarr(str(path), component="teachers/A/shards/000000/v")
    np.testing.assert_array_equal(v.compute().astype(np.float32), shard0.v)

    import xarray as xr

    ds = xr.open_zarr(path, group="teachers/A/shards/000000", consolidated=False)
    assert ds["k"].dims == ("token", "layer", "kv_head", "head_dim")
    assert ds["q"].dims == ("token", "q_layer", "q_head", "head_dim")
    assert ds["align_weight"].dims == ("token",) and ds["sample_status"].dims == ("sample",)
    np.testing.assert_array_equal(ds["k"].values.astype(np.float32), shard0.k)

    whole = np.concatenate([store.read_shard(s).teachers["A"].k for s in range(store.num_shards)])
    np.testing.assert_array_equal(to_dask(store, "A", "k").compute(), whole)
    x = to_xarray(store, "A")
    assert x["k"].dims == ("token", "layer", "kv_head", "head_dim") and x.sizes["token"] == sum(LENGTHS)
    assert x["q"].dims == ("token", "q_layer", "q_head", "head_dim")
    assert x["layer"].values.tolist() == [0, 2] and x.attrs["k_rope"] == "pre"
    np.testing.assert_array_equal(x["k"].values, whole)
    np.testing.assert_array_equal(x["input_id"].values, np.concatenate(
        [store.read_shard(s, teachers=[]).input_ids for s in range(store.num_shards)]))

    import pyarrow.parquet as pq

    table = pq.read_table(path / "index.parquet")
    assert table.column("sample_id").to_pylist() == [f"s{i}" for i in range(len(LENGTHS))]
    assert table.column("shard").to_pylist() == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3]


# --------------------------------------------------------------------------------------------------------------
# (f) file count


def test_many_samples_few_files(tmp_path):
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 9, 2000)
    path = tmp_path / "store"
    store = create(path, lengths=lengths, shard_tokens=4000)
    spec = TeacherSpec(
        name="tiny", model={"id": "tiny"}, num_layers=2, layers=(0, 1), num_heads=2, kv_heads=1, head_dim=4,
        layer_map=LayerMap("proportional", (((0, 1.0),), ((1, 1.0),))), storage=default_storage(2, 1, 4),
    )
    store.add_teacher(spec)
    kv = rng.standard_normal((int(lengths.max()), 2, 1, 4)).astype(np.float32)
    for s in range(store.num_shards):
        with store.shard_writer("tiny", s) as w:
            for i in store.shard_samples(s):
                w.add(kv[: lengths[i]], kv[: lengths[i]])
    assert store.num_shards == 3
    files = [f for _, _, fs in os.walk(path) for f in fs]
    assert len(files) < 60, sorted(files)  # 2000 samples, tens of files
    assert verify_store(path).ok


# ---------------------------------------------------------------------------------------------------------------------
# The fast read path (chunk files decoded directly) against zarr's own reads


@pytest.mark.parametrize("dtype", ["float16", "int8", "bfloat16"])
@pytest.mark.parametrize("compress", [True, False])
@pytest.mark.parametrize("chunk_layers", [1, 3])
def test_fast_read_path_equals_zarr(tmp_path, dtype, compress, chunk_layers):
    import zarr as zarr_mod

    from kava.kvstore import fastread, layout, rules
    from kava.kvstore.manifest import StorageSpec

    rng = np.random.default_rng(7)
    lengths = [int(n) for n in rng.integers(1, 40, 12)]
    store = create_store(
        tmp_path / "kv.zarr", sample_ids=[f"s{i}" for i in range(12)],
        input_ids=[np.zeros(n, np.int64) for n in lengths], segment_ids=[np.zeros(n, np.int64) for n in lengths],
        student_tokenizer=TokenizerSpec("t", "f", 10), dataset=DatasetSpec("d", "train", "f"), shard_tokens=10_000,
    )
    storage = StorageSpec(dtype=dtype, compressor=dict(default_storage(3, 2, 4).compressor) if compress else {},
                          chunk_tokens=16, chunk_layers=chunk_layers)
    store.add_teacher(TeacherSpec(
        name="A", model={}, num_layers=3, layers=(0, 1, 2), num_heads=2, kv_heads=2, head_dim=4, storage=storage,
        layer_map=LayerMap("explicit", (((0, 1.0),), ((1, 1.0),), ((2, 1.0),))),
    ))
    with store.shard_writer("A", 0) as w:
        for n in lengths:
            w.add(rng.standard_normal((n, 3, 2, 4)), rng.standard_normal((n, 3, 2, 4)))
    total = sum(lengths)
    for name in ("k", "k_scale") if dtype == "int8" else ("k",):
        key = layout.shard_array_key("A", 0, name)
        arr = zarr_mod.open_array(store.zarr_store, path=key, mode="r")
        for rows in [(0, total), (0, 16), (5, 37), (16, 32), (total - 3, total), (7, 8)]:
            for sel in [slice(None), slice(1, 3), [0, 2], [2, 0], [1]]:
                info = fastread.array_info(store.zarr_store, key)
                assert info is not None, "the fast path should apply to what this package writes"
                fast = fastread.read(info, key, rows, sel)
                assert fast is not None, "the fast path should apply to what this package writes"
                want = arr.get_orthogonal_selection((slice(*rows), sel)) if isinstance(sel, list) \
                    else arr[rows[0]:rows[1], sel]
                np.testing.assert_array_equal(fast, want)
    if dtype == "int8":
        return
    # A value check sees exactly the rows and layers read, chunk by chunk: one Inf at (row 20, layer 2) is found
    # by a read that covers both, and by no other.
    key = layout.shard_array_key("A", 0, "k")
    arr = zarr_mod.open_array(store.zarr_store, path=key, mode="r+")
    data = arr[...]
    data[20, 2, 1, 3] = 0x7F80 if dtype == "bfloat16" else np.inf  # (bfloat16 is stored as its bits)
    arr[...] = data
    info = fastread.array_info(store.zarr_store, key)
    assert info is not None
    finite = functools.partial(rules.finite_problem, dtype=dtype)
    for rows in [(0, total), (0, 16), (5, 37), (16, 32), (20, 21), (21, total), (7, 8)]:
        for sel in [slice(None), slice(1, 3), slice(0, 2), [0, 2], [2, 0], [1]]:
            out, futures = fastread.submit(info, key, rows, sel, check=finite)
            found = {f.result() for f in futures} - {None}
            layers = np.arange(3)[sel]
            assert bool(found) == (rows[0] <= 20 < rows[1] and 2 in layers), (rows, sel, found)


def test_fast_read_path_refuses_a_missing_chunk_instead_of_zeros(tmp_path):
    store = _small_store(tmp_path)
    chunk = tmp_path / "kv.zarr" / "teachers/A/shards/000000/k/c/0/0/0/0"
    chunk.unlink()
    with pytest.raises(SchemaError, match=r"chunk \(0, 0, 0, 0\) is missing"):
        KVStore.open(tmp_path / "kv.zarr").read_shard(0)
    del store


def _small_store(tmp_path):
    rng = np.random.default_rng(0)
    store = create_store(
        tmp_path / "kv.zarr", sample_ids=["a", "b"], input_ids=[np.zeros(5, np.int64), np.zeros(7, np.int64)],
        segment_ids=[np.zeros(5, np.int64), np.zeros(7, np.int64)], student_tokenizer=TokenizerSpec("t", "f", 10),
        dataset=DatasetSpec("d", "train", "f"),
    )
    store.add_teacher(TeacherSpec(
        name="A", model={}, num_layers=1, layers=(0,), num_heads=1, kv_heads=1, head_dim=4,
        layer_map=LayerMap("explicit", (((0, 1.0),),)), storage=default_storage(1, 1, 4),
    ))
    with store.shard_writer("A", 0) as w:
        w.add(rng.standard_normal((5, 1, 1, 4)), rng.standard_normal((5, 1, 1, 4)))
        w.add(rng.standard_normal((7, 1, 1, 4)), rng.standard_normal((7, 1, 1, 4)))
    return store


def test_temporaries_left_by_a_killed_write_are_not_nodes(tmp_path):
    """A LocalStore write goes through ``zarr.<id>.partial`` beside its target; SIGKILL can leave one behind."""
    _small_store(tmp_path)
    root = tmp_path / "kv.zarr"
    for folder in (root / "teachers", root / "teachers/A/shards", root / "teachers/A/cka"):
        (folder / "zarr.0123abcd.partial").write_bytes(b"{")
    store = KVStore.open(root)
    assert list(store.teachers) == ["A"]
    assert store.complete_shards("A") == [0] and store.cka("A") == {}
    report = verify_store(root)
    assert report.ok, report.problems


def test_shard_writers_write_only_under_their_shard(tmp_path):
    """Everything a shard writer creates lies under its shard's folder, so a writer killed at any moment leaves
    nothing outside what a resumed run deletes and rewrites."""
    store = _small_store(tmp_path)
    root = tmp_path / "kv.zarr"
    before = {p for p in root.rglob("*") if "shards/000000" not in str(p)}
    stamps = {p: p.stat().st_mtime_ns for p in before if p.is_file()}
    import shutil

    shutil.rmtree(root / "teachers/A/shards/000000")
    rng = np.random.default_rng(1)
    with store.shard_writer("A", 0) as w:
        w.add(rng.standard_normal((5, 1, 1, 4)), rng.standard_normal((5, 1, 1, 4)))
        w.add(rng.standard_normal((7, 1, 1, 4)), rng.standard_normal((7, 1, 1, 4)))
    after = {p for p in root.rglob("*") if "shards/000000" not in str(p)}
    assert after == before
    assert {p: p.stat().st_mtime_ns for p in after if p.is_file()} == stamps
