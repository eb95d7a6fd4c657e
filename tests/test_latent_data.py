"""Rows for latent reasoning: the chain task is exact, seeded and split-disjoint; GSM8K's CoT has no calculator
notes; a batch's two layouts line up (the CODI token is the answer prefix's ``:`` in both)."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from kava.core.errors import ConfigError
from kava.distill.latent.data import Encoder, LatentRow, chain_rows, gsm8k_rows
from kava.distill.latent.evaluate import read_answer


def _evaluate(question: str) -> tuple[list[str], int]:
    value, lines = int(question[0]), []
    for i in range(1, len(question), 2):
        op, operand = question[i], int(question[i + 1])
        result = (value + operand if op == "+" else value * operand) % 10
        lines.append(f"{value}{op}{operand}={result}")
        value = result
    return lines, value


def test_chain_rows_are_exact_seeded_and_disjoint():
    train, test = chain_rows(300, steps=3), chain_rows(100, steps=3, split="test")
    assert chain_rows(300, steps=3) == train and chain_rows(300, steps=3, seed=1) != train
    for row in train + test:
        lines, value = _evaluate(row.question)
        assert row.cot.split("\n") == lines and row.answer == str(value)
    assert not {r.question for r in train} & {r.question for r in test}
    assert len({r.question for r in train}) == 300
    with pytest.raises(ConfigError, match="--chain-steps"):
        chain_rows(10_000, steps=1)


def test_gsm8k_rows_drop_calculator_notes(assets):
    rows = gsm8k_rows(assets("gsm8k/test.jsonl"), limit=50, split="test")
    assert len(rows) == 50 and rows[0].sample_id == "gsm8k/test/000000"
    assert all("<<" not in r.cot and ">>" not in r.cot and "####" not in r.cot for r in rows)
    assert all(r.answer.lstrip("-").replace(".", "").isdigit() for r in rows)
    assert rows[0].answer_text == f"The answer is: {rows[0].answer}"


def test_a_batch_lines_up_both_layouts(stories):
    tokenizer = AutoTokenizer.from_pretrained(stories)
    rows = [LatentRow("a", "4+9*8", "4+9=3\n3*8=4", "4"), LatentRow("b", "7*2+1+3*9", "x", "12")]
    encoder = Encoder(tokenizer)
    batch = encoder.batch(rows)
    decode = tokenizer.decode
    for i, row in enumerate(rows):
        teacher = batch.teacher_ids[i, batch.teacher_mask[i].bool()]
        assert (
            decode(teacher, skip_special_tokens=True).split()
            == (row.question + "\n" + row.cot + "\n" + row.answer_text).split()
        )
        assert decode(batch.teacher_ids[i, batch.teacher_codi[i]]) == ":"
        assert decode(batch.answer_ids[i, batch.student_codi[i]]) == ":"
        labelled = batch.teacher_labels[i][batch.teacher_labels[i] != -100]
        assert labelled.tolist() == (encoder.cot(row) + encoder.answer(row))
        assert labelled[-1] == tokenizer.eos_token_id
        assert batch.teacher_ids[i][batch.cot[i]].tolist() == encoder.cot(row)
        assert batch.teacher_ids[i][batch.window[i]].tolist() == encoder.answer(row)
        question = batch.question_ids[i, batch.question_mask[i].bool()]
        assert question.tolist() == encoder.question(row) and question[0] == tokenizer.bos_token_id
    assert batch.question_mask[:, -1].all() and batch.answer_mask[:, 0].all()  # left- and right-padded
    direct = encoder.batch(rows, with_cot=False)
    assert not direct.cot.any() and direct.question_ids.equal(batch.question_ids)


def test_read_answer():
    assert read_answer("3*8=4\nThe answer is: 4") == "4"
    assert read_answer("The answer is: 1,234 and The answer is: 5") == "1234"
    assert read_answer("The answer is:") is None
