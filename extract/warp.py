"""Segment-aware time warping: resample a teacher's token rows onto the student's tokens, segment by segment.

Tokenizer alignment (:mod:`kava.extract.align`) needs the teacher and the student to read the *same* text. When
the teacher generated its own chain of thought, the texts differ and characters no longer line up, but both
still consist of a prompt, a reasoning part and an answer. Time warping maps each student segment onto the
teacher's segment of the same kind, stretching or squeezing it linearly: prompt → prompt, reasoning →
reasoning, answer → answer, one sample at a time.

The result is an :class:`kava.extract.align.Alignment` (CSR rows over teacher tokens), so
:func:`kava.extract.align.apply` moves teacher K/V rows with it exactly as it does a character alignment, and
``coverage`` is the per-token loss weight the store keeps.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from kava.core.errors import ConfigError, ShapeError
from kava.kvstore.manifest import SEGMENT_NAMES

from .align import Alignment

__all__ = ["SPECIAL_SEGMENT", "time_warp"]

SPECIAL_SEGMENT = SEGMENT_NAMES.index("special")
"""Segment id of special tokens (BOS, EOS, chat markers): never warped. Ids below it (prompt, reasoning, answer)
are."""
_NUM_SEGMENTS = len(SEGMENT_NAMES)


def time_warp(teacher_segments: Any, student_segments: Any) -> Alignment:
    """Map each student token to the teacher tokens at the same relative position within the same segment.

    Within segment ``g``, the teacher has ``n_t`` tokens and the student ``n_s`` (counted in order of position;
    a segment need not be contiguous). Student token ``j`` of ``n_s`` maps to the fractional teacher position
    ``p = (j + 0.5) n_t / n_s - 0.5`` — token centres matched, as ``torch.nn.functional.interpolate(mode="linear",
    align_corners=False)`` does — clamped to ``[0, n_t - 1]``, and takes the two nearest teacher tokens
    ``floor(p)`` and ``floor(p) + 1`` with weights ``1 - frac(p)`` and ``frac(p)`` (one token, weight 1, when
    ``p`` is whole). Equal lengths give the identity; a teacher segment twice as long averages pairs.

    Args:
        teacher_segments: integer ``[T_t]`` segment ids of the teacher's tokens (0 prompt, 1 reasoning,
            2 answer, 3 special; ``kava.kvstore.manifest.SEGMENT_NAMES``), usually uint8.
        student_segments: integer ``[T_s]`` segment ids of the student's tokens, same sample.

    Returns:
        An ``Alignment`` with ``num_teacher_tokens = T_t``: each covered row holds one or two entries in
        increasing teacher order, weights (float32) summing to 1, coverage 1. Student special tokens, and
        student tokens of a segment the teacher lacks, get no entries and coverage 0. Teacher special tokens are
        never used. Cost ``O(T_s + T_t)``.

    Raises:
        ShapeError: an input is not a 1-D integer array of ids.
        ConfigError: an id is outside ``[0, 4)``.
    """
    t = _check_segments(teacher_segments, "teacher_segments")
    s = _check_segments(student_segments, "student_segments")
    n_teacher, n_student = len(t), len(s)

    # The teacher's tokens grouped by segment, in position order: a counting sort (linear, unlike argsort).
    t_rank, t_count = _rank_within_segment(t)
    t_offset = np.concatenate([[0], np.cumsum(t_count)[:-1]])  # [4]: where each segment starts in `grouped`
    grouped = np.empty(n_teacher, dtype=np.int64)
    grouped[t_offset[t] + t_rank] = np.arange(n_teacher, dtype=np.int64)

    s_rank, s_count = _rank_within_segment(s)
    n_t = t_count[s]  # [T_s]: teacher tokens in each student token's segment
    covered = (s != SPECIAL_SEGMENT) & (n_t > 0)
    rows = np.flatnonzero(covered)
    g, j, n_t, n_s = s[rows], s_rank[rows], n_t[rows], s_count[s[rows]]

    # p = (j + 0.5) n_t / n_s - 0.5 = ((2j + 1) n_t - n_s) / (2 n_s), kept as an exact fraction so that a whole
    # p (equal lengths, or exact multiples) gives exactly one entry rather than a second with weight 1e-17.
    num = (2 * j + 1) * n_t - n_s
    den = 2 * n_s
    num = np.maximum(num, 0)  # clamp p at 0; at the top p < n_t - 0.5 always, so floor(p) <= n_t - 1
    lo = num // den
    hi = np.minimum(lo + 1, n_t - 1)
    w_hi = np.where(hi > lo, (num % den) / den, 0.0)  # [C]

    # Two candidate entries per covered row, in row-major order so entries stay grouped by row.
    cols = np.stack([grouped[t_offset[g] + lo], grouped[t_offset[g] + hi]], axis=1)  # [C, 2]
    weights = np.stack([1.0 - w_hi, w_hi], axis=1)  # [C, 2]
    keep = np.stack([np.ones(len(rows), dtype=bool), w_hi > 0], axis=1)  # [C, 2]

    counts = np.zeros(n_student, dtype=np.int64)
    counts[rows] = keep.sum(axis=1)
    indptr = np.zeros(n_student + 1, dtype=np.int64)
    np.cumsum(counts, out=indptr[1:])
    return Alignment(
        indptr=indptr,
        indices=cols[keep],
        weights=weights[keep].astype(np.float32),
        coverage=covered.astype(np.float32),
        num_teacher_tokens=n_teacher,
    )


def _check_segments(segments: Any, name: str) -> np.ndarray:
    """``segments`` as int64 ``[T]`` with ids in ``[0, 4)``; a ShapeError when it is not a 1-D integer array, a
    ConfigError when an id is out of range."""
    arr = np.asarray(segments)
    if arr.ndim != 1 or not (arr.dtype.kind in "iu" or arr.size == 0):
        raise ShapeError(
            f"Expected {name} as a 1-D integer array of segment ids [T]. Got {arr.dtype} {arr.shape} instead. "
            "Pass one sample's segment ids at a time."
        )
    arr = arr.astype(np.int64)
    if arr.size and (arr.min() < 0 or arr.max() >= _NUM_SEGMENTS):
        bad = int(np.flatnonzero((arr < 0) | (arr >= _NUM_SEGMENTS))[0])
        raise ConfigError(
            f"Expected {name} ids in [0, {_NUM_SEGMENTS}) ({', '.join(SEGMENT_NAMES)}). Got {int(arr[bad])} at "
            f"token {bad} instead."
        )
    return arr


def _rank_within_segment(segments: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For int64 ids ``[T]``: each token's 0-based rank among tokens of its segment ``[T]``, and counts ``[4]``."""
    onehot = segments[:, None] == np.arange(_NUM_SEGMENTS)  # [T, 4]
    running = np.cumsum(onehot, axis=0)  # [T, 4]: tokens of each segment up to and including this one
    rank = running[np.arange(len(segments)), segments] - 1
    counts = running[-1] if len(segments) else np.zeros(_NUM_SEGMENTS, dtype=np.int64)
    return rank, counts
