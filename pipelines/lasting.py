"""The report's sections on whether an effect lasts: the tuning that chose a baseline's setting, the variants compared
at several training budgets with the compute ratio, and each loss term's share of the gradient.

Budgets read the checkpoint evaluations the runner makes (``eval.budgets``: each variant's students scored at those
steps on the first ``eval.checkpoint_rows`` eval rows); every comparison is paired by seed, Holm-adjusted across the
variants at each budget, as the main tables are. The compute ratio is "the steps a variant needs to reach the best
mean accuracy the baseline reaches at any budget", read off the same checkpoints (``kava.analysis.convergence``).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from kava.analysis.convergence import band_plot, compute_ratio
from kava.analysis.paired import compare_paired

from .config import RunConfig
from .contrasts import parse_contrast

Curves = dict[str, dict[int, list[dict[str, float]]]]
"""variant → seed → the checkpoint curve the runner recorded (``{"step", "accuracy", "nll"}`` per point)."""


def pct(x: float) -> str:
    return "–" if x is None or math.isnan(x) else f"{100 * x:.1f}"


def fmt_p(x: float) -> str:
    if x is None or math.isnan(x):
        return "–"
    return f"{x:.1e}" if x < 1e-3 else f"{x:.3f}"


def tune_section(root: Path) -> tuple[list[str], dict[str, Any] | None]:
    """The grid search that chose the tuned variants' setting (``tune.json``), as a table; nothing without one."""
    path = root / "tune.json"
    if not path.is_file():
        return [], None
    tune = json.loads(path.read_text())
    keys = list(tune["chosen"])
    lines = ["## Tuning (validation split)", "",
             f"`{tune['variant']}` was trained once per grid point (seed {tune['seed']}, {tune['steps']} steps) and "
             f"scored on {tune['validation_rows']} validation rows carved from the student share (never trained on, "
             f"never in the store; the eval split was not read). Chosen by {tune['metric']}"
             f"{' (ties: lower NLL)' if tune['metric'] == 'accuracy' else ''}: **"
             + ", ".join(f"{k} = {tune['chosen'][k]}" for k in keys) + "**, applied to "
             + ", ".join(f"`{v}`" for v in tune["apply_to"]) + ".", "",
             "| " + " | ".join(keys) + " | validation accuracy % | NLL (nats/char) |",
             "|" + "---|" * (len(keys) + 2)]
    for t in tune["trials"]:
        mark = " **(chosen)**" if t["point"] == tune["chosen"] else ""
        lines.append("| " + " | ".join(str(t["point"][k]) for k in keys)
                     + f" | {pct(t['accuracy'])}{mark} | {t['nll_per_char']:.4f} |")
    if tune["metric"] == "accuracy" and (note := _noise_note(tune)):
        lines += ["", note]
    return lines + [""], tune


def _noise_note(tune: dict[str, Any]) -> str | None:
    """A warning when the chosen trial's validation accuracy leads the next best by less than two standard errors
    of the difference of two proportions (``sqrt(2 p (1 - p) / n)`` at their mean ``p``): a choice by noise."""
    trials = sorted(tune["trials"], key=lambda t: t["accuracy"], reverse=True)
    if len(trials) < 2:
        return None
    best = next(t for t in trials if t["point"] == tune["chosen"])
    runner_up = next(t for t in trials if t is not best)
    n = best["n"]
    p = (best["accuracy"] + runner_up["accuracy"]) / 2
    se = math.sqrt(2 * p * (1 - p) / n) if n else math.inf
    if best["accuracy"] - runner_up["accuracy"] >= 2 * se:
        return None
    return (f"**The choice is within sampling noise:** the chosen point got {round(best['accuracy'] * n)} of {n} "
            f"validation rows right, the next best {round(runner_up['accuracy'] * n)}, less than two standard errors "
            "apart. `tune.metric: nll`, more validation rows or longer tuning students choose more reliably.")


def budget_section(cfg: RunConfig, curves: Curves, figures: Path, root: Path) -> tuple[list[str], dict[str, Any]]:
    """Per budget: each variant against the baseline (paired by seed, Holm across variants) and the contrasts; the
    compute ratios; accuracy and NLL against steps with seed bands."""
    budgets = sorted(cfg.eval.budgets)
    if not budgets:
        return [], {}
    variants = [v.name for v in cfg.variants]
    # budget → variant → seed → accuracy at that checkpoint
    at = {b: {v: {s: p["accuracy"] for s, curve in curves[v].items() for p in curve if p["step"] == b}
              for v in variants} for b in budgets}
    rows = cfg.eval.checkpoint_rows
    lines = ["## Budgets: does the effect last?", "",
             f"Each student kept its checkpoints at {', '.join(map(str, budgets))} steps; each is scored on the first "
             f"{rows} eval problems. Δ is against `{cfg.baseline}` at the same budget, paired by seed, p Holm-adjusted "
             "across the variants at that budget.", "",
             "| budget (steps) | " + " | ".join(f"`{v}` accuracy %" for v in variants)
             + " | " + " | ".join(f"`{v}` − `{cfg.baseline}`, points [95% CI] (Holm p)"
                                  for v in variants if v != cfg.baseline) + " |",
             "|" + "---|" * (1 + 2 * len(variants) - 1)]
    out: dict[str, Any] = {"budgets": {}, "compute_ratio": []}
    for b in budgets:
        complete = {v: x for v, x in at[b].items() if len(x) == len(cfg.seeds)}
        if cfg.baseline not in complete:
            lines.append(f"| {b} | (not every seed has a checkpoint here) |")
            continue
        cmp = {c.variant: c for c in compare_paired(complete, cfg.baseline)}
        cells = [f"{pct(cmp[v].mean)} ± {pct(cmp[v].std)}" if v in cmp else "–" for v in variants]
        deltas = [f"{100 * cmp[v].diff:+.1f} [{100 * cmp[v].diff_ci[0]:+.1f}, {100 * cmp[v].diff_ci[1]:+.1f}] "
                  f"({fmt_p(cmp[v].p_holm)})" if v in cmp else "–" for v in variants if v != cfg.baseline]
        lines.append(f"| {b} | " + " | ".join(cells) + " | " + " | ".join(deltas) + " |")
        out["budgets"][str(b)] = {v: c.to_dict() for v, c in cmp.items()}
    lines.append("")

    acc_curves = {v: {s: [(p["step"], 100 * p["accuracy"]) for p in curve] for s, curve in curves[v].items()}
                  for v in variants}
    nll_curves = {v: {s: [(p["step"], p["nll"]) for p in curve] for s, curve in curves[v].items()}
                  for v in variants}
    lines += ["Compute ratio: the steps each variant needs to reach the best mean accuracy the baseline (or the "
              "second variant of a contrast) reaches at any budget (checkpoints only, so a bound at their "
              "resolution):", "",
              "| variant | against | level % (reached by the baseline at step) | variant reaches it at step | ratio |",
              "|---|---|---|---|---|"]
    pairs = [(v, cfg.baseline) for v in variants if v != cfg.baseline]
    pairs += [p for p in (parse_contrast(c) for c in cfg.contrasts) if p not in pairs]
    for v, other in pairs:
        r = compute_ratio(acc_curves[v], acc_curves[other], names=(v, other))
        out["compute_ratio"].append({"variant": v, "against": other, "level": r.level,
                                     "baseline_steps": r.baseline_steps, "variant_steps": r.variant_steps,
                                     "ratio": r.ratio})
        reach = "never" if r.variant_steps is None else f"{r.variant_steps:.0f}"
        ratio = "–" if r.ratio is None else f"{r.ratio:.2f}×"
        lines.append(f"| `{v}` | `{other}` | {r.level:.1f} ({r.baseline_steps:.0f}) | {reach} | {ratio} |")
    acc_fig = band_plot(acc_curves, figures / "budget-accuracy.png", xlabel="steps", ylabel=f"accuracy % (first "
                        f"{rows} eval rows)", title="accuracy against steps (mean, min-max over seeds)", logx=True)
    nll_fig = band_plot(nll_curves, figures / "budget-nll.png", xlabel="steps", ylabel="reference NLL, nats/token",
                        title="reference NLL against steps (mean, min-max over seeds)", logx=True)
    lines += ["", f"![accuracy against steps]({acc_fig.relative_to(root)}) "
                  f"![NLL against steps]({nll_fig.relative_to(root)})", ""]
    return lines, out


def grad_share_section(runs: dict[str, list[list[dict[str, float]]]]) -> tuple[list[str], dict[str, Any]]:
    """Each loss term's mean share of the gradient norm on the student (``--grad-shares-every``), per variant."""
    shares: dict[str, dict[str, float]] = {}
    for variant, seeds in runs.items():
        records = [r for seed in seeds for r in seed if any(k.startswith("grad_share/") for k in r)]
        terms = sorted({k.split("/", 1)[1] for r in records for k in r if k.startswith("grad_share/")})
        if records and len(terms) > 1:
            shares[variant] = {t: sum(r.get(f"grad_share/{t}", 0.0) for r in records) / len(records) for t in terms}
    if not shares:
        return [], {}
    terms = sorted({t for s in shares.values() for t in s}, key=lambda t: ("ce", "kv", "logit").index(t)
                   if t in ("ce", "kv", "logit") else 9)
    lines = ["## Balance of the loss terms", "",
             "Each term's share of the gradient norm on the student's own parameters (weighted as trained), averaged "
             "over the measured steps and seeds. A term near 0 contributes almost nothing to the update; one near 1 "
             "drowns the others.", "",
             "| variant | " + " | ".join(f"{t} share" for t in terms) + " |", "|---|" + "---|" * len(terms)]
    for variant, s in shares.items():
        lines.append(f"| `{variant}` | " + " | ".join(f"{100 * s[t]:.0f}%" if t in s else "–" for t in terms) + " |")
    return lines + [""], shares
