"""`kava estimate`: store size per storage choice and extraction time, predicted before anything is written.

Sizes come from the teacher's config (layers, KV heads, head dim) and the dataset's token counts (the student grid
is tokenized for real, which is cheap); compression ratios and teacher speed come from a short timed sample: a few
batches through the real model, whose K/V are encoded with each storage choice.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import numpy as np
from numcodecs import Blosc

from kava.core.models import load_fast_tokenizer, load_model, load_tokenizer
from kava.kvstore import codecs
from kava.kvstore.eviction import slot_counts
from kava.kvstore.manifest import KV_DTYPES, EvictionSpec, proportional_layer_map

from .align import token_spans
from .capture import attention_geometry, capture_qkv
from .config import ExtractConfig
from .grid import build_grid
from .layer_map import parse_layer_map
from .recipe import validate_and_resolve
from .teacher_pass import teacher_forward, teacher_texts

LOSSY_NOTE = {"int8": "no (~0.5%)", "int4": "no (cos >= 0.995)", "int2": "no (cos 0.90-0.99)"}
"""How far each lossy dtype's decoded K/V are from the teacher's (measured in tests/benchmarks/codecs.py)."""


def bytes_per_token(layers: int, heads: int, head_dim: int, dtype: str, array: str = "k") -> float:
    """Stored bytes of one token's ``layers x heads x head_dim`` values in ``dtype``, scales included (int8: one
    fp16 scale per layer and head; int4/int2: a scale and zero per channel and 64 tokens for ``k``/``q``, per
    token and 128 channels for ``v``)."""
    if codecs.is_lowbit(dtype):
        return codecs.bytes_per_token(array, layers, heads, head_dim, dtype, group_tokens=codecs.DEFAULT_GROUP_TOKENS,
                                      group_channels=codecs.group_channels_for(head_dim))
    values = layers * heads * head_dim * codecs.storage_numpy_dtype(dtype).itemsize
    return values + (layers * heads * 2 if dtype == "int8" else 0)  # + the fp16 scale per (layer, head)


KEPT_POSITION_BYTES = 4
"""A compressed teacher's ``kept`` array: one int32 position per kept (token, layer, KV head) (FORMAT.md)."""


def kept_share(segment_ids: Sequence[np.ndarray], budget: int | float | None,
               segments: Sequence[str] = ("reasoning",)) -> float:
    """The share of all K/V rows a compressed teacher keeps over samples with these ``[T_i]`` segment ids: every
    row outside ``segments`` and ``keep_count(S_i, budget)`` of each sample's ``S_i`` rows inside them, as the
    store counts its slots (:func:`kava.kvstore.eviction.slot_counts`). ``budget`` None: a whole teacher (1.0)."""
    lengths = np.array([len(s) for s in segment_ids], dtype=np.int64)
    if budget is None or not lengths.sum():
        return 1.0
    # The rule does not change how many rows are kept; "random" stands in for any.
    spec = EvictionSpec(rule="random", budget=budget, segments=tuple(segments))
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    return float(slot_counts(spec, np.concatenate(segment_ids), offsets).sum() / lengths.sum())


def evicted_bytes_per_token(layers: int, heads: int, head_dim: int, dtype: str, share: float | None, *,
                            q_layers: int = 0, q_heads: int = 0) -> float:
    """Stored K+V (and Q on ``q_layers`` × ``q_heads``) bytes per *original* token of a teacher that keeps
    ``share`` of its rows, scales and zeros included (:func:`bytes_per_token`), plus the int32 position of each
    kept (row, layer, KV head). ``share`` None: a whole teacher, which stores no positions. A compressed teacher's
    queries sit on its kept rows too (``[K_s, Lq, Hq, D]``)."""
    kv = bytes_per_token(layers, heads, head_dim, dtype, "k") + bytes_per_token(layers, heads, head_dim, dtype, "v")
    q = bytes_per_token(q_layers, q_heads, head_dim, dtype, "q") if q_layers else 0.0
    if share is None:
        return kv + q
    return share * (kv + q + layers * heads * KEPT_POSITION_BYTES)


def _compressed_ratio(sample: np.ndarray, dtype: str) -> float:
    """Uncompressed / compressed bytes of ``sample`` [T, L, H, D] under the default codec."""
    conf = codecs.DEFAULT_COMPRESSOR["configuration"]
    parts = codecs.encode_arrays(sample, "k", dtype, group_tokens=codecs.DEFAULT_GROUP_TOKENS,
                                 group_channels=codecs.group_channels_for(sample.shape[-1]))
    raw = packed = 0
    for data in parts.values():
        blosc = Blosc(cname=conf["cname"], clevel=conf["clevel"], shuffle=Blosc.SHUFFLE,
                      blocksize=conf["blocksize"], typesize=data.dtype.itemsize)
        raw, packed = raw + data.nbytes, packed + len(blosc.encode(np.ascontiguousarray(data).tobytes()))
    return raw / packed


def estimate(cfg: ExtractConfig, *, timed_samples: int = 16) -> dict[str, Any]:
    """Predicted sizes and time for ``cfg``; runs the teacher on ``timed_samples`` samples only."""
    source = validate_and_resolve(cfg)
    rows = cfg.data.load()
    teacher_tok = load_tokenizer(source)
    student_tok = teacher_tok if cfg.student_tokenizer is None else load_fast_tokenizer(cfg.student_tokenizer)
    template, teacher_template = cfg.resolve_templates(student_tok, teacher_tok)
    grid = build_grid(rows, student_tok, template, max_length=cfg.max_length, on_too_long=cfg.on_too_long)
    texts = teacher_texts(grid, template, teacher_template)[0]
    student_tokens = int(sum(len(s.input_ids) for s in grid))
    teacher_tokens = int(sum(len(token_spans(teacher_tok, t)[0]) for t in texts if t))

    model = load_model(source)
    num_layers, num_heads, kv_heads, head_dim = attention_geometry(model.config)
    student_layers = cfg.student_layers or num_layers
    if cfg.layer_map == "cka":  # no calibration here: an upper bound, as top-k layers may coincide
        stored = min(num_layers, len(proportional_layer_map(num_layers, student_layers).teacher_layers) * cfg.cka_top_k)
    else:
        stored = len(parse_layer_map(cfg.layer_map, num_layers, student_layers).teacher_layers)
    q_layers = stored if cfg.with_q else 0

    # The timed sample: a few real batches; their K/V give the compression ratios too.
    live = [t for t in texts if t][:timed_samples]
    layers = tuple(range(stored)) if stored <= num_layers else tuple(range(num_layers))
    k_rows = []
    t = time.perf_counter()
    timed_tokens = 0
    for b in range(0, len(live), cfg.batch_size):
        encoded = [token_spans(teacher_tok, t) for t in live[b : b + cfg.batch_size]]
        timed_tokens += sum(len(e[0]) for e in encoded)
        for k, v, *_ in teacher_forward(model, encoded, layers, (), cfg.k_rope, next(model.parameters()).device,
                                capture_qkv):
            k_rows += [k.numpy(), v.numpy()]
    seconds = time.perf_counter() - t
    tokens_per_s = timed_tokens / seconds if seconds > 0 else float("nan")
    sample = np.concatenate(k_rows) if k_rows else np.zeros((0, len(layers), kv_heads, head_dim), np.float32)

    logit_bytes = cfg.logit_top_k * (4 + 2)  # per token: an int32 id and a float16 log-probability for each of k
    # A compressed teacher (--kv-budget) stores the kept rows of its segments, counted from the grid's segment ids.
    eviction = cfg.evicting.eviction()
    share = None if eviction is None else kept_share([s.segment_ids for s in grid], eviction.budget,
                                                     eviction.segments)
    choices = []
    for dtype in KV_DTYPES:
        per_token = evicted_bytes_per_token(stored, kv_heads, head_dim, dtype, share, q_layers=q_layers,
                                            q_heads=num_heads) + logit_bytes
        logical = per_token * student_tokens
        ratio = _compressed_ratio(sample, dtype) if len(sample) else 1.0
        choices.append({"kv_dtype": dtype, "bytes_per_token": per_token, "logical_bytes": int(logical),
                        "compressed_ratio": round(ratio, 3), "bytes_on_disk_zstd": int(logical / ratio),
                        "bytes_on_disk_raw": int(logical), "lossless": dtype not in ("int8", *codecs.LOWBIT_BITS)})
    return {
        "teacher": source.model_id,
        "quantization": source.quantization,
        "dataset": f"{cfg.data.dataset}:{cfg.data.split}",
        "samples": len(grid),
        "student_tokens": student_tokens,
        "teacher_tokens": teacher_tokens,
        "geometry": {"layers": num_layers, "stored_layers": stored, "kv_heads": kv_heads, "heads": num_heads,
                     "head_dim": head_dim, "q_layers": q_layers},
        "storage": choices,
        "logits": {"top_k": cfg.logit_top_k, "bytes_per_token": logit_bytes} if cfg.logit_top_k else None,
        "eviction": None if eviction is None else {"budget": eviction.budget, "segments": list(eviction.segments),
                                                   "kept_share": share},
        "timed": {"samples": len(live), "teacher_tokens": timed_tokens, "seconds": round(seconds, 3),
                  "tokens_per_s": round(tokens_per_s, 1), "device": str(next(model.parameters()).device)},
        "predicted_seconds": round(teacher_tokens / tokens_per_s, 1) if tokens_per_s > 0 else None,
    }


def format_estimate(e: dict[str, Any]) -> str:
    def size(n: float) -> str:
        for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
            if n < 1024 or unit == "TiB":
                return f"{n:.1f} {unit}"
            n /= 1024
        return str(n)

    g = e["geometry"]
    lines = [
        f"teacher   {e['teacher']} ({e['quantization']}): {g['layers']} layers ({g['stored_layers']} stored), "
        f"{g['kv_heads']} KV heads x {g['head_dim']}" + (f", Q on {g['q_layers']} layers" if g["q_layers"] else ""),
        f"data      {e['dataset']}: {e['samples']} samples, {e['student_tokens']:,} student tokens, "
        f"{e['teacher_tokens']:,} teacher tokens",
        "",
        f"{'kv dtype':<10}{'per token':>12}{'logical':>12}{'zstd ratio':>12}{'on disk':>12}  lossless",
    ]
    for c in e["storage"]:
        lines.append(f"{c['kv_dtype']:<10}{size(c['bytes_per_token']):>12}{size(c['logical_bytes']):>12}"
                     f"{c['compressed_ratio']:>11.2f}x{size(c['bytes_on_disk_zstd']):>12}  "
                     f"{'yes' if c['lossless'] else LOSSY_NOTE.get(c['kv_dtype'], 'no')}")
    if e.get("eviction"):
        ev = e["eviction"]
        lines.append(f"(a compressed teacher: budget {ev['budget']} of {', '.join(ev['segments'])} keeps "
                     f"{ev['kept_share']:.1%} of the rows; per token counts its int32 positions, "
                     f"{KEPT_POSITION_BYTES} B per kept row, layer and KV head)")
    if e.get("logits"):
        lines.append(f"(per token includes the top-{e['logits']['top_k']} logits: {e['logits']['bytes_per_token']} B, "
                     "stored as is)")
    t = e["timed"]
    lines += ["", f"timed     {t['samples']} samples, {t['teacher_tokens']} tokens in {t['seconds']} s on {t['device']}"
              f" → {t['tokens_per_s']:,.0f} tokens/s",
              f"predicted extraction time: {e['predicted_seconds']} s (forward passes only)"]
    return "\n".join(lines)
