"""Stores on object storage: an fsspec URL (``s3://bucket/kv.zarr``, ``gs://...``, ``memory://...``) opened as a
zarr ``FsspecStore``, with one-line errors for what goes wrong there, and ``kava store cp`` between any two places.

Credentials and endpoints come only from the provider's standard environment and config files (for S3:
``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``, ``AWS_PROFILE``, ``AWS_ENDPOINT_URL``, ``~/.aws/``), never from the
URL: a URL is written into manifests, configs and logs, so one that carries a user or password is refused.

Object stores have no file locks, so a store there is not locked: see docs/scale-out.md ("Object storage") for the
rule and what still holds (whole-object writes, completion markers written last).
"""

from __future__ import annotations

import asyncio
import os
import re
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any, TypeVar
from urllib.parse import unquote, urlsplit

import crc32c
import fsspec
from zarr.abc.store import Store
from zarr.core.buffer import default_buffer_prototype
from zarr.core.sync import sync
from zarr.storage import FsspecStore

from kava.core.errors import ChecksumError, ConfigError, NotAStoreError, StoreError
from kava.core.log import log_stderr

T = TypeVar("T")
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]+)://")
BUCKET_PROTOCOLS = frozenset({"s3", "s3a", "gs", "gcs", "az", "abfs", "abfss", "r2"})
"""Protocols whose first path component is a bucket (or container), checked on its own when a store is missing."""
S3_PROTOCOLS = frozenset({"s3", "s3a"})

CONNECT_TIMEOUT_S = 10
"""Seconds to wait for a connection to an S3 endpoint, per attempt."""
READ_TIMEOUT_S = 120
"""Seconds to wait for a response once connected, per attempt."""
MAX_ATTEMPTS = 5
"""Attempts per S3 request (botocore's "standard" retry mode: exponential backoff with jitter, up to 20 s a wait)
unless the environment sets ``AWS_MAX_ATTEMPTS``. A refused connection gives up after 1 + 2 + 4 + 8 s of waits
at most (half that on average); a request that times out waits ``CONNECT_TIMEOUT_S`` or ``READ_TIMEOUT_S`` more
per attempt."""
S3FS_ATTEMPTS = 2
"""Attempts s3fs makes itself around botocore's (default 5): it retries what botocore can't see, such as a response
body cut short. Each of its attempts runs botocore's retries again, so the attempts per request multiply: 2 x 5."""
READ_AHEAD = 2
"""Shards :meth:`KVStore.iter_shards` reads ahead on object storage, each on its own thread. With 20 ms a request,
2 fed 1.6x as fast as 1 and 4 1.9x (docs/scale-out.md), but every shard ahead is held decoded in memory (a
32768-token shard of a 7B teacher's K/V is ~2 GB in fp16): raise it with ``prefetch=`` where memory allows."""
COPY_CONCURRENCY = 16
"""Objects in flight at once in :func:`copy_store`: object stores answer each request after a round trip, so a
copy one object at a time waits on latency, not bandwidth."""
VERIFY_CONCURRENCY = 16
"""Shards `kava store verify` checks at once on object storage, each on its own thread (a shard's check is a chain
of round trips: marker, array metadata, chunk existence, chunks)."""

RESUME_FIX = "run the same command again with --resume (the shards completed before are kept)"
"""What to do once the network is back, after an extraction's write failed."""
CREDENTIALS_FIX = ("Check the credentials in the environment (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, "
                   "AWS_PROFILE) or ~/.aws/credentials, and that they may read and write this bucket")


def is_url(location: object) -> bool:
    """Whether ``location`` is a URL an fsspec filesystem opens (``s3://``, ``memory://``...), not a local path.
    ``file://`` URLs and Windows drive letters are local."""
    if not isinstance(location, str):
        return False
    match = _SCHEME.match(location)
    return match is not None and match.group(1).lower() != "file"


def redact(url: str) -> str:
    """``url`` without a user or password, for messages."""
    parts = urlsplit(url)
    if "@" not in parts.netloc:
        return url
    return parts._replace(netloc="***@" + parts.netloc.rpartition("@")[2]).geturl()


def check_url(url: str) -> None:
    """A ConfigError for a URL that carries credentials, a query or a fragment (none of which a store URL may
    hold), or whose protocol no installed fsspec filesystem handles."""
    parts = urlsplit(url)
    if "@" in parts.netloc:
        raise ConfigError(
            f"{redact(url)}: credentials in a store URL are refused (the URL is written into manifests, configs and "
            "logs). Give them through the environment (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_PROFILE) or "
            "the provider's config files, and write the URL without them."
        )
    if parts.query or parts.fragment:
        raise ConfigError(f"{redact(url)}: expected a store URL without '?' or '#' options. Set options through the "
                          "provider's environment variables or config files.")
    protocol = parts.scheme.lower()
    try:
        fsspec.get_filesystem_class(protocol)
    except (ImportError, ValueError) as e:
        extra = " Install it with `pip install 'kava[s3]'` (s3fs)." if protocol in S3_PROTOCOLS else ""
        raise ConfigError(f"{redact(url)}: no filesystem for {protocol}:// URLs is installed: {e}.{extra}") from None


def storage_options(protocol: str) -> dict[str, Any]:
    """fsspec options for ``protocol``: for S3, bounded timeouts and retries with backoff (the environment's
    ``AWS_MAX_ATTEMPTS``/``AWS_RETRY_MODE`` take precedence), and no listing cache (other writers add shards)."""
    if protocol not in S3_PROTOCOLS:
        return {}
    config: dict[str, Any] = {"connect_timeout": CONNECT_TIMEOUT_S, "read_timeout": READ_TIMEOUT_S}
    if "AWS_MAX_ATTEMPTS" not in os.environ and "AWS_RETRY_MODE" not in os.environ:
        config["retries"] = {"max_attempts": MAX_ATTEMPTS, "mode": "standard"}
    # max_concurrency 1: s3fs would otherwise ask each object's size (a HEAD, one more round trip) before every
    # whole-object read, to split objects larger than its block size (chunks are far smaller) into ranges.
    return {"config_kwargs": config, "use_listings_cache": False, "max_concurrency": 1}


def open_url(url: str, *, read_only: bool) -> FsspecStore:
    """``url`` as a zarr store (checked by :func:`check_url`); nothing is read yet (see :func:`probe`)."""
    check_url(url)
    protocol = urlsplit(url).scheme.lower()
    store = FsspecStore.from_url(url.rstrip("/"), storage_options=storage_options(protocol), read_only=read_only)
    if protocol in S3_PROTOCOLS:
        # Not an s3fs constructor option: set on the (cached, shared) filesystem, which only these options make.
        store.fs.retries = S3FS_ATTEMPTS
    return store


def describe(store: FsspecStore) -> str:
    """The store's URL as messages name it (``s3://bucket/kv.zarr``); it never holds credentials."""
    protocol = store.fs.protocol if isinstance(store.fs.protocol, str) else store.fs.protocol[0]
    return f"{protocol}://{store.path.lstrip('/')}"


def probe(store: FsspecStore, *, must_exist: bool) -> bool:
    """Whether the store's root ``zarr.json`` exists, asked with one request, so that what is wrong with the
    bucket, the credentials or the network is one error here rather than a traceback later.

    Raises NotAStoreError when the bucket does not exist (or, with ``must_exist``, nothing is at the URL), and
    StoreError for denied access or an endpoint still unreachable after the retries.
    """
    where = describe(store)
    fs = store.fs
    with translated(where):
        try:
            sync(fs._info(f"{store.path}/zarr.json"))
            return True
        except FileNotFoundError:
            pass
        bucket = store.path.lstrip("/").split("/", 1)[0]
        if _protocols(fs) & BUCKET_PROTOCOLS:
            if not sync(fs._exists(bucket)):
                raise NotAStoreError(
                    f"{where}: bucket {bucket!r} does not exist, or these credentials can't see it. Check the "
                    "URL, create the bucket, or check AWS_ENDPOINT_URL and the credentials."
                )
    if must_exist:
        raise NotAStoreError(f"{where}: no store here (no zarr.json). Check the URL, or create one with "
                             "`kava extract --store URL`.")
    return False


def stored_bytes(store: FsspecStore, prefix: str = "") -> int:
    """Bytes of every object under ``prefix`` (the whole store when empty), from one listing with sizes (paged by
    the filesystem), not one request per object."""
    root = store.path.rstrip("/")
    path = f"{root}/{prefix.strip('/')}".rstrip("/")
    with translated(describe(store)):
        found = sync(store.fs._find(path, detail=True))
    return sum(int(info.get("size") or 0) for name, info in found.items()
               if info.get("type") != "directory" and name.startswith(f"{path}/"))


_NOTED: set[str] = set()
_NOTES = [True]  # a list, not a global statement: False in a dask worker, whose driver gave the note


def note_unlocked(where: str) -> None:
    """Say once per process that a store on object storage is written without a writer lock."""
    if where in _NOTED or not _NOTES[0]:
        return
    _NOTED.add(where)
    log_stderr(f"note: {where} is on object storage, which has no file locks: run one writer per teacher on it "
               "(shard jobs --shard i/n write disjoint shards and may run together). See docs/scale-out.md.")


def silence_notes() -> None:
    """No :func:`note_unlocked` lines from this process (a dask worker: the driver says it once for all)."""
    _NOTES[0] = False


def _protocols(fs: Any) -> set[str]:
    names = fs.protocol if isinstance(fs.protocol, tuple | list) else (fs.protocol,)
    return {str(n) for n in names}


class RemoteStoreError(StoreError):
    """A request to object storage failed for good: denied access, no credentials, or the network still gone
    after the retries. Raised where it happened: a dask worker names itself in front of it."""


@contextmanager
def translated(where: str, *, then: str | None = None) -> Iterator[None]:
    """Turn what a remote filesystem raises into one-line KaVa errors naming ``where``, the object and the fix:
    denied access (bad or missing credentials) and a network failure after the retries. Other errors pass through.
    ``then`` replaces the network failure's last sentence (what to run once the network is back)."""
    try:
        yield
    except (StoreError, ConfigError):
        raise
    except Exception as e:
        problem = remote_problem(where, e, then=then)
        if problem is None:
            raise
        raise problem from e


def writing(location: object, *, then: str | None = None) -> AbstractContextManager[None]:
    """:func:`translated` around the writes of a store at ``location`` when it is a URL; nothing for a path."""
    return translated(redact(location), then=then) if isinstance(location, str) and is_url(location) \
        else nullcontext()


def remote_problem(where: str, error: BaseException, *, then: str | None = None) -> StoreError | None:
    """The StoreError that explains ``error`` (raised by a remote filesystem), or None when it is something else.
    ``where`` starts with the store's URL; for S3 the fix names the AWS settings."""
    chain = _causes(error)
    url = where.split(" ", 1)[0].rstrip(":")  # "s3://bucket/kv.zarr: what was read" names the store first
    s3 = urlsplit(url).scheme.lower() in S3_PROTOCOLS
    credentials = CREDENTIALS_FIX if s3 else "Check the filesystem's credentials and that they may use this store"
    obj = _object_named(url, chain)
    at = f" for {obj}" if obj else ""
    if any(isinstance(e, PermissionError) for e in chain):
        return RemoteStoreError(f"{where}: access denied{at} ({_first_line(error)}). {credentials}.")
    names = {type(e).__name__ for e in chain}
    if (any(isinstance(e, ConnectionError | TimeoutError) for e in chain)
            or any(n.endswith(_NETWORK_ERRORS) for n in names)):
        endpoint = os.environ.get("AWS_ENDPOINT_URL", "the S3 endpoint") if s3 else "the store"
        settings = "the network and AWS_ENDPOINT_URL" if s3 else "the network"
        retried = ", after retries with backoff" if s3 else ""
        fix = then or "run the command again (an extraction with --resume)"
        return RemoteStoreError(
            f"{where}: can't reach {endpoint}{at}{retried} ({_first_line(error)}). Check {settings}, then {fix}."
        )
    if names & {"NoCredentialsError", "PartialCredentialsError"}:
        return RemoteStoreError(f"{where}: no credentials found ({_first_line(error)}). {credentials}.")
    return None


def _object_named(url: str, chain: list[BaseException]) -> str | None:
    """The key, inside the store at ``url``, of the request that failed, when an error of ``chain`` names its
    address (botocore's network errors carry ``endpoint_url``, path-style or virtual-host-style)."""
    parts = urlsplit(url)
    root = f"{parts.netloc}{parts.path}".strip("/")  # bucket/prefix/kv.zarr
    below_bucket = root.partition("/")[2]
    for e in chain:
        kwargs = getattr(e, "kwargs", None)
        address = kwargs.get("endpoint_url") if isinstance(kwargs, dict) else None
        if not isinstance(address, str):
            continue
        path = unquote(urlsplit(address).path).strip("/")
        for prefix in (root, below_bucket):
            if prefix and path.startswith(f"{prefix}/"):
                return path[len(prefix) + 1 :]
        if path in (root, below_bucket):
            return "the store's root"
    return None


_NETWORK_ERRORS = ("ConnectError", "ConnectionError", "ConnectTimeoutError", "ReadTimeoutError", "ConnectTimeout",
                   "ReadTimeout", "ServerTimeoutError", "ConnectionClosedError", "OfflineModeIsEnabled")
"""Ends of the names of what botocore, aiohttp, httpx and huggingface_hub raise when the network fails."""


def _causes(error: BaseException) -> list[BaseException]:
    out: list[BaseException] = []
    e: BaseException | None = error
    while e is not None and e not in out and len(out) < 16:
        out.append(e)
        e = e.__cause__ or e.__context__
    return out


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return (text[0] if text else type(error).__name__)[:200]


def read_ahead(read: Callable[[int], T], order: Sequence[int], ahead: int) -> Iterator[T]:
    """``read(i)`` for each ``i`` of ``order``, in order, with up to ``ahead`` reads beyond the current one running
    at once, each on its own thread (``read`` must be safe to call from several threads); 0 reads each only when
    asked."""
    if ahead <= 0:
        for i in order:
            yield read(i)
        return
    with ThreadPoolExecutor(max_workers=ahead, thread_name_prefix="kava-read-ahead") as pool:
        pending = [pool.submit(read, i) for i in order[: ahead + 1]]
        try:
            for n in range(len(order)):
                item = pending.pop(0).result()
                if n + ahead + 1 < len(order):
                    pending.append(pool.submit(read, order[n + ahead + 1]))
                yield item
        finally:
            for future in pending:  # the caller stopped early or a read failed: start nothing more
                future.cancel()


# ---------------------------------------------------------------------------------------------------------------
# kava store cp


@dataclass
class CopyReport:
    source: str
    destination: str
    objects_copied: int = 0
    objects_kept: int = 0
    """Objects already at the destination from an interrupted copy, with the source's size (checked by the
    destination's verify at the end like every other)."""
    bytes_copied: int = 0
    chunks_checked: int = 0


def chunk_crc_ok(data: bytes) -> bool:
    """Whether an encoded chunk's last 4 bytes are the crc32c (little-endian) of the rest: every chunk a KaVa
    store holds ends with zarr's crc32c codec."""
    return len(data) >= 4 and crc32c.crc32c(data[:-4]) == int.from_bytes(data[-4:], "little")


def is_chunk_key(key: str) -> bool:
    """Whether ``key`` is an array's chunk (``.../c/0/1``), not a metadata document or ``index.parquet``."""
    return "/c/" in f"/{key}" and not key.endswith("zarr.json")


async def _sizes(store: Store) -> dict[str, int]:
    """Every key of ``store`` with its size in bytes; a LocalStore's ``.partial`` temporaries are left out."""
    keys = [k async for k in store.list() if not k.endswith(".partial")]
    sizes = await asyncio.gather(*(store.getsize(k) for k in keys))
    return dict(zip(keys, sizes))


def copy_plan(source: Store, dest: Store, *, where: str) -> tuple[list[str], int]:
    """(keys to copy, in order; how many are there already): every key of ``source`` but the objects an
    interrupted copy left at ``dest`` with the source's size (one of another size, torn or stale, is copied again).
    Chunks come first, then metadata, then the root ``zarr.json`` (which holds the manifest), so an interrupted
    copy is never an openable store.

    A StoreError when ``dest`` holds a store already, or objects the source does not have.
    """
    src_sizes = sync(_sizes(source))
    dst_sizes = sync(_sizes(dest))
    if "zarr.json" in dst_sizes:
        raise StoreError(f"{where}: a store (or another zarr hierarchy) is already here. Choose another "
                         "destination, or delete it first.")
    foreign = sorted(k for k in dst_sizes if k not in src_sizes)
    if foreign:
        raise StoreError(f"{where}: holds {len(foreign)} object(s) that are not the source's (e.g. "
                         f"{foreign[0]!r}), so it is not an interrupted copy of it. Choose an empty destination.")
    order = sorted((k for k, size in src_sizes.items() if dst_sizes.get(k) != size),
                   key=lambda k: (k == "zarr.json", k.endswith("zarr.json"), k))
    return order, len(src_sizes) - len(order)


def copy_objects(source: Store, dest: Store, keys: list[str], report: CopyReport, *,
                 concurrency: int = COPY_CONCURRENCY, progress: Callable[[int], None] | None = None) -> None:
    """Copy ``keys`` from ``source`` to ``dest``, ``concurrency`` objects at a time, checking each chunk's
    crc32c on the way (a corrupted source chunk is never copied: ChecksumError). The root ``zarr.json``, if among
    ``keys``, is written last, after every other object is in place."""
    proto = default_buffer_prototype()
    gate = asyncio.Semaphore(max(1, concurrency))

    async def one(key: str) -> None:
        async with gate:
            buf = await source.get(key, prototype=proto)
            if buf is None:
                raise StoreError(f"{report.source}: {key} vanished while it was being copied. Is another process "
                                 "writing the source? Copy it when it is finished.")
            data = buf.to_bytes()
            if is_chunk_key(key):
                if not chunk_crc_ok(data):
                    raise ChecksumError(f"{report.source}: {key}: the chunk's crc32c does not match its bytes; the "
                                        "source is corrupted. Run `kava store verify` on it; nothing corrupted was "
                                        "copied.")
                report.chunks_checked += 1
            await dest.set(key, proto.buffer.from_bytes(data))
            report.objects_copied += 1
            report.bytes_copied += len(data)
            if progress is not None:
                progress(len(data))

    async def run() -> None:
        body = [k for k in keys if k != "zarr.json"]
        await _all_or_nothing([one(k) for k in body])
        if len(body) != len(keys):
            await one("zarr.json")

    sync(run())


async def _all_or_nothing(jobs: list[Any]) -> None:
    """Run ``jobs`` (coroutines) at once; on the first failure cancel the rest, wait for them, and raise it."""
    tasks = [asyncio.ensure_future(job) for job in jobs]
    if not tasks:
        return
    _, pending = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
    for task in pending:
        task.cancel()
    await asyncio.gather(*pending, return_exceptions=True)
    for task in tasks:
        if task.done() and not task.cancelled() and task.exception() is not None:
            raise task.exception()  # type: ignore[misc]
