"""Seeded synthetic GSM8K-shaped problems: multi-step integer arithmetic with chain-of-thought lines and ``#### N``.

The embedded default run needs data that no hub provides offline; these rows look like GSM8K (calculator notes
``<<48/2=24>>`` included), are exact, and are the same for the same (seed, split, index) on any machine.
"""

from __future__ import annotations

import hashlib
import random

from kava.core.errors import ConfigError

from .rows import ReasoningRow, RowSet, make_sample_id, strip_calculator_notes

# A split owns the questions whose sha256 falls in its bucket, so no question can be in two splits.
SYNTHETIC_SPLITS = ("train", "validation", "test")
SYNTHETIC_DEFAULT_SIZE = {"train": 2000, "validation": 200, "test": 500}
"""Rows per split when ``load_rows("synthetic")`` gets no limit."""

_NAMES = (
    ("Natalia", "she"), ("Liam", "he"), ("Priya", "she"), ("Mateo", "he"), ("Aisha", "she"), ("Kenji", "he"),
    ("Olga", "she"), ("Tom", "he"), ("Fatima", "she"), ("Diego", "he"), ("Mei", "she"), ("Samuel", "he"),
)  # fmt: skip
_PRONOUNS = {  # subject, object, possessive, reflexive
    "she": ("she", "her", "her", "herself"),
    "he": ("he", "him", "his", "himself"),
}
_OBJECTS = ("marbles", "stickers", "apples", "pencils", "cookies", "shells", "stamps", "books", "cards", "beads")
_CONTAINERS = ("packs", "boxes", "bags")

_OPENINGS = ("{Name} has {a} {obj}.", "{Name} starts the week with {a} {obj}.", "{Name} owns {a} {obj}.")
_CLOSINGS = (
    "How many {obj} does {Name} have now?",
    "How many {obj} does {Name} have at the end?",
    "How many {obj} does {Name} end up with?",
)
# Each operation: question sentences, reasoning lines. {r} is the result; the notes are GSM8K's <<expr=result>>.
_ADD_Q = ("{He} buys {n} more {obj}.", "{He} finds {n} more {obj}.", "{Friend} gives {him} {n} {obj}.")
_ADD_R = (
    "{Name} has {a} + {n} = <<{a}+{n}={r}>>{r} {obj} after that.",
    "Now {he} has {a}+{n}=<<{a}+{n}={r}>>{r} {obj}.",
)
_SUB_Q = ("{He} gives {n} {obj} to {Friend}.", "{He} loses {n} of the {obj}.", "{He} sells {n} {obj}.")
_SUB_R = ("{Name} has {a} - {n} = <<{a}-{n}={r}>>{r} {obj} left.", "That leaves {a}-{n}=<<{a}-{n}={r}>>{r} {obj}.")
_MUL_Q = (
    "Then the number of {obj} {he} has becomes {n} times as large.",
    "Then {his} collection grows to {n} times its size.",
)
_MUL_R = ("{He} now has {a} * {n} = <<{a}*{n}={r}>>{r} {obj}.", "That makes {a}*{n}=<<{a}*{n}={r}>>{r} {obj}.")
_DIV_Q = (
    "{He} splits the {obj} into {n} equal groups and keeps one group.",
    "{He} shares the {obj} equally among {n} kids, {himself} included, and keeps {his} share.",
)
_DIV_R = (
    "Each share is {a} / {n} = <<{a}/{n}={r}>>{r} {obj}, so {he} keeps {r}.",
    "{Name} keeps {a}/{n}=<<{a}/{n}={r}>>{r} {obj}.",
)
_GROUPS_Q = ("{He} buys {k} {box} of {obj} with {m} in each.", "{He} gets {k} {box} that hold {m} {obj} each.")
_GROUPS_R = (  # both lines, in order
    "The {box} hold {k} * {m} = <<{k}*{m}={p}>>{p} {obj}.",
    "So {he} has {a} + {p} = <<{a}+{p}={r}>>{r} {obj}.",
)


def _capitalize(text: str) -> str:
    return text[:1].upper() + text[1:]


def _synthetic_problem(rng: random.Random) -> tuple[str, list[str], int]:
    """One problem: (question, reasoning lines, answer). 2–4 calculator steps, every result a positive integer."""
    name, gender = rng.choice(_NAMES)
    he, him, his, himself = _PRONOUNS[gender]
    friend = rng.choice([n for n, _ in _NAMES if n != name])
    words = {"Name": name, "he": he, "He": _capitalize(he), "him": him, "his": his, "himself": himself}
    words |= {"Friend": friend, "obj": rng.choice(_OBJECTS)}

    value = rng.randint(5, 60)
    sentences = [rng.choice(_OPENINGS).format(a=value, **words)]
    lines: list[str] = []
    steps, n_steps = 0, rng.randint(2, 4)
    while steps < n_steps:
        divisors = [k for k in range(2, 10) if value % k == 0]
        ops = ["add"] + ["sub"] * (value >= 3) + ["mul"] * (value <= 200) + ["div"] * bool(divisors)
        ops += ["groups"] * (n_steps - steps >= 2)
        op = rng.choice(ops)
        if op == "groups":  # two notes: the packs' total, then the sum
            k, m = rng.randint(2, 6), rng.randint(2, 12)
            p, r = k * m, value + k * m
            fill = dict(words, a=value, k=k, m=m, p=p, r=r, box=rng.choice(_CONTAINERS))
            sentences.append(rng.choice(_GROUPS_Q).format(**fill))
            lines += [_GROUPS_R[0].format(**fill), _GROUPS_R[1].format(**fill)]
            value, steps = r, steps + 2
            continue
        if op == "add":
            n = rng.randint(2, 30)
            r, questions, reasons = value + n, _ADD_Q, _ADD_R
        elif op == "sub":
            n = rng.randint(1, value - 1)
            r, questions, reasons = value - n, _SUB_Q, _SUB_R
        elif op == "mul":
            n = rng.randint(2, 4)
            r, questions, reasons = value * n, _MUL_Q, _MUL_R
        else:
            n = rng.choice(divisors)
            r, questions, reasons = value // n, _DIV_Q, _DIV_R
        fill = dict(words, a=value, n=n, r=r)
        sentences.append(rng.choice(questions).format(**fill))
        lines.append(_capitalize(rng.choice(reasons).format(**fill)))
        value, steps = r, steps + 1
    sentences.append(rng.choice(_CLOSINGS).format(**words))
    return " ".join(sentences), lines, value


def _synthetic_rng(seed: int, split: str, index: int, attempt: int) -> random.Random:
    key = hashlib.sha256(f"kava-synthetic/{seed}/{split}/{index}/{attempt}".encode()).digest()
    return random.Random(int.from_bytes(key[:8], "little"))


def _split_of(question: str) -> str:
    bucket = hashlib.sha256(question.encode("utf-8")).digest()[0] % len(SYNTHETIC_SPLITS)
    return SYNTHETIC_SPLITS[bucket]


def synthetic_rows(n: int, *, seed: int = 0, split: str = "train", strip_calculator: bool = False) -> RowSet:
    """``n`` seeded GSM8K-shaped arithmetic word problems, ids ``synthetic/<split>/<index:06d>``.

    Row ``i`` depends only on (seed, split, i), so a longer run extends a shorter one. Splits are disjoint by
    construction: a question belongs to the split its sha256 picks, and each split draws (with its own seeds)
    until it gets one of its own (about three draws a row).
    """
    if split not in SYNTHETIC_SPLITS:
        raise ConfigError(
            f"Expected --split to be one of {list(SYNTHETIC_SPLITS)} for synthetic data. Got {split!r} instead."
        )
    if n < 0:
        raise ConfigError(f"Expected --limit >= 0. Got {n} instead.")

    def build(index: int) -> ReasoningRow:
        for attempt in range(10_000):
            question, lines, answer = _synthetic_problem(_synthetic_rng(seed, split, index, attempt))
            if _split_of(question) == split:
                reasoning = "\n".join(lines)
                if strip_calculator:
                    reasoning = strip_calculator_notes(reasoning)
                return ReasoningRow(make_sample_id("synthetic", split, index), question, reasoning, str(answer))
        raise AssertionError("unreachable: a third of all questions belong to each split")  # pragma: no cover

    return RowSet(f"synthetic/{split}", tuple(build(i) for i in range(n)))
