"""The attention term against a compressed teacher: attention over the keys it kept, renormalised.

A compressed teacher (``kava extract --kv-budget``) stores, per layer and KV head, only some rows of each sample,
and its queries only on those rows (a query head's row is stored where its KV head's row was kept). Its attention
is then known only among the kept rows: for a query it kept at token ``t``, head ``h``,

    p_h(s | t) = softmax_s(scale · q_h(t)·k_h(s)) over the keys s <= t that head h kept,

the teacher's attention renormalised over its kept keys. The student is held to it over the same keys: its own
attention of the matching head, ``softmax`` over that head's *support* (the keys the teacher heads it is mapped
from kept), so that the KL compares two distributions on one set. Shapes and mixing:

- teacher layer ``i`` of the layer map: queries ``[B, Ht, T, D]``, keys ``[B, Hkt, T, D]`` after RoPE, ``kept``
  ``[B, Hkt, T]`` bool; query head ``h`` reads KV head ``h // (Ht / Hkt)``;
- the layer map mixes layers by weight ``w_i``: ``p = Σ w_i p_i`` (a convex mix of distributions);
- teacher heads map onto student heads with ``head_share_matrix(Ht, Hs)`` when the counts differ;
- a student head's query at ``t`` counts only where every teacher (layer, head) it is mixed from kept ``t`` (else
  part of its target is unknown); its support is the union of their kept keys.

Where everything was kept this is exactly the dense term (``attention_kl``, ``attention_kl_blockwise``): the
support is every causal key and every query counts. Unlike the blockwise dense term this builds the ``[B, H, T,
T]`` scores (compressed teachers keep sparse, per-head key sets, which the block kernel does not take); memory is
O(B·H·T²) per layer, fine for reasoning rows of a few hundred tokens.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .losses import MASKED_SCORE, _allowed_keys
from .projectors import head_share_matrix


def attention_kl_kept(t_queries: Sequence[torch.Tensor], t_keys: Sequence[torch.Tensor],
                      t_kept: Sequence[torch.Tensor], weights: Sequence[float], t_scaling: float, q: torch.Tensor,
                      k: torch.Tensor, lengths: torch.Tensor, scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(Σ_h kl, heads)``, each ``[B, T]``: the sum over student heads of ``KL(p_h ‖ student_h)`` at each query
    token, over the heads whose query counts there, and how many heads that is (divide for the mean; 0 heads: no
    term at that token).

    Args:
        t_queries, t_keys, t_kept: per teacher layer of the layer map, ``[B, Ht, T, Dt]``, ``[B, Hkt, T, Dt]`` after
            RoPE (zeros where evicted) and ``[B, Hkt, T]`` bool; no gradient.
        weights: the layer map's weight per layer (renormalised over the layers with queries).
        t_scaling: the teacher's score multiplier.
        q, k: the student's ``[B, Hs, T, D]`` queries and ``[B, Hks, T, D]`` keys after RoPE.
        lengths: ``[B]`` real tokens per row.
        scaling: the student's score multiplier.
    """
    batch, s_heads, steps, _ = q.shape
    dtype = torch.promote_types(q.dtype, torch.float32)
    causal = _allowed_keys(lengths, steps, q.device)[:, None]  # [B, 1, T, T] visible keys (s <= t < length)
    t_heads = t_queries[0].shape[1]
    share = head_share_matrix(t_heads, s_heads).to(q.device) if t_heads != s_heads else None  # [Hs, Ht]
    p = None
    support = torch.zeros(batch, t_heads, steps, dtype=torch.bool, device=q.device)  # [B, Ht, T] kept keys
    counts = torch.ones(batch, t_heads, steps, dtype=torch.bool, device=q.device)  # [B, Ht, T] kept queries
    with torch.no_grad():
        for tq, tk, kept, w in zip(t_queries, t_keys, t_kept, weights):
            group = tq.shape[1] // tk.shape[1]
            heads_kept = kept.repeat_interleave(group, dim=1)  # [B, Ht, T]
            visible = causal & heads_kept[:, :, None, :]  # [B, Ht, T(query), T(key)]
            scores = torch.einsum("bhtd,bhsd->bhts", tq.to(dtype), tk.to(dtype).repeat_interleave(group, dim=1))
            term = (scores * t_scaling).masked_fill(~visible, MASKED_SCORE).softmax(-1) * visible * w
            p = term if p is None else p + term
            support |= heads_kept
            counts &= heads_kept
        assert p is not None
        if share is not None:  # onto the student's heads: a mix of the teacher heads that overlap each
            mapped = share > 0  # [Hs, Ht]
            p = torch.einsum("sh,bhqk->bsqk", share.to(dtype), p)
            support = (support[:, None] & mapped[None, :, :, None]).any(dim=2)  # [B, Hs, T]
            counts = (counts[:, None] | ~mapped[None, :, :, None]).all(dim=2)
        counts = counts & (torch.arange(steps, device=q.device) < lengths.to(q.device)[:, None])[:, None]
    # The student over the same keys: its scores where the head's support is visible, renormalised there.
    group = s_heads // k.shape[1]
    s_scores = torch.einsum("bhtd,bhsd->bhts", q.to(dtype), k.to(dtype).repeat_interleave(group, dim=1)) * scaling
    allowed = causal & support[:, :, None, :]  # [B, Hs, T, T]
    s_logp = s_scores.masked_fill(~allowed, MASKED_SCORE).log_softmax(-1)
    positive = p > 0
    t_logp = torch.where(positive, p, torch.ones_like(p)).log()
    kl = torch.where(positive, p * (t_logp - s_logp), torch.zeros((), dtype=dtype, device=q.device)).sum(-1)
    kl = torch.where(counts, kl, torch.zeros((), dtype=dtype, device=q.device))  # [B, Hs, T]
    return kl.sum(dim=1), counts.sum(dim=1).to(dtype)
