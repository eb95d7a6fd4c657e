"""One reasoning sample as every stage sees it: question, reasoning lines and answer; a dataset split of them
with the rows skipped and why; their ids and fingerprints; GSM8K's answer form.

Every source (``data.py`` for files and the hub, ``synthetic.py`` for generated problems) builds these, and the
stages that format, tokenize and evaluate rows read them; this module imports neither source.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

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


CALCULATOR_NOTE = re.compile(r"<<[^<>]*>>")
ANSWER_MARK = "####"
"""What starts a GSM8K answer line: ``#### 72``."""


def strip_calculator_notes(text: str) -> str:
    """Remove GSM8K calculator notes: ``"48/2 = <<48/2=24>>24"`` → ``"48/2 = 24"``."""
    return CALCULATOR_NOTE.sub("", text)


def parse_gsm8k_answer(text: str) -> tuple[str, str] | None:
    """Split a GSM8K answer into (reasoning, answer); None when it has no ``#### <answer>`` line.

    The reasoning is every line before the last line that starts with ``####``, the answer what follows the mark on
    that line, both stripped (``"1,080"`` stays as written). Lines after the answer line are dropped.
    """
    lines = text.split("\n")  # not splitlines(): that also splits on U+2028 etc. and would change the text
    for i in range(len(lines) - 1, -1, -1):
        if lines[i].lstrip().startswith(ANSWER_MARK):
            answer = lines[i].lstrip()[len(ANSWER_MARK) :].strip()
            return "\n".join(lines[:i]).strip(), answer
    return None


def gsm8k_answer_text(row: ReasoningRow) -> str:
    """The row's reasoning and answer in GSM8K's answer form: the lines, then ``#### <answer>``."""
    return f"{row.reasoning}\n{ANSWER_MARK} {row.answer}" if row.reasoning else f"{ANSWER_MARK} {row.answer}"


def row_problems(row: ReasoningRow) -> list[str]:
    """Why this row can't be used (empty list when it can). Empty reasoning is allowed."""
    problems = []
    if not row.question.strip():
        problems.append("empty question")
    if not row.answer.strip():
        problems.append("empty answer")
    return problems


def make_sample_id(prefix: str, split: str, index: int) -> str:
    """The id of row ``index`` of a source's split: ``"gsm8k/test/000042"``."""
    return f"{prefix}/{split}/{index:06d}"


# ---------------------------------------------------------------------------------------------------------------------
# Fingerprints


def hash_fields(fields: Iterable[str]) -> str:
    """sha256 (hex) of a sequence of strings, each length-prefixed so that ("ab", "c") and ("a", "bc") differ."""
    # Length-prefixed so that ("ab", "c") and ("a", "bc") hash differently.
    h = hashlib.sha256()
    for field in fields:
        data = field.encode("utf-8")
        h.update(len(data).to_bytes(8, "little"))
        h.update(data)
    return h.hexdigest()


def dataset_fingerprint(rows: Iterable[ReasoningRow]) -> str:
    """sha256 (hex) over every row's id, question, reasoning and answer, in order."""
    return hash_fields(f for row in rows for f in (row.sample_id, row.question, row.reasoning, row.answer))
