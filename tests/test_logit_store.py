"""Logit distillation end to end: the teacher's top-k written by a real extraction (checked against a naive per-sample
top-k of the teacher's own logits, on one tokenizer and across the real GPT-2 and Llama-2 tokenizers), the store's
round trip and verify, `kava store info`, and distillation runs whose first loss/logit is recomputed by hand."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from helpers import asset_path

from kava.core.errors import ConfigError, SchemaError
from kava.core.synthetic import synthetic_rows
from kava.distill.config import DistillConfig
from kava.distill.loader import LoaderConfig, StreamLoader, TeacherRequest
from kava.distill.trainer import run_distill
from kava.extract.align import token_spans
from kava.extract.config import ExtractConfig
from kava.extract.grid import tokenizer_fingerprint
from kava.extract.recipe import run_extract
from kava.extract.templates import TEMPLATES, format_row
from kava.kvstore import KVStore, LogitSpec, SampleError, TeacherSpec, verify_store
from kava.pipelines.cli import main

STORIES = "models/stories260K_hf_derived"
TEACHER = "stories260K_hf_derived"
TOP_K = 8
FAST = {"batch_size": 4, "progress": False, "checkpoint_every": 0}

ONE_TORCH_THREAD = True  # see conftest.one_torch_thread


def extract(teacher: Path | str, store: Path, **options: Any):
    opts = {"limit": 12, "shard_tokens": 1024, "batch_size": 4, "progress": False, "calibration_samples": 0,
            "logit_top_k": TOP_K, **options}
    cfg = ExtractConfig.from_dict(dict(teacher=str(teacher), store=str(store), **opts))
    return run_extract(cfg, log=lambda _: None)


def distill(out: Path, **options: Any):
    return run_distill(DistillConfig.from_dict(dict(out=str(out), **{**FAST, **options})), log=lambda _: None)


def metrics(out: Path) -> list[dict[str, float]]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def naive_top(model, ids: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The teacher alone on one sample: ``[T, k]`` ids and log-probabilities from its full logits."""
    with torch.no_grad():
        logits = model(torch.as_tensor(ids)[None]).logits[0].double()
    logp = torch.log_softmax(logits, -1)
    values, order = logp.sort(-1, descending=True)
    return order[:, :k].numpy(), values[:, :k].numpy()


def naive_rows(student_spans: np.ndarray, teacher_spans: np.ndarray) -> list[int]:
    """For each live student token the last live teacher token ending at the same character, by a loop."""
    out = []
    for s0, s1 in student_spans:
        match = -1
        for j, (t0, t1) in enumerate(teacher_spans):
            if s1 > s0 and t1 > t0 and t1 == s1:
                match = j
        out.append(match)
    return out


def check_against_teacher(store: KVStore, name: str, model, teacher_tok, student_tok) -> int:
    """Every sample's stored top-k equals the naive one at the teacher token ending with each student token (the
    fp16 log-probabilities within fp16 rounding); returns the number of -1 rows among live student tokens."""
    rows = synthetic_rows(store.num_samples)
    no_target = 0
    for i in range(store.num_samples):
        text = format_row(rows[i], TEMPLATES["plain"]).text
        t_ids, t_spans = token_spans(teacher_tok, text)
        s_ids, s_spans = token_spans(student_tok, text)
        got = store.read_sample(i, with_logits=True).teachers[name]
        assert got.logit_ids.dtype == np.int32 and got.logit_ids.shape == (len(s_ids) + 1, TOP_K)  # + the EOS
        assert (got.logit_ids[-1] == -1).all()  # the grid's EOS: zero-width, no target
        ref_ids, ref_logp = naive_top(model, t_ids, TOP_K)
        match = naive_rows(s_spans, t_spans)
        for t, j in enumerate(match):
            if j < 0:
                assert (got.logit_ids[t] == -1).all() and (got.logit_logp[t] == 0).all()
                no_target += s_spans[t, 1] > s_spans[t, 0]
                continue
            np.testing.assert_allclose(got.logit_logp[t], ref_logp[j], rtol=2 ** -10, atol=2e-3)
            # The batched forward differs from the lone one by ~1e-6: ids agree except between near-ties.
            close = np.abs(np.diff(ref_logp[j])) < 1e-4
            same = got.logit_ids[t] == ref_ids[j]
            assert same.all() or (~same <= np.r_[close, False] | np.r_[False, close]).all(), (i, t)
    return no_target


# ---------------------------------------------------------------------------------------------------------------------
# Stores


@pytest.fixture(scope="module")
def store(tmp_path_factory, stories) -> Path:
    """stories260K over 12 synthetic problems with its top-8 and Q, identity layer map, a few shards."""
    path = tmp_path_factory.mktemp("logits") / "kv.zarr"
    extract(stories, path, with_q=True)
    return path


def test_extraction_stores_each_sample_s_own_top_k(store, stories):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(stories).eval()
    tok = AutoTokenizer.from_pretrained(stories)
    kv = KVStore.open(store)
    spec = kv.teacher(TEACHER)
    assert spec.logits == LogitSpec(top_k=TOP_K, vocab_size=512, tokenizer_fingerprint=tokenizer_fingerprint(tok))
    assert spec.logits.tokenizer_fingerprint == kv.manifest.student_tokenizer.fingerprint
    # One tokenizer: only zero-width tokens ('▁' before a word, BOS, EOS) lack a row.
    assert check_against_teacher(kv, TEACHER, model, tok, tok) == 0
    assert verify_store(store).ok


def test_cross_tokenizer_rows_on_real_gpt2_and_llama2_tokenizers(tmp_path):
    """A tiny GPT-2 on the real GPT-2 tokenizer teaches a student grid cut by the real Llama-2 tokenizer: a student
    token takes the teacher's row where both end at the same character, and -1 where they cut differently.

    (A GPT-2 model: transformers loads a tokenizer saved next to a Qwen2 model as Qwen2's, which splits digits.)"""
    from transformers import AutoModelForCausalLM, AutoTokenizer, GPT2Config

    gpt2 = AutoTokenizer.from_pretrained(asset_path("tokenizers/gpt2"))
    llama2_dir = asset_path("tokenizers/llama2")
    llama2 = AutoTokenizer.from_pretrained(llama2_dir)
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=len(gpt2), n_embd=32, n_layer=2, n_head=4, n_positions=512)
    model_dir = tmp_path / "gpt2"
    AutoModelForCausalLM.from_config(config).save_pretrained(model_dir)
    gpt2.save_pretrained(model_dir)
    extract(model_dir, tmp_path / "kv.zarr", limit=4, student_tokenizer=str(llama2_dir), student_layers=2)

    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    teacher_tok = AutoTokenizer.from_pretrained(model_dir)  # what the extraction read with
    kv = KVStore.open(tmp_path / "kv.zarr")
    spec = kv.teacher("gpt2")
    assert spec.logits.tokenizer_fingerprint == tokenizer_fingerprint(gpt2) != kv.manifest.student_tokenizer.fingerprint
    assert spec.logits.vocab_size == len(gpt2)
    assert check_against_teacher(kv, "gpt2", model, teacher_tok, llama2) > 0  # the two cut some words differently
    ids = np.concatenate([kv.read_sample(i, with_logits=True).teachers["gpt2"].logit_ids
                          for i in range(kv.num_samples)])
    assert (ids[:, 0] >= 0).mean() > 0.5  # most boundaries are shared (spaces, digits, newlines)


def test_store_round_trip_verify_and_a_corrupted_logit_chunk(tmp_path, store):
    copy = tmp_path / "kv.zarr"
    shutil.copytree(store, copy)
    kv = KVStore.open(copy)
    whole = kv.read_shard(1, with_logits=True).teachers[TEACHER]
    only = kv.read_shard(1, with_logits=True, with_kv=False).teachers[TEACHER]
    assert only.k.shape == (len(whole.k), 0, 4, 8) and only.layers == ()
    np.testing.assert_array_equal(only.logit_ids, whole.logit_ids)
    np.testing.assert_array_equal(only.logit_logp, whole.logit_logp)
    assert whole.logit_logp.dtype == np.float32
    live = whole.logit_ids[:, 0] >= 0
    assert (np.diff(whole.logit_logp[live], axis=1) <= 0).all()  # sorted, largest first
    assert (whole.logit_logp[live] <= 0).all() and (np.exp(whole.logit_logp[live]).sum(1) <= 1.001).all()
    assert kv.read_shard(1).teachers[TEACHER].logit_ids is None  # not asked for, not read

    chunk = next(p for p in (copy / f"teachers/{TEACHER}/shards/000001/logit_logp").rglob("*")
                 if p.is_file() and p.name != "zarr.json")
    data = bytearray(chunk.read_bytes())
    data[len(data) // 2] ^= 0xFF
    chunk.write_bytes(bytes(data))
    report = verify_store(copy)
    assert not report.ok
    assert any("logit_logp" in p.where and "crc32c" in p.message and "shard 1" in p.message
               for p in report.problems), report.problems


def test_writer_refuses_bad_logits(tmp_path):
    from test_store import make_store, teacher_spec

    kv = make_store(tmp_path / "kv.zarr")
    spec: TeacherSpec = teacher_spec("L", with_q=False, logits=LogitSpec(top_k=2, vocab_size=10,
                                                                         tokenizer_fingerprint="x"))
    kv.add_teacher(spec)
    assert kv.teacher("L").logits == spec.logits
    assert TeacherSpec.from_dict(spec.to_dict()) == spec and "logits" not in teacher_spec("M").to_dict()
    n = int(kv.offsets[1])
    w = kv.shard_writer("L", 0)
    kv_shape = (n, len(spec.layers), spec.kv_heads, spec.head_dim)
    zeros = np.zeros(kv_shape, np.float32)
    with pytest.raises(SampleError, match=r"stores its top-2 logits; pass logits=\(ids, logp\)"):
        w.add(zeros, zeros)
    with pytest.raises(SampleError, match=rf"logit ids: expected shape \({n}, 2\) \[tokens, top_k\]. Got"):
        w.add(zeros, zeros, logits=(np.zeros((n, 3), np.int64), np.zeros((n, 3), np.float32)))
    bad = np.zeros((n, 2), np.int64)
    bad[0] = [3, 10]
    with pytest.raises(SampleError, match=r"expected each row's ids in \[0, 10\) or all -1 \(no target\). "
                                          r"Got \[3, 10\] at token 0"):
        w.add(zeros, zeros, logits=(bad, np.zeros((n, 2), np.float32)))
    with pytest.raises(SchemaError, match="logits.top_k: expected top_k at most vocab_size 10. Got 11 instead"):
        LogitSpec(top_k=11, vocab_size=10, tokenizer_fingerprint="x")
    with pytest.raises(SchemaError, match=r"teachers/A.logits.top_k: expected an integer >= 1. Got 0 instead"):
        TeacherSpec.from_dict({**teacher_spec("A").to_dict(),
                               "logits": {"top_k": 0, "vocab_size": 5, "tokenizer_fingerprint": "x"}})


def test_store_info_shows_the_logits_and_bytes_per_token(store):
    result = CliRunner().invoke(main, ["store", "info", str(store)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "logits    top 8 of 512" in result.output and "48 B per token" in result.output
    info = json.loads(CliRunner().invoke(main, ["store", "info", str(store), "--json"]).stdout)
    t = info["teachers"][TEACHER]
    assert t["logits"]["top_k"] == TOP_K and t["logits"]["bytes_per_token"] == 48
    # K and V: 5 layers x 4 heads x 8 dims x 2 bytes each; Q: 5 x 8 heads x 8 x 2; plus the top-8.
    assert t["bytes_per_token"] == 2 * 5 * 4 * 8 * 2 + 5 * 8 * 8 * 2 + 48
    assert f"per token {t['bytes_per_token']:,.0f} B logical" in result.output


# ---------------------------------------------------------------------------------------------------------------------
# Distillation


def hand_logit_loss(store_path: Path, student_dir: Path, samples: list[int]) -> float:
    """loss/logit of a batch from the stored arrays and the student's own logits, sample by sample, with KL over
    the teacher's top-k plus a tail bucket written out in float64."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(student_dir).eval()
    kv = KVStore.open(store_path)
    total = count = 0.0
    for i in samples:
        rows = kv.read_sample(int(i), with_logits=True)
        top = rows.teachers[TEACHER]
        with torch.no_grad():
            s_logp = torch.log_softmax(model(torch.as_tensor(rows.input_ids, dtype=torch.long)[None]).logits[0]
                                       .double(), -1).numpy()
        completion = np.maximum.accumulate(np.isin(rows.segment_ids, (1, 2)))  # from the first reasoning token on
        for t in range(len(rows.input_ids) - 1):
            if top.logit_ids[t, 0] < 0 or not completion[t + 1]:
                continue
            p_log = top.logit_logp[t].astype(np.float64)
            p = np.exp(p_log)
            q_log = s_logp[t, top.logit_ids[t]]
            kl = (p * (p_log - q_log)).sum()
            p_tail, q_tail = max(0.0, 1 - p.sum()), max(0.0, 1 - np.exp(q_log).sum())
            if p_tail > 0:
                kl += p_tail * (np.log(max(p_tail, 1e-6)) - np.log(max(q_tail, 1e-6)))
            total += max(kl, 0.0)
            count += 1
    return total / count


@pytest.fixture(scope="module")
def student_dir(tmp_path_factory, stories) -> Path:
    """A seeded 5-layer Llama on the stories tokenizer (the store's student tokenizer), saved and loaded back."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

    tok = AutoTokenizer.from_pretrained(stories)
    torch.manual_seed(3)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=5,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024)
    path = tmp_path_factory.mktemp("student") / "llama"
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def first_batch(store: Path, **loader: Any) -> list[int]:
    request = (TeacherRequest(TEACHER, with_kv=False, with_logits=True),)
    batch = next(iter(StreamLoader(LoaderConfig(store=str(store), teachers=request, **loader), epochs=1)))
    return batch.sample_indices.tolist()


def test_first_logit_loss_equals_a_hand_computation(tmp_path, store, student_dir):
    distill(tmp_path / "kd", student=str(student_dir), store=str(store), loss="mercator", logit_weight=0.5,
            steps=2, batch_size=4, seed=0)
    first = metrics(tmp_path / "kd")[0]
    want = hand_logit_loss(store, student_dir, first_batch(store, batch_size=4, seed=0))
    assert first["loss/logit"] == pytest.approx(want, rel=1e-4)
    assert first["loss/total"] == pytest.approx(first["loss/ce"] + first["loss/kv"] + 0.5 * first["loss/logit"],
                                                rel=1e-5)
    assert json.loads((tmp_path / "kd" / "kava.json").read_text())["logit_teachers"] == [TEACHER]


def test_the_teacher_as_its_own_student_has_zero_logit_loss(tmp_path, store, stories):
    distill(tmp_path / "self", student=str(stories), store=str(store), kv_weight=0, logit_weight=1.0, steps=1)
    assert metrics(tmp_path / "self")[0]["loss/logit"] < 1e-4  # fp16 rounding of the stored log-probabilities


def test_logit_only_run_reads_no_k_v(tmp_path, store):
    """The store's K/V and Q arrays are deleted: a logit-only run still trains; a K/V run can't."""
    copy = tmp_path / "kv.zarr"
    shutil.copytree(store, copy)
    for shard in (p for p in (copy / f"teachers/{TEACHER}/shards").iterdir() if p.is_dir()):
        for name in ("k", "v", "q"):
            shutil.rmtree(shard / name)
    distill(tmp_path / "logit", student="tiny-qwen2", store=str(copy), kv_weight=0, logit_weight=1.0, steps=3)
    rows = metrics(tmp_path / "logit")
    assert len(rows) == 3 and all("loss/logit" in m and "loss/kv" not in m for m in rows)
    assert rows[0]["loss/total"] == pytest.approx(rows[0]["loss/ce"] + rows[0]["loss/logit"], rel=1e-5)
    with pytest.raises(SchemaError, match=r"expected an array at 'teachers/stories260K_hf_derived/shards/\d+/k'. "
                                          "It is missing"):
        distill(tmp_path / "kv", student="tiny-qwen2", store=str(copy), logit_weight=1.0, steps=1)


def test_refusals_name_the_fix(tmp_path, stories):
    no_logits = tmp_path / "plain.zarr"
    extract(stories, no_logits, limit=4, logit_top_k=0)
    with pytest.raises(SchemaError, match=r"expected teacher 'stories260K_hf_derived' to store its top-k logits "
                                          r"for --logit-weight 1.0. Got none instead. Re-extract it with "
                                          r"--logit-top-k K"):
        distill(tmp_path / "o", student="tiny-qwen2", store=str(no_logits), kv_weight=0, logit_weight=1.0, steps=1)
    with pytest.raises(ConfigError, match="--logit-weight needs --store"):
        DistillConfig(student="tiny-qwen2", out="o", logit_weight=1.0).validate()
    with pytest.raises(ConfigError, match="--logit-weight: expected a finite number >= 0. Got -1"):
        DistillConfig(student="tiny-qwen2", out="o", store="s", logit_weight=-1).validate()
    with pytest.raises(ConfigError, match="--logit-top-k: expected an integer >= 0. Got -2"):
        ExtractConfig(teacher="t", store="s", logit_top_k=-2).validate()
    with pytest.raises(ConfigError, match="--logit-top-k: expected at most the teacher's vocabulary size 512. "
                                          "Got 513 instead"):
        extract(stories, tmp_path / "big.zarr", limit=4, logit_top_k=513)
    with pytest.raises(SchemaError, match=r"Expected stored logits for teacher 'stories260K_hf_derived' "
                                          r"\(with_logits\). Got none instead"):
        StreamLoader(LoaderConfig(store=str(no_logits), teachers=(TeacherRequest(TEACHER, with_logits=True),)))


def test_resume_compares_the_new_field(tmp_path, store):
    """A checkpoint written before --logit-weight existed resumes (it had the default); a changed weight does not."""
    out = tmp_path / "run"
    common = dict(student="tiny-qwen2", store=str(store), kv_weight=0, steps=2, checkpoint_every=1)
    distill(out, **common)
    for state in out.glob("checkpoints/*/state.json"):
        meta = json.loads(state.read_text())
        del meta["config"]["logit_weight"]
        state.write_text(json.dumps(meta))
    distill(out, **common, resume=True)
    with pytest.raises(ConfigError, match=r"--logit-weight: 0.0 in the checkpoint, 1.0 now"):
        distill(out, **common, logit_weight=1.0, resume=True)
