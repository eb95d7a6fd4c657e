"""Report statistics (kava.analysis.stats, kava.analysis.paired) against references on fixed inputs.

Oracles: Welch's t with Welch–Satterthwaite degrees of freedom written out here; R's ``t.test`` (unpaired and
paired) on the ``sleep`` data; ``scipy.stats.ttest_rel`` and a closed form on 2 df for the paired t-test;
statsmodels' ``mcnemar(exact=True)``, ``scipy.stats.binomtest``, binomial tails by hand and Agresti's approval
table for McNemar; statsmodels' ``multipletests(method="holm")`` and a hand calculation for Holm; a naive loop and
``scipy.stats.bootstrap`` for the paired bootstrap; and the frequentist meaning of a 95% interval (coverage).
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from scipy import stats as sps
from statsmodels.stats.contingency_tables import mcnemar as sm_mcnemar
from statsmodels.stats.multitest import multipletests

from kava.analysis.paired import (
    McNemar,
    PairedComparison,
    compare_paired,
    match_items,
    match_seeds,
    mcnemar_exact,
    mcnemar_pooled,
    paired_bootstrap_items,
    paired_t,
)
from kava.analysis.stats import (
    Comparison,
    bootstrap_ci,
    bootstrap_diff_ci,
    compare,
    format_mean_ci,
    holm,
    welch_t,
)
from kava.core.errors import ConfigError, ShapeError


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


# ---------------------------------------------------------------------------------------------------------------------
# Paired designs (kava.analysis.paired) against scipy, statsmodels and R

PAIRED_CASES = [
    ([0.12, 0.15, 0.13, 0.16, 0.11], [0.22, 0.27, 0.21, 0.25, 0.24]),
    ([0.41, 0.39, 0.44], [0.40, 0.43, 0.45]),
    ([1.0, 2.0], [1.5, 1.6]),
    (RNG.normal(0, 1, 30).tolist(), RNG.normal(0.3, 1, 30).tolist()),
]


@pytest.mark.parametrize(("a", "b"), PAIRED_CASES)
@pytest.mark.parametrize("confidence", [0.95, 0.9])
def test_paired_t_matches_scipy_ttest_rel(a, b, confidence):
    got = paired_t(a, b, confidence=confidence)
    ref = sps.ttest_rel(a, b)
    ci = ref.confidence_interval(confidence_level=confidence)
    assert got.t == pytest.approx(ref.statistic, rel=1e-12)
    assert got.p == pytest.approx(ref.pvalue, rel=1e-12)
    assert got.df == ref.df == len(a) - 1
    assert got.ci == pytest.approx((ci.low, ci.high), rel=1e-12)
    assert got.diff == pytest.approx(np.mean(a) - np.mean(b), rel=1e-12)


def test_paired_t_textbook_sleep_and_by_hand():
    # R: t.test(sleep$extra[1:10], sleep$extra[11:20], paired = TRUE)
    #    t = -4.0621, df = 9, p-value = 0.002833; 95 percent CI -2.4598858 -0.7001142; mean difference -1.58
    g1 = [0.7, -1.6, -0.2, -1.2, -0.1, 3.4, 3.7, 0.8, 0.0, 2.0]
    g2 = [1.9, 0.8, 1.1, 0.1, -0.1, 4.4, 5.5, 1.6, 4.6, 3.4]
    r = paired_t(g1, g2)
    assert (round(r.t, 4), r.df, round(r.p, 6)) == (-4.0621, 9, 0.002833)
    assert (round(r.ci[0], 7), round(r.ci[1], 7), round(r.diff, 2)) == (-2.4598858, -0.7001142, -1.58)
    # Welch on the same data finds nothing (p = 0.079, test_welch_textbook_sleep): the pairing is the evidence.
    # By hand: differences 1, 2, 3 -> mean 2, sd 1, t = 2 / (1 / sqrt 3) = 2 sqrt 3 on 2 df, where the t CDF has the
    # closed form 1/2 + t / (2 sqrt(2 + t^2)), so p = 1 - t / sqrt(2 + t^2) = 1 - sqrt(12 / 14) = 0.0741799...
    r = paired_t([2.0, 4.0, 6.0], [1.0, 2.0, 3.0])
    assert r.t == pytest.approx(2 * math.sqrt(3), rel=1e-12)
    assert r.p == pytest.approx(1 - math.sqrt(12 / 14), rel=1e-12)
    # CI: 2 ± t_{2, 0.975} / sqrt 3, with t_{2, 0.975} = 4.302653 (tables; R: qt(0.975, 2))
    assert r.ci == pytest.approx((2 - 4.302653 / math.sqrt(3), 2 + 4.302653 / math.sqrt(3)), rel=1e-6)


def test_paired_t_degenerate():
    one = paired_t([0.3], [0.1])
    assert math.isnan(one.t) and math.isnan(one.p) and one.diff == pytest.approx(0.2) and math.isnan(one.ci[0])
    same = paired_t([0.1, 0.2, 0.3], [0.1, 0.2, 0.3])
    assert (same.t, same.p, same.ci) == (0.0, 1.0, (0.0, 0.0))
    shifted = paired_t([0.5, 0.5], [0.25, 0.25])  # every seed ahead by exactly 0.25 (exact in binary)
    assert (shifted.t, shifted.p, shifted.ci) == (math.inf, 0.0, (0.25, 0.25))
    with pytest.raises(ShapeError, match="paired scores of equal length. Got 2 and 3 instead"):
        paired_t([0.1, 0.2], [0.1, 0.2, 0.3])


def test_match_seeds_pairs_by_seed_number_and_refuses_unmatched_seeds():
    seeds, a, b = match_seeds({3: 0.3, 1: 0.1, 2: 0.2}, {2: 0.25, 3: 0.35, 1: 0.15})
    assert seeds == [1, 2, 3] and a.tolist() == [0.1, 0.2, 0.3] and b.tolist() == [0.15, 0.25, 0.35]
    with pytest.raises(ConfigError, match=r"Expected 'kv' and its baseline 'ce' to share their seeds .* Got 'kv': "
                                          r"\[1, 2\], 'ce': \[1, 3\] instead. Run the missing seeds"):
        match_seeds({1: 0.1, 2: 0.2}, {1: 0.1, 3: 0.2}, name="kv", baseline_name="ce")


def test_match_items_pairs_by_id_and_refuses_other_items():
    ids, a, b = match_items({"q2": True, "q1": False}, {"q1": True, "q2": True})
    assert (ids, a, b) == (["q1", "q2"], [False, True], [True, True])
    with pytest.raises(ConfigError, match=r"same items. Got 1 items only in kv seed 1 \(\['q3'\]\) and 0 only in"):
        match_items({"q1": 1, "q3": 1}, {"q1": 1}, name="kv seed 1", other="ce seed 1")


def _outcomes(rng: np.random.Generator, n: int, pa: float, pb: float) -> tuple[np.ndarray, np.ndarray]:
    return rng.random(n) < pa, rng.random(n) < pb


@pytest.mark.parametrize("case", range(8))
def test_mcnemar_exact_matches_statsmodels_and_binomtest(case):
    rng = np.random.default_rng(case)
    a, b = _outcomes(rng, int(rng.integers(5, 300)), rng.uniform(0.1, 0.9), rng.uniform(0.1, 0.9))
    got = mcnemar_exact(a, b)
    table = [[int(np.sum(a & b)), int(np.sum(a & ~b))], [int(np.sum(~a & b)), int(np.sum(~a & ~b))]]
    assert got.table == table
    assert got.p == pytest.approx(sm_mcnemar(np.array(table), exact=True).pvalue, rel=1e-12)
    n = got.only_a + got.only_b
    assert got.p == pytest.approx(sps.binomtest(got.only_a, n, 0.5).pvalue if n else 1.0, rel=1e-12)


def test_mcnemar_exact_by_hand_and_textbook():
    # 1 vs 5 discordant items: P(X <= 1) for Binomial(6, 1/2) is (1 + 6) / 64, two-sided 14 / 64.
    m = mcnemar_exact([True, False, False, False, False, False, True], [False, True, True, True, True, True, True])
    assert (m.both, m.only_a, m.only_b, m.neither, m.p) == (1, 1, 5, 0, 14 / 64)
    assert mcnemar_exact([False] * 6, [True] * 6).p == 2 / 64  # 0 vs 6
    assert mcnemar_exact([True, False], [True, False]).p == 1.0  # no discordant item
    assert mcnemar_exact([True, False], [False, True]).p == 1.0  # 1 vs 1: doubled tail 1.5, capped
    # Agresti (Categorical Data Analysis), presidential approval: 794 / 150 / 86 / 570. R: binom.test(86, 236)
    # gives p-value = 3.716e-05 (mcnemar.test(correct = FALSE): chi-squared = 17.356, p = 3.099e-05).
    a = [True] * 794 + [True] * 150 + [False] * 86 + [False] * 570
    b = [True] * 794 + [False] * 150 + [True] * 86 + [False] * 570
    assert f"{mcnemar_exact(a, b).p:.3e}" == "3.716e-05"
    with pytest.raises(ShapeError, match="paired outcomes of equal length. Got 2 and 1 instead"):
        mcnemar_exact([True, False], [True])


def test_mcnemar_pooled_sums_the_discordant_pairs_over_seeds():
    rng = np.random.default_rng(7)
    seeds = [_outcomes(rng, 50, 0.3, 0.45) for _ in range(5)]
    per_seed = [mcnemar_exact(a, b) for a, b in seeds]
    pooled = mcnemar_pooled(per_seed)
    assert pooled.table == np.sum([m.table for m in per_seed], axis=0).tolist()
    concatenated = mcnemar_exact(np.concatenate([a for a, _ in seeds]), np.concatenate([b for _, b in seeds]))
    assert pooled == concatenated
    assert pooled.p == pytest.approx(sm_mcnemar(np.array(pooled.table), exact=True).pvalue, rel=1e-12)
    assert pooled.p == pytest.approx(sps.binomtest(pooled.only_a, pooled.only_a + pooled.only_b).pvalue, rel=1e-12)
    # Five seeds of the same small effect: each seed alone is weak evidence, the pooled count is strong.
    assert pooled.p < min(m.p for m in per_seed)
    assert json.loads(json.dumps(pooled.to_dict(), allow_nan=False))["only_b"] == pooled.only_b
    with pytest.raises(ConfigError, match="at least one per-seed McNemar table"):
        mcnemar_pooled([])


@pytest.mark.parametrize("case", range(6))
def test_holm_matches_statsmodels_multipletests(case):
    rng = np.random.default_rng(case)
    p = rng.uniform(0, 0.2, int(rng.integers(1, 9))) ** 2
    assert holm(p.tolist()) == pytest.approx(multipletests(p, method="holm")[1].tolist(), rel=1e-12)


def test_paired_bootstrap_draws_equal_a_naive_loop():
    rng = np.random.default_rng(3)
    a, b, w = rng.normal(0.6, 0.3, (5, 40)), rng.normal(0.8, 0.3, (5, 40)), rng.integers(10, 60, 40).astype(float)
    diff, (lo, hi) = paired_bootstrap_items(a, b, weights=w, n_resamples=2000, seed=11)
    # The naive reference: seeds averaged per item, then every resample drawn row by row from the same generator.
    d = a.mean(axis=0) - b.mean(axis=0)
    gen = np.random.default_rng(11)
    stats_ = []
    for _ in range(2000):
        i = gen.integers(0, 40, size=40)
        stats_.append(sum(w[j] * d[j] for j in i) / sum(w[j] for j in i))
    assert diff == pytest.approx(sum(w * d) / sum(w), rel=1e-12)
    assert (lo, hi) == pytest.approx(tuple(np.quantile(stats_, [0.025, 0.975])), rel=1e-12)
    # Rates weighted by their units are a difference of total nats over total units (what per-seed means give).
    nats_a, nats_b = a * w, b * w  # [S, N] nats per item
    assert diff == pytest.approx(np.mean(nats_a.sum(axis=1) / w.sum() - nats_b.sum(axis=1) / w.sum()), rel=1e-12)
    # Seeded, and resampling in blocks changes nothing.
    assert paired_bootstrap_items(a, b, weights=w, n_resamples=2000, seed=11) == (diff, (lo, hi))


def test_paired_bootstrap_agrees_with_scipy_bootstrap():
    rng = np.random.default_rng(5)
    base = rng.normal(1.0, 0.5, 200)  # items differ a lot; the models differ a little on each: pairing matters
    a, b = base + rng.normal(-0.05, 0.05, 200), base
    diff, (lo, hi) = paired_bootstrap_items(a, b, n_resamples=20_000, seed=0)
    ref = sps.bootstrap((a, b), lambda x, y, axis=-1: np.mean(x - y, axis=axis), paired=True, vectorized=True,
                        method="percentile", n_resamples=20_000, rng=np.random.default_rng(1))
    # Different generators: the intervals agree up to Monte Carlo error (~1% of the width here).
    width = hi - lo
    assert lo == pytest.approx(ref.confidence_interval.low, abs=0.03 * width)
    assert hi == pytest.approx(ref.confidence_interval.high, abs=0.03 * width)
    assert lo < diff < hi < 0
    # Unpaired, the item spread (0.5) would swamp a 0.05 difference.
    assert width < 0.1 * np.subtract(*bootstrap_diff_ci(b, a, n_resamples=2000)[::-1])


def test_paired_bootstrap_coverage():
    rng = np.random.default_rng(9)
    hits = 0
    for i in range(200):
        item = rng.normal(0, 1, 60)
        _, (lo, hi) = paired_bootstrap_items(item + rng.normal(0.2, 0.5, 60), item, n_resamples=1000, seed=i)
        hits += lo <= 0.2 <= hi
    assert 0.88 <= hits / 200 <= 0.99


def test_paired_bootstrap_degenerate_and_errors():
    one = paired_bootstrap_items([1.0], [0.5])
    assert one[0] == 0.5 and all(math.isnan(v) for v in one[1])
    assert paired_bootstrap_items([0.5, 0.75], [0.25, 0.5]) == (0.25, (0.25, 0.25))
    with pytest.raises(ShapeError, match=r"the same N items for both models. Got shapes \(1, 3\) and \(1, 2\)"):
        paired_bootstrap_items([1.0, 2.0, 3.0], [1.0, 2.0])
    with pytest.raises(ConfigError, match=r"Found 2 problems:(.|\n)*non-negative item weights(.|\n)*finite"):
        paired_bootstrap_items([1.0, float("nan")], [1.0, 2.0], weights=[1.0, -1.0])


def test_compare_paired_equals_its_references():
    # Five seeds whose level moves a lot from seed to seed, with the variant ahead on every seed: the design the
    # pairing is for. Welch sees the seed spread and misses what the paired test finds.
    ce = {1: 0.10, 2: 0.20, 3: 0.14, 4: 0.25, 5: 0.12}
    kv = {1: 0.13, 2: 0.24, 3: 0.16, 4: 0.29, 5: 0.15}
    mse = {1: 0.11, 2: 0.19, 3: 0.15, 4: 0.26, 5: 0.12}
    rows = compare_paired({"ce": ce, "kv": kv, "mse": mse}, "ce", n_resamples=1000)
    assert [r.variant for r in rows] == ["ce", "kv", "mse"]
    base, k, m = rows
    assert base.diff == 0 and math.isnan(base.p) and not base.significant and base.seeds == (1, 2, 3, 4, 5)
    a, b = [kv[s] for s in range(1, 6)], [ce[s] for s in range(1, 6)]
    ref = sps.ttest_rel(a, b)
    assert (k.t, k.p, k.df) == (pytest.approx(ref.statistic, rel=1e-12), pytest.approx(ref.pvalue, rel=1e-12), 4)
    assert k.diff_ci == pytest.approx(tuple(ref.confidence_interval()), rel=1e-12)
    holm_ref = multipletests([k.p, m.p], method="holm")[1]
    assert (k.p_holm, m.p_holm) == pytest.approx(tuple(holm_ref), rel=1e-12)
    assert (k.welch_t, k.welch_p) == pytest.approx(welch_t(a, b), rel=1e-12)
    assert k.significant and k.p_holm < 0.05 < k.welch_p
    assert not m.significant
    assert k.mean == pytest.approx(np.mean(a)) and k.std == pytest.approx(np.std(a, ddof=1))
    d = k.to_dict()
    assert json.loads(json.dumps(d, allow_nan=False)) == d
    assert set(d) == {f.name for f in PairedComparison.__dataclass_fields__.values()}
    assert base.to_dict()["p"] is None
    assert format_mean_ci(k) == f"{100 * k.mean:.1f} ± {100 * k.std:.1f} [{100 * k.ci[0]:.1f}, {100 * k.ci[1]:.1f}]"


def test_compare_paired_errors():
    with pytest.raises(ConfigError, match=r"Found 3 problems:(.|\n)*'kv' and its baseline 'ce' to share their "
                                          r"seeds(.|\n)*'mse' has no values(.|\n)*alpha strictly"):
        compare_paired({"ce": {1: 0.1, 2: 0.2}, "kv": {1: 0.1, 3: 0.2}, "mse": {}}, "ce", alpha=0)
    with pytest.raises(ConfigError, match=r"baseline 'base' among the results. Got 'ce'"):
        compare_paired({"ce": {1: 0.1}}, "base")
    with pytest.raises(ConfigError, match=r"'kv' has non-finite values"):
        compare_paired({"ce": {1: 0.1}, "kv": {1: float("inf")}}, "ce")


def test_mcnemar_is_a_frozen_record():
    m = McNemar(1, 2, 3, 4, 0.5)
    assert m.table == [[1, 2], [3, 4]]
    with pytest.raises(AttributeError):
        m.p = 0.1  # type: ignore[misc]
