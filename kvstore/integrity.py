"""Checks of what a store holds beyond its arrays' checksums: its sample ids, and the messages for metadata that no
longer matches its digest (or, in a format-1 store, carries none: refused until sealed). Shared by the store's
reader, creation and ``kava store verify``."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc

from kava.core.errors import ChecksumError, SchemaError

from . import layout

MAX_SAMPLE_ID = 1000
"""The longest sample id (characters) a store may hold; ids are names in messages, never paths."""


def sample_ids_problem(ids: pa.ChunkedArray | pa.Array) -> str | None:
    """What is wrong with a store's sample ids (null, empty, control characters, too long, repeated), or None.

    Ids such as ``gsm8k/test/000042`` hold ``/``: no code makes a path of them, so only what would garble a
    message or a lookup is refused."""
    if ids.null_count:
        return f"expected a string per sample. Got {ids.null_count} null(s) instead"
    if len(ids) == 0:
        return None
    lengths = pc.utf8_length(ids)
    printable = pc.utf8_is_printable(ids)
    if not pc.all(printable).as_py():
        first = ids[pc.index(printable, False).as_py()].as_py()
        return f"expected printable ids (no NUL, newline or other control character). Got {first[:80]!r} instead"
    if pc.min(lengths).as_py() == 0 or pc.max(lengths).as_py() > MAX_SAMPLE_ID:
        return (f"expected ids of 1 to {MAX_SAMPLE_ID} characters. Got lengths "
                f"{pc.min(lengths).as_py()}-{pc.max(lengths).as_py()} instead")
    if pc.count_distinct(ids).as_py() != len(ids):
        return f"expected distinct ids. Got {len(ids) - pc.count_distinct(ids).as_py()} repeated instead"
    return None


class UnsealedStoreError(SchemaError):
    """A store of format version 1, written before metadata carried a digest: edits to it can't be detected, so it
    is refused until ``kava store seal`` has checked every chunk and value and sealed it."""


def unsealed_note(where: str) -> str:
    return (f"{where}: format version 1 store; its manifest (zarr.json) and teacher specs carry no digest, so an "
            "edit to them can't be detected. Check and seal it with `kava store seal` (a full verify, then digests), "
            "or re-extract it with this kava")


def digest_error(where: str, document: str, problem: str, fix: str) -> ChecksumError:
    """The error for metadata that no longer matches its digest, naming the document, what changed and the fix."""
    return ChecksumError(
        f"{where}: {document} does not match its digest ({problem}): it was edited after it was written, so it may "
        f"no longer describe the arrays. {fix}"
    )


MANIFEST_DOC = "the manifest (zarr.json, attributes.kava)"
MANIFEST_FIX = ("Restore the original zarr.json, or extract again into a new --store path; "
                "`kava store verify` lists every problem.")


def teacher_doc(name: str) -> str:
    return f"teacher {name!r}'s spec (teachers/{name}/zarr.json, attributes.{layout.TEACHER_ATTR})"


def teacher_fix(name: str) -> str:
    return (f"Restore the original teachers/{name}/zarr.json, or delete teachers/{name} and extract that teacher "
            "again; `kava store verify` lists every problem.")
