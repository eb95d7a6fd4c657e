"""Stream a store's shards as padded training batches, in an order every process can recompute.

The pieces, in the order the trainer meets them:

- :class:`LoaderConfig` says which store, which teachers (and which of their layers, with or without Q), the
  batch shape, the seed and the process layout.
- :func:`check_request` refuses a request the store can't serve, before any model loads, and returns the shards
  to train on.
- :func:`~kava.distill.plan.plan_epoch` orders each epoch's batches from metadata alone (see :mod:`.plan`).
- :class:`KVStream` produces the planned batches of one loader worker (or all of them, in-process): it reads each
  window's shards once, as stored, with only the requested teachers, layers and queries (the next window on a
  background thread), and gathers each batch from it (:mod:`.batch`): a :class:`Batch` in the stored dtype, in
  pinned memory when CUDA is available, that the trainer decodes on its device (:meth:`Batch.decoded`).
- :class:`StreamLoader` runs ``num_workers`` spawned workers and yields batches strictly in plan order;
  :attr:`StreamLoader.position` is all a checkpoint needs to resume.

The order depends on ``seed``, ``buffer_shards``, ``batch_size``, ``max_tokens``, ``num_workers`` and
``world_size``: a resumed run must use the same values (the trainer checks).
"""

from __future__ import annotations

import atexit
import os
import threading
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from kava.core.errors import ConfigError, IncompleteError, KavaError, SchemaError
from kava.kvstore import KVStore

from .batch import Batch, TeacherBatch, Window, collate, pad_token_id, read_window
from .plan import BatchPlan, EpochPlan, check_layout, plan_epoch

__all__ = [
    "Batch", "BatchPlan", "EpochPlan", "KVStream", "LoaderConfig", "StreamLoader", "TeacherBatch", "TeacherRequest",
    "check_request", "plan_epoch",
]


# -------------------------------------------------------------------------------------------------------------
# Config


@dataclass(frozen=True)
class TeacherRequest:
    """One teacher a run reads, and how much of it."""

    name: str
    """The teacher's name in the store."""
    layers: tuple[int, ...] | None = None
    """Teacher layers to read (stored layer indices, in this order); None reads every stored layer."""
    with_q: bool = False
    """Also read the stored queries (all of the teacher's Q layers)."""
    with_logits: bool = False
    """Also read the stored top-k logits."""
    with_kv: bool = True
    """Read K/V; off for a logit-only run (the batch's K/V then have zero layers)."""

    def __post_init__(self) -> None:
        if self.layers is not None:
            layers = tuple(int(layer) for layer in self.layers)
            if not layers or len(set(layers)) != len(layers):
                raise ConfigError(
                    f"Expected distinct teacher layers for {self.name!r}. Got {list(layers)} instead. "
                    "List each layer once, or leave layers unset for all stored layers."
                )
            object.__setattr__(self, "layers", layers)


@dataclass(frozen=True)
class LoaderConfig:
    """What to stream from a store, and how the batches are shaped and ordered."""

    store: str
    """Path of the store (each process opens it itself)."""
    teachers: tuple[TeacherRequest, ...] = ()
    """Teachers to read; empty streams the token grid only (CE-only training)."""
    batch_size: int = 8
    """Samples per batch."""
    max_tokens: int | None = None
    """Optional cap on ``rows * longest sample``: a batch closes early when the next sample would pass it."""
    buffer_shards: int = 4
    """Shards per shuffle window (what a worker holds decoded in memory)."""
    seed: int = 0
    """Seed of the order; each epoch's order differs."""
    rank: int = 0
    """This process's DDP rank."""
    world_size: int = 1
    """Number of DDP ranks; each reads its own shards."""
    num_workers: int = 0
    """Loader worker processes; 0 reads in the training process."""
    allow_incomplete: bool = False
    """Train on the shards every requested teacher finished, instead of refusing an unfinished teacher."""
    pin_memory: bool | None = None
    """Deliver batches in pinned memory, for a non-blocking copy to a CUDA device; None: when CUDA is available."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "store", os.fspath(self.store))  # a Path pickles too, but the field says str
        requests = tuple(
            TeacherRequest(**r) if isinstance(r, Mapping) else TeacherRequest(r) if isinstance(r, str) else r
            for r in self.teachers
        )
        object.__setattr__(self, "teachers", requests)
        problems = []
        names = [r.name for r in requests]
        if len(set(names)) != len(names):
            problems.append(f"Expected each teacher once in teachers. Got {names} instead. Merge the repeated ones.")
        for flag, value, least in (("batch_size", self.batch_size, 1), ("buffer_shards", self.buffer_shards, 1),
                                   ("seed", self.seed, 0), ("world_size", self.world_size, 1),
                                   ("num_workers", self.num_workers, 0)):
            if value < least:
                problems.append(f"Expected {flag} >= {least}. Got {value} instead.")
        if self.max_tokens is not None and self.max_tokens < 1:
            problems.append(f"Expected max_tokens >= 1 or unset. Got {self.max_tokens} instead.")
        if not 0 <= self.rank < max(self.world_size, 1):
            problems.append(f"Expected 0 <= rank < world_size ({self.world_size}). Got rank {self.rank} instead.")
        if problems:
            raise ConfigError(" ".join(problems))


def check_request(store: KVStore, config: LoaderConfig) -> list[int]:
    """Refuse a request the store can't serve, listing what the store has; return the usable shards, sorted.

    Raises:
        SchemaError: a requested teacher is not in the store, layers are asked for that it doesn't store, or Q is
            asked for and not stored (every such problem in one message).
        IncompleteError: a requested teacher has unfinished shards (unless ``allow_incomplete``), or no shard is
            finished by every requested teacher.
    """
    present = store.teachers
    problems = []
    for req in config.teachers:
        spec = present.get(req.name)
        if spec is None:
            problems.append(
                f"Expected teacher {req.name!r} in the store. Got only {', '.join(map(repr, present)) or 'none'} "
                f"instead. Request one of those, or extract {req.name!r} into this store."
            )
            continue
        missing = [layer for layer in req.layers or () if layer not in spec.layers]
        if missing:
            problems.append(
                f"Expected layers {list(req.layers or ())} of teacher {req.name!r} to be stored. Got stored layers "
                f"{list(spec.layers)} instead ({missing} missing). Ask for stored layers, or re-extract with those "
                "layers in the layer map."
            )
        if req.with_q and not spec.has_q:
            problems.append(
                f"Expected stored queries for teacher {req.name!r} (with_q). Got none instead. Drop with_q, or "
                "re-extract it with --with-q."
            )
        if req.with_logits and spec.logits is None:
            problems.append(
                f"Expected stored logits for teacher {req.name!r} (with_logits). Got none instead. Drop "
                "with_logits, or re-extract it with --logit-top-k K."
            )
    if problems:
        raise SchemaError(f"{store.where}: can't serve this request. " + " ".join(problems))

    usable = set(range(store.num_shards))
    unfinished = []
    for req in config.teachers:
        missing = store.missing_shards(req.name)
        usable -= set(missing)
        if missing:
            shown = ", ".join(map(str, missing[:8])) + (", ..." if len(missing) > 8 else "")
            unfinished.append(f"teacher {req.name!r} missing {len(missing)} of {store.num_shards} shards ({shown})")
    if unfinished and not config.allow_incomplete:
        raise IncompleteError(
            f"{store.where}: Expected every shard of each requested teacher to be finished. Got "
            f"{'; '.join(unfinished)} instead. Finish the extraction with `kava extract --resume`, or pass "
            "allow_incomplete to train on the shards every requested teacher finished."
        )
    if not usable:
        raise IncompleteError(
            f"{store.where}: Expected at least one shard finished by every requested teacher. Got none instead "
            f"({'; '.join(unfinished)}). Finish the extraction with `kava extract --resume`."
        )
    return sorted(usable)


# -------------------------------------------------------------------------------------------------------------
# Streaming


class KVStream(IterableDataset):
    """Yields :class:`Batch` objects of the given epochs, starting at ``start=(epoch, index)``.

    ``epochs`` is the run's total: the stream ends after epoch ``epochs - 1`` (None: never), so a resumed stream
    built with the same arguments ends where the uninterrupted one would. In a DataLoader worker it yields that
    worker's planned batches; in-process it yields every batch in plan order. Spawn-safe: it holds only the config
    and opens the store on first iteration in the process that iterates it. ``shards`` pins the usable shards
    (default: :func:`check_request` on first iteration), so that every worker plans with the same ones while an
    extraction is still adding shards.
    """

    def __init__(self, config: LoaderConfig, *, start: tuple[int, int] = (0, 0), epochs: int | None = None,
                 shards: Sequence[int] | None = None) -> None:
        super().__init__()
        self.config = config
        self.start = _check_start(start, epochs)
        self.epochs = epochs
        self.shards = None if shards is None else [int(s) for s in shards]
        self._store: KVStore | None = None

    def __getstate__(self) -> dict[str, Any]:
        # The store handle holds zarr state (threads, caches) that must not cross into a spawned worker.
        return {**self.__dict__, "_store": None}

    def plan(self, epoch: int, store: KVStore, shards: Sequence[int]) -> EpochPlan:
        """This rank's plan of ``epoch`` over ``shards`` (every worker computes the same one)."""
        c = self.config
        return plan_epoch(np.diff(store.offsets), store.shard_starts, shards, epoch=epoch, seed=c.seed,
                          batch_size=c.batch_size, max_tokens=c.max_tokens, buffer_shards=c.buffer_shards,
                          rank=c.rank, world_size=c.world_size, num_workers=c.num_workers)

    def __iter__(self) -> Iterator[Batch | WorkerFailure]:
        if get_worker_info() is None:
            yield from self._batches()
            return
        try:
            yield from self._batches()
        except KavaError as e:
            # Raised here, the DataLoader would re-raise it in the trainer wrapped in this worker's traceback (some
            # 45 lines); sent as an item, StreamLoader re-raises it as the one-line error it is.
            yield WorkerFailure(e)

    def _batches(self) -> Iterator[Batch]:
        info = get_worker_info()
        worker = None
        if info is not None:
            torch.set_num_threads(1)  # workers share the machine's cores with the trainer and each other
            if info.num_workers != max(self.config.num_workers, 1):
                raise ConfigError(
                    f"Expected the DataLoader to run LoaderConfig.num_workers ({self.config.num_workers}) workers. "
                    f"Got {info.num_workers} instead. Build the DataLoader from the config (StreamLoader does)."
                )
            worker = info.id
        if self._store is None:
            self._store = KVStore.open(self.config.store)
        store = self._store
        shards = self.shards if self.shards is not None else check_request(store, self.config)
        check_layout(len(shards), world_size=self.config.world_size, buffer_shards=self.config.buffer_shards,
                     num_workers=self.config.num_workers)
        pad_id = pad_token_id(store)
        # In a worker batches are gathered into shared memory (what crosses to the training process without a
        # copy), and the DataLoader's pin thread pins them there; in-process, straight into pinned memory.
        memory = "shared" if worker is not None else "pinned" if _pin(self.config) else "plain"
        epoch = self.start[0]
        # One thread reads the next window (its reads and decompression release the GIL) while this one gathers
        # batches from the current window.
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="kava-window") as ahead:
            while self.epochs is None or epoch < self.epochs:
                mine = [b for b in self.plan(epoch, store, shards).batches
                        if (worker is None or b.worker == worker) and (b.epoch, b.index) >= self.start]
                last = {b.window: b.index for b in mine}  # a window is dropped after its last batch here
                order = list(dict.fromkeys(b.window for b in mine))
                shards_of = {b.window: b.shards for b in mine}
                windows: dict[int, Future[Window]] = {}
                for b in mine:
                    following = order.index(b.window) + 1
                    for w in (b.window, *order[following : following + 1]):  # this window, then the next one
                        if w not in windows:
                            windows[w] = ahead.submit(read_window, store, shards_of[w], self.config.teachers, pad_id)
                    window = windows[b.window].result()
                    yield collate(b, window, store.offsets, store.shard_starts, memory=memory)
                    if last[b.window] == b.index:
                        del windows[b.window]
                epoch += 1


@dataclass
class WorkerFailure:
    """A KavaError raised in a loader worker (a corrupted chunk, an unfinished shard), sent to the trainer as an
    item."""

    error: KavaError


def _pin(config: LoaderConfig) -> bool:
    return config.pin_memory is not False and torch.cuda.is_available()  # pinning only helps a CUDA copy


def _check_start(start: tuple[int, int], epochs: int | None) -> tuple[int, int]:
    if len(start) != 2 or start[0] < 0 or start[1] < 0:
        raise ConfigError(f"Expected start=(epoch, index) with both >= 0. Got {start} instead.")
    if epochs is not None and epochs < 1:
        raise ConfigError(f"Expected epochs >= 1 or None. Got {epochs} instead.")
    return int(start[0]), int(start[1])


def _init_worker(worker_id: int) -> None:
    """DataLoader ``worker_init_fn`` of :class:`StreamLoader`'s workers."""
    atexit.register(_join_queue_feeders)


def _join_queue_feeders(timeout: float = 5.0) -> None:
    """Let a worker's queue feeder thread finish the batch it is sending before the interpreter shuts down.

    When the trainer stops pulling mid-epoch, a worker may exit while its (daemon) feeder thread is inside torch's
    C++ code sharing a batch's tensors; an interpreter shutting down ends such a thread, which aborts the worker
    ("terminate called without an active exception") and the DataLoader reports it as killed. The queue is closed
    by then, so the feeder sends what it holds and stops: joining it here, while atexit handlers still run before
    daemon threads are ended, takes milliseconds.
    """
    for thread in threading.enumerate():
        if thread.name == "QueueFeederThread" and thread is not threading.current_thread():
            thread.join(timeout)


class StreamLoader:
    """What the trainer iterates: batches in plan order, from ``num_workers`` spawned processes (or in-process
    when 0), starting at ``start=(epoch, index)``; ``epochs`` as in :class:`KVStream`.

    Construction checks the request against the store (:func:`check_request`) and the process layout, so a bad
    run stops before any model loads. Each ``iter()`` continues from :attr:`position`. The order depends on
    ``num_workers`` and ``world_size``: resume with the same values.

    Batches that a worker delivers before their turn (around epoch ends, where one worker has more batches left
    than another) wait in memory: at most about one window's batches.
    """

    def __init__(self, config: LoaderConfig, *, start: tuple[int, int] = (0, 0), epochs: int | None = None) -> None:
        self.config = config
        self.epochs = epochs
        store = KVStore.open(config.store)
        # The usable shards, fixed for this loader's life: an extraction may still be adding shards, and every
        # worker must plan with the same ones.
        self.shards = check_request(store, config)
        check_layout(len(self.shards), world_size=config.world_size, buffer_shards=config.buffer_shards,
                     num_workers=config.num_workers)
        start = _check_start(start, epochs)
        self._lengths = np.diff(store.offsets)
        self._shard_starts = store.shard_starts
        self._plans: dict[int, EpochPlan] = {}
        if not self.plan(0).batches:
            raise ConfigError(
                f"Expected batches to train on in {config.store}. Got none instead: every sample of the usable "
                "shards has length 0. Check the extraction's skipped samples (`kava store info`)."
            )
        self._position = self._normalise(start)

    def seek(self, position: tuple[int, int]) -> None:
        """Continue from ``position`` (a checkpoint's saved :attr:`position`) at the next ``iter()``."""
        self._position = self._normalise(_check_start(position, self.epochs))

    def plan(self, epoch: int) -> EpochPlan:
        """This rank's plan of ``epoch`` (cached: planning reads only metadata, but every sample)."""
        if epoch not in self._plans:
            c = self.config
            if len(self._plans) >= 4:
                self._plans.pop(next(iter(self._plans)))
            self._plans[epoch] = plan_epoch(
                self._lengths, self._shard_starts, self.shards, epoch=epoch, seed=c.seed, batch_size=c.batch_size,
                max_tokens=c.max_tokens, buffer_shards=c.buffer_shards, rank=c.rank, world_size=c.world_size,
                num_workers=c.num_workers,
            )
        return self._plans[epoch]

    @property
    def batches_per_epoch(self) -> int:
        """Batches in epoch 0. Other epochs differ by a few: windows hold other samples, so the last batch of each
        sort chunk (and ``max_tokens`` cuts, and the DDP minimum) come out differently."""
        return len(self.plan(0))

    @property
    def position(self) -> tuple[int, int]:
        """``(epoch, index)`` of the next batch to be yielded: what a checkpoint saves to resume from."""
        return self._position

    def _normalise(self, position: tuple[int, int]) -> tuple[int, int]:
        epoch, index = position
        while index >= len(self.plan(epoch)) and (self.epochs is None or epoch < self.epochs):
            epoch, index = epoch + 1, 0
        return epoch, index

    def _finished(self) -> bool:
        return self.epochs is not None and self._position[0] >= self.epochs

    def __iter__(self) -> Iterator[Batch]:
        if self._finished():
            return
        stream = KVStream(self.config, start=self._position, epochs=self.epochs, shards=self.shards)
        if self.config.num_workers == 0:
            for batch in stream:
                if isinstance(batch, WorkerFailure):  # only a worker process sends one; as in the loop below
                    raise batch.error
                yield self._advance(batch)
            return
        loader = DataLoader(stream, batch_size=None, num_workers=self.config.num_workers,
                            multiprocessing_context="spawn", prefetch_factor=2, persistent_workers=False,
                            worker_init_fn=_init_worker, pin_memory=_pin(self.config))
        # The DataLoader takes one batch from each worker in turn. That is the plan's order except where workers
        # finish an epoch unevenly, so batches that arrive early wait here until their turn.
        early: dict[tuple[int, int], Batch] = {}
        for batch in loader:
            if isinstance(batch, WorkerFailure):
                raise batch.error
            early[(batch.epoch, batch.index)] = batch
            while self._position in early:
                yield self._advance(early.pop(self._position))
        if early or not self._finished():
            raise RuntimeError(
                f"Expected the loader workers to produce every planned batch. Got none for {self._position} "
                f"instead ({len(early)} later ones waiting)."
            )

    def _advance(self, batch: Batch) -> Batch:
        if (batch.epoch, batch.index) != self._position:
            raise RuntimeError(f"Expected batch {self._position}. Got {(batch.epoch, batch.index)} instead.")
        self._position = self._normalise((batch.epoch, batch.index + 1))
        return batch
