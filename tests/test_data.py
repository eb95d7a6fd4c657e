"""Datasets, templates, segment ids and truncation: synthetic rows, real GSM8K, a real tokenizer's offsets."""

from __future__ import annotations

import ast
import hashlib
import json
import operator
import re
import time
from fractions import Fraction

import numpy as np
import pytest

from kava.core.data import file_rows, gsm8k_rows, load_rows
from kava.core.errors import ConfigError, DatasetError, KavaError
from kava.core.rows import (
    ReasoningRow,
    RowSet,
    dataset_fingerprint,
    gsm8k_answer_text,
    parse_gsm8k_answer,
    strip_calculator_notes,
)
from kava.core.synthetic import synthetic_rows
from kava.extract.templates import (
    SEGMENT_ANSWER,
    SEGMENT_NAMES,
    SEGMENT_PROMPT,
    SEGMENT_REASONING,
    SEGMENT_SPECIAL,
    TEMPLATES,
    PromptTemplate,
    format_row,
    load_template,
    segment_ids,
    truncate_at_segment,
)
from kava.kvstore import sample_ids_hash

NOTE = re.compile(r"<<([^<>=]+)=([^<>]+)>>")
_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv}


def evaluate(expr: str) -> Fraction:
    """Exact value of an arithmetic expression of numbers and + - * / (GSM8K calculator notes)."""

    def walk(node: ast.AST) -> Fraction:
        if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
            return _OPS[type(node.op)](walk(node.left), walk(node.right))
        if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)):
            return Fraction(str(node.value))
        raise ValueError(f"not arithmetic: {expr!r}")

    return walk(ast.parse(expr, mode="eval").body)


@pytest.fixture
def gpt2(assets):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(assets("tokenizers/gpt2"), local_files_only=True)


def check_spans(formatted, row: ReasoningRow, template: PromptTemplate) -> None:
    """Each span is exactly its piece, and what lies outside the spans is exactly the template's glue."""
    assert formatted.piece("prompt") == row.question
    assert formatted.piece("reasoning") == row.reasoning
    assert formatted.piece("answer") == row.answer
    cuts = sorted(formatted.spans.values())
    glue, last = [], 0
    for start, end in cuts:
        glue.append(formatted.text[last:start])
        last = end
    glue.append(formatted.text[last:])
    assert glue == re.split(r"\{(?:question|reasoning|answer)\}", template.format)


# ---------------------------------------------------------------------------------------------------------------------
# Synthetic


def test_synthetic_is_deterministic_and_prefix_stable():
    a, b = synthetic_rows(40, seed=3), synthetic_rows(40, seed=3)
    assert a.rows == b.rows and a.fingerprint == b.fingerprint
    assert synthetic_rows(10, seed=3).rows == a.rows[:10]  # row i depends only on (seed, split, i)
    assert synthetic_rows(40, seed=4).rows != a.rows
    assert a[17].sample_id == "synthetic/train/000017"
    assert a.problems == ()


def test_synthetic_splits_are_disjoint():
    train = synthetic_rows(400, split="train")
    test = synthetic_rows(400, split="test")
    validation = synthetic_rows(100, split="validation")
    questions = [{r.question for r in rs} for rs in (train, test, validation)]
    assert not (questions[0] & questions[1]) and not (questions[0] & questions[2]) and not (questions[1] & questions[2])
    assert all(r.sample_id.startswith("synthetic/test/") for r in test)
    with pytest.raises(ConfigError, match="Expected --split"):
        synthetic_rows(1, split="dev")


def test_synthetic_answers_are_correct_and_gsm8k_shaped():
    ops_seen = set()
    for row in synthetic_rows(300, seed=1):
        answer_text = gsm8k_answer_text(row)
        assert answer_text.splitlines()[-1] == f"#### {row.answer}"
        assert parse_gsm8k_answer(answer_text) == (row.reasoning, row.answer)
        notes = [NOTE.fullmatch(m.group(0)) for m in NOTE.finditer(row.reasoning)]
        assert 2 <= len(notes) <= 4
        assert row.reasoning.count("<<") == len(notes) == len(row.reasoning.splitlines())  # one note a line
        for line in row.reasoning.splitlines():
            expr, result = NOTE.search(line).groups()
            value = evaluate(expr)
            assert value.denominator == 1 and value > 0 and str(value.numerator) == result
            # GSM8K shape: "a op b = <<a op b=r>>r ...": the shown result follows the note
            assert line[NOTE.search(line).end() :].startswith(result)
            ops_seen |= set(re.findall(r"[-+*/]", expr))
        assert result == row.answer  # the last note's result is the answer
        assert row.question.endswith("?") and row.question.isascii()
    assert ops_seen == {"+", "-", "*", "/"}


def test_synthetic_strip_calculator():
    kept, stripped = synthetic_rows(20), synthetic_rows(20, strip_calculator=True)
    for a, b in zip(kept, stripped, strict=True):
        assert "<<" not in b.reasoning and ">>" not in b.reasoning
        assert b.reasoning == strip_calculator_notes(a.reasoning) and b.answer == a.answer


# ---------------------------------------------------------------------------------------------------------------------
# Real GSM8K


def test_gsm8k_test_split_parses_and_formats_exactly(assets):
    path = assets("gsm8k/test.jsonl")
    rows = gsm8k_rows("test", data_files=path)
    raw = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    assert len(rows) == len(raw) == 1319 and rows.problems == ()
    assert rows[5].sample_id == "gsm8k/test/000005"
    for row, record in zip(rows, raw, strict=True):
        assert row.question == record["question"].strip()
        assert record["answer"].endswith(f"#### {row.answer}")
        assert row.reasoning and "####" not in row.reasoning
        assert gsm8k_answer_text(row) == record["answer"]  # nothing lost
        for template in TEMPLATES.values():
            check_spans(format_row(row, template), row, template)
    assert any(not row.question.isascii() for row in rows)  # curly quotes etc. went through

    stripped = gsm8k_rows("test", data_files=[path], strip_calculator=True)
    assert all("<<" not in r.reasoning and ">>" not in r.reasoning for r in stripped)
    assert stripped.fingerprint != rows.fingerprint
    assert load_rows("gsm8k", split="test", data_files={"test": path}).fingerprint == rows.fingerprint
    assert len(load_rows("gsm8k", split="test", data_files=path, limit=7)) == 7


def test_file_rows_jsonl_and_parquet_agree(assets, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = assets("gsm8k/test_socratic.jsonl")
    rows = file_rows(path, split="test", limit=50)
    assert len(rows) == 50 and rows[0].sample_id == "test_socratic/test/000000"
    records = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()[:50]]
    parquet = tmp_path / "test_socratic.parquet"
    pq.write_table(pa.Table.from_pylist(records), parquet)
    assert file_rows(parquet, split="test").rows == rows.rows
    assert load_rows(str(parquet), split="test").fingerprint == rows.fingerprint


# ---------------------------------------------------------------------------------------------------------------------
# Segments with a real tokenizer


def encode(tokenizer, text: str, *, bos_eos: bool = True) -> tuple[list[int], np.ndarray]:
    """Token ids and [T, 2] spans, with BOS/EOS added as zero-width tokens the way a caller adds them."""
    enc = tokenizer(text, return_offsets_mapping=True, add_special_tokens=False)
    ids, spans = list(enc["input_ids"]), [tuple(s) for s in enc["offset_mapping"]]
    if bos_eos:
        ids = [tokenizer.bos_token_id, *ids, tokenizer.eos_token_id]
        spans = [(0, 0), *spans, (len(text), len(text))]
    return ids, np.array(spans, dtype=np.int64).reshape(-1, 2)


def test_segment_ids_with_gpt2(gpt2):
    row = ReasoningRow(
        "t/0",
        "Weng earns $12 an hour for babysitting. Yesterday, she did 6 hours of babysitting. How much did she earn?",
        "Weng earns 12*6 = $<<12*6=72>>72.\nSo she earned $72 in total.",
        "72",
    )
    f = format_row(row, TEMPLATES["plain"])
    ids, spans = encode(gpt2, f.text)
    seg = segment_ids(spans, f.spans)
    assert seg.dtype == np.uint8 and seg.shape == (len(ids),)
    assert seg[0] == seg[-1] == SEGMENT_SPECIAL  # BOS, EOS (zero-width)
    start_answer_line = f.text.index("\n####")
    q0, q1 = f.spans["prompt"]
    tokens = gpt2.convert_ids_to_tokens(ids)
    for token, (s, e), sid in zip(tokens, spans, seg, strict=True):
        if e <= s:
            continue
        if s >= start_answer_line:  # "\n", "####", " 72", "\n"
            assert sid == SEGMENT_ANSWER, token
        elif e <= q1:  # "Question", ":", and the question's tokens
            assert sid == SEGMENT_PROMPT, token
        else:  # "\nAnswer: " glue and the reasoning lines
            assert sid == SEGMENT_REASONING, token
    answer_tokens = [t for t, sid in zip(tokens, seg, strict=True) if sid == SEGMENT_ANSWER]
    assert gpt2.convert_tokens_to_string(answer_tokens) == "\n#### 72\n"  # the terminator is answer too
    assert {SEGMENT_NAMES[i] for i in seg} == {"prompt", "reasoning", "answer", "special"}

    # A special token written as text has a non-zero span: special_mask flags it.
    text = f.text + gpt2.eos_token
    ids, spans = encode(gpt2, text, bos_eos=False)
    assert spans[-1, 1] > spans[-1, 0]
    seg = segment_ids(spans, f.spans, special_mask=np.isin(ids, gpt2.all_special_ids))
    assert seg[-1] == SEGMENT_SPECIAL and seg[-2] == SEGMENT_ANSWER


def test_non_ascii_text_formats_and_segments(gpt2):
    row = ReasoningRow(
        "x/0",
        "鸡每天下 16 个蛋 🐔🥚 — Zoë’s café (cafe\u0301) sells 3 ‽ How many are left?",
        "16 − 3 = <<16-3=13>>13 個 👍\nNo\u0308 more.",
        "13",
    )
    for template in TEMPLATES.values():
        f = format_row(row, template)
        check_spans(f, row, template)
        ids, spans = encode(gpt2, f.text)
        seg = segment_ids(spans, f.spans)
        p0, p1 = f.spans["prompt"]
        inside = (spans[:, 0] >= p0) & (spans[:, 1] <= p1) & (spans[:, 1] > spans[:, 0])
        assert inside.sum() > 10 and (seg[inside] == SEGMENT_PROMPT).all()
        r0, r1 = f.spans["reasoning"]
        inside = (spans[:, 0] >= r0) & (spans[:, 1] <= r1) & (spans[:, 1] > spans[:, 0])
        assert (seg[inside] == SEGMENT_REASONING).all()


def test_segment_ids_rules_on_hand_made_spans():
    # text: "Q: abc\nA: de\n#### 7"; prompt (3,6), reasoning (10,12), answer (18,19)
    seg_spans = {"prompt": (3, 6), "reasoning": (10, 12), "answer": (18, 19)}
    tokens = np.array([(0, 0), (0, 2), (2, 6), (6, 10), (10, 12), (11, 14), (12, 17), (17, 19), (19, 19)])
    got = segment_ids(tokens, seg_spans)
    # (0,2) glue before the prompt → prompt; (6,10) "\nA: " precedes reasoning → reasoning;
    # (11,14) overlaps reasoning 1 char, answer-glue 2 → answer; (12,17) glue → answer
    want = [SEGMENT_SPECIAL, 0, 0, 1, 1, 2, 2, 2, SEGMENT_SPECIAL]
    assert got.tolist() == want
    mask = np.zeros(len(tokens), dtype=bool)
    mask[3] = True
    assert segment_ids(tokens, seg_spans, special_mask=mask)[3] == SEGMENT_SPECIAL
    # a tie goes to the earlier region
    assert segment_ids(np.array([(5, 7)]), {"prompt": (0, 6), "answer": (6, 9)}).tolist() == [SEGMENT_PROMPT]
    assert segment_ids(np.zeros((0, 2)), seg_spans).shape == (0,)
    with pytest.raises(ValueError, match="seg_spans keys"):
        segment_ids(tokens, {"question": (0, 1)})


# ---------------------------------------------------------------------------------------------------------------------
# Truncation


def test_truncate_at_segment(gpt2, assets):
    rows = gsm8k_rows("test", data_files=assets("gsm8k/test.jsonl"), limit=20)
    row = next(r for r in rows if r.reasoning.count("\n") >= 3)
    f = format_row(row, TEMPLATES["plain"])
    _, spans = encode(gpt2, f.text)
    seg = segment_ids(spans, f.spans)
    T = len(seg)
    first_answer = int(np.flatnonzero(seg == SEGMENT_ANSWER)[0])
    last_prompt = int(np.flatnonzero(seg == SEGMENT_PROMPT)[-1])

    assert truncate_at_segment(spans, seg, T) == T  # fits
    assert truncate_at_segment(spans, seg, T - 1) == T - 1  # drops the EOS, keeps the answer whole
    assert truncate_at_segment(spans, seg, first_answer + 1) == first_answer  # drops the whole answer
    assert truncate_at_segment(spans, seg, last_prompt) is None  # the prompt does not fit

    middle = (last_prompt + first_answer) // 2  # inside the reasoning: no segment boundary there
    assert truncate_at_segment(spans, seg, middle) is None
    cut = truncate_at_segment(spans, seg, middle, text=f.text)
    assert cut is not None and last_prompt < cut <= middle
    kept = f.text[: spans[cut - 1, 1]]
    assert kept.endswith("\n") or f.text[spans[cut, 0]] == "\n"
    kept_reasoning = kept[f.spans["reasoning"][0] :].rstrip("\n")  # whole lines of the reasoning, at least one
    assert kept_reasoning and row.reasoning.startswith(kept_reasoning)
    assert row.reasoning[len(kept_reasoning) :].startswith("\n")


# ---------------------------------------------------------------------------------------------------------------------
# Templates


def test_templates_registry_files_and_hash(tmp_path):
    assert {"plain", "chat", "cot"} <= set(TEMPLATES)
    assert len({t.format for t in TEMPLATES.values()}) == len(TEMPLATES)  # distinct: dual-prompt teachers
    plain = load_template("plain")
    assert plain.sha256 == hashlib.sha256(plain.format.encode()).hexdigest()
    path = tmp_path / "mine.txt"
    path.write_text("Problem {x}: {question}\n{reasoning}\nSo: {answer}\n", encoding="utf-8")
    mine = load_template(str(path))
    assert mine.name == "mine" and mine.format == "Problem {x}: {question}\n{reasoning}\nSo: {answer}"
    row = ReasoningRow("a/0", "q?", "r", "1")
    assert format_row(row, mine).text == "Problem {x}: q?\nr\nSo: 1"  # other braces are literal
    with pytest.raises(ConfigError, match="exactly once"):
        PromptTemplate("bad", "{question} {answer}")
    with pytest.raises(ConfigError, match="exactly once"):
        PromptTemplate("bad", "{question} {reasoning} {answer} {answer}")
    with pytest.raises(ConfigError, match="Expected --template"):
        load_template("nope")


# ---------------------------------------------------------------------------------------------------------------------
# Bad input, errors, fingerprints


def write_jsonl(path, records) -> None:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")


def test_bad_rows_are_flagged_not_fatal(tmp_path):
    path = tmp_path / "mixed.jsonl"
    write_jsonl(
        path,
        [
            {"question": "What is 2+3?", "answer": "2+3=<<2+3=5>>5\n#### 5"},
            {"question": "   ", "answer": "#### 1"},
            {"question": "No mark?", "answer": "just 4"},
            {"question": "Empty answer?", "answer": "1+1=2\n#### "},
            {"question": None, "answer": ""},
            {"answer": "#### 3"},
            {"question": "日本語の質問 😀?", "answer": "#### ４２"},
        ],
    )
    rows = file_rows(path)
    assert [r.sample_id for r in rows] == ["mixed/train/000000", "mixed/train/000006"]
    reasons = {p.sample_id.rsplit("/", 1)[1]: p.reason for p in rows.problems}
    assert reasons["000001"] == "empty question"
    assert "no '#### <answer>' line" in reasons["000002"]
    assert reasons["000003"] == "empty answer"
    assert "no '#### <answer>' line" in reasons["000004"]
    assert "missing field" in reasons["000005"]
    assert rows[1].answer == "４２" and rows[1].reasoning == ""
    assert rows.fingerprint == dataset_fingerprint(rows.rows)


def test_missing_field_lists_the_files_fields(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "other.jsonl"
    write_jsonl(path, [{"problem": "1+1?", "solution": "#### 2"}])
    with pytest.raises(ConfigError, match=r"\['question', 'answer'\].*fields \['problem', 'solution'\]"):
        file_rows(path)
    assert file_rows(path, question_field="problem", answer_field="solution")[0].answer == "2"
    parquet = tmp_path / "other.parquet"
    pq.write_table(pa.Table.from_pylist([{"problem": "1+1?", "solution": "#### 2"}]), parquet)
    with pytest.raises(ConfigError, match=r"fields \['problem', 'solution'\]"):
        file_rows(parquet, answer_field="solution")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "q", "answer": "#### 1"}\nnot json\n', encoding="utf-8")
    with pytest.raises(DatasetError, match="line 2"):
        file_rows(bad)


def test_gsm8k_hub_offline_fails_fast(monkeypatch, tmp_path):
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path)  # nothing is cached here
    start = time.perf_counter()
    with pytest.raises(KavaError, match="is not cached.*--data-files"):
        gsm8k_rows("test")
    assert time.perf_counter() - start < 5


def test_load_rows_dispatch_errors(tmp_path):
    assert len(load_rows("synthetic", split="test", limit=5, seed=2)) == 5
    with pytest.raises(ConfigError, match="Can't set --data-files with --dataset synthetic"):
        load_rows("synthetic", data_files=str(tmp_path / "x.jsonl"))
    with pytest.raises(ConfigError, match="Expected --dataset"):
        load_rows("no-such-dataset")
    with pytest.raises(ConfigError, match="Expected --data-files for split 'test'"):
        load_rows("gsm8k", split="test", data_files={"train": "x.jsonl"})


def test_fingerprints():
    rows = synthetic_rows(5).rows
    assert dataset_fingerprint(rows) == dataset_fingerprint(list(rows))
    assert len(dataset_fingerprint(rows)) == 64
    changed = (*rows[:-1], ReasoningRow(rows[-1].sample_id, rows[-1].question, rows[-1].reasoning, "0"))
    assert dataset_fingerprint(changed) != dataset_fingerprint(rows)
    ids = [r.sample_id for r in rows]
    assert RowSet("x", rows).sample_ids == ids
    assert sample_ids_hash(ids) != sample_ids_hash(ids[::-1])
    assert sample_ids_hash(["ab", "c"]) != sample_ids_hash(["a", "bc"])
