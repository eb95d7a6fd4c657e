"""`kava run`: one experiment from its config, stage by stage, skipping what is already done.

Stages, in order (``--force NAME`` redoes one; what depends on its outputs is redone because their hashes change):

- ``data``      the three disjoint splits (``splits.py``) and the student's tokenizer when it is trained here
- ``teachers``  teachers trained here, CE only, on the teacher split; cached under ``<out>/.cache/teachers/``
- ``extract``   every teacher into one store over the student split
- ``tune``      with ``tune:``, one student per grid point, scored on the validation split; the best point's
                options go to ``tune.apply_to``'s variants (``tune.json``)
- ``distill``   every variant × seed, at the same steps, batch and length
- ``eval``      the teachers and every student on the eval split
- ``report``    ``report.md``, its PNGs and ``report.json``

Each unit of work writes ``stage.json`` next to its outputs: a digest of everything it was made from, its seconds,
and the resolved settings of the stage it ran (``settings``: the ExtractConfig, DistillConfig or EvalConfig). A unit
is skipped only when that digest matches *and* its outputs check out (a store that verifies its shards, a student
whose ``kava.json`` says it finished). The run's resolved config is written to ``<out>/<name>/config.yaml``.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.utils import logging as hf_logging

from kava.core.errors import KavaError
from kava.core.log import log_stderr
from kava.core.models import load_fast_tokenizer
from kava.core.rows import ReasoningRow
from kava.distill.checkpoint import step_checkpoints, student_at
from kava.distill.config import DistillConfig
from kava.distill.evaluate import EvalConfig, EvalResult, evaluate, reference_nll, run_eval
from kava.distill.routing import write_sample_families
from kava.distill.trackers import check_trackers, log_summary
from kava.distill.trainer import run_distill
from kava.extract.recipe import run_extract
from kava.extract.templates import template_from_record
from kava.extract.vocab import train_bpe_tokenizer
from kava.kvstore import KVStore

from . import splits
from .config import (
    FAMILIES_FILE,
    RunConfig,
    TeacherSpec,
    VariantSpec,
    check_force,
    digest,
    stage_distill_config,
    stage_extract_config,
    tune_points,
)
from .report import write_report

Log = Callable[[str], None]


@dataclass
class RunResult:
    root: Path
    report: Path
    ran: list[str] = field(default_factory=list)
    """Units of work that ran (the others were reused, or adopted from runs made elsewhere)."""
    timings: dict[str, float] = field(default_factory=dict)



class Runner:
    def __init__(self, cfg: RunConfig, *, force: tuple[str, ...] = (), log: Log | None = None) -> None:
        check_force(force)
        self.cfg, self.force, self.log = cfg, set(force), log or log_stderr
        self.root = cfg.root
        self.resumable = False
        self.result = RunResult(self.root, self.root / "report.md")

    # -- bookkeeping --------------------------------------------------------------------------------------------------

    def _done(self, where: Path, stage: str, key: str, check: Callable[[], bool]) -> dict[str, Any] | None:
        """The unit's stage.json record when it holds outputs for ``key`` that check out, else None."""
        path = where / "stage.json"
        if stage in self.force or not path.is_file():
            return None
        try:
            record = json.loads(path.read_text())
        except json.JSONDecodeError:
            return None
        return record if record.get("digest") == key and check() else None

    def _unit(self, where: Path, stage: str, label: str, key: str, work: Callable[[], dict[str, Any]],
              check: Callable[[], bool] = lambda: True,
              adopt: Callable[[], dict[str, Any] | None] | None = None) -> dict[str, Any]:
        """Run ``work`` unless ``where`` already holds its outputs for ``key``; return its stage.json record.

        ``adopt`` recognises outputs made outside the runner (by the rendered sbatch scripts) when there is no
        stage.json: it returns their record, or None to run ``work``."""
        record = self._done(where, stage, key, check)
        if record is not None:
            self.log(f"[{stage}] {label}: done already ({where})")
            self.result.timings[label] = record.get("seconds", 0.0)
            return record
        adopted = None
        if adopt is not None and stage not in self.force and not (where / "stage.json").is_file():
            adopted = adopt()
        t0 = time.perf_counter()
        if adopted is not None:
            self.log(f"[{stage}] {label}: made elsewhere, checked and adopted ({where})")
            info = {**adopted, "adopted": True}
        else:
            self.log(f"[{stage}] {label}: running")
            where.mkdir(parents=True, exist_ok=True)
            pending = where / "stage.pending"  # a unit killed with this same key may resume its checkpoints
            self.resumable = pending.is_file() and pending.read_text() == key
            pending.write_text(key)
            info = work()
        seconds = time.perf_counter() - t0
        record = {"stage": stage, "unit": label, "digest": key, "seconds": round(seconds, 2),
                  "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "made": time.time_ns(), **info}
        where.mkdir(parents=True, exist_ok=True)
        tmp = where / "stage.json.tmp"
        tmp.write_text(json.dumps(record, indent=2, default=str))
        tmp.replace(where / "stage.json")
        (where / "stage.pending").unlink(missing_ok=True)
        if adopted is None:
            self.result.ran.append(label)
        self.result.timings[label] = record["seconds"]
        self.log(f"[{stage}] {label}: {seconds:.1f} s")
        return record

    # -- the stages ---------------------------------------------------------------------------------------------------

    def run(self) -> RunResult:
        hf_logging.disable_progress_bar()
        self.root.mkdir(parents=True, exist_ok=True)
        (self.root / "config.yaml").write_text(yaml.safe_dump(self.cfg.to_dict(), sort_keys=False))
        check_trackers(self.cfg.trackers)  # before the first stage, as `kava distill --tracker` does
        data = self.data()
        teachers = {t.name: self.teacher(t, data) for t in self.cfg.teachers}
        self._share_teacher_tokenizer(teachers)
        store = self.extract(teachers, data)
        tuned = self.tune(store, data) if self.cfg.tune is not None else None
        students = {(v.name, s): self.distill(self._tuned(v, tuned), s, store)
                    for v in self.cfg.variants for s in self.cfg.seeds}
        evals = self.evaluate(teachers, students, data)
        self.report(data, teachers, store, students, evals)
        track_report(self.cfg, self.root, log=self.log)
        (self.root / "timings.json").write_text(json.dumps(self.result.timings, indent=2))
        return self.result

    def data(self) -> dict[str, Any]:
        where = self.root / "data"
        d = self.cfg.data
        spec = {k: v for k, v in d.__dict__.items() if k != "families" or v}  # no families: the key it always had
        key = digest({"data": spec, "student_tokenizer": self._student_tokenizer_settings()})
        trains_tokenizer = self.cfg.student.trains_tokenizer

        def work() -> dict[str, Any]:
            record = splits.make_splits(d, self.root)
            if d.families:  # the student split's families by sample id, for `kava distill --sample-families`
                write_sample_families(where / FAMILIES_FILE, list(d.families),
                                      splits.families_of(self.root, "student-train"))
            if trains_tokenizer:
                rows = splits.load_split(self.root, "student-train")
                train_bpe_tokenizer(_texts(rows), where / "student-tokenizer", vocab_size=self.cfg.student.vocab_size)
            return {"splits": record["splits"]}

        def check() -> bool:
            try:
                for role in {"student-train", "eval", *splits.recorded(self.root)["splits"]}:
                    splits.check_split(self.root, role, stage="data")
            except (KavaError, json.JSONDecodeError):  # missing, changed or torn: make them again
                return False  # (any other exception is a bug, and propagates rather than redoing the stage)
            if d.families and not (where / FAMILIES_FILE).is_file():
                return False
            return not trains_tokenizer or (where / "student-tokenizer" / "tokenizer.json").is_file()

        return self._unit(where, "data", "data", key, work, check)

    def _share_teacher_tokenizer(self, teachers: dict[str, dict[str, Any]]) -> None:
        """``student.tokenizer: teacher:NAME``: the student's tokenizer is a copy of that teacher's, in the run's data
        folder, where a trained student tokenizer would be."""
        name = self.cfg.student.teacher_tokenizer
        if name is None:
            return
        source = Path(teachers[name]["model"]).parent / "tokenizer"
        target = Path(self.cfg.student_tokenizer)
        if not (target / "tokenizer.json").is_file() or \
                (target / "tokenizer.json").read_bytes() != (source / "tokenizer.json").read_bytes():
            shutil.rmtree(target, ignore_errors=True)
            shutil.copytree(source, target)
            self.log(f"[data] the student takes teacher {name}'s tokenizer ({source})")

    def _student_tokenizer_settings(self) -> dict[str, Any]:
        s = self.cfg.student
        return {"vocab_size": s.vocab_size} if s.trains_tokenizer else {"tokenizer": self.cfg.student_tokenizer}

    def teacher(self, spec: TeacherSpec, data: dict[str, Any]) -> dict[str, Any]:
        """A trained teacher's directory (trained once per settings and split, then cached), or the pretrained id."""
        if spec.train is None:
            return {"model": spec.model, "trained": False, "digest": digest(spec.model)}
        t = spec.train
        split_hash = data["splits"]["teacher-train"]["questions_hash"]
        key = digest({"train": t.key(), "split": split_hash, "device": self.cfg.device,
                      "max_length": self.cfg.train.max_length})
        where = Path(self.cfg.out) / ".cache" / "teachers" / key

        # A specialist trains on its family's rows alone; its tokenizer, like every teacher's, on the whole split.
        role = "teacher-train" if t.family is None else splits.family_role("teacher-train", t.family)

        def work() -> dict[str, Any]:
            rows = splits.check_split(self.root, "teacher-train", stage=f"teacher {spec.name}")
            if role != "teacher-train":
                splits.check_split(self.root, role, stage=f"teacher {spec.name}")
            if where.exists():
                shutil.rmtree(where)  # a half-trained teacher from a killed run: train it again
            if t.tokenizer is None:
                tok = train_bpe_tokenizer(_texts(rows), where / "tokenizer", vocab_size=t.vocab_size)
            else:  # a given tokenizer (e.g. one with a chat template), copied where a trained one would be
                tok = where / "tokenizer"
                load_fast_tokenizer(t.tokenizer, flag=f"teachers[{spec.name}].train.tokenizer").save_pretrained(tok)
            config = DistillConfig.from_dict(dict(
                student=t.preset, out=str(where / "model"), tokenizer=str(tok), student_template=t.template,
                system_prompt=t.system_prompt,
                dataset=str(splits.split_path(self.root, role)), split=splits.FILE_SPLIT["teacher-train"],
                steps=t.steps, batch_size=t.batch_size, lr=t.lr, seed=t.seed, checkpoint_every=0, progress=False,
                device=self.cfg.device, threads=self.cfg.threads, warmup_steps=max(1, t.steps // 10),
                max_length=self.cfg.train.max_length, layers=t.layers,
            ))
            result = run_distill(config, log=self._quiet)
            return {"model": str(where / "model"), "steps": result.steps, "tokens": result.tokens,
                    "final_ce": result.final.get("loss/ce"), "split": split_hash, "settings": config.to_dict()}

        record = self._unit(where, "teachers", f"teacher {spec.name}", key, work,
                            check=lambda: _finished_student(where / "model", t.steps))
        return {**record, "model": str(where / "model"), "trained": True, "digest": digest([key, record.get("made")])}

    def extract(self, teachers: dict[str, dict[str, Any]], data: dict[str, Any]) -> dict[str, Any]:
        path = self.root / "kv.zarr"
        want = data["splits"]["student-train"]["sample_ids_hash"]
        records = {}
        for spec in self.cfg.teachers:
            key = digest({"teacher": teachers[spec.name]["digest"], "extract": spec.extract, "split": want,
                          "student": self._student_tokenizer_settings(), "layers": self.cfg.student.layers,
                          "student_model": self.cfg.student.model})
            where = self.root / "stages" / "extract" / spec.name

            def work(spec: TeacherSpec = spec) -> dict[str, Any]:
                splits.check_split(self.root, "student-train", stage=f"extract {spec.name}")
                resume = False
                if path.exists():
                    store = KVStore.open(path)
                    if store.manifest.dataset.sample_ids_hash != want:
                        shutil.rmtree(path)  # cut from another split (the data changed): start over
                    else:
                        resume = spec.name in store.teachers
                config = stage_extract_config(self.cfg, spec, model=teachers[spec.name]["model"], resume=resume)
                result = run_extract(config, log=self._quiet)
                return {"samples": result.samples, "student_tokens": result.student_tokens,
                        "teacher_tokens": result.teacher_tokens, "quarantined": result.quarantined,
                        "settings": config.to_dict()}

            def check(name: str = spec.name) -> bool:
                try:
                    store = KVStore.open(path)
                except KavaError:  # no store, or one that doesn't open: extract again (a bug propagates)
                    return False
                return name in store.teachers and not store.missing_shards(name) \
                    and store.manifest.dataset.sample_ids_hash == want

            def adopt(name: str = spec.name) -> dict[str, Any] | None:
                return {"samples": KVStore.open(path).manifest.num_samples} if check(name) else None

            records[spec.name] = self._unit(where, "extract", f"extract {spec.name}", key, work, check, adopt)
        store = KVStore.open(path)
        splits.check_split(self.root, "student-train", stage="extract",
                           sample_ids_hash=store.manifest.dataset.sample_ids_hash)
        return {"path": str(path), "teachers": records,
                "digest": digest([[r["digest"], r.get("made")] for r in records.values()])}

    def tune(self, store: dict[str, Any], data: dict[str, Any]) -> dict[str, Any]:
        """Train ``tune.variant`` once per grid point, score each on the validation split, choose the best.

        Returns the ``tune.json`` record: every trial's accuracy and NLL on the validation rows and the chosen point.
        """
        t = self.cfg.tune
        assert t is not None
        seed = t.seed if t.seed is not None else self.cfg.seeds[0]
        variant = self.cfg.variant(t.variant)
        split = data["splits"]["validation"]
        trials = []
        for point in tune_points(t):
            name = f"{variant.name}~{digest(point)[:8]}"
            trial = replace(variant, name=name, distill={**variant.distill, **point})
            where = self.root / "tune" / name
            record = self.distill(trial, seed, store, where=where, steps=t.steps, stage="tune",
                                  score=split)
            trials.append({"point": point, "folder": str(where.relative_to(self.root)),
                           **{k: record["validation"][k] for k in ("accuracy", "nll", "nll_per_char", "n")}})
        if t.metric == "nll":
            best = min(trials, key=lambda r: r["nll_per_char"])
        else:  # accuracy; ties broken by the lower NLL
            best = max(trials, key=lambda r: (r["accuracy"], -r["nll_per_char"]))
        out = {"variant": variant.name, "apply_to": t.apply_to or [variant.name], "metric": t.metric, "seed": seed,
               "steps": t.steps or self.cfg.train.steps, "validation_rows": split["rows"], "chosen": best["point"],
               "trials": trials}
        (self.root / "tune.json").write_text(json.dumps(out, indent=2, default=str))
        self.log(f"[tune] chose {best['point']} ({t.metric} on {split['rows']} validation rows)")
        return out

    def _tuned(self, variant: VariantSpec, tuned: dict[str, Any] | None) -> VariantSpec:
        """``variant`` with the tuned options when it is one of ``tune.apply_to``'s."""
        if tuned is None or variant.name not in tuned["apply_to"]:
            return variant
        return replace(variant, distill={**variant.distill, **tuned["chosen"]})

    def distill(self, variant: VariantSpec, seed: int, store: dict[str, Any], *, where: Path | None = None,
                steps: int | None = None, stage: str = "distill",
                score: dict[str, Any] | None = None) -> dict[str, Any]:
        """Train one student (``variant`` × ``seed``) from the store.

        ``tune`` passes its own folder, steps and ``score``, the validation split's record: the student is then
        scored on those rows (accuracy and reference NLL) as part of the unit.
        """
        where = where or self.root / "students" / variant.name / f"seed-{seed}"
        cfg = stage_distill_config(self.cfg, variant, seed=seed, store=store["path"], out=str(where))
        if steps is not None:
            cfg.trainer.steps = steps
        # A tuning trial's record holds its validation score, so the eval settings that score it are part of its key.
        scoring = {"score": score, "max_new_tokens": self.cfg.eval.max_new_tokens} if score else {}
        key = student_key(cfg, store["digest"], scoring)

        def work() -> dict[str, Any]:
            splits.check_split(self.root, "student-train", stage=f"distill {variant.name}",
                               sample_ids_hash=KVStore.open(store["path"]).manifest.dataset.sample_ids_hash)
            resume = self.resumable and (where / "checkpoints").is_dir()
            if not resume:
                for old in where.iterdir():  # another config's outputs: start clean
                    if old.name != "stage.pending":
                        shutil.rmtree(old) if old.is_dir() else old.unlink()
            if resume:
                self.log(f"[distill] {variant.name} seed {seed}: resuming its last checkpoint")
            cfg.resume = resume
            result = run_distill(cfg, log=self._quiet)
            record = {"variant": variant.name, "seed": seed, "steps": result.steps, "tokens": result.tokens,
                      "batch_size": cfg.batch_size * cfg.grad_accum, "final": result.final,
                      "parameters": result.parameters, "train_seconds": result.seconds, "settings": cfg.to_dict()}
            if score is not None:
                record["validation"] = self._score(where, "validation")
            return record

        def adopt() -> dict[str, Any] | None:
            """A student the rendered sbatch script trained: finished, with this very config."""
            saved = where / "config.yaml"
            if not _finished_student(where, cfg.steps) or not saved.is_file():
                return None
            if cfg.resume_differences(yaml.safe_load(saved.read_text()) or {}):
                return None
            made = json.loads((where / "kava.json").read_text())
            return {"variant": variant.name, "seed": seed, "steps": made["steps"], "tokens": made["tokens"],
                    "batch_size": cfg.batch_size * cfg.grad_accum, "final": made["final"], "settings": cfg.to_dict()}

        return self._unit(where, stage, f"{stage} {variant.name} seed {seed}", key, work,
                          check=lambda: _finished_student(where, cfg.steps),
                          adopt=adopt if score is None else None)

    def _eval_config(self, model: str, role: str, out: Path) -> EvalConfig:
        """`kava eval`'s settings for ``model`` on the split file of ``role``, with the run's eval options."""
        e = self.cfg.eval
        return EvalConfig.from_dict(dict(
            model=model, dataset=str(splits.split_path(self.root, role)), split=splits.FILE_SPLIT[role],
            batch_size=e.batch_size, max_new_tokens=e.max_new_tokens, out=str(out),
            device=self.cfg.device, threads=self.cfg.threads, progress=False, nll=True,
        ))

    def _score(self, model: Path, role: str) -> dict[str, Any]:
        """Accuracy and reference NLL of ``model`` on a split other than eval (the validation rows)."""
        splits.check_split(self.root, role, stage=f"score {model.name} on {role}")
        result = run_eval(self._eval_config(str(model), role, model / f"{role}-items.jsonl"))
        return {"accuracy": result.accuracy, "nll": result.reference_nll, "n": result.n,
                "nll_per_char": result.reference_nll_per_char}

    def evaluate(self, teachers: dict[str, dict[str, Any]], students: dict[tuple[str, int], dict[str, Any]],
                 data: dict[str, Any]) -> dict[str, dict[str, Any]]:
        models = {}
        if self.cfg.eval.teachers:
            models.update({f"teacher {n}": (t["model"], t["digest"]) for n, t in teachers.items()})
        models.update({f"{v} seed {s}": (str(self.root / "students" / v / f"seed-{s}"),
                                         digest([r["digest"], r.get("made")]))
                       for (v, s), r in students.items()})
        e = self.cfg.eval
        out = {}
        for label, (model, model_key) in models.items():
            where = self.root / "eval" / label.replace(" ", "-")
            # "items": what each item records (2: its NLL, tokens, characters, bytes); older records are redone.
            key = digest({"model": model_key, "eval": e.__dict__, "split": data["splits"]["eval"], "items": 2})

            def work(model: str = model, label: str = label, where: Path = where) -> dict[str, Any]:
                splits.check_split(self.root, "eval", stage=f"eval {label}")
                where.mkdir(parents=True, exist_ok=True)
                config = self._eval_config(model, "eval", where / "items.jsonl")
                result = run_eval(config)
                curve = [] if label.startswith("teacher ") else self._checkpoint_curve(Path(model), result)
                return {"model": model, "accuracy": result.accuracy, "nll": result.reference_nll, "n": result.n,
                        "nll_per_char": result.reference_nll_per_char, "nll_per_byte": result.reference_nll_per_byte,
                        "nll_tokenizer": result.nll_tokenizer, "items": config.out,
                        "correct": result.correct, "generated_tokens": result.generated_tokens, "curve": curve,
                        "budget_stops": result.budget_stops, "longest_reference": result.longest_reference,
                        "settings": config.to_dict()}

            out[label] = self._unit(where, "eval", f"eval {label}", key, work,
                                    check=lambda where=where: (where / "items.jsonl").is_file())
        return out

    def _checkpoint_curve(self, student: Path, final: EvalResult) -> list[dict[str, float]]:
        """Accuracy and reference NLL on the first ``eval.checkpoint_rows`` eval rows at every kept checkpoint,
        ending with the final student (its items from the full eval, the same rows)."""
        n, e = self.cfg.eval.checkpoint_rows, self.cfg.eval
        if n <= 0:
            return []
        rows = list(splits.load_split(self.root, "eval"))[:n]
        tokenizer = AutoTokenizer.from_pretrained(student)
        made = json.loads((student / "kava.json").read_text())
        template, steps = template_from_record(made["template"]), made["steps"]
        curve = []
        for step, path in step_checkpoints(student):
            if step >= steps or (e.budgets and step not in e.budgets):
                continue
            model = student_at(student, path)
            scored = evaluate(model, tokenizer, rows, template, batch_size=e.batch_size,
                              max_new_tokens=e.max_new_tokens)
            curve.append({"step": step, "accuracy": scored.accuracy,
                          "nll": reference_nll(model, tokenizer, rows, template, batch_size=e.batch_size)})
        model = AutoModelForCausalLM.from_pretrained(student).eval()
        curve.append({"step": steps, "accuracy": sum(i.correct for i in final.items[:n]) / len(rows),
                      "nll": reference_nll(model, tokenizer, rows, template, batch_size=e.batch_size)})
        return curve

    def report(self, data: dict[str, Any], teachers: dict[str, Any], store: dict[str, Any],
               students: dict[tuple[str, int], dict[str, Any]], evals: dict[str, dict[str, Any]]) -> None:
        t0 = time.perf_counter()
        self.log("[report] writing")
        write_report(self.cfg, self.root, data=data, teachers=teachers, store=store, students=students,
                     evals=evals, timings=self.result.timings)
        self.result.timings["report"] = round(time.perf_counter() - t0, 2)
        self.log(f"[report] {self.result.report}")

    def _quiet(self, line: str) -> None:
        """Stage logs are kept short: the runner prints one line per unit of work."""


def student_key(cfg: DistillConfig, store_digest: str, scoring: dict[str, Any]) -> str:
    """The key of a student's unit of work: its options, its store and how it is scored. The trackers it logs to
    don't change it, so they are left out (adding ``trackers:`` to a run trains nothing again)."""
    options = {k: v for k, v in cfg.to_dict().items() if k not in ("tracker", "tracker_project", "tracker_name")}
    return digest({"config": options, "store": store_digest, **scoring})


def track_report(cfg: RunConfig, root: Path, *, log: Log = log_stderr) -> None:
    """With ``trackers:``, the run's own tracker run (named as its folder): the resolved run config, each variant's
    mean accuracy over seeds and each teacher's (``report.json``, at step 0) and the report's figures."""
    if not cfg.trackers:
        return
    report = json.loads((root / "report.json").read_text())
    headline = {f"accuracy/{row['variant']}": row["mean"] for row in report.get("accuracy", [])
                if isinstance(row.get("mean"), (int, float))}
    headline |= {f"accuracy/teacher-{name}": e["accuracy"] for name, e in report.get("teachers", {}).items()
                 if isinstance(e.get("accuracy"), (int, float))}
    log_summary(root, cfg.trackers, project=cfg.tracker_project, name=root.name, config=cfg.to_dict(),
                metrics=headline, artifacts=sorted((root / "figures").glob("*.png")), log=log)


def _texts(rows: Iterable[ReasoningRow]) -> list[str]:
    """The text a run's BPE tokenizers are trained on: each problem as the split files hold it."""
    return [f"{r.question}\n{splits.gsm8k_answer(r)}" for r in rows]


def _finished_student(where: Path, steps: int | None) -> bool:
    manifest = where / "kava.json"
    if not manifest.is_file() or not (where / "config.json").is_file():
        return False
    return steps is None or json.loads(manifest.read_text()).get("steps") == steps

