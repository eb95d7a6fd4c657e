"""Thin helpers over zarr-python 3: backends, raw keys, array creation, and error translation."""

from __future__ import annotations

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
from zarr.storage import LocalStore, MemoryStore

from kava.core.errors import ChecksumError, SchemaError


def as_zarr_store(location: str | os.PathLike | Store, *, read_only: bool) -> Store:
    """A path becomes a LocalStore; a zarr Store (e.g. ``MemoryStore()``) is used as it is."""
    if isinstance(location, Store):
        return location.with_read_only(read_only) if location.read_only != read_only else location
    return LocalStore(Path(location), read_only=read_only)


def describe(store: Store) -> str:
    """How to name a store in messages: its path, or ``<memory store>``."""
    if isinstance(store, LocalStore):
        return str(store.root)
    if isinstance(store, MemoryStore):
        return "<memory store>"
    return repr(store)


def get_bytes(store: Store, key: str) -> bytes | None:
    """The raw bytes stored at ``key`` (a metadata document, ``index.parquet``), or None when there are none."""
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
    sync(store.set(key, default_buffer_prototype().buffer.from_bytes(data)))


def exists(store: Store, key: str) -> bool:
    """Whether ``key`` (e.g. a chunk, ``<array>/c/0/0``) is stored."""
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
    return zarr.open_group(store, path=path, mode="r").attrs.asdict()


def delete_prefix(store: Store, prefix: str) -> None:
    sync(store.delete_dir(prefix))


def list_dir(store: Store, prefix: str) -> list[str]:
    """Names of the child nodes under ``prefix``: neither the group's own ``zarr.json`` nor the
    ``zarr.<id>.partial`` temporary a LocalStore write leaves behind when its process is killed mid-write."""

    async def collect() -> list[str]:
        return [k async for k in store.list_dir(prefix) if k != "zarr.json" and not k.endswith(".partial")]

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
        return zarr.open_array(store, path=key, mode="r" if store.read_only else "r+")
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
    for coords in itertools.product(*per_axis):
        if not exists(store, f"{key}/{arr.metadata.encode_chunk_key(coords)}"):
            raise missing_chunk_error(where, key, tuple(coords))


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
    zarr's own (a ValueError that says "checksum")."""
    try:
        yield
    except ChecksumError as e:
        raise checksum_error(where) from e
    except ValueError as e:
        if "checksum" in str(e).lower():
            raise checksum_error(where) from e
        raise


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
