"""Reasoning datasets: rows of question / reasoning / answer, where they come from, and their fingerprints.

Every source returns a :class:`RowSet`: the rows ready to format, plus a :class:`RowProblem` for each row that was
skipped (empty question, empty answer, no ``#### <answer>`` line). One bad row never stops a dataset; the caller
records ``RowSet.problems`` next to what it writes.

Sources:

- ``synthetic_rows`` (in ``synthetic.py``): seeded GSM8K-shaped arithmetic word problems (the embedded default run
  needs no download).
- ``gsm8k_rows``: GSM8K from local JSONL/Parquet files, or the hub dataset ``openai/gsm8k`` when it is cached.
- ``file_rows``: any JSONL or Parquet file, with the field names given.
- ``hub_rows``: any dataset ``datasets.load_dataset`` opens (a hub id in the local cache, or a local folder).
- ``load_rows``: dispatches on ``"synthetic"`` | ``"gsm8k"`` | a path | a datasets id, as the CLI's ``--dataset``
  does.

A record gives a row through its fields (``question_field``; ``answer_field``, and ``reasoning_field`` when the
reasoning is a field of its own), or through a conversation (``messages_field``: a list of ``{role, content}``
turns, one user turn, the question, and one assistant turn, the reasoning and the answer; system turns are
ignored). Where reasoning and answer share one text, ``answer_format`` (:class:`~kava.core.rows.AnswerFormat`)
finds the answer: GSM8K's ``#### <answer>`` line, a LaTeX ``\\boxed{...}``, or a regular expression's group. GSM8K's
lines carry calculator notes such as ``<<48/2=24>>``, kept or stripped with ``strip_calculator``. Text is kept as
given (any Unicode), except that each of question, reasoning and answer loses its leading and trailing whitespace:
the prompt template owns the whitespace.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from kava.core.errors import ConfigError, DatasetError

from .rows import (
    AnswerFormat,
    ReasoningRow,
    RowProblem,
    RowSet,
    answer_format_problems,
    make_sample_id,
    row_problems,
    strip_calculator_notes,
)
from .synthetic import SYNTHETIC_DEFAULT_SIZE, Difficulty, difficulty_details, difficulty_problems, synthetic_rows


def _as_text(value: Any) -> str:
    """A field value as text: None → "", numbers → their str()."""
    if value is None:
        return ""
    return value if isinstance(value, str) else str(value)


GSM8K_FORMAT = AnswerFormat("gsm8k")
"""GSM8K's answer rule: the reasoning lines, then ``#### <answer>``."""


def _make_row(
    sample_id: str,
    question: Any,
    answer: Any,
    *,
    reasoning: Any = None,
    strip_calculator: bool,
    answer_format: AnswerFormat = GSM8K_FORMAT,
) -> ReasoningRow | RowProblem:
    """Build a row from raw fields; a RowProblem instead when it can't be used.

    With ``reasoning=None`` the answer text holds reasoning and answer, split by ``answer_format``, unless it is a
    number (JSON ``42``), which is the answer itself with no reasoning; otherwise the answer field holds the answer
    alone (as it is for gsm8k, what the rule finds for boxed and regex).
    """
    bare = isinstance(answer, (int, float)) and not isinstance(answer, bool)
    if reasoning is None and bare:
        reasoning = ""  # a bare number ({"answer": 42}) is the final answer, without reasoning
    question, answer = _as_text(question).strip(), _as_text(answer)
    found: str | tuple[str, str] | None
    if reasoning is None:
        found = answer_format.split(answer)
    else:
        found = answer.strip() if bare else answer_format.answer(answer)
    if found is None:
        return RowProblem(sample_id, f"empty question; {answer_format.missing()}" if not question
                          else answer_format.missing())
    if isinstance(found, tuple):
        reasoning, answer = found
    else:
        reasoning, answer = _as_text(reasoning).strip(), found
    if strip_calculator:
        reasoning = strip_calculator_notes(reasoning)
    row = ReasoningRow(sample_id, question, reasoning, answer)
    problems = row_problems(row)
    return RowProblem(sample_id, "; ".join(problems)) if problems else row


def _conversation(turns: Any) -> tuple[str, str] | str:
    """(question, assistant text) of a ``messages`` value, or why it can't be used.

    Expected: a list of ``{"role", "content"}`` turns with one ``user`` turn, then one ``assistant`` turn; ``system``
    turns are ignored (the chat template's own system prompt, or ``--system-prompt``, takes their place).
    """
    if not isinstance(turns, (list, tuple)) or not all(isinstance(t, Mapping) for t in turns):
        return f"expected the messages to be a list of {{role, content}} turns, got {type(turns).__name__}"
    kept = [t for t in turns if t.get("role") != "system"]
    roles = [t.get("role") for t in kept]
    if roles != ["user", "assistant"]:
        return (f"expected one user turn, then one assistant turn (system turns are ignored), got roles "
                f"{[t.get('role') for t in turns]}")
    user, assistant = (t.get("content") for t in kept)
    if not isinstance(user, str) or not isinstance(assistant, str):
        return "expected each turn's content to be text"
    return user, assistant


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
    _check_fields(str(path), fields, available)
    if path.suffix in _PARQUET_SUFFIXES:
        yield from pq.read_table(path, columns=list(fields)).to_pylist()
    else:
        yield from _jsonl_records(path)


def _check_fields(where: str, fields: Sequence[str], available: Sequence[str]) -> None:
    """Raise ConfigError naming the fields ``where`` has when one of ``fields`` is not among them."""
    missing = [f for f in fields if f not in available]
    if not missing:
        return
    hint = " Rows of {role, content} turns: pass --messages-field messages." if "messages" in available else ""
    raise ConfigError(
        f"Expected field(s) {missing} in {where}. It has fields {list(available)}. Name the right ones with "
        f"--question-field / --reasoning-field / --answer-field, or --messages-field.{hint}"
    )


@dataclass(frozen=True)
class Fields:
    """Where a record keeps its row: ``question`` / ``answer`` (and ``reasoning``) fields, or one ``messages``
    field of turns; ``answer_format`` finds the answer in a text that also holds the reasoning."""

    question: str = "question"
    answer: str = "answer"
    reasoning: str | None = None
    messages: str | None = None
    answer_format: AnswerFormat = GSM8K_FORMAT

    @property
    def names(self) -> list[str]:
        """The fields every record must have."""
        if self.messages is not None:
            return [self.messages]
        return [self.question, self.answer] + ([self.reasoning] if self.reasoning is not None else [])

    def row(self, sample_id: str, record: Mapping[str, Any], *, strip_calculator: bool) -> ReasoningRow | RowProblem:
        missing = [f for f in self.names if f not in record]
        if missing:  # the first record had them (checked up front); this one does not
            return RowProblem(sample_id, f"missing field(s) {missing}")
        if self.messages is not None:
            turns = _conversation(record[self.messages])
            if isinstance(turns, str):
                return RowProblem(sample_id, turns)
            return _make_row(sample_id, turns[0], turns[1], strip_calculator=strip_calculator,
                             answer_format=self.answer_format)
        return _make_row(sample_id, record[self.question], record[self.answer],
                         reasoning=record[self.reasoning] if self.reasoning is not None else None,
                         strip_calculator=strip_calculator, answer_format=self.answer_format)


GSM8K_FIELDS = Fields()
"""GSM8K's records: ``question``, and ``answer`` with the reasoning lines and ``#### <answer>``."""


def _rows_from_records(
    records: Iterable[Mapping[str, Any]],
    *,
    prefix: str,
    split: str,
    fields: Fields,
    limit: int | None,
    strip_calculator: bool,
) -> Iterator[ReasoningRow | RowProblem]:
    for index, record in enumerate(records):
        if limit is not None and index >= limit:
            return
        yield fields.row(make_sample_id(prefix, split, index), record, strip_calculator=strip_calculator)


def file_rows(
    path: str | Path,
    *,
    question_field: str = "question",
    answer_field: str = "answer",
    reasoning_field: str | None = None,
    messages_field: str | None = None,
    answer_format: str | AnswerFormat = "gsm8k",
    split: str = "train",
    limit: int | None = None,
    strip_calculator: bool = False,
) -> RowSet:
    """Rows from a JSONL (one object a line) or Parquet file; ids ``<file stem>/<split>/<record index:06d>``.

    Without ``reasoning_field`` the answer field holds reasoning and answer, split by ``answer_format``
    (``"gsm8k"``: reasoning lines, then ``#### <answer>``; ``"boxed"``; ``"regex:PATTERN"``); with it, the reasoning
    is that field and the answer field holds the answer. With ``messages_field`` the record is one conversation
    (see :func:`_conversation`) and the other field names are not used. ``limit`` counts records read, skipped ones
    included, so ids stay record indices. A field missing from the file raises ConfigError listing the file's
    fields; one missing from a later record only skips that record.
    """
    path = Path(path)
    fields = _fields(question_field, answer_field, reasoning_field, messages_field, answer_format)
    built = _rows_from_records(_records(path, fields.names), prefix=path.stem, split=split, fields=fields,
                               limit=limit, strip_calculator=strip_calculator)
    return _collect(str(path), built)


def _fields(question: str, answer: str, reasoning: str | None, messages: str | None,
            answer_format: str | AnswerFormat) -> Fields:
    fmt = answer_format if isinstance(answer_format, AnswerFormat) else AnswerFormat(answer_format)
    if messages is not None and reasoning is not None:
        raise ConfigError("Can't set both --messages-field and --reasoning-field (the assistant turn holds the "
                          "reasoning). Choose one.")
    return Fields(question, answer, reasoning, messages, fmt)


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
        records: Iterable[Mapping[str, Any]] = (r for p in paths for r in _records(p, GSM8K_FIELDS.names))
    else:
        records = _hub_records(GSM8K_HUB_ID, GSM8K_CONFIG, split, limit, GSM8K_FIELDS.names)
    built = _rows_from_records(records, prefix="gsm8k", split=split, fields=GSM8K_FIELDS, limit=limit,
                               strip_calculator=strip_calculator)
    return _collect(f"gsm8k/{split}", built)


def _hub_records(dataset_id: str, config: str | None, split: str, limit: int | None,
                 fields: Sequence[str]) -> list[dict[str, Any]]:
    """The records of ``datasets.load_dataset(dataset_id, config, split=split)`` (first ``limit``), with only
    ``fields``; offline and not cached, a DatasetError that says to pass local files."""
    import datasets  # noqa: PLC0415 - the hub path only; ~1 s to import

    named = f"{dataset_id!r}" + (f" (config {config!r}, split {split!r})" if config else f" (split {split!r})")
    try:
        dataset = datasets.load_dataset(dataset_id, config, split=split)
    except (OSError, ValueError) as e:  # ConnectionError / DatasetNotFoundError offline; ValueError for a bad split
        offline = bool(datasets.config.HF_DATASETS_OFFLINE)
        why = (
            "is not cached and HF_DATASETS_OFFLINE=1 forbids downloading it"
            if offline and isinstance(e, OSError)
            else f"could not be loaded ({type(e).__name__}: {e})"
        )
        fix = ("Pass --data-files with local GSM8K JSONL or Parquet files (fields 'question' and 'answer')."
               if dataset_id == GSM8K_HUB_ID else "Pass a local JSONL or Parquet file as --dataset.")
        raise DatasetError(f"The hub dataset {named} {why}. {fix}") from e
    _check_fields(f"the dataset {named}", fields, list(dataset.column_names))
    if limit is not None:
        dataset = dataset.select(range(min(limit, len(dataset))))
    return [{f: r[f] for f in fields} for r in dataset]


def hub_rows(
    dataset_id: str,
    *,
    config: str | None = None,
    split: str = "train",
    limit: int | None = None,
    question_field: str = "question",
    answer_field: str = "answer",
    reasoning_field: str | None = None,
    messages_field: str | None = None,
    answer_format: str | AnswerFormat = "gsm8k",
    strip_calculator: bool = False,
) -> RowSet:
    """Rows of any dataset ``datasets.load_dataset`` opens offline (a hub id in the local cache, or a local folder of
    JSON/Parquet/CSV files), read through the same fields as :func:`file_rows`; ids ``<name>/<split>/<index:06d>``
    with ``name`` the id's last part."""
    fields = _fields(question_field, answer_field, reasoning_field, messages_field, answer_format)
    records = _hub_records(dataset_id, config, split, limit, fields.names)
    prefix = dataset_id.rstrip("/").rsplit("/", 1)[-1] or "dataset"
    built = _rows_from_records(records, prefix=prefix, split=split, fields=fields, limit=limit,
                               strip_calculator=strip_calculator)
    return _collect(f"{dataset_id}/{split}", built)


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def is_hub_id(dataset: str) -> bool:
    """Whether ``dataset`` reads as a datasets id (``owner/name``) rather than a file that is missing."""
    return bool(_HUB_ID.match(dataset)) and not dataset.endswith(_JSONL_SUFFIXES + _PARQUET_SUFFIXES)


def load_rows(
    dataset: str,
    *,
    split: str = "train",
    limit: int | None = None,
    data_files: DataFiles | None = None,
    question_field: str = "question",
    answer_field: str = "answer",
    reasoning_field: str | None = None,
    messages_field: str | None = None,
    answer_format: str = "gsm8k",
    dataset_config: str | None = None,
    seed: int = 0,
    strip_calculator: bool = False,
    difficulty: str | Difficulty = "default",
) -> RowSet:
    """Rows of ``dataset``: ``"synthetic"`` | ``"gsm8k"`` (or ``"openai/gsm8k"``) | a JSONL/Parquet path | any other
    datasets id or local folder (through ``datasets.load_dataset``, with ``dataset_config``).

    ``synthetic`` makes ``limit`` rows (``SYNTHETIC_DEFAULT_SIZE[split]`` without one) from ``seed`` at
    ``difficulty`` (a preset name or ``steps=1-2,ops=+-,start=2-9,operand=1-9``; see ``Difficulty.parse``);
    ``data_files`` is for ``gsm8k`` only; the field options and ``answer_format`` are for paths and datasets ids.
    """
    if dataset == "synthetic":
        if data_files is not None:
            raise ConfigError("Can't set --data-files with --dataset synthetic. Choose one.")
        n = SYNTHETIC_DEFAULT_SIZE.get(split, 0) if limit is None else limit  # synthetic_rows checks the split
        return synthetic_rows(n, seed=seed, split=split, strip_calculator=strip_calculator, difficulty=difficulty)
    if dataset in ("gsm8k", GSM8K_HUB_ID):
        return gsm8k_rows(split, data_files, limit, strip_calculator=strip_calculator)
    fields: dict[str, Any] = dict(question_field=question_field, answer_field=answer_field,
                                  reasoning_field=reasoning_field, messages_field=messages_field,
                                  answer_format=answer_format)
    if data_files is not None:
        raise ConfigError(f"--data-files is for --dataset gsm8k. Got --dataset {dataset!r}: name the file as "
                          "--dataset instead.")
    if Path(dataset).is_file():
        return file_rows(dataset, split=split, limit=limit, strip_calculator=strip_calculator, **fields)
    if Path(dataset).is_dir() or is_hub_id(dataset):
        return hub_rows(dataset, config=dataset_config, split=split, limit=limit, strip_calculator=strip_calculator,
                        **fields)
    raise ConfigError(
        f"Expected --dataset to be 'synthetic', 'gsm8k', a JSONL/Parquet file, a folder or a datasets id "
        f"(owner/name). Got {dataset!r} instead, which is none of these."
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
    dataset_config: str | None = None
    """The configuration of a datasets id (its second argument to datasets.load_dataset)."""
    question_field: str = "question"
    """Field holding the question (files and datasets ids)."""
    reasoning_field: str | None = None
    """Field holding the reasoning, when it is not in the answer field (files and datasets ids)."""
    answer_field: str = "answer"
    """Field holding the reasoning and the answer (see --answer-format), or the answer alone with --reasoning-field
    (files and datasets ids)."""
    messages_field: str | None = None
    """Field holding a conversation instead: a list of {role, content} turns, the user's the question, the
    assistant's the reasoning and the answer (files and datasets ids)."""
    answer_format: str = "gsm8k"
    """How the answer is found in its text: gsm8k (a last line '#### N'), boxed (the last LaTeX \\boxed{...}), or
    regex:PATTERN (the last match; its one group is the answer, the text before it the reasoning)."""
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
        p += answer_format_problems(self.answer_format)
        if self.messages_field is not None and self.reasoning_field is not None:
            p.append("Can't set both --messages-field and --reasoning-field (the assistant turn holds the "
                     "reasoning). Choose one.")
        return p

    def details(self) -> dict[str, Any]:
        """What the store records of the source besides its name and split (the keys stores have always used)."""
        return {"limit": self.limit, "seed": self.data_seed, "strip_calculator": self.strip_calculator,
                **difficulty_details(self.dataset, self.difficulty), **self._field_details()}

    def _field_details(self) -> dict[str, Any]:
        """The field and answer options that differ from their defaults (stores without them read them so)."""
        defaults = DataSource()
        keys = ("dataset_config", "question_field", "reasoning_field", "answer_field", "messages_field",
                "answer_format")
        return {k: getattr(self, k) for k in keys if getattr(self, k) != getattr(defaults, k)}

    def load(self) -> RowSet:
        """The rows, through :func:`load_rows`."""
        return load_rows(self.dataset, split=self.split, limit=self.limit, data_files=self.data_files,
                         question_field=self.question_field, answer_field=self.answer_field,
                         reasoning_field=self.reasoning_field, messages_field=self.messages_field,
                         answer_format=self.answer_format, dataset_config=self.dataset_config, seed=self.data_seed,
                         strip_calculator=self.strip_calculator, difficulty=self.difficulty)
