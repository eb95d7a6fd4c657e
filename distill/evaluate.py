"""`kava eval`: greedy generation on a reasoning split, answers read from a terminated ``#### <number>``, accuracy.

The recipe, top to bottom (``run_eval``): validate the config, resolve the template (the one recorded with the
model by ``kava distill`` unless --template says otherwise), load the rows, load the tokenizer and model, generate in
length-sorted batches, score, write one JSONL line per item (atomically), return an :class:`EvalResult`.

Prompts are the formatted training text up to where the reasoning starts, so the model continues from exactly the
tokens it saw in training (see ``prompt_text``). Generation stops a row at EOS (or the template's terminator token,
chat's ``<|im_end|>``) or once it has written a terminated answer: ``#### <number>`` followed by a newline or the
template's terminator; the returned text is cut after that terminator. Only a terminated answer is credited
(``extract_answer``): ``#### 12`` that runs on (``#### 122-92=``) or is cut by --max-new-tokens scores nothing. Models
learn to stop because every sample they are trained on ends with the template's terminator and the tokenizer's EOS
(``kava.extract.templates``, ``kava.extract.grid``).
"""

from __future__ import annotations

import functools
import json
import os
import re
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from decimal import Decimal
from pathlib import Path
from typing import Any, ClassVar

from kava.core.config import config_from_dict, config_to_dict
from kava.core.data import DataSource
from kava.core.rows import ReasoningRow
from kava.core.synthetic import SYNTHETIC_SPLITS, Difficulty
from kava.extract.templates import TEMPLATES, PromptTemplate, format_row, load_template
from kava.core.errors import ConfigError, DatasetError

# ---------------------------------------------------------------------------------------------------------------------
# Answers

# A number as GSM8K and models write it: optional sign (not a minus between two operands: "5-3"), optional "$",
# thousands groups ("1,234") or plain digits, optional decimals. A trailing "." ("5.") is not part of it.
_NUMBER = (
    r"(?:(?<![\w)\]])(?P<sign>[-\u2212]))?\$?"
    r"(?<![\d.])(?P<int>\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?:\.(?P<frac>\d+))?"
)
_NUMBER_RE = re.compile(_NUMBER)
_MARKED_RE = re.compile(r"####[ \t]*" + _NUMBER)


@functools.lru_cache(maxsize=64)
def answer_pattern(terminator: str, *, ended: bool) -> re.Pattern[str]:
    """A terminated answer: the mark, a number, spaces or tabs, then a newline, ``terminator`` (when not empty), or
    — only for a text that ended (``ended``) — the end of the text. Group ``end`` is where the terminator ends."""
    ends = [r"\n"] + ([re.escape(terminator)] if terminator else []) + ([r"\Z"] if ended else [])
    return re.compile(r"####[ \t]*" + _NUMBER + r"[ \t]*(?:" + "|".join(ends) + r")(?P<end>)")


def _normalise(match: re.Match[str]) -> str:
    value = Decimal(match["int"].replace(",", "") + ("." + match["frac"] if match["frac"] else ""))
    value = -value if match["sign"] else value
    if value == value.to_integral_value():
        return str(int(value))  # also turns "-0" and "0.00" into "0"
    return format(value.normalize(), "f")  # 2.50 → 2.5


def extract_answer(text: str, *, ended: bool = True, terminator: str = "") -> str | None:
    """The final answer a text gives, normalised (``"1,234"`` → ``"1234"``, ``"$2.50"`` → ``"2.5"``, ``"-3"``); None
    when it gives none.

    Only a terminated answer counts, so a number a model runs on with is never credited:

    - A ``####`` mark followed by a number gives an answer only when the number is terminated: followed (after
      spaces or tabs) by a newline, by ``terminator`` (the template's, e.g. ``<|im_end|>``), or by the end of the
      text when ``ended``. The first terminated one is the answer. ``"#### 12\n"`` gives 12; ``"#### 122-92="``
      gives None even for gold 12 (its number is 122 and runs on into ``-``); ``"#### 12 marbles"`` gives None.
    - A text with no ``####`` number at all gives its last number, only when ``ended`` (a text cut short may be cut
      inside that number).

    Args:
        text: a reference answer, or a model's generation (without its EOS token).
        ended: the text is whole: a reference answer, or a generation that stopped by writing EOS (or the template's
            terminator token). False for a generation cut by the token budget: then ``"#### 12"`` at the very end
            is not an answer (the next token might have been another digit).
        terminator: the template's ``PromptTemplate.terminator``, also accepted after the number.
    """
    if _MARKED_RE.search(text):
        match = answer_pattern(terminator, ended=ended).search(text)
    elif ended:
        *_, match = (None, *_NUMBER_RE.finditer(text))  # the last one, or None
    else:
        match = None
    return None if match is None else _normalise(match)


def answers_match(pred: str | None, gold: str) -> bool:
    """Whether a predicted answer equals the gold one as numbers (``"1080"`` matches ``"1,080"``, ``"2.5"`` ``"2.50"``).

    A gold answer with no number is compared as stripped text.
    """
    if pred is None:
        return False
    want, got = extract_answer(gold), extract_answer(pred)
    if want is None:
        return pred.strip() == gold.strip()
    return got is not None and Decimal(got) == Decimal(want)


def cut_after_answer(text: str, terminator: str = "") -> str:
    """``text`` up to the end of its first terminated answer (see ``extract_answer``), its terminator included.

    A text with no terminated answer is returned whole: the model stopped (EOS, token budget) before one.
    """
    match = answer_pattern(terminator, ended=False).search(text)
    return text[: match.end("end")] if match else text


# ---------------------------------------------------------------------------------------------------------------------
# Prompts and generation


def prompt_text(row: ReasoningRow, template: PromptTemplate) -> str:
    """The model's input for ``row``: its training text (``format_row``) up to where the reasoning starts.

    Trailing spaces are left for the model to write: byte-level BPE (GPT-2, Qwen2) fuses a space with the word after
    it (``"Answer: Natalia"`` is ``Answer``, ``:``, ``ĠNatalia``), so the training text never had a lone-space token
    there and a prompt ending in one would start the model off its training distribution. Without them the prompt's
    tokens are the first tokens of the training text's.
    """
    formatted = format_row(row, template)
    return formatted.text[: formatted.spans["reasoning"][0]].rstrip(" ")


class AnswerStop:
    """Stopping criterion: per row, True once the generated text holds a terminated answer (``cut_after_answer``).

    Cheap per step: only the newest token of each row is looked at, through a per-id cache of whether its text holds
    a newline or the terminator's last character; only then is the row's current line (from its last newline token
    on) decoded and searched. So a row is decoded about once per line it writes, not once per step. ``stopped_at[i]``
    is how many tokens row ``i`` had generated when it stopped, so the caller can cut there.
    """

    def __init__(self, tokenizer: Any, prompt_width: int, rows: int, terminator: str) -> None:
        self.tokenizer, self.prompt_width, self.terminator = tokenizer, prompt_width, terminator
        self.marks = {"\n", *terminator[-1:]}  # characters the last token of a terminated answer must hold
        self.stopped_at: list[int | None] = [None] * rows
        self.line_start = [0] * rows  # per row: index (in the generated tokens) of its last newline token
        self.cache: dict[int, tuple[bool, bool]] = {}  # token id → (holds a mark, holds a newline)

    def _marks_of(self, token: int) -> tuple[bool, bool]:
        if token not in self.cache:
            text = self.tokenizer.decode([token], skip_special_tokens=True)
            self.cache[token] = (any(m in text for m in self.marks), "\n" in text)
        return self.cache[token]

    def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
        import torch

        step = input_ids.shape[1] - self.prompt_width  # tokens generated so far
        last = input_ids[:, -1].tolist()  # (B,); one device sync per step
        for i, stopped in enumerate(self.stopped_at):
            if stopped is not None or step < 1:
                continue
            has_mark, has_newline = self._marks_of(last[i])
            if has_mark:
                line = input_ids[i, self.prompt_width + self.line_start[i] :].tolist()
                if answer_pattern(self.terminator, ended=False).search(self.tokenizer.decode(line,
                                                                                       skip_special_tokens=True)):
                    self.stopped_at[i] = step
            if has_newline:
                self.line_start[i] = step - 1  # the newline token starts the next line's window
        return torch.tensor([s is not None for s in self.stopped_at], dtype=torch.bool, device=input_ids.device)


def _eos_ids(model: Any, tokenizer: Any) -> list[int]:
    """Every EOS id the model's generation config or the tokenizer names (instruct models often have several)."""
    ids = getattr(model.generation_config, "eos_token_id", None)
    ids = [] if ids is None else [ids] if isinstance(ids, int) else list(ids)
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(tokenizer.eos_token_id)
    return ids


def _terminator_token(tokenizer: Any, terminator: str) -> int | None:
    """The special token the template's terminator starts with (chat's ``<|im_end|>`` for Qwen2), or None.

    Such a token vanishes from the decoded text, so a row that writes it is stopped as at EOS."""
    ids = tokenizer(terminator, add_special_tokens=False)["input_ids"] if terminator else []
    if ids and tokenizer.decode(ids[:1], skip_special_tokens=True) == "" and ids[0] in tokenizer.all_special_ids:
        return int(ids[0])
    return None


STOPS = ("answer", "eos", "budget")
"""Why a row's generation stopped: it wrote a terminated answer, it wrote EOS (or the template's terminator token),
or it used up --max-new-tokens."""


def _generate(model: Any, tokenizer: Any, prompts: list[str], *, batch_size: int, max_new_tokens: int,
              terminator: str = "", on_batch: Any = None) -> list[tuple[str, int, str]]:
    """``(continuation text, tokens generated, stop)`` per prompt, in the prompts' order (``stop`` in ``STOPS``);
    see ``generate_batched``."""
    import torch
    from transformers import GenerationConfig, StoppingCriteriaList

    from kava.core.padding import left_pad  # imported here, not at the top: keeps `kava --help` light

    eos = _eos_ids(model, tokenizer)
    if not eos:
        raise ConfigError("Expected the tokenizer or the model's generation config to name an EOS token. Got none "
                          "instead. Set eos_token in the model directory's tokenizer_config.json.")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos[0]
    end_token = _terminator_token(tokenizer, terminator)
    ends = eos + ([end_token] if end_token is not None and end_token not in eos else [])
    device = next(model.parameters()).device
    # Tokenized as in training (BOS and the like included), so a prompt is a prefix of the training tokens.
    encoded = [tokenizer(p, add_special_tokens=True)["input_ids"] for p in prompts]
    # Longest first: similar lengths share a batch (less padding), and a batch too big for memory fails at once.
    order = sorted(range(len(prompts)), key=lambda i: -len(encoded[i]))
    # Our own config, not the checkpoint's: its sampling settings (temperature, top_p) would only warn under greedy.
    config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, num_beams=1, pad_token_id=pad,
                              eos_token_id=ends, bos_token_id=tokenizer.bos_token_id)
    out: list[tuple[str, int, str]] = [("", 0, "budget")] * len(prompts)
    for start in range(0, len(order), batch_size):
        batch = order[start : start + batch_size]
        ids, mask = left_pad([encoded[i] for i in batch], pad)  # (B, T) each
        width = ids.shape[1]
        stop = AnswerStop(tokenizer, width, len(batch), terminator)
        with torch.no_grad():
            generated = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device),
                                       generation_config=config, stopping_criteria=StoppingCriteriaList([stop]))
        new = generated[:, width:].tolist()  # (B, <= max_new_tokens); finished rows are padded on
        for row, i in enumerate(batch):
            tokens = new[row]
            at_end = next((k + 1 for k, t in enumerate(tokens) if t in ends), None)  # EOS counts as generated
            answered = stop.stopped_at[row]
            if answered is not None and (at_end is None or answered < at_end):
                n, why = answered, "answer"
            elif at_end is not None:
                n, why = at_end, "eos"
            else:
                n, why = len(tokens), "budget"
            # Decoded after the prompt and then cut off: SentencePiece drops the leading space of a text's first
            # token, so decoding the continuation alone would lose the space after "Answer:".
            head = tokenizer.decode(encoded[i], skip_special_tokens=True)
            full = tokenizer.decode(encoded[i] + tokens[:n], skip_special_tokens=True)
            if full.startswith(head):
                text = full[len(head) :]
            else:  # a tokenizer whose decoding of the prompt changes with what follows: decode the tokens alone
                text = tokenizer.decode(tokens[:n], skip_special_tokens=True)
            out[i] = (cut_after_answer(text, terminator), n, why)
        if on_batch is not None:
            on_batch(len(batch), sum(out[i][1] for i in batch))
    return out


def generate_batched(model: Any, tokenizer: Any, prompts: list[str], *, batch_size: int, max_new_tokens: int,
                     terminator: str = "") -> list[str]:
    """Greedy continuations of ``prompts``, batched, in the prompts' order.

    Prompts are sorted by token length into batches of ``batch_size`` and left-padded (pad = EOS when the tokenizer
    has none). Each row stops at EOS, at the template's terminator token (a special token such as ``<|im_end|>``), or
    once it has written a terminated answer (``#### N`` then a newline or ``terminator``), and its text is cut after
    that answer's terminator. The results equal one-prompt-at-a-time greedy generation (exactly for fp32 on CPU, as
    tested; in half precision a near-tie can flip where padding changes the kernels' summation order). The tokenizer
    is not modified: padding is done here, not by its ``padding_side``.

    Args:
        model: a causal LM in eval mode.
        tokenizer: its tokenizer.
        prompts: ``[N]`` texts (see ``prompt_text``).
        batch_size: prompts per ``generate`` call.
        max_new_tokens: the most tokens generated per prompt.
        terminator: the template's ``PromptTemplate.terminator``.

    Returns:
        ``[N]`` generated continuations (the prompt not included).
    """
    return [text for text, _, _ in _generate(model, tokenizer, prompts, batch_size=batch_size,
                                             max_new_tokens=max_new_tokens, terminator=terminator)]


@dataclass(frozen=True)
class ItemNLL:
    """Teacher-forced NLL of one row's reference reasoning and answer, in units that compare across tokenizers."""

    nats: float
    """Negative log-likelihood summed over the scored tokens."""
    tokens: int
    """Tokens scored (this tokenizer's)."""
    chars: int
    """Characters of the scored text: from where the first scored token starts to the end of the sample."""
    bytes: int
    """UTF-8 bytes of the same text."""


def reference_nll_items(model: Any, tokenizer: Any, rows: Sequence[ReasoningRow], template: PromptTemplate, *,
                        batch_size: int) -> list[ItemNLL]:
    """Per row, the negative log-likelihood of its own reasoning and answer given its prompt.

    Teacher-forced, so it moves with every bit of learning even where greedy accuracy sits at the floor. The text
    scored is what eval asks the model to write: the training text (``format_row``) after the prompt
    (``prompt_text``), and the tokens scored are those of the training text that reach past the prompt, so a
    token that fuses the space before the first word with it (``ĠJanet``, ``▁Jan``) is scored with the word. That
    makes the scored text the same characters under every tokenizer. Rows are right-padded into batches; padding
    and prompt positions are not scored. Nats per token depend on the tokenizer (a coarser one has fewer, harder
    tokens), so each item also counts the characters and bytes of the scored text: nats per character compare
    models that tokenize differently.

    Returns:
        ``[N]`` :class:`ItemNLL`, in the rows' order.
    """
    import torch

    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    seqs: list[tuple[list[int], int, str]] = []  # (ids, index of the first scored token, the scored text)
    for row in rows:
        text = format_row(row, template).text
        cut = len(prompt_text(row, template))  # the scored text is text[cut:]
        enc = tokenizer(text, add_special_tokens=True, return_offsets_mapping=True)
        # Special tokens (BOS) have empty spans and are skipped; the EOS at the end is scored.
        first = next((i for i, (a, b) in enumerate(enc["offset_mapping"]) if b > a and b > cut),
                     len(enc["input_ids"]))
        ids = list(enc["input_ids"])
        if tokenizer.eos_token_id is not None and (not ids or ids[-1] != tokenizer.eos_token_id):
            ids.append(tokenizer.eos_token_id)  # as the grid ends every training sample: stopping is scored too
        seqs.append((ids, max(first, 1), text[cut:]))  # token 0 has nothing before it to predict it
    out = []
    for lo in range(0, len(seqs), batch_size):
        batch = seqs[lo : lo + batch_size]
        width = max(len(ids) for ids, _, _ in batch)
        ids = torch.full((len(batch), width), pad, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        scored = torch.zeros((len(batch), width), dtype=torch.bool)  # [B, T]: positions whose token is scored
        for r, (seq, first, _) in enumerate(batch):
            ids[r, : len(seq)] = torch.tensor(seq)
            mask[r, : len(seq)] = 1
            scored[r, first : len(seq)] = True
        with torch.no_grad():
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.float()  # [B, T, V]
        logp = torch.log_softmax(logits[:, :-1], dim=-1)  # position t predicts token t + 1
        nll = -logp.gather(-1, ids[:, 1:, None].to(device))[..., 0]  # [B, T-1]
        keep = scored[:, 1:].to(device)
        nats = (nll * keep).sum(dim=1).tolist()  # [B]
        for r, (_, _, text) in enumerate(batch):
            out.append(ItemNLL(float(nats[r]), int(keep[r].sum()), len(text), len(text.encode("utf-8"))))
    return out


def reference_nll(model: Any, tokenizer: Any, rows: Sequence[ReasoningRow], template: PromptTemplate, *,
                  batch_size: int) -> float:
    """Mean negative log-likelihood (nats per token) of each row's own reasoning and answer, given its prompt:
    the summed nats of :func:`reference_nll_items` over their summed tokens; NaN when nothing was scored."""
    items = reference_nll_items(model, tokenizer, rows, template, batch_size=batch_size)
    count = sum(i.tokens for i in items)
    return sum(i.nats for i in items) / count if count else float("nan")


# ---------------------------------------------------------------------------------------------------------------------
# Evaluation


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
    items: list[EvalItem] = field(default_factory=list, repr=False)

    def to_dict(self) -> dict[str, Any]:
        """The summary as JSON-ready values (what ``kava eval --json`` prints); the items are in the JSONL."""
        return {k: v for k, v in asdict(self).items() if k != "items"}


def evaluate(model: Any, tokenizer: Any, rows: Sequence[ReasoningRow], template: PromptTemplate, *, batch_size: int,
             max_new_tokens: int, progress: bool = False) -> EvalResult:
    """Generate an answer for every row and score it against the row's answer.

    Args:
        model: a causal LM in eval mode.
        tokenizer: its tokenizer.
        rows: ``[N]`` rows (a ``RowSet`` or any sequence); the gold answer is each row's ``answer``.
        template: the template the model was trained with (``prompt_text`` builds each prompt from it).
        batch_size, max_new_tokens: as in ``generate_batched``.
        progress: show a progress bar (samples, tokens/s) on stderr.

    Returns:
        The summary with ``items`` (``[N]``, in the rows' order). ``dataset`` is the rows' name when they are a
        ``RowSet``; ``split`` and ``out`` are left for the caller.
    """
    from tqdm import tqdm

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

        generated = _generate(model, tokenizer, prompts, batch_size=batch_size, max_new_tokens=max_new_tokens,
                              terminator=template.terminator, on_batch=on_batch)
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
        items=items,
    )


# ---------------------------------------------------------------------------------------------------------------------
# The command

_DEVICE = re.compile(r"^(cpu|mps|cuda(:\d+)?)$")
_NAMED_DATASETS = ("synthetic", "gsm8k", "openai/gsm8k")


@dataclass
class EvalConfig:
    """Greedy-decode a model on a reasoning split and report the accuracy of its ``#### N`` answers."""

    model: str
    """A directory written by kava distill, or any causal LM directory or hub id."""
    data: DataSource = field(default_factory=lambda: DataSource(dataset="gsm8k", split="test"))
    """The rows evaluated (--dataset, --split, --limit, ...)."""
    template: str | None = None
    """Prompt template (plain, chat, cot or a file); default: the one recorded with the model, else plain."""
    batch_size: int = 16
    """Prompts per generate call."""
    max_new_tokens: int = 256
    """The most tokens generated per item."""
    out: str | None = None
    """JSONL of every item (default: eval-<dataset>-<split>.jsonl in the model directory, else here)."""
    device: str | None = None
    """cpu (default), cuda[:N] or mps."""
    threads: int | None = None
    """CPU threads for torch (default: torch's choice)."""
    progress: bool = True
    """Show a progress bar on stderr."""
    trust_remote_code: bool = False
    """Run modelling code shipped with the model (a model whose config names custom classes). Review it first."""
    nll: bool = False
    """Also score each row's reference reasoning and answer: negative log-likelihood per item in the JSONL (nats,
    tokens, characters, bytes) and per token, character and byte overall."""

    ALIASES: ClassVar[dict[str, str]] = {"seed": "data_seed"}
    """Old spellings still accepted (flag and YAML key): ``--seed`` was the synthetic dataset's seed."""

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> EvalConfig:
        """From flat option names, as flags and YAML spell them."""
        return config_from_dict(cls, data)

    def to_dict(self) -> dict[str, Any]:
        return config_to_dict(self)

    @property
    def dataset_name(self) -> str:
        """``gsm8k``, ``synthetic`` (``synthetic-easy`` at another difficulty), or a file dataset's stem: the name
        used in the default output file."""
        if self.data.dataset == "synthetic":
            return Difficulty.parse(self.data.difficulty).dataset_name
        if self.data.dataset in _NAMED_DATASETS:
            return self.data.dataset.rsplit("/", 1)[-1]
        return Path(self.data.dataset).stem

    @property
    def out_path(self) -> Path:
        if self.out is not None:
            return Path(self.out)
        name = f"eval-{self.dataset_name}-{self.data.split}.jsonl"
        return Path(self.model) / name if Path(self.model).is_dir() else Path(name)

    def validate(self) -> None:
        """Raise one ConfigError listing every problem, in the flags' spelling."""
        d = self.data
        p: list[str] = []
        if not self.model:
            p.append("--model: expected a model directory or hub id. Got nothing.")
        if d.dataset not in _NAMED_DATASETS and not Path(d.dataset).is_file():
            p.append(f"--dataset: expected synthetic, gsm8k or a JSONL/Parquet file. Got {d.dataset!r} instead.")
        if d.data_files is not None:
            if d.dataset not in ("gsm8k", "openai/gsm8k"):
                p.append(f"--data-files is for --dataset gsm8k. Got --dataset {d.dataset!r} instead. "
                         "Drop --data-files.")
            elif not Path(d.data_files).is_file():
                p.append(f"--data-files: expected a JSONL or Parquet file. Got {d.data_files!r}, which does not "
                         "exist.")
        if d.dataset == "synthetic" and d.split not in SYNTHETIC_SPLITS:
            p.append(f"--split: expected one of {', '.join(SYNTHETIC_SPLITS)} for --dataset synthetic. "
                     f"Got {d.split!r} instead.")
        if self.template is not None and self.template not in TEMPLATES and not Path(self.template).is_file():
            p.append(f"--template: expected one of {', '.join(sorted(TEMPLATES))} or a template file. "
                     f"Got {self.template!r} instead.")
        for flag, value in (("--batch-size", self.batch_size), ("--max-new-tokens", self.max_new_tokens)):
            if not isinstance(value, int) or value < 1:
                p.append(f"{flag}: expected an integer >= 1. Got {value!r} instead.")
        p += d.problems()
        for flag, value in (("--threads", self.threads),):
            if value is not None and (not isinstance(value, int) or value < 1):
                p.append(f"{flag}: expected a positive integer. Got {value!r} instead.")
        if self.device is not None and not _DEVICE.match(self.device):
            p.append(f"--device: expected cpu, cuda, cuda:N or mps. Got {self.device!r} instead.")
        if p:
            raise ConfigError.from_problems(p)


def resolve_template(config: EvalConfig) -> PromptTemplate:
    """--template, else the ``"template"`` recorded in ``<model>/kava.json`` (a name, a file, or
    ``{"name", "format"}``), else plain."""
    if config.template is not None:
        return load_template(config.template)
    record = Path(config.model) / "kava.json"
    if not record.is_file():
        return TEMPLATES["plain"]
    try:
        recorded = json.loads(record.read_text(encoding="utf-8")).get("template", "plain")
    except (json.JSONDecodeError, AttributeError) as e:
        raise ConfigError(f"Expected {record} to hold a JSON object. Got unreadable content instead ({e}). "
                          "Pass --template.") from e
    if isinstance(recorded, dict) and {"name", "format"} <= recorded.keys():
        return PromptTemplate(recorded["name"], recorded["format"])
    if not isinstance(recorded, str):
        raise ConfigError(f"Expected the 'template' in {record} to be a template name or an object with 'name' "
                          f"and 'format'. Got {recorded!r} instead. Pass --template.")
    return load_template(recorded)


def _write_jsonl_atomic(path: Path, items: Sequence[EvalItem]) -> None:
    """Write one JSON object per item to a temporary file beside ``path``, then rename it into place, so a reader
    never sees half a file and an interrupted run leaves any earlier file intact."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            for item in items:
                f.write(json.dumps(asdict(item), ensure_ascii=False) + "\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def run_eval(config: EvalConfig) -> EvalResult:
    """Evaluate ``config.model`` on its split, write the items' JSONL, and return the summary."""
    import torch

    from kava.core.models import load_model, load_tokenizer, resolve_model

    # 1. Everything that can be checked without loading a model, all at once.
    config.validate()
    template = resolve_template(config)
    out = config.out_path
    if config.threads is not None:
        torch.set_num_threads(config.threads)
    if not config.progress:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # its "Loading weights" bars too

    # 2. Data before the model: a bad dataset fails in milliseconds, not after a multi-GB load.
    rows = config.data.load()
    if not len(rows):
        raise DatasetError(f"Expected at least one usable row in {rows.name}. Got none ({len(rows.problems)} "
                           "skipped). Check --dataset, --split and --data-files.")

    # 3. Tokenizer and model, from the same directory (a distilled student is saved with its tokenizer), through the
    # loader every stage uses: the offline check, and modelling code shipped with the model runs only with
    # --trust-remote-code.
    source = resolve_model(config.model, role="model", trust_remote_code=config.trust_remote_code)
    tokenizer = load_tokenizer(source)
    model = load_model(source).to(config.device or "cpu").eval()

    # 4. Generate and score, then write every item.
    result = evaluate(model, tokenizer, rows, template, batch_size=config.batch_size,
                      max_new_tokens=config.max_new_tokens, progress=config.progress)
    nll: dict[str, Any] = {}
    if config.nll:  # per item into the JSONL, so a report can pair items across models and pick its unit
        from kava.extract.grid import tokenizer_fingerprint  # here, not at the top: it imports torch

        scored = reference_nll_items(model, tokenizer, rows, template, batch_size=config.batch_size)
        result.items[:] = [replace(item, nll_nats=s.nats, nll_tokens=s.tokens, nll_chars=s.chars, nll_bytes=s.bytes)
                           for item, s in zip(result.items, scored)]
        nats = sum(s.nats for s in scored)
        per = {unit: sum(getattr(s, unit) for s in scored) for unit in ("tokens", "chars", "bytes")}
        nll = {"reference_nll": nats / per["tokens"] if per["tokens"] else float("nan"),
               "reference_nll_per_char": nats / per["chars"] if per["chars"] else float("nan"),
               "reference_nll_per_byte": nats / per["bytes"] if per["bytes"] else float("nan"),
               "nll_tokenizer": tokenizer_fingerprint(tokenizer)}
    _write_jsonl_atomic(out, result.items)
    return replace(result, dataset=config.data.dataset, split=config.data.split, model=config.model, out=str(out),
                   **nll)
