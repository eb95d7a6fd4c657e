"""Rows for latent reasoning and their batches: a synthetic task that needs its chain of thought, GSM8K with its
reasoning as the CoT, and the two layouts one batch feeds (teacher mode and student mode).

A ``LatentRow`` is a question, its chain of thought and its answer. Both modes write the answer the same way,
``"The answer is: N"`` and EOS, so the token right before ``N`` (the ``:``) is the same token in both: the one whose
hidden states the CODI term matches.

- Teacher mode reads ``question · CoT · answer`` (right-padded): the CoT cross-entropy, and the K/V and hidden states
  the student is distilled towards.
- Student mode reads ``question`` (left-padded), ``M`` latents, then ``answer`` (right-padded).

The synthetic task (``chain_rows``) is digit arithmetic mod 10 evaluated left to right, ``4*7+3*9+8``, with one CoT
line per step (``4*7=8``, ``8+3=1``, ...). Mixing ``+`` and ``*`` leaves no shortcut: the answer is a composition of
``k`` table look-ups, each on the previous result, which a small model writes out step by step easily and computes
in one forward pass hardly at all.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from kava.core.errors import ConfigError, DatasetError
from kava.core.rows import parse_gsm8k_answer, strip_calculator_notes

ANSWER_PREFIX = "The answer is:"
"""What every answer starts with; its last token is the CODI position."""
SPLITS = ("train", "validation", "test")


@dataclass(frozen=True)
class LatentRow:
    """One problem: the question, its chain of thought (lines joined by newlines) and the final answer."""

    sample_id: str
    question: str
    cot: str
    answer: str

    @property
    def answer_text(self) -> str:
        return f"{ANSWER_PREFIX} {self.answer}"


# ---------------------------------------------------------------------------------------------------------------------
# Rows


def _split_of(question: str) -> str:
    return SPLITS[hashlib.sha256(question.encode()).digest()[0] % len(SPLITS)]


def chain_rows(n: int, *, steps: int = 4, seed: int = 0, split: str = "train") -> list[LatentRow]:
    """``n`` distinct seeded problems of ``steps`` operations (``+`` or ``*`` by a digit 1-9, mod 10, left to right)
    on a start digit 1-9. A question belongs to the split its sha256 picks, so splits never share one."""
    if split not in SPLITS:
        raise ConfigError(f"--split: expected one of {', '.join(SPLITS)}. Got {split!r} instead.")
    if steps < 1 or n < 0:
        raise ConfigError(f"--chain-steps: expected >= 1 (and a row count >= 0). Got steps={steps}, n={n} instead.")
    capacity = 9 * 18**steps // len(SPLITS)
    if n > capacity // 2:
        raise ConfigError(
            f"Expected at most {capacity // 2} rows of {steps}-step problems per split. Got {n}. "
            "Raise --chain-steps or ask for fewer rows."
        )
    rng = random.Random(f"kava-latent-chain/{seed}/{split}/{steps}")
    rows: list[LatentRow] = []
    seen: set[str] = set()
    while len(rows) < n:
        value = rng.randint(1, 9)
        question, lines = str(value), []
        for _ in range(steps):
            op, operand = rng.choice("+*"), rng.randint(1, 9)
            result = (value + operand if op == "+" else value * operand) % 10
            question += f"{op}{operand}"
            lines.append(f"{value}{op}{operand}={result}")
            value = result
        if question in seen or _split_of(question) != split:
            continue
        seen.add(question)
        rows.append(LatentRow(f"chain{steps}/{split}/{len(rows):06d}", question, "\n".join(lines), str(value)))
    return rows


def gsm8k_rows(path: str | Path, *, limit: int | None = None, split: str = "train") -> list[LatentRow]:
    """GSM8K rows from a JSONL file (``question``, ``answer`` with ``#### N``): the reasoning lines with their
    calculator notes removed, as CODI trains on them, are the CoT; ``N`` without thousands commas is the answer.
    Rows without a ``#### N`` line are skipped."""
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"Expected a GSM8K JSONL file. Got {str(path)!r}, which does not exist. Pass --data-files.")
    rows: list[LatentRow] = []
    with path.open(encoding="utf-8") as f:
        for index, line in enumerate(f):
            if limit is not None and len(rows) >= limit:
                break
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                parsed = parse_gsm8k_answer(record["answer"])
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise DatasetError(
                    f"Expected JSON objects with 'question' and 'answer' in {path}. Got line "
                    f"{index + 1} unreadable ({e})."
                ) from e
            if parsed is None:
                continue
            reasoning, answer = parsed
            rows.append(
                LatentRow(
                    f"gsm8k/{split}/{index:06d}",
                    record["question"].strip(),
                    strip_calculator_notes(reasoning),
                    answer.replace(",", ""),
                )
            )
    return rows


# ---------------------------------------------------------------------------------------------------------------------
# Batches


@dataclass
class LatentBatch:
    """One batch in both layouts. ``B`` rows; ``-100`` marks what no loss reads.

    Teacher mode (right-padded, ``[B, T]``): ``teacher_ids``, ``teacher_mask``, ``teacher_labels`` (the CoT's and
    the answer's tokens, EOS included, else -100), ``cot`` (bool, the CoT tokens: what R-KV compresses),
    ``window`` (bool, the answer's tokens: R-KV's observation window), ``teacher_codi`` ``[B]`` the index of the
    answer prefix's last token. Without a CoT (``with_cot=False``) the CoT is empty.

    Student mode: ``question_ids``/``question_mask`` ``[B, Q]`` left-padded; ``answer_ids``/``answer_mask``
    ``[B, A]`` right-padded (answer and EOS); ``student_codi`` ``[B]`` the answer prefix's last token in ``answer_ids``.
    """

    teacher_ids: torch.Tensor
    teacher_mask: torch.Tensor
    teacher_labels: torch.Tensor
    cot: torch.Tensor
    window: torch.Tensor
    teacher_codi: torch.Tensor
    question_ids: torch.Tensor
    question_mask: torch.Tensor
    answer_ids: torch.Tensor
    answer_mask: torch.Tensor
    student_codi: torch.Tensor
    rows: Sequence[LatentRow]

    def to(self, device: str | torch.device) -> LatentBatch:
        moved = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in vars(self).items()}
        return LatentBatch(**moved)  # type: ignore[arg-type]  # the same fields, tensors moved


class Encoder:
    """Tokenizes rows into the pieces both modes share, each piece on its own (so a piece's tokens are the same
    in every layout): question (with the tokenizer's BOS) and newline, CoT and newline, answer prefix, `` N``,
    EOS."""

    def __init__(self, tokenizer: Any, *, max_cot_tokens: int | None = None) -> None:
        if tokenizer.eos_token_id is None:
            raise ConfigError("Expected the tokenizer to name an EOS token. Got none. Use a tokenizer with one.")
        self.tokenizer = tokenizer
        self.eos = int(tokenizer.eos_token_id)
        self.pad = int(tokenizer.pad_token_id) if tokenizer.pad_token_id is not None else self.eos
        self.prefix = self._ids(ANSWER_PREFIX)
        self.max_cot_tokens = max_cot_tokens

    def _ids(self, text: str, special: bool = False) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=special)["input_ids"])

    def question(self, row: LatentRow) -> list[int]:
        return self._ids(row.question + "\n", special=True)

    def cot(self, row: LatentRow) -> list[int]:
        ids = self._ids(row.cot + "\n") if row.cot else []
        return ids[: self.max_cot_tokens] if self.max_cot_tokens is not None else ids

    def answer(self, row: LatentRow) -> list[int]:
        return self.prefix + self._ids(" " + row.answer) + [self.eos]

    def batch(self, rows: Sequence[LatentRow], *, with_cot: bool = True) -> LatentBatch:
        """Both layouts of ``rows``."""
        questions = [self.question(r) for r in rows]
        cots = [self.cot(r) if with_cot else [] for r in rows]
        answers = [self.answer(r) for r in rows]
        b = len(rows)
        t = max(len(q) + len(c) + len(a) for q, c, a in zip(questions, cots, answers))
        teacher_ids = torch.full((b, t), self.pad, dtype=torch.long)
        teacher_mask = torch.zeros(b, t, dtype=torch.long)
        labels = torch.full((b, t), -100, dtype=torch.long)
        cot = torch.zeros(b, t, dtype=torch.bool)
        window = torch.zeros(b, t, dtype=torch.bool)
        teacher_codi = torch.zeros(b, dtype=torch.long)
        width_q, width_a = max(map(len, questions)), max(map(len, answers))
        question_ids = torch.full((b, width_q), self.pad, dtype=torch.long)
        question_mask = torch.zeros(b, width_q, dtype=torch.long)
        answer_ids = torch.full((b, width_a), self.pad, dtype=torch.long)
        answer_mask = torch.zeros(b, width_a, dtype=torch.long)
        for i, (q, c, a) in enumerate(zip(questions, cots, answers)):
            n_q, n_c, n_a = len(q), len(c), len(a)
            teacher_ids[i, : n_q + n_c + n_a] = torch.tensor(q + c + a)
            teacher_mask[i, : n_q + n_c + n_a] = 1
            labels[i, n_q : n_q + n_c + n_a] = torch.tensor(c + a)
            cot[i, n_q : n_q + n_c] = True
            window[i, n_q + n_c : n_q + n_c + n_a] = True
            teacher_codi[i] = n_q + n_c + len(self.prefix) - 1
            question_ids[i, width_q - n_q :] = torch.tensor(q)
            question_mask[i, width_q - n_q :] = 1
            answer_ids[i, :n_a] = torch.tensor(a)
            answer_mask[i, :n_a] = 1
        student_codi = torch.full((b,), len(self.prefix) - 1, dtype=torch.long)
        return LatentBatch(
            teacher_ids,
            teacher_mask,
            labels,
            cot,
            window,
            teacher_codi,
            question_ids,
            question_mask,
            answer_ids,
            answer_mask,
            student_codi,
            rows,
        )

    def prompts(self, rows: Sequence[LatentRow]) -> tuple[torch.Tensor, torch.Tensor]:
        """Left-padded questions ``[B, Q]`` and their mask, for generation."""
        questions = [self.question(r) for r in rows]
        width = max(map(len, questions))
        ids = torch.full((len(rows), width), self.pad, dtype=torch.long)
        mask = torch.zeros(len(rows), width, dtype=torch.long)
        for i, q in enumerate(questions):
            ids[i, width - len(q) :] = torch.tensor(q)
            mask[i, width - len(q) :] = 1
        return ids, mask
