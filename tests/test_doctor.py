"""`kava doctor`: what a cluster run needs, checked on this machine, each missing piece named with its fix.

The Hugging Face cache is pointed at an empty (or hand-built) directory through HF_HOME, so the results do not
depend on what this machine happens to have cached.
"""

from __future__ import annotations

import json
import os
import re

import pytest

from kava.core.hub import hub_cache_dir
from kava.pipelines.config import configs_dir
from kava.pipelines.doctor import DoctorReport, run_doctor

REAL_SCALE = str(configs_dir() / "gsm8k-qwen7b4bit-to-qwen0.5b.yaml")


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """An empty hub cache, offline, named by HF_HOME."""
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("HF_DATASETS_CACHE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)  # the config's relative `out` lands here
    cache = hub_cache_dir()
    assert cache == tmp_path / "hf" / "hub"
    return cache


def fake_cached(cache, repo: str, files: dict[str, str]) -> None:
    """Lay ``files`` out as huggingface_hub's cache holds a snapshot of ``repo`` at ``main``."""
    root = cache / f"models--{repo.replace('/', '--')}"
    (root / "refs").mkdir(parents=True, exist_ok=True)
    (root / "refs" / "main").write_text("0" * 40)
    snapshot = root / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (snapshot / name).write_text(text)


def cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def test_real_scale_config_on_this_machine(hub):
    report = run_doctor(REAL_SCALE)
    assert report.check("config").status == "ok"
    assert report.check("python").status == "ok"
    # The config asks for device: cuda, and the doctor answers for this machine: a missing GPU fails here.
    assert report.check("cuda").status == ("ok" if cuda_available() else "fail")
    if not cuda_available():
        assert "srun --gpus=1 kava doctor" in report.check("cuda").fix

    teacher = report.check("teacher qwen7b")
    assert teacher.status == "fail" and "Qwen/Qwen2.5-7B-Instruct" in teacher.detail  # the preset, resolved
    assert "not in the cache" in teacher.detail and "HF_HUB_OFFLINE=1" in teacher.detail
    assert "hf download Qwen/Qwen2.5-7B-Instruct" in teacher.fix
    assert "huggingface-cli download Qwen/Qwen2.5-7B-Instruct" in teacher.fix
    student = report.check("student")
    assert student.status == "fail" and "huggingface-cli download Qwen/Qwen2.5-0.5B-Instruct" in student.fix
    assert report.check("dataset").status == "fail" and "data_files" in report.check("dataset").fix
    assert report.check("bitsandbytes").status in ("ok", "warn")  # importable; CPU-only is a warning
    assert "needed by qwen7b" in report.check("bitsandbytes").detail

    disk = report.check("disk")
    m = re.search(r"store ~([\d,.]+) GiB \(7,473 rows x 224 tokens; qwen7b: ([\d,]+) KiB/token .*; "
                  r"([\d,.]+) GiB free at ", disk.detail)
    assert m, disk.detail
    # Qwen2.5-7B: 24 of 28 layers (proportional to the 24-layer student) x 4 KV heads x 128 x fp16, K and V,
    # plus Q on the layers the config names (28 heads x 128 x fp16).
    from kava.pipelines.config import load_config

    extract = load_config(REAL_SCALE).teachers[0].extract
    assert extract.get("layer_map", "proportional") == "proportional" and extract.get("kv_dtype") == "float16"
    q_layers = len(str(extract["q_layers"]).split(","))
    per_token = 2 * 24 * 4 * 128 * 2 + q_layers * 28 * 128 * 2
    assert m.group(2) == f"{per_token / 1024:,.0f}"
    assert float(m.group(1).replace(",", "")) == pytest.approx(per_token * 7473 * 224 / 2**30, abs=0.05)
    assert disk.status in ("ok", "warn", "fail")
    assert report.check("output").status == "ok"
    for module in ("dask", "distributed"):
        assert report.check(module).status == "ok"
    assert report.check("dask_jobqueue").status in ("ok", "warn")  # slurm was not asked for

    assert not report.ok
    text = report.format()
    n = len(report.problems)
    assert text.splitlines()[-1] == f"{n} problem{'s' if n > 1 else ''}"
    # An aligned table: every row's detail starts in the same column.
    rows = [line for line in text.splitlines()[:-1] if not line.lstrip().startswith("fix:")]
    columns = {line.index(c.detail) for line, c in zip(rows, report.checks)}
    assert len(columns) == 1
    payload = json.loads(json.dumps(report.to_dict()))
    assert payload["ok"] is False and payload["problems"] == n and len(payload["checks"]) == len(report.checks)


def test_local_model_directories_count_as_present(hub, tmp_path):
    from transformers import AutoModelForCausalLM, Qwen2Config

    config = Qwen2Config(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1)
    model_dir = tmp_path / "tiny model"
    AutoModelForCausalLM.from_config(config).save_pretrained(model_dir)
    empty = tmp_path / "not a model"
    empty.mkdir()

    report = run_doctor(teachers=[str(model_dir), str(empty)], students=[str(model_dir), "tiny-qwen2"])
    assert report.check(f"teacher {model_dir}").status == "ok"
    assert report.check(f"student {model_dir}").status == "ok"
    assert report.check("student tiny-qwen2").status == "ok"
    missing = report.check(f"teacher {empty}")
    assert missing.status == "fail" and "no config.json" in missing.detail


def test_cached_hub_models_are_found_and_incomplete_ones_named(hub):
    repo = "Qwen/Qwen2.5-0.5B-Instruct"
    fake_cached(hub, repo, {"config.json": "{}", "model.safetensors": "", "tokenizer.json": "{}"})
    index = {"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}
    fake_cached(hub, "Qwen/Qwen2.5-7B-Instruct", {"config.json": "{}", "tokenizer.json": "{}",
                                                  "model.safetensors.index.json": json.dumps(index),
                                                  "model-00001-of-00002.safetensors": ""})
    report = run_doctor(teachers=["qwen-7b-4bit"], students=[repo])
    assert report.check(f"student {repo}").status == "ok" and "cached" in report.check(f"student {repo}").detail
    teacher = report.check("teacher qwen-7b-4bit")
    assert teacher.status == "fail"
    assert "incomplete in the cache: no model-00002-of-00002.safetensors" in teacher.detail


def test_online_a_missing_model_is_a_warning(hub, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)  # read once at import; the tests run offline
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    row = run_doctor(students=["Qwen/Qwen2.5-0.5B-Instruct"]).check("student Qwen/Qwen2.5-0.5B-Instruct")
    assert row.status == "warn" and "downloaded on first use" in row.detail


def test_without_a_cuda_request_no_gpu_is_a_warning_and_the_run_is_ready(hub, tmp_path):
    if cuda_available():
        pytest.skip("this machine has CUDA; the row is ok here")
    report = run_doctor(students=["tiny-qwen2"], store=str(tmp_path / "out" / "kv.zarr"))
    assert report.check("cuda").status == "warn"
    assert report.check("bitsandbytes").status == "ok"  # no quantized teacher asked for
    disk = report.check("disk")
    assert disk.status == "ok" and re.search(r"[\d,.]+ GiB free at ", disk.detail)
    assert report.ok and report.format().splitlines()[-1] == "ready"


def test_slurm_makes_dask_jobqueue_and_the_slurm_commands_required(hub):
    import importlib.util
    import shutil

    report = run_doctor(slurm=True)
    if importlib.util.find_spec("dask_jobqueue") is None:
        row = report.check("dask_jobqueue")
        assert row.status == "fail" and row.fix == "pip install dask-jobqueue"
    if shutil.which("sbatch") is None:
        assert report.check("slurm").status == "fail"
    with pytest.raises(KeyError):
        run_doctor().check("slurm")  # not asked for: no row


def test_an_output_directory_under_a_file_fails(hub, tmp_path):
    blocker = tmp_path / "a file"
    blocker.write_text("")
    row = run_doctor(store=str(blocker / "kv.zarr")).check("output")
    assert row.status == "fail" and "is a file, not a directory" in row.detail


def test_an_unwritable_output_directory_fails(hub, tmp_path):
    if os.geteuid() == 0:
        pytest.skip("running as root, which writes through directory permissions")
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        report = run_doctor(store=str(locked / "kv.zarr"))
    finally:
        locked.chmod(0o700)
    row = report.check("output")
    assert row.status == "fail" and "can't write in" in row.detail and "chmod" in row.fix
    assert not report.ok


def test_a_bad_config_is_one_failed_row(hub, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("seeds: []\n")
    report = run_doctor(str(bad))
    assert report.check("config").status == "fail" and "seeds" in report.check("config").detail
    assert isinstance(report, DoctorReport) and not report.ok


def test_a_refused_write_fails_with_the_fix(hub, tmp_path, monkeypatch):
    # The same path as the chmod test, for runs as root: the file system refuses the probe file.
    import tempfile

    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(tempfile, "mkstemp", refuse)
    row = run_doctor(store=str(tmp_path / "kv.zarr")).check("output")
    assert row.status == "fail" and "Permission denied" in row.detail and "chmod u+w" in row.fix
