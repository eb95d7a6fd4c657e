"""A store and a run that can't be talked out of their checks: one writer per output, no run that ends with a broken
model, and one line instead of a traceback for inputs built to break the readers (huge integers, deep nesting,
duplicate keys, seeds and options out of range, paths of the wrong kind).

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
import yaml
from helpers import ENV, KAVA, sigkill_when

from kava.core.data import file_rows, load_rows
from kava.core.errors import BusyError, ConfigError, DatasetError
from kava.core.locks import LOCK_NAME, beside, split_lock, writer_lock
from kava.distill.config import DistillConfig
from kava.distill.trainer import TrainingError, run_distill
from kava.extract.config import ExtractConfig
from kava.extract.recipe import run_extract
from kava.pipelines.config import configs_dir, load_config

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
    with writer_lock(out / LOCK_NAME, output=out, fix="x"):  # this process plays the first run
        with pytest.raises(BusyError, match=rf"run is being written by process {os.getpid()} on host .*Wait for it "
                                            r"to finish, or choose another --out\."):
            run_distill(DistillConfig(store=str(store), student="tiny-llama", out=str(out), steps=2, batch_size=4,
                                      progress=False))
    assert not (out / "metrics.jsonl").exists()


@pytest.mark.integration
def test_a_second_extract_into_the_same_store_is_one_line(tmp_path, stories):
    path = tmp_path / "kv.zarr"
    run_extract(ExtractConfig.from_dict(extract_options(stories, path, name="a")), log=lambda _: None)
    with writer_lock(beside(path), output=path, fix="x"):  # this process plays an extraction still running
        proc = kava("extract", "--teacher", str(stories), "--store", str(path), "--name", "b", "--limit", "24",
                    "--shard-tokens", "1024", "--calibration-samples", "0", "--no-progress")
    line = one_error_line(proc)
    assert f"kv.zarr is being written by process {os.getpid()}" in line and "write another --store" in line


def test_shard_jobs_share_a_store_but_not_a_slice_and_an_unsharded_run_waits_for_them(tmp_path, stories):
    path = tmp_path / "kv.zarr"
    run_extract(ExtractConfig.from_dict(extract_options(stories, path, shard="1/2")), log=lambda _: None)
    with writer_lock(beside(path), output=path, shared=True, fix="x"), \
            writer_lock(beside(path, ".shard-0-of-2"), output=path, fix="x"), split_lock(path, 2):
        # This process plays shard job 0/2 still running: the job of slice 0 again, an unsharded run, or a job of
        # another split (0/3 writes shard 0 as well) is refused.
        with pytest.raises(BusyError, match=r"being written by process .*give this job another --shard"):
            run_extract(ExtractConfig.from_dict(extract_options(stories, path, shard="0/2")), log=lambda _: None)
        with pytest.raises(BusyError, match=r"kv.zarr is being written by shard jobs of another split \(--shard "
                                            r"i/2\)\. Give this job that split \(--shard i/2\), or wait for them"):
            run_extract(ExtractConfig.from_dict(extract_options(stories, path, shard="2/3", resume=True)),
                        log=lambda _: None)
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


# ---------------------------------------------------------------------------------------------------------------------
# 7. One line instead of a traceback


@pytest.mark.integration
@pytest.mark.parametrize(("extra", "words"), [
    (["--lr", "nan"], "--lr: expected a finite positive number. Got nan"),
    (["--lr", "inf"], "--lr: expected a finite positive number. Got inf"),
    (["--seed", "99999999999999999999999"], "--seed: expected an integer in [0, 2**32 - 1]"),
    (["--grad-accum", "1000000000"], "--grad-accum: expected at most 4,096 micro-batches per step"),
], ids=["lr-nan", "lr-inf", "seed", "grad-accum"])
def test_distill_options_out_of_range_are_one_line(tmp_path, store, extra, words):
    line = one_error_line(kava(*distill_args(store, tmp_path / "run", *extra)))
    assert words in line
    assert not (tmp_path / "run").exists()


@pytest.mark.integration
def test_an_out_that_is_a_file_is_one_line(tmp_path, store):
    (tmp_path / "taken").write_text("a file")
    line = one_error_line(kava(*distill_args(store, tmp_path / "taken")))
    assert "--out" in line and "taken is a file, not a directory. Choose another --out." in line


@pytest.mark.integration
def test_a_directory_given_to_data_files_is_named_a_directory(tmp_path, stories):
    (tmp_path / "splits").mkdir()
    line = one_error_line(kava("extract", "--teacher", str(stories), "--store", str(tmp_path / "kv.zarr"),
                               "--dataset", "gsm8k", "--data-files", str(tmp_path / "splits"), "--no-progress"))
    assert "splits', which is a directory. Name the files in it." in line
    with pytest.raises(ConfigError, match=r"which is a directory"):
        load_rows("gsm8k", split="test", data_files=str(tmp_path / "splits"))


def test_jsonl_with_a_huge_integer_or_deep_nesting_is_one_line_naming_the_line(tmp_path):
    good = json.dumps({"question": "What is 1+1?", "answer": "1+1=2\n#### 2"})
    huge, deep = tmp_path / "huge.jsonl", tmp_path / "deep.jsonl"
    huge.write_text(good + "\n" + '{"question": "q", "answer": ' + "9" * 100_000 + "}\n")
    deep.write_text(good + "\n" + "[" * 100_000 + "]" * 100_000 + "\n")
    with pytest.raises(DatasetError, match=r"huge\.jsonl\. Got an integer too long to read on line 2\. Fix or remove"):
        file_rows(huge)
    with pytest.raises(DatasetError, match=r"deep\.jsonl\. Got nesting too deep to read on line 2\. Fix or remove"):
        file_rows(deep)


def test_a_number_in_the_answer_field_is_the_answer_not_a_skipped_row(tmp_path):
    path = tmp_path / "plain.jsonl"
    path.write_text("".join(json.dumps({"question": f"What is {i} + 1?", "answer": i + 1}) + "\n" for i in range(3))
                    + json.dumps({"question": "Half of 5?", "answer": 2.5}) + "\n")
    rows = file_rows(path)
    assert not rows.problems
    assert [(r.answer, r.reasoning) for r in rows.rows] == [("1", ""), ("2", ""), ("3", ""), ("2.5", "")]


def default_config() -> dict:
    return yaml.safe_load((configs_dir() / "default.yaml").read_text())


@pytest.mark.parametrize(("seeds", "words"), [
    ([-1], r"seeds: expected integers in \[0, 2\*\*32 - 1\]\. Got \[-1\]"),
    ([42, 10**22], r"seeds: expected integers in \[0, 2\*\*32 - 1\]\. Got \[10000000000000000000000\]"),
], ids=["negative", "23-digits"])
def test_run_check_refuses_seeds_the_run_would_reject(tmp_path, seeds, words):
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({**default_config(), "seeds": seeds}))
    with pytest.raises(ConfigError, match=words):
        load_config(path)


@pytest.mark.integration
def test_run_check_on_the_command_line_refuses_a_bad_seed_and_a_duplicate_key(tmp_path):
    seeds = tmp_path / "seeds.yaml"
    seeds.write_text(yaml.safe_dump({**default_config(), "seeds": [99999999999999999999999]}))
    assert "seeds: expected integers in [0, 2**32 - 1]" in one_error_line(kava("run", str(seeds), "--check"))
    twice = tmp_path / "twice.yaml"
    twice.write_text((configs_dir() / "default.yaml").read_text() + "name: other\n")
    line = one_error_line(kava("run", str(twice), "--check"))
    assert "twice.yaml: not valid YAML at line" in line and "found the key 'name' twice" in line


def test_a_duplicate_key_is_refused_in_a_run_config_and_a_command_config(tmp_path):
    path = tmp_path / "twice.yaml"
    path.write_text("name: one\nseeds: [1]\nname: two\n")
    with pytest.raises(ConfigError, match=r"twice\.yaml: not valid YAML at line 3, column 1: found the key 'name' "
                                          r"twice in one mapping; give each key once\."):
        load_config(path)
    command = tmp_path / "distill.yaml"
    command.write_text("lr: 0.001\nsteps: 3\nlr: 1\n")
    proc = kava_config(command)
    assert "found the key 'lr' twice" in proc


def kava_config(path: Path) -> str:
    """The error ``kava distill --config path`` stops with, from the function its callback calls."""
    from kava.pipelines.options import build_config

    with pytest.raises(ConfigError) as caught:
        build_config(DistillConfig, {"student": "tiny-llama", "out": "o"}, str(path))
    return str(caught.value)


def test_a_run_config_with_a_huge_integer_or_deep_nesting_is_one_line(tmp_path):
    steps = tmp_path / "steps.yaml"
    steps.write_text((configs_dir() / "default.yaml").read_text().replace("  steps: 150", "  steps: " + "9" * 5000))
    with pytest.raises(ConfigError, match=r"steps\.yaml: not valid YAML at line \d+, column \d+: found an integer of "
                                          r"5,000 digits; configs take integers of at most 30\."):
        load_config(steps)
    deep = tmp_path / "deep.yaml"
    deep.write_text("data: " + "[" * 5000 + "]" * 5000 + "\n")
    with pytest.raises(ConfigError, match=r"deep\.yaml: not valid YAML at line 1, column \d+: found lists or mappings "
                                          r"nested more than 32 deep\."):
        load_config(deep)
    assert "nested more than 32 deep" in kava_config(deep)
