"""The distill loader's feed rate from compressed int4 teacher caches of a 7B teacher's geometry. Prints one JSON
object.

One store, written with the real writer (``KVStore.shard_writer``), holds four teachers of a Qwen2.5-7B teacher's
K/V geometry on the 24 layers the proportional map keeps for a 24-layer student (4 KV heads × head_dim 128, random
float16 K/V): **float16 whole** (the baseline), **int4 whole**, and **int4 compressed** to 25% and 10% of each
sample's reasoning rows per (layer, KV head), prompt and answer whole. The grid is GSM8K-shaped: ``--samples``
samples of about ``--tokens`` tokens (normal, sd ``--tokens-sd``), each a prompt (segment 0), a reasoning of
``--reasoning`` of its tokens (segment 1) and an answer of ``--answer`` (segment 2). The defaults are GSM8K train's
with the Qwen2 tokenizer (``kava estimate --run-config gsm8k-qwen7b4bit-to-qwen0.5b``: 194 tokens a problem, 65%
of them reasoning, 3% answer). Which reasoning rows are kept is drawn at random per (layer, head): read speed does
not depend on the rule that chose them.

Each teacher is then streamed by ``StreamLoader`` in this process (``num_workers=0``), one epoch at a time, the
four teachers interleaved within each of ``--repeats`` rounds after one warm-up epoch each (page cache warm, as
training reads a store it has read before); the best epoch of each is reported:

- **tokens/s**: original (student-grid) tokens delivered per second, the unit a training step consumes;
- **bytes read**: the teacher's shard files on disk (what an epoch reads) and their uncompressed size;
- **CPU seconds** of this process over the epoch (all threads): the cost that wall time on a shared machine blurs;
- ratios against float16 whole, and **loader processes per GPU**: ``--gpu-tokens-per-s`` (134,000: one H100 at
  6,144 tokens per 46 ms step, the real-scale plan in docs/performance.md) ÷ one process's tokens/s; and **cores
  per GPU**, the same from CPU seconds per token (what it takes on a machine whose cores are not shared).
- ``--parts loader,decode`` adds the int4 teachers' epochs with ``kava.kvstore.codecs.dequantize_np`` swapped for the
  naive reference decoder of ``tests/test_codecs_decode.py`` (what it was before the blocked decoder), interleaved
  with the real one: the decoder's before/after ratio in the loader.

Writing is timed too (tokens/s of the writer, per teacher). The loader's window dequantizes int4 to float16 and puts
a compressed teacher's kept rows back on their tokens on the host, so its batches are float16 ``[B, L, H, T, D]``
for every teacher here. Usage::

    python tests/benchmarks/evict_loader.py [--samples 64] [--repeats 3] [--parts loader,decode]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

LAYERS, KV_HEADS, HEAD_DIM = 24, 4, 128
"""Qwen2.5-7B's K/V geometry on the 24 layers the proportional map keeps for Qwen2.5-0.5B."""


def segments(rng, samples: int, tokens: int, sd: int, reasoning: float, answer: float):
    """Per sample ``[T]`` int32 segment ids: prompt (0), reasoning (1, ``reasoning`` of T), answer (2, ``answer``
    of T, at least 2 tokens)."""
    import numpy as np

    out = []
    for length in np.clip(rng.normal(tokens, sd, samples).round().astype(int), 48, 4 * tokens):
        r = int(round(reasoning * length))
        a = max(2, int(round(answer * length)))
        out.append(np.repeat(np.array([0, 1, 2], np.int32), [length - r - a, r, a]))
    return out


def kept_positions(rng, seg, budget: float):
    """``[M, L, H]`` int32: every row outside the reasoning and ``keep_count(S, budget)`` of its ``S`` rows per
    (layer, head), drawn at random, in time order."""
    import numpy as np

    from kava.kvstore.eviction import keep_count

    inside = np.flatnonzero(seg == 1)
    before, after = np.flatnonzero(seg == 0), np.flatnonzero(seg == 2)
    m = keep_count(len(inside), budget) if len(inside) else 0
    chosen = np.sort(np.argsort(rng.random((len(inside), LAYERS, KV_HEADS)), axis=0)[:m], axis=0)
    shape = (LAYERS, KV_HEADS)
    return np.concatenate(
        [
            np.broadcast_to(before[:, None, None], (len(before), *shape)),
            inside[chosen],
            np.broadcast_to(after[:, None, None], (len(after), *shape)),
        ]
    ).astype(np.int32)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=64)
    ap.add_argument("--tokens", type=int, default=194, help="mean sample length")
    ap.add_argument("--tokens-sd", type=int, default=40)
    ap.add_argument("--reasoning", type=float, default=0.65, help="the reasoning's share of a sample's tokens")
    ap.add_argument("--answer", type=float, default=0.03, help="the answer's share of a sample's tokens")
    ap.add_argument("--budgets", default="0.25,0.1", help="the compressed teachers' shares of the reasoning")
    ap.add_argument("--shard-tokens", type=int, default=4096)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--buffer-shards", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3, help="timed epochs of each teacher; the best is reported")
    ap.add_argument(
        "--gpu-tokens-per-s",
        type=float,
        default=134_000.0,
        help="what one GPU consumes (the real-scale plan: 6,144 tokens per 46 ms step on an H100)",
    )
    ap.add_argument("--parts", default="loader", help="loader, and decode for the decoder's before/after")
    args = ap.parse_args()
    parts = set(args.parts.split(","))
    import numpy as np
    import torch

    from kava.distill.loader import LoaderConfig, StreamLoader, TeacherRequest
    from kava.kvstore import (
        DatasetSpec,
        EvictionSpec,
        KVStore,
        LayerMap,
        TeacherSpec,
        TokenizerSpec,
        codecs,
        create_store,
        default_storage,
    )

    budgets = [float(b) for b in args.budgets.split(",")]
    teachers: dict[str, tuple[str, float | None]] = {"float16_whole": ("float16", None), "int4_whole": ("int4", None)}
    teachers.update({f"int4_{round(b * 100)}pct": ("int4", b) for b in budgets})
    baseline = "float16_whole"
    rng = np.random.default_rng(0)
    segs = segments(rng, args.samples, args.tokens, args.tokens_sd, args.reasoning, args.answer)
    work = Path(tempfile.mkdtemp(prefix="kava-bench-evict-loader-"))
    try:
        path = work / "kv.zarr"
        store = create_store(
            path,
            sample_ids=[f"s{i}" for i in range(len(segs))],
            input_ids=[rng.integers(10, 1000, len(s)) for s in segs],
            segment_ids=segs,
            student_tokenizer=TokenizerSpec(name="bench", fingerprint="0" * 64, vocab_size=1000),
            dataset=DatasetSpec(name="gsm8k-shaped", split="train", fingerprint="0" * 64),
            shard_tokens=args.shard_tokens,
        )
        layer_map = LayerMap("proportional", tuple(((i, 1.0),) for i in range(LAYERS)))
        written: dict[str, dict] = {}
        for name, (dtype, budget) in teachers.items():
            store.add_teacher(
                TeacherSpec(
                    name=name,
                    model={"id": "qwen2.5-7b-shaped"},
                    num_layers=LAYERS,
                    layers=tuple(range(LAYERS)),
                    num_heads=28,
                    kv_heads=KV_HEADS,
                    head_dim=HEAD_DIM,
                    layer_map=layer_map,
                    storage=default_storage(LAYERS, KV_HEADS, HEAD_DIM, dtype),
                    eviction=None if budget is None else EvictionSpec(rule="random", budget=budget),
                )
            )
            draw = np.random.default_rng(1)
            t0, c0 = time.perf_counter(), os.times()
            for shard in range(store.num_shards):
                with store.shard_writer(name, shard) as w:
                    for i in store.shard_samples(shard):
                        kept = None if budget is None else kept_positions(draw, segs[i], budget)
                        rows = len(segs[i]) if kept is None else len(kept)
                        k, v = (
                            draw.standard_normal((rows, LAYERS, KV_HEADS, HEAD_DIM), np.float32).astype(np.float16)
                            for _ in range(2)
                        )
                        w.add(k, v, kept=kept, sample=i)
            c1 = os.times()
            seconds = time.perf_counter() - t0
            written[name] = {
                "seconds": round(seconds, 2),
                "tokens_per_s": round(store.num_tokens / seconds),
                "cpu_s": round(c1.user + c1.system - c0.user - c0.system, 2),
            }
        store = KVStore.open(path)

        def on_disk(name: str) -> int:
            return sum(f.stat().st_size for f in (path / "teachers" / name).rglob("*") if f.is_file())

        def logical(name: str) -> int:  # uncompressed bytes of the shard arrays, as the writer counted them
            return sum(store.shard_marker(name, s)["bytes_logical"] for s in range(store.num_shards))

        def epoch(name: str) -> tuple[float, float, int, int]:
            """(seconds, CPU seconds, original tokens, bytes of K/V handed out) of one epoch of ``name``."""
            config = LoaderConfig(
                str(path),
                teachers=(TeacherRequest(name),),
                batch_size=args.batch_size,
                buffer_shards=args.buffer_shards,
                num_workers=0,
                seed=0,
            )
            c0, t0 = os.times(), time.perf_counter()
            tokens = delivered = 0
            for batch in StreamLoader(config, epochs=1):
                tokens += batch.num_tokens
                t = batch.teachers[name]
                delivered += t.k.element_size() * (t.k.numel() + t.v.numel())
            seconds, c1 = time.perf_counter() - t0, os.times()
            return seconds, c1.user + c1.system - c0.user - c0.system, tokens, delivered

        for name in teachers:  # warm-up: page cache, imports, the first window's allocations
            epoch(name)
        runs: dict[str, list[tuple[float, float, int, int]]] = {name: [] for name in teachers}
        for _ in range(args.repeats):  # interleaved, so drift on a shared machine hits every teacher alike
            for name in teachers:
                runs[name].append(epoch(name))

        results = {}
        for name, (dtype, budget) in teachers.items():
            seconds = min(r[0] for r in runs[name])
            cpu = min(r[1] for r in runs[name])
            tokens = runs[name][0][2]
            assert tokens == store.num_tokens, (name, tokens, store.num_tokens)
            slots = sum(store.shard_marker(name, s).get("slots", 0) for s in range(store.num_shards))
            results[name] = {
                "dtype": dtype,
                "budget_of_reasoning": budget,
                "kept_rows_share": round(slots / store.num_tokens, 4) if budget is not None else 1.0,
                "tokens_per_s": round(tokens / seconds),
                "seconds": round(seconds, 3),
                "cpu_s": round(cpu, 3),
                "cpu_s_per_mtoken": round(cpu / tokens * 1e6, 1),
                "bytes_on_disk": on_disk(name),
                "bytes_logical": logical(name),
                "bytes_on_disk_per_token": round(on_disk(name) / tokens, 1),
                "read_mb_per_s": round(on_disk(name) / seconds / 1e6, 1),
                "delivered_mb_per_s": round(runs[name][0][3] / seconds / 1e6, 1),
                "processes_per_gpu": round(args.gpu_tokens_per_s / (tokens / seconds), 1),
                "cores_per_gpu": round(args.gpu_tokens_per_s * cpu / tokens, 1),
                "runs_s": [round(r[0], 3) for r in runs[name]],
                "write": written[name],
            }
        base = results[baseline]
        for r in results.values():
            r["vs_float16_whole"] = {
                "tokens_per_s": round(r["tokens_per_s"] / base["tokens_per_s"], 3),
                "bytes_on_disk": round(r["bytes_on_disk"] / base["bytes_on_disk"], 3),
                "cpu_s": round(r["cpu_s"] / base["cpu_s"], 3),
                "write_tokens_per_s": round(r["write"]["tokens_per_s"] / base["write"]["tokens_per_s"], 3),
            }
        decode = {}
        if "decode" in parts:
            sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
            from test_codecs_decode import naive_dequantize  # noqa: PLC0415 - the reference lives with its test

            fast = codecs.dequantize_np

            def naive(codes, scale, zero, dtype, *, per_channel, group, first_row=0, out_dtype=np.float32):
                return naive_dequantize(
                    codes,
                    scale,
                    zero,
                    codecs.LOWBIT_BITS[dtype],
                    per_channel=per_channel,
                    group=group,
                    first_row=first_row,
                ).astype(out_dtype, copy=False)

            lowbit = [name for name, (dtype, _) in teachers.items() if codecs.is_lowbit(dtype)]
            timed: dict[str, dict[str, list[tuple[float, float, int, int]]]] = {
                n: {"before": [], "after": []} for n in lowbit
            }
            for _ in range(args.repeats):
                for name in lowbit:
                    for label, decoder in (("before", naive), ("after", fast)):
                        codecs.dequantize_np = decoder
                        try:
                            timed[name][label].append(epoch(name))
                        finally:
                            codecs.dequantize_np = fast
            for name, by in timed.items():
                rate = {label: got[0][2] / min(r[0] for r in got) for label, got in by.items()}
                cpu = {label: min(r[1] for r in got) for label, got in by.items()}
                decode[name] = {
                    "tokens_per_s_before": round(rate["before"]),
                    "tokens_per_s_after": round(rate["after"]),
                    "after_vs_before": round(rate["after"] / rate["before"], 2),
                    "cpu_s_before": round(cpu["before"], 3),
                    "cpu_s_after": round(cpu["after"], 3),
                    "cpu_before_over_after": round(cpu["before"] / cpu["after"], 2),
                }
        lengths = np.array([len(s) for s in segs])
        report = {
            "benchmark": "evict_loader",
            "date": dt.date.today().isoformat(),
            "machine": {
                "cpus": os.cpu_count(),
                "python": platform.python_version(),
                "torch": torch.__version__,
                "cuda": torch.cuda.is_available(),
            },
            "data": {
                "samples": store.num_samples,
                "tokens": store.num_tokens,
                "mean_tokens": round(float(lengths.mean()), 1),
                "reasoning_share": round(float(sum((s == 1).sum() for s in segs) / lengths.sum()), 3),
                "shards": store.num_shards,
                "geometry": {"layers": LAYERS, "kv_heads": KV_HEADS, "head_dim": HEAD_DIM},
                "batch_size": args.batch_size,
                "buffer_shards": args.buffer_shards,
            },
            "gpu_tokens_per_s": args.gpu_tokens_per_s,
            "repeats": args.repeats,
            "baseline": baseline,
            "teachers": results,
            **({"decode_before_after": decode} if decode else {}),
        }
        print(json.dumps(report, indent=2))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
