"""Benchmark: tokenizer alignment throughput on GSM8K with two real tokenizers, on one core.

Spans are precomputed (tokenizing is not what is timed); the timed loop is ``align_tokens`` over every item,
repeated ``--repeats`` times, best run reported. The dense ``O(T_s * T_t)`` reference runs on every
``--dense-every``-th item for the speedup ratio. Prints one JSON object.

    KAVA_ASSETS=../shared/assets python tests/benchmarks/align.py [--student qwen2] [--teacher llama2] [--split train]

Not a test: pytest collects only ``test_*.py``.
"""

from __future__ import annotations

import os

# One thread everywhere, set before numpy/torch load their thread pools.
for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMEXPR_NUM_THREADS"):
    os.environ[_var] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import argparse  # noqa: E402
import datetime  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
from transformers import AutoTokenizer  # noqa: E402

from kava.extract.align import align_dense_reference, align_tokens, token_spans  # noqa: E402

TOKENIZERS = {
    "gpt2": "tokenizers/gpt2",
    "qwen2": "tokenizers/qwen2",
    "llama2": "tokenizers/llama2",
    "stories260k": "models/stories260K_hf_derived",
}


def _parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--student", choices=sorted(TOKENIZERS), default="qwen2")
    p.add_argument("--teacher", choices=sorted(TOKENIZERS), default="llama2")
    p.add_argument("--split", choices=["train", "test"], default="train", help="GSM8K split")
    p.add_argument("--repeats", type=int, default=3, help="timed passes over all items; the best is reported")
    p.add_argument("--dense-every", type=int, default=10, help="run the dense reference on every N-th item")
    p.add_argument("--cpu", type=int, default=None, help="core to pin to (default: the first allowed one)")
    args = p.parse_args()
    if args.repeats < 1 or args.dense_every < 1:
        p.error("--repeats and --dense-every must be >= 1")
    return args


def _timed_runs(repeats: int, fn: Callable[[np.ndarray, np.ndarray], object], pairs: list) -> list[float]:
    """Seconds of each of ``repeats`` passes of ``fn(student_spans, teacher_spans)`` over ``pairs``."""
    runs = []
    for _ in range(repeats):
        start = time.perf_counter()
        for s, t in pairs:
            fn(s, t)
        runs.append(time.perf_counter() - start)
    return runs


def _best_of(repeats: int, fn: Callable[[np.ndarray, np.ndarray], object], pairs: list) -> float:
    return min(_timed_runs(repeats, fn, pairs))


def main() -> None:
    args = _parse_args()
    root = os.environ.get("KAVA_ASSETS")
    if not root:
        sys.exit("KAVA_ASSETS is unset. Set it to the shared assets folder (e.g. KAVA_ASSETS=../shared/assets).")
    root_path = Path(root).expanduser().resolve()

    # Pin the process to one core so the number is per core, whatever else runs on the machine.
    cpu = args.cpu if args.cpu is not None else min(os.sched_getaffinity(0))
    os.sched_setaffinity(0, {cpu})
    torch.set_num_threads(1)

    with (root_path / "gsm8k" / f"{args.split}.jsonl").open() as f:
        texts = [r["question"] + "\n" + r["answer"] for r in map(json.loads, f)]
    student_tok = AutoTokenizer.from_pretrained(root_path / TOKENIZERS[args.student], local_files_only=True)
    teacher_tok = AutoTokenizer.from_pretrained(root_path / TOKENIZERS[args.teacher], local_files_only=True)
    student_spans = [token_spans(student_tok, t)[1] for t in texts]
    teacher_spans = [token_spans(teacher_tok, t)[1] for t in texts]
    pairs = list(zip(student_spans, teacher_spans))
    student_tokens = sum(len(s) for s in student_spans)

    align_tokens(*pairs[0])  # warm-up: first-call import and allocation costs
    runs = _timed_runs(args.repeats, align_tokens, pairs)
    seconds = min(runs)

    # The speedup compares both on the same subset, each the best of --repeats passes.
    subset = pairs[:: args.dense_every]
    subset_tokens = sum(len(s) for s, _ in subset)
    dense_seconds = _best_of(args.repeats, align_dense_reference, subset)
    sparse_subset_seconds = _best_of(args.repeats, align_tokens, subset)

    result = {
        "benchmark": "kava.extract.align.align_tokens",
        "split": args.split,
        "items": len(pairs),
        "student": args.student,
        "teacher": args.teacher,
        "student_tokens": student_tokens,
        "teacher_tokens": sum(len(t) for t in teacher_spans),
        "seconds": round(seconds, 4),
        "seconds_all_runs": [round(r, 4) for r in runs],
        "tokens_per_s": round(student_tokens / seconds),
        "dense_subset_items": len(subset),
        "dense_subset_student_tokens": subset_tokens,
        "dense_tokens_per_s": round(subset_tokens / dense_seconds),
        "sparse_subset_tokens_per_s": round(subset_tokens / sparse_subset_seconds),
        "speedup_vs_dense": round(dense_seconds / sparse_subset_seconds, 2),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(),
            "pinned_cpu": cpu,
            "python": platform.python_version(),
            "numpy": np.__version__,
        },
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
