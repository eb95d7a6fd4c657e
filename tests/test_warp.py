"""Segment-aware time warping, checked against a per-token loop and against torch's linear interpolation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kava.core.errors import ConfigError, ShapeError
from kava.extract.align import Alignment, apply
from kava.extract.warp import SPECIAL_SEGMENT, time_warp

P, R, A, S = 0, 1, 2, 3  # prompt, reasoning, answer, special


def _segments(*runs: tuple[int, int]) -> np.ndarray:
    """``_segments((S, 1), (P, 5), ...)`` → uint8 ids, ``count`` tokens of each ``segment`` in turn."""
    return np.concatenate([np.full(count, seg, dtype=np.uint8) for seg, count in runs])


def _reference(teacher: np.ndarray, student: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The obvious per-token loop: dense float64 weights ``[T_s, T_t]`` and coverage ``[T_s]``."""
    dense = np.zeros((len(student), len(teacher)))
    coverage = np.zeros(len(student))
    for i, g in enumerate(student.tolist()):
        if g == SPECIAL_SEGMENT:
            continue
        t_pos = [p for p, tg in enumerate(teacher.tolist()) if tg == g]
        s_pos = [p for p, sg in enumerate(student.tolist()) if sg == g]
        if not t_pos:
            continue
        n_t, n_s, j = len(t_pos), len(s_pos), s_pos.index(i)
        p = min(max((j + 0.5) * n_t / n_s - 0.5, 0.0), n_t - 1)
        lo = int(np.floor(p))
        hi = min(lo + 1, n_t - 1)
        dense[i, t_pos[lo]] += 1.0 - (p - lo)
        dense[i, t_pos[hi]] += p - lo
        coverage[i] = 1.0
    return dense, coverage


def _check_csr(w: Alignment) -> None:
    counts = np.diff(w.indptr)
    assert w.weights.dtype == np.float32 and w.coverage.dtype == np.float32
    assert (w.weights > 0).all()
    sums = np.bincount(w.row_ids(), weights=w.weights, minlength=w.num_student_tokens)
    np.testing.assert_allclose(sums[counts > 0], 1.0, atol=1e-6)  # weights sum to 1 where covered
    np.testing.assert_array_equal(counts > 0, w.coverage > 0)
    rows = w.row_ids()
    same_row = rows[1:] == rows[:-1]
    assert (w.indices[1:][same_row] > w.indices[:-1][same_row]).all()  # increasing teacher order in a row


def test_identical_layouts_give_the_identity():
    seg = _segments((S, 1), (P, 7), (R, 20), (A, 3), (S, 1))
    w = time_warp(seg, seg)
    _check_csr(w)
    real = seg != S
    np.testing.assert_array_equal(w.indices, np.flatnonzero(real))
    np.testing.assert_array_equal(w.weights, 1.0)
    np.testing.assert_array_equal(w.coverage, real.astype(np.float32))


def test_twice_as_long_segment_averages_pairs():
    teacher = _segments((P, 4), (R, 12), (A, 2))
    student = _segments((P, 4), (R, 6), (A, 2))
    w = time_warp(teacher, student)
    _check_csr(w)
    dense = w.to_dense()
    for j in range(6):  # student reasoning token j ↔ teacher reasoning tokens 2j and 2j + 1, half each
        expected = np.zeros(len(teacher), dtype=np.float32)
        expected[4 + 2 * j : 4 + 2 * j + 2] = 0.5
        np.testing.assert_array_equal(dense[4 + j], expected)
    values = np.arange(len(teacher), dtype=np.float32)
    np.testing.assert_allclose(apply(w, values)[4:10], [4.5, 6.5, 8.5, 10.5, 12.5, 14.5])


def test_missing_teacher_segment_gets_zero_coverage():
    teacher = _segments((S, 1), (P, 5), (A, 2))  # no reasoning: e.g. the teacher answered directly
    student = _segments((S, 1), (P, 5), (R, 9), (A, 3))
    w = time_warp(teacher, student)
    _check_csr(w)
    counts = np.diff(w.indptr)
    expected_cov = np.r_[0, np.ones(5), np.zeros(9), np.ones(3)].astype(np.float32)
    np.testing.assert_array_equal(w.coverage, expected_cov)
    assert (counts[student == R] == 0).all() and (counts[student == S] == 0).all()
    assert set(w.indices.tolist()) <= set(np.flatnonzero(teacher != S).tolist())  # teacher specials unused


@pytest.mark.parametrize("seed", range(8))
def test_matches_per_token_loop(seed):
    rng = np.random.default_rng(seed)

    def layout() -> np.ndarray:
        # Random lengths (0 allowed: a missing segment) and a few special tokens scattered in, so segments are
        # not always contiguous.
        seg = _segments((S, 1), (P, rng.integers(0, 30)), (R, rng.integers(0, 80)), (A, rng.integers(0, 6)))
        seg[rng.random(len(seg)) < 0.05] = S
        return seg

    teacher, student = layout(), layout()
    w = time_warp(teacher, student)
    _check_csr(w)
    dense, coverage = _reference(teacher, student)
    np.testing.assert_allclose(w.to_dense(), dense, atol=1e-6)
    np.testing.assert_array_equal(w.coverage, coverage.astype(np.float32))


@pytest.mark.parametrize(("n_t", "n_s"), [(12, 5), (5, 12), (1, 7), (7, 1), (9, 9), (100, 33)])
def test_matches_torch_linear_interpolation(n_t, n_s):
    # Within one segment the warp is F.interpolate(mode="linear", align_corners=False) along the token axis.
    rng = np.random.default_rng(n_t * 1000 + n_s)
    values = rng.normal(size=(n_t, 3)).astype(np.float32)  # [T_t, features]
    w = time_warp(np.full(n_t, R, dtype=np.uint8), np.full(n_s, R, dtype=np.uint8))
    want = torch.nn.functional.interpolate(
        torch.from_numpy(values).T[None], size=n_s, mode="linear", align_corners=False
    )[0].T  # [T_s, features]
    # torch computes the scale n_t / n_s in float32, hence a relative tolerance rather than exact equality.
    np.testing.assert_allclose(apply(w, values), want.numpy(), rtol=1e-4, atol=1e-5)


def test_empty_and_bad_inputs():
    w = time_warp(np.zeros(0, dtype=np.uint8), _segments((P, 3)))
    assert w.num_teacher_tokens == 0 and len(w.indices) == 0
    np.testing.assert_array_equal(w.coverage, 0.0)
    assert time_warp(_segments((P, 3)), np.zeros(0, dtype=np.uint8)).num_student_tokens == 0
    with pytest.raises(ConfigError, match=r"Expected student_segments ids in \[0, 4\).*Got 4 at token 1"):
        time_warp(_segments((P, 3)), np.array([0, 4], dtype=np.uint8))
    with pytest.raises(ShapeError, match="Expected teacher_segments as a 1-D integer array"):
        time_warp(np.zeros((2, 2), dtype=np.uint8), _segments((P, 3)))
    with pytest.raises(ShapeError, match="1-D integer array"):
        time_warp(np.array([0.0, 1.0]), _segments((P, 3)))
