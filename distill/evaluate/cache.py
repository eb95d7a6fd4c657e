"""A bounded KV cache for evaluation (``kava eval --cache sinks=S,window=W``): the model's attention only ever reads
each row's first S tokens ("attention sinks") and its most recent W tokens, as in StreamingLLM (Xiao et al. 2023,
"Efficient Streaming Language Models with Attention Sinks").

Semantics. The token at position ``t`` (counted over the row's real tokens from 0, pads excluded) attends to the
tokens at positions ``p`` with ``p <= t`` and ``p < S or p >= t - W``: the sinks, the W tokens before it, and itself.
Every layer's key and value of a token are computed once, when that token is processed, under that visibility, and
kept while a later token can still read them. A token that leaves the window is dropped from the cache for good: the
window only moves forward, so no later token could read it either. Between forwards a row's cache holds at most
S + W tokens, and greedy decoding gives what one forward over the whole sequence under this mask would give.

Positions: original. A token keeps its position in the sequence (its RoPE rotation), and each new token is given
its true position, not its index in the cache. StreamingLLM re-assigns positions within the cache so that none
exceeds S + W and a model can stream past its trained context; that needs keys cached before the rotary embedding
and re-rotated at every step, which transformers' attention modules don't do (they cache rotated keys). An evaluation
never runs past prompt + --max-new-tokens, a length the full-cache evaluation runs at too, so the problem that
re-assignment solves doesn't arise here; original positions leave the model's code untouched and change only what
the bound removes.

Prefill: in chunks (of W tokens unless told otherwise), each under the same per-token mask and followed by an
eviction, so no forward reads more than S + W + chunk keys, and a prompt longer than S + W is bounded the same way as
generation (prefilling whole and trimming after would let the prompt's tokens read all of it).

Padding: rows are left-padded, and each row's positions count its own real tokens, so its sinks are its first S real
tokens wherever padding puts them. The mask and the evictions are computed per row from ``key_pos``, the true
position of every cache column (-1: a pad or an emptied slot). An eviction gathers each row's kept columns, in order,
to the right of the cache; a row that keeps fewer than another fills its left with masked slots.

The mask goes to the model as a 4D additive mask ``[B, 1, Q, K]``, which transformers applies as given (no causal or
padding mask of its own) with its eager and sdpa attention, to every layer; models with sliding-window or other
non-full attention layers, or other attention implementations, are refused (``check_model``).
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from kava.core.errors import ConfigError

_EXPECTED = "--cache: expected sinks=S,window=W with S >= 0 and W >= 1."
_ATTENTION = ("eager", "sdpa")  # the implementations that take a 4D additive mask as given


@dataclass(frozen=True)
class CacheBound:
    """What a bounded cache keeps of each row: its first ``sinks`` tokens and its most recent ``window`` tokens."""

    sinks: int
    window: int

    def __post_init__(self) -> None:
        if not (isinstance(self.sinks, int) and self.sinks >= 0 and isinstance(self.window, int) and self.window >= 1):
            raise ConfigError(f"{_EXPECTED} Got {str(self)!r} instead.")

    @classmethod
    def parse(cls, text: Any) -> CacheBound:
        """``sinks=S,window=W`` (either order, spaces allowed) into a bound; a ConfigError naming --cache otherwise."""
        found: dict[str, int] = {}
        for piece in str(text).split(","):
            key, sep, value = (part.strip() for part in piece.partition("="))
            if not sep or key not in ("sinks", "window") or key in found or not re.fullmatch(r"\d+", value):
                raise ConfigError(f"{_EXPECTED} Got {text!r} instead.")
            found[key] = int(value)
        if found.keys() != {"sinks", "window"} or found["window"] < 1:
            raise ConfigError(f"{_EXPECTED} Got {text!r} instead.")
        return cls(found["sinks"], found["window"])

    def __str__(self) -> str:
        return f"sinks={self.sinks},window={self.window}"


def check_model(model: Any) -> None:
    """Raise a ConfigError unless ``model``'s attention can be bounded by a 4D mask on every layer."""
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    implementation = getattr(config, "_attn_implementation", None) or "eager"
    if implementation not in _ATTENTION:
        raise ConfigError(f"--cache: expected a model with {' or '.join(_ATTENTION)} attention (the bound is an "
                          f"attention mask). Got {implementation!r} instead. Load it with one of those.")
    kinds = sorted(set(getattr(config, "layer_types", None) or ["full_attention"]) - {"full_attention"})
    if kinds:
        raise ConfigError(f"--cache: expected a model whose every layer has full attention. Got layer types "
                          f"{', '.join(kinds)} instead. Evaluate it without --cache.")


def visibility_mask(key_pos: Any, query_pos: Any, bound: CacheBound, dtype: Any) -> Any:
    """The additive attention mask ``[B, 1, Q, K]``: 0 where a query may read a key, ``dtype``'s minimum elsewhere.

    Args:
        key_pos: ``[B, K]`` true positions of the keys (-1: a pad or an emptied slot); the last Q are the queries'.
        query_pos: ``[B, Q]`` true positions of the queries (-1: a pad).
        bound: what a query reads: keys at ``p <= t`` with ``p < sinks`` or ``p >= t - window``.
        dtype: the attention's floating dtype.
    """
    import torch  # noqa: PLC0415 - heavy (package docstring)

    k, q = key_pos[:, None, :], query_pos[:, :, None]  # [B, 1, K], [B, Q, 1]
    visible = (k >= 0) & (k <= q) & ((k < bound.sinks) | (k >= q - bound.window))  # [B, Q, K]
    # A pad query reads only itself: its output is never used, and a row with no key at all is NaN in some kernels.
    n_q, n_k = query_pos.shape[1], key_pos.shape[1]
    itself = torch.cat([torch.zeros(n_q, n_k - n_q, dtype=torch.bool, device=key_pos.device),
                        torch.eye(n_q, dtype=torch.bool, device=key_pos.device)], dim=1)  # [Q, K]
    visible |= itself & (q < 0)
    mask = torch.zeros(visible.shape, dtype=dtype, device=key_pos.device)
    return mask.masked_fill(~visible, torch.finfo(dtype).min)[:, None]  # [B, 1, Q, K]


def evict(cache: Any, key_pos: Any, next_pos: Any, bound: CacheBound) -> Any:
    """Drop from ``cache`` (a transformers ``DynamicCache``) every column no later query can read, in place.

    Args:
        cache: its layers hold ``keys``/``values`` ``[B, H, K, D]``.
        key_pos: ``[B, K]`` true positions of the cache's columns (-1: a pad or an emptied slot).
        next_pos: ``[B]`` each row's next query position (later queries only come further).
        bound: the sinks and window.

    Returns:
        ``[B, K']`` positions of the kept columns, each row's in order and to the right, -1 for filler slots.
    """
    import torch  # noqa: PLC0415 - heavy (package docstring)

    keep = (key_pos >= 0) & ((key_pos < bound.sinks) | (key_pos >= next_pos[:, None] - bound.window))  # [B, K]
    kept = key_pos.masked_fill(~keep, -1)
    width = int(keep.sum(1).max())  # CPU-GPU sync point, once per forward
    if width == key_pos.shape[1]:  # some row keeps every column: nothing can be dropped, only masked
        return kept
    # Stable sort of keep (False first): each row's kept columns come last, in their order. [B, K']
    order = torch.argsort(keep.to(torch.int8), dim=1, stable=True)[:, key_pos.shape[1] - width :]
    for layer in cache.layers:
        for name in ("keys", "values"):
            states = getattr(layer, name)  # [B, H, K, D]
            index = order[:, None, :, None].expand(-1, states.shape[1], -1, states.shape[3])  # [B, H, K', D]
            setattr(layer, name, states.gather(2, index))
    return kept.gather(1, order)


def _cache_argument(model: Any) -> str:
    """The name the model's forward takes its cache by: ``cache`` in newer transformers 5.x, else the older one."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _forward(model: Any, cache: Any, key_pos: Any, ids: Any, query_pos: Any, bound: CacheBound, *, dtype: Any,
             cache_name: str) -> tuple[Any, Any]:
    """Run ``ids`` ``[B, Q]`` at ``query_pos`` ``[B, Q]`` over ``cache`` (passed as ``cache_name``), then evict.

    Returns ``(logits [B, V] of each row's last column, key_pos [B, K'] after the eviction)``."""
    import torch  # noqa: PLC0415 - heavy (package docstring)

    keys = torch.cat([key_pos, query_pos], dim=1)  # [B, K + Q]
    mask = visibility_mask(keys, query_pos, bound, dtype)
    out = model(input_ids=ids, attention_mask=mask, position_ids=query_pos.clamp(min=0), use_cache=True,
                logits_to_keep=1, **{cache_name: cache})
    # Each row's next position: one past its newest real token (0 for a row that is all padding so far).
    return out.logits[:, -1], evict(cache, keys, query_pos.max(dim=1).values + 1, bound)


def generate_bounded(model: Any, input_ids: Any, attention_mask: Any, *, bound: CacheBound, max_new_tokens: int,
                     pad_token_id: int, eos_token_ids: Sequence[int],
                     stopping: Callable[[Any, Any], Any] | None = None, prefill_chunk: int | None = None) -> Any:
    """Greedy generation whose attention reads only the bounded cache; returns what ``model.generate`` would.

    As ``model.generate(do_sample=False)``: the next token is the argmax of fp32 logits; a row that has written one of
    ``eos_token_ids`` or that ``stopping`` stops gets ``pad_token_id`` from then on; generation ends when every row
    has stopped or after ``max_new_tokens`` tokens.

    Args:
        model: a causal LM in eval mode that ``check_model`` accepts.
        input_ids: ``[B, P]`` left-padded prompts.
        attention_mask: ``[B, P]``, 1 on real tokens.
        bound: the sinks and window (module docstring).
        max_new_tokens: the most tokens generated per row.
        pad_token_id: what a stopped row gets.
        eos_token_ids: ids that stop a row (written, and counted, first).
        stopping: ``stopping(ids [B, P + n], logits [B, V]) -> [B] bool``, True for rows to stop (``AnswerStop``).
        prefill_chunk: prompt tokens per prefill forward (default: the window).

    Returns:
        ``[B, P + n]`` the prompts and the ``n <= max_new_tokens`` generated tokens.
    """
    import torch  # noqa: PLC0415 - heavy (package docstring)
    from transformers import DynamicCache  # noqa: PLC0415 - heavy (package docstring)

    check_model(model)
    chunk = prefill_chunk or bound.window
    real = attention_mask.bool()
    positions = torch.where(real, real.long().cumsum(1) - 1, -1)  # [B, P]; each row counts its own real tokens
    cache = DynamicCache()
    # The mask's dtype must be the attention's; the cache's argument name is looked up once, not per token.
    fixed = {"dtype": model.get_input_embeddings().weight.dtype, "cache_name": _cache_argument(model)}
    key_pos = positions[:, :0]  # [B, 0]
    for start in range(0, input_ids.shape[1], chunk):
        logits, key_pos = _forward(model, cache, key_pos, input_ids[:, start : start + chunk],
                                   positions[:, start : start + chunk], bound, **fixed)
    next_pos = real.sum(1, keepdim=True)  # [B, 1]
    ends = torch.tensor(list(eos_token_ids), device=input_ids.device)
    unfinished = torch.ones(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
    ids = input_ids
    for step in range(max_new_tokens):
        token = logits.float().argmax(dim=-1).masked_fill(~unfinished, pad_token_id)  # [B]
        ids = torch.cat([ids, token[:, None]], dim=1)
        done = torch.isin(token, ends)
        if stopping is not None:
            done |= stopping(ids, logits)
        unfinished &= ~done
        if step + 1 == max_new_tokens or not unfinished.any():  # CPU-GPU sync point, as in generate
            break
        logits, key_pos = _forward(model, cache, key_pos, token[:, None], next_pos, bound, **fixed)
        next_pos = next_pos + 1
    return ids
