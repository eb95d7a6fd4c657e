"""`kava eval`: greedy generation on a reasoning split, answers read from ``#### <number>``, accuracy.

The recipe, top to bottom (``run_eval``): validate the config, resolve the template (the one recorded with the
model by ``kava distill`` unless --template says otherwise), load the rows, load the tokenizer and model, generate in
length-sorted batches, score, write one JSONL line per item (atomically), return an :class:`EvalResult`.

Prompts are the formatted training text up to where the reasoning starts, so the model continues from exactly the
tokens it saw in training (see ``prompt_text``). Generation stops a row at EOS or once it has written a complete
answer line (``#### <number>`` and a newline); the returned text is cut after that line.
"""

from __future__ import annotations

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
from typing import Any

from kava.extract.data import load_rows
from kava.extract.rows import ReasoningRow
from kava.extract.synthetic import SYNTHETIC_SPLITS, Difficulty, difficulty_problems
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
# A complete answer line: the mark, a number, the rest of the line, the newline that ends it.
_ANSWER_LINE_RE = re.compile(r"####[ \t]*" + _NUMBER + r"[^\n]*\n")


def _normalise(match: re.Match[str]) -> str:
    value = Decimal(match["int"].replace(",", "") + ("." + match["frac"] if match["frac"] else ""))
    value = -value if match["sign"] else value
    if value == value.to_integral_value():
        return str(int(value))  # also turns "-0" and "0.00" into "0"
    return format(value.normalize(), "f")  # 2.50 → 2.5


def extract_answer(text: str) -> str | None:
    """The answer a text gives, normalised (``"1,234"`` → ``"1234"``, ``"$2.50"`` → ``"2.5"``, ``"-3"``).

    The number right after the first ``####`` that is followed by one; without such a mark, the last number in the
    text; None when the text has no number at all.
    """
    match = _MARKED_RE.search(text)
    if match is None:
        *_, match = (None, *_NUMBER_RE.finditer(text))  # the last one, or None
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


def cut_after_answer(text: str) -> str:
    """``text`` up to the end of its first complete answer line (``#### <number> ...``, its newline dropped).

    A text with no complete answer line is returned whole: the model stopped (EOS, token budget) before one.
    """
    match = _ANSWER_LINE_RE.search(text)
    return text[: match.end() - 1] if match else text


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


class _AnswerLineStop:
    """Stopping criterion: per row, True once the generated text holds a complete answer line.

    Only the text generated after the (left-padded) prompt of width ``prompt_width`` is read; ``stopped_at[i]`` is
    how many tokens row ``i`` had generated when it stopped, so the caller can cut there.
    """

    def __init__(self, tokenizer: Any, prompt_width: int, rows: int) -> None:
        self.tokenizer, self.prompt_width = tokenizer, prompt_width
        self.stopped_at: list[int | None] = [None] * rows

    def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
        import torch

        new = input_ids[:, self.prompt_width :]  # (B, generated so far)
        for i, stopped in enumerate(self.stopped_at):
            # A row that stopped stays stopped, and is not decoded again. On GPU, decoding is a sync point per step;
            # next to a forward pass of a real model it is cheap.
            if stopped is None and _ANSWER_LINE_RE.search(self.tokenizer.decode(new[i], skip_special_tokens=True)):
                self.stopped_at[i] = new.shape[1]
        return torch.tensor([s is not None for s in self.stopped_at], dtype=torch.bool, device=input_ids.device)


def _eos_ids(model: Any, tokenizer: Any) -> list[int]:
    """Every EOS id the model's generation config or the tokenizer names (instruct models often have several)."""
    ids = getattr(model.generation_config, "eos_token_id", None)
    ids = [] if ids is None else [ids] if isinstance(ids, int) else list(ids)
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(tokenizer.eos_token_id)
    return ids


def _generate(model: Any, tokenizer: Any, prompts: list[str], *, batch_size: int, max_new_tokens: int,
              on_batch: Any = None) -> list[tuple[str, int]]:
    """``(continuation text, tokens generated)`` per prompt, in the prompts' order; see ``generate_batched``."""
    import torch
    from transformers import GenerationConfig, StoppingCriteriaList

    from kava.core.padding import left_pad  # imported here, not at the top: keeps `kava --help` light

    eos = _eos_ids(model, tokenizer)
    if not eos:
        raise ConfigError("Expected the tokenizer or the model's generation config to name an EOS token. Got none "
                          "instead. Set eos_token in the model directory's tokenizer_config.json.")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos[0]
    device = next(model.parameters()).device
    # Tokenized as in training (BOS and the like included), so a prompt is a prefix of the training tokens.
    encoded = [tokenizer(p, add_special_tokens=True)["input_ids"] for p in prompts]
    # Longest first: similar lengths share a batch (less padding), and a batch too big for memory fails at once.
    order = sorted(range(len(prompts)), key=lambda i: -len(encoded[i]))
    # Our own config, not the checkpoint's: its sampling settings (temperature, top_p) would only warn under greedy.
    config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, num_beams=1, pad_token_id=pad,
                              eos_token_id=eos, bos_token_id=tokenizer.bos_token_id)
    out: list[tuple[str, int]] = [("", 0)] * len(prompts)
    for start in range(0, len(order), batch_size):
        batch = order[start : start + batch_size]
        ids, mask = left_pad([encoded[i] for i in batch], pad)  # (B, T) each
        width = ids.shape[1]
        stop = _AnswerLineStop(tokenizer, width, len(batch))
        with torch.no_grad():
            generated = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device),
                                       generation_config=config, stopping_criteria=StoppingCriteriaList([stop]))
        new = generated[:, width:].tolist()  # (B, <= max_new_tokens); finished rows are padded on
        for row, i in enumerate(batch):
            tokens = new[row]
            n = next((k + 1 for k, t in enumerate(tokens) if t in eos), len(tokens))  # EOS counts as generated
            n = min(n, stop.stopped_at[row] or n)
            # Decoded after the prompt and then cut off: SentencePiece drops the leading space of a text's first
            # token, so decoding the continuation alone would lose the space after "Answer:".
            head = tokenizer.decode(encoded[i], skip_special_tokens=True)
            full = tokenizer.decode(encoded[i] + tokens[:n], skip_special_tokens=True)
            if full.startswith(head):
                text = full[len(head) :]
            else:  # a tokenizer whose decoding of the prompt changes with what follows: decode the tokens alone
                text = tokenizer.decode(tokens[:n], skip_special_tokens=True)
            out[i] = (cut_after_answer(text), n)
        if on_batch is not None:
            on_batch(len(batch), sum(out[i][1] for i in batch))
    return out


def generate_batched(model: Any, tokenizer: Any, prompts: list[str], *, batch_size: int,
                     max_new_tokens: int) -> list[str]:
    """Greedy continuations of ``prompts``, batched, in the prompts' order.

    Prompts are sorted by token length into batches of ``batch_size`` and left-padded (pad = EOS when the tokenizer
    has none); each row stops at EOS or after its first complete answer line, and its text is cut after that line.
    The results equal one-prompt-at-a-time greedy generation (exactly for fp32 on CPU, as tested; in half precision
    a near-tie can flip where padding changes the kernels' summation order). The tokenizer is not modified: padding
    is done here, not by its ``padding_side``.

    Args:
        model: a causal LM in eval mode.
        tokenizer: its tokenizer.
        prompts: ``[N]`` texts (see ``prompt_text``).
        batch_size: prompts per ``generate`` call.
        max_new_tokens: the most tokens generated per prompt.

    Returns:
        ``[N]`` generated continuations (the prompt not included).
    """
    return [text for text, _ in _generate(model, tokenizer, prompts, batch_size=batch_size,
                                          max_new_tokens=max_new_tokens)]


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
        # Special tokens (BOS) have empty spans and are skipped; one appended at the end (EOS) is scored.
        first = next((i for i, (a, b) in enumerate(enc["offset_mapping"]) if b > a and b > cut),
                     len(enc["input_ids"]))
        seqs.append((enc["input_ids"], max(first, 1), text[cut:]))  # token 0 has nothing before it to predict it
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
                              on_batch=on_batch)
    seconds = time.perf_counter() - started
    items = []
    for row, prompt, (text, tokens) in zip(rows, prompts, generated):
        predicted = extract_answer(text)
        items.append(EvalItem(row.sample_id, row.question, prompt, text, predicted, row.answer,
                              answers_match(predicted, row.answer), tokens))
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
    dataset: str = "gsm8k"
    """``synthetic`` (generated, seeded), ``gsm8k``, or a JSONL/Parquet file."""
    data_files: str | None = None
    """Local files holding the rows of --split (for --dataset gsm8k)."""
    split: str = "test"
    """Dataset split."""
    limit: int | None = None
    """Evaluate only the first N rows."""
    seed: int = 0
    """Seed of the synthetic dataset."""
    difficulty: str = "default"
    """Difficulty of the synthetic dataset: a preset (default, easy) or key=value pairs such as
    steps=1-2,ops=+-,start=2-9,operand=1-9 (see the README)."""
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
    nll: bool = False
    """Also score each row's reference reasoning and answer: negative log-likelihood per item in the JSONL (nats,
    tokens, characters, bytes) and per token, character and byte overall."""

    @property
    def dataset_name(self) -> str:
        """``gsm8k``, ``synthetic`` (``synthetic-easy`` at another difficulty), or a file dataset's stem: the name
        used in the default output file."""
        if self.dataset == "synthetic":
            return Difficulty.parse(self.difficulty).dataset_name
        if self.dataset in _NAMED_DATASETS:
            return self.dataset.rsplit("/", 1)[-1]
        return Path(self.dataset).stem

    @property
    def out_path(self) -> Path:
        if self.out is not None:
            return Path(self.out)
        name = f"eval-{self.dataset_name}-{self.split}.jsonl"
        return Path(self.model) / name if Path(self.model).is_dir() else Path(name)

    def validate(self) -> None:
        """Raise one ConfigError listing every problem, in the flags' spelling."""
        p: list[str] = []
        if not self.model:
            p.append("--model: expected a model directory or hub id. Got nothing.")
        if self.dataset not in _NAMED_DATASETS and not Path(self.dataset).is_file():
            p.append(f"--dataset: expected synthetic, gsm8k or a JSONL/Parquet file. Got {self.dataset!r} instead.")
        if self.data_files is not None:
            if self.dataset not in ("gsm8k", "openai/gsm8k"):
                p.append(f"--data-files is for --dataset gsm8k. Got --dataset {self.dataset!r} instead. "
                         "Drop --data-files.")
            elif not Path(self.data_files).is_file():
                p.append(f"--data-files: expected a JSONL or Parquet file. Got {self.data_files!r}, which does not "
                         "exist.")
        if self.dataset == "synthetic" and self.split not in SYNTHETIC_SPLITS:
            p.append(f"--split: expected one of {', '.join(SYNTHETIC_SPLITS)} for --dataset synthetic. "
                     f"Got {self.split!r} instead.")
        p += difficulty_problems("--difficulty", self.difficulty, self.dataset)
        if self.template is not None and self.template not in TEMPLATES and not Path(self.template).is_file():
            p.append(f"--template: expected one of {', '.join(sorted(TEMPLATES))} or a template file. "
                     f"Got {self.template!r} instead.")
        for flag, value in (("--batch-size", self.batch_size), ("--max-new-tokens", self.max_new_tokens)):
            if not isinstance(value, int) or value < 1:
                p.append(f"{flag}: expected an integer >= 1. Got {value!r} instead.")
        for flag, value in (("--limit", self.limit), ("--threads", self.threads)):
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
    from transformers import AutoModelForCausalLM, AutoTokenizer

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
    rows = load_rows(config.dataset, split=config.split, limit=config.limit, data_files=config.data_files,
                     seed=config.seed, difficulty=config.difficulty)
    if not len(rows):
        raise DatasetError(f"Expected at least one usable row in {rows.name}. Got none ({len(rows.problems)} "
                           "skipped). Check --dataset, --split and --data-files.")

    # 3. Tokenizer and model, from the same directory (a distilled student is saved with its tokenizer).
    try:
        tokenizer = AutoTokenizer.from_pretrained(config.model)
        model = AutoModelForCausalLM.from_pretrained(config.model)
    except OSError as e:  # no such directory, no weights, or a hub id that is not cached offline
        raise ConfigError(f"--model: expected a model directory or a cached hub id. Got {config.model!r}, which "
                          f"could not be loaded ({e}). Pass the directory kava distill wrote.") from e
    model = model.to(config.device or "cpu").eval()

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
    return replace(result, dataset=config.dataset, split=config.split, model=config.model, out=str(out), **nll)
