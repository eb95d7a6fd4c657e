"""Experiment trackers (`kava distill --tracker`, `kava run`'s ``trackers:``): what each one holds is read back
through the tracker's own reader (MLflow's client, TensorBoard's EventAccumulator, wandb's offline run file) and
compared with ``metrics.jsonl`` and ``config.yaml``. Offline only: wandb in offline mode, MLflow on a local file
store, TensorBoard event files.
"""

from __future__ import annotations

import json
import os
import platform
import socket
import struct
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import click
import pytest
import yaml
from helpers import ENV, KAVA, stories_store

from kava.core.errors import ConfigError
from kava.distill.config import DistillConfig
from kava.distill.outputs import MetricSinks
from kava.distill.trackers import IDS_FILE, MlflowTracker
from kava.distill.trainer import run_distill
from kava.kvstore import KVStore
from kava.pipelines.config import parse_config, stage_distill_config
from kava.pipelines.options import build_configs
from kava.pipelines.runner import student_key, track_report
from kava.pipelines.slurm import config_flags

ONE_TORCH_THREAD = True  # see conftest.one_torch_thread

# MLflow's import reads platform.platform(), which runs `uname -p` once per process: done here, at collection, so
# that the in-process tests below start no process of their own.
platform.processor()

SECRET = "kava-test-secret-7f3a9c2e51"
"""Set as WANDB_API_KEY for the tracked run: it must appear in nothing the run writes or prints."""
STEPS = 3


@pytest.fixture(scope="module")
def store(tmp_path_factory, stories) -> Path:
    """stories260K over 24 synthetic problems, a few shards."""
    return stories_store(tmp_path_factory.mktemp("trackers") / "kv.zarr")


@pytest.fixture(autouse=True)
def local_mlflow_store(monkeypatch):
    """MLflow 3 opens a file store only when told it may (the trackers tell it too, for their own default)."""
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    for name in [n for n in os.environ if n.startswith(("WANDB_", "MLFLOW_TRACKING"))]:
        monkeypatch.delenv(name)


@pytest.fixture(scope="module")
def tracked(tmp_path_factory, store) -> tuple[Path, subprocess.CompletedProcess]:
    """`kava distill` with all three trackers (--tensorboard, the old spelling, for TensorBoard), offline, with a
    secret-looking WANDB_API_KEY in its environment."""
    out = tmp_path_factory.mktemp("tracked") / "run"
    env = {k: v for k, v in ENV.items() if not k.startswith(("WANDB_", "MLFLOW_"))}
    # Every HTTP(S) request goes through a proxy that is a local socket counting connections: there must be none.
    trap = socket.create_server(("127.0.0.1", 0))
    trap.settimeout(0.2)
    proxy = f"http://127.0.0.1:{trap.getsockname()[1]}"
    env.update({name: proxy for name in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy", "ALL_PROXY")})
    env.update(NO_PROXY="", no_proxy="", WANDB_MODE="offline", WANDB_API_KEY=SECRET)
    connections: list[Any] = []
    done = threading.Event()

    def accept() -> None:
        while not done.is_set():
            try:
                connections.append(trap.accept())
            except TimeoutError:
                pass

    watcher = threading.Thread(target=accept, daemon=True)
    watcher.start()
    try:
        proc = subprocess.run([*KAVA, "distill", "--store", str(store), "--student", "tiny-llama", "--out", str(out),
                               "--steps", str(STEPS), "--batch-size", "4", "--no-progress", "--tracker", "mlflow",
                               "--tracker", "wandb", "--tensorboard"],
                              capture_output=True, text=True, env=env, timeout=300)
    finally:
        done.set()
        watcher.join()
        trap.close()
    assert proc.returncode == 0, proc.stderr
    assert connections == [], "a tracker went to the network"
    return out, proc


def metrics(out: Path) -> list[dict[str, float]]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def history(out: Path) -> dict[str, list[tuple[int, float]]]:
    """metrics.jsonl as metric → [(step, value)]."""
    series: dict[str, list[tuple[int, float]]] = {}
    for row in metrics(out):
        for key, value in row.items():
            if key != "step":
                series.setdefault(key, []).append((int(row["step"]), value))
    return series


def mlflow_run(uri: str, name: str) -> Any:
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("kava").experiment_id])
    assert [r.info.run_name for r in runs] == [name]
    return client, runs[0]


def scalars(folder: Path) -> tuple[Any, dict[str, list[tuple[int, float]]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    acc.Reload()
    return acc, {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def wandb_records(run_file: Path) -> list[Any]:
    """The records of a wandb offline run file (``run-<id>.wandb``): a 7-byte header (``:W&B``, magic, version),
    then 32 KiB blocks of records, each a 7-byte header (crc32, length, type: full, first, middle, last) and a
    piece of one protobuf ``Record``."""
    from wandb.proto import wandb_internal_pb2

    data = run_file.read_bytes()
    assert data[:4] == b":W&B"
    records, pos, pieces = [], 7, b""
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:  # a block's tail too short for a header is padding
            pos += 32768 - pos % 32768
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        pieces += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # full, last
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pieces)
            records.append(record)
            pieces = b""
    return records


# ---------------------------------------------------------------------------------------------------------------------
# One real run, three trackers


@pytest.mark.integration
def test_mlflow_holds_every_metric_at_its_step_and_the_config(tracked, store):
    out, _ = tracked
    client, run = mlflow_run((out / "mlruns").resolve().as_uri(), out.name)
    assert run.info.status == "FINISHED" and json.loads((out / IDS_FILE).read_text())["mlflow"] == run.info.run_id
    expected = history(out)
    assert len(expected) > 10 and set(run.data.metrics) == set(expected)
    for key, series in expected.items():
        got = [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, key)]
        assert [s for s, _ in got] == [s for s, _ in series], key
        assert [v for _, v in got] == pytest.approx([v for _, v in series], rel=1e-6), key
    config = yaml.safe_load((out / "config.yaml").read_text())
    params = run.data.params
    for key, value in config.items():
        want = value if isinstance(value, str) else json.dumps(value)
        assert params[key] == want, key
    assert params["tracker"] == '["mlflow", "wandb"]' and params["tensorboard"] == "true"
    made = json.loads((out / "kava.json").read_text())
    assert params["store_digest"] == KVStore.open(store).digest() == made["store_digest"]


@pytest.mark.integration
def test_tensorboard_holds_every_metric_at_its_step_and_the_config(tracked):
    out, _ = tracked
    acc, got = scalars(out / "tb")
    expected = history(out)
    assert set(got) == set(expected)
    for key, series in expected.items():
        assert [s for s, _ in got[key]] == [s for s, _ in series], key
        assert [v for _, v in got[key]] == pytest.approx([v for _, v in series], rel=1e-6), key
    text = acc.Tensors("config/text_summary")[0].tensor_proto.string_val[0].decode()
    assert "    student: tiny-llama" in text and f"    steps: {STEPS}" in text and "store_digest: " in text


@pytest.mark.integration
def test_wandb_offline_run_holds_the_config_and_the_final_summary(tracked):
    out, _ = tracked
    [run_file] = (out / "wandb").glob("offline-run-*/run-*.wandb")
    records = wandb_records(run_file)
    [run] = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    assert run.project == "kava" and run.display_name == out.name
    assert run.run_id == json.loads((out / IDS_FILE).read_text())["wandb"]
    config = {u.key: json.loads(u.value_json) for u in run.config.update if u.key != "_wandb"}
    assert {k: config[k] for k in ("student", "steps", "lr", "tracker")} == \
        {"student": "tiny-llama", "steps": STEPS, "lr": 3e-4, "tracker": ["mlflow", "wandb"]}
    assert len(config["store_digest"]) == 64
    summary: dict[str, Any] = {}
    for r in records:
        if r.WhichOneof("record_type") == "summary":
            summary.update({u.key or "/".join(u.nested_key): json.loads(u.value_json) for u in r.summary.update})
    last = metrics(out)[-1]
    assert summary["_step"] == STEPS
    for key, value in last.items():
        if key != "step":
            assert summary[key] == pytest.approx(value, rel=1e-6), key


@pytest.mark.integration
def test_no_secret_reaches_the_outputs_or_the_log(tracked):
    out, proc = tracked
    assert SECRET not in proc.stdout + proc.stderr
    assert "wandb:" not in proc.stderr  # the log stays the run's own lines
    written = [p for p in out.rglob("*") if p.is_file()]
    assert any(p.suffix == ".wandb" for p in written) and any("mlruns" in p.parts for p in written)
    assert not [p for p in written if SECRET.encode() in p.read_bytes()]


# ---------------------------------------------------------------------------------------------------------------------
# Options, a missing package, a tracker that fails, resume


def parse(*args: str) -> DistillConfig:
    """``args`` through the real `kava distill` click command."""
    from kava.pipelines.cli import main

    ctx = click.Context(main)
    cmd = main.get_command(ctx, "distill")
    with cmd.make_context("distill", ["--student", "tiny-llama", "--out", "o", *args], parent=ctx) as sub:
        values = {k: v for k, v in sub.params.items() if k not in ("as_json", "config_file", "nproc")}
    return build_configs((DistillConfig,), values, None)[0]


def test_tracker_is_repeatable_and_tensorboard_is_its_alias():
    assert parse("--tracker", "wandb", "--tracker", "mlflow").report.trackers == ["wandb", "mlflow"]
    assert parse("--tracker", "wandb,mlflow", "--tensorboard").report.trackers == ["wandb", "mlflow", "tensorboard"]
    assert parse("--tensorboard", "--tracker", "tensorboard").report.trackers == ["tensorboard"]
    assert parse().report.trackers == [] and parse().tracker is None
    cfg = parse("--tracker", "mlflow", "--tracker-project", "p")
    assert DistillConfig.from_dict(cfg.to_dict()) == cfg  # config.yaml reads back
    with pytest.raises(ConfigError, match=r"--tracker: expected one of wandb, mlflow, tensorboard. Got 'comet'"):
        parse("--tracker", "comet").validate()
    saved = parse("--tracker", "mlflow").to_dict()
    assert parse("--tracker", "wandb", "--tracker-name", "x").resume_differences(saved) == []
    flags = config_flags(parse("--tracker", "mlflow", "--tracker", "wandb"))  # what `kava slurm distill` renders
    assert flags[flags.index("--tracker") + 1] == "mlflow,wandb" and parse(*flags).tracker == ["mlflow", "wandb"]


def test_only_rank_0_logs(tmp_path):
    cfg = DistillConfig(student="tiny-llama", out=str(tmp_path), tracker=["mlflow", "tensorboard"])
    sinks = MetricSinks.open(cfg, tmp_path, main=False)
    sinks.write({"step": 1, "loss/total": 1.0})
    sinks.close()
    assert not sinks.trackers and list(tmp_path.iterdir()) == []


def test_a_missing_tracker_package_is_one_line_before_anything_is_written(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "mlflow", None)  # as if it were not installed: importing it fails
    out = tmp_path / "run"
    cfg = DistillConfig(student="tiny-llama", out=str(out), store=str(tmp_path / "kv.zarr"), tracker=["mlflow"])
    with pytest.raises(ConfigError, match=r"^--tracker mlflow: mlflow is not installed\. Install the trackers "
                                          r"\(pip install 'kava\[trackers\]'\), or drop --tracker mlflow\.$"):
        run_distill(cfg, log=lambda _: None)
    assert not out.exists()


def test_a_tracker_that_fails_mid_run_is_dropped_with_one_warning(tmp_path, store, monkeypatch, capsys):
    log = MlflowTracker.log

    def failing(self, values, step):
        if step >= 2:
            raise ConnectionError(f"tracking server unreachable (key {SECRET})")
        log(self, values, step)

    monkeypatch.setattr(MlflowTracker, "log", failing)
    monkeypatch.setenv("WANDB_API_KEY", SECRET)
    out = tmp_path / "run"
    result = run_distill(DistillConfig(student="tiny-llama", out=str(out), store=str(store), steps=STEPS,
                                       batch_size=4, progress=False, checkpoint_every=0,
                                       tracker=["mlflow", "tensorboard"]), log=lambda _: None)
    assert result.steps == STEPS and (out / "kava.json").is_file() and len(metrics(out)) == STEPS
    warnings = [line for line in capsys.readouterr().err.splitlines() if "warning: tracker" in line]
    assert len(warnings) == 1 and warnings[0].startswith("warning: tracker mlflow failed while logging step 2 "
                                                         "(ConnectionError: tracking server unreachable (key ***))")
    client, run = mlflow_run((out / "mlruns").resolve().as_uri(), "run")
    assert [m.step for m in client.get_metric_history(run.info.run_id, "loss/total")] == [1]
    assert [s for s, _ in scalars(out / "tb")[1]["loss/total"]] == [1, 2, 3]  # the other tracker went on


def test_resume_continues_the_same_tracker_runs(tmp_path, store):
    out = tmp_path / "run"
    options = dict(student="tiny-llama", out=str(out), store=str(store), steps=4, batch_size=4, progress=False,
                   checkpoint_every=2, tracker=["mlflow", "tensorboard"])
    run_distill(DistillConfig(**options), log=lambda _: None)
    first = json.loads((out / IDS_FILE).read_text())
    # As if killed after step 4 was logged but before its checkpoint: --resume continues from step 2.
    (out / "kava.json").unlink()
    for path in (out / "checkpoints" / "step-000004").iterdir():
        path.unlink()
    (out / "checkpoints" / "step-000004").rmdir()
    result = run_distill(DistillConfig(**options, resume=True), log=lambda _: None)
    assert result.resumed_from == 2 and json.loads((out / IDS_FILE).read_text()) == first
    client, run = mlflow_run((out / "mlruns").resolve().as_uri(), "run")
    assert run.info.run_id == first["mlflow"] and run.info.status == "FINISHED"
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "loss/total")]
    assert steps == [1, 2, 3, 4, 3, 4]  # MLflow keeps both tries of steps 3-4; the last are metrics.jsonl's
    # TensorBoard drops the events past the checkpoint: each step once, with the resumed run's values.
    expected = history(out)["loss/total"]
    got = scalars(out / "tb")[1]["loss/total"]
    assert [s for s, _ in got] == [1, 2, 3, 4] and [v for _, v in got] == pytest.approx([v for _, v in expected])


# ---------------------------------------------------------------------------------------------------------------------
# kava run


RUN = {"name": "tiny", "seeds": [1, 2], "teachers": [{"name": "t", "model": "m"}], "data": {"teacher_fraction": 0},
       "variants": [{"name": "ce"}, {"name": "kv", "teachers": ["t"]}], "trackers": ["mlflow", "tensorboard"],
       "tracker_project": "exp"}


def test_kava_run_passes_its_trackers_to_each_student_and_not_into_its_key(tmp_path):
    cfg = parse_config({**RUN, "out": str(tmp_path)})
    student = stage_distill_config(cfg, cfg.variant("kv"), seed=1, store="kv.zarr",
                                   out=str(cfg.root / "students" / "kv" / "seed-1"))
    assert (student.tracker, student.tracker_project, student.tracker_name) == \
        (["mlflow", "tensorboard"], "exp", "tiny/kv/seed-1")
    untracked = parse_config({**RUN, "out": str(tmp_path), "trackers": []})
    plain = stage_distill_config(untracked, untracked.variant("kv"), seed=1, store="kv.zarr", out=student.out)
    assert plain.tracker is None and student_key(plain, "s", {}) == student_key(student, "s", {})
    with pytest.raises(ConfigError, match=r"trackers: expected names from wandb, mlflow, tensorboard\. Got 'comet'"):
        parse_config({**RUN, "trackers": ["comet"]})
    with pytest.raises(ConfigError, match=r"variants\[kv\]\.distill: 'tracker' is set by the runner"):
        parse_config({**RUN, "variants": [{"name": "ce"}, {"name": "kv", "distill": {"tracker": "wandb"}}]})


def test_kava_run_logs_its_config_headline_and_figures_in_a_run_of_its_own(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cfg = parse_config({**RUN, "out": str(tmp_path)})
    root = cfg.root
    (root / "figures").mkdir(parents=True)
    fig = plt.figure(figsize=(2, 1.5), dpi=50)
    plt.bar(["ce", "kv"], [0.25, 0.5])
    fig.savefig(root / "figures" / "accuracy.png")
    plt.close(fig)
    (root / "report.json").write_text(json.dumps({
        "accuracy": [{"variant": "ce", "mean": 0.25}, {"variant": "kv", "mean": 0.5}],
        "teachers": {"t": {"accuracy": 0.75}}}))
    track_report(cfg, root, log=lambda _: None)

    from mlflow import MlflowClient

    client = MlflowClient((root / "mlruns").resolve().as_uri())
    [run] = client.search_runs([client.get_experiment_by_name("exp").experiment_id])
    assert run.info.run_name == "tiny" and run.data.params["seeds"] == "[1, 2]"
    assert run.data.params["data.teacher_fraction"] == "0.0"
    assert run.data.metrics == {"accuracy/ce": 0.25, "accuracy/kv": 0.5, "accuracy/teacher-t": 0.75}
    assert [a.path for a in client.list_artifacts(run.info.run_id)] == ["accuracy.png"]
    acc, got = scalars(root / "tb")
    assert got["accuracy/kv"] == [(0, 0.5)] and acc.Tags()["images"] == ["figures/accuracy"]
    image = acc.Images("figures/accuracy")[0]
    assert (image.width, image.height) == (100, 75)
