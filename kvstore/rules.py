"""What a store's contents must satisfy beyond their checksums, written once and applied twice: by
``kava store verify`` over the whole store, and by the reader (:mod:`.read`, :class:`~kava.kvstore.KVStore`) on what
it reads.

A chunk's crc32c says its bytes are the ones written, not that the writer was this package: bytes rewritten with a
fresh checksum pass it, and an array's ``zarr.json`` carries no checksum at all. So, each rule a function that
returns a phrase (``"expected X. Got Y instead"``) or None, the caller adding where and the fix:

- **Array metadata** against the sealed teacher spec (:func:`shard_layouts`, :func:`metadata_problem`): shape,
  dtype, chunks and the codec chain ``bytes`` (little-endian) → ``blosc`` when the spec compresses → ``crc32c``.
  Every other array of a store (grid, tokenizer files, CKA matrices) must end its chain with ``crc32c`` too.
- **Version rules** (:func:`version_problem`): a teacher uses only what its store's format version has.
- **Value rules** (:func:`value_problem`, :func:`grid_problem`, :func:`marker_problem`): ranges every sound store
  keeps, each a vectorised min/max over what was already decoded (no extra read).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from kava.core.errors import short_repr

from . import codecs, layout
from .manifest import EVICTED_Q_SINCE, EVICTION_SINCE, LOWBIT_DTYPES, LOWBIT_SINCE, StoreManifest, TeacherSpec

FP16_MAX = 65504.0
"""The largest finite float16: the low-bit dtypes decode into float16 in a training window."""
FP16_INF = 65520.0
"""The smallest float32 that rounds to infinity as a float16."""

# --------------------------------------------------------------------------------------------------------------
# Array metadata


@dataclass(frozen=True)
class ArrayLayout:
    """What an array's ``zarr.json`` must say; None: not checked (arrays the spec does not describe)."""

    shape: tuple[int, ...] | None = None
    dtype: np.dtype | None = None
    chunks: tuple[int, ...] | None = None
    compressed: bool | None = None
    """Whether ``blosc`` sits between ``bytes`` and ``crc32c``."""


ANY_ARRAY = ArrayLayout()
"""The rule every array of a store keeps: a codec chain that ends with ``crc32c``."""


def _written_chunks(chunks: tuple[int, ...], shape: tuple[int, ...]) -> tuple[int, ...]:
    """The chunk shape the writer's ``create_array`` stores for ``chunks`` (never zero, never past the shape)."""
    return tuple(max(1, min(c, s)) if s else 1 for c, s in zip(chunks, shape))


def shard_layouts(spec: TeacherSpec, num_tokens: int, num_samples: int, num_slots: int | None = None
                  ) -> dict[str, ArrayLayout]:
    """Every array of one complete shard of ``spec`` (``num_tokens`` rows, ``num_samples`` samples), by name, as the
    writer creates it: K/V/Q and their scale/zero arrays, ``align_weight``, ``sample_status`` and the logits; for a
    compressed teacher K/V have ``num_slots`` rows and ``kept`` is there too."""
    st = spec.storage
    evicts = spec.eviction is not None
    if evicts and num_slots is None:
        raise ValueError(f"Teacher {spec.name!r} keeps only some rows: pass num_slots.")
    rows_kv = num_slots if evicts and num_slots is not None else num_tokens
    geometry = {"k": (len(spec.layers), spec.kv_heads), "v": (len(spec.layers), spec.kv_heads)}
    if spec.has_q:
        geometry["q"] = (len(spec.q_layers), spec.num_heads)
    out: dict[str, ArrayLayout] = {}
    for name, (nl, nh) in geometry.items():
        for part, (shape, dtype, dims) in codecs.stored_arrays(
                name, rows_kv, nl, nh, spec.head_dim, st.dtype, group_tokens=st.group_tokens,
                group_channels=st.group_channels, slots=evicts).items():
            rows = st.chunk_tokens // st.group_tokens if dims[0].endswith("_group") else st.chunk_tokens
            chunks = _written_chunks((rows, min(st.chunk_layers, nl), *shape[2:]), shape)
            out[part] = ArrayLayout(shape, dtype, chunks, bool(st.compressor))
    if evicts:
        shape = (rows_kv, len(spec.layers), spec.kv_heads)
        out[layout.KEPT_ARRAY] = ArrayLayout(shape, np.dtype(np.int32),
                                             _written_chunks((st.chunk_tokens, *shape[1:]), shape), True)
    columns: dict[str, tuple[tuple[int, ...], np.dtype]] = {
        "align_weight": ((num_tokens,), np.dtype(np.float32)), "sample_status": ((num_samples,), np.dtype(np.uint8))}
    if spec.logits is not None:
        ids, logp = layout.LOGIT_ARRAYS
        columns[ids] = ((num_tokens, spec.logits.top_k), np.dtype(np.int32))
        columns[logp] = ((num_tokens, spec.logits.top_k), np.dtype(np.float16))
    for part, (shape, dtype) in columns.items():
        chunks = _written_chunks((max(1, shape[0]), *shape[1:]), shape)
        out[part] = ArrayLayout(shape, dtype, chunks, True)
    return out


def metadata_problem(doc: Any, expected: ArrayLayout) -> str | None:
    """What in an array's ``zarr.json`` (``doc``, parsed) differs from ``expected``, or None."""
    if not isinstance(doc, Mapping) or doc.get("node_type") != "array":
        return f"expected an array's metadata. Got {short_repr(doc, 80)} instead"
    codec_list = doc.get("codecs")
    names = [c.get("name") if isinstance(c, Mapping) else c for c in codec_list] \
        if isinstance(codec_list, list) else codec_list
    if not (isinstance(names, list) and names and names[-1] == "crc32c"):
        return (f"expected a codec chain that ends with crc32c (every chunk checksummed). Got {short_repr(names)} "
                "instead")
    chain = ["bytes", "blosc", "crc32c"] if expected.compressed else ["bytes", "crc32c"]
    if expected.compressed is None and names in (["bytes", "crc32c"], ["bytes", "blosc", "crc32c"]):
        chain = names
    if names != chain:
        return f"expected the codec chain {' -> '.join(chain)}. Got {' -> '.join(map(str, names))} instead"
    first = codec_list[0] if isinstance(codec_list, list) else {}
    endian = (first.get("configuration") or {}).get("endian", "little")
    data_type = doc.get("data_type")
    try:
        dtype = np.dtype(data_type)
    except TypeError:
        return f"expected a numpy data type. Got {short_repr(data_type)} instead"
    if dtype.itemsize > 1 and endian != "little":
        return f"expected little-endian bytes. Got {short_repr(endian)} instead"
    if expected.dtype is not None and dtype != expected.dtype:
        return f"expected dtype {expected.dtype}. Got {dtype} instead"
    shape = tuple(doc.get("shape") or ())
    if expected.shape is not None and shape != expected.shape:
        return f"expected shape {expected.shape}. Got {shape} instead"
    grid = doc.get("chunk_grid") or {}
    chunks = tuple((grid.get("configuration") or {}).get("chunk_shape") or ())
    if grid.get("name") != "regular" or (expected.chunks is not None and chunks != expected.chunks):
        want = "regular chunks" if expected.chunks is None else f"regular chunks {expected.chunks}"
        return f"expected {want}. Got {grid.get('name')} chunks {chunks} instead"
    return None


def grid_layouts(manifest: StoreManifest) -> dict[str, ArrayLayout]:
    """The grid's arrays, by name, as the manifest sizes them (chunks not checked: a reader takes any)."""
    m = manifest
    return {"offsets": ArrayLayout((m.num_samples + 1,), np.dtype(np.int64)),
            "input_ids": ArrayLayout((m.num_tokens,), np.dtype(np.int32)),
            "segment_ids": ArrayLayout((m.num_tokens,), np.dtype(np.uint8)),
            "sample_status": ArrayLayout((m.num_samples,), np.dtype(np.uint8)),
            "shard_starts": ArrayLayout((m.num_shards + 1,), np.dtype(np.int64))}


# --------------------------------------------------------------------------------------------------------------
# Versions


def version_problem(version: int, spec: TeacherSpec) -> str | None:
    """Whether teacher ``spec`` uses something its store's format ``version`` did not have, as a phrase.

    Version 2 added the digests (a version-2 document without one is refused where it is read); version 3 the
    low-bit dtypes; version 4 compressed teachers (eviction); version 5 their queries. Logits and everything else
    a spec can say were there in version 1."""
    if spec.storage.dtype in LOWBIT_DTYPES and version < LOWBIT_SINCE:
        return (f"expected a store of format version {LOWBIT_SINCE} or later for {spec.storage.dtype} storage. Got "
                f"version {version} instead: a version-{version} store can't hold it, so its manifest was changed")
    if spec.eviction is not None and version < EVICTION_SINCE:
        return (f"expected a store of format version {EVICTION_SINCE} or later for a compressed teacher (eviction). "
                f"Got version {version} instead: a version-{version} store can't hold it, so its manifest was changed")
    if spec.eviction is not None and spec.q_layers and version < EVICTED_Q_SINCE:
        return (f"expected a store of format version {EVICTED_Q_SINCE} or later for a compressed teacher with queries. "
                f"Got version {version} instead: a version-{version} store can't hold it, so its manifest was changed")
    return None


# --------------------------------------------------------------------------------------------------------------
# Values


def _range(x: np.ndarray) -> tuple[float, float]:
    """(min, max) of ``x`` as floats; NaN when ``x`` holds a NaN (numpy's min and max propagate it)."""
    return float(np.min(x)), float(np.max(x))


def _got(lo: float, hi: float) -> str:
    return "non-finite values (NaN or Inf)" if not (np.isfinite(lo) and np.isfinite(hi)) else f"{lo:.6g}..{hi:.6g}"


def _fp16_sound(x: np.ndarray, low: float | None, high: float | None) -> bool | None:
    """:func:`_bounded`'s answer for float16 scales and zeros from their bits, or None where it has none: numpy
    reduces float16 in software, ~10x slower than the same bits as uint16, and a read checks every scale it reads.
    A non-negative float16 orders as its bits; an all-ones exponent is Inf or NaN."""
    if x.dtype != np.float16 or not x.flags.c_contiguous:
        return None
    bits = x.view(np.uint16)
    if low == 0.0 and high is not None:  # +0 .. high: -0 reads as negative (no writer stores it)
        top = np.float16(min(high, FP16_MAX))
        if float(top) > high:  # the largest float16 within the bound
            top = np.nextafter(top, np.float16(0))
        return int(np.max(bits)) <= int(np.array(top).view(np.uint16))
    if low is None and high is None:
        return int(np.max(bits & np.uint16(0x7FFF))) < 0x7C00
    return None


def _bounded(x: np.ndarray, low: float | None, high: float | None, what: str) -> str | None:
    """``x`` finite and within ``[low, high]`` (None: unbounded on that side)."""
    if _fp16_sound(x, low, high):
        return None
    lo, hi = _range(x)  # the bits say no (or can't say): the values, for the message
    ok = np.isfinite(lo) and np.isfinite(hi) and (low is None or lo >= low) and (high is None or hi <= high)
    return None if ok else f"expected {what}. Got {_got(lo, hi)} instead"


def value_problem(array: str, data: np.ndarray, spec: TeacherSpec, *, with_values: bool = False) -> str | None:
    """What in ``data`` (rows of the shard array ``array`` of teacher ``spec``, as stored) breaks a value rule, or
    None. K/V/Q themselves only ``with_values`` (a full pass over the largest arrays: ``verify`` does it)."""
    if data.size == 0:
        return None
    dtype = spec.storage.dtype
    if array == "align_weight":
        return _bounded(data, 0.0, 1.0, "finite weights in [0, 1]")
    if array == layout.KEPT_ARRAY:  # the positions' order and coverage are checked per sample (eviction.kept_problem)
        return None if int(np.min(data)) >= 0 else f"expected kept positions >= 0. Got {int(np.min(data))} instead"
    if array == "sample_status":
        top = int(np.max(data))
        return None if top < len(layout.TEACHER_STATUS) else (
            f"expected status codes 0 (ok) or 1 (quarantined). Got {top} instead")
    ids_name, logp_name = layout.LOGIT_ARRAYS
    if array == ids_name and spec.logits is not None:
        vocab = spec.logits.vocab_size
        lo, hi = int(np.min(data)), int(np.max(data))
        if lo < layout.LOGIT_NO_TARGET or hi >= vocab:
            return f"expected ids in [0, {vocab}) or -1 (no target). Got {lo}..{hi} instead"
        live = data[:, 0] >= 0
        mixed = np.any(live & (np.min(data, axis=1) < 0)) or np.any(~live & (np.max(data, axis=1) >= 0))
        return "expected rows of ids all in the vocabulary or all -1. Got a row mixing both instead" if mixed else None
    if array == logp_name:
        return _bounded(data, None, 0.0, "finite log-probabilities <= 0")
    base, _, side = array.partition("_")
    if side == "scale":
        if dtype not in LOWBIT_DTYPES:
            return _bounded(data, 0.0, FP16_MAX, "finite scales >= 0")
        # zero + scale * levels is a group's largest value and zero its smallest, both within float16's range.
        span = 2 * FP16_MAX / ((1 << codecs.LOWBIT_BITS[dtype]) - 1)
        return _bounded(data, 0.0, span, f"finite scales in [0, {span:.6g}] ({dtype}: a group spans at most "
                                         "float16's range)")
    if side == "zero":
        return _bounded(data, None, None, "finite zeros")
    if with_values and base in ("k", "v", "q") and not side:
        return finite_problem(data, dtype)
    return None


_EXPONENT = {"float16": (16, 0x7C00), "bfloat16": (16, 0x7F80), "float32": (32, 0x7F800000)}
"""Per float storage dtype: its width in bits and its exponent mask. With the sign bit cleared, a value is Inf or
NaN exactly when its bits are at least the mask (an all-ones exponent)."""


def finite_problem(data: np.ndarray, dtype: str) -> str | None:
    """Whether stored K/V/Q values ``data`` of storage ``dtype`` hold a NaN or Inf, from their bits.

    The largest value with its sign bit cleared is the larger of the signed view's max (the positive values) and
    the unsigned view's max less ``2**(bits-1)`` (the negative ones): two read-only reductions, no temporary (a
    temporary the size of a chunk is fresh memory whose page faults cost more than the reductions), 14-28 GB/s on
    one core where ``np.isfinite`` on float16 makes ~1 (numpy converts float16 in software). Codes of the
    quantized dtypes are always finite (their scales have rules of their own)."""
    if dtype not in _EXPONENT or data.size == 0:
        return None
    width, mask = _EXPONENT[dtype]
    bits = data.reshape(-1)
    signed, unsigned = np.dtype(f"<i{width // 8}"), np.dtype(f"<u{width // 8}")
    top = max(int(bits.view(signed).max()), int(bits.view(unsigned).max()) - (1 << (width - 1)))
    return "expected finite values. Got NaN or Inf instead" if top >= mask else None


def lowbit_pair_problem(scale: np.ndarray, zero: np.ndarray, dtype: str) -> str | None:
    """A low-bit group's largest value, ``zero + scale * (2**bits - 1)``, must stay a finite float16 (the window
    decodes into float16): every sound group's does, since its maximum was a value the writer accepted."""
    if scale.size == 0 or scale.shape != zero.shape:
        return None
    top = (1 << codecs.LOWBIT_BITS[dtype]) - 1
    peak = float(np.max(zero.astype(np.float32) + scale.astype(np.float32) * top))
    return None if peak < FP16_INF else (
        f"expected groups whose largest value (zero + scale * {top}) stays within float16's range "
        f"(max {FP16_MAX:g}). Got {_got(peak, peak)} instead")


def marker_problem(marker: Mapping[str, Any], samples: range, tokens: tuple[int, int], slots: int | None = None
                   ) -> str | None:
    """A completion marker's sample and token ranges against the shard's on the grid, and a compressed teacher's
    kept-row count (``slots``) against what its eviction keeps of them."""
    want = ([samples.start, samples.stop], [tokens[0], tokens[1]])
    got = (marker.get("samples"), marker.get("tokens"))
    if got == want:
        if slots is not None and marker.get("slots") != slots:
            return (f"expected {slots} kept rows (slots), as the teacher's eviction keeps of the grid. Got "
                    f"{short_repr(marker.get('slots'), 40)} instead")
        return None
    return (f"expected the marker's sample and token ranges {want[0]}/{want[1]} of the grid. Got "
            f"{short_repr(got[0], 40)}/{short_repr(got[1], 40)} instead")


def grid_problem(name: str, data: np.ndarray, manifest: StoreManifest) -> str | None:
    """What in ``grid/<name>`` (the whole array, or for ``input_ids``/``segment_ids`` any rows of it) breaks the
    grid's rules: offsets and shard starts that bound the grid, ids within the vocabulary and the known codes."""
    m = manifest
    if name in ("offsets", "shard_starts"):
        n, end, what = ((m.num_samples + 1, m.num_tokens, "non-decreasing offsets") if name == "offsets"
                        else (m.num_shards + 1, m.num_samples, "increasing shard starts"))
        steps = np.diff(data)
        ok = data.shape == (n,) and int(data[0]) == 0 and int(data[-1]) == end and (
            not np.any(steps < 0) if name == "offsets" else not (m.num_samples and np.any(steps <= 0)))
        return None if ok else f"expected {n} {what} from 0 to {end}. Got {short_repr(data.tolist(), 80)} instead"
    if data.size == 0:
        return None
    if name == "input_ids":
        vocab = m.student_tokenizer.vocab_size
        lo, hi = int(np.min(data)), int(np.max(data))
        return None if 0 <= lo and hi < vocab else (
            f"expected token ids in [0, {vocab}) (the student vocabulary). Got {lo}..{hi} instead")
    codes = {"segment_ids": len(m.segment_names), "sample_status": len(layout.SAMPLE_STATUS)}.get(name)
    if codes is None:
        return None
    top = int(np.max(data))
    return None if top < codes else f"expected codes below {codes}. Got {top} instead"


# --------------------------------------------------------------------------------------------------------------
# Fixes, for the messages


def shard_fix(teacher: str, shard: int) -> str:
    """What to do about a shard whose arrays break a rule."""
    return (f"The shard was changed after it was written: delete {layout.shard_key(teacher, shard)} and re-extract "
            "it with `kava extract --resume`; `kava store verify` lists every problem.")


def metadata_fix(key: str, teacher: str | None = None, shard: int | None = None) -> str:
    """What to do about an array whose ``zarr.json`` disagrees with the spec."""
    if teacher is not None and shard is not None:
        return (f"Its metadata was changed: restore {key}/zarr.json, or delete {layout.shard_key(teacher, shard)} "
                "and re-extract it with `kava extract --resume`.")
    return (f"Its metadata was changed: restore {key}/zarr.json, or extract again into a new --store path; "
            "`kava store verify` lists every problem.")


GRID_FIX = "The grid was changed after it was written: extract again into a new --store path."
VERSION_FIX = ("Restore the original zarr.json of the store, or extract that teacher again into a new --store path; "
               "`kava store verify` lists every problem.")
