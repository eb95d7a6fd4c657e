"""Statistics for an experiment report: seed-level comparisons of variants against a baseline.

A variant is a list of per-seed scores (e.g. GSM8K accuracy of three seeds). Each variant is compared with the
baseline by Welch's t-test (unequal variances: a distilled student and a CE-only student need not spread alike)
and by percentile-bootstrap confidence intervals of its mean and of its difference to the baseline. Several
variants tested against one baseline are corrected with Holm–Bonferroni by default.

These unpaired tests fit groups that share nothing. Where students of one seed share initial weights and batch
order and all students answer the same items (a `kava run`), the primary tests are the paired ones in
:mod:`kava.analysis.paired`; Welch's test stays beside them as a secondary column.

With the usual handful of seeds these numbers describe the seeds that were run; they are no substitute for more
seeds. Everything here is a pure function of its inputs: bootstrap resamples are drawn from a seeded generator.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
from scipy import stats

from kava.core.errors import ConfigError

if TYPE_CHECKING:
    from kava.analysis.paired import PairedComparison

__all__ = [
    "Comparison",
    "bootstrap_ci",
    "bootstrap_diff_ci",
    "compare",
    "format_mean_ci",
    "holm",
    "welch_t",
]

NAN = float("nan")
# scipy's moment calculation warns on nearly identical data (e.g. three seeds at exactly the same accuracy, whose
# float variance is ~1e-34 rather than 0); the exact-equality cases are handled before scipy is called.
_PRECISION_LOSS = "Precision loss occurred in moment calculation"


def as_1d(x: Sequence[float] | np.ndarray) -> np.ndarray:
    """Scores as a flat float64 array."""
    return np.asarray(x, dtype=float).reshape(-1)


def check_level(name: str, value: float) -> None:
    """Refuse a confidence or significance level outside (0, 1), naming it."""
    if not 0.0 < value < 1.0:
        raise ConfigError(f"Expected {name} strictly between 0 and 1. Got {value!r} instead.")


def welch_t(a: Sequence[float] | np.ndarray, b: Sequence[float] | np.ndarray) -> tuple[float, float]:
    """Welch's unequal-variance t-test of mean(a) against mean(b), two-sided.

    Returns ``(t, p)`` with ``t > 0`` when mean(a) > mean(b). Degenerate inputs get defined answers instead of
    scipy's NaN and warning:

    - fewer than 2 values on either side: ``(nan, nan)`` (no variance estimate);
    - both sides constant (zero variance): the test statistic is ``0/0`` or ``±x/0``; we return ``(0.0, 1.0)``
      when the means are equal and ``(±inf, 0.0)`` otherwise, i.e. constant samples that differ are treated as
      certainly different.
    """
    a, b = as_1d(a), as_1d(b)
    if a.size < 2 or b.size < 2:
        return NAN, NAN
    # Exact equality (peak-to-peak 0), not var == 0: identical floats can still have a variance of ~1e-34.
    if np.ptp(a) == 0 and np.ptp(b) == 0:
        diff = float(a[0] - b[0])
        if diff == 0:
            return 0.0, 1.0
        return math.copysign(math.inf, diff), 0.0
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_PRECISION_LOSS, category=RuntimeWarning)
        res = stats.ttest_ind(a, b, equal_var=False)
    return float(res.statistic), float(res.pvalue)


def bootstrap_ci(
    x: Sequence[float] | np.ndarray,
    *,
    confidence: float = 0.95,
    n_resamples: int = 10_000,
    seed: int = 0,
    statistic: Callable[..., Any] = np.mean,
    method: Literal["percentile", "basic", "BCa"] = "percentile",
) -> tuple[float, float]:
    """Bootstrap confidence interval ``(low, high)`` of ``statistic(x)``.

    The percentile method is the default because BCa breaks down at the sample sizes a report has: with 3 seeds
    there are only 10 distinct resamples, so BCa's bias correction (the share of resamples below the estimate)
    and its jackknife acceleration are estimated from a handful of values and often come out infinite or NaN.
    The percentile interval is always defined, though it under-covers for tiny n.

    ``(nan, nan)`` for fewer than 2 values; ``(v, v)`` with ``v = statistic(x)`` when all values are equal.
    ``statistic`` must accept an ``axis`` keyword to be vectorised (numpy reductions do).
    """
    check_level("confidence", confidence)
    x = as_1d(x)
    if x.size < 2:
        return NAN, NAN
    if np.ptp(x) == 0:
        v = float(statistic(x))
        return v, v
    res = stats.bootstrap(
        (x,), statistic, n_resamples=n_resamples, confidence_level=confidence, method=method,
        rng=np.random.default_rng(seed),
    )
    return float(res.confidence_interval.low), float(res.confidence_interval.high)


def _diff_of_means(a: np.ndarray, b: np.ndarray, axis: int = -1) -> np.ndarray:
    return np.mean(b, axis=axis) - np.mean(a, axis=axis)


def bootstrap_diff_ci(
    a: Sequence[float] | np.ndarray,
    b: Sequence[float] | np.ndarray,
    *,
    confidence: float = 0.95,
    n_resamples: int = 10_000,
    seed: int = 0,
    method: Literal["percentile", "basic", "BCa"] = "percentile",
) -> tuple[float, float]:
    """Bootstrap confidence interval of ``mean(b) - mean(a)``, resampling each group on its own.

    The groups are independent (different seeds train different runs), hence ``paired=False``. Percentile by
    default for the reason given in :func:`bootstrap_ci`. ``(nan, nan)`` when either group has fewer than 2
    values; ``(d, d)`` when both groups are constant.
    """
    check_level("confidence", confidence)
    a, b = as_1d(a), as_1d(b)
    if a.size < 2 or b.size < 2:
        return NAN, NAN
    if np.ptp(a) == 0 and np.ptp(b) == 0:
        d = float(b[0] - a[0])
        return d, d
    res = stats.bootstrap(
        (a, b), _diff_of_means, n_resamples=n_resamples, confidence_level=confidence, method=method,
        paired=False, vectorized=True, rng=np.random.default_rng(seed),
    )
    return float(res.confidence_interval.low), float(res.confidence_interval.high)


def holm(pvalues: Sequence[float]) -> list[float]:
    """Holm–Bonferroni adjusted p-values, in the input order.

    With the m finite p-values sorted ascending, the i-th (0-based) becomes ``min(1, max_{j<=i} (m - j) p_(j))``;
    rejecting where the adjusted value is below alpha controls the family-wise error rate at alpha. NaN entries
    are passed through and do not count towards m.
    """
    p = np.asarray(pvalues, dtype=float).reshape(-1)
    out = np.full(p.shape, np.nan)
    finite = np.flatnonzero(~np.isnan(p))
    m = finite.size
    if m == 0:
        return out.tolist()
    order = finite[np.argsort(p[finite], kind="stable")]
    scaled = (m - np.arange(m)) * p[order]
    out[order] = np.minimum(1.0, np.maximum.accumulate(scaled))
    return out.tolist()


@dataclass(frozen=True)
class Comparison:
    """One variant's scores summarised and tested against the baseline."""

    variant: str
    """Name of the variant (a key of the results mapping)."""
    baseline: str
    """Name of the baseline it is compared with."""
    n: int
    """Number of values (seeds) of the variant."""
    n_baseline: int
    """Number of values (seeds) of the baseline."""
    mean: float
    """Mean over seeds."""
    std: float
    """Standard deviation over seeds (ddof=1); NaN for fewer than 2 values."""
    ci: tuple[float, float]
    """Bootstrap confidence interval of the mean."""
    diff: float
    """``mean - baseline mean``; 0 for the baseline itself."""
    diff_ci: tuple[float, float]
    """Bootstrap confidence interval of ``diff``."""
    t: float
    """Welch t statistic of variant vs baseline; NaN for the baseline row."""
    p: float
    """Raw two-sided Welch p-value; NaN for the baseline row."""
    p_adjusted: float
    """p-value after the multiple-comparison correction (equal to ``p`` with ``correction="none"``)."""
    significant: bool
    """``p_adjusted < alpha``; always False for the baseline row and for NaN p."""
    alpha: float
    """Significance level used for ``significant``."""

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe dict: tuples become lists and NaN/inf become None."""
        return json_safe(asdict(self))


def json_safe(v: Any) -> Any:
    """``v`` with tuples as lists and NaN/inf as None, recursively (``json.dumps(allow_nan=False)`` accepts it)."""
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, (tuple, list)):
        return [json_safe(u) for u in v]
    if isinstance(v, dict):
        return {k: json_safe(u) for k, u in v.items()}
    return v


def compare(
    results: Mapping[str, Sequence[float]],
    baseline: str,
    *,
    alpha: float = 0.05,
    confidence: float = 0.95,
    seed: int = 0,
    correction: Literal["holm", "none"] = "holm",
    n_resamples: int = 10_000,
) -> list[Comparison]:
    """Compare every variant in ``results`` with ``baseline``.

    Returns one :class:`Comparison` per variant: the baseline first (diff 0, t and p NaN, not significant), then
    the others in the mapping's order. ``significant`` uses the Holm-adjusted p-values by default, since several
    variants are tested against the same baseline; ``correction="none"`` uses the raw ones. Every input problem
    is reported at once as a :class:`ConfigError`.
    """
    problems = []
    if baseline not in results:
        names = ", ".join(repr(k) for k in results) or "(none)"
        problems.append(f"Expected the baseline {baseline!r} among the results. Got {names} instead.")
    for name, values in results.items():
        arr = as_1d(values)
        if arr.size == 0:
            problems.append(f"Variant {name!r} has no values. Expected at least one score per variant.")
        elif not np.all(np.isfinite(arr)):
            problems.append(f"Variant {name!r} has non-finite values: {arr.tolist()}. Drop or fix the failed runs.")
    if correction not in ("holm", "none"):
        problems.append(f"Expected correction 'holm' or 'none'. Got {correction!r} instead.")
    for name, level in (("alpha", alpha), ("confidence", confidence)):
        if not 0.0 < level < 1.0:
            problems.append(f"Expected {name} strictly between 0 and 1. Got {level!r} instead.")
    if problems:
        raise ConfigError.from_problems(problems)

    base = as_1d(results[baseline])
    names = [baseline] + [k for k in results if k != baseline]
    tests = {name: welch_t(results[name], base) for name in names[1:]}
    raw = [tests[name][1] for name in names[1:]]
    adjusted = dict(zip(names[1:], holm(raw) if correction == "holm" else raw))

    rows = []
    for name in names:
        x = as_1d(results[name])
        mean = float(np.mean(x))
        if name == baseline:
            diff, diff_ci, t, p, p_adj = 0.0, (0.0, 0.0), NAN, NAN, NAN
        else:
            diff = mean - float(np.mean(base))
            diff_ci = bootstrap_diff_ci(base, x, confidence=confidence, n_resamples=n_resamples, seed=seed)
            (t, p), p_adj = tests[name], adjusted[name]
        rows.append(Comparison(
            variant=name, baseline=baseline, n=int(x.size), n_baseline=int(base.size), mean=mean,
            std=float(np.std(x, ddof=1)) if x.size >= 2 else NAN,
            ci=bootstrap_ci(x, confidence=confidence, n_resamples=n_resamples, seed=seed),
            diff=diff, diff_ci=diff_ci, t=t, p=p, p_adjusted=p_adj,
            significant=bool(p_adj < alpha),  # NaN < alpha is False
            alpha=alpha,
        ))
    return rows


def format_mean_ci(c: Comparison | PairedComparison, *, percent: bool = True, digits: int = 1) -> str:
    """Table cell ``"mean ± std [low, high]"``, e.g. ``"41.3 ± 2.1 [38.9, 43.6]"``.

    Values are scaled by 100 when ``percent``. The ``± std`` part is left out when the std is undefined (one
    seed), and the interval when it is undefined.
    """
    scale = 100.0 if percent else 1.0

    def f(v: float) -> str:
        return f"{v * scale:.{digits}f}"

    text = f(c.mean)
    if math.isfinite(c.std):
        text += f" ± {f(c.std)}"
    if all(math.isfinite(v) for v in c.ci):
        text += f" [{f(c.ci[0])}, {f(c.ci[1])}]"
    return text

