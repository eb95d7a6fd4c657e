"""Prompt templates, formatted text with exact character spans, and per-token segment ids.

A row becomes one text through a :class:`PromptTemplate` (``format_row``), which records where the question
("prompt"), the reasoning and the answer lie in it. A template is registered (``plain``, ``chat``, ``cot``), read
from a file, or ``chat:tokenizer``: a tokenizer's own chat template rendered into the same form
(``from_chat_template``). ``segment_ids`` maps those character spans onto any tokenizer's
tokens (from ``return_offsets_mapping=True``); ``truncate_at_segment`` finds where a too-long sample can be cut.

Segment rule (``segment_ids``):

- A token with a zero-width span (BOS, EOS and other added tokens), or flagged in ``special_mask``, is SPECIAL.
- Template glue (text between the pieces, e.g. ``"Question: "``, ``"\\nAnswer: "``, ``"\\n#### "``) belongs to the
  segment of the piece it precedes; glue after the last piece belongs to the last piece. So the text is cut into
  consecutive regions that each end where a piece ends: ``[0, end(prompt))`` is prompt,
  ``[end(prompt), end(reasoning))`` is reasoning, ``[end(reasoning), ∞)`` is answer. With the plain template,
  ``"Question: "`` is prompt, ``"\\nAnswer: "`` is reasoning and ``"\\n#### "`` and the terminator ``"\\n"`` after
  the answer are answer, so completion cross-entropy trains the model to write the terminator.
- Every other token takes the region its character span overlaps most; a tie goes to the earlier region.

Truncation rule (``truncate_at_segment``): see its docstring.

How a sample ends: every registered template puts a terminator after ``{answer}`` (``"\\n"``, or ``<|im_end|>`` in
chat), and the student grid (``extract/grid.py``) appends the tokenizer's EOS token after the text. The model learns to
write both, and ``kava eval`` stops on either (``kava.distill.evaluate``), so an answer is never read from digits a
model runs on with.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

import numpy as np

from kava.core.errors import ConfigError
from kava.core.rows import ReasoningRow

# ---------------------------------------------------------------------------------------------------------------------
# Templates

PLACEHOLDERS = ("question", "reasoning", "answer")
_PLACEHOLDER = re.compile(r"\{(question|reasoning|answer)\}")
# The span key of each placeholder: the question is the "prompt" piece.
_SPAN_OF = {"question": "prompt", "reasoning": "reasoning", "answer": "answer"}


@dataclass(frozen=True)
class PromptTemplate:
    """A named text format with ``{question}``, ``{reasoning}`` and ``{answer}`` each exactly once.

    Everything else in ``format`` is literal text, braces included (no ``str.format`` escaping).
    """

    name: str
    format: str

    def __post_init__(self) -> None:
        if not self.name:
            raise ConfigError("Expected a template name. Got an empty string instead.")
        found = _PLACEHOLDER.findall(self.format)
        counts = {p: found.count(p) for p in PLACEHOLDERS}
        if any(c != 1 for c in counts.values()):
            raise ConfigError(
                f"Expected each of {{question}}, {{reasoning}}, {{answer}} exactly once in template {self.name!r}. "
                f"Got counts {counts} instead."
            )

    @property
    def sha256(self) -> str:
        """sha256 (hex) of the format string, for the store's metadata."""
        return hashlib.sha256(self.format.encode("utf-8")).hexdigest()

    @property
    def terminator(self) -> str:
        """The literal text right after ``{answer}`` (up to the next placeholder): what ends an answer in this
        format, ``""`` when nothing does (then the tokenizer's EOS alone ends a sample)."""
        start = self.format.index("{answer}") + len("{answer}")
        following = _PLACEHOLDER.search(self.format, start)
        return self.format[start : following.start() if following else len(self.format)]

    @classmethod
    def from_file(cls, path: str | Path, *, name: str | None = None) -> PromptTemplate:
        """Read a template from a text file (UTF-8); one trailing newline, as editors add, is dropped."""
        path = Path(path)
        text = path.read_text(encoding="utf-8")
        if text.endswith("\n"):
            text = text[:-1]
        return cls(name or path.stem, text)


_TEMPLATES = {
    t.name: t
    for t in (
        PromptTemplate("plain", "Question: {question}\nAnswer: {reasoning}\n#### {answer}\n"),
        PromptTemplate(
            "chat",
            "<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n{reasoning}\n#### {answer}<|im_end|>",
        ),
        PromptTemplate("cot", "Q: {question}\nA: Let's think step by step.\n{reasoning}\n#### {answer}\n"),
    )
}
TEMPLATES: Mapping[str, PromptTemplate] = MappingProxyType(_TEMPLATES)
"""The named templates. All write the answer as ``#### <answer>`` so one parser reads every teacher's output, and all
end it with a terminator (``PromptTemplate.terminator``: ``"\\n"``, or chat's ``<|im_end|>``) that the model learns to
write and ``kava eval`` stops on."""


TOKENIZER_CHAT = "chat:tokenizer"
"""The template name that takes the tokenizer's own chat template (``chat_template``): see :func:`from_chat_template`.
Unlike the other names it needs the tokenizer (and optionally a system prompt) to become a :class:`PromptTemplate`."""

ASSISTANT_CONTENT = "{reasoning}\n#### {answer}"
"""What a chat template's assistant turn holds: the reasoning lines, then GSM8K's answer line, as every template
writes it (so one parser reads every teacher's output)."""

# Stand-ins for the contents while rendering a chat template: letters and digits only, which no template escapes,
# trims or splits, so each is found again in the rendered text.
_QUESTION_SENTINEL = "kavaQuestion7f3a9c"
_ASSISTANT_SENTINEL = "kavaAssistant7f3a9c"
_SYSTEM_SENTINEL = "kavaSystem7f3a9c"
# A row the rendered template is checked with: inner newlines, braces, markup, an ampersand and calculator notes,
# the characters a template could escape or rewrite (rows never have leading or trailing whitespace).
_PROBE = ReasoningRow("probe", 'Tom has 3 {apples} & <b>"2"</b> pears.\n  How many?', "3 + 2 = <<3+2=5>>5\nSo 5", "5")


def is_tokenizer_template(name: str | Path | None) -> bool:
    """True for the name that takes the tokenizer's own chat template (:data:`TOKENIZER_CHAT`)."""
    return isinstance(name, str) and name == TOKENIZER_CHAT


def from_chat_template(tokenizer: Any, *, system_prompt: str | None = None, flag: str = "--student-template",
                       who: str = "the tokenizer") -> PromptTemplate:
    """The tokenizer's chat template as a :class:`PromptTemplate` named ``chat:tokenizer``, with exact pieces.

    The template is rendered through ``tokenizer.apply_chat_template`` with stand-in contents: an optional system
    turn (``system_prompt``), a user turn holding the question and an assistant turn holding
    :data:`ASSISTANT_CONTENT`. The stand-ins are found in the rendered text and replaced by the placeholders, so
    every character the template adds (role markers, a default system prompt, the generation prompt where the
    assistant's answer starts, the end-of-turn marker after it) is template glue, and segment ids stay exact. A BOS
    token the template writes as text is dropped when the tokenizer adds it itself (it would be there twice).

    Checked before it is returned: the generation prompt (rendered with ``add_generation_prompt=True``) is where the
    assistant's turn starts, the system prompt appears, and a probe row with newlines, braces and markup formats
    exactly as the tokenizer renders it (a template that escapes, trims or rewrites contents is refused).

    Raises:
        ConfigError: naming ``flag`` and the fix, when the tokenizer has no chat template or any check fails.
    """
    fix = "Use plain, cot, chat or a template file instead, or a tokenizer that ships a chat template."
    if not getattr(tokenizer, "chat_template", None):
        raise ConfigError(f"{flag} {TOKENIZER_CHAT}: expected {who} to have a chat template (tokenizer_config.json's "
                          f"'chat_template', or chat_template.jinja). Got none. {fix}")

    def render(question: str, content: str | None, system: str | None) -> str:
        messages = ([{"role": "system", "content": system}] if system is not None else []) + [
            {"role": "user", "content": question}]
        if content is not None:
            messages.append({"role": "assistant", "content": content})
        try:
            text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=content is None)
        except Exception as e:  # jinja's TemplateError (e.g. "System role not supported"), or the template's own
            raise ConfigError(f"{flag} {TOKENIZER_CHAT}: {who}'s chat template failed to render a "
                              f"{'system, ' if system is not None else ''}user and assistant turn "
                              f"({type(e).__name__}: {e}). {fix}") from e
        return str(text)

    system = None if system_prompt is None else _SYSTEM_SENTINEL
    prompt = render(_QUESTION_SENTINEL, None, system)
    full = render(_QUESTION_SENTINEL, _ASSISTANT_SENTINEL, system)
    counts = {"question": full.count(_QUESTION_SENTINEL), "assistant answer": full.count(_ASSISTANT_SENTINEL)}
    if system is not None:
        counts["system prompt"] = full.count(_SYSTEM_SENTINEL)
    if any(c != 1 for c in counts.values()):
        raise ConfigError(f"{flag} {TOKENIZER_CHAT}: expected {who}'s chat template to write each message once. Got "
                          f"counts {counts} instead (a template that drops or repeats a turn has no exact pieces). "
                          f"{fix}")
    if not full.startswith(prompt) or full.index(_ASSISTANT_SENTINEL) < len(prompt):
        raise ConfigError(f"{flag} {TOKENIZER_CHAT}: expected the generation prompt {prompt[-40:]!r} to start the "
                          f"assistant's turn. Got a conversation that begins otherwise: {full[:len(prompt) + 20]!r}. "
                          f"{fix}")
    fmt = full.replace(_QUESTION_SENTINEL, "{question}").replace(_ASSISTANT_SENTINEL, ASSISTANT_CONTENT)
    if system_prompt is not None:
        fmt = fmt.replace(_SYSTEM_SENTINEL, system_prompt)
    bos = getattr(tokenizer, "bos_token", None)
    if bos and fmt.startswith(bos) and _adds_bos(tokenizer):
        fmt = fmt[len(bos):]  # the tokenizer adds it when it encodes the text
    try:
        template = PromptTemplate(TOKENIZER_CHAT, fmt)
    except ConfigError as e:  # the system prompt or the template's own text holds a placeholder
        raise ConfigError(f"{flag} {TOKENIZER_CHAT}: {e} Remove {{question}}, {{reasoning}} and {{answer}} from "
                          "--system-prompt.") from e
    # The probe: the same row through the template and through the tokenizer must be the same text.
    want = render(_PROBE.question, f"{_PROBE.reasoning}\n#### {_PROBE.answer}", system_prompt)
    if bos and want.startswith(bos) and not fmt.startswith(bos):
        want = want[len(bos):]
    got = format_row(_PROBE, template).text
    if got != want:
        at = next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), min(len(got), len(want)))
        raise ConfigError(f"{flag} {TOKENIZER_CHAT}: expected {who}'s chat template to keep message text as it is. "
                          f"It changes it (at character {at}: {want[max(0, at - 20):at + 20]!r} where the contents "
                          f"give {got[max(0, at - 20):at + 20]!r}). Write the format as a template file instead.")
    return template


def _adds_bos(tokenizer: Any) -> bool:
    """Whether encoding a text puts the BOS token first by itself."""
    ids = tokenizer("a")["input_ids"]
    return bool(ids) and ids[0] == tokenizer.bos_token_id


def load_template(name_or_path: str | Path, *, tokenizer: Any = None, system_prompt: str | None = None,
                  flag: str = "--template", who: str = "the tokenizer") -> PromptTemplate:
    """A registered template by name (``"plain"``, ``"chat"``, ``"cot"``), one read from a file path, or
    ``"chat:tokenizer"``: ``tokenizer``'s own chat template (:func:`from_chat_template`, with ``system_prompt``).

    ``system_prompt`` is for ``chat:tokenizer`` only; ``flag`` and ``who`` name the option and the tokenizer in
    errors.
    """
    if is_tokenizer_template(name_or_path):
        if tokenizer is None:
            raise ConfigError(f"{flag} {TOKENIZER_CHAT} needs the tokenizer whose chat template it takes. Got none: "
                              "pass the tokenizer (the template is resolved once it is loaded).")
        return from_chat_template(tokenizer, system_prompt=system_prompt, flag=flag, who=who)
    if system_prompt is not None:
        raise ConfigError(f"--system-prompt is for {flag} {TOKENIZER_CHAT}. Got {flag} {str(name_or_path)!r}: "
                          "drop --system-prompt, or write the system text into a template file.")
    if isinstance(name_or_path, str) and name_or_path in TEMPLATES:
        return TEMPLATES[name_or_path]
    if Path(name_or_path).is_file():
        return PromptTemplate.from_file(name_or_path)
    raise ConfigError(
        f"Expected {flag} to be one of {sorted(TEMPLATES)}, {TOKENIZER_CHAT} or a template file. "
        f"Got {str(name_or_path)!r} instead."
    )


def check_template_name(name_or_path: str | Path, *, flag: str = "--template") -> None:
    """Raise ConfigError unless ``name_or_path`` names a template (without needing a tokenizer): a registered
    name, ``chat:tokenizer`` or an existing template file whose format is valid."""
    if not is_tokenizer_template(name_or_path):
        load_template(name_or_path, flag=flag)


def template_record(template: PromptTemplate) -> str | dict[str, str]:
    """How a manifest records ``template``: its name when the name alone gives it back (a registered template), else
    ``{"name", "format"}``; :func:`template_from_record` reads either."""
    return template.name if TEMPLATES.get(template.name) == template else {"name": template.name,
                                                                            "format": template.format}


def template_from_record(record: str | Mapping[str, str]) -> PromptTemplate:
    """The template a manifest recorded with :func:`template_record` (a name or a file path, or name and format)."""
    if isinstance(record, Mapping):
        return PromptTemplate(str(record["name"]), str(record["format"]))
    return load_template(record)


@dataclass(frozen=True)
class FormattedText:
    """A formatted row. ``spans[k] = (start, end)`` in characters with ``text[start:end]`` exactly the piece, for
    k in ``"prompt"`` (the question), ``"reasoning"``, ``"answer"``."""

    text: str
    spans: dict[str, tuple[int, int]]

    def piece(self, key: str) -> str:
        start, end = self.spans[key]
        return self.text[start:end]


def format_row(row: ReasoningRow, template: PromptTemplate) -> FormattedText:
    """Fill ``template`` with the row's question, reasoning and answer, recording each one's character span."""
    values = {"question": row.question, "reasoning": row.reasoning, "answer": row.answer}
    parts: list[str] = []
    spans: dict[str, tuple[int, int]] = {}
    length, last = 0, 0
    for match in _PLACEHOLDER.finditer(template.format):
        glue = template.format[last : match.start()]
        value = values[match.group(1)]
        parts += [glue, value]
        length += len(glue)
        spans[_SPAN_OF[match.group(1)]] = (length, length + len(value))
        length += len(value)
        last = match.end()
    parts.append(template.format[last:])
    return FormattedText("".join(parts), spans)


# ---------------------------------------------------------------------------------------------------------------------
# Segments

SEGMENT_PROMPT = 0
SEGMENT_REASONING = 1
SEGMENT_ANSWER = 2
SEGMENT_SPECIAL = 3
SEGMENT_NAMES = ("prompt", "reasoning", "answer", "special")
"""``SEGMENT_NAMES[id]`` is the name of segment ``id``; span keys of ``FormattedText`` are these names."""
_SEGMENT_OF_SPAN = {"prompt": SEGMENT_PROMPT, "reasoning": SEGMENT_REASONING, "answer": SEGMENT_ANSWER}


def _as_token_spans(token_spans: np.ndarray) -> np.ndarray:
    spans = np.asarray(token_spans, dtype=np.int64)
    if spans.ndim != 2 or spans.shape[1] != 2:
        raise ValueError(f"Expected token_spans of shape [T, 2]. Got shape {spans.shape} instead.")
    return spans


def segment_ids(
    token_spans: np.ndarray,
    seg_spans: Mapping[str, tuple[int, int]],
    *,
    special_mask: np.ndarray | None = None,
) -> np.ndarray:
    """Segment id per token, by the rule in the module docstring.

    Args:
        token_spans: ``[T, 2]`` character (start, end) per token, as a fast tokenizer's ``offset_mapping``.
        seg_spans: ``FormattedText.spans`` (any subset of "prompt", "reasoning", "answer").
        special_mask: ``[T]`` bool, True for tokens that are SPECIAL whatever their span — e.g.
            ``np.isin(input_ids, tokenizer.all_special_ids)``: special tokens written in the text (``<|im_start|>``,
            an appended ``<|endoftext|>``) have non-zero spans, and tokenizers do not flag them themselves.

    Returns:
        ``[T]`` uint8 with values in ``SEGMENT_PROMPT .. SEGMENT_SPECIAL``.
    """
    spans = _as_token_spans(token_spans)
    unknown = set(seg_spans) - set(_SEGMENT_OF_SPAN)
    if unknown:
        raise ValueError(f"Expected seg_spans keys among {list(_SEGMENT_OF_SPAN)}. Got {sorted(unknown)} instead.")
    if not seg_spans:
        raise ValueError("Expected at least one segment span. Got none.")
    # Regions: sorted by position, region k covers [end of piece k-1, end of piece k); the first starts at -inf
    # (glue before the first piece), the last runs to +inf (glue after the last piece).
    ordered = sorted(seg_spans.items(), key=lambda kv: (kv[1][0], kv[1][1]))
    ids = np.array([_SEGMENT_OF_SPAN[k] for k, _ in ordered], dtype=np.uint8)
    ends = np.array([e for _, (_, e) in ordered], dtype=np.int64)
    big = np.iinfo(np.int64).max // 2
    lo = np.concatenate([[-big], ends[:-1]])  # (K,)
    hi = np.concatenate([ends[:-1], [big]])  # (K,)
    starts, stops = spans[:, :1], spans[:, 1:]  # (T, 1)
    overlap = np.minimum(stops, hi) - np.maximum(starts, lo)  # (T, K)
    out = ids[np.argmax(overlap, axis=1)] if len(spans) else np.zeros(0, dtype=np.uint8)
    special = spans[:, 1] <= spans[:, 0]
    if special_mask is not None:
        special_mask = np.asarray(special_mask, dtype=bool)
        if special_mask.shape != special.shape:
            raise ValueError(f"Expected special_mask of shape {special.shape}. Got {special_mask.shape} instead.")
        special |= special_mask
    out[special] = SEGMENT_SPECIAL
    return out.astype(np.uint8, copy=False)


def truncate_at_segment(
    token_spans: np.ndarray,
    seg_ids: np.ndarray,
    max_length: int,
    *,
    text: str | None = None,
) -> int | None:
    """How many leading tokens to keep so a sample fits ``max_length``; None when no clean cut exists.

    Policy:

    - Fits already (``T <= max_length``): ``T``.
    - Otherwise keep the longest prefix of at most ``max_length`` tokens that (1) holds the whole prompt (every
      PROMPT token), (2) holds at least one REASONING token, and (3) ends at a clean cut: where the segment id
      changes (so the answer is kept whole or dropped whole, never cut), or — given ``text`` — inside the
      reasoning at a line end (the last kept token ends with ``"\\n"`` or the next one starts with it).
    - None when no prefix qualifies (the prompt alone is too long, or no line end fits): the caller chooses to skip
      the sample or to cut it anyway.

    Args:
        token_spans: ``[T, 2]`` character spans of the tokens (used for line ends with ``text``).
        seg_ids: ``[T]`` segment ids from ``segment_ids``.
        max_length: the most tokens a sample may have (>= 1).
        text: the formatted text the spans index; without it only segment boundaries are cut points.
    """
    spans = _as_token_spans(token_spans)
    seg = np.asarray(seg_ids)
    if max_length < 1:
        raise ValueError(f"Expected max_length >= 1. Got {max_length} instead.")
    if seg.shape != (len(spans),):
        raise ValueError(f"Expected seg_ids of shape ({len(spans)},). Got {seg.shape} instead.")
    T = len(seg)
    if T <= max_length:
        return T
    # Candidate n means "keep tokens [0, n)"; n in 1..max_length, and n < T here, so token n exists.
    n = np.arange(1, max_length + 1)
    prev, nxt = seg[n - 1], seg[n]
    clean = prev != nxt
    if text is not None:
        ends_line = np.array([text[e - 1 : e] == "\n" for e in spans[n - 1, 1]])
        next_starts_line = np.array([text[s : s + 1] == "\n" for s in spans[n, 0]])
        inside = (prev == SEGMENT_REASONING) & (nxt == SEGMENT_REASONING)
        clean |= inside & (ends_line | next_starts_line)
    prompt_at = np.flatnonzero(seg == SEGMENT_PROMPT)
    need = prompt_at[-1] + 1 if len(prompt_at) else 0  # keep at least up to the last prompt token
    first_reasoning = np.flatnonzero(seg == SEGMENT_REASONING)
    if not len(first_reasoning):
        return None
    need = max(need, first_reasoning[0] + 1)
    ok = np.flatnonzero(clean & (n >= need))
    return int(n[ok[-1]]) if len(ok) else None
