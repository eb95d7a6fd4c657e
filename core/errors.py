"""One error family for every stage.

Messages name the thing (store, path, array, flag), what was expected, what was found, and the fix:
``"Expected X. Got Y instead. <fix>"``. Wrap lower-level exceptions with ``raise ... from e``.
"""

from __future__ import annotations

import errno
import os
import re
from typing import Any


def short_repr(value: Any, limit: int = 120) -> str:
    """``repr(value)`` cut to ``limit`` characters: a hostile or huge value must not make a huge message."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


class KavaError(Exception):
    """Base class of every error KaVa raises on purpose."""


class ConfigError(KavaError, ValueError):
    """A bad option, flag or config value; raised before any model loads or any file is written."""

    @classmethod
    def from_problems(cls, problems: list[str]) -> ConfigError:
        """One error for every problem found (configs report them all at once): the message itself for one,
        a counted list for several."""
        if len(problems) == 1:
            return cls(problems[0])
        return cls(f"Found {len(problems)} problems:\n  - " + "\n  - ".join(problems))


class ShapeError(KavaError, ValueError):
    """A tensor's (or array's) shape, rank or dtype is not what a component takes, or two inputs that must agree
    in size do not: a programming or data-layout error in the caller, not a user option. Where a flag's value
    implies the shape, the error is a ConfigError naming the flag."""


class DatasetError(KavaError):
    """A dataset can't be read: the file is malformed, or the hub dataset is not available offline."""


class StoreError(KavaError):
    """Something is wrong with a KV store on disk or in memory."""


class NotAStoreError(StoreError, FileNotFoundError):
    """The path holds no KaVa store."""


class FormatVersionError(StoreError):
    """The store was written by a newer (or unknown) format version."""


class SchemaError(StoreError, ValueError):
    """Store metadata or an array does not match the format: missing, malformed, wrong shape or dtype."""


class SampleError(StoreError, ValueError):
    """A sample handed to a writer does not fit the store (shape, dtype, order, non-finite values)."""


class ChecksumError(StoreError):
    """A chunk's stored crc32c does not match its bytes: the data is corrupted."""


class IncompleteError(StoreError):
    """A shard, teacher or store was not finished (no completion marker)."""


class BusyError(KavaError):
    """Another process is writing the same output (it holds the output's writer lock)."""


class CheckpointError(KavaError):
    """A distillation checkpoint can't be read back, or holds something other than what `kava distill` writes."""


DISK_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})
"""No space left on device, disk quota exceeded, file too large (the process's file size limit)."""


def disk_full_message(error: BaseException, then: str) -> str | None:
    """One line for an error that means the disk ran out (None for any other): what ran out, the file being
    written, and ``then``, what the user does next. An OSError, or an error that wraps one in its text as Rust
    libraries do (safetensors: ``... I/O error: No space left on device (os error 28)``)."""
    filename = None
    if isinstance(error, OSError):
        code, filename = error.errno, error.filename
    else:
        found = re.search(r"\(os error (\d+)\)", str(error))
        code = int(found.group(1)) if found else None
    if code not in DISK_FULL_ERRNOS:
        return None
    where = f" while writing {filename}" if filename else ""
    reason = "no space left on device" if code == errno.ENOSPC else os.strerror(code).lower()
    return f"{reason[:1].upper()}{reason[1:]}{where}. {then}"

