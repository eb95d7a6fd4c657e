"""The KaVa store: teacher K/V (and Q) on the student's token grid, in chunked, checksummed Zarr.

Owns the format (``FORMAT.md``), its manifest, the writer, the reader, verification and interop with
zarr/dask/xarray/pyarrow. Knows nothing about models or tokenizers.
"""

from kava.core.errors import (
    ChecksumError,
    ConfigError,
    FormatVersionError,
    IncompleteError,
    KavaError,
    NotAStoreError,
    SampleError,
    SchemaError,
    StoreError,
)

from .create import create_store, plan_shards, sample_ids_hash
from .integrity import UnsealedStoreError
from .interop import summary, to_dask, to_xarray
from .manifest import (
    FORMAT_VERSION,
    SEGMENT_NAMES,
    DatasetSpec,
    EvictionSpec,
    LayerMap,
    LogitSpec,
    StorageSpec,
    StoreManifest,
    TeacherSpec,
    TokenizerSpec,
    proportional_layer_map,
)
from .read import PendingReads, ReadPlan, Rows, ShardSpan, StoredArray, TeacherKV, TeacherRead
from .store import KVStore, default_storage
from .verify import Problem, VerifyReport, seal_store, verify_store
from .writer import ShardSlot, ShardWriter

__all__ = [
    "FORMAT_VERSION", "SEGMENT_NAMES", "ChecksumError", "create_store", "ConfigError", "DatasetSpec",
    "EvictionSpec", "FormatVersionError", "IncompleteError", "KVStore", "KavaError", "LayerMap", "LogitSpec",
    "NotAStoreError",
    "PendingReads", "ReadPlan", "Rows", "SampleError", "SchemaError", "ShardSlot", "ShardSpan", "ShardWriter",
    "StorageSpec", "StoreError", "StoreManifest", "StoredArray", "TeacherKV", "TeacherRead", "TeacherSpec",
    "TokenizerSpec", "UnsealedStoreError", "default_storage", "plan_shards", "proportional_layer_map",
    "sample_ids_hash", "Problem", "VerifyReport", "seal_store", "verify_store", "summary", "to_dask", "to_xarray",
]
