"""Prompts and greedy generation: the prompt a row gives the model, the stop rule, and batched generation.

Prompts are the formatted training text up to where the reasoning starts, so the model continues from exactly the
tokens it saw in training (``prompt_text``). Generation stops a row at EOS (or the template's terminator token,
chat's ``<|im_end|>``) or once it has written a terminated answer (``AnswerStop``): ``#### <number>`` followed by a
newline or the template's terminator; the returned text is cut after that terminator (``cut_after_answer``).
With a ``CacheBound`` (``kava eval --cache``) the same greedy loop and stops run over a bounded cache (``cache``).
"""

from __future__ import annotations

from typing import Any

from kava.core.errors import ConfigError
from kava.core.rows import ReasoningRow
from kava.extract.templates import PromptTemplate, format_row

from .answers import answer_pattern, cut_after_answer
from .cache import CacheBound, check_model, generate_bounded


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
        import torch  # noqa: PLC0415 - heavy (package docstring)

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


def eos_ids(model: Any, tokenizer: Any) -> list[int]:
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


def generate_with_stops(model: Any, tokenizer: Any, prompts: list[str], *, batch_size: int, max_new_tokens: int,
              terminator: str = "", on_batch: Any = None,
              cache: CacheBound | None = None) -> list[tuple[str, int, str]]:
    """``(continuation text, tokens generated, stop)`` per prompt, in the prompts' order (``stop`` in ``STOPS``);
    see ``generate_batched``."""
    import torch  # noqa: PLC0415 - heavy (package docstring)
    from transformers import GenerationConfig, StoppingCriteriaList  # noqa: PLC0415 - heavy (package docstring)

    from kava.core.padding import left_pad  # noqa: PLC0415 - heavy (package docstring)

    eos = eos_ids(model, tokenizer)
    if cache is not None:
        check_model(model)  # before any generation: a refused model fails at once
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
            if cache is None:
                generated = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device),
                                           generation_config=config, stopping_criteria=StoppingCriteriaList([stop]))
            else:  # the same greedy loop and stops, over a bounded cache (see .cache)
                generated = generate_bounded(model, ids.to(device), mask.to(device), bound=cache,
                                             max_new_tokens=max_new_tokens, pad_token_id=pad, eos_token_ids=ends,
                                             stopping=stop)
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
                     terminator: str = "", cache: CacheBound | None = None) -> list[str]:
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
        cache: attention reads only this bounded cache (``generate_bounded``); default: the model's full cache.

    Returns:
        ``[N]`` generated continuations (the prompt not included).
    """
    return [text for text, _, _ in generate_with_stops(model, tokenizer, prompts, batch_size=batch_size,
                                                        max_new_tokens=max_new_tokens, terminator=terminator,
                                                        cache=cache)]
