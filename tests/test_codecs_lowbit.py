"""The int4 and int2 storage dtypes: packing, the quantiser against a plainly written reference, numpy and torch
dequantisation agreeing bit for bit, and real stores extracted from the real stories260K Llama read back through
every reader (the store, verify, info, the loader, dask/xarray, CKA). The format version rule is checked by
simulating an older reader.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from click.testing import CliRunner
from helpers import asset_path

from kava.core.errors import ConfigError, FormatVersionError, SampleError, SchemaError, StoreError
from kava.distill.loader import LoaderConfig, StreamLoader, TeacherRequest
from kava.extract.config import ExtractConfig
from kava.extract.estimate import bytes_per_token
from kava.extract.recipe import run_extract
from kava.kvstore import KVStore, codecs, manifest, summary, verify_store
from kava.kvstore.interop import to_dask, to_xarray
from kava.kvstore.manifest import StorageSpec, seal
from kava.pipelines.cli import main

ONE_TORCH_THREAD = True
QUIET = {"progress": False, "calibration_samples": 0}


# ---------------------------------------------------------------------------------------------------------------
# Codes, packing and the quantiser


@pytest.mark.parametrize("bits", [4, 2])
def test_pack_unpack_round_trip_and_layout(bits):
    rng = np.random.default_rng(bits)
    codes = rng.integers(0, 1 << bits, size=(5, 3, 2, 16), dtype=np.uint8)
    packed = codecs.pack_bits(codes, bits)
    assert packed.shape == (5, 3, 2, 16 * bits // 8) and packed.dtype == np.uint8
    np.testing.assert_array_equal(codecs.unpack_bits(packed, bits), codes)
    # The first code of a byte sits in its lowest bits.
    first = np.array([[1, 2, 3, 0, 3, 2, 1, 0]], np.uint8)
    want = [1 | 2 << 4, 3 | 0 << 4, 3 | 2 << 4, 1 | 0 << 4] if bits == 4 else [1 | 2 << 2 | 3 << 4, 3 | 2 << 2 | 1 << 4]
    assert codecs.pack_bits(first, bits).tolist() == [want]


def naive_quantize(x: np.ndarray, bits: int, per_channel: bool, group: int):
    """The asymmetric quantiser written plainly: one group at a time, min and max, fp16 scale and zero."""
    T, L, H, D = x.shape
    top = 2**bits - 1
    codes = np.zeros(x.shape, np.int64)
    if per_channel:
        groups = [(slice(g, min(g + group, T)), l, h, slice(d, d + 1))
                  for g in range(0, T, group) for l in range(L) for h in range(H) for d in range(D)]
    else:
        groups = [(slice(t, t + 1), l, h, slice(d, d + group))
                  for t in range(T) for l in range(L) for h in range(H) for d in range(0, D, group)]
    scale_of = np.zeros(x.shape, np.float32)
    for sel in groups:
        values = x[sel].astype(np.float32)
        zero = np.float32(np.float16(values.min()))
        scale = np.float32(np.float16((values.max() - values.min()) / top))
        q = np.zeros_like(values) if scale == 0 else (values - zero) / scale
        codes[sel] = np.clip(np.rint(q), 0, top)
        scale_of[sel] = scale
    return codes, scale_of


@pytest.mark.parametrize("dtype", ["int4", "int2"])
@pytest.mark.parametrize("per_channel, group", [(True, 16), (False, 8)])
def test_quantiser_matches_a_plain_reference_and_stays_within_half_a_step(dtype, per_channel, group):
    bits = codecs.LOWBIT_BITS[dtype]
    rng = np.random.default_rng(0)
    # 37 rows: the last key group is partial. A few large channels, as pre-RoPE keys have.
    x = rng.normal(size=(37, 2, 3, 16)).astype(np.float32) * np.array([1] * 14 + [20, 40], np.float32)
    packed, scale, zero = codecs.quantize_lowbit(x, bits, per_channel=per_channel, group=group)
    want_codes, step = naive_quantize(x, bits, per_channel, group)
    got_codes = codecs.unpack_bits(packed, bits)
    # Same formula, same float32 arithmetic: the codes are the reference's own.
    np.testing.assert_array_equal(got_codes, want_codes)
    got = codecs.dequantize_np(packed, scale, zero, dtype, per_channel=per_channel, group=group)
    # Half a step, plus the float16 rounding of the zero (which clipping at the top can expose).
    assert np.all(np.abs(got - x) <= 0.5 * step + 1e-3 * np.abs(x) + 1e-6)
    # Reading from the middle of a shard: rows 21.. decode with scale rows from group 21 // G on.
    if per_channel:
        a = 21
        part = codecs.dequantize_np(packed[a:], scale[a // group:], zero[a // group:], dtype, per_channel=True,
                                    group=group, first_row=a)
        np.testing.assert_array_equal(part, got[a:])


def test_asymmetric_beats_symmetric_on_skewed_groups():
    """The choice the format made: min/step codes use the whole range; absmax wastes half of it on one sign."""
    rng = np.random.default_rng(1)
    x = (rng.normal(size=(256, 1, 2, 32)) + 3).astype(np.float32)  # every channel offset from zero
    for bits in (4, 2):
        errs = []
        for sym in (False, True):
            p, s, z = codecs.quantize_lowbit(x, bits, per_channel=True, group=64, symmetric=sym)
            errs.append(np.abs(codecs.dequantize_np(p, s, z, f"int{bits}", per_channel=True, group=64) - x).mean())
        assert errs[0] < errs[1]


def _tensor_on(device: str, a: np.ndarray | None) -> torch.Tensor | None:
    return None if a is None else torch.from_numpy(np.ascontiguousarray(a)).to(device)


@pytest.mark.parametrize("dtype", ["int8", "int4", "int2"])
@pytest.mark.parametrize("per_channel", [True, False])
def test_numpy_and_torch_dequantize_agree_bit_for_bit(dtype, per_channel):
    rng = np.random.default_rng(2)
    x = (rng.normal(size=(100, 3, 2, 32)) * rng.uniform(0.01, 50, size=(1, 3, 2, 32))).astype(np.float32)
    if dtype == "int8":
        codes, scale = codecs.quantize_int8(x)
        zero, group, first = None, 0, 0
    else:
        group = 32 if per_channel else 16
        codes, scale, zero = codecs.quantize_lowbit(x, codecs.LOWBIT_BITS[dtype], per_channel=per_channel,
                                                    group=group)
        first = 45 if per_channel else 0
        if per_channel:  # rows 45.. with their groups, as a reader of a row range gets them
            codes, scale, zero = codes[first:], scale[first // group:], zero[first // group:]
    want = codecs.dequantize_np(codes, scale, zero, dtype, per_channel=per_channel, group=group, first_row=first)
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for device in devices:
        t = functools.partial(_tensor_on, device)
        got = codecs.dequantize_torch(t(codes), t(scale), t(zero), dtype, per_channel=per_channel, group=group,
                                      first_row=first)
        assert got.dtype == torch.float32 and got.shape == want.shape
        np.testing.assert_array_equal(got.cpu().numpy(), want)


def test_bad_dtype_names_and_geometry_are_refused():
    with pytest.raises(SchemaError, match="storage.dtype: expected one of float16, bfloat16, float32, int8, int4, "
                                          "int2. Got 'int3' instead"):
        StorageSpec(dtype="int3")
    with pytest.raises(ConfigError, match="--kv-dtype: expected one of .*int4, int2. Got 'int3' instead"):
        ExtractConfig.from_dict({"teacher": "x", "store": "y", "kv_dtype": "int3"}).validate()
    with pytest.raises(SampleError, match="Expected a storage dtype in .*Got 'int3' instead"):
        codecs.encode(np.zeros((1, 1, 1, 4), np.float32), "int3")
    with pytest.raises(SchemaError, match="storage.group_tokens: expected an integer >= 1"):
        StorageSpec(dtype="int4", chunk_tokens=256, group_channels=8)
    with pytest.raises(SchemaError, match="chunk_tokens 300 a multiple of group_tokens"):
        StorageSpec(dtype="int4", chunk_tokens=300, group_tokens=64, group_channels=8)
    # int2 packs four codes a byte: a head dimension of 6 can't be packed.
    spec = json.loads(json.dumps(_spec_dict(head_dim=6, dtype="int2")))
    with pytest.raises(SchemaError, match="expected a head_dim divisible by group_channels 6 and by 4"):
        manifest.TeacherSpec.from_dict(spec)


def _spec_dict(head_dim: int, dtype: str) -> dict:
    return {"name": "t", "model": {}, "num_layers": 1, "layers": [0], "num_heads": 1, "kv_heads": 1,
            "head_dim": head_dim, "layer_map": {"method": "explicit", "sources": [[[0, 1.0]]], "details": {}},
            "storage": {"dtype": dtype, "compressor": {}, "chunk_tokens": 256, "chunk_layers": 1,
                        "group_tokens": 64, "group_channels": head_dim}}


# ---------------------------------------------------------------------------------------------------------------
# Real stores: stories260K (5 layers, 4 KV heads x 8, Q on 8 heads) stored as float16, int4 and int2


@pytest.fixture(scope="module")
def lowbit_store(tmp_path_factory):
    """One store, three teachers of the same model: float16 (the reference), int4 and int2, with Q, ~15 shards."""
    path = tmp_path_factory.mktemp("lowbit") / "kv.zarr"
    stories = asset_path("models/stories260K_hf_derived")
    for dtype in ("float16", "int4", "int2"):
        run_extract(ExtractConfig.from_dict(dict(teacher=str(stories), store=str(path), name=dtype, kv_dtype=dtype,
                                                 with_q=True, limit=40, shard_tokens=1024, **QUIET)),
                    log=lambda _: None)
    return path


def _group_bound(ref: np.ndarray, dtype: str, array: str, G: int, first_row: int = 0) -> np.ndarray:
    """Half a quantisation step of each value's group, from the float16 reference (per channel over G rows of
    the shard for k/q, per token over the head dimension for v)."""
    top = 2 ** codecs.LOWBIT_BITS[dtype] - 1
    if array == "v":
        span = ref.max(-1, keepdims=True) - ref.min(-1, keepdims=True)
        return np.broadcast_to(span, ref.shape) / top / 2
    out = np.zeros_like(ref)
    for g in range(0, len(ref), G):
        rows = slice(g, g + G)
        out[rows] = (ref[rows].max(0) - ref[rows].min(0)) / top / 2
    return out


@pytest.mark.parametrize("dtype", ["int4", "int2"])
def test_real_lowbit_store_reads_back_within_half_a_step_of_float16(lowbit_store, dtype):
    store = KVStore.open(lowbit_store)
    spec = store.teacher(dtype)
    assert (spec.storage.dtype, spec.storage.group_tokens, spec.storage.group_channels) == (dtype, 64, 8)
    assert spec.storage.chunk_tokens % 64 == 0 and store.manifest.format_version == 5
    G = spec.storage.group_tokens
    cos = {a: [] for a in "kvq"}
    for shard in range(store.num_shards):
        rows = store.read_shard(shard, teachers=["float16", dtype], with_q=True)
        ref, got = rows.teachers["float16"], rows.teachers[dtype]
        for array in "kvq":
            r, g = getattr(ref, array), getattr(got, array)
            bound = _group_bound(r, dtype, array, G)
            # float16 rounding of the reference itself (and of the stored zero) on top of half a step
            assert np.all(np.abs(g - r) <= bound * 1.01 + 2e-3 * np.abs(r) + 1e-4), (shard, array)
            cos[array].append(codecs.cosine_rows(r, g))
    # A single sample read alone (random access) is the same rows as its shard read whole.
    for i in (0, 7, store.num_samples - 1):
        shard = store.shard_of(i)
        a = store.offsets[i] - store.offsets[store.shard_samples(shard).start]
        n = store.offsets[i + 1] - store.offsets[i]
        one = store.read_sample(i, teachers=[dtype], with_q=True).teachers[dtype]
        whole = store.read_shard(shard, teachers=[dtype], with_q=True).teachers[dtype]
        for array in "kvq":
            np.testing.assert_array_equal(getattr(one, array), getattr(whole, array)[a : a + n])
    # The writer's recorded cosine (to the float32 teacher values) agrees with the one against float16.
    recorded = summary(store)["teachers"][dtype]["quantization_cosine"]
    for array in "kvq":
        c = sum(x[0] for x in cos[array]) / sum(x[1] for x in cos[array])
        np.testing.assert_allclose(recorded[array], c, atol=2e-3)
        assert min(recorded[array]) > (0.99 if dtype == "int4" else 0.9)


def test_real_lowbit_store_verifies_and_info_reports_size_and_cosine(lowbit_store):
    report = verify_store(lowbit_store)
    assert report.ok, report.problems
    info = summary(KVStore.open(lowbit_store))["teachers"]
    assert info["float16"]["quantization_cosine"] is None
    for dtype, ratio in (("int4", 1.9), ("int2", 2.9)):  # head_dim 8: one fp16 scale+zero per 8 values
        t = info[dtype]
        assert t["bytes_float16"] == info["float16"]["bytes_logical"]
        assert t["bytes_float16"] / t["bytes_logical"] > ratio
        # estimate's per-token size is the writer's, to the byte (keys' last groups are partial: within 1%)
        spec = KVStore.open(lowbit_store).teacher(dtype)
        per_token = sum(bytes_per_token(5, h, 8, dtype, a) for a, h in (("k", 4), ("v", 4), ("q", 8)))
        tokens = KVStore.open(lowbit_store).num_tokens
        assert abs(per_token * tokens - t["bytes_logical"]) / t["bytes_logical"] < 0.01, spec.storage
    out = CliRunner().invoke(main, ["store", "info", str(lowbit_store)], catch_exceptions=False).stdout
    assert "int2 + zstd" in out and "smaller on disk" in out and "cosine k" in out

    # A flipped byte in a packed code chunk is found like any other.
    chunk = next((lowbit_store / "teachers" / "int2" / "shards" / "000001" / "k_zero").rglob("c/*/*/*/*"))
    data = bytearray(chunk.read_bytes())
    data[len(data) // 2] ^= 0xFF
    chunk.write_bytes(bytes(data))
    try:
        bad = verify_store(lowbit_store)
        assert not bad.ok and any("k_zero" in p.where for p in bad.problems)
    finally:
        data[len(data) // 2] ^= 0xFF
        chunk.write_bytes(bytes(data))


def test_real_lowbit_store_through_loader_interop_and_cka(lowbit_store, tmp_path):
    store = KVStore.open(lowbit_store)
    # dask/xarray: the dequantized view equals the store's reads, shard after shard.
    for array in "kvq":
        whole = to_dask(store, "int4", array).compute()
        want = np.concatenate([getattr(store.read_shard(s, teachers=["int4"], with_q=True).teachers["int4"], array)
                               for s in range(store.num_shards)])
        np.testing.assert_array_equal(whole, want)
    assert to_dask(store, "int2", "k", decode=False).dtype == np.uint8  # packed codes: 4 a byte
    assert to_xarray(store, "int2")["k"].shape == (store.num_tokens, 5, 4, 8)

    # The loader: a window dequantizes low-bit rows once, to float16; each batch's rows are the store's decoded
    # rows rounded to float16.
    loader = StreamLoader(LoaderConfig(str(lowbit_store), teachers=(TeacherRequest("int2", with_q=True),),
                                       batch_size=8, seed=1), epochs=1)
    for batch in loader:
        assert batch.teachers["int2"].stored == "float16"
        got = batch.decoded().teachers["int2"]
        for row, i in enumerate(batch.sample_indices.tolist()):
            n = store.offsets[i + 1] - store.offsets[i]
            ref = store.read_sample(i, teachers=["int2"], with_q=True).teachers["int2"]
            half = {a: getattr(ref, a).astype(np.float16).astype(np.float32).transpose(1, 2, 0, 3) for a in "kq"}
            np.testing.assert_array_equal(got.k[row, :, :, :n].numpy(), half["k"])
            np.testing.assert_array_equal(got.q[row, :, :, :n].numpy(), half["q"])
            assert not got.k[row, :, :, n:].any()  # padding
        break

    # CKA of the int2 keys against the float16 keys: each layer is still most like itself.
    result = CliRunner().invoke(main, ["cka", "--store", str(lowbit_store), "--teacher", "int2", "--vs", "float16",
                                       "--out", str(tmp_path)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    m = np.load(next(tmp_path.glob("*.npy")))
    assert m.shape == (5, 5) and np.all(np.argmax(m, axis=1) == np.arange(5)) and np.diag(m).min() > 0.8


# ---------------------------------------------------------------------------------------------------------------
# Versions


def _set_root_version(path: Path, version: int) -> None:
    group = zarr.open_group(path, mode="a")
    doc = dict(group.attrs["kava"])
    doc["format_version"] = version
    group.attrs["kava"] = seal(doc)


def test_an_older_reader_refuses_a_newer_store_and_old_stores_take_no_lowbit_teacher(tmp_path, monkeypatch):
    stories = asset_path("models/stories260K_hf_derived")
    path = tmp_path / "kv.zarr"
    options = dict(teacher=str(stories), store=str(path), limit=4, **QUIET)
    run_extract(ExtractConfig.from_dict(dict(options, name="fp16")), log=lambda _: None)
    assert KVStore.open(path).manifest.format_version == manifest.FORMAT_VERSION == 5
    # This version reads it, float16 teacher and all.
    assert KVStore.open(path).read_sample(0).teachers["fp16"].k.shape[1:] == (5, 4, 8)

    # A reader of version 2 (what this kava was before int4/int2) refuses it up front and says what to do.
    monkeypatch.setattr(manifest, "FORMAT_VERSION", 2)
    with pytest.raises(FormatVersionError, match="format version 5; this kava reads up to 2. Upgrade kava"):
        KVStore.open(path)
    monkeypatch.undo()

    # A version-2 store (made before int4/int2) still reads, and is refused a low-bit teacher: its readers
    # would not know the packed arrays.
    _set_root_version(path, 2)
    assert KVStore.open(path).read_sample(0).teachers["fp16"].k.shape[1:] == (5, 4, 8)
    with pytest.raises(StoreError, match="expected a store of format version 3 or later for int4 storage.*"
                                         "Got version 2 instead. Extract into a new store"):
        run_extract(ExtractConfig.from_dict(dict(options, name="q4", kv_dtype="int4")), log=lambda _: None)
    # And a store from a newer kava than this one is refused the same way.
    _set_root_version(path, 6)
    with pytest.raises(FormatVersionError, match="format version 6; this kava reads up to 5"):
        KVStore.open(path)


def test_the_codecs_config_stores_one_teacher_four_ways():
    from kava.pipelines.config import configs_dir, load_config

    cfg = load_config(configs_dir() / "codecs.yaml")
    dtypes = {t.name: t.extract.get("kv_dtype") for t in cfg.teachers}
    assert sorted(dtypes.values()) == ["float16", "int2", "int4", "int8"]
    assert len({repr(t.train) for t in cfg.teachers}) == 1  # the same training: trained once
    same = [{k: v for k, v in t.extract.items() if k != "kv_dtype"} for t in cfg.teachers]
    assert all(s == same[0] for s in same)  # extracted alike but for the dtype
    kv = [v for v in cfg.variants if v.teachers]
    assert len({repr(v.distill) for v in kv}) == 1  # the same objective for every store
    assert {dtypes[v.teachers[0]] for v in kv} == set(dtypes.values())
