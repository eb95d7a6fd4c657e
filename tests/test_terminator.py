"""How a sample ends: every template's terminator, the EOS the student grid appends for every tokenizer (the BPEs a
run trains and the real ones), its segment and alignment weight, and the cross-entropy that teaches it."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kava.core.data import RowSet, load_rows
from kava.core.errors import ConfigError
from kava.core.synthetic import synthetic_rows
from kava.extract.align import align_dense_reference, token_spans
from kava.extract.grid import build_grid
from kava.extract.templates import (
    SEGMENT_ANSWER,
    SEGMENT_SPECIAL,
    TEMPLATES,
    PromptTemplate,
    format_row,
    segment_ids,
)
from kava.extract.vocab import EOS, SPECIALS, train_bpe_tokenizer

REAL = ["tokenizers/gpt2", "tokenizers/qwen2", "tokenizers/llama2"]


def _tokenizer(path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


def _completion_targets(sample):
    """Which of the sample's tokens cross-entropy on the completion trains (``[T]`` bool), as distill computes it."""
    from kava.distill.module import completion_targets

    ids = torch.as_tensor(sample.input_ids)[None]
    segs = torch.as_tensor(sample.segment_ids.astype(np.int64))[None]
    return completion_targets(ids, torch.ones_like(ids), segs, "completion")[0].numpy()


def _check_ends_with_eos(sample, tok, template):
    """The grid sample is the tokenized text plus one EOS: zero-width at the text's end, special, trained by CE."""
    ids, spans = token_spans(tok, sample.text)
    assert sample.status == "ok" and sample.text == format_row(sample.row, template).text
    np.testing.assert_array_equal(sample.input_ids, np.append(ids, tok.eos_token_id))
    np.testing.assert_array_equal(sample.spans[:-1], spans)
    assert sample.spans[-1].tolist() == [spans[:, 1].max()] * 2
    assert sample.segment_ids[-1] == SEGMENT_SPECIAL
    assert (sample.input_ids == tok.eos_token_id).sum() == 1 + (tok.bos_token_id == tok.eos_token_id) * (
        ids == tok.bos_token_id).sum()  # GPT-2's BOS is its EOS, and is not added
    targets = _completion_targets(sample)
    assert targets[-1] and targets[-2]  # the EOS and the token before it (the terminator's) are trained


# ---------------------------------------------------------------------------------------------------------------------
# Templates


@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_every_template_ends_the_answer_with_a_terminator(name):
    template = TEMPLATES[name]
    assert template.terminator == {"plain": "\n", "cot": "\n", "chat": "<|im_end|>"}[name]
    row = synthetic_rows(1, seed=3)[0]
    formatted = format_row(row, template)
    assert formatted.text.endswith(f"#### {row.answer}{template.terminator}")
    assert formatted.spans["answer"][1] == len(formatted.text) - len(template.terminator)


def test_terminator_is_the_text_after_the_answer_up_to_the_next_placeholder():
    assert PromptTemplate("bare", "Q: {question}\n{reasoning}\n#### {answer}").terminator == ""
    assert PromptTemplate("first", "{answer}!\n{question} {reasoning}").terminator == "!\n"


@pytest.mark.parametrize("tokenizer", REAL)
def test_the_newline_terminator_is_an_answer_token(assets, tokenizer):
    """Glue after the last piece belongs to it, so completion CE trains the newline after the answer."""
    tok = _tokenizer(assets(tokenizer))
    row = synthetic_rows(1, seed=4)[0]
    formatted = format_row(row, TEMPLATES["plain"])
    ids, spans = token_spans(tok, formatted.text)
    segs = segment_ids(spans, formatted.spans, special_mask=np.isin(ids, tok.all_special_ids))
    last = int(np.flatnonzero(spans[:, 1] > spans[:, 0])[-1])  # the last token that stands for text
    assert formatted.text[spans[last, 0] : spans[last, 1]].endswith("\n") and segs[last] == SEGMENT_ANSWER


# ---------------------------------------------------------------------------------------------------------------------
# Tokenizers: the trained BPE and the real ones


def test_trained_bpe_has_an_eos_and_the_grid_ends_every_sample_with_it(tmp_path):
    rows = synthetic_rows(60, seed=1)
    texts = [format_row(row, TEMPLATES["plain"]).text for row in rows]
    tok = _tokenizer(train_bpe_tokenizer(texts, tmp_path / "tok", vocab_size=300))
    assert (tok.eos_token, tok.eos_token_id) == (EOS, SPECIALS.index(EOS))
    assert tok.eos_token_id in tok.all_special_ids
    # The tokenizer itself adds nothing: a prompt encoded for generation must not end in EOS.
    assert tok(texts[0])["input_ids"] == tok(texts[0], add_special_tokens=False)["input_ids"]
    assert tok.eos_token_id not in tok(texts[0])["input_ids"]
    grid = build_grid(RowSet("synthetic/train", tuple(rows[:8])), tok, TEMPLATES["plain"], max_length=512,
                      on_too_long="truncate")
    assert len(grid) == 8
    for sample in grid:
        _check_ends_with_eos(sample, tok, TEMPLATES["plain"])
        assert tok.decode(sample.input_ids[-3:]) == f"{sample.row.answer[-1]}\n{EOS}"


@pytest.mark.parametrize("tokenizer", REAL)
@pytest.mark.parametrize("template", sorted(TEMPLATES))
def test_real_tokenizers_end_every_sample_with_their_eos(assets, tokenizer, template):
    tok = _tokenizer(assets(tokenizer))
    rows = load_rows("gsm8k", split="test", data_files=assets("gsm8k/test.jsonl"), limit=4)
    grid = build_grid(rows, tok, TEMPLATES[template], max_length=1024, on_too_long="truncate")
    for sample in grid:
        _check_ends_with_eos(sample, tok, TEMPLATES[template])
        assert tok.decode(sample.input_ids[-1:]) == tok.eos_token


def test_a_sample_cut_to_fit_loses_its_eos(assets):
    """The EOS counts toward --max-length; one token short, the cut lands between the answer and the EOS."""
    tok = _tokenizer(assets("tokenizers/gpt2"))
    rows = RowSet("synthetic/train", tuple(synthetic_rows(1, seed=2)))
    (whole,) = build_grid(rows, tok, TEMPLATES["plain"], max_length=1024, on_too_long="truncate")
    (cut,) = build_grid(rows, tok, TEMPLATES["plain"], max_length=len(whole.input_ids) - 1, on_too_long="truncate")
    assert cut.status == "truncated" and cut.text == whole.text
    np.testing.assert_array_equal(cut.input_ids, whole.input_ids[:-1])
    assert tok.eos_token_id not in cut.input_ids


def test_no_eos_and_no_terminator_is_refused(assets, tmp_path):
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    gpt2 = _tokenizer(assets("tokenizers/gpt2"))
    bare = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(gpt2.backend_tokenizer.to_str()))
    assert bare.eos_token_id is None
    rows = RowSet("synthetic/train", tuple(synthetic_rows(2, seed=2)))
    endless = PromptTemplate("endless", "Q: {question}\n{reasoning}\n#### {answer}")
    with pytest.raises(ConfigError, match="never learns to stop.*add '\\\\n' after \\{answer\\}"):
        build_grid(rows, bare, endless, max_length=512, on_too_long="truncate")
    # The template's own terminator is enough: the samples end with it and nothing is appended.
    for sample in build_grid(rows, bare, TEMPLATES["plain"], max_length=512, on_too_long="truncate"):
        np.testing.assert_array_equal(sample.input_ids, token_spans(bare, sample.text)[0])
        assert sample.text.endswith("\n")


# ---------------------------------------------------------------------------------------------------------------------
# Alignment: the appended EOS has no teacher row


@pytest.mark.parametrize("tokenizer", ["tokenizers/gpt2", "tokenizers/llama2"])
def test_the_appended_eos_gets_alignment_weight_zero(assets, tokenizer):
    """Same tokenizer: every teacher token is its student token exactly (BOS included, and byte pieces of an emoji
    each on itself), and the EOS has no row. Another tokenizer: the IoU rule, and again nothing for the EOS."""
    from kava.extract.teacher_pass import sample_alignment

    tok = _tokenizer(assets(tokenizer))
    row = synthetic_rows(1, seed=5)[0]
    row = type(row)(row.sample_id, "🐔 " + row.question, row.reasoning, row.answer)  # byte pieces sharing a span
    (sample,) = build_grid(RowSet("x", (row,)), tok, TEMPLATES["plain"], max_length=1024, on_too_long="truncate")
    t_ids, t_spans = token_spans(tok, sample.text)  # what the teacher reads: the text, no EOS
    special = np.asarray(tok.all_special_ids)
    al = sample_alignment(sample, t_ids, t_spans, sample.text, sample.seg_spans, generated=False, same_text=True,
                    same_tokenizer=True, hard=False, special_ids=special)
    assert (al.num_teacher_tokens, al.num_student_tokens) == (len(t_ids), len(t_ids) + 1)
    want = np.eye(len(t_ids) + 1, len(t_ids), dtype=np.float32)
    want[-1] = 0
    np.testing.assert_array_equal(al.to_dense(), want)
    np.testing.assert_array_equal(al.coverage, np.append(np.ones(len(t_ids), np.float32), 0))
    hard = sample_alignment(sample, t_ids, t_spans, sample.text, sample.seg_spans, generated=False, same_text=True,
                      same_tokenizer=True, hard=True, special_ids=special)
    np.testing.assert_array_equal(hard.to_dense(), want)

    other = _tokenizer(assets("tokenizers/qwen2"))
    o_ids, o_spans = token_spans(other, sample.text)
    cross = sample_alignment(sample, o_ids, o_spans, sample.text, sample.seg_spans, generated=False, same_text=True,
                       same_tokenizer=False, hard=False, special_ids=np.asarray(other.all_special_ids))
    np.testing.assert_allclose(cross.to_dense(), align_dense_reference(sample.spans, o_spans), atol=1e-6)
    assert cross.coverage[-1] == 0 and cross.coverage[1:-1].min() > 0
