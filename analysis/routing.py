"""The router's decisions over training: which share of each task family's samples went to each teacher.

The trainer logs, per step, ``route/<family>/<teacher>``: how many of the step's samples of that family went to that
teacher (a sample counts as its mean weight per teacher, so soft fusions count fractions). Shares are ratios of sums
over a window of steps and over seeds, so a family missing from some batches weighs nothing there rather than 0.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from kava.analysis.curves import DPI, _color, _message, _save

__all__ = ["route_counts", "route_shares", "routing_figure"]

Records = Sequence[Mapping[str, float]]


def route_counts(seeds: Sequence[Records]) -> dict[str, dict[str, dict[int, float]]]:
    """``family → teacher → step → samples`` summed over seeds, from the ``route/<family>/<teacher>`` keys."""
    out: dict[str, dict[str, dict[int, float]]] = {}
    for records in seeds:
        for r in records:
            for key, value in r.items():
                if not key.startswith("route/") or not isinstance(value, (int, float)) or math.isnan(value):
                    continue
                _, family, teacher = key.split("/", 2)
                steps = out.setdefault(family, {}).setdefault(teacher, {})
                steps[int(r["step"])] = steps.get(int(r["step"]), 0.0) + float(value)
    return out


def route_shares(counts: Mapping[str, Mapping[str, Mapping[int, float]]], *, first: int = 0,
                 last: int | None = None) -> dict[str, dict[str, float]]:
    """``family → teacher → share`` of that family's samples over steps ``first..last`` (inclusive); NaN for a
    family with no sample there."""
    out: dict[str, dict[str, float]] = {}
    for family, teachers in counts.items():
        sums = {t: sum(v for s, v in steps.items() if s >= first and (last is None or s <= last))
                for t, steps in teachers.items()}
        total = sum(sums.values())
        out[family] = {t: (v / total if total > 0 else math.nan) for t, v in sums.items()}
    return out


def _windows(steps: Mapping[int, float], totals: Mapping[int, float], window: int) -> tuple[np.ndarray, np.ndarray]:
    """Share per window of ``window`` steps: (window centres, shares)."""
    if not totals:
        return np.array([]), np.array([])
    end = max(totals)
    xs, ys = [], []
    for start in range(1, end + 1, window):
        span = range(start, min(start + window, end + 1))
        total = sum(totals.get(s, 0.0) for s in span)
        if total > 0:
            xs.append((span[0] + span[-1]) / 2)
            ys.append(sum(steps.get(s, 0.0) for s in span) / total)
    return np.array(xs), np.array(ys)


def routing_figure(runs: Mapping[str, Sequence[Records]], path: str | os.PathLike[str], *,
                   teachers: Sequence[str], window: int = 10, dpi: int = DPI) -> Path:
    """One row per variant, one panel per family: the share of that family's samples sent to each teacher over
    training (windows of ``window`` steps, at least 10 windows in all; every seed pooled), one colour per teacher."""
    counts = {v: route_counts(seeds) for v, seeds in runs.items()}
    last = max((s for c in counts.values() for t in c.values() for steps in t.values() for s in steps), default=1)
    window = max(1, min(window, last // 10))
    families = list(dict.fromkeys(f for c in counts.values() for f in c))  # the order the trainer logged them
    nrows, ncols = max(len(runs), 1), max(len(families), 1)
    fig = Figure(figsize=(3.6 * ncols, 2.3 * nrows + 0.6), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False)
    handles: dict[str, object] = {}
    for row, (variant, c) in enumerate(counts.items()):
        for col, family in enumerate(families):
            ax = axes[row, col]
            per_teacher = c.get(family, {})
            if not per_teacher:
                _message(ax, "not logged")
                continue
            totals: dict[int, float] = {}
            for steps in per_teacher.values():
                for s, v in steps.items():
                    totals[s] = totals.get(s, 0.0) + v
            for i, teacher in enumerate(teachers):
                xs, ys = _windows(per_teacher.get(teacher, {}), totals, window)
                if xs.size:
                    (line,) = ax.plot(xs, 100 * ys, color=_color(i), lw=1.5, label=teacher, marker=".", ms=3)
                    handles.setdefault(teacher, line)
            ax.set_ylim(-3, 103)
            ax.grid(alpha=0.3)
            ax.set_title(f"{variant}: {family} samples", fontsize=9)
            if col == 0:
                ax.set_ylabel("% sent to teacher")
            if row == nrows - 1:
                ax.set_xlabel("step")
    if handles:
        fig.legend(list(handles.values()), list(handles), loc="outside upper center", ncols=len(handles),
                   frameon=False, title="teacher")
    return _save(fig, path, dpi)
