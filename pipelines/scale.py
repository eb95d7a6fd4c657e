"""`kava estimate --run-config`: the plan of an experiment too big for this machine, from its config alone.

For each teacher of the config: the store's size per storage dtype and per layer subset (with and without Q), the
extraction time at a stated teacher throughput, and the read bandwidth a student step needs at a stated step time
against what a store on this machine delivers (measured when ``--store`` is given); then the same store and
bandwidth for a compressed teacher at each budget of ``PLAN_BUDGETS`` (``kava extract --kv-budget``), per dtype.
Nothing is downloaded: token counts, and the reasoning's share of them, come from tokenizing the real dataset with
the student's tokenizer, and the model geometry from the local cache or, for the models the shipped configs name,
from their published configs (below).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np

from kava.core.config import as_int, parse_list
from kava.core.data import DataSource
from kava.core.errors import ConfigError
from kava.core.models import load_fast_tokenizer
from kava.extract.estimate import KEPT_POSITION_BYTES, bytes_per_token, evicted_bytes_per_token, kept_share
from kava.extract.teachers import PRESETS
from kava.extract.templates import is_tokenizer_template, load_template
from kava.kvstore import KVStore
from kava.kvstore.manifest import KV_DTYPES, SEGMENT_NAMES, proportional_layer_map

from .config import RunConfig

# (layers, attention heads, KV heads, head dim), from each model's published config.json.
KNOWN_GEOMETRY: dict[str, tuple[int, int, int, int]] = {
    "Qwen/Qwen2.5-7B-Instruct": (28, 28, 4, 128),   # hidden 3584
    "Qwen/Qwen2.5-1.5B-Instruct": (28, 12, 2, 128),  # hidden 1536
    "Qwen/Qwen2.5-0.5B-Instruct": (24, 14, 2, 64),   # hidden 896
}
COMPRESSION_MEASURED = (1.26, 1.5)
"""blosc-zstd ratios measured on real fp16 K/V (post-RoPE, pre-RoPE) of stories260K; see docs/performance.md "Store"."""
PLAN_BUDGETS: tuple[float | None, ...] = (None, 0.25, 0.1)
"""The eviction budgets the plan sizes: whole (None), then shares of each sample's budget segments kept per layer and
KV head (the teacher's ``evict_segments``, the reasoning by default); every other row is kept."""
PLAN_BUDGET_DTYPES = ("float16", "int8", "int4", "int2")
"""The storage dtypes of the budget table (bfloat16 has float16's bytes)."""


def geometry(model_id: str) -> tuple[tuple[int, int, int, int], str]:
    """``(layers, heads, kv_heads, head_dim)`` of a model and where it came from (the local config or the table)."""
    # `kava doctor` imports this module (KNOWN_GEOMETRY, stored_layers) and must run, and say so, where torch or
    # transformers is missing: what needs them is imported where it is used.
    try:
        from transformers import AutoConfig  # noqa: PLC0415 - `kava doctor` runs without it

        from kava.extract.capture import attention_geometry  # noqa: PLC0415 - torch: `kava doctor` runs without it

        return attention_geometry(AutoConfig.from_pretrained(model_id, local_files_only=True)), "local config"
    except (OSError, ValueError):
        if model_id in KNOWN_GEOMETRY:
            return KNOWN_GEOMETRY[model_id], "published config"
        raise ConfigError(f"{model_id}: its config is not in the local cache and its geometry is not known here. "
                          "Download its config.json (a few KB) or pass a local model directory.") from None


def stored_layers(extract: dict[str, Any], teacher_layers: int, student_layers: int) -> tuple[int, int]:
    """``(K/V layers, Q layers)`` a teacher's ``extract:`` options store, as extraction picks them (for ``cka``, an
    upper bound: top-k layers may coincide)."""
    layer_map = str(extract.get("layer_map", "proportional"))
    if layer_map == "proportional":
        kv = len(proportional_layer_map(teacher_layers, student_layers).teacher_layers)
    elif layer_map == "cka":
        kv = min(teacher_layers, student_layers * int(extract.get("cka_top_k", 2)))
    else:
        from kava.extract.layer_map import parse_layer_map  # noqa: PLC0415 - torch: `kava doctor` runs without it

        kv = len(parse_layer_map(layer_map, teacher_layers, student_layers).teacher_layers)
    q_spec = parse_list(extract.get("q_layers"), as_int, "q_layers", "layer numbers", [])  # '0,5' or [0, 5]
    q = (len(q_spec) if q_spec else kv) if extract.get("with_q") else 0
    return kv, q


def plan(cfg: RunConfig, *, student_tokenizer: str | None = None, data_files: str | None = None,
         limit: int | None = None, tokens_per_s: float = 5000.0, step_seconds: float = 0.5,
         store: str | None = None) -> dict[str, Any]:
    """The numbers of ``format_plan``; ``tokens_per_s`` and ``step_seconds`` are assumptions the caller states."""
    from kava.extract.grid import build_grid  # noqa: PLC0415 - torch: `kava doctor` runs without it

    d = cfg.data
    teachers = [t for t in cfg.teachers if t.model is not None]
    if not teachers:
        raise ConfigError("Expected a config with pretrained teachers (`model:`); teachers trained by `kava run` "
                          "are small enough to just run.")
    tok_name = student_tokenizer or cfg.student.tokenizer or cfg.student.model
    tokenizer = load_fast_tokenizer(tok_name)
    first = teachers[0].extract
    name = first.get("student_template", "plain")
    template = load_template(name, tokenizer=tokenizer, flag="student_template",
                             system_prompt=first.get("system_prompt") if is_tokenizer_template(name) else None)
    rows = DataSource(dataset=d.dataset, split=d.pool_split, limit=limit or d.pool_size,
                      data_files=data_files or d.data_files, data_seed=d.seed, difficulty=d.difficulty).load()
    grid = build_grid(rows, tokenizer, template, max_length=cfg.train.max_length, on_too_long="truncate")
    tokens = int(sum(len(s.input_ids) for s in grid))
    mean_tokens = tokens / max(1, len(grid))
    segment_ids = [s.segment_ids for s in grid]  # what a compressed teacher's kept rows follow from
    reasoning = sum(int(np.count_nonzero(s == SEGMENT_NAMES.index("reasoning"))) for s in segment_ids)
    (s_layers, *_), s_source = geometry(cfg.student.model) if cfg.student.layers is None else \
        ((cfg.student.layers, 0, 0, 0), "config")

    out: dict[str, Any] = {"dataset": f"{d.dataset}:{d.pool_split}", "samples": len(grid), "student_tokens": tokens,
                           "mean_tokens": round(mean_tokens, 1), "reasoning_share": reasoning / max(1, tokens),
                           "student_tokenizer": tok_name,
                           "student_layers": s_layers, "tokens_per_s": tokens_per_s, "step_seconds": step_seconds,
                           "teachers": []}
    for t in teachers:
        preset = PRESETS.get(t.model.lower())  # a plan needs no weights: no cache check, unlike resolve_teacher
        model_id, quantization = (preset.hf_id, preset.quantization) if preset else (t.model, "as configured")
        (layers, heads, kv_heads, head_dim), g_source = geometry(model_id)
        mapped, n_q = stored_layers(t.extract, layers, s_layers)  # what this config stores
        proportional = len(proportional_layer_map(layers, s_layers).teacher_layers)
        subsets = {"all layers": layers, f"proportional map to {s_layers}": proportional,
                   "last quarter": max(1, layers // 4)}
        sizes = []
        for name, n in subsets.items():
            for dtype in KV_DTYPES:
                kv = bytes_per_token(n, kv_heads, head_dim, dtype) + bytes_per_token(n, kv_heads, head_dim, dtype, "v")
                q = bytes_per_token(n, heads, head_dim, dtype, "q")
                sizes.append({"layers": name, "n_layers": n, "kv_dtype": dtype, "kv_bytes_per_token": kv,
                              "q_bytes_per_token": q, "kv_bytes": kv * tokens, "kv_q_bytes": (kv + q) * tokens})
        # What one optimizer step reads: the run's global batch of mean-length samples, the stored layers of the
        # map, in the config's dtype, with Q when the config stores it, only the kept rows if it evicts.
        dtype = t.extract.get("kv_dtype", "float16")
        segments = parse_list(t.extract.get("evict_segments"), str, "evict_segments", "segment names", []) or \
            ["reasoning"]
        budget = _budget(t.extract.get("kv_budget"))
        share = None if budget is None else kept_share(segment_ids, budget, segments)
        per_token = evicted_bytes_per_token(mapped, kv_heads, head_dim, dtype, share, q_layers=n_q, q_heads=heads)
        samples = cfg.train.batch_size * cfg.train.grad_accum
        step_bytes = per_token * mean_tokens * samples
        # The same store at each planned budget, per dtype: K/V on the mapped layers (+ Q on the config's Q layers,
        # which a compressed teacher keeps on its kept rows), its int32 positions, and the bandwidth a step needs.
        budgets = []
        for b in PLAN_BUDGETS:
            kept = None if b is None else kept_share(segment_ids, b, segments)
            for d in PLAN_BUDGET_DTYPES:
                kv = evicted_bytes_per_token(mapped, kv_heads, head_dim, d, kept)
                kv_q = evicted_bytes_per_token(mapped, kv_heads, head_dim, d, kept, q_layers=n_q, q_heads=heads)
                budgets.append({
                    "budget": b, "kept_share": 1.0 if kept is None else kept, "kv_dtype": d,
                    "kv_bytes_per_token": kv, "kv_q_bytes_per_token": kv_q, "kv_bytes": kv * tokens,
                    "kv_q_bytes": kv_q * tokens, "kv_gb_s": kv * mean_tokens * samples / step_seconds / 1e9,
                    "kv_q_gb_s": kv_q * mean_tokens * samples / step_seconds / 1e9})
        out["teachers"].append({
            "name": t.name, "model": model_id, "quantization": quantization, "geometry": {
                "layers": layers, "heads": heads, "kv_heads": kv_heads, "head_dim": head_dim, "source": g_source},
            "sizes": sizes, "gpu_hours": tokens / tokens_per_s / 3600,
            "store_bytes": per_token * tokens,
            "step": {"samples": samples, "bytes": step_bytes, "needed_mb_s": step_bytes / step_seconds / 1e6,
                     "dtype": dtype, "q_layers": n_q, "layers": mapped, "budget": budget, "kept_share": share},
            "budgets": {"segments": segments, "layers": mapped, "q_layers": n_q, "rows": budgets},
        })
    if store is not None:
        out["store_read"] = measure_read(store)
    return out


def _budget(value: Any) -> int | float | None:
    """A config's ``kv_budget`` (text or a YAML number; validated with the config) as a count or a fraction."""
    if value is None:
        return None
    text = str(value).strip()
    return int(text) if text.isdigit() else float(text)


def measure_read(path: str | Path) -> dict[str, Any]:
    """Logical K/V (and Q) bytes per second streamed from ``path`` by ``iter_shards``, on this machine."""
    store = KVStore.open(path)
    t0, logical = time.perf_counter(), 0
    for shard in store.iter_shards():
        for rows in shard.teachers.values():
            logical += sum(a.size * 2 for a in (rows.k, rows.v, rows.q) if a is not None)  # as fp16
    seconds = time.perf_counter() - t0
    return {"store": str(path), "logical_bytes": logical, "seconds": round(seconds, 3),
            "mb_s": round(logical / seconds / 1e6, 1) if seconds > 0 else None}


def format_plan(p: dict[str, Any]) -> str:
    def gib(n: float) -> str:
        return f"{n / 2**30:,.1f} GiB"

    lines = [f"data      {p['dataset']}: {p['samples']} samples, {p['student_tokens']:,} student tokens "
             f"({p['mean_tokens']} a sample) with {p['student_tokenizer']}; student of {p['student_layers']} layers"]
    for t in p["teachers"]:
        g = t["geometry"]
        lines += ["", f"teacher   {t['name']}: {t['model']} ({t['quantization']}), {g['layers']} layers, "
                  f"{g['heads']} heads, {g['kv_heads']} KV heads x {g['head_dim']} ({g['source']})", "",
                  f"{'layers':<28}{'dtype':<10}{'K+V raw':>12}{'K+V+Q raw':>12}{'K+V at 1.26x':>14}"]
        for s in t["sizes"]:
            label = f"{s['layers']} ({s['n_layers']})"
            lossless = s["kv_dtype"] in ("float16", "bfloat16", "float32")
            compressed = gib(s["kv_bytes"] / COMPRESSION_MEASURED[0]) if lossless else "–"
            lines.append(f"{label:<28}{s['kv_dtype']:<10}{gib(s['kv_bytes']):>12}"
                         f"{gib(s['kv_q_bytes']):>12}{compressed:>14}")
        lines += ["", *_format_budgets(t["budgets"], p)]
        st = t["step"]
        kept = "" if st["budget"] is None else f", budget {st['budget']}: {st['kept_share']:.1%} of the rows kept"
        lines += ["", f"this config {gib(t['store_bytes'])} raw ({st['dtype']}, K/V on {st['layers']} layers, Q on "
                  f"{st['q_layers']}{kept})",
                  f"extraction  {t['gpu_hours']:,.2f} GPU-hours at {p['tokens_per_s']:,.0f} teacher tokens/s "
                  "(assumed; forward passes only)",
                  f"student     {st['samples']} samples a step read {st['bytes'] / 1e6:,.1f} MB: "
                  f"{st['needed_mb_s']:,.0f} MB/s at {p['step_seconds']} s a step (assumed)"]
    if "store_read" in p:
        r = p["store_read"]
        lines.append(f"this machine streams {r['mb_s']:,} MB/s of logical K/V from {r['store']}")
    return "\n".join(lines)


def _format_budgets(b: dict[str, Any], p: dict[str, Any]) -> list[str]:
    """The budget table of one teacher: store size and per-GPU bandwidth per budget and dtype."""
    def kib(n: float) -> str:
        return f"{n / 1024:,.1f} KiB"

    def gib(n: float) -> str:
        return f"{n / 2**30:,.1f} GiB"

    with_q = b["q_layers"] > 0
    lines = [f"eviction  a compressed teacher keeps a budget of each sample's {', '.join(b['segments'])} rows per "
             f"layer and KV head, the rest whole; the reasoning is {p['reasoning_share']:.1%} of the tokens. "
             f"Per original token, K/V on {b['layers']} layers" + (f" (+ Q on {b['q_layers']})" if with_q else "")
             + f" of the kept rows and their int32 positions ({KEPT_POSITION_BYTES} B per kept row, layer and KV "
             f"head); per GPU at {p['step_seconds']} s a step (assumed)", "",
             f"{'budget':<10}{'kept rows':>10}  {'dtype':<9}{'K+V/token':>12}{'K+V store':>12}{'per GPU':>11}"
             + (f"{'+Q/token':>12}{'+Q store':>12}{'per GPU':>11}" if with_q else "")]
    for r in b["rows"]:
        label = "whole" if r["budget"] is None else f"{r['budget']:.0%}" if isinstance(r["budget"], float) \
            else str(r["budget"])
        line = (f"{label:<10}{r['kept_share']:>10.1%}  {r['kv_dtype']:<9}{kib(r['kv_bytes_per_token']):>12}"
                f"{gib(r['kv_bytes']):>12}{r['kv_gb_s']:>7.2f} GB/s")
        if with_q:
            line += f"{kib(r['kv_q_bytes_per_token']):>12}{gib(r['kv_q_bytes']):>12}{r['kv_q_gb_s']:>7.2f} GB/s"
        lines.append(line)
    return lines
