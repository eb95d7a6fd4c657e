"""Store throughput against raw numpy files, on real K/V.

K/V are captured from the real pretrained stories260K Llama over GSM8K text (both from ``$KAVA_ASSETS``). The same
bytes are then written and read two ways in this one run, shard by shard:

- baseline: ``np.save`` of each shard's K and V to its own ``.npy`` file, then ``np.load`` back;
- the store: ``KVStore`` shard writers (chunking, blosc-zstd, crc32c per chunk, fsync, marker), then
  ``iter_shards`` with float16 output (no conversion), which reads the chunk files itself (``kvstore/fastread.py``).

The store's read is also compared, in the same run, with maintained readers of the same zarr arrays (each shard's
K and V, whole): zarr-python's own codec pipeline, zarr-python with the Rust pipeline of the ``zarrs`` package, and
``tensorstore``, when those are installed (``null`` otherwise). All of them check the crc32c of a chunk they decode
whole; ``zarrs`` skips it on a partial read of a chunk (its crc32c codec decodes partially without checking), and
all three read a missing chunk as zeros.

Writes are timed with an fsync on both sides (the store fsyncs before its completion marker) and without it for
the baseline too. Reads are timed warm (page cache) and cold (pages of both sides evicted with
``posix_fadvise(DONTNEED)``). Prints one JSON object. Usage::

    KAVA_ASSETS=... python tests/benchmarks/store.py [--samples 1500] [--codec zstd|none] [--readers own,zarr,...]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np


def capture(assets: Path, samples: int) -> tuple[list[np.ndarray], list[np.ndarray], list[np.ndarray]]:
    """Per sample: input ids [T], K and V [T, L, H, D] (fp16, post-RoPE as the cache holds them)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir = assets / "models" / "stories260K_hf_derived"
    tok = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(model_dir, local_files_only=True).eval()
    rows = [json.loads(line) for line in open(assets / "gsm8k" / "train.jsonl")][:samples]
    ids, ks, vs = [], [], []
    with torch.no_grad():
        for row in rows:
            x = tok(row["question"] + "\n" + row["answer"], return_tensors="pt").input_ids[:, :512]
            out = model(x, use_cache=True)
            cache = out.cache if hasattr(out, "cache") else out.past_key_values
            # cache.layers[i].keys: (1, kv_heads, T, head_dim) → (T, L, H, D)
            ks.append(torch.stack([l.keys[0] for l in cache.layers]).permute(2, 0, 1, 3).half().numpy())
            vs.append(torch.stack([l.values[0] for l in cache.layers]).permute(2, 0, 1, 3).half().numpy())
            ids.append(x[0].numpy())
    return ids, ks, vs


def evict(root: Path) -> None:
    for dirpath, _, files in os.walk(root):
        for f in files:
            fd = os.open(os.path.join(dirpath, f), os.O_RDONLY)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            os.close(fd)


def fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    os.fsync(fd)
    os.close(fd)


def other_readers(names: list[str]) -> dict:
    """name → a function reading a whole zarr array (a directory) to numpy, for each reader that is installed."""
    import zarr

    out = {}
    for name in names:
        if name == "zarr":
            def read(path: Path) -> np.ndarray:
                with zarr.config.set({"codec_pipeline.path": "zarr.core.codec_pipeline.BatchedCodecPipeline"}):
                    return zarr.open_array(str(path), mode="r")[...]
        elif name == "zarrs":
            try:
                import zarrs  # noqa: F401
            except ImportError:
                continue

            def read(path: Path) -> np.ndarray:
                with zarr.config.set({"codec_pipeline.path": "zarrs.ZarrsCodecPipeline"}):
                    return zarr.open_array(str(path), mode="r")[...]
        elif name == "tensorstore":
            try:
                import tensorstore as ts
            except ImportError:
                continue

            def read(path: Path, ts=ts) -> np.ndarray:
                spec = {"driver": "zarr3", "kvstore": {"driver": "file", "path": str(path)}}
                return ts.open(spec, read=True).result().read().result()
        else:
            raise SystemExit(f"Expected readers among zarr, zarrs, tensorstore. Got {name!r} instead.")
        out[name] = read
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=1500)
    ap.add_argument("--codec", choices=["zstd", "none"], default="zstd")
    ap.add_argument("--repeats", type=int, default=3, help="timed repetitions; the best is reported")
    ap.add_argument("--readers", default="zarr,zarrs,tensorstore",
                    help="maintained readers to compare with the store's own read (comma-separated; '' for none)")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if not os.environ.get("KAVA_ASSETS"):
        raise SystemExit("Set KAVA_ASSETS to the shared assets folder (GSM8K and stories260K).")
    assets = Path(os.environ["KAVA_ASSETS"])

    from kava.kvstore import (
        DatasetSpec,
        KVStore,
        LayerMap,
        TeacherSpec,
        TokenizerSpec,
        create_store,
        default_storage,
        summary,
    )

    ids, ks, vs = capture(assets, args.samples)
    L, H, D = ks[0].shape[1:]
    logical = sum(k.nbytes + v.nbytes for k, v in zip(ks, vs))
    work = Path(tempfile.mkdtemp(prefix="kava-bench-"))
    results: dict[str, list[float]] = {k: [] for k in
                                       ("np_save", "np_save_fsync", "store_write", "np_load_warm", "store_read_warm",
                                        "np_load_cold", "store_read_cold")}
    readers = other_readers([r for r in args.readers.split(",") if r])
    latencies: list[float] = []
    try:
        for rep in range(args.repeats):
            raw, path = work / f"raw{rep}", work / f"kv{rep}.zarr"
            raw.mkdir()
            store = create_store(
                path, sample_ids=[f"gsm8k/train/{i}" for i in range(len(ids))], input_ids=ids,
                segment_ids=[np.zeros(len(x), np.uint8) for x in ids],
                student_tokenizer=TokenizerSpec("stories260K", "bench", 512),
                dataset=DatasetSpec("gsm8k", "train", "bench"),
            )
            storage = default_storage(L, H, D)
            if args.codec == "none":
                storage = type(storage)(**{**storage.to_dict(), "compressor": {}})
            store.add_teacher(TeacherSpec(
                name="stories260K", model={"id": "stories260K"}, num_layers=L, layers=tuple(range(L)),
                num_heads=8, kv_heads=H, head_dim=D, k_rope="post",
                layer_map=LayerMap("explicit", tuple(((l, 1.0),) for l in range(L))), storage=storage,
            ))
            shards = [store.shard_samples(s) for s in range(store.num_shards)]
            shard_k = [np.concatenate([ks[i] for i in s]) for s in shards]
            shard_v = [np.concatenate([vs[i] for i in s]) for s in shards]

            t = time.perf_counter()
            for s, (k, v) in enumerate(zip(shard_k, shard_v)):
                np.save(raw / f"k{s}.npy", k)
                np.save(raw / f"v{s}.npy", v)
            results["np_save"].append(time.perf_counter() - t)
            t = time.perf_counter()
            for s, (k, v) in enumerate(zip(shard_k, shard_v)):
                np.save(raw / f"k{s}.npy", k)
                np.save(raw / f"v{s}.npy", v)
                fsync_file(raw / f"k{s}.npy")
                fsync_file(raw / f"v{s}.npy")
            results["np_save_fsync"].append(time.perf_counter() - t)

            t = time.perf_counter()
            for s, samples in enumerate(shards):
                with store.shard_writer("stories260K", s) as w:
                    for i in samples:
                        w.add(ks[i], vs[i])
            results["store_write"].append(time.perf_counter() - t)

            reader = KVStore.open(path)
            for mode in ("warm", "cold"):
                if mode == "cold":
                    evict(raw)
                    evict(path)
                t = time.perf_counter()
                for s in range(len(shards)):
                    np.load(raw / f"k{s}.npy")
                    np.load(raw / f"v{s}.npy")
                results[f"np_load_{mode}"].append(time.perf_counter() - t)
                t = time.perf_counter()
                for _ in reader.iter_shards(dtype=np.float16):
                    pass
                results[f"store_read_{mode}"].append(time.perf_counter() - t)
                keys = [path / f"teachers/stories260K/shards/{s:06d}/{a}" for s in range(len(shards)) for a in "kv"]
                for name, read in readers.items():
                    if mode == "cold":
                        evict(path)
                    t = time.perf_counter()
                    got = [read(key) for key in keys]
                    results.setdefault(f"{name}_read_{mode}", []).append(time.perf_counter() - t)
                    assert np.array_equal(got[0], shard_k[0]) and np.array_equal(got[-1], shard_v[-1]), name
            got = reader.read_shard(0, dtype=np.float16).teachers["stories260K"]
            assert np.array_equal(got.k, shard_k[0]) and np.array_equal(got.v, shard_v[0])

            rng = np.random.default_rng(rep)
            fresh = KVStore.open(path)
            for i in rng.integers(0, len(ids), 100):
                t = time.perf_counter()
                fresh.read_sample(int(i), dtype=np.float16)
                latencies.append(time.perf_counter() - t)
            t = time.perf_counter()
            fresh.read_shard(0, layers=[0], dtype=np.float16)
            one_layer = time.perf_counter() - t
            t = time.perf_counter()
            fresh.read_shard(0, dtype=np.float16)
            all_layers = time.perf_counter() - t
            info = summary(fresh)["teachers"]["stories260K"]
    finally:
        shutil.rmtree(work, ignore_errors=True)

    best = {k: min(v) for k, v in results.items()}
    mbps = lambda seconds: round(logical / seconds / 1e6, 1)  # noqa: E731
    print(json.dumps({
        "benchmark": "store",
        "date": dt.date.today().isoformat(),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version()},
        "data": {"model": "stories260K", "text": "GSM8K train", "samples": len(ids),
                 "tokens": int(sum(len(x) for x in ids)), "shards": len(shards), "layers": int(L), "kv_heads": int(H),
                 "head_dim": int(D), "logical_bytes": logical, "codec": args.codec,
                 "chunk": [storage.chunk_tokens, storage.chunk_layers]},
        "MB_per_s": {k: mbps(v) for k, v in best.items()},
        "write_ratio_vs_np_save_fsync": round(best["np_save_fsync"] / best["store_write"], 3),
        "write_ratio_vs_np_save_no_fsync": round(best["np_save"] / best["store_write"], 3),
        "read_ratio_warm": round(best["np_load_warm"] / best["store_read_warm"], 3),
        "read_ratio_cold": round(best["np_load_cold"] / best["store_read_cold"], 3),
        "other_readers_vs_np_load": {
            name: {mode: (round(best[f"np_load_{mode}"] / best[f"{name}_read_{mode}"], 3)
                          if f"{name}_read_{mode}" in best else None) for mode in ("warm", "cold")}
            for name in args.readers.split(",") if name},
        "store_read_vs_other_readers": {
            name: {mode: (round(best[f"{name}_read_{mode}"] / best[f"store_read_{mode}"], 3)
                          if f"{name}_read_{mode}" in best else None) for mode in ("warm", "cold")}
            for name in args.readers.split(",") if name},
        "random_sample_read_ms": {"p50": round(1e3 * statistics.median(latencies), 3),
                                  "p95": round(1e3 * np.percentile(latencies, 95), 3)},
        "layer_subset_read_s": {"one_layer": round(one_layer, 4), "all_layers": round(all_layers, 4)},
        "compression_ratio": round(info["bytes_logical"] / info["bytes_on_disk"], 3),
        "repeats": args.repeats,
    }, indent=2))


if __name__ == "__main__":
    main()
