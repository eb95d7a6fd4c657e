"""Projectors against naive loop references: head sharing, structured and flat maps, parameter counts."""

from __future__ import annotations

from fractions import Fraction

import pytest
import torch

from kava.core.errors import ConfigError, ShapeError
from kava.distill.projectors import (
    FlatProjector,
    KVProjectors,
    StructuredProjector,
    build_projector,
    count_parameters,
    head_share_matrix,
)

HEAD_PAIRS = [(4, 2), (3, 2), (2, 3), (5, 3), (1, 4), (7, 7), (2, 4)]


def naive_share(in_heads: int, out_heads: int) -> list[list[float]]:
    """Interval overlaps with exact fractions, one output head at a time."""
    rows = []
    for j in range(out_heads):
        lo_j, hi_j = Fraction(j, out_heads), Fraction(j + 1, out_heads)
        row = []
        for i in range(in_heads):
            lo_i, hi_i = Fraction(i, in_heads), Fraction(i + 1, in_heads)
            row.append(max(Fraction(0), min(hi_j, hi_i) - max(lo_j, lo_i)))
        total = sum(row)
        rows.append([float(v / total) for v in row])
    return rows


def naive_structured(proj: StructuredProjector, x: torch.Tensor) -> torch.Tensor:
    batch, in_heads, tokens, _ = x.shape
    out = torch.zeros(batch, proj.out_heads, tokens, proj.out_dim, dtype=x.dtype)
    for b in range(batch):
        for j in range(proj.out_heads):
            w = proj.dim_proj if proj.share_dim else proj.dim_proj[j]
            for t in range(tokens):
                mixed = torch.zeros(proj.in_dim, dtype=x.dtype)
                for i in range(in_heads):
                    mixed = mixed + proj.head_mix[j, i] * x[b, i, t]
                out[b, j, t] = w @ mixed
    return out


def naive_flat(proj: FlatProjector, x: torch.Tensor) -> torch.Tensor:
    batch, _, tokens, _ = x.shape
    out = torch.zeros(batch, proj.out_heads, tokens, proj.out_dim, dtype=x.dtype)
    for b in range(batch):
        for t in range(tokens):
            vec = torch.cat([x[b, i, t] for i in range(proj.in_heads)])  # head-major
            y = proj.linear.weight @ vec
            for j in range(proj.out_heads):
                out[b, j, t] = y[j * proj.out_dim : (j + 1) * proj.out_dim]
    return out


@pytest.mark.parametrize(("in_heads", "out_heads"), HEAD_PAIRS)
def test_head_share_matrix_matches_interval_overlaps(in_heads: int, out_heads: int) -> None:
    m = head_share_matrix(in_heads, out_heads)
    assert m.shape == (out_heads, in_heads)
    assert m.dtype == torch.float32
    torch.testing.assert_close(m.sum(1), torch.ones(out_heads))
    torch.testing.assert_close(m, torch.tensor(naive_share(in_heads, out_heads)))


def test_head_share_matrix_documented_rows() -> None:
    torch.testing.assert_close(head_share_matrix(4, 2)[0], torch.tensor([0.5, 0.5, 0.0, 0.0]))
    torch.testing.assert_close(head_share_matrix(3, 2)[0], torch.tensor([2 / 3, 1 / 3, 0.0]))
    torch.testing.assert_close(head_share_matrix(2, 4), torch.tensor([[1.0, 0], [1, 0], [0, 1], [0, 1]]))
    torch.testing.assert_close(head_share_matrix(7, 7), torch.eye(7))


@pytest.mark.parametrize("bad", [0, -1, 2.0, True])
def test_head_share_matrix_rejects_bad_heads(bad: object) -> None:
    with pytest.raises(ConfigError, match="Expected in_heads to be a positive integer"):
        head_share_matrix(bad, 2)  # type: ignore[arg-type]


@pytest.mark.parametrize("share_dim", [True, False])
@pytest.mark.parametrize("init_uniform", [True, False])
@pytest.mark.parametrize(("in_heads", "in_dim", "out_heads", "out_dim"), [(3, 5, 2, 4), (2, 4, 3, 6), (4, 3, 4, 3)])
def test_structured_matches_naive(
    in_heads: int, in_dim: int, out_heads: int, out_dim: int, init_uniform: bool, share_dim: bool
) -> None:
    torch.manual_seed(0)
    proj = StructuredProjector(in_heads, in_dim, out_heads, out_dim, init_uniform=init_uniform, share_dim=share_dim)
    # Perturb so the per-head weights differ from each other and from their init.
    with torch.no_grad():
        for p in proj.parameters():
            p.add_(0.1 * torch.randn_like(p))
    x = torch.randn(2, in_heads, 3, in_dim)
    y = proj(x)
    assert y.shape == (2, out_heads, 3, out_dim)
    with torch.no_grad():
        torch.testing.assert_close(y, naive_structured(proj, x))


def test_structured_accepts_extra_leading_dims() -> None:
    torch.manual_seed(0)
    proj = StructuredProjector(3, 4, 2, 5, share_dim=False)
    x = torch.randn(2, 3, 3, 6, 4)  # [B, L, H, T, D]
    y = proj(x)
    assert y.shape == (2, 3, 2, 6, 5)
    torch.testing.assert_close(y[:, 1], proj(x[:, 1]))


@pytest.mark.parametrize("share_dim", [True, False])
@pytest.mark.parametrize(("in_heads", "out_heads"), [(4, 2), (3, 2), (2, 3), (1, 4)])
def test_uniform_init_with_equal_dims_is_head_averaging(in_heads: int, out_heads: int, share_dim: bool) -> None:
    torch.manual_seed(0)
    proj = StructuredProjector(in_heads, 6, out_heads, 6, share_dim=share_dim)
    x = torch.randn(2, in_heads, 5, 6)
    share = naive_share(in_heads, out_heads)
    expected = torch.stack([sum(share[j][i] * x[:, i] for i in range(in_heads)) for j in range(out_heads)], dim=1)
    with torch.no_grad():
        torch.testing.assert_close(proj(x), expected)
    # 4 -> 2: output head 0 is exactly the mean of input heads 0 and 1
    if (in_heads, out_heads) == (4, 2):
        torch.testing.assert_close(proj(x)[:, 0].detach(), x[:, :2].mean(1))


def test_non_uniform_init_differs() -> None:
    torch.manual_seed(0)
    uniform = StructuredProjector(4, 6, 2, 6)
    random = StructuredProjector(4, 6, 2, 6, init_uniform=False)
    assert not torch.allclose(uniform.head_mix, random.head_mix)
    x = torch.randn(1, 4, 3, 6)
    assert not torch.allclose(uniform(x), random(x))


@pytest.mark.parametrize(("in_dim", "out_dim"), [(8, 4), (4, 8)])
def test_dim_map_starts_semi_orthogonal(in_dim: int, out_dim: int) -> None:
    torch.manual_seed(0)
    proj = StructuredProjector(2, in_dim, 2, out_dim, share_dim=False)
    for w in [proj.dim_proj[0], proj.dim_proj[1]]:
        small = min(in_dim, out_dim)
        gram = w @ w.T if out_dim <= in_dim else w.T @ w
        torch.testing.assert_close(gram.detach(), torch.eye(small), atol=1e-5, rtol=0)


@pytest.mark.parametrize(("in_heads", "in_dim", "out_heads", "out_dim"), [(3, 5, 2, 4), (2, 4, 3, 6)])
def test_flat_matches_naive(in_heads: int, in_dim: int, out_heads: int, out_dim: int) -> None:
    torch.manual_seed(0)
    proj = FlatProjector(in_heads, in_dim, out_heads, out_dim)
    x = torch.randn(2, in_heads, 3, in_dim)
    y = proj(x)
    assert y.shape == (2, out_heads, 3, out_dim)
    with torch.no_grad():
        torch.testing.assert_close(y, naive_flat(proj, x))


def test_structured_gradcheck() -> None:
    torch.manual_seed(0)
    proj = StructuredProjector(3, 3, 2, 2, share_dim=False).double()
    x = torch.randn(1, 3, 2, 3, dtype=torch.float64, requires_grad=True)
    params = (proj.head_mix, proj.dim_proj)

    def fn(x: torch.Tensor, mix: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return torch.func.functional_call(proj, {"head_mix": mix, "dim_proj": w}, (x,))

    assert torch.autograd.gradcheck(fn, (x, *params))


@pytest.mark.parametrize("share_dim", [True, False])
def test_parameter_counts(share_dim: bool) -> None:
    hi, di, ho, do = 7, 5, 3, 4
    structured = build_projector("structured", hi, di, ho, do, share_dim=share_dim)
    expected = ho * hi + (do * di if share_dim else ho * do * di)
    assert count_parameters(structured) == expected
    flat = build_projector("flat", hi, di, ho, do)
    assert count_parameters(flat) == hi * di * ho * do
    kv = KVProjectors("structured", [1, 4, 6], hi, di, ho, do, share_dim=share_dim)
    assert kv.num_parameters() == 2 * 3 * expected
    kv.projectors["k"]["1"].head_mix.requires_grad_(False)
    assert count_parameters(kv, trainable_only=True) == 2 * 3 * expected - ho * hi


def test_build_projector_rejects_unknown_kind() -> None:
    with pytest.raises(ConfigError, match=r"Expected --projector to be one of structured, flat\. Got 'dense'"):
        build_projector("dense", 2, 4, 2, 4)


def test_projector_rejects_wrong_input_shape() -> None:
    proj = StructuredProjector(3, 4, 2, 4)
    with pytest.raises(ShapeError, match=r"Expected a tensor \[\.\.\., 3, T, 4\].*Got shape \(1, 2, 5, 4\)"):
        proj(torch.randn(1, 2, 5, 4))
    with pytest.raises(ConfigError, match="Expected out_dim to be a positive integer. Got 0"):
        FlatProjector(3, 4, 2, 0)


def test_kv_projectors_routes_by_layer_and_kind() -> None:
    torch.manual_seed(0)
    kv = KVProjectors("flat", [0, 2], 2, 4, 3, 5)
    assert set(kv.projectors.keys()) == {"k", "v"}
    assert set(kv.projectors["k"].keys()) == {"0", "2"}
    assert "projectors.v.2.linear.weight" in kv.state_dict()
    x = torch.randn(1, 2, 3, 4)
    torch.testing.assert_close(kv("v", 2, x), kv.projectors["v"]["2"](x))
    assert not torch.allclose(kv("k", 2, x), kv("v", 2, x))  # separate weights
    with pytest.raises(ConfigError, match=r"Expected one of the projected layers \[0, 2\]\. Got layer 1"):
        kv("k", 1, x)
    with pytest.raises(ConfigError, match="Expected which to be 'k' or 'v'. Got 'q'"):
        kv("q", 0, x)
    with pytest.raises(ConfigError, match="distinct non-negative layer indices. Got \\[1, 1\\]"):
        KVProjectors("flat", [1, 1], 2, 4, 3, 5)
    with pytest.raises(ConfigError, match="Expected --projector"):
        KVProjectors("other", [0], 2, 4, 3, 5)
