"""Reasoning datasets: rows of question / reasoning / answer, where they come from, and their fingerprints.

Every source returns a :class:`RowSet`: the rows ready to format, plus a :class:`RowProblem` for each row that was
skipped (empty question, empty answer, no ``#### <answer>`` line). One bad row never stops a dataset; the caller
records ``RowSet.problems`` next to what it writes.

Sources:

- ``synthetic_rows``: seeded GSM8K-shaped arithmetic word problems (the embedded default run needs no download).
- ``gsm8k_rows``: GSM8K from local JSONL/Parquet files, or the hub dataset ``openai/gsm8k`` when it is cached.
- ``file_rows``: any JSONL or Parquet file, with the field names given.
- ``load_rows``: dispatches on ``"synthetic"`` | ``"gsm8k"`` | a path, as the CLI's ``--dataset`` does.

GSM8K answers are reasoning lines that end with ``#### <answer>``; the lines carry calculator notes such as
``<<48/2=24>>``, kept or stripped with ``strip_calculator``. Text is kept as given (any Unicode), except that each of
question, reasoning and answer loses its leading and trailing whitespace: the prompt template owns the whitespace.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kava.kvstore.errors import ConfigError, DatasetError  # noqa: F401 - DatasetError is part of this API
from kava.kvstore.create import sample_ids_hash  # noqa: F401 - re-exported: the store checks this definition



# ---------------------------------------------------------------------------------------------------------------------
# Rows


@dataclass(frozen=True)
class ReasoningRow:
    """One sample: the question, the reasoning lines (joined by newlines) and the final answer."""

    sample_id: str
    question: str
    reasoning: str
    answer: str


@dataclass(frozen=True)
class RowProblem:
    """A row that was skipped, and why (e.g. ``"empty question"``)."""

    sample_id: str
    reason: str


@dataclass(frozen=True)
class RowSet:
    """The usable rows of one dataset split, in order, and the rows skipped with their reasons.

    Iterating and ``len()`` see only the usable rows.
    """

    name: str
    """Where the rows came from: ``"synthetic/train"``, ``"gsm8k/test"``, or a file path."""
    rows: tuple[ReasoningRow, ...]
    problems: tuple[RowProblem, ...] = ()

    def __len__(self) -> int:
        return len(self.rows)

    def __iter__(self) -> Iterator[ReasoningRow]:
        return iter(self.rows)

    def __getitem__(self, index: int) -> ReasoningRow:
        return self.rows[index]

    @property
    def sample_ids(self) -> list[str]:
        return [row.sample_id for row in self.rows]

    @property
    def fingerprint(self) -> str:
        """``dataset_fingerprint`` of the usable rows."""
        return dataset_fingerprint(self.rows)


_CALCULATOR_NOTE = re.compile(r"<<[^<>]*>>")
_ANSWER_MARK = "####"


def strip_calculator_notes(text: str) -> str:
    """Remove GSM8K calculator notes: ``"48/2 = <<48/2=24>>24"`` → ``"48/2 = 24"``."""
    return _CALCULATOR_NOTE.sub("", text)


def parse_gsm8k_answer(text: str) -> tuple[str, str] | None:
    """Split a GSM8K answer into (reasoning, answer); None when it has no ``#### <answer>`` line.

    The reasoning is every line before the last line that starts with ``####``, the answer what follows the mark on
    that line, both stripped (``"1,080"`` stays as written). Lines after the answer line are dropped.
    """
    lines = text.split("\n")  # not splitlines(): that also splits on U+2028 etc. and would change the text
    for i in range(len(lines) - 1, -1, -1):
        if lines[i].lstrip().startswith(_ANSWER_MARK):
            answer = lines[i].lstrip()[len(_ANSWER_MARK) :].strip()
            return "\n".join(lines[:i]).strip(), answer
    return None


def gsm8k_answer_text(row: ReasoningRow) -> str:
    """The row's reasoning and answer in GSM8K's answer form: the lines, then ``#### <answer>``."""
    return f"{row.reasoning}\n{_ANSWER_MARK} {row.answer}" if row.reasoning else f"{_ANSWER_MARK} {row.answer}"


def row_problems(row: ReasoningRow) -> list[str]:
    """Why this row can't be used (empty list when it can). Empty reasoning is allowed."""
    problems = []
    if not row.question.strip():
        problems.append("empty question")
    if not row.answer.strip():
        problems.append("empty answer")
    return problems


def _as_text(value: Any) -> str:
    """A field value as text: None → "", numbers → their str()."""
    if value is None:
        return ""
    return value if isinstance(value, str) else str(value)


def _make_row(
    sample_id: str,
    question: Any,
    answer: Any,
    *,
    reasoning: Any = None,
    strip_calculator: bool,
) -> ReasoningRow | RowProblem:
    """Build a row from raw fields; a RowProblem instead when it can't be used.

    With ``reasoning=None`` the answer field is parsed GSM8K-style (lines, then ``#### <answer>``); otherwise the two
    fields are taken as they are.
    """
    question, answer = _as_text(question).strip(), _as_text(answer)
    if reasoning is None:
        parsed = parse_gsm8k_answer(answer)
        if parsed is None:
            no_mark = f"the answer has no '{_ANSWER_MARK} <answer>' line"
            return RowProblem(sample_id, f"empty question; {no_mark}" if not question else no_mark)
        reasoning, answer = parsed
    else:
        reasoning, answer = _as_text(reasoning).strip(), answer.strip()
    if strip_calculator:
        reasoning = strip_calculator_notes(reasoning)
    row = ReasoningRow(sample_id, question, reasoning, answer)
    problems = row_problems(row)
    return RowProblem(sample_id, "; ".join(problems)) if problems else row


def _collect(name: str, built: Iterable[ReasoningRow | RowProblem]) -> RowSet:
    rows, problems = [], []
    for item in built:
        (rows if isinstance(item, ReasoningRow) else problems).append(item)
    return RowSet(name, tuple(rows), tuple(problems))


def _sample_id(prefix: str, split: str, index: int) -> str:
    return f"{prefix}/{split}/{index:06d}"


# ---------------------------------------------------------------------------------------------------------------------
# Fingerprints


def _hash_fields(fields: Iterable[str]) -> str:
    # Length-prefixed so that ("ab", "c") and ("a", "bc") hash differently.
    h = hashlib.sha256()
    for field in fields:
        data = field.encode("utf-8")
        h.update(len(data).to_bytes(8, "little"))
        h.update(data)
    return h.hexdigest()


def dataset_fingerprint(rows: Iterable[ReasoningRow]) -> str:
    """sha256 (hex) over every row's id, question, reasoning and answer, in order."""
    return _hash_fields(f for row in rows for f in (row.sample_id, row.question, row.reasoning, row.answer))


# ---------------------------------------------------------------------------------------------------------------------
# Synthetic GSM8K-shaped problems

# A split owns the questions whose sha256 falls in its bucket, so no question can be in two splits.
SYNTHETIC_SPLITS = ("train", "validation", "test")
SYNTHETIC_DEFAULT_SIZE = {"train": 2000, "validation": 200, "test": 500}
"""Rows per split when ``load_rows("synthetic")`` gets no limit."""

_NAMES = (
    ("Natalia", "she"), ("Liam", "he"), ("Priya", "she"), ("Mateo", "he"), ("Aisha", "she"), ("Kenji", "he"),
    ("Olga", "she"), ("Tom", "he"), ("Fatima", "she"), ("Diego", "he"), ("Mei", "she"), ("Samuel", "he"),
)  # fmt: skip
_PRONOUNS = {  # subject, object, possessive, reflexive
    "she": ("she", "her", "her", "herself"),
    "he": ("he", "him", "his", "himself"),
}
_OBJECTS = ("marbles", "stickers", "apples", "pencils", "cookies", "shells", "stamps", "books", "cards", "beads")
_CONTAINERS = ("packs", "boxes", "bags")

_OPENINGS = ("{Name} has {a} {obj}.", "{Name} starts the week with {a} {obj}.", "{Name} owns {a} {obj}.")
_CLOSINGS = (
    "How many {obj} does {Name} have now?",
    "How many {obj} does {Name} have at the end?",
    "How many {obj} does {Name} end up with?",
)
# Each operation: question sentences, reasoning lines. {r} is the result; the notes are GSM8K's <<expr=result>>.
_ADD_Q = ("{He} buys {n} more {obj}.", "{He} finds {n} more {obj}.", "{Friend} gives {him} {n} {obj}.")
_ADD_R = (
    "{Name} has {a} + {n} = <<{a}+{n}={r}>>{r} {obj} after that.",
    "Now {he} has {a}+{n}=<<{a}+{n}={r}>>{r} {obj}.",
)
_SUB_Q = ("{He} gives {n} {obj} to {Friend}.", "{He} loses {n} of the {obj}.", "{He} sells {n} {obj}.")
_SUB_R = ("{Name} has {a} - {n} = <<{a}-{n}={r}>>{r} {obj} left.", "That leaves {a}-{n}=<<{a}-{n}={r}>>{r} {obj}.")
_MUL_Q = (
    "Then the number of {obj} {he} has becomes {n} times as large.",
    "Then {his} collection grows to {n} times its size.",
)
_MUL_R = ("{He} now has {a} * {n} = <<{a}*{n}={r}>>{r} {obj}.", "That makes {a}*{n}=<<{a}*{n}={r}>>{r} {obj}.")
_DIV_Q = (
    "{He} splits the {obj} into {n} equal groups and keeps one group.",
    "{He} shares the {obj} equally among {n} kids, {himself} included, and keeps {his} share.",
)
_DIV_R = (
    "Each share is {a} / {n} = <<{a}/{n}={r}>>{r} {obj}, so {he} keeps {r}.",
    "{Name} keeps {a}/{n}=<<{a}/{n}={r}>>{r} {obj}.",
)
_GROUPS_Q = ("{He} buys {k} {box} of {obj} with {m} in each.", "{He} gets {k} {box} that hold {m} {obj} each.")
_GROUPS_R = (  # both lines, in order
    "The {box} hold {k} * {m} = <<{k}*{m}={p}>>{p} {obj}.",
    "So {he} has {a} + {p} = <<{a}+{p}={r}>>{r} {obj}.",
)


def _capitalize(text: str) -> str:
    return text[:1].upper() + text[1:]


def _synthetic_problem(rng: random.Random) -> tuple[str, list[str], int]:
    """One problem: (question, reasoning lines, answer). 2–4 calculator steps, every result a positive integer."""
    name, gender = rng.choice(_NAMES)
    he, him, his, himself = _PRONOUNS[gender]
    friend = rng.choice([n for n, _ in _NAMES if n != name])
    words = {"Name": name, "he": he, "He": _capitalize(he), "him": him, "his": his, "himself": himself}
    words |= {"Friend": friend, "obj": rng.choice(_OBJECTS)}

    value = rng.randint(5, 60)
    sentences = [rng.choice(_OPENINGS).format(a=value, **words)]
    lines: list[str] = []
    steps, n_steps = 0, rng.randint(2, 4)
    while steps < n_steps:
        divisors = [k for k in range(2, 10) if value % k == 0]
        ops = ["add"] + ["sub"] * (value >= 3) + ["mul"] * (value <= 200) + ["div"] * bool(divisors)
        ops += ["groups"] * (n_steps - steps >= 2)
        op = rng.choice(ops)
        if op == "groups":  # two notes: the packs' total, then the sum
            k, m = rng.randint(2, 6), rng.randint(2, 12)
            p, r = k * m, value + k * m
            fill = dict(words, a=value, k=k, m=m, p=p, r=r, box=rng.choice(_CONTAINERS))
            sentences.append(rng.choice(_GROUPS_Q).format(**fill))
            lines += [_GROUPS_R[0].format(**fill), _GROUPS_R[1].format(**fill)]
            value, steps = r, steps + 2
            continue
        if op == "add":
            n = rng.randint(2, 30)
            r, questions, reasons = value + n, _ADD_Q, _ADD_R
        elif op == "sub":
            n = rng.randint(1, value - 1)
            r, questions, reasons = value - n, _SUB_Q, _SUB_R
        elif op == "mul":
            n = rng.randint(2, 4)
            r, questions, reasons = value * n, _MUL_Q, _MUL_R
        else:
            n = rng.choice(divisors)
            r, questions, reasons = value // n, _DIV_Q, _DIV_R
        fill = dict(words, a=value, n=n, r=r)
        sentences.append(rng.choice(questions).format(**fill))
        lines.append(_capitalize(rng.choice(reasons).format(**fill)))
        value, steps = r, steps + 1
    sentences.append(rng.choice(_CLOSINGS).format(**words))
    return " ".join(sentences), lines, value


def _synthetic_rng(seed: int, split: str, index: int, attempt: int) -> random.Random:
    key = hashlib.sha256(f"kava-synthetic/{seed}/{split}/{index}/{attempt}".encode()).digest()
    return random.Random(int.from_bytes(key[:8], "little"))


def _split_of(question: str) -> str:
    bucket = hashlib.sha256(question.encode("utf-8")).digest()[0] % len(SYNTHETIC_SPLITS)
    return SYNTHETIC_SPLITS[bucket]


def synthetic_rows(n: int, *, seed: int = 0, split: str = "train", strip_calculator: bool = False) -> RowSet:
    """``n`` seeded GSM8K-shaped arithmetic word problems, ids ``synthetic/<split>/<index:06d>``.

    Row ``i`` depends only on (seed, split, i), so a longer run extends a shorter one. Splits are disjoint by
    construction: a question belongs to the split its sha256 picks, and each split draws (with its own seeds)
    until it gets one of its own (about three draws a row).
    """
    if split not in SYNTHETIC_SPLITS:
        raise ConfigError(
            f"Expected --split to be one of {list(SYNTHETIC_SPLITS)} for synthetic data. Got {split!r} instead."
        )
    if n < 0:
        raise ConfigError(f"Expected --limit >= 0. Got {n} instead.")

    def build(index: int) -> ReasoningRow:
        for attempt in range(10_000):
            question, lines, answer = _synthetic_problem(_synthetic_rng(seed, split, index, attempt))
            if _split_of(question) == split:
                reasoning = "\n".join(lines)
                if strip_calculator:
                    reasoning = strip_calculator_notes(reasoning)
                return ReasoningRow(_sample_id("synthetic", split, index), question, reasoning, str(answer))
        raise AssertionError("unreachable: a third of all questions belong to each split")  # pragma: no cover

    return RowSet(f"synthetic/{split}", tuple(build(i) for i in range(n)))


# ---------------------------------------------------------------------------------------------------------------------
# Files and the hub

_JSONL_SUFFIXES = (".jsonl", ".json", ".ndjson")
_PARQUET_SUFFIXES = (".parquet", ".pq")


def _file_fields(path: Path) -> list[str]:
    """The field names of a JSONL file's first record or a Parquet file's schema."""
    if path.suffix in _PARQUET_SUFFIXES:
        import pyarrow.parquet as pq

        return list(pq.read_schema(path).names)
    for record in _jsonl_records(path):
        return list(record)
    return []


def _jsonl_records(path: Path) -> Iterator[dict[str, Any]]:
    with path.open(encoding="utf-8") as f:
        for line_number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise DatasetError(
                    f"Expected one JSON object per line in {path}. Got invalid JSON on line {line_number} ({e})."
                ) from e
            if not isinstance(record, dict):
                raise DatasetError(
                    f"Expected one JSON object per line in {path}. Got a {type(record).__name__} on line {line_number}."
                )
            yield record


def _records(path: Path, fields: Sequence[str]) -> Iterator[dict[str, Any]]:
    """The records of a JSONL or Parquet file; raises ConfigError listing the file's fields when one is missing."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"Expected a JSONL or Parquet file. Got {str(path)!r}, which does not exist.")
    if path.suffix not in _JSONL_SUFFIXES + _PARQUET_SUFFIXES:
        raise ConfigError(
            f"Expected a file ending in {list(_JSONL_SUFFIXES + _PARQUET_SUFFIXES)}. Got {str(path)!r} instead."
        )
    available = _file_fields(path)
    missing = [f for f in fields if f not in available]
    if missing:
        raise ConfigError(
            f"Expected field(s) {missing} in {path}. The file has fields {available}. "
            "Name the right ones with --question-field / --answer-field."
        )
    if path.suffix in _PARQUET_SUFFIXES:
        import pyarrow.parquet as pq

        yield from pq.read_table(path, columns=list(fields)).to_pylist()
    else:
        yield from _jsonl_records(path)


def _rows_from_records(
    records: Iterable[dict[str, Any]],
    *,
    prefix: str,
    split: str,
    question_field: str,
    answer_field: str,
    reasoning_field: str | None,
    limit: int | None,
    strip_calculator: bool,
) -> Iterator[ReasoningRow | RowProblem]:
    for index, record in enumerate(records):
        if limit is not None and index >= limit:
            return
        sample_id = _sample_id(prefix, split, index)
        missing = [f for f in (question_field, answer_field, reasoning_field) if f is not None and f not in record]
        if missing:  # the first record had them (checked in _records); this one does not
            yield RowProblem(sample_id, f"missing field(s) {missing}")
            continue
        yield _make_row(
            sample_id,
            record[question_field],
            record[answer_field],
            reasoning=record[reasoning_field] if reasoning_field is not None else None,
            strip_calculator=strip_calculator,
        )


def file_rows(
    path: str | Path,
    *,
    question_field: str = "question",
    answer_field: str = "answer",
    reasoning_field: str | None = None,
    split: str = "train",
    limit: int | None = None,
    strip_calculator: bool = False,
) -> RowSet:
    """Rows from a JSONL (one object a line) or Parquet file; ids ``<file stem>/<split>/<record index:06d>``.

    Without ``reasoning_field`` the answer field is parsed GSM8K-style (reasoning lines, then ``#### <answer>``);
    with it, reasoning and answer are taken from their fields as they are. ``limit`` counts records read, skipped
    ones included, so ids stay record indices. A field missing from the file raises ConfigError listing the
    file's fields; one missing from a later record only skips that record.
    """
    path = Path(path)
    fields = [question_field, answer_field] + ([reasoning_field] if reasoning_field is not None else [])
    built = _rows_from_records(
        _records(path, fields),
        prefix=path.stem,
        split=split,
        question_field=question_field,
        answer_field=answer_field,
        reasoning_field=reasoning_field,
        limit=limit,
        strip_calculator=strip_calculator,
    )
    return _collect(str(path), built)


GSM8K_HUB_ID = "openai/gsm8k"
GSM8K_CONFIG = "main"

DataFiles = str | Path | Sequence[str | Path] | Mapping[str, str | Path | Sequence[str | Path]]


def _files_for_split(data_files: DataFiles, split: str) -> list[Path]:
    if isinstance(data_files, Mapping):
        if split not in data_files:
            raise ConfigError(f"Expected --data-files for split {split!r}. Got splits {sorted(data_files)} instead.")
        data_files = data_files[split]
    if isinstance(data_files, (str, Path)):
        return [Path(data_files)]
    return [Path(f) for f in data_files]


def gsm8k_rows(
    split: str = "train",
    data_files: DataFiles | None = None,
    limit: int | None = None,
    *,
    strip_calculator: bool = False,
) -> RowSet:
    """GSM8K rows, ids ``gsm8k/<split>/<row index:06d>`` (the index runs across the files in order).

    ``data_files``: local JSONL/Parquet files with ``question`` / ``answer`` fields (one path, a list, or a mapping
    split → paths). Without it, the hub dataset ``openai/gsm8k`` (config ``main``) through ``datasets``; offline
    and not cached, that fails at once with a DatasetError that says to pass ``--data-files``.
    """
    if data_files is not None:
        paths = _files_for_split(data_files, split)
        records: Iterable[dict[str, Any]] = (r for p in paths for r in _records(p, ("question", "answer")))
    else:
        records = _hub_gsm8k_records(split, limit)
    built = _rows_from_records(
        records,
        prefix="gsm8k",
        split=split,
        question_field="question",
        answer_field="answer",
        reasoning_field=None,
        limit=limit,
        strip_calculator=strip_calculator,
    )
    return _collect(f"gsm8k/{split}", built)


def _hub_gsm8k_records(split: str, limit: int | None) -> list[dict[str, Any]]:
    import datasets  # heavy (~0.6 s); only the hub path needs it

    try:
        dataset = datasets.load_dataset(GSM8K_HUB_ID, GSM8K_CONFIG, split=split)
    except (OSError, ValueError) as e:  # ConnectionError / DatasetNotFoundError offline; ValueError for a bad split
        offline = bool(datasets.config.HF_DATASETS_OFFLINE)
        why = (
            "is not cached and HF_DATASETS_OFFLINE=1 forbids downloading it"
            if offline and isinstance(e, OSError)
            else f"could not be loaded ({type(e).__name__}: {e})"
        )
        raise DatasetError(
            f"The hub dataset {GSM8K_HUB_ID!r} (config {GSM8K_CONFIG!r}, split {split!r}) {why}. "
            "Pass --data-files with local GSM8K JSONL or Parquet files (fields 'question' and 'answer')."
        ) from e
    if limit is not None:
        dataset = dataset.select(range(min(limit, len(dataset))))
    return [{"question": r["question"], "answer": r["answer"]} for r in dataset]


def load_rows(
    dataset: str,
    *,
    split: str = "train",
    limit: int | None = None,
    data_files: DataFiles | None = None,
    question_field: str = "question",
    answer_field: str = "answer",
    seed: int = 0,
    strip_calculator: bool = False,
) -> RowSet:
    """Rows of ``dataset``: ``"synthetic"`` | ``"gsm8k"`` (or ``"openai/gsm8k"``) | a JSONL/Parquet path.

    ``synthetic`` makes ``limit`` rows (``SYNTHETIC_DEFAULT_SIZE[split]`` without one) from ``seed``;
    ``data_files`` is for ``gsm8k`` only, ``question_field`` / ``answer_field`` for paths only.
    """
    if dataset == "synthetic":
        if data_files is not None:
            raise ConfigError("Can't set --data-files with --dataset synthetic. Choose one.")
        n = SYNTHETIC_DEFAULT_SIZE.get(split, 0) if limit is None else limit  # synthetic_rows checks the split
        return synthetic_rows(n, seed=seed, split=split, strip_calculator=strip_calculator)
    if dataset in ("gsm8k", GSM8K_HUB_ID):
        return gsm8k_rows(split, data_files, limit, strip_calculator=strip_calculator)
    if Path(dataset).is_file():
        if data_files is not None:
            raise ConfigError("Can't set --data-files when --dataset is a file path. Choose one.")
        return file_rows(
            dataset,
            question_field=question_field,
            answer_field=answer_field,
            split=split,
            limit=limit,
            strip_calculator=strip_calculator,
        )
    raise ConfigError(
        f"Expected --dataset to be 'synthetic', 'gsm8k' or a path to a JSONL/Parquet file. Got {dataset!r} instead."
    )
