"""Layer similarity (CKA) of stored teacher K/V: numpy references, out-of-core CKA over a store, ``kava cka``.

Three layers of code, each checked against the one before it in the tests:

- **References** in numpy float64, written in the textbook ``n x n`` Gram formulation: ``linear_cka_reference``
  (biased HSIC with the centring matrix ``H``, Kornblith et al. 2019), ``unbiased_hsic_reference`` (``HSIC_1`` of
  Song et al. 2012) and ``minibatch_cka_reference`` (Nguyen, Raghu & Kornblith 2021). They cost ``O(n^2)`` memory
  and serve as a test oracle and for small inputs, nothing else.
- **In-memory estimators** ``linear_cka``, ``minibatch_cka`` and ``unbiased_hsic``, re-exported from
  :mod:`kava.extract.cka` so analysis code has one import place. They live in ``extract`` (torch, feature space)
  because extraction's layer-map calibration uses them, and ``extract`` may not import ``analysis``.
- **Out of core**: :func:`store_cka` reads one or two teachers' stored ``k``/``v`` as dask arrays, block by block,
  holding about one stored chunk and one block of tokens per worker thread (plus the CKA accumulator), never the
  whole store; :func:`run_cka` is the ``kava cka`` command around it.

Features of a layer are one token's K (or V, or both concatenated) at that layer, flattened over heads and
head_dim: ``[tokens, layers, heads, head_dim] -> [tokens, layers, heads * head_dim]``, one row per token. A CKA
value is NaN where it is undefined: a layer whose features are constant over the tokens used.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import dask
import dask.array as da
import numpy as np

from kava.core.errors import ConfigError, ShapeError
from kava.extract.cka import linear_cka, minibatch_cka, unbiased_hsic
from kava.kvstore import KVStore
from kava.kvstore.interop import to_dask, to_xarray

from .heatmap import heatmap

__all__ = [
    "ARRAYS", "ESTIMATORS", "CKAResult", "linear_cka", "linear_cka_reference", "minibatch_cka",
    "minibatch_cka_reference", "run_cka", "store_cka", "unbiased_hsic", "unbiased_hsic_reference",
]

ARRAYS: dict[str, tuple[str, ...]] = {"k": ("k",), "v": ("v",), "kv": ("k", "v")}
"""``--array`` choices and the stored arrays each one concatenates along the feature axis."""
ESTIMATORS = ("biased", "unbiased")
MIN_UNBIASED = 4
"""``HSIC_1`` divides by ``n (n - 3)`` and ``(n - 1)(n - 2)``: a block needs at least 4 tokens."""


# --------------------------------------------------------------------------------------------------------------
# numpy references (n x n Gram matrices)


def _rows(x: Any, name: str) -> np.ndarray:
    """``x [n, ...]`` as float64 ``[n, d]``."""
    a = np.asarray(x, dtype=np.float64)
    if a.ndim < 2:
        raise ShapeError(f"Expected {name} with shape [n, d] (samples first). Got shape {a.shape} instead.")
    return a.reshape(a.shape[0], -1)


def _same_rows(x: np.ndarray, y: np.ndarray) -> int:
    if len(x) != len(y):
        raise ShapeError(f"Expected x and y with the same rows (samples). Got {len(x)} and {len(y)} instead.")
    return len(x)


def safe_ratio(num: np.ndarray, den_sq: np.ndarray) -> np.ndarray:
    """``num / sqrt(den_sq)``, NaN where ``den_sq <= 0`` (CKA undefined), without floating-point warnings."""
    num, den_sq = np.broadcast_arrays(np.asarray(num, np.float64), np.asarray(den_sq, np.float64))
    out = np.full(num.shape, np.nan)
    ok = den_sq > 0
    np.divide(num, np.sqrt(np.where(ok, den_sq, 1.0)), out=out, where=ok)
    return out


def linear_cka_reference(x: Any, y: Any) -> float:
    """Linear CKA with the biased HSIC, from the ``n x n`` Gram matrices ``K = X X^T`` and ``L = Y Y^T``.

    ``HSIC(K, L) = tr(K H L H) / (n - 1)^2`` with ``H = I - 11^T / n``, and
    ``CKA = HSIC(K, L) / sqrt(HSIC(K, K) HSIC(L, L))``. ``H K H`` is applied as the removal of row and column
    means (the same matrix without two ``O(n^3)`` products); ``tr(KHLH) = sum((HKH) * (HLH))`` since ``H`` is
    idempotent and both are symmetric. Memory ``O(n^2)``: a reference for small ``n``.

    Args:
        x: ``[n, ...]`` features of ``n`` samples (flattened to ``[n, d1]``).
        y: ``[n, ...]`` features of the same samples.

    Returns:
        CKA in ``[0, 1]``; NaN when either side is constant over the samples.
    """
    xs, ys = _rows(x, "x"), _rows(y, "y")
    n = _same_rows(xs, ys)
    if n < 2:
        raise ConfigError(f"Expected at least 2 samples for linear CKA. Got {n} instead.")

    def centred_gram(a: np.ndarray) -> np.ndarray:
        k = a @ a.T  # [n, n]
        return k - k.mean(0, keepdims=True) - k.mean(1, keepdims=True) + k.mean()  # H K H

    kc, lc = centred_gram(xs), centred_gram(ys)
    scale = (n - 1) ** 2
    hsic_kl, hsic_kk, hsic_ll = (np.sum(kc * lc) / scale, np.sum(kc * kc) / scale, np.sum(lc * lc) / scale)
    return float(safe_ratio(hsic_kl, hsic_kk * hsic_ll))


def unbiased_hsic_reference(k: Any, l: Any) -> float:
    """``HSIC_1`` of Song et al. 2012 (eq. 5) on two ``[n, n]`` Gram matrices, ``n >= 4``.

    ``HSIC_1 = [tr(K~ L~) + (1'K~1)(1'L~1) / ((n-1)(n-2)) - 2/(n-2) 1'K~L~1] / (n (n-3))`` where ``K~``, ``L~``
    are the Gram matrices with zeroed diagonals. Unbiased, hence sometimes slightly negative.
    """
    kt, lt = _rows(k, "k").copy(), _rows(l, "l").copy()
    n = _same_rows(kt, lt)
    if kt.shape != (n, n) or lt.shape != (n, n):
        raise ShapeError(f"Expected two square Gram matrices [n, n]. Got {kt.shape} and {lt.shape} instead.")
    if n < MIN_UNBIASED:
        raise ConfigError(f"Expected at least {MIN_UNBIASED} samples for the unbiased HSIC. Got {n} instead.")
    np.fill_diagonal(kt, 0.0)
    np.fill_diagonal(lt, 0.0)
    one = np.ones(n)
    trace = np.sum(kt * lt.T)  # tr(K~ L~) without the n^3 product
    totals = (one @ kt @ one) * (one @ lt @ one) / ((n - 1) * (n - 2))
    middle = (one @ kt) @ (lt @ one) * 2.0 / (n - 2)  # 1'K~L~1
    return float((trace + totals - middle) / (n * (n - 3)))


def minibatch_cka_reference(batches_x: Sequence[Any], batches_y: Sequence[Any]) -> float:
    """Minibatch CKA (Nguyen et al. 2021): ``sum_b HSIC_1(K_b, L_b) / sqrt(sum_b HSIC_1(K_b, K_b) sum_b
    HSIC_1(L_b, L_b))`` with linear kernels ``K_b = X_b X_b^T``. Every batch needs ``n_b >= 4``; NaN when a
    self-similarity sum is not positive (constant features)."""
    if len(batches_x) != len(batches_y) or not batches_x:
        raise ShapeError(
            f"Expected the same, non-zero number of minibatches on both sides. Got {len(batches_x)} and "
            f"{len(batches_y)} instead."
        )
    kl = kk = ll = 0.0
    for bx, by in zip(batches_x, batches_y):
        xs, ys = _rows(bx, "x"), _rows(by, "y")
        _same_rows(xs, ys)
        k, l = xs @ xs.T, ys @ ys.T
        kl += unbiased_hsic_reference(k, l)
        kk += unbiased_hsic_reference(k, k)
        ll += unbiased_hsic_reference(l, l)
    return float(safe_ratio(kl, kk * ll))


# --------------------------------------------------------------------------------------------------------------
# Out of core


@dataclass(frozen=True)
class CKAResult:
    """A layer x layer CKA matrix computed from a store, with what it was computed from."""

    matrix: np.ndarray
    """float64 ``[L, L']``: ``matrix[i, j]`` compares ``layers[i]`` of ``teacher`` with ``vs_layers[j]``."""
    layers: tuple[int, ...]
    """Teacher layer indices of the rows (the teacher's stored layers)."""
    vs_layers: tuple[int, ...]
    """Layer indices of the columns: ``vs``'s stored layers, or ``layers`` again for a self-similarity."""
    teacher: str
    vs: str | None
    estimator: str
    array: str
    tokens: int
    """Token rows used: aligned (weight > 0) for every teacher involved, within ``segments``."""
    block_tokens: int
    segments: tuple[str, ...] | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: the matrix as nested lists with ``None`` for NaN."""
        d = asdict(self)
        d["matrix"] = [[None if np.isnan(v) else float(v) for v in row] for row in self.matrix]
        d["layers"], d["vs_layers"] = list(self.layers), list(self.vs_layers)
        d["segments"] = None if self.segments is None else list(self.segments)
        return d

    def to_json(self, **extra: Any) -> str:
        """``to_dict()`` plus ``extra`` fields (e.g. ``elapsed_s``) as a JSON document."""
        return json.dumps({**self.to_dict(), **extra}, indent=2)


def _problems(
    store: KVStore, teacher: str, vs: str | None, array: str, estimator: str, block_tokens: int,
    segments: Sequence[str] | None,
) -> list[str]:
    """Every problem with the options, in the CLI's spelling; empty when all is well."""
    problems = []
    names = sorted(store.teachers)
    for flag, name in (("--teacher", teacher), ("--vs", vs)):
        if name is not None and name not in names:
            problems.append(
                f"Expected {flag} to name a teacher of the store {store.where}: one of {names}. Got {name!r} "
                "instead. Extract it first with `kava extract`, or pick one of those."
            )
        elif name is not None and (ev := store.teacher(name).eviction) is not None:
            problems.append(
                f"Expected {flag} to name a teacher that keeps every row. Got {name!r} instead, which keeps a "
                f"{ev.rule} choice of its {', '.join(ev.segments)} rows (budget {ev.budget}): each layer keeps other "
                "tokens, so its layers' rows do not pair. Its CKA matrices from extraction, over the full cache, "
                "are in the store (`kava store info`); or extract it again without --kv-budget."
            )
    if array not in ARRAYS:
        problems.append(f"Expected --array to be one of {list(ARRAYS)}. Got {array!r} instead.")
    if estimator not in ESTIMATORS:
        problems.append(f"Expected --estimator to be one of {list(ESTIMATORS)}. Got {estimator!r} instead.")
    minimum = MIN_UNBIASED if estimator == "unbiased" else 1
    if not isinstance(block_tokens, int) or block_tokens < minimum:
        problems.append(
            f"Expected --block-tokens to be an integer of at least {minimum}"
            + (" for the unbiased estimator (HSIC_1 needs 4 samples a block)" if minimum > 1 else "")
            + f". Got {block_tokens!r} instead. Use hundreds to thousands of tokens."
        )
    known = list(store.manifest.segment_names)
    unknown = [s for s in segments or () if s not in known]
    if unknown:
        problems.append(f"Expected --segments among {known}. Got {unknown} instead.")
    if segments is not None and not segments:
        problems.append(f"Expected at least one segment in --segments, from {known}. Got none instead.")
    return problems


def _segment_list(segments: Sequence[str] | str | None) -> tuple[str, ...] | None:
    """``"prompt,answer"`` (as the CLI passes it) or a sequence of names → a tuple of names."""
    if segments is None:
        return None
    if isinstance(segments, str):
        segments = [s.strip() for s in segments.split(",") if s.strip()]
    return tuple(segments)


def _token_index(store: KVStore, teachers: Sequence[str], segments: tuple[str, ...] | None) -> np.ndarray:
    """Sorted int64 token rows where every teacher's ``align_weight > 0`` and the segment is wanted.

    Tokens with zero weight carry no teacher data (unaligned tokens, quarantined samples: their rows are zeros).
    This is the one ``O(T)`` read: 4 bytes of weight and 1 of segment id per token, 8 per kept index.
    """
    keep = np.ones(store.num_tokens, dtype=bool)  # [T]
    for name in teachers:
        ds = to_xarray(store, name)
        keep &= ds["align_weight"].values > 0
    if segments is not None:
        ids = [store.manifest.segment_names.index(s) for s in segments]
        keep &= np.isin(ds["segment_id"].values, ids)  # the grid's segment ids, the same for every teacher
    return np.flatnonzero(keep)


def _stored(store: KVStore, teacher: str, array: str) -> Any:
    """Lazy dask features ``[T, L, d]`` on the whole token grid, in the stored chunks and dtype (float16 unless
    decoded); ``d = heads * head_dim``, twice that for ``kv``."""
    parts = []
    for name in ARRAYS[array]:
        x = to_dask(store, teacher, name)  # [T, L, H, D]
        parts.append(x.reshape(x.shape[0], x.shape[1], -1))  # [T, L, H*D]
    return parts[0] if len(parts) == 1 else da.concatenate(parts, axis=2)


def _blocks(x: np.ndarray, y: np.ndarray | None, block_tokens: int) -> Iterator[tuple[np.ndarray, np.ndarray | None]]:
    """Consecutive float64 blocks ``[<= block_tokens, L, d]`` of one dask chunk (and of ``y``'s, row for row)."""
    for start in range(0, len(x), block_tokens):
        rows = slice(start, start + block_tokens)
        yield x[rows].astype(np.float64), None if y is None else y[rows].astype(np.float64)


def _chunk_sum(x: np.ndarray, *, block_tokens: int) -> np.ndarray:
    """``[1, L, d]``: the float64 sum of a chunk's rows (for the global mean)."""
    out = np.zeros((1, *x.shape[1:]))
    for block, _ in _blocks(x, None, block_tokens):
        out[0] += block.sum(0)
    return out


def _chunk_moments(x: np.ndarray, y: np.ndarray | None = None, *, mx: np.ndarray, my: np.ndarray | None,
                   block_tokens: int) -> np.ndarray:
    """A chunk's centred second moments, flattened into one ``[1, P]`` row (one tree reduction sums them all).

    Self-similarity (``y=None``): ``X_c^T X_c`` ``[L d, L d]``, ``P = (L d)^2``; its diagonal blocks are the self
    terms. Two teachers: ``X_c^T Y_c`` ``[L d, L' d']`` followed by the per-layer ``X_a^T X_a`` ``[L, d, d]`` and
    ``Y_b^T Y_b`` ``[L', d', d']``. ``X_c = X - mx`` with the global means ``mx [L, d]``, ``my [L', d']``.
    """
    (la, dx), (lb, dy) = x.shape[1:], (x if y is None else y).shape[1:]
    cross = np.zeros((la * dx, lb * dy))
    if y is None:
        for bx, _ in _blocks(x, None, block_tokens):
            xc = (bx - mx).reshape(len(bx), -1)  # [B, L d]
            cross += xc.T @ xc  # one product gives every layer pair
        return cross.reshape(1, -1)
    self_x, self_y = np.zeros((la, dx, dx)), np.zeros((lb, dy, dy))
    for bx, by in _blocks(x, y, block_tokens):
        xc, yc = bx - mx, by - my  # [B, L, d], [B, L', d']
        cross += xc.reshape(len(xc), -1).T @ yc.reshape(len(yc), -1)
        self_x += xc.transpose(1, 2, 0) @ xc.transpose(1, 0, 2)  # per layer X_a^T X_a, [L, d, d]
        self_y += yc.transpose(1, 2, 0) @ yc.transpose(1, 0, 2)  # [L', d', d']
    return np.concatenate([cross.ravel(), self_x.ravel(), self_y.ravel()])[None]


def _chunk_hsic(x: np.ndarray, y: np.ndarray | None = None, *, block_tokens: int) -> np.ndarray:
    """``[1, L + 1, L' + 1]``: :func:`block_hsic` summed over a chunk's blocks (the minibatches)."""
    out = np.zeros((1, x.shape[1] + 1, (x if y is None else y).shape[1] + 1))
    for bx, by in _blocks(x, y, block_tokens):
        out += block_hsic(bx, by)
    return out


def _hsic1_pairs(k: np.ndarray, l: np.ndarray) -> np.ndarray:
    """``HSIC_1`` of every pair of zero-diagonal Gram matrices ``k [A, n, n]``, ``l [B, n, n]`` → ``[A, B]``."""
    n = k.shape[-1]
    trace = k.reshape(len(k), -1) @ l.reshape(len(l), -1).T  # tr(K L) = sum K_ij L_ij for symmetric L
    totals = k.sum((1, 2))[:, None] * l.sum((1, 2))[None, :]  # (1'K1)(1'L1)
    middle = k.sum(1) @ l.sum(1).T  # (1'K)(L1)
    return (trace + totals / ((n - 1) * (n - 2)) - middle * (2.0 / (n - 2))) / (n * (n - 3))


def _grams(x: np.ndarray) -> np.ndarray:
    """Zero-diagonal linear Gram matrices ``[L, n, n]`` of one block ``x [n, L, d]``.

    Centred first: ``HSIC_1`` is unchanged by a constant added to every row, and centring keeps the float64
    sums small when activations have large means.
    """
    xc = (x - x.mean(0)).transpose(1, 0, 2)  # [L, n, d]
    k = xc @ xc.transpose(0, 2, 1)  # batched BLAS products, [L, n, n]
    k[:, np.arange(len(x)), np.arange(len(x))] = 0.0
    return k


def block_hsic(x: np.ndarray, y: np.ndarray | None = None) -> np.ndarray:
    """One token block's HSIC_1 sums, packed as ``[1, L + 1, L' + 1]``.

    ``[0, :L, :L']`` holds ``HSIC_1(K_a, L_b)`` for every pair, ``[0, :L, L']`` the self terms ``HSIC_1(K_a, K_a)``
    and ``[0, L, :L']`` the self terms of ``y`` (one array, so one tree reduction sums all three). ``y=None`` is
    the self-similarity ``y = x``. A block with fewer than 4 rows contributes zeros: it is dropped.
    """
    la, lb = x.shape[1], (x if y is None else y).shape[1]
    out = np.zeros((1, la + 1, lb + 1))
    if len(x) < MIN_UNBIASED:
        return out
    kx = _grams(x)  # [L, n, n]
    ky = kx if y is None else _grams(y)  # [L', n, n]
    out[0, :la, :lb] = _hsic1_pairs(kx, ky)
    if y is None:
        out[0, :la, lb] = out[0, la, :lb] = np.diagonal(out[0, :la, :lb]).copy()
    else:
        out[0, :la, lb], out[0, la, :lb] = _hsic1_self(kx), _hsic1_self(ky)
    return out


def _hsic1_self(k: np.ndarray) -> np.ndarray:
    """``HSIC_1(K_a, K_a)`` of each zero-diagonal Gram matrix ``k [A, n, n]`` → ``[A]`` (the diagonal of
    ``_hsic1_pairs(k, k)`` without its ``A^2`` products)."""
    n = k.shape[-1]
    trace = np.einsum("aij,aij->a", k, k)  # without an [A, n, n] temporary
    totals = np.square(k.sum((1, 2)))
    middle = np.square(k.sum(1)).sum(1)
    return (trace + totals / ((n - 1) * (n - 2)) - middle * (2.0 / (n - 2))) / (n * (n - 3))


def store_cka(
    store: KVStore | str | os.PathLike,
    teacher: str,
    *,
    vs: str | None = None,
    array: str = "k",
    estimator: str = "biased",
    block_tokens: int = 4096,
    segments: Sequence[str] | str | None = None,
) -> CKAResult:
    """Layer x layer CKA of stored teacher features, out of core with dask.

    Rows are the tokens where ``teacher``'s alignment weight is positive (and ``vs``'s, when given; both
    teachers of one store share the token grid, so rows align), optionally only those in ``segments`` (names
    from the store's ``segment_names``: prompt, reasoning, answer, special). Features of layer ``l`` are the
    stored ``array`` (``k``, ``v``, or ``kv`` concatenated) at ``l``, ``d = heads * head_dim`` wide.

    - ``biased``: one pass for the global mean ``mu`` ``[L, d]``; a second accumulates, as a dask tree
      reduction over token blocks, ``C = sum_n (x_n - mu)^T (y_n - mu_y)`` for every layer pair
      ``[L, d, L', d']``; ``CKA_ab = ||C_ab||_F^2 / (||C_aa||_F ||C_bb||_F)``.
    - ``unbiased``: each block of ``block_tokens`` rows gives every layer's Gram matrix ``[n_b, n_b]`` and
      ``HSIC_1`` for every pair; the sums over blocks (a last block under 4 rows is dropped) give the minibatch
      CKA. The value depends on ``block_tokens`` (the minibatch size), the biased one does not.

    Memory (``B = block_tokens``, float64 unless said): the ``O(T)`` token index (about 13 bytes a token), then per
    dask worker thread one dask chunk in the stored dtype (about one stored chunk, ``max(B, chunk_tokens)`` rows)
    and one block ``8 B (L d + L' d')`` of features, plus either the biased accumulator ``8 L d L' d'`` (``8 (L d)^2``
    for a self-similarity; partial sums are added in pairs, so a few are alive) or the unbiased Gram matrices of a
    block ``8 (L + L') B^2`` (``8 L B^2`` for a self-similarity). The store is never loaded whole.

    Args:
        store: an open :class:`~kava.kvstore.KVStore` or its path.
        teacher: the teacher of the rows.
        vs: another teacher of the same store for the columns; None for ``teacher``'s self-similarity.
        array: ``k``, ``v`` or ``kv``.
        estimator: ``biased`` (linear CKA over all rows) or ``unbiased`` (minibatch CKA).
        block_tokens: rows per block (and per minibatch for ``unbiased``).
        segments: segment names to keep (a sequence, or comma-separated); None keeps all.

    Raises:
        ConfigError: unknown teacher, array, estimator or segment, a block size too small, or too few tokens.
        IncompleteError: a teacher with unfinished shards.
    """
    kv = store if isinstance(store, KVStore) else KVStore.open(store)
    segs = _segment_list(segments)
    problems = _problems(kv, teacher, vs, array, estimator, block_tokens, segs)
    if problems:
        raise ConfigError.from_problems(problems)
    index = _token_index(kv, [teacher] if vs is None else [teacher, vs], segs)
    n = len(index)
    needed = MIN_UNBIASED if estimator == "unbiased" else 2
    if n < needed:
        raise ConfigError(
            f"Expected at least {needed} aligned tokens for {estimator} CKA of {teacher!r} in {kv.where}. Got "
            f"{n} instead. Choose more --segments, or check the teacher's alignment weights."
        )
    # A dask chunk holds a whole number of blocks, about one stored chunk's rows: the leaf functions below walk its
    # blocks one at a time (a block is the only float64 copy), and a stored chunk is decoded once however small
    # the blocks are. Both teachers get the same chunks, so their blocks hold the same tokens.
    feats = [_stored(kv, name, array) for name in ([teacher] if vs is None else [teacher, vs])]
    rows = block_tokens * max(1, max(max(f.chunks[0]) for f in feats) // block_tokens)
    feats = [(f[index] if n < f.shape[0] else f).rechunk((rows, -1, -1)) for f in feats]  # [n, L, d]
    x, y = feats[0], (feats[1] if vs is not None else None)

    chunks = (1,) * x.numblocks[0]  # one partial result per dask chunk
    (la, dx), (lb, dy) = x.shape[1:], (x if y is None else y).shape[1:]
    args = (x,) if y is None else (x, y)
    # Partial results are summed in pairs (split_every=2): few accumulators are alive at once.
    if estimator == "biased":
        # Pass 1: global means, so pass 2 sums centred rows (no cancellation between large raw moments).
        sums = [da.map_blocks(_chunk_sum, f, block_tokens=block_tokens, chunks=(chunks, f.shape[1], f.shape[2]),
                              dtype=np.float64).sum(0, split_every=2) for f in args]
        means = [m / n for m in dask.compute(*sums)]  # [L, d], [L', d']
        size = la * dx * lb * dy + (0 if y is None else la * dx * dx + lb * dy * dy)
        moments = da.map_blocks(
            _chunk_moments, *args, mx=means[0], my=means[-1], block_tokens=block_tokens, drop_axis=2,
            chunks=(chunks, (size,)), dtype=np.float64,
        ).sum(0, split_every=2)
        (packed,) = dask.compute(moments)  # [P]
        cross = packed[: la * dx * lb * dy].reshape(la, dx, lb, dy)  # C_ab = X_a^T Y_b, centred
        num = np.square(cross).sum(axis=(1, 3))  # ||C_ab||_F^2, [L, L']
        if y is None:
            den_a = den_b = np.diagonal(num).copy()
        else:
            rest = packed[la * dx * lb * dy :]
            den_a = np.square(rest[: la * dx * dx].reshape(la, -1)).sum(1)  # ||C_aa||_F^2, [L]
            den_b = np.square(rest[la * dx * dx :].reshape(lb, -1)).sum(1)  # [L']
        matrix = safe_ratio(num, den_a[:, None] * den_b[None, :])
    else:
        hsic = da.map_blocks(_chunk_hsic, *args, block_tokens=block_tokens, chunks=(chunks, (la + 1,), (lb + 1,)),
                             dtype=np.float64).sum(0, split_every=2)
        (sums,) = dask.compute(hsic)  # [L + 1, L' + 1], packed as in block_hsic
        matrix = safe_ratio(sums[:la, :lb], sums[:la, lb][:, None] * sums[la, :lb][None, :])

    layers = tuple(kv.teacher(teacher).layers)
    return CKAResult(
        matrix=matrix, layers=layers, vs_layers=layers if vs is None else tuple(kv.teacher(vs).layers),
        teacher=teacher, vs=vs, estimator=estimator, array=array, tokens=n, block_tokens=block_tokens,
        segments=segs,
    )


# --------------------------------------------------------------------------------------------------------------
# kava cka


def output_stem(teacher: str, vs: str | None, array: str, estimator: str, segments: Sequence[str] | None) -> str:
    """``cka-<teacher>[-vs-<other>]-<array>-<estimator>[-<segment>+<segment>]``: the name of every output file."""
    stem = f"cka-{teacher}" + (f"-vs-{vs}" if vs else "") + f"-{array}-{estimator}"
    return stem + (f"-{'+'.join(segments)}" if segments else "")


def _write_csv(path: Path, matrix: np.ndarray, rows: Sequence[str], cols: Sequence[str], corner: str) -> None:
    lines = [",".join([corner, *cols])]
    lines += [",".join([r, *(repr(float(v)) for v in row)]) for r, row in zip(rows, matrix)]
    path.write_text("\n".join(lines) + "\n")


def run_cka(
    store_path: str | os.PathLike,
    teacher: str,
    *,
    vs: str | None = None,
    out: str | os.PathLike,
    array: str = "k",
    estimator: str = "biased",
    block_tokens: int = 4096,
    segments: Sequence[str] | str | None = None,
    log: Callable[[str], None] = print,
) -> CKAResult:
    """``kava cka``: compute :func:`store_cka` and write ``<stem>.npy``, ``.csv``, ``.png`` and ``.json`` to ``out``.

    Every option is checked (all problems reported at once) before anything is computed or written. Files are
    written under temporary names and renamed into place at the end, so ``out`` never holds a half-written one.
    The stem is :func:`output_stem`; the JSON is ``CKAResult.to_dict()`` plus the store and ``elapsed_s``.
    """
    store = KVStore.open(store_path)
    segs = _segment_list(segments)
    problems = _problems(store, teacher, vs, array, estimator, block_tokens, segs)
    if Path(out).exists() and not Path(out).is_dir():
        problems.append(f"Expected --out to be a directory (created when missing). Got the file {str(out)!r} instead.")
    if problems:
        raise ConfigError.from_problems(problems)
    log(
        f"kava cka: store={store.where} teacher={teacher} vs={vs} array={array} estimator={estimator} "
        f"block_tokens={block_tokens} segments={list(segs) if segs else 'all'}"
    )
    start = time.perf_counter()
    result = store_cka(store, teacher, vs=vs, array=array, estimator=estimator, block_tokens=block_tokens,
                       segments=segs)
    elapsed = time.perf_counter() - start
    log(f"kava cka: {result.tokens} tokens, {result.matrix.shape[0]}x{result.matrix.shape[1]} layers, {elapsed:.1f}s")

    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = output_stem(teacher, vs, array, estimator, segs)
    other = vs or teacher
    rows = [f"L{l}" for l in result.layers]
    cols = [f"L{l}" for l in result.vs_layers]
    tmp = {ext: out_dir / f".{stem}.tmp{ext}" for ext in (".npy", ".csv", ".png", ".json")}
    try:
        with open(tmp[".npy"], "wb") as f:
            np.save(f, result.matrix)
        _write_csv(tmp[".csv"], result.matrix, rows, cols, corner=f"{teacher}\\{other}")
        heatmap(
            result.matrix, tmp[".png"],
            title=f"{estimator} CKA of {array}: {teacher}" + (f" vs {vs}" if vs else "")
            + f"\n{result.tokens} tokens, {'+'.join(segs) if segs else 'all segments'}",
            row_label=f"{teacher} layer", col_label=f"{other} layer", row_ticks=rows, col_ticks=cols,
        )
        tmp[".json"].write_text(result.to_json(store=store.where, elapsed_s=round(elapsed, 3)) + "\n")
        for ext, path in tmp.items():
            os.replace(path, out_dir / f"{stem}{ext}")
    finally:
        for path in tmp.values():
            path.unlink(missing_ok=True)
    log(f"kava cka: wrote {out_dir / stem}.{{npy,csv,png,json}}")
    return result
