"""On a CUDA machine: a 4-bit teacher of a real model's geometry extracted, then a few bf16 distillation steps, timed.

The weights are random (no hub here), in the shapes of Qwen2.5-7B / -1.5B (teacher) and Qwen2.5-0.5B (student), with
the real Qwen2 tokenizer from ``$KAVA_ASSETS``, so the timings are those of real-sized models; accuracies mean
nothing. Everything runs through the user's path: ``save_pretrained`` → ``kava extract --load-in-4bit --device cuda``
(bitsandbytes nf4, double quantisation, bf16 compute) → ``kava store info`` → ``kava distill --device cuda`` (bf16
autocast) with the K/V objective and CE-only, each a subprocess. The baseline in the same command is the bare nf4
teacher's decoder stack (no LM head, as extraction runs it without --logit-top-k) over batches of the extraction's
mean length, so "extraction loop ÷ bare forward" is the capture, alignment, encoding and write overhead on a GPU.
Prints one JSON object. Usage::

    KAVA_ASSETS=... python tests/benchmarks/gpu.py [--teacher 7b|1.5b|tiny] [--samples 512] [--steps 30]

``--teacher tiny`` runs the same path on CPU in a minute (without 4-bit), to check the script before a GPU run.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoTokenizer, BitsAndBytesConfig, Qwen2Config, Qwen2ForCausalLM

# Qwen2.5 geometries (hidden, intermediate, layers, heads, kv heads, tied embeddings), from the published configs.
GEOMETRY = {
    "7b": dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
               num_key_value_heads=4, tie_word_embeddings=False),
    "1.5b": dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                 num_key_value_heads=2, tie_word_embeddings=True),
    "0.5b": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                 num_key_value_heads=2, tie_word_embeddings=True),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=2, tie_word_embeddings=True),
}


def build(name: str, tok, out: Path, device: str, seed: int) -> tuple[int, float]:
    """A random Qwen2 of geometry ``name`` saved with ``tok`` to ``out``; returns (parameters, seconds)."""
    start = time.perf_counter()
    torch.manual_seed(seed)
    cfg = Qwen2Config(vocab_size=len(tok), max_position_embeddings=4096, rope_theta=1e6,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                      **GEOMETRY[name])
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # initialise in bf16 on the device: a 7B model in seconds
    try:
        with torch.device(device):
            model = Qwen2ForCausalLM(cfg)
    finally:
        torch.set_default_dtype(default)
    params = sum(p.numel() for p in model.parameters())
    model.save_pretrained(out)
    tok.save_pretrained(out)
    del model
    return params, time.perf_counter() - start


def kava(*args: str, env: dict[str, str]) -> tuple[subprocess.CompletedProcess[str], float]:
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "kava.pipelines.cli", *args], env=env, text=True,
                          capture_output=True)
    seconds = time.perf_counter() - start
    if proc.returncode:
        raise SystemExit(f"kava {args[0]} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc, seconds


def bare_forward(teacher: Path, *, batches: int, batch: int, length: int, vocab: int, device: str,
                 four_bit: bool) -> tuple[float, float]:
    """(load seconds, forward seconds) of the bare teacher over ``batches`` random batches of [batch, length]."""
    start = time.perf_counter()
    kw = {}
    if four_bit:
        kw["quantization_config"] = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                       bnb_4bit_use_double_quant=True,
                                                       bnb_4bit_compute_dtype=torch.bfloat16)
    model = Qwen2ForCausalLM.from_pretrained(teacher, dtype=torch.bfloat16, device_map={"": device}, **kw).eval()
    load = time.perf_counter() - start
    gen = torch.Generator().manual_seed(0)
    ids = [torch.randint(0, vocab, (batch, length), generator=gen).to(device) for _ in range(batches)]
    with torch.inference_mode():
        base = model.model  # extraction without --logit-top-k runs the decoder stack only, no LM head
        base(ids[0], use_cache=False)  # warm-up: kernels, allocator
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        start = time.perf_counter()
        for x in ids:
            base(x, use_cache=False)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
    forward = time.perf_counter() - start
    del model
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    return load, forward


def steady_rate(metrics: Path, warmup: int) -> dict[str, float]:
    rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    steps = [r for r in rows if "tokens_per_s" in r][warmup:]
    rates = [r["tokens_per_s"] for r in steps]
    waits = [r["data_wait_frac"] for r in steps if "data_wait_frac" in r]
    return {"tokens_per_s_median": statistics.median(rates), "steps_timed": len(rates),
            "data_wait_frac_median": statistics.median(waits) if waits else None,
            "first_losses": {k: v for k, v in steps[0].items() if k.startswith("loss/")} if steps else None}


def dump(out: dict[str, object], path: Path | None) -> None:
    if path is not None:
        path.write_text(json.dumps(out, indent=1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--teacher", choices=["7b", "1.5b", "tiny"], default="7b")
    ap.add_argument("--student", choices=["0.5b", "tiny"], default=None)
    ap.add_argument("--samples", type=int, default=512)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--keep", action="store_true", help="Keep the temporary folder (models, store, runs).")
    ap.add_argument("--partial", type=Path, help="Also write the JSON so far to this file after each stage.")
    args = ap.parse_args()
    if not os.environ.get("KAVA_ASSETS"):
        raise SystemExit("Set KAVA_ASSETS to the shared assets folder (the Qwen2 tokenizer).")
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    four_bit = cuda and args.teacher != "tiny"
    student = args.student or ("tiny" if args.teacher == "tiny" else "0.5b")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    work = Path(tempfile.mkdtemp(prefix="kava-bench-gpu-"))
    out: dict[str, object] = {"benchmark": "gpu", "date": dt.date.today().isoformat(), "device": device,
                              "gpu": torch.cuda.get_device_name(0) if cuda else None, "torch": torch.__version__,
                              "teacher_geometry": args.teacher, "student_geometry": student, "nf4": four_bit}
    try:
        tok = AutoTokenizer.from_pretrained(Path(os.environ["KAVA_ASSETS"]) / "tokenizers" / "qwen2")
        params, secs = build(args.teacher, tok, work / "teacher", device, seed=0)
        out["teacher_params"], out["teacher_build_save_s"] = params, round(secs, 1)
        params, secs = build(student, tok, work / "student", device, seed=1)
        out["student_params"], out["student_build_save_s"] = params, round(secs, 1)
        if cuda:
            torch.cuda.empty_cache()
        dump(out, args.partial)

        extract = ["extract", "--teacher", str(work / "teacher"), "--student-tokenizer", str(work / "teacher"),
                   "--dataset", "synthetic", "--limit", str(args.samples), "--batch-size", str(args.batch_size),
                   "--student-layers", str(GEOMETRY[student]["num_hidden_layers"]), "--with-q",
                   "--device", device, "--store", str(work / "kv.zarr"), "--no-progress", "--json"]
        if four_bit:
            extract.append("--load-in-4bit")
        else:
            extract += ["--dtype", "bfloat16" if cuda else "float32"]
        proc, out["extract_wall_s"] = kava(*extract, env=env)
        result = json.loads(proc.stdout)
        out["extract"] = {k: result[k] for k in ("samples", "student_tokens", "seconds", "loop_seconds",
                                                 "forward_seconds", "write_wait_seconds") if k in result}
        info, _ = kava("store", "info", str(work / "kv.zarr"), "--json", env=env)
        summary = json.loads(info.stdout)
        out["store"] = summary
        tokens, samples = int(result["student_tokens"]), int(result["samples"])
        mean_len = max(1, round(tokens / max(samples, 1)))
        batches = -(-samples // args.batch_size)
        load, forward = bare_forward(work / "teacher", batches=batches, batch=args.batch_size, length=mean_len,
                                     vocab=len(tok), device=device, four_bit=four_bit)
        out["teacher_load_s"], out["bare_forward_s"] = round(load, 2), round(forward, 2)
        loop = float(result["loop_seconds"])  # the extraction loop: forward passes, capture, alignment, writes
        out["extract_tokens_per_s"] = round(tokens / loop, 1)
        out["bare_forward_tokens_per_s"] = round(samples * mean_len / forward, 1)
        out["extract_loop_over_bare_forward"] = round(loop / forward, 2)
        dump(out, args.partial)

        for variant, extra in (("kv", []), ("ce", ["--kv-weight", "0"])):
            run = work / f"distill-{variant}"
            _, wall = kava("distill", "--store", str(work / "kv.zarr"), "--student", str(work / "student"),
                           "--out", str(run), "--steps", str(args.steps), "--batch-size", "16",
                           "--device", device, "--log-every", "1", "--no-progress", "--seed", "0", *extra, env=env)
            out[f"distill_{variant}"] = {"wall_s": round(wall, 1), **steady_rate(run / "metrics.jsonl", warmup=5)}
            dump(out, args.partial)
        kv, ce = out["distill_kv"], out["distill_ce"]
        out["kv_over_ce_step_time"] = round(ce["tokens_per_s_median"] / kv["tokens_per_s_median"], 3)
        if cuda:
            out["peak_gpu_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
