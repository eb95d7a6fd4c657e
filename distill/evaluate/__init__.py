"""`kava eval`: greedy generation on a reasoning split, answers read from a terminated ``#### <number>``, accuracy.

Evaluation is a stage of its own, in modules by concern:

- ``answers``: reading, normalising and matching a final answer; cutting a text after it.
- ``cache``: greedy generation whose attention reads only a bounded cache, sinks plus a window (``--cache``).
- ``generate``: the prompt a row gives the model, the stop rule (``AnswerStop``), batched greedy generation.
- ``nll``: the teacher-forced NLL of each row's own reasoning and answer (``kava eval --nll``).
- ``score``: generate and credit every row (``evaluate``), into ``EvalItem`` records and an ``EvalResult``.
- ``stage``: the command's config (``EvalConfig``), its template (``resolve_template``) and recipe (``run_eval``).

Only a terminated answer is credited (``extract_answer``): ``#### 12`` that runs on (``#### 122-92=``) or is cut by
--max-new-tokens scores nothing. Models learn to stop because every sample they are trained on ends with the
template's terminator and the tokenizer's EOS (``kava.extract.templates``, ``kava.extract.grid``).

``kava --help`` imports this package (for ``EvalConfig``), so torch, transformers (and the modules that import them)
and tqdm are imported inside the functions that run a model.
"""

from __future__ import annotations

from .answers import answer_pattern, answers_match, cut_after_answer, extract_answer
from .cache import CacheBound, generate_bounded
from .generate import STOPS, AnswerStop, eos_ids, generate_batched, generate_with_stops, prompt_text
from .nll import ItemNLL, reference_nll, reference_nll_items
from .score import TRUNCATION_LIMIT, EvalItem, EvalResult, evaluate, truncation_note
from .stage import EvalConfig, resolve_template, run_eval

__all__ = [
    "STOPS", "TRUNCATION_LIMIT", "AnswerStop", "CacheBound", "EvalConfig", "EvalItem", "EvalResult", "ItemNLL",
    "answer_pattern", "answers_match", "cut_after_answer", "eos_ids", "evaluate", "extract_answer",
    "generate_batched", "generate_bounded", "generate_with_stops", "prompt_text", "reference_nll",
    "reference_nll_items", "resolve_template", "run_eval", "truncation_note",
]
