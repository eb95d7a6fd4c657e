"""The order of an epoch's batches, as a pure function of the store's metadata.

Every process (each DDP rank, each loader worker, a resumed run) calls :func:`plan_epoch` with the same sample
lengths, shard plan and seed and gets the same batches, so nothing about the order is ever sent between processes
or saved in a checkpoint: ``(epoch, index)`` of the next batch is enough to resume.

The plan of one epoch, for one rank:

1. The usable shards are shuffled (seeded by ``(seed, epoch)``, the same on every rank) and dealt to ranks:
   rank ``r`` takes ``order[r::world_size]``, so ranks read disjoint shards.
2. The rank's shards are cut into *windows* of ``buffer_shards`` consecutive shards: the unit a loader worker reads
   and holds in memory. Within a window, samples of length 0 (skipped by the extraction) are dropped, the rest are
   shuffled, each run of ``batch_size * 16`` shuffled samples is sorted by length (so a batch pads little while the
   batches stay random), cut into batches of ``batch_size`` (closing early at ``max_tokens``), and the window's
   batches are shuffled.
3. Window ``w`` goes to worker ``w % max(num_workers, 1)``; the epoch's order deals one batch from each worker in
   turn, skipping workers that have run out. A worker then reads ahead only the few batches the loader prefetches.
4. Every rank takes the same number of steps: each rank plans every rank's batch count (metadata only) and keeps
   its first ``min`` batches.

The order therefore depends on ``num_workers`` and ``world_size`` as well as on the seed: a resumed run must use the
same values.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from kava.core.errors import ConfigError

SORT_CHUNK_BATCHES = 16
"""Samples are sorted by length in runs of ``batch_size * SORT_CHUNK_BATCHES``: long enough that a batch holds
samples of similar length, short enough that every batch is still a random draw of the window."""


@dataclass(frozen=True, eq=False)  # eq=False: field-wise == on an ndarray field has no truth value
class BatchPlan:
    """One batch of the plan: which samples, and where a worker finds them."""

    epoch: int
    index: int
    """Position of this batch in the epoch's order (``0 .. num_batches - 1``)."""
    worker: int
    """The loader worker that produces it (0 when loading in-process)."""
    window: int
    """The shuffle window it came from (numbered within this rank's epoch)."""
    shards: tuple[int, ...]
    """The window's shards: what the worker reads to produce the window's batches."""
    samples: np.ndarray
    """``[B]`` int64 global sample indices, in batch row order."""


@dataclass
class EpochPlan:
    """One rank's batches of one epoch."""

    epoch: int
    batches: list[BatchPlan]
    """In consumption order; ``batches[i].index == i``."""
    dropped: int
    """Batches this rank dropped so that every rank takes the same number of steps (0 without DDP)."""

    def __len__(self) -> int:
        return len(self.batches)


def plan_epoch(
    lengths: np.ndarray,
    shard_starts: np.ndarray,
    shards: Sequence[int],
    *,
    epoch: int,
    seed: int,
    batch_size: int,
    max_tokens: int | None,
    buffer_shards: int,
    rank: int,
    world_size: int,
    num_workers: int,
) -> EpochPlan:
    """Plan one rank's batches of one epoch (see the module docstring for the steps).

    Args:
        lengths: ``[N]`` tokens per sample (``diff(offsets)``); samples of length 0 are never batched.
        shard_starts: ``[S+1]`` shard ``s`` holds samples ``shard_starts[s]:shard_starts[s+1]``.
        shards: the shards to train on (in any order: they are sorted before the shuffle).
        max_tokens: cap on ``rows * longest sample`` of a batch; a sample longer than the cap gets a batch alone.

    Each sample of length > 0 in ``shards`` is in exactly one batch of one rank, except those in dropped batches.
    """
    if not 0 <= rank < world_size:
        raise ConfigError(f"Expected 0 <= rank < world_size ({world_size}). Got rank {rank} instead.")
    order = np.random.default_rng((seed, epoch)).permutation(np.asarray(sorted(shards), dtype=np.int64))
    per_rank = [
        _rank_windows(lengths, shard_starts, order[r::world_size], seed=seed, epoch=epoch, rank=r,
                      batch_size=batch_size, max_tokens=max_tokens, buffer_shards=buffer_shards)
        for r in range(world_size)
    ]
    counts = [sum(len(batches) for _, batches in windows) for windows in per_rank]
    keep = min(counts)

    # Deal the windows to workers, then one batch from each worker in turn.
    workers = max(num_workers, 1)
    queues: list[list[tuple[int, tuple[int, ...], np.ndarray]]] = [[] for _ in range(workers)]
    for w, (window_shards, batches) in enumerate(per_rank[rank]):
        queues[w % workers].extend((w, window_shards, samples) for samples in batches)
    plan: list[BatchPlan] = []
    for turn in range(max((len(q) for q in queues), default=0)):
        for worker, queue in enumerate(queues):
            if turn < len(queue) and len(plan) < keep:
                w, window_shards, samples = queue[turn]
                plan.append(BatchPlan(epoch, len(plan), worker, w, window_shards, samples))
    return EpochPlan(epoch=epoch, batches=plan, dropped=counts[rank] - keep)


def num_windows(num_shards: int, *, rank: int, world_size: int, buffer_shards: int) -> int:
    """How many windows rank ``rank`` gets from ``num_shards`` usable shards (the same in every epoch)."""
    mine = len(range(rank, num_shards, world_size))
    return -(-mine // buffer_shards)


def check_layout(num_shards: int, *, world_size: int, buffer_shards: int, num_workers: int) -> None:
    """Refuse a process layout in which some loader worker of some rank would get no window: such a worker never
    yields, and a loader streaming forever would wait on it forever."""
    if num_shards < world_size:
        raise ConfigError(
            f"Expected at least one usable shard per rank ({world_size} ranks). Got {num_shards} shards instead. "
            "Use fewer ranks, or a store with smaller shards (--shard-tokens at extraction)."
        )
    fewest = min(num_windows(num_shards, rank=r, world_size=world_size, buffer_shards=buffer_shards)
                 for r in range(world_size))
    if fewest < max(num_workers, 1):
        raise ConfigError(
            f"Expected at least num_workers ({max(num_workers, 1)}) windows of buffer_shards ({buffer_shards}) "
            f"shards on each of the {world_size} rank(s). Got {fewest} instead, from {num_shards} usable shards. "
            "Lower num_workers or buffer_shards."
        )


def _rank_windows(
    lengths: np.ndarray, shard_starts: np.ndarray, rank_shards: np.ndarray, *, seed: int, epoch: int, rank: int,
    batch_size: int, max_tokens: int | None, buffer_shards: int,
) -> list[tuple[tuple[int, ...], list[np.ndarray]]]:
    """``(window shards, batches)`` for each of one rank's windows, in window order; each batch ``[B]`` int64."""
    out = []
    for w, first in enumerate(range(0, len(rank_shards), buffer_shards)):
        window = tuple(int(s) for s in rank_shards[first : first + buffer_shards])
        samples = np.concatenate(
            [np.arange(shard_starts[s], shard_starts[s + 1], dtype=np.int64) for s in window]
        )
        samples = samples[lengths[samples] > 0]
        # Seeded by the rank and window too, so each window's shuffle is its own and every rank can replay any
        # other rank's plan to count its batches.
        rng = np.random.default_rng((seed, epoch, rank, w))
        samples = rng.permutation(samples)
        batches: list[np.ndarray] = []
        chunk = batch_size * SORT_CHUNK_BATCHES
        for c in range(0, len(samples), chunk):
            part = samples[c : c + chunk]
            part = part[np.argsort(lengths[part], kind="stable")]
            batches += _cut(part, lengths[part], batch_size, max_tokens)
        out.append((window, [batches[i] for i in rng.permutation(len(batches))]))
    return out


def _cut(samples: np.ndarray, lengths: np.ndarray, batch_size: int, max_tokens: int | None) -> list[np.ndarray]:
    """Cut length-sorted ``samples`` into batches of at most ``batch_size`` rows and ``max_tokens`` padded tokens."""
    if max_tokens is None:
        return [samples[i : i + batch_size] for i in range(0, len(samples), batch_size)]
    out = []
    start = 0
    while start < len(samples):
        stop = start + 1  # a sample longer than max_tokens still gets a batch of its own
        # Lengths ascend, so the batch's longest sample is always the one just added.
        while stop < len(samples) and stop - start < batch_size and (stop - start + 1) * lengths[stop] <= max_tokens:
            stop += 1
        out.append(samples[start:stop])
        start = stop
    return out
