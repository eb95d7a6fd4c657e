"""The training loader: the batch plan's properties, and batches from a real extracted store, in-process and from
spawned workers, resumed mid-run.

The store is built once per module by the real extraction: stories260K (with Q for layers 0 and 2) over 60
synthetic problems in ~512-token shards (22 shards), one row's question emptied (a skipped, zero-length sample)
and one row given a '§'. A tiny seeded Llama whose embedding of that byte is NaN is a second teacher on the same
grid, so the '§' sample is quarantined for it; stories260K again, under another name and with only the even
shards extracted (``shard="0/2"``), is an unfinished third teacher.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from helpers import asset_path  # the `assets` fixture's lookup, for module-scoped fixtures
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kava.core.synthetic import synthetic_rows
from kava.distill import batch as batch_module
from kava.distill.loader import (
    Batch,
    KVStream,
    LoaderConfig,
    StreamLoader,
    TeacherRequest,
    check_request,
    plan_epoch,
)
from kava.distill.plan import check_layout
from kava.extract.config import ExtractConfig
from kava.extract.recipe import run_extract
from kava.kvstore import ConfigError, IncompleteError, KVStore, SchemaError
from kava.kvstore.read import ArrayReader

STORIES = "stories260K_hf_derived"  # the default teacher name: the model directory's name
SKIPPED, NAN_ROW = 7, 20  # the emptied row and the row with a '§'
SETTINGS = dict(deadline=None, database=None, max_examples=60, suppress_health_check=[HealthCheck.too_slow])


def extract(teacher: Path | str, store: Path, **options: Any) -> None:
    options = {"progress": False, "calibration_samples": 4, "batch_size": 8, "shard_tokens": 512, **options}
    run_extract(ExtractConfig.from_dict(dict(teacher=str(teacher), store=str(store), **options)), log=lambda _: None)


ONE_TORCH_THREAD = True  # see conftest.one_torch_thread


@pytest.fixture(scope="module")
def store_path(tmp_path_factory) -> Path:
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

    stories = asset_path("models/stories260K_hf_derived")
    root = tmp_path_factory.mktemp("loader")
    rows = [{"question": r.question, "answer": f"{r.reasoning}\n#### {r.answer}"} for r in synthetic_rows(60)]
    rows[SKIPPED]["question"] = ""
    rows[NAN_ROW]["question"] += " §"
    data = root / "rows.jsonl"
    data.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")

    # A tiny Llama on the stories tokenizer whose embedding of <0xA7> (the second byte of '§') is NaN.
    tok = AutoTokenizer.from_pretrained(stories)
    torch.manual_seed(2)
    model = AutoModelForCausalLM.from_config(LlamaConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=1024))
    with torch.no_grad():
        model.get_input_embeddings().weight[tok.convert_tokens_to_ids("<0xA7>")] = float("nan")
    nan_llama = root / "nan-llama"
    model.save_pretrained(nan_llama)
    tok.save_pretrained(nan_llama)

    path = root / "kv.zarr"
    extract(stories, path, dataset=str(data), with_q=True, q_layers="0,2")
    extract(nan_llama, path, dataset=str(data))
    extract(stories, path, dataset=str(data), name="partial", shard="0/2", calibration_samples=0)
    return path


@pytest.fixture(scope="module")
def store(store_path) -> KVStore:
    return KVStore.open(store_path)


def collect(batches) -> list[Batch]:
    return list(batches)


def assert_same_batches(got: list[Batch], want: list[Batch]) -> None:
    assert [(b.epoch, b.index) for b in got] == [(b.epoch, b.index) for b in want]
    for a, b in zip(got, want):
        for name in ("sample_indices", "input_ids", "attention_mask", "segment_ids"):
            assert torch.equal(getattr(a, name), getattr(b, name)), (a.epoch, a.index, name)
        assert a.teachers.keys() == b.teachers.keys()
        for t in a.teachers:
            for name in ("k", "v", "align_weight", "q"):
                x, y = getattr(a.teachers[t], name), getattr(b.teachers[t], name)
                assert (x is None and y is None) or torch.equal(x, y), (a.epoch, a.index, t, name)


# ---------------------------------------------------------------------------------------------------------------------
# The plan, from metadata alone


@st.composite
def layouts(draw):
    """Random sample lengths (some 0) and a shard plan over them."""
    n = draw(st.integers(1, 300))
    lengths = np.array(draw(st.lists(st.integers(0, 60), min_size=n, max_size=n)), dtype=np.int64)
    cuts = sorted(set(draw(st.lists(st.integers(1, n - 1), max_size=min(n - 1, 25))))) if n > 1 else []
    return lengths, np.array([0, *cuts, n], dtype=np.int64)


@settings(**SETTINGS)
@given(layouts(), st.integers(1, 9), st.sampled_from([None, 1, 40, 200]), st.integers(1, 5), st.integers(0, 3),
       st.integers(0, 2**32), st.integers(0, 3))
def test_plan_holds_each_sample_once_in_windows_dealt_round_robin(layout, batch_size, max_tokens, buffer_shards,
                                                                  num_workers, seed, epoch):
    lengths, shard_starts = layout
    shards = range(len(shard_starts) - 1)
    plan = plan_epoch(lengths, shard_starts, shards, epoch=epoch, seed=seed, batch_size=batch_size,
                      max_tokens=max_tokens, buffer_shards=buffer_shards, rank=0, world_size=1,
                      num_workers=num_workers)
    assert plan.dropped == 0 and [b.index for b in plan.batches] == list(range(len(plan)))
    got = np.concatenate([b.samples for b in plan.batches]) if plan.batches else np.zeros(0, np.int64)
    np.testing.assert_array_equal(np.sort(got), np.flatnonzero(lengths > 0))

    workers = max(num_workers, 1)
    window_shards: dict[int, tuple[int, ...]] = {}
    for b in plan.batches:
        assert b.epoch == epoch and 1 <= len(b.samples) <= batch_size and b.worker == b.window % workers
        if max_tokens is not None and len(b.samples) > 1:
            assert len(b.samples) * lengths[b.samples].max() <= max_tokens
        assert 1 <= len(b.shards) <= buffer_shards
        assert window_shards.setdefault(b.window, b.shards) == b.shards
        owner = np.searchsorted(shard_starts, b.samples, side="right") - 1
        assert set(owner.tolist()) <= set(b.shards)
    # Windows split the shards; each worker's batches come one from each worker in turn, a window at a time.
    all_shards = [s for w in sorted(window_shards) for s in window_shards[w]]
    assert len(all_shards) == len(set(all_shards))
    per_worker = [[b for b in plan.batches if b.worker == w] for w in range(workers)]
    for seq in per_worker:
        assert [b.window for b in seq] == sorted(b.window for b in seq)
    turns = [b.worker for b in plan.batches]
    expect = [w for t in range(max(map(len, per_worker))) for w in range(workers) if t < len(per_worker[w])]
    assert turns == expect


def test_plan_is_reproducible_and_differs_by_epoch_and_seed():
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 100, 500)
    shard_starts = np.arange(0, 501, 25)
    kw = dict(batch_size=4, max_tokens=None, buffer_shards=3, rank=0, world_size=1, num_workers=2)
    def order(**options) -> list[tuple[int, ...]]:
        return [tuple(b.samples) for b in plan_epoch(lengths, shard_starts, range(20), **kw, **options).batches]

    assert order(epoch=1, seed=3) == order(epoch=1, seed=3)
    assert order(epoch=1, seed=3) != order(epoch=2, seed=3)
    assert order(epoch=1, seed=3) != order(epoch=1, seed=4)
    # The shard list's order doesn't matter: it is sorted before the shuffle.
    shuffled = plan_epoch(lengths, shard_starts, list(reversed(range(20))), epoch=1, seed=3, **kw)
    assert [tuple(b.samples) for b in shuffled.batches] == order(epoch=1, seed=3)
    # Sorting runs of 16 batches by length: far less padding than batching the shuffled samples as they come.
    plan = plan_epoch(lengths, shard_starts, range(20), epoch=0, seed=0, **kw)
    padded = sum(len(b.samples) * lengths[b.samples].max() for b in plan.batches)
    assert padded < 1.3 * lengths.sum()


@pytest.mark.parametrize("world_size,max_tokens,seed", [(2, None, 0), (3, 150, 1), (4, 90, 2), (3, None, 5)])
def test_ranks_read_disjoint_shards_and_take_the_same_number_of_steps(world_size, max_tokens, seed):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(0, 50, 700)
    shard_starts = np.unique(np.concatenate([[0, 700], rng.integers(1, 700, 30)]))
    num_shards = len(shard_starts) - 1
    plans = [plan_epoch(lengths, shard_starts, range(num_shards), epoch=3, seed=seed, batch_size=5,
                        max_tokens=max_tokens, buffer_shards=2, rank=r, world_size=world_size, num_workers=2)
             for r in range(world_size)]
    assert len({len(p) for p in plans}) == 1
    assert any(p.dropped for p in plans) or world_size == 2  # uneven ranks really are cut
    shards = [{s for b in p.batches for s in b.shards} for p in plans]
    samples = [np.concatenate([b.samples for b in p.batches]) for p in plans]
    everything = np.concatenate(samples)
    assert len(everything) == len(set(everything.tolist()))  # disjoint
    for r, p in enumerate(plans):
        for other in range(r):
            assert not shards[r] & shards[other]
        mine = np.concatenate([np.arange(shard_starts[s], shard_starts[s + 1]) for s in shards[r]])
        mine = mine[lengths[mine] > 0]
        assert set(samples[r].tolist()) <= set(mine.tolist())
        missing = len(mine) - len(samples[r])
        assert missing <= p.dropped * 5 and (missing > 0) == (p.dropped > 0)


def test_ranks_with_equal_work_drop_nothing_and_cover_every_sample():
    lengths = np.full(240, 7)
    shard_starts = np.arange(0, 241, 10)  # 24 equal shards: 6 per rank, 3 windows of 2
    plans = [plan_epoch(lengths, shard_starts, range(24), epoch=0, seed=1, batch_size=4, max_tokens=None,
                        buffer_shards=2, rank=r, world_size=4, num_workers=2) for r in range(4)]
    assert [p.dropped for p in plans] == [0] * 4 and len({len(p) for p in plans}) == 1
    everything = np.concatenate([b.samples for p in plans for b in p.batches])
    np.testing.assert_array_equal(np.sort(everything), np.arange(240))
    with pytest.raises(ConfigError, match="one usable shard per rank"):
        check_layout(3, world_size=4, buffer_shards=1, num_workers=0)


# ---------------------------------------------------------------------------------------------------------------------
# Refusals


def test_check_request_lists_what_the_store_has(store, store_path):
    config = lambda *teachers, **kw: LoaderConfig(str(store_path), teachers=teachers, **kw)  # noqa: E731
    with pytest.raises(SchemaError, match=r"teacher 'gpt9'.*Got only 'nan-llama', 'partial', "
                                          r"'stories260K_hf_derived' instead"):
        check_request(store, config(TeacherRequest("gpt9")))
    with pytest.raises(SchemaError, match=r"layers \[1, 7\] of teacher 'stories260K_hf_derived'.*stored layers "
                                          r"\[0, 1, 2, 3, 4\].*\[7\] missing"):
        check_request(store, config(TeacherRequest(STORIES, layers=(1, 7))))
    with pytest.raises(SchemaError, match="queries for teacher 'nan-llama'.*--with-q"):
        check_request(store, config(TeacherRequest("nan-llama", with_q=True)))
    # Every problem at once.
    with pytest.raises(SchemaError, match="(?s)'gpt9'.*layers.*queries"):
        check_request(store, config(TeacherRequest("gpt9"), TeacherRequest(STORIES, layers=(9,)),
                                    TeacherRequest("nan-llama", with_q=True)))

    n = store.num_shards
    with pytest.raises(IncompleteError, match=rf"teacher 'partial' missing {n // 2} of {n} shards \(1, 3, 5.*"
                                              r"kava extract --resume.*allow_incomplete"):
        check_request(store, config(TeacherRequest(STORIES), TeacherRequest("partial")))
    usable = check_request(store, config(TeacherRequest(STORIES), TeacherRequest("partial"), allow_incomplete=True))
    assert usable == list(range(0, n, 2)) == store.complete_shards("partial")
    assert check_request(store, config()) == list(range(n))  # grid only
    assert check_request(store, config(TeacherRequest(STORIES, layers=(4, 0), with_q=True))) == list(range(n))

    with pytest.raises(ConfigError, match="batch_size >= 1.*rank < world_size"):
        LoaderConfig(str(store_path), batch_size=0, rank=2, world_size=2)
    with pytest.raises(ConfigError, match="each teacher once"):
        config(TeacherRequest(STORIES), TeacherRequest(STORIES))
    with pytest.raises(ConfigError, match="distinct teacher layers"):
        TeacherRequest(STORIES, layers=(1, 1))
    with pytest.raises(ConfigError, match="Lower num_workers or buffer_shards"):
        StreamLoader(config(num_workers=8, buffer_shards=4))  # 22 shards make only 6 windows


# ---------------------------------------------------------------------------------------------------------------------
# Batches from the store


def test_batches_hold_each_samples_rows_padded(store, store_path, monkeypatch):
    reads: list[tuple[str, Any]] = []
    start = ArrayReader.start  # every array read of the store and the loader starts here

    def recording(reader, key, rows, layers=slice(None), **options):
        reads.append((key, layers))
        return start(reader, key, rows, layers, **options)

    monkeypatch.setattr(ArrayReader, "start", recording)
    requests = (TeacherRequest(STORIES, layers=(3, 1), with_q=True), TeacherRequest("nan-llama"))
    loader = StreamLoader(LoaderConfig(str(store_path), teachers=requests, batch_size=5, buffer_shards=3, seed=7),
                          epochs=1)
    stored = collect(loader)
    assert loader.position == (1, 0) and len(stored) == loader.batches_per_epoch == len(loader.plan(0))
    # Delivered as stored (fp16), not pinned without CUDA, and decoded to float32 by the trainer's module.
    assert stored[0].teachers[STORIES].k.dtype == torch.float16 and stored[0].teachers[STORIES].stored == "float16"
    assert not torch.cuda.is_available() and not stored[0].teachers[STORIES].k.is_pinned()
    batches = [b.decoded() for b in stored]
    assert batches[0].teachers[STORIES].k.dtype == torch.float32 and batches[0].teachers[STORIES].k.is_contiguous()

    # Each shard's arrays are read once, with only what was asked for: layers (3, 1) of stories260K (positions
    # [3, 1]), all of nan-llama's, stories260K's queries, nothing of the unrequested teacher.
    for array, lsel in (("k", [3, 1]), ("v", [3, 1]), ("q", slice(None)), ("align_weight", slice(None)),
                        ("sample_status", slice(None))):
        keys = [k for k, sel in reads if k.startswith(f"teachers/{STORIES}/") and k.endswith(f"/{array}")]
        assert sorted(keys) == [f"teachers/{STORIES}/shards/{s:06d}/{array}" for s in range(store.num_shards)]
        assert all(sel == lsel for k, sel in reads if k in keys)
    assert {k.split("/")[-1] for k, _ in reads if k.startswith("teachers/nan-llama/")} == {
        "k", "v", "align_weight", "sample_status"}
    assert all(sel == slice(None) for k, sel in reads if k.startswith("teachers/nan-llama/"))
    assert not [k for k, _ in reads if k.startswith("teachers/partial/")]

    seen = np.concatenate([b.sample_indices.numpy() for b in batches])
    np.testing.assert_array_equal(np.sort(seen), [i for i in range(store.num_samples) if i != SKIPPED])
    pad = store.manifest.student_tokenizer
    pad_id = pad.pad_token_id if pad.pad_token_id is not None else (pad.eos_token_id or 0)
    quarantined = 0
    for b in batches:
        B, T = b.input_ids.shape
        assert b.teachers[STORIES].k.shape[:4] == (B, 2, 4, T) and b.teachers[STORIES].layers == (3, 1)
        assert b.teachers[STORIES].q.shape[:4] == (B, 2, 8, T) and b.teachers[STORIES].q_layers == (0, 2)
        assert b.teachers["nan-llama"].k.shape[:4] == (B, 2, 2, T) and b.teachers["nan-llama"].q is None
        assert b.num_tokens == int(b.attention_mask.sum()) and b.input_ids.dtype == torch.int64
        for row, i in enumerate(b.sample_indices.tolist()):
            n = store.offsets[i + 1] - store.offsets[i]
            ref = store.read_sample(i, teachers=[STORIES], layers=[3, 1], with_q=True)
            np.testing.assert_array_equal(b.input_ids[row, :n], ref.input_ids)
            assert torch.all(b.input_ids[row, n:] == pad_id)
            assert b.attention_mask[row].tolist() == [1] * n + [0] * (T - n)
            np.testing.assert_array_equal(b.segment_ids[row, :n], ref.segment_ids)
            assert torch.all(b.segment_ids[row, n:] == -1)
            for name, ref_kv in ((STORIES, ref.teachers[STORIES]),
                                 ("nan-llama", store.read_sample(i, teachers=["nan-llama"]).teachers["nan-llama"])):
                got = b.teachers[name]
                for array in ("k", "v", "q"):
                    want = getattr(ref_kv, array)
                    if want is not None:
                        x = getattr(got, array)[row]  # [L, H, T, D]
                        np.testing.assert_array_equal(x[:, :, :n], want.transpose(1, 2, 0, 3))
                        assert torch.all(x[:, :, n:] == 0)
                weight = got.align_weight[row]
                assert torch.all(weight[n:] == 0)
                if ref_kv.status[0] == 1:
                    assert (name, i) == ("nan-llama", NAN_ROW) and torch.all(weight == 0)
                    quarantined += 1
                else:
                    np.testing.assert_array_equal(weight[:n], ref_kv.align_weight)
    assert quarantined == 1
    moved = stored[0].to("cpu").decoded()
    assert torch.equal(moved.teachers[STORIES].q, batches[0].teachers[STORIES].q)


def test_grid_only_batches_respect_max_tokens(store, store_path):
    loader = StreamLoader(LoaderConfig(str(store_path), batch_size=16, max_tokens=1000), epochs=1)
    batches = collect(loader)
    assert all(not b.teachers for b in batches)
    assert all(b.input_ids.numel() <= 1000 or len(b.sample_indices) == 1 for b in batches)
    assert max(len(b.sample_indices) for b in batches) > 1
    assert sum(b.num_tokens for b in batches) == store.num_tokens


def test_resume_in_process_across_an_epoch_boundary(store_path):
    config = LoaderConfig(str(store_path), teachers=(TeacherRequest(STORIES, layers=(0,)),), batch_size=6, seed=3)
    full = collect(StreamLoader(config, epochs=2))
    first = StreamLoader(config, epochs=2)
    per_epoch = first.batches_per_epoch
    assert len(full) == per_epoch + len(first.plan(1))
    assert [tuple(b.sample_indices.tolist()) for b in full[:per_epoch]] != [
        tuple(b.sample_indices.tolist()) for b in full[per_epoch:per_epoch * 2]]  # epochs are shuffled apart
    head = []
    for batch in first:
        head.append(batch)
        if len(head) == per_epoch - 2:
            break
    assert first.position == (0, per_epoch - 2)
    rest = collect(StreamLoader(config, start=first.position, epochs=2))
    assert_same_batches(head + rest, full)
    # A loader iterated again continues where it stopped.
    assert_same_batches(head + collect(first), full)


@pytest.mark.integration
@pytest.mark.slow
def test_two_workers_yield_the_plan_order_and_resume_exactly(store_path):
    # 22 shards in windows of 2: 11 windows, 6 for worker 0 and 5 for worker 1, so the workers finish each epoch
    # unevenly and the loader must reorder around the epoch boundary.
    config = LoaderConfig(str(store_path), teachers=(TeacherRequest(STORIES, layers=(2, 4), with_q=True),),
                          batch_size=6, buffer_shards=2, num_workers=2, seed=11)
    want = collect(KVStream(config, epochs=2))  # in-process: the plan order, both workers' batches
    loader = StreamLoader(config, epochs=2)
    plan = loader.plan(0)
    assert [b.index for b in want[: len(plan)]] == list(range(len(plan)))
    assert {b.worker for b in plan.batches} == {0, 1}
    head = []
    for batch in loader:
        head.append(batch)
        if len(head) == len(plan) - 3:
            break
    rest = collect(StreamLoader(config, start=loader.position, epochs=2))
    assert_same_batches(head + rest, want)


# ---------------------------------------------------------------------------------------------------------------------
# The stored-dtype loader against the per-sample float32 construction it replaced


@pytest.fixture(scope="module")
def dtypes_path(tmp_path_factory) -> Path:
    """stories260K over 30 problems, stored three more ways: bfloat16 and int8 (both with Q), and uncompressed
    float16 (its chunks are read straight into the window)."""
    stories = asset_path("models/stories260K_hf_derived")
    root = tmp_path_factory.mktemp("dtypes")
    rows = [{"question": r.question, "answer": f"{r.reasoning}\n#### {r.answer}"} for r in synthetic_rows(30)]
    data = root / "rows.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    path = root / "kv.zarr"
    extract(stories, path, dataset=str(data), name="bf16", kv_dtype="bfloat16", with_q=True, calibration_samples=0)
    extract(stories, path, dataset=str(data), name="int8", kv_dtype="int8", with_q=True, q_layers="1,3",
            calibration_samples=0)
    extract(stories, path, dataset=str(data), name="raw", compress=False, calibration_samples=0)
    return path


def reference_window(store: KVStore, shards, requests) -> dict:
    """The earlier loader's window: each shard through ``read_shard``, decoded to float32."""
    groups: dict[tuple, list[str]] = {}
    for req in requests:
        groups.setdefault((req.layers, req.with_q, req.with_logits, req.with_kv), []).append(req.name)
    out = {}
    for s in shards:
        rows = store.read_shard(s, teachers=[])
        for (layers, with_q, with_logits, with_kv), names in groups.items():
            rows.teachers.update(store.read_shard(s, teachers=names, layers=layers, with_q=with_q,
                                                  with_logits=with_logits, with_kv=with_kv).teachers)
        out[s] = rows
    return out


def reference_collate(plan, window, shard_starts: np.ndarray, pad_id: int) -> dict[str, Any]:
    """The earlier loader's collate: every sample transposed and padded on its own, in float32."""
    located = []
    for i in plan.samples:
        s = int(np.searchsorted(shard_starts, i, side="right") - 1)
        rows = window[s]
        p = int(i - shard_starts[s])
        located.append((rows, int(rows.offsets[p]), int(rows.offsets[p + 1]), p))
    B, T = len(located), max(b - a for _, a, b, _ in located)
    out: dict[str, Any] = {"input_ids": np.full((B, T), pad_id, dtype=np.int64),
                           "attention_mask": np.zeros((B, T), dtype=np.int64),
                           "segment_ids": np.full((B, T), -1, dtype=np.int64), "teachers": {}}
    for row, (rows, a, b, _) in enumerate(located):
        out["input_ids"][row, : b - a] = rows.input_ids[a:b]
        out["attention_mask"][row, : b - a] = 1
        out["segment_ids"][row, : b - a] = rows.segment_ids[a:b]
    for name, first in located[0][0].teachers.items():
        L, H, D = first.k.shape[1:]
        t = {"k": np.zeros((B, L, H, T, D), np.float32), "v": np.zeros((B, L, H, T, D), np.float32),
             "align_weight": np.zeros((B, T), np.float32),
             "q": None if first.q is None else np.zeros((B, *first.q.shape[1:3], T, D), np.float32),
             "layers": tuple(first.layers), "q_layers": tuple(first.q_layers)}
        for row, (rows, a, b, p) in enumerate(located):
            kv = rows.teachers[name]
            t["k"][row, :, :, : b - a] = kv.k[a:b].transpose(1, 2, 0, 3)
            t["v"][row, :, :, : b - a] = kv.v[a:b].transpose(1, 2, 0, 3)
            if t["q"] is not None:
                t["q"][row, :, :, : b - a] = kv.q[a:b].transpose(1, 2, 0, 3)
            if kv.status[p] == 0:
                t["align_weight"][row, : b - a] = kv.align_weight[a:b]
        out["teachers"][name] = t
    return out


def assert_equals_reference(store: KVStore, config: LoaderConfig) -> int:
    """Every batch of one epoch, decoded, equals the reference construction; returns the padded rows seen."""
    loader = StreamLoader(config, epochs=1)
    plan = loader.plan(0)
    pad_id = batch_module.pad_token_id(store)
    padded = 0
    for got, planned in zip(loader, plan.batches, strict=True):
        want = reference_collate(planned, reference_window(store, planned.shards, config.teachers),
                                 store.shard_starts, pad_id)
        for name in ("input_ids", "attention_mask", "segment_ids"):
            np.testing.assert_array_equal(getattr(got, name).numpy(), want[name])
        padded += int((got.attention_mask == 0).any(dim=1).sum())
        for t, ref in want["teachers"].items():
            stored = got.teachers[t]
            assert stored.stored == store.teacher(t).storage.dtype
            decoded = stored.decoded()
            assert decoded.layers == ref["layers"] and decoded.q_layers == ref["q_layers"]
            for array in ("k", "v", "q", "align_weight"):
                x = getattr(decoded, array)
                if ref[array] is None:
                    assert x is None
                    continue
                assert x.dtype == torch.float32 and tuple(x.shape) == ref[array].shape, (t, array)
                np.testing.assert_array_equal(x.numpy(), ref[array], err_msg=f"{t} {array}")
    return padded


def test_stored_batches_decode_to_the_reference_fp16_quarantine_and_layer_subsets(store, store_path):
    requests = (TeacherRequest(STORIES, layers=(4, 0, 2), with_q=True), TeacherRequest("nan-llama"))
    config = LoaderConfig(str(store_path), teachers=requests, batch_size=4, buffer_shards=3, seed=5)
    assert assert_equals_reference(store, config) > 0  # some rows padded


@pytest.mark.parametrize("requests", [
    (TeacherRequest("bf16", with_q=True), TeacherRequest("int8", layers=(1, 2), with_q=True), TeacherRequest("raw")),
    (TeacherRequest("int8", layers=(3, 0)), TeacherRequest("raw", layers=(2,)), TeacherRequest("bf16", layers=(0,))),
])
def test_stored_batches_decode_to_the_reference_bf16_int8_uncompressed(dtypes_path, requests):
    store = KVStore.open(dtypes_path)
    config = LoaderConfig(str(dtypes_path), teachers=requests, batch_size=5, buffer_shards=2, seed=1)
    assert assert_equals_reference(store, config) > 0
    # int8 travels as codes and float16 scales ([B, L, H, T]); bf16 as torch.bfloat16 (its bits).
    batch = next(iter(StreamLoader(config, epochs=1)))
    i8, bf = batch.teachers["int8"], batch.teachers["bf16"]
    assert i8.k.dtype == torch.int8 and i8.k_scale.dtype == torch.float16
    assert i8.k_scale.shape == i8.k.shape[:4] and (i8.q is None) == (i8.q_scale is None)
    assert bf.k.dtype == torch.bfloat16 and bf.k_scale is None


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32", "int8"])
@pytest.mark.parametrize("out", [np.float32, np.float16])
def test_decode_torch_equals_the_numpy_decode(dtype, out):
    from kava.kvstore import codecs

    rng = np.random.default_rng(3)
    x = (rng.standard_normal((3, 2, 4, 5, 8)) * 4).astype(np.float32)
    x[0, 0, 0, 0] = 0  # an all-zero int8 row: scale 0
    stored, scale = codecs.encode(x, dtype)
    want = codecs.decode(stored, scale, dtype, np.dtype(out))
    t_stored = torch.from_numpy(stored.view(np.int16) if dtype == "bfloat16" else stored)
    got = codecs.decode_torch(t_stored, None if scale is None else torch.from_numpy(scale), dtype,
                              torch.float32 if out is np.float32 else torch.float16)
    np.testing.assert_array_equal(got.numpy(), want)
    if dtype == "bfloat16":  # the bits as a torch.bfloat16 tensor decode the same
        np.testing.assert_array_equal(codecs.decode_torch(t_stored.view(torch.bfloat16), None, dtype,
                                                          got.dtype).numpy(), want)
    # A permuted (non-contiguous) view decodes to the same values.
    perm = codecs.decode_torch(t_stored.permute(0, 2, 1, 3, 4), None if scale is None else
                               torch.from_numpy(scale).permute(0, 2, 1, 3), dtype, got.dtype)
    np.testing.assert_array_equal(perm.numpy(), want.transpose(0, 2, 1, 3, 4))
    with pytest.raises(Exception, match="Expected a storage dtype in"):
        codecs.decode_torch(t_stored, None, "float8", torch.float32)


def test_the_loader_refuses_a_corrupted_chunk(store_path, tmp_path):
    import shutil

    from kava.kvstore import ChecksumError

    copy = tmp_path / "kv.zarr"
    shutil.copytree(store_path, copy)
    chunk = copy / "teachers/nan-llama/shards/000003/v/c/0/0/0/0"
    data = bytearray(chunk.read_bytes())
    data[len(data) // 2] ^= 0xFF
    chunk.write_bytes(bytes(data))
    config = LoaderConfig(str(copy), teachers=(TeacherRequest("nan-llama"),), batch_size=4, seed=0)
    with pytest.raises(ChecksumError, match=r"teacher 'nan-llama' shard 3 array 'v'.*kava store verify"):
        collect(StreamLoader(config, epochs=1))


def test_fast_read_into_a_given_buffer_equals_zarr(dtypes_path):
    import zarr

    from kava.kvstore import fastread, layout

    store = KVStore.open(dtypes_path)
    for name, array in (("raw", "k"), ("bf16", "q"), ("int8", "v_scale"), ("int8", "align_weight")):
        key = layout.shard_array_key(name, 1, array)
        want = zarr.open_array(store.zarr_store, path=key, mode="r")
        info = fastread.array_info(store.zarr_store, key)
        n = want.shape[0]
        for rows, sel in (((0, n), slice(None)), ((3, n - 2), [1, 0] if want.ndim > 1 else slice(None))):
            buffer = np.full((n + 5, *want.shape[1:]), 7, dtype=want.dtype)
            shape = fastread.read(info, key, rows, sel).shape
            target = buffer[2 : 2 + shape[0]]
            if isinstance(sel, list):
                target = np.empty(shape, want.dtype)
            assert fastread.read(info, key, rows, sel, out=target) is target
            ref = want.get_orthogonal_selection((slice(*rows), sel)) if isinstance(sel, list) else want[slice(*rows)]
            np.testing.assert_array_equal(target, ref)
        assert np.all(buffer[:2] == 7) and np.all(buffer[2 + n :] == 7)  # nothing written outside out
    with pytest.raises(ValueError, match="Expected out of shape"):
        fastread.read(info, key, (0, 4), out=np.empty(3, np.float32))


@pytest.mark.parametrize("which, request_", [
    ("fp16", TeacherRequest(STORIES, layers=(3, 1), with_q=True)),
    ("fp16", TeacherRequest("nan-llama")),  # a quarantined sample
    ("dtypes", TeacherRequest("bf16", with_q=True)),
    ("dtypes", TeacherRequest("int8", layers=(2, 0), with_q=True)),
    ("dtypes", TeacherRequest("raw", layers=(1, 2))),  # uncompressed: chunks read straight into the window
])
def test_the_window_and_read_shard_read_the_same_rows(store_path, dtypes_path, which, request_):
    """The loader's window and ``read_shard`` read through the store's one reader: a window of shards (in a
    shuffled order) holds, as stored, exactly the rows ``read_shard`` decodes, shard by shard."""
    from kava.kvstore import codecs

    store = KVStore.open(store_path if which == "fp16" else dtypes_path)
    shards = tuple(dict.fromkeys((store.shard_of(NAN_ROW), 0, store.shard_of(SKIPPED), 1)))  # shuffled
    window = batch_module.read_window(store, shards, [request_], pad_id=0)
    got = window.teachers[request_.name]
    assert got.stored == store.teacher(request_.name).storage.dtype
    seen_quarantined = False
    for s in shards:
        a, b = store.shard_tokens(s)
        rows = slice(window.base[s], window.base[s] + b - a)
        ref = store.read_shard(s, teachers=[request_.name], layers=request_.layers,
                               with_q=request_.with_q).teachers[request_.name]
        assert (got.layers, got.q_layers) == (ref.layers, ref.q_layers)
        for array in ("k", "v", "q"):
            want, stored = getattr(ref, array), getattr(got, array)
            if want is None:
                assert stored is None
                continue
            scale = got.scales.get(array)
            decoded = codecs.decode(stored[rows], None if scale is None else scale[rows], got.stored, np.float32)
            np.testing.assert_array_equal(decoded, want, err_msg=f"shard {s} {array}")
            if got.stored == "float16":  # as stored: the same bytes read_shard hands out in float16
                as_fp16 = store.read_shard(s, teachers=[request_.name], layers=request_.layers,
                                           with_q=request_.with_q, dtype=np.float16).teachers[request_.name]
                np.testing.assert_array_equal(stored[rows], getattr(as_fp16, array))
        lengths = np.diff(store.offsets[store.shard_samples(s).start : store.shard_samples(s).stop + 1])
        quarantined = np.repeat(ref.status != 0, lengths)
        np.testing.assert_array_equal(got.align_weight[rows], np.where(quarantined, 0, ref.align_weight))
        seen_quarantined = seen_quarantined or bool(quarantined.any())
    assert seen_quarantined == (request_.name == "nan-llama")
    assert got.align_weight[-1] == 0 and not got.k[-1].any()  # the padding row


def test_the_window_and_read_shard_refuse_an_unfinished_shard_alike(store):
    with pytest.raises(IncompleteError) as from_window:
        batch_module.read_window(store, (0, 1), [TeacherRequest("partial")], pad_id=0)
    with pytest.raises(IncompleteError) as from_store:
        store.read_shard(1, teachers=["partial"])
    assert str(from_window.value) == str(from_store.value)
    assert "teacher 'partial' has not finished shard 1 (samples" in str(from_store.value)


@pytest.mark.gpu
def test_batches_arrive_pinned_and_decode_on_the_device_as_on_the_host(dtypes_path):
    requests = (TeacherRequest("bf16", with_q=True), TeacherRequest("int8", with_q=True), TeacherRequest("raw"))
    batch = next(iter(StreamLoader(LoaderConfig(str(dtypes_path), teachers=requests, batch_size=4), epochs=1)))
    assert batch.teachers["int8"].k.is_pinned() and batch.input_ids.is_pinned()
    on_device = batch.to("cuda", non_blocking=True).decoded()
    on_host = batch.decoded()
    for name in ("bf16", "int8", "raw"):
        for array in ("k", "v", "q"):
            x = getattr(on_host.teachers[name], array)
            if x is not None:
                assert torch.equal(getattr(on_device.teachers[name], array).cpu(), x), (name, array)
