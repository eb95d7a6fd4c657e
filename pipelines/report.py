"""``report.md``, its figures and ``report.json``, from what a `kava run` wrote: nothing in it is typed in.

The statistics (Welch t-test, bootstrap CIs, Holm correction) and the plots come from ``kava.analysis``; this module
only gathers each stage's records and lays them out.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

from .config import RunConfig

ALPHA = 0.05


def _metrics(path: Path) -> list[dict[str, float]]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _fmt(x: float | None, spec: str = ".3f") -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def _mib(n: float | None) -> str:
    return "–" if n is None else f"{n / 2**20:.1f} MiB"


def write_report(cfg: RunConfig, root: Path, *, data: dict[str, Any], teachers: dict[str, Any],
                 store: dict[str, Any], students: dict[tuple[str, int], dict[str, Any]],
                 evals: dict[str, dict[str, Any]], timings: dict[str, float]) -> Path:
    """Write ``root/report.md`` (+ ``figures/*.png``, ``report.json``) and return the markdown's path."""
    from kava.analysis.curves import accuracy_bars, eval_curve, layer_cosine, learning_curves
    from kava.analysis.stats import compare, format_mean_ci

    figures = root / "figures"
    figures.mkdir(parents=True, exist_ok=True)
    variants = [v.name for v in cfg.variants]
    acc = {v: [evals[f"{v} seed {s}"]["accuracy"] for s in cfg.seeds] for v in variants}
    nll = {v: [evals[f"{v} seed {s}"]["nll"] for s in cfg.seeds] for v in variants}
    acc_cmp = compare(acc, cfg.baseline, alpha=ALPHA)
    nll_cmp = compare(nll, cfg.baseline, alpha=ALPHA)
    teacher_evals = {n: evals[f"teacher {n}"] for n in teachers if f"teacher {n}" in evals}

    runs = {v: [_metrics(root / "students" / v / f"seed-{s}" / "metrics.jsonl") for s in cfg.seeds]
            for v in variants}
    figs = {
        "accuracy": accuracy_bars(acc_cmp, figures / "accuracy.png", title="Eval accuracy per variant", points=acc,
                                  extra={f"teacher: {n}": e["accuracy"] for n, e in teacher_evals.items()}),
        "nll": accuracy_bars(nll_cmp, figures / "nll.png", title="Reference NLL (lower is better)", points=nll,
                             percent=False, ylabel="nats per token",
                             extra={f"teacher: {n}": e["nll"] for n, e in teacher_evals.items() if e.get("nll")}),
        "curves": learning_curves(runs, figures / "learning-curves.png", smooth=5),
        "cosine": layer_cosine(runs, figures / "layer-cosine.png"),
    }
    curves = {v: _mean_curve([evals[f"{v} seed {s}"].get("curve") or [] for s in cfg.seeds]) for v in variants}
    rows = cfg.eval.checkpoint_rows
    figs["ckpt-acc"] = eval_curve({v: [(p["step"], 100 * p["accuracy"]) for p in c] for v, c in curves.items()},
                                  figures / "checkpoint-accuracy.png", ylabel=f"accuracy % (first {rows} eval rows)",
                                  title="task accuracy at checkpoints (mean over seeds)")
    figs["ckpt-nll"] = eval_curve({v: [(p["step"], p["nll"]) for p in c] for v, c in curves.items()},
                                  figures / "checkpoint-nll.png", ylabel=f"reference NLL (first {rows} eval rows)",
                                  title="reference NLL at checkpoints (mean over seeds)")
    from kava.kvstore import KVStore

    kv = KVStore.open(store["path"])  # read-only, once, for the CKA and the store's sections
    cka_lines, cka_json = _cka_section(kv, figures)

    lines = [f"# {cfg.name}: KV distillation vs CE-only", ""]
    lines += [f"Written {time.strftime('%Y-%m-%d %H:%M')} by `kava run` from `config.yaml` (next to this file). "
              f"Every number below comes from this run's outputs. Seeds: {cfg.seeds}; baseline: `{cfg.baseline}`.",
              ""]
    lines += ["## Result", ""] + _verdicts(acc_cmp, nll_cmp, cfg) + [""]

    lines += ["## Accuracy on the eval split", "",
              f"Greedy decoding, exact match of the `#### N` answer, {data['splits']['eval']['rows']} problems. "
              "Mean ± std over seeds [bootstrap 95% CI]; Δ and its CI against the baseline; Welch t-test p "
              f"(Holm-adjusted across variants); significant at α = {ALPHA}. With few seeds the percentile bootstrap "
              "has few distinct resamples (10 for 3 seeds) and its intervals run narrow: read significance from the "
              "t-test.", "",
              "| model | seeds | accuracy % | Δ points [95% CI] | p | p (Holm) | significant |",
              "|---|---|---|---|---|---|---|"]
    for n, e in teacher_evals.items():
        lines.append(f"| teacher `{n}` | – | {100 * e['accuracy']:.1f} | – | – | – | – |")
    for c in acc_cmp:
        delta = "–" if c.variant == cfg.baseline else \
            f"{100 * c.diff:+.1f} [{100 * c.diff_ci[0]:+.1f}, {100 * c.diff_ci[1]:+.1f}]"
        lines.append(f"| `{c.variant}` | {c.n} | {format_mean_ci(c)} | {delta} | {_fmt(c.p)} | {_fmt(c.p_adjusted)} "
                     f"| {'yes' if c.significant else 'no'} |")
    lines += ["", f"![accuracy]({figs['accuracy'].relative_to(root)})", ""]

    lines += ["## Reference NLL on the eval split", "",
              "Teacher-forced negative log-likelihood of each problem's reference reasoning and answer, nats per "
              "token (lower is better). It moves with learning even where greedy accuracy sits near the floor.", "",
              "| model | seeds | NLL | Δ [95% CI] | p | p (Holm) | significant |", "|---|---|---|---|---|---|---|"]
    for n, e in teacher_evals.items():
        lines.append(f"| teacher `{n}` | – | {_fmt(e.get('nll'))} | – | – | – | – |")
    for c in nll_cmp:
        delta = "–" if c.variant == cfg.baseline else f"{c.diff:+.3f} [{c.diff_ci[0]:+.3f}, {c.diff_ci[1]:+.3f}]"
        lines.append(f"| `{c.variant}` | {c.n} | {format_mean_ci(c, percent=False, digits=3)} | {delta} | "
                     f"{_fmt(c.p)} | {_fmt(c.p_adjusted)} | {'yes' if c.significant else 'no'} |")
    lines += ["", f"![nll]({figs['nll'].relative_to(root)})", ""]

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
    summary = {"accuracy": [c.to_dict() for c in acc_cmp], "nll": [c.to_dict() for c in nll_cmp],
               "teachers": teacher_evals, "seeds": cfg.seeds, "baseline": cfg.baseline,
               "compute": {f"{v} seed {s}": {k: r.get(k) for k in ("steps", "tokens", "batch_size")}
                           for (v, s), r in students.items()},
               "checkpoints": curves, "splits": data["splits"], "cka": cka_json, "timings": timings}
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


def _verdicts(acc_cmp: list[Any], nll_cmp: list[Any], cfg: RunConfig) -> list[str]:
    base_acc = next(c for c in acc_cmp if c.variant == cfg.baseline)
    out = []
    for a, n in zip(acc_cmp, nll_cmp):
        if a.variant == cfg.baseline:
            continue
        better = "beat" if a.diff > 0 else "did not beat"
        out.append(
            f"- **`{a.variant}` {better} `{cfg.baseline}` on accuracy**: {100 * a.mean:.1f}% vs "
            f"{100 * base_acc.mean:.1f}% ({100 * a.diff:+.1f} points, 95% CI [{100 * a.diff_ci[0]:+.1f}, "
            f"{100 * a.diff_ci[1]:+.1f}], Welch p = {_fmt(a.p)}, Holm p = {_fmt(a.p_adjusted)}): "
            f"{'significant' if a.significant else 'not significant'} at α = {ALPHA} with {a.n} seeds each. "
            f"Reference NLL {n.diff:+.3f} nats/token (p = {_fmt(n.p)}, "
            f"{'significant' if n.significant else 'not significant'})."
        )
    return out


def _compute_section(cfg: RunConfig, students: dict[tuple[str, int], dict[str, Any]]) -> list[str]:
    lines = ["## Equal compute", "",
             "Every variant trains the same steps on the same batches of the same store grid (CE-only reads the grid "
             "without the K/V). Tokens are counted by the trainer.", "",
             "| variant | seed | steps | samples/step | tokens | train seconds |", "|---|---|---|---|---|---|"]
    for (v, s), r in students.items():
        lines.append(f"| `{v}` | {s} | {r.get('steps')} | {r.get('batch_size')} | {r.get('tokens')} | "
                     f"{_fmt(r.get('train_seconds'), '.1f')} |")
    by_seed: dict[int, set[tuple[Any, Any]]] = {}
    for (v, s), r in students.items():
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


def _cka_section(kv: Any, figures: Path) -> tuple[list[str], dict[str, Any]]:
    from kava.analysis.cka import store_cka
    from kava.analysis.heatmap import heatmap, layer_map_matrix, layer_map_pairs

    lines = ["## Layers: CKA and the layer map", ""]
    out: dict[str, Any] = {}
    for name, spec in kv.teachers.items():
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


def _store_section(kv: Any) -> list[str]:
    from kava.kvstore.interop import summary

    s = summary(kv)
    lines = ["## The store", "", f"`{Path(kv.where).name}`: {s['samples']} samples, {s['tokens']} student "
             f"tokens in {s['shards']} shards, {_mib(s['bytes_on_disk'])} on disk.", "",
             "| teacher | layers | KV heads × dim | dtype | codec | logical | on disk | ratio |",
             "|---|---|---|---|---|---|---|---|"]
    for name, t in s["teachers"].items():
        ratio = t["bytes_logical"] / t["bytes_on_disk"] if t.get("bytes_on_disk") else float("nan")
        lines.append(f"| `{name}` | {len(t['layers'])} of {t['num_layers']} | {t['kv_heads']} × {t['head_dim']} | "
                     f"{t['dtype']} | {t['compressor']} | {_mib(t['bytes_logical'])} | {_mib(t['bytes_on_disk'])} | "
                     f"{ratio:.2f}× |")
    return lines + [""]
