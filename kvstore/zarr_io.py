"""Thin helpers over zarr-python 3: backends, raw keys, array creation, and error translation."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import zarr
from zarr.abc.store import Store
from zarr.codecs import BloscCodec, Crc32cCodec
from zarr.core.buffer import default_buffer_prototype
from zarr.core.group import GroupMetadata
from zarr.core.sync import sync
from zarr.storage import FsspecStore, LocalStore, MemoryStore

from kava.core.errors import ChecksumError, KavaError, SchemaError

from . import remote


def as_zarr_store(location: str | os.PathLike | Store, *, read_only: bool) -> Store:
    """A path becomes a LocalStore, a URL (``s3://bucket/kv.zarr``: :mod:`.remote`) an FsspecStore; a zarr Store
    (e.g. ``MemoryStore()``) is used as it is."""
    if isinstance(location, Store):
        return location.with_read_only(read_only) if location.read_only != read_only else location
    if remote.is_url(location):
        return remote.open_url(str(location), read_only=read_only)
    return LocalStore(Path(location), read_only=read_only)


def is_local(location: str | os.PathLike | Store) -> bool:
    """Whether ``location`` is a directory path (or a LocalStore), where file locks and renames work."""
    return isinstance(location, LocalStore) or not (isinstance(location, Store) or remote.is_url(location))


def describe(store: Store) -> str:
    """How to name a store in messages: its path, its URL, or ``<memory store>``."""
    if isinstance(store, LocalStore):
        return str(store.root)
    if isinstance(store, MemoryStore):
        return "<memory store>"
    if isinstance(store, FsspecStore):
        return remote.describe(store)
    return repr(store)


def on(store: Store) -> contextlib.AbstractContextManager[None]:
    """Around a request to ``store``: on object storage, a failure of the credentials or the network becomes one
    StoreError naming the store and the fix (:func:`remote.translated`); elsewhere nothing changes."""
    return remote.translated(describe(store)) if isinstance(store, FsspecStore) else contextlib.nullcontext()


def get_bytes(store: Store, key: str) -> bytes | None:
    """The raw bytes stored at ``key`` (a metadata document, ``index.parquet``), or None when there are none."""
    with on(store):
        buf = sync(store.get(key, prototype=default_buffer_prototype()))
    return None if buf is None else buf.to_bytes()


def get_file(store: Store, key: str) -> bytes | None:
    """:func:`get_bytes`, read straight from the file in a directory store: zarr's asynchronous get costs about
    a millisecond a call, which a reader opening every array of every shard it reads would pay each time."""
    if not isinstance(store, LocalStore):
        return get_bytes(store, key)
    try:
        return (Path(store.root) / key).read_bytes()
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        return None


def set_bytes(store: Store, key: str, data: bytes) -> None:
    with on(store):
        sync(store.set(key, default_buffer_prototype().buffer.from_bytes(data)))


def exists(store: Store, key: str) -> bool:
    """Whether ``key`` (e.g. a chunk, ``<array>/c/0/0``) is stored."""
    with on(store):
        return bool(sync(store.exists(key)))


def create_group_once(store: Store, key: str, attributes: dict[str, Any]) -> None:
    """Write group ``key``'s metadata document, attributes included, in one exclusive write (parents as needed).

    Where a node already exists nothing is written: of two processes creating the same group at once, exactly one
    wins and neither fails, and no reader ever sees the group without its attributes.
    """
    proto = default_buffer_prototype()
    parts = key.strip("/").split("/")
    for depth in range(1, len(parts)):
        parent = GroupMetadata().to_buffer_dict(proto)["zarr.json"]
        sync(store.set_if_not_exists("/".join(parts[:depth]) + "/zarr.json", parent))
    doc = GroupMetadata(attributes=attributes).to_buffer_dict(proto)["zarr.json"]
    sync(store.set_if_not_exists(f"{key}/zarr.json", doc))


def group_attributes(store: Store, path: str) -> dict[str, Any]:
    """The attributes of the group at ``path`` (``""`` for the root), as stored."""
    with on(store):
        return zarr.open_group(store, path=path, mode="r").attrs.asdict()


def delete_key(store: Store, key: str) -> None:
    with on(store):
        sync(store.delete(key))


def delete_prefix(store: Store, prefix: str) -> None:
    with on(store):
        sync(store.delete_dir(prefix))


def list_dir(store: Store, prefix: str) -> list[str]:
    """Names of the child nodes under ``prefix``: neither the group's own ``zarr.json`` nor the
    ``zarr.<id>.partial`` temporary a LocalStore write leaves behind when its process is killed mid-write."""

    async def collect() -> list[str]:
        return [k async for k in store.list_dir(prefix) if k != "zarr.json" and not k.endswith(".partial")]

    with on(store):
        return sync(collect())


def substore(store: Store, prefix: str) -> tuple[Store, str]:
    """(store, key prefix) for writing under ``prefix``.

    zarr writes (``set_if_not_exists``) every ancestor group's metadata on each array it creates; in a LocalStore each
    such write goes through a temporary file beside the target, which a killed writer would leave in a shared
    directory. A LocalStore rooted at ``prefix`` keeps all of a writer's files under its own directory.
    """
    if isinstance(store, LocalStore):
        return LocalStore(Path(store.root) / prefix), ""
    return store, f"{prefix}/"


def list_prefix(store: Store, prefix: str) -> list[str]:
    async def collect() -> list[str]:
        return [k async for k in store.list_prefix(prefix)]

    with on(store):
        return sync(collect())


def codecs_for(compressor: dict[str, Any], itemsize: int) -> list[Any]:
    """The bytes-to-bytes codec chain: compression (optional) then crc32c, so every chunk carries a checksum."""
    chain: list[Any] = []
    if compressor:
        name = compressor.get("name")
        if name != "blosc":
            raise SchemaError(f"storage.compressor: expected 'blosc' or nothing. Got {name!r} instead.")
        chain.append(BloscCodec(**{**compressor.get("configuration", {}), "typesize": itemsize}))
    chain.append(Crc32cCodec())
    return chain


def create_array(
    store: Store,
    key: str,
    *,
    shape: tuple[int, ...],
    chunks: tuple[int, ...],
    dtype: npt.DTypeLike,
    dims: tuple[str, ...],
    compressor: dict[str, Any] | None = None,
    attributes: dict[str, Any] | None = None,
    overwrite: bool = True,
) -> zarr.Array:
    """A new array at ``key``. ``overwrite=False`` never deletes what is there: it raises zarr's
    ``ContainsArrayError`` instead, so two processes creating the same array cannot remove each other's files."""
    dtype = np.dtype(dtype)
    # Chunks may not be zero-sized even when the array is empty.
    chunks = tuple(max(1, min(c, s)) if s else 1 for c, s in zip(chunks, shape))
    return zarr.create_array(
        store,
        name=key,
        shape=shape,
        chunks=chunks,
        dtype=dtype,
        compressors=codecs_for(compressor or {}, dtype.itemsize),
        fill_value=0,
        dimension_names=dims,
        attributes=attributes or {},
        # Write every chunk, even all-zero ones, so `verify` can tell a missing chunk from a zero one.
        config={"write_empty_chunks": True},
        overwrite=overwrite,
    )


def open_array(store: Store, key: str) -> zarr.Array:
    """The zarr array at ``key`` (read-only in a read-only store); a SchemaError naming the fix when it is missing
    or its ``zarr.json`` is unreadable."""
    try:
        with on(store):
            # zarr_format=3: a store is Zarr v3 throughout, and zarr would otherwise also look for v2's documents
            # (two more requests per array, each a round trip on object storage).
            return zarr.open_array(store, path=key, mode="r" if store.read_only else "r+", zarr_format=3)
    except (FileNotFoundError, KeyError) as e:
        raise SchemaError(
            f"{describe(store)}: expected an array at {key!r}. It is missing. "
            "Run `kava store verify` for a full report; re-extract what it names."
        ) from e
    except (ValueError, TypeError) as e:  # what zarr raises for a corrupted zarr.json: bad JSON, fields, codecs
        raise SchemaError(
            f"{describe(store)}: the metadata of array {key!r} (its zarr.json) is unreadable or corrupted: {e}. "
            "Run `kava store verify` for a full report; re-extract what it names."
        ) from e


def missing_chunk_error(where: str, key: str, coords: tuple[int, ...]) -> SchemaError:
    """The error for a chunk file that is gone: zarr would read it as zeros."""
    return SchemaError(
        f"{where}: {key}: chunk {coords} is missing; it was deleted or never written. "
        "Run `kava store verify` for a full report; re-extract what it names."
    )


def require_chunks(store: Store, key: str, arr: zarr.Array, rows: tuple[int, int], *, where: str) -> None:
    """Raise when a chunk that rows ``[a, b)`` of ``arr`` (every position of the other axes) need is missing."""
    a, b = rows
    if b <= a:
        return
    per_axis = [range(a // arr.chunks[0], (b - 1) // arr.chunks[0] + 1)]
    per_axis += [range(-(-s // c)) for s, c in zip(arr.shape[1:], arr.chunks[1:])]
    every = list(itertools.product(*per_axis))
    if isinstance(store, LocalStore):
        found = [exists(store, f"{key}/{arr.metadata.encode_chunk_key(coords)}") for coords in every]
    else:  # an object store answers after a round trip: ask for every chunk at once
        found = exists_many(store, [f"{key}/{arr.metadata.encode_chunk_key(coords)}" for coords in every])
    for coords, there in zip(every, found):
        if not there:
            raise missing_chunk_error(where, key, tuple(coords))


def exists_many(store: Store, keys: list[str]) -> list[bool]:
    """:func:`exists` for each of ``keys``, the requests in flight at once."""

    async def ask() -> list[bool]:
        return list(await asyncio.gather(*(store.exists(k) for k in keys)))

    with on(store):
        return sync(ask())


def checksum_error(where: str) -> ChecksumError:
    """The error for a chunk whose crc32c does not match its bytes, naming what was being read and the fix."""
    return ChecksumError(
        f"{where}: a chunk's crc32c does not match its bytes; the data is corrupted. "
        "Run `kava store verify` to list every bad chunk, then delete that shard and re-extract it "
        "with `--resume`."
    )


@contextmanager
def reading(where: str) -> Iterator[None]:
    """Name what was being read in a checksum failure: the fast path's ChecksumError (which names the chunk), or
    zarr's own (a ValueError that says "checksum"); and, where ``where`` is a URL, in a remote filesystem's
    failure (:func:`remote.remote_problem`)."""
    try:
        yield
    except ChecksumError as e:
        raise checksum_error(where) from e
    except Exception as e:
        if isinstance(e, ValueError) and "checksum" in str(e).lower():
            raise checksum_error(where) from e
        # On object storage: denied access, or the network gone after the retries, as one line naming the read.
        remote_read = remote.is_url(where) and not isinstance(e, KavaError)
        problem = remote.remote_problem(where, e) if remote_read else None
        if problem is None:
            raise
        raise problem from e


def fsync_tree(store: Store, prefix: str) -> None:
    """Flush a LocalStore subtree to disk, so a completion marker never outlives the data it vouches for."""
    if not isinstance(store, LocalStore):
        return
    root = Path(store.root) / prefix
    for dirpath, _, files in os.walk(root):
        for name in files:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fd = os.open(dirpath, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
