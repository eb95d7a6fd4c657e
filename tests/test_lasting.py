"""`kava run`'s tools for "does it last?": the validation split, the tuning grid, budgets and their report sections,
and the teacher's tokenizer shared with the student; each config rule with the message it gives."""

from __future__ import annotations

import json

import pytest
import yaml

from kava.core.errors import ConfigError
from kava.pipelines import splits
from kava.pipelines.config import TuneSpec, configs_dir, parse_config, tune_points
from kava.pipelines.lasting import budget_section, grad_share_section, tune_section


def _quick() -> dict:
    return yaml.safe_load((configs_dir() / "convergence-quick.yaml").read_text())


def test_tune_points_cover_the_grid_in_key_order():
    points = tune_points(TuneSpec(variant="logit", grid={"a": [1, 2], "b": ["x", "y", "z"]}))
    assert points == [{"a": 1, "b": "x"}, {"a": 1, "b": "y"}, {"a": 1, "b": "z"},
                      {"a": 2, "b": "x"}, {"a": 2, "b": "y"}, {"a": 2, "b": "z"}]


@pytest.mark.parametrize("edit, message", [
    (lambda c: c["tune"].update(variant="nope"), "tune.variant: 'nope' is not a variant"),
    (lambda c: c["tune"].update(apply_to=["kv", "zz"]), "tune.apply_to: 'zz' is not a variant"),
    (lambda c: c["tune"]["grid"].update(steps=[10]), "tune.grid: 'steps' is compute or set by the runner"),
    (lambda c: c["tune"]["grid"].update(nonsense=[1]), "tune.grid: unknown option 'nonsense'"),
    (lambda c: c["tune"]["grid"].update(logit_temperature=[]), "tune.grid.logit_temperature: expected a non-empty"),
    (lambda c: c["tune"]["grid"].update(logit_divergence=["kl"]), "--logit-divergence: expected one of"),
    (lambda c: c["tune"].update(metric="f1"), "tune.metric: expected accuracy or nll"),
    (lambda c: c["data"].update(validation_size=0), "data.validation_size: tune: needs validation rows"),
    (lambda c: c.pop("tune"), "data.validation_size: set, but there is no tune: section"),
    (lambda c: c["eval"].update(budgets=[100, 600]), r"eval.budgets: \[100\] are not checkpoint steps"),
    (lambda c: c["train"]["distill"].update(keep_checkpoints=2), "keep_checkpoints 2 drops early checkpoints"),
    (lambda c: c["student"].update(tokenizer="teacher:other"), "student.tokenizer: teacher:other names no teacher"),
])
def test_each_rule_names_the_key_and_the_fix(edit, message):
    config = _quick()
    edit(config)
    with pytest.raises(ConfigError, match=message):
        parse_config(config, source="quick")


def test_the_quick_config_parses_and_shares_the_teachers_tokenizer(tmp_path):
    config = _quick()
    config["out"] = str(tmp_path)
    cfg = parse_config(config)
    assert cfg.student.teacher_tokenizer == "teacher" and not cfg.student.trains_tokenizer
    assert cfg.student_tokenizer == str(tmp_path / "convergence-quick" / "data" / "student-tokenizer")
    assert len(tune_points(cfg.tune)) == 4


def test_validation_rows_are_carved_from_the_student_share(tmp_path):
    config = _quick()
    config["data"].update(pool_size=200, teacher_fraction=0.5, validation_size=20, eval_size=30)
    record = splits.make_splits(parse_config(config).data, tmp_path)["splits"]
    assert {r: record[r]["rows"] for r in record} == {"teacher-train": 100, "student-train": 80, "validation": 20,
                                                     "eval": 30}
    questions = {role: {r.question for r in splits.load_split(tmp_path, role)} for role in record}
    for a in questions:
        for b in questions:
            assert a == b or not questions[a] & questions[b], (a, b)
    config["data"].update(validation_size=0)
    config.pop("tune")
    again = splits.make_splits(parse_config(config).data, tmp_path)["splits"]
    assert "validation" not in again and not splits.split_path(tmp_path, "validation").exists()
    assert again["student-train"]["rows"] == 100


def _cfg(budgets=(10, 20)):
    config = _quick()
    config["seeds"] = [1, 2, 3]
    config["train"].update(steps=20)
    config["train"]["distill"].update(checkpoint_every=10, keep_checkpoints=2)
    config["eval"].update(budgets=list(budgets), checkpoint_rows=30)
    return parse_config(config)


def test_budget_section_pairs_by_seed_and_reads_the_compute_ratio(tmp_path):
    cfg = _cfg()
    accuracy = {"ce": [0.1, 0.3], "logit": [0.1, 0.3], "kv": [0.35, 0.4], "logit+kv": [0.2, 0.35],
                "logit+kv-balanced": [0.2, 0.3]}
    curves = {v: {s: [{"step": b, "accuracy": a + 0.01 * s, "nll": 1 - a} for b, a in zip((10, 20), acc)]
                  for s in cfg.seeds} for v, acc in accuracy.items()}
    lines, out = budget_section(cfg, curves, tmp_path, tmp_path)
    text = "\n".join(lines)
    assert "| 10 | 12.0 ± 1.0 |" in text  # ce at 10 steps: 11, 12, 13 %
    kv10 = out["budgets"]["10"]["kv"]
    assert kv10["diff"] == pytest.approx(0.25) and kv10["n"] == 3
    ratio = next(r for r in out["compute_ratio"] if r["variant"] == "kv" and r["against"] == "ce")
    assert ratio["level"] == pytest.approx(32.0) and ratio["baseline_steps"] == 20 and ratio["variant_steps"] == 10
    assert ratio["ratio"] == 2.0
    assert "| `kv` | `ce` | 32.0 (20) | 10 | 2.00× |" in text
    assert (tmp_path / "budget-accuracy.png").stat().st_size > 5000
    assert budget_section(_cfg(budgets=()), curves, tmp_path, tmp_path) == ([], {})


def test_tune_and_grad_share_sections(tmp_path):
    assert tune_section(tmp_path) == ([], None)
    trials = [{"point": {"logit_weight": w}, "accuracy": a, "nll": 1.0, "nll_per_char": n, "n": 100}
              for w, a, n in ((0.3, 0.2, 0.5), (1.0, 0.2, 0.4))]
    (tmp_path / "tune.json").write_text(json.dumps({
        "variant": "logit", "apply_to": ["logit", "logit+kv"], "metric": "accuracy", "seed": 42, "steps": 300,
        "validation_rows": 100, "chosen": {"logit_weight": 1.0}, "trials": trials}))
    lines, tune = tune_section(tmp_path)
    text = "\n".join(lines)
    assert "**logit_weight = 1.0**" in text and "| 1.0 | 20.0 **(chosen)** | 0.4000 |" in text
    # A tie by accuracy (broken by NLL) is a choice by noise, and the report says so.
    assert "**The choice is within sampling noise:** the chosen point got 20 of 100 validation rows right, the " \
           "next best 20" in text
    # 3 of 100 against 1 is still noise (2 standard errors: 4.0 points); 30 against 10 is not.
    for low, high, noisy in ((0.01, 0.03, True), (0.10, 0.30, False)):
        trials[0]["accuracy"], trials[1]["accuracy"] = low, high
        (tmp_path / "tune.json").write_text(json.dumps({
            "variant": "logit", "apply_to": ["logit"], "metric": "accuracy", "seed": 42, "steps": 300,
            "validation_rows": 100, "chosen": {"logit_weight": 1.0}, "trials": trials}))
        assert ("within sampling noise" in "\n".join(tune_section(tmp_path)[0])) == noisy
    runs = {"ce": [[{"step": 1, "grad_share/ce": 1.0}]],
            "kv": [[{"step": 25, "grad_share/ce": 0.2, "grad_share/kv": 0.8}],
                   [{"step": 25, "grad_share/ce": 0.4, "grad_share/kv": 0.6}, {"step": 26}]]}
    lines, shares = grad_share_section(runs)
    assert shares == {"kv": {"ce": pytest.approx(0.3), "kv": pytest.approx(0.7)}}
    assert "| `kv` | 30% | 70% |" in "\n".join(lines)
    assert grad_share_section({"ce": [[{"step": 1}]]}) == ([], {})
