"""Where everything lives inside a store: the one place that spells its keys (see FORMAT.md)."""

from __future__ import annotations

import pyarrow as pa

MANIFEST_ATTR = "kava"
"""Root group attribute holding the StoreManifest."""
TEACHER_ATTR = "kava_teacher"
"""``teachers/<name>`` group attribute holding the TeacherSpec."""
SHARD_ATTR = "kava_shard"
"""``teachers/<name>/shards/<i>`` group attribute: the completion marker, written last."""
DTYPE_ATTR = "kava_dtype"
"""Array attribute naming the logical dtype when it differs from zarr's (``bfloat16`` stored as uint16)."""

INDEX_FILE = "index.parquet"
"""The per-sample index as a Parquet table, for pandas users (not a zarr node)."""
INDEX_SCHEMA = pa.schema([
    ("sample_index", pa.int64()), ("sample_id", pa.string()), ("shard", pa.int64()), ("token_offset", pa.int64()),
    ("num_tokens", pa.int64()), ("status", pa.string()), ("reason", pa.string()),
])
"""Columns of ``index.parquet``. Page checksums do not cover the footer, so the schema is checked too."""
GRID = "grid"
GRID_ARRAYS = ("offsets", "input_ids", "segment_ids", "sample_status", "shard_starts")
TOKENIZER = "student_tokenizer"
"""Group of the student tokenizer's files, each a 1-D uint8 array named after the file."""

SAMPLE_STATUS = ("ok", "truncated", "skipped")
"""Grid-level sample status codes (``grid/sample_status``)."""
TEACHER_STATUS = ("ok", "quarantined")
"""Teacher-level sample status codes (``teachers/<name>/shards/<i>/sample_status``)."""

LOGIT_ARRAYS = ("logit_ids", "logit_logp")
"""A teacher shard's optional top-k arrays: int32 ids and float16 log-probabilities, both ``[T_s, top_k]``."""
LOGIT_NO_TARGET = -1
"""``logit_ids`` of a student token with no teacher target (every entry of its row)."""

KEPT_ARRAY = "kept"
"""A compressed teacher's shard array: int32 ``[K_s, L, H]``, the token position each K/V slot holds."""

SHARD_DIGITS = 6


def grid_key(name: str) -> str:
    return f"{GRID}/{name}"


def teacher_key(teacher: str) -> str:
    return f"teachers/{teacher}"


def shard_key(teacher: str, shard: int) -> str:
    return f"teachers/{teacher}/shards/{shard:0{SHARD_DIGITS}d}"


def shard_array_key(teacher: str, shard: int, array: str) -> str:
    return f"{shard_key(teacher, shard)}/{array}"


def cka_key(teacher: str, name: str) -> str:
    return f"teachers/{teacher}/cka/{name}"


def tokenizer_file_key(filename: str) -> str:
    return f"{TOKENIZER}/{filename}"
