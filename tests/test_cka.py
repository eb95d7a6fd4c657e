"""CKA: biased linear CKA, unbiased HSIC and the minibatch estimator, and the streaming layer-by-layer accumulator.

The fast forms are checked against naive references written out here: the n x n HKH formula for linear CKA, and
the U-statistic definition of the unbiased HSIC (an explicit sum over ordered 4-tuples of distinct samples).
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from kava.core.errors import ConfigError, ShapeError
from kava.extract.cka import CKAAccumulator, linear_cka, minibatch_cka, unbiased_hsic


def _naive_linear_cka(x: np.ndarray, y: np.ndarray) -> float:
    """``HSIC(K, L) / sqrt(HSIC(K, K) HSIC(L, L))`` with ``HSIC = tr(K H L H)``: the n x n textbook form."""
    n = len(x)
    h = np.eye(n) - np.full((n, n), 1.0 / n)
    k, l = x @ x.T, y @ y.T

    def hsic(a: np.ndarray, b: np.ndarray) -> float:
        return float(np.trace(a @ h @ b @ h))

    return hsic(k, l) / np.sqrt(hsic(k, k) * hsic(l, l))


def _u_statistic_hsic(k: np.ndarray, l: np.ndarray) -> float:
    """Song et al. 2012: HSIC_1 is the U-statistic of ``k_ij l_ij + k_ij l_qr - 2 k_ij l_iq`` over distinct i,j,q,r."""
    n = len(k)
    total = sum(
        k[i, j] * l[i, j] + k[i, j] * l[q, r] - 2 * k[i, j] * l[i, q]
        for i, j, q, r in itertools.permutations(range(n), 4)
    )
    return total / (n * (n - 1) * (n - 2) * (n - 3))


def _random_orthogonal(rng: np.random.Generator, d: int) -> np.ndarray:
    q, r = np.linalg.qr(rng.normal(size=(d, d)))
    return q * np.sign(np.diag(r))


def test_self_similarity_is_one(related):
    x, y = related
    assert linear_cka(x, x) == pytest.approx(1.0, abs=1e-12)
    assert minibatch_cka(np.array_split(y, 5), np.array_split(y, 5)) == pytest.approx(1.0, abs=1e-12)


def test_linear_cka_matches_naive_hkh_formula(related):
    x, y = related
    assert linear_cka(x, y) == pytest.approx(_naive_linear_cka(x, y), abs=1e-6)
    assert 0.0 < linear_cka(x, y) < 1.0


def test_unbiased_hsic_matches_u_statistic_definition():
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(6, 3)), rng.normal(size=(6, 5))
    x[:, 0] += 0.8 * y[:, 0]
    k, l = x @ x.T, y @ y.T
    assert unbiased_hsic(k, l) == pytest.approx(_u_statistic_hsic(k, l), abs=1e-9)
    # The estimator ignores diagonals and, for linear kernels, constant shifts of the features.
    xs = x + 7.0
    assert unbiased_hsic(xs @ xs.T + np.eye(6), l) == pytest.approx(unbiased_hsic(k, l), abs=1e-9)


@pytest.mark.parametrize("estimator", ["biased", "unbiased"])
def test_invariant_to_orthogonal_transform_and_isotropic_scaling(related, estimator):
    x, y = related
    rng = np.random.default_rng(2)
    q = _random_orthogonal(rng, x.shape[1])

    def cka(a: np.ndarray, b: np.ndarray) -> float:
        if estimator == "biased":
            return linear_cka(a, b)
        return minibatch_cka(np.array_split(a, 6), np.array_split(b, 6))

    base = cka(x, y)
    assert cka(x @ q, y) == pytest.approx(base, abs=1e-6)
    assert cka(x * 37.5, y / 1000.0) == pytest.approx(base, abs=1e-6)
    assert cka(3.0 * x @ q, y) == pytest.approx(base, abs=1e-6)


def test_accumulator_biased_equals_linear_cka_on_all_rows(related):
    x, y = related
    rng = np.random.default_rng(3)
    layers_a = [x, x[:, :8] ** 2, x @ rng.normal(size=(24, 40))]  # L_a = 3 layers of widths 24, 8, 40
    layers_b = [y, np.concatenate([y, x[:, :3]], axis=1)]  # L_b = 2 layers of widths 16, 19
    acc = CKAAccumulator(estimators=("biased",))
    # Uneven batches, including a 1-row batch: the biased sums do not care how rows were split.
    bounds = [0, 1, 40, 41, 130, 200, 300]
    for lo, hi in itertools.pairwise(bounds):
        acc.update([a[lo:hi] for a in layers_a], [b[lo:hi] for b in layers_b])
    got = acc.matrix("biased")
    want = np.array([[linear_cka(a, b) for b in layers_b] for a in layers_a])
    assert got.shape == (3, 2) and acc.num_samples == 300 and acc.num_batches == 6
    np.testing.assert_allclose(got, want, atol=1e-6)


def test_accumulator_biased_survives_large_means():
    # Activations with outlier channels have means far above their spread; uncentred float64 sums would lose
    # most digits to "sum x^2 - n mean^2". The accumulator shifts by the first batch's mean, so it does not.
    rng = np.random.default_rng(6)
    x = rng.normal(size=(400, 6))
    y = x @ rng.normal(size=(6, 4)) + rng.normal(size=(400, 4))
    acc = CKAAccumulator(estimators=("biased",))
    for rows in np.array_split(np.arange(400), 8):
        acc.update([x[rows] + 1e7], [y[rows] - 3e6])
    assert acc.matrix("biased")[0, 0] == pytest.approx(linear_cka(x, y), abs=1e-6)


def test_accumulator_unbiased_equals_minibatch_cka(related):
    x, y = related
    layers_a = [x, x[:, ::2]]
    layers_b = [y, y[:, :5], x[:, 3:9]]
    batches = np.array_split(np.arange(300), 12)
    acc = CKAAccumulator()
    for rows in batches:
        acc.update([a[rows] for a in layers_a], [b[rows] for b in layers_b])
    want = np.array(
        [[minibatch_cka([a[r] for r in batches], [b[r] for r in batches]) for b in layers_b] for a in layers_a]
    )
    np.testing.assert_allclose(acc.matrix("unbiased"), want, atol=1e-9)
    # Both estimators were kept; the biased one still matches linear_cka over everything.
    assert acc.matrix("biased")[0, 0] == pytest.approx(linear_cka(x, y), abs=1e-6)


def test_accumulator_takes_torch_tensors_and_flattens_heads(related):
    x, y = related
    acc = CKAAccumulator()
    xt = torch.from_numpy(x).float().reshape(300, 4, 6)  # [n, heads, head_dim]
    for rows in np.array_split(np.arange(300), 3):
        acc.update([xt[rows]], [torch.from_numpy(y[rows])])
    assert acc.matrix("biased")[0, 0] == pytest.approx(linear_cka(x.astype(np.float32), y), abs=1e-6)


def test_biased_cka_is_inflated_when_dimensions_exceed_samples():
    # Independent features: the population CKA is 0. With d >> n the biased estimator is close to 1 instead,
    # while the unbiased minibatch estimator stays near 0.
    rng = np.random.default_rng(4)
    n, d = 64, 2000
    x, y = rng.normal(size=(n, d)), rng.normal(size=(n, d))
    biased = linear_cka(x, y)
    unbiased = minibatch_cka(np.array_split(x, 4), np.array_split(y, 4))
    assert biased > 0.9
    assert abs(unbiased) < 0.1
    assert biased - unbiased > 0.8


def test_fewer_than_four_samples_raises():
    rng = np.random.default_rng(5)
    x = rng.normal(size=(3, 4))
    with pytest.raises(ConfigError, match=r"Expected at least 4 samples per minibatch for the unbiased estimator\. "
                       r"Got 3 instead\."):
        minibatch_cka([x], [x])
    with pytest.raises(ConfigError, match="Expected at least 4 samples per minibatch"):
        unbiased_hsic(x @ x.T, x @ x.T)
    acc = CKAAccumulator()
    with pytest.raises(ConfigError, match="Got 3 instead"):
        acc.update([x], [x])
    assert acc.num_batches == 0  # a refused batch adds nothing


def test_input_errors():
    x = np.zeros((10, 3))
    with pytest.raises(ShapeError, match="same number of rows"):
        linear_cka(x, x[:9])
    with pytest.raises(ShapeError, match=r"shape \[n, d\]"):
        linear_cka(np.zeros(10), x)
    acc = CKAAccumulator(estimators=("biased",))
    with pytest.raises(ConfigError, match="at least one update"):
        acc.matrix("biased")
    with pytest.raises(ConfigError, match="CKAAccumulator\\(estimators="):
        acc.matrix("unbiased")
    with pytest.raises(ConfigError, match="one of biased, unbiased"):
        acc.matrix("rbf")  # type: ignore[arg-type]
    acc.update([x], [x])
    with pytest.raises(ShapeError, match="layer widths of the first update"):
        acc.update([x[:, :2]], [x])
    # Constant features: CKA is undefined, reported as NaN without a warning (warnings are errors here).
    assert np.isnan(linear_cka(x, np.random.default_rng(0).normal(size=(10, 2))))
