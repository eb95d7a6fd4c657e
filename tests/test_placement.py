"""A teacher spread over devices (`--device-map`, `--max-memory`): the options' checks, and the real stories260K
extracted with most of its layers offloaded to disk, into a store identical to the one-device store."""

from __future__ import annotations

import gc
import os
import tempfile
import time

import numpy as np
import pytest
import torch
from helpers import asset_path

from kava.core.errors import ConfigError
from kava.core.models import load_model, resolve_model
from kava.core.placement import input_device, parse_device_map, parse_max_memory
from kava.extract.config import ExtractConfig
from kava.extract.recipe import run_extract
from kava.kvstore import KVStore

ONE_TORCH_THREAD = True  # see conftest.one_torch_thread


@pytest.mark.parametrize("text", ["auto", "balanced", "sequential", '{"model.layers": "disk", "": "cpu"}',
                                  '{"model.embed_tokens": 0, "lm_head": "cuda:1"}'])
def test_device_maps_that_are_accepted(text):
    problems: list[str] = []
    assert parse_device_map(text, problems) == text and not problems


@pytest.mark.parametrize(("text", "match"), [
    ("everywhere", r"--device-map: expected one of auto, balanced, balanced_low_0, sequential or a JSON object"),
    ('{"lm_head": "gpu"}', r"--device-map: expected each module on a GPU index, cuda:N, cpu or disk. Got \{'lm_head': "
                           r"'gpu'\}"),
    ("{}", "--device-map: expected one of"),
])
def test_device_maps_that_are_refused(text, match):
    problems: list[str] = []
    assert parse_device_map(text, problems) is None
    assert len(problems) == 1
    with pytest.raises(ConfigError, match=match):
        resolve_model(str(asset_path("models/stories260K_hf_derived")), device_map=text)


@pytest.mark.parametrize(("text", "ok"), [("0=70GiB,1=70GiB,cpu=200GiB", True), ('{"cpu": "2GB", "0": 1000}', True),
                                          ("cpu=1048576", True), ("cpu=lots", False), ("gpu0=1GiB", False),
                                          ("cpu", False), ('{"cpu": true}', False)])
def test_max_memory(text, ok):
    problems: list[str] = []
    assert (parse_max_memory(text, problems) is not None) == ok and bool(problems) != ok


def test_placement_options_refuse_each_other_clearly():
    stories = str(asset_path("models/stories260K_hf_derived"))
    with pytest.raises(ConfigError, match=r"Can't set both --device and --device-map"):
        resolve_model(stories, device="cpu", device_map="auto")
    with pytest.raises(ConfigError, match=r"--max-memory needs --device-map"):
        resolve_model(stories, max_memory="cpu=1GiB")
    with pytest.raises(ConfigError, match=r"--max-memory: expected DEVICE=SIZE pairs"):
        resolve_model(stories, device_map="auto", max_memory="lots")


def weights_bytes(model: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def test_an_offloaded_teacher_runs_as_on_one_device():
    stories = str(asset_path("models/stories260K_hf_derived"))
    whole = load_model(resolve_model(stories))
    cap = f"cpu={weights_bytes(whole) // 3}"  # a third of the weights: the layers go to disk
    spread = load_model(resolve_model(stories, device_map="auto", max_memory=cap))
    placed = set(map(str, spread.hf_device_map.values()))
    assert "disk" in placed and input_device(spread) == torch.device("cpu")
    ids = torch.tensor([[1, 57, 92, 300, 17, 8]])
    with torch.no_grad():
        torch.testing.assert_close(spread(ids).logits, whole(ids).logits, rtol=0, atol=0)
    # The offloaded weights live in a temporary folder that goes with the model.
    folders = {f for f in os.listdir(tempfile.gettempdir()) if f.startswith("kava-offload-")}
    del spread
    gc.collect()
    assert {f for f in os.listdir(tempfile.gettempdir()) if f.startswith("kava-offload-")} < folders


def test_extraction_with_layers_offloaded_to_disk_writes_the_same_store(tmp_path):
    stories = str(asset_path("models/stories260K_hf_derived"))
    whole = load_model(resolve_model(stories))
    cap = f"cpu={weights_bytes(whole) // 3}"
    common = dict(teacher=stories, limit=8, difficulty="default", progress=False, calibration_samples=0, with_q=True)
    seconds = {}
    for name, extra in (("one", {}), ("spread", {"device_map": "auto", "max_memory": cap})):
        t0 = time.perf_counter()
        run_extract(ExtractConfig.from_dict(dict(common, store=str(tmp_path / f"{name}.zarr"), **extra)),
                    log=lambda _: None)
        seconds[name] = time.perf_counter() - t0
    one, spread = KVStore.open(tmp_path / "one.zarr"), KVStore.open(tmp_path / "spread.zarr")
    (name,) = one.teachers
    for shard in range(one.num_shards):
        a = one.read_shard(shard, with_q=True).teachers
        b = spread.read_shard(shard, with_q=True).teachers
        for teacher in a:
            for array in ("k", "v", "q", "align_weight"):
                np.testing.assert_array_equal(getattr(b[teacher], array), getattr(a[teacher], array))
    assert one.teacher(name).to_dict() == spread.teacher(name).to_dict()
    print(f"offloaded / one device: {seconds['spread'] / seconds['one']:.2f}x")
