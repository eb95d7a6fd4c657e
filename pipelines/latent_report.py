"""``report.md``, ``report.json`` and ``figures/accuracy.png`` of a latent run (``kind: latent``).

Per variant: accuracy with its paired difference to the baseline (paired t over seeds, Holm across variants, McNemar
pooled over seeds' items), the reference answer's NLL per token, tokens generated and milliseconds per problem (the
point of latent reasoning is fewer tokens), and training seconds; then the config's contrasts, Holm-adjusted among
themselves. Every number is read from the students' own ``eval.json``/``eval.jsonl``.
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path
from typing import Any

from kava.analysis.curves import accuracy_bars
from kava.analysis.paired import compare_paired
from kava.analysis.stats import format_mean_ci, json_safe

from .contrasts import contrasts_section
from .latent_run import LatentRunConfig, load_items
from .report import ALPHA, _mcnemar, _mcnemar_json

_EVAL_KEYS = ("answer_nll", "generated_tokens", "seconds_per_problem")


def write_latent_report(cfg: LatentRunConfig, root: Path, records: dict[tuple[str, int], dict[str, Any]]) -> Path:
    """Write the report of a finished latent run and return the path of ``report.md``."""
    names = [v.name for v in cfg.variants]
    evals = {key: json.loads((root / "students" / key[0] / f"seed-{key[1]}" / "eval.json").read_text())
             for key in records}
    acc = {v: {s: evals[v, s]["accuracy"] for s in cfg.seeds} for v in names}
    nll = {v: {s: evals[v, s]["answer_nll"] for s in cfg.seeds} for v in names}
    items = {key: load_items(root / "students" / key[0] / f"seed-{key[1]}") for key in records}
    comparisons = compare_paired({cfg.baseline: acc[cfg.baseline], **acc}, cfg.baseline, alpha=ALPHA)
    mcnemar = {v: _mcnemar(items, v, cfg) for v in names if v != cfg.baseline} if len(names) > 1 else {}
    figures = root / "figures"
    figures.mkdir(exist_ok=True)
    accuracy_bars(comparisons, figures / "accuracy.png", title=f"{cfg.name}: accuracy by variant",
                  points={v: [acc[v][s] for s in cfg.seeds] for v in names})

    first = cfg.student_config(cfg.variants[0], cfg.seeds[0])
    lines = [
        f"# {cfg.name}", "",
        f"Written {time.strftime('%Y-%m-%d %H:%M')}. Latent students (`kava latent`): {first.student} on "
        f"{first.dataset} ({first.train_size} training rows, {first.eval_size} {first.eval_split} rows evaluated), "
        f"{first.steps} steps of {first.batch_size} rows for every variant; seeds {cfg.seeds}; baseline "
        f"`{cfg.baseline}`.", "",
        "## Variants", "",
        f"Mean over seeds [bootstrap 95% CI]; Δ against `{cfg.baseline}`, paired by seed [paired-t 95% CI], p Holm-"
        "adjusted across variants; McNemar pools every seed's discordant items (only variant / only baseline).", "",
        "| variant | options | accuracy | Δ points [95% CI] | p (Holm) | McNemar | answer NLL / token | tokens "
        "generated | ms / problem | train s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    options = {v.name: v.options for v in cfg.variants}
    rows_json = []
    for c in comparisons:
        v = c.variant
        mean = {k: statistics.fmean(evals[v, s][k] for s in cfg.seeds) for k in _EVAL_KEYS}
        train = statistics.fmean(records[v, s].get("seconds_trained", 0.0) for s in cfg.seeds)
        m = mcnemar.get(v)
        pooled = f"{m['pooled'].only_a} / {m['pooled'].only_b}, p = {m['pooled'].p:.3g}" if m else "–"
        delta = "–" if v == cfg.baseline else f"{100 * c.diff:+.1f}" + (
            f" [{100 * c.diff_ci[0]:+.1f}, {100 * c.diff_ci[1]:+.1f}]" if c.n > 1 else " (one seed: no CI)")
        p = "–" if v == cfg.baseline or c.n < 2 else f"{c.p:.3g} ({c.p_holm:.3g})"
        shown = ", ".join(f"{k}={x}" for k, x in options[v].items()) or "(shared)"
        lines.append(f"| `{v}` | {shown} | {format_mean_ci(c)} | {delta} | {p} | {pooled} | "
                     f"{mean['answer_nll']:.4f} | {mean['generated_tokens']:.1f} | "
                     f"{1000 * mean['seconds_per_problem']:.1f} | {train:.0f} |")
        rows_json.append({"variant": v, "options": options[v], "accuracy": c.to_dict(), **mean,
                          "train_seconds": train, **_mcnemar_json(m),
                          "per_seed": {str(s): evals[v, s] for s in cfg.seeds}})
    lines += ["", "![accuracy by variant](figures/accuracy.png)", ""]
    contrast_lines, contrast_json = contrasts_section(
        cfg.contrasts, cfg.seeds, acc, nll, "token", lambda a, b: _mcnemar(items, a, cfg, b), alpha=ALPHA)
    lines += contrast_lines
    report = root / "report.md"
    report.write_text("\n".join(lines) + "\n", encoding="utf-8")
    (root / "report.json").write_text(json.dumps(json_safe({
        "name": cfg.name, "kind": cfg.kind, "seeds": cfg.seeds, "baseline": cfg.baseline, "variants": rows_json,
        "contrasts": contrast_json}), indent=2, default=str) + "\n", encoding="utf-8")
    return report
