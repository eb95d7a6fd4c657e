"""Resumable checkpoints: ``<out>/checkpoints/step-NNNNNN/``.

Each holds the weights of the student and its heads (``weights.safetensors``), the optimizer, the schedule and
the RNG states (``state.pt``, read back with ``weights_only=True``; under DDP every rank's), and ``state.json``
(step, loader position, tokens seen, the number of processes, the run's config). A checkpoint is written under a
``.tmp`` name and renamed into place when whole, so a run killed while writing one leaves the previous checkpoint as
the latest.

Under ``--parallel fsdp`` no rank holds the whole model: the full weights and optimizer state are gathered to rank 0
(:func:`kava.distill.fsdp.full_state`) and written in the same files and layout, and on resume rank 0 reads them and
hands every rank its shards. One format for every layout: a checkpoint of one resumes in the other.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import load_file, load_model, save_file, save_model
from transformers import AutoModelForCausalLM

from kava.core.errors import CheckpointError, ConfigError, short_repr

from . import fsdp
from .config import DistillConfig

if TYPE_CHECKING:
    from transformers import PreTrainedModel

_STEP_DIR = re.compile(r"^step-(\d+)$")
_UNSAFE_FOUND = re.compile(r"[Uu]nsupported (?:global: )?(?:GLOBAL [\w.]+|operand \d+)")


def checkpoint_dir(out: Path) -> Path:
    return out / "checkpoints"


def step_checkpoints(out: Path) -> list[tuple[int, Path]]:
    """Every complete step checkpoint as ``(step, path)``, oldest first."""
    root = checkpoint_dir(out)
    if not root.is_dir():
        return []
    return sorted((int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_DIR.match(p.name)) and
                  (p / "state.json").exists())


def remove_partial_checkpoints(out: Path) -> list[Path]:
    """Remove the ``.step-*.tmp`` folders a run killed while writing a checkpoint left behind; return them."""
    root = checkpoint_dir(out)
    partial = sorted(root.glob(".step-*.tmp")) if root.is_dir() else []
    for p in partial:
        shutil.rmtree(p, ignore_errors=True)
    return partial


def latest_checkpoint(out: Path) -> Path | None:
    """The complete checkpoint with the highest step, or None."""
    steps = step_checkpoints(out)
    return steps[-1][1] if steps else None


def student_at(out: Path, checkpoint: Path) -> PreTrainedModel:
    """The student saved in ``out`` (its config and architecture) with the weights of ``checkpoint``, in eval mode:
    what a learning curve of task accuracy evaluates."""
    model = AutoModelForCausalLM.from_pretrained(out)
    saved = load_file(str(checkpoint / "weights.safetensors"))
    own = {k[len("student."):]: v for k, v in saved.items() if k.startswith("student.")}  # heads are not the student's
    if any("lora_" in k for k in own):
        raise ConfigError(f"{checkpoint}: a LoRA checkpoint holds adapters, not a merged student; evaluate the final "
                          "student instead.")
    # Tied weights (embedding = LM head) are saved under one of their names: a missing name is fine when a name
    # sharing its storage was loaded.
    groups: dict[int, set[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        groups.setdefault(param.data_ptr(), set()).add(name)
    missing, unexpected = model.load_state_dict(own, strict=False)
    lost = [k for k in missing if not any(n in own for g in groups.values() if k in g for n in g)]
    if lost or unexpected:
        raise ConfigError(f"{checkpoint}: its weights do not fit the student in {out} (missing {sorted(lost)[:3]}, "
                          f"unexpected {sorted(unexpected)[:3]}).")
    return model.eval()


def rng_state() -> dict[str, Any]:
    """This process's RNG states: the CPU generator's and every CUDA device's (None without CUDA)."""
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def save_checkpoint(out: Path, module: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    schedule: torch.optim.lr_scheduler.LRScheduler, cfg: DistillConfig, *,
                    step: int, position: tuple[int, int], tokens: int, keep: int, shards: list[int],
                    tag: str | None = None, world_size: int = 1,
                    rank_rng: list[dict[str, Any]] | None = None,
                    weights: dict[str, torch.Tensor] | None = None,
                    optimizer_state: dict[str, Any] | None = None) -> Path:
    """Write a checkpoint of the state after ``step`` optimizer steps; keep the newest ``keep`` step checkpoints.

    Under DDP rank 0 writes it for the job: ``world_size`` ranks, whose RNG states (:func:`rng_state`, in rank
    order) are ``rank_rng``; without them this process's own are saved. Under FSDP ``module`` and ``optimizer`` hold
    this rank's shards only: ``weights`` and ``optimizer_state`` are the full ones gathered to rank 0
    (:func:`kava.distill.fsdp.full_state`), written instead.
    """
    root = checkpoint_dir(out)
    root.mkdir(parents=True, exist_ok=True)
    final = root / (tag or f"step-{step:06d}")
    tmp = root / f".{final.name}.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        if weights is not None:
            save_weights(weights, tmp / "weights.safetensors")
        else:
            save_model(module, str(tmp / "weights.safetensors"))  # handles tied embeddings (shared storage)
        state: dict[str, Any] = {"optimizer": optimizer.state_dict() if optimizer_state is None else optimizer_state,
                                 "schedule": schedule.state_dict(), "rng": rank_rng[0] if rank_rng else rng_state()}
        if rank_rng:
            state["rank_rng"] = rank_rng
        torch.save(state, tmp / "state.pt")
        # The shards the loader planned with: with --allow-incomplete they can grow between runs, and the order
        # with them. The loader's position is one rank's, and every rank's only for the same number of ranks.
        meta = {"step": step, "position": list(position), "tokens": tokens, "shards": list(shards),
                "world_size": world_size, "config": cfg.to_dict()}
        (tmp / "state.json").write_text(json.dumps(meta, indent=2, default=str))
        for f in tmp.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # a full disk leaves the previous checkpoint, and no partial one
        raise
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)
    if tag is None:
        for _, old in step_checkpoints(out)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def save_weights(weights: dict[str, torch.Tensor], path: Path) -> None:
    """Write a state dict as ``save_model`` writes a module's: of the names sharing one tensor (tied embeddings) the
    first in sorted order is kept and the others are recorded in the metadata, so a gathered FSDP state dict gives
    the file a plain module gives."""
    groups: dict[int, list[str]] = {}
    for name, tensor in weights.items():
        groups.setdefault(id(tensor), []).append(name)
    metadata: dict[str, str] = {}
    kept = {}
    for names in groups.values():
        first, *others = sorted(names)
        kept[first] = weights[first].contiguous()
        metadata.update({other: first for other in others})
    save_file(kept, str(path), metadata=metadata or None)


def check_world_size(path: Path, world_size: int) -> None:
    """Refuse to resume ``path`` with another number of processes: the ranks' shards and the saved loader position
    hold only for the number it was written with (checkpoints from before DDP were written by one)."""
    saved = int(json.loads((path / "state.json").read_text()).get("world_size", 1))
    if saved != world_size:
        fix = ("Resume it in one process, without torchrun" if saved == 1 else
               f"Resume it with {saved} processes (torchrun --nproc-per-node {saved}, or kava distill --nproc {saved})")
        raise ConfigError(
            f"--resume: {path} was written by a run of {saved} process(es) (WORLD_SIZE={saved}), and this run has "
            f"{world_size} (WORLD_SIZE={world_size}); each rank's shards and the saved loader position depend on "
            f"the number of processes. {fix}, or start a new run with another --out."
        )


def load_checkpoint(path: Path, module: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    schedule: torch.optim.lr_scheduler.LRScheduler, cfg: DistillConfig, shards: list[int], *,
                    world_size: int = 1, rank: int = 0, sharded: bool = False) -> dict[str, Any]:
    """Restore ``path`` into the run's objects; refuse when the run's config, usable shards or number of processes
    differ. The returned ``rng`` is rank ``rank``'s.

    ``sharded`` (FSDP): every rank calls it; rank 0 alone reads the weights and the optimizer state and every rank
    gets its shards of them (:func:`kava.distill.fsdp.load_full_state`)."""
    check_world_size(path, world_size)
    meta = json.loads((path / "state.json").read_text())
    changed = cfg.resume_differences(meta["config"])
    if changed:
        raise ConfigError(
            f"--resume: {path} was written by a run with other settings, and resuming would not continue it: "
            + "; ".join(changed) + ". Resume with the original flags, or start a new run with another --out."
        )
    if list(meta["shards"]) != list(shards):
        raise ConfigError(
            f"--resume: {path} was trained on {len(meta['shards'])} usable shards, and the store now offers "
            f"{len(shards)}; the data order would change. Resume only after the extraction stops changing the store, "
            "or start a new run with another --out."
        )
    if sharded:
        state = _load_sharded(path, module, optimizer, rank)
    else:
        load_model(module, str(path / "weights.safetensors"))
        state = load_state(path / "state.pt")
        optimizer.load_state_dict(state["optimizer"])
    schedule.load_state_dict(state["schedule"])
    return {**meta, "rng": state["rank_rng"][rank] if "rank_rng" in state else state["rng"]}


def _load_sharded(path: Path, module: torch.nn.Module, optimizer: torch.optim.Optimizer,
                  rank: int) -> dict[str, Any]:
    """FSDP's half of :func:`load_checkpoint`: rank 0 reads ``path`` (one full copy in CPU memory, not one per rank),
    every rank takes its shards, and the small rest of ``state.pt`` (schedule, RNG states) goes to every rank.
    A file rank 0 can't read stops every rank, rather than leaving them waiting in the broadcast."""
    weights = state = None
    error: Exception | None = None
    if rank == 0:
        try:
            weights = load_file(str(path / "weights.safetensors"))
            state = load_state(path / "state.pt")
        except (CheckpointError, OSError, RuntimeError) as e:  # safetensors' errors are RuntimeErrors
            error = e
    failed = fsdp.broadcast_object(None if error is None else f"{type(error).__name__}: {error}")
    if error is not None:
        raise error
    if failed is not None:
        raise CheckpointError(f"{path}: rank 0 could not read it ({failed}). Delete it to resume from the "
                              "checkpoint before, or start a new run.")
    fsdp.load_full_state(module, optimizer, weights, state["optimizer"] if state is not None else None)
    rest = fsdp.broadcast_object({k: v for k, v in state.items() if k != "optimizer"} if state is not None else None)
    return dict(rest)


def load_state(path: Path) -> dict[str, Any]:
    """``state.pt`` read with ``weights_only=True``: tensors and plain containers only. A file holding anything else
    (a pickle that would run code) is refused in one line, naming the file."""
    try:
        state = torch.load(path, weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, AttributeError) as e:
        # torch's message is a paragraph of advice (including "set weights_only=False", which we never do); keep
        # what it found, e.g. "unsupported GLOBAL posix.system" or "Unsupported operand 110".
        found = _UNSAFE_FOUND.search(str(e))
        first = found.group(0) if found else f"{type(e).__name__}: not a torch checkpoint"
        raise CheckpointError(
            f"Expected {path} to hold only tensors and plain values, as `kava distill` writes it. It can't be loaded "
            f"safely ({first}). It was not written by this run or is damaged: delete its checkpoint folder to resume "
            "from the one before, or start a new run."
        ) from None
    if not isinstance(state, dict) or not {"optimizer", "schedule", "rng"} <= set(state):
        raise CheckpointError(f"Expected {path} to hold the optimizer, schedule and RNG states. Got "
                              f"{short_repr(sorted(state) if isinstance(state, dict) else type(state).__name__)}. "
                              "Delete its checkpoint folder to resume from the one before, or start a new run.")
    return state


def truncate_metrics(path: Path, step: int) -> None:
    """Drop metrics lines past ``step`` (written after the checkpoint a run resumes from)."""
    if not path.exists():
        return
    kept = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= step]
    path.write_text("".join(line + "\n" for line in kept))
