"""Where rows come from: named fields, conversations, answer formats and datasets ids, with the real GSM8K.

Small JSONL and Parquet files are written here; the docs show the same files and commands (docs/extract.md,
"Data sources"). A datasets id is read through ``datasets.load_dataset``, replaced here by an in-memory dataset
(nothing is downloaded).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from helpers import asset_path

from kava.core.data import DataSource, file_rows, gsm8k_rows, load_rows
from kava.core.errors import ConfigError, DatasetError
from kava.core.rows import AnswerFormat, parse_boxed_answer
from kava.extract.config import ExtractConfig


def write_jsonl(path: Path, records: list[dict[str, Any]]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def triples(rows) -> list[tuple[str, str, str]]:
    return [(r.question, r.reasoning, r.answer) for r in rows]


def test_named_fields_with_the_reasoning_in_a_field_of_its_own(tmp_path):
    data = write_jsonl(tmp_path / "fields.jsonl", [
        {"problem": "What is 2 + 3?", "solution": "2 + 3 = 5", "final": "5"},
        {"problem": "What is 6 * 7?", "solution": "6 * 7 = 42", "final": 42},
        {"problem": "What is 1 - 1?", "solution": "1 - 1 = 0"},
    ])
    source = DataSource(dataset=data, question_field="problem", reasoning_field="solution", answer_field="final")
    rows = source.load()
    assert triples(rows) == [("What is 2 + 3?", "2 + 3 = 5", "5"), ("What is 6 * 7?", "6 * 7 = 42", "42")]
    assert [(p.sample_id, p.reason) for p in rows.problems] == [("fields/train/000002", "missing field(s) ['final']")]
    assert source.details()["question_field"] == "problem" and "answer_format" not in source.details()


def test_messages_rows_take_the_user_turn_as_question_and_the_assistant_turn_as_reasoning_and_answer(tmp_path):
    def chat(*turns: tuple[str, str]) -> dict[str, Any]:
        return {"messages": [{"role": role, "content": content} for role, content in turns]}

    records = [
        chat(("system", "Be brief."), ("user", "Tom has 3 apples and buys 2. How many?"),
             ("assistant", "3 + 2 = <<3+2=5>>5\n#### 5")),
        chat(("user", "What is 10 / 2?"), ("assistant", "10 / 2 = 5")),  # no '#### N'
        chat(("user", "Hi"), ("assistant", "Hello"), ("user", "What is 1 + 1?"), ("assistant", "#### 2")),
        {"messages": "not turns"},
    ]
    data = write_jsonl(tmp_path / "chat.jsonl", records)
    rows = load_rows(data, messages_field="messages", strip_calculator=True)
    assert triples(rows) == [("Tom has 3 apples and buys 2. How many?", "3 + 2 = 5", "5")]
    assert [p.reason for p in rows.problems] == [
        "the answer has no '#### <answer>' line",
        "expected one user turn, then one assistant turn (system turns are ignored), got roles "
        "['user', 'assistant', 'user', 'assistant']",
        "expected the messages to be a list of {role, content} turns, got str",
    ]
    # The same rows from Parquet (a list of structs), with the answer in a LaTeX box.
    table = pa.Table.from_pylist([chat(("user", "Half of 1?"), ("assistant", r"It is $\boxed{\frac{1}{2}}$."))])
    pq.write_table(table, tmp_path / "chat.parquet")
    boxed = load_rows(str(tmp_path / "chat.parquet"), messages_field="messages", answer_format="boxed")
    assert triples(boxed) == [("Half of 1?", r"It is $\boxed{\frac{1}{2}}$.", r"\frac{1}{2}")]


def test_answer_formats_gsm8k_boxed_and_regex():
    assert AnswerFormat("gsm8k").split("a\nb\n#### 7") == ("a\nb", "7")
    assert parse_boxed_answer(r"So $\boxed{\{1, \dfrac{2}{3}\}}$ and no more") == (
        r"So $\boxed{\{1, \dfrac{2}{3}\}}$ and no more", r"\{1, \dfrac{2}{3}\}")
    assert parse_boxed_answer(r"first \boxed{1}, then \boxed{x^{2}}") [1] == "x^{2}"  # the last box
    assert parse_boxed_answer(r"\boxed{\frac{1}{2}") is None  # never closed
    regex = AnswerFormat(r"regex:The answer is\s*(-?[\d,.]+)")
    assert regex.split("3 + 4 = 7.\nThe answer is 7") == ("3 + 4 = 7.", "7")
    assert regex.split("no number here") is None
    assert regex.answer("The answer is 12") == "12" and AnswerFormat("gsm8k").answer(" 12 ") == "12"


def test_rows_whose_answer_is_not_found_are_skipped_with_the_reason(tmp_path):
    data = write_jsonl(tmp_path / "math.jsonl", [
        {"question": "1/2 + 1/2?", "answer": r"Add: $\frac12+\frac12 = \boxed{1}$"},
        {"question": "2 + 2?", "answer": "It is 4."},
        {"question": "", "answer": r"\boxed{3}"},
        {"question": "Open?", "answer": r"\boxed{\frac{1}{2}"},
    ])
    rows = load_rows(data, answer_format="boxed")
    assert triples(rows) == [("1/2 + 1/2?", r"Add: $\frac12+\frac12 = \boxed{1}$", "1")]
    assert [p.reason for p in rows.problems] == ["the answer has no closed \\boxed{...}", "empty question",
                                                 "the answer has no closed \\boxed{...}"]
    rows = load_rows(data, answer_format=r"regex:It is (\d+)")
    assert triples(rows) == [("2 + 2?", "", "4")]
    assert rows.problems[0].reason == r"no match of --answer-format regex:It is (\d+)"


def test_bad_options_and_missing_fields_are_clear_errors(tmp_path):
    data = write_jsonl(tmp_path / "chat.jsonl", [{"id": 1, "messages": []}])
    with pytest.raises(ConfigError, match=r"Expected field\(s\) \['question', 'answer'\] in .*chat\.jsonl\. It has "
                                          r"fields \['id', 'messages'\]\. Name the right ones with --question-field "
                                          r"/ --reasoning-field / --answer-field, or --messages-field\. Rows of "
                                          r"\{role, content\} turns: pass --messages-field messages\."):
        load_rows(data)
    with pytest.raises(ConfigError, match=r"--answer-format: expected a regular expression with exactly one "
                                          r"capturing group, the answer .* Got 0 groups in 'answer is \\d\+'\."):
        load_rows(data, answer_format=r"regex:answer is \d+")
    problems = DataSource(answer_format="regex:(", messages_field="m", reasoning_field="r").problems()
    assert problems[0].startswith("--answer-format: expected a Python regular expression after 'regex:'. Got '(',")
    assert problems[1] == ("Can't set both --messages-field and --reasoning-field (the assistant turn holds the "
                           "reasoning). Choose one.")
    with pytest.raises(ConfigError, match=r"--answer-format: expected gsm8k, boxed or regex:PATTERN\. Got 'latex'"):
        ExtractConfig.from_dict({"teacher": "t", "store": "s", "answer_format": "latex"}).validate()
    with pytest.raises(ConfigError, match=r"--data-files is for --dataset gsm8k"):
        load_rows(data, data_files=data)
    with pytest.raises(ConfigError, match=r"Expected --dataset to be .* Got 'missing\.jsonl' instead"):
        load_rows("missing.jsonl")


def test_a_datasets_id_is_read_through_datasets_with_the_same_fields(monkeypatch):
    import datasets

    seen: dict[str, Any] = {}

    def load_dataset(path: str, name: str | None = None, *, split: str) -> datasets.Dataset:
        seen.update(path=path, name=name, split=split)
        return datasets.Dataset.from_list([
            {"prompt": "What is 2 + 2?", "completion": "2 + 2 = 4. The answer is 4", "extra": 1},
            {"prompt": "What is 3 + 3?", "completion": "I don't know", "extra": 2},
        ])

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    source = DataSource(dataset="someone/arith", dataset_config="main", split="test", question_field="prompt",
                        answer_field="completion", answer_format=r"regex:The answer is (\d+)")
    rows = source.load()
    assert seen == {"path": "someone/arith", "name": "main", "split": "test"}
    assert triples(rows) == [("What is 2 + 2?", "2 + 2 = 4.", "4")]
    assert rows.sample_ids == ["arith/test/000000"] and rows.problems[0].sample_id == "arith/test/000001"
    with pytest.raises(ConfigError, match=r"Expected field\(s\) \['question', 'answer'\] in the dataset "
                                          r"'someone/arith' \(config 'main', split 'test'\)\. It has fields "
                                          r"\['prompt', 'completion', 'extra'\]"):
        DataSource(dataset="someone/arith", dataset_config="main", split="test").load()


def test_a_datasets_id_not_in_the_cache_fails_offline_with_the_fix():
    with pytest.raises(DatasetError, match=r"The hub dataset 'nobody-here/no-such-set' \(split 'train'\) is not "
                                           r"cached and HF_DATASETS_OFFLINE=1 forbids downloading it\. Pass a local "
                                           r"JSONL or Parquet file as --dataset\."):
        load_rows("nobody-here/no-such-set")


def test_the_assets_gsm8k_reads_the_same_as_a_file_as_gsm8k_and_as_conversations(tmp_path):
    path = asset_path("gsm8k/test.jsonl")
    as_gsm8k = gsm8k_rows("test", data_files=str(path), limit=50)
    as_file = file_rows(path, split="test", limit=50, answer_format="gsm8k")
    assert len(as_gsm8k) == 50 and not as_gsm8k.problems
    assert triples(as_file) == triples(as_gsm8k)
    with path.open() as f:
        records = [json.loads(next(f)) for _ in range(50)]
    chats = write_jsonl(tmp_path / "gsm8k-chat.jsonl", [
        {"messages": [{"role": "user", "content": r["question"]}, {"role": "assistant", "content": r["answer"]}]}
        for r in records])
    assert triples(load_rows(chats, messages_field="messages")) == triples(as_gsm8k)
    # GSM8K's answer as a regex: the text after the last '#### '.
    regex = file_rows(path, split="test", limit=50, answer_format=r"regex:\n####\s*(.+)$")
    assert triples(regex) == triples(as_gsm8k)
