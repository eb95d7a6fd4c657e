"""One batch through the teacher: its texts, the forward pass that captures Q/K/V, generation, and how its rows
map onto the student's tokens. The recipe (``recipe.py``) calls these per batch; they take and return arrays and
tensors, and do no I/O.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, NamedTuple, cast

import numpy as np
import torch

from kava.core.padding import left_pad

from .align import Alignment, align_tokens, remap_spans, token_spans
from .capture import KRope, QKVCapture
from .grid import GridSample
from .logits import NO_TARGET, boundary_rows, topk_logprobs
from .templates import PromptTemplate, format_row, segment_ids
from .warp import time_warp

if TYPE_CHECKING:
    from transformers import GenerationMixin, PreTrainedModel, PreTrainedTokenizerBase


def teacher_texts(batch: Sequence[GridSample], template: PromptTemplate, teacher_template: PromptTemplate
                  ) -> tuple[list[str], list[dict[str, tuple[int, int]]]]:
    """What the teacher reads for each sample, and the character spans of its pieces in that text.

    Under the student's own template that is the grid text. Under another template the row is formatted anew and
    cut where the student's text was cut (the same position inside the same piece).
    """
    if teacher_template.format == template.format:
        return [s.text for s in batch], [s.seg_spans for s in batch]
    texts: list[str] = []
    pieces: list[dict[str, tuple[int, int]]] = []
    for sample in batch:
        if sample.row is None or not sample.text:
            texts.append("")
            pieces.append({})
            continue
        formatted = format_row(sample.row, teacher_template)
        text = formatted.text
        if sample.status == "truncated":
            cut = len(sample.text)  # the student's text ends here, inside one of its pieces
            key = next((k for k, (a, b) in sample.seg_spans.items() if a <= cut <= b), None)
            if key is not None:
                text = text[: formatted.spans[key][0] + cut - sample.seg_spans[key][0]]
        texts.append(text)
        pieces.append(dict(formatted.spans))
    return texts, pieces


class TeacherRows(NamedTuple):
    """One sample's teacher rows from :func:`teacher_forward`, on the teacher's own tokens."""

    k: torch.Tensor
    """float32 ``[T_t, L, H, D]`` on the CPU."""
    v: torch.Tensor
    q: torch.Tensor | None
    """float32 ``[T_t, Lq, Hq, D]``, or None."""
    logits: tuple[torch.Tensor, torch.Tensor] | None = None
    """``(ids int64, logp float32)``, each ``[T_t, top_k]``: what the teacher predicts after each of its tokens;
    None unless asked for."""


def teacher_forward(model: PreTrainedModel, encoded: Sequence[tuple[np.ndarray, np.ndarray]],
                    layers: Sequence[int], q_layers: Sequence[int], k_rope: KRope, device: torch.device,
                    capture_qkv: Callable[..., QKVCapture], *, logit_top_k: int = 0) -> list[TeacherRows]:
    """One padded forward pass → per sample its :class:`TeacherRows` (None for an empty sample).

    With ``logit_top_k`` the whole LM runs and each sample keeps only its top-k log-probabilities: the ``[B, T, V]``
    logits are reduced one row at a time and dropped before this returns.
    """
    lengths = [len(ids) for ids, _ in encoded]
    out: list[TeacherRows] = [None] * len(encoded)  # type: ignore[list-item]
    live = [i for i, n in enumerate(lengths) if n > 0]
    if not live:
        return out
    T = max(lengths[i] for i in live)
    ids = torch.zeros(len(live), T, dtype=torch.long)
    mask = torch.zeros(len(live), T, dtype=torch.long)
    for row, i in enumerate(live):
        ids[row, : lengths[i]] = torch.as_tensor(encoded[i][0])
        mask[row, : lengths[i]] = 1
    cap = capture_qkv(model, ids.to(device), mask.to(device), layers=list(layers),
                      with_q=list(q_layers) if q_layers else False, k_rope=k_rope, with_logits=logit_top_k > 0)
    tops: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * len(live)
    if cap.logits is not None:
        # Row by row: the float32 log-softmax of one row is [T, V], not [B, T, V].
        for row, i in enumerate(live):
            top_ids, top_logp = topk_logprobs(cap.logits[row, : lengths[i]], logit_top_k)
            tops[row] = (top_ids.cpu(), top_logp.cpu())
        cap = dataclasses.replace(cap, logits=None)  # the [B, T, V] logits are freed here

    def stack(per_layer: dict[int, torch.Tensor], which: Sequence[int]) -> torch.Tensor:
        # per layer (B, heads, T, D) → (B, T, L, heads, D), float32 on the CPU
        return torch.stack([per_layer[l] for l in which], 2).transpose(1, 3).float().cpu()

    k, v = stack(cap.keys, layers), stack(cap.values, layers)
    q = stack(cap.queries, q_layers) if q_layers else None
    for row, i in enumerate(live):
        n = lengths[i]
        out[i] = TeacherRows(k[row, :n], v[row, :n], None if q is None else q[row, :n], tops[row])
    return out


def student_logits(sample: GridSample, t_spans: np.ndarray, piece: dict[str, tuple[int, int]],
                   top: tuple[torch.Tensor, torch.Tensor], *, generated: bool, same_text: bool
                   ) -> tuple[np.ndarray, np.ndarray]:
    """The teacher's top-k on the student's tokens: ``(ids int32, logp float32)``, each ``[T_s, top_k]``.

    Student token ``t`` takes the row of the teacher token that ends at the same character (``boundary_rows``)
    over the spans the K/V alignment uses: the teacher's own on the same text, moved into the student's text
    piece by piece under another template. A teacher that read its own generated text read another text than the
    student's, so no token takes a row (every id ``NO_TARGET``).
    """
    ids, logp = (np.asarray(x) for x in top)
    n, k = len(sample.input_ids), ids.shape[1]
    if generated:
        rows = np.full(n, NO_TARGET, dtype=np.int64)
    else:
        spans = t_spans if same_text else remap_spans(t_spans, piece, sample.seg_spans)
        rows = boundary_rows(sample.spans, spans)
    hit = rows >= 0
    out_ids = np.full((n, k), NO_TARGET, dtype=np.int32)
    out_logp = np.zeros((n, k), dtype=np.float32)
    out_ids[hit] = ids[rows[hit]]
    out_logp[hit] = logp[rows[hit]]
    return out_ids, out_logp


def generate_reasoning(model: PreTrainedModel, tok: PreTrainedTokenizerBase, texts: list[str],
                       pieces: list[dict[str, tuple[int, int]]], max_new_tokens: int, device: torch.device
                       ) -> list[str]:
    """The teacher writes its own reasoning and answer, greedily, after each sample's prompt: one batched
    ``generate`` with the prompts left-padded (a decoder continues from the last position of every row)."""
    prompts = [text[: piece["reasoning"][0]] if text else "" for text, piece in zip(texts, pieces)]
    live = [i for i, prompt in enumerate(prompts) if prompt]
    out = [""] * len(texts)
    if not live:
        return out
    encoded = [token_spans(tok, prompts[i])[0] for i in live]
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    ids, mask = left_pad(encoded, pad)
    T = ids.shape[1]
    with torch.no_grad():  # a causal LM: transformers adds generate() to it (GenerationMixin)
        generated = cast("GenerationMixin", model).generate(ids.to(device), attention_mask=mask.to(device),
                                                            max_new_tokens=max_new_tokens, do_sample=False,
                                                            pad_token_id=pad)
    for row, i in enumerate(live):
        out[i] = prompts[i] + cast(str, tok.decode(generated[row, T:], skip_special_tokens=True))  # one row: a str
    return out


def sample_alignment(sample: GridSample, t_ids: np.ndarray, t_spans: np.ndarray, text: str,
               piece: dict[str, tuple[int, int]], *, generated: bool, same_text: bool, same_tokenizer: bool,
               hard: bool, special_ids: np.ndarray) -> Alignment | None:
    """How a sample's teacher rows ``[T_t]`` map onto its student tokens ``[T_s]`` (an ``Alignment``), or None
    when they are the same tokens."""
    if generated:  # the teacher read its own text: resample segment by segment
        al = _warp_alignment(sample, text, piece, t_spans, t_ids, special_ids)
    elif same_text and same_tokenizer and np.array_equal(t_ids, sample.input_ids[: len(t_ids)]):
        if len(t_ids) == len(sample.input_ids):
            return None
        # The teacher's own tokens, then the EOS the grid appends, which no teacher reads: no row, weight 0.
        n_t, n_s = len(t_ids), len(sample.input_ids)
        al = Alignment(np.minimum(np.arange(n_s + 1), n_t), np.arange(n_t), np.ones(n_t, np.float32),
                       (np.arange(n_s) < n_t).astype(np.float32), n_t)
    elif same_text:
        al = align_tokens(sample.spans, t_spans)
    else:  # another template: move the teacher's spans into the student's text first, piece by piece
        al = align_tokens(sample.spans, remap_spans(t_spans, piece, sample.seg_spans))
    return al.hard() if hard else al


def _warp_alignment(sample: GridSample, teacher_text: str, pieces: dict[str, tuple[int, int]],
                    teacher_spans: np.ndarray, teacher_ids: np.ndarray, special_ids: np.ndarray) -> Alignment:
    """Segment-aware resampling of a teacher's own text onto the student's: prompt→prompt, reasoning→reasoning,
    answer→answer.

    The teacher's text is its prompt followed by what it generated; the generation is split at its ``####`` into
    reasoning and answer, and segment ids follow the grid's own rule (``segment_ids``), so equal prompts give equal
    prompt segments and the prompt maps one to one.
    """
    generated = pieces["reasoning"][0]
    answer_at = teacher_text.find("####", generated)
    seg_spans = {"prompt": pieces["prompt"]}
    if answer_at < 0:
        seg_spans["reasoning"] = (generated, len(teacher_text))
    else:
        seg_spans["reasoning"] = (generated, len(teacher_text[:answer_at].rstrip()))
        seg_spans["answer"] = (answer_at, len(teacher_text))
    segs = segment_ids(teacher_spans, seg_spans, special_mask=np.isin(teacher_ids, special_ids))
    return time_warp(segs, sample.segment_ids)
