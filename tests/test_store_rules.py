"""The store's rules hold where checksums can't: array metadata against the sealed spec, features against the
format version, values within their ranges (kvstore/rules.py).

Each test edits a copy of one real store the way someone who knows the format could, leaving every checksum and
digest valid: a chunk rewritten through zarr (which computes a fresh crc32c), an array's ``zarr.json`` edited (it
carries no digest), a spec or manifest re-sealed after the edit. Both ``kava store verify`` and the reader (a
store's ``read_shard`` and the training loader's ``read_window``) must refuse it in one line naming the store, the
teacher, the array, the shard and the fix.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import zarr

from kava.distill.batch import read_window
from kava.distill.loader import TeacherRequest
from kava.kvstore import (
    DatasetSpec,
    KVStore,
    LayerMap,
    LogitSpec,
    SchemaError,
    TeacherSpec,
    TokenizerSpec,
    UnsealedStoreError,
    create_store,
    default_storage,
    rules,
    seal_store,
    verify_store,
)
from kava.kvstore.manifest import seal

LENGTHS = [5, 7, 0, 9, 3]
VOCAB = 50
SHARD = "teachers/{}/shards/000000"


def teacher(name: str, dtype: str, *, logits: bool = False) -> TeacherSpec:
    return TeacherSpec(
        name=name, model={"id": f"tiny/{name}"}, num_layers=3, layers=(0, 2), num_heads=2, kv_heads=1, head_dim=8,
        layer_map=LayerMap("proportional", (((0, 1.0),), ((2, 1.0),))), rope={"rope_type": "default", "theta": 1e4},
        storage=default_storage(2, 1, 8, dtype),
        logits=LogitSpec(top_k=2, vocab_size=VOCAB, tokenizer_fingerprint="e" * 64) if logits else None,
    )


@pytest.fixture(scope="module")
def sound(tmp_path_factory) -> Path:
    """One sealed store, one shard: teacher 'F' in float16 with top-2 logits, teacher 'Q' in int4."""
    path = tmp_path_factory.mktemp("rules") / "kv.zarr"
    rng = np.random.default_rng(0)
    store = create_store(
        path, sample_ids=[f"synthetic/test/{i:06d}" for i in range(len(LENGTHS))],
        input_ids=[rng.integers(0, VOCAB, n) for n in LENGTHS], segment_ids=[np.zeros(n, int) for n in LENGTHS],
        student_tokenizer=TokenizerSpec("tiny", "e" * 64, VOCAB), dataset=DatasetSpec("synthetic", "test", "f" * 64),
    )
    for spec in (teacher("F", "float16", logits=True), teacher("Q", "int4")):
        store.add_teacher(spec)
        with store.shard_writer(spec.name, 0) as w:
            for n in LENGTHS:
                top = dict(logits=(np.sort(rng.integers(0, VOCAB, (n, 2)), axis=1),
                                   -np.sort(rng.random((n, 2)), axis=1))) if spec.logits else {}
                w.add(rng.standard_normal((n, 2, 1, 8)), rng.standard_normal((n, 2, 1, 8)),
                      align_weight=rng.random(n), **top)
    assert verify_store(path).ok
    return path


@pytest.fixture
def path(sound, tmp_path) -> Path:
    copy = tmp_path / "kv.zarr"
    shutil.copytree(sound, copy)
    return copy


def edit_json(doc: Path, change: Callable[[dict], None]) -> None:
    meta = json.loads(doc.read_text())
    change(meta)
    doc.write_text(json.dumps(meta, indent=2))


def reseal(doc: Path, attr: str, change: Callable[[dict], None]) -> None:
    """Edit ``attributes[attr]`` and seal it again, as someone who knows the format could."""
    def edit(meta: dict) -> None:
        change(meta["attributes"][attr])
        meta["attributes"][attr] = seal(meta["attributes"][attr])

    edit_json(doc, edit)


def rewrite(path: Path, name: str, array: str, change: Callable[[np.ndarray], None]) -> None:
    """Rewrite one array of shard 0 through zarr: its chunks get a fresh, valid crc32c."""
    arr = zarr.open_array(path / SHARD.format(name) / array, mode="r+")
    data = arr[...]
    change(data)
    arr[...] = data


def refused(path: Path, name: str, verify_says: str, read_says: str, *, with_logits: bool = False) -> list[str]:
    """Assert that ``verify`` reports ``verify_says`` and that both readers raise ``read_says`` on one line (both
    regular expressions)."""
    problems = [str(p) for p in verify_store(path).problems]
    assert any(re.search(verify_says, p) for p in problems), problems
    assert all("\n" not in p for p in problems)
    store = KVStore.open(path)
    with pytest.raises(SchemaError, match=read_says) as caught:
        store.read_shard(0, teachers=[name], with_logits=with_logits)
    assert "\n" not in str(caught.value) and str(path) in str(caught.value)
    with pytest.raises(SchemaError, match=read_says):
        read_window(KVStore.open(path), [0], [TeacherRequest(name, with_logits=with_logits)], pad_id=0)
    return problems


# --------------------------------------------------------------------------------------------------------------
# 1. An array's metadata is checked against the spec


@pytest.mark.parametrize("name, array", [("F", "k"), ("Q", "v_scale"), ("F", "align_weight")])
def test_a_removed_crc32c_codec_is_refused(path, name, array):
    key = f"{SHARD.format(name)}/{array}"
    edit_json(path / key / "zarr.json", lambda m: m.update(codecs=[c for c in m["codecs"] if c["name"] != "crc32c"]))
    chunk = next(p for p in (path / key / "c").rglob("*") if p.is_file())
    data = bytearray(chunk.read_bytes())
    data[len(data) // 2] ^= 0x10  # unchecked now: only the metadata rule stands between it and a read
    chunk.write_bytes(bytes(data))
    says = (r"expected a codec chain that ends with crc32c \(every chunk checksummed\). Got \['bytes', "
            r"'blosc'\] instead")
    problems = refused(path, name, f"{key}: {key}/zarr.json: {says}",
                       rf"teacher '{name}' shard 0 array '{array}' .*: {key}/zarr.json: {says}. Its metadata was "
                       rf"changed: restore {key}/zarr.json, or delete teachers/{name}/shards/000000 and re-extract")
    assert not any("crc32c checksum" in p for p in problems)  # its chunks are not decoded through a chain without it


def test_a_big_endian_claim_is_refused(path):
    key = f"{SHARD.format('F')}/k"
    edit_json(path / key / "zarr.json", lambda m: m["codecs"][0].update(configuration={"endian": "big"}))
    refused(path, "F", "k: .*expected little-endian bytes. Got 'big' instead", "expected little-endian bytes")


def test_a_changed_chunk_shape_is_refused(path):
    key = f"{SHARD.format('F')}/align_weight"
    edit_json(path / key / "zarr.json",
              lambda m: m["chunk_grid"]["configuration"].update(chunk_shape=[12]))
    refused(path, "F", r"expected regular chunks \(24,\). Got regular chunks \(12,\) instead",
            r"align_weight/zarr.json: expected regular chunks \(24,\)")


def test_a_grid_array_without_crc32c_is_refused(path):
    edit_json(path / "grid/input_ids/zarr.json",
              lambda m: m.update(codecs=[c for c in m["codecs"] if c["name"] != "crc32c"]))
    says = r"grid/input_ids/zarr.json: expected a codec chain that ends with crc32c \(every chunk checksummed\)"
    problems = [str(p) for p in verify_store(path).problems]
    assert problems[0].startswith(f"grid/input_ids: {says}".replace("\\", "")), problems
    with pytest.raises(SchemaError, match=rf"{says}. Got \['bytes', 'blosc'\] instead. Its metadata was changed"):
        KVStore.open(path).read_shard(0, teachers=[])


# --------------------------------------------------------------------------------------------------------------
# 2. Features against the format version


def test_a_lowbit_teacher_in_a_downgraded_store_is_refused(path):
    reseal(path / "zarr.json", "kava", lambda m: m.update(format_version=2))
    says = ("teacher 'Q': expected a store of format version 3 or later for int4 storage. Got version 2 instead: "
            "a version-2 store can't hold it, so its manifest was changed. Restore the original")
    store = KVStore.open(path)
    with pytest.raises(SchemaError, match=says):
        store.teacher("Q")
    with pytest.raises(SchemaError, match=says):
        store.read_shard(0)
    with pytest.raises(SchemaError, match=says):
        read_window(store, [0], [TeacherRequest("Q")], pad_id=0)
    assert store.read_shard(0, teachers=["F"]).teachers["F"].k.shape == (24, 2, 1, 8)  # the float16 teacher reads
    report = verify_store(path)
    assert [p.where for p in report.problems] == ["teachers/Q"] and "format version 3 or later" in str(
        report.problems[0])


def test_a_store_downgraded_to_version_1_is_refused_and_not_sealed(path):
    """Version 1 had no digests: without them, a reader can't tell an edit, so it refuses the store, and sealing
    refuses a store that holds what version 1 could not."""
    edit_json(path / "zarr.json", lambda m: (m["attributes"]["kava"].pop("digest"),
                                             m["attributes"]["kava"].update(format_version=1)))
    for name in ("F", "Q"):
        edit_json(path / f"teachers/{name}/zarr.json", lambda m: m["attributes"]["kava_teacher"].pop("digest"))
    with pytest.raises(UnsealedStoreError, match=r"format version 1 store; .* Check and seal it with `kava store "
                                                 r"seal` \(a full verify, then digests\), or re-extract it"):
        KVStore.open(path)
    before = (path / "zarr.json").read_text()
    report = seal_store(path)
    assert [p.where for p in report.problems] == ["teachers/Q"] and "format version 3 or later" in str(
        report.problems[0])
    assert (path / "zarr.json").read_text() == before  # nothing sealed
    with pytest.raises(UnsealedStoreError):
        KVStore.open(path)


# --------------------------------------------------------------------------------------------------------------
# 3. Values


def _set(index, value) -> Callable[[np.ndarray], None]:
    def change(x: np.ndarray) -> None:
        x[index] = value

    return change


FIX = r"The shard was changed after it was written: delete teachers/{}/shards/000000 and re-extract it"


@pytest.mark.parametrize("name, array, change, says", [
    ("F", "logit_ids", _set((3, 0), 1_000_000),
     r"expected ids in \[0, 50\) or -1 \(no target\). Got -?\d+\.\.1000000 instead"),
    ("F", "logit_ids", _set((3, 0), -7), r"expected ids in \[0, 50\) or -1 \(no target\). Got -7..\d+"),
    ("F", "logit_ids", _set((3, 1), -1), "expected rows of ids all in the vocabulary or all -1"),
    ("F", "logit_logp", _set((3, 0), 5.0), r"expected finite log-probabilities <= 0. Got .*\.\.5 instead"),
    ("F", "logit_logp", _set((3, 0), np.nan), r"expected finite log-probabilities <= 0. Got non-finite values"),
    ("F", "align_weight", _set(2, np.nan), r"expected finite weights in \[0, 1\]. Got non-finite values"),
    ("F", "align_weight", _set(2, -1e30), r"expected finite weights in \[0, 1\]. Got -1e\+30\.\."),
    ("F", "sample_status", _set(1, 7), r"expected status codes 0 \(ok\) or 1 \(quarantined\). Got 7 instead"),
    ("Q", "k_scale", _set((0, 0, 0, 0), np.nan), r"expected finite scales in \[0, 8733.87\]"),
    ("Q", "k_scale", _set((0, 0, 0, 0), np.inf), r"expected finite scales in \[0, 8733.87\]"),
    ("Q", "k_scale", _set((0, 0, 0, 0), 60000), r"expected finite scales in \[0, 8733.87\] \(int4: .*Got .*\.\.60000"),
    ("Q", "v_scale", _set((4, 1, 0, 0), -1.0), r"expected finite scales in \[0, 8733.87\]"),
    ("Q", "v_zero", _set((4, 1, 0, 0), np.inf), r"expected finite zeros. Got non-finite values"),
    ("Q", "v_zero", _set((4, 1, 0, 0), -np.nan), r"expected finite zeros. Got non-finite values"),
])
def test_forged_values_are_refused(path, name, array, change, says):
    rewrite(path, name, array, change)
    logits = array.startswith("logit")
    refused(path, name, rf"^{SHARD.format(name)}/{array}: {says}.*\(chunk \(0,.*\)\. {FIX.format(name)}",
            rf"teacher '{name}' shard 0 array '{array}' \(samples 0-4\): {says}.* {FIX.format(name)}",
            with_logits=logits)


def test_a_lowbit_group_beyond_float16_is_refused(path):
    """Scale and zero each in range, but the group's largest value, zero + 15 * scale, is not a float16."""
    rewrite(path, "Q", "v_zero", _set((4, 1, 0, 0), 65000))
    rewrite(path, "Q", "v_scale", _set((4, 1, 0, 0), 100))
    says = r"expected groups whose largest value \(zero \+ scale \* 15\) stays within float16's range"
    refused(path, "Q", "v_scale: with v_zero: expected groups whose largest value",
            rf"teacher 'Q' shard 0 arrays 'v_scale', 'v_zero': {says}.*{FIX.format('Q')}")


@pytest.mark.parametrize("value", [np.inf, -np.inf, np.nan])
def test_forged_float16_values_are_refused(path, value):
    """K/V themselves: `verify` passes over every value; a read checks each chunk as it decodes it."""
    rewrite(path, "F", "v", _set((6, 1, 0, 3), value))
    (problem,) = refused(path, "F", "v: expected finite values",
                         rf"teacher 'F' shard 0 array 'v' \(samples 0-4\): expected finite values. Got NaN or Inf "
                         rf"instead. {FIX.format('F')}")
    assert problem.startswith(f"{SHARD.format('F')}/v: expected finite values. Got NaN or Inf instead (chunk ")


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
def test_finite_rule_matches_isfinite(dtype):
    """The bit-pattern rule against numpy's isfinite, on every float16 bit pattern (and the bfloat16 and float32
    specials, with their largest finite neighbours)."""
    if dtype == "float16":
        values = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16).view(np.float16)
        stored = values
    else:
        specials = np.array([np.inf, -np.inf, np.nan, -np.nan, 0.0, -0.0, 1.0, 3.3895314e38, -3.3895314e38],
                            dtype=np.float32)
        values = specials
        stored = (specials.view(np.uint32) >> 16).astype(np.uint16) if dtype == "bfloat16" else specials
    for i in range(len(values)):
        got = rules.finite_problem(stored[i : i + 1], dtype)
        assert (got is None) == bool(np.isfinite(values[i])), (dtype, values[i], got)
    assert rules.finite_problem(np.zeros(0, np.float16), "float16") is None
    assert rules.finite_problem(np.array([np.inf], np.float32).view(np.uint32).astype(np.int8), "int8") is None


def test_a_marker_longer_than_the_grid_is_refused(path):
    marker = path / SHARD.format("F") / "zarr.json"  # a marker carries no digest
    edit_json(marker, lambda m: m["attributes"]["kava_shard"].update(tokens=[0, 400]))
    refused(path, "F", r"completion marker: expected the marker's sample and token ranges \[0, 5\]/\[0, 24\] of "
                       r"the grid",
            r"teacher 'F' shard 0 completion marker \(teachers/F/shards/000000/zarr.json\): expected the marker's "
            r"sample and token ranges \[0, 5\]/\[0, 24\] of the grid. Got \[0, 5\]/\[0, 400\] instead")


@pytest.mark.parametrize("array, value, says", [
    ("input_ids", 1_000_000, r"grid/input_ids: expected token ids in \[0, 50\) \(the student vocabulary\). Got "),
    ("input_ids", -7, r"grid/input_ids: expected token ids in \[0, 50\)"),
    ("segment_ids", 9, "grid/segment_ids: expected codes below 4. Got 9 instead"),
])
def test_forged_grid_ids_are_refused(path, array, value, says):
    arr = zarr.open_array(path / "grid" / array, mode="r+")
    arr[3] = value
    problems = [str(p) for p in verify_store(path).problems]
    assert any(says.replace("\\", "").split(". Got")[0].split(": ", 1)[1] in p for p in problems), problems
    with pytest.raises(SchemaError, match=f"{says}.*extract again into a new --store path"):
        KVStore.open(path).read_shard(0)
    with pytest.raises(SchemaError, match=says):
        read_window(KVStore.open(path), [0], [TeacherRequest("F")], pad_id=0)


def test_forged_offsets_are_refused(path):
    arr = zarr.open_array(path / "grid/offsets", mode="r+")
    arr[2] = 1_000_000
    problems = [str(p) for p in verify_store(path).problems]
    assert any(p.startswith("grid/offsets: expected 6 non-decreasing offsets from 0 to 24") for p in problems)
    with pytest.raises(SchemaError, match=r"grid/offsets: expected 6 non-decreasing offsets from 0 to 24. Got "):
        KVStore.open(path).read_shard(0)


# --------------------------------------------------------------------------------------------------------------
# 4. Forged geometry: a re-sealed spec that no longer describes the arrays


@pytest.mark.parametrize("name, change, array, says", [
    ("Q", lambda t: t["storage"].update(group_channels=4), "v_scale",
     r"expected shape \(24, 2, 1, 2\). Got \(24, 2, 1, 1\) instead"),
    ("Q", lambda t: t["storage"].update(dtype="int2"), "k", r"expected shape \(24, 2, 1, 2\). Got \(24, 2, 1, 4\)"),
    ("Q", lambda t: (t["storage"].update(dtype="int8"), t["storage"].pop("group_tokens"),
                     t["storage"].pop("group_channels")), "k", "expected dtype int8. Got uint8 instead"),
    ("F", lambda t: t["storage"].update(dtype="int4", group_tokens=64, group_channels=8), "k",
     "expected dtype uint8. Got float16 instead"),
    ("F", lambda t: t["logits"].update(top_k=3), "logit_ids", r"expected shape \(24, 3\). Got \(24, 2\) instead"),
])
def test_forged_geometry_is_one_line(path, name, change, array, says):
    reseal(path / f"teachers/{name}/zarr.json", "kava_teacher", change)
    logits = array.startswith("logit")
    refused(path, name, f"{array}: .*{says}",
            rf"teacher '{name}' shard 0 array '{array}' .*{SHARD.format(name)}/{array}/zarr.json: {says}",
            with_logits=logits)


def test_the_sound_store_reads_and_verifies(sound):
    """The rules cost a sound store nothing but the checks: it reads through both paths and verifies clean."""
    store = KVStore.open(sound)
    rows = store.read_shard(0, with_logits=False)
    assert rows.teachers["Q"].k.shape == (24, 2, 1, 8)
    window = read_window(store, [0], [TeacherRequest("F", with_logits=True), TeacherRequest("Q")], pad_id=0)
    assert window.teachers["F"].logit_ids.shape == (25, 2)
    report = verify_store(sound)
    assert report.ok and not report.warnings
