"""Does an effect last? Curves of a metric over training steps (or data sizes) across seeds, the step at which a
variant first reaches a level, and the compute ratio "steps the variant needs to reach the best the baseline ever
reaches".

Inputs are plain numbers: ``{seed: [(step, value), ...]}`` per variant, the checkpoints of one run per seed (steps
in any order; seeds may miss a step, which is then averaged over the seeds that have it). Higher is better
(accuracy); pass ``higher=False`` for a loss.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import NullLocator

from kava.analysis.curves import DPI, _color, _message, _save

__all__ = ["ComputeRatio", "band_plot", "compute_ratio", "mean_curve", "steps_to_reach"]

Curve = Sequence[tuple[float, float]]
"""``(step, value)`` pairs of one seed."""


def mean_curve(seeds: Mapping[int, Curve]) -> list[tuple[float, float, float, float]]:
    """``[(step, mean, min, max)]`` over seeds at every step any seed has, in step order (NaN values skipped)."""
    by_step: dict[float, list[float]] = {}
    for curve in seeds.values():
        for step, value in curve:
            if value is not None and math.isfinite(value):
                by_step.setdefault(float(step), []).append(float(value))
    return [(s, float(np.mean(v)), float(np.min(v)), float(np.max(v))) for s, v in sorted(by_step.items())]


def steps_to_reach(curve: Sequence[tuple[float, float]], level: float, *, higher: bool = True) -> float | None:
    """The first step whose value reaches ``level`` (``>=``, or ``<=`` when ``higher`` is False); None if none does.

    Only checkpoints count: no interpolation between them, so the answer is an upper bound at the checkpoints'
    resolution.
    """
    for step, value in sorted(curve):
        if (value >= level) if higher else (value <= level):
            return step
    return None


@dataclass(frozen=True)
class ComputeRatio:
    """How many fewer steps ``variant`` needs to match the best mean level ``baseline`` reaches at any checkpoint."""

    variant: str
    baseline: str
    level: float
    """The baseline's best mean over seeds, at any checkpoint."""
    baseline_steps: float
    """The first checkpoint at which the baseline's mean reaches it."""
    variant_steps: float | None
    """The first checkpoint at which the variant's mean reaches it (None: never, within the steps trained)."""

    @property
    def ratio(self) -> float | None:
        """``baseline_steps / variant_steps``: > 1 when the variant gets there sooner; None when it never does."""
        return None if self.variant_steps is None else self.baseline_steps / self.variant_steps


def compute_ratio(variant: Mapping[int, Curve], baseline: Mapping[int, Curve], *, names: tuple[str, str] = (
        "variant", "baseline"), higher: bool = True) -> ComputeRatio:
    """The compute ratio of ``variant`` against ``baseline`` on their mean curves over seeds."""
    base = mean_curve(baseline)
    if not base:
        raise ValueError(f"Expected checkpoints of {names[1]!r}. Got none.")
    theirs = [(s, m) for s, m, _, _ in base]
    level = (max if higher else min)(m for _, m in theirs)
    ours = [(s, m) for s, m, _, _ in mean_curve(variant)]
    return ComputeRatio(variant=names[0], baseline=names[1], level=level,
                        baseline_steps=steps_to_reach(theirs, level, higher=higher) or 0.0,
                        variant_steps=steps_to_reach(ours, level, higher=higher))


def band_plot(curves: Mapping[str, Mapping[int, Curve]], path: str | os.PathLike[str], *, xlabel: str, ylabel: str,
              title: str, logx: bool = False, dpi: int = DPI) -> Path:
    """One line per variant (mean over seeds, markers at the checkpoints) with its min-max band over seeds."""
    fig = Figure(figsize=(6.4, 4), layout="constrained")
    ax = fig.subplots()
    drawn, xs = 0, set()
    for i, (name, seeds) in enumerate(curves.items()):
        points = mean_curve(seeds)
        xs.update(p[0] for p in points)
        if not points:
            continue
        x, mean, lo, hi = np.asarray(points, dtype=float).T
        ax.plot(x, mean, marker="o", ms=4, lw=1.5, color=_color(i), label=f"{name} (n={len(seeds)})")
        ax.fill_between(x, lo, hi, color=_color(i), alpha=0.15, lw=0)
        drawn += 1
    ax.set_title(title)
    if not drawn:
        _message(ax, "no evaluations")
    else:
        if logx:
            ax.set_xscale("log")
            ax.xaxis.set_minor_locator(NullLocator())
        ax.set_xticks(sorted(xs), [f"{x:g}" for x in sorted(xs)])  # the checkpoints themselves, as plain numbers
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(loc="best", fontsize=8)
    return _save(fig, path, dpi)
