"""sbatch scripts rendered from configs: valid shell, the right #SBATCH lines, and flags that read back into the
same config through the real click commands.

The scripts are run for real by bash, with stand-ins for `kava`, `srun`, `torchrun`, `scontrol` and `module` on
PATH that record the arguments they get; those arguments are then parsed by `kava extract` / `kava distill`'s own
click commands. So quoting, the array's shard expression and every flag's spelling are checked end to end.
"""

from __future__ import annotations

import dataclasses
import os
import shlex
import shutil
import subprocess
from pathlib import Path

import click
import pytest

from kava.core.errors import ConfigError
from kava.distill.config import DistillConfig
from kava.extract.config import ExtractConfig
from kava.pipelines.config import configs_dir, load_config, stage_distill_config, stage_extract_config
from kava.pipelines.options import build_config
from kava.pipelines.slurm import (
    SlurmOptions,
    config_flags,
    render_distill,
    render_extract,
    render_from_run_config,
    render_verify,
)

REAL_SCALE = configs_dir() / "gsm8k-qwen7b4bit-to-qwen0.5b.yaml"
STUBS = {
    # Each records its name and arguments, NUL-separated, so arguments with spaces or quotes survive.
    "kava": "printf '%s\\0' kava \"$@\" > \"$ARGS_OUT\"",
    "torchrun": "printf '%s\\0' torchrun \"$@\" > \"$ARGS_OUT\"",
    "srun": "exec \"$@\"",
    "scontrol": "printf 'node-a\\nnode-b\\n'",
    "module": "exit 0",
}


@pytest.fixture
def slurm() -> SlurmOptions:
    return SlurmOptions(job_name="kava", partition="gpu", account="proj", gpus_per_node=1, cpus_per_task=8,
                        mem="64G", time="12:00:00", extra=["#SBATCH --qos=high", "--requeue"],
                        setup=["module load cuda/12.4", "source .venv/bin/activate"])


@pytest.fixture
def stubs(tmp_path) -> Path:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, body in STUBS.items():
        path = bin_dir / name
        path.write_text(f"#!/bin/sh\n{body}\n")
        path.chmod(0o755)
    return bin_dir


def run_script(script: str, stubs: Path, cwd: Path, **env: str) -> tuple[subprocess.CompletedProcess, list[str]]:
    """Run ``script`` with bash and the stand-ins; return the process and the arguments the last stand-in got."""
    path = cwd / "job.sbatch"
    path.write_text(script)
    (cwd / ".venv" / "bin").mkdir(parents=True, exist_ok=True)
    (cwd / ".venv" / "bin" / "activate").write_text("export KAVA_VENV=1\n")
    out = cwd / "args.bin"
    out.unlink(missing_ok=True)
    full = {**os.environ, "PATH": f"{stubs}:{os.environ['PATH']}", "ARGS_OUT": str(out), "SLURM_JOB_ID": "4242",
            "SLURM_ARRAY_TASK_ID": "3", "SLURM_NNODES": "2", "SLURM_JOB_NODELIST": "node-[a-b]", **env}
    proc = subprocess.run(["bash", str(path)], cwd=cwd, env=full, capture_output=True, text=True, timeout=30)
    args = out.read_bytes().decode().split("\0")[:-1] if out.exists() else []
    return proc, args


def check_shell(script: str, tmp_path: Path) -> None:
    """bash -n always; shellcheck too when it is installed."""
    path = tmp_path / "check.sbatch"
    path.write_text(script)
    syntax = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True)
    assert syntax.returncode == 0, syntax.stderr
    if shutil.which("shellcheck"):
        # SC1091: the setup lines source the site's own files, which are not part of the script.
        lint = subprocess.run(["shellcheck", "--shell=bash", "--exclude=SC1091", str(path)], capture_output=True,
                              text=True)
        assert lint.returncode == 0, lint.stdout


def shellcheck_or_skip() -> None:
    if not shutil.which("shellcheck"):
        pytest.skip("shellcheck is not on PATH: the scripts were checked with bash -n only")


def parse(command: str, args: list[str], cls: type) -> object:
    """``args`` through the real `kava <command>` click command, into ``cls``, as `kava` itself builds it."""
    from kava.pipelines.cli import main

    ctx = click.Context(main)
    cmd = main.get_command(ctx, command)
    with cmd.make_context(command, list(args), parent=ctx) as sub:
        values = dict(sub.params)
    for own in ("list_teachers", "as_json", "config_file"):  # the command's options that are not config fields
        values.pop(own, None)
    return build_config(cls, values, None)


def teacher_config(store: Path) -> ExtractConfig:
    return ExtractConfig.from_dict(dict(
        teacher="qwen-7b-4bit", store=str(store), name="qwen7b", dataset="gsm8k", student_template="cot",
        student_tokenizer="Qwen/Qwen2.5-0.5B-Instruct", student="Qwen/Qwen2.5-0.5B-Instruct", layer_map="cka",
        with_q=True, q_layers="23,25,26,27", calibration_samples=64, kv_dtype="bfloat16", batch_size=16,
        shard_tokens=262144, device="cuda", compress=False, progress=False, threads=8,
    ))


# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.integration
def test_extract_array_runs_the_same_config_on_each_shard(tmp_path, slurm, stubs):
    store = tmp_path / "scratch dir" / "it's" / "kv.zarr"  # a space and a quote: both need quoting
    cfg = teacher_config(store)
    script = render_extract(cfg, slurm, jobs=8)

    assert script.startswith("#!/bin/bash\n#SBATCH --job-name=kava\n")
    for line in ("#SBATCH --array=0-7", "#SBATCH --partition=gpu", "#SBATCH --account=proj", "#SBATCH --nodes=1",
                 "#SBATCH --gpus-per-node=1", "#SBATCH --cpus-per-task=8", "#SBATCH --mem=64G",
                 "#SBATCH --time=12:00:00", "#SBATCH --output=%x-%A_%a.out", "#SBATCH --qos=high",
                 "#SBATCH --requeue", "set -euo pipefail", 'export HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-1}"',
                 "module load cuda/12.4", '--shard "${SLURM_ARRAY_TASK_ID}/8"'):
        assert line in script
    # Every #SBATCH line comes before the first command, or sbatch ignores it.
    first_command = script.index("set -euo pipefail")
    assert script.rindex("#SBATCH") < first_command
    assert "--no-compress" in script and "--with-q" in script and "--no-progress" in script
    assert shlex.quote(str(store)) in script
    check_shell(script, tmp_path)

    proc, args = run_script(script, stubs, tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert args[:2] == ["kava", "extract"] and args[-3:] == ["--shard", "3/8", "--resume"]
    assert parse("extract", args[2:], ExtractConfig) == dataclasses.replace(cfg, shard="3/8", resume=True)


@pytest.mark.integration
def test_verify_job_checks_the_teacher_without_a_gpu(tmp_path, slurm, stubs):
    cfg = teacher_config(tmp_path / "my runs" / "kv.zarr")
    script = render_verify(cfg, slurm)
    assert "#SBATCH --job-name=kava-verify" in script and "--gpus-per-node" not in script
    assert "--dependency=afterok:" in script and "--array" not in script
    check_shell(script, tmp_path)
    proc, args = run_script(script, stubs, tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert args == ["kava", "store", "verify", cfg.store, "--teacher", "qwen7b"]
    # Without --name, the name extraction gives the teacher.
    unnamed = render_verify(dataclasses.replace(cfg, name=None, prompt_template=None), slurm)
    assert "--teacher qwen-7b-4bit" in unnamed


@pytest.mark.integration
def test_distill_on_two_nodes_resumes_only_once_a_checkpoint_exists(tmp_path, slurm, stubs):
    out = tmp_path / "runs" / "kv student"
    cfg = DistillConfig(student="Qwen/Qwen2.5-0.5B-Instruct", out=str(out), store=str(tmp_path / "kv.zarr"),
                        teachers="qwen7b", loss="structural", attn_layers="20,21,22,23", steps=2000, batch_size=16,
                        grad_accum=2, lr=1e-4, warmup_steps=100, workers=4, checkpoint_every=250,
                        keep_checkpoints=8, device="cuda", init_uniform=False, precision="bf16", progress=False,
                        segment_weights="prompt=0.5,reasoning=1,answer=2")
    script = render_distill(cfg, dataclasses.replace(slurm, nodes=2, gpus_per_node=4, cpus_per_task=32))

    for line in ("#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=1", "#SBATCH --gpus-per-node=4",
                 "#SBATCH --output=%x-%j.out", 'head_node=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)',
                 "srun torchrun", "--nproc-per-node 4", '--rdzv-id "$SLURM_JOB_ID"', "--rdzv-backend c10d",
                 '--rdzv-endpoint "$head_node:29500"', "-m kava.pipelines.cli distill", '"${resume[@]}"'):
        assert line in script
    assert "--array" not in script
    check_shell(script, tmp_path)

    # First run: no checkpoint, so no --resume (the trainer refuses --resume without one).
    proc, args = run_script(script, stubs, tmp_path)
    assert proc.returncode == 0, proc.stderr
    cut = args.index("distill")
    assert args[:cut] == ["torchrun", "--nnodes", "2", "--nproc-per-node", "4", "--rdzv-id", "4242",
                          "--rdzv-backend", "c10d", "--rdzv-endpoint", "node-a:29500", "-m", "kava.pipelines.cli"]
    assert "--resume" not in args
    assert parse("distill", args[cut + 1:], DistillConfig) == cfg

    # A requeued job finds a complete checkpoint and continues from it.
    (out / "checkpoints" / "step-250").mkdir(parents=True)
    (out / "checkpoints" / "step-250" / "state.json").write_text("{}")
    proc, args = run_script(script, stubs, tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert args[-1] == "--resume"
    assert parse("distill", args[args.index("distill") + 1:], DistillConfig) == dataclasses.replace(cfg, resume=True)


def test_every_problem_is_reported_at_once(tmp_path):
    cfg = dataclasses.replace(teacher_config(tmp_path / "kv.zarr"), shard="1/4", device=None, batch_size=0)
    bad = SlurmOptions(nodes=2, gpus_per_node=2, time="soon", mem="lots", partition="gpu a100", extra=["qos=high"])
    with pytest.raises(ConfigError) as e:
        render_extract(cfg, bad, jobs=0)
    for expected in ("--jobs: expected an integer >= 1", "--shard 1/4: the job array sets", "--nodes 2: an extraction",
                     "--gpus-per-node 2: an extraction", "--gpus-per-node 2: the stage runs on cpu",
                     "--time: expected minutes", "--mem: expected a size", "--partition: expected a value without",
                     "--extra: expected sbatch options", "--batch-size: expected an integer >= 1"):
        assert expected in str(e.value)
    with pytest.raises(ConfigError, match="--device cuda: the job needs a GPU"):
        render_distill(DistillConfig(student="tiny-qwen2", out="o", device="cuda"),
                       SlurmOptions(gpus_per_node=0))
    with pytest.raises(ConfigError, match="extra: free-form details have no flag"):
        config_flags(dataclasses.replace(cfg, extra={"note": 1}))


def test_options_take_lines_as_one_string_as_click_or_yaml_give_them():
    s = SlurmOptions(setup="module load cuda\n\nsource .venv/bin/activate\n", extra="#SBATCH --qos=high")
    assert s.setup == ["module load cuda", "source .venv/bin/activate"] and s.extra == ["--qos=high"]
    assert s.problems() == []


@pytest.mark.integration
def test_real_scale_config_renders_one_array_per_teacher_and_one_job_per_student(tmp_path, slurm, stubs):
    run = load_config(REAL_SCALE)
    extract = render_from_run_config(run, slurm, stage="extract", jobs=8, config=str(REAL_SCALE.name))
    assert [name for name, _ in extract] == ["extract-qwen7b", "verify-qwen7b"]
    for _, script in extract:
        check_shell(script, tmp_path)
    script = extract[0][1]
    assert "#SBATCH --job-name=kava-extract-qwen7b" in script and "#SBATCH --array=0-7" in script

    # The split file comes from kava run's data stage: without it the task stops at once and says so.
    proc, args = run_script(script, stubs, tmp_path)
    assert proc.returncode == 1 and not args
    assert "student-train.jsonl is missing" in proc.stderr and "Runner(load_config" in proc.stderr
    teacher = run.teachers[0]
    expected = stage_extract_config(run, teacher)
    data = tmp_path / expected.data.dataset
    data.parent.mkdir(parents=True)
    data.write_text("")
    proc, args = run_script(script, stubs, tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert parse("extract", args[2:], ExtractConfig) == dataclasses.replace(expected, shard="3/8", resume=True)
    assert expected.store == str(run.root / "kv.zarr") and expected.device == "cuda" and not expected.progress

    distill = render_from_run_config(run, dataclasses.replace(slurm, nodes=2, gpus_per_node=4), stage="distill")
    assert [name for name, _ in distill] == [f"distill-{v.name}-seed-{s}" for v in run.variants for s in run.seeds]
    for (name, script), (variant, seed) in zip(distill, [(v, s) for v in run.variants for s in run.seeds]):
        check_shell(script, tmp_path)
        proc, args = run_script(script, stubs, tmp_path)
        assert proc.returncode == 0, proc.stderr
        want = stage_distill_config(run, variant, seed=seed, store=str(run.root / "kv.zarr"),
                                    out=str(run.root / "students" / variant.name / f"seed-{seed}"))
        assert parse("distill", args[args.index("distill") + 1:], DistillConfig) == want, name
    ce = dict(distill)["distill-ce-seed-42"]
    assert "--kv-weight 0.0" in ce and "--teachers" not in ce


def test_a_teacher_trained_by_kava_run_cannot_be_rendered():
    run = load_config(None)  # the embedded default trains its teacher
    with pytest.raises(ConfigError, match=r"trained by `kava run` \(train:\)"):
        render_from_run_config(run, SlurmOptions(gpus_per_node=0), stage="extract")
    assert render_from_run_config(run, SlurmOptions(gpus_per_node=0), stage="distill")  # students still can be
    with pytest.raises(ConfigError, match="--stage: expected extract or distill"):
        render_from_run_config(run, SlurmOptions(), stage="eval")  # type: ignore[arg-type]


@pytest.mark.integration
def test_shellcheck_is_available_or_the_skip_says_so(tmp_path, slurm):
    shellcheck_or_skip()
    script = render_extract(teacher_config(tmp_path / "kv.zarr"), slurm, jobs=2)
    check_shell(script, tmp_path)
