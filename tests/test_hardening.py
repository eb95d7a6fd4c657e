"""What an unlucky or hostile user meets: runs stopped at the worst moment, full disks, files in the wrong encoding,
a checkpoint that would run code, a model that ships code, a broken model config. Each answer is one line that names
the thing and the fix, and nothing already written is lost or left half-made.

Real subprocesses where the user would meet the problem; a real store of the real stories260K; real small disks
(a tmpfs mounted for the test, skipped where mounting is not allowed).
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from helpers import ENV, KAVA, sigkill_when, stories_store

from kava.core.data import file_rows
from kava.core.errors import CheckpointError, ConfigError, DatasetError
from kava.distill.checkpoint import load_state
from kava.distill.config import DistillConfig
from kava.distill.trainer import run_distill

ONE_TORCH_THREAD = True  # see conftest.one_torch_thread


def kava(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([*KAVA, *args], capture_output=True, text=True, env=ENV, timeout=timeout)


def one_error_line(proc: subprocess.CompletedProcess) -> str:
    """The single ``error:`` line a failed command printed (no traceback)."""
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, proc.stderr
    return errors[0]


@pytest.fixture(scope="module")
def store(tmp_path_factory, stories) -> Path:
    """stories260K over 24 synthetic problems, a few shards."""
    return stories_store(tmp_path_factory.mktemp("hardening") / "kv.zarr")


def distill_args(store: Path, out: Path, *extra: str, steps: int = 6) -> list[str]:
    return ["distill", "--store", str(store), "--student", "tiny-llama", "--out", str(out), "--steps", str(steps),
            "--batch-size", "4", "--loss", "mercator", "--no-progress", *extra]


def losses(out: Path) -> list[float]:
    return [json.loads(line)["loss/total"] for line in (out / "metrics.jsonl").read_text().splitlines()]


@contextmanager
def small_disk(path: Path, size: str) -> Iterator[Path]:
    """A tmpfs of ``size`` mounted at ``path`` for the block (``remount(size)`` grows it); skips where the test may
    not mount one."""
    path.mkdir(parents=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"needs a small disk: mounting a tmpfs was refused ({mounted.stderr.strip()})")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def grow(path: Path, size: str) -> None:
    subprocess.run(["mount", "-o", f"remount,size={size}", str(path)], check=True)


# ---------------------------------------------------------------------------------------------------------------------
# Datasets and models that are not what they claim


def test_non_utf8_jsonl_names_file_line_and_byte(tmp_path):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(b'{"question": "a?", "answer": "x\\n#### 1"}\n{"question": "caf\xe9?", "answer": "#### 2"}\n')
    with pytest.raises(DatasetError, match=r"latin1.jsonl\. Got byte 0xe9 at position 18 of line 2, which is not "
                                           r"UTF-8\. Re-encode the file as UTF-8"):
        list(file_rows(path))
    bom = tmp_path / "bom.jsonl"
    bom.write_bytes(b'\xef\xbb\xbf{"question": "a?", "answer": "x\\n#### 1"}\n')
    assert [r.answer for r in file_rows(bom)] == ["1"]  # a byte-order mark is not an error


def test_empty_jsonl_says_it_is_empty_not_to_rename_fields(tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_text("\n\n")
    with pytest.raises(DatasetError, match=r"Expected at least one JSON object in .*empty.jsonl\. Got an empty file"):
        list(file_rows(path))


@pytest.mark.integration
def test_extract_from_a_non_utf8_file_is_one_line(tmp_path, stories):
    path = tmp_path / "data.jsonl"
    path.write_bytes(b'{"question": "\xff", "answer": "#### 1"}\n')
    line = one_error_line(kava("extract", "--teacher", str(stories), "--dataset", str(path), "--store",
                               str(tmp_path / "kv.zarr"), "--no-progress"))
    assert "data.jsonl. Got byte 0xff at position 15 of line 1" in line
    assert not (tmp_path / "kv.zarr").exists()


def test_a_corrupt_model_config_is_named_not_the_tokenizer(tmp_path, stories):
    from kava.core.models import resolve_model

    model = tmp_path / "teacher"
    shutil.copytree(stories, model)
    (model / "config.json").write_text('{"model_type": "llama",')
    with pytest.raises(ConfigError, match=r"Expected .*config\.json to be JSON as written by `save_pretrained`\. "
                                          r"Got a file that does not parse") as e:
        resolve_model(str(model))
    assert "tokenizer" not in str(e.value)
    (model / "config.json").write_text("[1, 2]")
    with pytest.raises(ConfigError, match=r"config\.json to hold a JSON object\. Got a list"):
        resolve_model(str(model))


@pytest.fixture
def custom_code_model(tmp_path, stories) -> Path:
    """stories260K whose config names modelling code shipped beside it (a subclass of Llama)."""
    model = tmp_path / "custom"
    shutil.copytree(stories, model)
    config = json.loads((model / "config.json").read_text())
    config.update(model_type="custom_llama", architectures=["CustomForCausalLM"],
                  auto_map={"AutoConfig": "configuration_custom.CustomConfig",
                            "AutoModelForCausalLM": "modeling_custom.CustomForCausalLM"})
    (model / "config.json").write_text(json.dumps(config))
    (model / "configuration_custom.py").write_text(
        "from transformers import LlamaConfig\n\n\nclass CustomConfig(LlamaConfig):\n    model_type = 'custom_llama'\n")
    (model / "modeling_custom.py").write_text(
        "from transformers import LlamaForCausalLM\n\nfrom .configuration_custom import CustomConfig\n\n\n"
        "class CustomForCausalLM(LlamaForCausalLM):\n    config_class = CustomConfig\n")
    return model


@pytest.mark.integration
def test_eval_runs_shipped_code_only_with_trust_remote_code(tmp_path, custom_code_model):
    args = ["eval", "--model", str(custom_code_model), "--dataset", "synthetic", "--limit", "2",
            "--max-new-tokens", "4", "--out", str(tmp_path / "items.jsonl"), "--no-progress"]
    line = one_error_line(kava(*args))
    assert "ships its own modelling code" in line and "pass --trust-remote-code" in line
    assert not (tmp_path / "items.jsonl").exists()
    proc = kava(*args, "--trust-remote-code")
    assert proc.returncode == 0, proc.stderr
    assert len((tmp_path / "items.jsonl").read_text().splitlines()) == 2


@pytest.mark.integration
@pytest.mark.parametrize("workers", [0, 2])
def test_a_corrupted_chunk_met_by_the_loader_is_one_line_with_workers_too(tmp_path, store, workers):
    copy = tmp_path / "kv.zarr"
    shutil.copytree(store, copy)
    chunk = sorted(p for p in copy.glob("teachers/*/shards/000001/k/c/**/*") if p.is_file())[0]
    data = bytearray(chunk.read_bytes())
    data[len(data) // 2] ^= 0x10
    chunk.write_bytes(bytes(data))
    line = one_error_line(kava(*distill_args(copy, tmp_path / "run", "--workers", str(workers))))
    assert "crc32c does not match its bytes" in line and "shard 1" in line
    assert "DataLoader worker" not in line


# ---------------------------------------------------------------------------------------------------------------------
# Checkpoints


class _RunsCode:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_a_state_pt_that_would_run_code_is_refused_in_one_line(tmp_path):
    marker = tmp_path / "ran"
    torch.save({"optimizer": _RunsCode(marker), "schedule": {}, "rng": {}}, tmp_path / "state.pt")
    with pytest.raises(CheckpointError, match=r"state\.pt to hold only tensors and plain values.*can't be loaded "
                                              r"safely \(.*GLOBAL.*\)\. It was not written by this run") as e:
        load_state(tmp_path / "state.pt")
    assert "\n" not in str(e.value) and "weights_only" not in str(e.value)
    assert not marker.exists()
    (tmp_path / "state.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match=r"can't be loaded safely"):
        load_state(tmp_path / "state.pt")
    torch.save({"weights": torch.zeros(2)}, tmp_path / "state.pt")
    with pytest.raises(CheckpointError, match=r"Expected .* to hold the optimizer, schedule and RNG states\. "
                                              r"Got \['weights'\]"):
        load_state(tmp_path / "state.pt")


@pytest.mark.integration
def test_resume_from_a_state_pt_that_would_run_code_is_one_line(tmp_path, store):
    out = tmp_path / "run"
    run_distill(DistillConfig.from_dict(dict(store=str(store), student="tiny-llama", out=str(out), steps=2,
                                             batch_size=4, loss="mercator", checkpoint_every=2, progress=False)),
                log=lambda _: None)
    (out / "kava.json").unlink()  # as if it had been killed after its checkpoint
    marker = tmp_path / "ran"
    state = out / "checkpoints" / "step-000002" / "state.pt"
    torch.save({"optimizer": _RunsCode(marker), "schedule": {}, "rng": {}}, state)
    line = one_error_line(kava(*distill_args(store, out, "--checkpoint-every", "2", "--resume", steps=2)))
    assert f"{state} to hold only tensors" in line
    assert not marker.exists()


# ---------------------------------------------------------------------------------------------------------------------
# A run stopped before its first checkpoint


@pytest.mark.integration
@pytest.mark.parametrize("rerun", ["--resume", "plain"])
def test_distill_killed_before_its_first_checkpoint_starts_again(tmp_path, store, rerun):
    whole = tmp_path / "whole"
    proc = kava(*distill_args(store, whole, "--checkpoint-every", "100"))
    assert proc.returncode == 0, proc.stderr

    out = tmp_path / "killed"
    args = [*KAVA, *distill_args(store, out, "--checkpoint-every", "100")]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
    metrics = out / "metrics.jsonl"
    err = sigkill_when(proc, lambda: metrics.exists() and metrics.read_text().count("\n") >= 2)
    assert proc.returncode == -signal.SIGKILL, err
    assert not (out / "checkpoints").exists() and not (out / "kava.json").exists()
    # A checkpoint half-written when the process died (the disk filled, or the kill came then).
    partial = out / "checkpoints" / ".step-000003.tmp"
    partial.mkdir(parents=True)
    (partial / "weights.safetensors").write_bytes(b"\0" * 100)

    again = kava(*distill_args(store, out, "--checkpoint-every", "100", *([rerun] if rerun != "plain" else [])))
    assert again.returncode == 0, again.stderr
    assert "stopped before its first checkpoint: starting it again from step 0" in again.stderr
    assert "removed .step-000003.tmp" in again.stderr
    assert not partial.exists()
    assert losses(out) == losses(whole)  # the same run as one never interrupted


@pytest.mark.integration
def test_resume_before_anything_was_written_starts_and_a_finished_run_is_not_restarted(tmp_path, store):
    # Killed while loading, before it wrote a file: --resume (what a retry loop passes) starts the run.
    early = tmp_path / "early"
    proc = kava(*distill_args(store, early, "--resume", steps=2))
    assert proc.returncode == 0, proc.stderr
    assert "--resume: " in proc.stderr and "holds no checkpoint yet: starting from step 0" in proc.stderr

    out = tmp_path / "done"
    assert kava(*distill_args(store, out, "--checkpoint-every", "0")).returncode == 0
    before = (out / "metrics.jsonl").read_text()
    line = one_error_line(kava(*distill_args(store, out, "--checkpoint-every", "0")))
    assert "already holds a run. Pass --resume to continue it" in line
    shutil.rmtree(out / "checkpoints")  # a finished run whose checkpoints were deleted to save space
    for extra in ([], ["--resume"]):
        line = one_error_line(kava(*distill_args(store, out, "--checkpoint-every", "0", *extra)))
        assert "holds a finished run (kava.json) without step checkpoints" in line
    assert (out / "metrics.jsonl").read_text() == before


# ---------------------------------------------------------------------------------------------------------------------
# Full disks


@pytest.mark.integration
def test_extract_on_a_full_disk_says_so_keeps_nothing_half_made_and_resumes(tmp_path, stories):
    with small_disk(tmp_path / "disk", "24k") as disk:
        args = ["extract", "--teacher", str(stories), "--dataset", "synthetic", "--limit", "60", "--store",
                str(disk / "kv.zarr"), "--shard-tokens", "2048", "--no-progress"]
        line = one_error_line(kava(*args))
        assert line.startswith("error: No space left on device") and "rerun the same command with --resume" in line
        assert list(disk.iterdir()) == []  # the half-created store was removed, not left as .kv.zarr.creating-*

        grow(disk, "400k")  # room for the grid and some shards, not all of them
        line = one_error_line(kava(*args))
        assert line.startswith("error: No space left on device")
        grow(disk, "16m")
        proc = kava(*args, "--resume")
        assert proc.returncode == 0, proc.stderr
        verified = kava("store", "verify", str(disk / "kv.zarr"))
        assert verified.returncode == 0, verified.stdout + verified.stderr


@pytest.mark.integration
def test_distill_on_a_full_disk_says_so_and_resumes(tmp_path, store):
    with small_disk(tmp_path / "disk", "160k") as disk:
        out = disk / "run"
        args = distill_args(store, out, "--checkpoint-every", "3")
        line = one_error_line(kava(*args))
        assert line.startswith("error: No space left on device") and "--resume" in line
        assert not list((out / "checkpoints").glob(".step-*.tmp"))  # no half-written checkpoint is left
        grow(disk, "64m")
        proc = kava(*args, "--resume")
        assert proc.returncode == 0, proc.stderr
        assert len(losses(out)) == 6 and (out / "kava.json").exists()
