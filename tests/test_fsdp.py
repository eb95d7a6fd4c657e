"""`kava distill --parallel fsdp` under torchrun: two CPU ranks on gloo, the student and its heads sharded with FSDP2.

What FSDP must keep of DDP (tests/test_ddp.py): one metrics file and one model, written by rank 0; the loss sequence
of the global batch; a killed run that resumes exactly. And what it adds: checkpoints in the one-process format,
gathered from the shards, so that a checkpoint goes between FSDP, DDP and one process.

The reference for the losses is test_ddp's: the DDP step written out in one process (both ranks' micro-batches
accumulated, each loss divided by ``grad_accum x world_size``). FSDP reduce-scatters each micro-batch's gradient
instead of all-reducing the step's sum, and clips with a norm summed over shards, so the two may differ by float
summation order only.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import ENV
from safetensors import safe_open
from safetensors.torch import load_file, save_model
from test_ddp import RUN, TERMS, TORCHRUN, extract_store, flags, metrics, reference_steps

from kava.core.errors import ConfigError
from kava.distill.config import DistillConfig

ONE_TORCH_THREAD = True  # see conftest.one_torch_thread

FSDP = {"parallel": "fsdp"}
RTOL = 1e-5
"""FSDP against the one-process reference: the same gradients summed in another order, through 4 AdamW steps
(they differ by about 1e-7 here; test_ddp allows DDP 1e-4)."""


def fsdp_run_command(store: Path, out: Path, *extra: str) -> list[str]:
    return [*TORCHRUN, "-m", "kava.pipelines.cli", "distill", *flags(store, out, **FSDP), *extra]


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    """test_ddp's store: stories260K over 24 synthetic problems with Q, 5 student layers, 7 shards (4 and 3 per
    rank)."""
    return extract_store(tmp_path_factory.mktemp("fsdp") / "kv.zarr")


@pytest.fixture(scope="module")
def fsdp_run(store, tmp_path_factory) -> tuple[Path, str]:
    """An uninterrupted two-rank FSDP run; its output directory and stderr."""
    out = tmp_path_factory.mktemp("fsdp-run") / "whole"
    proc = subprocess.run(fsdp_run_command(store, out), capture_output=True, text=True, env=ENV, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return out, proc.stderr


def plain_module(store: Path, out: Path) -> tuple[Any, torch.optim.Optimizer, Any]:
    """The module, optimizer and schedule of RUN built in one process, as the trainer builds them."""
    from kava.distill.module import DistillModule, build_objective
    from kava.distill.optim import make_optimizer, make_schedule
    from kava.distill.run_data import resolve_data
    from kava.distill.student import load_student

    cfg = DistillConfig(**RUN, store=str(store), out=str(out))
    data = resolve_data(cfg, out, lambda _: None)
    student = load_student(cfg.student, tokenizer=data.tokenizer, num_layers=data.student_layers, seed=cfg.seed)
    torch.manual_seed(cfg.seed + 1)
    module = DistillModule(student, build_objective(cfg, data, student), cfg)
    optimizer = make_optimizer(module, cfg)
    return module, optimizer, make_schedule(optimizer, cfg.steps, 1, cfg.min_lr_ratio)


def assert_same(a: Any, b: Any, where: str = "") -> None:
    """Nested dicts/lists of tensors and plain values, equal exactly."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.shape == b.shape and torch.equal(a.cpu(), b.cpu()), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and sorted(a, key=str) == sorted(b, key=str), where
        for k in a:
            assert_same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.integration
def test_two_ranks_train_sharded_and_rank_0_alone_writes(fsdp_run, store, tmp_path):
    out, stderr = fsdp_run
    rows = metrics(out)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert [p.name for p in out.rglob("*.jsonl")] == ["metrics.jsonl"]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-000002", "step-000004"]
    state = json.loads((out / "checkpoints" / "step-000004" / "state.json").read_text())
    assert state["world_size"] == 2 and state["config"]["parallel"] == "fsdp"

    # The checkpoint's weights are the file a plain module writes: the same names (the tied embedding under the one
    # save_model keeps) and the same metadata.
    module, _, _ = plain_module(store, tmp_path / "plain")
    save_model(module, str(tmp_path / "plain.safetensors"))
    with safe_open(tmp_path / "plain.safetensors", "pt") as plain, \
            safe_open(out / "checkpoints" / "step-000004" / "weights.safetensors", "pt") as sharded:
        assert sorted(sharded.keys()) == sorted(plain.keys()) and sharded.metadata() == plain.metadata()

    # The final student is a plain save_pretrained directory, with its heads.
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.num_hidden_layers == 5
    final = load_file(str(out / "checkpoints" / "step-000004" / "weights.safetensors"))  # the final weights
    own = {k: v for k, v in model.state_dict().items() if f"student.{k}" in final}
    assert len(own) == len(final) - sum(k.startswith("objective.") for k in final)
    assert all(torch.equal(v, final[f"student.{k}"]) for k, v in own.items())
    heads = load_file(str(out / "projectors.safetensors"))
    assert heads and all(torch.equal(v, final[f"objective.{k}"]) for k, v in heads.items())
    assert stderr.count("training 4 steps of 2 x 2 samples on cpu x 2 ranks (FSDP)") == 1, stderr
    assert "Warning" not in stderr and not re.search(r"^W\d{4} ", stderr, re.MULTILINE), stderr


@pytest.mark.integration
def test_losses_equal_one_process_accumulating_both_ranks_batches(fsdp_run, store, tmp_path):
    out, _ = fsdp_run
    reference = reference_steps(store, tmp_path / "ref", world_size=2, steps=4)
    for got, want in zip(metrics(out), reference, strict=True):
        assert got["tokens"] == want["tokens"]
        assert got["lr"] == pytest.approx(want["lr"], rel=1e-12)
        for key in TERMS:
            assert got[key] == pytest.approx(want[key], rel=RTOL), (got["step"], key)
        # The norm of the whole gradient (summed over the ranks' shards), the one it clipped and stepped on.
        assert got["grad_norm"] == pytest.approx(want["grad_norm"], rel=RTOL)
    first = reference[0]["rank_terms"]  # teeth: one rank's loss is far off the mean
    assert abs(first[0]["loss/total"] - first[1]["loss/total"]) > 10 * RTOL * first[0]["loss/total"]


@pytest.mark.integration
def test_stopped_run_resumes_exactly(fsdp_run, store, tmp_path):
    """A run stopped while writing its step-4 checkpoint (test_ddp kills one with SIGKILL; the trainer's resume is
    the same under FSDP): what it left is the uninterrupted run's files up to then, a half-written checkpoint
    included. Resumed under FSDP, it logs what the uninterrupted run logged, exactly."""
    whole, _ = fsdp_run
    out = tmp_path / "stopped"
    (out / "checkpoints").mkdir(parents=True)
    for name in ("config.yaml", "metrics.jsonl"):  # metrics of steps 3 and 4 too: the resume drops them
        shutil.copy(whole / name, out / name)
    shutil.copytree(whole / "checkpoints" / "step-000002", out / "checkpoints" / "step-000002")
    shutil.copytree(whole / "checkpoints" / "step-000004", out / "checkpoints" / ".step-000004.tmp")
    (out / "checkpoints" / ".step-000004.tmp" / "state.json").unlink()

    proc = subprocess.run(fsdp_run_command(store, out, "--resume"), capture_output=True, text=True, env=ENV,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "resumed from step-000002" in proc.stderr and "removed .step-000004.tmp" in proc.stderr, proc.stderr
    resumed, uninterrupted = metrics(out), metrics(whole)
    assert [m["step"] for m in resumed] == [1, 2, 3, 4]
    for a, b in zip(uninterrupted, resumed, strict=True):  # exactly: the same shards restored, the same reductions
        for key in (*TERMS, "grad_norm"):
            assert a[key] == b[key], (a["step"], key)
    for name in ("model.safetensors", "projectors.safetensors"):
        assert_same(load_file(str(whole / name)), load_file(str(out / name)), name)


@pytest.mark.integration
def test_checkpoint_goes_between_fsdp_and_one_process(fsdp_run, store, tmp_path):
    """The FSDP run's checkpoint loads into a plain module and optimizer; sharded (FSDP over one rank, in this
    process) from that file, then gathered again, it gives back the file exactly."""
    import torch.distributed as dist

    from kava.distill import fsdp
    from kava.distill.checkpoint import load_checkpoint, load_state
    from kava.distill.ddp import Ranks
    from kava.distill.optim import make_optimizer

    path = fsdp_run[0] / "checkpoints" / "step-000002"
    cfg = DistillConfig(**RUN, **FSDP, store=str(store), out=str(tmp_path / "o"))
    shards = json.loads((path / "state.json").read_text())["shards"]
    weights, state = load_file(str(path / "weights.safetensors")), load_state(path / "state.pt")

    module, optimizer, schedule = plain_module(store, tmp_path / "plain")
    saved = load_checkpoint(path, module, optimizer, schedule, cfg, shards, world_size=2, rank=1)
    assert saved["step"] == 2 and torch.equal(saved["rng"]["torch"], state["rank_rng"][1]["torch"])
    assert_same({k: v for k, v in module.state_dict().items() if k in weights}, weights)
    assert_same(optimizer.state_dict(), state["optimizer"])

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    try:
        module, _, schedule = plain_module(store, tmp_path / "plain")
        fsdp.shard(module, module.student, torch.device("cpu"), Ranks(0, 0, 1), bf16=False)
        optimizer = make_optimizer(module, cfg)  # over the shards, as the trainer builds it after sharding
        load_checkpoint(path, module, optimizer, schedule, cfg, shards, world_size=2, rank=0, sharded=True)
        gathered, optimizer_state = fsdp.full_state(module, optimizer)
    finally:
        dist.destroy_process_group()
    assert_same({k: v for k, v in gathered.items() if k in weights}, weights)
    assert_same(optimizer_state, state["optimizer"])


def test_fsdp_refuses_what_needs_the_whole_student_in_one_process(tmp_path):
    base = dict(student="tiny-llama", out=str(tmp_path), store="kv.zarr", parallel="fsdp")
    for extra, match in (({"lora_r": 4}, r"Can't use --lora-r with --parallel fsdp.*--parallel ddp"),
                         ({"balance": "gradnorm"}, r"--balance gradnorm with --parallel fsdp.*Drop --balance"),
                         ({"grad_shares_every": 5}, r"--grad-shares-every with --parallel fsdp.*Set --grad-shares")):
        with pytest.raises(ConfigError, match=match):
            DistillConfig(**base, **extra).validate()
    with pytest.raises(ConfigError, match=r"--parallel: expected one of ddp, fsdp. Got 'zero' instead"):
        DistillConfig(**{**base, "parallel": "zero"}).validate()
    DistillConfig(**{**base, "lora_r": 4, "parallel": "ddp"}).validate()  # DDP keeps LoRA
    # A resumed run may switch between DDP and FSDP: the checkpoint format is one, and only summation order changes.
    cfg = DistillConfig(**base)
    assert cfg.resume_differences({**cfg.to_dict(), "parallel": "ddp"}) == []


@pytest.mark.integration
@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices (one NCCL rank each)")
def test_two_ranks_on_nccl_in_bf16(store, fsdp_run, tmp_path):
    """The path CPU can't take: NCCL, bf16 gathered parameters with fp32 gradient reduction."""
    out = tmp_path / "cuda"
    proc = subprocess.run(fsdp_run_command(store, out, "--device=cuda", "--precision=bf16"), capture_output=True,
                          text=True, env=ENV, timeout=300)
    assert proc.returncode == 0, proc.stderr
    rows, cpu = metrics(out), metrics(fsdp_run[0])
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    # Step 1 is one forward of the same weights on the same batches, in bf16 against fp32.
    assert rows[0]["loss/total"] == pytest.approx(cpu[0]["loss/total"], rel=2e-2)
    state = torch.load(out / "checkpoints" / "step-000004" / "state.pt", weights_only=True)
    assert all(v.dtype == torch.float32 for s in state["optimizer"]["state"].values() for k, v in s.items()
               if k != "step")  # the sharded master weights' moments stay fp32
