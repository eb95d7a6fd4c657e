"""Several finished runs side by side, by the size of the students' training data: does a gap close when the
student has more data?

Each run is one data size (``data`` of its config); ``kava compare RUN...`` reads what the runs wrote — each
``report.json`` (the paired tests against the baseline, Holm across that run's variants) and each student's
``eval/<variant>-seed-<seed>/stage.json`` (its accuracy on the eval split) — and writes ``compare.md`` with one
row per run and ``figures/accuracy-by-data.png``, accuracy against student rows with seed bands. Nothing is
recomputed or retrained: the numbers are the runs' own.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from kava.analysis.convergence import band_plot
from kava.core.errors import ConfigError

from .lasting import fmt_p, pct


def _load(run: Path) -> dict[str, Any]:
    path = run / "report.json"
    if not path.is_file():
        raise ConfigError(f"{run}: no report.json. Pass the folder of a finished `kava run` (runs/NAME), or finish "
                          f"it first with `kava run CONFIG`.")
    report = json.loads(path.read_text())
    report["rows"] = report["splits"]["student-train"]["rows"]
    report["seed_accuracy"] = {}
    for entry in report["accuracy"]:
        v = entry["variant"]
        report["seed_accuracy"][v] = {
            s: json.loads((run / "eval" / f"{v}-seed-{s}" / "stage.json").read_text())["accuracy"]
            for s in entry["seeds"]}
    return report


def compare_runs(runs: list[Path], out: Path) -> Path:
    """``compare.md`` and ``figures/accuracy-by-data.png`` under ``out`` for ``runs`` (one data size each); returns
    the markdown's path. Variants are those every run has; the baseline must be the same in all."""
    reports = sorted(((run, _load(run)) for run in runs), key=lambda r: r[1]["rows"])
    baselines = {r["baseline"] for _, r in reports}
    if len(baselines) != 1:
        raise ConfigError(f"The runs compare against different baselines ({sorted(baselines)}). Pass runs of one "
                          "experiment at several data sizes.")
    baseline = baselines.pop()
    variants = [e["variant"] for e in reports[0][1]["accuracy"]
                if all(e["variant"] in r["seed_accuracy"] for _, r in reports)]
    others = [v for v in variants if v != baseline]
    lines = ["# Accuracy by the students' data size", "",
             "Each row is one `kava run` (its folder named); accuracy on its eval split, mean ± std over seeds. Δ is "
             f"against `{baseline}` in the same run, paired by seed, Holm across that run's variants; the numbers are "
             "the runs' own `report.json`.", "",
             "| run | student rows | " + " | ".join(f"`{v}` %" for v in variants) + " | "
             + " | ".join(f"`{v}` − `{baseline}`, points [95% CI] (Holm p)" for v in others) + " |",
             "|---|---|" + "---|" * (len(variants) + len(others))]
    for run, r in reports:
        acc = {e["variant"]: e for e in r["accuracy"]}
        cells = [f"{pct(acc[v]['mean'])} ± {pct(acc[v]['std'])}" for v in variants]
        deltas = [f"{100 * acc[v]['diff']:+.1f} [{100 * acc[v]['diff_ci'][0]:+.1f}, {100 * acc[v]['diff_ci'][1]:+.1f}]"
                  f" ({fmt_p(acc[v]['p_holm'])})" for v in others]
        lines.append(f"| `{run.name}` | {r['rows']} | " + " | ".join(cells) + " | " + " | ".join(deltas) + " |")
    curves = {v: {} for v in variants}  # variant → seed → [(rows, accuracy %)]
    for _, r in reports:
        for v in variants:
            for s, a in r["seed_accuracy"][v].items():
                curves[v].setdefault(s, []).append((r["rows"], 100 * a))
    out.mkdir(parents=True, exist_ok=True)
    fig = band_plot(curves, out / "figures" / "accuracy-by-data.png", xlabel="student training rows",
                    ylabel="accuracy % (eval split)", title="accuracy against data size (mean, min-max over seeds)",
                    logx=True)
    lines += ["", f"![accuracy against data size]({fig.relative_to(out)})", ""]
    path = out / "compare.md"
    path.write_text("\n".join(lines))
    return path
