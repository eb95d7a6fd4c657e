"""Scoring a model on rows: generate an answer for each (``generate``), read it (``answers``), and credit it against the
row's gold answer; the per-item records and the summary the stage writes and returns.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from kava.core.rows import ReasoningRow
from kava.extract.templates import PromptTemplate

from .answers import answers_match, extract_answer
from .cache import CacheBound
from .generate import generate_with_stops, prompt_text


@dataclass(frozen=True)
class EvalItem:
    """One scored item: what the model read, what it wrote, and whether its answer is right."""

    sample_id: str
    question: str
    prompt: str
    generated: str
    predicted: str | None
    gold: str
    correct: bool
    generated_tokens: int
    nll_nats: float | None = None
    """With --nll: the reference reasoning and answer's NLL summed over its tokens (see ``ItemNLL``)."""
    nll_tokens: int | None = None
    """With --nll: tokens scored."""
    nll_chars: int | None = None
    """With --nll: characters of the scored text (nats per character compare across tokenizers)."""
    nll_bytes: int | None = None
    """With --nll: UTF-8 bytes of the scored text."""
    stop: str = "budget"
    """Why generation stopped (``STOPS``): ``answer``, ``eos`` or ``budget``; only the first two can be correct."""


@dataclass
class EvalResult:
    """Accuracy of one model on one split, with throughput; ``items`` holds every scored item."""

    accuracy: float
    n: int
    correct: int
    dataset: str
    split: str
    model: str
    template: str
    seconds: float
    generated_tokens: int
    tokens_per_second: float
    out: str | None = None
    reference_nll: float | None = None
    """With --nll: nats per token of the reference reasoning and answer (teacher-forced; lower is better)."""
    reference_nll_per_char: float | None = None
    """With --nll: the same nats per character of the scored text (compares across tokenizers)."""
    reference_nll_per_byte: float | None = None
    """With --nll: the same nats per UTF-8 byte of the scored text."""
    nll_tokenizer: str | None = None
    """With --nll: sha256 fingerprint of the tokenizer whose tokens ``reference_nll`` counts."""
    max_new_tokens: int = 0
    """The generation budget each item had."""
    budget_stops: int = 0
    """Items cut off at ``max_new_tokens`` before an answer (counted wrong; ``truncation_note`` warns when many)."""
    longest_reference: int | None = None
    """With --nll: tokens of the longest reference reasoning and answer, a floor for ``max_new_tokens``."""
    cache: str | None = None
    """With --cache: the bounded cache generation read (``sinks=S,window=W``); None: the model's full cache."""
    items: list[EvalItem] = field(default_factory=list, repr=False)

    def truncation_note(self) -> str | None:
        """``truncation_note`` of this result."""
        return truncation_note(self.budget_stops, self.n, self.max_new_tokens, self.longest_reference)

    def to_dict(self) -> dict[str, Any]:
        """The summary as JSON-ready values (what ``kava eval --json`` prints); the items are in the JSONL."""
        return {k: v for k, v in asdict(self).items() if k != "items"}


TRUNCATION_LIMIT = 0.05
"""Above this share of generations cut off at the budget, accuracy counts the budget more than the model."""


def truncation_note(budget_stops: int, n: int, max_new_tokens: int, longest_reference: int | None = None, *,
                    option: str = "--max-new-tokens") -> str | None:
    """A warning when more than ``TRUNCATION_LIMIT`` of ``n`` generations stopped at the ``max_new_tokens`` budget
    before an answer (they count as wrong), naming ``option`` as the fix; None otherwise."""
    if n <= 0 or budget_stops <= TRUNCATION_LIMIT * n:
        return None
    longest = (f" (the longest reference solution is {longest_reference} tokens)"
               if longest_reference is not None else "")
    return (f"{budget_stops} of {n} generations ({100 * budget_stops / n:.0f}%) stopped at the {max_new_tokens}-token "
            f"budget before an answer and count as wrong{longest}: the accuracy measures the budget as much as the "
            f"model. Raise {option}.")


def evaluate(model: Any, tokenizer: Any, rows: Sequence[ReasoningRow], template: PromptTemplate, *, batch_size: int,
             max_new_tokens: int, progress: bool = False, cache: CacheBound | None = None) -> EvalResult:
    """Generate an answer for every row and score it against the row's answer.

    Args:
        model: a causal LM in eval mode.
        tokenizer: its tokenizer.
        rows: ``[N]`` rows (a ``RowSet`` or any sequence); the gold answer is each row's ``answer``.
        template: the template the model was trained with (``prompt_text`` builds each prompt from it).
        batch_size, max_new_tokens: as in ``generate_batched``.
        progress: show a progress bar (samples, tokens/s) on stderr.
        cache: generate with attention reading only this bounded cache (``cache.generate_bounded``); default: the
            model's full cache.

    Returns:
        The summary with ``items`` (``[N]``, in the rows' order). ``dataset`` is the rows' name when they are a
        ``RowSet``; ``split`` and ``out`` are left for the caller.
    """
    from tqdm import tqdm  # noqa: PLC0415 - light, but kept off `kava --help` (package docstring)

    name, rows = getattr(rows, "name", ""), list(rows)
    prompts = [prompt_text(row, template) for row in rows]
    started, tokens_so_far = time.perf_counter(), 0
    with tqdm(total=len(rows), unit="sample", file=sys.stderr, disable=not progress, dynamic_ncols=True,
              desc="eval") as bar:

        def on_batch(samples: int, tokens: int) -> None:
            nonlocal tokens_so_far
            tokens_so_far += tokens
            bar.update(samples)
            bar.set_postfix(tok_s=f"{tokens_so_far / max(time.perf_counter() - started, 1e-9):.1f}")

        generated = generate_with_stops(model, tokenizer, prompts, batch_size=batch_size,
                                        max_new_tokens=max_new_tokens, terminator=template.terminator,
                                        on_batch=on_batch, cache=cache)
    seconds = time.perf_counter() - started
    items = []
    for row, prompt, (text, tokens, stop) in zip(rows, prompts, generated):
        # Only a generation that ended by itself may end its answer at the end of its text (see extract_answer).
        predicted = extract_answer(text, ended=stop == "eos", terminator=template.terminator)
        items.append(EvalItem(row.sample_id, row.question, prompt, text, predicted, row.answer,
                              answers_match(predicted, row.answer), tokens, stop=stop))
    correct = sum(item.correct for item in items)
    total_tokens = sum(item.generated_tokens for item in items)
    return EvalResult(
        accuracy=correct / len(items) if items else 0.0,
        n=len(items),
        correct=correct,
        dataset=name,
        split="",
        model=str(getattr(model, "name_or_path", "")),
        template=template.name,
        seconds=seconds,
        generated_tokens=total_tokens,
        tokens_per_second=total_tokens / seconds if seconds > 0 else 0.0,
        max_new_tokens=max_new_tokens,
        budget_stops=sum(item.stop == "budget" for item in items),
        cache=None if cache is None else str(cache),
        items=items,
    )
