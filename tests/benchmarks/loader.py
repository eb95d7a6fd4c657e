"""The distill loader's feed rate against the store's own streaming read of the same shards. Prints one JSON object.

The store is extracted for real: the stories260K teacher from ``$KAVA_ASSETS`` (5 layers, 4 KV heads × 8, Q of
8 heads stored too) over seeded synthetic problems, in the storage dtype asked for. Everything is measured in this
one command, page cache warm, best of ``--repeats``:

- **store**: ``KVStore.iter_shards`` over every shard with K, V and Q in the stored dtype (no conversion): the
  bytes the loader has to read, as fast as the store reads them.
- **loader, one process**: one epoch of ``StreamLoader`` with ``num_workers=0`` (batches padded into
  ``[B, L, H, T, D]``, in the stored dtype; pinned only where CUDA is available).
- **value check** (``--parts values``): the loader's epoch with the NaN/Inf check of K/V/Q as read and with
  that rule swapped for a no-op, interleaved: what the check costs the feed rate (target: at most 5%).
- **loader, 1 and 2 workers**: the same through spawned DataLoader workers, over ``--epochs`` epochs, timed from
  the first batch on (spawning a worker imports torch: seconds that a training run pays once).

Feed rate = logical K/V/Q bytes of the real (unpadded) tokens delivered ÷ seconds; the store's figure counts the
same bytes. The process's CPU seconds of each (all threads) are reported beside: on a shared machine they say
what the work costs when wall time says mostly how busy the neighbours were. Usage::

    KAVA_ASSETS=... python tests/benchmarks/loader.py [--samples 480] [--kv-dtype float16|bfloat16|int8]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=480)
    ap.add_argument("--kv-dtype", default="float16", choices=["float16", "bfloat16", "int8"])
    ap.add_argument("--shard-tokens", type=int, default=16384)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--buffer-shards", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3, help="timed repetitions; the best is reported")
    ap.add_argument("--epochs", type=int, default=3, help="epochs of each worker run")
    ap.add_argument("--parts", default="process,workers", help="which measurements to run")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if not os.environ.get("KAVA_ASSETS"):
        raise SystemExit("Set KAVA_ASSETS to the shared assets folder (the stories260K model).")
    import numpy as np
    import torch

    from kava.distill.loader import LoaderConfig, StreamLoader, TeacherRequest
    from kava.extract.config import ExtractConfig
    from kava.extract.recipe import run_extract
    from kava.kvstore import KVStore, codecs

    stories = Path(os.environ["KAVA_ASSETS"]) / "models" / "stories260K_hf_derived"
    work = Path(tempfile.mkdtemp(prefix="kava-bench-loader-"))
    parts = set(args.parts.split(","))
    try:
        path = work / "kv.zarr"
        run_extract(ExtractConfig.from_dict(dict(
            teacher=str(stories), store=str(path), limit=args.samples, with_q=True, kv_dtype=args.kv_dtype,
            shard_tokens=args.shard_tokens, progress=False, calibration_samples=0)), log=lambda _: None)
        store = KVStore.open(path)
        (name,) = store.teachers
        spec = store.teacher(name)
        # Stored bytes per token: K and V [L, Hkv, D], Q [Lq, Hq, D], plus int8's fp16 scale per (layer, head).
        item = codecs.storage_numpy_dtype(spec.storage.dtype).itemsize
        rows = 2 * len(spec.layers) * spec.kv_heads + len(spec.q_layers) * spec.num_heads
        per_token = rows * spec.head_dim * item + (rows * 2 if spec.storage.dtype == "int8" else 0)
        logical = store.num_tokens * per_token

        # The store hands out floats: float16 is the stored dtype itself (no conversion); bf16 and int8 stores are
        # decoded to float32 there, so for them this baseline also pays a conversion the loader leaves to the device.
        read_dtype = np.float16 if spec.storage.dtype == "float16" else np.float32

        def cpu_seconds() -> float:
            t = os.times()
            return t.user + t.system

        def store_read() -> float:
            t0 = time.perf_counter()
            for _ in store.iter_shards(teachers=[name], with_q=True, dtype=read_dtype):
                pass
            return time.perf_counter() - t0

        def config(workers: int) -> LoaderConfig:
            return LoaderConfig(str(path), teachers=(TeacherRequest(name, with_q=True),), batch_size=args.batch_size,
                                buffer_shards=args.buffer_shards, num_workers=workers, seed=0)

        def loader_epoch() -> tuple[float, int]:
            t0 = time.perf_counter()
            tokens = sum(int(b.attention_mask.sum()) for b in StreamLoader(config(0), epochs=1))
            return time.perf_counter() - t0, tokens

        report: dict = {
            "benchmark": "loader",
            "date": dt.date.today().isoformat(),
            "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
                        "cuda": torch.cuda.is_available()},
            "data": {"teacher": name, "samples": store.num_samples, "tokens": store.num_tokens,
                     "shards": store.num_shards, "kv_dtype": spec.storage.dtype, "bytes_per_token": per_token,
                     "logical_mb": round(logical / 1e6, 1), "batch_size": args.batch_size,
                     "buffer_shards": args.buffer_shards},
            "repeats": args.repeats,
        }
        if "process" in parts:
            store_read()  # warm the page cache, as training reads a store it has read before
            store_s, loader_s, store_cpu, loader_cpu = [], [], [], []
            for _ in range(args.repeats):  # interleaved, so drift on a shared machine hits both alike
                c0 = cpu_seconds()
                store_s.append(store_read())
                c1 = cpu_seconds()
                seconds, tokens = loader_epoch()
                loader_cpu.append(cpu_seconds() - c1)
                store_cpu.append(c1 - c0)
                assert tokens == store.num_tokens, (tokens, store.num_tokens)
                loader_s.append(seconds)
            report["one_process"] = {
                "store_read_mb_per_s": round(logical / min(store_s) / 1e6, 1),
                "loader_mb_per_s": round(logical / min(loader_s) / 1e6, 1),
                "loader_vs_store_read": round(min(store_s) / min(loader_s), 3), "target": 0.7,
                # Each repetition's pair, store then loader back to back: less at the mercy of one quiet moment.
                "loader_vs_store_read_median_of_pairs": round(float(np.median(np.array(store_s) / loader_s)), 3),
                "store_read_dtype": np.dtype(read_dtype).name,
                # CPU seconds of this process (all threads), least over repetitions: what the work costs, which
                # other processes on a shared machine disturb less than they disturb wall time.
                "cpu_s": {"store": round(min(store_cpu), 3), "loader": round(min(loader_cpu), 3),
                          "store_over_loader": round(min(store_cpu) / min(loader_cpu), 3)},
                "runs_s": {"store": [round(s, 4) for s in store_s], "loader": [round(s, 4) for s in loader_s]},
            }
        if "values" in parts:
            # What checking K/V/Q for NaN/Inf as they are read costs the loader: epochs with the rule and with it
            # swapped for a no-op, interleaved, in this one process.
            from kava.kvstore import rules  # noqa: PLC0415

            real = rules.finite_problem
            loader_epoch()  # warm
            timed: dict[str, list[float]] = {"checked": [], "unchecked": []}
            for _ in range(args.repeats):
                for label, rule in (("checked", real), ("unchecked", lambda data, dtype: None)):
                    rules.finite_problem = rule
                    try:
                        timed[label].append(loader_epoch()[0])
                    finally:
                        rules.finite_problem = real
            report["value_check"] = {
                "checked_mb_per_s": round(logical / min(timed["checked"]) / 1e6, 1),
                "unchecked_mb_per_s": round(logical / min(timed["unchecked"]) / 1e6, 1),
                "checked_vs_unchecked": round(min(timed["unchecked"]) / min(timed["checked"]), 3),
                "median_of_pairs": round(float(np.median(np.array(timed["unchecked"]) / timed["checked"])), 3),
                "target": 0.95,
                "runs_s": {k: [round(x, 4) for x in v] for k, v in timed.items()},
            }
        if "workers" in parts:
            rates = {}
            for workers in (1, 2):
                best = 0.0
                for _ in range(max(1, args.repeats - 1)):
                    t0, tokens = None, 0
                    for batch in StreamLoader(config(workers), epochs=args.epochs):
                        if t0 is None:  # the workers are up: time the steady state from here
                            t0 = time.perf_counter()
                            continue
                        tokens += int(batch.attention_mask.sum())
                    best = max(best, tokens * per_token / (time.perf_counter() - t0))
                rates[workers] = best
            report["workers"] = {
                "workers_1_mb_per_s": round(rates[1] / 1e6, 1), "workers_2_mb_per_s": round(rates[2] / 1e6, 1),
                "workers_2_vs_1": round(rates[2] / rates[1], 3), "target": 1.6, "epochs": args.epochs,
            }
        print(json.dumps(report, indent=2))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
