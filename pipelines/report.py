"""``report.md``, its figures and ``report.json``, from what a `kava run` wrote: nothing in it is typed in.

Students of one seed share initial weights and batch order, and every model answers the same eval items, so the
primary test of a variant against the baseline is paired by seed (paired t-test on per-seed accuracy and NLL,
Holm-corrected across variants); McNemar's exact test per seed and pooled over seeds, and a bootstrap of per-item
NLL differences, read the items; Welch's unpaired test stays as a secondary column. The statistics and the plots
come from ``kava.analysis``; this module only gathers each stage's records and lays them out.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from kava.analysis.cka import store_cka
from kava.analysis.curves import accuracy_bars, eval_curve, layer_cosine, learning_curves
from kava.analysis.heatmap import heatmap, layer_map_matrix, layer_map_pairs
from kava.analysis.paired import (
    PairedComparison,
    compare_paired,
    match_items,
    mcnemar_exact,
    mcnemar_pooled,
    paired_bootstrap_items,
)
from kava.analysis.stats import format_mean_ci
from kava.core.errors import ConfigError
from kava.distill.evaluate.score import truncation_note
from kava.kvstore import KVStore
from kava.kvstore import summary as store_summary

from . import splits
from .config import RunConfig
from .contrasts import contrasts_section
from .families import families_section, routing_section
from .lasting import budget_section, grad_share_section, tune_section

Cell = Callable[[PairedComparison], str]
"""Formats one table cell of a variant's row."""

ALPHA = 0.05
TEACHER_FLOOR = 0.30
"""Below this eval accuracy a teacher knows too little of the task for a comparison to show that it transferred."""


def _metrics(path: Path) -> list[dict[str, float]]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _fmt(x: float | None, spec: str = ".3f") -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def _p(x: float | None) -> str:
    """A p-value: three decimals, or two significant digits below 0.001 (so a tiny p never reads as 0.000)."""
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    return f"{x:.1e}" if x < 1e-3 else f"{x:.3f}"


def _mib(n: float | None) -> str:
    return "–" if n is None else f"{n / 2**20:.1f} MiB"


def write_report(cfg: RunConfig, root: Path, *, data: dict[str, Any], teachers: dict[str, Any],
                 store: dict[str, Any], students: dict[tuple[str, int], dict[str, Any]],
                 evals: dict[str, dict[str, Any]], timings: dict[str, float]) -> Path:
    """Write ``root/report.md`` (+ ``figures/*.png``, ``report.json``) and return the markdown's path."""
    figures = root / "figures"
    figures.mkdir(parents=True, exist_ok=True)
    variants = [v.name for v in cfg.variants]
    teacher_evals = {n: evals[f"teacher {n}"] for n in teachers if f"teacher {n}" in evals}
    student = {(v, s): evals[f"{v} seed {s}"] for v in variants for s in cfg.seeds}
    unit = nll_unit([*student.values(), *teacher_evals.values()])
    nll_key = {"token": "nll", "char": "nll_per_char"}[unit]
    acc = {v: {s: student[v, s]["accuracy"] for s in cfg.seeds} for v in variants}
    nll = {v: {s: student[v, s][nll_key] for s in cfg.seeds} for v in variants}
    acc_cmp = compare_paired(acc, cfg.baseline, alpha=ALPHA)
    nll_cmp = compare_paired(nll, cfg.baseline, alpha=ALPHA)
    items = {key: _items(e) for key, e in student.items()}
    mcnemar = {v: _mcnemar(items, v, cfg) for v in variants if v != cfg.baseline}
    nll_items = {v: _nll_bootstrap(items, v, cfg, unit) for v in variants if v != cfg.baseline}

    runs = {v: [_metrics(root / "students" / v / f"seed-{s}" / "metrics.jsonl") for s in cfg.seeds]
            for v in variants}
    figs = {
        "accuracy": accuracy_bars(acc_cmp, figures / "accuracy.png", title="Eval accuracy per variant",
                                  points={v: list(x.values()) for v, x in acc.items()},
                                  extra={f"teacher: {n}": e["accuracy"] for n, e in teacher_evals.items()}),
        "nll": accuracy_bars(nll_cmp, figures / "nll.png", title="Reference NLL (lower is better)",
                             points={v: list(x.values()) for v, x in nll.items()}, percent=False,
                             ylabel=f"nats per {unit}",
                             extra={f"teacher: {n}": e[nll_key] for n, e in teacher_evals.items() if e.get(nll_key)}),
        "curves": learning_curves(runs, figures / "learning-curves.png", smooth=5),
        "cosine": layer_cosine(runs, figures / "layer-cosine.png"),
    }
    curves = {v: _mean_curve([evals[f"{v} seed {s}"].get("curve") or [] for s in cfg.seeds]) for v in variants}
    rows = cfg.eval.checkpoint_rows
    figs["ckpt-acc"] = eval_curve({v: [(p["step"], 100 * p["accuracy"]) for p in c] for v, c in curves.items()},
                                  figures / "checkpoint-accuracy.png", ylabel=f"accuracy % (first {rows} eval rows)",
                                  title="task accuracy at checkpoints (mean over seeds)")
    figs["ckpt-nll"] = eval_curve({v: [(p["step"], p["nll"]) for p in c] for v, c in curves.items()},
                                  figures / "checkpoint-nll.png",
                                  ylabel=f"reference NLL, nats/token (first {rows} eval rows)",
                                  title="reference NLL at checkpoints (mean over seeds)")
    kv = KVStore.open(store["path"])  # read-only, once, for the CKA and the store's sections
    cka_lines, cka_json = _cka_section(kv, figures)

    lines = [f"# {cfg.name}: KV distillation vs CE-only", ""]
    lines += [f"Written {time.strftime('%Y-%m-%d %H:%M')} by `kava run` from `config.yaml` (next to this file). "
              f"Every number below comes from this run's outputs. Seeds: {cfg.seeds}; baseline: `{cfg.baseline}`.",
              ""]
    lines += ["## Result", ""] + teacher_lines(cfg, teacher_evals, data)
    lines += truncation_lines(cfg, {f"teacher `{n}`": [_items(e)] for n, e in teacher_evals.items()}
                              | {f"`{v}`": [items[v, s] for s in cfg.seeds] for v in variants}) + [""]
    lines += _verdicts(acc_cmp, nll_cmp, mcnemar, unit, cfg, teacher_evals) + [""]
    lines += _accuracy_section(cfg, data, acc_cmp, mcnemar, teacher_evals, format_mean_ci)
    lines += [f"![accuracy]({figs['accuracy'].relative_to(root)})", ""]
    lines += _nll_section(cfg, nll_cmp, nll_items, unit, nll_key, teacher_evals, format_mean_ci)
    lines += [f"![nll]({figs['nll'].relative_to(root)})", ""]
    contrast_lines, contrast_json = contrasts_section(
        cfg.contrasts, cfg.seeds, acc, nll, unit, lambda a, b: _mcnemar(items, a, cfg, other=b), alpha=ALPHA)
    lines += contrast_lines
    family_json: dict[str, Any] = {}
    if cfg.data.families:  # accuracy per task family, the contrasts per family, the routers' decisions
        family_lines, family_json = families_section(
            cfg, splits.families_of(root, "eval"), {n: _items(e) for n, e in teacher_evals.items()}, items,
            alpha=ALPHA)
        routing_lines, routing_json = routing_section(cfg, runs, students, figures)
        lines += family_lines + routing_lines
        family_json["routing"] = routing_json
    tune_lines, tune_json = tune_section(root)
    lines += tune_lines
    budget_curves = {v: {s: evals[f"{v} seed {s}"].get("curve") or [] for s in cfg.seeds} for v in variants}
    budget_lines, budget_json = budget_section(cfg, budget_curves, figures, root)
    lines += budget_lines
    share_lines, share_json = grad_share_section(runs)
    lines += share_lines

    lines += _compute_section(cfg, students)
    lines += _splits_section(data)
    lines += ["## Learning curves", "", "Mean over seeds, min–max band; smoothed over 5 steps.", "",
              f"![learning curves]({figs['curves'].relative_to(root)})", "",
              f"Task accuracy and reference NLL of every kept checkpoint on the first {rows} eval problems (the last "
              "point is the final student on the same problems):", "",
              f"![checkpoint accuracy]({figs['ckpt-acc'].relative_to(root)}) "
              f"![checkpoint NLL]({figs['ckpt-nll'].relative_to(root)})", "",
              "## Per-layer K/V cosine at the end of training", "",
              "Cosine between the projected student and the teacher K (left) and V (right), averaged over the last "
              "20 steps, mean ± std over seeds.", "", f"![layer cosine]({figs['cosine'].relative_to(root)})", ""]
    lines += cka_lines
    lines += _store_section(kv)
    lines += ["## Timings", "", "| unit of work | seconds |", "|---|---|"]
    lines += [f"| {k} | {v:.1f} |" for k, v in timings.items()]
    lines += [f"| **total** | {sum(timings.values()):.1f} |", "",
              "Units reused from an earlier run show the seconds they took then.", ""]

    (root / "report.md").write_text("\n".join(lines))
    summary = {"accuracy": [{**c.to_dict(), "test": "paired t by seed", **_mcnemar_json(mcnemar.get(c.variant))}
                            for c in acc_cmp],
               "nll": [{**c.to_dict(), "test": "paired t by seed", "unit": f"nats per {unit}",
                        "item_bootstrap": nll_items.get(c.variant)} for c in nll_cmp],
               "contrasts": contrast_json, "nll_unit": unit, "teachers": teacher_evals, "teacher_floor": TEACHER_FLOOR,
               "seeds": cfg.seeds,
               "baseline": cfg.baseline,
               "compute": {f"{v} seed {s}": {k: r.get(k) for k in ("steps", "tokens", "batch_size")}
                           for (v, s), r in students.items()},
               "checkpoints": curves, "splits": data["splits"], "cka": cka_json, "timings": timings,
               **({"tune": tune_json} if tune_json else {}), **({"budgets": budget_json} if budget_json else {}),
               **({"grad_shares": share_json} if share_json else {}),
               **({"families": family_json} if family_json else {})}
    (root / "report.json").write_text(json.dumps(summary, indent=2, default=str))
    return root / "report.md"


def _mean_curve(seeds: list[list[dict[str, float]]]) -> list[dict[str, float]]:
    """Per step, the mean of every seed that evaluated that step."""
    steps = sorted({p["step"] for curve in seeds for p in curve})
    out = []
    for step in steps:
        points = [p for curve in seeds for p in curve if p["step"] == step]
        out.append({"step": step, **{k: sum(p[k] for p in points) / len(points) for k in ("accuracy", "nll")}})
    return out


def nll_unit(records: list[dict[str, Any]]) -> str:
    """``"token"`` when every model in the tables scored its NLL with one tokenizer, else ``"char"``: nats per token
    of different tokenizers count different tokens, nats per character of the same text compare."""
    fingerprints = {r.get("nll_tokenizer") for r in records}
    return "token" if len(fingerprints) == 1 and None not in fingerprints else "char"


def _items(record: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The eval's per-item JSONL, by sample id."""
    lines = Path(record.get("items") or record["settings"]["out"]).read_text(encoding="utf-8").splitlines()
    return {item["sample_id"]: item for item in (json.loads(line) for line in lines if line.strip())}


def _mcnemar(items: dict[tuple[str, int], dict[str, dict[str, Any]]], variant: str, cfg: RunConfig,
             other: str | None = None) -> dict[str, Any]:
    """McNemar's exact test of ``variant`` against ``other`` (the baseline) on each seed's items, and pooled over
    seeds."""
    other = other or cfg.baseline
    per_seed = {}
    for s in cfg.seeds:
        _, a, b = match_items({k: i["correct"] for k, i in items[variant, s].items()},
                              {k: i["correct"] for k, i in items[other, s].items()},
                              name=f"{variant} seed {s}", other=f"{other} seed {s}")
        per_seed[s] = mcnemar_exact(a, b)
    return {"per_seed": per_seed, "pooled": mcnemar_pooled(list(per_seed.values()))}


def _mcnemar_json(m: dict[str, Any] | None) -> dict[str, Any]:
    if m is None:
        return {}
    return {"mcnemar": {"per_seed": {str(s): t.to_dict() for s, t in m["per_seed"].items()},
                        "pooled": m["pooled"].to_dict()}}


def _nll_bootstrap(items: dict[tuple[str, int], dict[str, dict[str, Any]]], variant: str, cfg: RunConfig,
                   unit: str) -> dict[str, Any]:
    """Paired bootstrap over items of the NLL difference to the baseline, seeds averaged per item.

    Per-item rates (nats per ``unit``) weighted by the item's units make the statistic total nats over total units,
    so its point estimate equals the mean per-seed difference of the table; the interval is the items' own."""
    units = {"token": "nll_tokens", "char": "nll_chars"}[unit]

    def rate(item: dict[str, Any]) -> float:
        return item["nll_nats"] / item[units] if item[units] else 0.0  # an empty item weighs 0

    a, b, ids = [], [], None
    for s in cfg.seeds:
        seed_ids, va, vb = match_items(items[variant, s], items[cfg.baseline, s], name=f"{variant} seed {s}",
                                       other=f"{cfg.baseline} seed {s}")
        if ids is not None and seed_ids != ids:
            raise ConfigError(f"Expected every seed of {variant!r} to be scored on the same items. Got another item "
                              f"set at seed {s} instead. Rerun the eval stage (--force eval).")
        ids = seed_ids
        a.append([rate(i) for i in va])
        b.append([rate(i) for i in vb])
    weights = [items[cfg.baseline, cfg.seeds[0]][k][units] for k in ids or []]
    diff, (low, high) = paired_bootstrap_items(a, b, weights=weights, seed=0)
    return {"diff": diff, "ci": [None if math.isnan(v) else v for v in (low, high)], "items": len(weights),
            "unit": f"nats per {unit}"}


def teacher_lines(cfg: RunConfig, teacher_evals: dict[str, dict[str, Any]], data: dict[str, Any]) -> list[str]:
    if not teacher_evals:
        return ["The teachers were not evaluated (`eval.teachers: false`), so this report cannot say whether they "
                "knew the task, nor show that anything transferred from them."]
    out = []
    for name, e in teacher_evals.items():
        line = (f"- **Teacher `{name}`: {100 * e['accuracy']:.1f}% on the eval split** ({e['correct']} of {e['n']} "
                f"problems; floor {100 * TEACHER_FLOOR:.0f}%)")
        if e["accuracy"] < TEACHER_FLOOR:
            line += (": below the floor, it knows too little of the task for a student to learn it from it, so the "
                     f"comparisons below **cannot show a transfer** from `{name}`.")
        out.append(line + ("" if e["accuracy"] < TEACHER_FLOOR else "."))
    return out


def truncation_lines(cfg: RunConfig, items: dict[str, list[dict[str, dict[str, Any]]]]) -> list[str]:
    """A warning for each model (its seeds pooled) whose generations were too often cut off at
    ``eval.max_new_tokens``: those items count as wrong, so its accuracy measures the budget."""
    out = []
    for who, runs in items.items():
        every = [item for run in runs for item in run.values()]
        longest = max((i["nll_tokens"] for i in every if i.get("nll_tokens") is not None), default=None)
        note = truncation_note(sum(i.get("stop") == "budget" for i in every), len(every), cfg.eval.max_new_tokens,
                               longest, option="`eval.max_new_tokens` and run again: `kava run` redoes the evaluations "
                                               "and the tuning they score")
        if note:
            out.append(f"- **Cut short: {who}.** {note}")
    return out


def teacher_clause(variant: str, cfg: RunConfig, teacher_evals: dict[str, dict[str, Any]]) -> str:
    """What the variant's teachers allow the verdict to claim."""
    teachers = next(v.teachers for v in cfg.variants if v.name == variant)
    low = [t for t in teachers if t in teacher_evals and teacher_evals[t]["accuracy"] < TEACHER_FLOOR]
    unmeasured = [t for t in teachers if t not in teacher_evals]
    text = ""
    if low:
        scores = ", ".join(f"`{t}` {100 * teacher_evals[t]['accuracy']:.1f}%" for t in low)
        whom = "" if len(low) == len(teachers) else " from " + ", ".join(f"`{t}`" for t in low)
        text += (f" **The teacher is below the {100 * TEACHER_FLOOR:.0f}% floor ({scores}): this comparison cannot "
                 f"show a transfer{whom}**; a difference here comes from the K/V loss itself, not from what the "
                 "teacher knows.")
    if unmeasured:
        text += (" The accuracy of " + ", ".join(f"`{t}`" for t in unmeasured) + " was not measured, so whether it "
                 "had anything to transfer is unknown.")
    return text


def _verdicts(acc_cmp: list[PairedComparison], nll_cmp: list[PairedComparison], mcnemar: dict[str, Any], unit: str,
              cfg: RunConfig, teacher_evals: dict[str, dict[str, Any]]) -> list[str]:
    """One line per variant, decided by the paired t-test on accuracy (Holm-adjusted)."""
    base = acc_cmp[0]
    out = []
    for a, n in zip(acc_cmp[1:], nll_cmp[1:]):
        if math.isnan(a.p):
            outcome = "could not be tested against"  # one seed: no variance to test with
        elif a.significant:
            outcome = "beat" if a.diff > 0 else "was worse than"
        else:
            outcome = "did not differ significantly from"
        m = mcnemar[a.variant]["pooled"]
        out.append(
            f"- **`{a.variant}` {outcome} `{cfg.baseline}` on accuracy** (paired t-test over {a.n} seeds, "
            f"Holm-corrected across {len(acc_cmp) - 1} variant(s), α = {ALPHA}): {100 * a.mean:.1f}% vs "
            f"{100 * base.mean:.1f}%, {100 * a.diff:+.1f} points (95% CI [{_pct(a.diff_ci[0])}, "
            f"{_pct(a.diff_ci[1])}]), p = {_p(a.p)}, Holm p = {_p(a.p_holm)}. McNemar pooled over seeds: "
            f"{m.only_a} items right only under `{a.variant}`, {m.only_b} only under `{cfg.baseline}`, exact "
            f"p = {_p(m.p)}; Welch (unpaired, secondary) p = {_p(a.welch_p)}. Reference NLL {n.diff:+.3f} "
            f"nats/{unit} (95% CI [{_fmt(n.diff_ci[0], '+.3f')}, {_fmt(n.diff_ci[1], '+.3f')}], paired "
            f"p = {_p(n.p)}, Holm p = {_p(n.p_holm)}, {'significant' if n.significant else 'not significant'})."
            + teacher_clause(a.variant, cfg, teacher_evals))
    return out


def _pct(x: float) -> str:
    return _fmt(None if math.isnan(x) else 100 * x, "+.1f")


_PAIRING = ("Students of one seed share initial weights and batch order, so each variant is compared with the "
            "baseline seed by seed: Δ is the mean per-seed difference with its paired-t 95% CI, and p the paired "
            f"t-test (the primary test; Holm-adjusted across variants, significant at α = {ALPHA}). Welch's "
            "unpaired t-test is a secondary column: it ignores the pairing.")


def _model_rows(cfg: RunConfig, comparisons: list[PairedComparison], teacher_evals: dict[str, dict[str, Any]], *,
                teacher: Callable[[dict[str, Any]], str], value: Cell, delta: Cell, extra: Cell) -> list[str]:
    """The rows the accuracy and NLL tables share: each teacher, the baseline, then every variant with its Δ, paired
    p, Holm p, verdict, one table-specific cell (``extra``) and Welch's p. The callables format one cell each."""
    rows = [f"| teacher `{n}` | – | {teacher(e)} |" + " – |" * 6 for n, e in teacher_evals.items()]
    for c in comparisons:
        head = f"| `{c.variant}` | {c.n} | {value(c)} |"
        rows.append(head + " – |" * 6 if c.variant == cfg.baseline else
                    f"{head} {delta(c)} | {_p(c.p)} | {_p(c.p_holm)} | {'yes' if c.significant else 'no'} | "
                    f"{extra(c)} | {_p(c.welch_p)} |")
    return rows


def _diff_ci(diff: float, ci: Sequence[float | None]) -> str:
    return f"{diff:+.3f} [{_fmt(ci[0], '+.3f')}, {_fmt(ci[1], '+.3f')}]"


def _accuracy_section(cfg: RunConfig, data: dict[str, Any], acc_cmp: list[PairedComparison], mcnemar: dict[str, Any],
                      teacher_evals: dict[str, dict[str, Any]], fmt: Callable[..., str]) -> list[str]:
    lines = ["## Accuracy on the eval split", "",
             f"Greedy decoding, exact match of the `#### N` answer, {data['splits']['eval']['rows']} problems. "
             f"Mean ± std over seeds [bootstrap 95% CI of the mean]. {_PAIRING} McNemar's exact test reads the "
             "items: pooled over seeds it sums every seed's discordant items (right under one model only), an "
             "exact binomial test on the sums; each seed's own test is in the table after.", "",
             "| model | seeds | accuracy % | Δ points [95% CI] | paired p | p (Holm) | significant | McNemar pooled "
             "(only variant / only baseline) | Welch p |", "|---|---|---|---|---|---|---|---|---|"]
    pooled = {v: m["pooled"] for v, m in mcnemar.items()}
    lines += _model_rows(cfg, acc_cmp, teacher_evals, teacher=lambda e: f"{100 * e['accuracy']:.1f}", value=fmt,
                         delta=lambda c: f"{100 * c.diff:+.1f} [{_pct(c.diff_ci[0])}, {_pct(c.diff_ci[1])}]",
                         extra=lambda c: f"{pooled[c.variant].only_a} / {pooled[c.variant].only_b}, "
                                         f"p = {_p(pooled[c.variant].p)}")
    lines += ["", f"McNemar per seed (items matched by id; `{cfg.baseline}` of the same seed):", "",
              f"| variant | seed | both right | only variant | only `{cfg.baseline}` | both wrong | exact p |",
              "|---|---|---|---|---|---|---|"]
    for v, m in mcnemar.items():
        for s, t in m["per_seed"].items():
            lines.append(f"| `{v}` | {s} | {t.both} | {t.only_a} | {t.only_b} | {t.neither} | {_p(t.p)} |")
    return lines + [""]


def _nll_section(cfg: RunConfig, nll_cmp: list[PairedComparison], nll_items: dict[str, Any], unit: str, nll_key: str,
                 teacher_evals: dict[str, dict[str, Any]], fmt: Callable[..., str]) -> list[str]:
    why = ("nats per character of the scored text: the teacher and the students tokenize differently, and nats per "
           "token would compare different numbers of different tokens" if unit == "char" else
           "nats per token: every model in this table uses the same tokenizer")
    lines = ["## Reference NLL on the eval split", "",
             "Teacher-forced negative log-likelihood of each problem's reference reasoning and answer (the text "
             f"after the eval prompt), lower is better, in **{why}**. It moves with learning even where greedy "
             f"accuracy sits near the floor. {_PAIRING} The item bootstrap resamples the problems (seeds averaged "
             "per problem, 10,000 resamples): the same Δ, with a 95% interval over problems that holds the trained "
             "students fixed, so it says how much Δ depends on which problems were drawn, not on which seeds.", "",
             f"| model | seeds | NLL (nats/{unit}) | Δ [95% CI] | paired p | p (Holm) | significant | item bootstrap "
             "Δ [95% CI] | Welch p |", "|---|---|---|---|---|---|---|---|---|"]
    lines += _model_rows(cfg, nll_cmp, teacher_evals, teacher=lambda e: _fmt(e.get(nll_key)),
                         value=lambda c: fmt(c, percent=False, digits=3), delta=lambda c: _diff_ci(c.diff, c.diff_ci),
                         extra=lambda c: _diff_ci(nll_items[c.variant]["diff"], nll_items[c.variant]["ci"]))
    return lines + [""]

def _compute_section(cfg: RunConfig, students: dict[tuple[str, int], dict[str, Any]]) -> list[str]:
    lines = ["## Equal compute", "",
             "Every variant trains the same steps on the same batches of the same store grid (CE-only reads the grid "
             "without the K/V). Tokens are counted by the trainer.", "",
             "| variant | seed | steps | samples/step | tokens | train seconds |", "|---|---|---|---|---|---|"]
    for (v, s), r in students.items():
        lines.append(f"| `{v}` | {s} | {r.get('steps')} | {r.get('batch_size')} | {r.get('tokens')} | "
                     f"{_fmt(r.get('train_seconds'), '.1f')} |")
    by_seed: dict[int, set[tuple[Any, Any]]] = {}
    for (_, s), r in students.items():
        by_seed.setdefault(s, set()).add((r.get("steps"), r.get("tokens")))
    equal = all(len(x) == 1 for x in by_seed.values())
    lines += ["", "Steps and tokens are **equal across variants for every seed**." if equal else
              "**Warning: steps or tokens differ between variants of one seed** — the comparison is not at equal "
              "compute.", ""]
    return lines


def _splits_section(data: dict[str, Any]) -> list[str]:
    lines = ["## Data splits", "", "Disjoint by question text (checked when they are made); every stage re-hashes "
             "the split it reads and refuses another.", "",
             "| split | rows | sample-id hash | question hash |", "|---|---|---|---|"]
    for role, s in data["splits"].items():
        lines.append(f"| {role} | {s['rows']} | `{s['sample_ids_hash'][:16]}` | `{s['questions_hash'][:16]}` |")
    return lines + [""]


def _cka_section(kv: KVStore, figures: Path) -> tuple[list[str], dict[str, Any]]:
    lines = ["## Layers: CKA and the layer map", ""]
    out: dict[str, Any] = {}
    for name, spec in kv.teachers.items():
        if spec.eviction is not None:  # each layer kept other rows: they do not pair (FORMAT.md)
            ev = spec.eviction
            lines += [f"### `{name}`", "", f"A compressed teacher ({ev.rule}, budget {ev.budget} of its "
                      f"{', '.join(ev.segments)} rows): each layer kept other rows, so its layers' CKA over the store "
                      "is not defined; see the teacher it was extracted from.", ""]
            continue
        t0 = time.perf_counter()
        result = store_cka(kv, name, array="k", estimator="biased")
        seconds = time.perf_counter() - t0
        ticks = [str(layer) for layer in result.layers]
        png = heatmap(result.matrix, figures / f"cka-{name}-k.png", title=f"{name}: linear CKA of stored K "
                      f"({result.tokens} tokens, out of core)", row_label="teacher layer", col_label="teacher layer",
                      row_ticks=ticks, col_ticks=ticks, vmin=0, vmax=1)
        lm = heatmap(layer_map_matrix(spec), figures / f"layer-map-{name}.png",
                     title=f"{name}: layer map ({spec.layer_map.method})", row_label="student layer",
                     col_label="teacher layer", layer_map=layer_map_pairs(spec), vmin=0, vmax=1,
                     colorbar_label="weight")
        lines += [f"### `{name}`", "",
                  f"Linear CKA between the teacher's stored layers (K, biased estimator, computed out of core with "
                  f"dask over {result.tokens} tokens in {seconds:.1f} s), and the layer map that feeds each student "
                  "layer.", "", f"![cka]({png.relative_to(figures.parent)}) ![layer map]"
                  f"({lm.relative_to(figures.parent)})", ""]
        stored = kv.cka(name)
        for cname, (matrix, attrs) in stored.items():
            p = heatmap(matrix, figures / f"cka-{name}-{cname}.png", title=f"{name}: stored CKA {cname}",
                        row_label=attrs.get("rows", "rows"), col_label=attrs.get("cols", "cols"), vmin=0, vmax=1,
                        layer_map=layer_map_pairs(spec) if matrix.shape[0] == len(spec.layer_map.sources) else None)
            lines += [f"Stored at extraction: `{cname}` ({attrs.get('estimator', 'estimator not recorded')}).", "",
                      f"![{cname}]({p.relative_to(figures.parent)})", ""]
        out[name] = {"k_self": result.matrix.tolist(), "tokens": result.tokens, "seconds": seconds,
                     "stored": sorted(stored)}
    return lines, out


def _store_section(kv: KVStore) -> list[str]:
    s = store_summary(kv)
    lines = ["## The store", "", f"`{Path(kv.where).name}`: {s['samples']} samples, {s['tokens']} student "
             f"tokens in {s['shards']} shards, {_mib(s['bytes_on_disk'])} on disk.", "",
             "| teacher | layers | KV heads × dim | dtype | codec | logical | on disk | ratio | rows kept | "
             "fidelity error |", "|---|---|---|---|---|---|---|---|---|---|"]
    for name, t in s["teachers"].items():
        ratio = t["bytes_logical"] / t["bytes_on_disk"] if t.get("bytes_on_disk") else float("nan")
        ev = t.get("eviction")
        kept = "all" if ev is None or ev["kept_fraction"] is None else f"{100 * ev['kept_fraction']:.1f}%"
        error = "–" if ev is None or not ev["fidelity_error"] else \
            f"{sum(ev['fidelity_error']) / len(ev['fidelity_error']):.3f}"
        lines.append(f"| `{name}` | {len(t['layers'])} of {t['num_layers']} | {t['kv_heads']} × {t['head_dim']} | "
                     f"{t['dtype']} | {t['compressor']} | {_mib(t['bytes_logical'])} | {_mib(t['bytes_on_disk'])} | "
                     f"{ratio:.2f}× | {kept} | {error} |")
    lines += ["", "A compressed teacher keeps a share of each sample's rows per layer and KV head (`kava extract "
              "--kv-budget`); its fidelity error is the relative error of the answer's attention output reading only "
              "the kept rows, measured at extraction, mean over layers."] if any(
        t.get("eviction") for t in s["teachers"].values()) else []
    return lines + [""]
