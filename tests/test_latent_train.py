"""`kava latent`: the config reports every problem at once; a short run writes a student that loads back to the
same answers and is scored; the command runs end to end."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch
from helpers import ENV, KAVA
from safetensors.torch import load_file

from kava.core.data import DataSource
from kava.core.errors import ConfigError
from kava.distill.evaluate import EvalConfig, run_eval
from kava.distill.latent.checkpoint import load_latent
from kava.distill.latent.config import LatentConfig, is_latent_checkpoint
from kava.distill.latent.data import Encoder, chain_rows
from kava.distill.latent.evaluate import evaluate_latent
from kava.distill.latent.train import train_latent

ONE_TORCH_THREAD = True


def test_every_problem_is_reported_at_once():
    cfg = LatentConfig(
        out="x",
        mode="sleep",
        latent=0,
        jacobi=0,
        kv_weight=-1,
        lr=0,
        teacher="store",
        data_files="g.jsonl",
        kv_rope="mid",
    )
    with pytest.raises(ConfigError) as e:
        cfg.validate()
    text = str(e.value)
    for flag in (
        "--mode",
        "--latent",
        "--jacobi",
        "--kv-weight",
        "--lr",
        "--teacher store",
        "--data-files",
        "--kv-rope",
    ):
        assert flag in text
    assert LatentConfig.from_dict({"out": "x", "kv-weight": 2}).kv_weight == 2


def test_a_short_run_saves_a_student_that_loads_back(stories, tmp_path):
    out = tmp_path / "run"
    cfg = LatentConfig(
        out=str(out),
        student="tiny-llama",
        tokenizer=str(stories),
        train_size=16,
        eval_size=4,
        chain_steps=2,
        latent=3,
        jacobi=2,
        steps=2,
        batch_size=4,
        max_new_tokens=8,
        progress=False,
    )
    result = train_latent(cfg)
    assert is_latent_checkpoint(out) and result.eval is not None and result.eval["n"] == 4
    assert {"loss/answer", "loss/cot", "loss/codi", "loss/kv"} <= set(result.last)
    assert [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [0, 1]
    reasoner, tokenizer, mode = load_latent(out)
    assert mode == "latent" and (reasoner.latents, reasoner.iterations) == (3, 2)
    rows = chain_rows(4, steps=2, split="test")
    again = evaluate_latent(reasoner, Encoder(tokenizer), rows, mode="latent", max_new_tokens=8)
    assert [item["generated"] for item in again.items] == [
        json.loads(line)["generated"] for line in (out / "eval.jsonl").read_text().splitlines()
    ]
    assert again.answer_nll == pytest.approx(result.eval["answer_nll"], rel=1e-5)
    assert torch.equal(reasoner.start, load_file(str(out / "latent.safetensors"))["start"])
    # `kava eval` scores a latent student with its own scorer, on any dataset it reads.
    scored = run_eval(
        EvalConfig(
            model=str(out),
            data=DataSource(dataset="synthetic", split="test", limit=3, difficulty="easy"),
            max_new_tokens=8,
            progress=False,
        )
    )
    assert scored.n == 3 and scored.template == "latent:latent" and Path(scored.out).is_file()
    assert len(Path(scored.out).read_text().splitlines()) == 3
    cfg_direct = LatentConfig(
        out=str(tmp_path / "direct"),
        tokenizer=str(stories),
        train_size=8,
        eval_size=2,
        chain_steps=2,
        steps=1,
        batch_size=4,
        mode="direct",
        max_new_tokens=4,
        progress=False,
    )
    assert train_latent(cfg_direct).eval["n"] == 2
    assert not (tmp_path / "direct" / "latent.safetensors").exists()


@pytest.mark.integration
def test_the_command_runs_end_to_end(stories, tmp_path):
    out = tmp_path / "cli"
    proc = subprocess.run(
        [
            *KAVA,
            "latent",
            "--out",
            str(out),
            "--tokenizer",
            str(stories),
            "--train-size",
            "8",
            "--eval-size",
            "2",
            "--chain-steps",
            "2",
            "--latent",
            "2",
            "--jacobi",
            "1",
            "--steps",
            "1",
            "--batch-size",
            "4",
            "--max-new-tokens",
            "4",
            "--no-progress",
            "--json",
        ],
        capture_output=True,
        text=True,
        env=ENV,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)
    assert summary["steps"] == 1 and summary["eval"]["n"] == 2 and is_latent_checkpoint(out)
    scored = subprocess.run(
        [
            *KAVA,
            "eval",
            "--model",
            str(out),
            "--dataset",
            "synthetic",
            "--difficulty",
            "easy",
            "--split",
            "test",
            "--limit",
            "2",
            "--max-new-tokens",
            "4",
            "--no-progress",
            "--json",
        ],
        capture_output=True,
        text=True,
        env=ENV,
        timeout=300,
    )
    assert scored.returncode == 0, scored.stderr
    assert json.loads(scored.stdout)["n"] == 2 and json.loads(scored.stdout)["template"] == "latent:latent"
    bad = subprocess.run(
        [*KAVA, "latent", "--out", str(out), "--latent", "0", "--mode", "x"],
        capture_output=True,
        text=True,
        env=ENV,
        timeout=120,
    )
    assert bad.returncode == 1 and "--latent" in bad.stderr and "--mode" in bad.stderr
