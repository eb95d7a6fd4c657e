"""Randomised round trips through the store (hypothesis), on the in-memory backend for speed.

Small ``chunk_tokens`` (3, 8, 16) make chunk rows cross sample and shard boundaries; geometry, storage dtype,
compression, Q and layer subsets are drawn too. What comes back is compared with references computed here, not
with the store's own codecs.
"""

from __future__ import annotations

import json

import numpy as np
import zarr
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kava.kvstore import (
    DatasetSpec,
    KVStore,
    LayerMap,
    StorageSpec,
    TeacherSpec,
    TokenizerSpec,
    create_store,
    plan_shards,
    to_dask,
    verify_store,
)
from kava.kvstore.codecs import DEFAULT_COMPRESSOR, bf16_bits_to_float, float_to_bf16_bits

SETTINGS = dict(deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
FP16_MIN_NORMAL = 2.0**-14


def bf16_reference(x: np.ndarray) -> np.ndarray:
    """float32 → nearest bfloat16, ties to even, by comparing the two bf16 neighbours of each value."""
    u = np.ascontiguousarray(x, np.float32).view(np.uint32)
    lo_bits = u & np.uint32(0xFFFF0000)
    lo = lo_bits.view(np.float32)
    hi = (lo_bits + np.uint32(0x10000)).view(np.float32)
    with np.errstate(over="ignore", invalid="ignore"):
        d_lo, d_hi = np.abs(x.astype(np.float64) - lo), np.abs(hi.astype(np.float64) - x)
    lo_even = ((u >> np.uint32(16)) & np.uint32(1)) == 0
    return np.where((d_lo < d_hi) | ((d_lo == d_hi) & lo_even), lo, hi).astype(np.float32)


def check_int8(got: np.ndarray, want: np.ndarray) -> None:
    """One float16 scale per row (last axis): error within half a step where the scale is a normal float16,
    and within what the float16-rounded scale allows elsewhere (tiny rows lose relative precision)."""
    rowmax = np.abs(want).max(axis=-1, keepdims=True)
    err = np.abs(got - want)
    normal = rowmax / 127 >= FP16_MIN_NORMAL
    assert np.all(err <= np.where(normal, rowmax / 254 * (1 + 2**-9), np.inf)), "int8 error over half a step"
    s = (rowmax / 127).astype(np.float16).astype(np.float32)
    bound = np.where(s > 0, np.maximum(s / 2, rowmax - 127 * s), rowmax) * (1 + 2**-9) + 1e-12
    assert np.all(err <= bound), "int8 error over the float16 scale's bound"


def expected(x: np.ndarray, dtype: str) -> np.ndarray | None:
    return {
        "float16": lambda: x.astype(np.float16).astype(np.float32),
        "float32": lambda: x,
        "bfloat16": lambda: bf16_reference(x),
        "int8": lambda: None,
    }[dtype]()


def assert_values(got: np.ndarray, want: np.ndarray, dtype: str) -> None:
    assert got.shape == want.shape and got.dtype == np.float32
    if dtype == "int8":
        check_int8(got, want)
    else:
        np.testing.assert_array_equal(got, expected(want, dtype))


@st.composite
def store_cases(draw):
    n = draw(st.integers(1, 6))
    lengths = draw(st.lists(st.integers(0, 40), min_size=n, max_size=n))
    stored = draw(st.integers(1, 3))
    num_layers = stored + draw(st.integers(0, 2))
    layers = tuple(draw(st.permutations(range(num_layers)))[:stored])  # any order: axis 1 follows `layers`
    kv_heads = draw(st.integers(1, 3))
    num_heads = kv_heads * draw(st.integers(1, 2))
    q_layers = tuple(draw(st.lists(st.sampled_from(range(num_layers)), unique=True, max_size=2)))
    storage = StorageSpec(
        dtype=draw(st.sampled_from(["float16", "bfloat16", "float32", "int8"])),
        compressor=draw(st.sampled_from([{}, dict(DEFAULT_COMPRESSOR)])),
        chunk_tokens=draw(st.sampled_from([3, 8, 16])),
        chunk_layers=draw(st.integers(1, stored)),
    )
    spec = TeacherSpec(
        name="T", model={"id": "random"}, num_layers=num_layers, layers=layers, num_heads=num_heads,
        kv_heads=kv_heads, head_dim=draw(st.integers(1, 16)),
        layer_map=LayerMap("explicit", tuple(((l, 1.0),) for l in layers)), q_layers=q_layers, storage=storage,
    )
    subset = draw(st.lists(st.sampled_from(layers), unique=True, min_size=1))
    return dict(
        lengths=lengths, spec=spec, subset=subset,
        shard_tokens=draw(st.integers(1, 60)), shard_samples=draw(st.none() | st.integers(1, 3)),
        magnitude=draw(st.sampled_from([0.05, 1.0, 300.0])), seed=draw(st.integers(0, 2**32 - 1)),
    )


def random_values(rng, shape, magnitude) -> np.ndarray:
    x = (rng.standard_normal(shape) * magnitude).astype(np.float32)
    if shape[0]:
        x[rng.random(shape[0]) < 0.1] = 0.0  # some all-zero tokens: int8 scale 0
    return x


@settings(max_examples=20, **SETTINGS)  # ~0.3 s each: a store written, read every way, verified
@given(case=store_cases())
def test_round_trip(case):
    spec, lengths = case["spec"], case["lengths"]
    rng = np.random.default_rng(case["seed"])
    location = zarr.storage.MemoryStore()
    store = create_store(
        location, sample_ids=[f"id{i}" for i in range(len(lengths))],
        input_ids=[rng.integers(0, 1000, n) for n in lengths], segment_ids=[rng.integers(0, 4, n) for n in lengths],
        student_tokenizer=TokenizerSpec("tok", "0" * 64, 1000), dataset=DatasetSpec("synthetic", "train", "1" * 64),
        shard_tokens=case["shard_tokens"], shard_samples=case["shard_samples"],
    )
    store.add_teacher(spec)
    geometry = {"k": (len(spec.layers), spec.kv_heads), "v": (len(spec.layers), spec.kv_heads)}
    if spec.has_q:
        geometry["q"] = (len(spec.q_layers), spec.num_heads)
    data = []
    for n in lengths:
        d = {a: random_values(rng, (n, nl, nh, spec.head_dim), case["magnitude"]) for a, (nl, nh) in geometry.items()}
        d["align_weight"] = rng.uniform(0, 1, n).astype(np.float32)
        data.append(d)
    for s in rng.permutation(store.num_shards):  # shards in any order
        with store.shard_writer("T", int(s)) as w:
            for i in store.shard_samples(int(s)):
                d = data[i]
                w.add(d["k"], d["v"], q=d.get("q"), align_weight=d["align_weight"])

    reader = KVStore.open(location)
    assert reader.complete_shards("T") == list(range(reader.num_shards))
    assert reader.shard_starts[-1] == len(lengths) and reader.offsets[-1] == sum(lengths)
    pos = [spec.layers.index(l) for l in case["subset"]]
    for s in range(reader.num_shards):
        samples = reader.shard_samples(s)
        assert case["shard_samples"] is None or len(samples) <= case["shard_samples"]
        rows = reader.read_shard(s, with_q=spec.has_q)
        kv = rows.teachers["T"]
        for array in geometry:
            want = np.concatenate([data[i][array] for i in samples])
            assert_values(getattr(kv, array), want, spec.storage.dtype)
        np.testing.assert_array_equal(kv.align_weight, np.concatenate([data[i]["align_weight"] for i in samples]))
        sub = reader.read_shard(s, layers=case["subset"]).teachers["T"]
        np.testing.assert_array_equal(sub.k, kv.k[:, pos])
        np.testing.assert_array_equal(sub.v, kv.v[:, pos])
        for j, i in enumerate(samples):
            a, b = rows.offsets[j], rows.offsets[j + 1]
            one = reader.read_sample(f"id{i}", layers=case["subset"], with_q=spec.has_q).teachers["T"]
            np.testing.assert_array_equal(one.k, kv.k[a:b, pos])
            np.testing.assert_array_equal(one.v, kv.v[a:b, pos])
            if spec.has_q:
                np.testing.assert_array_equal(one.q, kv.q[a:b])
    whole = np.concatenate([reader.read_shard(s).teachers["T"].v for s in range(reader.num_shards)])
    np.testing.assert_array_equal(to_dask(reader, "T", "v").compute(), whole)
    report = verify_store(location)
    assert report.ok, report.problems


finite_f32 = st.floats(width=32, allow_nan=False, allow_infinity=False, max_value=float(np.float32(3.38e38)),
                      min_value=-float(np.float32(3.38e38)))


@settings(max_examples=30, **SETTINGS)
@given(values=st.lists(finite_f32, min_size=1, max_size=200))
def test_bf16_rounds_to_nearest_even(values):
    x = np.array(values, np.float32)
    bits = float_to_bf16_bits(x)
    np.testing.assert_array_equal(bf16_bits_to_float(bits), bf16_reference(x))
    np.testing.assert_array_equal(float_to_bf16_bits(bf16_bits_to_float(bits)), bits)  # bf16 values are fixed points


@settings(max_examples=30, **SETTINGS)
@given(lengths=st.lists(st.integers(0, 50), max_size=30), shard_tokens=st.integers(1, 100),
       max_samples=st.none() | st.integers(1, 5))
def test_plan_shards_partitions_samples(lengths, shard_tokens, max_samples):
    starts = plan_shards(np.array(lengths, np.int64), shard_tokens=shard_tokens, max_samples=max_samples)
    assert starts[0] == 0 and starts[-1] == len(lengths)
    assert np.all(np.diff(starts) > 0) or not lengths
    for a, b in zip(starts[:-1], starts[1:]):
        assert max_samples is None or b - a <= max_samples
        assert sum(lengths[a : b - 1]) < shard_tokens  # a shard closes as soon as it reaches shard_tokens


@settings(max_examples=30, **SETTINGS)
@given(case=store_cases())
def test_teacher_spec_round_trips_through_json(case):
    spec = case["spec"]
    assert TeacherSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec
