"""`kava distill` over several processes: torchrun starts the ranks, DDP keeps their students identical.

torchrun (``python -m torch.distributed.run``) starts one process per rank and tells each its place through the
environment: ``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``. Every rank runs the same
recipe (:func:`kava.distill.trainer.run_distill`) with the same config:

- it reads its own shards (the loader deals them by rank and gives every rank the same number of batches);
- DDP averages the gradients in the last backward of each optimizer step, so the ranks take identical steps;
- one all_reduce per step averages the logged terms over ranks and sums the tokens;
- rank 0 alone writes (metrics, TensorBoard, checkpoints, the final model) and logs; the others wait at a barrier
  while it writes.

``--parallel fsdp`` keeps this layout and these collectives, and shards the student across the ranks instead of
copying it to each (:mod:`.fsdp`). With ``WORLD_SIZE`` unset or 1 every helper here does nothing and the run is one
plain process. This module holds the collectives the trainer calls and :func:`launch`, which starts a run under
torchrun.
"""

from __future__ import annotations

import inspect
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from kava.core.errors import ConfigError


@dataclass(frozen=True)
class Ranks:
    """This process's place in the job."""

    rank: int = 0
    """Global rank, ``0 .. world_size - 1``."""
    local_rank: int = 0
    """Rank on this machine: the CUDA device it uses."""
    world_size: int = 1
    """Number of processes in the job."""

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def main(self) -> bool:
        """Rank 0: the one that writes and logs."""
        return self.rank == 0


def ranks_from_env(environ: dict[str, str] | None = None) -> Ranks:
    """The ranks torchrun set in the environment (one process when ``WORLD_SIZE`` is unset)."""
    env = os.environ if environ is None else environ
    values = {}
    for name, default in (("RANK", 0), ("LOCAL_RANK", 0), ("WORLD_SIZE", 1)):
        raw = env.get(name)
        try:
            values[name] = default if raw is None else int(raw)
        except ValueError as e:
            raise ConfigError(f"Expected an integer in ${name}. Got {raw!r} instead. Start the run with torchrun, "
                              "or unset it.") from e
    ranks = Ranks(values["RANK"], values["LOCAL_RANK"], values["WORLD_SIZE"])
    if ranks.world_size < 1 or not 0 <= ranks.rank < ranks.world_size or ranks.local_rank < 0:
        raise ConfigError(f"Expected 0 <= RANK < WORLD_SIZE and LOCAL_RANK >= 0. Got RANK={ranks.rank}, "
                          f"LOCAL_RANK={ranks.local_rank}, WORLD_SIZE={ranks.world_size} instead. Start the run "
                          "with torchrun, or unset them.")
    return ranks


def rank_device(device: torch.device, ranks: Ranks, flag: str | None) -> torch.device:
    """The device of this rank: ``cuda:LOCAL_RANK`` for a CUDA run under DDP, else ``device`` itself.

    ``flag`` is the ``--device`` the user gave (None when unset), named in the errors.
    """
    if not ranks.distributed or device.type != "cuda":
        return device
    if device.index is not None:
        raise ConfigError(f"--device {flag}: under torchrun each rank uses cuda:LOCAL_RANK. Pass --device cuda, "
                          "or leave --device unset.")
    if ranks.local_rank >= torch.cuda.device_count():
        raise ConfigError(f"LOCAL_RANK={ranks.local_rank}: this machine has {torch.cuda.device_count()} CUDA "
                          "device(s). Start at most that many processes per node (--nproc-per-node).")
    return torch.device("cuda", ranks.local_rank)


@contextmanager
def process_group(ranks: Ranks, device: torch.device) -> Iterator[None]:
    """Join the job's process group for the block (NCCL on CUDA, gloo on CPU); leave it after, on an error too.

    One process: nothing. ``MASTER_ADDR``/``MASTER_PORT`` come from the environment (torchrun sets them).
    """
    if not ranks.distributed:
        yield
        return

    if device.type == "cuda":
        torch.cuda.set_device(device)
        # device_id binds the group to this rank's GPU: barriers and object collectives then need no guess.
        dist.init_process_group("nccl", rank=ranks.rank, world_size=ranks.world_size, device_id=device)
    else:
        dist.init_process_group("gloo", rank=ranks.rank, world_size=ranks.world_size)
    try:
        yield
    finally:
        dist.destroy_process_group()


def barrier(ranks: Ranks) -> None:
    """Wait until every rank gets here (one process: return at once)."""
    if ranks.distributed:
        dist.barrier()


@contextmanager
def main_first(ranks: Ranks) -> Iterator[None]:
    """Rank 0 runs the block before the other ranks do: it may write what they then read (a tokenized grid, the
    hub cache). Entered by every rank after its own read-only checks, so no rank checks what rank 0 writes here."""
    barrier(ranks)
    if not ranks.main:
        barrier(ranks)  # released once rank 0 has run the block
    yield
    if ranks.main:
        barrier(ranks)


def gather(value: Any, ranks: Ranks) -> list[Any]:
    """``value`` of every rank, in rank order (picklable objects; one process: ``[value]``)."""
    if not ranks.distributed:
        return [value]

    out: list[Any] = [None] * ranks.world_size
    dist.all_gather_object(out, value)
    return out


def wrap(module: nn.Module, device: torch.device, ranks: Ranks) -> nn.Module:
    """``module`` in DistributedDataParallel (one process: ``module`` itself).

    Every trainable parameter of the student and the objective enters the loss on every step (a term weighted 0
    still backpropagates zeros), so DDP need not search for unused parameters; a model that left one out would stop
    at its second step with DDP's error naming it. Nothing in the model updates a buffer (no batch norm), so buffers
    are not broadcast before each forward.
    """
    if not ranks.distributed:
        return module

    # Newer torch names the per-forward buffer sync forward_sync_buffers (and warns on broadcast_buffers); both
    # sync the buffers once, at construction.
    flag = ("forward_sync_buffers" if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
            else "broadcast_buffers")
    return DistributedDataParallel(module, device_ids=[device.index] if device.type == "cuda" else None,
                                   find_unused_parameters=False, **{flag: False})


def backward_sync(model: nn.Module, *, sync: bool) -> AbstractContextManager[Any]:
    """Around a micro-batch's forward and backward: DDP all-reduces the gradients only when ``sync`` (the step's
    last micro-batch); before that they accumulate locally. A plain module: nothing."""
    if sync:
        return nullcontext()

    return model.no_sync() if isinstance(model, DistributedDataParallel) else nullcontext()


def reduce_step(terms: dict[str, float], tokens: int, device: torch.device, ranks: Ranks) -> tuple[dict[str, float],
                                                                                                     int]:
    """One all_reduce per step: each logged term averaged over ranks, the tokens summed."""
    if not ranks.distributed:
        return terms, tokens

    # [len(terms) + 1] float64: exact for token counts up to 2^53.
    stacked = torch.tensor([*terms.values(), float(tokens)], dtype=torch.float64, device=device)
    dist.all_reduce(stacked)
    values = stacked.tolist()  # one device-to-host copy
    return {k: v / ranks.world_size for k, v in zip(terms, values)}, int(values[-1])


# -------------------------------------------------------------------------------------------------------------
# Launching


def launch(argv: Sequence[str], nproc: int) -> int:
    """Run ``kava distill argv`` in ``nproc`` processes on this machine under torchrun; return its exit status.

    This is the same as running torchrun yourself::

        torchrun --nproc-per-node 4 --standalone -m kava.pipelines.cli distill \\
            --store kv.zarr --student tiny-llama --out runs/ddp --steps 1000

    (``--nproc N`` is dropped from ``argv`` if it is there, so the flag that asked for the launch can be passed
    along). Each rank reads its own shards, so ``--batch-size`` and ``--grad-accum`` are per rank: the global batch
    is ``nproc x grad_accum x batch_size`` samples. ``--resume`` needs the same number of processes as the run it
    continues (under either ``--parallel``: DDP and FSDP checkpoints share one format).

    Across machines, start torchrun on every node with the same rendezvous (``--out`` and the store on a filesystem
    every node sees; rank 0 writes, every rank reads the checkpoint it resumes from)::

        torchrun --nnodes 2 --nproc-per-node 8 --rdzv-backend c10d --rdzv-endpoint HOST:29500 --rdzv-id JOB \\
            -m kava.pipelines.cli distill --store kv.zarr --student ... --out runs/ddp

    SIGINT and SIGTERM sent to this process are passed on to torchrun, which stops its workers before it exits.
    """
    if isinstance(nproc, bool) or not isinstance(nproc, int) or nproc < 1:
        raise ConfigError(f"--nproc: expected an integer >= 1. Got {nproc!r} instead.")
    if "TORCHELASTIC_RUN_ID" in os.environ or os.environ.get("WORLD_SIZE", "1") != "1":
        raise ConfigError("--nproc: this process already runs under torchrun. Drop --nproc, or run `kava distill "
                          "--nproc N` outside torchrun.")
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--standalone",
               "-m", "kava.pipelines.cli", "distill", *_without_nproc(argv)]
    proc = subprocess.Popen(command)
    forwarded = (signal.SIGINT, signal.SIGTERM)
    # torchrun starts each worker in a session of its own: were this process to die first, torchrun (and with it
    # the workers' cleanup) would be cut off, so signals go to torchrun and this process waits for it.
    previous = {}
    if threading.current_thread() is threading.main_thread():
        previous = {s: signal.signal(s, lambda signum, _frame: proc.send_signal(signum)) for s in forwarded}
    try:
        code = proc.wait()
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    return code if code >= 0 else 128 - code  # killed by signal N: the shell's 128 + N


def _without_nproc(argv: Sequence[str]) -> list[str]:
    """``argv`` less ``--nproc N`` / ``--nproc=N``."""
    out: list[str] = []
    skip = False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--nproc":
            skip = True
        elif not arg.startswith("--nproc="):
            out.append(arg)
    return out
