"""Analysis-side CKA: numpy references, the torch estimators against them, and out-of-core CKA over a real store.

The references (n x n Gram matrices) are checked against the U-statistic definition of HSIC_1 and for the invariances
CKA must have; the torch estimators of ``kava.extract.cka`` and the dask path ``store_cka`` are then checked against
the references on the same rows. The store is a real stories260K extraction plus two more teachers: a tiny Llama
extracted into the same store, and ``rot``, the stories teacher's own K/V under a per-layer orthogonal map and a
scale, stored in float32 with some tokens unaligned (weight 0, rows filled with garbage that must be ignored).
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import tracemalloc
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from helpers import ENV, KAVA, asset_path

from kava.analysis.cka import (
    CKAResult,
    linear_cka,
    linear_cka_reference,
    minibatch_cka,
    minibatch_cka_reference,
    run_cka,
    store_cka,
    unbiased_hsic,
    unbiased_hsic_reference,
)
from kava.analysis.heatmap import heatmap, layer_map_matrix, layer_map_pairs
from kava.core.errors import ConfigError, ShapeError
from kava.extract.config import ExtractConfig
from kava.extract.recipe import run_extract
from kava.kvstore import KVStore, default_storage

STORIES = "models/stories260K_hf_derived"
TEACHER = "stories260K_hf_derived"
BLOCK = 64  # tokens per block: the small store has ~20 blocks, crossing shard boundaries
ROT_SCALE = 3.0
ROT_GARBAGE = 50.0  # value of unaligned rows of `rot`: would dominate every CKA if they were not masked out

ONE_TORCH_THREAD = True  # see conftest.one_torch_thread


def extract(teacher: Path | str, store: Path, **options: Any) -> None:
    opts = {"limit": 6, "shard_tokens": 256, "batch_size": 8, "progress": False, "calibration_samples": 0,
            "with_q": False, **options}
    run_extract(ExtractConfig.from_dict(dict(teacher=str(teacher), store=str(store), **opts)), log=lambda _: None)


def random_orthogonal(rng: np.random.Generator, d: int) -> np.ndarray:
    q, r = np.linalg.qr(rng.normal(size=(d, d)))
    return q * np.sign(np.diag(r))


def add_rotated_teacher(path: Path) -> None:
    """Teacher ``rot``: K and V of the stories teacher times a per-layer orthogonal ``[H*D, H*D]`` map, times
    ``ROT_SCALE``, in float32; every 5th token unaligned (weight 0) and filled with ``ROT_GARBAGE``."""
    store = KVStore.open(path, mode="a")
    spec = store.teacher(TEACHER)
    d = spec.kv_heads * spec.head_dim
    rng = np.random.default_rng(0)
    maps = {a: np.stack([random_orthogonal(rng, d) for _ in spec.layers]) for a in ("k", "v")}  # [L, d, d]
    rot = dataclasses.replace(spec, name="rot", storage=default_storage(len(spec.layers), spec.kv_heads,
                                                                        spec.head_dim, "float32"))
    store.add_teacher(rot)
    for shard in range(store.num_shards):
        rows = store.read_shard(shard, teachers=[TEACHER], dtype=np.float32)
        kv = rows.teachers[TEACHER]
        t0 = store.shard_tokens(shard)[0]
        with store.shard_writer("rot", shard) as w:
            for i, (a, b) in zip(rows.sample_indices, itertools.pairwise(rows.offsets)):
                out = {}
                for name in ("k", "v"):
                    x = getattr(kv, name)[a:b]  # [n, L, H, D]
                    y = np.einsum("nlc,lcd->nld", x.reshape(len(x), len(spec.layers), d), maps[name])
                    out[name] = (ROT_SCALE * y).reshape(x.shape).astype(np.float32)
                # every 5th token unaligned, and so is each token the stories teacher has no row for (the EOS)
                weight = (((t0 + np.arange(a, b)) % 5 != 0) & (kv.align_weight[a:b] > 0)).astype(np.float32)
                for name in out:
                    out[name][weight == 0] = ROT_GARBAGE
                w.add(out["k"], out["v"], align_weight=weight, sample=int(i))


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    """stories260K over 6 synthetic problems (~1250 tokens, 5 shards), plus the teachers ``tiny`` and ``rot``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

    stories = asset_path(STORIES)
    root = tmp_path_factory.mktemp("cka")
    path = root / "kv.zarr"
    extract(stories, path)
    tok = AutoTokenizer.from_pretrained(stories)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024)
    torch.manual_seed(3)
    AutoModelForCausalLM.from_config(config).save_pretrained(root / "tiny-llama")
    tok.save_pretrained(root / "tiny-llama")
    extract(root / "tiny-llama", path, name="tiny", student_layers=5)
    add_rotated_teacher(path)
    return path


def load(path: Path, teacher: str, array: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every row of a teacher, read with plain numpy shard by shard: features ``[T, L, d]`` (float64), weights
    ``[T]`` and segment ids ``[T]``."""
    store = KVStore.open(path)
    feats, weights, segments = [], [], []
    for shard in range(store.num_shards):
        rows = store.read_shard(shard, teachers=[teacher], dtype=np.float64)
        kv = rows.teachers[teacher]
        n, layers = kv.k.shape[:2]
        feats.append(np.concatenate([getattr(kv, a).reshape(n, layers, -1) for a in array], axis=2))
        weights.append(kv.align_weight)
        segments.append(rows.segment_ids)
    return np.concatenate(feats), np.concatenate(weights), np.concatenate(segments)


def reference_matrix(x: np.ndarray, y: np.ndarray, estimator: str, block: int = BLOCK) -> np.ndarray:
    """``[L, L']`` CKA from the numpy references; ``unbiased`` with minibatches of ``block`` consecutive rows.
    A self-similarity (``y is x``) is computed on and above the diagonal and mirrored."""
    batches = [slice(i, i + block) for i in range(0, len(x), block) if min(len(x), i + block) - i >= 4]

    def cka(a: int, b: int) -> float:
        if estimator == "biased":
            return linear_cka_reference(x[:, a], y[:, b])
        return minibatch_cka_reference([x[s, a] for s in batches], [y[s, b] for s in batches])

    out = np.full((x.shape[1], y.shape[1]), np.nan)
    for a, b in itertools.product(range(x.shape[1]), range(y.shape[1])):
        if y is not x or a <= b:
            out[a, b] = cka(a, b)
        else:
            out[a, b] = out[b, a]
    return out


# ---------------------------------------------------------------------------------------------------------------------
# References


def test_unbiased_hsic_reference_is_the_u_statistic():
    """Song et al. 2012: HSIC_1 is the U-statistic of ``k_ij l_ij + k_ij l_qr - 2 k_ij l_iq`` over distinct i,j,q,r."""
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(6, 3)), rng.normal(size=(6, 4))
    k, l = x @ x.T, y @ y.T
    total = sum(k[i, j] * l[i, j] + k[i, j] * l[q, r] - 2 * k[i, j] * l[i, q]
                for i, j, q, r in itertools.permutations(range(6), 4))
    assert unbiased_hsic_reference(k, l) == pytest.approx(total / (6 * 5 * 4 * 3), abs=1e-12)


@pytest.mark.parametrize("estimator", ["biased", "unbiased"])
def test_reference_invariances(related, estimator):
    x, y = related
    rng = np.random.default_rng(2)

    def cka(a: np.ndarray, b: np.ndarray) -> float:
        if estimator == "biased":
            return linear_cka_reference(a, b)
        return minibatch_cka_reference(np.array_split(a, 4), np.array_split(b, 4))

    base = cka(x, y)
    assert 0.05 < base < 0.99
    assert cka(x, x) == pytest.approx(1.0, abs=1e-12)
    assert cka(x @ random_orthogonal(rng, 24), y) == pytest.approx(base, abs=1e-10)
    assert cka(x, 7.5 * y @ random_orthogonal(rng, 16)) == pytest.approx(base, abs=1e-10)
    assert cka(x.reshape(300, 6, 4), y) == pytest.approx(base, abs=1e-12)  # trailing dims are flattened


def test_references_are_nan_for_constant_features_and_refuse_bad_input(related):
    x, _ = related
    assert np.isnan(linear_cka_reference(x, np.ones((300, 3))))
    assert np.isnan(minibatch_cka_reference([np.ones((10, 2))], [x[:10]]))
    with pytest.raises(ConfigError, match="at least 4 samples"):
        unbiased_hsic_reference(np.eye(3), np.eye(3))
    with pytest.raises(ShapeError, match="same rows"):
        linear_cka_reference(x, x[:10])


def test_extract_estimators_agree_with_the_references(related):
    """The torch estimators (feature space, re-exported here) equal the n x n references."""
    x, y = related
    assert linear_cka(x, y) == pytest.approx(linear_cka_reference(x, y), abs=1e-6)
    k, l = x @ x.T, y @ y.T
    assert unbiased_hsic(k[:50, :50], l[:50, :50]) == pytest.approx(
        unbiased_hsic_reference(k[:50, :50], l[:50, :50]), abs=1e-6)
    bx, by = np.array_split(x, 7), np.array_split(y, 7)
    assert minibatch_cka(bx, by) == pytest.approx(minibatch_cka_reference(bx, by), abs=1e-6)


# ---------------------------------------------------------------------------------------------------------------------
# Out of core, against the references on the same rows


@pytest.mark.parametrize("array", ["k", "v", "kv"])
@pytest.mark.parametrize("estimator", ["biased", "unbiased"])
def test_store_cka_equals_the_reference(store, array, estimator):
    result = store_cka(store, TEACHER, array=array, estimator=estimator, block_tokens=BLOCK)
    x, weight, _ = load(store, TEACHER, array)
    x = x[weight > 0]
    assert result.tokens == len(x) > 1000
    assert result.matrix.shape == (5, 5) and result.layers == result.vs_layers == (0, 1, 2, 3, 4)
    np.testing.assert_allclose(result.matrix, reference_matrix(x, x, estimator), atol=1e-6)
    np.testing.assert_allclose(np.diag(result.matrix), 1.0, atol=1e-9)


@pytest.mark.parametrize("estimator", ["biased", "unbiased"])
def test_store_cka_with_a_segment_filter(store, estimator):
    result = store_cka(KVStore.open(store), TEACHER, array="kv", estimator=estimator, block_tokens=BLOCK,
                       segments="reasoning,answer")
    x, weight, segment = load(store, TEACHER, "kv")
    x = x[(weight > 0) & np.isin(segment, [1, 2])]  # 1 reasoning, 2 answer
    assert result.tokens == len(x) and result.segments == ("reasoning", "answer")
    np.testing.assert_allclose(result.matrix, reference_matrix(x, x, estimator), atol=1e-6)


@pytest.mark.parametrize("estimator", ["biased", "unbiased"])
def test_store_cka_between_two_teachers(store, estimator):
    result = store_cka(store, TEACHER, vs="tiny", array="k", estimator=estimator, block_tokens=BLOCK)
    x, wx, _ = load(store, TEACHER, "k")
    y, wy, _ = load(store, "tiny", "k")
    keep = (wx > 0) & (wy > 0)
    assert result.matrix.shape == (5, 4) and result.vs_layers == (0, 1, 2, 3) and result.vs == "tiny"
    np.testing.assert_allclose(result.matrix, reference_matrix(x[keep], y[keep], estimator), atol=1e-6)


@pytest.mark.parametrize("estimator", ["biased", "unbiased"])
def test_store_cka_is_invariant_and_skips_unaligned_tokens(store, estimator):
    """``rot`` is the stories teacher under an orthogonal map and a scale on its aligned tokens, garbage elsewhere:
    CKA against it equals the stories teacher's own CKA on those tokens, and its own self-similarity too."""
    vs_rot = store_cka(store, TEACHER, vs="rot", array="kv", estimator=estimator, block_tokens=BLOCK)
    rot = store_cka(store, "rot", array="kv", estimator=estimator, block_tokens=BLOCK)
    x, w, _ = load(store, TEACHER, "kv")
    _, w_rot, _ = load(store, "rot", "kv")
    aligned = x[(w > 0) & (w_rot > 0)]  # the grid's EOS has no teacher token: weight 0 in both
    assert vs_rot.tokens == rot.tokens == len(aligned) < len(x)
    expected = reference_matrix(aligned, aligned, estimator)
    # float32 storage of the rotated values: agreement to ~1e-7 relative, not exact.
    np.testing.assert_allclose(vs_rot.matrix, expected, atol=1e-5)
    np.testing.assert_allclose(rot.matrix, expected, atol=1e-5)
    np.testing.assert_allclose(np.diag(vs_rot.matrix), 1.0, atol=1e-5)


def test_biased_store_cka_does_not_depend_on_the_block_size(store):
    small = store_cka(store, TEACHER, array="k", block_tokens=7)
    large = store_cka(store, TEACHER, array="k", block_tokens=100_000)
    np.testing.assert_allclose(small.matrix, large.matrix, atol=1e-10)


@pytest.fixture(scope="module")
def big_store(tmp_path_factory) -> Path:
    """stories260K over 80 problems (~19k tokens): large enough that loading it whole dwarfs a block."""
    path = tmp_path_factory.mktemp("cka-big") / "kv.zarr"
    extract(asset_path(STORIES), path, limit=80, shard_tokens=1024)
    return path


def peak_bytes(fn) -> tuple[Any, int]:
    tracemalloc.start()
    try:
        out = fn()
        return out, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


# Blocks tiny next to the ~19k-token store; the biased one larger, so the test does not pay for 300 small BLAS calls.
@pytest.mark.parametrize("estimator,block", [("biased", 256), ("unbiased", BLOCK)])
def test_store_cka_memory_stays_near_one_block(big_store, estimator, block):
    """numpy reports its buffers to tracemalloc: the out-of-core peak is a fraction of loading every row."""
    store = KVStore.open(big_store)
    store_cka(store, TEACHER, estimator=estimator, block_tokens=block)  # imports and caches outside the measurement
    result, ooc = peak_bytes(lambda: store_cka(store, TEACHER, estimator=estimator, block_tokens=block))
    (x, w, _), full = peak_bytes(lambda: load(big_store, TEACHER, "k"))
    assert result.tokens == int((w > 0).sum()) > 15_000  # every token but each sample's EOS
    assert x.nbytes > 20e6
    assert ooc < full / 3, f"out-of-core peak {ooc / 1e6:.1f} MB vs {full / 1e6:.1f} MB to load every row"


# ---------------------------------------------------------------------------------------------------------------------
# kava cka


def test_run_cka_writes_matrix_csv_png_and_json(store, tmp_path):
    logs: list[str] = []
    result = run_cka(store, TEACHER, vs="tiny", out=tmp_path / "out", array="kv", estimator="unbiased",
                     block_tokens=BLOCK, log=logs.append)
    stem = tmp_path / "out" / f"cka-{TEACHER}-vs-tiny-kv-unbiased"
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(
        f"{stem.name}{ext}" for ext in (".csv", ".json", ".npy", ".png"))  # no temporary files left
    np.testing.assert_array_equal(np.load(f"{stem}.npy"), result.matrix)
    lines = Path(f"{stem}.csv").read_text().splitlines()
    assert lines[0] == f"{TEACHER}\\tiny,L0,L1,L2,L3"
    assert [line.split(",")[0] for line in lines[1:]] == ["L0", "L1", "L2", "L3", "L4"]
    np.testing.assert_array_equal(np.array([[float(v) for v in line.split(",")[1:]] for line in lines[1:]]),
                                  result.matrix)
    meta = json.loads(Path(f"{stem}.json").read_text())
    assert meta["teacher"] == TEACHER and meta["vs"] == "tiny" and meta["estimator"] == "unbiased"
    assert meta["tokens"] == result.tokens and meta["block_tokens"] == BLOCK and meta["elapsed_s"] >= 0
    np.testing.assert_allclose(np.array(meta["matrix"], dtype=float), result.matrix, atol=0)
    png = Path(f"{stem}.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    assert any("kava cka: wrote" in line for line in logs)


def test_run_cka_names_segment_filtered_outputs(store, tmp_path):
    run_cka(store, TEACHER, out=tmp_path, segments=["answer"], block_tokens=BLOCK, log=lambda _: None)
    assert (tmp_path / f"cka-{TEACHER}-k-biased-answer.npy").exists()


@pytest.mark.parametrize("options,message", [
    ({"teacher": "gpt9"}, rf"Expected --teacher to name a teacher of the store .*: one of \['rot', '{TEACHER}', "
                          r"'tiny'\]. Got 'gpt9' instead"),
    ({"vs": "gpt9"}, r"Expected --vs to name a teacher of the store .*Got 'gpt9' instead"),
    ({"array": "x"}, r"Expected --array to be one of \['k', 'v', 'kv'\]. Got 'x' instead."),
    ({"estimator": "rbf"}, r"Expected --estimator to be one of \['biased', 'unbiased'\]. Got 'rbf' instead."),
    ({"estimator": "unbiased", "block_tokens": 3}, r"--block-tokens to be an integer of at least 4 .*Got 3"),
    ({"block_tokens": 0}, r"--block-tokens to be an integer of at least 1. Got 0"),
    ({"segments": ["thinking"]}, r"Expected --segments among \['prompt', 'reasoning', 'answer', 'special'\]. "
                                 r"Got \['thinking'\] instead."),
    ({"array": "x", "estimator": "rbf"}, r"Found 2 problems:\n  - Expected --array.*\n  - Expected --estimator"),
])
def test_run_cka_refuses_bad_options_before_writing(store, tmp_path, options, message):
    kwargs = {"teacher": TEACHER, **options}
    with pytest.raises(ConfigError, match=message):
        run_cka(store, kwargs.pop("teacher"), out=tmp_path / "out", log=lambda _: None, **kwargs)
    assert not (tmp_path / "out").exists()


def test_run_cka_refuses_a_file_as_output_directory(store, tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(ConfigError, match=r"Expected --out to be a directory .*Got the file"):
        run_cka(store, TEACHER, out=tmp_path / "file", log=lambda _: None)


def test_result_json_round_trips_and_writes_nan_as_null(store):
    result = store_cka(store, TEACHER, block_tokens=BLOCK)
    d = json.loads(result.to_json(elapsed_s=1.5))
    assert d["elapsed_s"] == 1.5 and d["layers"] == [0, 1, 2, 3, 4] and d["segments"] is None
    nan = dataclasses.replace(result, matrix=np.full((1, 1), np.nan), layers=(0,), vs_layers=(0,))
    assert json.loads(nan.to_json())["matrix"] == [[None]]
    assert isinstance(result, CKAResult)


def test_heatmap_marks_the_layer_map(store, tmp_path):
    spec = KVStore.open(store).teacher("tiny")
    weights = layer_map_matrix(spec)
    assert weights.shape == (5, 4) and np.allclose(weights.sum(1), 1.0)
    pairs = layer_map_pairs(spec)
    assert all(weights[s, t] > 0 for s, t in pairs) and len(pairs) >= 5
    out = heatmap(weights, tmp_path / "map.png", title="layer map", row_label="student layer",
                  col_label="teacher layer", layer_map=pairs)
    assert out.read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(ConfigError, match=r"layer_map cells inside the 5x4 matrix. Got \(0, 9\)"):
        heatmap(weights, tmp_path / "bad.png", title="", row_label="", col_label="", layer_map=[(0, 9)])


@pytest.mark.integration
def test_kava_cka_command_writes_the_matrix_and_names_a_bad_teacher(store, tmp_path):
    """The real CLI in a subprocess: the written matrix equals store_cka's, and a typo gets a one-line error."""
    import json
    import subprocess

    cmd = [*KAVA, "cka", "--store", str(store), "--out", str(tmp_path)]
    proc = subprocess.run([*cmd, "--teacher", TEACHER, "--json"], capture_output=True, text=True, env=ENV,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    printed = json.loads(proc.stdout)
    matrix = np.load(tmp_path / f"cka-{TEACHER}-k-biased.npy")
    np.testing.assert_allclose(matrix, store_cka(store, TEACHER).matrix, atol=1e-12)
    assert printed["teacher"] == TEACHER and (tmp_path / f"cka-{TEACHER}-k-biased.png").is_file()

    bad = subprocess.run([*cmd, "--teacher", "nope"], capture_output=True, text=True, env=ENV, timeout=120)
    assert bad.returncode == 1 and bad.stderr.startswith("error: ") and "nope" in bad.stderr
