"""Scoring a latent student (or its CoT / no-CoT baselines): greedy answers, accuracy, the reference answer's NLL,
tokens generated and seconds per problem.

- ``latent``: question → ``M`` latents (``T`` Jacobi iterations) → greedy answer.
- ``cot``: question → greedy CoT and answer (the tokens generated count the CoT).
- ``direct``: question → greedy answer.

The answer is read from ``The answer is: N`` (the first such line); ``answer_nll`` is the mean NLL per token of the
reference answer (prefix, number and EOS) given the question and what the mode puts before the answer: the
latents, the reference CoT (teacher-forced), or nothing.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch

from kava.core.errors import ConfigError
from kava.core.rows import ReasoningRow, strip_calculator_notes
from kava.distill.evaluate.answers import answers_match
from kava.distill.evaluate.score import EvalItem, EvalResult
from kava.distill.evaluate.stage import EvalConfig

from .data import ANSWER_PREFIX, Encoder, LatentRow
from .losses import answer_ce
from .model import LatentReasoner
from .objective import Mode

_ANSWER = re.compile(re.escape(ANSWER_PREFIX) + r"\s*(-?[\d,]*\.?\d+)")


def read_answer(text: str) -> str | None:
    """``N`` of the first ``The answer is: N`` in ``text``, thousands commas removed; None when there is none."""
    match = _ANSWER.search(text)
    return match.group(1).replace(",", "") if match else None


@dataclass
class LatentEval:
    """A scored split: accuracy, mean reference-answer NLL per token, mean tokens generated, seconds per problem."""

    n: int
    correct: int
    accuracy: float
    answer_nll: float
    generated_tokens: float
    seconds_per_problem: float
    items: list[dict[str, Any]]

    def summary(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if k != "items"}


@torch.no_grad()
def _generate_text(model: Any, encoder: Encoder, rows: Sequence[LatentRow], max_new_tokens: int) -> list[list[int]]:
    """Greedy continuations of the left-padded questions, each cut after its first EOS."""
    ids, mask = encoder.prompts(rows)
    out = model.generate(
        input_ids=ids,
        attention_mask=mask,
        max_new_tokens=max_new_tokens,
        do_sample=False,
        eos_token_id=encoder.eos,
        pad_token_id=encoder.pad,
    )
    tokens = []
    for row in out[:, ids.shape[1] :].tolist():
        tokens.append(row[: row.index(encoder.eos) + 1] if encoder.eos in row else row)
    return tokens


@torch.no_grad()
def _answer_nll(reasoner: LatentReasoner, encoder: Encoder, rows: Sequence[LatentRow], mode: Mode) -> float:
    """Mean NLL per token of the reference answers (``LatentBatch.answer_ids``) in ``mode``."""
    batch = encoder.batch(rows, with_cot=mode == "cot")
    if mode == "latent":
        logits = reasoner(batch.question_ids, batch.question_mask, batch.answer_ids, batch.answer_mask).logits
        return float(answer_ce(logits, batch.answer_ids, batch.answer_mask))
    out = reasoner.model(input_ids=batch.teacher_ids, attention_mask=batch.teacher_mask, use_cache=False)
    answer = batch.window  # [B, T] the answer's tokens: each predicted from the token before it
    target = torch.where(answer, batch.teacher_ids, torch.full_like(batch.teacher_ids, -100))
    logits = out.logits[:, :-1].float()
    nll = torch.nn.functional.cross_entropy(logits.flatten(0, 1), target[:, 1:].flatten(), ignore_index=-100)
    return float(nll)


def evaluate_latent(
    reasoner: LatentReasoner,
    encoder: Encoder,
    rows: Sequence[LatentRow],
    *,
    mode: Mode,
    batch_size: int = 64,
    max_new_tokens: int = 64,
) -> LatentEval:
    """Greedy-decode every row in ``mode`` and score it (the model is put in eval mode, then back)."""
    was_training = reasoner.training
    reasoner.eval()
    items: list[dict[str, Any]] = []
    nll_sum, seconds = 0.0, 0.0
    try:
        for start in range(0, len(rows), batch_size):
            chunk = rows[start : start + batch_size]
            began = time.perf_counter()
            if mode == "latent":
                ids, mask = encoder.prompts(chunk)
                tokens = reasoner.generate(ids, mask, max_new_tokens=max_new_tokens, eos=[encoder.eos])
            else:
                tokens = _generate_text(reasoner.model, encoder, chunk, max_new_tokens)
            seconds += time.perf_counter() - began
            nll_sum += _answer_nll(reasoner, encoder, chunk, mode) * len(chunk)
            for row, generated in zip(chunk, tokens):
                text = encoder.tokenizer.decode(generated, skip_special_tokens=True)
                predicted = read_answer(text)
                ended = bool(generated) and generated[-1] == encoder.eos
                items.append(
                    {
                        "sample_id": row.sample_id,
                        "question": row.question,
                        "generated": text,
                        "tokens": len(generated),
                        "predicted": predicted,
                        "gold": row.answer,
                        "correct": answers_match(predicted, row.answer),
                        "stop": "eos" if ended else "budget",
                    }
                )
    finally:
        reasoner.train(was_training)
    n = len(items)
    correct = sum(item["correct"] for item in items)
    return LatentEval(
        n=n,
        correct=correct,
        accuracy=correct / max(n, 1),
        answer_nll=nll_sum / max(n, 1),
        generated_tokens=sum(item["tokens"] for item in items) / max(n, 1),
        seconds_per_problem=seconds / max(n, 1),
        items=items,
    )


def latent_rows(rows: Iterable[ReasoningRow]) -> list[LatentRow]:
    """Rows of any source (``DataSource.load()``) as latent rows: the reasoning, calculator notes removed, as the CoT;
    the answer without thousands commas."""
    return [
        LatentRow(r.sample_id, r.question, strip_calculator_notes(r.reasoning), r.answer.replace(",", "")) for r in rows
    ]


def run_latent_eval(config: EvalConfig, rows: Iterable[ReasoningRow]) -> EvalResult:
    """`kava eval` on a directory written by `kava latent`: score ``rows`` in the student's mode, write one JSONL
    line per item to ``config.out_path``, return the summary (``reference_nll``: the answer's NLL per token, with
    --nll)."""
    from .checkpoint import load_latent  # noqa: PLC0415 - loads the model modules only when a latent model is scored

    if config.cache is not None:
        raise ConfigError(
            f"--cache: a bounded cache is for token-by-token models. Got {config.model}, a latent "
            "student (`kava latent`). Drop --cache."
        )
    reasoner, tokenizer, mode = load_latent(config.model)
    reasoner.to(config.device or "cpu")
    scored = evaluate_latent(
        reasoner,
        Encoder(tokenizer),
        latent_rows(rows),
        mode=mode,
        batch_size=config.batch_size,
        max_new_tokens=config.max_new_tokens,
    )
    items = [
        EvalItem(
            sample_id=i["sample_id"],
            question=i["question"],
            prompt=i["question"],
            generated=i["generated"],
            predicted=i["predicted"],
            gold=i["gold"],
            correct=i["correct"],
            generated_tokens=i["tokens"],
            stop=i["stop"],
        )
        for i in scored.items
    ]
    out = config.out_path
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("".join(json.dumps(asdict(item), ensure_ascii=False) + "\n" for item in items), encoding="utf-8")
    seconds = scored.seconds_per_problem * scored.n
    tokens = sum(item.generated_tokens for item in items)
    return EvalResult(
        accuracy=scored.accuracy,
        n=scored.n,
        correct=scored.correct,
        dataset=config.data.dataset,
        split=config.data.split,
        model=config.model,
        template=f"latent:{mode}",
        seconds=seconds,
        generated_tokens=tokens,
        tokens_per_second=tokens / seconds if seconds else 0.0,
        out=str(out),
        reference_nll=scored.answer_nll if config.nll else None,
        max_new_tokens=config.max_new_tokens,
        budget_stops=sum(item.stop == "budget" for item in items),
        items=items,
    )
