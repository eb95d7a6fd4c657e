"""Compressed teachers (format version 4): how many rows a teacher that evicts part of its cache keeps, where they
are, and the rule its kept positions follow.

A compressed teacher's spec carries an :class:`~kava.kvstore.manifest.EvictionSpec`. Per sample, every stored layer
and KV head keeps the same number of rows: every token outside the spec's segments, and ``keep_count(S, budget)`` of
the ``S`` tokens inside them (which ones differs by layer and head). So a sample's kept-row count, its *slots*,
follows from the grid alone (:func:`slot_counts`), and a shard's ``k``/``v`` are ``[K_s, L, H, D]`` on a slot axis,
``K_s`` the sum of its samples' slots, with ``kept`` ``[K_s, L, H]`` int32: the sample-relative student-token position
each slot holds, increasing within a sample for each (layer, head).
"""

from __future__ import annotations

import math

import numpy as np

from kava.core.errors import ConfigError

from .manifest import EvictionSpec


def keep_count(n: int, budget: int | float) -> int:
    """How many of a segment's ``n`` tokens a budget keeps: an ``int`` budget is a count (at most ``n``), a
    ``float`` in (0, 1] a share of ``n`` rounded up (``1`` keeps one token, ``1.0`` all of them)."""
    count = isinstance(budget, int) and not isinstance(budget, bool) and budget >= 1
    share = isinstance(budget, float) and 0 < budget <= 1
    if not (count or share):
        raise ConfigError(f"--kv-budget: expected a count >= 1 or a fraction in (0, 1]. Got {budget!r} instead.")
    return min(n, int(budget)) if count else min(n, math.ceil(n * budget - 1e-9))


def in_segments(segment_ids: np.ndarray, eviction: EvictionSpec) -> np.ndarray:
    """``[T]`` bool: the tokens the budget applies to."""
    return np.isin(segment_ids, eviction.segment_ids)


def slot_counts(eviction: EvictionSpec, segment_ids: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """Kept rows per sample, ``[N]`` int64, for samples ``offsets`` ``[N+1]`` over the grid's ``segment_ids``
    (``offsets[0]`` need not be 0: a run of samples)."""
    lengths = np.diff(offsets)
    inside = np.add.reduceat(in_segments(segment_ids, eviction).astype(np.int64),
                             offsets[:-1] - offsets[0]) if len(segment_ids) else np.zeros(len(lengths), np.int64)
    inside = np.where(lengths > 0, inside, 0)  # reduceat reads the next sample's first row for an empty one
    kept = np.array([keep_count(int(s), eviction.budget) if s else 0 for s in inside], dtype=np.int64)
    return lengths - inside + kept


def kept_problem(kept: np.ndarray, length: int, outside: np.ndarray) -> str | None:
    """Whether one sample's kept positions ``[M, L, H]`` break the rule: increasing along the slot axis for each
    (layer, head), in ``[0, length)``, and including every position of ``outside`` (``[T]`` bool, the rows not in
    the eviction's segments); a phrase, or None."""
    if not len(kept):
        return None
    if kept.min() < 0 or kept.max() >= length:
        return f"expected kept positions in [0, {length}). Got {int(kept.min())}..{int(kept.max())} instead"
    if len(kept) > 1 and not np.all(np.diff(kept, axis=0) > 0):
        return "expected kept positions increasing within a sample for each layer and head"
    must = np.flatnonzero(outside)
    if len(must):
        hit = np.zeros((length, *kept.shape[1:]), dtype=bool)
        np.put_along_axis(hit, kept.astype(np.int64), True, axis=0)
        if not hit[must].all():
            return "expected every row outside the eviction's segments among the kept positions"
    return None


def slot_offsets(eviction: EvictionSpec, segment_ids: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """``[N+1]`` int64 offsets of samples ``offsets`` ``[N+1]`` on the teacher's slot axis, from 0."""
    return np.concatenate([[0], np.cumsum(slot_counts(eviction, segment_ids, offsets))]).astype(np.int64)


def samples_problem(eviction: EvictionSpec, kept: np.ndarray, slots: np.ndarray, offsets: np.ndarray,
                    segment_ids: np.ndarray) -> tuple[int, str] | None:
    """The first of a run of samples whose kept positions break the rule (:func:`kept_problem`), as ``(i, phrase)``
    with ``i`` counted from the run's first; None when all keep it. ``kept`` ``[K, L, H]`` holds the run's slots,
    ``slots`` ``[n+1]`` their offsets in it, ``offsets`` ``[n+1]`` the samples' rows on the grid and ``segment_ids``
    the grid's segment ids of those rows."""
    outside = ~in_segments(segment_ids, eviction)
    base = int(offsets[0])
    for i in range(len(slots) - 1):
        a, b = int(offsets[i]) - base, int(offsets[i + 1]) - base
        problem = kept_problem(kept[int(slots[i]) : int(slots[i + 1])], b - a, outside[a:b])
        if problem is not None:
            return i, problem
    return None
