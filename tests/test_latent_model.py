"""The latent student against naive references: one Jacobi iteration is one forward over the initial latents; the
parallel update equals computing each latent on its own; a padded batch equals its rows alone; generation over the
cache equals recomputing from scratch. Tiny Llama and Qwen2 built from configs and loaded back through
``from_pretrained``, and the real stories260K."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

from kava.core.errors import ConfigError
from kava.distill.latent.model import LatentReasoner, Projection, positions_of

ONE_TORCH_THREAD = True
ATOL = 2e-5


def _saved(tmp_path_factory: pytest.TempPathFactory, arch: str) -> AutoModelForCausalLM:
    common = dict(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=128,
        tie_word_embeddings=False,
    )
    config = (
        LlamaConfig(num_key_value_heads=4, **common)
        if arch == "llama"
        else Qwen2Config(num_key_value_heads=2, **common)
    )
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp(arch)
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    return AutoModelForCausalLM.from_pretrained(path, attn_implementation="sdpa").eval()


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def tiny(request, tmp_path_factory):
    return _saved(tmp_path_factory, request.param)


def _reasoner(model, latents=4, iterations=3, shift=False, projection="mlp") -> LatentReasoner:
    torch.manual_seed(1)
    return LatentReasoner(model, latents=latents, iterations=iterations, projection=projection, shift=shift).eval()


def _full(model, embeds: torch.Tensor):
    """One cache-free forward over unpadded ``embeds`` ``[1, T, d]``: (last hidden ``[1, T, d]``, cache)."""
    out = model.base_model(inputs_embeds=embeds, use_cache=True)
    return out.last_hidden_state, out.cache


QUESTION = torch.tensor([[5, 9, 13, 2, 7]])


@torch.no_grad()
def test_one_iteration_is_one_forward_over_the_initial_latents(tiny):
    r = _reasoner(tiny, iterations=1)
    thought = r.think(QUESTION, torch.ones_like(QUESTION))
    hidden, cache = _full(tiny, torch.cat([r.embed(QUESTION), r.start[None]], dim=1))
    torch.testing.assert_close(thought.hidden, hidden[:, -4:], atol=ATOL, rtol=0)
    for mine, ref in zip(thought.cache.layers, cache.layers):
        torch.testing.assert_close(mine.keys, ref.keys, atol=ATOL, rtol=0)
        torch.testing.assert_close(mine.values, ref.values, atol=ATOL, rtol=0)


@pytest.mark.parametrize("shift", [False, True])
@torch.no_grad()
def test_parallel_jacobi_equals_each_latent_computed_alone(tiny, shift):
    r = _reasoner(tiny, iterations=3, shift=shift)
    q = r.embed(QUESTION)
    embeds = r.start[None].clone()  # [1, M, d]
    for step in range(3):
        # Latent i sees the question and latents 0..i only: run exactly that prefix and read its last state.
        hidden = torch.cat([_full(tiny, torch.cat([q, embeds[:, : i + 1]], dim=1))[0][:, -1:] for i in range(4)], 1)
        if step < 2:
            nxt = r.project(hidden)
            embeds = torch.cat([embeds[:, :1], nxt[:, :-1]], dim=1) if shift else nxt
    thought = r.think(QUESTION, torch.ones_like(QUESTION))
    torch.testing.assert_close(thought.embeds, embeds, atol=ATOL, rtol=0)
    torch.testing.assert_close(thought.hidden, hidden, atol=ATOL, rtol=0)
    answer = torch.tensor([[3, 4, 8]])
    out = r.answer(thought, answer, torch.ones_like(answer))
    ref_hidden, ref_cache = _full(tiny, torch.cat([q, embeds, r.embed(answer)], dim=1))
    ref_logits = r.head(ref_hidden[:, -4:-1])  # the last latent and the answer's first two tokens
    torch.testing.assert_close(out.logits, ref_logits, atol=1e-4, rtol=0)
    ref_keys = torch.stack([layer.keys[:, :, 5:9] for layer in ref_cache.layers])  # [L, 1, H, M, D]
    torch.testing.assert_close(out.keys, ref_keys, atol=ATOL, rtol=0)
    assert out.positions.tolist() == [[5, 6, 7, 8]]


@torch.no_grad()
def test_a_left_padded_batch_equals_its_rows_alone(tiny):
    r = _reasoner(tiny)
    ids = torch.tensor([[0, 0, 5, 9, 13], [4, 8, 15, 16, 23]])
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    answer, answer_mask = torch.tensor([[3, 4, 8], [6, 1, 0]]), torch.tensor([[1, 1, 1], [1, 1, 0]])
    both = r(ids, mask, answer, answer_mask)
    for row in range(2):
        keep = mask[row].bool()
        alone = r(
            ids[row : row + 1, keep],
            mask[row : row + 1, keep],
            answer[row : row + 1, : 3 - row],
            answer_mask[row : row + 1, : 3 - row],
        )
        torch.testing.assert_close(both.logits[row, : 3 - row], alone.logits[0], atol=1e-4, rtol=0)
        torch.testing.assert_close(both.keys[:, row], alone.keys[:, 0], atol=ATOL, rtol=0)
        assert both.positions[row].tolist() == alone.positions[0].tolist()


@torch.no_grad()
def test_generation_over_the_cache_equals_recomputing(stories):
    model = AutoModelForCausalLM.from_pretrained(stories, attn_implementation="sdpa").eval()
    r = _reasoner(model, latents=3, iterations=2)
    ids = torch.tensor([[0, 0, 1, 400, 401], [1, 300, 301, 302, 303]])
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    generated = r.generate(ids, mask, max_new_tokens=6, eos=[2])
    thought = r.think(ids, mask)
    for row in range(2):
        keep = mask[row].bool()
        tokens: list[int] = []
        for _ in range(6):  # greedy, from scratch each step: question, final latents, what was generated
            parts = [
                r.embed(ids[row : row + 1, keep]),
                thought.embeds[row : row + 1],
                r.embed(torch.tensor([tokens], dtype=torch.long)),
            ]
            tokens.append(int(r.head(_full(model, torch.cat(parts, dim=1))[0][:, -1]).argmax()))
            if tokens[-1] == 2:
                break
        assert generated[row] == tokens


@torch.no_grad()
def test_generation_stops_at_eos_and_budget(tiny):
    r = _reasoner(tiny)
    first = r.generate(QUESTION, torch.ones_like(QUESTION), max_new_tokens=5, eos=[0])[0]
    assert len(first) == 5  # eos 0 never comes: the budget stops it
    stop = first[2]
    cut = r.generate(QUESTION, torch.ones_like(QUESTION), max_new_tokens=5, eos=[stop])[0]
    assert cut == first[: first.index(stop) + 1]


def test_positions_count_only_real_tokens():
    mask = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]])
    assert positions_of(mask).tolist() == [[0, 0, 0, 1], [0, 1, 2, 3]]


def test_bad_settings_are_refused(tiny):
    with pytest.raises(ConfigError, match="--latent"):
        LatentReasoner(tiny, latents=0, iterations=1)
    with pytest.raises(ConfigError, match="--jacobi"):
        LatentReasoner(tiny, latents=2, iterations=0)
    with pytest.raises(ConfigError, match="--projection"):
        Projection(8, "conv")  # type: ignore[arg-type]
