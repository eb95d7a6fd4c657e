"""Reading a final answer from a text: what counts as a terminated ``#### <number>``, how numbers are normalised and
compared, and where a generation is cut after its answer.

Pure string functions, no model or tokenizer: ``generate`` stops and cuts rows with them, ``score`` credits answers
with them. Only a terminated answer is credited (``extract_answer``): ``#### 12`` that runs on (``#### 122-92=``) or
is cut by --max-new-tokens scores nothing.
"""

from __future__ import annotations

import functools
import re
from decimal import Decimal

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
