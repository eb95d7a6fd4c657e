"""The store facade: create or open a store, register teachers, read samples and shards.

A store is a zarr v3 hierarchy (see FORMAT.md). The student token grid (input ids, segment ids, offsets, shard
plan) is written once, at creation; each teacher then fills its own shards, each shard a zarr group whose
completion marker (an attribute) is written last. Any zarr Store works as a backend: a path gives a LocalStore, a URL
(``s3://bucket/kv.zarr``, see :mod:`.remote`) an FsspecStore, ``zarr.storage.MemoryStore()`` an in-memory store for
tests and notebooks.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import threading
from collections.abc import Iterator, Mapping, Sequence
from functools import cached_property
from typing import Any, cast

import numpy as np
import numpy.typing as npt
import pyarrow as pa
import pyarrow.parquet as pq
import zarr
from zarr.abc.store import Store
from zarr.errors import ContainsArrayError
from zarr.storage import FsspecStore

from kava.core.errors import (
    ConfigError,
    IncompleteError,
    NotAStoreError,
    SchemaError,
    StoreError,
)

from . import codecs, layout, remote, rules, zarr_io
from .eviction import samples_problem, slot_offsets
from .integrity import (
    MANIFEST_DOC,
    MANIFEST_FIX,
    UnsealedStoreError,
    digest_error,
    sample_ids_problem,
    teacher_doc,
    teacher_fix,
    unsealed_note,
)
from .manifest import (
    EVICTED_Q_SINCE,
    EVICTION_SINCE,
    LOWBIT_DTYPES,
    LOWBIT_SINCE,
    SEALED_SINCE,
    StorageSpec,
    StoreManifest,
    TeacherSpec,
    check_teacher_name,
    digest_problem,
    seal,
)
from .read import (
    ArrayReader,
    PendingReads,
    ReadPlan,
    Rows,
    ShardSpan,
    TeacherKV,
    TeacherRead,
    plan_read,
    prefetched,
    read_teacher,
    start_reads,
)
from .writer import ShardSlot, ShardWriter


def metadata_digest(manifest: Mapping[str, Any], teachers: Mapping[str, Mapping[str, Any]]) -> str:
    """One sha256 naming a store's metadata, from its raw manifest and teacher specs (as their groups' attributes hold
    them): over the per-field digests each was sealed with. It changes with the grid, the dataset, the tokenizer and
    any teacher's spec (a teacher added too), and every copy of one store shares it; chunks carry their own crc32c."""
    doc = {"manifest": manifest.get("digest"),
           "teachers": {name: spec.get("digest") for name, spec in sorted(teachers.items())}}
    return hashlib.sha256(json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


class KVStore:
    """A KaVa store. Use :meth:`create` or :meth:`open`; read-only unless opened with ``mode="a"``."""

    def __init__(self, store: Store, manifest: StoreManifest) -> None:
        self._store = store
        self.manifest = manifest
        self.where = zarr_io.describe(store)
        self._reader = ArrayReader(store)  # every array read goes through it (see read.py)
        self._specs: dict[str, TeacherSpec] = {}  # teacher specs read by K/V reads, once per handle
        self._all_teachers: list[str] | None = None
        self._slot_offsets: dict[str, np.ndarray] = {}  # compressed teachers' slot offsets, once per handle
        self._markers: dict[tuple[str, int], dict[str, Any]] = {}  # complete shards seen by a read-only handle

    # ---------------------------------------------------------------------------------------------------------
    # Opening and creating

    @classmethod
    def open(cls, location: str | os.PathLike | Store, *, mode: str = "r", check_digest: bool = True) -> KVStore:
        """Open an existing store; ``mode="a"`` to add teachers or shards.

        The manifest is checked against its digest (``check_digest=False`` only for tools that report a mismatch
        themselves, like :func:`kava.kvstore.verify_store`); each teacher spec is checked when it is read. A
        format-1 store, which has no digests, is refused (:class:`UnsealedStoreError`) until ``kava store seal``
        has checked and sealed it.
        """
        if mode not in ("r", "a"):
            raise ConfigError(f"Expected mode 'r' or 'a'. Got {mode!r} instead.")
        store = zarr_io.as_zarr_store(location, read_only=mode == "r")
        where = zarr_io.describe(store)
        if isinstance(store, FsspecStore):
            remote.probe(store, must_exist=True)  # a missing bucket, denied access or no network: one error
            if mode == "a":
                remote.note_unlocked(where)
        elif not isinstance(location, Store) and not os.path.isdir(location):
            raise NotAStoreError(f"{where}: no such directory. Check the path, or create a store with `kava extract`.")
        try:
            with remote.translated(where):
                attrs = zarr.open_group(store, mode="r").attrs.asdict()
        except (FileNotFoundError, KeyError, ValueError, TypeError) as e:
            raise NotAStoreError(
                f"{where}: not a KaVa store (no zarr group here). Check the path, or create one with `kava extract`."
            ) from e
        if layout.MANIFEST_ATTR not in attrs:
            raise NotAStoreError(
                f"{where}: a zarr group, but not a KaVa store (no '{layout.MANIFEST_ATTR}' manifest attribute). "
                "If a creation was interrupted, delete the directory and run the extraction again."
            )
        raw = cast(dict[str, Any], attrs[layout.MANIFEST_ATTR])  # a mapping, or from_dict says what it is
        try:
            manifest = StoreManifest.from_dict(raw)
        except SchemaError as e:
            raise SchemaError(f"{where}: bad manifest: {e}") from e
        if check_digest:
            if manifest.format_version < SEALED_SINCE:
                raise UnsealedStoreError(f"{unsealed_note(where)}.")
            problem = digest_problem(raw, required=True)
            if problem is not None:
                raise digest_error(where, MANIFEST_DOC, problem, MANIFEST_FIX)
        return cls(store, manifest)

    # ---------------------------------------------------------------------------------------------------------
    # The grid

    @property
    def zarr_store(self) -> Store:
        return self._store

    @property
    def read_only(self) -> bool:
        return self._store.read_only

    @property
    def num_samples(self) -> int:
        return self.manifest.num_samples

    @property
    def num_tokens(self) -> int:
        return self.manifest.num_tokens

    @property
    def num_shards(self) -> int:
        return self.manifest.num_shards

    def array(self, key: str) -> zarr.Array:
        """The zarr array at ``key`` (a key that :mod:`.layout` spells), opened once per handle. For interop and
        tools: readers should use the read methods, which check checksums and completeness."""
        return self._reader.array(key)

    @cached_property
    def offsets(self) -> np.ndarray:
        """``[N+1]`` int64: sample ``i`` is rows ``offsets[i]:offsets[i+1]`` of the flat token axis."""
        return self._grid_rows("offsets")

    @cached_property
    def shard_starts(self) -> np.ndarray:
        """``[S+1]`` int64: shard ``s`` holds samples ``shard_starts[s]:shard_starts[s+1]``."""
        return self._grid_rows("shard_starts")

    @cached_property
    def _grid_layouts(self) -> dict[str, rules.ArrayLayout]:
        return rules.grid_layouts(self.manifest)

    def _grid_rows(self, name: str, rows: tuple[int, int] | None = None) -> np.ndarray:
        """Rows ``[a, b)`` of ``grid/<name>`` (all of them when None), its metadata as the manifest says and its
        values within the grid's rules (:func:`rules.grid_problem`)."""
        key, expect = layout.grid_key(name), self._grid_layouts[name]
        data = (self._reader.read_slice(key, expect=expect) if rows is None
                else self._reader.cached_rows(key, *rows, expect=expect))
        problem = rules.grid_problem(name, data, self.manifest)
        if problem is not None:
            raise SchemaError(f"{self.where}: {layout.grid_key(name)}: {problem}. {rules.GRID_FIX}")
        return data

    @cached_property
    def sample_status(self) -> np.ndarray:
        """``[N]`` uint8 grid status: index into ``layout.SAMPLE_STATUS`` (ok, truncated, skipped)."""
        return self._grid_rows("sample_status")

    def index_table(self) -> pa.Table:
        """The per-sample index (``index.parquet``) with its page checksums verified."""
        data = zarr_io.get_bytes(self._store, layout.INDEX_FILE)
        if data is None:
            raise SchemaError(f"{self.where}: {layout.INDEX_FILE} is missing. The store's creation was incomplete.")
        try:
            table = pq.read_table(io.BytesIO(data), page_checksum_verification=True)
        except (OSError, pa.ArrowException) as e:
            raise SchemaError(f"{self.where}: {layout.INDEX_FILE} is unreadable or corrupted: {e}") from e
        if not table.schema.equals(layout.INDEX_SCHEMA):
            got = ", ".join(f"{f.name}: {f.type}" for f in table.schema)
            raise SchemaError(
                f"{self.where}: {layout.INDEX_FILE} is unreadable or corrupted: expected columns "
                f"{', '.join(f'{f.name}: {f.type}' for f in layout.INDEX_SCHEMA)}. Got {got} instead."
            )
        return table

    @cached_property
    def sample_ids(self) -> list[str]:
        ids = self.index_table().column("sample_id")
        problem = sample_ids_problem(ids)
        if problem is not None:
            raise SchemaError(f"{self.where}: {layout.INDEX_FILE}: sample_id: {problem}. Re-create the store.")
        return ids.to_pylist()

    def sample_id(self, index: int) -> str:
        """The id of sample ``index`` (reads the index table: for messages, not for loops)."""
        return self.sample_ids[index]

    @cached_property
    def _id_to_index(self) -> dict[str, int]:
        return {sid: i for i, sid in enumerate(self.sample_ids)}

    def sample_index(self, sample: int | str) -> int:
        """A sample's position from its index or its id."""
        if isinstance(sample, str):
            try:
                return self._id_to_index[sample]
            except KeyError:
                raise KeyError(f"{self.where}: no sample with id {sample!r}") from None
        i = int(sample)
        if not 0 <= i < self.num_samples:
            raise IndexError(f"{self.where}: sample index {i} out of range [0, {self.num_samples})")
        return i

    def shard_of(self, sample: int | str) -> int:
        return int(np.searchsorted(self.shard_starts, self.sample_index(sample), side="right") - 1)

    def shard_samples(self, shard: int) -> range:
        if not 0 <= shard < self.num_shards:
            raise IndexError(f"{self.where}: shard {shard} out of range [0, {self.num_shards})")
        return range(int(self.shard_starts[shard]), int(self.shard_starts[shard + 1]))

    def shard_tokens(self, shard: int) -> tuple[int, int]:
        """The shard's rows ``[start, stop)`` on the flat token axis."""
        s = self.shard_samples(shard)
        return int(self.offsets[s.start]), int(self.offsets[s.stop])

    def tokenizer_files(self) -> dict[str, bytes]:
        """The student tokenizer's files saved in the store (empty if none were saved)."""
        return {
            name: self._reader.read_slice(layout.tokenizer_file_key(name)).tobytes()
            for name in self.manifest.student_tokenizer.files
        }

    # ---------------------------------------------------------------------------------------------------------
    # Teachers

    @property
    def teachers(self) -> dict[str, TeacherSpec]:
        """Registered teachers by name (read fresh: other writers may add teachers)."""
        out = {}
        for name in sorted(zarr_io.list_dir(self._store, "teachers/")):
            key = layout.teacher_key(name)
            # A folder with nothing in it is a registration killed before its one write; one that holds shards
            # but no zarr.json lost its metadata, which teacher() reports.
            if not zarr_io.exists(self._store, f"{key}/zarr.json") and not zarr_io.list_dir(self._store, f"{key}/"):
                continue
            out[name] = self.teacher(name)
        return out

    def teacher(self, name: str) -> TeacherSpec:
        """The spec of teacher ``name``, checked against its digest and the store's format version."""
        spec, raw = self.teacher_document(name)
        version = self.manifest.format_version
        problem = digest_problem(raw, required=version >= SEALED_SINCE)
        if problem is not None:
            raise digest_error(self.where, teacher_doc(name), problem, teacher_fix(name))
        problem = rules.version_problem(version, spec)
        if problem is not None:
            raise SchemaError(f"{self.where}: teacher {name!r}: {problem}. {rules.VERSION_FIX}")
        return spec

    def digest(self) -> str:
        """:func:`metadata_digest` of this store: what `kava.json`, the trackers and the Hub's cards name it by."""
        manifest = zarr_io.group_attributes(self._store, "")[layout.MANIFEST_ATTR]
        return metadata_digest(manifest, {name: self.teacher_document(name)[1] for name in self.teachers})

    def teacher_document(self, name: str) -> tuple[TeacherSpec, dict[str, Any]]:
        """The parsed spec and the document it was parsed from, its digest not checked (for tools that report
        a mismatch themselves, like :func:`kava.kvstore.verify_store`); readers use :meth:`teacher`."""
        check_teacher_name(name)
        key = layout.teacher_key(name)
        try:
            attrs = zarr.open_group(self._store, path=key, mode="r").attrs.asdict()
        except (FileNotFoundError, KeyError) as e:
            if zarr_io.list_dir(self._store, f"{key}/"):
                raise SchemaError(
                    f"{self.where}: teacher {name!r} has data but its metadata, teachers/{name}/zarr.json, is "
                    f"missing. Restore it, or delete teachers/{name} and extract that teacher again."
                ) from e
            raise self._missing_teacher(name) from e
        except (ValueError, TypeError) as e:  # a corrupted zarr.json
            raise SchemaError(f"{self.where}: teachers/{name}/zarr.json is unreadable or corrupted: {e}") from e
        if layout.TEACHER_ATTR not in attrs:
            raise SchemaError(
                f"{self.where}: teachers/{name}/zarr.json has no '{layout.TEACHER_ATTR}' attribute (the teacher's "
                f"spec). Restore it, or delete teachers/{name} and extract that teacher again."
            )
        raw = cast(dict[str, Any], attrs[layout.TEACHER_ATTR])  # a mapping, or from_dict says what it is
        try:
            spec = TeacherSpec.from_dict(raw)
        except (SchemaError, ConfigError) as e:
            raise SchemaError(f"{self.where}: teachers/{name}: {e}") from e
        if spec.name != name:
            raise SchemaError(
                f"{self.where}: teachers/{name}: expected the spec of teacher {name!r}. Got one named "
                f"{spec.name!r} instead. Restore teachers/{name}/zarr.json, or extract that teacher again."
            )
        return spec, raw

    def _missing_teacher(self, name: str) -> SchemaError:
        names = sorted(zarr_io.list_dir(self._store, "teachers/"))
        return SchemaError(
            f"{self.where}: no teacher {name!r} in this store. It has: {', '.join(names) or 'none'}."
        )

    def add_teacher(self, spec: TeacherSpec) -> TeacherSpec:
        """Register a teacher (or confirm one registered with the same spec) before writing its shards.

        A name already registered with a different geometry, layer map or storage is refused: two models under
        one name would mix their arrays.
        """
        self._check_writable()
        check_teacher_name(spec.name)
        if spec.storage.chunk_tokens <= 0:
            raise ConfigError("storage.chunk_tokens must be positive")
        key = layout.teacher_key(spec.name)
        if spec.storage.dtype in LOWBIT_DTYPES and self.manifest.format_version < LOWBIT_SINCE:
            raise StoreError(
                f"{self.where}: expected a store of format version {LOWBIT_SINCE} or later for {spec.storage.dtype} "
                f"storage (older readers can't decode it). Got version {self.manifest.format_version} instead. "
                "Extract into a new store, or use --kv-dtype int8."
            )
        if spec.eviction is not None and self.manifest.format_version < EVICTION_SINCE:
            raise StoreError(
                f"{self.where}: expected a store of format version {EVICTION_SINCE} or later for a compressed teacher "
                f"(older readers can't read it). Got version {self.manifest.format_version} instead. Extract into a "
                "new store, or without --kv-budget."
            )
        if spec.eviction is not None and spec.q_layers and self.manifest.format_version < EVICTED_Q_SINCE:
            raise StoreError(
                f"{self.where}: expected a store of format version {EVICTED_Q_SINCE} or later for a compressed teacher "
                f"with queries (older readers can't read them). Got version {self.manifest.format_version} instead. "
                "Extract into a new store, or without --with-q."
            )
        if not zarr_io.exists(self._store, f"{key}/zarr.json"):
            # One exclusive write of the group with its spec: when the jobs of a job array register the same
            # teacher at once, one of them wins and the others compare against its spec below.
            zarr_io.create_group_once(self._store, key, {layout.TEACHER_ATTR: seal(spec.to_dict())})
            # The groups shard writers fill, made now so writers never write outside their shard's directory.
            zarr_io.create_group_once(self._store, f"{key}/shards", {})
            zarr_io.create_group_once(self._store, f"{key}/cka", {})
        existing = self.teacher(spec.name)
        fixed = ("layers", "q_layers", "kv_heads", "head_dim", "num_heads", "k_rope", "storage", "layer_map",
                 "logits", "eviction", "attention", "positions", "part_of")
        diff = [f for f in fixed if getattr(existing, f) != getattr(spec, f)]
        if diff:
            raise StoreError(
                f"{self.where}: teacher {spec.name!r} already exists with different {', '.join(diff)}. "
                "Use another --name, or delete teachers/" + spec.name + " to start it over."
            )
        return existing

    def shard_marker(self, teacher: str, shard: int) -> dict[str, Any] | None:
        """The shard's completion marker, or None when the shard is absent or unfinished.

        A complete shard is never rewritten in place, so a read-only handle remembers the markers it has seen
        (random access reads a shard's marker on every sample otherwise).
        """
        marker = self._markers.get((teacher, shard))
        if marker is not None:
            return marker
        raw = zarr_io.get_bytes(self._store, f"{layout.shard_key(teacher, shard)}/zarr.json")
        if raw is None:
            return None
        try:
            marker = json.loads(raw).get("attributes", {}).get(layout.SHARD_ATTR)
        except ValueError:
            return None  # a torn metadata document: the shard is not complete
        if not (isinstance(marker, dict) and marker.get("complete") is True):
            return None
        if self.read_only:
            self._markers[(teacher, shard)] = marker
        return marker

    def shard_markers(self, teacher: str) -> dict[int, dict[str, Any]]:
        """Completion markers of ``teacher``'s complete shards, by shard."""
        present = zarr_io.list_dir(self._store, f"{layout.teacher_key(teacher)}/shards/")
        markers = {int(name): self.shard_marker(teacher, int(name)) for name in present if name.isdigit()}
        return {shard: marker for shard, marker in sorted(markers.items()) if marker is not None}

    def complete_shards(self, teacher: str) -> list[int]:
        """Shards of ``teacher`` whose completion marker is written."""
        return list(self.shard_markers(teacher))

    def missing_shards(self, teacher: str) -> list[int]:
        done = set(self.complete_shards(teacher))
        return [s for s in range(self.num_shards) if s not in done]

    def shard_writer(self, teacher: str, shard: int, *, nonfinite: str = "error") -> ShardWriter:
        """A writer for one whole shard of a registered teacher; see :class:`kava.kvstore.ShardWriter`."""
        self._check_writable()
        spec = self.teacher(teacher)
        samples = self.shard_samples(shard)
        tokens = self.shard_tokens(shard)
        slot = ShardSlot(zarr_store=self._store, where=self.where, shard=shard, samples=samples, tokens=tokens,
                         lengths=np.diff(self.offsets[samples.start : samples.stop + 1]),
                         sample_id=self.sample_id, complete=self.shard_marker(spec.name, shard) is not None,
                         segment_ids=None if spec.eviction is None else self._grid_rows("segment_ids", tokens))
        return ShardWriter(slot, spec, nonfinite=nonfinite)

    def _check_writable(self) -> None:
        if self.read_only:
            raise StoreError(f"{self.where}: opened read-only. Open it with mode='a' to write.")

    # ---------------------------------------------------------------------------------------------------------
    # CKA matrices

    def write_cka(self, teacher: str, name: str, matrix: np.ndarray, **attrs: Any) -> None:
        """Store a layer×layer CKA matrix (e.g. ``teacher_teacher``, ``teacher_student``) with its estimator.

        Safe for the jobs of a job array, which each compute the same matrix and write it at once: an existing array
        of the same shape is written in place, never deleted under a concurrent writer."""
        self._check_writable()
        self.teacher(teacher)
        check_teacher_name(name)
        m = np.asarray(matrix, dtype=np.float64)
        if m.ndim != 2:
            raise ConfigError(f"Expected a 2-D CKA matrix. Got shape {m.shape} instead.")
        key = layout.cka_key(teacher, name)
        self._reader.forget(key)  # a rewrite may change the shape: drop the cached metadata
        own, base = zarr_io.substore(self._store, f"{layout.teacher_key(teacher)}/cka")

        def create(overwrite: bool) -> zarr.Array:
            return zarr_io.create_array(own, f"{base}{name}", shape=m.shape, chunks=m.shape, dtype=np.float64,
                                      dims=("layer_a", "layer_b"), attributes=attrs, overwrite=overwrite)

        try:
            array = create(overwrite=False)
        except ContainsArrayError:  # written before, or by another job of the array at this moment
            array = zarr_io.open_array(self._store, key)
            if array.shape != m.shape:  # another calibration, rewritten by one job: replace it
                array = create(overwrite=True)
            else:  # fill it in place; deleting it could remove a concurrent writer's files
                array.update_attributes(attrs)
        array[...] = m

    def cka(self, teacher: str) -> dict[str, tuple[np.ndarray, dict[str, Any]]]:
        """All stored CKA matrices of a teacher: name → (matrix, attributes)."""
        out = {}
        for name in sorted(zarr_io.list_dir(self._store, f"{layout.teacher_key(teacher)}/cka/")):
            key = layout.cka_key(teacher, name)
            out[name] = (self._reader.read_slice(key), dict(self.array(key).attrs))
        return out

    # ---------------------------------------------------------------------------------------------------------
    # Reading K/V

    def read_sample(
        self,
        sample: int | str,
        *, teachers: Sequence[str] | None = None, layers: Sequence[int] | None = None, with_q: bool = False,
        dtype: npt.DTypeLike = np.float32, with_logits: bool = False, with_kv: bool = True,
    ) -> Rows:
        """One sample's grid rows and each teacher's K/V (and Q, and top-k logits). Random access: reads the 1-2
        chunks it needs. ``with_kv=False`` reads no K/V (zero layers): a logit-only reader."""
        i = self.sample_index(sample)
        shard = self.shard_of(i)
        return self._read_rows(shard, range(i, i + 1), teachers, layers, with_q, dtype, with_logits, with_kv)

    def read_shard(
        self,
        shard: int,
        *, teachers: Sequence[str] | None = None, layers: Sequence[int] | None = None, with_q: bool = False,
        dtype: npt.DTypeLike = np.float32, with_logits: bool = False, with_kv: bool = True,
    ) -> Rows:
        """A whole shard: the unit of streaming. Options as :meth:`read_sample`."""
        return self._read_rows(shard, self.shard_samples(shard), teachers, layers, with_q, dtype, with_logits, with_kv)

    def iter_shards(self, shards: Sequence[int] | None = None, *, prefetch: int | None = None,
                    **kwargs: Any) -> Iterator[Rows]:
        """Stream shards in the given order (default: all, in order). Keyword arguments as :meth:`read_shard`.

        ``prefetch`` shards are read ahead while the caller works on the current one; 0 reads each shard only when
        asked. On a local disk (default 1) they are read on one background thread (the reads wait on the disk and
        decompress with the GIL released). On object storage (default :data:`remote.READ_AHEAD`) each is read on
        its own thread, so that their requests are in flight together: a shard's reads there are a chain of round
        trips (metadata, then chunks), which one thread would wait on one after another.
        """
        order = list(range(self.num_shards) if shards is None else shards)
        if not isinstance(self._store, FsspecStore):
            yield from prefetched(lambda s: self.read_shard(s, **kwargs), order, 1 if prefetch is None else prefetch)
            return
        handles = threading.local()  # a handle per thread: a handle's caches are not shared between threads

        def read(shard: int) -> Rows:
            handle = getattr(handles, "store", None)
            if handle is None:
                handle = handles.store = KVStore(self._store, self.manifest)
            return handle.read_shard(shard, **kwargs)

        yield from remote.read_ahead(read, order, remote.READ_AHEAD if prefetch is None else prefetch)

    def _read_rows(self, shard: int, samples: range, teachers: Sequence[str] | None, layers: Sequence[int] | None,
                   with_q: bool, dtype: npt.DTypeLike, with_logits: bool, with_kv: bool) -> Rows:
        """``samples`` (a run of ``shard``'s) with the grid's rows and each teacher's (every teacher when None)."""
        a, b = int(self.offsets[samples.start]), int(self.offsets[samples.stop])
        rows = Rows(
            sample_indices=np.arange(samples.start, samples.stop),
            sample_ids=self.sample_ids[samples.start : samples.stop],
            offsets=self.offsets[samples.start : samples.stop + 1] - a,
            input_ids=self._grid_rows("input_ids", (a, b)),
            segment_ids=self._grid_rows("segment_ids", (a, b)),
            shard=shard,
        )
        if teachers is None:
            # A read-only handle lists the teachers once; one opened for writing looks again each time.
            if self._all_teachers is None or not self.read_only:
                self._all_teachers = list(self.teachers)
            teachers = self._all_teachers
        span = self.shard_span(shard, samples)
        for name in list(teachers):
            request = TeacherRead(name, None if layers is None else tuple(layers), with_q, with_logits, with_kv)
            rows.teachers[name] = self.read_teacher(request, span, dtype=dtype)
        return rows

    def shard_span(self, shard: int, samples: range | None = None) -> ShardSpan:
        """The rows of ``samples`` (a run of ``shard``'s; default: all of them) in ``shard``'s arrays."""
        return ShardSpan.of(shard, self.shard_samples(shard), self.offsets, samples)

    def _spec(self, name: str) -> TeacherSpec:
        """:meth:`teacher`, read once per handle (for K/V reads, which ask for it for every shard)."""
        return self._specs.get(name) or self._specs.setdefault(name, self.teacher(name))

    def _require_complete(self, teacher: str, shard: int) -> None:
        """An IncompleteError unless ``teacher`` has finished ``shard`` (its completion marker is written); a
        SchemaError when the marker's ranges are not the shard's on the grid."""
        marker = self.shard_marker(teacher, shard)
        samples = self.shard_samples(shard)
        if marker is None:
            raise IncompleteError(
                f"{self.where}: teacher {teacher!r} has not finished shard {shard} (samples {samples.start}-"
                f"{samples.stop - 1}). Finish the extraction with `kava extract --resume`, or read complete_shards() "
                "only."
            )
        offsets = self.slot_offsets(teacher)
        slots = None if offsets is None else int(offsets[samples.stop] - offsets[samples.start])
        problem = rules.marker_problem(marker, samples, self.shard_tokens(shard), slots)
        if problem is not None:
            raise SchemaError(f"{self.where}: teacher {teacher!r} shard {shard} completion marker "
                              f"({layout.shard_key(teacher, shard)}/zarr.json): {problem}. "
                              f"{rules.shard_fix(teacher, shard)}")

    def slot_offsets(self, teacher: str) -> np.ndarray | None:
        """A compressed teacher's ``[N+1]`` offsets on its slot axis, over the whole store (sample ``i`` keeps
        ``slot_offsets[i+1] - slot_offsets[i]`` rows); None for a teacher that keeps every row."""
        spec = self._spec(teacher)
        if spec.eviction is None:
            return None
        if teacher not in self._slot_offsets:
            self._slot_offsets[teacher] = slot_offsets(spec.eviction, self._grid_rows("segment_ids"), self.offsets)
        return self._slot_offsets[teacher]

    def teacher_span(self, teacher: str, span: ShardSpan) -> ShardSpan:
        """``span`` as ``teacher``'s arrays hold it: with its kept rows (slots) for a compressed teacher."""
        offsets = self.slot_offsets(teacher)
        if offsets is None or span.num_slots is not None:
            return span
        first = span.first_sample
        return span.with_slots(offsets[first : first + span.num_samples + 1] - offsets[first])

    def read_plan(self, request: TeacherRead) -> ReadPlan:
        """The stored arrays ``request`` reads, with their dtypes and row shapes; a SchemaError for layers, queries
        or logits the teacher does not store. See :func:`kava.kvstore.read.plan_read`."""
        return plan_read(self.where, self._spec(request.name), request)

    def start_teacher_read(self, plan: ReadPlan, spans: Sequence[ShardSpan],
                           into: Mapping[str, np.ndarray]) -> PendingReads:
        """Start reading ``plan``'s arrays for ``spans`` into the caller's buffers ``into``, in the stored dtype,
        one span after another (see :func:`kava.kvstore.read.start_reads`); ``.wait()`` on the result. An
        IncompleteError for a shard the teacher has not finished. What a loader gathering shards calls."""
        for span in spans:
            self._require_complete(plan.name, span.shard)
        return start_reads(self._reader, plan, [self.teacher_span(plan.name, span) for span in spans], into)

    def read_teacher(self, request: TeacherRead, span: ShardSpan, *, dtype: npt.DTypeLike = np.float32) -> TeacherKV:
        """One teacher's rows of ``span``, K/V/Q decoded to ``dtype`` (see :func:`kava.kvstore.read.read_teacher`)."""
        spec = self._spec(request.name)
        self._require_complete(request.name, span.shard)
        span = self.teacher_span(request.name, span)
        kv = read_teacher(self._reader, plan_read(self.where, spec, request), span, dtype)
        if kv.kept is not None and spec.eviction is not None:
            kv.slot_offsets = np.asarray(self.slot_offsets(request.name))[
                span.first_sample + span.samples[0] : span.first_sample + span.samples[1] + 1]
            kv.slot_offsets = kv.slot_offsets - kv.slot_offsets[0]
            self._check_kept(spec, span, kv)
        return kv

    def _check_kept(self, spec: TeacherSpec, span: ShardSpan, kv: TeacherKV) -> None:
        """Each read sample's kept positions against the rule (:func:`kava.kvstore.eviction.kept_problem`)."""
        assert spec.eviction is not None and kv.kept is not None and kv.slot_offsets is not None
        first = span.first_sample + span.samples[0]
        offsets = self.offsets[first : first + len(kv.slot_offsets)]
        found = samples_problem(spec.eviction, kv.kept, kv.slot_offsets, offsets,
                                self._grid_rows("segment_ids", (int(offsets[0]), int(offsets[-1]))))
        if found is not None:
            i, problem = found
            raise SchemaError(f"{self.where}: teacher {spec.name!r} shard {span.shard} array 'kept' (sample "
                              f"{first + i}): {problem}. {rules.shard_fix(spec.name, span.shard)}")


def default_storage(layers: int, kv_heads: int, head_dim: int, dtype: str = "float16", *,
                    compress: bool = True) -> StorageSpec:
    """The storage choice for a teacher: chunking planned from its geometry, blosc-zstd unless told not to."""
    tokens, per_chunk_layers = codecs.plan_chunks(layers, kv_heads, head_dim, dtype)
    groups: dict[str, Any] = {"group_tokens": codecs.DEFAULT_GROUP_TOKENS,
                              "group_channels": codecs.group_channels_for(head_dim)} if codecs.is_lowbit(dtype) else {}
    return StorageSpec(dtype=dtype, compressor=dict(codecs.DEFAULT_COMPRESSOR) if compress else {},
                       chunk_tokens=tokens, chunk_layers=min(per_chunk_layers, layers), **groups)
