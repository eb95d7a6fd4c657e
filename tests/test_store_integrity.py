"""A store's metadata can't drift silently and can't point outside the store.

Each test edits a real store on disk the way a hand, a script or a hostile file would (the manifest in the root
``zarr.json``, a teacher's spec in ``teachers/<name>/zarr.json``, ``index.parquet``, chunk files) and checks that
``KVStore.open`` / the readers refuse it with a message naming what changed, and that ``verify_store`` and the
``kava store verify`` command list it. Some edits re-seal the digest, as someone who knows the format could: name
validation and the recomputed grid fingerprint must hold without the digest.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zarr
from zarr.core.sync import sync

from kava.kvstore import (
    ChecksumError,
    DatasetSpec,
    KVStore,
    LayerMap,
    SchemaError,
    TeacherSpec,
    TokenizerSpec,
    UnsealedStoreError,
    create_store,
    default_storage,
    seal_store,
    verify_store,
)
from kava.kvstore.manifest import MAX_NAME_BYTES, is_plain_name, seal

LENGTHS = [5, 7, 0, 9]
ROPE = {"rope_type": "default", "theta": 10000.0}


def make_store(location, tokenizer_files: dict[str, bytes] | None = None, tokenizer=None) -> KVStore:
    """A small sealed store: 4 samples (one empty), one teacher 'A' of 3 layers mapped onto 2 student layers."""
    rng = np.random.default_rng(0)
    spec = tokenizer or TokenizerSpec("tiny", "e" * 64, 50, files=tuple(tokenizer_files or ()))
    store = create_store(
        location, sample_ids=[f"synthetic/test/{i:06d}" for i in range(len(LENGTHS))],
        input_ids=[rng.integers(0, 50, n) for n in LENGTHS], segment_ids=[np.zeros(n, int) for n in LENGTHS],
        student_tokenizer=spec, dataset=DatasetSpec("synthetic", "test", "f" * 64), tokenizer_files=tokenizer_files,
    )
    store.add_teacher(TeacherSpec(
        name="A", model={"id": "tiny/A"}, num_layers=3, layers=(0, 2), num_heads=2, kv_heads=1, head_dim=4,
        layer_map=LayerMap("proportional", (((0, 1.0),), ((2, 1.0),))), rope=ROPE,
        storage=default_storage(2, 1, 4),
    ))
    with store.shard_writer("A", 0) as w:
        for n in LENGTHS:
            w.add(rng.standard_normal((n, 2, 1, 4)), rng.standard_normal((n, 2, 1, 4)))
    return store


@pytest.fixture
def path(tmp_path) -> Path:
    make_store(tmp_path / "kv.zarr")
    return tmp_path / "kv.zarr"


def edit_attrs(doc: Path, attr: str, change, *, reseal: bool = False) -> None:
    """Rewrite ``attributes[attr]`` of a zarr.json document as a text editor would (no zarr involved)."""
    meta = json.loads(doc.read_text())
    value = meta["attributes"][attr]
    change(value)
    meta["attributes"][attr] = seal(value) if reseal else value
    doc.write_text(json.dumps(meta, indent=2))


def problems_of(path: Path) -> list[str]:
    return [str(p) for p in verify_store(path).problems]


def cli_verify(path: Path) -> tuple[int, dict]:
    proc = subprocess.run([sys.executable, "-m", "kava.pipelines.cli", "store", "verify", str(path), "--json"],
                          capture_output=True, text=True, timeout=120, check=False)
    return proc.returncode, json.loads(proc.stdout)


# --------------------------------------------------------------------------------------------------------------
# Names read from a store


@pytest.mark.parametrize("name", ["", ".", "..", "/tmp/x", "../x", "a/b", "a\\b", "C:x", "a\x00b", "a\nb",
                                  "x" * (MAX_NAME_BYTES + 1), "é" * 128, 7, None])
def test_plain_names_refused(name):
    assert not is_plain_name(name)


@pytest.mark.parametrize("name", ["tokenizer.json", "vocab.json", "merges.txt", "tokenizer.model", ".hidden",
                                  "a..b", "x" * MAX_NAME_BYTES, "é" * 127])
def test_plain_names_accepted(name):
    assert is_plain_name(name)


@pytest.mark.integration
@pytest.mark.parametrize("bad", ["/tmp/x", "../../x", "..", "a\x00b"])
def test_tokenizer_file_name_that_is_a_path_is_refused(path, bad):
    # Re-sealed: the name rule holds on its own, not only through the digest.
    edit_attrs(path / "zarr.json", "kava", lambda m: m["student_tokenizer"].update(files=["vocab.json", bad]),
               reseal=True)
    with pytest.raises(SchemaError, match=r"bad manifest: student_tokenizer.files\[1\]: expected a plain file name"):
        KVStore.open(path)
    (problem,) = problems_of(path)
    assert problem.startswith("zarr.json: ") and "student_tokenizer.files[1]: expected a plain file name" in problem
    code, report = cli_verify(path)
    assert code == 1 and not report["ok"] and "expected a plain file name" in report["problems"][0]["message"]


def test_teacher_name_that_is_a_path_is_refused(path):
    edit_attrs(path / "teachers/A/zarr.json", "kava_teacher", lambda t: t.update(name="/tmp/x"), reseal=True)
    store = KVStore.open(path)
    with pytest.raises(SchemaError, match=r"teachers/A: teacher.name: expected a teacher name .* Got '/tmp/x'"):
        store.teacher("A")
    with pytest.raises(SchemaError, match="teacher.name: expected a teacher name"):
        store.read_sample(0)
    (problem,) = problems_of(path)
    assert problem.startswith("teachers/A: ") and "Got '/tmp/x' instead" in problem


def test_teacher_spec_must_name_its_folder(path):
    edit_attrs(path / "teachers/A/zarr.json", "kava_teacher", lambda t: t.update(name="B"), reseal=True)
    with pytest.raises(SchemaError, match="teachers/A: expected the spec of teacher 'A'. Got one named 'B'"):
        KVStore.open(path).teacher("A")
    assert any("Got one named 'B'" in p for p in problems_of(path))


def rewrite_index(path: Path, ids: list) -> None:
    table = pq.read_table(path / "index.parquet")
    table = table.set_column(1, "sample_id", pa.array(ids, pa.string()))
    sink = io.BytesIO()
    pq.write_table(table, sink, write_page_checksum=True)
    (path / "index.parquet").write_bytes(sink.getvalue())


@pytest.mark.parametrize("ids, message", [
    (["a", "b\x00c", "d", "e"], "expected printable ids"),
    (["a", "a", "b", "c"], "expected distinct ids. Got 1 repeated"),
    (["a", None, "b", "c"], "expected a string per sample. Got 1 null"),
    (["a", "", "b", "c"], "expected ids of 1 to 1000 characters"),
])
def test_bad_sample_ids_are_refused(path, ids, message):
    rewrite_index(path, ids)
    store = KVStore.open(path)
    with pytest.raises(SchemaError, match=f"index.parquet: sample_id: {message}"):
        store.read_sample(0)
    assert any(p.startswith("index.parquet: sample_id: ") and message in p for p in problems_of(path))


def test_writers_refuse_names_that_are_paths(tmp_path):
    from kava.core.errors import ConfigError

    with pytest.raises(ConfigError, match=r"Expected plain tokenizer file names .* Got \['/tmp/x'\]"):
        make_store(tmp_path / "a.zarr", tokenizer_files={"/tmp/x": b"{}"})
    with pytest.raises(ConfigError, match="Sample ids: expected printable ids"):
        create_store(tmp_path / "b.zarr", sample_ids=["a\nb"], input_ids=[[1]], segment_ids=[[0]],
                     student_tokenizer=TokenizerSpec("t", "f", 10), dataset=DatasetSpec("d", "s", "f"))
    assert not (tmp_path / "a.zarr").exists() and not (tmp_path / "b.zarr").exists()


def test_tokenizer_from_files_writes_nothing_outside_its_folder(tmp_path, assets):
    """The function distill rebuilds the student tokenizer with, handed the names a hostile store would give."""
    from kava.distill.student import tokenizer_from_files

    gpt2 = assets("tokenizers/gpt2")
    files = {f.name: f.read_bytes() for f in gpt2.iterdir() if f.is_file()}
    assert len(tokenizer_from_files(files)) == 50257  # the real files still rebuild the real tokenizer
    outside = tmp_path / "outside"
    outside.mkdir()
    for bad in [str(outside / "pwned.json"), "../outside-pwned.json", "sub/x.json"]:
        with pytest.raises(SchemaError, match="Expected plain tokenizer file names"):
            tokenizer_from_files({**files, bad: b"{}"})
    assert list(outside.iterdir()) == []


@pytest.mark.integration
@pytest.mark.slow
def test_distill_from_a_store_naming_an_absolute_tokenizer_file_writes_nothing(tmp_path, assets):
    """What the user would meet: `kava distill` on a store whose tokenizer file list was edited to a path."""
    from transformers import AutoTokenizer

    from kava.extract.grid import tokenizer_spec

    tok_spec, files = tokenizer_spec(AutoTokenizer.from_pretrained(assets("tokenizers/gpt2")), "gpt2")
    store_path = tmp_path / "kv.zarr"
    make_store(store_path, tokenizer_files=files, tokenizer=tok_spec)
    target = tmp_path / "outside" / "pwned.json"
    target.parent.mkdir()
    edit_attrs(store_path / "zarr.json", "kava",
               lambda m: m["student_tokenizer"].update(files=[*m["student_tokenizer"]["files"], str(target)]))
    proc = subprocess.run(
        [sys.executable, "-m", "kava.pipelines.cli", "distill", "--store", str(store_path), "--student", "tiny-qwen2",
         "--out", str(tmp_path / "run"), "--epochs", "1"],
        capture_output=True, text=True, timeout=300, check=False, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""},
    )
    assert proc.returncode != 0
    assert f"student_tokenizer.files[{len(files)}]: expected a plain file name" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not target.exists() and list(target.parent.iterdir()) == []


# --------------------------------------------------------------------------------------------------------------
# Digests


def test_sealed_store_round_trips(path):
    raw = json.loads((path / "zarr.json").read_text())["attributes"]["kava"]
    assert raw["format_version"] == 5 and set(raw["digest"]) == set(raw) - {"digest"}
    report = verify_store(path)
    assert report.ok and not report.warnings, report.problems


@pytest.mark.parametrize("field, change", [
    ("layer_map", lambda t: t["layer_map"]["sources"].__setitem__(1, [[0, 1.0]])),
    ("rope", lambda t: t["rope"].update(theta=500000.0)),
])
@pytest.mark.integration
def test_edited_teacher_spec_is_caught(path, field, change):
    edit_attrs(path / "teachers/A/zarr.json", "kava_teacher", change)
    store = KVStore.open(path)  # the manifest is intact
    expected = (rf"teacher 'A'\'s spec \(teachers/A/zarr.json, attributes.kava_teacher\) does not match its "
                rf"digest \(changed {field}\): it was edited after it was written.*extract that teacher again")
    with pytest.raises(ChecksumError, match=expected):
        store.teacher("A")
    with pytest.raises(ChecksumError, match=expected):
        store.teachers  # what distill lists teachers with  # noqa: B018
    with pytest.raises(ChecksumError, match=expected):
        KVStore.open(path).read_shard(0)
    (problem,) = problems_of(path)
    assert problem.startswith("teachers/A: ") and f"(changed {field})" in problem
    code, report = cli_verify(path)
    assert code == 1 and report["problems"][0]["where"] == "teachers/A"
    assert f"changed {field}" in report["problems"][0]["message"]


@pytest.mark.integration
def test_edited_grid_fingerprint_is_caught(path):
    edit_attrs(path / "zarr.json", "kava", lambda m: m.update(grid_fingerprint="0" * 64))
    with pytest.raises(ChecksumError, match=r"the manifest \(zarr.json, attributes.kava\) does not match its digest "
                                            r"\(changed grid_fingerprint\)"):
        KVStore.open(path)
    problems = problems_of(path)
    assert len(problems) == 2  # the digest, and the fingerprint recomputed from the grid
    assert problems[0].startswith("zarr.json: ") and "(changed grid_fingerprint)" in problems[0]
    assert problems[1].startswith("grid: expected the grid fingerprint in the manifest (000000000000...)")
    code, report = cli_verify(path)
    assert code == 1 and [p["where"] for p in report["problems"]] == ["zarr.json", "grid"]


def test_resealed_grid_fingerprint_is_still_caught_by_verify(path):
    edit_attrs(path / "zarr.json", "kava", lambda m: m.update(grid_fingerprint="0" * 64), reseal=True)
    KVStore.open(path)  # consistent with its digest: only the grid itself can tell
    (problem,) = problems_of(path)
    assert problem.startswith("grid: expected the grid fingerprint") and "Extract again" in problem


def test_added_and_removed_fields_are_caught(path):
    def change(m):
        m["extra"] = 1
        del m["created_by"]

    edit_attrs(path / "zarr.json", "kava", change)
    with pytest.raises(ChecksumError, match=r"\(added extra; removed created_by\)"):
        KVStore.open(path)


def test_a_version_2_document_without_digest_is_refused(path):
    edit_attrs(path / "teachers/A/zarr.json", "kava_teacher", lambda t: t.pop("digest"))
    with pytest.raises(ChecksumError, match=r"does not match its digest \(its digest is missing\)"):
        KVStore.open(path).teacher("A")
    edit_attrs(path / "zarr.json", "kava", lambda m: m.pop("digest"))
    with pytest.raises(ChecksumError, match=r"the manifest .* \(its digest is missing\)"):
        KVStore.open(path)


@pytest.mark.integration
def test_a_format_1_store_is_refused_until_sealed(path):
    """A store written before digests: refused (an edit to it can't be detected) until `kava store seal` has
    verified it whole and written its digests; then it reads as it did."""
    want = KVStore.open(path).read_shard(0).teachers["A"].k
    edit_attrs(path / "zarr.json", "kava", lambda m: (m.pop("digest"), m.update(format_version=1)))
    edit_attrs(path / "teachers/A/zarr.json", "kava_teacher", lambda t: t.pop("digest"))
    note = (f"{path}: format version 1 store; its manifest (zarr.json) and teacher specs carry no digest, so an "
            "edit to them can't be detected. Check and seal it with `kava store seal` (a full verify, then digests), "
            "or re-extract it with this kava.")
    with pytest.raises(UnsealedStoreError) as caught:
        KVStore.open(path)
    assert str(caught.value) == note
    report = verify_store(path)
    assert [str(p) for p in report.problems] == [f"zarr.json: {note}"]

    proc = subprocess.run([sys.executable, "-m", "kava.pipelines.cli", "store", "seal", str(path)],
                          capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(f"{path}: sealed; ") and "chunks" in proc.stdout
    store = KVStore.open(path)
    assert store.manifest.format_version == 2
    np.testing.assert_array_equal(store.read_shard(0).teachers["A"].k, want)
    assert verify_store(path).ok
    again = seal_store(path)
    assert again.ok and again.warnings == [f"{path}: already sealed (format version 2 or later); nothing to do"]
    missing = path.parent / "nothing.zarr"  # a path that is no store: one line, and no lock file left beside it
    proc = subprocess.run([sys.executable, "-m", "kava.pipelines.cli", "store", "seal", str(missing)],
                          capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 1 and proc.stderr.strip() == (
        f"error: {missing}: no such directory. Check the path, or create a store with `kava extract`.")
    assert not (path.parent / ".nothing.zarr.lock").exists()


def test_a_format_1_store_with_a_bad_chunk_is_not_sealed(path):
    edit_attrs(path / "zarr.json", "kava", lambda m: (m.pop("digest"), m.update(format_version=1)))
    edit_attrs(path / "teachers/A/zarr.json", "kava_teacher", lambda t: t.pop("digest"))
    chunk = path / "teachers/A/shards/000000/k/c/0/0/0/0"
    data = bytearray(chunk.read_bytes())
    data[7] ^= 0xFF
    chunk.write_bytes(bytes(data))
    before = (path / "zarr.json").read_text()
    report = seal_store(path)
    assert [p.where for p in report.problems] == ["teachers/A/shards/000000/k"]
    assert (path / "zarr.json").read_text() == before
    with pytest.raises(UnsealedStoreError):
        KVStore.open(path)


# --------------------------------------------------------------------------------------------------------------
# Deleted files


@pytest.mark.integration
def test_deleted_grid_chunk_is_missing_not_zeros(path):
    (path / "grid/offsets/c/0").unlink()
    store = KVStore.open(path)
    with pytest.raises(SchemaError, match=r"grid/offsets: chunk \(0,\) is missing.*kava store verify"):
        store.offsets  # noqa: B018
    with pytest.raises(SchemaError, match=r"grid/offsets: chunk \(0,\) is missing"):
        KVStore.open(path).read_sample(0)
    assert problems_of(path) == ["grid/offsets: chunk (0,) is missing (offsets rows 0-4)"]
    code, report = cli_verify(path)
    assert code == 1 and report["problems"] == [{"where": "grid/offsets",
                                                 "message": "chunk (0,) is missing (offsets rows 0-4)"}]


@pytest.mark.parametrize("key, read", [
    ("grid/input_ids/c/0", lambda store: store.read_sample(0)),
    ("teachers/A/shards/000000/align_weight/c/0", lambda store: store.read_shard(0)),
])
def test_deleted_chunk_in_a_memory_store_is_missing_not_zeros(key, read):
    """zarr reads a missing chunk as its fill value; the reader looks first on every backend."""
    mem = zarr.storage.MemoryStore()
    make_store(mem)
    sync(mem.delete(key))
    array = key.rsplit("/c/", 1)[0]
    with pytest.raises(SchemaError, match=rf"<memory store>: {array}: chunk \(0,\) is missing"):
        read(KVStore.open(mem))


@pytest.mark.integration
def test_deleted_teacher_metadata_is_reported_as_such(path):
    (path / "teachers/A/zarr.json").unlink()
    store = KVStore.open(path)
    expected = r"teacher 'A' has data but its metadata, teachers/A/zarr.json, is missing"
    with pytest.raises(SchemaError, match=expected):
        store.teacher("A")
    with pytest.raises(SchemaError, match=expected):
        store.teachers  # noqa: B018
    with pytest.raises(SchemaError, match=expected):
        store.read_sample(0)
    (problem,) = problems_of(path)
    assert problem.startswith("teachers/A: ") and "its metadata, teachers/A/zarr.json, is missing" in problem
    code, report = cli_verify(path)
    assert code == 1 and "teachers/A/zarr.json, is missing" in report["problems"][0]["message"]


def test_teacher_that_never_existed_is_still_named_absent(path):
    with pytest.raises(SchemaError, match=r"no teacher 'B' in this store. It has: A\."):
        KVStore.open(path).teacher("B")
