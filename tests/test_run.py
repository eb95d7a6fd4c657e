"""`kava run`: a whole experiment through the real CLI on a tiny config, then reruns, forced stages, split checks
and config validation. Everything is real: a teacher trained here, a store on disk, students, eval and the report.
"""

from __future__ import annotations

import copy
import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from helpers import ENV, KAVA, sigkill_when

from kava.core.errors import ConfigError, DatasetError
from kava.kvstore import KVStore
from kava.pipelines import splits
from kava.pipelines.config import distill_configs, load_config, parse_config, shipped_configs
from kava.pipelines.runner import Runner

ONE_TORCH_THREAD = True  # see conftest.one_torch_thread

TINY: dict[str, Any] = {
    "name": "tiny",
    "seeds": [1, 2],
    "baseline": "ce",
    "data": {"dataset": "synthetic", "pool_size": 48, "teacher_fraction": 0.5, "eval_size": 6},
    "teachers": [{"name": "t", "train": {"preset": "tiny-llama", "vocab_size": 300, "steps": 4, "batch_size": 4},
                  "extract": {"with_q": True, "calibration_samples": 0, "shard_tokens": 2048}}],
    "student": {"model": "tiny-qwen2", "layers": 2, "vocab_size": 280},
    "train": {"steps": 3, "batch_size": 4, "max_length": 256, "distill": {"checkpoint_every": 2}},
    "variants": [{"name": "ce"}, {"name": "kv", "teachers": ["t"], "distill": {"loss": "mercator"}}],
    "contrasts": ["kv vs ce"],
    "eval": {"batch_size": 6, "max_new_tokens": 12, "checkpoint_rows": 4},
    "threads": 1,
}


def tiny(out: Path, **changes: Any) -> dict[str, Any]:
    cfg = copy.deepcopy(TINY)
    cfg["out"] = str(out)
    cfg.update(changes)
    return cfg


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> tuple[Path, Any]:
    """The tiny experiment, run once through `kava run CONFIG --json` in a subprocess."""
    base = tmp_path_factory.mktemp("run")
    config = base / "tiny.yaml"
    config.write_text(yaml.safe_dump(tiny(base / "runs")))
    proc = subprocess.run([*KAVA, "run", str(config), "--json"], capture_output=True, text=True, env=ENV,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return base / "runs" / "tiny", json.loads(proc.stdout)


def records(root: Path, stage: str) -> dict[str, dict[str, Any]]:
    out = {}
    for path in root.rglob("stage.json"):
        r = json.loads(path.read_text())
        if r["stage"] == stage:
            out[r["unit"]] = r
    return out


# ---------------------------------------------------------------------------------------------------------------------
# One run, end to end


@pytest.mark.integration
def test_run_writes_every_artifact_and_the_report_numbers_come_from_the_run(run):
    root, summary = run
    assert Path(summary["report"]) == root / "report.md"
    assert {"data", "teacher t", "extract t", "distill ce seed 1", "distill kv seed 2", "eval teacher t",
            "eval kv seed 1"} <= set(summary["ran"])
    assert yaml.safe_load((root / "config.yaml").read_text()) == parse_config(tiny(root.parent)).to_dict()

    evals = records(root, "eval")
    report = json.loads((root / "report.json").read_text())
    acc = {row["variant"]: row for row in report["accuracy"]}
    for variant in ("ce", "kv"):
        seeds = [evals[f"eval {variant} seed {s}"]["accuracy"] for s in (1, 2)]
        assert acc[variant]["mean"] == pytest.approx(np.mean(seeds))
        assert acc[variant]["n"] == 2 and acc[variant]["seeds"] == [1, 2]
    # The teacher (its own BPE) and the students (theirs) tokenize differently: NLL is compared per character.
    assert evals["eval teacher t"]["nll_tokenizer"] != evals["eval kv seed 1"]["nll_tokenizer"]
    assert report["nll_unit"] == "char"
    nll = {row["variant"]: row for row in report["nll"]}
    assert nll["kv"]["mean"] == pytest.approx(np.mean([evals[f"eval kv seed {s}"]["nll_per_char"] for s in (1, 2)]))
    assert acc["kv"]["p"] is None or 0 <= acc["kv"]["p"] <= 1

    # The primary test is paired by seed, from the eval records; with one variant Holm changes nothing.
    from scipy import stats as sps

    from kava.analysis.stats import welch_t

    for table, key in ((acc, "accuracy"), (nll, "nll_per_char")):
        a, b = ([evals[f"eval {v} seed {s}"][key] for s in (1, 2)] for v in ("kv", "ce"))
        assert table["kv"]["diff"] == pytest.approx(np.mean(a) - np.mean(b), abs=1e-12)
        if np.ptp(np.subtract(a, b)) > 0:  # else the zero-variance convention, tested in test_stats
            assert table["kv"]["p"] == pytest.approx(sps.ttest_rel(a, b).pvalue, rel=1e-9)
            assert table["kv"]["p_holm"] == table["kv"]["p"]
        if np.ptp(a) > 0 or np.ptp(b) > 0:
            assert table["kv"]["welch_p"] == pytest.approx(welch_t(a, b)[1], rel=1e-9)

    # McNemar and the item bootstrap read the items each eval wrote.
    items = {(v, s): {i["sample_id"]: i for i in map(json.loads, (root / "eval" / f"{v}-seed-{s}" / "items.jsonl")
                                                     .read_text().splitlines())} for v in ("ce", "kv") for s in (1, 2)}
    pooled = [0, 0]
    for s in (1, 2):
        kv, ce = items["kv", s], items["ce", s]
        only_kv = sum(kv[k]["correct"] and not ce[k]["correct"] for k in kv)
        only_ce = sum(ce[k]["correct"] and not kv[k]["correct"] for k in kv)
        assert (acc["kv"]["mcnemar"]["per_seed"][str(s)]["only_a"], acc["kv"]["mcnemar"]["per_seed"][str(s)]
                ["only_b"]) == (only_kv, only_ce)
        pooled = [pooled[0] + only_kv, pooled[1] + only_ce]
        for v in ("kv", "ce"):  # the per-character NLL of a seed is its items' nats over their characters
            its = items[v, s].values()
            assert evals[f"eval {v} seed {s}"]["nll_per_char"] == \
                pytest.approx(sum(i["nll_nats"] for i in its) / sum(i["nll_chars"] for i in its), rel=1e-12)
    assert [acc["kv"]["mcnemar"]["pooled"][k] for k in ("only_a", "only_b")] == pooled
    assert nll["kv"]["item_bootstrap"]["diff"] == pytest.approx(nll["kv"]["diff"], rel=1e-9)
    assert nll["kv"]["item_bootstrap"]["items"] == 6
    # A contrast of the same two variants is the same paired test, read from the same records.
    (contrast,) = report["contrasts"]
    assert contrast["contrast"] == "kv vs ce" and contrast["accuracy"]["diff"] == pytest.approx(acc["kv"]["diff"])
    assert contrast["nll"]["diff"] == pytest.approx(nll["kv"]["diff"])
    assert [contrast["mcnemar_pooled"][k] for k in ("only_a", "only_b")] == pooled

    text = (root / "report.md").read_text()
    teacher_acc = evals["eval teacher t"]["accuracy"]
    assert f"| teacher `t` | – | {100 * teacher_acc:.1f} |" in text
    assert f"- **Teacher `t`: {100 * teacher_acc:.1f}% on the eval split**" in text
    assert teacher_acc < 0.3  # four steps teach it nothing: the verdict must say so
    # Twelve new tokens cut most of its generations short; the report says so, with the option to raise.
    teacher_items = [json.loads(line) for line in
                     (root / "eval" / "teacher-t" / "items.jsonl").read_text().splitlines()]
    cut = sum(i["stop"] == "budget" for i in teacher_items)
    assert evals["eval teacher t"]["budget_stops"] == cut
    assert (f"- **Cut short: teacher `t`.** {cut} of 6 generations" in text) == (cut > 0.05 * 6)
    assert cut == 0 or "Raise `eval.max_new_tokens` and run again" in text
    verdict = next(line for line in text.splitlines() if line.startswith("- **`kv`"))
    assert "paired t-test over 2 seeds" in verdict and "this comparison cannot show a transfer" in verdict
    assert "NLL (nats/char)" in text and "McNemar per seed" in text
    assert "Steps and tokens are **equal across variants for every seed**." in text
    # Task accuracy at the kept checkpoint (step 2) and at the end, on the first 4 eval rows.
    curve = evals["eval kv seed 1"]["curve"]
    assert [p["step"] for p in curve] == [2, 3]
    items = [json.loads(line) for line in (root / "eval" / "kv-seed-1" / "items.jsonl").read_text().splitlines()]
    assert curve[-1]["accuracy"] == sum(i["correct"] for i in items[:4]) / 4
    assert report["checkpoints"]["kv"][0]["step"] == 2
    for png in ("accuracy", "nll", "learning-curves", "layer-cosine", "cka-t-k", "layer-map-t", "checkpoint-accuracy",
                "checkpoint-nll"):
        assert f"figures/{png}.png" in text
        assert (root / "figures" / f"{png}.png").stat().st_size > 10_000


@pytest.mark.integration
def test_variants_train_at_equal_compute_on_the_recorded_student_split(run):
    root, _ = run
    compute = json.loads((root / "report.json").read_text())["compute"]
    for seed in (1, 2):
        assert compute[f"ce seed {seed}"] == compute[f"kv seed {seed}"]
        assert compute[f"ce seed {seed}"]["steps"] == 3
    store = KVStore.open(root / "kv.zarr")
    recorded = splits.recorded(root)["splits"]
    assert store.manifest.dataset.sample_ids_hash == recorded["student-train"]["sample_ids_hash"]
    assert store.manifest.num_samples == recorded["student-train"]["rows"] == 24


@pytest.mark.integration
def test_splits_are_disjoint_and_hashed(run):
    root, _ = run
    recorded = splits.recorded(root)["splits"]
    # The default tunes nothing, so no validation split is carved or recorded.
    assert list(recorded) == ["teacher-train", "student-train", "eval"]
    assert not splits.split_path(root, "validation").exists()
    questions = {role: {json.loads(line)["question"] for line in splits.split_path(root, role).read_text().splitlines()}
                 for role in recorded}
    assert [len(q) for q in questions.values()] == [24, 24, 6]
    assert not questions["teacher-train"] & questions["student-train"]
    assert not (questions["teacher-train"] | questions["student-train"]) & questions["eval"]
    for role, s in splits.recorded(root)["splits"].items():
        assert splits.describe(splits.load_split(root, role))["sample_ids_hash"] == s["sample_ids_hash"]


@pytest.mark.integration
def test_a_stage_fed_another_split_refuses(run, tmp_path):
    root, _ = run
    student_hash = splits.recorded(root)["splits"]["student-train"]["sample_ids_hash"]
    with pytest.raises(DatasetError, match="expected data from the eval split .* Got student-train"):
        splits.check_split(root, "eval", stage="eval", sample_ids_hash=student_hash)

    copy_root = tmp_path / "copy"
    (copy_root / "data").mkdir(parents=True)
    for f in (root / "data").glob("*.json*"):
        (copy_root / "data" / f.name).write_bytes(f.read_bytes())
    edited = splits.split_path(copy_root, "student-train")
    edited.write_text("".join(edited.read_text().splitlines(keepends=True)[:-1]))  # one row dropped
    with pytest.raises(DatasetError, match="distill: .*student-train.jsonl is not the recorded student-train split"):
        splits.check_split(copy_root, "student-train", stage="distill")


def test_the_verdict_says_what_the_teacher_allows(tmp_path):
    from kava.pipelines.report import nll_unit, teacher_clause, teacher_lines

    cfg = parse_config(tiny(tmp_path))
    data = {"splits": {"eval": {"rows": 300}}}
    good, bad = {"accuracy": 0.783, "correct": 235, "n": 300}, {"accuracy": 0.033, "correct": 10, "n": 300}
    assert teacher_clause("kv", cfg, {"t": good}) == ""
    assert teacher_lines(cfg, {"t": good}, data) == \
        ["- **Teacher `t`: 78.3% on the eval split** (235 of 300 problems; floor 30%)."]
    assert "this comparison cannot show a transfer**" in teacher_clause("kv", cfg, {"t": bad})
    assert "cannot show a transfer** from `t`" in teacher_lines(cfg, {"t": bad}, data)[0]
    assert teacher_clause("ce", cfg, {"t": bad}) == ""  # CE-only learns from no teacher
    assert "`t` was not measured" in teacher_clause("kv", cfg, {})
    assert "eval.teachers: false" in teacher_lines(cfg, {}, data)[0]
    assert nll_unit([{"nll_tokenizer": "a"}, {"nll_tokenizer": "a"}]) == "token"
    assert nll_unit([{"nll_tokenizer": "a"}, {"nll_tokenizer": "b"}]) == "char"
    assert nll_unit([{"nll_tokenizer": "a"}, {}]) == "char"  # unknown: characters are always comparable


# ---------------------------------------------------------------------------------------------------------------------
# Reruns


@pytest.mark.integration
def test_rerun_skips_what_is_done_and_redoes_what_is_missing_or_forced(run, tmp_path):
    root, _ = run
    cfg = parse_config(tiny(root.parent))
    assert Runner(cfg, log=lambda _: None).run().ran == []

    # A student and a store made outside the runner (by the rendered sbatch scripts) are checked and adopted.
    (root / "students" / "ce" / "seed-2" / "stage.json").unlink()
    lines: list[str] = []
    assert Runner(cfg, log=lines.append).run().ran == ["eval ce seed 2"]
    assert any(line.startswith("[distill] distill ce seed 2: made elsewhere, checked and adopted") for line in lines)
    (root / "stages" / "extract" / "t" / "stage.json").unlink()
    lines.clear()
    ran = Runner(cfg, log=lines.append).run().ran
    assert any(line.startswith("[extract] extract t: made elsewhere") for line in lines) and "teacher t" not in ran

    # Outputs are checked, not assumed: a student without its weights is trained (and evaluated) again.
    (root / "students" / "kv" / "seed-1" / "kava.json").unlink()
    assert Runner(cfg, log=lambda _: None).run().ran == ["distill kv seed 1", "eval kv seed 1"]

    # --force eval redoes every evaluation and nothing upstream.
    ran = Runner(cfg, force=("eval",), log=lambda _: None).run().ran
    assert sorted(ran) == sorted(["eval teacher t"] + [f"eval {v} seed {s}" for v in ("ce", "kv") for s in (1, 2)])

    with pytest.raises(ConfigError, match="--force: expected stages from data, teachers, .* Got distil instead"):
        Runner(cfg, force=("distil",))


def _bug(*args: Any, **kwargs: Any) -> None:
    raise TypeError("a bug, not a missing output")


def test_a_kava_error_checking_a_stage_redoes_it_and_a_bug_propagates(tmp_path, monkeypatch):
    cfg = parse_config(tiny(tmp_path))
    Runner(cfg, log=lambda _: None).data()
    runner = Runner(cfg, log=lambda _: None)
    runner.data()
    assert runner.result.ran == []  # made and checked: reused

    # The project's own error while checking the outputs (here: a split that changed) means "make them again".
    def changed(root: Path, role: str, **kwargs: Any) -> None:
        raise DatasetError(f"{role}: not the recorded split")

    monkeypatch.setattr(splits, "check_split", changed)
    runner = Runner(cfg, log=lambda _: None)
    runner.data()
    assert runner.result.ran == ["data"]

    # Anything else is a bug: it propagates instead of turning into a silent redo of the stage.
    monkeypatch.setattr(splits, "check_split", _bug)
    runner = Runner(cfg, log=lambda _: None)
    with pytest.raises(TypeError, match="a bug, not a missing output"):
        runner.data()
    assert runner.result.ran == []


def test_a_bug_checking_a_store_propagates_instead_of_extracting_again(tmp_path, monkeypatch):
    monkeypatch.setattr(KVStore, "open", _bug)  # what the extract stage checks a store (made here or not) with
    runner = Runner(parse_config(tiny(tmp_path)), log=lambda _: None)
    with pytest.raises(TypeError, match="a bug, not a missing output"):
        runner.extract({"t": {"digest": "d", "model": "m"}}, {"splits": {"student-train": {"sample_ids_hash": "h"}}})
    assert runner.result.ran == []


@pytest.mark.integration
def test_killed_run_resumes_the_interrupted_student_exactly(tmp_path):
    out = tmp_path / "runs"
    config = tmp_path / "tiny.yaml"
    cfg = tiny(out, seeds=[1], variants=[{"name": "ce"}], contrasts=[],
               train={"steps": 8, "batch_size": 4, "max_length": 256, "distill": {"checkpoint_every": 1}})
    cfg["eval"]["teachers"] = False
    config.write_text(yaml.safe_dump(cfg))
    student = out / "tiny" / "students" / "ce" / "seed-1"

    def checkpointed() -> bool:
        metrics = student / "metrics.jsonl"
        return metrics.is_file() and len(metrics.read_text().splitlines()) >= 3

    proc = subprocess.Popen([*KAVA, "run", str(config)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=ENV)
    sigkill_when(proc, checkpointed)
    assert not (student / "stage.json").exists()

    done = subprocess.run([*KAVA, "run", str(config)], capture_output=True, text=True, env=ENV, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "resuming its last checkpoint" in done.stderr
    assert "teacher t: done already" in done.stderr
    steps = [json.loads(line)["step"] for line in (student / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 9))


# ---------------------------------------------------------------------------------------------------------------------
# Configs


@pytest.mark.parametrize("name", distill_configs())
def test_every_shipped_config_validates(name):
    from kava.pipelines.config import configs_dir

    cfg = load_config(configs_dir() / f"{name}.yaml")
    assert cfg.baseline in [v.name for v in cfg.variants]
    assert set(shipped_configs()) >= {"default", "gsm8k-qwen7b4bit-to-qwen0.5b", "multi-teacher", "ablation"}


def test_the_ablation_config_covers_the_design_matrix():
    from kava.pipelines.config import configs_dir

    cfg = load_config(configs_dir() / "ablation.yaml")
    options = [{**v.distill, "teachers": tuple(v.teachers)} for v in cfg.variants]
    assert {o.get("projector", "structured") for o in options if o["teachers"]} >= {"flat", "structured"}
    assert any(o.get("share_dim_proj") for o in options) and any(o.get("init_uniform") is False for o in options)
    assert any(o.get("alpha_v") == 0 for o in options) and any(o.get("alpha_k") == 0 for o in options)
    assert {o.get("loss") for o in options if o["teachers"]} >= {"structural", "mercator"}
    assert any(o.get("logit_weight") and not o.get("kv_weight", 1) for o in options)  # the logit baseline
    assert {cfg.teacher(t).extract.get("alignment") for o in options for t in o["teachers"]} >= {"hard", "soft"}
    # Fusion of two teachers is the multi-teacher experiment's, beside each teacher alone.
    multi = load_config(configs_dir() / "multi-teacher.yaml")
    two = [v for v in multi.variants if len(v.teachers) == 2]
    assert {v.distill.get("fusion") for v in two} == {"fixed", "similarity", "learnable"}
    assert {tuple(v.teachers) for v in multi.variants if len(v.teachers) == 1} == {("llama",), ("qwen",)}
    for c in (cfg, multi):  # every contrast names two variants of its experiment (parse_config checks it too)
        assert c.contrasts and all(a in {v.name for v in c.variants} for x in c.contrasts for a in x.split(" vs "))


@pytest.mark.integration
def test_every_problem_is_reported_at_once(tmp_path):
    bad = tiny(tmp_path, seeds=[], stpes=3)
    bad["teachers"][0]["extract"]["with_q"] = "maybe"
    bad["teachers"][0]["extract"]["bogus"] = 1
    bad["variants"] = [{"name": "ce", "distill": {"steps": 10}}, {"name": "kv", "teachers": ["nope"],
                                                                   "distill": {"loss": "cosine"}}]
    bad["baseline"] = "base"
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(bad))
    proc = subprocess.run([*KAVA, "run", str(path), "--check"], capture_output=True, text=True, env=ENV, timeout=60)
    assert proc.returncode == 1
    for expected in ("Found 8 problems", "unknown key 'stpes'", "seeds: expected distinct integers",
                     "extract.with_q: expected bool. Got 'maybe'", "unknown option 'bogus'",
                     "variants[ce].distill: 'steps' sets compute", "no teacher ['nope']",
                     "--loss: expected one of mse, mercator, structural. Got 'cosine'", "'base' is not a variant"):
        assert expected in proc.stderr
    assert not (tmp_path / "tiny").exists()  # nothing ran


@pytest.mark.integration
def test_check_accepts_the_embedded_default_and_names_a_missing_file(tmp_path):
    ok = subprocess.run([*KAVA, "run", "--check"], capture_output=True, text=True, env=ENV, timeout=60)
    assert ok.returncode == 0 and "embedded default: ok (1 teachers, 2 variants x 5 seeds)" in ok.stderr
    assert load_config("ablation") == load_config(Path(__file__).parents[1] / "pipelines" / "configs" / "ablation.yaml")
    shipped = sorted(f.stem for f in (Path(__file__).parents[1] / "pipelines" / "configs").glob("*.yaml"))
    assert {"ablation", "default", "convergence-quick"} <= set(shipped)
    with pytest.raises(ConfigError, match=re.escape(f"does not exist. Pass a YAML file, or none for the embedded "
                                                    f"default (shipped configs: {', '.join(shipped)})")):
        load_config(tmp_path / "nope.yaml")


@pytest.mark.integration
def test_a_checkpoint_loads_as_the_student_it_was(run):
    """The last checkpoint (written at the final step) loads into exactly the saved student; an earlier one differs."""
    import torch
    from transformers import AutoModelForCausalLM

    from kava.distill.checkpoint import step_checkpoints, student_at

    root, _ = run
    out = root / "students" / "kv" / "seed-1"
    (early, first), (last, final) = step_checkpoints(out)
    assert (early, last) == (2, 3)
    ids = torch.tensor([[1, 5, 9, 30, 7, 2]])
    saved = AutoModelForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        want = saved(ids).logits
        assert torch.equal(student_at(out, final)(ids).logits, want)
        assert not torch.allclose(student_at(out, first)(ids).logits, want)


@pytest.mark.integration
def test_an_experiment_whose_teachers_are_all_pretrained_runs(tmp_path, assets):
    """teacher_fraction 0 with a pretrained teacher (the real stories260K): the whole pool trains students, there is
    no teacher split, and the run goes through to its report."""
    teacher = str(assets("models/stories260K_hf_derived"))
    cfg = tiny(tmp_path / "runs", name="pretrained", seeds=[1],
               data={"dataset": "synthetic", "pool_size": 24, "teacher_fraction": 0.0, "eval_size": 4},
               teachers=[{"name": "stories", "model": teacher,
                          "extract": {"with_q": True, "calibration_samples": 0, "shard_tokens": 2048}}],
               train={"steps": 2, "batch_size": 4, "max_length": 256, "distill": {"checkpoint_every": 0}},
               variants=[{"name": "ce"}, {"name": "kv", "teachers": ["stories"], "distill": {"loss": "mercator"}}],
               eval={"batch_size": 4, "max_new_tokens": 8, "checkpoint_rows": 0})
    config = tmp_path / "pretrained.yaml"
    config.write_text(yaml.safe_dump(cfg))
    proc = subprocess.run([*KAVA, "run", str(config), "--json"], capture_output=True, text=True, env=ENV,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    root = tmp_path / "runs" / "pretrained"
    recorded = splits.recorded(root)["splits"]
    assert set(recorded) == {"student-train", "eval"} and recorded["student-train"]["rows"] == 24
    assert not splits.split_path(root, "teacher-train").exists()
    assert list(KVStore.open(root / "kv.zarr").teachers) == ["stories"]
    assert (root / "report.md").is_file() and "stories" in (root / "report.md").read_text()


@pytest.mark.integration
def test_compare_puts_runs_side_by_side_by_data_size_with_their_own_numbers(run, tmp_path):
    root, _ = run
    report = json.loads((root / "report.json").read_text())
    # A second "data size": the same run copied, its student split recorded as 4x larger and one student's
    # accuracy changed, so the row order and the figure's points come from the files, not from the run order.
    bigger = tmp_path / "tiny-x4"
    shutil.copytree(root, bigger, ignore=shutil.ignore_patterns("*.safetensors", "kv.zarr", "checkpoints"))
    big = json.loads((bigger / "report.json").read_text())
    big["splits"]["student-train"]["rows"] *= 4
    (bigger / "report.json").write_text(json.dumps(big))
    stage = bigger / "eval" / "kv-seed-1" / "stage.json"
    stage.write_text(json.dumps({**json.loads(stage.read_text()), "accuracy": 0.5}))

    proc = subprocess.run([*KAVA, "compare", str(bigger), str(root), "--out", str(tmp_path / "cmp")],
                          capture_output=True, text=True, env=ENV, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    table = [line for line in (tmp_path / "cmp" / "compare.md").read_text().splitlines() if line.startswith("| `")]
    rows = report["splits"]["student-train"]["rows"]
    assert [line.split(" | ")[:2] for line in table] == [["| `tiny`", str(rows)], ["| `tiny-x4`", str(4 * rows)]]
    kv = next(e for e in report["accuracy"] if e["variant"] == "kv")
    assert f"{100 * kv['mean']:.1f} ± {100 * kv['std']:.1f}" in table[0]
    assert f"{100 * kv['diff']:+.1f} [{100 * kv['diff_ci'][0]:+.1f}, {100 * kv['diff_ci'][1]:+.1f}]" in table[0]
    assert (tmp_path / "cmp" / "figures" / "accuracy-by-data.png").read_bytes()[:4] == b"\x89PNG"

    missing = subprocess.run([*KAVA, "compare", str(tmp_path / "nope"), "--out", str(tmp_path / "cmp2")],
                             capture_output=True, text=True, env=ENV, timeout=60)
    assert missing.returncode == 1 and "Traceback" not in missing.stderr
    assert "nope: no report.json. Pass the folder of a finished `kava run`" in missing.stderr
