"""One reasoning sample as every stage sees it: question, reasoning lines and answer; a dataset split of them
with the rows skipped and why; their ids and fingerprints; GSM8K's answer form, and the rules that find an answer
in a text (``AnswerFormat``: ``#### N``, LaTeX ``\\boxed{...}``, a regular expression).

Every source (``data.py`` for files and the hub, ``synthetic.py`` for generated problems) builds these, and the
stages that format, tokenize and evaluate rows read them; this module imports neither source.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from kava.core.errors import ConfigError

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


BOXED = "\\boxed{"
"""What starts a LaTeX boxed answer: ``\\boxed{42}``."""


def parse_boxed_answer(text: str) -> tuple[str, str] | None:
    """Split a solution with a LaTeX ``\\boxed{...}`` answer into (reasoning, answer); None when it has none.

    The answer is the contents of the last ``\\boxed{...}``, nested braces included (``\\boxed{\\frac{1}{2}}`` →
    ``\\frac{1}{2}``; an escaped ``\\{`` or ``\\}`` does not count), stripped; None when its braces never close.
    The reasoning is the whole text, stripped: the boxed expression stays where the solution wrote it.
    """
    start = text.rfind(BOXED)
    if start < 0:
        return None
    depth, i = 1, start + len(BOXED)
    while i < len(text):
        c = text[i]
        if c == "\\":
            i += 2  # an escaped character (\{, \}, \\): never a brace of the box
            continue
        depth += (c == "{") - (c == "}")
        if depth == 0:
            return text.strip(), text[start + len(BOXED) : i].strip()
        i += 1
    return None


@dataclass(frozen=True)
class AnswerFormat:
    """How a row's final answer is found in its text (``--answer-format``).

    - ``gsm8k``: the reasoning lines, then ``#### <answer>`` (:func:`parse_gsm8k_answer`).
    - ``boxed``: the last LaTeX ``\\boxed{...}`` (:func:`parse_boxed_answer`); the reasoning is the whole text.
    - ``regex:PATTERN``: the last match of PATTERN (Python ``re``, exactly one capturing group): the answer is the
      group, the reasoning the text before the match.
    """

    spec: str = "gsm8k"

    def __post_init__(self) -> None:
        problems = answer_format_problems(self.spec)
        if problems:
            raise ConfigError(problems[0])

    @property
    def pattern(self) -> re.Pattern[str] | None:
        return re.compile(self.spec[len("regex:"):]) if self.spec.startswith("regex:") else None

    def split(self, text: str) -> tuple[str, str] | None:
        """(reasoning, answer) of a text holding both, both stripped; None when the answer is not found."""
        if self.spec == "gsm8k":
            return parse_gsm8k_answer(text)
        if self.spec == "boxed":
            return parse_boxed_answer(text)
        assert self.pattern is not None  # a regex: the only other kind __post_init__ lets through
        matches = list(self.pattern.finditer(text))
        if not matches:
            return None
        last = matches[-1]
        return text[: last.start()].strip(), (last.group(1) or "").strip()

    def answer(self, text: str) -> str | None:
        """The answer in a field that holds only the answer: as it is for gsm8k, else what the rule finds."""
        if self.spec == "gsm8k":
            return text.strip()
        found = self.split(text)
        return None if found is None else found[1]

    def missing(self) -> str:
        """Why a row has no answer under this format (a ``RowProblem`` reason)."""
        if self.spec == "gsm8k":
            return f"the answer has no '{ANSWER_MARK} <answer>' line"
        if self.spec == "boxed":
            return "the answer has no closed \\boxed{...}"
        return f"no match of --answer-format {self.spec}"


def answer_format_problems(spec: Any, flag: str = "--answer-format") -> list[str]:
    """What is wrong with an ``--answer-format`` value (empty when nothing is)."""
    if spec in ("gsm8k", "boxed"):
        return []
    if not isinstance(spec, str) or not spec.startswith("regex:"):
        return [f"{flag}: expected gsm8k, boxed or regex:PATTERN. Got {spec!r} instead."]
    try:
        groups = re.compile(spec[len("regex:"):]).groups
    except re.error as e:
        return [f"{flag}: expected a Python regular expression after 'regex:'. Got '{spec[6:]}', which does not "
                f"compile ({e})."]
    if groups != 1:
        return [f"{flag}: expected a regular expression with exactly one capturing group, the answer "
                f"(e.g. 'regex:answer is (\\S+)'). Got {groups} groups in '{spec[6:]}'."]
    return []


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
