"""The experiment's disjoint splits, written once and checked by every stage that reads one.

``teacher-train`` trains the teachers made here, ``student-train`` is what the store is extracted over and the
students learn from, ``validation`` (only with ``data.validation_size``) is carved from the student share for
``tune:`` and is neither trained on nor stored, and ``eval`` is a separate split no model ever trains on. Each is a
GSM8K-form JSONL file under ``<run>/data/``; ``splits.json`` records each one's row count, its sample-id hash (the
hash a store's manifest records for the rows it was cut from) and a hash of its questions. A stage loads its file,
recomputes the hash and refuses to run on anything else.

With ``data.families`` (task families: several difficulties mixed) every record also names its ``family``, and each
family's share of the teacher split gets its own file, ``teacher-train.<family>.jsonl`` (recorded like a split), for
a teacher trained on that family alone. :func:`families_of` reads a split's families by sample id.
"""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kava.core.data import load_rows
from kava.core.errors import DatasetError
from kava.core.rows import ReasoningRow, RowSet, make_sample_id
from kava.core.synthetic import difficulty_details, family_rows
from kava.kvstore import sample_ids_hash

if TYPE_CHECKING:  # pragma: no cover - config.py imports this module: its types only, for annotations
    from .config import DataSpec

ROLES = ("teacher-train", "student-train", "validation", "eval")
FILE_SPLIT = {"teacher-train": "train", "student-train": "train", "validation": "train", "eval": "test"}
"""The split name the rows of each file are read under (it is part of their sample ids)."""


def family_role(role: str, family: str) -> str:
    """The split of ``role``'s rows of one task family: ``teacher-train.add``."""
    return f"{role}.{family}"


def file_split(role: str) -> str:
    """The split name the rows of ``role``'s file are read under (a family's file: its role's)."""
    return FILE_SPLIT[role.split(".", 1)[0]]


def split_path(root: Path, role: str) -> Path:
    return root / "data" / f"{role}.jsonl"


def load_split(root: Path, role: str) -> RowSet:
    """The rows of one split file, as every stage reads them."""
    return load_rows(str(split_path(root, role)), split=file_split(role))


def families_of(root: Path, role: str) -> dict[str, str]:
    """Sample id (as :func:`load_split` names the rows) → task family, for a split of a run with ``data.families``;
    empty without them."""
    path = split_path(root, role)
    out = {}
    with path.open(encoding="utf-8") as f:
        for index, line in enumerate(x for x in f if x.strip()):
            family = json.loads(line).get("family")
            if family is not None:
                out[make_sample_id(path.stem, file_split(role), index)] = family
    return out


def gsm8k_answer(row: ReasoningRow) -> str:
    """A row's answer field in GSM8K form: the reasoning lines, then ``#### <answer>``."""
    return f"{row.reasoning}\n#### {row.answer}"


def _question_hash(questions: list[str]) -> str:
    h = hashlib.sha256()
    for q in sorted(questions):
        h.update(q.encode() + b"\0")
    return h.hexdigest()


def describe(rows: RowSet) -> dict[str, Any]:
    return {"rows": len(rows), "sample_ids_hash": sample_ids_hash([r.sample_id for r in rows]),
            "questions_hash": _question_hash([r.question for r in rows])}


def make_splits(spec: DataSpec, root: Path) -> dict[str, Any]:
    """Draw the pool and the eval split, cut the pool by ``teacher_fraction``, write the files and splits.json.

    With ``teacher_fraction`` 0 (every teacher pretrained) the whole pool trains students and there is no
    teacher-train split: no file, and none in the record.
    """
    family: dict[str, str] = {}  # question -> family, with data.families
    if spec.families:
        pool_set, pool_tags = family_rows(spec.pool_size or 2000, seed=spec.seed, split=spec.pool_split,
                                          families=spec.families)
        eval_set, eval_tags = family_rows(spec.eval_size or 500, seed=spec.seed, split=spec.eval_split,
                                          families=spec.families)
        pool, evals = list(pool_set), list(eval_set)
        family = {r.question: f for r, f in zip([*pool, *evals], [*pool_tags, *eval_tags])}
    else:
        pool = list(load_rows(spec.dataset, split=spec.pool_split, limit=spec.pool_size, seed=spec.seed,
                              data_files=spec.data_files, difficulty=spec.difficulty))
        evals = list(load_rows(spec.dataset if spec.eval_files is None or spec.dataset != "gsm8k" else "gsm8k",
                               split=spec.eval_split, limit=spec.eval_size, seed=spec.seed,
                               data_files=spec.eval_files, difficulty=spec.difficulty))
    order = list(range(len(pool)))
    random.Random(spec.seed).shuffle(order)
    cut = round(spec.teacher_fraction * len(pool))
    # The validation rows are the last of the student share: carved from what students would train on, so tuning
    # never reads the eval split and the final students never train on what chose their setting.
    held = len(pool) - spec.validation_size
    parts = {"teacher-train": [pool[i] for i in sorted(order[:cut])],
             "student-train": [pool[i] for i in sorted(order[cut:held])],
             "validation": [pool[i] for i in sorted(order[held:])], "eval": evals}
    # Disjoint by content, not just by id: the same question under two ids would still leak.
    seen: dict[str, str] = {}
    for role, rows in parts.items():
        for r in rows:
            if seen.get(r.question, role) != role:
                raise DatasetError(f"A question is in both the {seen[r.question]} and the {role} split "
                                   f"({r.sample_id}: {r.question[:60]!r}...). Pick an eval split with no overlap.")
            seen[r.question] = role
    if not parts["student-train"] or not parts["eval"]:
        counts = {k: len(v) for k, v in parts.items()}
        raise DatasetError(f"Expected rows in every split. Got {counts}. Raise data.pool_size or data.eval_size.")

    if not parts["teacher-train"]:
        del parts["teacher-train"]  # every teacher is pretrained (teacher_fraction 0): there is no teacher split
    if not parts["validation"]:
        del parts["validation"]  # nothing is tuned: no validation split
    for name in spec.families:  # each family's teacher rows, for a teacher trained on that family alone
        rows = [r for r in parts.get("teacher-train", []) if family[r.question] == name]
        if rows:
            parts[family_role("teacher-train", name)] = rows
    (root / "data").mkdir(parents=True, exist_ok=True)
    for old in (root / "data").glob("*.jsonl"):
        if old.stem not in parts and old.stem.startswith(("teacher-train", "validation")):
            old.unlink()  # a file left by an earlier config of this run
    details = {"families": dict(spec.families)} if spec.families else \
        difficulty_details(spec.dataset, spec.difficulty)
    record: dict[str, Any] = {"dataset": spec.dataset, "seed": spec.seed, "pool_split": spec.pool_split,
                              "eval_split": spec.eval_split, **details, "splits": {}}
    for role, rows in parts.items():
        path = split_path(root, role)
        tmp = path.with_suffix(".tmp")
        with tmp.open("w") as f:
            for r in rows:
                tag = {"family": family[r.question]} if family else {}
                f.write(json.dumps({"question": r.question, "answer": gsm8k_answer(r),
                                    "source_id": r.sample_id, **tag}) + "\n")
        tmp.replace(path)
        record["splits"][role] = {**describe(load_split(root, role)), "file": str(path.relative_to(root))}
        if family:
            counts = {name: 0 for name in spec.families}
            for r in rows:
                counts[family[r.question]] += 1
            record["splits"][role]["families"] = counts
    (root / "data" / "splits.json").write_text(json.dumps(record, indent=2))
    return record


def recorded(root: Path) -> dict[str, Any]:
    path = root / "data" / "splits.json"
    if not path.is_file():
        raise DatasetError(f"{path} is missing: the data stage has not run. Run `kava run` without --force, or "
                           "with --force data.")
    return json.loads(path.read_text())


def check_split(root: Path, role: str, *, stage: str, sample_ids_hash: str | None = None) -> RowSet:
    """Load ``role``'s rows and refuse if they (or a store's recorded hash) are not the recorded split."""
    want = recorded(root)["splits"][role]
    rows = load_split(root, role)
    got = describe(rows)
    if got["sample_ids_hash"] != want["sample_ids_hash"] or got["questions_hash"] != want["questions_hash"]:
        raise DatasetError(f"{stage}: {split_path(root, role)} is not the recorded {role} split (hash "
                           f"{got['sample_ids_hash'][:12]} vs {want['sample_ids_hash'][:12]}); it changed after the "
                           "data stage. Rerun with --force data.")
    if sample_ids_hash is not None and sample_ids_hash != want["sample_ids_hash"]:
        other = next((r for r, s in recorded(root)["splits"].items() if s["sample_ids_hash"] == sample_ids_hash),
                     "an unknown set of rows")
        raise DatasetError(f"{stage}: expected data from the {role} split (hash {want['sample_ids_hash'][:12]}). "
                           f"Got {other} (hash {sample_ids_hash[:12]}). Each stage reads only its own split; rerun "
                           f"the stage that wrote it with --force.")
    return rows
