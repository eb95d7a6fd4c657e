"""Chunked prefill with an evicting cache: a compressed teacher for samples longer than one forward pass can hold.

``kava extract --kv-budget M --prefill-chunk C`` runs the teacher over each sample ``C`` tokens at a time. After
every chunk, *every* teacher layer's cache (not only the stored layers': that is what bounds memory) keeps, per KV
head, each row outside the evicted segments and at most ``M`` of theirs, chosen by the single pass's own rule
(:func:`kava.extract.evict.keep`). During a chunk's forward a layer therefore holds at most ``M + R + C`` rows, ``R``
the rows of the segments kept whole seen so far. What the stored layers hold after the last chunk is what the
store receives, in the contract of :func:`kava.extract.evict.evict_sample`.

Why the chunked pass attends as the teacher does:

- The cache holds keys after RoPE, rotated at their original positions, and each chunk is rotated at its original
  positions too (``position_ids``), so a kept row is the same key at the same distance it would be in one pass.
- Heads keep different positions, yet every cached row precedes the chunk: the chunk sees all of them, and a causal
  mask inside itself. transformers builds exactly that mask from the cache's length ``N`` (the chunk's queries sit
  at slots ``N..N+C-1`` and see the slots up to their own); positions only rotate (or pick GPT-2's learned
  position embeddings). A sliding-window layer is the exception (its window counts slots, not positions): a sample
  longer than the window is refused.
- With ``M`` at least a sample's evicted-segment length nothing is evicted, and the pass is the single full pass cut
  into chunks (K/V equal to float tolerance). Once rows are evicted, the rows of later chunks are what a teacher
  reading its compressed cache computes (from the second layer on they differ from a single pass's), which is what
  a bounded-memory teacher is.

Shapes, one sample: ``input_ids``, ``segment_ids`` ``[T]``. Per teacher layer the cache holds K/V
``[1, H, N, D]`` (K after RoPE) and ``slots`` ``[H, N]``, the token position of each cached row, increasing along
``N`` (time order). A chunk's queries are ``[1, Hq, C, D]`` (``Hq = G·H``). The observation window, SnapKV style, is
the chunk's own last queries: its answer tokens when it holds any, else its last ``WINDOW_FALLBACK``, at slots
``query_at`` ``[W]`` of the ``N + C`` the chunk attended.

Fidelity, per stored layer: at each step that evicts, the relative L2 error of the window's attention output when
it reads the kept rows against reading every row the cache held before that step (:func:`kava.extract.evict.fidelity`,
averaged over query heads); then the mean over the steps that evicted (0 when none did). A single pass compares
against the whole sample's cache, which a chunked pass never holds.

Rules run on the CPU in float32, as they do after a single pass; only the cut of the cache runs on its device.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple, cast

import numpy as np
import torch
from transformers import DynamicCache, PreTrainedModel
from transformers.cache_utils import DynamicLayer

from kava.core.errors import ConfigError, KavaError
from kava.core.placement import input_device
from kava.kvstore.manifest import EvictionSpec

from .capture import KRope, attention_capture, attention_geometry
from .evict import SEGMENT_ANSWER, WINDOW_FALLBACK, EvictedSample, Rule, fidelity, keep
from .logits import topk_logprobs


class Prefilled(NamedTuple):
    """One sample's rows from :func:`chunked_prefill`, on the teacher's own tokens."""

    kept: torch.Tensor
    """``[M, L, H]`` int64: the token position of each row the stored layers kept, per KV head, in time order."""
    k: torch.Tensor
    """``[M, L, H, D]`` float32 on the CPU: the kept keys, pre- or post-RoPE as asked."""
    v: torch.Tensor
    q: torch.Tensor | None
    """``[M, Lq, Hq, D]``: the queries of ``q_layers``, query head ``h`` on the rows KV head ``h // G`` kept, or
    None."""
    fidelity: torch.Tensor
    """``[L]``: per stored layer, the mean over eviction steps of the window's relative attention-output error."""
    logits: tuple[torch.Tensor, torch.Tensor] | None
    """``(ids int64, logp float32)``, each ``[T, top_k]``: what the teacher predicts after each token; or None."""
    length: int
    """``T``: the sample's teacher tokens."""
    peak_rows: int
    """The most rows one layer's cache held during a chunk's forward: its cached rows plus the chunk."""

    def on_grid(self, segment_ids: np.ndarray, eviction: EvictionSpec) -> EvictedSample:
        """The rows on the student grid of ``segment_ids`` ``[T_s]``, which is the teacher's tokens followed by
        tokens no teacher reads (the EOS the grid appends): those are kept in every layer and head, with zero K/V
        (alignment weight 0), as a single pass's identity alignment gives them. They must lie outside the evicted
        segments (the options refuse ``--evict-segments special`` with ``--prefill-chunk``)."""
        n_t, extra = self.length, len(segment_ids) - self.length
        if extra < 0 or np.isin(segment_ids[n_t:], eviction.segment_ids).any():
            raise KavaError(f"Expected the student grid to be the teacher's {n_t} tokens plus tokens outside the "
                            f"evicted segments. Got {len(segment_ids)} grid tokens instead.")
        if extra == 0:
            return EvictedSample(kept=self.kept, k=self.k, v=self.v, q=self.q, fidelity=self.fidelity)
        _, layers, heads, d = self.k.shape
        more = torch.arange(n_t, n_t + extra)[:, None, None].expand(extra, layers, heads)
        zeros = torch.zeros(extra, layers, heads, d)
        q = None if self.q is None else torch.cat([self.q, self.q.new_zeros(extra, *self.q.shape[1:])])
        return EvictedSample(kept=torch.cat([self.kept, more]), k=torch.cat([self.k, zeros]),
                             v=torch.cat([self.v, zeros]), q=q, fidelity=self.fidelity)


def check_options(budget: int | float, chunk: int) -> int:
    """``budget`` as the count of rows the cache keeps; a ConfigError for a fraction or a chunk below 1."""
    if not isinstance(budget, int) or isinstance(budget, bool) or budget < 1:
        raise ConfigError(f"--prefill-chunk needs --kv-budget as a count of rows ('512'), not a fraction: a share of "
                          f"a sample's rows is unknown until its last chunk. Got {budget!r} instead.")
    if not isinstance(chunk, int) or isinstance(chunk, bool) or chunk < 1:
        raise ConfigError(f"--prefill-chunk: expected an integer >= 1 (tokens per forward pass). Got {chunk!r} "
                          "instead.")
    return budget


def _held(cache: DynamicCache, l: int) -> tuple[DynamicLayer, torch.Tensor, torch.Tensor]:
    """Layer ``l`` of the cache and what it holds, K (after RoPE) and V ``[1, H, N, D]``, once a forward filled it."""
    layer = cache.layers[l]
    assert isinstance(layer, DynamicLayer) and layer.keys is not None and layer.values is not None
    return layer, layer.keys, layer.values


def _choose(eviction: EvictionSpec, keys: torch.Tensor, inside: torch.Tensor, queries: torch.Tensor,
            query_at: torch.Tensor, *, scale: float, seed: int) -> torch.Tensor:
    """Kept slots ``[H, N']`` of one layer's cache: ``keys`` ``[H, N, D]`` (after RoPE), ``inside`` ``[H, N]`` the
    slots in the evicted segments, ``queries`` ``[Hq, W, D]`` the window's. Heads whose cached rows interleave the
    segments alike share one call of the rule; otherwise each head gets its own (and its own seed)."""
    group = queries.shape[0] // keys.shape[0]

    def rule(heads: slice, segment: torch.Tensor, seed: int) -> torch.Tensor:
        q = queries[heads.start * group : heads.stop * group]
        return keep(cast(Rule, eviction.rule), keys[heads], segment, eviction.budget, queries=q, query_at=query_at,
                    scale=scale, seed=seed, r_kv_lambda=eviction.r_kv_lambda, pool=eviction.pool,
                    sinks=eviction.sinks)

    if bool((inside == inside[0]).all()):
        return rule(slice(0, len(keys)), inside[0], seed)
    return torch.cat([rule(slice(h, h + 1), inside[h], seed + h) for h in range(len(keys))])


def chunked_prefill(model: PreTrainedModel, input_ids: torch.Tensor, segment_ids: torch.Tensor,
                    eviction: EvictionSpec, *, chunk: int, layers: Sequence[int], q_layers: Sequence[int] = (),
                    k_rope: KRope = "pre", sample: int = 0, logit_top_k: int = 0) -> Prefilled:
    """Run ``model`` over one sample ``chunk`` tokens at a time, its cache cut to ``eviction`` after every chunk.

    ``input_ids``, ``segment_ids`` ``[T]`` (``T >= 1``) are the teacher's tokens and their grid segments;
    ``eviction.budget`` must be a count. ``layers`` are the stored teacher layers, ``q_layers`` (a subset) those
    whose kept queries are returned. ``sample`` (the store index) seeds the ``random`` rule, a new draw per step.
    With ``logit_top_k`` the LM head runs on each chunk and its top-k log-probabilities are kept.
    """
    budget = check_options(eviction.budget, chunk)
    num_layers, num_heads, heads, head_dim = attention_geometry(model.config)
    device = input_device(model)  # where the embedding runs: a model spread over devices moves the rest
    t = len(input_ids)
    inside = torch.isin(segment_ids.cpu(), torch.as_tensor(eviction.segment_ids))  # [T]
    answer = segment_ids.cpu() == SEGMENT_ANSWER
    group = num_heads // heads
    sliding = getattr(model.config.get_text_config(), "sliding_window", None)
    if sliding is not None and any(DynamicCache(config=model.config).is_sliding) and t > sliding:
        raise KavaError(f"Sample {sample}: {t} tokens, more than the {sliding}-token sliding window of "
                        f"{type(model).__name__}'s attention, which a cache cut by position does not keep. Extract "
                        "this teacher without --prefill-chunk, or cut samples to the window with --max-length.")
    cache = DynamicCache()  # plain full-attention layers, whose tensors this function replaces after each chunk
    slots = [torch.zeros(heads, 0, dtype=torch.long) for _ in range(num_layers)]  # [H, N] per teacher layer
    # The stored layers' keys and queries as the store takes them (pre-RoPE: inverted with the rotation the chunk
    # applied, as a single pass's capture does), float32 on the CPU, cut with the cache.
    keys_out = {l: torch.zeros(heads, 0, head_dim) for l in layers}  # [H, N, D]
    queries_out = {l: torch.zeros(num_heads, 0, head_dim) for l in q_layers}  # [Hq, N, D]
    errors: dict[int, list[torch.Tensor]] = {l: [] for l in layers}
    tops: list[tuple[torch.Tensor, torch.Tensor]] = []
    peak = 0
    runner = model if logit_top_k else getattr(model, "base_model", model)
    base_seed = eviction.seed * 1_000_003 + sample
    for step, start in enumerate(range(0, t, chunk)):
        end = min(t, start + chunk)
        positions = torch.arange(start, end)
        with attention_capture(model, with_q=True, k_rope="post", with_rotation=k_rope == "pre") as recorder, \
                torch.no_grad():
            out = runner(input_ids=input_ids[None, start:end].to(device), position_ids=positions[None].to(device),
                         cache=cache, use_cache=True)
        if logit_top_k:
            ids, logp = topk_logprobs(out.logits[0], logit_top_k)
            tops.append((ids.cpu(), logp.cpu()))
        del out
        held = cache.get_seq_length()  # N + C: every layer holds as many rows
        peak, n = max(peak, held), held - (end - start)
        rotation = recorder.rotation if k_rope == "pre" else None
        for l in range(num_layers):
            slots[l] = torch.cat([slots[l], positions.expand(heads, -1)], dim=1)
        for l in layers:
            new = _held(cache, l)[1][:, :, n:]  # [1, H, C, D]
            new = rotation.invert(new) if rotation is not None else new
            keys_out[l] = torch.cat([keys_out[l], new[0].float().cpu()], dim=1)
        for l in q_layers:
            q = recorder.queries[l]  # [1, Hq, C, D]
            q = rotation.invert(q) if rotation is not None else q
            queries_out[l] = torch.cat([queries_out[l], q[0].float().cpu()], dim=1)

        # Cut every layer once the segments' rows exceed the budget (all layers and heads hold as many of them).
        if int(inside[slots[0][0]].sum()) > budget:
            local = answer[start:end].nonzero().flatten()
            if not len(local):
                local = torch.arange(max(0, end - start - WINDOW_FALLBACK), end - start)
            query_at = n + local  # [W] slots of the window's queries
            for l in range(num_layers):
                layer, cached_k, cached_v = _held(cache, l)
                keys = cached_k[0].float().cpu()  # [H, N + C, D], after RoPE as attention reads them
                window = recorder.queries[l][0][:, local].float().cpu()  # [Hq, W, D]
                chosen = _choose(eviction, keys, inside[slots[l]], window, query_at, scale=recorder.scaling[l],
                                 seed=base_seed * 1_009 + step)  # [H, N'] slots, increasing
                if l in errors:
                    errors[l].append(fidelity(keys, cached_v[0].float().cpu(), window, query_at, chosen,
                                              scale=recorder.scaling[l]).mean())
                index = chosen.to(cached_k.device)[None, :, :, None].expand(1, heads, -1, head_dim)
                layer.keys, layer.values = cached_k.gather(2, index), cached_v.gather(2, index)
                slots[l] = slots[l].gather(1, chosen)
                if l in keys_out:
                    keys_out[l] = keys_out[l].gather(1, chosen[:, :, None].expand(-1, -1, head_dim))
                if l in queries_out:
                    rows = chosen.repeat_interleave(group, dim=0)  # query head h reads KV head h // G
                    queries_out[l] = queries_out[l].gather(1, rows[:, :, None].expand(-1, -1, head_dim))
        del recorder  # it holds the uncut K/V of every layer

    def stack(per_layer: dict[int, torch.Tensor], which: Sequence[int]) -> torch.Tensor:
        return torch.stack([per_layer[l] for l in which], dim=0).permute(2, 0, 1, 3)  # [L, H, M, D] → [M, L, H, D]

    values = {l: _held(cache, l)[2][0].float().cpu() for l in layers}
    return Prefilled(
        kept=torch.stack([slots[l] for l in layers], dim=0).permute(2, 0, 1),  # [M, L, H]
        k=stack(keys_out, layers), v=stack(values, layers),
        q=stack(queries_out, q_layers) if q_layers else None,
        fidelity=torch.stack([torch.stack(errors[l]).mean() if errors[l] else torch.zeros(()) for l in layers]),
        logits=(torch.cat([i for i, _ in tops]), torch.cat([p for _, p in tops])) if tops else None,
        length=t,
        peak_rows=peak,
    )


def prefill_forward(model: PreTrainedModel, encoded: Sequence[tuple[np.ndarray, np.ndarray]],
                    grid_ids: Sequence[np.ndarray], grid_segments: Sequence[np.ndarray], eviction: EvictionSpec, *,
                    chunk: int, layers: Sequence[int], q_layers: Sequence[int], k_rope: KRope, first_sample: int,
                    logit_top_k: int = 0) -> list[Prefilled | None]:
    """A batch, one sample at a time, through :func:`chunked_prefill` (None for an empty sample).

    ``encoded`` holds each sample's teacher tokens ``(ids [T_t], spans)``; ``grid_ids``/``grid_segments`` ``[T_s]``
    its student grid, which must begin with exactly those tokens: the chunked pass keeps rows of teacher tokens,
    so only an identical tokenization puts them on the grid unchanged. ``first_sample`` is the first one's store
    index.
    """
    out: list[Prefilled | None] = []
    for i, ((ids, _), grid, segments) in enumerate(zip(encoded, grid_ids, grid_segments)):
        if not len(ids):
            out.append(None)
            continue
        if len(ids) > len(grid) or not np.array_equal(ids, grid[: len(ids)]):
            raise KavaError(f"Sample {first_sample + i}: expected the teacher's tokens to be the student grid's "
                            "first tokens for --prefill-chunk. They differ. Use the teacher's own tokenizer and "
                            "template for the student, or drop --prefill-chunk.")
        out.append(chunked_prefill(model, torch.as_tensor(ids), torch.as_tensor(segments[: len(ids)]), eviction,
                                   chunk=chunk, layers=layers, q_layers=q_layers, k_rope=k_rope,
                                   sample=first_sample + i, logit_top_k=logit_top_k))
    return out
