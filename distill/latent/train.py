"""`kava latent`, the recipe: train a latent student by self-distillation from its own compressed CoT cache, save
it, score it.

Top to bottom: validate the config; the rows (before any model: a bad dataset fails at once); the tokenizer and the
student (a preset at random on the rows' tokenizer, or a model directory); the latent weights (``start`` and the
projection, seeded after the student so a preset's initialisation does not depend on them); AdamW with warmup and
cosine decay; the loop (a seeded permutation of the rows per epoch, one batch per step, the loss of
``objective.latent_loss``, clipping at 1); then the outputs and, with --eval-size, the evaluation.

Outputs in ``--out``: the model (``save_pretrained``) and tokenizer, ``latent.safetensors`` (``start`` and the
projection; absent for the SFT baselines), ``latent.json`` (mode, M, T, projection, shift: what ``load_latent``
needs), ``config.yaml``, ``metrics.jsonl`` (every logged step's terms) and ``eval.json`` with ``eval.jsonl``.
"""

from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, cast

import torch
import yaml

from kava.core.errors import ConfigError
from kava.core.locks import LOCK_NAME, writer_lock
from kava.core.models import load_fast_tokenizer

from .checkpoint import save_latent
from .config import LatentConfig
from .data import Encoder, LatentRow, chain_rows, gsm8k_rows
from .evaluate import LatentEval, evaluate_latent
from .model import LatentReasoner, ProjectionKind
from .objective import Mode, Weights, latent_loss
from .offline import export_rows, load_store_targets


@dataclass
class LatentResult:
    """What a run did: where it wrote, steps, seconds, the last logged terms and the evaluation summary."""

    out: str
    steps: int
    seconds: float
    last: dict[str, float]
    eval: dict[str, Any] | None = field(default=None)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def load_rows(cfg: LatentConfig) -> tuple[list[LatentRow], list[LatentRow]]:
    """Training rows and evaluation rows of ``cfg``'s dataset."""
    if cfg.dataset == "chain":
        return (
            chain_rows(cfg.train_size, steps=cfg.chain_steps, seed=cfg.data_seed, split="train"),
            chain_rows(cfg.eval_size, steps=cfg.chain_steps, seed=cfg.data_seed, split=cfg.eval_split),
        )
    assert cfg.data_files is not None  # validate() requires it
    train = gsm8k_rows(cfg.data_files, limit=cfg.train_size, split="train")
    test = gsm8k_rows(cfg.eval_files, limit=cfg.eval_size, split="test") if cfg.eval_files and cfg.eval_size else []
    return train, test


def weights_of(cfg: LatentConfig) -> Weights:
    return Weights(
        cot=cfg.cot_weight,
        codi=cfg.codi_weight,
        kv=cfg.kv_weight,
        codi_loss=cast(Any, cfg.codi_loss),
        codi_norm=cfg.codi_norm,
        kv_loss=cast(Any, cfg.kv_loss),
        kv_norm=cfg.kv_norm,
        kv_rope=cast(Any, cfg.kv_rope),
    )


def _log(cfg: LatentConfig, message: str) -> None:
    if cfg.progress:
        print(message, file=sys.stderr, flush=True)


def train_latent(cfg: LatentConfig) -> LatentResult:
    """Train, save and (with --eval-size) evaluate; see the module docstring."""
    # 1. Everything that can be checked without a model.
    cfg.validate()
    out = Path(cfg.out)
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    mode = cast(Mode, cfg.mode)
    weights = weights_of(cfg)

    # 2. Rows before the model: a bad dataset fails in milliseconds.
    train_rows, eval_rows = load_rows(cfg)
    if cfg.export_rows is not None:  # the offline teacher's first step: the rows for `kava extract`, no training
        data, template = export_rows(train_rows, cfg.export_rows)
        _log(cfg, f"wrote {len(train_rows)} rows to {data} and their template to {template}")
        return LatentResult(out=str(data.parent), steps=0, seconds=0.0, last={})

    out.mkdir(parents=True, exist_ok=True)
    with writer_lock(out / LOCK_NAME, output=out, fix="choose another --out"):  # one run per --out at a time
        return _train(cfg, out, mode, weights, train_rows, eval_rows)


def _train(cfg: LatentConfig, out: Path, mode: Mode, weights: Weights, train_rows: list[LatentRow],
           eval_rows: list[LatentRow]) -> LatentResult:
    from kava.distill.optim import make_schedule  # noqa: PLC0415 - heavy (torch) only when a run starts
    from kava.distill.student import load_student  # noqa: PLC0415 - heavy (transformers)

    # 3. The student on the rows' tokenizer, then the latent weights (seeded after it, see the module docstring).
    tokenizer = load_fast_tokenizer(cfg.tokenizer, flag="--tokenizer") if cfg.tokenizer else None
    student = load_student(cfg.student, tokenizer=tokenizer, seed=cfg.seed)
    torch.manual_seed(cfg.seed)
    reasoner = LatentReasoner(
        student.inner,
        latents=cfg.latent,
        iterations=cfg.jacobi,
        projection=cast(ProjectionKind, cfg.projection),
        shift=cfg.shift,
    )
    reasoner.train()
    encoder = Encoder(student.tokenizer)
    targets = None
    if cfg.teacher == "store":
        assert cfg.store is not None  # validate() requires it
        targets = load_store_targets(
            cfg.store,
            train_rows,
            model_config=student.inner.config,
            tokenizer=student.tokenizer,
            budget=cfg.latent,
            kv_rope=cfg.kv_rope,
            teacher=cfg.store_teacher,
            log=lambda line: _log(cfg, line),
        )
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False), encoding="utf-8")

    # 4. Optimizer: the model's weights and the latent ones; no decay on vectors (norms, biases, ``start`` rows).
    params = [p for p in reasoner.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": cfg.weight_decay},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]
    optimizer = torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.95))
    schedule = make_schedule(optimizer, cfg.steps, cfg.warmup, 0.1)

    # 5. The loop.
    order = torch.Generator().manual_seed(cfg.seed)
    per_epoch = max(1, len(train_rows) // cfg.batch_size)
    permutation = torch.randperm(len(train_rows), generator=order)
    began = time.perf_counter()
    last: dict[str, float] = {}
    with (out / "metrics.jsonl").open("w", encoding="utf-8") as metrics:
        for step in range(cfg.steps):
            slot = step % per_epoch
            if slot == 0 and step:
                permutation = torch.randperm(len(train_rows), generator=order)
            picked = permutation[slot * cfg.batch_size : (slot + 1) * cfg.batch_size].tolist()
            batch = encoder.batch([train_rows[i] for i in picked], with_cot=mode != "direct")
            store_kv = targets.batch(picked) if targets is not None else None
            loss, terms = latent_loss(reasoner, batch, weights, mode, store_kv)
            if not math.isfinite(terms["loss"]):
                raise ConfigError(f"Expected a finite loss. Got {terms} at step {step}. Lower --lr or the weights.")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            schedule.step()
            last = {**terms, "lr": schedule.get_last_lr()[0]}
            if step % cfg.log_every == 0 or step + 1 == cfg.steps:
                metrics.write(json.dumps({"step": step, **last}) + "\n")
                metrics.flush()
                shown = " ".join(f"{k.removeprefix('loss/')}={v:.4f}" for k, v in terms.items())
                _log(cfg, f"step {step:5d}  {shown}  ({time.perf_counter() - began:.0f} s)")
    seconds = time.perf_counter() - began

    # 6. Outputs, then the evaluation.
    save_latent(reasoner, student.tokenizer, out, mode=mode)
    summary = None
    if eval_rows:
        result: LatentEval = evaluate_latent(
            reasoner, encoder, eval_rows, mode=mode, batch_size=cfg.eval_batch_size, max_new_tokens=cfg.max_new_tokens
        )
        summary = result.summary()
        (out / "eval.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
        with (out / "eval.jsonl").open("w", encoding="utf-8") as f:
            for item in result.items:
                f.write(json.dumps(item, ensure_ascii=False) + "\n")
        _log(
            cfg,
            f"accuracy {result.accuracy:.4f} ({result.correct}/{result.n}), answer NLL "
            f"{result.answer_nll:.4f}, {result.generated_tokens:.1f} tokens, "
            f"{1000 * result.seconds_per_problem:.1f} ms per problem",
        )
    return LatentResult(out=str(out), steps=cfg.steps, seconds=seconds, last=last, eval=summary)
