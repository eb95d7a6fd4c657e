"""Creating a store: validate the student grid, write it once, and publish the store atomically.

The grid (input ids, segment ids, offsets, shard plan), the per-sample index and the student tokenizer's files are
written first and the root manifest last. A directory store is built under a hidden sibling name and renamed into
place, so of several jobs creating the same store at once exactly one wins and the others open and check it. A store
on object storage (a URL), which has no rename, is built in place, the manifest last: a creation interrupted there
leaves a root group without a manifest, which readers refuse and the next creation builds over.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import io
import os
import shutil
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from importlib.metadata import version
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import zarr
from zarr.abc.store import Store
from zarr.storage import FsspecStore

from kava.core.errors import ConfigError, StoreError

from . import codecs, layout, remote, zarr_io
from .integrity import sample_ids_problem
from .manifest import FORMAT_VERSION, SEGMENT_NAMES, DatasetSpec, StoreManifest, TokenizerSpec, is_plain_name, seal
from .store import KVStore
from .verify import verify_store

GRID_CHUNK = 1 << 20
"""Rows per chunk of the 1-D grid arrays (4 MiB of int32 input ids)."""


def sample_ids_hash(sample_ids: Sequence[str]) -> str:
    """sha256 of the sample ids in order, one per line: the split's identity."""
    h = hashlib.sha256()
    for sid in sample_ids:
        h.update(sid.encode())
        h.update(b"\n")
    return h.hexdigest()


def plan_shards(lengths: np.ndarray, *, shard_tokens: int, max_samples: int | None = None) -> np.ndarray:
    """Cut samples into contiguous shards of about ``shard_tokens`` tokens (and at most ``max_samples``).

    Returns ``shard_starts`` ``[S+1]``: shard ``s`` holds samples ``shard_starts[s]:shard_starts[s+1]``.
    """
    starts = [0]
    tokens = 0
    for i, n in enumerate(lengths):
        tokens += int(n)
        count = i + 1 - starts[-1]
        if tokens >= shard_tokens or (max_samples is not None and count >= max_samples):
            starts.append(i + 1)
            tokens = 0
    if starts[-1] != len(lengths):
        starts.append(len(lengths))
    return np.asarray(starts, dtype=np.int64)



def create_store(
    location: str | os.PathLike | Store,
    *,
    sample_ids: Sequence[str],
    input_ids: Sequence[Any],
    segment_ids: Sequence[Any],
    student_tokenizer: TokenizerSpec,
    dataset: DatasetSpec,
    sample_status: Sequence[str] | None = None,
    status_reasons: Sequence[str] | None = None,
    shard_tokens: int = 32768,
    shard_samples: int | None = None,
    tokenizer_files: Mapping[str, bytes] | None = None,
    created_by: str = "",
    exist_ok: bool = True,
) -> KVStore:
    """Create a store and write its student token grid; return it opened for appending.

    ``input_ids[i]`` and ``segment_ids[i]`` are sample ``i``'s student tokens ``[T_i]``. If a store with the
    same grid already exists (another job of a job array got there first) it is opened instead; a store with
    a different grid is refused.
    """
    n = len(sample_ids)
    if not (len(input_ids) == len(segment_ids) == n):
        raise ConfigError(
            f"Expected one input_ids and one segment_ids array per sample ({n}). "
            f"Got {len(input_ids)} and {len(segment_ids)} instead."
        )
    if len(set(sample_ids)) != n:
        raise ConfigError("Expected unique sample ids. Got duplicates instead; give every row its own id.")
    bad_ids = sample_ids_problem(pa.array(list(sample_ids), pa.string())) if n else None
    if bad_ids is not None:
        raise ConfigError(f"Sample ids: {bad_ids}.")
    status = list(sample_status) if sample_status is not None else ["ok"] * n
    reasons = list(status_reasons) if status_reasons is not None else [""] * n
    if len(status) != n or len(reasons) != n or any(s not in layout.SAMPLE_STATUS for s in status):
        raise ConfigError(f"Expected one status in {layout.SAMPLE_STATUS} and one reason per sample.")
    ids = [np.asarray(x, dtype=np.int64).reshape(-1) for x in input_ids]
    segs = [np.asarray(x, dtype=np.int64).reshape(-1) for x in segment_ids]
    for i, (a, b) in enumerate(zip(ids, segs)):
        if len(a) != len(b):
            raise ConfigError(f"Sample {sample_ids[i]!r}: {len(a)} input ids but {len(b)} segment ids.")
        if len(b) and (b.min() < 0 or b.max() >= len(SEGMENT_NAMES)):
            raise ConfigError(f"Sample {sample_ids[i]!r}: segment ids must be 0..3 (prompt..special).")
        if len(a) and (a.min() < 0 or a.max() >= student_tokenizer.vocab_size):
            raise ConfigError(
                f"Sample {sample_ids[i]!r}: input ids outside [0, {student_tokenizer.vocab_size}) "
                "of the student tokenizer."
            )
    names = dict.fromkeys([*student_tokenizer.files, *(tokenizer_files or {})])  # in order, once each
    bad_names = [f for f in names if not is_plain_name(f)]
    if bad_names:
        raise ConfigError(
            f"Expected plain tokenizer file names (no '/', '\\' or ':', not '.' or '..', no control characters). "
            f"Got {bad_names[:3]!r} instead. Save the tokenizer with save_pretrained and pass its files by name."
        )
    lengths = np.array([len(a) for a in ids], dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    flat_ids = np.concatenate(ids).astype(np.int32) if n else np.zeros(0, np.int32)
    flat_segs = np.concatenate(segs).astype(np.uint8) if n else np.zeros(0, np.uint8)
    shard_starts = plan_shards(lengths, shard_tokens=shard_tokens, max_samples=shard_samples)

    grid_hash = hashlib.sha256(offsets.tobytes() + flat_ids.tobytes()).hexdigest()
    manifest = StoreManifest(
        student_tokenizer=student_tokenizer,
        dataset=replace(dataset, sample_ids_hash=sample_ids_hash(sample_ids)),
        num_samples=n,
        num_tokens=int(offsets[-1]),
        num_shards=len(shard_starts) - 1,
        grid_fingerprint=grid_hash,
        created_by=created_by,
        created_at=_dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        kava_version=_version(),
        format_version=FORMAT_VERSION,
    )

    store = zarr_io.as_zarr_store(location, read_only=False)
    where = zarr_io.describe(store)
    if isinstance(store, FsspecStore):
        remote.probe(store, must_exist=False)  # a missing bucket, denied access or no network: one error
        remote.note_unlocked(where)
    # A directory's creation is renamed into place, so a root zarr.json there is a finished store; one built in
    # place (object storage, a Store object) may also be an interrupted creation, which is built over below.
    if zarr_io.exists(store, "zarr.json") and (zarr_io.is_local(location) or not _interrupted_creation(store)):
        return _open_same_grid(location if not isinstance(location, Store) else store, manifest, exist_ok)
    final: Path | None = None
    if not isinstance(location, Store) and zarr_io.is_local(location):
        # A directory is built under a private name beside it and renamed into place: of two jobs of an array
        # creating the same store at once exactly one rename wins, and no job opens a half-written grid (the
        # root zarr.json appears with the first grid array, long before the manifest).
        final = Path(location)
        final.parent.mkdir(parents=True, exist_ok=True)
        building = Path(tempfile.mkdtemp(prefix=f".{final.name}.creating-", dir=final.parent))
        store = zarr_io.as_zarr_store(building, read_only=False)

    def build(store: Any) -> None:
        """The grid arrays, the tokenizer files, the index and, last, the manifest."""

        def grid(name: str, data: np.ndarray, dim: str) -> None:
            zarr_io.create_array(
                store, layout.grid_key(name), shape=data.shape, chunks=(GRID_CHUNK,), dtype=data.dtype,
                dims=(dim,), compressor=codecs.DEFAULT_COMPRESSOR,
            )[...] = data

        grid("offsets", offsets, "sample_edge")
        grid("input_ids", flat_ids, "token")
        grid("segment_ids", flat_segs, "token")
        grid("sample_status", np.array([layout.SAMPLE_STATUS.index(s) for s in status], np.uint8), "sample")
        grid("shard_starts", shard_starts, "shard_edge")
        for fname, data in (tokenizer_files or {}).items():
            arr = np.frombuffer(data, dtype=np.uint8)
            zarr_io.create_array(
                store, layout.tokenizer_file_key(fname), shape=arr.shape, chunks=(max(1, arr.size),),
                dtype=np.uint8, dims=("byte",),
            )[...] = arr
        table = pa.table(
            {
                "sample_index": pa.array(np.arange(n, dtype=np.int64)),
                "sample_id": pa.array(list(sample_ids), pa.string()),
                "shard": pa.array(np.searchsorted(shard_starts, np.arange(n), side="right") - 1),
                "token_offset": pa.array(offsets[:-1]),
                "num_tokens": pa.array(lengths),
                "status": pa.array(status, pa.string()),
                "reason": pa.array(reasons, pa.string()),
            },
            schema=layout.INDEX_SCHEMA,
        )
        sink = io.BytesIO()
        pq.write_table(table, sink, write_page_checksum=True)
        zarr_io.set_bytes(store, layout.INDEX_FILE, sink.getvalue())
        # The root attribute is written last: a store without it is an interrupted creation.
        zarr.open_group(store, mode="a").attrs.put({layout.MANIFEST_ATTR: seal(manifest.to_dict())})

    try:
        # Without a rename (object storage, a Store object) the store is built in place, the manifest last: an
        # interrupted creation holds a root group without it, which the next creation builds over.
        with remote.translated(where):
            build(store)
    except BaseException:
        # A failed build (a full disk, an interrupt) leaves nothing behind: the private directory is removed.
        if final is not None:
            shutil.rmtree(building, ignore_errors=True)
        raise
    if final is not None:
        try:
            os.rename(building, final)  # atomic; refused when `final` is a non-empty directory
        except OSError:
            shutil.rmtree(building, ignore_errors=True)
            if not (final / "zarr.json").exists():
                raise StoreError(
                    f"{final}: exists and is not a KaVa store (nor empty). Choose a new or empty directory."
                ) from None
            return _open_same_grid(final, manifest, exist_ok)  # another job created it first
        store = zarr_io.as_zarr_store(final, read_only=False)
    return KVStore(store, manifest)


def _interrupted_creation(store: Store) -> bool:
    """Whether the root group has no manifest and holds only what a creation writes before it: a creation built in
    place (not renamed into place) and interrupted, which may be built again over. Anything else is left alone."""
    try:
        attrs = zarr_io.group_attributes(store, "")
    except (FileNotFoundError, KeyError, ValueError, TypeError):
        return False
    made = {layout.GRID, layout.TOKENIZER, layout.INDEX_FILE}
    return layout.MANIFEST_ATTR not in attrs and set(zarr_io.list_dir(store, "")) <= made


def _open_same_grid(location: Any, manifest: StoreManifest, exist_ok: bool) -> KVStore:
    existing = KVStore.open(location, mode="a")
    _check_same_grid(existing, manifest)
    if not exist_ok:
        raise StoreError(f"{existing.where}: a store already exists here. Choose another path.")
    return existing


def _check_same_grid(store: KVStore, other: StoreManifest) -> None:
    mine = store.manifest
    problems = []
    if mine.student_tokenizer.fingerprint != other.student_tokenizer.fingerprint:
        problems.append(
            f"student tokenizer {mine.student_tokenizer.name!r} (fingerprint "
            f"{mine.student_tokenizer.fingerprint[:12]}) vs {other.student_tokenizer.name!r} "
            f"({other.student_tokenizer.fingerprint[:12]})"
        )
    if mine.dataset.sample_ids_hash != other.dataset.sample_ids_hash:
        problems.append(
            f"split {mine.dataset.name}:{mine.dataset.split} ({mine.num_samples} samples, ids hash "
            f"{mine.dataset.sample_ids_hash[:12]}) vs {other.dataset.name}:{other.dataset.split} "
            f"({other.num_samples} samples, {other.dataset.sample_ids_hash[:12]})"
        )
    elif not problems and mine.grid_fingerprint != other.grid_fingerprint:  # another tokenizer explains it
        problems.append("the same samples tokenized differently (student template or max length differ)")
    if problems:
        raise StoreError(
            f"{store.where}: this store was made for another student grid: " + "; ".join(problems)
            + ". Use a new --store path, or the same student tokenizer, split and template "
            "(--student-tokenizer, --dataset/--split/--limit/--seed, --student-template, --max-length)."
        )


def _version() -> str:
    try:
        return version("kava")
    except Exception:  # noqa: BLE001 - running from a source tree without metadata
        return "0+unknown"


def copy_store(source: str | os.PathLike | Store, destination: str | os.PathLike | Store, *,
               concurrency: int = remote.COPY_CONCURRENCY, verify: bool = True,
               progress: Callable[[int], None] | None = None) -> remote.CopyReport:
    """Copy the store at ``source`` to ``destination`` (a path or a URL, either way), object by object.

    Each chunk's crc32c is checked as it is read (a corrupted source is not copied), the root ``zarr.json`` (with
    the manifest) is written last, ``concurrency`` objects in flight, ``progress`` called with each object's size
    once it is written; with ``verify`` the destination is then verified whole
    (:func:`kava.kvstore.verify_store`); a destination that fails loses its root ``zarr.json`` again, so it is never
    an openable store. A destination holding a store is refused. A copy killed part way is resumed by running it
    again: objects already there with the source's size are kept (and verified with the rest).
    """
    src = KVStore.open(source)  # the manifest's digest is checked before anything is copied
    dst = zarr_io.as_zarr_store(destination, read_only=False)
    where = zarr_io.describe(dst)
    if isinstance(dst, FsspecStore):
        remote.probe(dst, must_exist=False)
    report = remote.CopyReport(source=src.where, destination=where)
    with remote.translated(f"{src.where} -> {where}"):
        keys, report.objects_kept = remote.copy_plan(src.zarr_store, dst, where=where)
        remote.copy_objects(src.zarr_store, dst, keys, report, concurrency=concurrency, progress=progress)
    if verify:
        checked = verify_store(dst.with_read_only(True))
        if not checked.ok:
            zarr_io.delete_key(dst, "zarr.json")
            raise StoreError(f"{where}: the copy fails verification: {checked.problems[0]} "
                             f"({len(checked.problems)} problem(s)). Delete it and copy again.")
    return report
