"""Tokenizer alignment: sparse sweep vs dense reference, on all of GSM8K test with four real tokenizers.

The tokenizers and GSM8K come from ``$KAVA_ASSETS`` (see ``conftest.py``); spans are computed once per
tokenizer and cached for the module, since every (student, teacher) pair reuses them.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer, SentencePieceBackend

from kava.core.errors import ConfigError, KavaError, ShapeError
from kava.extract.align import Alignment, align_dense_reference, align_tokens, apply, token_spans

TOKENIZERS = ["tokenizers/gpt2", "tokenizers/qwen2", "tokenizers/llama2", "models/stories260K_hf_derived"]
DENSE_EVERY = 10  # the dense O(T_s * T_t) comparison runs on every 10th GSM8K item to keep the file fast


@functools.cache
def _tokenizer(path: Path):
    return AutoTokenizer.from_pretrained(path, local_files_only=True)


@functools.cache
def _gsm8k_texts(path: Path) -> tuple[str, ...]:
    with path.open() as f:
        rows = [json.loads(line) for line in f]
    return tuple(r["question"] + "\n" + r["answer"] for r in rows)


@functools.cache
def _gsm8k_spans(tokenizer_dir: Path, gsm8k: Path) -> tuple[np.ndarray, ...]:
    tok = _tokenizer(tokenizer_dir)
    return tuple(token_spans(tok, text)[1] for text in _gsm8k_texts(gsm8k))


@pytest.fixture
def tok(assets):
    """``tok("tokenizers/gpt2")`` → the loaded (cached) fast tokenizer."""
    return lambda name: _tokenizer(assets(name))


def _is_shared(spans: np.ndarray) -> np.ndarray:
    """bool ``[T]``: the token's span overlaps another token's span (byte pieces of one character)."""
    dense = align_dense_reference(spans, spans)
    return (dense > 0).sum(axis=1) > 1


def _check_alignment(al: Alignment, s: np.ndarray, t: np.ndarray) -> None:
    """The invariants every alignment of real spans must satisfy."""
    nonempty = s[:, 1] > s[:, 0]
    counts = np.diff(al.indptr)
    # Every student token that stands for text gets weight from >= 1 teacher token, summing to 1.
    assert (counts[nonempty] >= 1).all()
    assert (counts[~nonempty] == 0).all()
    row_sum = np.bincount(al.row_ids(), weights=al.weights, minlength=len(s))
    np.testing.assert_allclose(row_sum[nonempty], 1.0, atol=1e-5)
    assert (al.weights > 0).all()
    # Every entry points to a teacher token that really shares characters with the student token.
    rows, cols = al.row_ids(), al.indices
    inter = np.minimum(s[rows, 1], t[cols, 1]) - np.maximum(s[rows, 0], t[cols, 0])
    assert (inter > 0).all()
    np.testing.assert_array_equal(al.coverage[~nonempty], 0.0)
    assert ((al.coverage >= 0) & (al.coverage <= 1)).all()


# --------------------------------------------------------------------------------------------------------------
# Real tokenizers on all of GSM8K test


@pytest.mark.slow
@pytest.mark.parametrize("name", TOKENIZERS)
def test_gsm8k_spans_cover_every_character(assets, name):
    gsm8k = assets("gsm8k/test.jsonl")
    texts = _gsm8k_texts(gsm8k)
    all_spans = _gsm8k_spans(assets(name), gsm8k)
    assert len(texts) == 1319
    for text, spans in zip(texts, all_spans):
        assert spans.dtype == np.int64 and spans.shape[1] == 2
        assert (spans[:, 0] >= 0).all() and (spans[:, 1] >= spans[:, 0]).all() and (spans[:, 1] <= len(text)).all()
        # Sorted by start: the normalisation keeps real tokenizers monotone.
        assert (np.diff(spans[:, 0]) >= 0).all()
        edges = np.bincount(spans[:, 0], minlength=len(text) + 1) - np.bincount(spans[:, 1], minlength=len(text) + 1)
        assert (np.cumsum(edges[:-1]) > 0).all(), "every character belongs to some token"


@pytest.mark.slow
@pytest.mark.parametrize("teacher", TOKENIZERS)
@pytest.mark.parametrize("student", TOKENIZERS)
def test_gsm8k_all_pairs(assets, student, teacher):
    gsm8k = assets("gsm8k/test.jsonl")
    student_spans = _gsm8k_spans(assets(student), gsm8k)
    teacher_spans = _gsm8k_spans(assets(teacher), gsm8k)
    for item, (s, t) in enumerate(zip(student_spans, teacher_spans)):
        al = align_tokens(s, t)
        _check_alignment(al, s, t)
        nonempty = s[:, 1] > s[:, 0]
        # Every character of the text is in some teacher token, so coverage is full.
        np.testing.assert_array_equal(al.coverage[nonempty], 1.0)
        if item % DENSE_EVERY:
            continue
        dense = al.to_dense(len(t))
        reference = align_dense_reference(s, t)
        if student == teacher:
            # The identity fast path: token i ↔ token i. The IoU rule agrees except where several tokens share
            # a character (byte pieces), which it spreads over all of them.
            np.testing.assert_array_equal(dense, np.diag(nonempty.astype(np.float32)))
            alone = ~_is_shared(s)
            np.testing.assert_allclose(dense[alone], reference[alone], atol=1e-6)
        else:
            np.testing.assert_allclose(dense, reference, atol=1e-6)


# --------------------------------------------------------------------------------------------------------------
# Non-ASCII, whitespace, special tokens

ODD_TEXTS = [
    "日本語のテキスト",
    "emoji 😀 and 🎉🎉 here",
    "e\u0301 cafe\u0301 na\u0308ive",
    "tabs\tand   spaces\n\n  indented",
    " leading space",
    "\u200bzero\u00a0width",
    "😀",
    "",
]


@pytest.mark.parametrize("text", ODD_TEXTS)
def test_odd_texts_all_pairs(tok, text):
    spans = {}
    for name in TOKENIZERS:
        ids, s = token_spans(tok(name), text)
        assert ids.dtype == np.int64 and ids.shape == (len(s),) and s.shape == (len(ids), 2)
        assert (s[:, 0] >= 0).all() and (s[:, 1] >= s[:, 0]).all() and (s[:, 1] <= len(text)).all()
        covered = np.zeros(len(text), dtype=bool)
        for a, b in s:
            covered[a:b] = True
        assert all(covered[i] or c.isspace() for i, c in enumerate(text)), f"{name} drops a character"
        spans[name] = s
    for s in spans.values():
        for t in spans.values():
            al = align_tokens(s, t)
            _check_alignment(al, s, t)
            if s is not t:
                np.testing.assert_allclose(al.to_dense(len(t)), align_dense_reference(s, t), atol=1e-6)


def test_empty_text(tok):
    ids, s = token_spans(tok("tokenizers/gpt2"), "")
    assert ids.shape == (0,) and s.shape == (0, 2)
    ids_bos, s_bos = token_spans(tok("models/stories260K_hf_derived"), "")
    np.testing.assert_array_equal(s_bos, [[0, 0]])  # only BOS, zero-width
    al = align_tokens(s_bos, s)
    np.testing.assert_array_equal(al.indptr, [0, 0])
    np.testing.assert_array_equal(al.coverage, [0.0])
    assert al.to_dense(0).shape == (1, 0)
    assert align_tokens(s, s_bos).num_student_tokens == 0


def test_bos_and_eos_are_zero_width(assets):
    from tokenizers.processors import TemplateProcessing

    # A fresh copy, since the post-processor is changed to add EOS (none of the shipped ones adds it).
    t = AutoTokenizer.from_pretrained(assets("models/stories260K_hf_derived"), local_files_only=True)
    t.backend_tokenizer.post_processor = TemplateProcessing(
        single="<s> $A </s>", special_tokens=[("<s>", t.bos_token_id), ("</s>", t.eos_token_id)]
    )
    text = "Once upon a time"
    ids, s = token_spans(t, text)
    assert ids[0] == t.bos_token_id and ids[-1] == t.eos_token_id
    np.testing.assert_array_equal(s[0], [0, 0])
    np.testing.assert_array_equal(s[-1], [len(text), len(text)])  # after the text, so spans stay sorted
    ids_plain, s_plain = token_spans(t, text, add_special_tokens=False)
    np.testing.assert_array_equal(ids_plain, ids[1:-1])
    np.testing.assert_array_equal(s_plain, s[1:-1])

    al = align_tokens(s, token_spans(_tokenizer(assets("tokenizers/gpt2")), text)[1])
    assert al.indptr[1] == 0 and al.indptr[-1] == al.indptr[-2], "BOS and EOS rows are empty"
    assert al.coverage[0] == 0 and al.coverage[-1] == 0


def test_sentencepiece_dummy_prefix_is_zero_width(tok):
    # Llama-2 prepends "▁"; with no "▁日" piece it stands alone and its offsets claim "日".
    ids, s = token_spans(tok("tokenizers/llama2"), "日本")
    pieces = tok("tokenizers/llama2").convert_ids_to_tokens(ids.tolist())
    assert pieces[0] == "▁"
    np.testing.assert_array_equal(s, [[0, 0], [0, 1], [1, 2]])
    # Text that starts with a space: the dummy "▁" is zero-width and the word keeps the real space.
    ids, s = token_spans(tok("tokenizers/llama2"), " Hello")
    assert tok("tokenizers/llama2").convert_ids_to_tokens(ids.tolist()) == ["▁", "▁Hello"]
    np.testing.assert_array_equal(s, [[0, 0], [0, 6]])


def test_leading_space_kept_alike_in_both_conventions(tok):
    text = "Natalia sold 48 clips"
    _, gpt2 = token_spans(tok("tokenizers/gpt2"), text)
    _, llama = token_spans(tok("tokenizers/llama2"), text)
    assert [12, 15] in gpt2.tolist()  # "Ġ48" keeps its space
    assert [12, 13] in llama.tolist()  # Llama's bare "▁" before the digits
    assert [7, 12] in gpt2.tolist() and [7, 12] in llama.tolist()  # "Ġsold" / "▁sold": the same span


def test_byte_pieces_share_their_character(tok):
    ids, s = token_spans(tok("tokenizers/llama2"), "a😀")
    pieces = tok("tokenizers/llama2").convert_ids_to_tokens(ids.tolist())
    assert pieces[-4:] == ["<0xF0>", "<0x9F>", "<0x98>", "<0x80>"]
    np.testing.assert_array_equal(s[-4:], [[1, 2]] * 4)
    # A student character token over the four byte pieces: equal IoU, so a quarter each.
    al = align_tokens(np.array([[0, 1], [1, 2]]), s)
    np.testing.assert_allclose(al.weights[al.indptr[1] :], 0.25)


def test_nfc_dropped_combining_mark_joins_its_base(tok):
    # Qwen2 normalises to NFC: its offsets give "fé" = (2, 4), leaving U+0301 at 4 to no token.
    text = "cafe\u0301 x"
    _, s = token_spans(tok("tokenizers/qwen2"), text)
    np.testing.assert_array_equal(s, [[0, 2], [2, 5], [5, 7]])
    _, g = token_spans(tok("tokenizers/gpt2"), text)  # GPT-2 does not normalise: byte pieces of U+0301
    assert g.tolist().count([4, 5]) == 2
    al = align_tokens(g, s)
    np.testing.assert_array_equal(al.coverage, 1.0)


# --------------------------------------------------------------------------------------------------------------
# Hand-made cases


def test_known_iou_weights():
    student = np.array([[0, 4], [4, 6], [6, 6], [6, 10], [8, 12], [20, 22]])
    teacher = np.array([[0, 2], [2, 5], [5, 10], [10, 10]])
    al = align_tokens(student, teacher)
    np.testing.assert_array_equal(al.indptr, [0, 2, 4, 4, 5, 6, 6])
    np.testing.assert_array_equal(al.indices, [0, 1, 1, 2, 2, 2])
    # [0,4): IoU with [0,2) = 2/4, with [2,5) = 2/5 → 5/9, 4/9. [4,6): 1/4 and 1/6 → 3/5, 2/5.
    # [6,10) and [8,12) overlap only [5,10) → 1. [6,6) is zero-width, [20,22) overlaps nothing: empty rows.
    np.testing.assert_allclose(al.weights, [5 / 9, 4 / 9, 3 / 5, 2 / 5, 1, 1], rtol=1e-6)
    np.testing.assert_allclose(al.coverage, [1, 1, 0, 1, 0.5, 0])
    assert al.weights.dtype == np.float32 and al.coverage.dtype == np.float32
    np.testing.assert_allclose(al.to_dense(4), align_dense_reference(student, teacher), atol=1e-7)

    hard = al.hard()
    np.testing.assert_array_equal(hard.indptr, [0, 1, 2, 2, 3, 4, 4])
    np.testing.assert_array_equal(hard.indices, [0, 1, 2, 2])
    np.testing.assert_array_equal(hard.weights, 1.0)
    np.testing.assert_array_equal(hard.coverage, al.coverage)


def test_identity_fast_path():
    spans = np.array([[0, 0], [0, 3], [3, 4], [3, 4], [4, 9]])
    al = align_tokens(spans, spans.copy())
    np.testing.assert_array_equal(al.indptr, [0, 0, 1, 2, 3, 4])
    np.testing.assert_array_equal(al.indices, [1, 2, 3, 4])
    np.testing.assert_array_equal(al.weights, 1.0)
    np.testing.assert_array_equal(al.coverage, [0, 1, 1, 1, 1])


def test_non_monotone_and_unsorted_teacher_spans():
    # A long span followed by shorter ones inside it (running-max ends), then unsorted starts.
    student = np.array([[0, 2], [2, 4], [4, 9], [9, 13], [13, 13], [14, 15]])
    teacher = np.array([[0, 10], [2, 3], [3, 4], [12, 14], [1, 2], [8, 9]])
    al = align_tokens(student, teacher)
    np.testing.assert_allclose(al.to_dense(len(teacher)), align_dense_reference(student, teacher), atol=1e-6)
    np.testing.assert_allclose(al.coverage, [1, 1, 1, 0.5, 0, 0])  # [9, 13): chars 9 and 12
    np.testing.assert_array_equal(np.diff(al.indptr), [2, 3, 2, 2, 0, 0])  # [14, 15) overlaps nothing
    # Entries of a row are ordered by teacher start: [0, 2) sees [0, 10) then [1, 2).
    np.testing.assert_array_equal(al.indices[: al.indptr[1]], [0, 4])


def test_random_spans_match_reference():
    rng = np.random.default_rng(0)
    for _ in range(200):
        n_s, n_t, length = rng.integers(0, 30), rng.integers(0, 30), int(rng.integers(1, 40))
        student = np.sort(rng.integers(0, length + 1, size=(n_s, 2)), axis=1)
        teacher = np.sort(rng.integers(0, length + 1, size=(n_t, 2)), axis=1)
        al = align_tokens(student, teacher)
        dense = align_dense_reference(student, teacher)
        np.testing.assert_allclose(al.to_dense(n_t), dense, atol=1e-6)
        # Coverage against a character-by-character count.
        covered = np.zeros(length, dtype=bool)
        for a, b in teacher:
            covered[a:b] = True
        expected = [covered[a:b].mean() if b > a else 0.0 for a, b in student]
        np.testing.assert_allclose(al.coverage, expected, atol=1e-6)
        hard = al.hard()
        rows = np.flatnonzero(np.diff(al.indptr))
        if len(rows):
            np.testing.assert_array_equal(hard.indices, dense[rows].argmax(axis=1))  # ties: lowest index


def test_apply_matches_a_loop():
    rng = np.random.default_rng(1)
    student = np.array([[0, 4], [4, 6], [6, 6], [6, 10], [20, 22]])
    teacher = np.array([[0, 2], [2, 5], [5, 10]])
    al = align_tokens(student, teacher)
    values = rng.standard_normal((3, 2, 5)).astype(np.float32)  # [T_t, kv_heads, head_dim]
    expected = np.zeros((5, 2, 5), dtype=np.float32)
    for i in range(al.num_student_tokens):
        for k in range(al.indptr[i], al.indptr[i + 1]):
            expected[i] += al.weights[k] * values[al.indices[k]]
    out = apply(al, values)
    assert out.shape == (5, 2, 5) and out.dtype == np.float32
    np.testing.assert_allclose(out, expected, rtol=1e-6, atol=1e-7)
    np.testing.assert_array_equal(out[[2, 4]], 0.0)  # rows with no weights
    assert apply(al, np.arange(3)).dtype == np.float64  # integers become floating point

    tv = torch.from_numpy(values).requires_grad_()
    out_t = apply(al, tv)
    torch.testing.assert_close(out_t.detach(), torch.from_numpy(expected))
    out_t.sum().backward()
    # d(sum out)/d(values[j]) = total weight teacher token j receives.
    col_sum = np.bincount(al.indices, weights=al.weights, minlength=3)
    torch.testing.assert_close(tv.grad[:, 0, 0], torch.from_numpy(col_sum).float())
    torch.testing.assert_close(apply(al.hard(), tv).detach()[3], tv.detach()[2])


# --------------------------------------------------------------------------------------------------------------
# Bad input


def test_slow_tokenizer_is_rejected(assets):
    slow = SentencePieceBackend(vocab_file=str(assets("tokenizers/llama2/tokenizer.model")))
    with pytest.raises(ConfigError, match=r"Expected a fast tokenizer \(offset_mapping\)\. Got SentencePieceBackend"):
        token_spans(slow, "hello")


def test_non_string_text_is_rejected(tok):
    with pytest.raises(ConfigError, match="Expected text as a str. Got list instead"):
        token_spans(tok("tokenizers/gpt2"), ["a", "b"])


@pytest.mark.parametrize(
    ("spans", "error", "message"),
    [
        (np.zeros((3,), dtype=np.int64), ShapeError, r"student_spans as an integer array of shape \[T, 2\]"),
        (np.zeros((3, 3), dtype=np.int64), ShapeError, r"shape \[T, 2\] \(start, end\). Got int64 \(3, 3\)"),
        (np.array([[0.0, 1.5]]), ShapeError, r"Got float64 \(1, 2\)"),
        (np.array([[0, 2], [3, 1]]), ConfigError, r"0 <= start <= end. Got \(3, 1\) at token 1"),
        (np.array([[-1, 2]]), ConfigError, r"0 <= start <= end. Got \(-1, 2\) at token 0"),
    ],
)
def test_bad_spans_are_rejected(spans, error, message):
    with pytest.raises(error, match=message):
        align_tokens(spans, np.array([[0, 1]]))
    with pytest.raises(KavaError, match=message.replace("student", "teacher")):
        align_tokens(np.array([[0, 1]]), spans)


def test_apply_and_to_dense_reject_wrong_sizes():
    al = align_tokens(np.array([[0, 2]]), np.array([[0, 1], [1, 2]]))
    with pytest.raises(ShapeError, match=r"teacher_values with 2 rows .* Got shape \(3, 4\)"):
        apply(al, np.zeros((3, 4)))
    with pytest.raises(ShapeError, match="floating-point teacher_values tensor. Got torch.int64"):
        apply(al, torch.zeros(2, dtype=torch.int64))
    with pytest.raises(ConfigError, match=r"num_teacher_tokens > 1 .* Got 1 instead"):
        al.to_dense(1)
    with pytest.raises(ShapeError, match=r"Expected indptr \[T_s\+1\]"):
        Alignment(np.array([0, 2]), np.array([0]), np.array([1.0], dtype=np.float32), np.ones(1), 2)


def test_remap_spans_moves_each_piece_and_drops_glue():
    from kava.extract.align import remap_spans

    # teacher text "Q: abc\\nA: de" (pieces at 3-6 and 10-12) → student text "Question: abc\\nAnswer: de"
    src = {"prompt": (3, 6), "answer": (10, 12)}
    dst = {"prompt": (10, 13), "answer": (22, 24)}
    spans = np.array([[0, 2], [2, 4], [4, 6], [6, 10], [10, 12]])
    out = remap_spans(spans, src, dst)
    # "Q:" is glue → zero-width; " a" keeps its piece part "a"; "bc" moves by 7; "\\nA: " is glue; "de" moves by 12
    np.testing.assert_array_equal(out, [[0, 0], [10, 11], [11, 13], [13, 13], [22, 24]])
    assert np.all(np.diff(out[:, 0]) >= 0)  # still sorted for the linear sweep
