"""Reasoning datasets: rows of question / reasoning / answer, where they come from, and their fingerprints.

Every source returns a :class:`RowSet`: the rows ready to format, plus a :class:`RowProblem` for each row that was
skipped (empty question, empty answer, no ``#### <answer>`` line). One bad row never stops a dataset; the caller
records ``RowSet.problems`` next to what it writes.

Sources:

- ``synthetic_rows`` (in ``synthetic.py``): seeded GSM8K-shaped arithmetic word problems (the embedded default run
  needs no download).
- ``gsm8k_rows``: GSM8K from local JSONL/Parquet files, or the hub dataset ``openai/gsm8k`` when it is cached.
- ``file_rows``: any JSONL or Parquet file, with the field names given.
- ``load_rows``: dispatches on ``"synthetic"`` | ``"gsm8k"`` | a path, as the CLI's ``--dataset`` does.

GSM8K answers are reasoning lines that end with ``#### <answer>``; the lines carry calculator notes such as
``<<48/2=24>>``, kept or stripped with ``strip_calculator``. Text is kept as given (any Unicode), except that each of
question, reasoning and answer loses its leading and trailing whitespace: the prompt template owns the whitespace.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from kava.core.errors import ConfigError, DatasetError

from .rows import (
    ANSWER_MARK,
    ReasoningRow,
    RowProblem,
    RowSet,
    make_sample_id,
    parse_gsm8k_answer,
    row_problems,
    strip_calculator_notes,
)
from .synthetic import SYNTHETIC_DEFAULT_SIZE, Difficulty, difficulty_details, difficulty_problems, synthetic_rows


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

    With ``reasoning=None`` the answer field is parsed GSM8K-style (lines, then ``#### <answer>``), unless it is a
    number (JSON ``42``), which is the answer itself with no reasoning; otherwise the two fields are taken as they
    are.
    """
    if reasoning is None and isinstance(answer, (int, float)) and not isinstance(answer, bool):
        reasoning = ""  # a bare number ({"answer": 42}) is the final answer, without reasoning
    question, answer = _as_text(question).strip(), _as_text(answer)
    if reasoning is None:
        parsed = parse_gsm8k_answer(answer)
        if parsed is None:
            no_mark = f"the answer has no '{ANSWER_MARK} <answer>' line"
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
    rows: list[ReasoningRow] = []
    problems: list[RowProblem] = []
    for item in built:
        if isinstance(item, ReasoningRow):
            rows.append(item)
        else:
            problems.append(item)
    return RowSet(name, tuple(rows), tuple(problems))


# ---------------------------------------------------------------------------------------------------------------------
# Files and the hub

_JSONL_SUFFIXES = (".jsonl", ".json", ".ndjson")
_PARQUET_SUFFIXES = (".parquet", ".pq")


def _file_fields(path: Path) -> list[str]:
    """The field names of a JSONL file's first record or a Parquet file's schema."""
    if path.suffix in _PARQUET_SUFFIXES:
        return list(pq.read_schema(path).names)
    for record in _jsonl_records(path):
        return list(record)
    return []


def _jsonl_records(path: Path) -> Iterator[dict[str, Any]]:
    # Read as bytes and decode line by line: a bad byte is reported with its line and column, not as a traceback
    # from deep inside the text layer.
    with path.open("rb") as f:
        for line_number, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8-sig" if line_number == 1 else "utf-8")  # a leading BOM is allowed
            except UnicodeDecodeError as e:
                raise DatasetError(
                    f"Expected UTF-8 text in {path}. Got byte 0x{raw[e.start]:02x} at position {e.start + 1} of "
                    f"line {line_number}, which is not UTF-8. Re-encode the file as UTF-8 (e.g. iconv -f latin1 "
                    "-t utf-8)."
                ) from None
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise DatasetError(
                    f"Expected one JSON object per line in {path}. Got invalid JSON on line {line_number} ({e})."
                ) from e
            except (ValueError, RecursionError) as e:  # an integer past Python's 4,300 digits; nesting past the stack
                found = "nesting too deep to read" if isinstance(e, RecursionError) else "an integer too long to read"
                raise DatasetError(
                    f"Expected one JSON object per line in {path}. Got {found} on line {line_number}. Fix or remove "
                    "that line."
                ) from None
            if not isinstance(record, dict):
                raise DatasetError(
                    f"Expected one JSON object per line in {path}. Got a {type(record).__name__} on line {line_number}."
                )
            yield record


def _records(path: Path, fields: Sequence[str]) -> Iterator[dict[str, Any]]:
    """The records of a JSONL or Parquet file; raises ConfigError listing the file's fields when one is missing."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"Expected a JSONL or Parquet file. Got {str(path)!r}, which is a directory. Name the "
                          "files in it.")
    if not path.is_file():
        raise ConfigError(f"Expected a JSONL or Parquet file. Got {str(path)!r}, which does not exist.")
    if path.suffix not in _JSONL_SUFFIXES + _PARQUET_SUFFIXES:
        raise ConfigError(
            f"Expected a file ending in {list(_JSONL_SUFFIXES + _PARQUET_SUFFIXES)}. Got {str(path)!r} instead."
        )
    available = _file_fields(path)
    if not available and path.suffix in _JSONL_SUFFIXES:
        raise DatasetError(f"Expected at least one JSON object in {path}. Got an empty file (no records).")
    missing = [f for f in fields if f not in available]
    if missing:
        raise ConfigError(
            f"Expected field(s) {missing} in {path}. The file has fields {available}. "
            "Name the right ones with --question-field / --answer-field."
        )
    if path.suffix in _PARQUET_SUFFIXES:
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
        sample_id = make_sample_id(prefix, split, index)
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
    import datasets  # noqa: PLC0415 - the hub path only; ~1 s to import

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
    difficulty: str | Difficulty = "default",
) -> RowSet:
    """Rows of ``dataset``: ``"synthetic"`` | ``"gsm8k"`` (or ``"openai/gsm8k"``) | a JSONL/Parquet path.

    ``synthetic`` makes ``limit`` rows (``SYNTHETIC_DEFAULT_SIZE[split]`` without one) from ``seed`` at
    ``difficulty`` (a preset name or ``steps=1-2,ops=+-,start=2-9,operand=1-9``; see ``Difficulty.parse``);
    ``data_files`` is for ``gsm8k`` only, ``question_field`` / ``answer_field`` for paths only.
    """
    if dataset == "synthetic":
        if data_files is not None:
            raise ConfigError("Can't set --data-files with --dataset synthetic. Choose one.")
        n = SYNTHETIC_DEFAULT_SIZE.get(split, 0) if limit is None else limit  # synthetic_rows checks the split
        return synthetic_rows(n, seed=seed, split=split, strip_calculator=strip_calculator, difficulty=difficulty)
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


@dataclass
class DataSource:
    """Where a command's rows come from: the ``--dataset`` options every stage shares, loaded by :meth:`load`."""

    dataset: str = "synthetic"
    """``synthetic`` (generated, seeded), ``gsm8k``, or a JSONL/Parquet file."""
    split: str = "train"
    """Dataset split."""
    limit: int | None = None
    """Use only the first N rows (synthetic: how many to generate; default 2000 for train)."""
    data_files: str | None = None
    """Local files holding the rows of --split (for --dataset gsm8k)."""
    question_field: str = "question"
    """Field holding the question (file datasets)."""
    answer_field: str = "answer"
    """Field holding the reasoning lines and '#### N' (file datasets)."""
    data_seed: int = 0
    """Seed of the synthetic dataset."""
    difficulty: str = "default"
    """Difficulty of the synthetic dataset: a preset (default, easy) or key=value pairs such as
    steps=1-2,ops=+-,start=2-9,operand=1-9 (see docs/extract.md)."""
    strip_calculator: bool = False
    """Remove GSM8K's <<a*b=c>> calculator notes from the text."""

    def problems(self) -> list[str]:
        """What is wrong without reading anything, in the flags' spelling."""
        p = difficulty_problems("--difficulty", self.difficulty, self.dataset)
        if self.limit is not None and (not isinstance(self.limit, int) or self.limit < 1):
            p.append(f"--limit: expected a positive integer. Got {self.limit!r} instead.")
        return p

    def details(self) -> dict[str, Any]:
        """What the store records of the source besides its name and split (the keys stores have always used)."""
        return {"limit": self.limit, "seed": self.data_seed, "strip_calculator": self.strip_calculator,
                **difficulty_details(self.dataset, self.difficulty)}

    def load(self) -> RowSet:
        """The rows, through :func:`load_rows`."""
        return load_rows(self.dataset, split=self.split, limit=self.limit, data_files=self.data_files,
                         question_field=self.question_field, answer_field=self.answer_field, seed=self.data_seed,
                         strip_calculator=self.strip_calculator, difficulty=self.difficulty)
