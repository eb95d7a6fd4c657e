"""The KaVa objective's terms against hand computations on tiny tensors, the on-the-fly R-KV choice against
``evict.keep`` itself, and a seeded self-distillation step pinned to its first losses."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

from kava.core.errors import ShapeError
from kava.distill.latent.data import Encoder, chain_rows
from kava.distill.latent.losses import answer_ce, codi_loss, compress_rkv, gather_rows, kv_loss, sequence_ce
from kava.distill.latent.model import LatentReasoner
from kava.distill.latent.objective import Weights, latent_loss, student_keys, teacher_targets
from kava.extract.evict import keep

ONE_TORCH_THREAD = True


def test_codi_is_the_per_layer_distance_over_the_teachers_std():
    student = torch.tensor([[[0.0, 0.0]], [[1.0, 1.0]]])  # [L=2, B=1, d=2]
    teacher = torch.tensor([[[1.0, 3.0]], [[1.0, 5.0]]])
    # layer 0: L1 mean (1 + 3) / 2 = 2, std of (1, 3) = sqrt(2); layer 1: (0 + 4) / 2 = 2, std of (1, 5) = sqrt(8)
    expected = (2 / 2**0.5 + 2 / 8**0.5) / 2
    assert float(codi_loss(student, teacher)) == pytest.approx(expected)
    assert float(codi_loss(student, teacher, normalize=False)) == pytest.approx(2.0)
    assert float(codi_loss(student, teacher, kind="mse", normalize=False)) == pytest.approx((5 + 8) / 2)
    grad = torch.zeros_like(student, requires_grad=True)
    codi_loss(grad, teacher.requires_grad_()).backward()
    assert teacher.grad is None  # stop-gradient on the teacher side


def test_kv_is_half_the_sum_of_k_and_v_over_valid_rows():
    zeros = torch.zeros(1, 2, 1, 2, 1)  # [L=1, B=2, H=1, M=2, D=1]
    k_t = torch.tensor([1.0, 99.0, 2.0, 3.0]).view(1, 2, 1, 2, 1)
    v_t = torch.tensor([2.0, -50.0, 0.0, 1.0]).view(1, 2, 1, 2, 1)
    valid = torch.tensor([[True, False], [True, True]])
    # K: (1 + 4 + 9) / 3; V: (4 + 0 + 1) / 3; the invalid row (99, -50) counts nowhere
    assert float(kv_loss(zeros, zeros, k_t, v_t, valid)) == pytest.approx(0.5 * (14 / 3 + 5 / 3))
    assert float(kv_loss(zeros, zeros, k_t, v_t, valid, kind="l1")) == pytest.approx(0.5 * (6 / 3 + 3 / 3))
    # normalised: each divided by the population std of its valid teacher values
    std_k, std_v = torch.tensor([1.0, 2.0, 3.0]).std(unbiased=False), torch.tensor([2.0, 0.0, 1.0]).std(unbiased=False)
    expected = 0.5 * (14 / 3 / float(std_k) + 5 / 3 / float(std_v))
    assert float(kv_loss(zeros, zeros, k_t, v_t, valid, normalize=True)) == pytest.approx(expected, rel=1e-5)
    with pytest.raises(ShapeError, match=r"\[L, B, H, M, D\]"):
        kv_loss(zeros, zeros, k_t[:, :1], v_t, valid)


def test_cross_entropies_match_their_definitions():
    torch.manual_seed(0)
    logits, ids = torch.randn(2, 3, 5), torch.tensor([[1, 2, 3], [4, 0, 1]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    nll = -logits.log_softmax(-1).gather(-1, ids[..., None])[..., 0]
    assert float(answer_ce(logits, ids, mask)) == pytest.approx(float((nll[0, 0] + nll[0, 1] + nll[1, 0]) / 3))
    labels = torch.tensor([[-100, 2, 3], [-100, -100, 1]])  # next-token: logits[:, t] predicts labels[:, t + 1]
    steps = -logits.log_softmax(-1)
    expected = (steps[0, 0, 2] + steps[0, 1, 3] + steps[1, 1, 1]) / 3
    assert float(sequence_ce(logits, labels)) == pytest.approx(float(expected))


def test_compress_rkv_keeps_what_evict_keep_keeps():
    torch.manual_seed(0)
    keys, queries = torch.randn(2, 2, 9, 4), torch.randn(2, 4, 9, 4)  # [B, H, T, D], [B, Hq, T, D]
    cot = torch.zeros(2, 9, dtype=torch.bool)
    cot[0, 2:7] = True  # 5 CoT tokens
    cot[1, 2:4] = True  # 2 CoT tokens: fewer than the budget
    window = torch.zeros(2, 9, dtype=torch.bool)
    window[0, 7:9] = True
    window[1, 4:6] = True
    positions, valid = compress_rkv(keys, queries, cot, window, 3)
    at = torch.tensor([7, 8])
    ref = keep("r-kv", keys[0], cot[0], 3, queries=queries[0][:, at], query_at=at)
    assert positions[0].tolist() == [[p for p in row if 2 <= p < 7] for row in ref.tolist()]
    assert valid.tolist() == [[True, True, True], [True, True, False]]
    assert positions[1, :, :2].tolist() == [[2, 3], [2, 3]]
    assert gather_rows(keys, positions)[0, 1, 0].tolist() == keys[0, 1, positions[0, 1, 0]].tolist()


@pytest.fixture(scope="module")
def seeded(stories, tmp_path_factory):
    """A tiny Llama built from a config on the stories260K tokenizer, saved and loaded back, with seeded latents."""
    tokenizer = AutoTokenizer.from_pretrained(stories)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("seeded")
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="sdpa").train()
    torch.manual_seed(0)
    reasoner = LatentReasoner(model, latents=3, iterations=2)
    return reasoner, Encoder(tokenizer).batch(chain_rows(4, steps=2))


def test_teacher_targets_are_the_kept_cot_rows_before_rope(seeded):
    reasoner, batch = seeded
    targets = teacher_targets(reasoner.model, batch, budget=3, weights=Weights(cot=0.0))
    assert targets.ce is None and targets.keys is not None and targets.valid is not None
    assert targets.keys.shape == (2, 4, 2, 3, 8) and bool(targets.valid.all())  # [L, B, H, M, D]
    assert not targets.keys.requires_grad and targets.hidden is not None and not targets.hidden.requires_grad
    # Undoing RoPE on the student side is exact: re-rotating gives the cached keys back.
    out = reasoner(batch.question_ids, batch.question_mask, batch.answer_ids, batch.answer_mask)
    pre = student_keys(reasoner, out.keys, out.positions)
    cos, sin = reasoner.base.rotary_emb(pre[0].float(), out.positions)
    from kava.extract.rope import apply_rope

    torch.testing.assert_close(apply_rope(pre[1], cos, sin), out.keys[1], atol=1e-5, rtol=0)


def test_a_seeded_step_pins_its_first_losses(seeded):
    reasoner, batch = seeded
    torch.manual_seed(0)
    optimizer = torch.optim.AdamW(reasoner.parameters(), lr=1e-2)
    seen = []
    for _ in range(2):
        loss, terms = latent_loss(reasoner, batch, Weights(kv_norm=True))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        seen.append(terms)
    # Computed once with this code (torch 2.13 CPU) and written here: a change to any term shows.
    pinned = [
        {"loss/answer": 6.262175, "loss/cot": 6.272234, "loss/codi": 0.107175, "loss/kv": 0.216051},
        {"loss/answer": 6.007349, "loss/cot": 6.053191, "loss/codi": 0.048518, "loss/kv": 0.154241},
    ]
    for got, want in zip(seen, pinned):
        for key, value in want.items():
            assert got[key] == pytest.approx(value, rel=1e-4), key
        assert got["loss"] == pytest.approx(
            got["loss/answer"] + got["loss/cot"] + 10 * got["loss/codi"] + got["loss/kv"], rel=1e-5
        )
