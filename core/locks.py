"""One writer per output: an advisory lock file for the folder a command writes.

``kava distill --out D`` holds ``D/.kava.lock`` for the whole run, and ``kava extract`` the store's, which sits
beside the store (``.kv.zarr.lock`` for ``kv.zarr``: a store's folder holds only what its format names, and zarr
warns about anything else), for the whole extraction. The lock is ``fcntl.flock`` on that file, so the kernel drops
it when its process ends in any way (a SIGKILL too): a lock file left behind by a killed run never blocks
``--resume``. The file records the holder's host and pid, for the message a second writer gets.

Shard jobs of one extraction (``--shard i/n``) write one store at once on purpose: each holds the store's lock
shared and its own slice's exclusively, so two jobs of one slice, or a job and an unsharded extraction, are refused;
and its split's (:func:`split_lock`) shared, so that jobs of two splits (``0/2`` and ``0/3`` both write shard 0) are
refused too.

A store on object storage (an ``s3://`` URL) has no file to lock and is not locked: nothing would release a lock
object its holder left when killed. The rule there, one extraction per teacher at a time, and what still holds
without the lock are in docs/scale-out.md ("Object storage").
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

from .errors import BusyError

LOCK_NAME = ".kava.lock"


def beside(output: Path, suffix: str = "") -> Path:
    """The lock file beside ``output`` (a store): ``.<name>.lock<suffix>`` in its parent folder."""
    output = Path(output)
    return output.parent / f".{output.name}.lock{suffix}"


@contextlib.contextmanager
def writer_lock(path: Path, *, output: Path, fix: str, shared: bool = False) -> Iterator[Path]:
    """Hold the lock file ``path`` of ``output`` for the block: exclusively, or ``shared`` with other shared holders.

    Raises :class:`BusyError` at once (no waiting) when another process holds it, naming ``output``, that
    process's host and pid, and what to do (``fix``, e.g. "choose another --out").
    """
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)  # not inherited by child processes (close-on-exec)
    try:
        try:
            fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
        except BlockingIOError:
            raise BusyError(f"{output} is being written by {_holder(fd, path)}. Wait for it to finish, or "
                            f"{fix}.") from None
        if not shared:  # shared holders leave the file alone: several write it at once
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps({"host": socket.gethostname(), "pid": os.getpid(),
                                      "since": time.strftime("%Y-%m-%d %H:%M:%S")}).encode(), 0)
        yield path
    finally:
        os.close(fd)  # releases the lock; the file stays (removing it would race with a process opening it)


@contextlib.contextmanager
def split_lock(output: Path, n: int) -> Iterator[Path]:
    """Hold the lock of split ``n`` of ``output`` (shard jobs ``--shard i/n``) shared for the block, refusing at once
    while jobs of another split hold theirs: slices of different splits overlap (``0/2`` and ``0/3`` both write
    shard 0). Each job takes its own split's lock before it looks at the others', so of two jobs of different
    splits that start together at least one sees the other."""
    own = beside(output, f".split-{n}")
    with writer_lock(own, output=output, shared=True, fix="give this job the split the others use") as held:
        for other in sorted(own.parent.glob(f"{beside(output).name}.split-*")):
            if other == own:
                continue
            fd = os.open(other, os.O_RDWR)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                m = other.name.rpartition("-")[2]
                raise BusyError(f"{output} is being written by shard jobs of another split (--shard i/{m}). Give "
                                f"this job that split (--shard i/{m}), or wait for them to finish.") from None
            finally:
                os.close(fd)
        yield held


def _holder(fd: int, path: Path) -> str:
    """Who holds ``path``: the host and pid it records, or the shard jobs holding it shared."""
    try:  # only shared holders when a shared lock is granted: shard jobs, which record nothing here
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        fcntl.flock(fd, fcntl.LOCK_UN)
        return "shard jobs (--shard i/n) of an extraction"
    except BlockingIOError:
        pass
    try:
        info = json.loads(path.read_text() or "{}")
        return f"process {int(info['pid'])} on host {str(info['host'])[:100]} (since {str(info['since'])[:40]})"
    except (OSError, ValueError, KeyError, TypeError):
        return "another process"
