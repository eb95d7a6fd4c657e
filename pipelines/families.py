"""The report's sections for runs with task families (``data.families``): accuracy per family, the contrasts per
family, and the routers' decisions (a table, agreement with the oracle, a figure).

Each eval item is scored once; its family comes from the eval split's file (``splits.families_of``), so a family's
accuracy is the share of its items a model got right, a student's the mean over seeds.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from kava.analysis.routing import route_counts, route_shares, routing_figure

from .config import RunConfig
from .contrasts import family_contrasts

Items = Mapping[str, Mapping[str, Any]]
"""One model's eval items by sample id."""


def family_accuracy(items: Items, families: Mapping[str, str], names: Sequence[str]) -> dict[str, float]:
    """``family → accuracy`` of one model's items (NaN for a family with no item); ``families``: sample id →
    family."""
    right = {n: 0 for n in names}
    total = {n: 0 for n in names}
    for sample_id, item in items.items():
        family = families.get(sample_id)
        if family in total:
            total[family] += 1
            right[family] += bool(item["correct"])
    return {n: right[n] / total[n] if total[n] else math.nan for n in names}


def oracle_teachers(cfg: RunConfig) -> dict[str, str]:
    """``family → teacher`` trained on it (``teachers[i].train.family``)."""
    return {t.train.family: t.name for t in cfg.teachers if t.train is not None and t.train.family is not None}


def _pct(x: float) -> str:
    return "–" if math.isnan(x) else f"{100 * x:.1f}"


def _mean_std(values: Sequence[float]) -> str:
    values = [v for v in values if not math.isnan(v)]
    if not values:
        return "–"
    if len(values) == 1:
        return f"{100 * values[0]:.1f}"
    return f"{100 * statistics.fmean(values):.1f} ± {100 * statistics.stdev(values):.1f}"


def families_section(cfg: RunConfig, eval_families: Mapping[str, str], teacher_items: Mapping[str, Items],
                     student_items: Mapping[tuple[str, int], Items], alpha: float
                     ) -> tuple[list[str], dict[str, Any]]:
    """The "Accuracy per task family" section (teachers, then every variant: mean ± std over seeds) and the
    contrasts per family (paired by seed, Holm across every contrast × family); and their JSON."""
    names = list(cfg.data.families)
    trained_on = {t: f for f, t in oracle_teachers(cfg).items()}
    teachers = {n: family_accuracy(i, eval_families, names) for n, i in teacher_items.items()}
    per_seed = {v.name: {s: family_accuracy(student_items[v.name, s], eval_families, names) for s in cfg.seeds}
                for v in cfg.variants}
    counts = {n: sum(1 for f in eval_families.values() if f == n) for n in names}
    lines = ["## Accuracy per task family", "",
             "Each eval problem belongs to one family of `data.families` (" + ", ".join(
                 f"`{n}`: {counts[n]} problems, `{cfg.data.families[n]}`" for n in names) + "). Teachers are scored "
             "once; students as mean ± std over seeds. A specialist should be competent on its own family (the "
             "bold cell) and weak on the others.", "",
             "| model | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for t, acc in teachers.items():
        cells = [f"**{_pct(acc[n])}**" if trained_on.get(t) == n else _pct(acc[n]) for n in names]
        own = f" (trained on `{trained_on[t]}`)" if t in trained_on else ""
        lines.append(f"| teacher `{t}`{own} | " + " | ".join(cells) + " |")
    for v, seeds in per_seed.items():
        lines.append(f"| `{v}` | " + " | ".join(_mean_std([seeds[s][n] for s in cfg.seeds]) for n in names) + " |")
    lines.append("")
    acc_by_family = {n: {v: {s: seeds[s][n] for s in cfg.seeds} for v, seeds in per_seed.items()} for n in names}
    contrast_lines, contrast_json = family_contrasts(cfg.contrasts, acc_by_family, alpha=alpha)
    lines += contrast_lines
    out = {"families": dict(cfg.data.families), "eval_items": counts, "teachers": teachers,
           "students": {v: {str(s): a for s, a in seeds.items()} for v, seeds in per_seed.items()},
           "mean": {v: {n: statistics.fmean(seeds[s][n] for s in cfg.seeds) for n in names}
                    for v, seeds in per_seed.items()},
           "contrasts": contrast_json}
    return lines, out


def routing_section(cfg: RunConfig, runs: Mapping[str, Sequence[Sequence[Mapping[str, float]]]],
                    students: Mapping[tuple[str, int], Mapping[str, Any]], figures: Path
                    ) -> tuple[list[str], dict[str, Any]]:
    """The "Routing" section: per multi-teacher variant, the share of each family sent to each teacher over the
    whole training and its last quarter, agreement with the oracle's routing, the figure, and rl's wall time against
    learnable's."""
    routed = {v: seeds for v, seeds in runs.items() if route_counts(seeds)}
    if not routed:
        return [], {}
    oracle = oracle_teachers(cfg)
    teachers = [t.name for t in cfg.teachers]
    steps = cfg.train.steps
    tail = steps - steps // 4 + 1  # the last quarter of training
    png = routing_figure(routed, figures / "routing.png", teachers=teachers)
    pairs = f": {', '.join(f'`{f}` → `{t}`' for f, t in oracle.items())}" if oracle else ""
    lines = ["## Routing", "",
             "Share of each family's training samples sent to each teacher (a sample counts as its mean weight per "
             f"teacher over its tokens; every seed pooled): over all {steps} steps, and over the last quarter (steps "
             f"{tail}–{steps}). Agreement: the share of samples sent to the teacher trained on their family (the "
             f"oracle's choice{pairs}), over every family's samples.", "",
             "| variant | family | " + " | ".join(f"→ `{t}` (all / last quarter)" for t in teachers) + " |",
             "|---|---|" + "---|" * len(teachers)]
    out: dict[str, Any] = {}
    agreement_lines = []
    for v, seeds in routed.items():
        counts = route_counts(seeds)
        every, last = route_shares(counts), route_shares(counts, first=tail)
        for family in counts:
            cells = [f"{_pct(every[family].get(t, math.nan))} / {_pct(last[family].get(t, math.nan))}"
                     for t in teachers]
            lines.append(f"| `{v}` | {family} | " + " | ".join(cells) + " |")
        agree = {span: _agreement(counts, oracle, first) for span, first in (("all", 0), ("last_quarter", tail))}
        out[v] = {"shares": every, "shares_last_quarter": last, "agreement": agree}
        if oracle:
            agreement_lines.append(f"| `{v}` | {_pct(agree['all'])} | {_pct(agree['last_quarter'])} |")
    lines += ["", f"![routing]({png.relative_to(figures.parent)})", ""]
    if agreement_lines:
        lines += ["| variant | agreement with the oracle, all steps % | last quarter % |", "|---|---|---|",
                  *agreement_lines, ""]
    seconds = {v: [students[v, s].get("train_seconds") for s in cfg.seeds if (v, s) in students]
               for v in ("rl", "learnable")}
    if all(seconds.values()) and all(x is not None for xs in seconds.values() for x in xs):
        rl, learnable = (statistics.fmean(seconds[v]) for v in ("rl", "learnable"))  # type: ignore[arg-type]
        lines += [f"Wall time of training: `rl` {rl:.1f} s, `learnable` {learnable:.1f} s per student (mean over "
                  f"seeds): {rl / learnable:.2f}×. The rl policy's update runs one more forward pass of the student "
                  "per step, without a backward.", ""]
        out["train_seconds"] = {"rl": rl, "learnable": learnable, "ratio": rl / learnable}
    return lines, out


def _agreement(counts: Mapping[str, Mapping[str, Mapping[int, float]]], oracle: Mapping[str, str],
               first: int) -> float:
    """Share of the samples (from step ``first``) sent to the teacher of their family; NaN without one."""
    agree = total = 0.0
    for family, per_teacher in counts.items():
        for teacher, steps in per_teacher.items():
            n = sum(v for s, v in steps.items() if s >= first)
            total += n if family in oracle else 0.0
            agree += n if oracle.get(family) == teacher else 0.0
    return agree / total if total else math.nan
