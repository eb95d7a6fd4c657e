"""Seeded synthetic GSM8K-shaped problems: multi-step integer arithmetic with chain-of-thought lines and ``#### N``.

The embedded default run needs data that no hub provides offline; these rows look like GSM8K (calculator notes
``<<48/2=24>>`` included), are exact, and are the same for the same (seed, split, index, difficulty) on any machine.
A :class:`Difficulty` says how many steps a problem takes, which operations it uses and the ranges of its numbers;
``Difficulty.parse`` reads its one-line form (``easy``, or ``steps=1-2,ops=+-,start=2-9,operand=1-9``) for the CLI's
``--difficulty`` and the ``data.difficulty`` key of ``kava run``.
"""

from __future__ import annotations

import hashlib
import random
import re
from dataclasses import dataclass

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


# ---------------------------------------------------------------------------------------------------------------------
# Difficulty

OPERATIONS = {
    "+": "add an amount",
    "-": "take an amount away (at least 1 is left, and only from 3 up)",
    "*": "multiply (only amounts up to 200)",
    "/": "divide into equal groups and keep one (only evenly)",
    "g": "buy k packs of m and add them (two steps: k*m, then the sum)",
}
"""The operations of ``ops=``, by symbol, in the order a problem draws from them."""

_MUL_LIMIT = 200  # a multiplication only applies to amounts up to this
_SUB_FLOOR = 3  # a subtraction only applies to amounts of at least this
_OWN_RANGES = {"+": (2, 30), "-": (1, 10**9), "*": (2, 4), "/": (2, 9), "packs": (2, 6), "each": (2, 12)}
"""The ``default`` preset's operand ranges (``operand`` unset); a subtraction also stops at the amount less one."""
_EXAMPLE = {"steps": "steps=1-2", "ops": "ops=+-", "start": "start=2-9", "operand": "operand=1-9"}
_KEYS = tuple(_EXAMPLE)
_OPS_HELP = "+ add, - take away, * multiply, / divide, g buy packs"
_RANGE = re.compile(r"^(\d+)(?:-(\d+))?$")


@dataclass(frozen=True)
class Difficulty:
    """How hard the synthetic problems are: steps per problem, the operations drawn, the ranges of the numbers.

    Whatever the setting, every result is a positive integer (see ``OPERATIONS``). ``Difficulty()`` is the
    ``default`` preset: the generator every earlier store, split and pinned row was made with. Its one-line form
    (``str()``, read back by :meth:`parse`) is a preset name or ``steps=1-2,ops=+-,start=2-9,operand=1-9``.
    """

    steps: tuple[int, int] = (2, 4)
    """Calculator steps per problem, lowest and highest (a ``g`` step writes two notes and counts as two)."""
    ops: str = "+-*/g"
    """The operations drawn from, by symbol (see OPERATIONS); stored in the order ``+-*/g``."""
    start: tuple[int, int] = (5, 60)
    """The amount a problem starts with, lowest and highest."""
    operand: tuple[int, int] | None = None
    """The range of every operand (``*``, ``/`` and packs use 2 and up); None: each operation's own, as the
    ``default`` preset has them: + 2-30, - 1 to the amount less one, * 2-4, / 2-9, g 2-6 packs of 2-12."""

    def __post_init__(self) -> None:
        p: list[str] = []
        for key in ("steps", "start", "operand"):
            value = getattr(self, key)
            if value is None and key == "operand":
                continue
            if not (isinstance(value, (tuple, list)) and len(value) == 2 and all(type(v) is int for v in value)
                    and 1 <= value[0] <= value[1]):
                p.append(f"Expected difficulty {key} as LO-HI with 1 <= LO <= HI. Got {key}={_show(value)} instead. "
                         f"Write e.g. {_EXAMPLE[key]}.")
            else:
                object.__setattr__(self, key, tuple(value))  # a YAML or JSON list reads back as the same value
        ops = self.ops if isinstance(self.ops, str) else ""
        unknown = sorted(set(ops) - set(OPERATIONS))
        if not ops or unknown or len(set(ops)) != len(ops):
            p.append(f"Expected difficulty ops as distinct symbols of {''.join(OPERATIONS)}. Got ops={self.ops!r} "
                     f"instead. Write e.g. ops=+- ({_OPS_HELP}).")
        else:
            object.__setattr__(self, "ops", "".join(o for o in OPERATIONS if o in ops))
        if not p and self.ops == "g" and all(n % 2 for n in range(self.steps[0], self.steps[1] + 1)):
            p.append(f"Expected difficulty steps to allow an even count with ops=g (each g writes two steps). Got "
                     f"steps={_show(self.steps)} instead. Widen steps or add another operation.")
        if p:
            raise ConfigError.from_problems(p)

    @classmethod
    def preset(cls, name: str) -> Difficulty:
        """The preset ``name`` (``default``: the generator as it always was; ``easy``: small enough for a tiny
        teacher to learn in a minute)."""
        if name not in DIFFICULTY_PRESETS:
            raise ConfigError(f"Expected a difficulty preset of {', '.join(DIFFICULTY_PRESETS)}. Got {name!r} "
                              "instead.")
        return DIFFICULTY_PRESETS[name]

    @classmethod
    def parse(cls, text: str | Difficulty) -> Difficulty:
        """A preset name, or ``key=value`` pairs joined by commas (``steps=1-2,ops=+-,start=2-9,operand=1-9``);
        keys left out keep the ``default`` preset's value, and a range may be one number (``steps=2``)."""
        if isinstance(text, Difficulty):
            return text
        text = str(text).strip()
        if text in DIFFICULTY_PRESETS:
            return DIFFICULTY_PRESETS[text]
        values: dict[str, object] = {}
        p: list[str] = []
        for part in text.split(","):
            key, eq, value = (x.strip() for x in part.partition("="))
            if not eq or key not in _KEYS:
                where = f" in {text!r}" if part.strip() != text else ""
                p.append(f"Expected difficulty to be a preset ({', '.join(DIFFICULTY_PRESETS)}) or key=value pairs "
                         f"of {', '.join(_KEYS)}, such as {','.join(_EXAMPLE.values())!r}. Got {part.strip()!r}{where} "
                         "instead.")
            elif key in values:
                p.append(f"Expected each difficulty key once. Got {key} twice in {text!r}. Keep one.")
            elif key == "ops":
                values[key] = value
            elif m := _RANGE.match(value):
                values[key] = (int(m.group(1)), int(m.group(2) or m.group(1)))
            else:
                p.append(f"Expected difficulty {key} as LO-HI or N. Got {key}={value!r} instead. Write e.g. "
                         f"{_EXAMPLE[key]}.")
        if p:
            raise ConfigError.from_problems(p)
        return cls(**values)  # type: ignore[arg-type]

    @property
    def spec(self) -> str:
        """Every setting in the one-line form: ``steps=2-4,ops=+-*/g,start=5-60`` (``operand`` only when set)."""
        parts = [f"steps={_show(self.steps)}", f"ops={self.ops}", f"start={_show(self.start)}"]
        return ",".join(parts + ([f"operand={_show(self.operand)}"] if self.operand is not None else []))

    @property
    def tag(self) -> str:
        """The preset's name, or the first 8 hex digits of the spec's sha256."""
        preset = next((name for name, d in DIFFICULTY_PRESETS.items() if d == self), None)
        return preset or hashlib.sha256(self.spec.encode()).hexdigest()[:8]

    @property
    def dataset_name(self) -> str:
        """What rows of this difficulty are named by (``synthetic/train/000000``, ``synthetic-easy/train/...``):
        two difficulties never share a sample id, so a store or split of one can't pass for the other."""
        return "synthetic" if self == DIFFICULTY_PRESETS["default"] else f"synthetic-{self.tag}"

    def __str__(self) -> str:
        tag = self.tag
        return tag if tag in DIFFICULTY_PRESETS else self.spec


DIFFICULTY_PRESETS = {
    "default": Difficulty(),
    "easy": Difficulty(steps=(1, 2), ops="+-", start=(2, 9), operand=(1, 9)),
}
"""Named difficulties. ``easy`` (1-2 add/subtract steps on amounts up to 27): a tiny teacher trained 600 steps
reaches about 80% in a minute on 2 CPU cores, where ``default`` stays below 5%."""


def _show(value: object) -> str:
    if isinstance(value, (tuple, list)) and len(value) == 2:
        return f"{value[0]}-{value[1]}"
    return repr(value)


def difficulty_problems(flag: str, difficulty: str, dataset: str) -> list[str]:
    """A config's problems with its difficulty (``flag`` as the user wrote it): unreadable, or set for a dataset
    that is not synthetic."""
    try:
        parsed = Difficulty.parse(difficulty)
    except ConfigError as e:
        return [f"{flag}: {e}"]
    if parsed != DIFFICULTY_PRESETS["default"] and dataset != "synthetic":
        return [(f"{flag}: expected the synthetic dataset (a difficulty only applies to generated problems). Got "
                 f"dataset {dataset!r} instead. Drop {flag}.")]
    return []


def difficulty_details(dataset: str, difficulty: str | Difficulty) -> dict[str, str]:
    """What a store's manifest or a run's splits record about the difficulty: its full spec, for synthetic data."""
    return {"difficulty": Difficulty.parse(difficulty).spec} if dataset == "synthetic" else {}


# ---------------------------------------------------------------------------------------------------------------------
# The generator


def _capitalize(text: str) -> str:
    return text[:1].upper() + text[1:]


def _operand_ranges(d: Difficulty) -> dict[str, tuple[int, int]]:
    if d.operand is None:
        return _OWN_RANGES
    lo, hi = d.operand
    at_least_2 = (max(lo, 2), hi)  # multiplying, dividing or buying packs by 1 says nothing
    return {"+": (lo, hi), "-": (lo, hi), "*": at_least_2, "/": at_least_2, "packs": at_least_2, "each": at_least_2}


def _synthetic_problem(rng: random.Random, d: Difficulty) -> tuple[str, list[str], int] | None:
    """One problem: (question, reasoning lines, answer), every result a positive integer; None when no allowed
    operation fits the amount reached (only possible without ``+``). Draws in the same order for every difficulty,
    so ``Difficulty()`` makes the rows it always made."""
    name, gender = rng.choice(_NAMES)
    he, him, his, himself = _PRONOUNS[gender]
    friend = rng.choice([n for n, _ in _NAMES if n != name])
    words = {"Name": name, "he": he, "He": _capitalize(he), "him": him, "his": his, "himself": himself}
    words |= {"Friend": friend, "obj": rng.choice(_OBJECTS)}
    ranges = _operand_ranges(d)
    (sub_lo, sub_hi), (mul_lo, mul_hi), (div_lo, div_hi) = ranges["-"], ranges["*"], ranges["/"]

    value = rng.randint(*d.start)
    sentences = [rng.choice(_OPENINGS).format(a=value, **words)]
    lines: list[str] = []
    steps, n_steps = 0, rng.randint(*d.steps)
    while steps < n_steps:
        divisors = [k for k in range(div_lo, div_hi + 1) if value % k == 0]
        fits = {"+": True, "-": value >= max(_SUB_FLOOR, sub_lo + 1), "*": value <= _MUL_LIMIT and mul_lo <= mul_hi,
                "/": bool(divisors), "g": n_steps - steps >= 2 and ranges["packs"][0] <= ranges["packs"][1]}
        ops = [o for o in d.ops if fits[o]]
        if not ops:
            return None
        op = rng.choice(ops)
        if op == "g":  # two notes: the packs' total, then the sum
            k, m = rng.randint(*ranges["packs"]), rng.randint(*ranges["each"])
            p, r = k * m, value + k * m
            fill = dict(words, a=value, k=k, m=m, p=p, r=r, box=rng.choice(_CONTAINERS))
            sentences.append(rng.choice(_GROUPS_Q).format(**fill))
            lines += [_GROUPS_R[0].format(**fill), _GROUPS_R[1].format(**fill)]
            value, steps = r, steps + 2
            continue
        questions: tuple[str, ...]  # the operation's question sentences and reasoning lines
        reasons: tuple[str, ...]
        if op == "+":
            n = rng.randint(*ranges["+"])
            r, questions, reasons = value + n, _ADD_Q, _ADD_R
        elif op == "-":
            n = rng.randint(sub_lo, min(sub_hi, value - 1))
            r, questions, reasons = value - n, _SUB_Q, _SUB_R
        elif op == "*":
            n = rng.randint(mul_lo, mul_hi)
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


def _synthetic_rng(seed: int, split: str, index: int, attempt: int, d: Difficulty) -> random.Random:
    # The default's key is the one it always had; any other difficulty draws from its own streams.
    tail = "" if d == DIFFICULTY_PRESETS["default"] else f"/{d.spec}"
    key = hashlib.sha256(f"kava-synthetic/{seed}/{split}/{index}/{attempt}{tail}".encode()).digest()
    return random.Random(int.from_bytes(key[:8], "little"))


def _split_of(question: str) -> str:
    bucket = hashlib.sha256(question.encode("utf-8")).digest()[0] % len(SYNTHETIC_SPLITS)
    return SYNTHETIC_SPLITS[bucket]


_ATTEMPTS = 10_000


def synthetic_rows(
    n: int,
    *,
    seed: int = 0,
    split: str = "train",
    strip_calculator: bool = False,
    difficulty: str | Difficulty = "default",
) -> RowSet:
    """``n`` seeded GSM8K-shaped arithmetic word problems, ids ``<difficulty.dataset_name>/<split>/<index:06d>``
    (``synthetic/train/000000`` at the default difficulty).

    Row ``i`` depends only on (seed, split, difficulty) and the rows before it, so a longer run extends a shorter one.
    Splits are disjoint by construction: a question belongs to the split its sha256 picks, and each split draws (with
    its own seeds) until it gets one of its own (about three draws a row). Within a split no question repeats: a draw
    that repeats an earlier row's question is drawn again. The ``default`` difficulty is the exception, so that it
    keeps the rows it always had; its questions are many enough that the first repeat comes after about 6,000 rows
    (test) to 20,000 (train). ``difficulty`` is a :class:`Difficulty` or its one-line form (``Difficulty.parse``).
    """
    if split not in SYNTHETIC_SPLITS:
        raise ConfigError(
            f"Expected --split to be one of {list(SYNTHETIC_SPLITS)} for synthetic data. Got {split!r} instead."
        )
    if n < 0:
        raise ConfigError(f"Expected --limit >= 0. Got {n} instead.")
    d = Difficulty.parse(difficulty)
    # Smaller settings have few enough questions that a pool of 2,000 repeats some (easy: ~6), and a repeat that the
    # run's shuffle puts in both the teacher and the student split is a leak; the default's repeats are kept (above).
    seen: set[str] | None = None if d == DIFFICULTY_PRESETS["default"] else set()

    def build(index: int) -> ReasoningRow:
        for attempt in range(_ATTEMPTS):
            problem = _synthetic_problem(_synthetic_rng(seed, split, index, attempt, d), d)
            if problem is None or _split_of(problem[0]) != split or (seen is not None and problem[0] in seen):
                continue
            question, lines, answer = problem
            if seen is not None:
                seen.add(question)
            reasoning = "\n".join(lines)
            if strip_calculator:
                reasoning = strip_calculator_notes(reasoning)
            return ReasoningRow(make_sample_id(d.dataset_name, split, index), question, reasoning, str(answer))
        raise ConfigError(
            f"Expected difficulty {d} to make {n} distinct problems of the {split} split. Got {index} before "
            f"{_ATTEMPTS} draws in a row failed: it has too few problems, or its operations rarely fit its ranges. "
            "Add operations (+ always fits) or steps, widen start and operand, or ask for fewer rows."
        )

    return RowSet(f"{d.dataset_name}/{split}", tuple(build(i) for i in range(n)))


# ---------------------------------------------------------------------------------------------------------------------
# Task families: several difficulties mixed in one split, each row tagged with the one it was drawn from

_FAMILY_NAME = re.compile(r"^[A-Za-z0-9_+]{1,40}$")
FAMILY_EXAMPLE = "{add: 'steps=1-2,ops=+', sub: 'steps=1-2,ops=-,start=10-19'}"


def family_problems(flag: str, families: object, dataset: str, difficulty: str) -> list[str]:
    """A config's problems with its task families (``flag`` as the user wrote it): not a mapping of names to
    difficulties, a bad name or difficulty, two families of one difficulty, or set beside a difficulty or for data
    that is not synthetic."""
    if not families:
        return []
    if not isinstance(families, dict):
        return [f"{flag}: expected a mapping of family names to difficulties, such as {FAMILY_EXAMPLE}. Got "
                f"{families!r} instead."]
    p: list[str] = []
    if dataset != "synthetic":
        p.append(f"{flag}: expected the synthetic dataset (families are generated problems). Got dataset {dataset!r} "
                 f"instead. Drop {flag}.")
    try:
        both = Difficulty.parse(difficulty) != DIFFICULTY_PRESETS["default"]
    except ConfigError:  # reported by difficulty_problems
        both = True
    if both:
        p.append(f"Can't set both {flag} and data.difficulty (each family has its own). Choose one.")
    seen: dict[Difficulty, str] = {}
    for name, spec in families.items():
        if not isinstance(name, str) or not _FAMILY_NAME.match(name):
            p.append(f"{flag}: expected family names of letters, digits, '_' and '+' (at most 40). Got {name!r} "
                     "instead.")
        try:
            d = Difficulty.parse(str(spec))
        except ConfigError as e:
            p.append(f"{flag}.{name}: {e}")
            continue
        if d in seen:
            p.append(f"{flag}: families {seen[d]!r} and {name!r} have the same difficulty ({d}). Give each family "
                     "its own.")
        seen[d] = str(name)
    return p


def family_rows(n: int, *, seed: int = 0, split: str = "train",
                families: dict[str, str | Difficulty]) -> tuple[RowSet, list[str]]:
    """``n`` rows mixing ``families`` (name → difficulty) equally, and each row's family.

    The families take turns (row ``i`` is family ``i % K``'s next row; the first ``n % K`` families get one row
    more), so any prefix of the rows mixes them evenly too. Each family's rows are :func:`synthetic_rows` of its
    difficulty, so their ids (``synthetic-<tag>/<split>/<index>``) never collide. Two families that draw the same
    question are refused: the question's family would be ambiguous.
    """
    if not families:
        raise ConfigError(f"Expected at least one family, such as {FAMILY_EXAMPLE}. Got none.")
    names = list(families)
    k = len(names)
    counts = [n // k + (1 if i < n % k else 0) for i in range(k)]
    drawn = {name: synthetic_rows(c, seed=seed, split=split, difficulty=families[name])
             for name, c in zip(names, counts)}
    rows: list[ReasoningRow] = []
    tags: list[str] = []
    owner: dict[str, str] = {}
    for i in range(max(counts, default=0)):
        for name in names:
            if i < len(drawn[name]):
                row = drawn[name][i]
                if owner.get(row.question, name) != name:
                    raise ConfigError(
                        f"Families {owner[row.question]!r} and {name!r} both drew the question "
                        f"{row.question[:60]!r}...: its family is ambiguous. Give the families operations that "
                        "don't overlap (e.g. ops=+ and ops=-)."
                    )
                owner[row.question] = name
                rows.append(row)
                tags.append(name)
    return RowSet(f"synthetic-families/{split}", tuple(rows)), tags
