"""Writing one teacher's shard: whole, in order, by one writer, made visible by a marker written last.

Rows are buffered one chunk-row block at a time (``chunk_tokens`` rows × all stored layers) and written with
chunk-aligned slices, so zarr never reads back and rewrites a chunk. Each sample is checked before any of its
bytes are buffered: shape, dtype, finiteness and fp16 range. Nothing is visible to readers until :meth:`close`
has flushed every chunk to disk and then written the shard group's ``kava_shard`` attribute.
"""

from __future__ import annotations

import datetime as _dt
import os
import socket
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import zarr
from zarr.abc.store import Store

from kava.core.errors import IncompleteError, SampleError, StoreError

from . import codecs, eviction, layout, zarr_io
from .manifest import TeacherSpec

NONFINITE_POLICIES = ("error", "quarantine")


@dataclass(frozen=True)
class ShardSlot:
    """One shard of a store as its writer sees it (``KVStore.shard_slot`` makes it): where to write, and which
    samples and rows the shard holds."""

    zarr_store: Store
    where: str
    """The store, as messages name it."""
    shard: int
    samples: range
    """Store indices of the shard's samples."""
    tokens: tuple[int, int]
    """The shard's rows ``[start, stop)`` on the flat token axis."""
    lengths: np.ndarray
    """``[len(samples)]`` tokens per sample."""
    sample_id: Callable[[int], str]
    """The id of the store's sample ``i`` (for messages and quarantine records)."""
    complete: bool
    """Whether the teacher's shard already has its completion marker."""
    segment_ids: np.ndarray | None = None
    """``[T_s]`` the shard's grid segment ids: a compressed teacher's kept rows follow from them."""


class _Block:
    """A chunk-row block of one 4-D array waiting to be written: its stored values (+ int8 scales), or for int4/int2
    its float32 rows, encoded when the block is flushed (key groups span samples)."""

    def __init__(self, arrays: dict[str, zarr.Array], name: str, rows: int, inner: tuple[int, ...],
                 dtype: np.dtype, lowbit: bool) -> None:
        self.arrays, self.name = arrays, name
        self.array, self.scale = arrays[name], arrays.get(f"{name}_scale")
        self.values = np.zeros((rows, *inner), dtype=np.float32 if lowbit else dtype)
        self.scales = np.zeros((rows, *inner[:-1]), dtype=np.float16) if self.scale is not None and not lowbit \
            else None


class ShardWriter:
    """Writes shard ``shard`` of teacher ``spec.name``. Use as a context manager::

        with store.shard_writer("qwen-7b", 3) as w:
            for k, v, weight in samples_of_shard_3:   # k, v: [T_i, L, H, D]
                w.add(k, v, align_weight=weight)

    Leaving the block by an exception leaves the shard unfinished (invisible; a resumed run redoes it).
    ``nonfinite="quarantine"`` stores a sample with NaN/Inf as zeros with alignment weight 0 and status
    ``quarantined`` instead of raising.
    """

    def __init__(self, slot: ShardSlot, spec: TeacherSpec, *, nonfinite: str = "error") -> None:
        if nonfinite not in NONFINITE_POLICIES:
            raise SampleError(f"Expected nonfinite in {NONFINITE_POLICIES}. Got {nonfinite!r} instead.")
        shard = slot.shard
        self.slot, self.spec, self.shard, self.nonfinite = slot, spec, shard, nonfinite
        self._samples = slot.samples
        self._lengths = slot.lengths
        self.num_tokens = slot.tokens[1] - slot.tokens[0]
        # A compressed teacher's K/V rows are its slots: the kept rows of each sample (kava.kvstore.eviction).
        self._evict = spec.eviction
        if self._evict is not None:
            if slot.segment_ids is None:
                raise StoreError(f"Teacher {spec.name!r} keeps only some rows (eviction); its shard writer needs the "
                                 "grid's segment ids.")
            starts = np.concatenate([[0], np.cumsum(self._lengths)])
            self._slots = eviction.slot_counts(self._evict, slot.segment_ids, starts)
            self._outside = ~eviction.in_segments(slot.segment_ids, self._evict)
        else:
            self._slots = self._lengths
        self.num_rows = int(self._slots.sum())
        """Rows of the K/V(/Q) arrays: the shard's tokens, or a compressed teacher's slots."""
        self._next = 0  # position in the shard of the next sample
        self._row = 0  # K/V rows handed to add() so far
        self._token = 0  # tokens handed to add() so far (per-token arrays: align_weight, logits)
        self._flushed = 0  # K/V rows written to zarr so far
        self._closed = False
        self.quarantined: list[dict[str, Any]] = []
        self._align = np.zeros(self.num_tokens, dtype=np.float32)
        self._status = np.zeros(len(self._samples), dtype=np.uint8)
        self._bytes_logical = 0
        # The top-k arrays are small (6 bytes x top_k per token): held whole, written at close like align_weight.
        top_k = spec.logits.top_k if spec.logits is not None else 0
        self._logit_ids = np.full((self.num_tokens, top_k), layout.LOGIT_NO_TARGET, dtype=np.int32)
        self._logit_logp = np.zeros((self.num_tokens, top_k), dtype=np.float16)
        layers, heads = len(spec.layers), spec.kv_heads
        self._kept = np.zeros((self.num_rows, layers, heads), np.int32) if self._evict is not None else None
        self._evict_err = np.zeros(layers)  # per stored layer: the sum over samples of their fidelity error
        self._evict_samples = 0

        zstore = slot.zarr_store
        self._key = layout.shard_key(spec.name, shard)
        if slot.complete:
            raise StoreError(
                f"{slot.where}: teacher {spec.name!r} shard {shard} is already complete. "
                "Skip complete shards (see complete_shards()), or delete it to rewrite it."
            )
        # Leftovers of a crashed writer are removed first: a shard is always written whole.
        zarr_io.delete_prefix(zstore, self._key)
        own, base = zarr_io.substore(zstore, self._key)  # this writer's files stay under its shard's directory
        self._own, self._base = own, base
        st = spec.storage
        self._dtype = codecs.storage_numpy_dtype(st.dtype)
        self._rows = st.chunk_tokens
        self._blocks: dict[str, _Block] = {}
        geometry = {"k": (len(spec.layers), spec.kv_heads), "v": (len(spec.layers), spec.kv_heads)}
        if spec.has_q:
            geometry["q"] = (len(spec.q_layers), spec.num_heads)
        lowbit = codecs.is_lowbit(st.dtype)
        self._quality: dict[str, list[np.ndarray]] = {}  # name → [cos_sum [L], rows [L]] for the lossy dtypes
        for name, (nl, nh) in geometry.items():
            attrs = {layout.DTYPE_ATTR: st.dtype} if st.dtype == "bfloat16" else {}
            arrays = {}
            for part, (shape, dtype, dims) in codecs.stored_arrays(
                    name, self.num_rows, nl, nh, spec.head_dim, st.dtype, group_tokens=st.group_tokens,
                    group_channels=st.group_channels, slots=self._evict is not None).items():
                rows = st.chunk_tokens // st.group_tokens if dims[0].endswith("_group") else st.chunk_tokens
                arrays[part] = zarr_io.create_array(
                    own, f"{base}{part}", shape=shape, chunks=(rows, min(st.chunk_layers, nl), *shape[2:]),
                    dtype=dtype, dims=dims, compressor=st.compressor, attributes=attrs if part == name else {},
                )
            self._blocks[name] = _Block(arrays, name, self._rows, (nl, nh, spec.head_dim), self._dtype, lowbit)
            if st.dtype in ("int8", *codecs.LOWBIT_BITS):
                self._quality[name] = [np.zeros(nl), np.zeros(nl, np.int64)]

    # ---------------------------------------------------------------------------------------------------------

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()

    @property
    def next_sample(self) -> int:
        """The store index of the sample :meth:`add` expects next."""
        return self._samples.start + self._next

    def add(self, k: Any, v: Any, *, q: Any = None, align_weight: Any = None, logits: tuple[Any, Any] | None = None,
            kept: Any = None, fidelity: Any = None, sample: int | None = None) -> None:
        """Append the next sample of the shard.

        k, v: ``[T_i, len(layers), kv_heads, head_dim]``; q: ``[T_i, len(q_layers), num_heads, head_dim]`` when
        the teacher stores queries; align_weight: ``[T_i]`` in [0, 1] (default 1). numpy or torch, any float
        dtype (bf16 included). logits: ``(ids, logp)`` when the teacher stores them, each ``[T_i, top_k]``: integer
        ids in ``[0, vocab_size)`` and log-probabilities sorted largest first, or a row of ids all -1 (no target;
        its logp is ignored). ``sample`` (optional) is checked against the expected store index.

        A compressed teacher (``spec.eviction``) passes only its kept rows: k, v ``[M_i, L, H, D]`` with ``M_i`` the
        sample's slots, ``kept`` ``[M_i, L, H]`` their positions among the sample's ``T_i`` tokens (the rule of
        :func:`kava.kvstore.eviction.kept_problem`), and optionally ``fidelity`` ``[L]``, the relative error of the
        answer's attention output when it reads only the kept rows, per stored layer (averaged into the marker).
        """
        if self._closed:
            raise StoreError("This shard writer is closed.")
        if self._next >= len(self._samples):
            raise SampleError(
                f"Shard {self.shard} holds {len(self._samples)} samples "
                f"({self._samples.start}-{self._samples.stop - 1}); an extra sample was added."
            )
        index = self.next_sample
        if sample is not None and sample != index:
            raise SampleError(f"Expected sample {index} next in shard {self.shard}. Got sample {sample} instead.")
        n = int(self._lengths[self._next])
        m = int(self._slots[self._next])  # K/V rows: n, or a compressed teacher's slots
        spec = self.spec
        positions = self._check_kept(index, n, m, kept, fidelity)
        arrays = {"k": k, "v": v}
        if spec.has_q:
            if q is None:
                raise SampleError(f"Teacher {spec.name!r} stores queries (q_layers {list(spec.q_layers)}); pass q=.")
            arrays["q"] = q
        elif q is not None:
            raise SampleError(f"Teacher {spec.name!r} was registered without queries; q= was given.")

        # Validate everything before buffering anything, so a rejected sample leaves the writer unchanged.
        values: dict[str, np.ndarray] = {}
        problem = None
        for name, x in arrays.items():
            x = codecs.to_numpy(x)
            nl, nh = (len(spec.q_layers), spec.num_heads) if name == "q" else (len(spec.layers), spec.kv_heads)
            expected = (m, nl, nh, spec.head_dim)
            if x.shape != expected:
                rows = "kept rows" if self._evict is not None else "tokens"
                raise SampleError(
                    f"Sample {index} ({self.slot.sample_id(index)!r}), {name}: expected shape {expected} "
                    f"[{rows}, layers, heads, head_dim]. Got {tuple(x.shape)} instead."
                )
            if not np.issubdtype(x.dtype, np.floating):
                raise SampleError(
                    f"Sample {index}, {name}: expected a floating dtype. Got {x.dtype} instead."
                )
            problem = problem or codecs.check_values(x, spec.storage.dtype)
            values[name] = x
        weight = np.ones(n, np.float32) if align_weight is None else np.asarray(
            codecs.to_numpy(align_weight), dtype=np.float32).reshape(-1)
        if weight.shape != (n,) or not np.all(np.isfinite(weight)) or (n and (weight.min() < 0 or weight.max() > 1)):
            raise SampleError(
                f"Sample {index}, align_weight: expected {n} finite values in [0, 1]. "
                f"Got shape {weight.shape} instead." if weight.shape != (n,) else
                f"Sample {index}, align_weight: expected finite values in [0, 1]."
            )
        top = self._check_logits(index, n, logits)
        if top is not None and problem is None and not np.all(np.isfinite(top[1][top[0][:, 0] >= 0])):
            problem = "non-finite logit log-probabilities"
        if problem is not None:
            if problem.startswith("non-finite") and self.nonfinite == "quarantine":
                self.quarantined.append({"sample": index, "sample_id": self.slot.sample_id(index),
                                         "reason": problem})
                self._status[self._next] = layout.TEACHER_STATUS.index("quarantined")
                weight = np.zeros(n, np.float32)
                values = {name: np.zeros_like(x, dtype=np.float32) for name, x in values.items()}
                top = None  # rows stay NO_TARGET
            else:
                raise SampleError(
                    f"Sample {index} ({self.slot.sample_id(index)!r}) of teacher {spec.name!r}: {problem}. "
                    + ("Pass nonfinite='quarantine' (--on-nonfinite quarantine) to record it and go on."
                       if problem.startswith("non-finite") else "")
                )

        t = self._token
        self._align[t : t + n] = weight
        if top is not None:
            ids, logp = top
            live = ids[:, 0] >= 0
            self._logit_ids[t : t + n] = np.where(live[:, None], ids, layout.LOGIT_NO_TARGET)
            # fp16 keeps ~3 significant digits of a log-probability; below -65504 a probability is 0 anyway.
            self._logit_logp[t : t + n] = np.where(live[:, None], np.clip(logp, -65504.0, 0.0), 0.0)
        self._bytes_logical += n * self._logit_ids.shape[1] * (4 + 2)
        if self._kept is not None and positions is not None:
            self._kept[self._row : self._row + m] = positions
            self._bytes_logical += positions.size * 4
            if fidelity is not None and self._status[self._next] == 0:
                self._evict_err += np.asarray(codecs.to_numpy(fidelity), dtype=np.float64).reshape(-1)
                self._evict_samples += 1
        lowbit = codecs.is_lowbit(spec.storage.dtype)
        # int4/int2 are encoded when their block is flushed; the others now, sample by sample.
        encoded = {name: (x, None) if lowbit else codecs.encode(x, spec.storage.dtype) for name, x in values.items()}
        for name, (stored, scale) in encoded.items():
            if not lowbit:
                self._bytes_logical += stored.nbytes + (scale.nbytes if scale is not None else 0)
            if scale is not None:  # int8: how close the decoded values come to the teacher's
                self._add_quality(name, values[name], codecs.decode(stored, scale, "int8", np.float32))
        # Copy rows into the pending block, writing each block out as soon as it fills.
        done = 0
        while done < m:
            pos = (self._row + done) - self._flushed  # row inside the pending block
            take = min(m - done, self._rows - pos)
            for name, (stored, scale) in encoded.items():
                block = self._blocks[name]
                block.values[pos : pos + take] = stored[done : done + take]
                if block.scales is not None and scale is not None:  # int8 (both or neither)
                    block.scales[pos : pos + take] = scale[done : done + take]
            done += take
            if pos + take == self._rows:
                self._flush(self._rows)
        self._row += m
        self._token += n
        self._next += 1

    def _check_kept(self, index: int, n: int, m: int, kept: Any, fidelity: Any) -> np.ndarray | None:
        """A compressed teacher's kept positions ``[m, L, H]`` (int32), checked; None for a dense teacher."""
        spec = self.spec
        if self._evict is None:
            if kept is not None or fidelity is not None:
                raise SampleError(f"Teacher {spec.name!r} keeps every row (no eviction); kept= was given.")
            return None
        if kept is None:
            raise SampleError(f"Teacher {spec.name!r} keeps only some rows ({self._evict.rule}, budget "
                              f"{self._evict.budget}); pass kept= with the kept rows' positions.")
        positions = np.asarray(codecs.to_numpy(kept))
        expected = (m, len(spec.layers), spec.kv_heads)
        if positions.shape != expected or not np.issubdtype(positions.dtype, np.integer):
            raise SampleError(f"Sample {index} ({self.slot.sample_id(index)!r}), kept: expected integer positions of "
                              f"shape {expected} [kept rows, layers, heads]. Got {positions.dtype} "
                              f"{tuple(positions.shape)} instead.")
        t = self._token
        problem = eviction.kept_problem(positions, n, self._outside[t : t + n])
        if problem is not None:
            raise SampleError(f"Sample {index} ({self.slot.sample_id(index)!r}), kept: {problem}.")
        if fidelity is not None and np.asarray(codecs.to_numpy(fidelity)).shape != (len(spec.layers),):
            raise SampleError(f"Sample {index}, fidelity: expected one value per stored layer "
                              f"({len(spec.layers)}).")
        return positions.astype(np.int32)

    def _check_logits(self, index: int, n: int, logits: tuple[Any, Any] | None) -> tuple[np.ndarray, np.ndarray] | None:
        """``(ids int64 [n, k], logp float32 [n, k])`` checked against the spec, or None for a teacher without them."""
        spec = self.spec
        if spec.logits is None:
            if logits is not None:
                raise SampleError(f"Teacher {spec.name!r} was registered without logits; logits= was given.")
            return None
        top_k, vocab = spec.logits.top_k, spec.logits.vocab_size
        if logits is None:
            raise SampleError(f"Teacher {spec.name!r} stores its top-{top_k} logits; pass logits=(ids, logp).")
        ids, logp = (np.asarray(codecs.to_numpy(x)) for x in logits)
        for what, x in (("logit ids", ids), ("logit log-probabilities", logp)):
            if x.shape != (n, top_k):
                raise SampleError(f"Sample {index} ({self.slot.sample_id(index)!r}), {what}: expected shape "
                                  f"{(n, top_k)} [tokens, top_k]. Got {tuple(x.shape)} instead.")
        if not np.issubdtype(ids.dtype, np.integer):
            raise SampleError(f"Sample {index}, logit ids: expected an integer dtype. Got {ids.dtype} instead.")
        ids = ids.astype(np.int64)
        live = ids[:, 0] >= 0
        bad_rows = (live & np.any((ids < 0) | (ids >= vocab), axis=1)) | (~live & np.any(ids != -1, axis=1))
        if bad_rows.any():
            row = int(np.flatnonzero(bad_rows)[0])
            raise SampleError(f"Sample {index}, logit ids: expected each row's ids in [0, {vocab}) or all -1 (no "
                              f"target). Got {ids[row].tolist()} at token {row} instead.")
        return ids, logp.astype(np.float32)

    def _add_quality(self, name: str, x: np.ndarray, decoded: np.ndarray) -> None:
        cos, rows = codecs.cosine_rows(x, decoded)
        self._quality[name][0] += cos
        self._quality[name][1] += rows

    def _flush(self, rows: int) -> None:
        start = self._flushed
        st = self.spec.storage
        for name, block in self._blocks.items():
            if codecs.is_lowbit(st.dtype):
                # start is a multiple of chunk_tokens, hence of group_tokens: key groups begin at the block.
                x = block.values[:rows]
                parts = codecs.encode_arrays(x, name, st.dtype, group_tokens=st.group_tokens,
                                             group_channels=st.group_channels)
                for part, data in parts.items():
                    a, b = codecs.side_rows(name, st.dtype, start, start + rows, st.group_tokens) if part != name \
                        else (start, start + rows)
                    block.arrays[part][a:b] = data
                    self._bytes_logical += data.nbytes
                self._add_quality(name, x, codecs.decode_arrays(parts, name, st.dtype, np.float32, first_row=start,
                                                                group_tokens=st.group_tokens,
                                                                group_channels=st.group_channels))
                continue
            block.array[start : start + rows] = block.values[:rows]
            if block.scale is not None and block.scales is not None:  # int8 (both or neither)
                block.scale[start : start + rows] = block.scales[:rows]
        self._flushed += rows

    def close(self) -> dict[str, Any]:
        """Flush the last rows, sync to disk, and write the completion marker. Returns the marker."""
        if self._closed:
            raise StoreError("This shard writer is already closed.")
        if self._next != len(self._samples):
            raise IncompleteError(
                f"Teacher {self.spec.name!r} shard {self.shard}: {self._next} of {len(self._samples)} samples "
                "were added; a shard is written whole. Add the rest, or leave it for a resumed run."
            )
        if self._row > self._flushed:
            self._flush(self._row - self._flushed)
        zstore = self.slot.zarr_store
        columns: list[tuple[str, np.ndarray, str]] = [("align_weight", self._align, "token"),
                                                      ("sample_status", self._status, "sample")]
        for name, data, dim in columns:
            zarr_io.create_array(
                self._own, f"{self._base}{name}", shape=data.shape, chunks=(max(1, data.size),), dtype=data.dtype,
                dims=(dim,), compressor=codecs.DEFAULT_COMPRESSOR,
            )[...] = data
        if self._kept is not None:  # chunked like the K/V rows, so one sample's read touches one or two chunks
            layers = self._kept.shape[1]
            zarr_io.create_array(
                self._own, f"{self._base}{layout.KEPT_ARRAY}", shape=self._kept.shape,
                chunks=(self._rows, layers, self._kept.shape[2]), dtype=np.int32, dims=("slot", "layer", "kv_head"),
                compressor=codecs.DEFAULT_COMPRESSOR,
            )[...] = self._kept
        if self.spec.logits is not None:
            tops: tuple[np.ndarray, np.ndarray] = (self._logit_ids, self._logit_logp)
            for name, top in zip(layout.LOGIT_ARRAYS, tops):
                zarr_io.create_array(
                    self._own, f"{self._base}{name}", shape=top.shape, chunks=(max(1, len(top)), top.shape[1]),
                    dtype=top.dtype, dims=("token", "top_k"), compressor=codecs.DEFAULT_COMPRESSOR,
                )[...] = top
        zarr_io.fsync_tree(zstore, self._key)
        marker: dict[str, Any] = {
            "complete": True,
            "shard": self.shard,
            "samples": [self._samples.start, self._samples.stop],
            "tokens": list(self.slot.tokens),
            **({"slots": self.num_rows, "eviction": {
                "err_sum": [round(float(e), 6) for e in self._evict_err], "samples": self._evict_samples}}
               if self._evict is not None else {}),
            "quarantined": self.quarantined,
            "bytes_logical": int(self._bytes_logical),
            **({"quantization": {name: {"cos_sum": [round(float(c), 6) for c in cos], "rows": [int(r) for r in n]}
                                 for name, (cos, n) in self._quality.items()}} if self._quality else {}),
            "written_at": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
            "writer": f"{socket.gethostname()}:{os.getpid()}",
        }
        # The marker is the last write: an atomic replacement of the shard group's zarr.json.
        zarr.open_group(zstore, path=self._key, mode="a").attrs.put({layout.SHARD_ATTR: marker})
        self._closed = True
        self._blocks.clear()
        return marker
