"""Report statistics (kava.analysis.stats) against hand-written formulas, a textbook example and coverage.

Oracles: Welch's t with Welch–Satterthwaite degrees of freedom written out here; R's ``t.test`` on the ``sleep``
data; Holm's step-down adjustment by hand; and the frequentist meaning of a 95% interval (coverage).
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from scipy import stats as sps

from kava.analysis.stats import (
    Comparison,
    bootstrap_ci,
    bootstrap_diff_ci,
    compare,
    format_mean_ci,
    holm,
    welch_t,
)
from kava.core.errors import ConfigError


def welch_reference(a, b) -> tuple[float, float]:
    a, b = np.asarray(a, float), np.asarray(b, float)
    va, vb = a.var(ddof=1) / a.size, b.var(ddof=1) / b.size
    t = (a.mean() - b.mean()) / math.sqrt(va + vb)
    df = (va + vb) ** 2 / (va**2 / (a.size - 1) + vb**2 / (b.size - 1))
    return t, 2 * sps.t.sf(abs(t), df)


RNG = np.random.default_rng(1)
CASES = [
    ([0.1, 0.11, 0.12], [0.5, 0.52, 0.49]),
    ([0.41, 0.39, 0.44], [0.40, 0.43, 0.45, 0.42]),
    ([1.0, 2.0], [1.5, 1.6, 1.7, 1.8, 1.9]),
    (RNG.normal(0, 1, 30).tolist(), RNG.normal(0.3, 3, 12).tolist()),
]


@pytest.mark.parametrize(("a", "b"), CASES)
def test_welch_matches_formula(a, b):
    t, p = welch_t(a, b)
    t_ref, p_ref = welch_reference(a, b)
    assert t == pytest.approx(t_ref, rel=1e-12, abs=1e-12)
    assert p == pytest.approx(p_ref, rel=1e-12, abs=1e-12)


@pytest.mark.parametrize(("a", "b"), CASES)
def test_welch_symmetric(a, b):
    t_ab, p_ab = welch_t(a, b)
    t_ba, p_ba = welch_t(b, a)
    assert t_ab == pytest.approx(-t_ba, rel=1e-12)
    assert p_ab == pytest.approx(p_ba, rel=1e-12)


def test_welch_textbook_sleep():
    # R: t.test(extra ~ group, data = sleep) -> t = -1.8608, df = 17.776, p-value = 0.07939
    g1 = [0.7, -1.6, -0.2, -1.2, -0.1, 3.4, 3.7, 0.8, 0.0, 2.0]
    g2 = [1.9, 0.8, 1.1, 0.1, -0.1, 4.4, 5.5, 1.6, 4.6, 3.4]
    t, p = welch_t(g1, g2)
    assert round(t, 4) == -1.8608
    assert round(p, 5) == 0.07939


def test_welch_degenerate():
    assert all(math.isnan(v) for v in welch_t([0.3], [0.1, 0.2]))
    assert all(math.isnan(v) for v in welch_t([0.1, 0.2], []))
    # Identical floats whose numpy variance is ~1e-34, not 0: still the exact zero-variance answer, no warning.
    assert welch_t([0.1, 0.1, 0.1], [0.1, 0.1]) == (0.0, 1.0)
    assert welch_t([0.2, 0.2, 0.2], [0.1, 0.1, 0.1]) == (math.inf, 0.0)
    assert welch_t([0.1, 0.1], [0.2, 0.2]) == (-math.inf, 0.0)
    # One constant side is an ordinary Welch test (the other side carries the variance).
    t, p = welch_t([0.1, 0.1, 0.1], [0.2, 0.3, 0.25])
    assert (t, p) == pytest.approx(welch_reference([0.1, 0.1, 0.1], [0.2, 0.3, 0.25]), rel=1e-12)


def test_bootstrap_ci_basic():
    x = np.random.default_rng(0).normal(5, 1, 20)
    lo, hi = bootstrap_ci(x, n_resamples=1000)
    assert lo < x.mean() < hi
    assert bootstrap_ci(x, n_resamples=1000) == (lo, hi)  # seeded
    assert bootstrap_ci([0.4, 0.4, 0.4]) == (pytest.approx(0.4), pytest.approx(0.4))
    assert all(math.isnan(v) for v in bootstrap_ci([0.4]))
    assert all(math.isnan(v) for v in bootstrap_ci([]))
    # A three-seed sample (the usual report) gets a finite interval, which BCa would not guarantee.
    lo3, hi3 = bootstrap_ci([0.41, 0.39, 0.44])
    assert 0.39 - 1e-12 <= lo3 < hi3 <= 0.44 + 1e-12  # within the data range (float sums aside)


def test_bootstrap_ci_narrows_with_more_data():
    rng = np.random.default_rng(0)
    small, large = rng.normal(0, 1, 10), rng.normal(0, 1, 1000)
    w_small = np.subtract(*bootstrap_ci(small, n_resamples=1000)[::-1])
    w_large = np.subtract(*bootstrap_ci(large, n_resamples=1000)[::-1])
    assert w_large < w_small / 4


def test_bootstrap_ci_coverage():
    rng = np.random.default_rng(123)
    hits = 0
    for i in range(200):
        lo, hi = bootstrap_ci(rng.normal(3.0, 2.0, 50), n_resamples=1000, seed=i)
        hits += lo <= 3.0 <= hi
    # Percentile intervals under-cover slightly at n=50; binomial noise on 200 trials is about ±1.5%.
    assert 0.90 <= hits / 200 <= 0.99


def test_bootstrap_diff_ci():
    rng = np.random.default_rng(0)
    a, b = rng.normal(0.2, 0.02, 5), rng.normal(0.3, 0.02, 4)
    lo, hi = bootstrap_diff_ci(a, b, n_resamples=1000)
    assert 0 < lo < b.mean() - a.mean() < hi
    lo, hi = bootstrap_diff_ci(b, a, n_resamples=1000)
    assert lo < hi < 0
    assert bootstrap_diff_ci([0.1, 0.1], [0.3, 0.3]) == (pytest.approx(0.2), pytest.approx(0.2))
    assert all(math.isnan(v) for v in bootstrap_diff_ci([0.1], [0.2, 0.3]))


def test_holm_by_hand():
    p = [0.01, 0.04, float("nan"), 0.03, 0.005]
    # sorted finite: 0.005*4=0.02, 0.01*3=0.03, 0.03*2=0.06, 0.04*1=0.04 -> running max 0.06
    got = holm(p)
    assert got[0] == pytest.approx(0.03)
    assert got[1] == pytest.approx(0.06)
    assert math.isnan(got[2])
    assert got[3] == pytest.approx(0.06)
    assert got[4] == pytest.approx(0.02)
    assert holm([0.6, 0.7]) == [1.0, 1.0]  # capped at 1
    assert holm([]) == []


def test_compare_rows():
    results = {"kava": [0.5, 0.52, 0.49], "ce": [0.1, 0.11, 0.12], "same": [0.1, 0.11, 0.12], "one": [0.3]}
    rows = compare(results, "ce", n_resamples=1000)
    assert [r.variant for r in rows] == ["ce", "kava", "same", "one"]
    base, kava, same, one = rows
    assert all(r.baseline == "ce" and r.n_baseline == 3 for r in rows)
    assert base.diff == 0 and math.isnan(base.t) and math.isnan(base.p) and not base.significant
    assert kava.significant and kava.t > 0 and kava.p < 0.05
    assert kava.diff == pytest.approx(np.mean(results["kava"]) - 0.11)
    assert kava.diff_ci[0] > 0
    assert kava.std == pytest.approx(np.std(results["kava"], ddof=1))
    assert kava.ci[0] <= kava.mean <= kava.ci[1]
    assert not same.significant and same.p == pytest.approx(1.0)
    assert one.n == 1 and math.isnan(one.std) and math.isnan(one.p) and not one.significant

    # Holm over the three finite tests... one is NaN, so m = 2: kava's p doubles, "same" stays capped at 1.
    assert kava.p_adjusted == pytest.approx(min(1.0, 2 * kava.p))
    raw = compare(results, "ce", correction="none", n_resamples=1000)
    assert raw[1].p_adjusted == raw[1].p


def test_compare_holm_changes_the_decision():
    # Two variants with p between alpha/2 and alpha: significant raw, not after Holm.
    base = [0.0, 0.1, 0.2, 0.3]
    results = {"base": base, "a": [0.25, 0.35, 0.45, 0.5], "b": [0.26, 0.34, 0.44, 0.52]}
    raw = compare(results, "base", correction="none", n_resamples=200)
    adj = compare(results, "base", correction="holm", n_resamples=200)
    assert all(0.025 < r.p < 0.05 for r in raw[1:])
    assert all(r.significant for r in raw[1:])
    assert not any(r.significant for r in adj[1:])
    assert [r.p for r in adj] == pytest.approx([r.p for r in raw], nan_ok=True)


def test_compare_to_dict_json_safe():
    rows = compare({"ce": [0.1, 0.12], "kava": [0.2]}, "ce", n_resamples=200)
    d = rows[1].to_dict()
    assert json.loads(json.dumps(d, allow_nan=False)) == d
    assert d["std"] is None and d["p"] is None and d["ci"] == [None, None]
    assert set(d) == {f.name for f in Comparison.__dataclass_fields__.values()}


def test_compare_errors():
    with pytest.raises(ConfigError, match=r"baseline 'teacher'.*'ce', 'kava'"):
        compare({"ce": [0.1], "kava": [0.2]}, "teacher")
    with pytest.raises(ConfigError, match=r"Variant 'kava' has no values"):
        compare({"ce": [0.1, 0.2], "kava": []}, "ce")
    with pytest.raises(ConfigError, match=r"Found 2 problems:(.|\n)*baseline 'x'(.|\n)*'kava' has no values"):
        compare({"ce": [0.1, 0.2], "kava": []}, "x")
    with pytest.raises(ConfigError, match=r"non-finite"):
        compare({"ce": [0.1, float("nan")]}, "ce")
    with pytest.raises(ConfigError, match=r"correction 'holm' or 'none'"):
        compare({"ce": [0.1, 0.2]}, "ce", correction="bonferroni")
    with pytest.raises(ConfigError, match=r"alpha strictly between 0 and 1"):
        compare({"ce": [0.1, 0.2]}, "ce", alpha=5)
    with pytest.raises(ConfigError, match=r"confidence strictly between 0 and 1"):
        bootstrap_ci([0.1, 0.2], confidence=95)


def test_format_mean_ci():
    c = Comparison(variant="kava", baseline="ce", n=3, n_baseline=3, mean=0.4131, std=0.0212, ci=(0.3889, 0.4362),
                   diff=0.1, diff_ci=(0.05, 0.15), t=3.0, p=0.01, p_adjusted=0.02, significant=True, alpha=0.05)
    assert format_mean_ci(c) == "41.3 ± 2.1 [38.9, 43.6]"
    assert format_mean_ci(c, percent=False, digits=3) == "0.413 ± 0.021 [0.389, 0.436]"
    one = compare({"ce": [0.25]}, "ce")[0]
    assert format_mean_ci(one) == "25.0"
