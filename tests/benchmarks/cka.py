"""Out-of-core CKA over a store against loading every row into memory first, on real K/V.

A store is extracted from the real pretrained stories260K Llama (``$KAVA_ASSETS``) over the synthetic dataset into a
temporary directory. Then, for the biased and the unbiased estimator, in this one run:

- out of core: :func:`kava.analysis.cka.store_cka` (dask, block by block);
- baseline: every aligned row read with numpy (``read_shard``, float64) into one ``[T, L, d]`` array, then the same
  math in memory (biased: one centred ``X^T X`` product; unbiased: the same per-block HSIC_1 kernel over the same
  minibatches).

Time is the best of ``--repeats`` untraced runs; peak memory is ``tracemalloc``'s peak over one more run (numpy
reports its buffers to it). Prints one JSON object with both sides, their ratios and the largest difference between
the two matrices. Usage::

    KAVA_ASSETS=... python tests/benchmarks/cka.py [--limit 200] [--block-tokens 1024] [--array kv]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

TEACHER = "stories260K_hf_derived"


def build_store(assets: Path, path: Path, limit: int) -> float:
    from kava.extract.config import ExtractConfig
    from kava.extract.recipe import run_extract

    start = time.perf_counter()
    run_extract(ExtractConfig.from_dict(dict(teacher=str(assets / "models" / TEACHER), store=str(path), limit=limit,
                              progress=False, calibration_samples=0, with_q=False)), log=lambda _: None)
    return time.perf_counter() - start


def in_memory(path: Path, array: str, estimator: str, block_tokens: int) -> np.ndarray:
    """Load every aligned row as float64 ``[T, L, d]``, then compute the ``[L, L]`` CKA in memory."""
    from kava.analysis.cka import block_hsic, safe_ratio
    from kava.kvstore import KVStore

    store = KVStore.open(path)
    parts = []
    for shard in range(store.num_shards):
        kv = store.read_shard(shard, teachers=[TEACHER], dtype=np.float64).teachers[TEACHER]
        n, layers = kv.k.shape[:2]
        x = np.concatenate([getattr(kv, a).reshape(n, layers, -1) for a in array], axis=2)
        parts.append(x[kv.align_weight > 0])
    x = np.concatenate(parts)  # [T, L, d]
    del parts
    if estimator == "biased":
        xc = (x - x.mean(0)).reshape(len(x), -1)
        layers, d = x.shape[1:]
        cross = (xc.T @ xc).reshape(layers, d, layers, d)
        num = np.square(cross).sum(axis=(1, 3))
        diag = np.diagonal(num)
        return safe_ratio(num, diag[:, None] * diag[None, :])
    sums = sum(block_hsic(x[i : i + block_tokens]) for i in range(0, len(x), block_tokens))[0]
    layers = x.shape[1]
    return safe_ratio(sums[:layers, :layers], sums[:layers, layers][:, None] * sums[layers, :layers][None, :])


def measure(fn: Callable[[], Any], repeats: int) -> tuple[Any, float, float]:
    """``(result, best seconds, peak MB)``: timing runs untraced, then one traced run for the peak."""
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - start)
    tracemalloc.start()
    try:
        fn()
        peak = tracemalloc.get_traced_memory()[1] / 2**20
    finally:
        tracemalloc.stop()
    return result, best, peak


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--limit", type=int, default=200, help="synthetic problems in the store")
    ap.add_argument("--block-tokens", type=int, default=1024)
    ap.add_argument("--array", choices=["k", "v", "kv"], default="kv")
    ap.add_argument("--repeats", type=int, default=3, help="timed repetitions; the best is reported")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    if not os.environ.get("KAVA_ASSETS"):
        raise SystemExit("Set KAVA_ASSETS to the shared assets folder (stories260K).")

    from kava.analysis.cka import store_cka
    from kava.kvstore import KVStore

    with tempfile.TemporaryDirectory(prefix="kava-cka-bench-") as tmp:
        path = Path(tmp) / "kv.zarr"
        extract_s = build_store(Path(os.environ["KAVA_ASSETS"]), path, args.limit)
        store = KVStore.open(path)
        spec = store.teacher(TEACHER)
        report: dict[str, Any] = {
            "store": {"problems": args.limit, "tokens": store.num_tokens, "shards": store.num_shards,
                      "layers": len(spec.layers), "features_per_layer": len(args.array) * spec.kv_heads * spec.head_dim,
                      "extract_s": round(extract_s, 2)},
            "array": args.array,
            "block_tokens": args.block_tokens,
        }
        for estimator in ("biased", "unbiased"):
            store_cka(store, TEACHER, array=args.array, estimator=estimator, block_tokens=args.block_tokens)  # warm
            # Each measured call binds this estimator (as a default), not the loop variable.
            def out_of_core(estimator: str = estimator) -> Any:
                return store_cka(store, TEACHER, array=args.array, estimator=estimator,
                                 block_tokens=args.block_tokens).matrix

            def all_in_memory(estimator: str = estimator) -> Any:
                return in_memory(path, args.array, estimator, args.block_tokens)

            ooc, ooc_s, ooc_mb = measure(out_of_core, args.repeats)
            mem, mem_s, mem_mb = measure(all_in_memory, args.repeats)
            report[estimator] = {
                "out_of_core": {"seconds": round(ooc_s, 3), "peak_mib": round(ooc_mb, 2)},
                "in_memory": {"seconds": round(mem_s, 3), "peak_mib": round(mem_mb, 2)},
                "time_ratio": round(ooc_s / mem_s, 3),
                "peak_ratio": round(ooc_mb / mem_mb, 3),
                "max_abs_diff": float(np.nanmax(np.abs(ooc - mem))),
            }
    report["machine"] = {"python": platform.python_version(), "cpus": os.cpu_count(),
                         "load_avg_1m": round(os.getloadavg()[0], 2)}
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
