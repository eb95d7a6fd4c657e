"""CKA calibration: layer×layer similarity of teacher (and student) K/V on a few samples, on the student grid.

Per layer the feature of a student token is its K and V concatenated over heads and head_dim, ``[T_s, 2·H·D]``
(teacher rows aligned onto student tokens first, so teacher and student rows describe the same text). Each sample
is one minibatch of the unbiased-HSIC estimator; the biased estimator runs over all rows at once. Both are stored,
named, because biased CKA is inflated when rows are few and dimensions many.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from kava.core.placement import input_device

from .align import align_tokens, apply, token_spans
from .capture import attention_geometry, capture_qkv
from .cka import CKAAccumulator
from .grid import GridSample

FEATURES = "concat(K, V) over heads and head_dim per token, K before RoPE, teacher rows aligned to student tokens"


def _features(model: Any, tokenizer: Any, samples: Sequence[GridSample], *, student_grid: bool,
              batch_size: int) -> tuple[list[list[np.ndarray]], list[np.ndarray]]:
    """Per sample, per layer: ``[T_kept, 2·H·D]`` float64 features on the student's tokens; and per sample the
    ``[T_s]`` mask of student tokens kept (teacher rows: those some teacher token covers; student rows: all)."""
    num_layers = attention_geometry(model.config)[0]
    device = input_device(model)
    out: list[list[np.ndarray]] = []
    kept: list[np.ndarray] = []
    for b in range(0, len(samples), batch_size):
        batch = samples[b : b + batch_size]
        if student_grid:
            encoded = [(s.input_ids, s.spans) for s in batch]
        else:
            encoded = [token_spans(tokenizer, s.text) for s in batch]
        T = max(len(ids) for ids, _ in encoded)
        ids = torch.zeros(len(batch), T, dtype=torch.long)
        mask = torch.zeros(len(batch), T, dtype=torch.long)
        for i, (x, _) in enumerate(encoded):
            ids[i, : len(x)] = torch.as_tensor(x)
            mask[i, : len(x)] = 1
        cap = capture_qkv(model, ids.to(device), mask.to(device), k_rope="pre")
        for i, (sample, (x, spans)) in enumerate(zip(batch, encoded)):
            n = len(x)
            # per layer (heads, n, D) → (n, heads·D), K and V side by side
            layers = [torch.cat([cap.keys[l][i, :, :n].transpose(0, 1).reshape(n, -1),
                                 cap.values[l][i, :, :n].transpose(0, 1).reshape(n, -1)], -1).double().cpu().numpy()
                      for l in range(num_layers)]
            keep = np.ones(n, dtype=bool)
            if not student_grid:
                al = align_tokens(sample.spans, spans)
                keep = al.coverage > 0
                layers = [apply(al, f)[keep] for f in layers]
            out.append(layers)
            kept.append(keep)
    return out, kept


def calibrate_cka(
    teacher: Any, teacher_tokenizer: Any, student: Any | None, samples: Sequence[GridSample], *, batch_size: int = 8
) -> dict[str, tuple[np.ndarray, dict[str, Any]]]:
    """CKA matrices: ``teacher_teacher_{biased,unbiased}`` ``[L_t, L_t]`` and, with a student,
    ``teacher_student_{biased,unbiased}`` ``[L_s, L_t]`` (rows: student layers). Samples with non-finite
    teacher K/V are left out (``nonfinite_samples_left_out``); empty when no sample is left with ≥ 4 tokens."""
    samples = [s for s in samples if len(s.input_ids) >= 4]
    if not samples:
        return {}
    teacher_feats, kept = _features(teacher, teacher_tokenizer, samples, student_grid=False, batch_size=batch_size)
    # A sample with NaN/Inf teacher K/V (the extraction quarantines it) would make every CKA entry NaN: leave it out.
    finite = [all(np.isfinite(f).all() for f in feats) for feats in teacher_feats]
    tt = CKAAccumulator()
    for feats, ok in zip(teacher_feats, finite):
        if ok and len(feats[0]) >= 4:
            tt.update(feats, feats)
    if not tt.num_batches:
        return {}
    attrs = {"samples": sum(finite), "tokens": int(sum(len(f[0]) for f, ok in zip(teacher_feats, finite) if ok)),
             "nonfinite_samples_left_out": len(finite) - sum(finite), "features": FEATURES}
    out = {f"teacher_teacher_{e}": (tt.matrix(e), {**attrs, "estimator": e, "rows": "teacher layers",
                                                   "cols": "teacher layers"}) for e in ("biased", "unbiased")}
    if student is not None:
        student_feats, _ = _features(student, None, samples, student_grid=True, batch_size=batch_size)
        ts = CKAAccumulator()
        for s_feats, t_feats, keep, ok in zip(student_feats, teacher_feats, kept, finite):
            if ok and len(t_feats[0]) >= 4:
                # Teacher rows were kept where teacher tokens cover the student token; keep the same student rows.
                ts.update([f[keep] for f in s_feats], t_feats)
        out.update({f"teacher_student_{e}": (ts.matrix(e), {**attrs, "estimator": e, "rows": "student layers",
                                                           "cols": "teacher layers"}) for e in ("biased", "unbiased")})
    return out
