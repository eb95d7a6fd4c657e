"""Shared fixtures: offline mode, the real assets through KAVA_ASSETS, the gpu marker, and the integration guard.

Real data (GSM8K, tokenizers, the stories260K Llama) lives outside the repository and is found through the
environment variable ``KAVA_ASSETS``. A test that needs an asset skips with the reason when it is unset, and fails
instead when ``KAVA_REQUIRE_ASSETS=1`` (as in CI), so a fresh clone passes and CI still runs every real-data test.

Helpers that test modules import (``asset_path``, ``sigkill_when``, ``KAVA``, ``ENV``) live in ``helpers.py``.
A test that starts a process (a subprocess, a dask cluster, DataLoader workers, torchrun, a Jupyter kernel) must be
marked ``integration``; ``helpers.IntegrationGuard`` fails it otherwise.
"""

from __future__ import annotations

import os

import pytest
from helpers import OFFLINE, IntegrationGuard, asset_path

pytest_plugins = ["pytester"]  # test_tiers.py runs the integration guard on tests it writes

for _key, _value in OFFLINE.items():
    os.environ.setdefault(_key, _value)


def pytest_configure(config):
    config.pluginmanager.register(IntegrationGuard(), "kava-integration-guard")


@pytest.fixture(scope="module")
def stories():
    """The real pretrained stories260K Llama (a model directory) from the assets, found as ``assets`` finds it."""
    return asset_path("models/stories260K_hf_derived")


@pytest.fixture
def assets():
    """Callable fixture: ``assets("gsm8k/test.jsonl")`` → Path, skipping or failing as described above."""
    return asset_path


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread(request):
    """Torch on one thread in modules that set ``ONE_TORCH_THREAD = True``: the machine's two cores are shared
    with the subprocesses those modules start (which get ``helpers.ONE_THREAD``) and with whatever else runs, and
    for tiny models extra intra-op threads only fight them (decoding the stories260K model took 34 s on two
    threads under load, 7 s on one)."""
    if not getattr(request.module, "ONE_TORCH_THREAD", False):
        yield
        return
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


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
