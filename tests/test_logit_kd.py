"""Logit distillation's pieces against naive references: the teacher's top-k, which teacher token a student token
takes it from (on real tokenizers and GSM8K text), and the two per-token losses."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from kava.core.errors import ConfigError, ShapeError
from kava.distill.logit_kd import sorted_prob_distance, topk_kl
from kava.extract.logits import NO_TARGET, boundary_rows, topk_logprobs


def _naive_boundary(student: np.ndarray, teacher: np.ndarray) -> list[int]:
    out = []
    for s0, s1 in student:
        match = NO_TARGET
        if s1 > s0:
            for j, (t0, t1) in enumerate(teacher):
                if t1 > t0 and t1 == s1:
                    match = j  # the last one wins
        out.append(match)
    return out


def test_topk_logprobs_are_the_sorted_head_of_log_softmax():
    logits = torch.randn(2, 5, 50, generator=torch.Generator().manual_seed(0)) * 3
    ids, logp = topk_logprobs(logits.half(), 7)
    full = torch.log_softmax(logits.half().float(), -1)
    ref_vals, ref_ids = full.sort(-1, descending=True)
    assert ids.shape == logp.shape == (2, 5, 7) and logp.dtype == torch.float32
    torch.testing.assert_close(logp, ref_vals[..., :7])
    torch.testing.assert_close(full.gather(-1, ids), logp)  # ties may order ids differently; their values match
    with pytest.raises(ConfigError, match="--logit-top-k between 1 and the vocabulary size 50. Got 51"):
        topk_logprobs(logits, 51)


def test_boundary_rows_match_a_loop_on_synthetic_spans():
    rng = np.random.default_rng(0)
    for _ in range(200):
        cuts_s = np.unique(rng.integers(0, 40, size=rng.integers(1, 15)))
        cuts_t = np.unique(rng.integers(0, 40, size=rng.integers(1, 15)))
        s = np.stack([cuts_s[:-1], cuts_s[1:]], 1) if len(cuts_s) > 1 else np.zeros((0, 2), np.int64)
        t = np.stack([cuts_t[:-1], cuts_t[1:]], 1) if len(cuts_t) > 1 else np.zeros((0, 2), np.int64)
        # zero-width spans where special tokens and glue text sit
        s = np.insert(s, 0, [[0, 0]], axis=0)
        t = np.concatenate([t, [[t[-1, 1], t[-1, 1]]]]) if len(t) else t
        assert boundary_rows(s, t).tolist() == _naive_boundary(s, t)


def test_boundary_rows_on_real_tokenizers(assets):
    from transformers import AutoTokenizer

    from kava.extract.align import token_spans

    record = json.loads(assets("gsm8k/test.jsonl").read_text().splitlines()[3])
    text = record["question"] + "\n" + record["answer"]
    gpt2 = AutoTokenizer.from_pretrained(str(assets("tokenizers/gpt2")))
    llama = AutoTokenizer.from_pretrained(str(assets("tokenizers/llama2")))
    _, g = token_spans(gpt2, text)
    _, lspans = token_spans(llama, text)
    same = boundary_rows(g, g)
    live = g[:, 1] > g[:, 0]
    assert (same[live] == np.flatnonzero(live)).all() and (same[~live] == NO_TARGET).all()
    for student, teacher in ((g, lspans), (lspans, g)):
        cross = boundary_rows(student, teacher)
        assert cross.tolist() == _naive_boundary(student, teacher)
        matched = cross != NO_TARGET
        assert (teacher[cross[matched], 1] == student[matched, 1]).all()
    # Llama-2 splits numbers into digits where GPT-2 keeps "48" whole: a Llama student's "4" has no GPT-2 twin,
    # while words and whole numbers still line up.
    assert 0.3 < (boundary_rows(lspans, g) != NO_TARGET).mean() < 1.0


def _naive_topk_kl(student_logits: torch.Tensor, ids: torch.Tensor, logp: torch.Tensor) -> torch.Tensor:
    out = torch.zeros(student_logits.shape[:2], dtype=torch.float64)
    for b in range(student_logits.shape[0]):
        for t in range(student_logits.shape[1]):
            q = torch.softmax(student_logits[b, t].double(), -1)
            p = logp[b, t].double().exp()
            kl = sum(float(p[i]) * math.log(float(p[i]) / float(q[ids[b, t, i]])) for i in range(len(p)))
            pt, qt = 1 - float(p.sum()), 1 - float(q[ids[b, t]].sum())
            if pt > 0:
                kl += pt * math.log(max(pt, 1e-6) / max(qt, 1e-6))
            out[b, t] = kl
    return out


def test_topk_kl_equals_the_coarsened_kl_and_the_full_kl_when_k_is_the_vocabulary():
    g = torch.Generator().manual_seed(1)
    teacher, student = torch.randn(2, 4, 30, generator=g), torch.randn(2, 4, 30, generator=g)
    ids, logp = topk_logprobs(teacher, 5)
    got = topk_kl(student, ids, logp)
    torch.testing.assert_close(got.double(), _naive_topk_kl(student, ids, logp), rtol=1e-4, atol=1e-5)
    ids, logp = topk_logprobs(teacher, 30)
    full = torch.nn.functional.kl_div(torch.log_softmax(student, -1), torch.log_softmax(teacher, -1),
                                      log_target=True, reduction="none").sum(-1)
    torch.testing.assert_close(topk_kl(student, ids, logp), full, rtol=1e-4, atol=1e-5)
    assert topk_kl(teacher, *topk_logprobs(teacher, 5)).abs().max() < 1e-5  # the teacher matches itself


def test_topk_kl_is_finite_with_all_mass_in_the_top_k_and_padded_rows():
    teacher = torch.full((1, 3, 10), -1e4)
    teacher[..., 2] = 0.0  # one token holds all the mass: the tail is exactly 0
    student = torch.zeros(1, 3, 10, requires_grad=True)
    ids, logp = topk_logprobs(teacher, 2)
    loss = topk_kl(student, ids, logp)
    loss.sum().backward()
    assert torch.isfinite(loss).all() and torch.isfinite(student.grad).all()
    torch.testing.assert_close(loss, torch.full((1, 3), math.log(10.0)), rtol=1e-4, atol=1e-4)


def _naive_sorted(student_logits: torch.Tensor, logp: torch.Tensor) -> torch.Tensor:
    k = logp.shape[-1]
    out = torch.zeros(student_logits.shape[:2], dtype=torch.float64)
    for b in range(student_logits.shape[0]):
        for t in range(student_logits.shape[1]):
            q = sorted(torch.softmax(student_logits[b, t].double(), -1).tolist(), reverse=True)[:k]
            p = sorted(logp[b, t].double().exp().tolist(), reverse=True)
            out[b, t] = sum(abs(a - c) for a, c in zip(p, q)) + abs((1 - sum(p)) - (1 - sum(q)))
    return out


def test_sorted_prob_distance_matches_a_loop_and_ignores_which_token_is_which():
    g = torch.Generator().manual_seed(2)
    teacher, student = torch.randn(2, 3, 40, generator=g) * 2, torch.randn(2, 3, 25, generator=g) * 2
    _, logp = topk_logprobs(teacher, 6)
    got = sorted_prob_distance(student, logp)
    torch.testing.assert_close(got.double(), _naive_sorted(student, logp), rtol=1e-4, atol=1e-5)
    shuffled = student[..., torch.randperm(25, generator=g)]
    torch.testing.assert_close(sorted_prob_distance(shuffled, logp), got)
    assert ((got >= 0) & (got <= 2)).all()
    same = torch.randn(1, 2, 25, generator=g)
    assert sorted_prob_distance(same, topk_logprobs(same[..., torch.randperm(25, generator=g)], 8)[1]).max() < 1e-5


def test_losses_refuse_mismatched_shapes():
    with pytest.raises(ShapeError, match=r"Expected student logits \[B, T, V\] and teacher log-probabilities"):
        topk_kl(torch.zeros(1, 3, 5), torch.zeros(1, 2, 2, dtype=torch.long), torch.zeros(1, 2, 2))
    with pytest.raises(ShapeError, match="at most 5 \\(the student's vocabulary\\)"):
        sorted_prob_distance(torch.zeros(1, 3, 5), torch.zeros(1, 3, 6))
