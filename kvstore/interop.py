"""The store seen through the ecosystem: dask arrays, xarray datasets, a summary for `kava store info`.

Each shard's arrays open with plain ``zarr.open_array`` / ``dask.array.from_zarr`` / ``xarray.open_zarr`` (they
carry dimension names); the functions here stitch the shards into one array on the flat token axis.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Any

import numpy as np
from zarr.storage import FsspecStore

from kava.core.errors import IncompleteError

from . import codecs, layout, remote
from .store import KVStore


def to_dask(store: KVStore, teacher: str, array: str = "k", *, decode: bool = True) -> Any:
    """One teacher's ``k``, ``v`` or ``q`` as a dask array ``[tokens, layers, heads, head_dim]``, lazily.

    Concatenates every shard along the token axis (aligned with ``grid/input_ids``). ``decode`` turns bfloat16
    bits and int8/int4/int2 codes back into float32; without it you get the stored values (int4/int2: packed codes
    ``[tokens, layers, heads, head_dim * bits / 8]`` uint8). All shards must be complete.

    A compressed teacher's ``k``/``v`` are on its slot axis instead (its kept rows, ``[slots, layers, heads,
    head_dim]``), and ``array="kept"`` gives their positions ``[slots, layers, heads]`` (see FORMAT.md).
    """
    import dask.array as da  # noqa: PLC0415 - dask/xarray take ~1.5 s and kvstore loads with `kava --help`

    spec = store.teacher(teacher)
    missing = store.missing_shards(teacher)
    if missing:
        raise IncompleteError(
            f"{store.where}: teacher {teacher!r} has {len(missing)} unfinished shards (first: {missing[:5]}). "
            "Finish the extraction with `kava extract --resume` before reading it as one array."
        )
    parts = []
    for shard in range(store.num_shards):
        key = layout.shard_array_key(teacher, shard, array)
        arr = store.array(key)
        x = da.from_zarr(arr)
        if array == layout.KEPT_ARRAY:  # positions, not values
            pass
        elif decode and codecs.is_lowbit(spec.storage.dtype):
            # Scale/zero chunks hold chunk_tokens / G groups (keys, queries) or chunk_tokens rows (values): block i
            # of the codes lines up with block i of each, so every block dequantizes on its own.
            st = spec.storage
            per_channel, group = codecs.group_of(array, st.dtype, st.group_tokens, st.group_channels)
            scale, zero = (da.from_zarr(store.array(f"{key}_{side}")) for side in ("scale", "zero"))
            dequantize = functools.partial(codecs.dequantize_np, dtype=st.dtype, per_channel=per_channel, group=group)
            x = da.map_blocks(dequantize, x, scale, zero, dtype=np.float32, chunks=(*x.chunks[:3], (spec.head_dim,)))
        elif decode and spec.storage.dtype == "int8":
            scale = da.from_zarr(store.array(f"{key}_scale"))
            x = x.astype(np.float32) * scale.astype(np.float32)[..., None]
        elif decode and spec.storage.dtype == "bfloat16":
            x = x.map_blocks(codecs.bf16_bits_to_float, dtype=np.float32)
        parts.append(x)
    return da.concatenate(parts, axis=0)


def to_xarray(store: KVStore, teacher: str) -> Any:
    """A teacher as an ``xarray.Dataset`` (dask-backed) with the grid's input and segment ids as coordinates."""
    import dask.array as da  # noqa: PLC0415 - dask/xarray take ~1.5 s and kvstore loads with `kava --help`
    import xarray as xr  # noqa: PLC0415 - dask/xarray take ~1.5 s and kvstore loads with `kava --help`

    spec = store.teacher(teacher)
    rows = "token" if spec.eviction is None else "slot"  # a compressed teacher's K/V hold its kept rows
    data: dict[str, tuple[tuple[str, ...], Any]] = {
        "k": ((rows, "layer", "kv_head", "head_dim"), to_dask(store, teacher, "k")),
        "v": ((rows, "layer", "kv_head", "head_dim"), to_dask(store, teacher, "v")),
    }
    if spec.eviction is not None:
        data["kept"] = (("slot", "layer", "kv_head"), to_dask(store, teacher, layout.KEPT_ARRAY))
    if spec.has_q:
        data["q"] = (("token", "q_layer", "q_head", "head_dim"), to_dask(store, teacher, "q"))
    weights = da.concatenate(
        [da.from_zarr(store.array(layout.shard_array_key(teacher, s, "align_weight"))) for s in range(store.num_shards)]
    )
    data["align_weight"] = (("token",), weights)
    coords = {
        "layer": list(spec.layers),
        "input_id": (("token",), da.from_zarr(store.array(layout.grid_key("input_ids")))),
        "segment_id": (("token",), da.from_zarr(store.array(layout.grid_key("segment_ids")))),
    }
    if spec.has_q:
        coords["q_layer"] = list(spec.q_layers)
    if spec.eviction is not None:  # each slot's sample: the kept positions are counted from its first token
        offsets = store.slot_offsets(teacher)
        assert offsets is not None
        coords["slot_sample"] = (("slot",), np.repeat(np.arange(store.num_samples), np.diff(offsets)))
    return xr.Dataset(data, coords=coords, attrs={"teacher": teacher, "k_rope": spec.k_rope,
                                                  **({"eviction": str(spec.eviction.to_dict())}
                                                     if spec.eviction is not None else {})})


def _disk_bytes(store: KVStore, prefix: str) -> int | None:
    """Bytes stored under ``prefix``: files on disk, or objects in the bucket for a store on object storage."""
    if isinstance(store.zarr_store, FsspecStore):
        return remote.stored_bytes(store.zarr_store, prefix)
    root = getattr(store.zarr_store, "root", None)
    if root is None:
        return None
    total = 0
    for dirpath, _, files in os.walk(Path(root) / prefix):
        total += sum(os.path.getsize(os.path.join(dirpath, f)) for f in files)
    return total


def _quantization_cosine(markers: list[dict[str, Any]]) -> dict[str, list[float]] | None:
    """Per array (k, v, q), per stored layer: the mean cosine of the decoded rows to the teacher's own, as the
    writer measured it (int8, int4, int2; None for the lossless dtypes). Non-zero (token, head) rows count."""
    total: dict[str, list[np.ndarray]] = {}
    for mk in markers:
        for name, q in mk.get("quantization", {}).items():
            acc = total.setdefault(name, [np.zeros(len(q["rows"])), np.zeros(len(q["rows"]))])
            acc[0] += q["cos_sum"]
            acc[1] += q["rows"]
    if not total:
        return None
    return {name: [round(float(c / n), 5) if n else 1.0 for c, n in zip(cos, rows)]
            for name, (cos, rows) in total.items()}


def _eviction(store: KVStore, name: str, markers: list[dict[str, Any]], tokens: int) -> dict[str, Any] | None:
    """A compressed teacher's rule, the share of its complete shards' rows it kept, and the fidelity the writer
    measured: per stored layer, the mean relative error of the answer's attention output reading only the kept
    rows."""
    spec = store.teacher(name)
    if spec.eviction is None:
        return None
    slots = sum(mk.get("slots", 0) for mk in markers)
    err = np.zeros(len(spec.layers))
    samples = 0
    for mk in markers:
        ev = mk.get("eviction", {})
        err += np.asarray(ev.get("err_sum", np.zeros(len(spec.layers))), dtype=np.float64)
        samples += ev.get("samples", 0)
    return {**spec.eviction.to_dict(), "kept_fraction": slots / tokens if tokens else None,
            "fidelity_error": [round(float(e / samples), 5) for e in err] if samples else None}


def summary(store: KVStore) -> dict[str, Any]:
    """What `kava store info --json` prints."""
    m = store.manifest
    status = np.bincount(store.sample_status, minlength=len(layout.SAMPLE_STATUS))
    teachers = {}
    for name, spec in store.teachers.items():
        markers = list(store.shard_markers(name).values())
        tokens = sum(mk["tokens"][1] - mk["tokens"][0] for mk in markers)
        teachers[name] = {
            "model": next((spec.model[k] for k in ("model_id", "id", "path") if spec.model.get(k)), None),
            "quantization": spec.model.get("quantization", "none"),
            "layers": list(spec.layers),
            "num_layers": spec.num_layers,
            "kv_heads": spec.kv_heads,
            "num_heads": spec.num_heads,
            "head_dim": spec.head_dim,
            "k_rope": spec.k_rope,
            "attention": spec.attention,
            "positions": spec.positions,
            "part_of": spec.part_of,
            "has_q": spec.has_q,
            "q_layers": list(spec.q_layers),
            "dtype": spec.storage.dtype,
            "compressor": spec.storage.compressor.get("configuration", {}).get("cname", "none")
            if spec.storage.compressor else "none",
            "layer_map": spec.layer_map.method,
            "alignment": spec.alignment.get("method"),
            "shards_complete": len(markers),
            "quarantined": sum(len(mk.get("quarantined", [])) for mk in markers),
            "bytes_logical": int(sum(mk.get("bytes_logical", 0) for mk in markers)),
            "bytes_on_disk": _disk_bytes(store, layout.teacher_key(name)),
            # The same K/V/Q as float16, for the ratio of a quantised store.
            "bytes_float16": tokens * 2 * spec.head_dim * (2 * len(spec.layers) * spec.kv_heads
                                                           + len(spec.q_layers) * spec.num_heads),
            "quantization_cosine": _quantization_cosine(markers),
            # Logical bytes per student token of the complete shards: K/V, Q and the top-k logits together (for a
            # compressed teacher, per original token: its kept rows' bytes over every token of the grid).
            "bytes_per_token": sum(mk.get("bytes_logical", 0) for mk in markers) / tokens if tokens else None,
            "eviction": _eviction(store, name, markers, tokens),
            "logits": None if spec.logits is None else {
                **spec.logits.to_dict(), "bytes_per_token": spec.logits.top_k * (4 + 2)},  # int32 id + fp16 logp
        }
    return {
        "path": store.where,
        "format_version": m.format_version,
        "samples": m.num_samples,
        "tokens": m.num_tokens,
        "shards": m.num_shards,
        "samples_by_status": {s: int(c) for s, c in zip(layout.SAMPLE_STATUS, status)},
        "student_tokenizer": {"name": m.student_tokenizer.name, "fingerprint": m.student_tokenizer.fingerprint,
                              "vocab_size": m.student_tokenizer.vocab_size},
        "dataset": {"name": m.dataset.name, "split": m.dataset.split,
                    "sample_ids_hash": m.dataset.sample_ids_hash},
        "created_by": m.created_by,
        "created_at": m.created_at,
        "teachers": teachers,
        "bytes_on_disk": _disk_bytes(store, ""),
    }
