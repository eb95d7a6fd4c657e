"""The synthetic generator's difficulty: presets, the one-line form, rows that keep to their ranges (recomputed from
the question alone), seeded determinism, the default's rows pinned, and names that keep two difficulties apart in
rows, stores, splits and eval outputs."""

from __future__ import annotations

import json
import re
from fractions import Fraction

import pytest

from kava.core.data import load_rows
from kava.core.errors import ConfigError, StoreError
from kava.core.synthetic import (
    DIFFICULTY_PRESETS,
    OPERATIONS,
    Difficulty,
    synthetic_rows,
)
from kava.distill.config import DistillConfig
from kava.distill.evaluate import EvalConfig, run_eval
from kava.extract.config import ExtractConfig
from kava.extract.recipe import run_extract
from kava.kvstore import KVStore
from kava.pipelines.config import DataSpec, parse_config
from kava.pipelines.splits import make_splits

STORIES = "models/stories260K_hf_derived"
EASY = "steps=1-2,ops=+-,start=2-9,operand=1-9"

# dataset_fingerprint of rows made by the generator before it had a difficulty (same seeds, same calls): the default
# preset must keep making exactly these rows, or every store and split made so far would be another dataset.
PINNED = {
    ("train", 0, 300, False): "edd17ff31b3912048b3a35cc75f8a0d4f97638ef3227f50c6a65f0940c105d6a",
    ("validation", 0, 300, False): "5ba764f980ae8ff7699b5b60de4a27ae7d5dc7777f9a5853b4a3083981a20f6e",
    ("test", 0, 300, False): "cb85592b0557f555cb1492583a4fb774ae4fecbfd0a2621b1e7860427a7c8b31",
    ("train", 7, 100, False): "2bab71a81c7c5ce2296c9ea7f40489008a25f5ddfe8f2072efe4529c407e4597",
    ("train", 0, 100, True): "76cc2e3afed6d656752302179639a09b263ee4a839f199a13c86101702a87854",
}


# ---------------------------------------------------------------------------------------------------------------------
# Presets and the one-line form


def test_presets():
    default, easy = Difficulty.preset("default"), Difficulty.preset("easy")
    assert default == Difficulty() == DIFFICULTY_PRESETS["default"]
    assert (default.steps, default.ops, default.start, default.operand) == ((2, 4), "+-*/g", (5, 60), None)
    assert (easy.steps, easy.ops, easy.start, easy.operand) == ((1, 2), "+-", (2, 9), (1, 9))
    assert (str(default), str(easy)) == ("default", "easy")
    assert easy.spec == EASY and default.spec == "steps=2-4,ops=+-*/g,start=5-60"
    assert set(default.ops) == set(OPERATIONS)
    with pytest.raises(ConfigError, match=r"^Expected a difficulty preset of default, easy\. Got 'hard' instead\.$"):
        Difficulty.preset("hard")


@pytest.mark.parametrize("difficulty", [
    Difficulty(), Difficulty.preset("easy"), Difficulty(steps=(3, 5), ops="*/g", start=(10, 20), operand=(2, 5)),
    Difficulty(steps=(1, 1), ops="-", start=(7, 7)),
])
def test_one_line_form_round_trips(difficulty):
    assert Difficulty.parse(str(difficulty)) == difficulty
    assert Difficulty.parse(difficulty.spec) == difficulty
    assert Difficulty.parse(difficulty) is difficulty


def test_parse_fills_in_the_default_and_normalises():
    assert Difficulty.parse("steps=3") == Difficulty(steps=(3, 3))
    assert Difficulty.parse(" ops = -+ , start=2-9 ") == Difficulty(ops="+-", start=(2, 9))
    assert Difficulty.parse(EASY) is not DIFFICULTY_PRESETS["easy"]
    assert Difficulty.parse(EASY) == Difficulty.parse("easy")
    assert str(Difficulty.parse(EASY)) == "easy"  # a spec equal to a preset is named by it
    assert Difficulty(steps=[1, 2], start=[2, 9]) == Difficulty(steps=(1, 2), start=(2, 9))  # a YAML/JSON list
    assert hash(Difficulty(ops="-+")) == hash(Difficulty(ops="+-"))


@pytest.mark.parametrize("text, match", [
    ("hard", (r"^Expected difficulty to be a preset \(default, easy\) or key=value pairs of steps, ops, start, "
              r"operand, such as 'steps=1-2,ops=\+-,start=2-9,operand=1-9'\. Got 'hard' instead\.$")),
    ("steps=1,level=3", r"Got 'level=3' in 'steps=1,level=3' instead\."),
    ("", r"Expected difficulty to be a preset"),
    ("steps=2-1", (r"^Expected difficulty steps as LO-HI with 1 <= LO <= HI\. Got steps=2-1 instead\. "
                   r"Write e.g\. steps=1-2\.$")),
    ("start=0-5", r"^Expected difficulty start as LO-HI with 1 <= LO <= HI\. Got start=0-5 instead\."),
    ("operand=a", r"^Expected difficulty operand as LO-HI or N\. Got operand='a' instead\. Write e.g\. operand=1-9\.$"),
    ("ops=+x", (r"^Expected difficulty ops as distinct symbols of \+-\*/g\. Got ops='\+x' instead\. Write e\.g\. "
                r"ops=\+- \(\+ add, - take away, \* multiply, / divide, g buy packs\)\.$")),
    ("ops=++", r"Expected difficulty ops as distinct symbols"),
    ("ops=", r"Expected difficulty ops as distinct symbols"),
    ("steps=1,steps=2", r"^Expected each difficulty key once\. Got steps twice in 'steps=1,steps=2'\. Keep one\.$"),
    ("ops=g,steps=3", (r"^Expected difficulty steps to allow an even count with ops=g \(each g writes two steps\)\. "
                       r"Got steps=3-3 instead\.")),
    ("steps=0,ops=x", r"^Found 2 problems:\n  - Expected difficulty steps.*\n  - Expected difficulty ops"),
])
def test_parse_errors_name_the_field_and_the_fix(text, match):
    with pytest.raises(ConfigError, match=match):
        Difficulty.parse(text)


def test_constructor_checks_like_the_parser():
    with pytest.raises(ConfigError, match=r"Expected difficulty steps as LO-HI.*Got steps=True"):
        Difficulty(steps=True)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=r"Expected difficulty operand as LO-HI.*Got operand=\(1, 2, 3\)"):
        Difficulty(operand=(1, 2, 3))  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------------------------------
# Rows: pinned, seeded, in range


@pytest.mark.parametrize("key", list(PINNED))
def test_default_preset_makes_the_rows_it_always_made(key):
    split, seed, n, strip = key
    for difficulty in ("default", Difficulty(), "steps=2-4,ops=+-*/g,start=5-60"):
        rows = synthetic_rows(n, seed=seed, split=split, strip_calculator=strip, difficulty=difficulty)
        assert rows.fingerprint == PINNED[key]
        assert rows.name == f"synthetic/{split}" and rows[0].sample_id == f"synthetic/{split}/000000"


@pytest.mark.parametrize("difficulty", ["default", "easy", "steps=3-5,ops=*/g,start=10-20,operand=2-5"])
def test_same_seed_and_difficulty_make_the_same_rows(difficulty):
    a, b = synthetic_rows(60, seed=3, difficulty=difficulty), synthetic_rows(60, seed=3, difficulty=difficulty)
    assert a.rows == b.rows and a.fingerprint == b.fingerprint
    assert synthetic_rows(20, seed=3, difficulty=difficulty).rows == a.rows[:20]  # a longer run extends a shorter one
    assert synthetic_rows(60, seed=4, difficulty=difficulty).fingerprint != a.fingerprint
    assert load_rows("synthetic", limit=60, seed=3, difficulty=difficulty).rows == a.rows


_OPENING_NUMBER = re.compile(r"\d+")
_SENTENCE_OPS = [  # (symbol, pattern of the question sentence); the groups sentence first: it also says "buys"
    ("g", re.compile(r"(?:buys|gets) (\d+) (?:packs|boxes|bags) "
                     r"(?:of \w+ with (\d+) in each|that hold (\d+) \w+ each)\.$")),
    ("+", re.compile(r"(?:(?:buys|finds) (\d+) more \w+|gives (?:him|her) (\d+) \w+)\.$")),
    ("-", re.compile(r"(?:gives (\d+) \w+ to \w+|loses (\d+) of the \w+|sells (\d+) \w+)\.$")),
    ("*", re.compile(r"(\d+) times (?:as large|its size)\.$")),
    ("/", re.compile(r"(?:into (\d+) equal groups and keeps one group|equally among (\d+) kids, \w+ included, and "
                     r"keeps \w+ share)\.$")),
]
_NOTE = re.compile(r"<<(\d+)([-+*/])(\d+)=(\d+)>>")


def _solve_question(question: str) -> tuple[int, list[tuple[str, tuple[int, ...]]], int]:
    """Read a problem from its question alone: (start, [(op, operands)], answer), the answer recomputed."""
    sentences = re.split(r"(?<=[.?]) ", question)
    assert sentences[-1].startswith("How many") and sentences[-1].endswith("?")
    start = value = int(_OPENING_NUMBER.search(sentences[0]).group(0))
    steps = []
    for sentence in sentences[1:-1]:
        op, numbers = next((op, [int(g) for g in m.groups() if g is not None])
                           for op, pattern in _SENTENCE_OPS if (m := pattern.search(sentence)))
        steps.append((op, tuple(numbers)))
        if op == "g":
            value += numbers[0] * numbers[1]
        elif op == "+":
            value += numbers[0]
        elif op == "-":
            value -= numbers[0]
        elif op == "*":
            value *= numbers[0]
        else:
            assert value % numbers[0] == 0
            value //= numbers[0]
        assert value >= 1
    return start, steps, value


@pytest.mark.parametrize("difficulty", [
    "default", "easy", "steps=3-5,ops=*/g,start=10-20,operand=2-5", "steps=1,ops=-,start=5-9,operand=1-3",
    "steps=4-6,ops=+g,start=1-3,operand=10-12",
])
def test_rows_keep_to_their_difficulty(difficulty):
    d = Difficulty.parse(difficulty)
    own = {"+": (2, 30), "*": (2, 4), "/": (2, 9), "g": (2, 12)}  # the default's ranges (g: packs 2-6, 2-12 each)
    seen_ops, seen_steps = set(), set()
    rows = synthetic_rows(200, seed=1, difficulty=d)
    assert len({r.question for r in rows}) == len(rows) or d == Difficulty()
    for row in rows:
        start, steps, answer = _solve_question(row.question)
        assert str(answer) == row.answer  # recomputed from the question alone
        assert d.start[0] <= start <= d.start[1]
        n_steps = sum(2 if op == "g" else 1 for op, _ in steps)
        assert d.steps[0] <= n_steps <= d.steps[1]
        seen_steps.add(n_steps)
        for op, numbers in steps:
            assert op in d.ops
            seen_ops.add(op)
            if d.operand is not None:
                lo = d.operand[0] if op in "+-" else max(d.operand[0], 2)
                assert all(lo <= n <= d.operand[1] for n in numbers), (op, numbers, row.question)
            elif op == "g":
                assert 2 <= numbers[0] <= 6 and 2 <= numbers[1] <= 12
            elif op != "-":
                assert own[op][0] <= numbers[0] <= own[op][1]
        # The reasoning is the same computation, one calculator note a step (two for g), ending at the answer.
        notes = _NOTE.findall(row.reasoning)
        assert len(notes) == n_steps == len(row.reasoning.splitlines())
        for a, op, b, r in notes:
            x, y = int(a), int(b)
            assert {"+": x + y, "-": x - y, "*": x * y, "/": Fraction(x, y)}[op] == int(r) >= 1
        assert notes[-1][3] == row.answer
    assert seen_ops == set(d.ops) and seen_steps == set(range(d.steps[0], d.steps[1] + 1))


def test_a_difficulty_that_cannot_make_the_rows_asked_for_says_how_to_fix_it():
    # One step of +1 on 2: only names, objects and sentence templates vary, a few thousand questions in all.
    with pytest.raises(ConfigError, match=r"^Expected difficulty steps=1-1,ops=\+,start=2-2,operand=1-1 to make "
                                          r"6000 distinct problems of the train split\. Got \d+ before 10000 draws"
                                          r".*Add operations \(\+ always fits\)"):
        synthetic_rows(6000, difficulty="steps=1,ops=+,start=2,operand=1")
    with pytest.raises(ConfigError, match=r"to make 3 distinct problems.*Got 0 before"):
        synthetic_rows(3, difficulty="ops=-,start=2")  # a subtraction needs 3 or more: nothing fits


# ---------------------------------------------------------------------------------------------------------------------
# Names, fingerprints and split hashes that tell difficulties apart


def test_another_difficulty_is_another_dataset():
    default, easy = synthetic_rows(200), synthetic_rows(200, difficulty="easy")
    custom = synthetic_rows(200, difficulty="steps=1-3,ops=+-,start=2-9,operand=1-9")
    assert easy.name == "synthetic-easy/train" and easy[5].sample_id == "synthetic-easy/train/000005"
    assert re.fullmatch(r"synthetic-[0-9a-f]{8}/train/000005", custom[5].sample_id)
    assert len({default.fingerprint, easy.fingerprint, custom.fingerprint}) == 3
    assert not {r.sample_id for r in default} & {r.sample_id for r in easy}
    # Splits stay disjoint, and no question repeats within a split (easy repeats ~6 in 2,000 rows otherwise).
    train, test = synthetic_rows(2000, difficulty="easy"), synthetic_rows(500, split="test", difficulty="easy")
    assert len({r.question for r in train}) == 2000 and not {r.question for r in train} & {r.question for r in test}


def test_run_splits_record_the_difficulty_and_hash_differently(tmp_path):
    spec = {"pool_size": 60, "eval_size": 20, "teacher_fraction": 0.5}
    records = {d: make_splits(DataSpec(difficulty=d, **spec), tmp_path / d) for d in ("default", "easy")}
    assert records["easy"]["difficulty"] == EASY
    assert records["default"]["difficulty"] == Difficulty().spec
    for role in ("teacher-train", "student-train", "eval"):
        assert records["easy"]["splits"][role]["questions_hash"] != records["default"]["splits"][role]["questions_hash"]
    lines = (tmp_path / "easy" / "data" / "eval.jsonl").read_text().splitlines()
    assert json.loads(lines[0])["source_id"] == "synthetic-easy/test/000000"
    assert make_splits(DataSpec(difficulty="easy", **spec), tmp_path / "again") == records["easy"]  # seeded


# ---------------------------------------------------------------------------------------------------------------------
# Configs and commands


def test_configs_check_the_difficulty_with_the_flag_the_user_typed(tmp_path):
    bad = r"^--difficulty: Expected difficulty to be a preset \(default, easy\)"
    with pytest.raises(ConfigError, match=bad):
        ExtractConfig.from_dict(dict(teacher="t", store="s", difficulty="hard")).validate()
    with pytest.raises(ConfigError, match=bad):
        EvalConfig.from_dict(dict(model="m", dataset="synthetic", difficulty="hard")).validate()
    with pytest.raises(ConfigError, match=bad):
        DistillConfig.from_dict(dict(student="tiny-qwen2", out="o", difficulty="hard")).validate()
    wrong = (r"^--difficulty: expected the synthetic dataset \(a difficulty only applies to generated problems\)\. "
             r"Got dataset 'gsm8k' instead\. Drop --difficulty\.$")
    with pytest.raises(ConfigError, match=wrong):
        ExtractConfig.from_dict(dict(teacher="t", store="s", dataset="gsm8k", difficulty="easy")).validate()
    # The default is no setting at all.
    ExtractConfig.from_dict(dict(teacher="t", store="s", dataset="gsm8k")).validate()
    run = {"teachers": [{"name": "t", "model": "m"}], "variants": [{"name": "ce"}], "baseline": "ce",
           "data": {"teacher_fraction": 0, "difficulty": "steps=9-1"}}
    with pytest.raises(ConfigError, match=r"config: data\.difficulty: Expected difficulty steps as LO-HI"):
        parse_config(run)
    run["data"]["difficulty"] = "easy"
    assert parse_config(run).data.difficulty == "easy"
    run["train"] = {"distill": {"difficulty": "easy"}}
    with pytest.raises(ConfigError, match=r"train\.distill: 'difficulty' is set by train\.difficulty or the runner"):
        parse_config(run)
    assert EvalConfig.from_dict(dict(model=str(tmp_path), dataset="synthetic", difficulty="easy")).out_path == \
        tmp_path / "eval-synthetic-easy-test.jsonl"


def test_extraction_records_the_difficulty_and_a_store_refuses_another(tmp_path, assets):
    teacher, store = assets(STORIES), tmp_path / "kv.zarr"
    options = {"limit": 6, "progress": False, "calibration_samples": 0, "batch_size": 6}
    run_extract(ExtractConfig.from_dict(dict(teacher=str(teacher), store=str(store), difficulty="easy", **options)),
                log=lambda _: None)
    manifest = KVStore.open(store).manifest
    assert manifest.dataset.details["difficulty"] == EASY
    assert manifest.dataset.fingerprint == synthetic_rows(6, difficulty="easy").fingerprint
    with pytest.raises(StoreError, match=r"split synthetic:train \(6 samples.*\) vs synthetic:train \(6 samples"):
        run_extract(ExtractConfig.from_dict(dict(teacher=str(teacher), store=str(store), name="other", **options)),
                    log=lambda _: None)


def test_eval_reads_rows_of_its_difficulty(tmp_path, assets):
    out = tmp_path / "items.jsonl"
    run_eval(EvalConfig.from_dict(dict(model=str(assets(STORIES)), dataset="synthetic", difficulty="easy", limit=2,
                                       max_new_tokens=2, out=str(out), progress=False, threads=1)))
    items = [json.loads(line) for line in out.read_text().splitlines()]
    assert [i["sample_id"] for i in items] == ["synthetic-easy/test/000000", "synthetic-easy/test/000001"]
    assert [i["question"] for i in items] == [r.question for r in synthetic_rows(2, split="test", difficulty="easy")]
