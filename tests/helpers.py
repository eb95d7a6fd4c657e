"""What several test modules share: the real assets, the `kava` command and the environment its subprocesses get,
SIGKILL at a chosen moment, and the check that keeps `pytest -m "not integration"` free of processes.

Test modules import it as ``helpers``: pytest puts ``tests/`` on ``sys.path`` for the ``conftest.py`` beside it.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
"""No hub access anywhere in the tests (a hub id retries for ~46 s before failing without these), and no tokenizer
thread pools in processes that fork."""

ONE_THREAD = {"OMP_NUM_THREADS": "1"}
"""Torch on one thread in subprocesses: the machine's cores are shared between the test process and what it starts,
and extra intra-op threads fighting each other made each run about 3x slower. In-process, modules that set
``ONE_TORCH_THREAD = True`` get the same through conftest's ``one_torch_thread`` fixture."""

ENV = {**os.environ, **OFFLINE, **ONE_THREAD}
"""The environment every `kava` subprocess gets; tests add to it (``{**ENV, "HF_HOME": ...}``)."""

KAVA = [sys.executable, "-m", "kava.pipelines.cli"]
"""The `kava` command, run by this interpreter (so it is the checkout under test, installed or not)."""


def asset_path(relative: str) -> Path:
    """Return ``$KAVA_ASSETS/relative``, or skip (fail under KAVA_REQUIRE_ASSETS=1) when it is not there.

    The ``assets`` fixture hands this out; module-scoped fixtures call it directly."""
    root = os.environ.get("KAVA_ASSETS")
    required = os.environ.get("KAVA_REQUIRE_ASSETS") == "1"
    if not root:
        reason = f"needs the real asset {relative!r}: set KAVA_ASSETS to the shared assets folder"
        if required:
            pytest.fail(f"KAVA_REQUIRE_ASSETS=1 but KAVA_ASSETS is unset; {reason}")
        pytest.skip(reason)
    path = Path(root).expanduser().resolve() / relative
    if not path.exists():
        reason = f"asset {relative!r} not found under KAVA_ASSETS={root}"
        if required:
            pytest.fail(reason)
        pytest.skip(reason)
    return path


def sigkill_when(proc: subprocess.Popen, ready: Callable[[], bool], *, timeout: float = 120,
                 children: bool = False) -> str:
    """Poll ``ready()`` until it holds (or ``proc`` ends, or ``timeout`` passes), then SIGKILL ``proc`` — or, with
    ``children``, the processes it started (torchrun's ranks, which live in sessions of their own: killing torchrun
    alone would leave them running) — and return its stderr once it has exited. It is reaped whatever happens."""
    try:
        deadline = time.monotonic() + timeout
        while proc.poll() is None and time.monotonic() < deadline and not ready():
            time.sleep(0.01)
        if children:
            import psutil

            for child in psutil.Process(proc.pid).children():
                child.send_signal(signal.SIGKILL)
        else:
            proc.send_signal(signal.SIGKILL)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return err


# ---------------------------------------------------------------------------------------------------------------------
# The integration marker, kept honest


class ProcessStarts:
    """While active, records every process this interpreter starts, from any thread: ``subprocess.Popen`` (so
    ``subprocess.run``, torchrun, Jupyter kernels), ``multiprocessing`` (dask workers, DataLoader workers, process
    pools), ``os.fork`` and ``os.system``. It only records; the processes start as usual. Nests."""

    def __init__(self) -> None:
        self.started: list[str] = []
        self._saved: list[tuple[Any, str, Any]] = []

    def __enter__(self) -> ProcessStarts:
        import multiprocessing.process

        def execute_child(popen, args, *rest, **kw):
            self.started.append(" ".join(map(str, args)) if isinstance(args, (list, tuple)) else str(args))
            return popen_execute(popen, args, *rest, **kw)

        def process_start(process):
            self.started.append(f"{type(process).__name__}({process.name})")
            return process_start_original(process)

        def fork():
            self.started.append("os.fork()")
            return fork_original()

        def system(command):
            self.started.append(f"os.system({command!r})")
            return system_original(command)

        popen_execute = self._patch(subprocess.Popen, "_execute_child", execute_child)
        process_start_original = self._patch(multiprocessing.process.BaseProcess, "start", process_start)
        fork_original = self._patch(os, "fork", fork)
        system_original = self._patch(os, "system", system)
        return self

    def __exit__(self, *exc: object) -> None:
        while self._saved:
            owner, name, original = self._saved.pop()
            setattr(owner, name, original)

    def _patch(self, owner: Any, name: str, replacement: Callable) -> Callable:
        original = getattr(owner, name)
        self._saved.append((owner, name, original))
        setattr(owner, name, replacement)
        return original


class IntegrationGuard:
    """A pytest plugin: a test not marked ``integration`` fails if it, or a fixture it uses, starts a process.

    Plain ``pytest`` runs everything; ``pytest -m "not integration"`` is the fast tier, and a test that starts
    subprocesses, a dask cluster, DataLoader workers or torchrun there would make it slow again without anyone
    noticing. A fixture's processes count against every test that uses it, not only the first one to set it up, so
    the check does not depend on the order tests run in."""

    def __init__(self) -> None:
        self.fixtures: dict[tuple[str, str], list[str]] = {}
        """(the node id the fixture is defined under, its name) → the processes its setup started."""

    @pytest.hookimpl(wrapper=True)
    def pytest_fixture_setup(self, fixturedef, request):
        with ProcessStarts() as starts:
            result = yield
        if starts.started:
            node = getattr(fixturedef, "node", None)  # pytest >= 9; before it, baseid says the same
            self.fixtures[(node.nodeid if node is not None else fixturedef.baseid, fixturedef.argname)] = starts.started
        return result

    @pytest.hookimpl(wrapper=True)
    def pytest_runtest_call(self, item):
        if item.get_closest_marker("integration") is not None:
            return (yield)
        with ProcessStarts() as starts:
            result = yield
        started = [f"{what} (in the test)" for what in starts.started]
        for name in item.fixturenames:
            for (where, argname), processes in self.fixtures.items():
                if argname == name and (not where or item.nodeid.startswith((f"{where}::", f"{where}/"))):
                    started += [f"{what} (in fixture {name!r})" for what in processes]
        if started:
            shown = "; ".join(what[:200] for what in started[:3]) + ("; ..." if len(started) > 3 else "")
            pytest.fail(f"Expected a test that is not marked integration to start no process. Got {len(started)} "
                        f"started instead: {shown}. Mark the test @pytest.mark.integration (a whole module: "
                        f"pytestmark = pytest.mark.integration) so `pytest -m \"not integration\"` stays the fast "
                        f"tier.", pytrace=False)
        return result


def stories_store(path: Path) -> Path:
    """The real stories260K teacher over 24 synthetic problems at ``path``, a few shards: a small real store."""
    from kava.extract.config import ExtractConfig  # noqa: PLC0415 - zarr and torch, for the tests that use it
    from kava.extract.recipe import run_extract  # noqa: PLC0415 - as the line above

    run_extract(ExtractConfig.from_dict(dict(teacher=str(asset_path("models/stories260K_hf_derived")), store=str(path),
                                             limit=24, shard_tokens=1024, batch_size=8, progress=False,
                                             calibration_samples=0)), log=lambda _: None)
    return path
