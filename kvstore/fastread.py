"""A fast read path for the arrays this package writes, straight from their chunk files.

zarr-python 3.1 runs the crc32c codec on its event-loop thread, one chunk after another, and copies each chunk
several times; on two cores that capped streaming at ~0.5 GB/s where the same bytes decode at ~2.7 GB/s. For a
directory store and the codec chain the writer uses (``bytes`` → optional ``blosc`` → ``crc32c``) this module reads
each chunk file into a reused per-thread buffer, checks its crc32c, and decompresses it, one chunk per pool thread
(the read, the checksum and blosc all release the GIL, so reads overlap decoding) — straight into the output array
when a chunk covers whole rows of it; an uncompressed chunk is read straight into the output and checked there.
Anything else (other stores or codecs) returns None and the caller uses zarr. The result is the same array zarr
returns (tested), except that a missing chunk file is an error instead of zeros. The array's metadata is read from
its ``zarr.json`` (the zarr v3 document) directly: opening it through zarr cost ~2 ms an array, as much as decoding
a shard's chunks. The checksum is the ``crc32c`` package's (hardware instructions, GIL released): twice the speed
of ``google-crc32c`` on the same chunks.
"""

from __future__ import annotations

import json
import os
import sys
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeAlias, cast

import crc32c
import numpy as np
from numcodecs import Blosc
from zarr.abc.store import Store
from zarr.storage import LocalStore

from kava.core.errors import SchemaError

from .zarr_io import checksum_error

if TYPE_CHECKING:
    # numpy declares an array's buffer protocol to type checkers only from Python 3.12: arrays handed to os.readv
    # and crc32c are cast to it.
    from typing_extensions import Buffer

LayerSelection: TypeAlias = slice | list[int]
"""Positions on an array's axis 1 (its layers): a step-1 slice (a contiguous run) or a list of positions."""
Check: TypeAlias = "Callable[[np.ndarray], str | None]"
"""A value rule applied to each chunk's decoded rows on the pool thread: a phrase for what is wrong, or None."""

_pool: ThreadPoolExecutor | None = None
_pool_pid = -1
_pool_lock = threading.Lock()


def _executor() -> ThreadPoolExecutor:
    """One pool per process: a pool inherited through fork has no threads behind it."""
    global _pool, _pool_pid
    with _pool_lock:
        if _pool is None or _pool_pid != os.getpid():
            # Twice the cores: a thread waiting on a cold read lets another decode.
            _pool = ThreadPoolExecutor(max_workers=min(16, 2 * (os.cpu_count() or 2)), thread_name_prefix="kava-read")
            _pool_pid = os.getpid()
        return _pool


@dataclass(frozen=True)
class ArrayInfo:
    """What the fast path needs from an array's ``zarr.json``."""

    path: Path
    shape: tuple[int, ...]
    chunks: tuple[int, ...]
    dtype: np.dtype
    decoder: Blosc | None
    """The compressor of every chunk, or None for uncompressed chunks."""
    separator: str
    """The chunk key separator (``/``)."""

    def chunk_path(self, coords: tuple[int, ...]) -> Path:
        """The file of the chunk at grid position ``coords``, e.g. ``<array>/c/3/0/0/0``."""
        return self.path / ("c" + self.separator + self.separator.join(map(str, coords)))


def array_info(store: Store, key: str, doc: Any = None) -> ArrayInfo | None:
    """The fast path's view of array ``key``, or None when it can't read it (not a directory store, or metadata
    it does not know: then zarr reads the array). ``doc``: its ``zarr.json``, parsed, where the caller has read it."""
    if not isinstance(store, LocalStore):
        return None
    path = Path(store.root) / key
    try:
        if doc is None:
            doc = json.loads((path / "zarr.json").read_bytes())
        codecs = [c["name"] for c in doc["codecs"]]
        bytes_conf = doc["codecs"][0].get("configuration", {})
        grid, encoding = doc["chunk_grid"], doc["chunk_key_encoding"]
        if (doc.get("zarr_format") != 3 or doc.get("node_type") != "array" or grid.get("name") != "regular"
                or encoding.get("name") != "default" or codecs[0] != "bytes" or codecs[-1] != "crc32c"
                or len(codecs) not in (2, 3) or (len(codecs) == 3 and codecs[1] != "blosc")):
            return None
        dtype = np.dtype(doc["data_type"])
        if dtype.itemsize > 1 and bytes_conf.get("endian", "little") != sys.byteorder:
            return None
        return ArrayInfo(
            path=path, shape=tuple(doc["shape"]), chunks=tuple(grid["configuration"]["chunk_shape"]), dtype=dtype,
            decoder=Blosc() if len(codecs) == 3 else None,  # blosc frames describe themselves
            separator=encoding.get("configuration", {}).get("separator", "/"),
        )
    except (OSError, ValueError, KeyError, TypeError, IndexError):
        return None  # missing or unexpected metadata: zarr reads it, and reports what is wrong


def read(info: ArrayInfo, key: str, rows: tuple[int, int], axis1: LayerSelection = slice(None), *,
         out: np.ndarray | None = None) -> np.ndarray | None:
    """``array[a:b, axis1]`` decoded from the chunk files, or None when this path does not apply.

    ``axis1`` is a slice or a list of indices into axis 1 (layers); other axes are read whole: ``[b - a, n1, ...]``
    for an array ``[rows, layers, ...]``, ``[b - a]`` for a 1-D one, in the array's dtype. ``out``, when given,
    receives the rows (it must have the result's shape and the array's dtype, C-contiguous): a caller that gathers
    several reads into one buffer saves a copy.
    """
    started = submit(info, key, rows, axis1, out=out)
    if started is None:
        return None
    out, pending = started
    for future in pending:
        future.result()
    return out


def submit(info: ArrayInfo, key: str, rows: tuple[int, int], axis1: LayerSelection = slice(None), *,
           out: np.ndarray | None = None, check: Check | None = None
           ) -> tuple[np.ndarray, list[Future[str | None]]] | None:
    """:func:`read` without waiting: ``(out, futures)``, ``out`` complete once every future is done (each raises
    what its chunk's read raised). A caller reading many arrays submits them all first, so that every core decodes
    while the small arrays' chunks would otherwise leave them idle.

    ``check``, when given, is applied on the pool thread to each chunk's decoded values while they are still in
    the cache (a pass over them afterwards would cost the loader ~6% of its feed rate); a future's result is what
    it returned for its chunk: a phrase for what is wrong, or None."""
    a, b = rows
    shape, chunks = info.shape, info.chunks
    if any(c < n for c, n in zip(chunks[2:], shape[2:])):
        return None  # chunked along heads or head_dim: not a layout this package writes
    picked = np.arange(shape[1])[axis1] if len(shape) > 1 else None
    out_shape = (b - a, *(() if picked is None else (len(picked),)), *shape[2:])
    if out is None:
        out = np.empty(out_shape, dtype=info.dtype)
    elif out.shape != out_shape or out.dtype != info.dtype or not out.flags.c_contiguous:
        raise ValueError(f"Expected out of shape {out_shape} and dtype {info.dtype}, C-contiguous. "
                         f"Got {out.shape} {out.dtype} instead.")
    if b <= a or (picked is not None and len(picked) == 0):
        return out, []
    whole_axis1 = picked is None or (np.array_equal(picked, np.arange(shape[1])) and chunks[1] == shape[1])
    layer_chunks = [0] if picked is None else sorted({int(l) // chunks[1] for l in picked})
    jobs = [(ci, lj) for ci in range(a // chunks[0], (b - 1) // chunks[0] + 1) for lj in layer_chunks]
    pool = _executor()
    return out, [pool.submit(_read_chunk, info, key, job, a, b, picked, whole_axis1, out, check) for job in jobs]


_scratch = threading.local()


def _buffer(name: str, nbytes: int) -> np.ndarray:
    """A per-thread reusable uint8 buffer of at least ``nbytes``: a fresh ``bytes`` per chunk costs page faults
    (reading into a new 4 MB object ran at half the speed of reading into a reused one)."""
    buf = getattr(_scratch, name, None)
    if buf is None or buf.nbytes < nbytes:
        buf = np.empty(max(nbytes, 1 << 20), dtype=np.uint8)
        setattr(_scratch, name, buf)
    return buf[:nbytes]


def _read_chunk(info: ArrayInfo, key: str, job: tuple[int, int], a: int, b: int, picked: np.ndarray | None,
                whole_axis1: bool, out: np.ndarray, check: Check | None = None) -> str | None:
    """Read, check and decode one chunk file into its rows of ``out`` (runs on a pool thread: the file read,
    crc32c and blosc all release the GIL); return ``check`` of what it decoded (None without one).

    ``job``: the chunk's (row chunk, layer chunk) grid position; ``a``, ``b``: the rows ``out`` holds (``out[0]`` is
    row ``a``); ``picked``: the axis-1 positions ``out`` holds, in its order (None for a 1-D array);
    ``whole_axis1``: every position of axis 1, in order, in one chunk (then a chunk is whole rows of ``out``).
    """
    ci, lj = job
    shape, chunks, decoder = info.shape, info.chunks, info.decoder
    coords = (ci,) if picked is None else (ci, lj, *([0] * (len(shape) - 2)))
    path = info.chunk_path(coords)
    r0, r1 = ci * chunks[0], (ci + 1) * chunks[0]
    lo, hi = max(a, r0), min(b, r1)
    direct = whole_axis1 and lo == r0 and hi == r1  # the chunk is a contiguous run of whole output rows
    chunk_bytes = int(np.prod(chunks)) * info.dtype.itemsize
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        raise SchemaError(
            f"{key}: chunk {coords} is missing (expected {path.name}); it was deleted or never written. "
            "Run `kava store verify` for a full report; re-extract what it names."
        ) from None
    try:
        size = os.fstat(fd).st_size
        if direct and decoder is None:
            # Uncompressed: read the file straight into the output rows, then check them in place.
            target = out[r0 - a : r1 - a].reshape(-1).view(np.uint8)
            stored = bytearray(4)
            if size != target.nbytes + 4 or os.readv(fd, [cast("Buffer", target), stored]) != size:
                raise checksum_error(f"{key}: chunk {coords} (wrong size)")
            if crc32c.crc32c(cast("Buffer", target)) != int.from_bytes(stored, "little"):
                raise checksum_error(f"{key}: chunk {coords}")
            return check(target.view(info.dtype)) if check else None
        raw = _buffer("raw", size)
        if size < 4 or os.readv(fd, [cast("Buffer", raw)]) != size:
            raise checksum_error(f"{key}: chunk {coords} (wrong size)")
    finally:
        os.close(fd)
    body = raw[:-4]
    if crc32c.crc32c(cast("Buffer", body)) != int.from_bytes(raw[-4:].tobytes(), "little"):
        raise checksum_error(f"{key}: chunk {coords}")
    if direct and decoder is not None:  # (uncompressed direct chunks were read into place above)
        decoder.decode(body, out=out[r0 - a : r1 - a])
        return check(out[r0 - a : r1 - a]) if check else None
    if decoder is None:
        if body.nbytes != chunk_bytes:
            raise checksum_error(f"{key}: chunk {coords} (wrong size)")
        block = body.view(info.dtype).reshape(chunks)
    else:
        block = _buffer("block", chunk_bytes).view(info.dtype).reshape(chunks)
        decoder.decode(body, out=block)
    if picked is None or whole_axis1:
        out[lo - a : hi - a] = block[lo - r0 : hi - r0]
        return check(block[lo - r0 : hi - r0]) if check else None
    local = [int(l) - lj * chunks[1] for l in picked if int(l) // chunks[1] == lj]  # picked layers in this chunk
    for i, l in enumerate(picked):
        if int(l) // chunks[1] == lj:
            out[lo - a : hi - a, i] = block[lo - r0 : hi - r0, int(l) - lj * chunks[1]]
    return check(block[lo - r0 : hi - r0, local]) if check else None
