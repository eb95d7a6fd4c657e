"""What a distillation run writes into ``--out`` besides its checkpoints and the student.

``config.yaml`` (the resolved config, at the start of a fresh run), ``metrics.jsonl`` (one line per optimizer step;
with ``--tracker``, the same metrics in wandb, MLflow or TensorBoard: :mod:`.trackers`), ``kava.json`` (what
`kava eval` and a reader need to know about the student, at the end); the progress line the log shows; and the check
that ``--out`` may be written at all (a fresh directory, or ``--resume`` of the run in it).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

import yaml

from kava.core.errors import ConfigError

from .checkpoint import check_world_size, latest_checkpoint
from .config import DistillConfig
from .trackers import TrackerRun, TrackerSet

if TYPE_CHECKING:
    from .run_data import RunData


def check_out(cfg: DistillConfig, out: Path, world_size: int) -> Path | None:
    """The checkpoint to resume from (``--resume``), or None for a fresh run; refuses to overwrite a run, or to
    resume one with another number of processes.

    A run stopped before its first checkpoint (killed, even before it wrote anything; out of disk; a requeued job)
    has nothing to continue from and nothing to lose: it starts from step 0, with ``--resume`` or without, so
    ``--resume`` means "continue if there is anything to continue". A finished run is never overwritten.
    """
    found = latest_checkpoint(out) if out.is_dir() else None
    if found is not None:
        if not cfg.resume:
            raise ConfigError(
                f"--out {out} already holds a run. Pass --resume to continue it, or choose another --out."
            )
        check_world_size(found, world_size)
        return found
    if (out / "kava.json").is_file():
        raise ConfigError(f"--out {out} holds a finished run (kava.json) without step checkpoints: there is nothing "
                          "to resume. Choose another --out.")
    return None


def started_run(out: Path) -> bool:
    """Whether ``out`` holds a run's files (it may have stopped before writing a checkpoint)."""
    return out.is_dir() and any((out / name).exists() for name in ("metrics.jsonl", "config.yaml", "checkpoints"))


@dataclass
class MetricSinks:
    """Where each step's metrics go: ``metrics.jsonl`` (appended to) and the --tracker trackers. Ranks other than 0
    have neither: they log nothing."""

    jsonl: TextIO | None
    trackers: TrackerSet

    @classmethod
    def open(cls, cfg: DistillConfig, out: Path, *, main: bool, step: int = 0,
             store_digest: str | None = None) -> MetricSinks:
        """Open ``metrics.jsonl`` and start the trackers (rank 0 only). ``step`` > 0: the run resumes there, and the
        trackers continue their runs; each gets the resolved config and ``store_digest``
        (:meth:`kava.kvstore.KVStore.digest`, as ``kava.json`` records it) as its parameters."""
        if not main:
            return cls(jsonl=None, trackers=TrackerSet([]))
        name = cfg.report.tracker_name or out.resolve().name
        trackers = TrackerSet.open(cfg.report.trackers, TrackerRun(out, cfg.report.tracker_project, name, step))
        trackers.start({**cfg.to_dict(), "store_digest": store_digest})
        return cls(jsonl=(out / "metrics.jsonl").open("a"), trackers=trackers)

    def write(self, record: dict[str, float]) -> None:
        """One metrics line, flushed (a killed run keeps every step it logged), then the same to each tracker."""
        if self.jsonl is not None:
            self.jsonl.write(json.dumps(record) + "\n")
            self.jsonl.flush()
        if self.trackers:
            self.trackers.log({k: v for k, v in record.items() if k != "step"}, int(record["step"]))

    def close(self) -> None:
        if self.jsonl is not None:
            self.jsonl.close()
        self.trackers.finish()


def progress_line(m: dict[str, float], total: int, *, eta_s: float | None = None) -> str:
    """The log's line for one step: the loss terms, the lr, throughput, the share of time spent waiting for data and,
    given ``eta_s``, the time left."""
    parts = [f"step {m['step']}/{total}", f"loss {m.get('loss/total', float('nan')):.4f}"]
    for key in ("loss/ce", "loss/kv", "loss/k", "loss/v", "loss/attn"):
        if key in m:
            parts.append(f"{key.split('/')[1]} {m[key]:.4f}")
    parts += [f"lr {m['lr']:.2e}", f"{m['tokens_per_s']:.0f} tok/s", f"wait {100 * m['data_wait_frac']:.1f}%"]
    if eta_s is not None:
        parts.append(f"eta {format_duration(eta_s)}")
    return "  ".join(parts)


def format_duration(seconds: float) -> str:
    """``42s``, ``3m05s``, ``2h07m``: a duration at the precision a person reads it."""
    s = max(0, round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def write_config(cfg: DistillConfig, out: Path) -> None:
    """``config.yaml``: the run's resolved config."""
    text = yaml.safe_dump(cfg.to_dict(), sort_keys=False)
    (out / "config.yaml").write_text(text)


def write_manifest(cfg: DistillConfig, out: Path, data: RunData, steps: int, tokens: int, final: dict[str, float],
                   params: dict[str, int]) -> None:
    """``kava.json``: what `kava eval` and a reader need to know about this student."""
    manifest = {
        "student": cfg.student,
        "template": data.template,
        "store": cfg.store,
        "store_digest": data.store.digest(),  # kvstore.store.metadata_digest: names the store wherever it is copied
        "teachers": list(data.teacher_names),
        "kv_layers": list(data.kv_layers),
        "logit_teachers": [t.name for t in data.logit_teachers],
        "loss": cfg.objective.loss if cfg.uses_kv else "ce",
        "steps": steps,
        "tokens": tokens,
        "parameters": params,
        "final": final,
        "command": cfg.command,
    }
    tmp = out / "kava.json.tmp"
    tmp.write_text(json.dumps(manifest, indent=2))
    tmp.replace(out / "kava.json")
