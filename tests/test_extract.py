"""`kava extract` end to end: real teachers, the real stories260K and tokenizers, stores checked value by value.

What each test runs:

- the recipe in this process (``run_extract``) where only the store's contents are under test;
- the command line in this process (click's ``CliRunner``) where exit codes and messages are under test and
  a fresh interpreter adds nothing;
- real subprocesses (``python -m kava.pipelines.cli``) where the guarantee is about processes: a run killed
  by SIGKILL and resumed, two shard jobs writing one store at once, the quantized CLI path, stdout holding
  only JSON, and how fast an offline hub id fails.

Models are built once per module: the real stories260K Llama from ``$KAVA_ASSETS``, and tiny seeded Llama/Qwen2
models saved next to a real tokenizer so they load through the same ``from_pretrained`` path a user takes.
Torch runs on one thread here and in the subprocesses: the machine's two cores are shared, and two intra-op
threads fighting other processes made each run about 3x slower.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch
import zarr
from click.testing import CliRunner
from helpers import ENV, KAVA, asset_path, sigkill_when  # asset_path: the `assets` lookup, for module-scoped fixtures

from kava.core.synthetic import synthetic_rows
from kava.extract.align import align_tokens, apply, token_spans
from kava.extract.capture import capture_qkv
from kava.extract.config import ExtractConfig
from kava.extract.grid import with_eos
from kava.extract.recipe import run_extract
from kava.extract.templates import TEMPLATES, format_row
from kava.kvstore import KVStore, SampleError, SchemaError, StoreError, summary, verify_store
from kava.pipelines.cli import main

STORIES = "models/stories260K_hf_derived"
STORIES_NAME = "stories260K_hf_derived"  # the default teacher name: the model directory's name
QUIET = {"progress": False, "calibration_samples": 4}
# The reference extraction that the killed-and-resumed run and the two shard jobs must reproduce exactly:
# 100 synthetic problems (~23k stories tokens) in ~1024-token shards, so a run has 21 shards to be killed between.
REF = {"limit": 100, "shard_tokens": 1024, "batch_size": 4, **QUIET}


def flags(**options: Any) -> list[str]:
    """ExtractConfig fields as `kava extract` flags: ``shard_tokens=1024`` → ``--shard-tokens 1024``."""
    out = []
    for key, value in options.items():
        flag = "--" + key.replace("_", "-")
        if value is True:
            out.append(flag)
        elif value is False:  # the only default-True field used here is `progress`
            out.append("--no-" + key.replace("_", "-"))
        else:
            out += [flag, str(value)]
    return out


def kava(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([*KAVA, *args], capture_output=True, text=True, env=ENV, timeout=timeout)


def kava_bg(*args: str) -> subprocess.Popen:
    return subprocess.Popen([*KAVA, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)


def cli(*args: str):
    """The `kava` command in this process; ``result.stdout`` and ``result.stderr`` are kept apart."""
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def extract(teacher: Path | str, store: Path, **options: Any):
    return run_extract(ExtractConfig.from_dict(dict(teacher=str(teacher), store=str(store), **options)),
                       log=lambda _: None)


def as_rows(per_layer: dict[int, torch.Tensor], layers) -> np.ndarray:
    """capture_qkv's per-layer ``[1, heads, T, D]`` → the store's ``[T, L, heads, D]`` float32."""
    return torch.stack([per_layer[l][0] for l in layers], 0).permute(2, 0, 1, 3).float().numpy()


def store_arrays(path: Path) -> dict[str, zarr.Array]:
    with warnings.catch_warnings():
        # index.parquet sits at the store's root by design (FORMAT.md); zarr warns that it is not a zarr node.
        warnings.filterwarnings("ignore", "Object at index.parquet is not recognized", zarr.errors.ZarrUserWarning)
        members = zarr.open_group(path, mode="r").members(max_depth=None)
    return {name: node for name, node in members if isinstance(node, zarr.Array)}


def assert_same_store(a: Path, b: Path, teacher: str) -> None:
    """Every array (grid, tokenizer files, CKA, each shard's k/v/align_weight/sample_status) and the index are equal."""
    arrays_a, arrays_b = store_arrays(a), store_arrays(b)
    assert sorted(arrays_a) == sorted(arrays_b)
    assert {f"grid/{n}" for n in ("offsets", "input_ids", "segment_ids", "sample_status", "shard_starts")} <= set(
        arrays_a)
    shards = KVStore.open(a).num_shards
    assert {f"teachers/{teacher}/shards/{s:06d}/{n}" for s in range(shards)
            for n in ("k", "v", "align_weight", "sample_status")} <= set(arrays_a)
    for name, x in arrays_a.items():
        y = arrays_b[name]
        assert (x.shape, x.dtype, x.chunks, dict(x.attrs)) == (y.shape, y.dtype, y.chunks, dict(y.attrs)), name
        np.testing.assert_array_equal(x[...], y[...], err_msg=name)
    assert pd.read_parquet(a / "index.parquet").equals(pd.read_parquet(b / "index.parquet"))
    sa, sb = KVStore.open(a), KVStore.open(b)
    assert sa.manifest.grid_fingerprint == sb.manifest.grid_fingerprint
    for s in range(shards):
        ma, mb = sa.shard_marker(teacher, s), sb.shard_marker(teacher, s)
        for key in ("samples", "tokens", "quarantined", "bytes_logical"):
            assert ma[key] == mb[key], (s, key)


# ---------------------------------------------------------------------------------------------------------------------
# Models and reference stores, built once


ONE_TORCH_THREAD = True  # see conftest.one_torch_thread


@pytest.fixture(scope="module")
def stories_model(stories):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(stories).eval()


@pytest.fixture(scope="module")
def stories_tok(stories):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(stories)


def _save_tiny(path: Path, config, tokenizer, *, seed: int, nan_token: int | None = None) -> Path:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    if nan_token is not None:
        with torch.no_grad():
            model.get_input_embeddings().weight[nan_token] = float("nan")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def _tiny_llama_config(vocab_size: int, layers: int):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024)


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory, stories_tok) -> Path:
    """A seeded 3-layer Llama on the stories260K tokenizer: a second teacher for the same grid, and a student."""
    return _save_tiny(tmp_path_factory.mktemp("models") / "tiny-llama", _tiny_llama_config(len(stories_tok), 3),
                      stories_tok, seed=1)


@pytest.fixture(scope="module")
def nan_llama(tmp_path_factory, stories_tok) -> Path:
    """A tiny Llama whose embedding of the byte token <0xA7> (the second byte of '§') is NaN: every text with a
    '§' gives NaN K/V from that token on, every other text is finite."""
    nan_id = stories_tok.convert_tokens_to_ids("<0xA7>")
    assert stories_tok.convert_ids_to_tokens(token_spans(stories_tok, "a § b")[0].tolist()).count("<0xA7>") == 1
    return _save_tiny(tmp_path_factory.mktemp("models") / "nan-llama", _tiny_llama_config(len(stories_tok), 2),
                      stories_tok, seed=2, nan_token=nan_id)


@pytest.fixture(scope="module")
def tiny_qwen(tmp_path_factory) -> Path:
    """A seeded tiny Qwen2 (GQA 4/2, head dim 16) on the real GPT-2 tokenizer."""
    from transformers import AutoTokenizer, Qwen2Config

    tok = AutoTokenizer.from_pretrained(asset_path("tokenizers/gpt2"))
    config = Qwen2Config(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                         tie_word_embeddings=True)
    return _save_tiny(tmp_path_factory.mktemp("models") / "tiny-qwen", config, tok, seed=0)


@pytest.fixture(scope="module")
def ref_store(tmp_path_factory, stories) -> Path:
    """stories260K over REF's 100 synthetic problems, one uninterrupted run in this process."""
    path = tmp_path_factory.mktemp("ref") / "kv.zarr"
    result = extract(stories, path, **REF)
    assert result.shards_written == list(range(KVStore.open(path).num_shards))
    return path


# ---------------------------------------------------------------------------------------------------------------------
# 1-2: what lands in the store is the teacher's K/V, on the student's grid


def test_identity_extraction_matches_capture_of_each_sample_alone(ref_store, stories_model, stories_tok):
    store = KVStore.open(ref_store)
    rows = synthetic_rows(100)
    assert store.num_samples == 100 and store.num_shards >= 15
    lengths = np.diff(store.offsets)
    # The recipe cuts batches inside each shard. Check the sample right-padded the most in its batch, and the last.
    padding, padded = 0, 0
    for shard in range(store.num_shards):
        samples = list(store.shard_samples(shard))
        for b in range(0, len(samples), REF["batch_size"]):
            batch = samples[b : b + REF["batch_size"]]
            padding, padded = max((padding, padded), *((int(lengths[batch].max() - lengths[i]), i) for i in batch))
    assert padding > 20
    for i in (padded, 99):
        got = store.read_sample(i)
        kv = got.teachers[STORIES_NAME]
        ids, _ = token_spans(stories_tok, format_row(rows[i], TEMPLATES["plain"]).text)
        np.testing.assert_array_equal(got.input_ids, np.append(ids, stories_tok.eos_token_id))  # the grid's EOS
        cap = capture_qkv(stories_model, torch.as_tensor(ids)[None], k_rope="pre")
        # fp16 storage: each stored value is its float32 rounded to 11 significant bits (relative error <= 2^-11);
        # the batch-of-4 forward differs from the lone one by ~1e-6.
        for name, ref in (("k", as_rows(cap.keys, range(5))), ("v", as_rows(cap.values, range(5)))):
            np.testing.assert_allclose(getattr(kv, name)[:-1], ref, rtol=2 ** -10, atol=1e-5,
                                       err_msg=f"{name} sample {i}")
            assert not getattr(kv, name)[-1].any()  # the appended EOS: no teacher row
        np.testing.assert_array_equal(kv.align_weight, np.append(np.ones(len(ids), np.float32), 0))
        np.testing.assert_array_equal(kv.status, [0])
        # "#### N": every token of it is answer (2), and no answer token comes before it.
        seg = got.segment_ids
        answer_text = stories_tok.decode(got.input_ids[seg == 2])
        assert answer_text.strip() == f"#### {rows[i].answer}"
        assert "####" not in stories_tok.decode(got.input_ids[seg != 2])
        assert seg[0] == 3  # BOS is special
        assert np.all(np.diff(seg[seg != 3].astype(int)) >= 0)  # prompt, then reasoning, then answer

    spec = store.teacher(STORIES_NAME)
    assert spec.alignment["method"] == "identity" and spec.layer_map.method == "proportional"
    assert (spec.layers, spec.k_rope, spec.storage.dtype) == ((0, 1, 2, 3, 4), "pre", "float16")


@pytest.mark.integration
def test_store_verify_and_info_json_of_an_extraction(ref_store):
    verified = kava("store", "verify", str(ref_store))
    assert verified.returncode == 0, verified.stdout + verified.stderr
    assert "sound" in verified.stdout and f"{STORIES_NAME}: " in verified.stdout

    out = kava("store", "info", str(ref_store), "--json")
    assert out.returncode == 0, out.stderr
    info = json.loads(out.stdout)  # stdout holds the JSON document and nothing else
    store = KVStore.open(ref_store)
    assert (info["format_version"], info["samples"], info["tokens"]) == (5, 100, store.num_tokens)
    t = info["teachers"][STORIES_NAME]
    assert (t["layers"], t["kv_heads"], t["head_dim"], t["k_rope"], t["has_q"], t["dtype"]) == (
        [0, 1, 2, 3, 4], 4, 8, "pre", False, "float16")
    # fp16 K and V: tokens × 2 × 5 layers × 4 heads × 8 dims × 2 bytes
    assert t["bytes_logical"] == store.num_tokens * 2 * 5 * 4 * 8 * 2
    assert 0 < t["bytes_on_disk"] < t["bytes_logical"]  # zstd
    assert t["shards_complete"] == store.num_shards and t["quarantined"] == 0


def test_cross_tokenizer_keys_are_the_aligned_teacher_keys(tmp_path, stories, stories_model, stories_tok, assets):
    from transformers import AutoTokenizer

    gpt2 = AutoTokenizer.from_pretrained(assets("tokenizers/gpt2"))
    path = tmp_path / "kv.zarr"
    extract(stories, path, limit=12, shard_tokens=512, student_tokenizer=str(assets("tokenizers/gpt2")), **QUIET)
    store = KVStore.open(path)
    spec = store.teacher(STORIES_NAME)
    assert spec.alignment["method"] == "char_iou" and spec.alignment["mode"] == "soft"
    assert store.manifest.student_tokenizer.vocab_size == len(gpt2)
    assert store.num_shards >= 2

    rows = synthetic_rows(12)
    all_weights = []
    for i in (0, 7):
        text = format_row(rows[i], TEMPLATES["plain"]).text
        s_ids, s_spans = with_eos(gpt2, *token_spans(gpt2, text))
        t_ids, t_spans = token_spans(stories_tok, text)
        got = store.read_sample(i)
        np.testing.assert_array_equal(got.input_ids, s_ids)  # the grid is the student's tokens, then its EOS
        assert len(s_ids) != len(t_ids)
        cap = capture_qkv(stories_model, torch.as_tensor(t_ids)[None], k_rope="pre")
        al = align_tokens(s_spans, t_spans)
        kv = got.teachers[STORIES_NAME]
        np.testing.assert_allclose(kv.k, apply(al, as_rows(cap.keys, range(5))), rtol=2 ** -10, atol=1e-5)
        np.testing.assert_allclose(kv.v, apply(al, as_rows(cap.values, range(5))), rtol=2 ** -10, atol=1e-5)
        np.testing.assert_array_equal(kv.align_weight, al.coverage)
        assert kv.align_weight[-1] == 0  # the EOS the grid appends stands for no text
        all_weights.append(kv.align_weight[:-1])
    weights = np.concatenate(all_weights)
    assert weights.min() >= 0 and weights.max() <= 1
    # A weight is the share of the student token's characters that some teacher token covers. Every character of
    # these texts belongs to some stories260K token (leading spaces included), so here every weight is exactly 1.
    assert weights.min() == 1.0


# ---------------------------------------------------------------------------------------------------------------------
# 3-4: storage options


@pytest.mark.integration
def test_4bit_teacher_through_the_cli(tmp_path, tiny_qwen):
    options = dict(limit=12, shard_tokens=512, **QUIET)
    out = kava("extract", "--teacher", str(tiny_qwen), "--store", str(tmp_path / "nf4.zarr"), "--load-in-4bit",
               "--json", *flags(**options))
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert (result["teacher"], result["samples"], result["quarantined"]) == ("tiny-qwen", 12, 0)
    assert "nf4" in out.stderr  # the start line names the quantization
    extract(tiny_qwen, tmp_path / "fp32.zarr", **options)

    nf4, fp32 = KVStore.open(tmp_path / "nf4.zarr"), KVStore.open(tmp_path / "fp32.zarr")
    model = nf4.teacher("tiny-qwen").model
    assert (model["quantization"], model["compute_dtype"]) == ("nf4", "bfloat16")
    assert fp32.teacher("tiny-qwen").model["quantization"] == "none"
    assert nf4.manifest.grid_fingerprint == fp32.manifest.grid_fingerprint
    for s in range(nf4.num_shards):
        a, b = nf4.read_shard(s).teachers["tiny-qwen"], fp32.read_shard(s).teachers["tiny-qwen"]
        for name in ("k", "v"):
            x, y = getattr(a, name), getattr(b, name)  # [T, L, H, D]
            per_layer = lambda z: z.transpose(1, 0, 2, 3).reshape(z.shape[1], -1)  # noqa: E731
            xl, yl = per_layer(x), per_layer(y)
            cos = (xl * yl).sum(1) / np.linalg.norm(xl, axis=1) / np.linalg.norm(yl, axis=1)
            # Measured 0.9929-0.9963 per layer over a shard (per token: >= 0.976); nf4 weights are ~10% off each.
            assert cos.min() > 0.99, (s, name, cos)
            assert not np.allclose(x, y, atol=1e-3)  # really quantized, not the same model twice


def test_q_layers_int8_post_rope_and_bfloat16_are_recorded_and_readable(tmp_path, stories, stories_model,
                                                                      stories_tok):
    options = dict(limit=6, shard_tokens=512, **QUIET)
    extract(stories, tmp_path / "int8.zarr", with_q=True, q_layers="0,2", kv_dtype="int8", k_rope="post", **options)
    extract(stories, tmp_path / "bf16.zarr", kv_dtype="bfloat16", **options)

    int8, bf16 = KVStore.open(tmp_path / "int8.zarr"), KVStore.open(tmp_path / "bf16.zarr")
    spec = int8.teacher(STORIES_NAME)
    assert (spec.q_layers, spec.k_rope, spec.storage.dtype, spec.has_q) == ((0, 2), "post", "int8", True)
    assert bf16.teacher(STORIES_NAME).storage.dtype == "bfloat16"
    info = summary(int8)["teachers"][STORIES_NAME]
    assert (info["has_q"], info["q_layers"], info["k_rope"], info["dtype"]) == (True, [0, 2], "post", "int8")

    ids, _ = token_spans(stories_tok, format_row(synthetic_rows(6)[3], TEMPLATES["plain"]).text)
    post = capture_qkv(stories_model, torch.as_tensor(ids)[None], with_q=[0, 2], k_rope="post")
    pre = capture_qkv(stories_model, torch.as_tensor(ids)[None], k_rope="pre")
    got = int8.read_sample(3, with_q=True).teachers[STORIES_NAME]
    assert got.q_layers == (0, 2) and got.q.shape == (len(ids) + 1, 2, 8, 8)  # + the grid's EOS
    assert not got.k[-1].any() and not got.v[-1].any()  # the EOS row has no teacher
    k, v, q = got.k[:-1], got.v[:-1], got.q[:-1]
    for stored, ref in ((k, as_rows(post.keys, range(5))), (v, as_rows(post.values, range(5))),
                        (q, as_rows(post.queries, (0, 2)))):
        # int8: code * scale with scale = absmax over head_dim / 127, so at most half a step off (+ fp16 scale).
        step = np.abs(ref).max(-1, keepdims=True) / 127
        assert np.all(np.abs(stored - ref) <= 0.51 * step + 1e-6)
    # Post-RoPE keys are rotated: away from position 0 they are not the pre-RoPE ones.
    pre_k = as_rows(pre.keys, range(5))
    assert np.abs(k[1:] - pre_k[1:]).max() > 10 * np.abs(k - as_rows(post.keys, range(5))).max()

    with pytest.raises(SchemaError, match="no stored queries.*--with-q"):
        bf16.read_sample(3, with_q=True)
    got = bf16.read_sample(3).teachers[STORIES_NAME]
    np.testing.assert_allclose(got.k[:-1], pre_k, rtol=2 ** -8, atol=1e-5)  # bf16: 8 significant bits
    np.testing.assert_allclose(got.v[:-1], as_rows(pre.values, range(5)), rtol=2 ** -8, atol=1e-5)


# ---------------------------------------------------------------------------------------------------------------------
# 5-6: killed and resumed, split over jobs


@pytest.mark.integration
@pytest.mark.slow
def test_killed_run_is_refused_without_resume_and_finished_with_it(tmp_path, stories, ref_store):
    path = tmp_path / "kv.zarr"
    args = ["extract", "--teacher", str(stories), "--store", str(path), *flags(**REF)]
    proc = kava_bg(*args)

    def some_shard_done() -> bool:
        try:
            return bool(KVStore.open(path).complete_shards(STORIES_NAME))
        except StoreError:  # not created yet, or its manifest not written yet
            return False

    err = sigkill_when(proc, some_shard_done)
    assert proc.returncode == -signal.SIGKILL, err
    store = KVStore.open(path)
    complete = store.complete_shards(STORIES_NAME)
    assert 0 < len(complete) < store.num_shards, complete  # killed between shards: some done, most not
    assert not verify_store(path).ok

    again = kava(*args)
    assert again.returncode == 1
    assert "--resume" in again.stderr and "already has" in again.stderr and "complete shard" in again.stderr
    assert KVStore.open(path).complete_shards(STORIES_NAME) == complete  # the refusal touched nothing

    resumed = kava(*args, "--resume", "--json")
    assert resumed.returncode == 0, resumed.stderr
    result = json.loads(resumed.stdout)
    assert result["shards_kept"] == complete
    assert sorted(result["shards_written"]) == [s for s in range(store.num_shards) if s not in complete]
    assert_same_store(path, ref_store, STORIES_NAME)
    verified = kava("store", "verify", str(path))
    assert verified.returncode == 0, verified.stdout


@pytest.mark.integration
@pytest.mark.slow
def test_two_shard_jobs_at_once_make_the_single_run_store(tmp_path, stories, ref_store):
    path = tmp_path / "kv.zarr"
    jobs = [kava_bg("extract", "--teacher", str(stories), "--store", str(path), "--shard", f"{i}/2", "--json",
                    *flags(**REF)) for i in range(2)]
    try:
        outs = [job.communicate(timeout=180) for job in jobs]
    finally:
        for job in jobs:
            if job.poll() is None:
                job.kill()
                job.wait()
    for job, (_, err) in zip(jobs, outs):
        assert job.returncode == 0, err
    written = [json.loads(out)["shards_written"] for out, _ in outs]
    shards = KVStore.open(path).num_shards
    assert sorted(written[0]) == list(range(0, shards, 2)) and sorted(written[1]) == list(range(1, shards, 2))
    assert_same_store(path, ref_store, STORIES_NAME)
    assert verify_store(path).ok


# ---------------------------------------------------------------------------------------------------------------------
# 7: several teachers, several templates


@pytest.mark.integration
def test_teachers_and_dual_prompts_share_a_store_but_another_student_template_is_another_grid(
        tmp_path, stories, tiny_llama):
    path = tmp_path / "kv.zarr"
    options = dict(limit=8, shard_tokens=512, **QUIET)
    extract(stories, path, **options)
    extract(tiny_llama, path, **options)  # same tokenizer → same grid → a second teacher

    out = kava("store", "info", str(path), "--json")
    assert out.returncode == 0, out.stderr
    teachers = json.loads(out.stdout)["teachers"]
    assert sorted(teachers) == sorted([STORIES_NAME, "tiny-llama"])
    assert teachers["tiny-llama"]["layers"] == [0, 1, 2] and teachers["tiny-llama"]["kv_heads"] == 2
    verified = kava("store", "verify", str(path))
    assert verified.returncode == 0, verified.stdout
    shards = KVStore.open(path).num_shards
    assert f"{STORIES_NAME}: {shards}/{shards} shards" in verified.stdout
    assert f"tiny-llama: {shards}/{shards} shards" in verified.stdout

    # Dual prompt: the same model reading another template is a third teacher on the same student grid. Its rows
    # are mapped piece by piece (question, reasoning, answer); the student's template glue ("Question: ") gets
    # weight 0, and every piece's tokens are covered.
    dual = cli("extract", "--teacher", str(stories), "--store", str(path), "--prompt-template", "cot",
               *flags(**options))
    assert dual.exit_code == 0, dual.stderr
    store = KVStore.open(path)
    assert sorted(store.teachers) == sorted([STORIES_NAME, f"{STORIES_NAME}+cot", "tiny-llama"])
    spec = store.teacher(f"{STORIES_NAME}+cot")
    assert spec.alignment["method"] == "char_iou" and spec.details["prompt_template"] == "cot"
    rows = store.read_sample(0, teachers=[STORIES_NAME, f"{STORIES_NAME}+cot"])
    plain, cot = rows.teachers[STORIES_NAME], rows.teachers[f"{STORIES_NAME}+cot"]
    covered = cot.align_weight > 0
    assert 0.5 < covered.mean() < 1.0  # the glue of the student's template has no counterpart
    # Layer 0's pre-RoPE keys depend only on the token itself: where both read the same token, they agree.
    same = covered & (cot.align_weight == 1)
    np.testing.assert_allclose(cot.k[same][:, 0], plain.k[same][:, 0], rtol=2e-3, atol=2e-3)

    # The student template is part of the grid: another one is another grid, refused before the teacher loads.
    refused = cli("extract", "--teacher", str(stories), "--store", str(path), "--student-template", "cot",
                  *flags(**options))
    assert refused.exit_code == 1
    assert "made for another student grid" in refused.stderr
    assert "student template or max length differ" in refused.stderr and "--store" in refused.stderr
    assert len(KVStore.open(path).teachers) == 3


# ---------------------------------------------------------------------------------------------------------------------
# 8: refusals


def test_store_for_another_grid_is_refused_naming_the_difference(ref_store, stories, assets):
    base = ["extract", "--teacher", str(stories), "--store", str(ref_store)]
    gpt2 = str(assets("tokenizers/gpt2"))
    before = sorted(os.listdir(ref_store))

    other_tok = cli(*base, *flags(**{**REF, "student_tokenizer": gpt2}))
    assert other_tok.exit_code == 1
    assert f"student tokenizer {str(stories)!r}" in other_tok.stderr and f"vs {gpt2!r}" in other_tok.stderr
    assert "Use a new --store path, or the same student tokenizer, split and template" in other_tok.stderr
    assert "--student-tokenizer" in other_tok.stderr
    # The tokenizer explains the other tokens; nothing else.
    assert "student template or max length" not in other_tok.stderr

    fewer = cli(*base, *flags(**{**REF, "limit": 99}))
    assert fewer.exit_code == 1
    assert "split synthetic:train (100 samples" in fewer.stderr and "vs synthetic:train (99 samples" in fewer.stderr
    other_split = cli(*base, *flags(**{**REF, "split": "test"}))
    assert other_split.exit_code == 1 and "vs synthetic:test (100 samples" in other_split.stderr
    for refused in (other_tok, fewer, other_split):
        assert refused.stdout == "" and "made for another student grid" in refused.stderr
    assert sorted(os.listdir(ref_store)) == before


@pytest.mark.integration
def test_bad_teacher_options_fail_fast_with_the_fix(tmp_path):
    store = str(tmp_path / "kv.zarr")
    typo = kava_bg("extract", "--teacher", "qwen-7b-4bt", "--store", store)
    both = kava_bg("extract", "--teacher", "qwen-0.5b", "--store", store, "--load-in-4bit", "--load-in-8bit",
                   "--layer-map", "cka")
    try:
        (_, typo_err), (_, both_err) = typo.communicate(timeout=60), both.communicate(timeout=60)
    finally:
        for proc in (typo, both):
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert typo.returncode == 1
    assert "Unknown teacher 'qwen-7b-4bt'. Did you mean: qwen-7b-4bit" in typo_err and "--list-teachers" in typo_err
    assert both.returncode == 1
    assert "Found 2 problems" in both_err  # every problem at once
    assert "Can't set both --load-in-4bit and --load-in-8bit. Choose one." in both_err
    assert "--layer-map cka needs --student" in both_err

    start = time.monotonic()
    hub = kava("extract", "--teacher", "Qwen/Qwen2.5-0.5B-Instruct", "--store", store)
    elapsed = time.monotonic() - start
    assert hub.returncode == 1
    assert "Qwen/Qwen2.5-0.5B-Instruct is not cached" in hub.stderr and "HF_HUB_OFFLINE=1" in hub.stderr
    # Interpreter start and imports included (2-4 s alone, 8 s with both cores busy); huggingface_hub's own retries
    # would take ~46 s.
    assert elapsed < 20, f"an uncached hub id took {elapsed:.1f} s to fail"
    assert not Path(store).exists()  # nothing was written by any of them


# ---------------------------------------------------------------------------------------------------------------------
# 9: bad input


BAD_ROWS = [
    {"question": "Tom has 3 apples. He buys 2 more. How many apples does he have?", "answer": "3 + 2 = 5\n#### 5"},
    {"question": "", "answer": "1 + 1 = 2\n#### 2"},
    {"question": "Mia has 4 pens. How many pens does she have?", "answer": "She has 4 pens.\n#### "},
    {"question": "小明有 3 个苹果 😀，他又买了 2 个。他现在有几个？", "answer": "3 + 2 = 5 🍎\n#### 5"},
    {"question": "Zoe\u0301 has 6 cards and gives one away. How many are left?", "answer": "6 - 1 = 5\n#### 5"},
    {"question": "Ann has 7 § stamps. How many stamps?", "answer": "She has 7.\n#### 7"},
    {"question": "Bo has 2 cats and gets 2 more. How many cats?", "answer": "2 + 2 = 4\n#### 4"},
]


@pytest.fixture
def bad_jsonl(tmp_path) -> Path:
    path = tmp_path / "bad.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in BAD_ROWS), encoding="utf-8")
    return path


@pytest.mark.integration
def test_bad_rows_are_skipped_and_a_nan_sample_is_quarantined(tmp_path, nan_llama, bad_jsonl):
    path = tmp_path / "kv.zarr"
    result = extract(nan_llama, path, dataset=str(bad_jsonl), shard_tokens=30, **QUIET)
    assert (result.samples, result.skipped, result.quarantined, result.truncated) == (7, 2, 1, 0)

    index = pd.read_parquet(path / "index.parquet")
    assert index["status"].tolist() == ["ok", "skipped", "skipped", "ok", "ok", "ok", "ok"]
    assert index["reason"].tolist()[1:3] == ["empty question", "empty answer"]
    assert index["num_tokens"].tolist()[1:3] == [0, 0]
    store = KVStore.open(path)
    teacher = "nan-llama"
    for i in (0, 3, 4, 6):  # CJK, emoji and a combining mark included: extracted, finite, fully weighted
        kv = store.read_sample(i).teachers[teacher]
        assert kv.status.tolist() == [0] and np.isfinite(kv.k).all() and np.all(kv.align_weight[:-1] == 1)
        assert kv.align_weight[-1] == 0  # but for the EOS the grid appends
        assert np.abs(kv.k).max() > 0
    nan = store.read_sample(5).teachers[teacher]  # the '§' row
    assert nan.status.tolist() == [1]
    assert np.all(nan.align_weight == 0) and np.all(nan.k == 0) and np.all(nan.v == 0)
    (quarantined,) = [q for s in store.complete_shards(teacher) for q in store.shard_marker(teacher, s)["quarantined"]]
    assert quarantined["sample_id"] == "bad/train/000005" and "non-finite" in quarantined["reason"]
    # The CKA calibration ran over the same samples; the non-finite one must not turn every entry into NaN.
    for name, (matrix, _) in store.cka(teacher).items():
        assert np.isfinite(matrix).all(), name

    info = kava("store", "info", str(path), "--json")
    assert info.returncode == 0, info.stderr
    data = json.loads(info.stdout)
    assert data["teachers"][teacher]["quarantined"] == 1
    assert data["samples_by_status"] == {"ok": 5, "truncated": 0, "skipped": 2}
    assert verify_store(path).ok


def test_too_long_samples_are_truncated_or_skipped(tmp_path, stories, bad_jsonl):
    extract(stories, tmp_path / "cut.zarr", dataset=str(bad_jsonl), max_length=40, **QUIET)
    cut = pd.read_parquet(tmp_path / "cut.zarr" / "index.parquet")
    extract(stories, tmp_path / "skip.zarr", dataset=str(bad_jsonl), max_length=40, on_too_long="skip", **QUIET)
    skip = pd.read_parquet(tmp_path / "skip.zarr" / "index.parquet")

    long = [i for i in range(len(BAD_ROWS)) if i not in (1, 2)]
    assert set(cut.loc[long, "status"]) <= {"truncated", "skipped"} and "truncated" in set(cut["status"])
    for _, row in cut.iterrows():
        assert row["num_tokens"] <= 40
        if row["status"] == "truncated":
            assert row["num_tokens"] > 0 and "tokens cut to" in row["reason"] and "segment boundary" in row["reason"]
    # The CJK question alone is longer than 40 stories tokens: no cut keeps the prompt, so it is skipped.
    assert cut.loc[3, "status"] == "skipped" and "> --max-length 40; no segment boundary" in cut.loc[3, "reason"]
    assert skip.loc[long, "status"].tolist() == ["skipped"] * len(long)
    assert all(r.endswith("> --max-length 40") for r in skip.loc[long, "reason"])
    assert skip["num_tokens"].sum() == 0

    store = KVStore.open(tmp_path / "cut.zarr")
    i = int(cut.index[cut["status"] == "truncated"][0])
    sample = store.read_sample(i)
    assert len(sample.input_ids) == cut.loc[i, "num_tokens"]
    assert np.isfinite(sample.teachers[STORIES_NAME].k).all() and 2 not in sample.segment_ids.tolist()


def test_on_nonfinite_error_stops_and_keeps_the_finished_shards(tmp_path, nan_llama, bad_jsonl):
    path = tmp_path / "kv.zarr"
    out = cli("extract", "--teacher", str(nan_llama), "--store", str(path), "--dataset", str(bad_jsonl),
              "--on-nonfinite", "error", *flags(shard_tokens=30, **QUIET))
    assert out.exit_code == 1
    assert "Sample 5 ('bad/train/000005')" in out.stderr and "non-finite" in out.stderr
    assert "--on-nonfinite quarantine" in out.stderr

    store = KVStore.open(path)
    nan_shard = store.shard_of(5)
    assert 0 < nan_shard < store.num_shards - 1
    assert store.complete_shards("nan-llama") == list(range(nan_shard))  # the ones before it were finished
    report = verify_store(path)
    incomplete = [p.where for p in report.problems]
    assert incomplete == [f"teachers/nan-llama/shards/{s:06d}" for s in range(nan_shard, store.num_shards)]
    assert all("incomplete" in p.message and "--resume" in p.message for p in report.problems)
    with pytest.raises(SampleError, match="non-finite"):  # the same data through the API
        extract(nan_llama, tmp_path / "api.zarr", dataset=str(bad_jsonl), shard_tokens=30, on_nonfinite="error",
                **QUIET)


# ---------------------------------------------------------------------------------------------------------------------
# 10: layer maps


def test_cka_layer_map_against_a_student(tmp_path, stories, tiny_llama):
    path = tmp_path / "kv.zarr"
    extract(stories, path, limit=6, shard_tokens=1024, layer_map="cka", student=str(tiny_llama), **QUIET)
    store = KVStore.open(path)
    spec = store.teacher(STORIES_NAME)
    assert spec.layer_map.method == "cka"
    assert spec.layer_map.details["estimator"] == "unbiased" and spec.layer_map.details["k"] == 2
    assert len(spec.layer_map.sources) == 3  # one entry per student layer
    for entry in spec.layer_map.sources:
        assert 1 <= len(entry) <= 2 and abs(sum(w for _, w in entry) - 1) < 1e-9
    used = sorted({layer for entry in spec.layer_map.sources for layer, _ in entry})
    assert list(spec.layers) == used  # only the mapped layers are stored
    assert store.read_sample(0).teachers[STORIES_NAME].k.shape[1] == len(used)

    cka = store.cka(STORIES_NAME)
    assert sorted(cka) == ["teacher_student_biased", "teacher_student_unbiased", "teacher_teacher_biased",
                           "teacher_teacher_unbiased"]
    for name, (matrix, attrs) in cka.items():
        estimator = name.rsplit("_", 1)[1]
        assert attrs["estimator"] == estimator and attrs["samples"] == 4 and attrs["tokens"] > 100
        assert matrix.shape == ((5, 5) if name.startswith("teacher_teacher") else (3, 5))
        assert np.isfinite(matrix).all()
        if name.startswith("teacher_teacher"):
            np.testing.assert_allclose(np.diag(matrix), 1.0, atol=1e-6)  # a layer is itself
    # The map is the top-2 teacher layers of each row of the stored unbiased matrix, weighted by their CKA.
    ts = cka["teacher_student_unbiased"][0]
    for row, entry in zip(ts, spec.layer_map.sources):
        best = np.argsort(-np.clip(row, 0, None), kind="stable")[:2]
        assert [layer for layer, _ in entry] == [int(b) for b in best if row[b] > 0]


def test_explicit_layer_map_stores_only_those_layers(tmp_path, stories):
    path = tmp_path / "kv.zarr"
    extract(stories, path, limit=6, shard_tokens=1024, layer_map="0,2,4", student_layers=3, **QUIET)
    store = KVStore.open(path)
    spec = store.teacher(STORIES_NAME)
    assert spec.layer_map.method == "explicit"
    assert spec.layer_map.sources == (((0, 1.0),), ((2, 1.0),), ((4, 1.0),))
    assert spec.layers == (0, 2, 4) and spec.num_layers == 5
    assert store.read_sample(0).teachers[STORIES_NAME].k.shape[1:] == (3, 4, 8)
    assert sorted(store.cka(STORIES_NAME)) == ["teacher_teacher_biased", "teacher_teacher_unbiased"]


def test_q_layers_outside_the_stored_layers_are_refused_before_registering(tmp_path, stories):
    path = tmp_path / "kv.zarr"
    options = dict(limit=6, shard_tokens=1024, layer_map="0,2,4", student_layers=3, with_q=True, **QUIET)
    out = cli("extract", "--teacher", str(stories), "--store", str(path), *flags(q_layers="1", **options))
    assert out.exit_code == 1
    assert "--q-layers" in out.stderr and "[0, 2, 4]" in out.stderr and "[1]" in out.stderr
    assert STORIES_NAME not in KVStore.open(path).teachers  # no half-registered teacher left behind
    extract(stories, path, q_layers="2", **options)  # the corrected command works on the same store
    assert KVStore.open(path).teacher(STORIES_NAME).q_layers == (2,)


# ---------------------------------------------------------------------------------------------------------------------
# 11: estimate


def test_estimate_prints_each_kv_dtype_and_a_time(stories):
    out = cli("estimate", "--teacher", str(stories), "--timed-samples", "4", *flags(limit=20, **QUIET))
    assert out.exit_code == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].startswith(f"teacher   {stories} (none): 5 layers (5 stored), 4 KV heads x 8")
    assert lines[1].startswith("data      synthetic:train: 20 samples")
    header = next(i for i, line in enumerate(lines) if line.startswith("kv dtype"))
    table = {line.split()[0]: line for line in lines[header + 1 : header + 5]}
    assert sorted(table) == ["bfloat16", "float16", "float32", "int8"]
    assert table["float16"].split()[1:3] == ["640.0", "B"]  # K+V: 2 × 5 layers × 4 heads × 8 dims × 2 bytes
    assert table["int8"].rstrip().endswith("no (~0.5%)") and table["float32"].rstrip().endswith("yes")
    assert any(line.startswith("predicted extraction time: ") and line.endswith(" s (forward passes only)")
               for line in lines)


def test_estimate_counts_the_stored_logits(stories):
    out = cli("estimate", "--teacher", str(stories), "--timed-samples", "2", "--json",
              *flags(limit=8, logit_top_k=128, **QUIET))
    assert out.exit_code == 0, out.stderr
    e = json.loads(out.stdout)
    assert e["logits"] == {"top_k": 128, "bytes_per_token": 768}  # an int32 id and a float16 log-prob each
    assert e["storage"][0]["bytes_per_token"] == 640 + 768


@pytest.mark.integration
def test_estimate_json_prints_only_json(stories):
    out = kava("estimate", "--teacher", str(stories), "--timed-samples", "4", "--json",
               *flags(limit=20, kv_dtype="int8", with_q=True, **QUIET))
    assert out.returncode == 0, out.stderr
    e = json.loads(out.stdout)
    assert [c["kv_dtype"] for c in e["storage"]] == ["float16", "bfloat16", "float32", "int8", "int4", "int2"]
    # int4, head_dim 8: K and Q half a byte a value + a float16 scale and zero per channel and 64 tokens; V half a
    # byte + one scale and zero per token and head (the writer's 430 B a token, `kava store info`)
    assert e["storage"][4]["bytes_per_token"] == 5 * 4 * (4 + 8 * 4 / 64) + 5 * 4 * (4 + 4) + 5 * 8 * (4 + 8 * 4 / 64)
    assert not e["storage"][4]["lossless"] and e["storage"][4]["compressed_ratio"] > 0.9
    store_tokens = e["student_tokens"]
    f16 = e["storage"][0]
    assert f16["bytes_per_token"] == 2 * 5 * 4 * 8 * 2 + 5 * 8 * 8 * 2  # K+V, plus Q on 5 layers × 8 heads
    assert f16["logical_bytes"] == f16["bytes_per_token"] * store_tokens
    assert e["samples"] == 20 and e["timed"]["samples"] == 4 and e["predicted_seconds"] > 0


# ---------------------------------------------------------------------------------------------------------------------
# --teacher-generates: the teacher writes its own reasoning; its rows are time-warped onto the student's text


def test_teacher_generates_warps_its_own_text_segment_by_segment(tmp_path, stories, ref_store):
    path = tmp_path / "kv.zarr"
    result = extract(stories, path, limit=4, shard_tokens=1024, batch_size=4, teacher_generates=True,
                     max_new_tokens=24, **QUIET)
    assert result.samples == 4
    store, ref = KVStore.open(path), KVStore.open(ref_store)
    spec = store.teacher(STORIES_NAME)
    assert spec.alignment["method"] == "time_warp" and spec.details["teacher_generates"] is True
    for i in range(4):
        warped = store.read_sample(i).teachers[STORIES_NAME]
        plain = ref.read_sample(i).teachers[STORIES_NAME]  # the same sample read with teacher forcing
        segments = store.read_sample(i).segment_ids
        prompt = segments == 0
        # The teacher read the same prompt (a causal model: the same keys and values there), and equal prompt
        # segments map one to one.
        np.testing.assert_array_equal(warped.align_weight[prompt], 1.0)
        np.testing.assert_allclose(warped.k[prompt], plain.k[prompt], rtol=2e-3, atol=2e-3)
        np.testing.assert_allclose(warped.v[prompt], plain.v[prompt], rtol=2e-3, atol=2e-3)
        # stories260K never writes "####": the student's answer tokens have no counterpart and weight 0.
        assert np.all(warped.align_weight[segments == 2] == 0)
        assert np.all((warped.align_weight >= 0) & (warped.align_weight <= 1))


def test_batched_generation_equals_one_prompt_at_a_time(stories_model, stories_tok):
    from kava.extract.teacher_pass import generate_reasoning

    texts = [f"Question: Tom has {n} apples and eats {n // 2}. How many are left?\nAnswer: x\n#### 1" for n in
             (4, 12, 130, 2048)]
    pieces = [{"reasoning": (t.index("Answer: ") + len("Answer: "), len(t) - 7)} for t in texts]
    batched = generate_reasoning(stories_model, stories_tok, texts, pieces, 16, "cpu")
    alone = [generate_reasoning(stories_model, stories_tok, [t], [p], 16, "cpu")[0] for t, p in zip(texts, pieces)]
    assert batched == alone
    assert all(b.startswith(t[: p["reasoning"][0]]) and len(b) > p["reasoning"][0] for b, t, p in
               zip(batched, texts, pieces))
