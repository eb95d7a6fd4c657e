"""`kava extract --kv-budget`: a compressed teacher extracted from the real stories260K, checked against a dense
extraction of the same teacher (its kept rows are the dense rows at the positions the rule chooses from the dense
keys and queries), at budget 1.0 (equal to dense), through the CLI, and as a newcomer's wrong flags."""

from __future__ import annotations

import json
import math
import subprocess

import numpy as np
import pytest
import torch
from helpers import ENV, KAVA, asset_path

from kava.core.errors import ConfigError, SchemaError
from kava.extract import evict
from kava.extract.config import ExtractConfig
from kava.extract.recipe import run_extract
from kava.extract.rope import apply_rope, cos_sin
from kava.kvstore import EvictionSpec, KVStore, verify_store

QUIET = {"progress": False, "calibration_samples": 0}
ONE_TORCH_THREAD = True  # see conftest.one_torch_thread


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    """One store: the dense teacher with its queries (float32, so that its rows are the very values the compressed
    teachers chose from), compressed teachers at 25% (r-kv and random, and r-kv storing the queries of layers 2
    and 4), one at 100% with its queries, and the dense teacher as float16 with its queries (what the 100% one
    stores)."""
    stories = asset_path("models/stories260K_hf_derived")
    path = tmp_path_factory.mktemp("evict") / "kv.zarr"
    common = dict(teacher=str(stories), store=str(path), limit=12, difficulty="default", shard_tokens=600, **QUIET)
    run_extract(ExtractConfig.from_dict(dict(common, name="dense", with_q=True, kv_dtype="float32")),
                log=lambda _: None)
    for rule in ("r-kv", "random"):
        run_extract(ExtractConfig.from_dict(dict(common, name=rule, kv_budget="0.25", evict=rule)),
                    log=lambda _: None)
    run_extract(ExtractConfig.from_dict(dict(common, name="r-kv-q", kv_budget="0.25", evict="r-kv", with_q=True,
                                             q_layers="2,4")), log=lambda _: None)
    run_extract(ExtractConfig.from_dict(dict(common, name="all", kv_budget="1.0", evict="attention", with_q=True)),
                log=lambda _: None)
    run_extract(ExtractConfig.from_dict(dict(common, name="dense16", with_q=True)), log=lambda _: None)
    return path


def reference_keep(store: KVStore, i: int, rule: str) -> np.ndarray:
    """The kept positions ``[M, L, H]`` the rule chooses from the dense teacher's stored keys and queries of sample
    ``i``, rotated to the grid positions as the model rotates them."""
    spec = store.teacher("dense")
    rows = store.read_sample(i, teachers=["dense"], with_q=True)
    kv, seg = rows.teachers["dense"], torch.as_tensor(rows.segment_ids)
    t = len(seg)
    cos, sin = cos_sin(spec.rope, torch.arange(t))
    window = (seg == 2).nonzero().flatten()
    ev = EvictionSpec(rule=rule, budget=0.25)
    out = []
    for j, layer in enumerate(spec.layers):
        keys = apply_rope(torch.as_tensor(kv.k[:, j]).permute(1, 0, 2)[None], cos, sin)[0]  # [H, T, D]
        q = torch.as_tensor(kv.q[:, list(spec.q_layers).index(layer)]).permute(1, 0, 2)  # [Hq, T, D]
        queries = apply_rope(q[None], cos, sin)[0][:, window]
        out.append(evict.keep(rule, keys, seg == 1, 0.25, queries=queries, query_at=window,
                              seed=ev.seed * 1_000_003 + i).T)
    return torch.stack(out, dim=1).numpy()


@pytest.mark.parametrize("rule", ["r-kv", "random"])
def test_kept_rows_are_the_dense_rows_the_rule_chooses(stores, rule):
    store = KVStore.open(stores)
    assert store.teacher(rule).eviction == EvictionSpec(rule=rule, budget=0.25)
    for i in range(store.num_samples):
        rows = store.read_sample(i, teachers=["dense", rule])
        dense, kv = rows.teachers["dense"], rows.teachers[rule]
        want = reference_keep(store, i, rule)
        np.testing.assert_array_equal(kv.kept, want)
        layer, head = np.indices(want.shape[1:])
        np.testing.assert_array_equal(kv.k, dense.k[want, layer, head].astype(np.float16).astype(np.float32))
        np.testing.assert_array_equal(kv.v, dense.v[want, layer, head].astype(np.float16).astype(np.float32))
        # A quarter of the reasoning (rounded up), everything else.
        seg = rows.segment_ids
        assert len(kv.kept) == len(seg) - (seg == 1).sum() + int(np.ceil((seg == 1).sum() * 0.25))


def test_a_compressed_teacher_stores_the_queries_of_its_kept_rows(stores):
    store = KVStore.open(stores)
    spec = store.teacher("r-kv-q")
    assert spec.q_layers == (2, 4) and store.manifest.format_version == 5
    group = spec.num_heads // spec.kv_heads
    for i in range(store.num_samples):
        dense = store.read_sample(i, teachers=["dense"], with_q=True).teachers["dense"]
        kv = store.read_sample(i, teachers=["r-kv-q"], with_q=True).teachers["r-kv-q"]
        np.testing.assert_array_equal(kv.kept, store.read_sample(i, teachers=["r-kv"]).teachers["r-kv"].kept)
        offsets = np.array([0, len(dense.k)])
        q, (_, _, mask) = kv.dense_q(offsets), kv.dense(offsets)
        # Query head h of layer 2 (4) on the rows its KV head h // group kept there, the dense teacher's query.
        q_mask = mask[:, [spec.layers.index(2), spec.layers.index(4)]].repeat(group, axis=2)  # [T, 2, Hq]
        dense_q_layers = store.teacher("dense").q_layers
        want = dense.q[:, [dense_q_layers.index(2), dense_q_layers.index(4)]]
        np.testing.assert_array_equal(q, np.where(q_mask[..., None], want.astype(np.float16).astype(np.float32), 0))
    with pytest.raises(SchemaError, match=r"queries \(layers \[2, 4\]\) are read with the kept positions.*asked "
                                          r"for \[0, 1\]"):
        store.read_sample(0, teachers=["r-kv-q"], layers=[0, 1], with_q=True)


def test_budget_one_is_the_dense_teacher_and_the_store_verifies(stores):
    store = KVStore.open(stores)
    for shard in range(store.num_shards):
        rows = store.read_shard(shard, teachers=["dense", "all"])
        k, v, mask = rows.teachers["all"].dense(rows.offsets)
        assert mask.all()
        np.testing.assert_array_equal(k, rows.teachers["dense"].k.astype(np.float16).astype(np.float32))
        np.testing.assert_array_equal(v, rows.teachers["dense"].v.astype(np.float16).astype(np.float32))
    report = verify_store(stores)
    assert not report.problems and report.shards_complete["r-kv"] == store.num_shards


def test_info_shows_the_kept_share_bytes_and_fidelity(stores):
    from kava.kvstore import summary

    info = summary(KVStore.open(stores))["teachers"]
    rkv, rnd, full = (info[n]["eviction"] for n in ("r-kv", "random", "all"))
    assert info["dense"]["eviction"] is None and full["kept_fraction"] == 1.0
    assert full["fidelity_error"] == pytest.approx([0.0] * 5, abs=1e-5)  # nothing evicted, nothing lost
    assert 0.3 < rkv["kept_fraction"] == rnd["kept_fraction"] < 0.8
    # What r-kv keeps loses less of the answer's attention output than a random choice, at every layer.
    assert all(a < b for a, b in zip(rkv["fidelity_error"], rnd["fidelity_error"]))
    assert info["r-kv"]["bytes_per_token"] < 0.8 * info["all"]["bytes_per_token"]


@pytest.mark.integration
def test_cli_extract_info_and_wrong_flags(tmp_path):
    stories = asset_path("models/stories260K_hf_derived")
    store = tmp_path / "kv.zarr"
    base = [*KAVA, "extract", "--teacher", str(stories), "--store", str(store), "--limit", "4", "--no-progress",
            "--calibration-samples", "0"]
    wrong = subprocess.run([*base, "--kv-budget", "2.5", "--evict", "h2o"], capture_output=True, text=True, env=ENV,
                           timeout=300)
    assert wrong.returncode != 0 and not store.exists()
    assert "--kv-budget: expected a fraction in (0, 1] ('0.1') or a count >= 1 ('64'). Got '2.5' instead." \
           in wrong.stderr
    assert "--evict: expected one of r-kv, attention, streaming, random. Got 'h2o' instead." in wrong.stderr
    assert "Found 2 problems" in wrong.stderr
    ok = subprocess.run([*base, "--kv-budget", "8", "--evict", "streaming", "--with-q"], capture_output=True, text=True,
                        env=ENV, timeout=300)
    assert ok.returncode == 0, ok.stderr
    info = subprocess.run([*KAVA, "store", "info", str(store)], capture_output=True, text=True, env=ENV, timeout=120)
    assert "evicted   streaming, budget 8 of the reasoning rows:" in info.stdout and "fidelity  " in info.stdout
    as_json = json.loads(subprocess.run([*KAVA, "store", "info", str(store), "--json"], capture_output=True,
                                        text=True, env=ENV, timeout=120).stdout)
    (teacher,) = as_json["teachers"].values()
    assert teacher["eviction"]["budget"] == 8 and teacher["eviction"]["rule"] == "streaming"


def test_options_report_every_problem_at_once():
    cfg = ExtractConfig.from_dict(dict(teacher="x", store="s", kv_budget="0", evict_segments="reasoning,thoughts"))
    with pytest.raises(ConfigError, match=r"(?s)--kv-budget: expected a fraction.*Got '0' instead.*"
                                          r"--evict-segments: expected distinct names"):
        cfg.validate()
    assert ExtractConfig.from_dict(dict(teacher="x", store="s", kv_budget="64")).evicting.eviction().budget == 64


# ---------------------------------------------------------------------------------------------------------------------
# Distilling from a compressed teacher


def distill(store, out, teacher, **options):
    from kava.distill.config import DistillConfig
    from kava.distill.trainer import run_distill

    cfg = dict(store=str(store), out=str(out), student="tiny-llama", teachers=[teacher], steps=3, batch_size=4,
               progress=False, checkpoint_every=0, **{"loss": "mercator", **options})
    run_distill(DistillConfig.from_dict(cfg), log=lambda _: None)
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_loader_puts_kept_rows_back_on_their_tokens_with_the_mask(stores):
    from kava.distill.loader import LoaderConfig, StreamLoader

    config = LoaderConfig(store=str(stores), teachers=("dense16", "r-kv"), batch_size=4, seed=3)
    batch = next(iter(StreamLoader(config))).decoded()
    dense, kept = batch.teachers["dense16"], batch.teachers["r-kv"]
    assert dense.kept is None and kept.kept is not None and kept.kept.dtype == torch.bool
    assert kept.kept.shape == kept.k.shape[:4]  # [B, L, H, T]
    mask = kept.kept[..., None]
    torch.testing.assert_close(kept.k, torch.where(mask, dense.k, 0.0), rtol=0, atol=0)
    torch.testing.assert_close(kept.v, torch.where(mask, dense.v, 0.0), rtol=0, atol=0)
    # Every prompt and answer token is kept in every layer and head; padding never is.
    seg = batch.segment_ids[:, None, None, :].expand_as(kept.kept)
    assert kept.kept[(seg == 0) | (seg == 2)].all() and not kept.kept[seg < 0].any()
    reasoning = kept.kept[seg == 1].float().mean()
    assert 0.2 < reasoning < 0.4  # a quarter of the reasoning, rounded up per sample


def test_budget_one_distils_exactly_like_the_dense_teacher(stores, tmp_path):
    dense = distill(stores, tmp_path / "dense", "dense16")
    full = distill(stores, tmp_path / "all", "all")
    for a, b in zip(dense, full):
        for key in ("loss/ce", "loss/k", "loss/v", "loss/kv", "cos_k/L2"):
            assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-6), key


def test_a_quarter_of_the_reasoning_trains_on_what_was_kept(stores, tmp_path):
    dense = distill(stores, tmp_path / "dense", "dense16")
    rkv = distill(stores, tmp_path / "rkv", "r-kv")
    # The same student, batches and projectors: only the evicted rows' terms are gone, so the first K/V loss moves
    # (fewer reasoning rows) but stays close to the dense one, and training goes on.
    assert rkv[0]["loss/ce"] == pytest.approx(dense[0]["loss/ce"], rel=1e-6)
    assert rkv[0]["loss/k"] != pytest.approx(dense[0]["loss/k"], rel=1e-6)
    assert abs(rkv[0]["loss/k"] - dense[0]["loss/k"]) < 0.2 * dense[0]["loss/k"]
    assert all(math.isfinite(m["loss/kv"]) for m in rkv) and rkv[-1]["loss/kv"] < rkv[0]["loss/kv"]


def test_compressed_teachers_refuse_what_needs_the_rows_they_dropped(stores, tmp_path):
    with pytest.raises(ConfigError, match=r"--project teacher: teacher\(s\) \['r-kv'\] keep other rows"):
        distill(stores, tmp_path / "p", "r-kv", project="teacher")
    from kava.core.errors import SchemaError

    with pytest.raises(SchemaError, match=r"teacher 'r-kv' has no stored queries.*Re-extract it with --with-q"):
        distill(stores, tmp_path / "s", "r-kv", loss="structural")


def test_budget_one_matches_the_dense_attention_term(stores, tmp_path):
    """With every row kept the attention over the kept keys is the dense attention term: the same losses."""
    dense = distill(stores, tmp_path / "dense", "dense16", loss="structural")
    full = distill(stores, tmp_path / "all", "all", loss="structural")
    for a, b in zip(dense, full):
        for key in ("loss/attn", "loss/k", "loss/kv", "loss/ce"):
            assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-6), key
    assert dense[0]["loss/attn"] > 0.01


def test_a_quarter_of_the_reasoning_with_queries_trains_the_attention_term(stores, tmp_path):
    dense = distill(stores, tmp_path / "dense", "dense16", loss="structural")
    kept = distill(stores, tmp_path / "rkvq", "r-kv-q", loss="structural")
    assert kept[0]["loss/attn"] != pytest.approx(dense[0]["loss/attn"], rel=1e-3)
    assert all(math.isfinite(m["loss/attn"]) and m["loss/attn"] >= 0 for m in kept)
    assert kept[-1]["loss/kv"] < kept[0]["loss/kv"]
