"""The KV store's behaviour, written once as ``StoreConformance`` and run against every backend.

``TestLocalStore`` runs it on a directory (zarr ``LocalStore``), ``TestMemoryStore`` on ``zarr.storage.MemoryStore``.
A new backend gets the whole suite by subclassing and overriding the ``location`` fixture (as zarr's
``testing/store.py`` does). Disk-only behaviour (crashes, concurrent writers, flipped bytes, interop by path) is in
``test_store_disk.py``; randomised round trips are in ``test_store_properties.py``.
"""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import zarr

from kava.kvstore import (
    FORMAT_VERSION,
    ConfigError,
    DatasetSpec,
    IncompleteError,
    KavaError,
    KVStore,
    LayerMap,
    NotAStoreError,
    SampleError,
    SchemaError,
    StorageSpec,
    StoreError,
    StoreManifest,
    TeacherSpec,
    TokenizerSpec,
    create_store,
    default_storage,
    plan_shards,
    sample_ids_hash,
    summary,
    to_dask,
    verify_store,
    zarr_io,
)

# --------------------------------------------------------------------------------------------------------------
# A small store: 7 samples on a 50-token vocabulary, sample 2 skipped (zero tokens), three shards of ~15 tokens.

TOKENIZER = TokenizerSpec(
    name="tiny-student", fingerprint="a" * 64, vocab_size=50, kind="TinyTokenizerFast",
    files=("tokenizer.json",), bos_token_id=1, eos_token_id=2, pad_token_id=None,
)
TOKENIZER_FILES = {"tokenizer.json": b'{"model": {"type": "BPE"}, "added_tokens": []}'}
DATASET = DatasetSpec(name="synthetic", split="train", fingerprint="b" * 64, details={"seed": 0, "template": "plain"})
LENGTHS = [6, 9, 0, 5, 12, 3, 7]
SAMPLE_IDS = [f"row-{i:03d}" for i in range(len(LENGTHS))]
STATUS = ["ok", "truncated", "skipped", "ok", "ok", "ok", "ok"]
SHARD_TOKENS = 15
EXPECTED_SHARD_STARTS = [0, 2, 5, 7]  # cumulative tokens 6, 15 | 0, 5, 17 | 3, 10

# Teacher geometry: 6 layers, 4 of them stored (non-contiguous), GQA with 2 KV heads; Q of layers 3 and 5.
LAYERS = (0, 2, 3, 5)
Q_LAYERS = (3, 5)
KV_HEADS, NUM_HEADS, HEAD_DIM = 2, 4, 8
LAYER_MAP = LayerMap("explicit", (((0, 1.0),), ((2, 0.5), (3, 0.5)), ((5, 1.0),)))

# int8 error bounds, measured on the K-like (channel scales spread 0.5 in log space, two 4x outlier channels, an
# offset) and V-like (plain Gaussian) data below with head_dim 8: ~1.0% and ~0.5%. Per element the error is at
# most half a quantisation step, ``row_absmax / 254`` (plus the fp16 rounding of the scale).
INT8_REL_ERR_K = 0.015
INT8_REL_ERR_V = 0.008


def grid_arrays(lengths=LENGTHS, seed: int = 0, vocab: int = 50):
    rng = np.random.default_rng(seed)
    ids = [rng.integers(0, vocab, n) for n in lengths]
    segs = [np.sort(rng.integers(0, 4, n)) for n in lengths]
    return ids, segs


def make_store(location, *, tokenizer=TOKENIZER, sample_ids=SAMPLE_IDS, lengths=LENGTHS, seed=0, **kwargs):
    ids, segs = grid_arrays(lengths, seed)
    kwargs.setdefault("sample_status", STATUS)
    return create_store(
        location, sample_ids=sample_ids, input_ids=ids, segment_ids=segs, student_tokenizer=tokenizer,
        dataset=DATASET, shard_tokens=SHARD_TOKENS, tokenizer_files=TOKENIZER_FILES,
        created_by="pytest make_store", **kwargs,
    )


def teacher_spec(name: str = "A", dtype: str = "float16", *, with_q: bool = True, chunk_tokens: int = 4,
                 chunk_layers: int = 2, compressor: dict | None = None, **overrides) -> TeacherSpec:
    """chunk_tokens=4 makes chunks cross sample boundaries and shards span several chunk rows."""
    base = default_storage(len(LAYERS), KV_HEADS, HEAD_DIM, dtype)
    storage = dataclasses.replace(
        base, chunk_tokens=chunk_tokens, chunk_layers=chunk_layers,
        compressor=base.compressor if compressor is None else compressor,
    )
    fields = dict(
        name=name, model={"id": f"tiny/{name}", "revision": "abc123", "quantization": "none"}, num_layers=6,
        layers=LAYERS, num_heads=NUM_HEADS, kv_heads=KV_HEADS, head_dim=HEAD_DIM, layer_map=LAYER_MAP,
        rope={"type": "default", "theta": 10000.0}, q_layers=Q_LAYERS if with_q else (), storage=storage,
    )
    fields.update(overrides)
    return TeacherSpec(**fields)


def sample_kv(name: str, i: int, n: int, spec: TeacherSpec) -> dict[str, np.ndarray]:
    """Deterministic K-like, V-like and Q-like float32 data for sample ``i`` of teacher ``name``."""
    rng = np.random.default_rng([sum(map(ord, name)), i])
    shape = (n, len(spec.layers), spec.kv_heads, spec.head_dim)
    chan = np.exp(np.random.default_rng(7).normal(0.0, 0.5, shape[1:])).astype(np.float32)
    chan[..., :2] *= 4.0  # outlier channels, as real keys have
    out = {
        "k": (rng.standard_normal(shape) * chan + 0.3 * chan).astype(np.float32),
        "v": rng.standard_normal(shape).astype(np.float32),
        "align_weight": rng.uniform(0.0, 1.0, n).astype(np.float32),
    }
    if spec.has_q:
        out["q"] = rng.standard_normal((n, len(spec.q_layers), spec.num_heads, spec.head_dim)).astype(np.float32)
    return out


def write_teacher(store: KVStore, spec: TeacherSpec, shards=None, data=sample_kv) -> None:
    store.add_teacher(spec)
    for s in range(store.num_shards) if shards is None else shards:
        with store.shard_writer(spec.name, s) as w:
            for i in store.shard_samples(s):
                d = data(spec.name, i, int(store.offsets[i + 1] - store.offsets[i]), spec)
                w.add(d["k"], d["v"], q=d.get("q"), align_weight=d["align_weight"], sample=i)


def expected_values(x: np.ndarray, dtype: str) -> np.ndarray:
    """What a lossless storage dtype gives back (computed without the store's codecs)."""
    if dtype == "float16":
        return x.astype(np.float16).astype(np.float32)
    if dtype == "float32":
        return x
    if dtype == "bfloat16":
        return bf16_round(x)
    raise ValueError(dtype)


def bf16_round(x: np.ndarray) -> np.ndarray:
    """float32 → nearest bfloat16 (ties to even) → float32, by comparing the two neighbours explicitly."""
    u = np.ascontiguousarray(x, np.float32).view(np.uint32)
    lo = (u & np.uint32(0xFFFF0000)).view(np.float32)
    hi = ((u & np.uint32(0xFFFF0000)) + np.uint32(0x10000)).view(np.float32)
    d_lo, d_hi = np.abs(x - lo), np.abs(hi - x)
    lo_even = ((u >> np.uint32(16)) & np.uint32(1)) == 0
    return np.where((d_lo < d_hi) | ((d_lo == d_hi) & lo_even), lo, hi).astype(np.float32)


def snapshot(store: KVStore) -> dict[str, bytes]:
    """Every key of the backend with its bytes."""
    zs = store.zarr_store
    return {k: zarr_io.get_bytes(zs, k) for k in zarr_io.list_prefix(zs, "")}


# --------------------------------------------------------------------------------------------------------------


class StoreConformance:
    """Behaviour every backend must show. Subclasses override ``location`` with a fresh, empty location."""

    @pytest.fixture
    def location(self, tmp_path):
        raise NotImplementedError("a backend's test class overrides the `location` fixture")

    @pytest.fixture
    def store(self, location) -> KVStore:
        return make_store(location)

    @pytest.fixture
    def full(self, store) -> KVStore:
        """The store with teacher A (float16, with Q) written completely."""
        write_teacher(store, teacher_spec("A"))
        return store

    # ---- the grid and the manifest ----------------------------------------------------------------------------

    def test_create_open_round_trips_grid(self, store, location):
        ids, segs = grid_arrays()
        reopened = KVStore.open(location)
        assert reopened.read_only
        for s in (store, reopened):
            assert s.num_samples == len(LENGTHS) and s.num_tokens == sum(LENGTHS) and s.num_shards == 3
            np.testing.assert_array_equal(s.offsets, np.concatenate([[0], np.cumsum(LENGTHS)]))
            np.testing.assert_array_equal(s.shard_starts, EXPECTED_SHARD_STARTS)
            assert s.sample_ids == SAMPLE_IDS
            np.testing.assert_array_equal(s.sample_status, [0, 1, 2, 0, 0, 0, 0])
            assert s.tokenizer_files() == TOKENIZER_FILES
            rows = s.read_shard(1, teachers=[])
            np.testing.assert_array_equal(rows.input_ids, np.concatenate(ids[2:5]))
            np.testing.assert_array_equal(rows.segment_ids, np.concatenate(segs[2:5]))
            np.testing.assert_array_equal(rows.offsets, [0, 0, 5, 17])
            assert rows.sample_ids == SAMPLE_IDS[2:5] and rows.shard == 1 and len(rows) == 3
            assert s.shard_of("row-004") == 1 and s.shard_of(5) == 2
            assert s.shard_tokens(1) == (15, 32)

        table = reopened.index_table()
        assert table.column_names == ["sample_index", "sample_id", "shard", "token_offset", "num_tokens",
                                      "status", "reason"]
        assert table.column("sample_id").to_pylist() == SAMPLE_IDS
        assert table.column("shard").to_pylist() == [0, 0, 1, 1, 1, 2, 2]
        assert table.column("num_tokens").to_pylist() == LENGTHS
        assert table.column("token_offset").to_pylist() == list(np.cumsum([0, *LENGTHS[:-1]]))
        assert table.column("status").to_pylist() == STATUS

    def test_manifest_round_trips(self, store, location):
        m = KVStore.open(location).manifest
        assert m == store.manifest
        assert m.format_version == FORMAT_VERSION
        assert m.student_tokenizer == TOKENIZER
        assert m.dataset == dataclasses.replace(DATASET, sample_ids_hash=sample_ids_hash(SAMPLE_IDS))
        assert m.created_by == "pytest make_store" and m.created_at
        d = json.loads(json.dumps(m.to_dict()))  # what goes to disk is plain JSON
        assert StoreManifest.from_dict(d) == m
        with pytest.raises(dataclasses.FrozenInstanceError):
            m.num_samples = 3  # type: ignore[misc]

        spec = teacher_spec("A", "int8")
        assert TeacherSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec
        with pytest.raises(dataclasses.FrozenInstanceError):
            spec.layers = (1,)  # type: ignore[misc]
        assert store.add_teacher(spec) == spec
        assert KVStore.open(location).teachers == {"A": spec}

    def test_read_only_store_refuses_writes(self, store, location):
        ro = KVStore.open(location)
        with pytest.raises(StoreError, match="read-only.*mode='a'"):
            ro.add_teacher(teacher_spec("A"))
        store.add_teacher(teacher_spec("A"))
        with pytest.raises(StoreError, match="read-only"):
            ro.shard_writer("A", 0)

    def test_create_rejects_bad_grids(self, location):
        ids, segs = grid_arrays()
        common = dict(student_tokenizer=TOKENIZER, dataset=DATASET)
        with pytest.raises(ConfigError, match="unique sample ids"):
            create_store(location, sample_ids=["a", "a"], input_ids=ids[:2], segment_ids=segs[:2], **common)
        with pytest.raises(ConfigError, match="one input_ids and one segment_ids"):
            create_store(location, sample_ids=["a", "b"], input_ids=ids[:2], segment_ids=segs[:1], **common)
        with pytest.raises(ConfigError, match="segment ids must be 0..3"):
            create_store(location, sample_ids=["a"], input_ids=[[1, 2]], segment_ids=[[0, 4]], **common)
        with pytest.raises(ConfigError, match=r"outside \[0, 50\)"):
            create_store(location, sample_ids=["a"], input_ids=[[1, 50]], segment_ids=[[0, 1]], **common)
        with pytest.raises(NotAStoreError):  # nothing was written by the refused creations
            KVStore.open(location)

    def test_empty_location_is_not_a_store(self, location):
        with pytest.raises(NotAStoreError, match="not a KaVa store|no such directory"):
            KVStore.open(location)

    def test_recreate_same_grid_opens_existing(self, full, location):
        again = make_store(location)
        assert again.manifest == full.manifest  # created_at unchanged: opened, not rewritten
        assert again.complete_shards("A") == [0, 1, 2]
        with pytest.raises(StoreError, match="already exists"):
            make_store(location, exist_ok=False)

    def test_recreate_with_other_grid_is_refused(self, store, location):
        other_tok = dataclasses.replace(TOKENIZER, name="other-student", fingerprint="c" * 64)
        with pytest.raises(StoreError, match="another student grid: student tokenizer 'tiny-student'"):
            make_store(location, tokenizer=other_tok)
        other_ids = [f"other-{i}" for i in range(len(LENGTHS))]
        with pytest.raises(StoreError, match="another student grid: split synthetic:train.*ids hash"):
            make_store(location, sample_ids=other_ids)
        with pytest.raises(StoreError, match="tokenized differently"):
            make_store(location, seed=1)

    # ---- teachers ---------------------------------------------------------------------------------------------

    @pytest.mark.parametrize("name", ["../x", "/abs", "a/b", "", "..", "a..b", ".hidden", "x" * 101, 3])
    def test_bad_teacher_names(self, store, name):
        with pytest.raises(ConfigError, match="Expected a teacher name"):
            teacher_spec(name)
        with pytest.raises(ConfigError, match="Expected a teacher name"):
            store.teacher(name)

    def test_add_teacher_same_name_other_geometry(self, store):
        spec = teacher_spec("A")
        assert store.add_teacher(spec) == spec
        assert store.add_teacher(dataclasses.replace(spec, created_by="a later job")) == spec  # same geometry
        with pytest.raises(StoreError, match="teacher 'A' already exists with different head_dim"):
            store.add_teacher(teacher_spec("A", head_dim=16))
        with pytest.raises(StoreError, match="different layers, kv_heads"):
            store.add_teacher(teacher_spec("A", layers=(0, 2, 3, 4, 5), kv_heads=1))
        with pytest.raises(StoreError, match="different storage"):
            store.add_teacher(teacher_spec("A", "bfloat16"))
        assert list(store.teachers) == ["A"]

    def test_add_teacher_race_keeps_the_winner(self, store, monkeypatch):
        """Two jobs register one teacher at once: both saw no teacher yet, and the one that writes second must
        neither fail (same spec) nor overwrite the first one's spec (different spec)."""
        winner = teacher_spec("A")
        store.add_teacher(winner)
        real_exists = zarr_io.exists
        monkeypatch.setattr(zarr_io, "exists", lambda zs, key: False if key == "teachers/A/zarr.json"
                            else real_exists(zs, key))
        assert store.add_teacher(teacher_spec("A")) == winner
        with pytest.raises(StoreError, match="already exists with different head_dim"):
            store.add_teacher(teacher_spec("A", head_dim=16))
        monkeypatch.undo()
        assert store.teacher("A") == winner

    def test_unknown_teacher(self, store):
        store.add_teacher(teacher_spec("A"))
        with pytest.raises(SchemaError, match=r"no teacher 'B' in this store. It has: A\.$"):
            store.teacher("B")
        with pytest.raises(SchemaError, match="no teacher 'B'"):
            store.read_sample(0, teachers=["B"])

    @pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
    def test_lossless_dtypes_round_trip(self, store, dtype):
        spec = teacher_spec("A", dtype)
        write_teacher(store, spec)
        for s in range(store.num_shards):
            kv = store.read_shard(s, with_q=True).teachers["A"]
            samples = store.shard_samples(s)
            data = [sample_kv("A", i, LENGTHS[i], spec) for i in samples]
            for array in ("k", "v", "q"):
                want = expected_values(np.concatenate([d[array] for d in data]), dtype)
                got = getattr(kv, array)
                assert got.dtype == np.float32
                np.testing.assert_array_equal(got, want)
            np.testing.assert_array_equal(kv.align_weight, np.concatenate([d["align_weight"] for d in data]))
            np.testing.assert_array_equal(kv.status, np.zeros(len(samples)))
            assert kv.layers == LAYERS and kv.q_layers == Q_LAYERS
        half = store.read_sample(3, dtype=np.float16).teachers["A"].k
        assert half.dtype == np.float16

    def test_bfloat16_exact_for_bf16_values(self, store):
        spec = teacher_spec("A", "bfloat16", with_q=False)

        def bf16_data(name, i, n, spec):
            d = sample_kv(name, i, n, spec)
            for a in ("k", "v"):  # make every value bf16-representable, far outside fp16's range too
                d[a] = (d[a] * 1e6).view(np.uint32) & np.uint32(0xFFFF0000)
                d[a] = d[a].view(np.float32)
            return d

        write_teacher(store, spec, data=bf16_data)
        got = store.read_shard(1).teachers["A"]
        want = [bf16_data("A", i, LENGTHS[i], spec) for i in store.shard_samples(1)]
        np.testing.assert_array_equal(got.k, np.concatenate([d["k"] for d in want]))
        np.testing.assert_array_equal(got.v, np.concatenate([d["v"] for d in want]))
        assert np.abs(got.k).max() > 65504  # beyond float16, still exact

    def test_bfloat16_from_torch_bf16(self, store):
        torch = pytest.importorskip("torch")
        spec = teacher_spec("A", "bfloat16", with_q=False)
        store.add_teacher(spec)
        ref = {}
        with store.shard_writer("A", 0) as w:
            for i in store.shard_samples(0):
                d = sample_kv("A", i, LENGTHS[i], spec)
                k, v = torch.from_numpy(d["k"]).bfloat16(), torch.from_numpy(d["v"]).bfloat16()
                ref[i] = (k.float().numpy(), v.float().numpy())
                w.add(k, v, align_weight=torch.from_numpy(d["align_weight"]))
        for i in store.shard_samples(0):
            kv = store.read_sample(i).teachers["A"]
            np.testing.assert_array_equal(kv.k, ref[i][0])
            np.testing.assert_array_equal(kv.v, ref[i][1])
            np.testing.assert_array_equal(kv.k, bf16_round(sample_kv("A", i, LENGTHS[i], spec)["k"]))

    def test_int8_within_stated_error(self, store):
        spec = teacher_spec("A", "int8")
        write_teacher(store, spec)
        for s in range(store.num_shards):
            kv = store.read_shard(s, with_q=True).teachers["A"]
            data = [sample_kv("A", i, LENGTHS[i], spec) for i in store.shard_samples(s)]
            for array, bound in (("k", INT8_REL_ERR_K), ("v", INT8_REL_ERR_V), ("q", INT8_REL_ERR_V)):
                want = np.concatenate([d[array] for d in data])
                got = getattr(kv, array)
                rel = np.linalg.norm(got - want) / np.linalg.norm(want)
                assert rel < bound, f"{array}: relative error {rel:.4f} over the stated {bound}"
                # Half a quantisation step per element, with slack for the fp16-rounded scale.
                step = np.abs(want).max(axis=-1, keepdims=True) / 127
                assert np.all(np.abs(got - want) <= 0.5 * step * (1 + 2**-9) + 1e-7)

    def test_layer_subsets_equal_slicing(self, full):
        everything = full.read_shard(1).teachers["A"]
        for layers in ([2, 3], [0, 2, 3, 5], [3], [0, 5], [5, 0, 3], [0, 3]):
            kv = full.read_shard(1, layers=layers).teachers["A"]
            pos = [LAYERS.index(l) for l in layers]
            np.testing.assert_array_equal(kv.k, everything.k[:, pos])
            np.testing.assert_array_equal(kv.v, everything.v[:, pos])
            assert kv.layers == tuple(layers)
            one = full.read_sample("row-004", layers=layers).teachers["A"]
            np.testing.assert_array_equal(one.k, everything.k[5:, pos])
        with pytest.raises(SchemaError, match=r"stores K/V layers \[0, 2, 3, 5\]; \[1\] were asked for"):
            full.read_shard(1, layers=[1, 2])
        with pytest.raises(ConfigError, match="at least one layer"):
            full.read_shard(1, layers=[])

    def test_int8_layer_subsets(self, store):
        write_teacher(store, teacher_spec("A", "int8", chunk_layers=1))
        everything = store.read_shard(2).teachers["A"]
        for layers in ([2, 3], [0, 5], [5, 2]):
            kv = store.read_shard(2, layers=layers).teachers["A"]
            pos = [LAYERS.index(l) for l in layers]
            np.testing.assert_array_equal(kv.k, everything.k[:, pos])
            np.testing.assert_array_equal(kv.v, everything.v[:, pos])

    def test_q_stored_and_read(self, full, store):
        kv = full.read_sample(4, with_q=True).teachers["A"]
        want = sample_kv("A", 4, LENGTHS[4], teacher_spec("A"))["q"]
        np.testing.assert_array_equal(kv.q, want.astype(np.float16).astype(np.float32))
        assert kv.q.shape == (12, 2, NUM_HEADS, HEAD_DIM) and kv.q_layers == Q_LAYERS
        assert full.read_sample(4).teachers["A"].q is None  # only when asked for
        write_teacher(store, teacher_spec("NoQ", with_q=False))
        with pytest.raises(SchemaError, match="'NoQ' has no stored queries"):
            store.read_sample(4, teachers=["NoQ"], with_q=True)

    def test_random_access_equals_streamed_shards(self, full):
        streamed = list(full.iter_shards(with_q=True))
        assert [r.shard for r in streamed] == [0, 1, 2]
        for rows in streamed:
            kv = rows.teachers["A"]
            for j, i in enumerate(rows.sample_indices):
                a, b = rows.offsets[j], rows.offsets[j + 1]
                for key in (int(i), SAMPLE_IDS[i]):
                    one = full.read_sample(key, with_q=True)
                    assert one.sample_ids == [SAMPLE_IDS[i]] and one.shard == rows.shard
                    np.testing.assert_array_equal(one.offsets, [0, b - a])
                    np.testing.assert_array_equal(one.input_ids, rows.input_ids[a:b])
                    np.testing.assert_array_equal(one.segment_ids, rows.segment_ids[a:b])
                    t = one.teachers["A"]
                    for array in ("k", "v", "q", "align_weight"):
                        np.testing.assert_array_equal(getattr(t, array), getattr(kv, array)[a:b])
                    np.testing.assert_array_equal(t.status, kv.status[j : j + 1])
        back = [full.read_shard(s) for s in (2, 0)]  # any order
        np.testing.assert_array_equal(back[1].teachers["A"].k, streamed[0].teachers["A"].k)
        with pytest.raises(KeyError, match="no sample with id 'nope'"):
            full.read_sample("nope")
        with pytest.raises(IndexError, match=r"sample index 7 out of range \[0, 7\)"):
            full.read_sample(7)
        with pytest.raises(IndexError, match="shard 3 out of range"):
            full.read_shard(3)

    def test_zero_length_sample(self, full):
        assert full.sample_status[2] == 2 and LENGTHS[2] == 0
        one = full.read_sample("row-002", with_q=True)
        kv = one.teachers["A"]
        assert one.input_ids.shape == (0,) and one.offsets.tolist() == [0, 0]
        assert kv.k.shape == (0, len(LAYERS), KV_HEADS, HEAD_DIM) and kv.q.shape == (0, 2, NUM_HEADS, HEAD_DIM)
        assert kv.align_weight.shape == (0,) and kv.status.tolist() == [0]

    def test_complete_and_missing_shards(self, store, location):
        spec = teacher_spec("A")
        write_teacher(store, spec, shards=[2, 0])
        assert store.complete_shards("A") == [0, 2] and store.missing_shards("A") == [1]
        assert KVStore.open(location).complete_shards("A") == [0, 2]
        marker = store.shard_marker("A", 2)
        assert marker["samples"] == [5, 7] and marker["tokens"] == [32, 42] and marker["quarantined"] == []
        assert store.shard_marker("A", 1) is None
        with pytest.raises(StoreError, match="shard 2 is already complete"):
            store.shard_writer("A", 2)
        with pytest.raises(IndexError, match="shard 3 out of range"):
            store.shard_writer("A", 3)
        write_teacher(store, spec, shards=[1])
        assert store.missing_shards("A") == [] and verify_store(location).ok

    # ---- non-finite values --------------------------------------------------------------------------------------

    def test_quarantine_policy(self, store):
        spec = teacher_spec("A")
        store.add_teacher(spec)
        with store.shard_writer("A", 1, nonfinite="quarantine") as w:
            for i in store.shard_samples(1):
                d = sample_kv("A", i, LENGTHS[i], spec)
                if i == 3:
                    d["v"][2, 1, 0, 5] = np.nan
                    d["k"][0, 0, 0, 0] = np.inf
                w.add(d["k"], d["v"], q=d["q"], align_weight=d["align_weight"])
        kv = store.read_shard(1, with_q=True).teachers["A"]
        np.testing.assert_array_equal(kv.status, [0, 1, 0])
        for array in ("k", "v", "q", "align_weight"):
            assert not np.any(getattr(kv, array)[0:5]), f"{array} of the quarantined sample is not zero"
        good = sample_kv("A", 4, LENGTHS[4], spec)
        np.testing.assert_array_equal(kv.k[5:], good["k"].astype(np.float16).astype(np.float32))
        np.testing.assert_array_equal(kv.align_weight[5:], good["align_weight"])
        (q,) = store.shard_marker("A", 1)["quarantined"]
        assert q["sample"] == 3 and q["sample_id"] == "row-003" and "non-finite" in q["reason"]
        write_teacher(store, spec, shards=[0, 2])
        assert summary(store)["teachers"]["A"]["quarantined"] == 1

    def test_error_policy_leaves_writer_usable(self, store):
        spec = teacher_spec("A")
        store.add_teacher(spec)
        with store.shard_writer("A", 1) as w:
            for i in store.shard_samples(1):
                d = sample_kv("A", i, LENGTHS[i], spec)
                if i == 4:
                    bad = d["k"].copy()
                    bad[7, 3, 1, 2] = np.nan
                    before, state = snapshot(store), (w.next_sample, w._row, w._flushed)
                    with pytest.raises(SampleError, match=r"Sample 4 \('row-004'\) of teacher 'A': non-finite.*"
                                                          r"nonfinite='quarantine'"):
                        w.add(bad, d["v"], q=d["q"])
                    assert snapshot(store) == before and (w.next_sample, w._row, w._flushed) == state
                w.add(d["k"], d["v"], q=d["q"], align_weight=d["align_weight"])
        kv = store.read_shard(1).teachers["A"]
        np.testing.assert_array_equal(kv.status, [0, 0, 0])
        want = sample_kv("A", 4, LENGTHS[4], spec)["k"]
        np.testing.assert_array_equal(kv.k[5:], want.astype(np.float16).astype(np.float32))

    def test_bad_samples_rejected_before_any_write(self, store):
        spec = teacher_spec("A")
        store.add_teacher(spec)
        with pytest.raises(SampleError, match="Expected nonfinite in"):
            store.shard_writer("A", 1, nonfinite="ignore")
        with store.shard_writer("A", 1) as w:
            d2, d3, d4 = (sample_kv("A", i, LENGTHS[i], spec) for i in (2, 3, 4))
            w.add(d2["k"], d2["v"], q=d2["q"])  # the zero-length sample
            w.add(d3["k"], d3["v"], q=d3["q"], align_weight=d3["align_weight"])  # 5 rows: one chunk flushed
            before, state = snapshot(store), (w.next_sample, w._row, w._flushed)
            assert state == (4, 5, 4)
            k, v, q = d4["k"], d4["v"], d4["q"]
            rejected = [
                (dict(k=k[:-1], v=v, q=q), r"Sample 4 \('row-004'\), k: expected shape \(12, 4, 2, 8\).*"
                                           r"Got \(11, 4, 2, 8\) instead"),
                (dict(k=k, v=v[:, :3], q=q), r"v: expected shape"),
                (dict(k=k, v=v, q=q[:, :, :2]), r"q: expected shape \(12, 2, 4, 8\)"),
                (dict(k=k.astype(np.int32), v=v, q=q), "k: expected a floating dtype. Got int32"),
                (dict(k=k, v=v, q=q, sample=3), "Expected sample 4 next in shard 1. Got sample 3 instead"),
                (dict(k=k * 1e5, v=v, q=q), r"overflow float16 \(max 65504\).*--kv-dtype bfloat16"),
                (dict(k=k, v=v), "stores queries.*pass q="),
                (dict(k=k, v=v, q=q, align_weight=np.full(12, 1.5)), r"align_weight: expected finite values"),
                (dict(k=k, v=v, q=q, align_weight=np.ones(3)), r"align_weight: expected 12 finite values"),
            ]
            for kwargs, match in rejected:
                with pytest.raises(SampleError, match=match):
                    w.add(**kwargs)
                assert snapshot(store) == before and (w.next_sample, w._row, w._flushed) == state, match
            w.add(k, v, q=q, align_weight=d4["align_weight"], sample=4)
            with pytest.raises(SampleError, match=r"Shard 1 holds 3 samples \(2-4\); an extra sample was added"):
                w.add(k, v, q=q)
        kv = store.read_shard(1, with_q=True).teachers["A"]
        np.testing.assert_array_equal(kv.k, np.concatenate([d2["k"], d3["k"], k]).astype(np.float16).astype(np.float32))
        np.testing.assert_array_equal(kv.align_weight[:5], d3["align_weight"])
        with pytest.raises(StoreError, match="closed"):
            w.add(k, v, q=q)

    def test_fp16_overflow_is_not_quarantined(self, store):
        spec = teacher_spec("A", with_q=False)
        store.add_teacher(spec)
        with pytest.raises(SampleError, match="--kv-dtype bfloat16"):
            with store.shard_writer("A", 0, nonfinite="quarantine") as w:
                d = sample_kv("A", 0, LENGTHS[0], spec)
                w.add(d["k"], d["v"] * 1e6)
        assert store.missing_shards("A") == [0, 1, 2]

    def test_int8_scale_overflow_rejected(self, store):
        """Rows beyond 127 * 65504 would get an infinite float16 scale and read back as NaN."""
        spec = teacher_spec("A", "int8", with_q=False)
        store.add_teacher(spec)
        w = store.shard_writer("A", 0)
        d = sample_kv("A", 0, LENGTHS[0], spec)
        with pytest.raises(SampleError, match="overflow int8's float16 scales.*--kv-dtype bfloat16"):
            w.add(d["k"] * 1e7, d["v"])
        w.add(d["k"] * 1e5, d["v"])  # 127 * 65504 is about 8.3e6: still fine
        assert w.next_sample == 1

    def test_q_given_to_teacher_without_q(self, store):
        spec = teacher_spec("A", with_q=False)
        store.add_teacher(spec)
        w = store.shard_writer("A", 0)
        d = sample_kv("A", 0, LENGTHS[0], teacher_spec("A"))
        with pytest.raises(SampleError, match="registered without queries; q= was given"):
            w.add(d["k"], d["v"], q=d["q"])
        assert w.next_sample == 0

    # ---- unfinished shards --------------------------------------------------------------------------------------

    def test_closing_with_missing_samples(self, store, location):
        spec = teacher_spec("A")
        store.add_teacher(spec)
        with pytest.raises(IncompleteError, match="Teacher 'A' shard 1: 2 of 3 samples were added"):
            with store.shard_writer("A", 1) as w:
                for i in (2, 3):
                    d = sample_kv("A", i, LENGTHS[i], spec)
                    w.add(d["k"], d["v"], q=d["q"])
        assert store.complete_shards("A") == [] and store.shard_marker("A", 1) is None
        with pytest.raises(IncompleteError, match=r"teacher 'A' has not finished shard 1 \(samples 2-4\)"):
            store.read_shard(1)
        with pytest.raises(IncompleteError, match="has not finished shard 1"):
            KVStore.open(location).read_sample("row-003")
        report = verify_store(location)
        assert not report.ok
        assert any(p.where == "teachers/A/shards/000001" and "incomplete" in p.message for p in report.problems)

    def test_exception_inside_writer_leaves_shard_invisible(self, store):
        spec = teacher_spec("A")
        store.add_teacher(spec)
        with pytest.raises(RuntimeError, match="teacher crashed"):
            with store.shard_writer("A", 0) as w:
                for i in store.shard_samples(0):
                    d = sample_kv("A", i, LENGTHS[i], spec)
                    w.add(d["k"], d["v"], q=d["q"])
                raise RuntimeError("teacher crashed")  # every sample added, but close() never ran
        assert store.missing_shards("A") == [0, 1, 2]
        with pytest.raises(IncompleteError):
            store.read_sample(0, teachers=["A"])
        write_teacher(store, spec)  # a rerun rewrites it whole
        np.testing.assert_array_equal(
            store.read_sample(1).teachers["A"].k,
            sample_kv("A", 1, LENGTHS[1], spec)["k"].astype(np.float16).astype(np.float32),
        )

    def test_reading_with_an_unfinished_second_teacher(self, full):
        full.add_teacher(teacher_spec("B"))
        assert full.read_shard(0, teachers=["A"]).teachers["A"].k.shape[0] == 15
        with pytest.raises(IncompleteError, match="teacher 'B' has not finished shard 0"):
            full.read_shard(0)  # default: every registered teacher

    # ---- CKA, verify, interop -----------------------------------------------------------------------------------

    def test_cka_round_trip(self, full, location):
        m = np.random.default_rng(3).uniform(size=(6, 6))
        full.write_cka("A", "teacher_teacher", m, estimator="linear", samples=7)
        full.write_cka("A", "teacher_student", m[:, :3])
        got = KVStore.open(location).cka("A")
        assert sorted(got) == ["teacher_student", "teacher_teacher"]
        np.testing.assert_array_equal(got["teacher_teacher"][0], m)
        assert got["teacher_teacher"][1] == {"estimator": "linear", "samples": 7}
        np.testing.assert_array_equal(got["teacher_student"][0], m[:, :3])
        assert full.cka("A")["teacher_student"][0].shape == (6, 3)
        full.write_cka("A", "teacher_student", m[:4, :2])  # overwrite with another shape
        assert full.cka("A")["teacher_student"][0].shape == (4, 2)
        full.write_cka("A", "teacher_teacher", 1 - m, estimator="linear", samples=9)  # same shape: in place
        matrix, attrs = KVStore.open(location).cka("A")["teacher_teacher"]
        np.testing.assert_array_equal(matrix, 1 - m)
        assert attrs == {"estimator": "linear", "samples": 9}
        with pytest.raises(ConfigError, match="2-D CKA matrix"):
            full.write_cka("A", "bad", m[0])
        with pytest.raises(SchemaError, match="no teacher 'Z'"):
            full.write_cka("Z", "teacher_teacher", m)
        assert verify_store(location).ok

    def test_verify_ok_and_counts(self, full, location):
        report = verify_store(location)
        assert report.ok, report.problems
        assert report.shards_complete == {"A": 3} and report.shards_expected == 3
        assert report.chunks_checked > 3 * 3 * 4 and report.to_dict()["ok"] is True

    def test_to_dask_equals_shards(self, full):
        stored = np.concatenate([full.read_shard(s, with_q=True).teachers["A"].q for s in range(3)])
        np.testing.assert_array_equal(to_dask(full, "A", "q").compute(), stored)
        full.add_teacher(teacher_spec("B"))
        with pytest.raises(IncompleteError, match="teacher 'B' has 3 unfinished shards"):
            to_dask(full, "B", "k")

    def test_summary(self, full):
        info = summary(full)
        assert info["samples"] == 7 and info["tokens"] == sum(LENGTHS) and info["shards"] == 3
        assert info["samples_by_status"] == {"ok": 5, "truncated": 1, "skipped": 1}
        t = info["teachers"]["A"]
        assert t["shards_complete"] == 3 and t["has_q"] and t["dtype"] == "float16" and t["compressor"] == "zstd"
        # K + V + Q of every token in float16.
        assert t["bytes_logical"] == sum(LENGTHS) * HEAD_DIM * 2 * (2 * len(LAYERS) * KV_HEADS + 2 * NUM_HEADS)
        json.dumps(info)


class TestLocalStore(StoreConformance):
    @pytest.fixture
    def location(self, tmp_path):
        return tmp_path / "store"


class TestMemoryStore(StoreConformance):
    @pytest.fixture
    def location(self):
        return zarr.storage.MemoryStore()


# --------------------------------------------------------------------------------------------------------------
# Backend-independent pieces


def test_plan_shards():
    np.testing.assert_array_equal(plan_shards(np.array(LENGTHS), shard_tokens=SHARD_TOKENS), EXPECTED_SHARD_STARTS)
    np.testing.assert_array_equal(plan_shards(np.array(LENGTHS), shard_tokens=1000, max_samples=3), [0, 3, 6, 7])
    np.testing.assert_array_equal(plan_shards(np.zeros(0, np.int64), shard_tokens=10), [0])


def test_default_storage_plans_big_chunks():
    small = default_storage(4, 2, 8, "float16")
    assert small.chunk_layers == 4 and small.chunk_tokens * 4 * 2 * 8 * 2 >= 1 << 20
    big = default_storage(28, 4, 128, "float16")  # Qwen2.5-7B: one layer per chunk, >= 1 MB each
    assert big.chunk_layers == 1 and big.chunk_tokens * 4 * 128 * 2 >= 1 << 20
    assert default_storage(4, 2, 8, compress=False).compressor == {}


def test_storage_spec_parses():
    with pytest.raises(SchemaError, match="storage.dtype: expected one of float16, bfloat16, float32, int8, int4, "
                                          "int2. Got 'float8' instead"):
        StorageSpec(dtype="float8")
    with pytest.raises(SchemaError, match="storage.chunk_tokens: expected an integer >= 1"):
        StorageSpec(chunk_tokens=0)
    with pytest.raises(SchemaError, match="expected weights summing to 1"):
        LayerMap("explicit", (((0, 0.5),),))
    with pytest.raises(SchemaError, match=r"layers: expected every teacher layer the layer map uses.*missing \[5\]"):
        teacher_spec("A", layers=(0, 2, 3))
    assert issubclass(SchemaError, KavaError) and issubclass(NotAStoreError, StoreError)
