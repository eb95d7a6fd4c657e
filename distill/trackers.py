"""Experiment trackers: a run's resolved config, every metric at the step it is logged, and the store's digest, sent
to Weights & Biases, MLflow or TensorBoard (``--tracker``, repeatable) beside ``metrics.jsonl``.

Offline and local unless the tracker's own environment says otherwise; credentials and endpoints come only from
those variables, and nothing here writes one (a tracker's error message is logged with them blanked):

- wandb in offline mode (``WANDB_MODE``, when set, decides instead), its run folder under ``<out>/wandb`` (or
  ``WANDB_DIR``); `wandb sync` uploads it later;
- MLflow to the local file store ``file:<out>/mlruns`` (or ``MLFLOW_TRACKING_URI``);
- TensorBoard event files in ``<out>/tb``.

Nor do the trackers send anything of their own: MLflow's usage telemetry and wandb's error reports are turned off
(:data:`QUIET`) unless the environment turns them on.

Each tracker is one small class with the four calls of :class:`Tracker`. :class:`TrackerSet` sends a call to every
tracker and drops one that raises, with one warning on stderr: a tracker's outage never stops training (metrics.jsonl
keeps every step). The run ids that let ``--resume`` continue the same tracker run are kept in ``<out>/trackers.json``.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import re
import shutil
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlparse

import yaml

from kava.core.errors import ConfigError
from kava.core.log import Log, log_stderr

TRACKERS = ("wandb", "mlflow", "tensorboard")
"""The trackers --tracker accepts."""
MODULES = {"wandb": "wandb", "mlflow": "mlflow", "tensorboard": "tensorboard"}
"""The module each tracker imports (mlflow's comes with the mlflow-skinny package)."""
INSTALL = "pip install 'kava[trackers]'"
IDS_FILE = "trackers.json"
"""In the output folder: each tracker's run id, so that --resume continues the same tracker run."""
MLFLOW_PARAM_CHARS = 6000
"""MLflow refuses a parameter value longer than this."""
MLFLOW_BATCH = 100
"""MLflow takes at most 100 parameters in one call."""
MLFLOW_METRICS = 1000
"""... and at most 1000 metrics."""
MLFLOW_FLUSH_S = 5.0
"""MLflow's client logs synchronously (a file append per metric, or a request to a server): metrics are sent at most
every this many seconds, and at the end, rather than once per step."""
QUIET = {"MLFLOW_DISABLE_TELEMETRY": "true", "WANDB_ERROR_REPORTING": "false"}
"""Set (unless already set) before a tracker is imported: MLflow 3 posts usage events from a thread its import
starts, and wandb's service reports its own errors to wandb's servers; offline logging needs neither."""
_SECRET_NAME = re.compile(r"KEY|TOKEN|SECRET|PASSWORD|CREDENTIAL", re.IGNORECASE)
_URL_USER = re.compile(r"(\w+://)[^/@\s]+@")


def check_trackers(names: Iterable[str]) -> None:
    """Refuse a tracker whose package is not installed, before anything loads: one line naming the install."""
    missing = []
    for name in names:
        quiet()
        try:
            importlib.import_module(MODULES[name])  # the tracker's own check; rank 0 imports it again to log
        except ImportError:
            missing.append(name)
    if missing:
        packages = " and ".join(MODULES[m] for m in missing) + (" are" if len(missing) > 1 else " is")
        raise ConfigError(f"--tracker {', '.join(missing)}: {packages} not installed. Install the trackers "
                          f"({INSTALL}), or drop --tracker {missing[0]}.")


def quiet() -> None:
    """Turn off what the trackers send on their own (:data:`QUIET`), where the environment doesn't say otherwise."""
    for key, value in QUIET.items():
        os.environ.setdefault(key, value)


def redact(text: str) -> str:
    """``text`` without the value of any environment variable named like a secret (``WANDB_API_KEY``, ...) and
    without the user part of URLs (``https://user:pass@host``): a tracker's error message may quote either."""
    for name, value in os.environ.items():
        if _SECRET_NAME.search(name) and len(value) >= 4:
            text = text.replace(value, "***")
    return _URL_USER.sub(r"\1***@", text)


@dataclass(frozen=True)
class TrackerRun:
    """Where and as what a tracker logs."""

    out: Path
    """The output folder: the offline trackers write under it, and ``trackers.json`` keeps the run ids."""
    project: str
    """The wandb project, the MLflow experiment."""
    name: str
    """The run's name."""
    step: int = 0
    """The step the run starts from: > 0 when it resumes a checkpoint, and then continues the tracker run whose id
    ``trackers.json`` holds."""
    resume_id: str | None = None
    """That id, for one tracker (:meth:`TrackerSet.open` reads it)."""


class Tracker(Protocol):
    """One experiment tracker. ``run_id`` is what resumes its run (None where there is nothing to resume)."""

    name: str
    run_id: str | None

    def start(self, config: Mapping[str, Any]) -> None: ...

    def log(self, metrics: Mapping[str, float], step: int) -> None: ...

    def log_artifact(self, path: Path) -> None: ...

    def finish(self) -> None: ...


# ---------------------------------------------------------------------------------------------------------------------
# One class per tracker


class WandbTracker:
    """Weights & Biases, offline unless ``WANDB_MODE`` says otherwise."""

    name = "wandb"

    def __init__(self, run: TrackerRun) -> None:
        self.where, self.run_id = run, run.resume_id
        self.run: Any = None

    def start(self, config: Mapping[str, Any]) -> None:
        quiet()
        import wandb  # noqa: PLC0415 - optional extra (kava[trackers])

        # console="off": stdout stays the --json result's and stderr the log's; silent: no banner lines.
        settings: dict[str, Any] = {"console": "off", "silent": True, "save_code": False}
        if not os.environ.get("WANDB_MODE"):
            settings["mode"] = "offline"
        folder = {} if os.environ.get("WANDB_DIR") else {"dir": str(self.where.out)}
        resume = {"id": self.run_id, "resume": "allow"} if self.run_id else {}
        self.run = wandb.init(project=self.where.project, name=self.where.name, config=dict(config),
                              settings=wandb.Settings(**settings), **folder, **resume)
        self.run_id = self.run.id

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        self.run.log(dict(metrics), step=step)

    def log_artifact(self, path: Path) -> None:
        import wandb  # noqa: PLC0415 - optional extra (kava[trackers])

        if path.suffix.lower() == ".png":  # a figure: shown as an image, under its file name
            self.run.log({f"figures/{path.stem}": wandb.Image(str(path))})
        else:  # copied into the run's files (wandb.save alone would link to a file that may change)
            target = Path(self.run.dir) / path.name
            shutil.copyfile(path, target)
            self.run.save(str(target), base_path=self.run.dir, policy="now")

    def finish(self) -> None:
        self.run.finish()


class MlflowTracker:
    """MLflow through its client, on the local file store ``<out>/mlruns`` unless ``MLFLOW_TRACKING_URI`` is set."""

    name = "mlflow"

    def __init__(self, run: TrackerRun) -> None:
        self.where, self.run_id = run, run.resume_id
        self.client: Any = None
        self.pending: list[Any] = []  # mlflow Metric entities not sent yet
        self.sent = time.monotonic()

    def tracking_uri(self) -> str:
        return os.environ.get("MLFLOW_TRACKING_URI") or (self.where.out / "mlruns").resolve().as_uri()

    def start(self, config: Mapping[str, Any]) -> None:
        quiet()
        from mlflow import MlflowClient  # noqa: PLC0415 - optional extra (kava[trackers])
        from mlflow.entities import Param  # noqa: PLC0415
        from mlflow.exceptions import MlflowException  # noqa: PLC0415

        uri = self.tracking_uri()
        if urlparse(uri).scheme in ("", "file"):
            # MLflow 3 refuses its file store unless this is set; a local folder is what offline logging needs.
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        self.client = MlflowClient(uri)
        if self.run_id is not None:
            try:
                self.client.update_run(self.run_id, status="RUNNING")
                return  # its parameters were logged when it started (MLflow refuses to change one)
            except MlflowException:
                self.run_id = None  # gone from this store: a new run
        experiment = self.client.get_experiment_by_name(self.where.project)
        if experiment is not None:
            experiment_id = experiment.experiment_id
        else:
            try:
                experiment_id = self.client.create_experiment(self.where.project)
            except MlflowException:  # created meanwhile by another run on the same store
                experiment_id = self.client.get_experiment_by_name(self.where.project).experiment_id
        self.run_id = self.client.create_run(experiment_id, run_name=self.where.name).info.run_id
        params = [Param(k, _param_text(v)) for k, v in _flat(config).items()]
        for i in range(0, len(params), MLFLOW_BATCH):
            self.client.log_batch(self.run_id, params=params[i:i + MLFLOW_BATCH])

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        from mlflow.entities import Metric  # noqa: PLC0415 - optional extra (kava[trackers])

        now = int(time.time() * 1000)
        self.pending += [Metric(k, float(v), now, step) for k, v in metrics.items()]
        if time.monotonic() - self.sent >= MLFLOW_FLUSH_S:
            self.flush()

    def flush(self) -> None:
        while self.pending:
            batch, self.pending = self.pending[:MLFLOW_METRICS], self.pending[MLFLOW_METRICS:]
            self.client.log_batch(self.run_id, metrics=batch)
        self.sent = time.monotonic()

    def log_artifact(self, path: Path) -> None:
        self.client.log_artifact(self.run_id, str(path))

    def finish(self) -> None:
        self.flush()
        self.client.set_terminated(self.run_id, "FINISHED")


class TensorBoardTracker:
    """TensorBoard event files in ``<out>/tb``; a resumed run drops the events logged after its checkpoint."""

    name = "tensorboard"
    run_id = None

    def __init__(self, run: TrackerRun) -> None:
        self.where = run
        self.writer: Any = None

    def start(self, config: Mapping[str, Any]) -> None:
        from torch.utils.tensorboard import SummaryWriter  # noqa: PLC0415 - optional extra (kava[trackers])

        purge = {"purge_step": self.where.step + 1} if self.where.step else {}
        self.writer = SummaryWriter(str(self.where.out / "tb"), **purge)
        # The config as a YAML block (indented four spaces: TensorBoard renders its text as markdown).
        text = yaml.safe_dump(dict(config), sort_keys=False)
        self.writer.add_text("config", "".join(f"    {line}\n" for line in text.splitlines()), self.where.step)

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        for key, value in metrics.items():
            self.writer.add_scalar(key, value, step)

    def log_artifact(self, path: Path) -> None:
        if path.suffix.lower() == ".png":
            from matplotlib.image import imread  # noqa: PLC0415 - only figures need it

            self.writer.add_image(f"figures/{path.stem}", imread(path), self.where.step, dataformats="HWC")
        else:
            self.writer.add_text(path.name, "".join(f"    {line}\n" for line in path.read_text().splitlines()))

    def finish(self) -> None:
        self.writer.close()


CLASSES: dict[str, Callable[[TrackerRun], Tracker]] = {
    "wandb": WandbTracker, "mlflow": MlflowTracker, "tensorboard": TensorBoardTracker}


def _flat(config: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested sections as dotted keys (``data.dataset``): one MLflow parameter per option."""
    out: dict[str, Any] = {}
    for key, value in config.items():
        if isinstance(value, Mapping) and value:
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _param_text(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    return text if len(text) <= MLFLOW_PARAM_CHARS else text[:MLFLOW_PARAM_CHARS - 3] + "..."


# ---------------------------------------------------------------------------------------------------------------------
# Every tracker of a run, each dropped at its first failure


class TrackerSet:
    """The trackers of one run. A call goes to each in turn; one that raises is finished if it can be, dropped, and
    reported once on ``log`` (stderr): whatever a tracker raises (its network, its disk, its own bug), training
    goes on with the others and ``metrics.jsonl``."""

    def __init__(self, trackers: list[Tracker], run: TrackerRun | None = None, *, log: Log = log_stderr) -> None:
        self.trackers, self.run, self._log = trackers, run, log

    @classmethod
    def open(cls, names: Iterable[str], run: TrackerRun, *, log: Log = log_stderr) -> TrackerSet:
        """The trackers ``names`` for ``run``; one that resumes (``run.step`` > 0) reads its id from
        ``trackers.json``."""
        ids = _read_ids(run.out) if run.step else {}
        return cls([CLASSES[n](TrackerRun(run.out, run.project, run.name, run.step, ids.get(n))) for n in names],
                   run, log=log)

    def __bool__(self) -> bool:
        return bool(self.trackers)

    def start(self, config: Mapping[str, Any]) -> None:
        self._each("starting", lambda t: t.start(config))
        if self.run is not None and self.trackers:
            ids = {t.name: t.run_id for t in self.trackers if t.run_id is not None}
            tmp = self.run.out / f"{IDS_FILE}.tmp"
            tmp.write_text(json.dumps(ids, indent=2))
            tmp.replace(self.run.out / IDS_FILE)

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        self._each(f"logging step {step}", lambda t: t.log(metrics, step))

    def log_artifact(self, path: Path) -> None:
        self._each(f"logging {path.name}", lambda t: t.log_artifact(path))

    def finish(self) -> None:
        self._each("finishing", lambda t: t.finish())
        self.trackers = []

    def _each(self, what: str, call: Callable[[Tracker], None]) -> None:
        for tracker in list(self.trackers):
            try:
                call(tracker)
            except Exception as e:  # any failure of the tracker's own: it must not stop training
                self.trackers.remove(tracker)
                with contextlib.suppress(Exception):
                    tracker.finish()
                said = " ".join(str(e).split())  # one line, however many the tracker's message has
                said = said if len(said) <= 300 else said[:297] + "..."
                self._log(redact(f"warning: tracker {tracker.name} failed while {what} ({type(e).__name__}: {said}); "
                                 "the run goes on without it (metrics.jsonl has every step)"))


def _read_ids(out: Path) -> dict[str, str]:
    """``trackers.json``'s run ids; none when it is missing or unreadable (the trackers then start new runs)."""
    try:
        ids = json.loads((out / IDS_FILE).read_text())
    except (OSError, ValueError):
        return {}
    return {k: v for k, v in ids.items() if isinstance(v, str)} if isinstance(ids, dict) else {}


def log_summary(out: Path, names: Iterable[str], *, project: str, name: str, config: Mapping[str, Any],
                metrics: Mapping[str, float], artifacts: Iterable[Path], log: Log = log_stderr) -> None:
    """One tracker run of its own for a whole experiment: its config, its headline numbers (logged at step 0) and
    its files (the report's figures), in ``names``' trackers under ``out``."""
    trackers = TrackerSet.open(names, TrackerRun(out, project, name), log=log)
    trackers.start(config)
    trackers.log(metrics, 0)
    for path in artifacts:
        trackers.log_artifact(path)
    trackers.finish()
