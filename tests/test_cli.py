"""The `kava` command line, through real subprocesses: help, planned commands, store info/verify, --json."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
from helpers import ENV, KAVA

from kava.kvstore import DatasetSpec, LayerMap, TeacherSpec, TokenizerSpec, create_store, default_storage

pytestmark = pytest.mark.integration  # every test runs `kava` in a subprocess


def kava(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([*KAVA, *args], capture_output=True, text=True, cwd=cwd, env=ENV, timeout=120)


@pytest.fixture(scope="module")
def store_path(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("cli") / "kv.zarr"
    rng = np.random.default_rng(0)
    lengths = [5, 9, 0, 12, 7, 3]
    store = create_store(
        path, sample_ids=[f"s{i}" for i in range(len(lengths))],
        input_ids=[rng.integers(0, 50, n) for n in lengths], segment_ids=[np.full(n, 1) for n in lengths],
        sample_status=["ok", "ok", "skipped", "ok", "truncated", "ok"],
        student_tokenizer=TokenizerSpec("tiny", "f" * 64, 50), dataset=DatasetSpec("synthetic", "train", "x"),
        shard_tokens=16, created_by="test",
    )
    store.add_teacher(TeacherSpec(
        name="t1", model={"model_id": "tiny"}, num_layers=3, layers=(0, 2), num_heads=4, kv_heads=2, head_dim=4,
        layer_map=LayerMap("explicit", (((0, 1.0),), ((2, 1.0),))), storage=default_storage(2, 2, 4),
    ))
    for shard in range(store.num_shards):
        with store.shard_writer("t1", shard) as w:
            for i in store.shard_samples(shard):
                w.add(rng.standard_normal((lengths[i], 2, 2, 4)), rng.standard_normal((lengths[i], 2, 2, 4)))
    return path


def test_help_lists_every_command_quickly():
    start = time.perf_counter()
    out = kava("--help")
    elapsed = time.perf_counter() - start
    assert out.returncode == 0
    for name in ["extract", "distill", "eval", "run", "store", "cka", "estimate", "slurm", "doctor"]:
        assert f"  {name}" in out.stdout
    # The whole subprocess, interpreter start included, must answer within 2 s.
    assert elapsed < 2.0, f"kava --help took {elapsed:.2f} s"


def test_slurm_extract_renders_a_script_bash_accepts_and_refuses_a_bad_option(tmp_path):
    out = kava("slurm", "extract", "--teacher", "qwen-7b-4bit", "--store", "runs/kv store.zarr", "--dataset", "gsm8k",
               "--jobs", "4", "--partition", "gpu", "--time", "04:00:00", "--device", "cuda")
    assert out.returncode == 0, out.stderr
    assert "#SBATCH --array=0-3" in out.stdout and '--shard "${SLURM_ARRAY_TASK_ID}/4"' in out.stdout
    assert "--store 'runs/kv store.zarr'" in out.stdout
    script = tmp_path / "extract.sbatch"
    script.write_text(out.stdout)
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0

    bad = kava("slurm", "extract", "--teacher", "qwen-7b-4bit", "--store", "s", "--nodes", "2", "--time", "4 h")
    assert bad.returncode == 1 and bad.stderr.startswith("error: ")
    assert "--time: expected a value without spaces" in bad.stderr and "--nodes" in bad.stderr


def test_slurm_run_writes_one_script_per_variant_and_seed(tmp_path):
    out = kava("slurm", "run", "gsm8k-qwen7b4bit-to-qwen0.5b", "--stage", "distill", "--out-dir", str(tmp_path))
    assert out.returncode == 0, out.stderr
    names = sorted(p.stem for p in tmp_path.glob("*.sbatch"))
    assert names == sorted(f"distill-{v}-seed-{s}" for v in ("ce", "kv", "kv-attn") for s in (42, 43, 44))


def test_doctor_names_what_a_gpu_run_lacks_here(tmp_path):
    env = {**ENV, "HF_HOME": str(tmp_path / "hf")}
    out = subprocess.run([*KAVA, "doctor", "gsm8k-qwen7b4bit-to-qwen0.5b", "--store", str(tmp_path / "kv.zarr"),
                          "--json"], capture_output=True, text=True, env=env, timeout=120)
    report = json.loads(out.stdout)
    assert out.returncode == (0 if report["ok"] else 1)
    rows = {c["name"]: c for c in report["checks"]}
    assert rows["teacher qwen7b"]["status"] == "fail" and "Qwen/Qwen2.5-7B-Instruct" in rows["teacher qwen7b"]["fix"]
    assert rows["output"]["status"] == "ok"


def test_store_info_json_prints_only_json(store_path):
    out = kava("store", "info", str(store_path), "--json")
    assert out.returncode == 0, out.stderr
    info = json.loads(out.stdout)  # nothing else on stdout
    assert info["format_version"] == 5
    assert info["samples"] == 6 and info["tokens"] == 36
    assert info["samples_by_status"] == {"ok": 4, "truncated": 1, "skipped": 1}
    t = info["teachers"]["t1"]
    assert (t["layers"], t["kv_heads"], t["head_dim"], t["k_rope"], t["has_q"], t["dtype"]) == (
        [0, 2], 2, 4, "pre", False, "float16")
    assert t["bytes_logical"] == 36 * 2 * 2 * 4 * 2 * 2  # tokens × (K+V) × layers × heads × dim × fp16
    assert t["bytes_on_disk"] > 0


def test_store_info_human(store_path):
    out = kava("store", "info", str(store_path))
    assert out.returncode == 0
    assert "format v5" in out.stdout and "teacher     t1" in out.stdout and "complete" in out.stdout


def test_store_verify_sound_and_corrupted(store_path, tmp_path):
    out = kava("store", "verify", str(store_path), "--json")
    assert out.returncode == 0, out.stdout
    report = json.loads(out.stdout)
    assert report["ok"] and report["chunks_checked"] > 0

    import shutil

    broken = tmp_path / "broken.zarr"
    shutil.copytree(store_path, broken)
    chunk = broken / "teachers/t1/shards/000001/v/c/0/0/0/0"
    data = bytearray(chunk.read_bytes())
    data[len(data) // 2] ^= 0xFF
    chunk.write_bytes(bytes(data))
    out = kava("store", "verify", str(broken))
    assert out.returncode == 1
    assert "teachers/t1/shards/000001/v" in out.stdout and "crc32c" in out.stdout and "samples" in out.stdout


def test_store_commands_name_a_bad_path(tmp_path):
    out = kava("store", "info", str(tmp_path / "nope"))
    assert out.returncode == 1 and "no such directory" in out.stderr
    out = kava("store", "verify", str(tmp_path), "--json")
    assert out.returncode == 1
    assert "not a KaVa store" in json.loads(out.stdout)["problems"][0]["message"]


def test_wrong_flag_is_a_usage_error(store_path):
    out = kava("store", "info", str(store_path), "--bogus")
    assert out.returncode == 2 and "No such option '--bogus'" in out.stderr


def test_extract_validates_every_flag_at_once(tmp_path):
    out = kava("extract", "--teacher", "x", "--store", str(tmp_path / "s"), "--batch-size", "0",
               "--load-in-4bit", "--load-in-8bit", "--shard", "3/2")
    assert out.returncode == 1
    assert "Found 3 problems" in out.stderr and "Choose one" in out.stderr and "--shard" in out.stderr
    assert not (tmp_path / "s").exists()  # nothing written before validation passed


def test_extract_list_teachers():
    out = kava("extract", "--list-teachers")
    assert out.returncode == 0
    assert "qwen-7b-4bit" in out.stdout and "Qwen/Qwen2.5-7B-Instruct" in out.stdout and "nf4" in out.stdout
