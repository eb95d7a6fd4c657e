"""Contrasts (variant against variant) in the report: the paired t-test by seed and Holm across contrasts equal
scipy's and statsmodels', McNemar's counts come from the items, and a bad contrast is refused by name."""

from __future__ import annotations

import pytest
from scipy import stats

from kava.analysis.paired import mcnemar_exact, mcnemar_pooled
from kava.core.errors import ConfigError
from kava.pipelines.config import parse_config
from kava.pipelines.contrasts import contrast_problems, contrasts_section, parse_contrast

SEEDS = [1, 2, 3, 4]
ACC = {"ce": {1: 0.10, 2: 0.12, 3: 0.11, 4: 0.14}, "flat": {1: 0.15, 2: 0.16, 3: 0.18, 4: 0.17},
       "structured": {1: 0.20, 2: 0.19, 3: 0.25, 4: 0.22}}
NLL = {"ce": {1: 0.90, 2: 0.88, 3: 0.91, 4: 0.87}, "flat": {1: 0.80, 2: 0.83, 3: 0.79, 4: 0.81},
       "structured": {1: 0.70, 2: 0.74, 3: 0.69, 4: 0.72}}
ITEMS = {"ce": [True, False, False, False, True, False], "flat": [True, True, False, False, True, False],
         "structured": [True, True, True, False, True, True]}


def _mcnemar(a: str, b: str) -> dict:
    per_seed = {s: mcnemar_exact(ITEMS[a], ITEMS[b]) for s in SEEDS}
    return {"per_seed": per_seed, "pooled": mcnemar_pooled(list(per_seed.values()))}


def test_contrasts_are_paired_t_tests_holm_adjusted_across_contrasts():
    from statsmodels.stats.multitest import multipletests

    contrasts = ["structured vs flat", "flat vs ce"]
    lines, rows = contrasts_section(contrasts, SEEDS, ACC, NLL, "char", _mcnemar, alpha=0.05)
    for key, scores in (("accuracy", ACC), ("nll", NLL)):
        ps = []
        for r, (a, b) in zip(rows, [("structured", "flat"), ("flat", "ce")]):
            ref = stats.ttest_rel([scores[a][s] for s in SEEDS], [scores[b][s] for s in SEEDS])
            assert r[key]["t"] == pytest.approx(ref.statistic) and r[key]["p"] == pytest.approx(ref.pvalue)
            assert r[key]["diff"] == pytest.approx(sum(scores[a][s] - scores[b][s] for s in SEEDS) / len(SEEDS))
            ps.append(ref.pvalue)
        holm = multipletests(ps, method="holm")[1]
        assert [r[key]["p_holm"] for r in rows] == pytest.approx(list(holm))
    m = rows[0]["mcnemar_pooled"]
    assert (m["only_a"], m["only_b"]) == (2 * len(SEEDS), 0)  # items 2 and 5, on every seed
    assert lines[0] == "## Contrasts" and any(line.startswith("| `structured` vs `flat` | +5.0 [") for line in lines)
    assert "nats/char" in "\n".join(lines)


def test_no_contrasts_add_nothing():
    assert contrasts_section([], SEEDS, ACC, NLL, "token", _mcnemar, alpha=0.05) == ([], [])


def test_a_contrast_names_two_variants_of_the_config():
    assert parse_contrast("a-b vs c") == ("a-b", "c")
    with pytest.raises(ConfigError, match=r"contrasts: expected 'VARIANT vs VARIANT'\. Got 'a versus b' instead\."):
        parse_contrast("a versus b")
    problems = contrast_problems(["flat vs nope", "flat vs flat", "flat"], ["ce", "flat"])
    assert problems == [
        "contrasts: 'flat vs nope' names 'nope', which is not a variant. Variants: ce, flat.",
        "contrasts: 'flat vs flat' compares a variant with itself. Name two variants.",
        "contrasts: expected 'VARIANT vs VARIANT'. Got 'flat' instead.",
    ]
    run = {"teachers": [{"name": "t", "model": "m"}], "variants": [{"name": "ce"}], "baseline": "ce",
           "data": {"teacher_fraction": 0}, "contrasts": ["ce vs kv"]}
    with pytest.raises(ConfigError, match=r"contrasts: 'ce vs kv' names 'kv', which is not a variant"):
        parse_config(run)
