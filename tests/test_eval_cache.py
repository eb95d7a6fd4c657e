"""`kava eval --cache sinks=S,window=W`: greedy generation whose attention reads only a bounded cache, checked
against the full cache where nothing is evicted, against two slow references where it is, batched against one at a
time, and through the command line."""

from __future__ import annotations

import json
import re
import subprocess

import pytest
import torch
from helpers import ENV, KAVA, asset_path
from test_evaluate import CHAIN, _forced_model

from kava.core.data import load_rows
from kava.core.errors import ConfigError
from kava.core.padding import left_pad
from kava.distill.evaluate import CacheBound, EvalConfig, generate_batched, generate_bounded, generate_with_stops
from kava.distill.evaluate import prompt_text as row_prompt
from kava.distill.evaluate.cache import check_model
from kava.extract.templates import TEMPLATES

ONE_TORCH_THREAD = True  # see conftest.one_torch_thread; greedy decoding is hundreds of tiny forwards
EOS = 2  # stories260K's EOS, also its pad (the tokenizer has no pad token)


@pytest.fixture(scope="module")
def stories_model(stories):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(stories).eval(), AutoTokenizer.from_pretrained(stories)


@pytest.fixture(scope="module")
def gsm8k_prompts():
    rows = load_rows("gsm8k", split="test", data_files=asset_path("gsm8k/test.jsonl"), limit=8)
    return [row_prompt(row, TEMPLATES["plain"]) for row in rows]


@pytest.fixture(scope="module")
def tiny_qwen(tmp_path_factory):
    """A seeded tiny Qwen2 (GQA: 4 query heads, 2 KV heads) with eager attention, saved and loaded back."""
    from transformers import AutoModelForCausalLM, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    path = tmp_path_factory.mktemp("tiny_qwen2")
    Qwen2ForCausalLM(config).save_pretrained(path)
    return AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager").eval()


def _visible(query: int, key: int, bound: CacheBound) -> bool:
    """The definition (cache module docstring): position ``query`` reads position ``key``."""
    return key <= query and (key < bound.sinks or key >= query - bound.window)


def reference_from_scratch(model, prompt: list[int], bound: CacheBound, steps: int) -> list[int]:
    """No cache at all: every step runs the model over the whole sequence so far, each token reading exactly what the
    definition lets it read (a mask written out entry by entry), at its true position; the argmax of the last."""
    tokens = list(prompt)
    for _ in range(steps):
        n = len(tokens)
        mask = torch.full((1, 1, n, n), torch.finfo(torch.float32).min)
        for q in range(n):
            for k in range(n):
                if _visible(q, k, bound):
                    mask[0, 0, q, k] = 0.0
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([tokens]), attention_mask=mask,
                           position_ids=torch.arange(n)[None], use_cache=False).logits
        tokens.append(int(logits[0, -1].argmax()))
    return tokens[len(prompt) :]


def reference_token_by_token(model, prompt: list[int], bound: CacheBound, steps: int) -> list[int]:
    """One token per forward (the prompt's too), no mask of ours: the model's own cache, trimmed by hand after every
    forward to the first ``sinks`` and the last ``window`` entries of every layer, at true positions."""
    from transformers import DynamicCache

    cache, tokens, out = DynamicCache(), list(prompt), []
    with torch.no_grad():
        for position in range(len(prompt) + steps - 1):
            logits = model(input_ids=torch.tensor([[tokens[position]]]), position_ids=torch.tensor([[position]]),
                           cache=cache, use_cache=True).logits
            for layer in cache.layers:
                if layer.keys.shape[2] > bound.sinks + bound.window:
                    layer.keys = torch.cat([layer.keys[:, :, : bound.sinks], layer.keys[:, :, -bound.window :]], 2)
                    layer.values = torch.cat([layer.values[:, :, : bound.sinks],
                                              layer.values[:, :, -bound.window :]], 2)
            if position >= len(prompt) - 1:
                out.append(int(logits[0, -1].argmax()))
                tokens.append(out[-1])
    return out


def _bounded(model, prompts: list[list[int]], bound: CacheBound, steps: int, **kwargs) -> list[list[int]]:
    """Generated tokens per prompt, all prompts in one left-padded batch, no stop but the budget."""
    ids, mask = left_pad(prompts, EOS)
    with torch.no_grad():
        out = generate_bounded(model, ids, mask, bound=bound, max_new_tokens=steps, pad_token_id=EOS,
                               eos_token_ids=[-1], **kwargs)  # -1: no id stops a row
    return out[:, ids.shape[1] :].tolist()


# ---------------------------------------------------------------------------------------------------------------------
# The option


@pytest.mark.parametrize("value", ["sinks=x", "window=0", "sinks=4", "window=8", "sinks=-1,window=8",
                                   "sinks=4,window=0", "sinks=4;window=8", "sinks=4,window=8,window=9",
                                   "sinks=4,window=8,extra=1", "sinks=4,window=8.5", "", "4,8"])
def test_bad_cache_values_are_refused(value):
    expected = f"--cache: expected sinks=S,window=W with S >= 0 and W >= 1. Got {value!r} instead."
    with pytest.raises(ConfigError, match=f"^{re.escape(expected)}$"):
        CacheBound.parse(value)
    with pytest.raises(ConfigError, match=r"(?s)Found 2 problems.*--batch-size.*--cache: expected sinks=S,window=W"):
        EvalConfig(model="m", batch_size=0, cache=value).validate()
    with pytest.raises(ConfigError, match="--cache: expected"):
        CacheBound(-1, 8)


def test_good_cache_values_parse():
    assert CacheBound.parse("sinks=4,window=16") == CacheBound(4, 16)
    assert CacheBound.parse(" window=8 , sinks=0") == CacheBound(0, 8)
    assert str(CacheBound.parse("window=8,sinks=2")) == "sinks=2,window=8"
    EvalConfig(model="m", cache="sinks=0,window=1").validate()
    assert EvalConfig.from_dict({"model": "m", "cache": "sinks=1,window=2"}).cache == "sinks=1,window=2"


def test_models_the_mask_cannot_bound_are_refused():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, use_sliding_window=True, sliding_window=4,
                         max_window_layers=1)
    with pytest.raises(ConfigError, match="--cache: expected a model whose every layer has full attention. Got "
                                          "layer types sliding_attention instead"):
        check_model(Qwen2ForCausalLM(config))
    model = Qwen2ForCausalLM(Qwen2Config(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1))
    check_model(model)
    model.config._attn_implementation = "flash_attention_2"  # set after loading: flash-attn is not installed here
    with pytest.raises(ConfigError, match="--cache: expected a model with eager or sdpa attention"):
        check_model(model)


# ---------------------------------------------------------------------------------------------------------------------
# Nothing evicted: the full cache's generation, exactly


def test_a_bound_that_evicts_nothing_equals_the_full_cache(stories_model, gsm8k_prompts):
    model, tok = stories_model
    prompts = gsm8k_prompts[:6]  # 82 to 291 tokens: every batch is left-padded
    longest, steps = max(len(tok(p)["input_ids"]) for p in prompts), 16
    full = generate_with_stops(model, tok, prompts, batch_size=6, max_new_tokens=steps)
    for bound in (CacheBound(4, longest + steps - 4), CacheBound(0, longest + steps), CacheBound(4, 1000)):
        for batch_size in (3, 6):
            assert generate_with_stops(model, tok, prompts, batch_size=batch_size, max_new_tokens=steps,
                                       cache=bound) == full
    # Chunked prefill (7 tokens a forward) without eviction: the same tokens as generate.
    encoded = [tok(p)["input_ids"] for p in prompts]
    ids, mask = left_pad(encoded, EOS)
    with torch.no_grad():
        expected = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=steps, do_sample=False,
                                  pad_token_id=EOS, eos_token_id=[EOS], min_new_tokens=steps)
    assert _bounded(model, encoded, CacheBound(4, 1000), steps, prefill_chunk=7) == expected[:, ids.shape[1] :].tolist()


# ---------------------------------------------------------------------------------------------------------------------
# With eviction: the slow references


def test_eviction_matches_the_slow_references(stories_model, gsm8k_prompts):
    model, tok = stories_model
    prompt, steps = tok(gsm8k_prompts[1])["input_ids"], 24  # 82 tokens: evicted from the first prefill chunk on
    bound = CacheBound(2, 8)
    fast = _bounded(model, [prompt], bound, steps)[0]
    assert fast == reference_token_by_token(model, prompt, bound, steps)
    assert fast == reference_from_scratch(model, prompt, bound, steps)
    assert fast == _bounded(model, [prompt], bound, steps, prefill_chunk=1)[0]  # chunking changes nothing
    assert fast == _bounded(model, [prompt], bound, steps, prefill_chunk=100)[0]
    assert fast != _bounded(model, [prompt], CacheBound(2, 1000), steps)[0]  # the bound changed the generation
    sinkless = CacheBound(0, 8)
    assert _bounded(model, [prompt], sinkless, steps)[0] == reference_token_by_token(model, prompt, sinkless, steps)


def test_eviction_on_a_qwen2_with_eager_attention(tiny_qwen):
    """A second architecture (GQA, eager attention), on random token prompts: batched equals the token-by-token
    reference row by row."""
    gen = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, 96, (n,), generator=gen).tolist() for n in (5, 23, 14, 40)]
    bound, steps = CacheBound(3, 6), 12
    batched = _bounded(tiny_qwen, prompts, bound, steps, prefill_chunk=4)
    assert batched == [reference_token_by_token(tiny_qwen, p, bound, steps) for p in prompts]


def test_the_cache_stays_bounded_and_positions_count_on(stories_model, gsm8k_prompts):
    """Every forward reads at most sinks + window + its own tokens, and each new token gets its true position (the
    prompt's length plus the tokens before it), not its index in the cache."""
    model, tok = stories_model
    prompts = [tok(p)["input_ids"] for p in gsm8k_prompts[:3]]
    bound, steps, chunk = CacheBound(4, 16), 10, 16
    seen = []

    def record(module, args, kwargs):
        seen.append((kwargs["attention_mask"].shape, kwargs["position_ids"].clone()))

    hook = model.model.layers[0].register_forward_pre_hook(record, with_kwargs=True)
    try:
        _bounded(model, prompts, bound, steps, prefill_chunk=chunk)
    finally:
        hook.remove()
    width = max(map(len, prompts))
    prefill, decode = seen[: -(-width // chunk)], seen[-(-width // chunk) :]
    assert len(decode) == steps - 1
    assert max(shape[-1] for shape, _ in prefill) <= bound.sinks + bound.window + chunk
    assert all(shape[-2:] == (1, shape[-1]) and shape[-1] <= bound.sinks + bound.window + 1 for shape, _ in decode)
    for step, (_, positions) in enumerate(decode):
        assert positions[:, 0].tolist() == [len(p) + step for p in prompts]


# ---------------------------------------------------------------------------------------------------------------------
# Batched, left-padded, with eviction


def test_batched_equals_one_at_a_time_with_eviction(stories_model, gsm8k_prompts):
    model, tok = stories_model
    # Eight lengths, from a few tokens to a whole question: padding before every row but the longest, and each
    # row's sinks at a different column.
    prompts = [p[: 12 + 30 * i] for i, p in enumerate(gsm8k_prompts)]
    bound = CacheBound(4, 8)
    alone = [generate_batched(model, tok, [p], batch_size=1, max_new_tokens=20, cache=bound)[0] for p in prompts]
    for batch_size in (3, 8):
        assert generate_batched(model, tok, prompts, batch_size=batch_size, max_new_tokens=20, cache=bound) == alone
    assert alone != generate_batched(model, tok, prompts, batch_size=8, max_new_tokens=20)  # eviction happened
    # ... and each row is the reference's generation.
    encoded = [tok(p)["input_ids"] for p in prompts]
    batched = _bounded(model, encoded, bound, 20)
    for row in (0, 4, 7):
        assert batched[row] == reference_token_by_token(model, encoded[row], bound, 20)


# ---------------------------------------------------------------------------------------------------------------------
# The stop rules


def test_stops_are_those_of_the_full_cache(assets, tmp_path):
    """On a model whose next token depends only on the current one (test_evaluate's), any bound gives the full
    cache's generation: a row stops at its answer line, at EOS (counted), or at the budget, each in its own row."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(assets("tokenizers/gpt2"))
    _forced_model(tok, CHAIN).save_pretrained(tmp_path)
    model = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    prompts = ["Q: Say it:", "Q: How many?", "Q: Stop!", "Q: Tell me, then say it:"]
    full = generate_with_stops(model, tok, prompts, batch_size=4, max_new_tokens=30)
    assert full == [(" yes\n#### 42\n", 5, "answer"), (" no" * 30, 30, "budget"), (" done", 2, "eos"),
                    (" yes\n#### 42\n", 5, "answer")]
    for bound in (CacheBound(1, 2), CacheBound(0, 1)):
        assert generate_with_stops(model, tok, prompts, batch_size=4, max_new_tokens=30, cache=bound) == full
        assert generate_with_stops(model, tok, prompts, batch_size=1, max_new_tokens=30, cache=bound) == full


# ---------------------------------------------------------------------------------------------------------------------
# The command line


@pytest.mark.integration
def test_cli_eval_with_a_bounded_cache(stories, tmp_path):
    args = [*KAVA, "eval", "--model", str(stories), "--dataset", "synthetic", "--split", "test", "--limit", "3",
            "--max-new-tokens", "16", "--no-progress", "--json", "--out", str(tmp_path / "items.jsonl")]
    scored = subprocess.run([*args, "--cache", "sinks=4,window=16"], capture_output=True, text=True, env=ENV,
                            timeout=180)
    assert scored.returncode == 0, scored.stderr
    report = json.loads(scored.stdout)
    assert report["cache"] == "sinks=4,window=16" and report["n"] == 3
    items = [json.loads(line) for line in (tmp_path / "items.jsonl").read_text().splitlines()]
    assert all(1 <= i["generated_tokens"] <= 16 and i["stop"] in ("answer", "eos", "budget") for i in items)

    refused = subprocess.run([*args, "--cache", "window=0"], capture_output=True, text=True, env=ENV, timeout=180)
    assert refused.returncode != 0 and refused.stdout == ""
    assert ("--cache: expected sinks=S,window=W with S >= 0 and W >= 1. Got 'window=0' instead."
            in refused.stderr), refused.stderr
