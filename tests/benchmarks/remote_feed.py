"""The distill loader's feed rate from a store on object storage against the same store on local disk. Prints one
JSON object.

A synthetic teacher's store (``--layers`` x ``--kv-heads`` x ``--head-dim``, float16, blosc-zstd as extraction stores
it; random values, which compress like real K/V barely do) is written to a temporary directory, then copied with
``copy_store`` into a bucket of a local S3 API server (moto's server mode, ``tests/object_storage.py``), read
directly or through a proxy (a process of its own) that holds each request ``--delays-ms`` (a remote object store's
round trip). Measured in this one
command, best of ``--repeats``, local and remote interleaved so that drift on a shared machine hits both alike:

- **loader**: one epoch of ``StreamLoader`` (``num_workers=0``; its windows of ``--buffer-shards`` shards read one
  window ahead on a thread, every chunk request of a window in flight together);
- **iter_shards**: ``KVStore.iter_shards`` (float16, no conversion) at its read-ahead: 1 shard on local disk,
  ``remote.READ_AHEAD`` shards, each on its own thread, on object storage.

Feed rate = logical K/V bytes of the tokens delivered / seconds, and tokens / second. Usage::

    python tests/benchmarks/remote_feed.py [--shards 8] [--shard-tokens 2048] [--delays-ms 0,20] [--repeats 3]
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

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: object_storage

BUCKET = "kava-bench"


def build_store(path: Path, args: argparse.Namespace) -> int:
    """The synthetic store at ``path``; returns its logical K/V bytes per token."""
    import numpy as np

    from kava.kvstore import (
        DatasetSpec,
        LayerMap,
        TeacherSpec,
        TokenizerSpec,
        create_store,
        default_storage,
    )

    rng = np.random.default_rng(0)
    per_sample = 256
    samples = args.shards * args.shard_tokens // per_sample
    store = create_store(
        path, sample_ids=[f"s{i}" for i in range(samples)],
        input_ids=[rng.integers(0, 1000, per_sample) for _ in range(samples)],
        segment_ids=[np.zeros(per_sample, int) for _ in range(samples)],
        student_tokenizer=TokenizerSpec(name="synthetic", fingerprint="e" * 64, vocab_size=1000),
        dataset=DatasetSpec(name="synthetic", split="bench", fingerprint="f" * 64), shard_tokens=args.shard_tokens,
    )
    layers, heads, dim = args.layers, args.kv_heads, args.head_dim
    store.add_teacher(TeacherSpec(
        name="t", model={"id": "synthetic"}, num_layers=layers, layers=tuple(range(layers)), num_heads=heads,
        kv_heads=heads, head_dim=dim, layer_map=LayerMap("proportional", tuple(((i, 1.0),) for i in range(layers))),
        storage=default_storage(layers, heads, dim),
    ))
    for s in range(store.num_shards):
        w = store.shard_writer("t", s)
        for i in store.shard_samples(s):
            kv = rng.standard_normal((2, per_sample, layers, heads, dim)).astype(np.float16)
            w.add(kv[0], kv[1], sample=i)
        w.close()
    return 2 * layers * heads * dim * 2  # K and V, float16


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shards", type=int, default=8)
    ap.add_argument("--shard-tokens", type=int, default=2048)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--kv-heads", type=int, default=4)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--buffer-shards", type=int, default=4)
    ap.add_argument("--delays-ms", default="0,20", help="request delays of the proxy in front of the server")
    ap.add_argument("--repeats", type=int, default=3, help="timed repetitions; the best is reported")
    args = ap.parse_args()
    import numpy as np
    import torch
    from object_storage import s3_server, serve_proxy

    from kava.distill.loader import LoaderConfig, StreamLoader, TeacherRequest
    from kava.kvstore import KVStore, remote
    from kava.kvstore.create import copy_store

    work = Path(tempfile.mkdtemp(prefix="kava-bench-remote-"))
    try:
        local = work / "kv.zarr"
        per_token = build_store(local, args)
        with s3_server(work, BUCKET) as (aws, _):
            os.environ.update(aws)
            url = f"s3://{BUCKET}/kv.zarr"
            copy_store(local, url)
            tokens_total = KVStore.open(local).num_tokens
            logical = tokens_total * per_token

            def loader_epoch(store: str) -> float:
                config = LoaderConfig(store, teachers=(TeacherRequest("t"),), batch_size=args.batch_size,
                                      buffer_shards=args.buffer_shards, seed=0)
                t0 = time.perf_counter()
                tokens = sum(int(b.attention_mask.sum()) for b in StreamLoader(config, epochs=1))
                assert tokens == tokens_total, (tokens, tokens_total)
                return time.perf_counter() - t0

            def shards_read(store: str) -> float:
                t0 = time.perf_counter()
                for _ in KVStore.open(store).iter_shards(teachers=["t"], dtype=np.float16):  # its default read-ahead
                    pass
                return time.perf_counter() - t0

            def rates(seconds: list[float]) -> dict[str, float]:
                best = min(seconds)
                return {"mb_per_s": round(logical / best / 1e6, 1), "tokens_per_s": round(tokens_total / best),
                        "runs_s": [round(s, 3) for s in seconds]}

            server = aws["AWS_ENDPOINT_URL"]
            rows = []
            for delay_ms in (float(d) for d in args.delays_ms.split(",")):
                # A delay puts a proxy (a process of its own) between this process and the server; 0 goes direct.
                proxy, port = serve_proxy(int(server.rsplit(":", 1)[1]), delay_ms / 1e3) if delay_ms else (None, 0)
                os.environ["AWS_ENDPOINT_URL"] = f"http://127.0.0.1:{port}" if proxy else server
                loader_epoch(str(local))  # warm: page cache, connections, imports
                loader_epoch(url)
                timed: dict[str, list[float]] = {k: [] for k in ("loader_local", "loader_remote", "shards_local",
                                                                 "shards_remote")}
                for _ in range(args.repeats):
                    timed["loader_local"].append(loader_epoch(str(local)))
                    timed["loader_remote"].append(loader_epoch(url))
                    timed["shards_local"].append(shards_read(str(local)))
                    timed["shards_remote"].append(shards_read(url))
                if proxy is not None:
                    proxy.terminate()
                    proxy.wait()
                rows.append({
                    "delay_ms": delay_ms,
                    **{k: rates(v) for k, v in timed.items()},
                    "loader_remote_vs_local": round(min(timed["loader_local"]) / min(timed["loader_remote"]), 3),
                    "shards_remote_vs_local": round(min(timed["shards_local"]) / min(timed["shards_remote"]), 3),
                })
        print(json.dumps({
            "benchmark": "remote_feed",
            "date": dt.date.today().isoformat(),
            "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
                        "load_average": [round(x, 1) for x in os.getloadavg()]},
            "data": {"shards": args.shards, "tokens": tokens_total, "layers": args.layers, "kv_heads": args.kv_heads,
                     "head_dim": args.head_dim, "bytes_per_token": per_token, "logical_mb": round(logical / 1e6, 1),
                     "batch_size": args.batch_size, "buffer_shards": args.buffer_shards},
            "read_ahead": {"remote": remote.READ_AHEAD, "local": 1},
            "repeats": args.repeats,
            "runs": rows,
        }, indent=2))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
