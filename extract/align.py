"""Tokenizer alignment: map each student token to the teacher tokens that cover the same characters.

Distillation runs the teacher and the student on the SAME text but with different tokenizers. Each token is
reduced to the half-open character interval ``[start, end)`` of the text it stands for (its *span*); a student
token then takes weights over the teacher tokens whose spans overlap its own, weight ∝ IoU of the two intervals
(intersection length / union length), normalised to sum to 1 per student token.

Three pieces:

- :func:`token_spans` turns a fast tokenizer's ``offset_mapping`` into spans that compare across tokenizers
  (the normalisation rules are listed in its docstring).
- :func:`align_tokens` computes the sparse alignment in one vectorised sweep (``np.searchsorted`` over the
  teacher's sorted starts and running-max ends: the two-pointer merge, done by numpy); :class:`Alignment` holds
  it as CSR arrays, and :func:`apply` moves teacher rows (K, V, hidden states) onto the student's tokens.
- :func:`align_dense_reference` is the obvious ``O(T_s * T_t)`` computation, for tests and benchmarks only.

Zero-width spans (special tokens such as BOS/EOS, SentencePiece's dummy-prefix ``▁``) stand for no text: a
zero-width student token gets no teacher weights and coverage 0, and a zero-width teacher token is never used.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeVar

import numpy as np
import numpy.typing as npt
import torch

from kava.core.errors import ConfigError, ShapeError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

__all__ = ["Alignment", "align_dense_reference", "align_tokens", "apply", "token_spans"]

# Pieces that stand for a bare space: SentencePiece's metaspace and byte-level BPE's encoded " ".
_SPACE_MARKERS = frozenset({"\u2581", "\u0120"})

ArrayOrTensor = TypeVar("ArrayOrTensor", np.ndarray, torch.Tensor)


# --------------------------------------------------------------------------------------------------------------
# Spans from a tokenizer


def token_spans(tokenizer: PreTrainedTokenizerBase, text: str, *, add_special_tokens: bool = True
                ) -> tuple[np.ndarray, np.ndarray]:
    """Tokenize ``text`` and return each token's character span, normalised to compare across tokenizers.

    Args:
        tokenizer: a *fast* Hugging Face tokenizer (one that returns ``offset_mapping``).
        text: the text; spans index into it as Python ``str`` indices (code points).
        add_special_tokens: passed to the tokenizer (BOS/EOS and the like).

    Returns:
        ``(input_ids, spans)``: ``input_ids`` int64 ``[T]``; ``spans`` int64 ``[T, 2]`` of half-open
        ``[start, end)`` character intervals with ``0 <= start <= end <= len(text)``.

    Normalisation (every rule is something the real tokenizers in the shared assets do):

    1. **Special tokens** (``special_tokens_mask == 1``: BOS, EOS, pad, chat markers) stand for no text and get
       a zero-width span, placed at the end of the preceding token (``(0, 0)`` at the start) so spans stay
       sorted.
    2. **SentencePiece dummy prefix.** Llama-2-style tokenizers prepend a ``▁`` to the text. When it does not
       merge into the first word it becomes a bare ``▁`` token whose offsets claim the first character (or the
       text's own leading space) — the same span the next token starts at. A bare space-marker piece (``▁`` or
       ``Ġ``) that is the first non-special token and starts where the next token starts is that marker: it
       gets the zero-width span ``(start, start)``.
    3. **Leading spaces are kept.** Byte-level BPE (``Ġword``, GPT-2/Qwen2) and SentencePiece (``▁word``) both
       attach one preceding space to the word and both report it in the offsets (``" world"`` = ``(6, 12)`` in
       either), so the same word gets the same span in both conventions. Stripping it instead would leave a
       student's bare-space token (Llama-2 and Qwen2 split digits off, so ``" 48"`` is ``▁``, ``4``, ``8``)
       with no overlapping teacher token where the teacher has ``Ġ48``; kept, every character is covered by
       some token of every tokenizer, and the space costs a word only a little IoU.
    4. **Byte pieces of one character share its span.** Byte-fallback (``<0xF0>`` … ``<0x80>`` for an emoji)
       and byte-level pieces that split a character all report that character; the spans are kept as
       reported, so several tokens may share a span or overlap (``ĠðŁĺ`` = ``(3, 5)``, ``Ģ`` = ``(4, 5)``).
       :func:`align_tokens` handles shared and overlapping spans.
    5. **Characters a normaliser dropped go to their neighbour.** Qwen2 applies NFC, so ``"e\\u0301"`` becomes one
       token whose offsets cover only the ``e``. A non-whitespace character no token covers is added to the
       token that ends right before it (else to the token that starts right after it). Uncovered whitespace
       (a tokenizer that strips it) stays uncovered.

    Raises:
        ConfigError: the tokenizer is not a fast tokenizer, or ``text`` is not a string.
    """
    if not isinstance(text, str):
        raise ConfigError(f"Expected text as a str. Got {type(text).__name__} instead. Pass one string at a time.")
    if not getattr(tokenizer, "is_fast", False):
        raise ConfigError(
            f"Expected a fast tokenizer (offset_mapping). Got {type(tokenizer).__name__} instead. "
            "Load it with AutoTokenizer.from_pretrained(..., use_fast=True) or convert it to a tokenizer.json."
        )
    try:
        enc = tokenizer(
            text,
            add_special_tokens=add_special_tokens,
            return_offsets_mapping=True,
            return_special_tokens_mask=True,
        )
    except NotImplementedError as e:  # slow tokenizers that claim to be fast
        raise ConfigError(
            f"Expected a fast tokenizer (offset_mapping). Got {type(tokenizer).__name__}, which cannot return "
            "offsets. Load it with AutoTokenizer.from_pretrained(..., use_fast=True)."
        ) from e

    input_ids = np.asarray(enc["input_ids"], dtype=np.int64).reshape(-1)
    spans = np.asarray(enc["offset_mapping"], dtype=np.int64).reshape(-1, 2).copy()  # [T, 2]
    special = np.asarray(enc["special_tokens_mask"], dtype=bool).reshape(-1)
    real = np.flatnonzero(~special)  # positions of tokens that stand for text

    # Rule 2: the dummy prefix is part of the first real token; only a bare marker piece needs fixing.
    if len(real) >= 2:
        first, second = real[0], real[1]
        if spans[first, 0] == spans[second, 0]:
            if tokenizer.convert_ids_to_tokens(int(input_ids[first])) in _SPACE_MARKERS:
                spans[first, 1] = spans[first, 0]

    # Rule 5: give characters no real token covers to a neighbour (rare: only when a normaliser merged them).
    nonempty = real[spans[real, 1] > spans[real, 0]]
    if len(text):
        # +1 at each start, -1 at each end; a prefix sum > 0 means the character is covered.
        edges = np.bincount(spans[nonempty, 0], minlength=len(text) + 1) - np.bincount(
            spans[nonempty, 1], minlength=len(text) + 1
        )
        uncovered = np.flatnonzero(np.cumsum(edges[:-1]) == 0)
        if len(uncovered):
            _give_uncovered_chars(text, spans, nonempty, uncovered)

    # Rule 1: special tokens become zero-width at the end of what precedes them.
    if special.any():
        ends = np.where(special, 0, spans[:, 1])
        anchor = np.concatenate([[0], np.maximum.accumulate(ends)[:-1]])  # end of the preceding real token
        spans[special] = anchor[special, None]
    return input_ids, spans


def _give_uncovered_chars(text: str, spans: np.ndarray, nonempty: np.ndarray, uncovered: np.ndarray) -> None:
    """Extend, in place, the spans of the real tokens ``nonempty`` over the non-whitespace ``uncovered`` chars."""
    leftover = []
    # Forward: a run of dropped characters right after a token joins it (every token ending there, so byte
    # pieces that share a span keep sharing it). Going left to right lets the token grow over the whole run.
    for pos in uncovered.tolist():
        if text[pos].isspace():
            continue
        before = nonempty[spans[nonempty, 1] == pos]
        if len(before):
            spans[before, 1] = pos + 1
        else:
            leftover.append(pos)
    # Backward: a run at the very start (or after whitespace) joins the token that follows it.
    for pos in reversed(leftover):
        after = nonempty[spans[nonempty, 0] == pos + 1]
        spans[after, 0] = pos


# --------------------------------------------------------------------------------------------------------------
# The alignment


@dataclass(frozen=True)
class Alignment:
    """Sparse student-by-teacher alignment in CSR form.

    Row ``i`` (student token ``i``) has teacher tokens ``indices[indptr[i]:indptr[i + 1]]`` with ``weights`` at
    the same positions; each row's weights sum to 1, or the row is empty (zero-width student span, or no
    teacher token overlaps it).
    """

    indptr: np.ndarray
    """int64 ``[T_s + 1]``, nondecreasing, ``indptr[0] == 0``, ``indptr[-1] == nnz``."""
    indices: np.ndarray
    """int64 ``[nnz]``: teacher token index of each entry."""
    weights: np.ndarray
    """float32 ``[nnz]``: weight of each entry, > 0."""
    coverage: np.ndarray
    """float32 ``[T_s]`` in ``[0, 1]``: fraction of the student span's characters that some teacher token covers
    (0 for zero-width spans). Use it as the per-token weight of the distillation loss."""
    num_teacher_tokens: int
    """``T_t``: the teacher sequence length this alignment indexes into."""

    def __post_init__(self) -> None:
        # Cheap shape checks only: align_tokens builds these in a hot loop.
        n, nnz = len(self.indptr) - 1, len(self.indices)
        bad_indptr = n < 0 or self.indptr[0] != 0 or self.indptr[-1] != nnz
        if bad_indptr or len(self.weights) != nnz or len(self.coverage) != n:
            raise ShapeError(
                f"Expected indptr [T_s+1] starting at 0 and ending at nnz, indices and weights [nnz], coverage "
                f"[T_s]. Got indptr {self.indptr.shape} ({self.indptr[:1]}..{self.indptr[-1:]}), indices "
                f"{self.indices.shape}, weights {self.weights.shape}, coverage {self.coverage.shape} instead. "
                "Build alignments with align_tokens()."
            )

    @property
    def num_student_tokens(self) -> int:
        return len(self.indptr) - 1

    def row_ids(self) -> np.ndarray:
        """int64 ``[nnz]``: the student token (row) of each entry."""
        return np.repeat(np.arange(self.num_student_tokens, dtype=np.int64), np.diff(self.indptr))

    def to_dense(self, num_teacher_tokens: int | None = None) -> np.ndarray:
        """float32 ``[T_s, T_t]`` weight matrix; ``T_t`` defaults to :attr:`num_teacher_tokens`."""
        t_t = self.num_teacher_tokens if num_teacher_tokens is None else num_teacher_tokens
        if len(self.indices) and t_t <= int(self.indices.max()):
            raise ConfigError(
                f"Expected num_teacher_tokens > {int(self.indices.max())} (the largest teacher index). "
                f"Got {t_t} instead. Pass the teacher's sequence length."
            )
        dense = np.zeros((self.num_student_tokens, t_t), dtype=np.float32)
        dense[self.row_ids(), self.indices] = self.weights
        return dense

    def hard(self) -> Alignment:
        """The hard variant: each non-empty row keeps only its largest-weight teacher token, with weight 1.

        Ties go to the lowest teacher index (as ``argmax`` of the dense matrix), so a student token over the byte
        pieces of one character maps to the first piece. Coverage is unchanged.
        """
        counts = np.diff(self.indptr)
        has = counts > 0
        row_starts = self.indptr[:-1][has]
        if len(row_starts) == 0:
            return self._with(self.indptr, self.indices[:0], self.weights[:0])
        row_max = np.maximum.reduceat(self.weights, row_starts)  # [rows with entries]
        is_max = self.weights == np.repeat(row_max, counts[has])
        # The smallest teacher index among each row's maximal entries.
        best = np.minimum.reduceat(np.where(is_max, self.indices, self.num_teacher_tokens), row_starts)
        indptr = np.concatenate([[0], np.cumsum(has, dtype=np.int64)])
        return self._with(indptr, best.astype(np.int64), np.ones(len(best), dtype=np.float32))

    def _with(self, indptr: np.ndarray, indices: np.ndarray, weights: np.ndarray) -> Alignment:
        return Alignment(indptr, indices, weights, self.coverage, self.num_teacher_tokens)


def _check_spans(spans: npt.ArrayLike, name: str) -> np.ndarray:
    """``spans`` as int64 ``[T, 2]`` with ``0 <= start <= end``; a ShapeError when it is not ``[T, 2]`` integers, a
    ConfigError when a span is not ``0 <= start <= end``."""
    arr = np.asarray(spans)
    if arr.ndim != 2 or arr.shape[1] != 2 or not (arr.dtype.kind in "iu" or arr.size == 0):
        raise ShapeError(
            f"Expected {name} as an integer array of shape [T, 2] (start, end). Got {arr.dtype} {arr.shape} "
            "instead. Pass the spans from token_spans()."
        )
    arr = arr.astype(np.int64, copy=False)
    if len(arr) and (arr[:, 0].min() < 0 or (arr[:, 1] < arr[:, 0]).any()):
        bad = int(np.flatnonzero((arr[:, 0] < 0) | (arr[:, 1] < arr[:, 0]))[0])
        raise ConfigError(
            f"Expected {name} with 0 <= start <= end. Got {tuple(arr[bad].tolist())} at token {bad} instead. "
            "Pass half-open character intervals [start, end)."
        )
    return arr


def align_tokens(student_spans: np.ndarray, teacher_spans: np.ndarray) -> Alignment:
    """Align each student token to the teacher tokens whose character spans overlap it, weighted by IoU.

    Args:
        student_spans: int ``[T_s, 2]`` half-open ``[start, end)`` character intervals (see :func:`token_spans`).
        teacher_spans: int ``[T_t, 2]`` intervals over the same text.

    Returns:
        An :class:`Alignment` with ``weight(i, j) = IoU(s_i, t_j) / sum_j' IoU(s_i, t_j')`` over the teacher
        tokens ``j`` that share at least one character with student token ``i``; ``coverage[i]`` is the fraction
        of ``s_i``'s characters inside some teacher span. Zero-width student spans get no weights and coverage
        0; zero-width teacher spans are never used. Entries of a row are ordered by teacher start.

    Identity fast path: when the two span arrays are equal (same tokenizer), student token ``i`` maps to teacher
    token ``i`` with weight 1 (coverage 1 where the span is non-empty). This differs from the IoU rule only
    where several tokens share a span (byte pieces of one character): the IoU rule would spread each piece over
    all of them, the identity keeps each piece on itself.

    Cost: ``O((T_s + T_t) log T_t + nnz)``. Teacher spans are sorted by start (already so for real tokenizers);
    candidates ``[lo, hi)`` for ``[a, b)`` are the teachers with running-max end ``> a`` and start ``< b``. With
    monotone ends every candidate overlaps; otherwise (a long span followed by shorter ones) the candidates are
    a superset that is filtered.

    Raises:
        ShapeError: a span array is not ``[T, 2]`` integers.
        ConfigError: a span does not have ``0 <= start <= end``.
    """
    s = _check_spans(student_spans, "student_spans")
    t = _check_spans(teacher_spans, "teacher_spans")
    n_s, n_t = len(s), len(t)
    if n_s == n_t and np.array_equal(s, t):
        return _identity(s)

    s_start, s_end = s[:, 0], s[:, 1]
    # Teacher tokens that stand for text, sorted by start; `t_index` maps back to the caller's order.
    t_index = np.flatnonzero(t[:, 1] > t[:, 0])
    tt = np.ascontiguousarray(t[t_index].T)  # [2, n]: starts and ends of the non-empty teacher spans
    # One comparison tells whether starts and ends are each nondecreasing (both, for real tokenizers).
    unsorted_start, unsorted_end = (tt[:, 1:] < tt[:, :-1]).any(axis=1).tolist() if len(t_index) > 1 else (0, 0)
    if unsorted_start:
        order = np.argsort(tt[0], kind="stable")
        t_index, tt = t_index[order], tt[:, order]
        unsorted_end = bool((tt[1, 1:] < tt[1, :-1]).any())
    t_start, t_end = tt[0], tt[1]
    monotone = not unsorted_end
    end_max = t_end if monotone else np.maximum.accumulate(t_end)

    # The sweep: for each student [a, b), the first teacher whose (running-max) end passes a and the first
    # whose start reaches b. searchsorted does the two-pointer merge in C.
    lo = np.searchsorted(end_max, s_start, side="right")
    hi = np.searchsorted(t_start, s_end, side="left")
    counts = np.where(s_end > s_start, np.maximum(hi - lo, 0), 0)  # [T_s]

    # Expand the ranges into entries: row r, sorted-teacher position lo[r] + k for k < counts[r].
    indptr = np.zeros(n_s + 1, dtype=np.int64)
    np.cumsum(counts, out=indptr[1:])
    nnz = int(indptr[-1])
    row = np.repeat(np.arange(n_s, dtype=np.int64), counts)  # [nnz]
    col = np.arange(nnz, dtype=np.int64) + np.repeat(lo - indptr[:-1], counts)  # [nnz], into t_start/t_end
    a, b = s_start[row], s_end[row]
    c, d = t_start[col], t_end[col]
    lo_cut, hi_cut = np.maximum(a, c), np.minimum(b, d)  # the intersection [lo_cut, hi_cut)
    inter = hi_cut - lo_cut

    if not monotone:
        keep = inter > 0
        row, col, a, b, c, d, lo_cut, hi_cut, inter = (
            x[keep] for x in (row, col, a, b, c, d, lo_cut, hi_cut, inter)
        )
        counts = np.bincount(row, minlength=n_s)
        np.cumsum(counts, out=indptr[1:])
        nnz = len(row)

    iou = inter / (np.maximum(b, d) - np.minimum(a, c))  # overlapping intervals: the union is one interval
    row_sum = np.bincount(row, weights=iou, minlength=n_s)
    weights = (iou / row_sum[row]).astype(np.float32)

    # Coverage: the length of the union of the row's clipped teacher intervals. Entries are sorted by start, so
    # each adds what lies past the furthest end seen so far in its row (the row's start for its first entry).
    first = indptr[:-1][counts > 0]
    if monotone:
        reach = np.empty(nnz, dtype=np.int64)
        reach[1:] = hi_cut[:-1]
    else:
        # Segmented running max: offsetting row r by r * (len + 1) keeps rows from leaking into each other.
        shift = row * (int(s_end.max(initial=0)) + 1)
        reach = np.empty(nnz, dtype=np.int64)
        reach[1:] = np.maximum.accumulate(hi_cut + shift)[:-1] - shift[1:]
    reach[first] = a[first]
    gained = np.maximum(hi_cut - np.maximum(lo_cut, reach), 0)
    covered = np.bincount(row, weights=gained, minlength=n_s)
    length = s_end - s_start
    coverage = np.divide(covered, length, out=np.zeros(n_s), where=length > 0).astype(np.float32)
    return Alignment(indptr, t_index[col], weights, coverage, n_t)


def _identity(spans: np.ndarray) -> Alignment:
    """Student token ``i`` ↔ teacher token ``i`` for every non-empty span ``[T, 2]``."""
    nonempty = spans[:, 1] > spans[:, 0]
    indptr = np.zeros(len(spans) + 1, dtype=np.int64)
    np.cumsum(nonempty, out=indptr[1:])
    indices = np.flatnonzero(nonempty)
    return Alignment(
        indptr, indices, np.ones(len(indices), dtype=np.float32), nonempty.astype(np.float32), len(spans)
    )


def align_dense_reference(student_spans: np.ndarray, teacher_spans: np.ndarray) -> np.ndarray:
    """The plain ``O(T_s * T_t)`` IoU alignment, float64 ``[T_s, T_t]``; for tests and benchmarks only.

    ``W[i, j] = IoU(s_i, t_j)`` where the spans share at least one character, else 0; each non-zero row is
    normalised to sum to 1. No identity fast path.
    """
    s = _check_spans(student_spans, "student_spans")
    t = _check_spans(teacher_spans, "teacher_spans")
    a, b = s[:, 0, None], s[:, 1, None]  # [T_s, 1]
    c, d = t[None, :, 0], t[None, :, 1]  # [1, T_t]
    inter = np.minimum(b, d) - np.maximum(a, c)
    union = np.maximum(b, d) - np.minimum(a, c)
    iou = np.where(inter > 0, inter / np.maximum(union, 1), 0.0)  # [T_s, T_t]
    row_sum = iou.sum(axis=1, keepdims=True)
    return np.divide(iou, row_sum, out=np.zeros_like(iou), where=row_sum > 0)


def apply(alignment: Alignment, teacher_values: ArrayOrTensor) -> ArrayOrTensor:
    """Move teacher rows onto student tokens: ``out[i] = sum_j W[i, j] * teacher_values[j]``.

    Args:
        alignment: from :func:`align_tokens` (or its :meth:`Alignment.hard`).
        teacher_values: ``[T_t, ...]`` numpy array or torch tensor (e.g. ``[T_t, kv_heads, head_dim]``).

    Returns:
        ``[T_s, ...]`` of the same kind (and, for torch, device and dtype; differentiable); rows with no
        weights are zeros. Integer numpy input gives float32 or wider.

    Raises:
        ShapeError: ``teacher_values`` does not have ``T_t`` rows, or is an integer tensor.
    """
    n_t = alignment.num_teacher_tokens
    if teacher_values.ndim < 1 or teacher_values.shape[0] != n_t:
        raise ShapeError(
            f"Expected teacher_values with {n_t} rows (the teacher tokens the alignment was built for). Got "
            f"shape {tuple(teacher_values.shape)} instead. Put the token axis first."
        )
    n_s = alignment.num_student_tokens
    if isinstance(teacher_values, torch.Tensor):
        if not teacher_values.is_floating_point():
            raise ShapeError(
                f"Expected a floating-point teacher_values tensor. Got {teacher_values.dtype} instead. "
                "Cast it with .float() first."
            )
        # The index arrays are tiny; they follow the values to their device rather than the other way round.
        dev, dtype = teacher_values.device, teacher_values.dtype
        rows = torch.from_numpy(alignment.row_ids()).to(dev)
        cols = torch.from_numpy(alignment.indices).to(dev)
        w = torch.from_numpy(alignment.weights).to(dev, dtype).view(-1, *([1] * (teacher_values.ndim - 1)))
        out = teacher_values.new_zeros((n_s, *teacher_values.shape[1:]))
        return out.index_add(0, rows, teacher_values.index_select(0, cols) * w)

    values = np.asarray(teacher_values)
    dtype = np.result_type(values.dtype, np.float32)
    flat = values.reshape(n_t, -1)  # [T_t, F]
    out = np.zeros((n_s, flat.shape[1]), dtype=dtype)
    counts = np.diff(alignment.indptr)
    has = counts > 0
    if has.any():
        weighted = flat[alignment.indices].astype(dtype, copy=False) * alignment.weights[:, None]  # [nnz, F]
        # Entries are grouped by row, so one reduceat sums each row; it is given only the rows that have
        # entries because reduceat reads an empty segment as one element, not as zero.
        out[has] = np.add.reduceat(weighted, alignment.indptr[:-1][has], axis=0)
    return out.reshape((n_s, *values.shape[1:]))


def remap_spans(
    spans: np.ndarray, src_pieces: Mapping[str, tuple[int, int]], dst_pieces: Mapping[str, tuple[int, int]]
) -> np.ndarray:
    """Move token spans from one formatting of a row to another, piece by piece.

    Two prompt templates put the same pieces (question, reasoning, answer) in different glue text. A span's part
    inside piece ``k`` of the source text moves by ``dst_start_k - src_start_k``; a span touching several pieces keeps
    its largest part; a span entirely in glue text (``"Question: "``) has no counterpart and becomes zero-width (never
    aligned), placed after the previous span's end so spans stay sorted.

    spans: ``[T, 2]`` over the source text → ``[T, 2]`` over the destination text.
    """
    spans = _check_spans(spans, "spans")
    out = np.zeros_like(spans)
    best = np.zeros(len(spans), dtype=np.int64)
    for key in src_pieces.keys() & dst_pieces.keys():
        (sa, sb), (da, db) = src_pieces[key], dst_pieces[key]
        lo = np.maximum(spans[:, 0], sa)
        hi = np.minimum(spans[:, 1], min(sb, sa + (db - da)))  # a cut destination piece is shorter
        overlap = hi - lo
        take = overlap > best
        out[take, 0], out[take, 1] = lo[take] - sa + da, hi[take] - sa + da
        best[take] = overlap[take]
    glue = best == 0
    if glue.any():
        ends = np.maximum.accumulate(np.where(glue, 0, out[:, 1]))
        out[glue, 0] = out[glue, 1] = ends[glue]
    return out
