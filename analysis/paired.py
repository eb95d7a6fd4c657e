"""Paired statistics for a `kava run`: students of one seed share initial weights and batch order, and every
student answers the same eval items, so a variant is compared with the baseline pair by pair.

- :func:`paired_t`: the paired t-test on per-seed scores (seeds matched by number, :func:`match_seeds`), with the
  t-based confidence interval of the mean per-seed difference. The primary test of a report.
- :func:`mcnemar_exact`: McNemar's exact test on item-level correctness within one seed, and
  :func:`mcnemar_pooled` over seeds (items matched by id, :func:`match_items`).
- :func:`paired_bootstrap_items`: a bootstrap over items of per-item differences (e.g. reference NLL), seeds
  averaged per item.
- :func:`compare_paired`: the paired t-test of every variant against one baseline, Holm–Bonferroni across the
  variants (:func:`kava.analysis.stats.holm`), and Welch's unpaired test kept beside it as a secondary column.

Pure functions of numpy arrays and mappings; bootstrap resamples come from a seeded generator. Each test is checked
against scipy, statsmodels and R values in ``tests/test_stats.py``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from scipy import stats

from kava.analysis.stats import NAN, as_1d, bootstrap_ci, check_level, holm, json_safe, welch_t
from kava.core.errors import ConfigError, ShapeError

__all__ = [
    "McNemar",
    "PairedComparison",
    "PairedT",
    "compare_paired",
    "match_items",
    "match_seeds",
    "mcnemar_exact",
    "mcnemar_pooled",
    "paired_bootstrap_items",
    "paired_t",
]


def match_seeds(variant: Mapping[int, float], baseline: Mapping[int, float], *, name: str = "variant",
                baseline_name: str = "baseline") -> tuple[list[int], np.ndarray, np.ndarray]:
    """Pair a variant's per-seed scores with the baseline's by seed number.

    Args:
        variant, baseline: ``{seed: score}``.
        name, baseline_name: how the error message calls them.

    Returns:
        ``(seeds, a, b)``: the seeds in ascending order and the ``[S]`` scores of the variant and the baseline.

    Raises:
        ConfigError: the two hold different seeds (a paired test has nothing to pair a lone seed with).
    """
    if set(variant) != set(baseline):
        raise ConfigError(
            f"Expected {name!r} and its baseline {baseline_name!r} to share their seeds (a paired test compares "
            f"students that start from the same weights and batch order). Got {name!r}: {sorted(variant)}, "
            f"{baseline_name!r}: {sorted(baseline)} instead. Run the missing seeds or drop the extra ones.")
    seeds = sorted(variant)
    return seeds, as_1d([variant[s] for s in seeds]), as_1d([baseline[s] for s in seeds])


def match_items(a: Mapping[str, Any], b: Mapping[str, Any], *, name: str = "a",
                other: str = "b") -> tuple[list[str], list[Any], list[Any]]:
    """Pair two ``{item id: value}`` mappings by item id; ``(ids, a values, b values)`` in sorted id order.

    Raises ConfigError when the id sets differ (the two were scored on different items).
    """
    if set(a) != set(b):
        only_a, only_b = sorted(set(a) - set(b)), sorted(set(b) - set(a))
        raise ConfigError(
            f"Expected {name} and {other} to be scored on the same items. Got {len(only_a)} items only in {name} "
            f"({only_a[:3]}) and {len(only_b)} only in {other} ({only_b[:3]}) instead. Evaluate both on one split.")
    ids = sorted(a)
    return ids, [a[i] for i in ids], [b[i] for i in ids]


@dataclass(frozen=True)
class PairedT:
    """A paired t-test of ``a`` against ``b``: the mean of the pairwise differences ``a - b`` against 0."""

    t: float
    """t statistic, positive when ``mean(a) > mean(b)``."""
    df: int
    """Degrees of freedom, pairs - 1."""
    p: float
    """Two-sided p-value."""
    diff: float
    """Mean of ``a - b`` (equal to ``mean(a) - mean(b)``)."""
    ci: tuple[float, float]
    """t-based confidence interval of ``diff``: ``diff ± t_{df, (1+confidence)/2} · sd(a - b) / sqrt(n)``."""


def paired_t(a: Sequence[float] | np.ndarray, b: Sequence[float] | np.ndarray, *,
             confidence: float = 0.95) -> PairedT:
    """Paired (dependent-samples) t-test, two-sided, as ``scipy.stats.ttest_rel`` and R's ``t.test(paired=TRUE)``.

    Args:
        a, b: ``[S]`` scores, ``a[i]`` paired with ``b[i]`` (per-seed means of a variant and its baseline).
        confidence: level of the interval of the mean difference.

    Returns:
        :class:`PairedT`. Degenerate inputs get defined answers, as in :func:`welch_t`: fewer than 2 pairs give NaN
        for ``t``, ``p`` and the interval; differences that are all equal (zero variance) give ``t = 0, p = 1`` when
        they are 0 and ``t = ±inf, p = 0`` otherwise, with the interval ``(d, d)``.
    """
    check_level("confidence", confidence)
    a, b = as_1d(a), as_1d(b)
    if a.shape != b.shape:
        raise ShapeError(f"Expected paired scores of equal length. Got {a.size} and {b.size} instead. "
                          "Pair them first (match_seeds).")
    d = a - b  # [S]
    n = d.size
    diff = float(d.mean()) if n else NAN
    if n < 2:
        return PairedT(NAN, max(n - 1, 0), NAN, diff, (NAN, NAN))
    if np.ptp(d) == 0:  # exact equality: identical float differences can still have a variance of ~1e-34
        t, p = (0.0, 1.0) if d[0] == 0 else (math.copysign(math.inf, d[0]), 0.0)
        return PairedT(t, n - 1, p, float(d[0]), (float(d[0]), float(d[0])))
    se = float(np.std(d, ddof=1)) / math.sqrt(n)
    t = diff / se
    p = float(2 * stats.t.sf(abs(t), n - 1))
    half = float(stats.t.ppf((1 + confidence) / 2, n - 1)) * se
    return PairedT(t, n - 1, p, diff, (diff - half, diff + half))


@dataclass(frozen=True)
class McNemar:
    """McNemar's exact test on paired binary outcomes (item right or wrong under model a and model b)."""

    both: int
    """Items both got right."""
    only_a: int
    """Items only ``a`` got right (discordant)."""
    only_b: int
    """Items only ``b`` got right (discordant)."""
    neither: int
    """Items both got wrong."""
    p: float
    """Two-sided exact p-value: ``min(1, 2 · P(X <= min(only_a, only_b)))``, ``X ~ Binomial(only_a + only_b, 1/2)``;
    1 when there is no discordant item."""

    @property
    def table(self) -> list[list[int]]:
        """The 2×2 table ``[[both, only_a], [only_b, neither]]`` (rows: a right/wrong; columns: b right/wrong)."""
        return [[self.both, self.only_a], [self.only_b, self.neither]]

    def to_dict(self) -> dict[str, Any]:
        return json_safe(asdict(self))


def _mcnemar_p(only_a: int, only_b: int) -> float:
    n = only_a + only_b
    if n == 0:
        return 1.0
    # For a fair coin the two tails are mirror images, so doubling the smaller one is the exact two-sided p-value
    # (it equals scipy.stats.binomtest(only_a, n).pvalue).
    return float(min(1.0, 2.0 * stats.binom.cdf(min(only_a, only_b), n, 0.5)))


def mcnemar_exact(a: Sequence[bool] | np.ndarray, b: Sequence[bool] | np.ndarray) -> McNemar:
    """McNemar's exact (conditional binomial) test of ``a`` against ``b`` on the same items.

    Args:
        a, b: ``[N]`` correctness of each item under two models, ``a[i]`` and ``b[i]`` the same item
            (pair them by id first: :func:`match_items`).

    Returns:
        :class:`McNemar`: the 2×2 counts and the two-sided exact p-value. Under the null hypothesis that the two
        models are equally accurate, each discordant item (right under one model only) is equally likely to favour
        either; the concordant items carry no information. Equal to statsmodels'
        ``mcnemar(table, exact=True)``.
    """
    a, b = np.asarray(a, dtype=bool).reshape(-1), np.asarray(b, dtype=bool).reshape(-1)
    if a.shape != b.shape:
        raise ShapeError(f"Expected paired outcomes of equal length. Got {a.size} and {b.size} instead. "
                          "Pair them by item id first (match_items).")
    only_a, only_b = int(np.sum(a & ~b)), int(np.sum(~a & b))
    return McNemar(int(np.sum(a & b)), only_a, only_b, int(np.sum(~a & ~b)), _mcnemar_p(only_a, only_b))


def mcnemar_pooled(per_seed: Sequence[McNemar]) -> McNemar:
    """McNemar's exact test pooled over seeds: the per-seed tables summed, the exact binomial on the summed
    discordant counts.

    This is the exact form of the Mantel–Haenszel test with every (seed, item) pair as its own stratum, which for
    matched pairs reduces to McNemar on the pooled discordant counts. It assumes that, under the null hypothesis,
    every discordant (seed, item) pair favours either model with probability 1/2 independently of the others —
    across seeds too, although the seeds answer the same items (students of different seeds are independent
    training runs; an item that is hard stays hard, but which model wins a discordant pair is what is tested).
    Summing keeps every seed's evidence, where a test on items averaged over seeds would discard the seeds on which
    both models agree per item. Read it together with the per-seed tests and the paired t-test, which treat the
    seed as the unit.
    """
    if not per_seed:
        raise ConfigError("Expected at least one per-seed McNemar table to pool. Got none instead.")
    both, only_a, only_b, neither = (sum(getattr(m, f) for m in per_seed) for f in ("both", "only_a", "only_b",
                                                                                  "neither"))
    return McNemar(both, only_a, only_b, neither, _mcnemar_p(only_a, only_b))


def paired_bootstrap_items(
    a: Sequence[float] | np.ndarray,
    b: Sequence[float] | np.ndarray,
    *,
    weights: Sequence[float] | np.ndarray | None = None,
    confidence: float = 0.95,
    n_resamples: int = 10_000,
    seed: int = 0,
) -> tuple[float, tuple[float, float]]:
    """Paired bootstrap over items of the (weighted) mean per-item difference ``a - b``.

    Each model's per-item scores are first averaged over seeds, then ``d_i = mean_s a[s, i] - mean_s b[s, i]``;
    items are resampled with replacement (pairs stay together) and the statistic is ``sum(w_i d_i) / sum(w_i)``
    over each resample. With per-item NLL rates (nats per token or character) as scores and the item's tokens or
    characters as weights, the statistic is the difference of total nats over total units, the same quantity the
    per-seed means give. Percentile interval; resamples drawn from ``np.random.default_rng(seed)`` (in blocks, so
    memory stays bounded; the draws equal one ``integers(0, N, (n_resamples, N))`` call).

    Args:
        a, b: ``[S, N]`` (seeds × items, same item order) or ``[N]`` per-item scores of the variant and the baseline.
        weights: ``[N]`` non-negative item weights; None weighs items equally.
        confidence, n_resamples, seed: the interval's level, the number of resamples, the generator's seed.

    Returns:
        ``(diff, (low, high))``: the statistic on all items and its interval; the interval is ``(nan, nan)`` for
        fewer than 2 items and ``(d, d)`` when every ``d_i`` equals ``d``.
    """
    check_level("confidence", confidence)
    a, b = np.atleast_2d(np.asarray(a, dtype=float)), np.atleast_2d(np.asarray(b, dtype=float))
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise ShapeError(f"Expected per-item scores [S, N] with the same N items for both models. Got shapes "
                          f"{a.shape} and {b.shape} instead. Pair the items by id first (match_items).")
    n = a.shape[1]
    w = np.ones(n) if weights is None else as_1d(weights)
    problems = []
    if w.shape != (n,) or np.any(w < 0) or (n and w.sum() <= 0):
        problems.append(f"Expected {n} non-negative item weights with a positive sum. Got {w.tolist()[:5]} "
                        f"({w.size} values) instead.")
    if not (np.all(np.isfinite(a)) and np.all(np.isfinite(b))):
        problems.append("Expected finite per-item scores. Got NaN or inf instead. Drop the items that failed.")
    if problems:
        raise ConfigError.from_problems(problems)
    d = a.mean(axis=0) - b.mean(axis=0)  # [N]: seeds averaged per item
    diff = float(np.sum(w * d) / np.sum(w)) if n else NAN
    if n < 2:
        return diff, (NAN, NAN)
    if np.ptp(d) == 0:
        return diff, (float(d[0]), float(d[0]))
    rng = np.random.default_rng(seed)
    stat = np.empty(n_resamples)
    block = max(1, 2**22 // n)  # resamples per block: ~32 MiB of int64 indices at most
    for lo in range(0, n_resamples, block):
        idx = rng.integers(0, n, size=(min(block, n_resamples - lo), n))  # [R, N]
        stat[lo : lo + idx.shape[0]] = np.sum(w[idx] * d[idx], axis=1) / np.sum(w[idx], axis=1)
    tail = (1 - confidence) / 2
    low, high = np.quantile(stat, [tail, 1 - tail])
    return diff, (float(low), float(high))


@dataclass(frozen=True)
class PairedComparison:
    """One variant's per-seed scores against the baseline's, paired by seed; Welch's test beside as secondary."""

    variant: str
    """Name of the variant."""
    baseline: str
    """Name of the baseline it is compared with."""
    seeds: tuple[int, ...]
    """The seeds, ascending; each seed's variant is paired with the same seed's baseline."""
    n: int
    """Number of seeds."""
    mean: float
    """Mean over seeds."""
    std: float
    """Standard deviation over seeds (ddof=1); NaN for one seed."""
    ci: tuple[float, float]
    """Percentile bootstrap CI of the mean over seeds (for the bars of a plot)."""
    diff: float
    """Mean of the per-seed differences to the baseline; 0 for the baseline row."""
    diff_ci: tuple[float, float]
    """Paired t confidence interval of ``diff``."""
    t: float
    """Paired t statistic; NaN for the baseline row."""
    df: int
    """Its degrees of freedom (seeds - 1)."""
    p: float
    """Paired t-test two-sided p-value: the primary test. NaN for the baseline row."""
    p_holm: float
    """``p`` after Holm–Bonferroni across the variants compared with this baseline."""
    significant: bool
    """``p_holm < alpha``; False for the baseline row and for NaN p."""
    welch_t: float
    """Welch's unpaired t statistic (secondary: it ignores the pairing, so it is the weaker test here)."""
    welch_p: float
    """Welch's two-sided p-value, not corrected."""
    alpha: float
    """Significance level used for ``significant``."""

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe dict: tuples become lists and NaN/inf become None."""
        return json_safe(asdict(self))


def compare_paired(
    results: Mapping[str, Mapping[int, float]],
    baseline: str,
    *,
    alpha: float = 0.05,
    confidence: float = 0.95,
    seed: int = 0,
    n_resamples: int = 10_000,
) -> list[PairedComparison]:
    """Compare every variant with ``baseline``, paired by seed.

    Args:
        results: ``{variant: {seed: score}}``; every variant must hold the baseline's seeds.
        baseline: the key of the baseline.
        alpha: significance level, applied to the Holm-adjusted paired p-values.
        confidence: level of the intervals.
        seed, n_resamples: the bootstrap of each mean over seeds.

    Returns:
        One :class:`PairedComparison` per variant, the baseline first (diff 0, tests NaN, not significant), then the
        others in the mapping's order. Every input problem (a missing baseline, unmatched seeds, no or non-finite
        scores, levels out of range) is reported at once as a :class:`ConfigError`.
    """
    problems = []
    if baseline not in results:
        names = ", ".join(repr(k) for k in results) or "(none)"
        problems.append(f"Expected the baseline {baseline!r} among the results. Got {names} instead.")
    for name, scores in results.items():
        values = as_1d(list(scores.values()))
        if values.size == 0:
            problems.append(f"Variant {name!r} has no values. Expected at least one score per seed.")
        elif not np.all(np.isfinite(values)):
            problems.append(f"Variant {name!r} has non-finite values: {dict(scores)}. Drop or fix the failed runs.")
        elif baseline in results and name != baseline:
            try:
                match_seeds(scores, results[baseline], name=name, baseline_name=baseline)
            except ConfigError as e:
                problems.append(str(e))
    for name, level in (("alpha", alpha), ("confidence", confidence)):
        if not 0.0 < level < 1.0:
            problems.append(f"Expected {name} strictly between 0 and 1. Got {level!r} instead.")
    if problems:
        raise ConfigError.from_problems(problems)

    others = [k for k in results if k != baseline]
    paired = {}
    for name in others:
        _, a, b = match_seeds(results[name], results[baseline], name=name, baseline_name=baseline)
        paired[name] = (paired_t(a, b, confidence=confidence), welch_t(a, b))
    adjusted = dict(zip(others, holm([paired[k][0].p for k in others])))

    rows = []
    for name in [baseline, *others]:
        seeds, x, _ = match_seeds(results[name], results[baseline], name=name, baseline_name=baseline)
        common = dict(variant=name, baseline=baseline, seeds=tuple(seeds), n=int(x.size), mean=float(np.mean(x)),
                      std=float(np.std(x, ddof=1)) if x.size >= 2 else NAN,
                      ci=bootstrap_ci(x, confidence=confidence, n_resamples=n_resamples, seed=seed), alpha=alpha)
        if name == baseline:
            rows.append(PairedComparison(**common, diff=0.0, diff_ci=(0.0, 0.0), t=NAN, df=int(x.size) - 1, p=NAN,
                                         p_holm=NAN, significant=False, welch_t=NAN, welch_p=NAN))
            continue
        pt, (wt, wp) = paired[name]
        rows.append(PairedComparison(**common, diff=pt.diff, diff_ci=pt.ci, t=pt.t, df=pt.df, p=pt.p,
                                     p_holm=adjusted[name], significant=bool(adjusted[name] < alpha),  # NaN: False
                                     welch_t=wt, welch_p=wp))
    return rows
