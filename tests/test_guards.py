"""A store and a run that can't be talked out of their checks: one writer per output, and no run that ends with a
broken model.

Where the user would meet the case on the command line the test runs the real `kava` in a subprocess; the rest
call the function the command calls and check the same message.
"""

from __future__ import annotations

import json
import math
import os
import signal
import socket
import subprocess
from pathlib import Path

import pytest
from helpers import ENV, KAVA, sigkill_when

from kava.core.errors import BusyError, ConfigError
from kava.core.locks import LOCK_NAME, writer_lock
from kava.distill.config import DistillConfig
from kava.distill.trainer import TrainingError, run_distill
from kava.extract.config import ExtractConfig
from kava.extract.recipe import run_extract

ONE_TORCH_THREAD = True  # see conftest.one_torch_thread


def kava(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([*KAVA, *args], capture_output=True, text=True, env=ENV, timeout=timeout)


def one_error_line(proc: subprocess.CompletedProcess) -> str:
    """The single ``error:`` line a failed command printed (no traceback)."""
    assert proc.returncode != 0, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, proc.stderr
    return errors[0]


def extract_options(stories: Path, store: Path, **changes) -> dict:
    return dict(teacher=str(stories), store=str(store), limit=24, shard_tokens=1024, batch_size=8, progress=False,
                calibration_samples=0, **changes)


@pytest.fixture(scope="module")
def store(tmp_path_factory, stories) -> Path:
    """stories260K over 24 synthetic problems, a few shards."""
    path = tmp_path_factory.mktemp("guards") / "kv.zarr"
    run_extract(ExtractConfig.from_dict(extract_options(stories, path)), log=lambda _: None)
    return path


def distill_args(store: Path, out: Path, *extra: str, steps: int = 6) -> list[str]:
    return ["distill", "--store", str(store), "--student", "tiny-llama", "--out", str(out), "--steps", str(steps),
            "--batch-size", "4", "--no-progress", *extra]


def steps_logged(out: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]


# ---------------------------------------------------------------------------------------------------------------------
# 5. One writer per output


@pytest.mark.integration
def test_a_second_distill_into_the_same_out_is_refused_naming_the_first(tmp_path, store):
    out = tmp_path / "run"
    args = distill_args(store, out, "--checkpoint-every", "2", steps=400)
    first = subprocess.Popen([*KAVA, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
    second: list[subprocess.CompletedProcess] = []

    def start_second_once_first_writes() -> bool:  # while the first is mid-run: 400 steps take minutes
        if not (out / "checkpoints" / "step-000002").exists():
            return False
        second.append(kava(*args, "--resume"))  # --resume too: a run being written is not a run to resume
        return True

    err = sigkill_when(first, start_second_once_first_writes)
    assert first.returncode == -signal.SIGKILL and second, err
    line = one_error_line(second[0])
    assert f"is being written by process {first.pid} on host {socket.gethostname()}" in line
    assert "Wait for it to finish, or choose another --out" in line
    steps = steps_logged(out)
    assert steps == list(range(1, len(steps) + 1))  # every step once: only the first run wrote


@pytest.mark.integration
def test_a_lock_left_by_a_killed_distill_does_not_block_resume(tmp_path, store):
    out = tmp_path / "run"
    args = distill_args(store, out, "--checkpoint-every", "2", steps=6)
    proc = subprocess.Popen([*KAVA, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
    err = sigkill_when(proc, lambda: (out / "checkpoints" / "step-000002").exists())
    assert proc.returncode == -signal.SIGKILL, err
    # The lock file stays, naming the killed process; its lock went with the process.
    assert json.loads((out / LOCK_NAME).read_text())["pid"] == proc.pid

    resumed = kava(*args, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert steps_logged(out) == [1, 2, 3, 4, 5, 6]
    assert (out / "kava.json").exists()


def test_distill_is_refused_while_another_process_holds_the_out(tmp_path, store):
    out = tmp_path / "run"
    out.mkdir()
    with writer_lock(out, fix="choose another --out"):  # this process plays the first run
        with pytest.raises(BusyError, match=rf"run is being written by process {os.getpid()} on host .*Wait for it "
                                            r"to finish, or choose another --out\."):
            run_distill(DistillConfig(store=str(store), student="tiny-llama", out=str(out), steps=2, batch_size=4,
                                      progress=False))
    assert not (out / "metrics.jsonl").exists()


@pytest.mark.integration
def test_a_second_extract_into_the_same_store_is_one_line(tmp_path, stories):
    path = tmp_path / "kv.zarr"
    run_extract(ExtractConfig.from_dict(extract_options(stories, path, name="a")), log=lambda _: None)
    with writer_lock(path, fix="write another --store"):  # this process plays an extraction still running
        proc = kava("extract", "--teacher", str(stories), "--store", str(path), "--name", "b", "--limit", "24",
                    "--shard-tokens", "1024", "--calibration-samples", "0", "--no-progress")
    line = one_error_line(proc)
    assert f"kv.zarr is being written by process {os.getpid()}" in line and "write another --store" in line


def test_shard_jobs_share_a_store_but_not_a_slice_and_an_unsharded_run_waits_for_them(tmp_path, stories):
    path = tmp_path / "kv.zarr"
    run_extract(ExtractConfig.from_dict(extract_options(stories, path, shard="1/2")), log=lambda _: None)
    with writer_lock(path, shared=True, fix="x"), writer_lock(path, name=f"{LOCK_NAME}.shard-0-of-2", fix="x"):
        # This process plays shard job 0/2 still running: the job of slice 0 again, or an unsharded run, is refused.
        with pytest.raises(BusyError, match=r"being written by process .*give this job another --shard"):
            run_extract(ExtractConfig.from_dict(extract_options(stories, path, shard="0/2")), log=lambda _: None)
        with pytest.raises(BusyError, match=r"being written by shard jobs \(--shard i/n\) of an extraction\. Wait "
                                            r"for it to finish, or write another --store"):
            run_extract(ExtractConfig.from_dict(extract_options(stories, path, resume=True)), log=lambda _: None)
    # Slice 1 was written while nothing held slice 1; slice 0 is written now that its job is gone.
    done = run_extract(ExtractConfig.from_dict(extract_options(stories, path, shard="0/2")), log=lambda _: None)
    assert done.shards_written


# ---------------------------------------------------------------------------------------------------------------------
# 6. A run that ends with a broken model


def test_weights_gone_non_finite_stop_the_run_and_keep_the_last_good_checkpoint(tmp_path, store):
    out = tmp_path / "run"
    # lr 0 on step 1 (warmup), then 1e30: every loss logged is finite, the weights after step 2 are not.
    cfg = DistillConfig(store=str(store), student="tiny-llama", out=str(out), steps=3, batch_size=4, lr=1e30,
                        checkpoint_every=1, progress=False)
    with pytest.raises(TrainingError, match=r"weights are not finite after step 2 .*Stopped without writing them; "
                                            r"the last good checkpoint is .*step-000001\. Lower --lr"):
        run_distill(cfg)
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-000001"]
    assert not (out / "kava.json").exists() and not (out / "model.safetensors").exists()

    # Two steps, checkpointed only at the end: the one checkpoint would be broken, so there is none.
    cfg = DistillConfig.from_dict({**cfg.to_dict(), "out": str(tmp_path / "once"), "steps": 2, "checkpoint_every": 0})
    with pytest.raises(TrainingError, match=r"after step 2 .*no checkpoint was written before it"):
        run_distill(cfg)
    assert not (tmp_path / "once" / "checkpoints").exists() and not (tmp_path / "once" / "kava.json").exists()


@pytest.mark.parametrize("lr", [math.nan, math.inf, -math.inf, 0.0])
def test_a_learning_rate_that_is_not_finite_and_positive_is_refused(lr):
    with pytest.raises(ConfigError, match=rf"^--lr: expected a finite positive number\. Got {lr} instead\.$"):
        DistillConfig(student="tiny-llama", out="o", lr=lr).validate()
