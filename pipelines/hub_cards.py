"""The cards pushed with a store (a dataset card) and with a student (a model card).

Each is a ``README.md``: YAML front matter the Hub indexes (tags, library, datasets), written through
huggingface_hub's ``DatasetCardData`` / ``ModelCardData`` so it is the metadata the Hub reads, and a Markdown body
saying what the repo holds. Nothing in them is typed in: the store's card comes from its manifest (``kava store
info``'s summary), a student's from its ``kava.json`` (or ``latent.json``), its ``config.yaml``, the store it was
distilled from and, given ``--results``, an evaluation. Each card also carries a ``kava`` metadata block that
`kava store pull` and `kava pull` check against (the store's digest; a student's files and their sha256).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from huggingface_hub import DatasetCard, DatasetCardData, ModelCard, ModelCardData

from kava.core.data import is_hub_id
from kava.core.errors import ConfigError
from kava.core.log import human_bytes
from kava.core.safe_yaml import load_yaml
from kava.kvstore.store import metadata_digest

CARD = "README.md"
STORE_TAGS = ["kava", "kv-cache", "distillation"]
STUDENT_TAGS = ["kava", "distillation", "kv-cache"]
_HUB_DATASETS = {"gsm8k": "openai/gsm8k"}
"""Datasets KaVa names by a short name, as the Hub names them."""


def store_digest(manifest: Mapping[str, Any], teachers: Mapping[str, Mapping[str, Any]]) -> str:
    """The store's :func:`~kava.kvstore.store.metadata_digest`, from its raw manifest and teacher specs."""
    return metadata_digest(manifest, teachers)


def _hub_dataset(name: str) -> str | None:
    """The Hub id of a store's source dataset, when it has one (not synthetic rows or a local file)."""
    if name in _HUB_DATASETS:
        return _HUB_DATASETS[name]
    return name if is_hub_id(name) and not Path(name).exists() else None


def _teacher_model(doc: Mapping[str, Any]) -> str:
    model = doc.get("model") or {}
    return next((str(model[k]) for k in ("model_id", "id", "path") if model.get(k)), "unknown")


@dataclass(frozen=True)
class StoreFacts:
    """What a student's card says of the store it was distilled from."""

    where: str
    """The store's path (or the dataset repo it was read from)."""
    digest: str
    """:func:`store_digest`."""
    dataset: str
    """``name:split`` of the rows its grid was cut from."""
    sample_ids_hash: str
    grid_fingerprint: str
    """sha256 of the token grid (offsets and input ids): the same for every teacher added to the store."""
    teachers: dict[str, str]
    """Teacher name → its model (hub id or path)."""
    repo: str | None = None
    """The dataset repo the store was pushed to, when known (``--store-repo``)."""

    @classmethod
    def from_docs(cls, where: str, manifest: Mapping[str, Any], teachers: Mapping[str, Mapping[str, Any]], *,
                  repo: str | None = None) -> StoreFacts:
        """From the raw manifest and teacher specs (each as its group's attribute holds it)."""
        dataset = manifest.get("dataset") or {}
        return cls(where=where, digest=store_digest(manifest, teachers),
                   dataset=f"{dataset.get('name', '?')}:{dataset.get('split', '?')}",
                   sample_ids_hash=str(dataset.get("sample_ids_hash", "")),
                   grid_fingerprint=str(manifest.get("grid_fingerprint", "")),
                   teachers={name: _teacher_model(doc) for name, doc in sorted(teachers.items())}, repo=repo)

    @property
    def dataset_id(self) -> str | None:
        return _hub_dataset(self.dataset.rsplit(":", 1)[0])


# --------------------------------------------------------------------------------------------------------------
# The store's dataset card


def _size_category(n: int) -> str:
    for limit, name in ((1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K"), (1_000_000, "100K<n<1M")):
        if n < limit:
            return name
    return "1M<n<10M" if n < 10_000_000 else "n>10M"  # (the Hub's larger buckets are not reached by a store)


def dataset_card(info: Mapping[str, Any], digest: str, grid_fingerprint: str, repo_id: str) -> DatasetCard:
    """The card of a store: ``info`` is :func:`kava.kvstore.summary` of it (what `kava store info --json` prints),
    ``digest`` its :func:`store_digest`."""
    teachers = info["teachers"]
    dataset = info["dataset"]
    hub_dataset = _hub_dataset(dataset["name"])
    data = DatasetCardData(
        pretty_name=f"KaVa KV store: {', '.join(teachers) or 'no teacher'} on {dataset['name']}:{dataset['split']}",
        tags=STORE_TAGS, size_categories=_size_category(info["samples"]),
        source_datasets=[hub_dataset] if hub_dataset else None,
        # The viewer shows the per-sample index (a Parquet table); the K/V chunks are Zarr, which it does not read.
        configs=[{"config_name": "index", "data_files": "index.parquet"}],
        kava={"kind": "store", "format_version": info["format_version"], "digest": digest,
              "samples": info["samples"], "tokens": info["tokens"], "teachers": sorted(teachers)},
    )
    by = info["samples_by_status"]
    tok = info["student_tokenizer"]
    lines = [
        f"# {repo_id.rsplit('/', 1)[-1]}", "",
        "A KaVa store: teacher key/value caches (and queries where stored), aligned to a student's tokens and "
        "written by `kava extract` as chunked, checksummed Zarr (format version "
        f"{info['format_version']}). Students are trained from it with `kava distill`, without the teacher.", "",
        "```bash",
        f"kava store pull {repo_id} runs/kv.zarr      # downloads it, then checks every chunk's crc32c",
        "kava distill --store runs/kv.zarr --student STUDENT --out runs/student   # on the store's student "
        "tokenizer",
        "```", "",
        "## Contents", "",
        "| | |", "|---|---|",
        f"| samples | {info['samples']} ({by['ok']} ok, {by['truncated']} truncated, {by['skipped']} skipped) |",
        f"| tokens | {info['tokens']:,} in {info['shards']} shards |",
        f"| dataset | {dataset['name']}:{dataset['split']} |",
        f"| sample ids (sha256) | `{dataset['sample_ids_hash']}` |",
        f"| student tokenizer | {tok['name']} (vocab {tok['vocab_size']}, fingerprint `{tok['fingerprint'][:16]}`) |",
        f"| format version | {info['format_version']} |",
        f"| size on disk | {human_bytes(info['bytes_on_disk'])} |",
        f"| store digest | `{digest}` |",
        f"| grid fingerprint | `{grid_fingerprint}` |",
        "",
        "## Teachers", "",
        "| teacher | model | quantization | layers stored | K/V heads × dim | dtype + codec | queries | top-k logits "
        "| eviction budget |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, t in teachers.items():
        ev = t.get("eviction")
        kept = "" if not ev or ev.get("kept_fraction") is None else f", {100 * ev['kept_fraction']:.1f}% rows kept"
        lines.append(
            f"| {name} | {t['model']} | {t['quantization']} | {len(t['layers'])} of {t['num_layers']} "
            f"({t['layer_map']}) | {t['kv_heads']} × {t['head_dim']} | {t['dtype']} + {t['compressor']} | "
            + (f"layers {t['q_layers']}" if t["has_q"] else "no") + " | "
            + (f"top {t['logits']['top_k']}" if t.get("logits") else "no") + " | "
            + (f"{ev['rule']}, {ev['budget']} of {', '.join(ev['segments'])}{kept}" if ev else "none") + " |")
    lines += ["", "The store digest is the sha256 over its manifest's and teacher specs' digests (it changes when a "
              "teacher is added); the grid fingerprint, the sha256 of the token grid, does not. A student distilled "
              "from this store names both in its card.", ""]
    if info.get("created_by"):
        lines += [f"Created by `{info['created_by']}`" + (f" on {info['created_at']}." if info.get("created_at")
                                                         else "."), ""]
    return DatasetCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines))


# --------------------------------------------------------------------------------------------------------------
# Evaluation results (--results)


@dataclass(frozen=True)
class Results:
    """An evaluation to show on a student's card, read from a file `kava eval` or `kava run` wrote."""

    source: str
    """What it was read from, as the card names it."""
    lines: list[str] = field(default_factory=list)
    """Its Markdown section body."""


def _fmt(x: Any, spec: str = ".4f") -> str:
    return "n/a" if x is None else format(x, spec)


def read_results(path: str | Path, *, student: Path | None = None) -> Results:
    """``--results FILE``: the JSONL `kava eval --out` writes (one scored item a line), the summary `kava eval --json`
    prints (or a latent student's ``eval.json``), or a `kava run` ``report.json`` (its paired comparisons; the row of
    ``student``'s variant is marked when it lies in that run's ``students/<variant>/seed-<s>``)."""
    path = Path(path)
    expected = ("a `kava eval --out` JSONL, a `kava eval --json` summary or a `kava run` report.json")
    try:
        text = path.read_text(encoding="utf-8")
        records = ([json.loads(line) for line in text.splitlines() if line.strip()] if path.suffix == ".jsonl"
                   else [json.loads(text)])
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f"--results {path}: expected {expected}. Got an unreadable file ({e}).") from e
    first = records[0] if records else None
    if path.suffix == ".jsonl" and records and all(isinstance(r, dict) and "correct" in r for r in records):
        correct = sum(bool(r["correct"]) for r in records)
        return Results(path.name, [f"Accuracy **{correct / len(records):.4f}** ({correct}/{len(records)} items; "
                                   f"greedy decoding, scored by `kava eval`)."])
    if isinstance(first, dict) and isinstance(first.get("accuracy"), (int, float)):  # one evaluation's summary
        rows = [("accuracy", _fmt(first["accuracy"])), ("items", f"{first.get('correct', '?')}/{first.get('n', '?')}")]
        if first.get("dataset"):
            rows.append(("dataset", f"{first['dataset']}:{first.get('split', '?')}"))
        for key in ("template", "max_new_tokens", "reference_nll", "answer_nll", "generated_tokens"):
            if first.get(key) is not None:
                rows.append((key.replace("_", " "), _fmt(first[key]) if isinstance(first[key], float)
                             else str(first[key])))
        return Results(path.name, ["| | |", "|---|---|", *(f"| {k} | {v} |" for k, v in rows)])
    if isinstance(first, dict) and isinstance(first.get("accuracy"), list):  # a kava run report.json
        return Results(path.name, _report_lines(first, student))
    raise ConfigError(f"--results {path}: expected {expected}. Got a file with none of their fields "
                      "(accuracy, or correct per item).")


def _report_lines(report: Mapping[str, Any], student: Path | None) -> list[str]:
    mine = None
    if student is not None and student.resolve().parent.parent.name == "students":
        mine = student.resolve().parent.name  # runs/NAME/students/<variant>/seed-<s>
    lines = [f"Accuracy over seeds {report.get('seeds')} from a `kava run` report; Δ is paired by seed against "
             f"`{report.get('baseline')}` (95% CI, paired t; p Holm-corrected across variants).", "",
             "| variant | mean accuracy | Δ vs baseline [95% CI] | p (Holm) |", "|---|---|---|---|"]
    for row in (r for r in report["accuracy"] if isinstance(r, dict)):
        ci = row.get("diff_ci") or [None, None]
        delta = "—" if row.get("variant") == row.get("baseline") else \
            f"{_fmt(row.get('diff'), '+.4f')} [{_fmt(ci[0], '+.4f')}, {_fmt(ci[1], '+.4f')}]"
        name = f"**{row.get('variant')}** (this student)" if row.get("variant") == mine else row.get("variant")
        p = "—" if row.get("p_holm") is None else _fmt(row["p_holm"], ".3g")
        lines.append(f"| {name} | {_fmt(row.get('mean'))} | {delta} | {p} |")
    for name, t in (report.get("teachers") or {}).items():
        lines.append(f"| teacher {name} | {_fmt(t.get('accuracy'))} | | |")
    return lines


# --------------------------------------------------------------------------------------------------------------
# The student's model card


@dataclass(frozen=True)
class StudentDir:
    """A directory written by `kava distill` (``kava.json``) or `kava latent` (``latent.json``), read for its card."""

    path: Path
    latent: bool
    record: dict[str, Any]
    """``kava.json``, or ``latent.json`` for a latent student."""
    config: dict[str, Any]
    """Its ``config.yaml`` (the resolved options); empty when there is none."""
    final: dict[str, float]
    """The last logged step's terms (``kava.json``'s ``final``, a latent run's last ``metrics.jsonl`` line)."""

    @classmethod
    def read(cls, path: Path, *, latent: bool) -> StudentDir:
        name = "latent.json" if latent else "kava.json"
        try:
            record = json.loads((path / name).read_text(encoding="utf-8"))
            config = (load_yaml((path / "config.yaml").read_text(encoding="utf-8"), path / "config.yaml")
                      if (path / "config.yaml").is_file() else {})
            final = record.get("final") or {}
            if latent and (path / "metrics.jsonl").is_file():
                logged = (path / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
                final = json.loads(logged[-1]) if logged else {}
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError) as e:
            raise ConfigError(f"{path / name}: expected the JSON `kava {'latent' if latent else 'distill'}` "
                              f"writes. Got an unreadable file ({e}). Train it again.") from e
        if not isinstance(record, dict) or not isinstance(config, dict):
            raise ConfigError(f"{path / name}: expected a JSON object. Got {type(record).__name__} instead. "
                              "Train it again.")
        return cls(path=path, latent=latent, record=record, config=config, final=final)


_LATENT_KEYS = ("mode", "latent", "jacobi", "projection", "shift", "teacher", "cot_weight", "codi_weight",
                "kv_weight", "codi_loss", "kv_loss", "kv_rope")
_TRAINING_KEYS = ("batch_size", "lr", "seed", "dataset", "split", "difficulty", "chain_steps", "train_size")


def _settings(config: Mapping[str, Any], keys: Sequence[str]) -> str:
    return ", ".join(f"{k} {config[k]}" for k in keys if config.get(k) not in (None, ""))


def _objective(cfg: Mapping[str, Any], rec: Mapping[str, Any]) -> str:
    """The loss and its settings, naming only the options that act (``config.yaml`` holds every one)."""
    o = {**cfg, "loss": rec.get("loss", cfg.get("loss"))}
    if o["loss"] == "ce":
        return "cross-entropy only (no K/V term), " + _settings(o, ("ce_weight", "ce_on"))
    keys = ["loss", "projector", "project", "alpha_k", "alpha_v"]
    keys += ["alpha_attn"] if o["loss"] == "structural" else []
    keys += ["kv_weight", "ce_weight", "ce_on", "segment_weights"]
    keys += ["logit_weight", "logit_divergence", "logit_temperature"] if o.get("logit_weight") else []
    keys += ["fusion"] if len(rec.get("teachers") or []) > 1 else []
    keys += ["lora_r", "lora_alpha"] if o.get("lora_r") else []
    return _settings(o, keys)


def model_card(student: StudentDir, repo_id: str, files: Mapping[str, str], *, store: StoreFacts | None,
               store_note: str, results: Results | None) -> ModelCard:
    """The card of a student: ``files`` (path in the repo → sha256) are what is pushed beside it, ``store`` what is
    known of the store it was distilled from (None, with ``store_note`` saying why), ``results`` an evaluation."""
    rec, cfg = student.record, student.config
    base = str(cfg.get("student") or rec.get("student") or "")
    datasets = [d for d in ((store.repo, store.dataset_id) if store else ()) if d]
    if not datasets and cfg.get("dataset") and _hub_dataset(str(cfg["dataset"])):
        datasets = [_hub_dataset(str(cfg["dataset"]))]
    data = ModelCardData(
        library_name="transformers", pipeline_tag="text-generation",
        tags=STUDENT_TAGS + (["latent-reasoning"] if student.latent else []),
        datasets=datasets or None, base_model=base if is_hub_id(base) and not Path(base).exists() else None,
        kava={"kind": "latent-student" if student.latent else "student", "files": dict(sorted(files.items())),
              **({"store_digest": store.digest} if store else
                 {"store_digest": rec["store_digest"]} if rec.get("store_digest") else {})},
    )
    name = repo_id.rsplit("/", 1)[-1]
    lines = [f"# {name}", ""]
    if student.latent:
        lines += [
            "A latent-reasoning student trained by `kava latent` (KaVa: the student reads the question, then "
            f"{rec.get('latent')} continuous latent tokens refined by {rec.get('jacobi')} Jacobi iterations, then "
            "answers). **Running it needs kava**: `from_pretrained` loads only the base model; the latent tokens' "
            "start embedding and projection are in `latent.safetensors`, their settings in `latent.json`.", "",
            "```bash", f"kava pull {repo_id} runs/latent-student    # with kava installed: checks every file's sha256",
            "```", "", "```python", "from kava.distill.latent.checkpoint import load_latent", "",
            'reasoner, tokenizer, mode = load_latent("runs/latent-student")', "```", "",
            "`kava eval --model runs/latent-student` scores it on GSM8K-format rows with the latent scorer.", ""]
    else:
        lines += [
            "A student distilled by `kava distill`: trained on cross-entropy plus alignment of its attention keys and "
            "values to its teachers', read from a KaVa store of their caches (no teacher ran during training). It is "
            "a plain causal LM:", "",
            "```python", "from transformers import AutoModelForCausalLM, AutoTokenizer", "",
            f'model = AutoModelForCausalLM.from_pretrained("{repo_id}")',
            f'tokenizer = AutoTokenizer.from_pretrained("{repo_id}")', "```", "",
            f"`kava pull {repo_id} DIR` downloads it and checks every file's sha256; "
            "`kava eval --model DIR` scores it with the prompt template it was trained with.", ""]
    lines += ["## Teachers", ""]
    teachers = rec.get("teachers") or []
    if student.latent:
        lines += ["Itself: its own teacher mode reads the chain of thought, whose cache is compressed by R-KV to "
                  f"{rec.get('latent')} rows per layer and head (self-distillation).", ""]
    elif teachers:
        lines += ["| teacher | model |", "|---|---|"]
        lines += [f"| {t} | {store.teachers.get(t, 'not in the store') if store else 'unknown'} |" for t in teachers]
        lines.append("")
    else:
        lines += ["None: fine-tuned on cross-entropy only, without a store.", ""]
    lines += ["## Training", "", "| | |", "|---|---|", f"| student | {base or 'unknown'} |"]
    if not student.latent and rec.get("store"):
        if store is not None:
            lines += [f"| store | {store.where}" + (f" (dataset repo `{store.repo}`)" if store.repo else "") + " |",
                      f"| store digest | `{store.digest}` (grid fingerprint `{store.grid_fingerprint}`) |",
                      f"| store dataset | {store.dataset}, sample ids `{store.sample_ids_hash[:16]}` |"]
        else:
            known = rec.get("store_digest")  # kava.json records it from 2026-12-06 on
            lines += [f"| store | {rec['store']} |",
                      f"| store digest | `{known}` (recorded in kava.json; {store_note}) |" if known
                      else f"| store digest | unknown: {store_note} |"]
    if student.latent:
        lines.append(f"| latent | {_settings({**cfg, **rec}, _LATENT_KEYS)} |")
    else:
        lines.append(f"| objective | {_objective(cfg, rec)}"
                     + (f"; K/V layers {rec['kv_layers']}" if rec.get("kv_layers") else "") + " |")
    steps = rec.get("steps", cfg.get("steps"))
    tokens = rec.get("tokens")
    lines.append(f"| steps | {steps}" + (f" ({tokens:,} tokens)" if isinstance(tokens, int) else "") + " |")
    lines.append(f"| training | {_settings(cfg, _TRAINING_KEYS)} |")
    params = rec.get("parameters") or {}
    if params.get("student_total"):
        lines.append(f"| parameters | {params['student_total']:,} ({params.get('student_trainable', 0):,} trained) |")
    if rec.get("command"):
        lines.append(f"| command | `{rec['command']}` |")
    losses = {k: v for k, v in student.final.items() if k.startswith("loss")}
    last = student.final.get("step", steps)
    if student.latent and isinstance(last, int):
        last += 1  # `kava latent` logs steps from 0
    if losses:
        lines += ["", f"## Final losses (step {last})", "", "| term | value |",
                  "|---|---|", *(f"| {k} | {_fmt(v) if isinstance(v, float) else v} |" for k, v in losses.items())]
    if results is not None:
        lines += ["", f"## Evaluation ({results.source})", "", *results.lines]
    lines += ["", "## Files", "", "| file | sha256 |", "|---|---|",
              *(f"| {f} | `{digest[:16]}` |" for f, digest in sorted(files.items())), ""]
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines))
