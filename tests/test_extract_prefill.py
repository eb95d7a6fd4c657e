"""`kava extract --kv-budget M --prefill-chunk C`: the teacher runs chunk by chunk with a cache cut to M rows of the
evicted segments after each chunk (:mod:`kava.extract.prefill`). Checked against the single full pass where nothing
is evicted (real stories260K, and tiny Qwen2/Qwen3/GPT-2 built from configs), against the single pass's streaming
rule (which needs no scores, so its choice is the same), for the rows a layer's cache ever holds on a sample many
times the budget, as a newcomer's wrong flags, and end to end into a store that verifies."""

from __future__ import annotations

import subprocess

import numpy as np
import pytest
import torch
import transformers
from helpers import ENV, KAVA, asset_path
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.cache_utils import DynamicLayer

from kava.core.data import DataSource
from kava.core.errors import ConfigError
from kava.extract.capture import capture_qkv
from kava.extract.config import ExtractConfig
from kava.extract.evict import evict_sample
from kava.extract.grid import build_grid
from kava.extract.logits import topk_logprobs
from kava.extract.prefill import chunked_prefill
from kava.extract.recipe import run_extract
from kava.extract.templates import load_template
from kava.kvstore import EvictionSpec, KVStore, verify_store
from kava.kvstore.eviction import kept_problem

ONE_TORCH_THREAD = True  # see conftest.one_torch_thread
QUIET = {"progress": False, "calibration_samples": 0}
EVERYTHING = 100_000
"""A budget no sample reaches: nothing is evicted."""

SMALL = dict(vocab_size=512, bos_token_id=1, eos_token_id=2, pad_token_id=0, max_position_embeddings=512,
             hidden_size=32, intermediate_size=64, num_hidden_layers=3)
TINY = {
    "qwen2": ("Qwen2Config", dict(num_attention_heads=4, num_key_value_heads=2, **SMALL)),  # GQA, q/k/v biases
    "qwen3": ("Qwen3Config", dict(num_attention_heads=4, num_key_value_heads=2, head_dim=16, **SMALL)),  # q/k norms
    "gpt2": ("GPT2Config", dict(n_layer=3, n_head=4, n_embd=32, n_positions=512, vocab_size=512, bos_token_id=1,
                                eos_token_id=2)),  # no RoPE: learned positions from position_ids
}


@pytest.fixture(scope="module")
def stories():
    path = asset_path("models/stories260K_hf_derived")
    return AutoModelForCausalLM.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)


@pytest.fixture(scope="module")
def samples(stories):
    """GSM8K test rows on the stories260K tokenizer's grid: (teacher tokens, their segment ids), the EOS the grid
    appends left off (no teacher reads it). 150-400 tokens each, 60-260 of them reasoning."""
    rows = DataSource(dataset="gsm8k", split="test", data_files=str(asset_path("gsm8k/test.jsonl")), limit=3).load()
    grid = build_grid(rows, stories[1], load_template("plain"), max_length=4096, on_too_long="truncate")
    return [(torch.as_tensor(g.input_ids[:-1]), torch.as_tensor(g.segment_ids[:-1])) for g in grid]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """name -> a tiny teacher built from its config with a fixed seed, saved and loaded back as users load one."""
    models = {}
    for name, (config_cls, kwargs) in TINY.items():
        torch.manual_seed(0)
        path = tmp_path_factory.mktemp(name)
        AutoModelForCausalLM.from_config(getattr(transformers, config_cls)(**kwargs)).save_pretrained(path)
        models[name] = AutoModelForCausalLM.from_pretrained(path).eval()
    return models


def single_pass(model, ids, layers, q_layers, k_rope):
    """The single full pass's K/V ``[T, L, H, D]`` and Q ``[T, Lq, Hq, D]`` of ``ids`` ``[T]``."""
    cap = capture_qkv(model, ids[None], layers=layers, with_q=list(q_layers) or False, k_rope=k_rope)

    def stack(per_layer, which):
        return torch.stack([per_layer[l][0] for l in which], dim=0).permute(2, 0, 1, 3).float()

    return stack(cap.keys, layers), stack(cap.values, layers), stack(cap.queries, q_layers) if q_layers else None


@pytest.mark.parametrize(("name", "k_rope", "chunk"), [("stories260K", "pre", 7), ("stories260K", "post", 64),
                                                       ("qwen2", "pre", 5), ("qwen3", "post", 9), ("gpt2", "pre", 8)])
def test_nothing_evicted_is_the_single_pass(stories, samples, tiny, name, k_rope, chunk):
    model = stories[0] if name == "stories260K" else tiny[name]
    ids, seg = samples[1]
    layers, q_layers = [0, 2], [2]
    got = chunked_prefill(model, ids, seg, EvictionSpec(rule="r-kv", budget=EVERYTHING), chunk=chunk,
                          layers=layers, q_layers=q_layers, k_rope=k_rope, logit_top_k=4)
    k, v, q = single_pass(model, ids, layers, q_layers, k_rope)
    t = len(ids)
    np.testing.assert_array_equal(got.kept.numpy(), np.broadcast_to(np.arange(t)[:, None, None], got.kept.shape))
    torch.testing.assert_close(got.k, k, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(got.v, v, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(got.q, q, rtol=1e-4, atol=1e-4)
    assert got.fidelity.tolist() == [0.0, 0.0] and got.peak_rows == t
    with torch.no_grad():
        top_ids, top_logp = topk_logprobs(model(input_ids=ids[None]).logits[0], 4)
    torch.testing.assert_close(got.logits[1], top_logp, rtol=1e-4, atol=1e-4)
    assert (got.logits[0] == top_ids).float().mean() > 0.99  # near-ties may swap order
    # And what the single pass's own eviction writes at a budget that keeps everything.
    ev = evict_sample(k, v, q if q_layers == layers else single_pass(model, ids, layers, layers, k_rope)[2], seg,
                      EvictionSpec(rule="r-kv", budget=EVERYTHING), rope=None, k_rope="post", sample=0)
    np.testing.assert_array_equal(got.kept.numpy(), ev.kept.numpy())


def test_streaming_keeps_what_the_single_pass_keeps(stories, samples):
    """Streaming needs no scores: chunked or not, it keeps the segment's first 4 and its most recent rows, and the
    first layer's K/V (computed from the tokens alone) are the single pass's."""
    model, _ = stories
    ids, seg = samples[0]
    spec = EvictionSpec(rule="streaming", budget=12)
    layers = [0, 1, 4]
    got = chunked_prefill(model, ids, seg, spec, chunk=10, layers=layers)
    k, v, q = single_pass(model, ids, layers, layers, "pre")
    want = evict_sample(k, v, q, seg, spec, rope=None, k_rope="post", sample=0)
    np.testing.assert_array_equal(got.kept.numpy(), want.kept.numpy())
    torch.testing.assert_close(got.k[:, 0], want.k[:, 0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got.v[:, 0], want.v[:, 0], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(got.k[:, 2], want.k[:, 2])  # deeper layers read the cut cache: another teacher


@pytest.mark.parametrize(("rule", "segments"), [("r-kv", ("prompt", "reasoning", "answer")),
                                                ("attention", ("reasoning",)), ("random", ("prompt", "reasoning")),
                                                ("r-kv", ("prompt", "answer"))])
def test_a_sample_many_times_the_budget_holds_at_most_budget_whole_rows_and_a_chunk(stories, samples, monkeypatch,
                                                                                  rule, segments):
    model, _ = stories
    ids, seg = samples[2]  # 398 tokens, 263 of them reasoning
    budget, chunk = 16, 8
    held: list[int] = []  # rows of a layer's cache right after each update, i.e. during the chunk's attention
    update = DynamicLayer.update

    def counting(self, *args, **kwargs):
        out = update(self, *args, **kwargs)
        held.append(self.keys.shape[-2])
        return out

    monkeypatch.setattr(DynamicLayer, "update", counting)
    spec = EvictionSpec(rule=rule, budget=budget, segments=segments)
    got = chunked_prefill(model, ids, seg, spec, chunk=chunk, layers=list(range(5)), q_layers=[3])
    inside = np.isin(seg.numpy(), spec.segment_ids)
    whole, t = int((~inside).sum()), len(ids)
    assert t >= 16 * budget and inside.sum() >= 8 * budget
    assert len(held) == 5 * -(-t // chunk)  # every layer, every chunk
    assert max(held) == got.peak_rows <= budget + whole + chunk
    # Per chunk: the budget, the whole rows seen so far, the chunk.
    for step, rows in enumerate(held[::5]):
        end = min(t, (step + 1) * chunk)
        assert rows <= budget + int((~inside[:end]).sum()) + chunk
    assert got.kept.shape == (whole + budget, 5, 4)
    assert kept_problem(got.kept.numpy(), t, ~inside) is None  # increasing, in range, every whole row kept
    kept_inside = inside[got.kept.numpy()]  # [M, L, H]
    assert (kept_inside.sum(axis=0) == budget).all()
    assert got.q.shape == (whole + budget, 1, 8, 8) and torch.isfinite(got.k).all()
    assert ((got.fidelity > 0) & (got.fidelity < 1.5)).all()


@pytest.mark.parametrize("rule", ["r-kv", "random"])
def test_heads_that_keep_other_rows_each_keep_the_budget(stories, rule):
    """Segments in alternating blocks: each head keeps its own reasoning rows, so the rows it holds interleave the
    whole rows unlike its neighbours', and the rule runs head by head."""
    model, _ = stories
    torch.manual_seed(0)
    t, budget = 200, 12
    ids = torch.randint(3, 500, (t,))
    seg = torch.as_tensor((np.arange(t) // 10) % 2)  # 10 prompt, 10 reasoning, 10 prompt, ...
    seg[-6:] = 2
    got = chunked_prefill(model, ids, seg, EvictionSpec(rule=rule, budget=budget), chunk=8, layers=[0, 4])
    inside = (seg == 1).numpy()
    kept = got.kept.numpy()  # [M, L, H]
    assert kept_problem(kept, t, ~inside) is None
    assert (inside[kept].sum(axis=0) == budget).all()
    assert any(not np.array_equal(kept[:, 1, 0], kept[:, 1, h]) for h in range(1, 4))


def test_wrong_flags_are_refused_with_their_fix():
    def problems(**options):
        with pytest.raises(ConfigError) as e:
            ExtractConfig.from_dict(dict(teacher="t", store="s", **options)).validate()
        return str(e.value)

    assert "--prefill-chunk needs --kv-budget as a count of rows ('--kv-budget 512')" in problems(prefill_chunk=64)
    with pytest.raises(ConfigError, match=r"--prefill-chunk needs --kv-budget as a count of rows \('512'\), not a "
                                          r"fraction.*Got '0.25' instead"):
        ExtractConfig.from_dict(dict(teacher="t", store="s", kv_budget="0.25", prefill_chunk=64)).validate()
    with pytest.raises(ConfigError, match=r"--prefill-chunk: expected an integer >= 1 \(tokens per forward pass\). "
                                          r"Got 0 instead"):
        ExtractConfig.from_dict(dict(teacher="t", store="s", kv_budget="64", prefill_chunk=0)).validate()
    every = problems(kv_budget="64", prefill_chunk=-3, teacher_generates=True, prompt_template="chat",
                     evict_segments="reasoning,special")
    for phrase in ("Got -3 instead", "Can't set both --prefill-chunk and --teacher-generates",
                   "drop --prompt-template", "--prefill-chunk with --evict-segments special"):
        assert phrase in every
    assert "Found 4 problems" in every
    ok = ExtractConfig.from_dict(dict(teacher="t", store="s", kv_budget="64", prefill_chunk=32))
    ok.validate()
    assert ok.prefill_chunk == 32 and ok.to_dict()["prefill_chunk"] == 32
    with pytest.raises(ConfigError, match=r"--prefill-chunk needs --kv-budget as a count"):
        chunked_prefill(None, torch.zeros(4), torch.zeros(4), EvictionSpec(rule="r-kv", budget=0.5), chunk=4,
                        layers=[0])


def test_another_student_tokenizer_is_refused_before_the_store_exists(tmp_path):
    stories = asset_path("models/stories260K_hf_derived")
    cfg = ExtractConfig.from_dict(dict(teacher=str(stories), store=str(tmp_path / "kv.zarr"), limit=2,
                                       kv_budget="16", prefill_chunk=8,
                                       student_tokenizer=str(asset_path("tokenizers/gpt2")), **QUIET))
    with pytest.raises(ConfigError, match=r"--prefill-chunk needs the teacher's own tokenizer as the student's: "
                                          r"--student-tokenizer .*gpt2 differs.*Drop --student-tokenizer"):
        run_extract(cfg, log=lambda _: None)
    assert not (tmp_path / "kv.zarr").exists()


def test_extract_writes_what_a_single_pass_writes_when_nothing_is_evicted(tmp_path):
    """In process, into one store: a single pass and a chunked pass that keep everything write the same rows; a
    chunked pass under a tight budget writes a compressed teacher that verifies."""
    stories = asset_path("models/stories260K_hf_derived")
    common = dict(teacher=str(stories), store=str(tmp_path / "kv.zarr"), dataset="gsm8k", split="test",
                  data_files=str(asset_path("gsm8k/test.jsonl")), limit=3, kv_dtype="float32", with_q=True,
                  q_layers="4", logit_top_k=3, **QUIET)
    for name, options in (("single", {}), ("chunked", dict(prefill_chunk=16)),
                          ("tight", dict(kv_budget="8", prefill_chunk=16))):
        run_extract(ExtractConfig.from_dict(dict(common, name=name, **{"kv_budget": str(EVERYTHING), **options})),
                    log=lambda _: None)
    store = KVStore.open(tmp_path / "kv.zarr")
    assert store.teacher("chunked").details["prefill_chunk"] == 16 and "prefill_chunk" not in store.teacher(
        "single").details
    for i in range(store.num_samples):
        rows = store.read_sample(i, teachers=["single", "chunked", "tight"], with_q=True, with_logits=True)
        one, chunked, tight = (rows.teachers[n] for n in ("single", "chunked", "tight"))
        np.testing.assert_array_equal(chunked.kept, one.kept)
        for array in ("k", "v", "q"):
            np.testing.assert_allclose(getattr(chunked, array), getattr(one, array), rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(chunked.logit_logp, one.logit_logp, rtol=1e-3, atol=1e-3)
        seg = rows.segment_ids
        assert len(tight.kept) == len(seg) - (seg == 1).sum() + 8
        assert tight.kept[-1].tolist() == [[len(seg) - 1] * 4] * 5  # the grid's EOS, which no teacher reads
    report = verify_store(tmp_path / "kv.zarr")
    assert not report.problems and report.shards_complete["tight"] == store.num_shards


@pytest.mark.integration
def test_cli_extract_then_verify(tmp_path):
    stories = asset_path("models/stories260K_hf_derived")
    store = tmp_path / "kv.zarr"
    done = subprocess.run([*KAVA, "extract", "--teacher", str(stories), "--store", str(store), "--dataset", "gsm8k",
                           "--split", "test", "--data-files", str(asset_path("gsm8k/test.jsonl")), "--limit", "4",
                           "--no-progress", "--calibration-samples", "0", "--kv-budget", "16", "--prefill-chunk",
                           "32", "--evict", "attention"], capture_output=True, text=True, env=ENV, timeout=300)
    assert done.returncode == 0, done.stderr
    verify = subprocess.run([*KAVA, "store", "verify", str(store)], capture_output=True, text=True, env=ENV,
                            timeout=120)
    assert verify.returncode == 0, verify.stdout + verify.stderr
    wrong = subprocess.run([*KAVA, "extract", "--teacher", str(stories), "--store", str(tmp_path / "no.zarr"),
                            "--prefill-chunk", "32", "--kv-budget", "0.5"], capture_output=True, text=True, env=ENV,
                           timeout=120)
    assert wrong.returncode != 0 and "--prefill-chunk needs --kv-budget as a count of rows" in wrong.stderr
