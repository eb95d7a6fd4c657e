"""Contrasts: variant against variant, beside the report's every-variant-against-the-baseline tables.

A config's ``contrasts:`` lists pairs such as ``fusion-learnable vs fusion-fixed``: the questions an ablation asks
that the baseline can't answer (learnable vs fixed fusion, soft vs hard alignment, structured vs flat projector,
several teachers vs the best single one). Each is tested like a variant against the baseline: paired by seed
(students of one seed share initial weights and batch order) with the paired t-test on per-seed accuracy and
reference NLL, Holm-adjusted across the contrasts, and McNemar's exact test on the items pooled over seeds.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import asdict
from typing import Any

from kava.core.errors import ConfigError

SEPARATOR = " vs "


def parse_contrast(text: str) -> tuple[str, str]:
    """``"a vs b"`` → ``("a", "b")``: the difference is ``a - b``."""
    parts = [p.strip() for p in str(text).split(SEPARATOR)]
    if len(parts) != 2 or not all(parts):
        raise ConfigError(f"contrasts: expected 'VARIANT vs VARIANT'. Got {text!r} instead.")
    return parts[0], parts[1]


def contrast_problems(contrasts: list[str], variants: list[str]) -> list[str]:
    """Every problem with a config's contrasts: unreadable, a variant it doesn't have, a variant against itself."""
    problems = []
    for text in contrasts:
        try:
            a, b = parse_contrast(text)
        except ConfigError as e:
            problems.append(str(e))
            continue
        missing = [v for v in (a, b) if v not in variants]
        if missing:
            problems.append(f"contrasts: {text!r} names {', '.join(map(repr, missing))}, which is not a variant. "
                            f"Variants: {', '.join(variants)}.")
        elif a == b:
            problems.append(f"contrasts: {text!r} compares a variant with itself. Name two variants.")
    return problems


def contrasts_section(contrasts: list[str], seeds: list[int], acc: Mapping[str, Mapping[int, float]],
                     nll: Mapping[str, Mapping[int, float]], unit: str,
                     mcnemar: Callable[[str, str], dict[str, Any]], *, alpha: float) -> tuple[list[str], list[dict]]:
    """The report's "Contrasts" section and its JSON: one row per contrast.

    ``acc``/``nll``: variant → seed → score; ``mcnemar(a, b)`` → ``{"per_seed": ..., "pooled": McNemar}``.
    """
    # The statistics load scipy (~0.7 s); config.py imports this module only for contrast_problems.
    from kava.analysis.paired import match_seeds, paired_t  # noqa: PLC0415 - keeps `kava run --check` free of scipy
    from kava.analysis.stats import holm  # noqa: PLC0415 - keeps `kava run --check` free of scipy

    if not contrasts:
        return [], []
    rows = []
    for text in contrasts:
        a, b = parse_contrast(text)
        _, acc_a, acc_b = match_seeds(acc[a], acc[b], name=a, baseline_name=b)
        _, nll_a, nll_b = match_seeds(nll[a], nll[b], name=a, baseline_name=b)
        rows.append({"contrast": f"{a}{SEPARATOR}{b}", "a": a, "b": b, "seeds": list(seeds),
                     "accuracy": asdict(paired_t(acc_a, acc_b)), "nll": asdict(paired_t(nll_a, nll_b)),
                     "mcnemar_pooled": mcnemar(a, b)["pooled"].to_dict()})
    for key in ("accuracy", "nll"):
        for r, adjusted in zip(rows, holm([r[key]["p"] for r in rows])):  # NaN (one seed) passes through
            r[key]["p_holm"] = adjusted
            r[key]["significant"] = bool(adjusted < alpha)  # False for NaN
    lines = ["## Contrasts", "",
             "Variant against variant, paired by seed as above: Δ = first − second, with its paired-t 95% CI; p is "
             f"the paired t-test, Holm-adjusted across these contrasts (significant at α = {alpha}); McNemar pools "
             "every seed's discordant items.", "",
             f"| contrast | Δ accuracy, points [95% CI] | paired p (Holm) | McNemar pooled (only first / only "
             f"second) | Δ NLL, nats/{unit} [95% CI] | paired p (Holm) |", "|---|---|---|---|---|---|"]
    for r in rows:
        ac, nl, m = r["accuracy"], r["nll"], r["mcnemar_pooled"]
        lines.append(
            f"| `{r['a']}` vs `{r['b']}` | {_points(ac['diff'])} [{_points(ac['ci'][0])}, {_points(ac['ci'][1])}] "
            f"| {_p(ac['p'])} ({_p(ac['p_holm'])}) | {m['only_a']} / {m['only_b']}, p = {_p(m['p'])} "
            f"| {nl['diff']:+.4f} [{nl['ci'][0]:+.4f}, {nl['ci'][1]:+.4f}] | {_p(nl['p'])} ({_p(nl['p_holm'])}) |")
    return lines + [""], rows


def _points(x: float) -> str:
    return "–" if math.isnan(x) else f"{100 * x:+.1f}"


def _p(x: float) -> str:
    return "–" if math.isnan(x) else f"{x:.3g}"


def family_contrasts(contrasts: list[str], acc: Mapping[str, Mapping[str, Mapping[int, float]]], *,
                     alpha: float) -> tuple[list[str], list[dict]]:
    """The contrasts again on each task family's items: one paired t-test by seed per (contrast, family), Holm
    across all of them (every contrast × every family is one more chance of a false positive).

    ``acc``: family → variant → seed → accuracy on that family's eval items.
    """
    from kava.analysis.paired import match_seeds, paired_t  # noqa: PLC0415 - as in contrasts_section
    from kava.analysis.stats import holm  # noqa: PLC0415

    if not contrasts or not acc:
        return [], []
    rows = []
    for text in contrasts:
        a, b = parse_contrast(text)
        for family, scores in acc.items():
            _, acc_a, acc_b = match_seeds(scores[a], scores[b], name=a, baseline_name=b)
            rows.append({"contrast": f"{a}{SEPARATOR}{b}", "a": a, "b": b, "family": family,
                         "accuracy": asdict(paired_t(acc_a, acc_b))})
    for r, adjusted in zip(rows, holm([r["accuracy"]["p"] for r in rows])):
        r["accuracy"]["p_holm"] = adjusted
        r["accuracy"]["significant"] = bool(adjusted < alpha)
    families = list(acc)
    lines = ["### Contrasts per family", "",
             f"Δ accuracy (points, first − second) on each family's eval items, paired by seed; p (Holm across all "
             f"{len(rows)} tests), **bold** where significant at α = {alpha}.", "",
             "| contrast | " + " | ".join(families) + " |", "|---|" + "---|" * len(families)]
    for text in dict.fromkeys(r["contrast"] for r in rows):
        cells = []
        for r in (r for r in rows if r["contrast"] == text):
            ac = r["accuracy"]
            cell = f"{_points(ac['diff'])} [{_points(ac['ci'][0])}, {_points(ac['ci'][1])}], p {_p(ac['p_holm'])}"
            cells.append(f"**{cell}**" if ac["significant"] else cell)
        a, b = parse_contrast(text)
        lines.append(f"| `{a}` vs `{b}` | " + " | ".join(cells) + " |")
    return lines + [""], rows
