"""The distillation recipe: one readable loop from a store (or a dataset) to a trained student.

Order of construction, and why:

1. the config, checked whole (nothing loads before every flag is known to be sound);
2. the store and the teachers' plans (refusing a store without the asked-for teachers or layers, listing what it
   has), because the student preset's layer count and the loader's reads follow from them;
3. the student, checked against the store's tokenizer and layer map;
4. the loader (its request is checked against the store again, now with shard completeness);
5. the objective (projectors, fusion), the optimizer over both, the schedule;
6. a checkpoint, when resuming — after everything it restores into exists;
7. the loop: micro-batches with accumulation, one optimizer step, one metrics line, a checkpoint every N steps.

With no store, or a K/V weight of 0, the same loop is plain fine-tuning: the CE-only baseline.

Under torchrun (``WORLD_SIZE`` > 1) every rank runs this recipe with the same config: it reads its own shards, DDP
averages the gradients, the logged terms are averaged over ranks and the tokens summed, and rank 0 alone writes the
metrics, checkpoints and outputs (:mod:`.ddp`). One process runs exactly the loop above.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kava.core.log import Log, log_stderr, quiet
from kava.core.errors import ConfigError, KavaError

from .config import DistillConfig
from .ddp import Ranks


class TrainingError(KavaError):
    """Training cannot go on (a non-finite loss); a checkpoint was written first."""


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


def run_distill(cfg: DistillConfig, *, log: Log = log_stderr) -> DistillResult:
    """Train ``cfg.student`` and write it, with its heads, config and metrics, into ``cfg.out``.

    Under torchrun (``WORLD_SIZE`` > 1) every rank calls this with the same config and trains with DDP on its own
    shards; rank 0 alone writes and logs (see :mod:`.ddp`). Every rank returns the run's result (times its own).
    """
    import torch

    from . import ddp

    started = time.perf_counter()
    # 1. The config, the process layout and the output directory, checked by every rank before any rank writes.
    cfg.validate()
    ranks = ddp.ranks_from_env()
    out = Path(cfg.out)
    resume_from = _check_out(cfg, out, ranks.world_size)
    if cfg.tensorboard:
        _check_tensorboard()
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    device = torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {cfg.device}: CUDA is not available here. Use --device cpu.")
    device = ddp.rank_device(device, ranks, cfg.device)
    with ddp.process_group(ranks, device):  # one process: no group
        return _train(cfg, out, resume_from, device, ranks, log if ranks.main else quiet, started)


def _train(cfg: DistillConfig, out: Path, resume_from: Path | None, device: Any, ranks: Ranks, log: Log,
           started: float) -> DistillResult:
    """Steps 2-8 of the recipe, on every rank of the job (``ranks``); ``log`` is silent except on rank 0."""
    import torch

    from . import ddp
    from .checkpoint import checkpoint_dir, load_checkpoint, rng_state, save_checkpoint, truncate_metrics
    from .loader import StreamLoader
    from .student import load_student, save_student
    from .steps import DistillModule, build_objective, make_optimizer, make_schedule, resolve_data

    main = ranks.main  # rank 0: the only writer
    # 2-3. Data, teachers and the student. Rank 0 goes first: without --store it tokenizes --dataset into
    # <out>/grid.zarr, and a hub student lands in the cache; the other ranks then read both.
    with ddp.main_first(ranks):
        out.mkdir(parents=True, exist_ok=True)
        data = resolve_data(cfg, out, log)
        student = load_student(cfg.student, tokenizer=data.tokenizer, num_layers=data.student_layers, seed=cfg.seed,
                               lora_r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_targets=cfg.lora_targets,
                               trust_remote_code=cfg.trust_remote_code)
    data.check_student(student)

    # 4. The loader: every rank of a DDP job reads its own shards, and as many batches as every other rank. Building
    # it checks the request against the store (teachers, layers, Q, finished shards), still before anything trains.
    loader = StreamLoader(data.loader_config(cfg, rank=ranks.rank, world_size=ranks.world_size), epochs=cfg.epochs)
    if ranks.distributed:
        seen = ddp.gather(list(loader.shards), ranks)
        if any(s != seen[0] for s in seen):
            raise ConfigError(
                f"{data.store.where}: expected every rank to plan with the same usable shards. Got "
                f"{[len(s) for s in seen]} shards on ranks 0-{ranks.world_size - 1} instead: an extraction is still "
                "finishing shards. Start the run once it has stopped, or drop --allow-incomplete."
            )

    # 5. Objective, optimizer, schedule. The objective's random init is seeded apart from the student's; every rank
    # draws the same weights (and DDP broadcasts rank 0's anyway).
    torch.manual_seed(cfg.seed + 1)
    objective = build_objective(cfg, data, student) if cfg.uses_kv else None
    module = DistillModule(student, objective, cfg).to(device)
    optimizer = make_optimizer(module, cfg)
    if cfg.steps is not None:
        total = cfg.steps
    else:
        micro = sum(len(loader.plan(e).batches) for e in range(cfg.epochs or 1))
        total = max(1, micro // cfg.grad_accum)
    warmup = cfg.warmup_steps if cfg.warmup_steps is not None else max(1, round(0.05 * total))
    schedule = make_schedule(optimizer, total, warmup, cfg.min_lr_ratio)
    params = {"student_trainable": student.trainable_parameters(), "student_total": student.total_parameters()}
    if objective is not None:
        params.update(objective.parameter_counts())

    # 6. Resume: everything restored into exists now. Every rank reads the checkpoint rank 0 wrote.
    step, tokens_seen = 0, 0
    if resume_from is not None:
        state = load_checkpoint(resume_from, module, optimizer, schedule, cfg, list(loader.shards),
                                world_size=ranks.world_size, rank=ranks.rank)
        step, position, tokens_seen = state["step"], tuple(state["position"]), state["tokens"]
        loader.seek(position)
        if main:
            truncate_metrics(out / "metrics.jsonl", step)
        log(f"resumed from {resume_from.name}: step {step}, loader at epoch {position[0]} batch {position[1]}")
    elif main:
        (out / "metrics.jsonl").write_text("")
        _write_config(cfg, out)
    # Dropout etc., each rank its own draws; a resumed run also restores each rank's exact RNG state.
    torch.manual_seed(cfg.seed + 2 + step + _RANK_SEED_STRIDE * ranks.rank)
    if resume_from is not None:
        torch.set_rng_state(state["rng"]["torch"])
        if device.type == "cuda" and state["rng"].get("cuda") is not None:
            torch.cuda.set_rng_state_all(state["rng"]["cuda"])
    # What runs forward and backward: DDP around the module under torchrun (after the restore, so the ranks start
    # from the checkpoint), the module itself otherwise. The optimizer, clipping and checkpoints use the module.
    model = ddp.wrap(module, device, ranks)

    log(f"student {cfg.student}: {params['student_trainable']:,} trainable of {params['student_total']:,} parameters"
        + "".join(f"; {k} {v:,}" for k, v in params.items() if k.startswith(("projector", "router")) and v))
    log(f"training {total} steps of {cfg.grad_accum} x {cfg.batch_size} samples on {device}"
        + (f" x {ranks.world_size} ranks" if ranks.distributed else "")
        + (f", K/V from {', '.join(data.teacher_names)} ({cfg.loss}, layers {list(data.kv_layers)})"
           if objective is not None else ", cross-entropy only"))

    def checkpoint(step: int, tokens: int, tag: str | None = None) -> Path:
        """Every rank hands rank 0 its RNG state; rank 0 writes; the others wait until the checkpoint is whole."""
        rank_rng = ddp.gather(rng_state(), ranks) if ranks.distributed else None
        path = checkpoint_dir(out) / (tag or f"step-{step:06d}")
        if main:
            path = save_checkpoint(out, module, optimizer, schedule, cfg, step=step, position=loader.position,
                                   tokens=tokens, keep=cfg.keep_checkpoints, shards=list(loader.shards), tag=tag,
                                   world_size=ranks.world_size, rank_rng=rank_rng)
        ddp.barrier(ranks)
        return path

    # 7. The loop.
    batches = iter(loader)
    autocast = _autocast(cfg, device)
    writer = _tensorboard(out) if cfg.tensorboard and main else None
    wait_total = step_total = 0.0
    last: dict[str, float] = {}
    metrics = (out / "metrics.jsonl").open("a") if main else None
    try:
        while step < total:
            t0 = time.perf_counter()
            wait = 0.0
            step_tokens = 0
            sums: dict[str, float] = {}
            bad_samples: list[int] | None = None  # under DDP: this rank's micro-batch with a non-finite term
            for micro in range(cfg.grad_accum):
                tw = time.perf_counter()
                try:
                    batch = next(batches)
                except StopIteration:
                    break
                wait += time.perf_counter() - tw
                batch = batch.to(device, non_blocking=True)
                # DDP all-reduces the gradients in the step's last backward; the earlier ones accumulate locally.
                # Every rank has as many batches as the others, so all of them agree on which backward is last.
                with ddp.backward_sync(model, sync=micro == cfg.grad_accum - 1 or _exhausted(loader)):
                    with autocast:
                        loss, terms = model(batch)
                    # One device-to-host copy per micro-batch for every logged term (and the NaN check).
                    values = dict(zip(terms, torch.stack([v.float() for v in terms.values()]).tolist()))
                    bad = _non_finite(values)
                    if bad and not ranks.distributed:
                        path = checkpoint(step, tokens_seen, tag=f"nan-step-{step + 1}")
                        raise _nan_error(bad[0], values[bad[0]], step, batch.sample_indices.tolist(), path)
                    if bad and bad_samples is None:
                        bad_samples = batch.sample_indices.tolist()
                    (loss / cfg.grad_accum).backward()
                for k, v in values.items():
                    sums[k] = sums.get(k, 0.0) + v / cfg.grad_accum
                step_tokens += batch.num_tokens
            if not sums:
                break  # the data ran out (--epochs): the schedule's last steps were never reached
            if ranks.distributed:
                # A rank's non-finite term shows in the mean: every rank stops here together, after the backward's
                # all-reduce and before the step, once rank 0 has saved the state before this step.
                sums, step_tokens = ddp.reduce_step(sums, step_tokens, device, ranks)
                bad = _non_finite(sums)
                if bad:
                    path = checkpoint(step, tokens_seen, tag=f"nan-step-{step + 1}")
                    raise _nan_error(bad[0], sums[bad[0]], step, bad_samples, path)
            grad_norm = torch.nn.utils.clip_grad_norm_(
                [p for p in module.parameters() if p.requires_grad],
                cfg.max_grad_norm if cfg.max_grad_norm > 0 else float("inf"),
            )
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            tokens_seen += step_tokens
            elapsed = time.perf_counter() - t0
            wait_total += wait
            step_total += elapsed
            epoch, index = loader.position
            # Under DDP: losses are means over ranks, tokens sums; times and waits are this rank's.
            last = {"step": step, "epoch": epoch, "lr": schedule.get_last_lr()[0], **sums,
                    "grad_norm": float(grad_norm), "tokens": step_tokens, "tokens_per_s": step_tokens / elapsed,
                    "step_s": elapsed, "data_wait_s": wait, "data_wait_frac": wait / elapsed}
            if metrics is not None:
                metrics.write(json.dumps(last) + "\n")
                metrics.flush()
            if writer is not None:
                for k, v in last.items():
                    if k != "step":
                        writer.add_scalar(k, v, step)
            if cfg.progress and (step % cfg.log_every == 0 or step == total or step == 1):
                log(_progress_line(last, total))
            if (cfg.checkpoint_every and step % cfg.checkpoint_every == 0) or step == total:
                checkpoint(step, tokens_seen)
    finally:
        close = getattr(batches, "close", None)
        if close is not None:
            close()  # stops the loader's worker processes now rather than at garbage collection
        if metrics is not None:
            metrics.close()
        if writer is not None:
            writer.close()

    # 8. Outputs, written by rank 0; the other ranks return once they are whole.
    if main:
        save_student(student, out)
        module.save_heads(out)
        _write_manifest(cfg, out, data, step, tokens_seen, last, params)
    ddp.barrier(ranks)
    seconds = time.perf_counter() - started
    return DistillResult(out=str(out), steps=step, tokens=tokens_seen, seconds=seconds, final=last,
                         parameters=params, data_wait_fraction=wait_total / step_total if step_total else 0.0,
                         resumed_from=None if resume_from is None else int(resume_from.name.split("-")[-1]),
                         teachers=list(data.teacher_names))


_RANK_SEED_STRIDE = 1_000_003
"""Rank ``r`` seeds its dropout with ``seed + 2 + step + r * stride``: apart from every other rank's for runs of
fewer steps than the stride; rank 0 (and a single process) with ``seed + 2 + step``."""


def _exhausted(loader: Any) -> bool:
    """Whether the loader has yielded its last batch (only with --epochs: otherwise it streams on)."""
    return loader.epochs is not None and loader.position[0] >= loader.epochs


def _non_finite(values: dict[str, float]) -> list[str]:
    """The loss terms in ``values`` that are NaN or infinite, the most specific first: a NaN in K alone makes
    loss/kv and loss/total NaN too."""
    return [k for k in ("loss/ce", "loss/k", "loss/v", "loss/attn", "loss/kv", "loss/total")
            if k in values and not math.isfinite(values[k])]


def _nan_error(term: str, value: float, step: int, samples: list[int] | None, path: Path) -> TrainingError:
    where = f"samples {samples}" if samples is not None else "samples on another rank"
    return TrainingError(
        f"Loss term {term} is {value} at step {step + 1} ({where}). Stopped; the state before this step is in "
        f"{path}. Lower --lr, check the store with `kava store verify`, or drop those samples."
    )


def _check_out(cfg: DistillConfig, out: Path, world_size: int) -> Path | None:
    """The checkpoint to resume from (``--resume``), or None for a fresh run; refuses to overwrite a run, or to
    resume one with another number of processes."""
    from .checkpoint import check_world_size, latest_checkpoint

    found = latest_checkpoint(out) if out.exists() else None
    if cfg.resume:
        if found is None:
            raise ConfigError(f"--resume: {out} holds no checkpoint to resume from. Drop --resume to start a run.")
        check_world_size(found, world_size)
        return found
    if out.exists() and ((out / "metrics.jsonl").exists() or (out / "checkpoints").exists()):
        raise ConfigError(
            f"--out {out} already holds a run. Pass --resume to continue it, or choose another --out."
        )
    return None


def _check_tensorboard() -> None:
    try:
        import tensorboard  # noqa: F401
    except ImportError as e:
        raise ConfigError("--tensorboard needs the tensorboard package. Install it (pip install tensorboard) "
                          "or drop --tensorboard.") from e


def _tensorboard(out: Path) -> Any:
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(str(out / "tb"))


def _autocast(cfg: DistillConfig, device: Any) -> Any:
    import contextlib

    import torch

    bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and device.type == "cuda")
    if not bf16:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def _progress_line(m: dict[str, float], total: int) -> str:
    parts = [f"step {m['step']}/{total}", f"loss {m.get('loss/total', float('nan')):.4f}"]
    for key in ("loss/ce", "loss/kv", "loss/k", "loss/v", "loss/attn"):
        if key in m:
            parts.append(f"{key.split('/')[1]} {m[key]:.4f}")
    parts += [f"lr {m['lr']:.2e}", f"{m['tokens_per_s']:.0f} tok/s", f"wait {100 * m['data_wait_frac']:.1f}%"]
    return "  ".join(parts)


def _write_config(cfg: DistillConfig, out: Path) -> None:
    import yaml

    text = yaml.safe_dump(cfg.to_dict(), sort_keys=False)
    (out / "config.yaml").write_text(text)


def _write_manifest(cfg: DistillConfig, out: Path, data: Any, steps: int, tokens: int, final: dict[str, float],
                    params: dict[str, int]) -> None:
    """``kava.json``: what `kava eval` and a reader need to know about this student."""
    manifest = {
        "student": cfg.student,
        "template": data.template,
        "store": cfg.store,
        "teachers": list(data.teacher_names),
        "kv_layers": list(data.kv_layers),
        "loss": cfg.loss if cfg.uses_kv else "ce",
        "steps": steps,
        "tokens": tokens,
        "parameters": params,
        "final": final,
        "command": cfg.command,
    }
    tmp = out / "kava.json.tmp"
    tmp.write_text(json.dumps(manifest, indent=2))
    tmp.replace(out / "kava.json")

