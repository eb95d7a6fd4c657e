"""The student token grid: dataset rows → formatted text → student tokens with segment ids, cut to --max-length.

The grid is what every teacher of a store lines up with; it depends only on the rows, the prompt template, the
student tokenizer and the length policy, never on a teacher.

Every sample ends with the student tokenizer's EOS token, appended here (no tokenizer in use appends one itself, and a
prompt encoded for generation must not end in one). The EOS stands for no text: its span is zero-width at the end of
the text, its segment is ``special`` (3), and cross-entropy on the completion trains it (it follows the answer), so
the model learns to stop. No teacher reads it (teachers read the text), so its alignment weight is 0: no K/V target.
It counts toward ``--max-length``; a sample cut to fit loses it with whatever else is cut, since a cut sample did not
end. A tokenizer without EOS is refused unless the template ends the answer with a terminator of its own.
"""

from __future__ import annotations

import hashlib
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from kava.core.errors import ConfigError
from kava.core.rows import ReasoningRow, RowSet
from kava.kvstore import DatasetSpec, create_store
from kava.kvstore.manifest import TokenizerSpec

from .align import token_spans
from .templates import PromptTemplate, format_row, segment_ids, template_record, truncate_at_segment


@dataclass(frozen=True)
class GridSample:
    """One sample on the student grid. ``text`` is what the teachers read: the formatted row, cut where the
    student's tokens were cut. Token arrays are ``[T]`` (``spans`` ``[T, 2]``)."""

    sample_id: str
    text: str
    seg_spans: dict[str, tuple[int, int]]
    input_ids: np.ndarray
    spans: np.ndarray
    segment_ids: np.ndarray
    status: str = "ok"
    """``ok``, ``truncated`` or ``skipped`` (zero tokens)."""
    reason: str = ""
    row: ReasoningRow | None = None
    """The dataset row (None for rows the dataset flagged), for teachers that read it under another template."""


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """sha256 of a fast tokenizer's full serialisation (vocab, merges, normaliser, pre/post-processing)."""
    return hashlib.sha256(tokenizer.backend_tokenizer.to_str().encode()).hexdigest()


def tokenizer_spec(tokenizer: Any, name: str) -> tuple[TokenizerSpec, dict[str, bytes]]:
    """The store's description of the student tokenizer, plus its files (saved so distill can rebuild it offline)."""
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save_pretrained(tmp)
        files = {f.name: f.read_bytes() for f in sorted(Path(tmp).iterdir()) if f.is_file()}
    spec = TokenizerSpec(
        name=name,
        fingerprint=tokenizer_fingerprint(tokenizer),
        vocab_size=len(tokenizer),
        kind=type(tokenizer).__name__,
        files=tuple(files),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return spec, files


def with_eos(tokenizer: Any, ids: np.ndarray, spans: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(ids [T], spans [T, 2])`` with the tokenizer's EOS appended (``T + 1`` tokens), zero-width at the end of the
    last token; unchanged when the tokenizer has no EOS or the tokens already end with it."""
    eos = tokenizer.eos_token_id
    if eos is None or (len(ids) and ids[-1] == eos):
        return ids, spans
    end = int(spans[:, 1].max()) if len(spans) else 0
    return np.append(ids, np.int64(eos)), np.concatenate([spans, np.array([[end, end]], dtype=np.int64)])


def _index_of(sample_id: str) -> tuple[int, str]:
    m = re.search(r"(\d+)$", sample_id)
    return (int(m.group(1)) if m else 0, sample_id)


def build_grid(
    rows: RowSet, tokenizer: Any, template: PromptTemplate, *, max_length: int, on_too_long: str
) -> list[GridSample]:
    """Tokenize every row with the student tokenizer; rows the dataset flagged become skipped samples.

    Order is the dataset's (by the row index in the sample id), so the split's id hash is the same whichever
    rows were flagged. Each sample ends with the tokenizer's EOS (see the module docstring).
    """
    if tokenizer.eos_token_id is None and not template.terminator:
        raise ConfigError(f"Expected the student tokenizer to have an EOS token, or template {template.name!r} to end "
                          "the answer with a terminator (text after {answer}). Got neither instead, so a model "
                          "trained on these samples never learns to stop. Set the tokenizer's eos_token or add "
                          "'\\n' after {answer} in the template.")
    out: list[GridSample] = []
    special = np.asarray(sorted(tokenizer.all_special_ids), dtype=np.int64)
    empty_ids, empty_spans = np.zeros(0, np.int64), np.zeros((0, 2), np.int64)
    for problem in rows.problems:
        out.append(GridSample(problem.sample_id, "", {}, empty_ids, empty_spans, empty_ids.astype(np.uint8),
                              "skipped", problem.reason))
    for row in rows:
        formatted = format_row(row, template)
        ids, spans = with_eos(tokenizer, *token_spans(tokenizer, formatted.text))
        segs = segment_ids(spans, formatted.spans, special_mask=np.isin(ids, special))
        status, reason, text = "ok", "", formatted.text
        if len(ids) > max_length:
            cut = truncate_at_segment(spans, segs, max_length, text=formatted.text) if on_too_long == "truncate" \
                else None
            if cut is None:
                status = "skipped"
                reason = f"{len(ids)} tokens > --max-length {max_length}" + (
                    "" if on_too_long == "skip" else "; no segment boundary to cut at")
                ids, spans, segs, text = empty_ids, empty_spans, segs[:0], ""
            else:
                status, reason = "truncated", f"{len(ids)} tokens cut to {cut} at a segment boundary"
                ids, spans, segs = ids[:cut], spans[:cut], segs[:cut]
                text = formatted.text[: int(spans[:, 1].max())] if cut else ""
        out.append(GridSample(row.sample_id, text, dict(formatted.spans), ids, spans, segs, status, reason, row))
    out.sort(key=lambda s: _index_of(s.sample_id))
    return out


def _template_format(template: PromptTemplate) -> dict[str, str]:
    """``{"student_template_format": ...}`` for a template its name alone does not give back (a file, or a
    ``chat:tokenizer`` one rendered from the tokenizer), so a reader rebuilds it exactly; ``{}`` for a registered one
    (stores have always recorded those by name)."""
    record = template_record(template)
    return {} if isinstance(record, str) else {"student_template_format": template.format}


def create_grid_store(
    path: Any,
    rows: RowSet,
    tokenizer: Any,
    template: PromptTemplate,
    *,
    tokenizer_name: str,
    dataset: str,
    split: str,
    max_length: int,
    on_too_long: str,
    shard_tokens: int,
    command: str = "",
    details: dict[str, Any] | None = None,
) -> Any:
    """Create (or reopen, if it holds the same grid) the store at ``path`` for ``rows`` on ``tokenizer``'s grid.

    Extraction calls this before its first teacher; distillation without ``--store`` calls it to train on the same
    kind of batches (grid only, no teachers), so the CE-only baseline goes through the same loader.
    """
    grid = build_grid(rows, tokenizer, template, max_length=max_length, on_too_long=on_too_long)
    if not grid:
        raise ConfigError(f"Dataset {dataset}:{split} has no rows. Check --dataset, --split and --limit.")
    tok_spec, tok_files = tokenizer_spec(tokenizer, tokenizer_name)
    store = create_store(
        path,
        sample_ids=[s.sample_id for s in grid],
        input_ids=[s.input_ids for s in grid],
        segment_ids=[s.segment_ids for s in grid],
        sample_status=[s.status for s in grid],
        status_reasons=[s.reason for s in grid],
        student_tokenizer=tok_spec,
        tokenizer_files=tok_files,
        dataset=DatasetSpec(dataset, split, rows.fingerprint, details={
            **(details or {}), "student_template": template.name, "template_sha256": template.sha256,
            **_template_format(template),
            "max_length": max_length, "on_too_long": on_too_long, "row_problems": len(rows.problems)}),
        shard_tokens=shard_tokens,
        created_by=command,
    )
    return store, grid
