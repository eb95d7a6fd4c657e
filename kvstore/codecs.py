"""Value encodings and chunk planning for teacher K/V/Q arrays.

Storage dtypes (``StorageSpec.dtype``):

- ``float16`` (default): lossless for fp16 teachers and for bf16 teachers whose values lie in fp16's normal range
  (bf16 has 8 significant bits, fp16 has 11). A value beyond ±65504 would become inf: the writer refuses the sample
  and names ``bfloat16`` or ``int8`` as the fix (see ``check_values``).
- ``bfloat16``: zarr has no bfloat16 dtype, so the bit pattern is stored as ``uint16`` and the array's attributes
  say ``kava_dtype: bfloat16``. Lossless for bf16 teachers, never overflows, and compresses better than fp16.
- ``float32``: lossless for everything, twice the bytes.
- ``int8``: symmetric absmax quantisation with one float16 scale per (token, layer, head), kept in ``<name>_scale``
  ``[tokens, layers, heads]``. Relative error about 0.5% on real K/V (measured in the tests), ~2x smaller than fp16.
- ``int4``, ``int2``: asymmetric group quantisation, 2 or 4 codes packed per uint8 byte, with float16 ``<name>_scale``
  and ``<name>_zero``; keys and queries grouped per channel over ``group_tokens`` tokens, values per token over
  ``group_channels`` channels (see "Low-bit storage" below and FORMAT.md).

Readers get ``float32`` (or ``float16`` when asked) back, whatever the storage dtype.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from kava.core.errors import SampleError

if TYPE_CHECKING:
    import torch  # only the device decoders use it, importing it themselves

FP16_MAX = 65504.0
DEFAULT_CHUNK_BYTES = 4 << 20
"""Target uncompressed chunk size. zarr costs ~1 ms per chunk; 1 MB+ chunks read 3-4x faster than 50 KB ones."""

# Blosc with byte shuffle and zstd level 1 over 512 KiB blocks: on real fp16 K/V this measured 1.26x at
# ~1.3 GB/s encode and ~3.8 GB/s decode on 2 cores; lz4 was faster but only 1.05x, zlib 10x slower.
DEFAULT_COMPRESSOR: dict[str, Any] = {
    "name": "blosc",
    "configuration": {"cname": "zstd", "clevel": 1, "shuffle": "shuffle", "blocksize": 512 << 10},
}


def storage_numpy_dtype(dtype: str) -> np.dtype:
    """The numpy dtype zarr sees for a storage dtype: ``<f2``, ``<u2`` (bfloat16 bits), ``<f4``, ``i1`` or ``u1``
    (int4/int2 packed codes)."""
    return np.dtype({"float16": "<f2", "bfloat16": "<u2", "float32": "<f4", "int8": "i1", "int4": "u1",
                     "int2": "u1"}[dtype])


def to_numpy(x: Any) -> np.ndarray:
    """Accept numpy arrays and torch tensors (any device, bf16 included) and return a numpy array.

    bf16 tensors come back as float32 (numpy has no bfloat16), which every storage dtype then encodes exactly.
    """
    if isinstance(x, np.ndarray):
        return x
    if hasattr(x, "detach"):  # a torch tensor; kvstore does not import torch for this
        t = x.detach()
        if str(t.dtype) == "torch.bfloat16":
            t = t.float()
        return t.cpu().numpy()
    return np.asarray(x)


def check_values(x: np.ndarray, dtype: str) -> str | None:
    """Return why ``x`` can't be stored as ``dtype`` (non-finite or fp16 overflow), or None. One pass over x."""
    if x.size == 0:
        return None
    peak = float(np.max(np.abs(x)))  # NaN propagates through max; inf stays inf
    if not np.isfinite(peak):
        return "non-finite values (NaN or Inf)"
    if dtype == "float16" and peak > FP16_MAX:
        return (
            f"values up to {peak:.4g} overflow float16 (max {FP16_MAX:g}); store this teacher with "
            "--kv-dtype bfloat16 (lossless for bf16 teachers) or --kv-dtype int8"
        )
    if dtype == "int8" and peak / 127.0 > FP16_MAX:
        # The per-row scale is float16: it would become inf and the row would read back as NaN.
        return (
            f"values up to {peak:.4g} overflow int8's float16 scales (rows up to {FP16_MAX * 127:.4g}); store "
            "this teacher with --kv-dtype bfloat16"
        )
    if dtype in ("int4", "int2") and peak > FP16_MAX:
        # Scales and zeros are float16: a group's minimum beyond ±65504 can't be stored.
        return (
            f"values up to {peak:.4g} overflow {dtype}'s float16 scales and zeros (max {FP16_MAX:g}); store this "
            "teacher with --kv-dtype bfloat16"
        )
    return None


def float_to_bf16_bits(x: np.ndarray) -> np.ndarray:
    """float32 → bfloat16 bit patterns (uint16), rounding to nearest even like torch does."""
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    rounded = u + np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1))
    return (rounded >> np.uint32(16)).astype(np.uint16)


def bf16_bits_to_float(bits: np.ndarray) -> np.ndarray:
    """bfloat16 bit patterns (uint16) → float32, exactly."""
    return (bits.astype(np.uint32) << np.uint32(16)).view(np.float32)


def quantize_int8(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric absmax int8 over the last axis.

    x: ``[T, L, H, D]`` float → (q ``[T, L, H, D]`` int8, scale ``[T, L, H]`` float16), x ≈ q * scale.
    An all-zero row gets scale 0 and codes 0.
    """
    x = np.asarray(x, dtype=np.float32)
    scale = (np.max(np.abs(x), axis=-1) / 127.0).astype(np.float16)
    # Divide by the scale as stored (fp16-rounded) so decode(encode(x)) sees the same scale.
    s = scale.astype(np.float32)[..., None]
    q = np.divide(x, s, out=np.zeros_like(x), where=s > 0)
    return np.clip(np.rint(q), -127, 127).astype(np.int8), scale


def dequantize_int8(q: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """int8 codes ``[..., D]`` times their float16 scales ``[...]`` → float32 ``[..., D]``."""
    return q.astype(np.float32) * scale.astype(np.float32)[..., None]


def encode(x: np.ndarray, dtype: str) -> tuple[np.ndarray, np.ndarray | None]:
    """float ``[T, L, H, D]`` → (stored values, int8 scales or None)."""
    if dtype == "float16":
        return x.astype(np.float16, copy=False), None
    if dtype == "float32":
        return x.astype(np.float32, copy=False), None
    if dtype == "bfloat16":
        return float_to_bf16_bits(x), None
    if dtype == "int8":
        return quantize_int8(x)
    raise SampleError(f"Expected a storage dtype in float16, bfloat16, float32, int8 (int4 and int2 are encoded "
                      f"per block: encode_lowbit). Got {dtype!r} instead.")


def decode(stored: np.ndarray, scale: np.ndarray | None, dtype: str, out_dtype: npt.DTypeLike) -> np.ndarray:
    """Stored values ``[..., D]`` (+ int8 scales ``[...]`` float16) → floats of ``out_dtype``, same shape; ``stored``
    itself when it already is ``out_dtype`` (float16 or float32 storage read as such)."""
    if dtype == "bfloat16":
        x = bf16_bits_to_float(stored)
    elif dtype == "int8":
        assert scale is not None
        x = dequantize_int8(stored, scale)
    else:
        x = stored
    return x.astype(out_dtype, copy=False)


def decode_torch(stored: torch.Tensor, scale: torch.Tensor | None, dtype: str, out_dtype: torch.dtype
                 ) -> torch.Tensor:
    """:func:`decode` for torch tensors, on whatever device they are (the trainer decodes after the copy).

    stored: the stored values, any shape ``[..., D]``: float16 / float32, bfloat16 (as ``torch.bfloat16`` or as its
    16-bit integer bits), or int8 codes. scale: ``[...]`` float16 for int8, else None. Returns ``out_dtype``
    values equal to what :func:`decode` gives for the same arrays (int8 is dequantized in float32 first, as there).
    """
    import torch  # noqa: PLC0415 - kvstore itself never needs torch; only the trainer's decode does

    if dtype == "bfloat16":
        x = stored if stored.dtype == torch.bfloat16 else stored.view(torch.bfloat16)
        return x.to(out_dtype)
    if dtype == "int8":
        assert scale is not None
        return (stored.to(torch.float32) * scale.to(torch.float32).unsqueeze(-1)).to(out_dtype)
    if dtype in ("float16", "float32"):
        return stored.to(out_dtype)
    raise SampleError(f"Expected a storage dtype in float16, bfloat16, float32, int8. Got {dtype!r} instead.")


def plan_chunks(
    layers: int, heads: int, head_dim: int, dtype: str, *, target_bytes: int = DEFAULT_CHUNK_BYTES
) -> tuple[int, int]:
    """Choose (chunk_tokens, chunk_layers) for a ``[T, layers, heads, head_dim]`` array.

    One layer per chunk when a layer is big enough that a ~target-sized chunk still spans >= 1024 tokens (a 7B
    teacher: 1 KiB per token and layer → 4096 tokens), so a reader of a layer subset decodes only those layers;
    otherwise all layers share a chunk (a tiny model: 64 B per token and layer) to keep chunks >= 1 MB.
    """
    row = heads * head_dim * LOWBIT_BITS[dtype] // 8 if is_lowbit(dtype) else \
        heads * head_dim * storage_numpy_dtype(dtype).itemsize
    chunk_layers = 1 if row * 1024 >= target_bytes // 4 else layers
    tokens = target_bytes // (row * chunk_layers)
    tokens = int(min(max(tokens, 256), 1 << 18))
    return max(256, tokens - tokens % 256), chunk_layers


# ---------------------------------------------------------------------------------------------------------------
# Low-bit storage: int4 and int2, bit-packed, asymmetric (min / step) over groups.
#
# Keys (and queries) are grouped per channel: one (scale, zero) per group of ``group_tokens`` consecutive rows of a
# shard, per layer, head and channel. Pre-RoPE keys have a few outlier channels that stay large on every token, so a
# scale per channel spends the code range where it is needed (KIVI, KVQuant); a per-token scale would be set by the
# outliers and round the other channels to zero. Groups start at the shard's first row and never cross a chunk
# (``chunk_tokens`` is a multiple of ``group_tokens``), so any row range reads its codes plus the scale rows
# ``[a // G, ceil(b / G))``. A group may span two samples; that couples their rounding, not their addressing.
# Values are grouped per token: one (scale, zero) per token, layer, head and group of ``group_channels`` channels.
#
# Decode: ``x = code * scale + zero`` in float32, two roundings (multiply, then add), the same in numpy and torch.
# A reader that decodes on its own device reads, for rows [a, b) of a shard: ``<array>`` rows [a, b) and, for each
# side array of ``stored_arrays``, rows ``side_rows(array, dtype, a, b, G)``; then ``dequantize_torch(codes, scale,
# zero, dtype, per_channel=..., group=..., first_row=a)`` with ``group_of`` giving per_channel and group.
# ---------------------------------------------------------------------------------------------------------------

LOWBIT_BITS: dict[str, int] = {"int4": 4, "int2": 2}
"""Bits per code of the packed storage dtypes; ``8 // bits`` codes share one uint8 byte, first code lowest."""
DEFAULT_GROUP_TOKENS = 64
"""Tokens per key/query group (per layer, head and channel). Divides every planned ``chunk_tokens`` (256·n)."""
DEFAULT_GROUP_CHANNELS = 128
"""Channels per value group (per token, layer and head); the head dimension when it is smaller."""
PER_CHANNEL_ARRAYS = ("k", "q")
"""Arrays grouped per channel over tokens; the others (``v``) per token over channels."""


def is_lowbit(dtype: str) -> bool:
    """Whether ``dtype`` is a bit-packed storage dtype (int4, int2) with scale and zero arrays."""
    return dtype in LOWBIT_BITS


def group_channels_for(head_dim: int, group_channels: int = DEFAULT_GROUP_CHANNELS) -> int:
    """The value group size for ``head_dim``: ``group_channels`` capped at the head dimension."""
    return min(group_channels, head_dim)


def pack_bits(codes: np.ndarray, bits: int) -> np.ndarray:
    """uint8 codes ``[..., D]`` in ``[0, 2**bits)`` → packed uint8 ``[..., D * bits // 8]``, first code lowest."""
    per = 8 // bits
    c = np.ascontiguousarray(codes, dtype=np.uint8).reshape(*codes.shape[:-1], codes.shape[-1] // per, per)
    out = np.zeros(c.shape[:-1], dtype=np.uint8)
    for i in range(per):
        out |= (c[..., i] << np.uint8(i * bits)).astype(np.uint8)
    return out


def unpack_bits(packed: np.ndarray, bits: int) -> np.ndarray:
    """Packed uint8 ``[..., P]`` → uint8 codes ``[..., P * 8 // bits]`` (the inverse of :func:`pack_bits`)."""
    per, mask = 8 // bits, np.uint8((1 << bits) - 1)
    shifts = (np.arange(per, dtype=np.uint8) * np.uint8(bits))
    codes = (packed[..., None] >> shifts) & mask  # [..., P, per]
    return codes.reshape(*packed.shape[:-1], packed.shape[-1] * per)


def _grouped(x: np.ndarray, per_channel: bool, group: int) -> np.ndarray:
    """``[T, L, H, D]`` → groups on axis 1: ``[ceil(T/G), G, L, H, D]`` (per channel; the last group repeats its
    last row, which leaves min and max alone) or ``[T, D/G, L, H]``-like ``[T, L, H, D/G, G]`` → axis -1 (per token)."""
    if per_channel:
        t = x.shape[0]
        pad = (-t) % group
        if pad:
            x = np.concatenate([x, np.repeat(x[-1:], pad, axis=0)], axis=0)
        return x.reshape(-1, group, *x.shape[1:])
    return x.reshape(*x.shape[:-1], x.shape[-1] // group, group)


def quantize_lowbit(x: np.ndarray, bits: int, *, per_channel: bool, group: int,
                    symmetric: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Asymmetric (default) or symmetric group quantisation to ``bits`` bits.

    x: ``[T, L, H, D]`` float. per_channel: (scale, zero) per ``group`` rows per (layer, head, channel), shapes
    ``[ceil(T/G), L, H, D]``; else per (token, layer, head, group of ``group`` channels), ``[T, L, H, D/G]``.
    Returns (packed codes uint8 ``[T, L, H, D*bits/8]``, scale float16, zero float16) with
    ``x ≈ code * scale + zero``. Asymmetric: zero = min, scale = (max - min) / (2**bits - 1). Symmetric (kept for
    the measurement that chose asymmetric): scale = absmax / (2**(bits-1) - 1), zero = -(2**(bits-1) - 1) * scale.
    """
    x = np.asarray(x, dtype=np.float32)
    top = (1 << bits) - 1
    g = _grouped(x, per_channel, group)
    axis = 1 if per_channel else -1
    if symmetric:
        half = (1 << (bits - 1)) - 1
        scale = (np.max(np.abs(g), axis=axis) / half).astype(np.float16)
        zero = (-half * scale.astype(np.float32)).astype(np.float16)
    else:
        lo, hi = np.min(g, axis=axis), np.max(g, axis=axis)
        scale = ((hi - lo) / top).astype(np.float16)
        zero = lo.astype(np.float16)
    # Codes from the scale and zero as stored (fp16-rounded), so decode(encode(x)) sees the same numbers.
    s = np.expand_dims(scale.astype(np.float32), axis)
    z = np.expand_dims(zero.astype(np.float32), axis)
    q = np.divide(g - z, s, out=np.zeros_like(g), where=s > 0)
    codes = np.clip(np.rint(q), 0, top).astype(np.uint8)
    codes = codes.reshape(-1, *x.shape[1:])[: x.shape[0]] if per_channel else codes.reshape(x.shape)
    return pack_bits(codes, bits), scale, zero


def dequantize_np(codes: np.ndarray, scale: np.ndarray, zero: np.ndarray | None, dtype: str, *, per_channel: bool,
                  group: int, first_row: int = 0, out_dtype: npt.DTypeLike = np.float32) -> np.ndarray:
    """Stored codes → ``[T, L, H, D]`` float32 values (rounded once to ``out_dtype`` when that is another dtype),
    numpy. The reference for :func:`dequantize_torch`.

    int8: codes ``[T, L, H, D]`` int8, scale ``[T, L, H]``, zero None. int4/int2: packed codes ``[T, L, H, P]``
    uint8; per channel, scale/zero ``[ceil((first_row + T) / G) - first_row // G, L, H, D]`` are the groups of
    rows ``first_row .. first_row + T`` of the shard (the caller reads scale rows ``[first_row // G, ...)``);
    per token, ``[T, L, H, D/G]``.
    """
    if dtype == "int8":
        return dequantize_int8(codes, scale).astype(out_dtype, copy=False)
    assert zero is not None, "int4/int2 codes decode with their zero array"
    bits = LOWBIT_BITS[dtype]
    per, t, inner = 8 // bits, codes.shape[0], codes.shape[1:-1]
    d = codes.shape[-1] * per
    out = np.empty((t, *inner, d), out_dtype)
    if t == 0:
        return out
    s, z = scale.astype(np.float32), zero.astype(np.float32)
    # Rows are decoded a block of whole scale groups at a time, in a float32 scratch small enough to stay in cache:
    # codes unpacked into it, times the scale, plus the zero (broadcast over each group, never repeated to full
    # size), then copied out in ``out_dtype``. At a 7B teacher's geometry this is 4x (float32) and 2.5-3.4x
    # (float16) faster than repeating the scales to full size and making one pass of the whole array per step
    # (docs/performance.md). Per channel a scale row covers G rows and the first group starts ``first_row % G``
    # rows before the codes; the scratch rows outside the codes are zeros, so no garbage goes through the arithmetic.
    span = group if per_channel else 1  # rows a scale row covers
    skip = first_row % group if per_channel else 0
    scale_rows = -(-(skip + t) // span)
    step = max(1, _DECODE_BLOCK_BYTES // max(1, span * int(np.prod(inner)) * d * 4))  # scale rows per block
    scratch = np.empty((min(step, scale_rows) * span, *inner, d), np.float32)
    unpacked = np.empty((len(scratch), *codes.shape[1:]), np.uint8)
    for j in range(0, scale_rows, step):
        j1 = min(j + step, scale_rows)
        va, vb = j * span, j1 * span  # the block's rows, counted from the first group's start
        lo, hi = max(va, skip), min(vb, skip + t)
        x = scratch[: vb - va]
        x[: lo - va], x[hi - va :] = 0, 0
        rows = x[lo - va : hi - va].reshape(hi - lo, *codes.shape[1:], per)
        _unpack_into(codes[lo - skip : hi - skip], bits, rows, unpacked[: hi - lo])
        if per_channel:  # [groups, G, L, H, D] × [groups, 1, L, H, D]
            g, sj, zj = x.reshape(j1 - j, span, *inner, d), s[j:j1, None], z[j:j1, None]
        else:  # [T, L, H, D/C, C] × [T, L, H, D/C, 1]
            g, sj, zj = x.reshape(vb - va, *inner, d // group, group), s[j:j1, ..., None], z[j:j1, ..., None]
        np.multiply(g, sj, out=g)  # two roundings, as the format says: the product, then the sum
        np.add(g, zj, out=g)
        out[lo - skip : hi - skip] = x[lo - va : hi - va]
    return out


_DECODE_BLOCK_BYTES = 1 << 20
"""The float32 scratch :func:`dequantize_np` decodes in (at least one scale group): well inside a core's L2."""


def _unpack_into(packed: np.ndarray, bits: int, out: np.ndarray, scratch: np.ndarray) -> None:
    """Packed uint8 ``[..., P]`` → their codes into ``out`` ``[..., P, 8 // bits]`` (any float dtype), first code
    lowest, through ``scratch`` (uint8, the shape of ``packed``)."""
    mask = np.uint8((1 << bits) - 1)
    for i in range(8 // bits):
        np.right_shift(packed, np.uint8(i * bits), out=scratch)
        np.bitwise_and(scratch, mask, out=scratch)
        out[..., i] = scratch


def dequantize_torch(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, dtype: str, *,
                     per_channel: bool, group: int, first_row: int = 0) -> torch.Tensor:
    """:func:`dequantize_np` for torch tensors on any device (same shapes, same float32 result; two roundings,
    no fused multiply-add). codes: int8 or uint8 tensors; scale/zero: float16 tensors (zero None for int8)."""
    import torch  # noqa: PLC0415 - kvstore itself never needs torch; only the trainer's decode does

    if dtype == "int8":
        return decode_torch(codes, scale, "int8", torch.float32)
    assert zero is not None, "int4/int2 codes decode with their zero array"
    bits = LOWBIT_BITS[dtype]
    per = 8 // bits
    shifts = torch.arange(per, device=codes.device, dtype=torch.uint8) * bits
    c = (codes.to(torch.uint8)[..., None] >> shifts) & ((1 << bits) - 1)
    c = c.reshape(*codes.shape[:-1], codes.shape[-1] * per).to(torch.float32)
    s, z = scale.to(torch.float32), zero.to(torch.float32)
    if per_channel:
        skip = first_row % group
        s = s.repeat_interleave(group, dim=0)[skip : skip + c.shape[0]]
        z = z.repeat_interleave(group, dim=0)[skip : skip + c.shape[0]]
    else:
        s, z = s.repeat_interleave(group, dim=-1), z.repeat_interleave(group, dim=-1)
    return torch.add(torch.mul(c, s), z)


def group_of(array: str, dtype: str, group_tokens: int, group_channels: int) -> tuple[bool, int]:
    """(per_channel, group size) of ``array`` (``k``, ``v`` or ``q``) stored as a low-bit ``dtype``."""
    per_channel = array in PER_CHANNEL_ARRAYS
    return per_channel, (group_tokens if per_channel else group_channels)


def stored_arrays(array: str, rows: int, layers: int, heads: int, head_dim: int, dtype: str, *,
                  group_tokens: int = 0, group_channels: int = 0, slots: bool = False
                  ) -> dict[str, tuple[tuple[int, ...], np.dtype, tuple[str, ...]]]:
    """The zarr arrays that hold one ``[rows, layers, heads, head_dim]`` array in ``dtype``: name → (shape,
    dtype, dimension names). Names are ``array`` plus ``_scale`` / ``_zero`` for the quantised dtypes. ``slots``:
    the rows are a compressed teacher's kept rows (dimension ``slot``, groups ``slot_group``), not tokens."""
    row = "slot" if slots else "token"
    base = (row, "q_layer", "q_head") if array == "q" else (row, "layer", "kv_head")
    if is_lowbit(dtype):
        per_channel, g = group_of(array, dtype, group_tokens, group_channels)
        side = ((-(-rows // g), layers, heads, head_dim), (f"{row}_group", *base[1:], "head_dim")) if per_channel \
            else ((rows, layers, heads, head_dim // g), (*base, "channel_group"))
        packed = (rows, layers, heads, head_dim * LOWBIT_BITS[dtype] // 8)
        return {array: (packed, np.dtype(np.uint8), (*base, "packed_head_dim")),
                f"{array}_scale": (side[0], np.dtype(np.float16), side[1]),
                f"{array}_zero": (side[0], np.dtype(np.float16), side[1])}
    out: dict[str, tuple[tuple[int, ...], np.dtype, tuple[str, ...]]] = {
        array: ((rows, layers, heads, head_dim), storage_numpy_dtype(dtype), (*base, "head_dim"))}
    if dtype == "int8":
        out[f"{array}_scale"] = ((rows, layers, heads), np.dtype(np.float16), base)
    return out


def bytes_per_token(array: str, layers: int, heads: int, head_dim: int, dtype: str, *, group_tokens: int = 0,
                    group_channels: int = 0) -> float:
    """Stored bytes per token of one array, scales and zeros included (per-channel groups amortised over G)."""
    total = 0.0
    for shape, dt, _ in stored_arrays(array, group_tokens or 1, layers, heads, head_dim, dtype,
                                      group_tokens=group_tokens, group_channels=group_channels).values():
        n = float(np.prod(shape)) * dt.itemsize
        total += n / (group_tokens or 1)
    return total


def cosine_rows(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per layer: (sum of cosine over the non-zero (token, head) rows, how many) of ``x`` vs ``y`` ``[T, L, H, D]``."""
    x, y = np.asarray(x, np.float32), np.asarray(y, np.float32)
    nx, ny = np.linalg.norm(x, axis=-1), np.linalg.norm(y, axis=-1)
    live = nx > 0
    cos = np.divide(np.sum(x * y, axis=-1), nx * ny, out=np.zeros_like(nx), where=live & (ny > 0))
    return cos.astype(np.float64).sum(axis=(0, 2)), live.sum(axis=(0, 2)).astype(np.int64)


def encode_arrays(x: np.ndarray, array: str, dtype: str, *, group_tokens: int = 0,
                  group_channels: int = 0) -> dict[str, np.ndarray]:
    """float ``[T, L, H, D]`` → the stored arrays named as in :func:`stored_arrays` (``k``, ``k_scale``, ...).

    For int4/int2 per-channel arrays, ``x`` must start at a group boundary of the shard (a writer's block does)."""
    if is_lowbit(dtype):
        per_channel, g = group_of(array, dtype, group_tokens, group_channels)
        codes, scale, zero = quantize_lowbit(x, LOWBIT_BITS[dtype], per_channel=per_channel, group=g)
        return {array: codes, f"{array}_scale": scale, f"{array}_zero": zero}
    stored, int8_scale = encode(x, dtype)
    return {array: stored} if int8_scale is None else {array: stored, f"{array}_scale": int8_scale}


def decode_arrays(parts: Mapping[str, np.ndarray], array: str, dtype: str, out_dtype: npt.DTypeLike, *,
                  first_row: int = 0, group_tokens: int = 0, group_channels: int = 0) -> np.ndarray:
    """The inverse of :func:`encode_arrays` for rows ``first_row ..`` of a shard; per-channel scale and zero rows
    must start at group ``first_row // group_tokens``. Returns ``out_dtype`` ``[T, L, H, D]``."""
    if is_lowbit(dtype):
        per_channel, g = group_of(array, dtype, group_tokens, group_channels)
        return dequantize_np(parts[array], parts[f"{array}_scale"], parts[f"{array}_zero"], dtype,
                             per_channel=per_channel, group=g, first_row=first_row, out_dtype=out_dtype)
    return decode(parts[array], parts.get(f"{array}_scale"), dtype, np.dtype(out_dtype))


def side_rows(array: str, dtype: str, a: int, b: int, group_tokens: int) -> tuple[int, int]:
    """The rows of ``<array>_scale`` / ``<array>_zero`` that rows ``[a, b)`` of ``array`` need."""
    if is_lowbit(dtype) and array in PER_CHANNEL_ARRAYS:
        return a // group_tokens, -(-b // group_tokens)
    return a, b
