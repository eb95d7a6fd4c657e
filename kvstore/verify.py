"""`kava store verify`: schema, completeness, every chunk's checksum, and the rules of :mod:`.rules` (array metadata
against the spec, format version, value ranges) over the whole store, with problems named precisely."""

from __future__ import annotations

import hashlib
import itertools
import json
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import numpy as np
import zarr
from zarr.storage import FsspecStore

from kava.core.errors import ChecksumError, FormatVersionError, KavaError, NotAStoreError, SchemaError

from . import codecs, layout, remote, rules, zarr_io
from .eviction import samples_problem, slot_offsets
from .integrity import (
    MANIFEST_DOC,
    MANIFEST_FIX,
    digest_error,
    sample_ids_problem,
    teacher_doc,
    teacher_fix,
    unsealed_note,
)
from .manifest import SEALED_SINCE, TeacherSpec, digest_problem, seal
from .store import KVStore


@dataclass(frozen=True)
class Problem:
    where: str
    """The array or document, e.g. ``teachers/qwen/shards/000003/k``."""
    message: str

    def __str__(self) -> str:
        return f"{self.where}: {self.message}"


@dataclass
class VerifyReport:
    store: str
    problems: list[Problem] = field(default_factory=list)
    chunks_checked: int = 0
    bytes_checked: int = 0
    shards_complete: dict[str, int] = field(default_factory=dict)
    shards_expected: int = 0
    warnings: list[str] = field(default_factory=list)
    """What is not wrong but limits the check."""

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_dict(self) -> dict[str, Any]:
        return {
            "store": self.store,
            "ok": self.ok,
            "problems": [{"where": p.where, "message": p.message} for p in self.problems],
            "chunks_checked": self.chunks_checked,
            "bytes_checked": self.bytes_checked,
            "shards_expected": self.shards_expected,
            "shards_complete": self.shards_complete,
            "warnings": self.warnings,
        }


def _chunk_coords(arr: zarr.Array) -> Sequence[tuple[int, ...]]:
    grid = [-(-s // c) if s else 0 for s, c in zip(arr.shape, arr.chunks)]
    return list(itertools.product(*(range(g) for g in grid)))


def _metadata_problem(store: KVStore, key: str, expect: rules.ArrayLayout, raw: bytes | None = None) -> str | None:
    """What in ``key``'s ``zarr.json`` (``raw``, read here when not given) breaks :func:`rules.metadata_problem`
    (None when it is missing: opening the array reports that)."""
    raw = raw if raw is not None else zarr_io.get_bytes(store.zarr_store, f"{key}/zarr.json")
    if raw is None:
        return None
    try:
        doc = json.loads(raw)
    except ValueError as e:
        return f"unreadable array metadata: {e}"
    return rules.metadata_problem(doc, expect)


def _check_chunks(
    store: KVStore, report: VerifyReport, key: str, describe_rows: Callable[[int, int], str],
    hasher: Any = None, *, expect: rules.ArrayLayout = rules.ANY_ARRAY, fix: str | None = None,
    rule: Callable[[np.ndarray], str | None] | None = None, rule_fix: str = "", metadata: bytes | None = None,
) -> np.ndarray | None:
    """Decode every chunk of an array (checking its crc32c); report missing or corrupted ones, metadata that is not
    what ``expect`` says (then no chunk is decoded: without crc32c the chain can't be trusted), and the first chunk
    whose values break ``rule`` (a phrase, or None). ``metadata``: the array's ``zarr.json`` when the caller has
    read it already (on object storage each read is a round trip).

    ``hasher`` (a hashlib object) is fed each chunk's bytes in order (1-D arrays: the array's bytes).
    Returns the whole array when it is small and sound (for further checks), else None.
    """
    zstore = store.zarr_store
    try:
        arr = zarr_io.open_array(zstore, key)
    except (SchemaError, ValueError) as e:
        report.problems.append(Problem(key, f"unreadable array metadata: {e}"))
        return None
    problem = _metadata_problem(store, key, expect, metadata)
    if problem is not None:
        report.problems.append(Problem(key, f"{key}/zarr.json: {problem}. {fix or rules.metadata_fix(key)}"))
        return None
    bad = broken = False
    every = _chunk_coords(arr)
    keys = [f"{key}/{arr.metadata.encode_chunk_key(coords)}" for coords in every]
    # On object storage every chunk's existence is asked at once: one round trip rather than one per chunk.
    present = zarr_io.exists_many(zstore, keys) if isinstance(zstore, FsspecStore) else None
    for i, (coords, chunk_key) in enumerate(zip(every, keys)):
        rows = (coords[0] * arr.chunks[0], min((coords[0] + 1) * arr.chunks[0], arr.shape[0]))
        if not (present[i] if present is not None else zarr_io.exists(zstore, chunk_key)):
            report.problems.append(Problem(key, f"chunk {coords} is missing ({describe_rows(*rows)})"))
            bad = True
            continue
        try:
            with zarr_io.reading(key):
                block = np.asarray(arr.blocks[coords])
        except ChecksumError:
            report.problems.append(
                Problem(key, f"chunk {coords} fails its crc32c checksum: corrupted ({describe_rows(*rows)})")
            )
            bad = True
            continue
        except Exception as e:  # noqa: BLE001 - any decode failure is a finding, not a crash
            report.problems.append(Problem(key, f"chunk {coords} does not decode: {e} ({describe_rows(*rows)})"))
            bad = True
            continue
        report.chunks_checked += 1
        report.bytes_checked += block.nbytes
        if hasher is not None and not bad:
            hasher.update(np.ascontiguousarray(block).tobytes())
        problem = None if rule is None or broken else rule(block)
        if problem is not None:  # one per array: the first chunk that breaks it
            report.problems.append(Problem(key, f"{problem} (chunk {coords}, {describe_rows(*rows)}). {rule_fix}"))
            broken = True
    if bad or broken or arr.nbytes > (64 << 20):
        return None
    return np.asarray(arr[...])


def verify_store(location: Any, *, teachers: Sequence[str] | None = None) -> VerifyReport:
    """Check a store completely. Raises only when it is not a store at all, or one of a newer format; everything
    else is a Problem (a manifest that does not parse is the one problem reported)."""
    try:
        store = KVStore.open(location, check_digest=False)  # an unsealed store is reported below
    except (NotAStoreError, FormatVersionError):
        raise
    except SchemaError as e:
        where = zarr_io.describe(zarr_io.as_zarr_store(location, read_only=True))
        return VerifyReport(store=where, problems=[Problem("zarr.json", str(e))])
    m = store.manifest
    report = VerifyReport(store=store.where, shards_expected=m.num_shards)
    problems = report.problems
    sealed = m.format_version >= SEALED_SINCE
    if not sealed:
        problems.append(Problem("zarr.json", f"{unsealed_note(store.where)}."))
    raw = zarr_io.group_attributes(store.zarr_store, "")[layout.MANIFEST_ATTR]
    problem = digest_problem(raw, required=sealed)
    if problem is not None:
        problems.append(Problem("zarr.json", digest_error(store.where, MANIFEST_DOC, problem, MANIFEST_FIX).args[0]))

    def grid_rows(a: int, b: int) -> str:
        offsets = store.offsets
        first = int(np.searchsorted(offsets, a, side="right") - 1)
        last = int(np.searchsorted(offsets, max(a, b - 1), side="right") - 1)
        return f"tokens {a}-{b - 1}, samples {first}-{last}"

    # The grid: every chunk, then its invariants.
    arrays = {}
    grid_hash = hashlib.sha256()  # offsets then input_ids, as create_store computed grid_fingerprint
    grid_layouts = rules.grid_layouts(m)
    for name in layout.GRID_ARRAYS:
        key = layout.grid_key(name)
        hasher = grid_hash if name in ("offsets", "input_ids") else None

        def describe(a: int, b: int, n: str = name) -> str:
            return f"{n} rows {a}-{b - 1}"

        # Ids and codes chunk by chunk (any rows of them obey the rule); offsets and shard starts whole, below.
        rule = None if name in ("offsets", "shard_starts") else partial(rules.grid_problem, name, manifest=m)
        arrays[name] = _check_chunks(store, report, key, describe, hasher,
                                     expect=grid_layouts[name], rule=rule,
                                     rule_fix=rules.GRID_FIX)
    # A missing or bad chunk of either was reported above; a partial hash would say nothing more.
    hashed_whole = not any(p.where in ("grid/offsets", "grid/input_ids") for p in problems)
    if hashed_whole and m.grid_fingerprint and grid_hash.hexdigest() != m.grid_fingerprint:
        problems.append(Problem("grid", f"expected the grid fingerprint in the manifest "
                                        f"({m.grid_fingerprint[:12]}...). Got {grid_hash.hexdigest()[:12]}... from "
                                        "grid/offsets and grid/input_ids instead: the grid or the manifest was "
                                        "changed. Extract again into a new --store path."))
    for name in ("offsets", "shard_starts"):
        got = arrays[name]
        problem = None if got is None else rules.grid_problem(name, got, m)
        if problem is not None:
            problems.append(Problem(layout.grid_key(name), f"{problem}. {rules.GRID_FIX}"))
            arrays[name] = None
    off, starts = arrays["offsets"], arrays["shard_starts"]
    try:
        table = store.index_table()
        bad_ids = sample_ids_problem(table.column("sample_id"))
        if bad_ids is not None:
            problems.append(Problem(layout.INDEX_FILE, f"sample_id: {bad_ids}."))
        if table.num_rows != m.num_samples:
            problems.append(Problem(layout.INDEX_FILE, f"expected {m.num_samples} rows. Got {table.num_rows}."))
        elif off is not None and not np.array_equal(table.column("num_tokens").to_numpy(), np.diff(off)):
            problems.append(Problem(layout.INDEX_FILE, "num_tokens disagrees with grid/offsets."))
    except SchemaError as e:
        problems.append(Problem(layout.INDEX_FILE, str(e)))
    for fname in m.student_tokenizer.files:
        _check_chunks(store, report, layout.tokenizer_file_key(fname), lambda a, b: f"bytes {a}-{b - 1}")
    if off is None or starts is None:
        return report  # without a sound grid, shard ranges can't be named

    # Every folder under teachers/, so one whose metadata is corrupted is reported rather than raised.
    names = sorted(zarr_io.list_dir(store.zarr_store, "teachers/")) if teachers is None else list(teachers)
    for name in names:
        try:
            spec, raw = store.teacher_document(name)
        except KavaError as e:
            problems.append(Problem(layout.teacher_key(name), str(e)))
            continue
        problem = digest_problem(raw, required=sealed)
        if problem is not None:
            message = digest_error(store.where, teacher_doc(name), problem, teacher_fix(name)).args[0]
            problems.append(Problem(layout.teacher_key(name), message))
        problem = rules.version_problem(m.format_version, spec)
        if problem is not None:
            problems.append(Problem(layout.teacher_key(name), f"{problem}. {rules.VERSION_FIX}"))
        _verify_teacher(store, report, spec, grid_rows)
    return report


def _verify_teacher(store: KVStore, report: VerifyReport, spec: TeacherSpec, grid_rows) -> None:
    slots_at = segments = None
    if spec.eviction is not None:  # a compressed teacher: its K/V rows are each sample's kept rows
        segments = store._grid_rows("segment_ids")
        slots_at = slot_offsets(spec.eviction, segments, store.offsets)
    # On object storage a shard's check is a chain of round trips: several shards are checked at once, each on its
    # own thread with its own handle (a handle's caches are not shared between threads); reported in shard order.
    remote_store = isinstance(store.zarr_store, FsspecStore)
    handles = threading.local()

    def check(shard: int) -> tuple[VerifyReport, bool]:
        handle = store
        if remote_store:
            handle = getattr(handles, "store", None) or KVStore(store.zarr_store, store.manifest)
            handles.store = handle
        part = VerifyReport(store=report.store)
        return part, _verify_shard(handle, part, spec, shard, grid_rows, slots_at, segments)

    complete = 0
    ahead = remote.VERIFY_CONCURRENCY if remote_store else 0
    for part, done in remote.read_ahead(check, range(store.num_shards), ahead):
        report.problems += part.problems
        report.chunks_checked += part.chunks_checked
        report.bytes_checked += part.bytes_checked
        complete += done
    report.shards_complete[spec.name] = complete
    for name in zarr_io.list_dir(store.zarr_store, f"{layout.teacher_key(spec.name)}/cka/"):
        _check_chunks(store, report, layout.cka_key(spec.name, name), lambda a, b: f"rows {a}-{b - 1}")


def _verify_shard(store: KVStore, report: VerifyReport, spec: TeacherSpec, shard: int, grid_rows,
                  slots_at: np.ndarray | None, segments: np.ndarray | None) -> bool:
    """Check one shard of ``spec``'s into ``report``; whether it is complete (has its completion marker)."""
    problems = report.problems
    samples = store.shard_samples(shard)
    t0, t1 = store.shard_tokens(shard)
    skey = layout.shard_key(spec.name, shard)
    marker = store.shard_marker(spec.name, shard)
    if marker is None:
        problems.append(Problem(
            skey, f"incomplete: no completion marker (samples {samples.start}-{samples.stop - 1}). "
            "Finish it with `kava extract --resume`."))
        return False
    slots = None if slots_at is None else int(slots_at[samples.stop] - slots_at[samples.start])
    problem = rules.marker_problem(marker, samples, (t0, t1), slots)
    if problem is not None:
        problems.append(Problem(skey, f"completion marker: {problem}. {rules.shard_fix(spec.name, shard)}"))
        return True
    lowbit: dict[str, np.ndarray] = {}  # the scale and zero arrays of int4/int2, for the rule on their pairs
    kept = None
    for array, expect in rules.shard_layouts(spec, t1 - t0, len(samples), slots).items():
        key = f"{skey}/{array}"
        metadata = zarr_io.get_bytes(store.zarr_store, f"{key}/zarr.json")
        if metadata is None:
            problems.append(Problem(key, "missing array"))
            continue
        # Chunk rows a..b as the shard's samples or grid rows (this shard's values bound as defaults).
        if array == "sample_status":
            def rows(a: int, b: int, shard: int = shard, first: int = samples.start) -> str:
                return f"shard {shard}, samples {first + a}-{first + b - 1}"
        elif slots is not None and (array == layout.KEPT_ARRAY or array.partition("_")[0] in ("k", "v")):
            def rows(a: int, b: int, shard: int = shard, first: int = 0) -> str:  # a compressed teacher's slots
                return f"shard {shard}, kept rows {first + a}-{first + b - 1}"
        else:
            def rows(a: int, b: int, shard: int = shard, first: int = t0) -> str:
                return f"shard {shard}, " + grid_rows(first + a, first + b)
        data = _check_chunks(store, report, key, rows, expect=expect,
                             fix=rules.metadata_fix(key, spec.name, shard),
                             rule=partial(rules.value_problem, array, spec=spec, with_values=True),
                             rule_fix=rules.shard_fix(spec.name, shard), metadata=metadata)
        if data is not None and codecs.is_lowbit(spec.storage.dtype) and array.endswith(("_scale", "_zero")):
            lowbit[array] = data
        if array == layout.KEPT_ARRAY:
            kept = data
    if kept is not None and spec.eviction is not None and slots_at is not None and segments is not None:
        at, tokens_at = store.shard_samples(shard), store.offsets[samples.start : samples.stop + 1]
        found = samples_problem(spec.eviction, kept, slots_at[at.start : at.stop + 1] - slots_at[at.start],
                                tokens_at, segments[tokens_at[0] : tokens_at[-1]])
        if found is not None:
            problems.append(Problem(f"{skey}/{layout.KEPT_ARRAY}", f"sample {at.start + found[0]}: {found[1]}. "
                                                                 f"{rules.shard_fix(spec.name, shard)}"))
    for value in ("k", "v", "q"):
        if f"{value}_scale" in lowbit and f"{value}_zero" in lowbit:
            problem = rules.lowbit_pair_problem(lowbit[f"{value}_scale"], lowbit[f"{value}_zero"],
                                                spec.storage.dtype)
            if problem is not None:
                problems.append(Problem(f"{skey}/{value}_scale", f"with {value}_zero: {problem}. "
                                                                 f"{rules.shard_fix(spec.name, shard)}"))
    return True


def seal_store(location: Any) -> VerifyReport:
    """Seal a format-1 store (written before metadata carried digests) so that readers accept it: verify it whole,
    and only when being unsealed is its one problem, write each teacher spec's digest and then the manifest's, as
    format version 2. Returns the verify report; its problems, when there are any, say why nothing was written.
    A sealed store is left as it is (its report says so). Killed midway, a rerun finishes: the manifest, which
    makes the store sealed, is written last."""
    report = verify_store(location)
    unsealed = [p for p in report.problems if p.where == "zarr.json" and "format version 1 store" in p.message]
    if not unsealed:
        if report.ok:
            report.warnings.append(f"{report.store}: already sealed (format version 2 or later); nothing to do")
        return report
    if len(report.problems) > len(unsealed):
        report.problems.remove(unsealed[0])
        return report
    store = KVStore.open(location, mode="a", check_digest=False)
    for name in sorted(zarr_io.list_dir(store.zarr_store, "teachers/")):
        _, raw = store.teacher_document(name)
        group = zarr.open_group(store.zarr_store, path=layout.teacher_key(name), mode="a")
        group.attrs[layout.TEACHER_ATTR] = seal(raw)
    raw = zarr_io.group_attributes(store.zarr_store, "")[layout.MANIFEST_ATTR]
    zarr.open_group(store.zarr_store, mode="a").attrs[layout.MANIFEST_ATTR] = seal(
        {**raw, "format_version": SEALED_SINCE})
    report.problems.clear()
    return report
