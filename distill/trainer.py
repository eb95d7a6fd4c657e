"""The distillation recipe: one readable loop from a store (or a dataset) to a trained student.

Order of construction, and why:

1. the config, checked whole, with the process layout and ``--out`` (a fresh directory, or the run to resume),
   whose writer lock this run holds to the end (:mod:`kava.core.locks`): nothing loads before every flag is known
   to be sound, and no second run writes the same ``--out``;
2. the store and the teachers' plans (refusing a store without the asked-for teachers or layers, listing what it
   has), because the student preset's layer count and the loader's reads follow from them;
3. the student, checked against the store's tokenizer and layer map;
4. the loader (its request is checked against the store again, now with shard completeness);
5. the objective (projectors, fusion), the optimizer over both, the schedule;
6. a checkpoint, when resuming (after everything it restores into exists), then the RNG, then DDP around the module
   (under ``--parallel fsdp`` the module is sharded in step 5 instead, before the optimizer that must hold its shards);
7. the loop: :func:`optimizer_step` (micro-batches with accumulation, the non-finite check), :func:`log_step` (one
   metrics line), and every N steps :func:`write_checkpoint`;
8. the outputs: the student, its heads and ``kava.json``. Neither a step checkpoint nor the outputs are written from
   non-finite weights (:func:`check_finite_weights`).

Steps 2-6 are :func:`setup`, which returns the :class:`TrainingState` the loop reads and advances. With no store, or
a K/V weight of 0, the same loop is plain fine-tuning: the CE-only baseline.

Under torchrun (``WORLD_SIZE`` > 1) every rank runs this recipe with the same config: it reads its own shards, DDP
averages the gradients, the logged terms are averaged over ranks and the tokens summed, and rank 0 alone writes the
metrics, checkpoints and outputs (:mod:`.ddp`). With ``--parallel fsdp`` the ranks hold shards of the student
instead of copies (:mod:`.fsdp`): the loop is the same, and the writes gather the full state to rank 0 first. One
process runs exactly the loop above.
"""

from __future__ import annotations

import contextlib
import math
import shutil
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kava.core.errors import ConfigError, KavaError
from kava.core.locks import LOCK_NAME, writer_lock
from kava.core.log import Log, log_stderr, quiet

from . import ddp, fsdp
from .balance import balance_scales, grad_shares, term_grad_norms
from .batch import Batch
from .checkpoint import (
    checkpoint_dir,
    latest_checkpoint,
    load_checkpoint,
    remove_partial_checkpoints,
    rng_state,
    save_checkpoint,
    truncate_metrics,
)
from .config import DistillConfig
from .ddp import Ranks
from .loader import StreamLoader
from .module import DistillModule, build_objective
from .optim import make_optimizer, make_schedule
from .outputs import MetricSinks, check_out, progress_line, started_run, write_config, write_manifest
from .routing import PolicyRouter, PolicyTrainer, load_sample_families
from .run_data import RunData, resolve_data
from .student import Student, load_student, save_student
from .trackers import check_trackers

ETA_STEPS = 50
"""Steps whose mean time estimates the time left on the progress line."""


class TrainingError(KavaError):
    """Training cannot go on: a non-finite loss (the state before the step is checkpointed first) or non-finite
    weights (nothing more is written; the checkpoints before stay)."""


@dataclass
class DistillResult:
    """What a run did; ``--json`` prints ``to_dict()``."""

    out: str
    steps: int
    tokens: int
    seconds: float
    final: dict[str, float]
    parameters: dict[str, int]
    data_wait_fraction: float
    resumed_from: int | None = None
    teachers: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class TrainingState:
    """What the loop reads, and the two counters it advances (restored from a checkpoint on resume)."""

    cfg: DistillConfig
    out: Path
    ranks: Ranks
    device: torch.device
    data: RunData
    student: Student
    module: DistillModule
    """What the optimizer, clipping and checkpoints see."""
    model: nn.Module
    """What runs forward and backward: DDP around ``module`` under torchrun, ``module`` itself otherwise (and
    under FSDP, where ``module`` is sharded in place)."""
    optimizer: torch.optim.Optimizer
    schedule: torch.optim.lr_scheduler.LambdaLR
    loader: StreamLoader
    total: int
    """Optimizer steps the run takes (fewer when --epochs runs out of data first)."""
    params: dict[str, int]
    sharded: bool = False
    """FSDP (``--parallel fsdp`` under torchrun): ``module``'s parameters are this rank's shards (DTensors)."""
    step: int = 0
    tokens: int = 0
    measured: dict[str, float] = field(default_factory=dict)
    """Gradient norms, shares and balance scales measured during the step, for its metrics line."""
    recent: deque[float] = field(default_factory=lambda: deque(maxlen=ETA_STEPS))
    """Seconds of this process's last steps, for the progress line's time left."""
    rl: PolicyTrainer | None = None
    """``--fusion rl``: the policy's update around each optimizer step (:mod:`.routing`)."""


@dataclass(frozen=True)
class StepStats:
    """One optimizer step. Under DDP the terms are means over ranks and the tokens sums; times are this rank's."""

    terms: dict[str, float]
    """Every logged term, averaged over the step's micro-batches."""
    tokens: int
    grad_norm: float
    """Of every trainable parameter's gradient, before clipping."""
    seconds: float
    wait: float
    """Of ``seconds``, the time spent waiting for the loader."""


def run_distill(cfg: DistillConfig, *, log: Log = log_stderr) -> DistillResult:
    """Train ``cfg.student`` and write it, with its heads, config and metrics, into ``cfg.out``.

    Under torchrun (``WORLD_SIZE`` > 1) every rank calls this with the same config and trains with DDP on its own
    shards; rank 0 alone writes and logs (see :mod:`.ddp`). Every rank returns the run's result (times its own).
    """
    started = time.perf_counter()
    # 1. The config, the process layout and the output directory, checked by every rank before any rank writes.
    cfg.validate()
    ranks = ddp.ranks_from_env()
    out = Path(cfg.out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file, not a directory. Choose another --out.")
    check_trackers(cfg.report.trackers)  # --tracker, --tensorboard: each one's package, before anything loads
    # One writer per --out: rank 0 holds <out>/.kava.lock until the run ends (the kernel drops it if the process
    # dies), taken before the output is checked so that two runs can't both find it free.
    with contextlib.ExitStack() as held:
        if ranks.main:
            out.mkdir(parents=True, exist_ok=True)
            held.enter_context(writer_lock(out / LOCK_NAME, output=out, fix="choose another --out"))
        resume_from = check_out(cfg, out, ranks.world_size)
        if cfg.threads is not None:
            torch.set_num_threads(cfg.threads)
        device = torch.device(cfg.trainer.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ConfigError(f"--device {cfg.trainer.device}: CUDA is not available here. Use --device cpu.")
        device = ddp.rank_device(device, ranks, cfg.trainer.device)
        with ddp.process_group(ranks, device):  # one process: no group
            state = setup(cfg, out, resume_from, device, ranks, log if ranks.main else quiet)
            return train(state, log if ranks.main else quiet, resumed_from=resume_from, started=started)


def setup(cfg: DistillConfig, out: Path, resume_from: Path | None, device: torch.device, ranks: Ranks,
          log: Log) -> TrainingState:
    """Steps 2-6 of the recipe on one rank: everything the loop needs, restored from ``resume_from`` when given."""
    # 2-3. Data, teachers and the student. Rank 0 goes first: without --store it tokenizes --dataset into
    # <out>/grid.zarr, and a hub student lands in the cache; the other ranks then read both.
    with ddp.main_first(ranks):
        out.mkdir(parents=True, exist_ok=True)
        data = resolve_data(cfg, out, log)
        lora = cfg.lora
        student = load_student(cfg.student, tokenizer=data.tokenizer, num_layers=data.student_layers,
                               seed=cfg.trainer.seed, lora_r=lora.lora_r, lora_alpha=lora.lora_alpha,
                               lora_targets=lora.lora_targets, trust_remote_code=cfg.trust_remote_code,
                               attn_implementation=cfg.attn_implementation)
    data.check_student(student)

    # 4. The loader: every rank of a DDP job reads its own shards, and as many batches as every other rank. Building
    # it checks the request against the store (teachers, layers, Q, finished shards), still before anything trains.
    loader = StreamLoader(data.loader_config(cfg, rank=ranks.rank, world_size=ranks.world_size),
                          epochs=cfg.trainer.epochs)
    if ranks.distributed:
        _check_same_shards(loader, data, ranks)

    # 5. Objective, optimizer, schedule. The objective's random init is seeded apart from the student's; every rank
    # draws the same weights (and DDP broadcasts rank 0's anyway).
    torch.manual_seed(cfg.trainer.seed + 1)
    objective = build_objective(cfg, data, student) if cfg.uses_kv else None
    tf = cfg.teacher_fusion
    if objective is not None and tf.sample_families is not None:  # before the optimizer: rl may add parameters
        objective.attach_families(load_sample_families(tf.sample_families, data.store.sample_ids))
    if objective is not None and tf.fusion == "rl" and ranks.distributed:
        raise ConfigError("--fusion rl updates its policy in one process: each rank would draw and learn its own. "
                          "Train without --nproc/torchrun, or use another --fusion.")
    module = DistillModule(student, objective, cfg, logit_teachers=data.logit_teachers)
    if module.balance and ranks.distributed:
        raise ConfigError("--balance gradnorm runs on one process: its scales would differ between ranks. Drop "
                          "--balance or train without --nproc/torchrun.")
    # FSDP shards the module before the optimizer is built (it must hold the shards, not the full tensors) and
    # moves it to the device one unit at a time; otherwise the whole module goes there now.
    sharded = cfg.trainer.parallel == "fsdp" and ranks.distributed
    if cfg.trainer.parallel == "fsdp" and not sharded:
        log("--parallel fsdp in one process: nothing to shard across, so the whole student trains here")
    if sharded:
        fsdp.shard(module, student.inner, device, ranks, bf16=_bf16(cfg, device))
    else:
        module = module.to(device)
    optimizer = make_optimizer(module, cfg)
    if cfg.trainer.steps is not None:
        total = cfg.trainer.steps
    else:
        micro = sum(len(loader.plan(e).batches) for e in range(cfg.trainer.epochs or 1))
        total = max(1, micro // cfg.trainer.grad_accum)
    warmup = cfg.trainer.warmup_steps if cfg.trainer.warmup_steps is not None else max(1, round(0.05 * total))
    schedule = make_schedule(optimizer, total, warmup, cfg.trainer.min_lr_ratio)
    params = {"student_trainable": student.trainable_parameters(), "student_total": student.total_parameters()}
    if objective is not None:
        params.update(objective.parameter_counts())

    # 6. Resume: everything restored into exists now. Every rank reads the checkpoint rank 0 wrote.
    step, tokens, saved = 0, 0, None
    if resume_from is not None:
        saved = load_checkpoint(resume_from, module, optimizer, schedule, cfg, list(loader.shards),
                                world_size=ranks.world_size, rank=ranks.rank, sharded=sharded)
        step, position, tokens = saved["step"], tuple(saved["position"]), saved["tokens"]
        loader.seek(position)
        if ranks.main:
            truncate_metrics(out / "metrics.jsonl", step)
        log(f"resumed from {resume_from.name}: step {step}, loader at epoch {position[0]} batch {position[1]}")
    elif ranks.main:
        if started_run(out):  # stopped before its first checkpoint: nothing to continue, so start over
            log(f"{out} holds a run that stopped before its first checkpoint: starting it again from step 0")
            shutil.rmtree(out / "tb", ignore_errors=True)
        elif cfg.resume:
            log(f"--resume: {out} holds no checkpoint yet: starting from step 0")
        (out / "metrics.jsonl").write_text("")
        write_config(cfg, out)
    if ranks.main:
        for partial in remove_partial_checkpoints(out):
            log(f"removed {partial.name}, a checkpoint left half-written when the run stopped")
    # Dropout etc., each rank its own draws; a resumed run also restores each rank's exact RNG state.
    torch.manual_seed(cfg.trainer.seed + 2 + step + _RANK_SEED_STRIDE * ranks.rank)
    if saved is not None:
        torch.set_rng_state(saved["rng"]["torch"])
        if device.type == "cuda" and saved["rng"].get("cuda") is not None:
            torch.cuda.set_rng_state_all(saved["rng"]["cuda"])
    # DDP wraps the module after the restore, so the ranks start from the checkpoint.
    model = module if sharded else ddp.wrap(module, device, ranks)
    rl = None
    if objective is not None and isinstance(module.objective.fusion, PolicyRouter):  # type: ignore[union-attr]
        rl = PolicyTrainer(module.student, module.objective.fusion, module.objective,  # type: ignore[union-attr]
                           ce_on=cfg.objective.ce_on, lr=tf.rl_lr, entropy=tf.rl_entropy)

    log(f"student {cfg.student}: {params['student_trainable']:,} trainable of {params['student_total']:,} parameters"
        + "".join(f"; {k} {v:,}" for k, v in params.items() if k.startswith(("projector", "router")) and v))
    log(f"training {total} steps of {cfg.trainer.grad_accum} x {cfg.trainer.batch_size} samples on {device}"
        + (f" x {ranks.world_size} ranks" + (" (FSDP)" if sharded else "") if ranks.distributed else "")
        + (f", K/V from {', '.join(data.teacher_names)} ({cfg.objective.loss}, layers {list(data.kv_layers)})"
           if objective is not None else ", cross-entropy only" if not data.logit_teachers else "")
        + (f", logits from {', '.join(t.name for t in data.logit_teachers)}" if data.logit_teachers else ""))
    return TrainingState(cfg=cfg, out=out, ranks=ranks, device=device, data=data, student=student, module=module,
                         model=model, optimizer=optimizer, schedule=schedule, loader=loader, total=total,
                         params=params, sharded=sharded, step=step, tokens=tokens, rl=rl)


def train(state: TrainingState, log: Log, *, resumed_from: Path | None, started: float) -> DistillResult:
    """Steps 7-8 of the recipe on one rank: the loop, then the outputs (written by rank 0)."""
    cfg = state.cfg
    # 7. The loop.
    batches = iter(state.loader)
    autocast = _autocast(cfg, state.device)
    sinks = MetricSinks.open(cfg, state.out, main=state.ranks.main, step=state.step,
                             store_digest=state.data.store.digest())
    wait_total = step_total = 0.0
    last: dict[str, float] = {}
    try:
        while state.step < state.total:
            stats = optimizer_step(state, batches, autocast)
            if stats is None:
                break  # the data ran out (--epochs): the schedule's last steps were never reached
            wait_total += stats.wait
            step_total += stats.seconds
            last = log_step(state, stats, sinks, log)
            every = cfg.trainer.checkpoint_every
            if (every and state.step % every == 0) or state.step == state.total:
                write_checkpoint(state)
    finally:
        close = getattr(batches, "close", None)
        if close is not None:
            close()  # stops the loader's worker processes now rather than at garbage collection
        sinks.close()
        if state.rl is not None:
            state.rl.close()

    # 8. Outputs, written by rank 0; the other ranks return once they are whole. Never a broken model.
    check_finite_weights(state)
    weights = fsdp.full_model_state(state.module) if state.sharded else None  # every rank: a collective
    if state.ranks.main:
        if weights is not None:
            fsdp.save_student(state.student, state.out, weights)
        else:
            save_student(state.student, state.out)
        state.module.save_heads(state.out, weights)
        write_manifest(cfg, state.out, state.data, state.step, state.tokens, last, state.params)
    ddp.barrier(state.ranks)
    return DistillResult(out=str(state.out), steps=state.step, tokens=state.tokens,
                         seconds=time.perf_counter() - started, final=last, parameters=state.params,
                         data_wait_fraction=wait_total / step_total if step_total else 0.0,
                         resumed_from=None if resumed_from is None else int(resumed_from.name.split("-")[-1]),
                         teachers=list(state.data.teacher_names))


def optimizer_step(state: TrainingState, batches: Iterator[Batch],
                   autocast: contextlib.AbstractContextManager[Any]) -> StepStats | None:
    """Accumulate ``--grad-accum`` micro-batches, check that every logged term is finite, clip, step; advance
    ``state.step`` and ``state.tokens``. None when the data ran out before the step's first micro-batch (--epochs).

    A non-finite term stops the run with :class:`TrainingError`, after a checkpoint of the state before this step
    (``nan-step-N``). One process stops at once, before that micro-batch's backward. Under DDP a rank stopping alone
    would leave the others waiting in the gradients' all-reduce: every rank finishes its backwards, the terms are
    averaged over ranks, and a non-finite mean stops every rank together, before the optimizer moves.
    """
    cfg, ranks = state.cfg, state.ranks
    t0 = time.perf_counter()
    wait = 0.0
    tokens = 0
    sums: dict[str, float] = {}
    bad_samples: list[int] | None = None  # under DDP: this rank's micro-batch with a non-finite term
    for micro in range(cfg.trainer.grad_accum):
        tw = time.perf_counter()
        try:
            batch = next(batches)
        except StopIteration:
            break
        wait += time.perf_counter() - tw
        batch = batch.to(state.device, non_blocking=True)
        # DDP all-reduces the gradients in the step's last backward; the earlier ones accumulate locally.
        # Every rank has as many batches as the others, so all of them agree on which backward is last.
        with ddp.backward_sync(state.model, sync=micro == cfg.trainer.grad_accum - 1 or _exhausted(state.loader)):
            with autocast:
                loss, terms = state.model(batch)
            if state.rl is not None:
                state.rl.record(batch)
            if micro == 0:
                loss = _balance_terms(state, loss)
                terms["loss/total"] = loss.detach()
            # One device-to-host copy per micro-batch for every logged term (and the NaN check).
            values = dict(zip(terms, torch.stack([v.float() for v in terms.values()]).tolist()))
            bad = _non_finite(values)
            if bad and not ranks.distributed:
                path = write_checkpoint(state, tag=f"nan-step-{state.step + 1}")
                raise _nan_error(bad[0], values[bad[0]], state.step, batch.sample_indices.tolist(), path)
            if bad and bad_samples is None:
                bad_samples = batch.sample_indices.tolist()
            (loss / cfg.trainer.grad_accum).backward()
        for k, v in values.items():
            sums[k] = sums.get(k, 0.0) + v / cfg.trainer.grad_accum
        tokens += batch.num_tokens
    if not sums:
        return None
    if ranks.distributed:
        # A rank's non-finite term shows in the mean: every rank stops here together, after the backward's
        # all-reduce and before the step, once rank 0 has saved the state before this step.
        sums, tokens = ddp.reduce_step(sums, tokens, state.device, ranks)
        bad = _non_finite(sums)
        if bad:
            path = write_checkpoint(state, tag=f"nan-step-{state.step + 1}")
            raise _nan_error(bad[0], sums[bad[0]], state.step, bad_samples, path)
    trained = [p for p in state.module.parameters() if p.requires_grad]
    max_norm = cfg.trainer.max_grad_norm if cfg.trainer.max_grad_norm > 0 else float("inf")
    # Under FSDP each rank holds shards of the gradient: the norm is the whole gradient's, all-reduced.
    grad_norm = (fsdp.clip_grad_norm_(trained, max_norm) if state.sharded
                 else torch.nn.utils.clip_grad_norm_(trained, max_norm))
    state.optimizer.step()
    state.schedule.step()
    state.optimizer.zero_grad(set_to_none=True)
    if state.rl is not None:  # the policy learns from what this step did to each sample's loss
        t_rl = time.perf_counter()
        state.measured.update(state.rl.update())
        state.measured["rl/seconds"] = time.perf_counter() - t_rl
    state.step += 1
    state.tokens += tokens
    seconds = time.perf_counter() - t0
    return StepStats(terms=sums, tokens=tokens, grad_norm=float(grad_norm), seconds=seconds, wait=wait)


def _balance_terms(state: TrainingState, loss: torch.Tensor) -> torch.Tensor:
    """On a step's first micro-batch: fix --balance gradnorm's scales (first step only; the loss is summed again
    with them) and, every --grad-shares-every steps, measure each term's gradient norm and share on the student
    into ``state.measured`` (``balance/*``, ``grad_norm/*``, ``grad_share/*`` in the step's metrics line).

    Both take gradients of the terms on the graph the forward built (``kava.distill.balance``), before the real
    backward. Under DDP they are skipped: the norms would be one rank's, and balance scales must agree on every rank.
    """
    module, cfg = state.module, state.cfg
    every = cfg.report.grad_shares_every
    measure = every > 0 and (state.step + 1) % every == 0
    if state.ranks.distributed or not (measure or (module.balance and not module.scales_set)):
        return loss
    shared = [p for p in module.student.parameters() if p.requires_grad]
    if module.balance and not module.scales_set:
        scales = balance_scales(term_grad_norms(module.parts, shared))
        module.set_scales(scales)
        loss = module.total()
        state.measured.update({f"balance/{k}": v for k, v in scales.items()})
    if measure:
        norms = term_grad_norms(module.weighted_parts(), shared)
        state.measured.update({f"grad_norm/{k}": v for k, v in norms.items()})
        state.measured.update({f"grad_share/{k}": v for k, v in grad_shares(norms).items()})
    return loss


def log_step(state: TrainingState, stats: StepStats, sinks: MetricSinks, log: Log) -> dict[str, float]:
    """Write the step's metrics line (``metrics.jsonl``, the --tracker trackers) and, every --log-every steps, the
    progress line; return the line."""
    epoch, _ = state.loader.position
    record = {"step": state.step, "epoch": epoch, "lr": float(state.schedule.get_last_lr()[0]), **stats.terms,
              "grad_norm": stats.grad_norm, "tokens": stats.tokens, "tokens_per_s": stats.tokens / stats.seconds,
              "step_s": stats.seconds, "data_wait_s": stats.wait, "data_wait_frac": stats.wait / stats.seconds,
              **state.measured}
    state.measured.clear()
    sinks.write(record)
    state.recent.append(stats.seconds)
    if state.cfg.report.progress and (state.step % state.cfg.report.log_every == 0 or state.step in (1, state.total)):
        # Time left from the mean of the recent steps: the first steps (compilation, page cache) weigh less soon.
        eta = (state.total - state.step) * sum(state.recent) / len(state.recent)
        log(progress_line(record, state.total, eta_s=eta))
    return record


def write_checkpoint(state: TrainingState, *, tag: str | None = None) -> Path:
    """Checkpoint the state after ``state.step`` steps (``step-N``, or ``tag``). Every rank hands rank 0 its RNG
    state; rank 0 writes; the others wait until the checkpoint is whole. A ``step-N`` checkpoint of non-finite
    weights is refused (:func:`check_finite_weights`)."""
    ranks = state.ranks
    if tag is None:  # a resumable checkpoint; a nan-step-N one keeps the state as it was, for a look
        check_finite_weights(state)  # every rank: DDP keeps their weights equal (FSDP reduces the check): all stop
    rank_rng = ddp.gather(rng_state(), ranks) if ranks.distributed else None
    # FSDP: every rank sends its shards; rank 0 gets the full weights and optimizer state (on CPU) to write.
    weights, optimizer_state = fsdp.full_state(state.module, state.optimizer) if state.sharded else (None, None)
    path = checkpoint_dir(state.out) / (tag or f"step-{state.step:06d}")
    if ranks.main:
        path = save_checkpoint(state.out, state.module, state.optimizer, state.schedule, state.cfg, step=state.step,
                               position=state.loader.position, tokens=state.tokens,
                               keep=state.cfg.trainer.keep_checkpoints,
                               shards=list(state.loader.shards), tag=tag, world_size=ranks.world_size,
                               rank_rng=rank_rng, weights=weights, optimizer_state=optimizer_state)
    ddp.barrier(ranks)
    return path


def check_finite_weights(state: TrainingState) -> None:
    """Refuse to write a model with a NaN or infinite weight (a learning rate far too high gets there in one step
    with every logged loss still finite): stop with :class:`TrainingError` naming the step, and keep the
    checkpoints already written. Under FSDP each rank checks its shards and the flags are reduced over ranks."""
    params = list(state.module.named_parameters())
    finite = fsdp.finite_flags([p for _, p in params], state.sharded)  # one device sync
    bad = [name for (name, _), ok in zip(params, finite) if not ok]
    if not bad:
        return
    last = latest_checkpoint(state.out)
    kept = f"the last good checkpoint is {last}" if last is not None else "no checkpoint was written before it"
    raise TrainingError(
        f"The model's weights are not finite after step {state.step} ({len(bad)} tensors, first {bad[0]}). "
        f"Stopped without writing them; {kept}. Lower --lr and start a new run with another --out."
    )


_RANK_SEED_STRIDE = 1_000_003
"""Rank ``r`` seeds its dropout with ``seed + 2 + step + r * stride``: apart from every other rank's for runs of
fewer steps than the stride; rank 0 (and a single process) with ``seed + 2 + step``."""


def _check_same_shards(loader: StreamLoader, data: RunData, ranks: Ranks) -> None:
    """Under DDP: refuse ranks that planned with different usable shards (an extraction still finishing some)."""
    seen = ddp.gather(list(loader.shards), ranks)
    if any(s != seen[0] for s in seen):
        raise ConfigError(
            f"{data.store.where}: expected every rank to plan with the same usable shards. Got "
            f"{[len(s) for s in seen]} shards on ranks 0-{ranks.world_size - 1} instead: an extraction is still "
            "finishing shards. Start the run once it has stopped, or drop --allow-incomplete."
        )


def _exhausted(loader: StreamLoader) -> bool:
    """Whether the loader has yielded its last batch (only with --epochs: otherwise it streams on)."""
    return loader.epochs is not None and loader.position[0] >= loader.epochs


def _non_finite(values: dict[str, float]) -> list[str]:
    """The loss terms in ``values`` that are NaN or infinite, the most specific first: a NaN in K alone makes
    loss/kv and loss/total NaN too."""
    return [k for k in ("loss/ce", "loss/k", "loss/v", "loss/attn", "loss/kv", "loss/logit", "loss/total")
            if k in values and not math.isfinite(values[k])]


def _nan_error(term: str, value: float, step: int, samples: list[int] | None, path: Path) -> TrainingError:
    where = f"samples {samples}" if samples is not None else "samples on another rank"
    return TrainingError(
        f"Loss term {term} is {value} at step {step + 1} ({where}). Stopped; the state before this step is in "
        f"{path}. Lower --lr, check the store with `kava store verify`, or drop those samples."
    )


def _bf16(cfg: DistillConfig, device: torch.device) -> bool:
    """Whether the run computes in bf16: ``--precision bf16``, or ``auto`` on CUDA."""
    return cfg.trainer.precision == "bf16" or (cfg.trainer.precision == "auto" and device.type == "cuda")


def _autocast(cfg: DistillConfig, device: torch.device) -> contextlib.AbstractContextManager[Any]:
    """bf16 autocast with ``--precision bf16`` (or ``auto`` on CUDA); otherwise a context that does nothing.

    Under FSDP with bf16 on CUDA the student's gathered parameters are bf16 already; autocast stays on so that the
    ops it keeps in fp32 (softmax, norms, losses) still run in fp32, and so that fp32 inputs (the decoded teacher
    K/V) meet bf16 weights in the projectors."""
    if not _bf16(cfg, device):
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
