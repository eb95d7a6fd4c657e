"""The int4/int2 decoder against a naive reference: bit for bit, for every grouping, offset and output dtype.

``dequantize_np`` decodes in place in one float32 buffer with scale and zero broadcast over their groups; the
reference below is the plain reading of FORMAT.md ("Low-bit values"): unpack the codes, repeat each scale and zero
over its group, ``code * scale + zero`` in float32 (the product rounded before the sum).
"""

from __future__ import annotations

import numpy as np
import pytest

from kava.kvstore import codecs


def naive_dequantize(
    codes: np.ndarray,
    scale: np.ndarray,
    zero: np.ndarray,
    bits: int,
    *,
    per_channel: bool,
    group: int,
    first_row: int = 0,
) -> np.ndarray:
    c = codecs.unpack_bits(codes, bits).astype(np.float32)
    s, z = scale.astype(np.float32), zero.astype(np.float32)
    if per_channel:
        skip = first_row % group
        s = np.repeat(s, group, axis=0)[skip : skip + c.shape[0]]
        z = np.repeat(z, group, axis=0)[skip : skip + c.shape[0]]
    else:
        s, z = np.repeat(s, group, axis=-1), np.repeat(z, group, axis=-1)
    return (c * s) + z


def encoded(rows: int, dtype: str, array: str, group_tokens: int, group_channels: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng([rows, len(dtype), len(array)])
    x = (rng.standard_normal((rows, 3, 2, 16)) * rng.uniform(0.1, 30, (1, 3, 2, 16))).astype(np.float32)
    x[:, 0, 0, 3] = 7.0  # a constant channel: scale 0, codes 0
    return codecs.encode_arrays(x, array, dtype, group_tokens=group_tokens, group_channels=group_channels)


@pytest.mark.parametrize("dtype", ["int4", "int2"])
@pytest.mark.parametrize("array", ["k", "v"])
@pytest.mark.parametrize(("a", "b"), [(0, 50), (0, 48), (5, 50), (16, 17), (23, 24), (13, 13)])
def test_decode_matches_the_naive_reference_bit_for_bit(dtype, array, a, b):
    gt, gc = 8, 8
    parts = encoded(50, dtype, array, gt, gc)
    per_channel, group = codecs.group_of(array, dtype, gt, gc)
    sa, sb = codecs.side_rows(array, dtype, a, b, gt)
    codes, scale, zero = parts[array][a:b], parts[f"{array}_scale"][sa:sb], parts[f"{array}_zero"][sa:sb]
    want = naive_dequantize(
        codes, scale, zero, codecs.LOWBIT_BITS[dtype], per_channel=per_channel, group=group, first_row=a
    )
    got = codecs.dequantize_np(codes, scale, zero, dtype, per_channel=per_channel, group=group, first_row=a)
    assert got.dtype == np.float32 and got.shape == want.shape == (b - a, 3, 2, 16)
    np.testing.assert_array_equal(got.view(np.uint32), want.view(np.uint32))
    # What a training window asks for: float16, rounded once from the same float32 values.
    half = codecs.decode_arrays(
        {array: codes, f"{array}_scale": scale, f"{array}_zero": zero},
        array,
        dtype,
        np.float16,
        first_row=a,
        group_tokens=gt,
        group_channels=gc,
    )
    np.testing.assert_array_equal(half.view(np.uint16), want.astype(np.float16).view(np.uint16))


def test_decode_takes_strided_codes_and_float32_scales():
    parts = encoded(40, "int4", "k", 8, 8)
    codes = np.asfortranarray(parts["k"])  # another memory layout, same values
    scale, zero = parts["k_scale"].astype(np.float32), parts["k_zero"].astype(np.float32)
    want = naive_dequantize(parts["k"], scale, zero, 4, per_channel=True, group=8)
    got = codecs.dequantize_np(codes, scale, zero, "int4", per_channel=True, group=8)
    np.testing.assert_array_equal(got, want)
