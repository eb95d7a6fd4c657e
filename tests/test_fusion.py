"""Multi-teacher routers against naive per-token loops: availability, all-missing tokens, uniform start, gradients."""

from __future__ import annotations

import math

import pytest
import torch

from kava.core.errors import ConfigError, ShapeError
from kava.distill.fusion import (
    FixedFusion,
    LearnedRouter,
    SimilarityFusion,
    build_fusion,
    masked_softmax,
    router_entropy,
)

B, T, N, F = 2, 4, 3, 5


def inputs(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    similarity = torch.rand(B, T, N, generator=g) * 2 - 1
    features = torch.randn(B, T, F, generator=g)
    available = torch.ones(B, T, N, dtype=torch.bool)
    available[0, 1, 0] = False
    available[0, 2, 1:] = False  # one teacher left
    available[1, 3] = False  # no teacher at all
    return similarity, features, available


def naive_softmax_over_available(logits: torch.Tensor, available: torch.Tensor) -> torch.Tensor:
    out = torch.zeros_like(logits)
    for b in range(logits.shape[0]):
        for t in range(logits.shape[1]):
            idx = [n for n in range(logits.shape[2]) if available[b, t, n]]
            if not idx:
                continue
            exps = [math.exp(float(logits[b, t, n])) for n in idx]
            for n, e in zip(idx, exps):
                out[b, t, n] = e / sum(exps)
    return out


def naive_fixed(weights: list[float], available: torch.Tensor) -> torch.Tensor:
    out = torch.zeros(available.shape)
    for b in range(available.shape[0]):
        for t in range(available.shape[1]):
            total = sum(w for n, w in enumerate(weights) if available[b, t, n])
            for n, w in enumerate(weights):
                if available[b, t, n] and total > 0:
                    out[b, t, n] = w / total
    return out


def assert_valid_weights(w: torch.Tensor, available: torch.Tensor) -> None:
    assert w.shape == available.shape
    assert torch.isfinite(w).all()
    assert (w[~available] == 0).all()
    sums = w.sum(-1)
    any_available = available.any(-1)
    torch.testing.assert_close(sums[any_available], torch.ones_like(sums[any_available]))
    assert (sums[~any_available] == 0).all()


def test_fixed_fusion_matches_naive() -> None:
    similarity, features, available = inputs()
    weights = [2.0, 1.0, 0.0]
    out = FixedFusion(weights)(similarity, features, available)
    torch.testing.assert_close(out, naive_fixed(weights, available))
    # token (0, 2) has only teacher 0; token (0, 1) lost teacher 0 and teacher 2 weighs 0
    torch.testing.assert_close(out[0, 2], torch.tensor([1.0, 0, 0]))
    torch.testing.assert_close(out[0, 1], torch.tensor([0.0, 1, 0]))
    assert (out[1, 3] == 0).all()


def test_fixed_fusion_all_available_is_the_normalised_weights() -> None:
    similarity, features, _ = inputs()
    available = torch.ones(B, T, N, dtype=torch.bool)
    out = FixedFusion([1, 1, 2])(similarity, features, available)
    torch.testing.assert_close(out, torch.tensor([0.25, 0.25, 0.5]).expand(B, T, N))


@pytest.mark.parametrize("bad", [[], [1.0, -0.5], [0.0, 0.0], [1.0, float("nan")]])
def test_fixed_fusion_rejects_bad_weights(bad: list[float]) -> None:
    with pytest.raises(ConfigError, match=r"Expected --fusion-weights to be finite, non-negative and not all zero"):
        FixedFusion(bad)


def test_fixed_fusion_checks_teacher_count_in_forward() -> None:
    similarity, features, available = inputs()
    with pytest.raises(ConfigError, match=r"Expected 2 teachers \(from --fusion-weights\). Got inputs for 3"):
        FixedFusion([1.0, 1.0])(similarity, features, available)


@pytest.mark.parametrize("temperature", [0.1, 1.0, 5.0])
def test_similarity_fusion_matches_naive(temperature: float) -> None:
    similarity, features, available = inputs()
    out = SimilarityFusion(temperature)(similarity, features, available)
    torch.testing.assert_close(out, naive_softmax_over_available(similarity / temperature, available))
    assert_valid_weights(out, available)


def test_similarity_fusion_prefers_the_closest_teacher_and_is_not_trained_through() -> None:
    similarity, features, available = inputs()
    similarity.requires_grad_()
    out = SimilarityFusion(0.01)(similarity, features, available)
    assert not out.requires_grad  # detached: the loss cannot move the routing inputs
    best = similarity.detach().masked_fill(~available, -2).argmax(-1)
    chosen = out.argmax(-1)
    has = available.any(-1)
    assert torch.equal(chosen[has], best[has])


@pytest.mark.parametrize("bad", [0.0, -1.0, float("inf")])
def test_similarity_fusion_rejects_bad_temperature(bad: float) -> None:
    with pytest.raises(ConfigError, match="Expected --fusion-temperature > 0"):
        SimilarityFusion(bad)


def test_learned_router_starts_uniform_over_available() -> None:
    torch.manual_seed(0)
    similarity, features, available = inputs()
    out = LearnedRouter(N, F, hidden=8)(similarity, features, available)
    expected = available.float() / available.float().sum(-1, keepdim=True).clamp_min(1)
    torch.testing.assert_close(out, expected)


def test_learned_router_matches_naive_mlp_after_training_step() -> None:
    torch.manual_seed(0)
    similarity, features, available = inputs()
    router = LearnedRouter(N, F, hidden=8)
    with torch.no_grad():
        for p in router.parameters():
            p.add_(0.3 * torch.randn_like(p))
    out = router(similarity, features, available)
    l1, l2 = router.mlp[0], router.mlp[2]
    logits = torch.zeros(B, T, N)
    with torch.no_grad():
        for b in range(B):
            for t in range(T):
                h = torch.nn.functional.gelu(l1.weight @ features[b, t] + l1.bias)
                logits[b, t] = l2.weight @ h + l2.bias
    torch.testing.assert_close(out, naive_softmax_over_available(logits, available))
    assert_valid_weights(out, available)


def test_learned_router_gradients_reach_parameters_not_features() -> None:
    torch.manual_seed(0)
    similarity, features, available = inputs()
    features.requires_grad_()
    router = LearnedRouter(N, F, hidden=8)
    target = torch.randn(B, T, N)
    out = router(similarity, features, available)
    (out * target).sum().backward()
    assert features.grad is None
    last = router.mlp[2]
    assert last.weight.grad is not None and last.weight.grad.abs().sum() > 0
    assert all(torch.isfinite(p.grad).all() for p in router.parameters())
    # The token with no teacher contributes nothing: its output and its gradient are exactly 0.
    assert (out[1, 3] == 0).all()
    router.zero_grad()
    mask = torch.zeros(B, T, N)
    mask[1, 3] = 1.0
    (router(similarity, features, available) * mask).sum().backward()
    assert all((p.grad == 0).all() for p in router.parameters())


def test_learned_router_gradcheck() -> None:
    torch.manual_seed(0)
    similarity, features, available = inputs()
    router = LearnedRouter(N, F, hidden=3).double()
    with torch.no_grad():
        for p in router.parameters():
            p.add_(0.3 * torch.randn_like(p))
    names = [name for name, _ in router.named_parameters()]
    params = tuple(p.detach().clone().requires_grad_() for p in router.parameters())

    def fn(*ps: torch.Tensor) -> torch.Tensor:
        return torch.func.functional_call(router, dict(zip(names, ps)), (similarity, features.double(), available))

    assert torch.autograd.gradcheck(fn, params)


def test_learned_router_rejects_bad_sizes() -> None:
    with pytest.raises(ConfigError, match="Expected hidden to be a positive integer. Got 0"):
        LearnedRouter(2, 4, hidden=0)
    similarity, features, available = inputs()
    with pytest.raises(ShapeError, match="Expected features with 7 channels. Got 5"):
        LearnedRouter(N, 7)(similarity, features, available)
    with pytest.raises(ShapeError, match=r"Expected similarity \[B, T, N\] and a bool mask"):
        LearnedRouter(N, F)(similarity, features, available.float())


def test_masked_softmax_all_unavailable_has_finite_gradients() -> None:
    logits = torch.randn(2, 3, requires_grad=True)
    available = torch.tensor([[False, False, False], [True, False, True]])
    out = masked_softmax(logits, available)
    assert (out[0] == 0).all()
    torch.testing.assert_close(out[1].sum(), torch.tensor(1.0))
    (out * torch.randn(2, 3)).sum().backward()
    assert torch.isfinite(logits.grad).all()
    assert (logits.grad[0] == 0).all() and logits.grad[1, 1] == 0


def naive_entropy(weights: torch.Tensor, mask: torch.Tensor) -> float:
    values = []
    for b in range(weights.shape[0]):
        for t in range(weights.shape[1]):
            ws = [float(w) for w in weights[b, t] if w > 0]
            if mask[b, t] and ws:
                values.append(-sum(w * math.log(w) for w in ws))
    return sum(values) / len(values) if values else 0.0


def test_router_entropy_matches_naive() -> None:
    similarity, features, available = inputs()
    weights = SimilarityFusion(1.0)(similarity, features, available)
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[0, 0] = False
    out = router_entropy(weights, mask)
    assert out.item() == pytest.approx(naive_entropy(weights, mask), rel=1e-6)
    uniform = torch.full((1, 2, 4), 0.25)
    assert router_entropy(uniform, torch.ones(1, 2)).item() == pytest.approx(math.log(4))


def test_router_entropy_is_zero_without_tokens_and_has_finite_gradients() -> None:
    weights = torch.zeros(1, 3, 2, requires_grad=True)
    out = router_entropy(weights, torch.ones(1, 3, dtype=torch.bool))
    assert out.item() == 0.0
    out.backward()
    assert torch.isfinite(weights.grad).all()
    one_hot = torch.tensor([[[1.0, 0.0]]], requires_grad=True)
    out = router_entropy(one_hot, torch.ones(1, 1))
    assert out.item() == 0.0
    out.backward()
    assert torch.isfinite(one_hot.grad).all()


def test_build_fusion_kinds_and_errors() -> None:
    assert isinstance(build_fusion("fixed", 2), FixedFusion)
    assert isinstance(build_fusion("similarity", 2, temperature=0.5), SimilarityFusion)
    assert isinstance(build_fusion("learnable", 2, feature_dim=4, hidden=3), LearnedRouter)
    torch.testing.assert_close(build_fusion("fixed", 2).weights, torch.tensor([0.5, 0.5]))
    with pytest.raises(ConfigError, match=r"Expected --fusion to be one of fixed, similarity, learnable\. Got 'mean'"):
        build_fusion("mean", 2)
    with pytest.raises(ConfigError, match=r"one entry per teacher \(3\)\. Got 2"):
        build_fusion("fixed", 3, weights=[1.0, 2.0])
    with pytest.raises(ConfigError, match="Expected feature_dim for --fusion learnable"):
        build_fusion("learnable", 2)
    with pytest.raises(ConfigError, match="Expected at least one teacher. Got num_teachers=0"):
        build_fusion("fixed", 0)
