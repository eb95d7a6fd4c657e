"""`kava estimate --run-config`: the plan of an experiment too big for this machine, from its config alone.

For each teacher of the config: the store's size per storage dtype and per layer subset (with and without Q), the
extraction time at a stated teacher throughput, and the read bandwidth a student step needs at a stated step time
against what a store on this machine delivers (measured when ``--store`` is given). Nothing is downloaded: token
counts come from tokenizing the real dataset with the student's tokenizer, and the model geometry from the local
cache or, for the models the shipped configs name, from their published configs (below).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from kava.core.config import as_int, parse_list
from kava.core.data import DataSource
from kava.core.errors import ConfigError
from kava.core.models import load_fast_tokenizer
from kava.extract.estimate import bytes_per_token
from kava.extract.teachers import PRESETS
from kava.extract.templates import load_template
from kava.kvstore import KVStore
from kava.kvstore.manifest import KV_DTYPES, proportional_layer_map

from .config import RunConfig

# (layers, attention heads, KV heads, head dim), from each model's published config.json.
KNOWN_GEOMETRY: dict[str, tuple[int, int, int, int]] = {
    "Qwen/Qwen2.5-7B-Instruct": (28, 28, 4, 128),   # hidden 3584
    "Qwen/Qwen2.5-1.5B-Instruct": (28, 12, 2, 128),  # hidden 1536
    "Qwen/Qwen2.5-0.5B-Instruct": (24, 14, 2, 64),   # hidden 896
}
COMPRESSION_MEASURED = (1.26, 1.5)
"""blosc-zstd ratios measured on real fp16 K/V (post-RoPE, pre-RoPE) of stories260K; see docs/performance.md "Store"."""


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
    template = load_template(teachers[0].extract.get("student_template", "plain"))
    rows = DataSource(dataset=d.dataset, split=d.pool_split, limit=limit or d.pool_size,
                      data_files=data_files or d.data_files, data_seed=d.seed, difficulty=d.difficulty).load()
    grid = build_grid(rows, tokenizer, template, max_length=cfg.train.max_length, on_too_long="truncate")
    tokens = int(sum(len(s.input_ids) for s in grid))
    mean_tokens = tokens / max(1, len(grid))
    (s_layers, *_), s_source = geometry(cfg.student.model) if cfg.student.layers is None else \
        ((cfg.student.layers, 0, 0, 0), "config")

    out: dict[str, Any] = {"dataset": f"{d.dataset}:{d.pool_split}", "samples": len(grid), "student_tokens": tokens,
                           "mean_tokens": round(mean_tokens, 1), "student_tokenizer": tok_name,
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
        # map, in the config's dtype, with Q when the config stores it.
        dtype = t.extract.get("kv_dtype", "float16")
        per_token = bytes_per_token(mapped, kv_heads, head_dim, dtype) + \
            bytes_per_token(mapped, kv_heads, head_dim, dtype, "v") + bytes_per_token(n_q, heads, head_dim, dtype, "q")
        samples = cfg.train.batch_size * cfg.train.grad_accum
        step_bytes = per_token * mean_tokens * samples
        out["teachers"].append({
            "name": t.name, "model": model_id, "quantization": quantization, "geometry": {
                "layers": layers, "heads": heads, "kv_heads": kv_heads, "head_dim": head_dim, "source": g_source},
            "sizes": sizes, "gpu_hours": tokens / tokens_per_s / 3600,
            "store_bytes": per_token * tokens,
            "step": {"samples": samples, "bytes": step_bytes, "needed_mb_s": step_bytes / step_seconds / 1e6,
                     "dtype": dtype, "q_layers": n_q, "layers": mapped},
        })
    if store is not None:
        out["store_read"] = measure_read(store)
    return out


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
        st = t["step"]
        lines += ["", f"this config {gib(t['store_bytes'])} raw ({st['dtype']}, K/V on {st['layers']} layers, Q on "
                  f"{st['q_layers']})",
                  f"extraction  {t['gpu_hours']:,.2f} GPU-hours at {p['tokens_per_s']:,.0f} teacher tokens/s "
                  "(assumed; forward passes only)",
                  f"student     {st['samples']} samples a step read {st['bytes'] / 1e6:,.1f} MB: "
                  f"{st['needed_mb_s']:,.0f} MB/s at {p['step_seconds']} s a step (assumed)"]
    if "store_read" in p:
        r = p["store_read"]
        lines.append(f"this machine streams {r['mb_s']:,} MB/s of logical K/V from {r['store']}")
    return "\n".join(lines)
