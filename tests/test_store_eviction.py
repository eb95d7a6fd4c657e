"""Compressed teachers in the store (format version 4): only the kept rows of a segment, their positions, reads by
sample and by shard, the dense view, verify, and the rules a writer and a reader enforce."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import zarr

from kava.core.errors import SampleError, SchemaError, StoreError
from kava.kvstore import (
    DatasetSpec,
    EvictionSpec,
    KVStore,
    LayerMap,
    StorageSpec,
    TeacherSpec,
    TokenizerSpec,
    create_store,
    verify_store,
)
from kava.kvstore.eviction import keep_count, kept_problem, slot_counts

COMPRESSOR = {"name": "blosc", "configuration": {"cname": "zstd", "clevel": 1, "shuffle": "shuffle"}}
# Per sample: prompt (0), reasoning (1), answer (2), then the EOS (3). Sample 2 has no reasoning, sample 4 is empty.
SEGMENTS = [[0] * 3 + [1] * 9 + [2] * 2 + [3], [0] * 2 + [1] * 20 + [2] * 3 + [3], [0] * 4 + [2] * 2 + [3],
            [0] * 1 + [1] * 5 + [2] * 1 + [3], [], [0] * 2 + [1] * 13 + [2] * 2 + [3]]
LAYERS, HEADS, DIM = 2, 2, 8


def spec(name: str, eviction: EvictionSpec | None, dtype: str = "float16") -> TeacherSpec:
    groups = {"group_tokens": 8, "group_channels": 8} if dtype == "int4" else {}
    return TeacherSpec(
        name=name, model={"id": f"tiny/{name}"}, num_layers=3, layers=(0, 2), num_heads=4, kv_heads=HEADS,
        head_dim=DIM, layer_map=LayerMap("proportional", (((0, 1.0),), ((2, 1.0),))), eviction=eviction,
        storage=StorageSpec(dtype=dtype, compressor=COMPRESSOR, chunk_tokens=8, chunk_layers=2, **groups),
    )


def create(path):
    rng = np.random.default_rng(0)
    return create_store(
        path, sample_ids=[f"s{i}" for i in range(len(SEGMENTS))],
        input_ids=[rng.integers(0, 50, len(s)) for s in SEGMENTS], segment_ids=[np.asarray(s) for s in SEGMENTS],
        student_tokenizer=TokenizerSpec(name="tiny", fingerprint="e" * 64, vocab_size=50),
        dataset=DatasetSpec(name="synthetic", split="test", fingerprint="f" * 64), shard_tokens=30,
    )


def full_rows(i: int) -> tuple[np.ndarray, np.ndarray]:
    """Sample ``i``'s K and V on every token, ``[T, L, H, D]``, as a dense teacher would store them."""
    rng = np.random.default_rng([7, i])
    n = len(SEGMENTS[i])
    return (rng.standard_normal((n, LAYERS, HEADS, DIM)).astype(np.float32),
            rng.standard_normal((n, LAYERS, HEADS, DIM)).astype(np.float32))


def chosen(i: int, budget) -> np.ndarray:
    """A reference choice of kept positions ``[M, L, H]``: every row outside the reasoning and, per (layer, head),
    ``keep_count`` of the reasoning rows drawn at random, in time order."""
    seg = np.asarray(SEGMENTS[i], dtype=int)
    inside, outside = np.flatnonzero(seg == 1), np.flatnonzero(seg != 1)
    rng = np.random.default_rng([11, i])
    m = keep_count(len(inside), budget) if len(inside) else 0
    cols = [[np.sort(np.concatenate([outside, rng.choice(inside, m, replace=False)])) for _ in range(HEADS)]
            for _ in range(LAYERS)]
    return np.stack([np.stack(c, axis=-1) for c in cols], axis=1).astype(np.int32)  # [M, L, H]


def gather(x: np.ndarray, kept: np.ndarray) -> np.ndarray:
    """``x`` ``[T, L, H, D]`` at the kept positions ``[M, L, H]`` → ``[M, L, H, D]``."""
    layer, head = np.indices(kept.shape[1:])
    return x[kept, layer, head]


def write(store: KVStore, name: str, budget) -> None:
    for shard in range(store.num_shards):
        with store.shard_writer(name, shard) as w:
            for i in store.shard_samples(shard):
                k, v = full_rows(i)
                kept = chosen(i, budget)
                w.add(gather(k, kept), gather(v, kept), kept=kept, fidelity=np.full(LAYERS, 0.1 * (i + 1)),
                      sample=i)


@pytest.fixture
def store(tmp_path) -> KVStore:
    s = create(tmp_path / "kv.zarr")
    s.add_teacher(spec("half", EvictionSpec(rule="random", budget=0.5)))
    write(s, "half", 0.5)
    return KVStore.open(tmp_path / "kv.zarr")


def test_slot_counts_follow_the_grid():
    ev = EvictionSpec(rule="random", budget=0.25)
    segments = np.concatenate([np.asarray(s, int) for s in SEGMENTS])
    offsets = np.concatenate([[0], np.cumsum([len(s) for s in SEGMENTS])])
    want = [len(s) - s.count(1) + (keep_count(s.count(1), 0.25) if s.count(1) else 0) for s in SEGMENTS]
    assert slot_counts(ev, segments, offsets).tolist() == want == [9, 11, 7, 5, 0, 9]
    # A run of samples (offsets not from 0) counts the same.
    assert slot_counts(ev, segments[15:], offsets[1:]).tolist() == want[1:]
    # Two segments: one budget over the rows of both (here one row of them all).
    both = EvictionSpec(rule="random", budget=1, segments=("reasoning", "answer"))
    assert slot_counts(both, segments, offsets).tolist() == [len(s) - s.count(1) - s.count(2)
                                                            + min(1, s.count(1) + s.count(2)) for s in SEGMENTS]


def test_kept_rows_read_back_by_sample_and_by_shard(store):
    spec_ = store.teacher("half")
    assert spec_.eviction == EvictionSpec(rule="random", budget=0.5)
    for i in range(len(SEGMENTS)):
        kv = store.read_sample(i).teachers["half"]
        k, v = full_rows(i)
        kept = chosen(i, 0.5)
        assert np.array_equal(kv.kept, kept) and kv.slot_offsets.tolist() == [0, len(kept)]
        np.testing.assert_array_equal(kv.k, gather(k, kept).astype(np.float16).astype(np.float32))
        np.testing.assert_array_equal(kv.v, gather(v, kept).astype(np.float16).astype(np.float32))
        # The dense view puts each kept row back at its token and zeros the rest.
        dk, dv, mask = kv.dense(np.array([0, len(SEGMENTS[i])]))
        want = np.zeros((len(SEGMENTS[i]), LAYERS, HEADS), bool)
        np.put_along_axis(want, kept.astype(np.int64), True, axis=0)
        assert np.array_equal(mask, want)
        np.testing.assert_array_equal(dk, np.where(want[..., None], k.astype(np.float16), 0).astype(np.float32))
        np.testing.assert_array_equal(dv, np.where(want[..., None], v.astype(np.float16), 0).astype(np.float32))
    for shard in range(store.num_shards):
        rows = store.read_shard(shard)
        kv = rows.teachers["half"]
        samples = store.shard_samples(shard)
        assert np.diff(kv.slot_offsets).tolist() == [len(chosen(i, 0.5)) for i in samples]
        dk, _, mask = kv.dense(rows.offsets)
        for j, i in enumerate(samples):
            a, b = rows.offsets[j], rows.offsets[j + 1]
            np.testing.assert_array_equal(dk[a:b], store.read_sample(i).teachers["half"].dense(
                np.array([0, b - a]))[0])
    # Every reasoning row of a sample lost half of itself; prompt, answer and EOS rows are all there.
    kv = store.read_sample(1).teachers["half"]
    _, _, mask = kv.dense(np.array([0, 26]))
    assert mask[:2].all() and mask[22:].all() and (mask[2:22].sum(axis=0) == 10).all()


def test_budget_one_keeps_what_a_dense_teacher_stores(tmp_path):
    s = create(tmp_path / "kv.zarr")
    s.add_teacher(spec("dense", None))
    s.add_teacher(spec("all", EvictionSpec(rule="streaming", budget=1.0)))
    for shard in range(s.num_shards):
        with s.shard_writer("dense", shard) as wd, s.shard_writer("all", shard) as wa:
            for i in s.shard_samples(shard):
                k, v = full_rows(i)
                wd.add(k, v, sample=i)
                every = np.broadcast_to(np.arange(len(k))[:, None, None], (len(k), LAYERS, HEADS))
                wa.add(k, v, kept=every, sample=i)
    s = KVStore.open(tmp_path / "kv.zarr")
    for shard in range(s.num_shards):
        rows = s.read_shard(shard)
        dense, kept = rows.teachers["dense"], rows.teachers["all"]
        dk, dv, mask = kept.dense(rows.offsets)
        assert mask.all() and np.array_equal(dk, dense.k) and np.array_equal(dv, dense.v)
    assert not verify_store(tmp_path / "kv.zarr").problems


def test_int4_kept_rows_decode_like_a_dense_int4_teacher_of_those_rows(tmp_path):
    s = create(tmp_path / "kv.zarr")
    s.add_teacher(spec("q4", EvictionSpec(rule="random", budget=3), dtype="int4"))
    write(s, "q4", 3)
    s = KVStore.open(tmp_path / "kv.zarr")
    assert not verify_store(tmp_path / "kv.zarr").problems
    for i in range(len(SEGMENTS)):
        kv = s.read_sample(i).teachers["q4"]
        k, _ = full_rows(i)
        want = gather(k, chosen(i, 3))
        if len(want):
            cos = (kv.k * want).sum(-1) / np.linalg.norm(kv.k, axis=-1) / np.linalg.norm(want, axis=-1)
            assert cos.min() > 0.95  # int4: about 0.99 per row


def test_info_verify_and_the_marker_report_what_was_kept(store):
    report = verify_store(store.where)
    assert not report.problems and report.shards_complete == {"half": store.num_shards}
    marker = store.shard_marker("half", 0)
    samples = store.shard_samples(0)
    assert marker["slots"] == sum(len(chosen(i, 0.5)) for i in samples)
    live = [i for i in samples if SEGMENTS[i]]
    assert marker["eviction"]["samples"] == len(samples)
    assert marker["eviction"]["err_sum"] == pytest.approx([sum(0.1 * (i + 1) for i in samples)] * LAYERS)
    assert live


def test_writer_refuses_kept_positions_that_break_the_rule(tmp_path):
    s = create(tmp_path / "kv.zarr")
    s.add_teacher(spec("half", EvictionSpec(rule="random", budget=0.5)))
    k, v = full_rows(0)
    kept = chosen(0, 0.5)
    with s.shard_writer("half", 0) as w:
        with pytest.raises(SampleError, match=r"pass kept= with the kept rows' positions"):
            w.add(gather(k, kept), gather(v, kept))
        with pytest.raises(SampleError, match=r"k: expected shape \(11, 2, 2, 8\) \[kept rows, layers, heads"):
            w.add(k, v, kept=kept)
        backwards = kept[::-1].copy()
        with pytest.raises(SampleError, match="expected kept positions increasing within a sample"):
            w.add(gather(k, backwards), gather(v, backwards), kept=backwards)
        # Row 0 (prompt) swapped for a reasoning row that was not kept: the same count, the prompt incomplete.
        no_prompt = np.empty_like(kept)
        for layer in range(LAYERS):
            for head in range(HEADS):
                column = kept[:, layer, head]
                spare = next(r for r in range(3, 12) if r not in column)
                no_prompt[:, layer, head] = np.sort(np.append(column[1:], spare))
        with pytest.raises(SampleError, match="expected every row outside the eviction's segments among the kept"):
            w.add(gather(k, no_prompt), gather(v, no_prompt), kept=no_prompt)
        with pytest.raises(SampleError, match=r"expected kept positions in \[0, 15\)"):
            w.add(gather(k, kept), gather(v, kept), kept=kept + 1)
        w.add(gather(k, kept), gather(v, kept), kept=kept)  # nothing was buffered by the refusals
        for i in s.shard_samples(0)[1:]:
            ki, vi = full_rows(i)
            c = chosen(i, 0.5)
            w.add(gather(ki, c), gather(vi, c), kept=c)
    np.testing.assert_array_equal(KVStore.open(tmp_path / "kv.zarr").read_sample(0).teachers["half"].kept, kept)


def test_a_compressed_teacher_stores_queries_on_its_layers_and_needs_version_4_or_5(tmp_path):
    with pytest.raises(SchemaError, match=r"a compressed teacher .eviction. stores queries only on its K/V layers "
                                          r"\[0, 2\].*Got \[1\] instead"):
        TeacherSpec(name="q", model={}, num_layers=3, layers=(0, 2), num_heads=4, kv_heads=2, head_dim=8,
                    layer_map=LayerMap("proportional", (((0, 1.0),), ((2, 1.0),))), q_layers=(1,),
                    eviction=EvictionSpec(rule="random", budget=0.5))
    with_q = TeacherSpec(name="q", model={}, num_layers=3, layers=(0, 2), num_heads=4, kv_heads=2, head_dim=8,
                         layer_map=LayerMap("proportional", (((0, 1.0),), ((2, 1.0),))), q_layers=(2,),
                         eviction=EvictionSpec(rule="random", budget=0.5))
    from kava.kvstore.rules import version_problem

    assert version_problem(5, with_q) is None and version_problem(4, dataclasses.replace(with_q, q_layers=())) is None
    assert "format version 5 or later for a compressed teacher with queries" in version_problem(4, with_q)
    with pytest.raises(SchemaError, match=r"eviction.budget: expected a count >= 1 or a fraction in \(0, 1\]. "
                                          "Got 1.5 instead"):
        EvictionSpec.from_dict({"rule": "random", "budget": 1.5})
    with pytest.raises(SchemaError, match="eviction.rule"):
        EvictionSpec.from_dict({"rule": "h2o", "budget": 0.5})
    s = create(tmp_path / "kv.zarr")
    root = zarr.open_group(tmp_path / "kv.zarr", mode="a")
    from kava.kvstore.manifest import seal

    raw = {k: v for k, v in root.attrs["kava"].items() if k != "digest"}
    root.attrs["kava"] = seal({**raw, "format_version": 3})
    s = KVStore.open(tmp_path / "kv.zarr", mode="a")
    with pytest.raises(StoreError, match="format version 4 or later for a compressed teacher"):
        s.add_teacher(spec("half", EvictionSpec(rule="random", budget=0.5)))


def test_an_edited_kept_array_is_refused_by_reads_and_verify(store, tmp_path):
    path = tmp_path / "kv.zarr"
    arr = zarr.open_array(path / "teachers/half/shards/000000/kept", mode="a")
    data = arr[...]
    data[1] = data[0]  # two slots of sample 0 at the same position
    arr[...] = data
    fresh = KVStore.open(path)
    with pytest.raises(SchemaError, match=r"teacher 'half' shard 0 array 'kept' \(sample 0\): expected kept "
                                          "positions increasing"):
        fresh.read_sample(0)
    problems = verify_store(path).problems
    assert [p.where for p in problems] == ["teachers/half/shards/000000/kept"]
    assert "sample 0: expected kept positions increasing" in problems[0].message
    marker = json.loads((path / "teachers/half/shards/000001/zarr.json").read_text())
    marker["attributes"]["kava_shard"]["slots"] += 1
    (path / "teachers/half/shards/000001/zarr.json").write_text(json.dumps(marker))
    with pytest.raises(SchemaError, match="expected .* kept rows .slots."):
        KVStore.open(path).read_shard(1)


def test_kept_problem_reference():
    outside = np.array([True, False, False, True])
    assert kept_problem(np.array([[[0]], [[2]], [[3]]]), 4, outside) is None
    assert "every row outside" in kept_problem(np.array([[[0]], [[1]], [[2]]]), 4, outside)
    assert "in [0, 4)" in kept_problem(np.array([[[0]], [[3]], [[4]]]), 4, outside)


def test_info_dask_and_xarray_views_of_a_compressed_teacher(store):
    from kava.kvstore import summary, to_dask, to_xarray
    from kava.pipelines.cli import format_info

    info = summary(store)["teachers"]["half"]
    slots = sum(len(chosen(i, 0.5)) for i in range(len(SEGMENTS)))
    ev = info["eviction"]
    assert ev["rule"] == "random" and ev["budget"] == 0.5
    assert ev["kept_fraction"] == pytest.approx(slots / store.num_tokens)
    # The writer's fidelity, averaged per sample: 0.1 * (i + 1) for the six samples.
    assert ev["fidelity_error"] == pytest.approx([0.35] * LAYERS)
    text = format_info(summary(store))
    assert f"evicted   random, budget 0.5 of the reasoning rows: {100 * slots / store.num_tokens:.1f}% of all " \
           "rows kept" in text and "fidelity  0.3500 0.3500" in text
    k = to_dask(store, "half", "k").compute()
    kept = to_dask(store, "half", "kept").compute()
    assert k.shape == (slots, LAYERS, HEADS, DIM) and kept.shape == (slots, LAYERS, HEADS)
    np.testing.assert_array_equal(kept, np.concatenate([chosen(i, 0.5) for i in range(len(SEGMENTS))]))
    ds = to_xarray(store, "half")
    assert ds["k"].dims == ("slot", "layer", "kv_head", "head_dim") and ds["kept"].dims == ("slot", "layer", "kv_head")
    assert ds["slot_sample"].values.tolist() == [i for i in range(len(SEGMENTS)) for _ in chosen(i, 0.5)]


def test_cka_refuses_a_compressed_teacher_and_names_the_stored_matrices(store):
    from kava.analysis.cka import store_cka
    from kava.core.errors import ConfigError

    with pytest.raises(ConfigError, match=r"Expected --teacher to name a teacher that keeps every row. Got 'half' "
                                          r"instead.*`kava store info`"):
        store_cka(store, "half")
