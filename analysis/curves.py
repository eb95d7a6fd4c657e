"""Figures for an experiment report: learning curves, per-layer K/V cosine, accuracy bars, eval curves.

Inputs are plain records, one dict per ``metrics.jsonl`` line (``{"step": 10, "loss/ce": 2.3, ...}``), grouped as
``{variant: [seed0_records, seed1_records, ...]}``. Figures are built on ``matplotlib.figure.Figure`` directly, so
no pyplot global state or backend is touched, and each is written atomically (a temporary file in the same folder,
then a rename), so a reader never sees half a PNG. Every function returns the written path.
"""

from __future__ import annotations

import math
import os
import re
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from kava.analysis.paired import PairedComparison
from kava.analysis.stats import Comparison
from kava.core.errors import ConfigError

__all__ = ["accuracy_bars", "eval_curve", "layer_cosine", "learning_curves"]

Records = Sequence[Mapping[str, float]]
"""One seed's metric records, in step order."""

DPI = 150
# Loss terms in the order a reader expects: the task loss first, the KV terms, the total last.
_LOSS_ORDER = ["loss/ce", "loss/k", "loss/v", "loss/attn", "loss/kv"]
_COS_KEY = re.compile(r"^cos_([kv])/L(\d+)$")


def _color(i: int) -> str:
    return f"C{i % 10}"  # the default cycle, fixed per variant so a variant keeps its colour across panels


def _save(fig: Figure, path: str | os.PathLike[str], dpi: int) -> Path:
    """Write ``fig`` to ``path`` atomically; the format follows the extension (PNG when there is none)."""
    path = Path(path)
    fmt = path.suffix.lstrip(".").lower() or "png"
    if fmt not in fig.canvas.get_supported_filetypes():
        raise ConfigError(f"Expected a figure path ending in .png, .pdf or .svg. Got {str(path)!r} instead.")
    path.parent.mkdir(parents=True, exist_ok=True)
    # Same folder so the rename stays on one filesystem; a unique name so concurrent writers don't collide; created
    # by savefig itself (not mkstemp) so the file gets the usual permissions rather than 0600.
    tmp = path.with_name(f".{path.stem}.{uuid.uuid4().hex[:8]}.tmp.{fmt}")
    try:
        fig.savefig(tmp, dpi=dpi, format=fmt)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _message(ax: Axes, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, fontsize=11, color="0.35")
    ax.set_xticks([])
    ax.set_yticks([])


def smooth_series(y: np.ndarray, window: int) -> np.ndarray:
    """Trailing moving average; the first points average what is there so far, so the length is kept."""
    if window <= 1 or y.size == 0:
        return y
    c = np.cumsum(np.insert(y, 0, 0.0))
    idx = np.arange(1, y.size + 1)
    lo = np.maximum(idx - window, 0)
    return (c[idx] - c[lo]) / (idx - lo)


def loss_keys(runs: Mapping[str, Sequence[Records]]) -> list[str]:
    """Every ``loss/*`` term any run logged: the known terms in their usual order, then the rest sorted, then the
    total."""
    present = {k for seeds in runs.values() for recs in seeds for r in recs for k in r if k.startswith("loss/")}
    known = [k for k in _LOSS_ORDER if k in present]
    rest = sorted(present - set(_LOSS_ORDER) - {"loss/total"})
    return known + rest + (["loss/total"] if "loss/total" in present else [])


def _seed_series(records: Records, key: str) -> tuple[np.ndarray, np.ndarray]:
    """``(steps, values)`` of one key in one seed, finite values only (a diverged step is not drawn)."""
    pairs = [(r["step"], r[key]) for r in records if key in r and "step" in r and math.isfinite(r[key])]
    if not pairs:
        return np.empty(0), np.empty(0)
    steps, values = np.asarray(pairs, dtype=float).T
    order = np.argsort(steps, kind="stable")
    return steps[order], values[order]


def over_seeds(seeds: Sequence[Records], key: str, smooth: int):
    """Mean, min and max over seeds on the union of their steps, or None when no seed logged ``key``.

    Seeds usually log the same steps; where one lacks a step (a resumed run) the others still count there.
    """
    series = [_seed_series(recs, key) for recs in seeds]
    series = [(s, smooth_series(v, smooth)) for s, v in series if s.size]
    if not series:
        return None
    steps = np.unique(np.concatenate([s for s, _ in series]))
    grid = np.full((len(series), steps.size), np.nan)  # (seeds, steps)
    for i, (s, v) in enumerate(series):
        grid[i, np.searchsorted(steps, s)] = v
    # Every column holds at least one finite value by construction, so the nan-reductions never see an empty slice.
    return steps, np.nanmean(grid, axis=0), np.nanmin(grid, axis=0), np.nanmax(grid, axis=0)


def learning_curves(
    runs: Mapping[str, Sequence[Records]],
    path: str | os.PathLike[str],
    *,
    keys: Sequence[str] | None = None,
    smooth: int = 0,
    dpi: int = DPI,
) -> Path:
    """Loss curves, one panel per loss key, one line per variant (mean over seeds, shaded min–max band).

    ``keys`` defaults to every ``loss/*`` key found, ``loss/ce`` first and ``loss/total`` last. A key a variant
    never logged (``loss/k`` of a CE-only run) is not drawn for it. ``smooth`` is a trailing moving-average window
    in records, applied per seed before averaging. The y axis is logarithmic when a panel spans more than two
    decades.
    """
    if smooth < 0:
        raise ConfigError(f"Expected smooth >= 0 (a window in records). Got {smooth!r} instead.")
    keys = list(keys) if keys is not None else loss_keys(runs)
    ncols = min(3, max(len(keys), 1))
    nrows = max(1, math.ceil(len(keys) / ncols))
    fig = Figure(figsize=(4.6 * ncols, 3.4 * nrows + 0.5), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    if not keys:
        _message(axes[0], "no loss logged")
    handles: dict[str, object] = {}
    for ax, key in zip(axes, keys):
        lows, highs = [], []
        for i, (name, seeds) in enumerate(runs.items()):
            agg = over_seeds(seeds, key, smooth)
            if agg is None:
                continue
            steps, mean, lo, hi = agg
            (line,) = ax.plot(steps, mean, color=_color(i), lw=1.5, label=name)
            if len(seeds) > 1:
                ax.fill_between(steps, lo, hi, color=_color(i), alpha=0.2, lw=0)
            handles.setdefault(name, line)
            lows.append(lo.min())
            highs.append(hi.max())
        ax.set_title(key)
        if not lows:
            _message(ax, f"{key} not logged")
            continue
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        lo, hi = min(lows), max(highs)
        if lo > 0 and hi / lo > 100:  # more than two decades: a linear axis flattens everything after warm-up
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
    for ax in axes[max(len(keys), 1):]:
        ax.set_visible(False)
    if handles:
        # One legend for the figure, outside the panels, so it never covers a curve.
        fig.legend(list(handles.values()), list(handles), loc="outside upper center", ncols=min(len(handles), 6),
                   frameon=False)
    counts = sorted({len(s) for s in runs.values()})
    if counts:
        n = str(counts[0]) if len(counts) == 1 else f"{counts[0]}–{counts[-1]}"
        band = ", band: min–max" if counts[-1] > 1 else ""
        fig.supxlabel(f"mean over {n} seed{'s' if n != '1' else ''}{band}", fontsize=9, color="0.35")
    return _save(fig, path, dpi)


def layer_means(seeds: Sequence[Records], last: int) -> dict[str, dict[int, list[float]]]:
    """``{"k"|"v": {layer: [per-seed mean over the last `last` records that logged it]}}``."""
    out: dict[str, dict[int, list[float]]] = {"k": {}, "v": {}}
    for recs in seeds:
        keys = {k for r in recs for k in r if _COS_KEY.match(k)}
        for key in keys:
            kind, layer = _COS_KEY.match(key).groups()
            vals = [r[key] for r in recs if key in r and math.isfinite(r[key])][-last:]
            if vals:
                out[kind].setdefault(int(layer), []).append(float(np.mean(vals)))
    return out


def layer_cosine(
    runs: Mapping[str, Sequence[Records]],
    path: str | os.PathLike[str],
    *,
    last: int = 20,
    dpi: int = DPI,
) -> Path:
    """Per-layer cosine between student and teacher K (left) and V (right) at the end of training.

    For each seed the last ``last`` records that logged ``cos_k/L{i}`` / ``cos_v/L{i}`` are averaged; the plot
    shows mean ± std over seeds per student layer. Variants without cosine keys (CE-only) are skipped; when no
    variant has any, the figure says so.
    """
    if last < 1:
        raise ConfigError(f"Expected last >= 1 (records to average). Got {last!r} instead.")
    per_variant = {name: layer_means(seeds, last) for name, seeds in runs.items()}
    per_variant = {n: m for n, m in per_variant.items() if m["k"] or m["v"]}
    if not per_variant:
        fig = Figure(figsize=(6, 3), layout="constrained")
        ax = fig.subplots()
        _message(ax, "no K/V cosine logged")
        ax.set_title("per-layer K/V cosine")
        return _save(fig, path, dpi)

    fig = Figure(figsize=(11, 4), layout="constrained")
    axes = fig.subplots(1, 2)  # own y scales: V cosines usually sit well below K's
    names = list(runs)  # colour by position in the input, matching learning_curves
    n = len(per_variant)
    for j, (name, means) in enumerate(per_variant.items()):
        i = names.index(name)
        offset = (j - (n - 1) / 2) * 0.08  # dodge so overlapping error bars stay readable
        for ax, kind in zip(axes, "kv"):
            layers = sorted(means[kind])
            if not layers:
                continue
            vals = [np.asarray(means[kind][layer]) for layer in layers]
            mean = [v.mean() for v in vals]
            std = [v.std(ddof=1) if v.size > 1 else 0.0 for v in vals]
            ax.errorbar(np.asarray(layers) + offset, mean, yerr=std, color=_color(i), marker="o", ms=4, lw=1.4,
                        capsize=3, label=name)
    for ax, kind in zip(axes, "KV"):
        ax.set_title(f"{kind} cosine (student vs teacher)")
        ax.set_xlabel("student layer")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        if not ax.has_data():
            _message(ax, f"no {kind} cosine logged")
    axes[0].set_ylabel(f"cosine (mean ± std over seeds, last {last} records)")
    # A variant may log only K or only V: gather the legend from both panels, once per name.
    handles = {}
    for ax in axes:
        for h, label in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(label, h)
    fig.legend(list(handles.values()), list(handles), loc="outside upper center", ncols=min(len(handles), 6),
               frameon=False)
    return _save(fig, path, dpi)


def accuracy_bars(
    comparisons: Sequence[Comparison] | Sequence[PairedComparison],
    path: str | os.PathLike[str],
    *,
    title: str,
    points: Mapping[str, Sequence[float]] | None = None,
    extra: Mapping[str, float] | None = None,
    percent: bool = True,
    ylabel: str | None = None,
    dpi: int = DPI,
) -> Path:
    """Bars of each variant's mean with its bootstrap CI, the seeds as dots, ``*`` where significant.

    ``comparisons`` come from :func:`kava.analysis.stats.compare` or :func:`kava.analysis.paired.compare_paired`
    (baseline first, drawn grey; ``*`` from the paired test, Holm-adjusted, when they are paired). ``points`` maps a
    variant to its per-seed values (same scale as the comparisons). ``extra`` maps a label to a reference value
    drawn as a dashed horizontal line, e.g. ``{"teacher": 0.62}``. Values are shown in percent when ``percent``.
    """
    if not comparisons:
        raise ConfigError("Expected at least one Comparison to plot. Got none instead.")
    scale = 100.0 if percent else 1.0
    points, extra = points or {}, extra or {}
    x = np.arange(len(comparisons))
    fig = Figure(figsize=(max(4.5, 1.1 * len(comparisons) + 2.5), 4.2), layout="constrained")
    ax = fig.subplots()

    means = np.array([c.mean for c in comparisons]) * scale
    lows = np.array([c.ci[0] for c in comparisons]) * scale
    highs = np.array([c.ci[1] for c in comparisons]) * scale
    colors = ["0.6" if c.variant == c.baseline else _color(i) for i, c in enumerate(comparisons)]
    ax.bar(x, means, width=0.6, color=colors, alpha=0.75, zorder=2)
    has_ci = np.isfinite(lows) & np.isfinite(highs)  # undefined for a single seed: no bar rather than a flat cap
    if has_ci.any():
        yerr = np.vstack([means - lows, highs - means])[:, has_ci]
        ax.errorbar(x[has_ci], means[has_ci], yerr=yerr, fmt="none", ecolor="black", capsize=5, lw=1.2, zorder=3,
                    label="bootstrap CI of the mean")

    tops = np.fmax(means, highs)  # top of each bar's drawing, for the asterisk
    seeds_labelled = False
    for k, c in enumerate(comparisons):
        vals = np.asarray(points.get(c.variant, ()), dtype=float) * scale
        if vals.size:
            # A narrow column right of the error bar (so neither hides the other), spread so equal seeds stay visible.
            jitter = 0.18 + (np.linspace(-0.06, 0.06, vals.size) if vals.size > 1 else np.zeros(1))
            ax.scatter(x[k] + jitter, vals, s=16, color="black", zorder=4,
                       label="_nolegend_" if seeds_labelled else "seeds")
            seeds_labelled = True
            tops[k] = max(tops[k], float(np.nanmax(vals)))
    top = float(np.nanmax(tops))
    for k, (label, value) in enumerate(extra.items()):
        ax.axhline(value * scale, color=_color(len(comparisons) + k), ls="--", lw=1.2, zorder=1,
                   label=f"{label} ({value * scale:.1f})" if percent else f"{label} ({value:.3g})")
        top = max(top, value * scale)
    pad = 0.03 * (top if top > 0 else 1.0)
    for k, c in enumerate(comparisons):
        if c.significant:
            ax.text(x[k], tops[k] + pad, "*", ha="center", va="bottom", fontsize=16, fontweight="bold")

    # Headroom above the tallest element for the asterisks and the legend.
    ax.set_ylim(0, top * 1.4 if top > 0 else 1.0)
    rotate = len(comparisons) > 4 or max(len(c.variant) for c in comparisons) > 12
    ax.set_xticks(x, [c.variant for c in comparisons], rotation=20 if rotate else 0,
                  ha="right" if rotate else "center")
    test = "paired t-test by seed, Holm" if isinstance(comparisons[0], PairedComparison) else "Welch t-test"
    ax.set_xlabel(f"* significant vs {comparisons[0].baseline} ({test}, α = {comparisons[0].alpha:g})",
                  fontsize=8, color="0.35")
    ax.set_ylabel(ylabel or ("accuracy (%)" if percent else "accuracy"))
    ax.set_title(title)
    ax.grid(axis="y", alpha=0.3, zorder=0)
    handles, _ = ax.get_legend_handles_labels()
    if handles:  # in the headroom kept above the bars
        ax.legend(loc="upper left", fontsize=8, framealpha=0.9, ncols=min(len(handles), 2))
    return _save(fig, path, dpi)


def eval_curve(
    points: Mapping[str, Sequence[tuple[int, float]]],
    path: str | os.PathLike[str],
    *,
    ylabel: str,
    title: str = "evaluation at checkpoints",
    dpi: int = DPI,
) -> Path:
    """Task metric at checkpoints, one line with markers per variant; ``points`` maps a variant to
    ``(step, value)`` pairs in any order."""
    fig = Figure(figsize=(6.4, 4), layout="constrained")
    ax = fig.subplots()
    drawn = 0
    for i, (name, pairs) in enumerate(points.items()):
        if not pairs:
            continue
        steps, values = np.asarray(sorted(pairs), dtype=float).T
        ax.plot(steps, values, marker="o", ms=4, lw=1.5, color=_color(i), label=name)
        drawn += 1
    ax.set_title(title)
    if not drawn:
        _message(ax, "no evaluations")
    else:
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(loc="best", fontsize=8)
    return _save(fig, path, dpi)
