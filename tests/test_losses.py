"""Losses against naive loop references, with GQA, head mixing, padding, zero vectors and zero weights."""

from __future__ import annotations

import math

import pytest
import torch

from kava.distill.losses import (
    attention_kl,
    attention_log_probs,
    per_token_cosine,
    per_token_mercator,
    per_token_mse,
    weighted_mean,
)
from kava.distill.projectors import head_share_matrix
from kava.core.errors import ConfigError

F64 = torch.float64


def naive_mse(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    batch, heads, tokens, dim = pred.shape
    out = torch.zeros(batch, tokens, dtype=pred.dtype)
    for b in range(batch):
        for t in range(tokens):
            total = 0.0
            for h in range(heads):
                for d in range(dim):
                    total += float(pred[b, h, t, d] - target[b, h, t, d]) ** 2
            out[b, t] = total / (heads * dim)
    return out


def naive_cosine(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    batch, heads, tokens, _ = pred.shape
    out = torch.zeros(batch, tokens, dtype=pred.dtype)
    for b in range(batch):
        for t in range(tokens):
            total = 0.0
            for h in range(heads):
                p, q = pred[b, h, t], target[b, h, t]
                np_, nq = math.sqrt(float(p @ p)), math.sqrt(float(q @ q))
                total += 0.0 if np_ == 0 or nq == 0 else float(p @ q) / (np_ * nq)
            out[b, t] = total / heads
    return out


def naive_log_probs(q: torch.Tensor, k: torch.Tensor, lengths: list[int], scaling: float) -> list:
    """logp[b][h][t] = log softmax over keys 0..t of a real query t (None for padded queries)."""
    batch, q_heads, tokens, _ = q.shape
    group = q_heads // k.shape[1]
    out = []
    for b in range(batch):
        per_head = []
        for h in range(q_heads):
            rows = []
            for t in range(tokens):
                if t >= lengths[b]:
                    rows.append(None)
                    continue
                keys = torch.stack([k[b, h // group, s] for s in range(t + 1)])  # gathered allowed keys
                rows.append(torch.log_softmax((keys @ q[b, h, t]) * scaling, dim=0))
            per_head.append(rows)
        out.append(per_head)
    return out


def naive_kl(teacher_logp: torch.Tensor, student_logp: torch.Tensor, lengths: list[int]) -> torch.Tensor:
    batch, t_heads, tokens, _ = teacher_logp.shape
    s_heads = student_logp.shape[1]
    share = head_share_matrix(t_heads, s_heads).to(F64)
    out = torch.zeros(batch, tokens, dtype=F64)
    for b in range(batch):
        for t in range(min(lengths[b], tokens)):
            total = 0.0
            for s in range(s_heads):
                for key in range(t + 1):
                    p = sum(float(share[s, h]) * math.exp(float(teacher_logp[b, h, t, key])) for h in range(t_heads))
                    if p > 0:
                        total += p * (math.log(p) - float(student_logp[b, s, t, key]))
            out[b, t] = total / s_heads
    return out


def random_qk(batch: int, q_heads: int, kv_heads: int, tokens: int, dim: int, seed: int) -> tuple:
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, q_heads, tokens, dim, generator=g, dtype=F64)
    k = torch.randn(batch, kv_heads, tokens, dim, generator=g, dtype=F64)
    return q, k


# --- K/V losses ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(2, 3, 4, 5), (1, 1, 3, 7)])
def test_mse_and_cosine_match_naive(shape: tuple[int, int, int, int]) -> None:
    torch.manual_seed(0)
    pred, target = torch.randn(shape, dtype=F64), torch.randn(shape, dtype=F64)
    target[0, 0, 1] = 0  # a zero vector: cosine 0 for that head
    torch.testing.assert_close(per_token_mse(pred, target), naive_mse(pred, target))
    torch.testing.assert_close(per_token_cosine(pred, target), naive_cosine(pred, target))
    torch.testing.assert_close(per_token_mercator(pred, target), 1 - naive_cosine(pred, target))
    assert per_token_mse(pred, target).shape == (shape[0], shape[2])


def test_mercator_ignores_magnitude() -> None:
    torch.manual_seed(0)
    x = torch.randn(2, 3, 4, 5)
    torch.testing.assert_close(per_token_mercator(50 * x, x), torch.zeros(2, 4), atol=1e-6, rtol=0)
    torch.testing.assert_close(per_token_mercator(-x, x), torch.full((2, 4), 2.0), atol=1e-6, rtol=0)


def test_half_precision_is_reduced_in_float32() -> None:
    torch.manual_seed(0)
    pred, target = torch.randn(1, 2, 3, 4), torch.randn(1, 2, 3, 4)
    out = per_token_mse(pred.bfloat16(), target.bfloat16())
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, per_token_mse(pred.bfloat16().float(), target.bfloat16().float()))


def test_cosine_zero_vectors_have_finite_gradients() -> None:
    pred = torch.zeros(1, 2, 3, 4, requires_grad=True)
    target = torch.zeros(1, 2, 3, 4)
    target[0, 1] = 1.0
    loss = per_token_mercator(pred, target)
    torch.testing.assert_close(loss.detach(), torch.ones(1, 3))
    loss.sum().backward()
    assert torch.isfinite(pred.grad).all()


def test_kv_losses_gradcheck() -> None:
    torch.manual_seed(0)
    pred = torch.randn(1, 2, 2, 3, dtype=F64, requires_grad=True)
    target = torch.randn(1, 2, 2, 3, dtype=F64, requires_grad=True)
    assert torch.autograd.gradcheck(per_token_mse, (pred, target))
    assert torch.autograd.gradcheck(per_token_cosine, (pred, target))
    assert torch.autograd.gradcheck(per_token_mercator, (pred, target))


def test_kv_losses_reject_mismatched_shapes() -> None:
    with pytest.raises(ConfigError, match=r"Expected pred and target of the same shape.*\(1, 2, 3, 4\) and \(1, 3"):
        per_token_mse(torch.zeros(1, 2, 3, 4), torch.zeros(1, 3, 3, 4))
    with pytest.raises(ConfigError, match="Expected eps > 0. Got 0"):
        per_token_cosine(torch.zeros(1, 2, 3, 4), torch.zeros(1, 2, 3, 4), eps=0)


# --- weighted_mean ------------------------------------------------------------------------------------------------


def test_weighted_mean_matches_naive() -> None:
    torch.manual_seed(0)
    values = torch.randn(3, 5, dtype=F64)
    weight = torch.rand(3, 5, dtype=F64)
    weight[1] = 0
    num = sum(float(weight[b, t] * values[b, t]) for b in range(3) for t in range(5))
    den = sum(float(weight[b, t]) for b in range(3) for t in range(5))
    torch.testing.assert_close(weighted_mean(values, weight), torch.tensor(num / den, dtype=F64))
    assert torch.autograd.gradcheck(lambda v: weighted_mean(v, weight), (values.requires_grad_(),))
    # Weight gradients away from the kink at 0 (a zero weight drops its value entirely).
    positive = (weight + 0.1).requires_grad_()
    assert torch.autograd.gradcheck(weighted_mean, (values, positive))


def test_weighted_mean_all_zero_weights_is_zero_in_graph() -> None:
    values = torch.randn(2, 3, requires_grad=True)
    weight = torch.zeros(2, 3, requires_grad=True)
    out = weighted_mean(values, weight)
    assert out.item() == 0.0
    assert out.requires_grad
    out.backward()
    assert torch.equal(values.grad, torch.zeros(2, 3))
    assert torch.isfinite(weight.grad).all()


def test_weighted_mean_ignores_non_finite_values_where_unweighted() -> None:
    values = torch.tensor([[1.0, float("nan"), float("inf")]], requires_grad=True)
    weight = torch.tensor([[2.0, 0.0, 0.0]])
    out = weighted_mean(values, weight)
    assert out.item() == 1.0
    out.backward()
    assert torch.equal(values.grad, torch.tensor([[1.0, 0.0, 0.0]]))


def test_weighted_mean_rejects_mismatched_shapes() -> None:
    with pytest.raises(ConfigError, match=r"Expected values and weight of the same shape. Got \(2, 3\) and \(3, 2\)"):
        weighted_mean(torch.zeros(2, 3), torch.zeros(3, 2))


# --- attention ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("q_heads", "kv_heads"), [(4, 2), (3, 3), (6, 2), (3, 1)])
def test_attention_log_probs_match_naive(q_heads: int, kv_heads: int) -> None:
    lengths = [5, 3, 0]
    q, k = random_qk(3, q_heads, kv_heads, 5, 3, seed=1)
    scaling = 3**-0.5
    logp = attention_log_probs(q, k, torch.tensor(lengths), scaling)
    assert logp.shape == (3, q_heads, 5, 5)
    assert logp.dtype == F64
    assert torch.isfinite(logp).all()
    torch.testing.assert_close(logp.exp().sum(-1), torch.ones(3, q_heads, 5, dtype=F64))
    ref = naive_log_probs(q, k, lengths, scaling)
    for b in range(3):
        for h in range(q_heads):
            for t in range(5):
                if ref[b][h][t] is None:  # padded query: all mass on key 0
                    assert logp[b, h, t, 0].item() == 0.0
                    assert (logp[b, h, t, 1:].exp() == 0).all()
                else:
                    torch.testing.assert_close(logp[b, h, t, : t + 1], ref[b][h][t])
                    assert (logp[b, h, t, t + 1 :].exp() == 0).all()


def test_attention_log_probs_float32_from_half_and_gqa_convention() -> None:
    q, k = random_qk(1, 4, 2, 3, 4, seed=2)
    logp = attention_log_probs(q.bfloat16(), k.bfloat16(), torch.tensor([3]), 0.5)
    assert logp.dtype == torch.float32
    # Query head 1 belongs to key head 0 and head 2 to key head 1 (repeat_kv): same query, different keys.
    q2 = q.clone()
    q2[:, 1] = q2[:, 2]
    out = attention_log_probs(q2, k, torch.tensor([3]), 0.5)
    assert not torch.allclose(out[:, 1], out[:, 2])
    k_same = k.clone()
    k_same[:, 1] = k_same[:, 0]
    out = attention_log_probs(q2, k_same, torch.tensor([3]), 0.5)
    torch.testing.assert_close(out[:, 1], out[:, 2])


def test_attention_log_probs_gradients_are_finite_with_padding() -> None:
    q, k = random_qk(2, 2, 1, 4, 3, seed=3)
    q.requires_grad_()
    k.requires_grad_()
    lengths = torch.tensor([2, 0])

    def fn(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        # only the visible entries: masked ones are a constant
        logp = attention_log_probs(q, k, lengths, 0.7)
        return torch.where(logp > -1e8, logp, torch.zeros_like(logp))

    assert torch.autograd.gradcheck(fn, (q, k))
    attention_log_probs(q, k, lengths, 0.7).sum().backward()
    assert torch.isfinite(q.grad).all() and torch.isfinite(k.grad).all()


def test_attention_log_probs_rejects_bad_inputs() -> None:
    q, k = random_qk(1, 3, 2, 4, 3, seed=0)
    with pytest.raises(ConfigError, match="multiple of the key heads. Got Hq=3, Hk=2"):
        attention_log_probs(q, k, torch.tensor([4]), 1.0)
    q, k = random_qk(1, 2, 2, 4, 3, seed=0)
    with pytest.raises(ConfigError, match=r"Expected lengths as an integer tensor of shape \[1\]"):
        attention_log_probs(q, k, torch.tensor([4.0]), 1.0)
    with pytest.raises(ConfigError, match=r"Expected q \[B, Hq, T, D\] and k \[B, Hk, T, D\]"):
        attention_log_probs(q, k[:, :, :3], torch.tensor([4]), 1.0)


def test_attention_kl_is_zero_for_identical_attention() -> None:
    q, k = random_qk(2, 4, 2, 5, 3, seed=4)
    lengths = torch.tensor([5, 2])
    logp = attention_log_probs(q, k, lengths, 0.5)
    kl = attention_kl(logp, logp, lengths)
    assert kl.shape == (2, 5)
    torch.testing.assert_close(kl, torch.zeros(2, 5, dtype=F64))


@pytest.mark.parametrize(
    ("t_heads", "t_kv", "s_heads", "s_kv"), [(4, 2, 4, 2), (3, 3, 2, 1), (4, 1, 6, 3), (2, 2, 3, 3)]
)
def test_attention_kl_matches_naive(t_heads: int, t_kv: int, s_heads: int, s_kv: int) -> None:
    lengths = [5, 3, 0]
    tq, tk = random_qk(3, t_heads, t_kv, 5, 4, seed=5)
    sq, sk = random_qk(3, s_heads, s_kv, 5, 3, seed=6)
    lt = torch.tensor(lengths)
    teacher = attention_log_probs(tq, tk, lt, 0.5)
    student = attention_log_probs(sq, sk, lt, 0.6)
    kl = attention_kl(teacher, student, lt)
    torch.testing.assert_close(kl, naive_kl(teacher, student, lengths))
    assert (kl >= -1e-12).all()
    assert (kl[1, 3:] == 0).all() and (kl[2] == 0).all()  # padded rows


def test_attention_kl_gradcheck() -> None:
    tq, tk = random_qk(2, 3, 3, 3, 2, seed=7)
    sq, sk = random_qk(2, 2, 1, 3, 2, seed=8)
    lengths = torch.tensor([3, 2])
    for x in (tq, tk, sq, sk):
        x.requires_grad_()

    def fn(tq: torch.Tensor, tk: torch.Tensor, sq: torch.Tensor, sk: torch.Tensor) -> torch.Tensor:
        teacher = attention_log_probs(tq, tk, lengths, 0.5)
        return attention_kl(teacher, attention_log_probs(sq, sk, lengths, 0.5), lengths)

    assert torch.autograd.gradcheck(fn, (tq, tk, sq, sk))


def test_attention_kl_handles_zero_teacher_probabilities_and_all_padding() -> None:
    lengths = torch.tensor([3, 0])
    teacher = torch.full((2, 2, 3, 3), -1e9, dtype=F64)
    teacher[..., 0] = 0.0  # all mass on key 0; log p = -inf would be just as legal
    teacher[0, 1, :, 1] = float("-inf")
    teacher.requires_grad_()
    student_q, student_k = random_qk(2, 2, 2, 3, 2, seed=9)
    student_q.requires_grad_()
    student = attention_log_probs(student_q, student_k, lengths, 1.0)
    kl = attention_kl(teacher, student, lengths)
    assert torch.isfinite(kl).all()
    expected = -student[0, :, :, 0].detach().mean(0)  # KL(one-hot || s) = -log s(key 0)
    torch.testing.assert_close(kl[0], expected)
    assert (kl[1] == 0).all()
    weighted_mean(kl, torch.tensor([[0.0, 0, 0], [1, 1, 1]], dtype=F64)).backward()
    assert torch.isfinite(teacher.grad).all() and torch.isfinite(student_q.grad).all()
    assert (student_q.grad == 0).all() and (teacher.grad == 0).all()  # nothing weighted, nothing learned


def test_attention_kl_rejects_mismatched_tokens() -> None:
    with pytest.raises(ConfigError, match=r"Expected teacher_logp \[B, Ht, T, T\] and student_logp"):
        attention_kl(torch.zeros(1, 2, 3, 3), torch.zeros(1, 2, 4, 4), torch.tensor([3]))


@pytest.mark.parametrize("t_heads,s_heads,kv_heads", [(4, 4, 2), (3, 2, 1), (8, 4, 4)])
def test_attention_kl_from_scores_equals_the_explicit_kl_and_its_gradient(t_heads, s_heads, kv_heads):
    from kava.distill.losses import attention_kl, attention_kl_from_scores
    from kava.distill.projectors import head_share_matrix

    torch.manual_seed(0)
    lengths = torch.tensor([6, 3, 1])
    t_logp = attention_log_probs(torch.randn(3, t_heads, 6, 4), torch.randn(3, t_heads, 6, 4), lengths, 0.5)
    mixed = torch.einsum("sh,bhqk->bsqk", head_share_matrix(t_heads, s_heads), t_logp.exp())
    q = torch.randn(3, s_heads, 6, 5, dtype=torch.float64, requires_grad=True)
    k = torch.randn(3, kv_heads, 6, 5, dtype=torch.float64, requires_grad=True)
    explicit = attention_kl(t_logp.double(), attention_log_probs(q, k, lengths, 0.3), lengths)
    fused = attention_kl_from_scores(mixed.double(), q, k, lengths, 0.3)
    torch.testing.assert_close(fused, explicit)
    from kava.distill.losses import attention_bias

    bias = attention_bias(lengths, 6, dtype=torch.float64)  # built once per batch, the same numbers
    torch.testing.assert_close(attention_kl_from_scores(mixed.double(), q, k, lengths, 0.3, bias=bias), explicit)
    g_explicit = torch.autograd.grad(explicit.sum(), (q, k))
    g_fused = torch.autograd.grad(fused.sum(), (q, k))
    for a, b in zip(g_fused, g_explicit):
        torch.testing.assert_close(a, b)
    assert (fused[1, 3:] == 0).all() and (fused[2, 1:] == 0).all()  # padded queries


def test_attention_kl_from_scores_refuses_teacher_heads_not_on_the_student():
    from kava.distill.losses import attention_kl_from_scores

    with pytest.raises(ConfigError, match=r"Mix the teacher's heads onto the student's first"):
        attention_kl_from_scores(torch.zeros(1, 3, 4, 4), torch.randn(1, 2, 4, 8), torch.randn(1, 2, 4, 8),
                                 torch.tensor([4]), 1.0)
