"""Which teacher tokens to keep: eviction rules for a compressed teacher cache, one sample at a time.

A compressed store keeps, per (layer, KV head), ``M`` of the ``T`` tokens of one segment (the reasoning, by
default; the rest is kept whole) and their K/V. The rules score the segment's tokens from what the teacher's own
single forward pass already computed: its keys (after RoPE, as its cache holds them) and the queries of an
*observation window* (the answer tokens, or the last tokens of the input), so no second forward is needed.

Shapes, for one sample and one layer: ``keys`` ``[H, T, D]`` (KV heads), ``queries`` ``[Hq, W, D]`` (the window's
query heads, ``Hq = G·H`` for grouped-query attention: query head ``h`` reads KV head ``h // G``), ``positions``
``[T]`` bool, the segment the budget applies to; the window's query ``w`` sits at sequence position ``query_at[w]``
and sees keys ``t <= query_at[w]`` (causal). Every rule returns kept positions ``[H, M_kept]`` (int64, increasing:
time order) over the whole sequence: the segment's ``M`` chosen tokens plus every token outside the segment.

- ``attention`` (H2O / SnapKV): the attention the window pays each token, summed over the window's queries and the
  ``G`` query heads of the KV head, smoothed along time by an average pool of ``pool`` tokens (SnapKV's kernel: a
  kept token brings its neighbours' context), top ``M``.
- ``r-kv`` (R-KV, as the KaVa paper uses it): ``S = λ·importance + (1 − λ)·novelty``, importance the window's
  attention as above (normalised to sum 1 over the segment), novelty ``softmax(−mean cosine of the token's key to
  the segment's other keys)``, so that of near-duplicate tokens (a reasoning trace repeats itself) one is kept;
  ``λ = 0.1``; top ``M``.
- ``streaming`` (StreamingLLM): the segment's first ``sinks`` tokens and its most recent ``M − sinks``.
- ``random``: ``M`` tokens drawn uniformly without replacement (seeded): the control.

Ties are broken toward the earlier token, so a rule is deterministic. :func:`fidelity` measures what a kept set
loses: the relative L2 error of the window's attention output when it reads only the kept cache.
"""

from __future__ import annotations

import math
from typing import Any, Literal, NamedTuple, cast

import torch
import torch.nn.functional as F

from kava.core.errors import ConfigError
from kava.kvstore.eviction import keep_count
from kava.kvstore.manifest import EvictionSpec

from .rope import apply_rope, cos_sin

Rule = Literal["r-kv", "attention", "streaming", "random"]
RULES: tuple[Rule, ...] = ("r-kv", "attention", "streaming", "random")

R_KV_LAMBDA = 0.1
"""R-KV's weight of importance against novelty (the value its authors and the KaVa paper use)."""
POOL = 5
"""The attention rule's smoothing along time, in tokens (SnapKV's average-pool kernel)."""
SINKS = 4
"""The streaming rule's sink tokens at the start of the segment (StreamingLLM keeps 4)."""


def window_attention(keys: torch.Tensor, queries: torch.Tensor, query_at: torch.Tensor, *,
                     scale: float | None = None) -> torch.Tensor:
    """The attention the window's queries pay each token, summed over the window and the query heads of each KV
    head: ``[H, T]``. Softmax over each query's causal keys of ``scale · q·k`` (the teacher's scaling; default
    ``1/sqrt(D)``)."""
    h, t, d = keys.shape
    group = queries.shape[0] // h
    k = keys.float().repeat_interleave(group, dim=0)  # [Hq, T, D]
    logits = queries.float() @ k.transpose(1, 2) * (scale or 1 / math.sqrt(d))  # [Hq, W, T]
    visible = torch.arange(t, device=keys.device)[None, :] <= query_at[:, None]  # [W, T]
    probs = logits.masked_fill(~visible, float("-inf")).softmax(dim=-1)
    return probs.sum(dim=1).view(h, group, t).sum(dim=1)  # [H, T]


def _novelty(keys: torch.Tensor, segment: torch.Tensor) -> torch.Tensor:
    """``softmax(−mean cosine to the segment's other keys)`` over the segment: ``[H, S]`` for its ``S`` tokens."""
    k = F.normalize(keys[:, segment].float(), dim=-1)  # [H, S, D]
    s = k.shape[1]
    if s == 1:
        return torch.ones(k.shape[0], 1)
    cos = k @ k.transpose(1, 2)  # [H, S, S]
    mean_other = (cos.sum(dim=-1) - cos.diagonal(dim1=1, dim2=2)) / (s - 1)
    return (-mean_other).softmax(dim=-1)


def _top(score: torch.Tensor, m: int) -> torch.Tensor:
    """Per row, the indices of the ``m`` largest scores, ties to the earlier index, in increasing order: ``[H, m]``.
    (A stable sort of the negated scores puts equal scores in index order.)"""
    order = torch.sort(-score, dim=-1, stable=True).indices[:, :m]
    return order.sort(dim=-1).values


def keep(rule: Rule, keys: torch.Tensor, segment: torch.Tensor, budget: float, *, queries: torch.Tensor | None = None,
         query_at: torch.Tensor | None = None, scale: float | None = None, seed: int = 0,
         r_kv_lambda: float = R_KV_LAMBDA, pool: int = POOL, sinks: int = SINKS) -> torch.Tensor:
    """Kept positions ``[H, N − S + M]`` (time order) of one sample's layer under ``rule``: every token outside the
    boolean ``segment`` ``[T]`` and ``M = keep_count(S, budget)`` of its ``S`` tokens per KV head. ``queries`` and
    ``query_at`` (the observation window) are needed by ``attention`` and ``r-kv``."""
    if rule not in RULES:
        raise ConfigError(f"--evict: expected one of {', '.join(RULES)}. Got {rule!r} instead.")
    h, t, _ = keys.shape
    inside = segment.nonzero().flatten()  # [S] the segment's positions
    s = len(inside)
    m = keep_count(s, budget) if s else 0
    if rule == "streaming":
        first = min(sinks, m)
        local = torch.cat([torch.arange(first), torch.arange(s - (m - first), s)]).unique()
        chosen = local.expand(h, -1)
    elif rule == "random":
        g = torch.Generator().manual_seed(seed)
        chosen = torch.stack([torch.randperm(s, generator=g)[:m].sort().values for _ in range(h)])
    else:
        if queries is None or query_at is None:
            raise ConfigError(f"--evict {rule}: needs the observation window's queries (the teacher's Q).")
        received = window_attention(keys, queries, query_at, scale=scale)[:, inside]  # [H, S]
        if pool > 1 and s > 1:  # average pool along time, same length (SnapKV)
            received = F.avg_pool1d(received[:, None], pool, stride=1, padding=pool // 2,
                                    count_include_pad=False)[:, 0, :s]
        if rule == "attention":
            score = received
        else:
            importance = received / received.sum(dim=-1, keepdim=True).clamp_min(1e-12)
            score = r_kv_lambda * importance + (1 - r_kv_lambda) * _novelty(keys, inside)
        chosen = _top(score, m)
    kept_segment = inside[chosen] if s else torch.zeros(h, 0, dtype=torch.long)  # [H, M]
    outside = (~segment).nonzero().flatten().expand(h, -1)
    return torch.cat([outside, kept_segment], dim=1).sort(dim=-1).values


def fidelity(keys: torch.Tensor, values: torch.Tensor, queries: torch.Tensor, query_at: torch.Tensor,
             kept: torch.Tensor, *, scale: float | None = None) -> torch.Tensor:
    """The relative L2 error ``||o_kept − o_full|| / ||o_full||`` of the window's attention output when each KV head
    reads only its ``kept`` positions (``[H, M]``), per query head: ``[Hq]``. ``values`` ``[H, T, D]``."""
    h, t, d = keys.shape
    group = queries.shape[0] // h
    visible = torch.arange(t)[None, :] <= query_at[:, None]  # [W, T]
    mask = torch.zeros(h, t, dtype=torch.bool)
    mask.scatter_(1, kept, True)
    k, v = keys.float().repeat_interleave(group, 0), values.float().repeat_interleave(group, 0)  # [Hq, T, D]
    logits = queries.float() @ k.transpose(1, 2) * (scale or 1 / math.sqrt(d))  # [Hq, W, T]
    full = logits.masked_fill(~visible, float("-inf")).softmax(-1) @ v
    only = visible[None] & mask.repeat_interleave(group, 0)[:, None, :]  # [Hq, W, T]
    part = logits.masked_fill(~only, float("-inf")).softmax(-1).nan_to_num(0.0) @ v  # no kept key: output 0
    return (part - full).flatten(1).norm(dim=-1) / full.flatten(1).norm(dim=-1).clamp_min(1e-12)


WINDOW_FALLBACK = 8
"""Without answer tokens (a truncated sample), the observation window is the sample's last this many tokens."""
SEGMENT_ANSWER = 2
"""The grid's segment id of the answer (``SEGMENT_NAMES``)."""


class EvictedSample(NamedTuple):
    """One sample's kept rows, as a compressed teacher stores them."""

    kept: torch.Tensor
    """``[M, L, H]`` int64: the token position of each kept row, per stored layer and KV head, in time order."""
    k: torch.Tensor
    """``[M, L, H, D]`` the kept keys (as stored: pre- or post-RoPE)."""
    v: torch.Tensor
    q: torch.Tensor | None
    """``[M, Lq, Hq, D]`` the kept queries of the asked layers (query head ``h`` on the rows its KV head
    ``h // (Hq / H)`` kept), or None."""
    fidelity: torch.Tensor
    """``[L]``: per stored layer, the relative L2 error of the observation window's attention output when it reads
    only the kept rows (:func:`fidelity`), averaged over query heads."""


def evict_sample(k: torch.Tensor, v: torch.Tensor, q: torch.Tensor, segment_ids: torch.Tensor,
                 eviction: EvictionSpec, *, rope: dict[str, Any] | None, k_rope: str, sample: int,
                 q_layers: tuple[int, ...] = ()) -> EvictedSample:
    """Choose one sample's kept rows under ``eviction`` from its rows on the student grid.

    ``k``, ``v`` ``[T, L, H, D]`` and ``q`` ``[T, L, Hq, D]`` are the teacher's keys, values and queries of the
    stored layers on the student's tokens (aligned: with the teacher's own tokenizer they are its rows); keys and
    queries are rotated to the grid positions with the teacher's RoPE when they are stored pre-RoPE, so the scores
    are the attention the teacher's cache would give there. The observation window is the answer's tokens (else the
    last ``WINDOW_FALLBACK``). ``sample`` (the store index) seeds the ``random`` rule, so each sample draws its own.
    ``q_layers`` (indices into the stored layers) are the layers whose kept queries are returned, as captured.
    """
    t, layers, heads, d = k.shape
    segment = torch.isin(segment_ids, torch.as_tensor(eviction.segment_ids))  # [T]
    window = (segment_ids == SEGMENT_ANSWER).nonzero().flatten()
    if not len(window):
        window = torch.arange(max(0, t - WINDOW_FALLBACK), t)
    keys, queries = k.float().permute(1, 2, 0, 3), q.float().permute(1, 2, 0, 3)  # [L, H, T, D], [L, Hq, T, D]
    if k_rope == "pre" and rope is not None and t:
        cos, sin = cos_sin(rope, torch.arange(t))
        keys, queries = apply_rope(keys, cos, sin), apply_rope(queries, cos, sin)
    kept, errors = [], []
    for layer in range(layers):
        q_window = queries[layer][:, window]  # [Hq, W, D]
        chosen = keep(cast(Rule, eviction.rule), keys[layer], segment, eviction.budget, queries=q_window,
                      query_at=window, seed=eviction.seed * 1_000_003 + sample, r_kv_lambda=eviction.r_kv_lambda,
                      pool=eviction.pool, sinks=eviction.sinks)  # [H, M]
        kept.append(chosen)
        if len(window) and t:
            errors.append(fidelity(keys[layer], v[:, layer].float().transpose(0, 1), q_window, window, chosen).mean())
        else:
            errors.append(torch.zeros(()))
    positions = torch.stack(kept, dim=0).permute(2, 0, 1)  # [M, L, H]
    layer_ix = torch.arange(layers)[None, :, None]
    head_ix = torch.arange(heads)[None, None, :]
    kept_q = None
    if q_layers:
        group = q.shape[2] // heads
        rows = positions[:, list(q_layers)].repeat_interleave(group, dim=2)  # [M, Lq, Hq]
        kept_q = q[:, list(q_layers)][rows, torch.arange(len(q_layers))[None, :, None],
                                      torch.arange(q.shape[2])[None, None, :]]
    return EvictedSample(positions, k[positions, layer_ix, head_ix], v[positions, layer_ix, head_ix], kept_q,
                         torch.stack(errors))
