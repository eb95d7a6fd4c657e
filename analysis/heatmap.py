"""Layer x layer heatmaps (CKA matrices, layer maps) with matplotlib, without touching global pyplot state.

:func:`heatmap` draws on its own :class:`matplotlib.figure.Figure` and saves it (PNG, PDF or SVG by the suffix), so
it is safe in scripts, servers and tests whatever backend is active. :func:`draw_heatmap` draws on an existing
``Axes``, for notebooks (``fig, ax = plt.subplots(); draw_heatmap(ax, m, ...)``).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib as mpl
import numpy as np
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from kava.core.errors import ConfigError, ShapeError
from kava.kvstore.manifest import TeacherSpec

__all__ = ["draw_heatmap", "heatmap", "layer_map_matrix", "layer_map_pairs"]

ANNOTATE_MAX = 12
"""Cells carry their value as text up to this many rows and columns."""
TICKS_MAX = 32
"""Beyond this many rows (columns), only every k-th tick label is shown."""


def _tick_labels(ax_set_ticks: Any, ax_set_labels: Any, labels: Sequence[str], rotate: bool = False) -> None:
    step = max(1, int(np.ceil(len(labels) / TICKS_MAX)))
    positions = np.arange(0, len(labels), step)
    ax_set_ticks(positions)
    ax_set_labels([str(labels[i]) for i in positions], rotation=90 if rotate else 0)


def draw_heatmap(
    ax: Any,
    matrix: Any,
    *,
    title: str,
    row_label: str,
    col_label: str,
    row_ticks: Sequence[Any] | None = None,
    col_ticks: Sequence[Any] | None = None,
    layer_map: Sequence[tuple[int, int]] | None = None,
    vmin: float | None = None,
    vmax: float | None = None,
    colorbar_label: str = "CKA",
) -> Any:
    """Draw ``matrix [R, C]`` on ``ax`` (row 0 at the top) with a colorbar; return the image.

    NaN cells (CKA undefined) are grey. Cells are annotated with their value when the matrix is at most 12 x 12.
    ``layer_map`` lists ``(row, col)`` cells to outline, e.g. the teacher layers that feed each student layer.
    The colour range defaults to ``[min(0, min), max(1, max)]``, so CKA matrices share one scale.
    """
    m = np.asarray(matrix, dtype=np.float64)
    if m.ndim != 2 or 0 in m.shape:
        raise ShapeError(f"Expected a non-empty 2-D matrix for a heatmap. Got shape {m.shape} instead.")
    rows, cols = m.shape
    row_ticks = [str(i) for i in range(rows)] if row_ticks is None else [str(t) for t in row_ticks]
    col_ticks = [str(j) for j in range(cols)] if col_ticks is None else [str(t) for t in col_ticks]
    if len(row_ticks) != rows or len(col_ticks) != cols:
        raise ConfigError(
            f"Expected {rows} row and {cols} column tick labels for a {rows}x{cols} matrix. Got {len(row_ticks)} "
            f"and {len(col_ticks)} instead."
        )
    finite = m[np.isfinite(m)]
    lo = vmin if vmin is not None else min(0.0, float(finite.min()) if finite.size else 0.0)
    hi = vmax if vmax is not None else max(1.0, float(finite.max()) if finite.size else 1.0)

    cmap = mpl.colormaps["viridis"].with_extremes(bad="0.8")
    image = ax.imshow(np.ma.masked_invalid(m), cmap=cmap, vmin=lo, vmax=hi, interpolation="nearest")
    ax.figure.colorbar(image, ax=ax, label=colorbar_label, shrink=0.9)
    ax.set_title(title, wrap=True)  # long teacher names wrap instead of running off the figure
    ax.set_ylabel(row_label)
    ax.set_xlabel(col_label)
    _tick_labels(ax.set_yticks, ax.set_yticklabels, row_ticks)
    _tick_labels(ax.set_xticks, ax.set_xticklabels, col_ticks, rotate=cols > ANNOTATE_MAX)

    if rows <= ANNOTATE_MAX and cols <= ANNOTATE_MAX:
        # Light text on the dark (low) end of viridis, dark text on the bright end.
        norm = image.norm
        for i in range(rows):
            for j in range(cols):
                v = m[i, j]
                dark = not np.isfinite(v) or norm(v) > 0.6
                ax.text(j, i, "nan" if not np.isfinite(v) else f"{v:.2f}", ha="center", va="center",
                        fontsize=8 if max(rows, cols) > 8 else 9, color="black" if dark else "white")
    if layer_map:
        for r, c in layer_map:
            if not (0 <= r < rows and 0 <= c < cols):
                raise ConfigError(
                    f"Expected layer_map cells inside the {rows}x{cols} matrix. Got ({r}, {c}) instead."
                )
            ax.add_patch(Rectangle((c - 0.5, r - 0.5), 1, 1, fill=False, edgecolor="#d62728", linewidth=2.0))
    return image


def heatmap(
    matrix: Any,
    path: str | os.PathLike,
    *,
    title: str,
    row_label: str,
    col_label: str,
    row_ticks: Sequence[Any] | None = None,
    col_ticks: Sequence[Any] | None = None,
    layer_map: Sequence[tuple[int, int]] | None = None,
    vmin: float | None = None,
    vmax: float | None = None,
    colorbar_label: str = "CKA",
) -> Path:
    """Save a heatmap of ``matrix [R, C]`` to ``path`` (format from the suffix) and return the path.

    See :func:`draw_heatmap` for the arguments. The figure grows with the matrix (about 0.45 inch a cell for
    small matrices, capped for large ones).
    """
    m = np.asarray(matrix, dtype=np.float64)
    rows, cols = m.shape if m.ndim == 2 else (1, 1)
    width = min(16.0, max(5.0, 0.45 * cols + 2.5))
    height = min(14.0, max(4.0, 0.45 * rows + 1.8))
    fig = Figure(figsize=(width, height), layout="constrained")
    draw_heatmap(fig.add_subplot(), m, title=title, row_label=row_label, col_label=col_label, row_ticks=row_ticks,
                 col_ticks=col_ticks, layer_map=layer_map, vmin=vmin, vmax=vmax, colorbar_label=colorbar_label)
    out = Path(path)
    fig.savefig(out, dpi=120)
    return out


def layer_map_matrix(spec: TeacherSpec) -> np.ndarray:
    """A teacher's layer map as mixing weights ``[student_layers, teacher.num_layers]`` (rows sum to 1)."""
    sources = spec.layer_map.sources
    out = np.zeros((len(sources), spec.num_layers))
    for s, src in enumerate(sources):
        for t, w in src:
            out[s, t] += w
    return out


def layer_map_pairs(spec: TeacherSpec) -> list[tuple[int, int]]:
    """``(student_layer, teacher_layer)`` for every source of the layer map: the cells to outline on a
    ``[student_layers, teacher_layers]`` matrix such as a stored ``teacher_student`` CKA."""
    return [(s, t) for s, src in enumerate(spec.layer_map.sources) for t, _ in src]
