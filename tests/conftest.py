"""Shared fixtures: offline mode, the real assets through KAVA_ASSETS, and the gpu marker.

Real data (GSM8K, tokenizers, the stories260K Llama) lives outside the repository and is found through the
environment variable ``KAVA_ASSETS``. A test that needs an asset skips with the reason when it is unset, and fails
instead when ``KAVA_REQUIRE_ASSETS=1`` (as in CI), so a fresh clone passes and CI still runs every real-data test.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Callable

import pytest

# No hub access anywhere in the tests: a hub id without these retries for ~46 s before failing.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def asset_path(relative: str) -> Path:
    """Return ``$KAVA_ASSETS/relative``, or skip (fail under KAVA_REQUIRE_ASSETS=1) when it is not there."""
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


@pytest.fixture
def assets():
    """Callable fixture: ``assets("gsm8k/test.jsonl")`` → Path, skipping or failing as described above."""
    return asset_path


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread(request):
    """Torch on one thread in modules that set ``ONE_TORCH_THREAD = True``: the machine's two cores are shared
    with the subprocesses those modules start, and extra intra-op threads only fight them."""
    if not getattr(request.module, "ONE_TORCH_THREAD", False):
        yield
        return
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


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


def pytest_collection_modifyitems(config, items):
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except ImportError:  # pragma: no cover - torch is a hard dependency
        has_cuda = False
    if has_cuda:
        return
    skip_gpu = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture
def related():
    """Two related feature sets ``[300, 24]`` and ``[300, 16]`` with non-zero means (as activations have): what the
    CKA tests compare, in extraction's estimators and in the analysis references."""
    import numpy as np

    rng = np.random.default_rng(0)
    x = rng.normal(size=(300, 24)) + rng.normal(size=24) * 5
    y = np.tanh(x[:, :16]) @ rng.normal(size=(16, 16)) + 0.5 * rng.normal(size=(300, 16)) + 3.0
    return x, y
