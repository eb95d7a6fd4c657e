"""`kava distill` under torchrun: two CPU ranks on gloo, real subprocesses, a real store from stories260K.

What DDP must keep: one metrics file and one model, written by rank 0; the loss sequence of the global batch; and a
killed run that resumes exactly, with the same number of ranks only.

The reference for the losses is the DDP step written out in one process. Each rank reads its own shards, so the union
of the ranks' batches at step k is not a one-process run's batch k; instead the reference iterates both ranks' plans
of the shards and, at every optimizer step, accumulates rank 0's micro-batches and then rank 1's, each loss divided
by ``grad_accum x world_size`` — exactly the gradient DDP averages — and logs the mean of the same terms. The two may
differ only by float summation order.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from helpers import ENV, KAVA, asset_path, sigkill_when

from kava.core.errors import ConfigError
from kava.distill.config import DistillConfig
from kava.distill.ddp import launch
from kava.distill.trainer import run_distill
from kava.extract.config import ExtractConfig
from kava.extract.recipe import run_extract

pytestmark = pytest.mark.integration  # every test runs torchrun (or reads what its ranks wrote)
ONE_TORCH_THREAD = True  # see conftest.one_torch_thread

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--standalone"]
RUN = {"student": "tiny-llama", "steps": 4, "loss": "structural", "grad_accum": 2, "batch_size": 2,
       "checkpoint_every": 2}
"""Each rank: 4 steps of 2 micro-batches of 2 samples; the structural loss exercises K, V and the captured Q."""
TERMS = ("loss/total", "loss/ce", "loss/k", "loss/v", "loss/attn")
RTOL = 1e-4
"""DDP against the one-process reference: the same gradients summed in another order, through 4 AdamW steps (they
differ by about 1e-7)."""


def flags(store: Path, out: Path, **extra: Any) -> list[str]:
    options = {**RUN, "store": str(store), "out": str(out), **extra}
    return [f"--{k.replace('_', '-')}={v}" for k, v in options.items()] + ["--no-progress"]


def metrics(out: Path) -> list[dict[str, float]]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    """stories260K over 24 synthetic problems with Q, identity layer map (5 student layers), 7 shards: 4 and 3 per
    rank."""
    return extract_store(tmp_path_factory.mktemp("ddp") / "kv.zarr")


def extract_store(path: Path) -> Path:
    """The store of :func:`store` at ``path`` (test_fsdp trains on the same one)."""
    run_extract(ExtractConfig.from_dict(dict(teacher=str(asset_path("models/stories260K_hf_derived")), store=str(path),
                                             limit=24, shard_tokens=768, batch_size=8, progress=False,
                                             calibration_samples=0, with_q=True)),
                log=lambda _: None)
    return path


@pytest.fixture(scope="module")
def ddp_run(store, tmp_path_factory) -> tuple[Path, str]:
    """An uninterrupted two-rank run through the documented plain form `torchrun -m kava.pipelines.cli distill`;
    its output directory and stderr."""
    out = tmp_path_factory.mktemp("ddp-run") / "whole"
    proc = subprocess.run([*TORCHRUN, "-m", "kava.pipelines.cli", "distill", *flags(store, out)],
                          capture_output=True, text=True, env=ENV, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return out, proc.stderr


def reference_steps(store: Path, out: Path, world_size: int, steps: int) -> list[dict[str, Any]]:
    """The DDP run's steps in one process (see the module docstring): per step the mean of each logged term over
    ranks, and per rank its own mean (``rank_terms``), the tokens summed, the lr and the clipped gradient's norm."""
    from kava.distill.loader import StreamLoader
    from kava.distill.module import DistillModule, build_objective
    from kava.distill.optim import make_optimizer, make_schedule
    from kava.distill.run_data import resolve_data
    from kava.distill.student import load_student

    # Built as the trainer builds it, in the same seeded order.
    cfg = DistillConfig(**{**RUN, "steps": steps}, store=str(store), out=str(out))
    data = resolve_data(cfg, out, lambda _: None)
    student = load_student(cfg.student, tokenizer=data.tokenizer, num_layers=data.student_layers, seed=cfg.seed)
    torch.manual_seed(cfg.seed + 1)
    module = DistillModule(student, build_objective(cfg, data, student), cfg)
    optimizer = make_optimizer(module, cfg)
    schedule = make_schedule(optimizer, steps, max(1, round(0.05 * steps)), cfg.min_lr_ratio)
    # Each rank's own plan of the shards, as its loader in the DDP run streams it.
    ranks = [iter(StreamLoader(data.loader_config(cfg, rank=r, world_size=world_size))) for r in range(world_size)]
    micro = cfg.grad_accum * world_size
    rows = []
    for _ in range(steps):
        rank_terms: list[dict[str, float]] = []
        tokens = 0
        for batches in ranks:
            own: dict[str, float] = {}
            for _ in range(cfg.grad_accum):
                batch = next(batches)
                loss, terms = module(batch)
                (loss / micro).backward()  # DDP: each rank's loss / grad_accum, then the mean over ranks
                for k, v in terms.items():
                    own[k] = own.get(k, 0.0) + float(v) / cfg.grad_accum
                tokens += batch.num_tokens
            rank_terms.append(own)
        grad_norm = torch.nn.utils.clip_grad_norm_(list(module.parameters()), cfg.max_grad_norm)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        rows.append({**{k: float(np.mean([t[k] for t in rank_terms])) for k in rank_terms[0]},
                     "rank_terms": rank_terms, "tokens": tokens, "lr": schedule.get_last_lr()[0],
                     "grad_norm": float(grad_norm)})
    return rows


# ---------------------------------------------------------------------------------------------------------------------


def test_two_ranks_train_and_rank_0_alone_writes(ddp_run):
    out, stderr = ddp_run
    rows = metrics(out)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert [p.name for p in out.rglob("*.jsonl")] == ["metrics.jsonl"]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-000002", "step-000004"]
    state = json.loads((out / "checkpoints" / "step-000004" / "state.json").read_text())
    assert state["world_size"] == 2 and state["step"] == 4
    saved = torch.load(out / "checkpoints" / "step-000004" / "state.pt", weights_only=True)
    assert len(saved["rank_rng"]) == 2  # every rank's RNG state, for an exact resume

    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.num_hidden_layers == 5
    manifest = json.loads((out / "kava.json").read_text())
    assert manifest["steps"] == 4 and manifest["tokens"] == sum(r["tokens"] for r in rows)
    # Rank 0 alone logs; nothing warns: not the ranks (gloo, DDP, the loader), not torchrun (its lines start "W1231").
    assert stderr.count("training 4 steps of 2 x 2 samples on cpu x 2 ranks") == 1, stderr
    assert "Warning" not in stderr and not re.search(r"^W\d{4} ", stderr, re.MULTILINE), stderr


def test_losses_equal_one_process_accumulating_both_ranks_batches(ddp_run, store, tmp_path):
    out, _ = ddp_run
    ddp = metrics(out)
    reference = reference_steps(store, tmp_path / "ref2", world_size=2, steps=4)
    for got, want in zip(ddp, reference):
        assert got["tokens"] == want["tokens"]  # both ranks' real tokens, summed
        assert got["lr"] == pytest.approx(want["lr"], rel=1e-12)
        for key in TERMS:
            assert got[key] == pytest.approx(want[key], rel=RTOL), (got["step"], key)
        assert got["grad_norm"] == pytest.approx(want["grad_norm"], rel=RTOL)  # the gradient DDP stepped on
    # The check has teeth: the ranks' own losses differ far more than the tolerance, so a run logging one rank's
    # loss, or stepping on one rank's gradient, would fail it.
    first = reference[0]["rank_terms"]
    assert abs(first[0]["loss/total"] - first[1]["loss/total"]) > 10 * RTOL * first[0]["loss/total"]

    # And the reference is the trainer's own step: with one rank it reproduces a one-process run.
    single = tmp_path / "single"
    run_distill(DistillConfig(**{**RUN, "steps": 2}, store=str(store), out=str(single), progress=False),
                log=lambda _: None)
    for got, want in zip(metrics(single), reference_steps(store, tmp_path / "ref1", world_size=1, steps=2)):
        for key in TERMS:
            assert got[key] == pytest.approx(want[key], rel=1e-6), (got["step"], key)


def test_killed_run_resumes_with_the_same_number_of_ranks_only(ddp_run, store, tmp_path, monkeypatch, capfd):
    whole, _ = ddp_run
    out = tmp_path / "killed"
    proc = subprocess.Popen([*TORCHRUN, "-m", "kava.pipelines.cli", "distill", *flags(store, out)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
    err = sigkill_when(proc, lambda: (out / "checkpoints" / "step-000002").exists(), children=True)
    assert proc.returncode != 0 and "SIGKILL" in err, err
    assert not (out / "kava.json").exists()

    # One process can't continue it: the loader's position and the ranks' shards hold for two.
    with pytest.raises(ConfigError, match=r"2 process\(es\) \(WORLD_SIZE=2\), and this run has 1 \(WORLD_SIZE=1\)"):
        run_distill(DistillConfig(**RUN, store=str(store), out=str(out), resume=True, progress=False),
                    log=lambda _: None)

    # The launcher, given the flag that asked for it: --nproc is dropped from what the ranks run.
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert launch([*flags(store, out), "--resume", "--nproc", "2"], nproc=2) == 0
    assert "resumed from step-000002" in capfd.readouterr().err
    resumed, uninterrupted = metrics(out), metrics(whole)
    assert [m["step"] for m in resumed] == [1, 2, 3, 4]
    for a, b in zip(uninterrupted, resumed):  # exactly: the same reductions from the same restored state
        for key in TERMS:
            assert a[key] == b[key], (a["step"], key)


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices (one NCCL rank each)")
def test_two_ranks_on_nccl(store, ddp_run, tmp_path):
    out = tmp_path / "cuda"
    proc = subprocess.run([*TORCHRUN, "-m", "kava.pipelines.cli", "distill",
                           *flags(store, out, device="cuda", precision="fp32")],
                          capture_output=True, text=True, env=ENV, timeout=300)
    assert proc.returncode == 0, proc.stderr
    rows, cpu = metrics(out), metrics(ddp_run[0])
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    # Step 1 is one forward of the same weights on the same batches: CUDA and CPU arithmetic agree closely.
    assert rows[0]["loss/total"] == pytest.approx(cpu[0]["loss/total"], rel=1e-3)


def test_kava_distill_nproc_launches_the_same_run_and_prints_once(ddp_run, store, tmp_path):
    """`kava distill --nproc 2` is the plain torchrun form: the same losses, one JSON summary on stdout."""
    whole, _ = ddp_run
    out = tmp_path / "nproc"
    proc = subprocess.run([*KAVA, "distill", *flags(store, out), "--nproc", "2", "--json"], capture_output=True,
                          text=True, env=ENV, timeout=300)
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)  # one JSON document: the other rank printed nothing
    assert summary["steps"] == 4
    assert [m["loss/total"] for m in metrics(out)] == [m["loss/total"] for m in metrics(whole)]
