"""Reading a store's arrays: the one path from chunk files to numpy, for :class:`~kava.kvstore.KVStore`'s reads and
for a training loader's windows alike.

Three layers, each built on the one before:

- :class:`ArrayReader` reads rows ``[a, b)`` of one array (and a selection of its axis 1, the layers) from the chunk
  files (:mod:`.fastread`) where that path applies, else through zarr. It can start the reads and hand back what to
  wait for (:class:`PendingReads`), and read into a buffer the caller gives. A missing chunk is an error, never zeros;
  a bad checksum is a ChecksumError that names what was being read. Before its first read of an array it checks the
  array's ``zarr.json`` against what the caller expects (:mod:`.rules`: a codec chain ending in crc32c, and the shape,
  dtype and chunks the teacher spec implies).
- :func:`plan_read` turns a :class:`TeacherRead` (a teacher, its layers, with or without K/V, Q and logits) into
  the stored arrays to read with their dtypes and row shapes (:class:`ReadPlan`), and refuses what the teacher
  does not store.
- :func:`start_reads` starts every read of a plan for the rows of one or several shards (:class:`ShardSpan`),
  one shard after another, into caller-given buffers in the stored dtype, and the value rules of :mod:`.rules` on
  what they read (every array but K/V/Q themselves); :func:`read_teacher` reads one shard's
  rows and decodes K/V/Q to floats (:class:`TeacherKV`).

Nothing here checks completion markers or knows the token grid: :class:`~kava.kvstore.KVStore` does both and calls
in here.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Literal, TypeVar

import numpy as np
import numpy.typing as npt
import zarr
from zarr.abc.store import Store

from kava.core.errors import ConfigError, SchemaError

from . import codecs, fastread, layout, rules, zarr_io
from .fastread import LayerSelection
from .manifest import TeacherSpec
from .rules import ANY_ARRAY, ArrayLayout

ALL = slice(None)
"""Every position of axis 1."""
VALUE_ARRAYS = ("k", "v", "q")
"""The arrays that hold teacher vectors ``[rows, layers, heads, head_dim]``, encoded in the storage dtype."""


@dataclass
class TeacherKV:
    """One teacher's rows for a run of student tokens. Shapes: ``k``/``v`` ``[T, L, H, D]`` (``L`` = 0 when read
    ``with_kv=False``), ``q`` ``[T, Lq, Hq, D]`` or None, ``align_weight`` ``[T]``, ``status`` ``[n_samples]``
    (0 ok, 1 quarantined), ``logit_ids`` int32 / ``logit_logp`` float32 ``[T, top_k]`` or None (ids -1: no target)."""

    k: np.ndarray
    v: np.ndarray
    align_weight: np.ndarray
    status: np.ndarray
    layers: tuple[int, ...]
    q: np.ndarray | None = None
    q_layers: tuple[int, ...] = ()
    logit_ids: np.ndarray | None = None
    logit_logp: np.ndarray | None = None
    kept: np.ndarray | None = None
    """A compressed teacher's: ``k``/``v`` hold only kept rows, ``[M, L, H, D]``, and ``kept`` ``[M, L, H]`` int32 the
    position of each among its sample's tokens; None for a dense teacher (``k``/``v`` are on the tokens)."""
    slot_offsets: np.ndarray | None = None
    """A compressed teacher's ``[n+1]``: sample ``i``'s kept rows are ``slot_offsets[i]:slot_offsets[i+1]``."""

    def dense(self, offsets: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(k, v, mask)`` on the tokens (``offsets`` ``[n+1]``, the samples' rows): ``k``/``v`` ``[T, L, H, D]``
        with zeros where a row was evicted, ``mask`` ``[T, L, H]`` bool, True where kept. A dense teacher's rows
        are returned as they are, with a mask of all True."""
        if self.kept is None:
            return self.k, self.v, np.ones(self.k.shape[:3], dtype=bool)
        t = int(offsets[-1] - offsets[0])
        rows, layer, head = self._token_rows(offsets)
        k = np.zeros((t, *self.k.shape[1:]), self.k.dtype)
        v = np.zeros((t, *self.v.shape[1:]), self.v.dtype)
        mask = np.zeros((t, *self.kept.shape[1:]), bool)
        k[rows, layer, head] = self.k
        v[rows, layer, head] = self.v
        mask[rows, layer, head] = True
        return k, v, mask

    def dense_q(self, offsets: np.ndarray) -> np.ndarray | None:
        """``q`` on the tokens, ``[T, Lq, Hq, D]``: a compressed teacher's query rows (kept where the row of their
        KV head, ``h // (Hq / H)``, was kept in that layer) put back, zeros elsewhere; a dense teacher's as read."""
        if self.kept is None or self.q is None:
            return self.q
        rows, _, _ = self._token_rows(offsets)  # [M, L, H]
        group = self.q.shape[2] // self.kept.shape[2]
        rows = rows[:, [self.layers.index(layer) for layer in self.q_layers]].repeat(group, axis=2)  # [M, Lq, Hq]
        layer, head = np.indices(rows.shape[1:])
        q = np.zeros((int(offsets[-1] - offsets[0]), *self.q.shape[1:]), self.q.dtype)
        q[rows, layer, head] = self.q
        return q

    def _token_rows(self, offsets: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Each slot's row on the tokens of ``offsets`` ``[M, L, H]`` (its sample's first row plus its position),
        with the layer and head index grids ``[L, H]`` that go with it."""
        assert self.kept is not None and self.slot_offsets is not None
        first = np.repeat(offsets[:-1] - offsets[0], np.diff(self.slot_offsets))  # [M]
        grid = np.indices(self.kept.shape[1:])  # [2, L, H]: the layer and head of each entry
        rows: np.ndarray = first[:, None, None] + self.kept
        return rows, grid[0], grid[1]


@dataclass
class Rows:
    """A run of samples on the flat token axis: a single sample or a whole shard.

    ``offsets`` ``[n+1]`` are relative to the first row; ``input_ids``/``segment_ids`` ``[T]``.
    """

    sample_indices: np.ndarray
    sample_ids: list[str]
    offsets: np.ndarray
    input_ids: np.ndarray
    segment_ids: np.ndarray
    teachers: dict[str, TeacherKV] = field(default_factory=dict)
    shard: int | None = None

    def __len__(self) -> int:
        return len(self.sample_indices)


# ---------------------------------------------------------------------------------------------------------------
# One array


class PendingReads:
    """Chunk reads started and not yet waited for (the futures of :func:`fastread.submit`), each with what it
    reads, so that a failure names it; and the value rules to apply to what they read once it is there."""

    def __init__(self, where: str) -> None:
        self.where = where
        """The store, as messages name it."""
        self._futures: list[tuple[str, str, Future[str | None]]] = []
        self._checks: list[tuple[str, str, Callable[[], str | None]]] = []

    def add(self, what: str, futures: Iterable[Future[str | None]], fix: str = "") -> None:
        """Remember ``futures``, each reading part of ``what`` (e.g. ``teacher 'A' shard 3 array 'k'``); a future's
        result is what its chunk's value check found (None: nothing, or no check), reported with ``fix``."""
        self._futures.extend((what, fix, future) for future in futures)

    def check(self, what: str, fix: str, rule: Callable[[], str | None]) -> None:
        """Apply ``rule`` (a phrase for what is wrong, or None) once the reads are done; a problem is a
        SchemaError naming the store, ``what`` was read, and ``fix``."""
        self._checks.append((what, fix, rule))

    def wait(self) -> None:
        """Wait for every read, then apply the rules; the first failure is raised (a ChecksumError naming what was
        being read, or a SchemaError naming the rule it breaks)."""
        futures, self._futures = self._futures, []
        checks, self._checks = self._checks, []
        for what, fix, future in futures:
            with zarr_io.reading(f"{self.where}: {what}"):
                problem = future.result()
            if problem is not None:
                raise SchemaError(f"{self.where}: {what}: {problem}. {fix}")
        for what, fix, rule in checks:
            problem = rule()
            if problem is not None:
                raise SchemaError(f"{self.where}: {what}: {problem}. {fix}")


class ArrayReader:
    """Reads the arrays of one zarr store, each opened once: through :mod:`.fastread` (a directory store, the codecs
    this package writes), else through zarr, which is first asked whether every chunk a read needs exists.

    Arrays are taken as immutable once read, except those :meth:`forget` is called for (a rewritten CKA matrix).
    """

    def __init__(self, store: Store) -> None:
        self.store = store
        self.where = zarr_io.describe(store)
        self._arrays: dict[str, zarr.Array] = {}
        self._infos: dict[str, fastread.ArrayInfo | None] = {}  # None: zarr reads that array
        self._docs: dict[str, Any] = {}  # zarr.json of each array, parsed (None: there is none)
        self._checked: set[str] = set()  # arrays whose metadata met the rules
        self._chunks: dict[tuple[str, int], np.ndarray] = {}  # decoded chunks of 1-D arrays, see cached_rows

    def array(self, key: str) -> zarr.Array:
        """The zarr array at ``key``, opened once."""
        arr = self._arrays.get(key)
        if arr is None:
            arr = self._arrays[key] = zarr_io.open_array(self.store, key)
        return arr

    def metadata(self, key: str) -> Any:
        """The array's ``zarr.json``, parsed (read once), or None where there is none."""
        if key not in self._docs:
            raw = zarr_io.get_file(self.store, f"{key}/zarr.json")
            try:
                self._docs[key] = None if raw is None else json.loads(raw)
            except ValueError as e:
                raise SchemaError(f"{self.where}: the metadata of array {key!r} (its zarr.json) is unreadable or "
                                  f"corrupted: {e}. {rules.metadata_fix(key)}") from e
        return self._docs[key]

    def info(self, key: str) -> fastread.ArrayInfo | None:
        """The fast path's view of ``key`` (its ``zarr.json``, read once), or None where zarr reads it."""
        if key not in self._infos:
            self._infos[key] = fastread.array_info(self.store, key, self.metadata(key))
        return self._infos[key]

    def check(self, key: str, expect: ArrayLayout = ANY_ARRAY, *, what: str | None = None,
              fix: str | None = None) -> None:
        """A SchemaError unless ``key``'s ``zarr.json`` is what ``expect`` says (shape, dtype, chunks, a codec chain
        ending with crc32c: :func:`rules.metadata_problem`); checked once per array. ``what`` and ``fix`` for the
        message."""
        if key in self._checked:
            return
        doc = self.metadata(key)
        if doc is None:
            zarr_io.open_array(self.store, key)  # raises the error that names a missing array
        problem = rules.metadata_problem(doc, expect)
        if problem is not None:
            self.array(key)  # a document zarr can't parse is named unreadable, as zarr would
            raise SchemaError(f"{self.where}: {what or key}: {key}/zarr.json: {problem}. "
                              f"{fix or rules.metadata_fix(key)}")
        self._checked.add(key)

    def forget(self, key: str) -> None:
        """Drop what is remembered of ``key``'s metadata: it is about to be rewritten."""
        self._arrays.pop(key, None)
        self._infos.pop(key, None)
        self._docs.pop(key, None)
        self._checked.discard(key)

    def start(self, key: str, rows: tuple[int, int], layers: LayerSelection = ALL, *, pending: PendingReads,
              what: str, out: np.ndarray | None = None, expect: ArrayLayout = ANY_ARRAY,
              fix: str | None = None, values: fastread.Check | None = None, values_fix: str = "") -> np.ndarray:
        """Start reading ``array[a:b, layers]`` (``layers`` ignored for a 1-D array) in the stored dtype.

        Returns the array the rows land in (``out`` when given: C-contiguous, the result's shape), complete once
        ``pending`` is waited for; reads through zarr are done before this returns. ``what`` names the read in a
        failure. The array's metadata must be what ``expect`` says (:meth:`check`; ``fix`` for the message).
        ``values``, a value rule, is applied to what is read (chunk by chunk as it is decoded, on the fast path);
        its problem is reported with ``values_fix`` when ``pending`` is waited for.
        """
        a, b = rows
        self.check(key, expect, what=what, fix=fix)
        with zarr_io.reading(f"{self.where}: {what}"):
            info = self.info(key)
            if info is not None and (out is None or out.dtype == info.dtype):
                started = fastread.submit(info, key, (a, b), layers, out=out, check=values)
                if started is not None:
                    pending.add(what, started[1], values_fix)
                    return started[0]
            arr = self.array(key)
            # zarr reads a missing chunk as its fill value (zeros): look for the chunks first.
            zarr_io.require_chunks(self.store, key, arr, (a, b), where=self.where)
            if arr.ndim == 1:
                got = arr[a:b]
            elif isinstance(layers, list):
                got = arr.get_orthogonal_selection((slice(a, b), np.asarray(layers, dtype=np.intp)))
            else:
                got = arr[a:b, layers]
            if out is None:
                out = np.asarray(got)
            else:
                out[...] = got
            if values is not None:
                pending.check(what, values_fix, partial(values, out))
            return out

    def read(self, key: str, rows: tuple[int, int], layers: LayerSelection = ALL, *, what: str | None = None,
             expect: ArrayLayout = ANY_ARRAY) -> np.ndarray:
        """``array[a:b, layers]`` in the stored dtype, read now (:meth:`start`, then wait)."""
        pending = PendingReads(self.where)
        out = self.start(key, rows, layers, pending=pending, what=what or key, expect=expect)
        pending.wait()
        return out

    def read_slice(self, key: str, selection: slice = ALL, *, what: str | None = None,
                   expect: ArrayLayout = ANY_ARRAY) -> np.ndarray:
        """``array[selection]`` of a whole array (a grid array, a CKA matrix, a tokenizer file), ``selection`` a
        step-1 slice of the first axis; other axes are read whole. Its metadata must be what ``expect`` says."""
        if selection.step not in (None, 1):
            raise ConfigError(f"Expected a step-1 slice. Got {selection!r} for {key} instead.")
        self.check(key, expect, what=what)
        info = self.info(key)  # its shape, without the cost of opening the array through zarr
        if info is not None and len(info.shape) == 1:
            a, b, _ = selection.indices(info.shape[0])
            return self.read(key, (a, max(a, b)), what=what, expect=expect)
        with zarr_io.reading(f"{self.where}: {what or key}"):
            arr = self.array(key)  # a CKA matrix (rewritten in place, so never through the cached fast path)
            a, b, _ = selection.indices(arr.shape[0])
            zarr_io.require_chunks(self.store, key, arr, (a, max(a, b)), where=self.where)
            return np.asarray(arr[selection])

    def cached_rows(self, key: str, a: int, b: int, *, expect: ArrayLayout = ANY_ARRAY) -> np.ndarray:
        """Rows ``[a, b)`` of a 1-D array, through a small cache of its decoded chunks: a grid chunk holds 1M
        tokens, and streaming reads the same chunk for many shards in a row. Its metadata must be what ``expect``
        says."""
        self.check(key, expect)
        arr = self.array(key)
        size = arr.chunks[0]
        parts = []
        for c in range(a // size, (b - 1) // size + 1) if b > a else ():
            chunk = self._chunks.get((key, c))
            if chunk is None:
                chunk = self.read_slice(key, slice(c * size, min((c + 1) * size, arr.shape[0])), expect=expect)
                if len(self._chunks) >= 4:
                    self._chunks.pop(next(iter(self._chunks)))
                self._chunks[(key, c)] = chunk
            parts.append(chunk[max(a, c * size) - c * size : min(b, (c + 1) * size) - c * size])
        return np.concatenate(parts) if parts else np.zeros(0, dtype=arr.dtype)


# ---------------------------------------------------------------------------------------------------------------
# A teacher's arrays


@dataclass(frozen=True)
class TeacherRead:
    """What to read of one teacher: which of its stored K/V layers, and whether K/V, Q and top-k logits at all."""

    name: str
    """The teacher's name in the store."""
    layers: tuple[int, ...] | None = None
    """Stored K/V layers to read, in this order; None reads every stored layer."""
    with_q: bool = False
    """Also read the stored queries (every stored Q layer)."""
    with_logits: bool = False
    """Also read the stored top-k logits."""
    with_kv: bool = True
    """Read K/V; without them the result has zero K/V layers (a logit-only reader)."""


@dataclass(frozen=True)
class ShardSpan:
    """Rows of one shard to read: ``tokens`` ``[a, b)`` of the shard's token axis and ``samples`` ``[a, b)`` of its
    sample axis (the same samples), both counted from the shard's first."""

    shard: int
    first_sample: int
    """The shard's first sample (its index in the store), for messages."""
    num_tokens: int
    """Every token row of the shard: what its per-token arrays hold."""
    num_samples: int
    tokens: tuple[int, int]
    samples: tuple[int, int]
    num_slots: int | None = None
    """A compressed teacher's: every K/V row (slot) of the shard; None for a dense teacher."""
    slots: tuple[int, int] = (0, 0)
    """A compressed teacher's: the K/V rows ``[a, b)`` of ``samples``."""

    def with_slots(self, slot_offsets: np.ndarray) -> ShardSpan:
        """This span on a compressed teacher's slot axis: ``slot_offsets`` ``[num_samples + 1]``, the shard's
        samples' K/V rows, from 0."""
        a, b = self.samples
        return dataclasses.replace(self, num_slots=int(slot_offsets[-1]),
                                   slots=(int(slot_offsets[a]), int(slot_offsets[b])))

    @classmethod
    def of(cls, shard: int, whole: range, offsets: np.ndarray, samples: range | None = None) -> ShardSpan:
        """The span of ``samples`` (default: all of them) of ``shard``, which holds samples ``whole``; ``offsets``
        ``[N+1]`` are the store's (sample ``i`` is rows ``offsets[i]:offsets[i+1]`` of the flat token axis)."""
        samples = whole if samples is None else samples
        t0 = int(offsets[whole.start])
        return cls(shard=shard, first_sample=whole.start, num_tokens=int(offsets[whole.stop]) - t0,
                   num_samples=len(whole), tokens=(int(offsets[samples.start]) - t0, int(offsets[samples.stop]) - t0),
                   samples=(samples.start - whole.start, samples.stop - whole.start))

    def describe(self) -> str:
        """``samples 10-19``: which samples the rows belong to, for messages."""
        return f"samples {self.first_sample + self.samples[0]}-{self.first_sample + self.samples[1] - 1}"


@dataclass(frozen=True)
class StoredArray:
    """One array of a teacher's shard that a read fills: rows of shape ``inner`` in ``dtype`` (the stored one)."""

    dtype: np.dtype
    inner: tuple[int, ...]
    """A row's shape after the layer selection, e.g. ``(layers, kv_heads, head_dim)`` for ``k``, ``()`` for
    ``align_weight``."""
    layers: LayerSelection = field(default_factory=lambda: ALL)  # slices are unhashable before Python 3.12
    """Positions read on axis 1 (:data:`ALL` for arrays without layers)."""
    per: Literal["token", "sample", "slot"] = "token"
    """Whether a row is a token, a sample or (a compressed teacher's K/V) a kept row of the shard."""
    side_of: str | None = None
    """For an int8/int4/int2 scale or zero array, the value array it belongs to (its rows follow from that one's,
    :func:`codecs.side_rows`)."""


@dataclass(frozen=True)
class ReadPlan:
    """The stored arrays that reading a :class:`TeacherRead` takes, with their dtypes and row shapes."""

    spec: TeacherSpec
    layers: tuple[int, ...]
    """K/V layers read, in order; ``()`` without K/V."""
    q_layers: tuple[int, ...]
    """Q layers read; ``()`` without Q."""
    values: tuple[str, ...]
    """Which of ``k``, ``v``, ``q`` are read."""
    arrays: dict[str, StoredArray]
    """Every array to read, by its name in the shard (``k``, ``k_scale``, ``align_weight``, ``sample_status``,
    ``logit_ids``, ...), in the order reads are started."""

    @property
    def name(self) -> str:
        """The teacher's name in the store."""
        return self.spec.name

    @property
    def stored(self) -> str:
        """The storage dtype of K/V/Q (``float16``, ``bfloat16``, ``float32``, ``int8``, ``int4``, ``int2``)."""
        return self.spec.storage.dtype

    def rows(self, array: str, span: ShardSpan) -> tuple[int, int]:
        """Rows ``[a, b)`` of ``array`` that ``span`` covers."""
        part = self.arrays[array]
        if part.per == "sample":
            return span.samples
        if part.per == "slot" and span.num_slots is None:
            raise ValueError(f"Teacher {self.name!r} keeps only some rows: read it with a span on its slots "
                             "(ShardSpan.with_slots).")
        if part.side_of is not None:
            rows = span.slots if part.per == "slot" else span.tokens
            return codecs.side_rows(part.side_of, self.stored, *rows, self.spec.storage.group_tokens)
        return span.slots if part.per == "slot" else span.tokens

    def num_rows(self, array: str, span: ShardSpan) -> int:
        """The whole length of ``array`` in ``span``'s shard."""
        whole = dataclasses.replace(span, tokens=(0, span.num_tokens), samples=(0, span.num_samples),
                                    slots=(0, span.num_slots or 0))
        return self.rows(array, whole)[1]

    def total_rows(self, array: str, spans: Sequence[ShardSpan]) -> int:
        """Rows of ``array`` that ``spans`` cover, one after another: the length of a buffer for them."""
        return sum(b - a for a, b in (self.rows(array, span) for span in spans))


def layer_positions(where: str, name: str, layers: Sequence[int] | None, stored: tuple[int, ...], what: str
                    ) -> tuple[LayerSelection, tuple[int, ...]]:
    """(Axis-1 selection of ``layers`` among the ``stored`` ones, the layers it reads in order); None: every stored
    layer. ``what`` (``K/V``, ``Q``) names the arrays in the error for a layer that is not stored."""
    if layers is None:
        return ALL, stored
    if len(layers) == 0:
        raise ConfigError("Expected at least one layer in layers=. Got [] instead; pass None for all layers.")
    missing = [layer for layer in layers if layer not in stored]
    if missing:
        raise SchemaError(
            f"{where}: teacher {name!r} stores {what} layers {list(stored)}; "
            f"{missing} were asked for. Ask for stored layers, or re-extract with those layers in the map."
        )
    pos = [stored.index(layer) for layer in layers]
    # A contiguous run reads as a slice; otherwise orthogonal indexing touches only the chunks it needs.
    sel: LayerSelection = slice(pos[0], pos[-1] + 1) if pos == list(range(pos[0], pos[-1] + 1)) else pos
    return sel, tuple(layers)


def plan_read(where: str, spec: TeacherSpec, request: TeacherRead) -> ReadPlan:
    """What reading ``request`` of the teacher ``spec`` describes takes; a SchemaError for layers, queries or
    logits it does not store (a ConfigError for ``layers=()``)."""
    st = spec.storage
    sel, kept = layer_positions(where, spec.name, request.layers, spec.layers, "K/V")
    wanted: list[tuple[str, LayerSelection, int, int]] = []  # (array, selection, layers, heads)
    q_kept: tuple[int, ...] = ()
    if request.with_kv:
        wanted += [("k", sel, len(kept), spec.kv_heads), ("v", sel, len(kept), spec.kv_heads)]
    if request.with_q:
        if not spec.has_q:
            raise SchemaError(f"{where}: teacher {spec.name!r} has no stored queries. Re-extract it with --with-q.")
        q_layers = None
        if spec.eviction is not None:  # slot rows mean something only beside their `kept`: read it for these layers
            q_layers = [layer for layer in spec.q_layers if layer in kept]
            if not request.with_kv or not q_layers:
                raise SchemaError(
                    f"{where}: teacher {spec.name!r} keeps only some rows, and its queries (layers "
                    f"{list(spec.q_layers)}) are read with the kept positions of their K/V layers. Read K/V "
                    "(with_kv=True) of layers that include some of them; asked for "
                    f"{list(kept) if request.with_kv else []}."
                )
        qsel, q_kept = layer_positions(where, spec.name, q_layers, spec.q_layers, "Q")
        wanted.append(("q", qsel, len(q_kept), spec.num_heads))
    if request.with_logits and spec.logits is None:
        raise SchemaError(f"{where}: teacher {spec.name!r} has no stored logits. Re-extract it with --logit-top-k K.")

    arrays = {"align_weight": StoredArray(np.dtype(np.float32), ())}
    per: Literal["token", "slot"] = "slot" if spec.eviction is not None else "token"
    for array, lsel, n_layers, heads in wanted:
        # The value array and its scale (and zero) arrays: names, dtypes and row shapes as the writer made them.
        for name, (shape, dtype, _) in codecs.stored_arrays(
                array, 1, n_layers, heads, spec.head_dim, st.dtype, group_tokens=st.group_tokens,
                group_channels=st.group_channels).items():
            arrays[name] = StoredArray(dtype, tuple(shape[1:]), lsel, per=per,
                                       side_of=None if name == array else array)
    if spec.eviction is not None and request.with_kv:
        arrays[layout.KEPT_ARRAY] = StoredArray(np.dtype(np.int32), (len(kept), spec.kv_heads), sel, per="slot")
    if request.with_logits and spec.logits is not None:
        ids, logp = layout.LOGIT_ARRAYS
        arrays[ids] = StoredArray(np.dtype(np.int32), (spec.logits.top_k,))
        arrays[logp] = StoredArray(np.dtype(np.float16), (spec.logits.top_k,))
    arrays["sample_status"] = StoredArray(np.dtype(np.uint8), (), per="sample")
    return ReadPlan(spec, kept if request.with_kv else (), q_kept, tuple(array for array, *_ in wanted), arrays)


def start_reads(reader: ArrayReader, plan: ReadPlan, spans: Sequence[ShardSpan],
                  into: Mapping[str, np.ndarray]) -> PendingReads:
    """Start reading every array of ``plan`` for ``spans`` (their shards complete), one span after another, into
    ``into`` (array name → ``[plan.total_rows(name, spans), *inner]`` of the plan's dtype, C-contiguous).

    Every chunk read is started before any is waited for, so that all cores decode while small arrays' chunks
    would otherwise leave them idle; the buffers hold the rows once the returned reads are waited for.
    """
    if set(into) != set(plan.arrays):
        raise ValueError(f"Expected buffers for {sorted(plan.arrays)}. Got {sorted(into)} instead.")
    pending = PendingReads(reader.where)
    spec = plan.spec
    layouts = {span.shard: rules.shard_layouts(spec, span.num_tokens, span.num_samples, span.num_slots)
               for span in spans}
    for array in plan.arrays:  # the plan's order: the order reads are queued in
        out, part, at = into[array], plan.arrays[array], 0
        for span in spans:
            a, b = plan.rows(array, span)
            key = layout.shard_array_key(plan.name, span.shard, array)
            what = f"teacher {plan.name!r} shard {span.shard} array {array!r} ({span.describe()})"
            fix = rules.shard_fix(plan.name, span.shard)
            # K/V/Q themselves: finite, checked chunk by chunk as they are decoded (codes: their scales' rules).
            finite = partial(rules.finite_problem, dtype=plan.stored) if array in plan.values else None
            got = reader.start(key, (a, b), part.layers, pending=pending, what=what, out=out[at : at + b - a],
                               expect=layouts[span.shard][array], fix=rules.metadata_fix(key, plan.name, span.shard),
                               values=finite, values_fix=fix)
            if finite is None:
                pending.check(what, fix, partial(rules.value_problem, array, got, spec))
            at += b - a
        if at != len(out):
            raise ValueError(f"Expected {at} rows of {array!r} in its buffer. Got {len(out)} instead.")
    if codecs.is_lowbit(plan.stored):
        for value in plan.values:  # each group's largest value must decode to a finite float16
            scale, zero, at = into[f"{value}_scale"], into[f"{value}_zero"], 0
            for span in spans:
                a, b = plan.rows(f"{value}_scale", span)
                what = f"teacher {plan.name!r} shard {span.shard} arrays '{value}_scale', '{value}_zero'"
                pending.check(what, rules.shard_fix(plan.name, span.shard), partial(
                    rules.lowbit_pair_problem, scale[at : at + b - a], zero[at : at + b - a], plan.stored))
                at += b - a
    return pending


def read_teacher(reader: ArrayReader, plan: ReadPlan, span: ShardSpan, dtype: npt.DTypeLike) -> TeacherKV:
    """One shard's rows of ``plan`` (the shard complete), K/V/Q decoded to ``dtype`` (``[T, L, H, D]``, whatever the
    storage dtype); ``align_weight`` float32, ``status`` uint8, logit ids int32 and log-probabilities float32."""
    into = {array: np.empty((plan.total_rows(array, [span]), *part.inner), part.dtype)
            for array, part in plan.arrays.items()}
    start_reads(reader, plan, [span], into).wait()
    out_dtype = np.dtype(dtype)
    st = plan.spec.storage
    a = span.slots[0] if plan.spec.eviction is not None else span.tokens[0]  # the K/V rows' first

    def values(array: str) -> np.ndarray:
        parts = {name: x for name, x in into.items() if name == array or plan.arrays[name].side_of == array}
        return codecs.decode_arrays(parts, array, st.dtype, out_dtype, first_row=a, group_tokens=st.group_tokens,
                                    group_channels=st.group_channels)

    if "k" in plan.values:
        k, v = values("k"), values("v")
    else:  # zero layers: nothing of K/V is read
        k = v = np.zeros((span.tokens[1] - span.tokens[0], 0, plan.spec.kv_heads, plan.spec.head_dim),
                         dtype=out_dtype)
    kv = TeacherKV(k=k, v=v, align_weight=into["align_weight"], status=into["sample_status"], layers=plan.layers,
                   kept=into.get(layout.KEPT_ARRAY))
    if "q" in plan.values:
        kv.q, kv.q_layers = values("q"), plan.q_layers
    ids, logp = layout.LOGIT_ARRAYS
    if ids in into:
        kv.logit_ids, kv.logit_logp = into[ids], into[logp].astype(np.float32)
    return kv


T = TypeVar("T")


def prefetched(read: Callable[[int], T], order: Sequence[int], ahead: int) -> Iterator[T]:
    """``read(i)`` for each ``i`` of ``order``, ``ahead`` of them read in advance on a background thread while the
    caller works on the current one (the reads wait on the disk and decompress with the GIL released); 0 reads each
    only when asked."""
    if ahead <= 0:
        for i in order:
            yield read(i)
        return
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="kava-prefetch") as pool:
        pending = [pool.submit(read, i) for i in order[: ahead + 1]]
        for n in range(len(order)):
            item = pending.pop(0).result()
            if n + ahead + 1 < len(order):
                pending.append(pool.submit(read, order[n + ahead + 1]))
            yield item
