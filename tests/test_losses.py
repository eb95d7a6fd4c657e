"""Losses against naive loop references, with GQA, head mixing, padding, zero vectors and zero weights."""

from __future__ import annotations

import math

import pytest
import torch

from kava.core.errors import ConfigError, ShapeError
from kava.distill.losses import (
    attention_kl,
    attention_log_probs,
    per_token_cosine,
    per_token_mercator,
    per_token_mse,
    weighted_mean,
)
from kava.distill.projectors import head_share_matrix

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
    with pytest.raises(ShapeError, match=r"Expected pred and target of the same shape.*\(1, 2, 3, 4\) and \(1, 3"):
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
    with pytest.raises(ShapeError, match=r"Expected values and weight of the same shape. Got \(2, 3\) and \(3, 2\)"):
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
    with pytest.raises(ShapeError, match="multiple of the key heads. Got Hq=3, Hk=2"):
        attention_log_probs(q, k, torch.tensor([4]), 1.0)
    q, k = random_qk(1, 2, 2, 4, 3, seed=0)
    with pytest.raises(ShapeError, match=r"Expected lengths as an integer tensor of shape \[1\]"):
        attention_log_probs(q, k, torch.tensor([4.0]), 1.0)
    with pytest.raises(ShapeError, match=r"Expected q \[B, Hq, T, D\] and k \[B, Hk, T, D\]"):
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
    with pytest.raises(ShapeError, match=r"Expected teacher_logp \[B, Ht, T, T\] and student_logp"):
        attention_kl(torch.zeros(1, 2, 3, 3), torch.zeros(1, 2, 4, 4), torch.tensor([3]))


# ---------------------------------------------------------------------------------------------------------------------
# The blockwise attention term against the dense computation it replaced


def dense_attention_term(queries, keys, weights, t_scaling, q, k, lengths, scaling):
    """The attention term as it was computed before the blockwise version, kept as the reference: the teacher's
    attention over whole ``[B, H, T, T]`` tensors (mixed over layers, then onto the student's heads), and
    ``KL = Σ p log p − Σ p·s + logsumexp(s)`` over the student's dense masked scores, through autograd."""
    from kava.distill.losses import _masked_scores, attention_bias

    steps = q.shape[2]
    dtype = torch.promote_types(q.dtype, torch.float32)
    bias = attention_bias(lengths, steps, dtype=dtype)
    with torch.no_grad():
        t_p = None
        for tq, tk, w in zip(queries, keys, weights):
            p = attention_log_probs(tq.to(dtype), tk.to(dtype), lengths, t_scaling, bias).exp()
            t_p = p * w if t_p is None else t_p + p * w
        if t_p.shape[1] != q.shape[1]:
            t_p = torch.einsum("sh,bhqk->bsqk", head_share_matrix(t_p.shape[1], q.shape[1]).to(t_p), t_p)
        neg_entropy = torch.xlogy(t_p, t_p).sum(-1)
    scores = _masked_scores(q, k, lengths, scaling, bias)  # [B, Hs, T, T]
    kl = neg_entropy - (t_p * scores).sum(-1) + torch.logsumexp(scores, dim=-1)
    padded = torch.arange(steps).view(1, 1, -1) >= lengths.view(-1, 1, 1)
    return kl.masked_fill(padded, 0.0).mean(dim=1)


# (teacher heads, teacher kv heads, student heads, student kv heads, teacher layers mixed, block)
ATTENTION_CASES = [
    (4, 2, 4, 2, 1, 4),  # GQA on both sides, same heads
    (8, 4, 4, 4, 1, 3),  # more teacher heads than student heads: mixed onto them
    (3, 3, 2, 1, 2, 5),  # two teacher layers mixed, 3 -> 2 heads, MQA student
    (2, 1, 6, 3, 1, 1),  # fewer teacher heads (copied), one query per block
    (4, 4, 8, 2, 2, 64),  # one block larger than the sequence
]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize(("t_heads", "t_kv", "s_heads", "s_kv", "layers", "block"), ATTENTION_CASES)
def test_attention_kl_blockwise_equals_the_dense_term_and_its_gradient(dtype, t_heads, t_kv, s_heads, s_kv, layers,
                                                                      block):
    from kava.distill.losses import TeacherAttention, attention_kl_blockwise

    torch.manual_seed(0)
    steps, lengths = 11, torch.tensor([11, 7, 1, 0])  # padding, a one-token row, an empty row
    queries = [torch.randn(4, t_heads, steps, 4, dtype=dtype) * 2 for _ in range(layers)]
    keys = [torch.randn(4, t_kv, steps, 4, dtype=dtype) * 2 for _ in range(layers)]
    weights = [1.0] if layers == 1 else [0.3, 0.7]
    q = (torch.randn(4, s_heads, steps, 6, dtype=dtype) * 2).requires_grad_()
    k = (torch.randn(4, s_kv, steps, 6, dtype=dtype) * 2).requires_grad_()

    dense = dense_attention_term(queries, keys, weights, 0.5, q, k, lengths, 0.4)
    fast = attention_kl_blockwise(TeacherAttention(queries, keys, weights, 0.5), q, k, lengths, 0.4, block=block)
    assert fast.dtype == dtype and fast.shape == (4, steps)
    tol = {"rtol": 1e-5, "atol": 1e-6} if dtype == torch.float32 else {"rtol": 1e-10, "atol": 1e-12}
    torch.testing.assert_close(fast, dense, **tol)
    assert (fast[1, 7:] == 0).all() and (fast[2, 1:] == 0).all() and (fast[3] == 0).all()  # padded queries
    assert (fast[0, 1:] > 0).all() and (fast[1, 1:7] > 0).all()  # real queries past the first carry a real KL

    upstream = torch.rand(4, steps, dtype=dtype)  # a weighting as the recipe applies, nonzero on padding too
    g_dense = torch.autograd.grad((dense * upstream).sum(), (q, k))
    g_fast = torch.autograd.grad((fast * upstream).sum(), (q, k))
    for a, b in zip(g_fast, g_dense):
        torch.testing.assert_close(a, b, **tol)
    assert (g_fast[0][3] == 0).all() and (g_fast[1][3] == 0).all()  # an empty row learns nothing


def test_attention_kl_blockwise_agrees_with_the_explicit_kl():
    """The chain to the general definition: the blockwise term equals ``attention_kl`` of the two log-probabilities
    (one teacher layer, the student's heads)."""
    from kava.distill.losses import TeacherAttention, attention_kl_blockwise

    torch.manual_seed(1)
    lengths = torch.tensor([6, 3, 1])
    tq, tk = torch.randn(3, 4, 6, 4, dtype=F64), torch.randn(3, 2, 6, 4, dtype=F64)
    q, k = torch.randn(3, 4, 6, 5, dtype=F64), torch.randn(3, 1, 6, 5, dtype=F64)
    explicit = attention_kl(attention_log_probs(tq, tk, lengths, 0.5), attention_log_probs(q, k, lengths, 0.3),
                            lengths)
    fast = attention_kl_blockwise(TeacherAttention([tq], [tk], [1.0], 0.5), q, k, lengths, 0.3, block=2)
    torch.testing.assert_close(fast, explicit)


def test_attention_kl_blockwise_gradcheck():
    from kava.distill.losses import TeacherAttention, attention_kl_blockwise

    torch.manual_seed(2)
    lengths = torch.tensor([5, 3])
    teacher = TeacherAttention([torch.randn(2, 3, 5, 2, dtype=F64) for _ in range(2)],
                               [torch.randn(2, 3, 5, 2, dtype=F64) for _ in range(2)], [0.5, 0.5], 0.7)
    q = torch.randn(2, 4, 5, 3, dtype=F64, requires_grad=True)
    k = torch.randn(2, 2, 5, 3, dtype=F64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda q, k: attention_kl_blockwise(teacher, q, k, lengths, 0.6, block=2), (q, k))


def test_attention_kl_blockwise_keeps_no_token_by_token_tensor_for_backward():
    """What autograd keeps between forward and backward is O(B·H·T·D): no [B, H, T, T] scores or probabilities."""
    from kava.distill.losses import TeacherAttention, attention_kl_blockwise

    batch, heads, steps = 2, 4, 64
    teacher = TeacherAttention([torch.randn(batch, heads, steps, 4)], [torch.randn(batch, 2, steps, 4)], [1.0], 0.5)
    q = torch.randn(batch, heads, steps, 8, requires_grad=True)
    k = torch.randn(batch, 2, steps, 8, requires_grad=True)
    saved: list[int] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        kl = attention_kl_blockwise(teacher, q, k, torch.tensor([64, 40]), 0.3, block=16)
    kl.sum().backward()
    assert saved and max(saved) <= batch * heads * steps * 8 < batch * heads * steps * steps


def test_attention_kl_blockwise_rejects_bad_inputs():
    from kava.distill.losses import TeacherAttention, attention_kl_blockwise

    q, k = torch.randn(2, 4, 6, 8), torch.randn(2, 2, 6, 8)
    teacher = TeacherAttention([torch.randn(2, 4, 5, 4)], [torch.randn(2, 4, 5, 4)], [1.0], 0.5)
    with pytest.raises(ShapeError, match=r"Expected the teacher's queries over the student's batch and tokens "
                                          r"\[2, Ht, 6, Dt\]. Got \(2, 4, 5, 4\) instead"):
        attention_kl_blockwise(teacher, q, k, torch.tensor([6, 6]), 0.3)
    teacher = TeacherAttention([torch.randn(2, 4, 6, 4)], [torch.randn(2, 4, 6, 4)], [1.0], 0.5)
    with pytest.raises(ConfigError, match="Expected block to be an integer >= 1. Got 0 instead"):
        attention_kl_blockwise(teacher, q, k, torch.tensor([6, 6]), 0.3, block=0)
    with pytest.raises(ShapeError, match="multiple of the key heads. Got Hq=4, Hk=3"):
        attention_kl_blockwise(teacher, q, torch.randn(2, 3, 6, 8), torch.tensor([6, 6]), 0.3)
    with pytest.raises(ShapeError, match=r"Expected lengths as an integer tensor of shape \[2\]"):
        attention_kl_blockwise(teacher, q, k, torch.tensor([6.0, 6.0]), 0.3)
    with pytest.raises(ShapeError, match="Expected as many teacher queries, keys and weights, at least one. Got 1, "
                                          "1 and 2 instead"):
        TeacherAttention([torch.randn(2, 4, 6, 4)], [torch.randn(2, 4, 6, 4)], [0.5, 0.5], 0.5)
    with pytest.raises(ShapeError, match="Expected every teacher layer's q and k in one layout"):
        TeacherAttention([torch.randn(2, 4, 6, 4), torch.randn(2, 2, 6, 4)], [torch.randn(2, 2, 6, 4)] * 2,
                         [0.5, 0.5], 0.5)


# ---------------------------------------------------------------------------------------------------------------------
# The attention term of a compressed teacher: over the keys it kept


def naive_kept_attention(queries, keys, kept, weights, t_scaling, q, k, lengths, scaling):
    """Loop by loop: per (batch, student head, query) the teacher heads it mixes, each one's attention renormalised
    over the keys it kept, the union of those keys as the student's support, and the KL there."""
    batch, s_heads, steps, _ = q.shape
    t_heads = queries[0].shape[1]
    share = head_share_matrix(t_heads, s_heads).double() if t_heads != s_heads else torch.eye(t_heads, dtype=F64)
    kl_sum, heads = torch.zeros(batch, steps, dtype=F64), torch.zeros(batch, steps, dtype=F64)
    for b in range(batch):
        for hs in range(s_heads):
            for t in range(int(lengths[b])):
                mixed = [(layer, ht, share[hs, ht].item()) for layer in range(len(queries)) for ht in range(t_heads)
                         if share[hs, ht] > 0]
                group = [t_heads // keys[layer].shape[1] for layer in range(len(queries))]
                if not all(kept[layer][b, ht // group[layer], t] for layer, ht, _ in mixed):
                    continue
                p = torch.zeros(steps, dtype=F64)
                support = torch.zeros(steps, dtype=torch.bool)
                for layer, ht, share_w in mixed:
                    visible = kept[layer][b, ht // group[layer], : t + 1]
                    scores = torch.stack([queries[layer][b, ht, t].double() @ keys[layer][b, ht // group[layer], s]
                                          .double() * t_scaling for s in range(t + 1)])
                    probs = torch.zeros(t + 1, dtype=F64)
                    probs[visible] = torch.softmax(scores[visible], 0)
                    p[: t + 1] += weights[layer] * share_w * probs
                    support[: t + 1] |= visible
                s_kv = hs // (s_heads // k.shape[1])
                s_scores = torch.stack([q[b, hs, t].double() @ k[b, s_kv, s].double() * scaling for s in range(steps)])
                s_logp = torch.full((steps,), -math.inf, dtype=F64)
                s_logp[support] = torch.log_softmax(s_scores[support], 0)
                nz = p > 0
                kl_sum[b, t] += (p[nz] * (p[nz].log() - s_logp[nz])).sum()
                heads[b, t] += 1
    return kl_sum, heads


@pytest.mark.parametrize(("t_heads", "t_kv", "s_heads", "s_kv", "layers"), [(4, 2, 4, 2, 1), (8, 4, 4, 2, 2),
                                                                           (2, 1, 4, 4, 1), (3, 3, 2, 1, 1)])
def test_attention_over_kept_keys_matches_the_loop_reference(t_heads, t_kv, s_heads, s_kv, layers):
    from kava.distill.kept_attention import attention_kl_kept

    torch.manual_seed(2)
    steps, lengths = 9, torch.tensor([9, 6, 0])
    queries = [torch.randn(3, t_heads, steps, 4, dtype=F64) for _ in range(layers)]
    keys = [torch.randn(3, t_kv, steps, 4, dtype=F64) for _ in range(layers)]
    kept = [torch.rand(3, t_kv, steps) < 0.6 for _ in range(layers)]
    for mask in kept:
        mask[:, :, 0] = True  # a sink, as prompts are kept
    weights = [1.0] if layers == 1 else [0.4, 0.6]
    q = torch.randn(3, s_heads, steps, 5, dtype=F64, requires_grad=True)
    k = torch.randn(3, s_kv, steps, 5, dtype=F64, requires_grad=True)
    kl_sum, heads = attention_kl_kept(queries, keys, kept, weights, 0.5, q, k, lengths, 0.4)
    want_sum, want_heads = naive_kept_attention(queries, keys, kept, weights, 0.5, q.detach(), k.detach(), lengths,
                                                0.4)
    torch.testing.assert_close(heads, want_heads)
    torch.testing.assert_close(kl_sum, want_sum, rtol=1e-9, atol=1e-12)
    assert heads.sum() > 0 and (heads[2] == 0).all() and (heads[1, 6:] == 0).all()  # padding never counts
    assert torch.autograd.gradcheck(lambda q, k: attention_kl_kept(queries, keys, kept, weights, 0.5, q, k, lengths,
                                                                   0.4)[0], (q, k))


def test_attention_over_kept_keys_with_everything_kept_is_the_dense_term():
    from kava.distill.kept_attention import attention_kl_kept

    torch.manual_seed(3)
    lengths = torch.tensor([7, 4])
    queries, keys = [torch.randn(2, 8, 7, 4), torch.randn(2, 8, 7, 4)], [torch.randn(2, 4, 7, 4)] * 2
    kept = [torch.ones(2, 4, 7, dtype=torch.bool)] * 2
    q, k = torch.randn(2, 4, 7, 6), torch.randn(2, 2, 7, 6)
    kl_sum, heads = attention_kl_kept(queries, keys, kept, [0.3, 0.7], 0.5, q, k, lengths, 0.4)
    dense = dense_attention_term(queries, keys, [0.3, 0.7], 0.5, q, k, lengths, 0.4)
    torch.testing.assert_close(kl_sum / heads.clamp_min(1), dense, rtol=1e-5, atol=1e-6)
    assert (heads[0] == 4).all() and (heads[1, :4] == 4).all() and (heads[1, 4:] == 0).all()
