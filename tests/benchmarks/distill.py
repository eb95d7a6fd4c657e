"""Distillation costs: K/V overhead per step, time waiting for data, loader throughput. Prints one JSON object.

Everything runs in this one process (the loader's workers aside), against a baseline measured in the same run:

- **KV overhead**: the step time (forward, backward, AdamW) of one student on the same fixed batches with the
  structural loss (K and V cosine plus attention KL, with the capture and the projectors) and with the Mercator
  loss, each ÷ the CE-only step time. The configurations are interleaved batch by batch so drift hits all alike.
- **Data wait**: a real `run_distill` with 2 loader workers; the fraction of step time spent waiting in
  ``next(loader)`` (from metrics.jsonl, first step excluded: it includes spawning the workers).
- **Loader throughput**: one epoch through the in-process loader, in logical MB/s (the stored fp16 K/V/Q bytes of
  the real tokens it delivered), ÷ ``np.load`` of a .npy holding the same number of bytes, warm.

The teacher is the real stories260K from ``$KAVA_ASSETS`` over seeded synthetic problems; the student is a Llama
built from a config with a fixed seed. Usage::

    KAVA_ASSETS=... python tests/benchmarks/distill.py [--samples 240] [--hidden 256] [--layers 6]
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=240)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--reps", type=int, default=6, help="timed passes over the fixed batches per configuration")
    ap.add_argument("--steps", type=int, default=24, help="steps of the data-wait run")
    ap.add_argument("--parts", default="overhead,wait,loader", help="which measurements to run")
    ap.add_argument("--threads", type=int, default=2, help="torch threads of the overhead part")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if not os.environ.get("KAVA_ASSETS"):
        raise SystemExit("Set KAVA_ASSETS to the shared assets folder (the stories260K model).")
    import numpy as np
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from kava.distill.config import DistillConfig
    from kava.distill.loader import StreamLoader
    from kava.distill.module import DistillModule, build_objective
    from kava.distill.optim import make_optimizer
    from kava.distill.run_data import resolve_data
    from kava.distill.student import load_student
    from kava.distill.trainer import run_distill
    from kava.extract.config import ExtractConfig
    from kava.extract.recipe import run_extract

    stories = Path(os.environ["KAVA_ASSETS"]) / "models" / "stories260K_hf_derived"
    work = Path(tempfile.mkdtemp(prefix="kava-bench-distill-"))
    try:
        store = work / "kv.zarr"
        run_extract(ExtractConfig.from_dict(dict(teacher=str(stories), store=str(store), limit=args.samples,
                                                 with_q=True, student_layers=args.layers, shard_tokens=4096,
                                                 progress=False, calibration_samples=0)), log=lambda _: None)
        tok = AutoTokenizer.from_pretrained(stories)
        torch.manual_seed(0)
        config = LlamaConfig(vocab_size=len(tok), hidden_size=args.hidden, intermediate_size=int(args.hidden * 2.75),
                             num_hidden_layers=args.layers, num_attention_heads=8, num_key_value_heads=4,
                             max_position_embeddings=1024)
        LlamaForCausalLM(config).save_pretrained(work / "student")
        tok.save_pretrained(work / "student")
        student_path = str(work / "student")

        parts = set(args.parts.split(","))
        report: dict = {
            "benchmark": "distill",
            "date": dt.date.today().isoformat(),
            "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__},
            "student": {"hidden": args.hidden, "layers": args.layers},
            "batch_size": args.batch_size,
        }

        # 1. K/V overhead on fixed batches.
        variants = {"ce": dict(kv_weight=0.0), "mercator": dict(loss="mercator"), "structural": dict(loss="structural"),
                    "structural_last_layer_attn": dict(loss="structural", attn_layers=str(args.layers - 1))}
        runs = {}
        for name, extra in variants.items():
            cfg = DistillConfig(student=student_path, out=str(work / name), store=str(store),
                                batch_size=args.batch_size, **extra)
            data = resolve_data(cfg, work, lambda _: None)
            student = load_student(student_path, tokenizer=data.tokenizer)
            objective = build_objective(cfg, data, student) if cfg.uses_kv else None
            module = DistillModule(student, objective, cfg)
            runs[name] = (module, make_optimizer(module, cfg), data.loader_config(cfg, rank=0, world_size=1))
        report["student"]["parameters"] = sum(p.numel() for p in runs["ce"][0].student.parameters())
        if "overhead" in parts:
            torch.set_num_threads(args.threads)
            batches = []
            for batch in StreamLoader(runs["structural"][2], epochs=1):
                batches.append(batch)
                if len(batches) == 4:
                    break
            times: dict[str, list[float]] = {name: [] for name in runs}

            def step(name: str, batch) -> float:
                module, opt, _ = runs[name]
                t0 = time.perf_counter()
                loss, _ = module(batch)
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
                return time.perf_counter() - t0

            for name in runs:  # warm-up: allocator, kernels, lazy init
                step(name, batches[0])
            for _ in range(args.reps):
                for batch in batches:
                    for name in runs:
                        times[name].append(step(name, batch))
            ce = statistics.median(times["ce"])
            report["kv_overhead"] = {"threads": args.threads, "ce_step_s": round(ce, 4), "target_ratio": 1.3, **{
                f"{name}_ratio": round(statistics.median(t) / ce, 3) for name, t in times.items() if name != "ce"}}

        # 2. Data wait with 2 workers, in a real run.
        if "wait" in parts:
            result = run_distill(DistillConfig(student=student_path, out=str(work / "wait"), store=str(store),
                                               batch_size=args.batch_size, loss="structural", steps=args.steps,
                                               workers=2, progress=False, checkpoint_every=0), log=lambda _: None)
            rows = [json.loads(line) for line in (work / "wait" / "metrics.jsonl").read_text().splitlines()]
            wait_frac = sum(r["data_wait_s"] for r in rows[1:]) / sum(r["step_s"] for r in rows[1:])
            report["data_wait"] = {"workers": 2, "fraction": round(wait_frac, 4), "target": 0.05,
                                   "steps": result.steps,
                                   "fraction_incl_first_step": round(result.data_wait_fraction, 4)}

        # 3. Loader throughput vs np.load of the same bytes.
        if "loader" in parts:
            t0 = time.perf_counter()
            logical = 0
            for batch in StreamLoader(runs["structural"][2], epochs=1):
                real = int(batch.attention_mask.sum())
                for tb in batch.teachers.values():
                    # elements per token: K and V [L, H, D] each, Q [Lq, Hq, D]
                    per_token = 2 * tb.k[0, :, :, 0].numel() + (tb.q[0, :, :, 0].numel() if tb.q is not None else 0)
                    logical += real * per_token * 2  # fp16 bytes, as stored
            loader_s = time.perf_counter() - t0
            blob = work / "same-bytes.npy"
            np.save(blob, np.zeros(logical // 2, dtype=np.float16))
            np.load(blob)  # warm the page cache, as the store's chunks are warm
            t0 = time.perf_counter()
            np.load(blob)
            npload_s = time.perf_counter() - t0
            report["loader"] = {"logical_mb": round(logical / 1e6, 1), "mb_per_s": round(logical / 1e6 / loader_s, 1),
                                "np_load_mb_per_s": round(logical / 1e6 / npload_s, 1),
                                "ratio_to_np_load": round(npload_s / loader_s, 3)}
        print(json.dumps(report, indent=2))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
