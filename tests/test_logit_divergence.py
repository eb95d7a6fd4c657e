"""``logit_divergence``, the tuned logit-KD baseline's loss, against a naive float64 reference written from the
definitions: buckets of the teacher's top-k plus the tail, softened by ``p^(1/T)``, then each divergence."""

from __future__ import annotations

import math

import pytest
import torch

from kava.distill.logit_kd import DIVERGENCES, logit_divergence, sorted_prob_distance, topk_kl
from kava.extract.logits import topk_logprobs


def _naive(student_logits, teacher_ids, teacher_logp, *, same, divergence, T, skew=0.1):
    """One position at a time, in float64 lists: the definitions, no vectorisation."""
    B, Tn, k = teacher_logp.shape
    out = torch.zeros(B, Tn, dtype=torch.float64)
    for b in range(B):
        for t in range(Tn):
            s = torch.log_softmax(student_logits[b, t].double(), -1).exp().tolist()
            tl = teacher_logp[b, t].double().exp().tolist()
            if same:
                sh = [s[i] for i in teacher_ids[b, t].tolist()]
                th = tl
            else:
                sh = sorted(s, reverse=True)[:k]
                th = sorted(tl, reverse=True)
            P = th + [max(0.0, 1 - sum(th))]
            Q = sh + [max(1e-6, 1 - sum(sh))]
            if T != 1:
                P = [x ** (1 / T) for x in P]
                Q = [x ** (1 / T) for x in Q]
                P = [x / sum(P) for x in P]
                Q = [x / sum(Q) for x in Q]
            def kl(a, c, floor=0.0):
                return sum(x * (math.log(x) - math.log(max(y, floor))) for x, y in zip(a, c) if x > 0)

            if divergence == "forward-kl" or (divergence == "auto" and same):
                v = kl(P, Q)
            elif divergence == "auto":
                v = sum(abs(x - y) for x, y in zip(P, Q))
            elif divergence == "reverse-kl":
                v = sum(y * (math.log(y) - math.log(max(x, 1e-6))) for x, y in zip(P, Q) if y > 0)
            elif divergence == "skew-kl":
                v = kl(P, [skew * x + (1 - skew) * y for x, y in zip(P, Q)], 1e-6)
            elif divergence == "jsd":
                M = [(x + y) / 2 for x, y in zip(P, Q)]
                v = 0.5 * kl(P, M, 1e-6) + 0.5 * kl(Q, M, 1e-6)
            else:
                v = 0.5 * sum(abs(x - y) for x, y in zip(P, Q))
            out[b, t] = max(v, 0.0) * T**2
    return out


@pytest.fixture
def pair():
    g = torch.Generator().manual_seed(3)
    student = torch.randn(2, 4, 40, generator=g) * 2
    teacher = torch.randn(2, 4, 40, generator=g) * 3
    ids, logp = topk_logprobs(teacher, 8)
    return student, ids, logp


@pytest.mark.parametrize("same", [True, False])
@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("T", [1.0, 2.0, 0.5])
def test_each_divergence_matches_the_definition(pair, same, divergence, T):
    student, ids, logp = pair
    got = logit_divergence(student, ids, logp, same_tokenizer=same, divergence=divergence, temperature=T)
    want = _naive(student, ids, logp, same=same, divergence=divergence, T=T)
    assert got.shape == (2, 4)
    torch.testing.assert_close(got.double(), want, rtol=2e-4, atol=2e-5)


def test_auto_at_temperature_one_is_the_existing_loss_exactly(pair):
    student, ids, logp = pair
    assert torch.equal(logit_divergence(student, ids, logp, same_tokenizer=True), topk_kl(student, ids, logp))
    assert torch.equal(logit_divergence(student, ids, logp, same_tokenizer=False), sorted_prob_distance(student, logp))
    fwd = logit_divergence(student, ids, logp, same_tokenizer=True, divergence="forward-kl")
    torch.testing.assert_close(fwd, topk_kl(student, ids, logp))


@pytest.mark.parametrize("divergence", DIVERGENCES[1:])
def test_zero_where_the_student_matches_the_teacher_and_gradients_are_finite(divergence):
    teacher = torch.randn(1, 3, 30, generator=torch.Generator().manual_seed(5)) * 2
    ids, logp = topk_logprobs(teacher, 6)
    student = teacher.clone().requires_grad_(True)
    loss = logit_divergence(student, ids, logp, same_tokenizer=True, divergence=divergence, temperature=2.0)
    assert loss.abs().max() < 1e-5
    (loss.sum() + logit_divergence(student * 0.3, ids, logp, same_tokenizer=True, divergence=divergence).sum()
     ).backward()
    assert torch.isfinite(student.grad).all() and student.grad.abs().sum() > 0


def test_a_teacher_with_no_tail_gives_finite_losses():
    logits = torch.full((1, 1, 10), -1e4)
    logits[..., :2] = 0.0  # all the mass on two tokens: the stored top-4's tail is 0
    ids, logp = topk_logprobs(logits, 4)
    student = torch.randn(1, 1, 10, requires_grad=True)
    for divergence in DIVERGENCES:
        loss = logit_divergence(student, ids, logp, same_tokenizer=True, divergence=divergence, temperature=1.5)
        loss.sum().backward()
        assert torch.isfinite(loss).all() and torch.isfinite(student.grad).all(), divergence


def test_the_config_offers_every_divergence():
    from kava.distill.config import DIVERGENCES as OFFERED

    assert OFFERED == DIVERGENCES


def test_bounds_and_bad_arguments(pair):
    student, ids, logp = pair
    tvd = logit_divergence(student, ids, logp, same_tokenizer=True, divergence="tvd")
    jsd = logit_divergence(student, ids, logp, same_tokenizer=True, divergence="jsd")
    assert (tvd <= 1).all() and (jsd <= math.log(2) + 1e-6).all()
    with pytest.raises(ValueError, match="Expected a divergence in"):
        logit_divergence(student, ids, logp, same_tokenizer=True, divergence="kl")
    with pytest.raises(ValueError, match="Expected temperature > 0"):
        logit_divergence(student, ids, logp, same_tokenizer=True, temperature=0.0)
