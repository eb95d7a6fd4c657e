"""Layer similarity with linear CKA, for choosing which teacher layers feed which student layer.

Centred Kernel Alignment compares two sets of features of the *same* ``n`` inputs (here: token-aligned rows of
a teacher layer and a student layer), regardless of their widths. Two estimators, and every number this module
returns is tagged by the caller with the one it came from (``"biased"`` or ``"unbiased"``):

- **biased** — linear CKA of Kornblith et al. 2019, from the biased HSIC of centred features:
  ``CKA = ||Y^T X||_F^2 / (||X^T X||_F ||Y^T Y||_F)``. Computed in feature space (``d x d`` products), so
  ``n`` can be millions of tokens. It is **inflated when samples are few and dimensions many**: for independent
  random features with ``d >> n`` it approaches 1, not 0, because the ``n x n`` Gram matrices of any two such
  sets are both close to a multiple of the identity.
- **unbiased** — the minibatch estimator of Nguyen, Raghu & Kornblith 2021: the unbiased HSIC of Song et al.
  2012 (``HSIC_1``, Gram matrices with zeroed diagonals, needs ``n >= 4``) summed over minibatches,
  ``CKA = sum_b HSIC_1(K_b, L_b) / sqrt(sum_b HSIC_1(K_b, K_b) * sum_b HSIC_1(L_b, L_b))``. Near 0 for
  independent features at any width; it can be slightly negative, and it is undefined (NaN) when a
  self-similarity sum is not positive.

Inputs are numpy arrays or torch tensors ``[n, d]`` (trailing dimensions are flattened, so ``[n, heads,
head_dim]`` works); the math runs in float64 torch on the tensor's own device (numpy arrays on the CPU), and
results come back as Python floats or float64 numpy arrays. Nothing here is differentiable.

A result is NaN where CKA is undefined: a layer whose features are constant over the samples.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy as np
import torch

from kava.core.errors import ConfigError, ShapeError

__all__ = ["ESTIMATORS", "CKAAccumulator", "Estimator", "linear_cka", "minibatch_cka", "unbiased_hsic"]

Estimator = Literal["biased", "unbiased"]
ESTIMATORS: tuple[str, ...] = ("biased", "unbiased")
MIN_UNBIASED_SAMPLES = 4
"""The unbiased HSIC divides by ``n (n - 3)`` and ``(n - 1)(n - 2)``."""

Features = np.ndarray | torch.Tensor


# --------------------------------------------------------------------------------------------------------------
# Helpers


def _features(x: Features, name: str, device: torch.device | None = None) -> torch.Tensor:
    """``x`` as a float64 torch tensor ``[n, d]`` with trailing dims flattened, on ``device`` (default: its own)."""
    if isinstance(x, torch.Tensor):
        t = x.detach()
    else:
        arr = np.asarray(x, dtype=np.float64)
        # torch.from_numpy warns on read-only arrays (e.g. from zarr or np.broadcast_to); copy those.
        t = torch.from_numpy(arr if arr.flags.writeable else arr.copy())
    if t.ndim < 2:
        raise ShapeError(
            f"Expected {name} with shape [n, d] (samples first). Got shape {tuple(t.shape)} instead. "
            "Add a feature axis with x[:, None] for one feature per sample."
        )
    t = t.reshape(t.shape[0], -1).to(dtype=torch.float64, device=device)
    return t


def _check_rows(x: torch.Tensor, y: torch.Tensor, what: str) -> int:
    if x.shape[0] != y.shape[0]:
        raise ShapeError(
            f"Expected {what} with the same number of rows (token-aligned samples). Got {x.shape[0]} and "
            f"{y.shape[0]} instead. Align the teacher's tokens to the student's first."
        )
    return int(x.shape[0])


def _check_min_batch(n: int) -> None:
    if n < MIN_UNBIASED_SAMPLES:
        raise ConfigError(
            f"Expected at least {MIN_UNBIASED_SAMPLES} samples per minibatch for the unbiased estimator. "
            f"Got {n} instead. Use larger minibatches (hundreds of tokens), or the biased estimator."
        )


def _check_estimator(estimator: str) -> None:
    if estimator not in ESTIMATORS:
        raise ConfigError(f"Expected estimator as one of {', '.join(ESTIMATORS)}. Got {estimator!r} instead.")


def _ratio(num: torch.Tensor, den_sq: torch.Tensor) -> np.ndarray:
    """``num / sqrt(den_sq)`` as float64 numpy, NaN where ``den_sq <= 0`` (CKA undefined), without warnings."""
    num, den_sq = num.cpu().numpy(), den_sq.cpu().numpy()
    out = np.full(np.broadcast(num, den_sq).shape, np.nan)
    ok = den_sq > 0
    np.divide(num, np.sqrt(np.where(ok, den_sq, 1.0)), out=out, where=ok)
    return out


def _hsic1_pairs(k: torch.Tensor, l: torch.Tensor) -> torch.Tensor:
    """Unbiased HSIC (Song et al. 2012, eq. 5) of every pair of Gram matrices.

    Args:
        k: ``[A, n, n]`` Gram matrices; l: ``[B, n, n]``. Diagonals are ignored (zeroed on a copy).

    Returns:
        ``[A, B]`` with ``HSIC_1(K_a, L_b) = [tr(K~ L~) + (1'K~1)(1'L~1) / ((n-1)(n-2)) - 2/(n-2) 1'K~L~1]
        / (n (n-3))``, ``K~`` being ``K`` with a zero diagonal.
    """
    n = k.shape[-1]
    k, l = k.clone(), l.clone()
    k.diagonal(dim1=-2, dim2=-1).zero_()
    l.diagonal(dim1=-2, dim2=-1).zero_()
    # tr(K L) = sum_ij K_ij L_ji: one [A, n^2] x [n^2, B] product gives every pair.
    trace = k.flatten(1) @ l.transpose(-2, -1).flatten(1).T  # [A, B]
    totals = k.sum((-2, -1))[:, None] * l.sum((-2, -1))[None, :]  # (1'K1)(1'L1), [A, B]
    middle = k.sum(-2) @ l.sum(-1).T  # (1'K)(L1), [A, B]
    return (trace + totals / ((n - 1) * (n - 2)) - middle * (2.0 / (n - 2))) / (n * (n - 3))


def _block_sums(mat: torch.Tensor, dims_rows: tuple[int, ...], dims_cols: tuple[int, ...]) -> torch.Tensor:
    """Sum each block of ``mat [sum(dims_rows), sum(dims_cols)]`` → ``[len(dims_rows), len(dims_cols)]``."""
    dev = mat.device
    rows_of = torch.repeat_interleave(torch.arange(len(dims_rows), device=dev), torch.tensor(dims_rows, device=dev))
    cols_of = torch.repeat_interleave(torch.arange(len(dims_cols), device=dev), torch.tensor(dims_cols, device=dev))
    by_row = mat.new_zeros(len(dims_rows), mat.shape[1]).index_add_(0, rows_of, mat)
    return mat.new_zeros(len(dims_rows), len(dims_cols)).index_add_(1, cols_of, by_row)


def _linear_grams(feats: Sequence[torch.Tensor]) -> torch.Tensor:
    """``[L, n, n]`` linear-kernel Gram matrices of per-layer features ``[n, d_l]``.

    Features are centred first: the unbiased HSIC does not change when a constant is added to every sample
    (its U-statistic form cancels it), and centring keeps the float64 sums small when activations have large
    means (outlier channels).
    """
    centred = [x - x.mean(0) for x in feats]
    return torch.stack([c @ c.T for c in centred])


# --------------------------------------------------------------------------------------------------------------
# One pair of feature sets


def linear_cka(x: Features, y: Features) -> float:
    """Linear CKA with the biased HSIC (Kornblith et al. 2019), computed in feature space.

    Args:
        x: ``[n, d1]`` features of ``n`` samples (trailing dims flattened).
        y: ``[n, d2]`` features of the same samples, row for row.

    Returns:
        ``||Y_c^T X_c||_F^2 / (||X_c^T X_c||_F ||Y_c^T Y_c||_F)`` with column-centred ``X_c``, ``Y_c``: a float in
        ``[0, 1]``; NaN when either side is constant over the samples. Cost ``O(n (d1 + d2)^2)``, memory
        ``O((d1 + d2)^2)``: no ``n x n`` matrix. Inflated (biased upwards) when ``n`` is small against ``d``; see
        the module docstring.

    Raises:
        ShapeError: an input is not ``[n, ...]``, or the row counts differ.
        ConfigError: there are fewer than 2 samples.
    """
    xt = _features(x, "x")
    yt = _features(y, "y", device=xt.device)
    n = _check_rows(xt, yt, "x and y")
    if n < 2:
        raise ConfigError(f"Expected at least 2 samples for linear CKA. Got {n} instead.")
    xt, yt = xt - xt.mean(0), yt - yt.mean(0)
    cross = (yt.T @ xt).square().sum()
    den_sq = (xt.T @ xt).square().sum() * (yt.T @ yt).square().sum()
    return float(_ratio(cross, den_sq))


def unbiased_hsic(k: Features, l: Features) -> float:
    """The unbiased HSIC estimator ``HSIC_1`` of Song et al. 2012 on two Gram matrices.

    Args:
        k: ``[n, n]`` Gram (kernel) matrix of the first features, e.g. ``X @ X.T``.
        l: ``[n, n]`` Gram matrix of the second features, same samples.

    Returns:
        ``HSIC_1(K, L)``, with the diagonals of both set to zero as the estimator requires. Unbiased for the
        population HSIC, hence sometimes slightly negative.

    Raises:
        ShapeError: the matrices are not square of the same size.
        ConfigError: ``n < 4``.
    """
    kt = _features(k, "k")
    lt = _features(l, "l", device=kt.device)
    n = _check_rows(kt, lt, "k and l")
    if kt.shape != (n, n) or lt.shape != (n, n):
        raise ShapeError(
            f"Expected two square Gram matrices [n, n]. Got {tuple(kt.shape)} and {tuple(lt.shape)} instead. "
            "Pass X @ X.T, not the features X."
        )
    _check_min_batch(n)
    return float(_hsic1_pairs(kt[None], lt[None])[0, 0])


def minibatch_cka(batches_x: Sequence[Features], batches_y: Sequence[Features]) -> float:
    """Minibatch CKA with the unbiased HSIC and linear kernels (Nguyen, Raghu & Kornblith 2021).

    Args:
        batches_x: minibatches ``[n_b, d1]`` of the first features.
        batches_y: minibatches ``[n_b, d2]`` of the second features, the same samples batch for batch.

    Returns:
        ``sum_b HSIC_1(K_b, L_b) / sqrt(sum_b HSIC_1(K_b, K_b) * sum_b HSIC_1(L_b, L_b))`` with
        ``K_b = X_b X_b^T``, ``L_b = Y_b Y_b^T``; NaN when a self-similarity sum is not positive.

    Raises:
        ShapeError: the batch lists differ in length or are empty, or a batch pair differs in rows.
        ConfigError: a batch has fewer than 4 samples.
    """
    acc = CKAAccumulator(estimators=("unbiased",))
    batches_x, batches_y = list(batches_x), list(batches_y)
    if len(batches_x) != len(batches_y) or not batches_x:
        raise ShapeError(
            f"Expected the same, non-zero number of minibatches on both sides. Got {len(batches_x)} and "
            f"{len(batches_y)} instead."
        )
    for bx, by in zip(batches_x, batches_y):
        acc.update([bx], [by])
    return float(acc.matrix("unbiased")[0, 0])


# --------------------------------------------------------------------------------------------------------------
# Every layer pair, streamed


class CKAAccumulator:
    """Streaming layer-by-layer CKA between two models (``a``, ``b``) over token-aligned minibatches.

    Call :meth:`update` once per minibatch with every layer's features of both models, then :meth:`matrix`.
    Memory does not grow with the number of batches:

    - ``"biased"`` keeps shifted, uncentred moments: per-layer sums ``[d]``, the cross products of all
      of ``a``'s features with all of ``b``'s (``[D_a, D_b]`` with ``D = sum_l d_l``: 28 x 512 by 24 x 128 in
      float64 is 352 MB, twice that while :meth:`matrix` runs) and each layer's own ``[d_l, d_l]``. The result
      equals :func:`linear_cka` on all rows concatenated (up to rounding), however the rows were batched.
    - ``"unbiased"`` keeps ``[L_a, L_b]`` sums of per-batch ``HSIC_1`` terms plus the ``[L_a]``, ``[L_b]``
      self terms; each update builds ``[L, n, n]`` Gram matrices, so keep minibatches to a few thousand rows.
      The result equals :func:`minibatch_cka` over the same batches.

    State lives on the device of the first update's tensors (CPU for numpy); later features are moved there.

    Args:
        estimators: which estimators to accumulate; leaving out ``"biased"`` saves the ``[D_a, D_b]`` matrix.
    """

    def __init__(self, *, estimators: Sequence[str] = ESTIMATORS) -> None:
        estimators = tuple(estimators)
        if not estimators:
            raise ConfigError(f"Expected at least one estimator of {', '.join(ESTIMATORS)}. Got none instead.")
        for e in estimators:
            _check_estimator(e)
        self.estimators: tuple[str, ...] = estimators
        self.num_samples = 0
        self.num_batches = 0
        self._dims_a: tuple[int, ...] = ()
        self._dims_b: tuple[int, ...] = ()
        self._device: torch.device | None = None
        # Biased: moments of (features - shift). The shift is the first batch's mean: the uncentred sums then
        # stay near the centred ones, so "sum - n * mean mean^T" does not cancel catastrophically when
        # activations have large means.
        self._shift_a: torch.Tensor | None = None  # [D_a]
        self._shift_b: torch.Tensor | None = None  # [D_b]
        self._sum_a: torch.Tensor | None = None  # [D_a]
        self._sum_b: torch.Tensor | None = None  # [D_b]
        self._cross: torch.Tensor | None = None  # [D_a, D_b]
        self._self_a: list[torch.Tensor] = []  # [d_a_l, d_a_l] per layer
        self._self_b: list[torch.Tensor] = []  # [d_b_l, d_b_l] per layer
        # Unbiased: HSIC_1 sums over batches.
        self._hsic_ab: torch.Tensor | None = None  # [L_a, L_b]
        self._hsic_aa: torch.Tensor | None = None  # [L_a]
        self._hsic_bb: torch.Tensor | None = None  # [L_b]

    @property
    def shape(self) -> tuple[int, int]:
        """``(L_a, L_b)``: the layer counts seen (``(0, 0)`` before the first update)."""
        return len(self._dims_a), len(self._dims_b)

    def update(self, feats_a: Sequence[Features], feats_b: Sequence[Features]) -> None:
        """Add one minibatch.

        Args:
            feats_a: one ``[n, d_a_l]`` array per layer ``l`` of model ``a``.
            feats_b: one ``[n, d_b_l]`` array per layer of model ``b``; the same ``n`` rows (tokens) as ``a``.

        Raises:
            ShapeError: no layers, rows that differ between layers, or layer counts or widths that differ from
                the first update.
            ConfigError: fewer than 4 rows when accumulating ``"unbiased"``. Nothing is added in either case.
        """
        xs = [_features(x, f"feats_a[{i}]", self._device) for i, x in enumerate(feats_a)]
        device = xs[0].device if xs else self._device
        ys = [_features(y, f"feats_b[{i}]", device) for i, y in enumerate(feats_b)]
        if not xs or not ys:
            raise ShapeError(
                f"Expected features of at least one layer on each side. Got {len(xs)} and {len(ys)} layers instead."
            )
        n = int(xs[0].shape[0])
        for name, t in [(f"feats_a[{i}]", x) for i, x in enumerate(xs)] + [
            (f"feats_b[{i}]", y) for i, y in enumerate(ys)
        ]:
            if t.shape[0] != n:
                raise ShapeError(
                    f"Expected every layer's features with the same rows (tokens) as feats_a[0], {n}. Got "
                    f"{t.shape[0]} for {name} instead. Align the teacher's tokens to the student's first."
                )
        dims_a, dims_b = tuple(int(x.shape[1]) for x in xs), tuple(int(y.shape[1]) for y in ys)
        if self.num_batches and (dims_a, dims_b) != (self._dims_a, self._dims_b):
            raise ShapeError(
                f"Expected the layer widths of the first update, {list(self._dims_a)} and {list(self._dims_b)}. "
                f"Got {list(dims_a)} and {list(dims_b)} instead. Pass every layer, in the same order, each time."
            )
        if "unbiased" in self.estimators:
            _check_min_batch(n)

        if not self.num_batches:
            self._dims_a, self._dims_b, self._device = dims_a, dims_b, device
        if "biased" in self.estimators:
            self._update_biased(xs, ys)
        if "unbiased" in self.estimators:
            self._update_unbiased(xs, ys)
        self.num_samples += n
        self.num_batches += 1

    def _update_biased(self, xs: list[torch.Tensor], ys: list[torch.Tensor]) -> None:
        x, y = torch.cat(xs, dim=1), torch.cat(ys, dim=1)  # [n, D_a], [n, D_b]
        if self._shift_a is None:
            self._shift_a, self._shift_b = x.mean(0), y.mean(0)
            self._sum_a, self._sum_b = torch.zeros_like(self._shift_a), torch.zeros_like(self._shift_b)
            self._cross = x.new_zeros(x.shape[1], y.shape[1])
            self._self_a = [x.new_zeros(d, d) for d in self._dims_a]
            self._self_b = [x.new_zeros(d, d) for d in self._dims_b]
        x, y = x - self._shift_a, y - self._shift_b
        self._sum_a += x.sum(0)
        self._sum_b += y.sum(0)
        # One [D_a, D_b] product instead of L_a * L_b small ones: the blocks are the layer pairs.
        self._cross.addmm_(x.T, y)
        for acc, block in zip(self._self_a, x.split(self._dims_a, dim=1)):
            acc.addmm_(block.T, block)
        for acc, block in zip(self._self_b, y.split(self._dims_b, dim=1)):
            acc.addmm_(block.T, block)

    def _update_unbiased(self, xs: list[torch.Tensor], ys: list[torch.Tensor]) -> None:
        k, l = _linear_grams(xs), _linear_grams(ys)  # [L_a, n, n], [L_b, n, n]
        ab = _hsic1_pairs(k, l)
        aa = torch.stack([_hsic1_pairs(k[i : i + 1], k[i : i + 1])[0, 0] for i in range(len(k))])
        bb = torch.stack([_hsic1_pairs(l[j : j + 1], l[j : j + 1])[0, 0] for j in range(len(l))])
        if self._hsic_ab is None:
            self._hsic_ab, self._hsic_aa, self._hsic_bb = ab, aa, bb
        else:
            self._hsic_ab += ab
            self._hsic_aa += aa
            self._hsic_bb += bb

    def matrix(self, estimator: Estimator) -> np.ndarray:
        """The float64 ``[L_a, L_b]`` CKA matrix: ``out[i, j]`` compares layer ``i`` of ``a`` with layer ``j`` of ``b``.

        Args:
            estimator: ``"biased"`` (linear CKA over all rows seen) or ``"unbiased"`` (minibatch CKA). Required,
                so that whoever stores the matrix knows which one it is.

        Raises:
            ConfigError: unknown estimator, one this accumulator was not asked to keep, or no update yet.
        """
        _check_estimator(estimator)
        if estimator not in self.estimators:
            raise ConfigError(
                f"Expected an estimator this accumulator keeps, {', '.join(self.estimators)}. Got {estimator!r} "
                f"instead. Create it with CKAAccumulator(estimators=({estimator!r}, ...))."
            )
        if not self.num_batches:
            raise ConfigError("Expected at least one update() before matrix(). Got none instead.")
        if estimator == "unbiased":
            return _ratio(self._hsic_ab, self._hsic_aa[:, None] * self._hsic_bb[None, :])
        return self._biased_matrix()

    def _biased_matrix(self) -> np.ndarray:
        n = self.num_samples
        if n < 2:
            raise ConfigError(f"Expected at least 2 samples for linear CKA. Got {n} instead.")
        mean_a, mean_b = self._sum_a / n, self._sum_b / n  # means of the shifted features
        # Centred cross-products, squared; block (i, j) summed is ||Y_j^T X_i||_F^2 (centred).
        cross_sq = (self._cross - n * torch.outer(mean_a, mean_b)).square_()  # [D_a, D_b]
        num = _block_sums(cross_sq, self._dims_a, self._dims_b)  # [L_a, L_b]

        def self_norm_sq(moments: list[torch.Tensor], means: torch.Tensor, dims: tuple[int, ...]) -> torch.Tensor:
            # ||X_c^T X_c||_F^2 per layer, [L]
            return torch.stack(
                [(m - n * torch.outer(mu, mu)).square().sum() for m, mu in zip(moments, means.split(dims))]
            )

        norm_a = self_norm_sq(self._self_a, mean_a, self._dims_a)
        norm_b = self_norm_sq(self._self_b, mean_b, self._dims_b)
        return _ratio(num, norm_a[:, None] * norm_b[None, :])

