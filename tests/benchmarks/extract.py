"""Extraction overhead: the extraction loop's wall time ÷ the bare teacher forward passes over the same batches.

A compute-bound CPU teacher (a Llama of ~25M parameters built from a config with a fixed seed, the stories260K
tokenizer from ``$KAVA_ASSETS``) runs over seeded synthetic problems twice in this one process: bare
``model(input_ids, attention_mask)`` forward passes over the batches extraction makes, then ``run_extract`` (capture,
pre-RoPE inversion, alignment, fp16 encoding, blosc-zstd, crc32c, fsync, markers, background writer). Prints one JSON
object. Usage::

    KAVA_ASSETS=... python tests/benchmarks/extract.py [--samples 160] [--batch-size 8]
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
    ap.add_argument("--samples", type=int, default=160)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=8)
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if not os.environ.get("KAVA_ASSETS"):
        raise SystemExit("Set KAVA_ASSETS to the shared assets folder (the stories260K tokenizer).")
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from kava.core.synthetic import synthetic_rows
    from kava.extract.align import token_spans
    from kava.extract.config import ExtractConfig
    from kava.extract.grid import build_grid
    from kava.extract.recipe import run_extract
    from kava.extract.templates import load_template

    work = Path(tempfile.mkdtemp(prefix="kava-bench-extract-"))
    try:
        tok = AutoTokenizer.from_pretrained(Path(os.environ["KAVA_ASSETS"]) / "models" / "stories260K_hf_derived")
        torch.manual_seed(0)
        cfg = LlamaConfig(vocab_size=len(tok), hidden_size=args.hidden, intermediate_size=int(args.hidden * 2.75),
                          num_hidden_layers=args.layers, num_attention_heads=8, num_key_value_heads=4,
                          max_position_embeddings=1024, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
        model = LlamaForCausalLM(cfg).eval()
        params = sum(p.numel() for p in model.parameters())
        model.save_pretrained(work / "teacher")
        tok.save_pretrained(work / "teacher")

        # The bare forward passes, over exactly the batches extraction makes (grid order, same padding).
        grid = build_grid(synthetic_rows(args.samples, seed=0), tok, load_template("plain"), max_length=1024,
                          on_too_long="truncate")
        batches = []
        for b in range(0, len(grid), args.batch_size):
            enc = [token_spans(tok, s.text)[0] for s in grid[b : b + args.batch_size]]
            T = max(len(e) for e in enc)
            ids = torch.zeros(len(enc), T, dtype=torch.long)
            mask = torch.zeros(len(enc), T, dtype=torch.long)
            for i, e in enumerate(enc):
                ids[i, : len(e)] = torch.as_tensor(e)
                mask[i, : len(e)] = 1
            batches.append((ids, mask))
        tokens = sum(int(m.sum()) for _, m in batches)
        def bare_pass() -> float:
            with torch.no_grad():
                t = time.perf_counter()
                for ids, mask in batches:
                    model.model(input_ids=ids, attention_mask=mask, use_cache=False)
                return time.perf_counter() - t

        with torch.no_grad():
            model(*batches[0])  # warm-up
        # Bare passes before and after the extraction: the machine's speed drifts, the mean of the two is the base.
        bare_before = bare_pass()
        result = run_extract(ExtractConfig.from_dict(dict(
            teacher=str(work / "teacher"), store=str(work / "kv.zarr"), limit=args.samples,
            batch_size=args.batch_size, progress=False, calibration_samples=4,
        )), log=lambda m: None)
        bare_after = bare_pass()
        bare = (bare_before + bare_after) / 2
        print(json.dumps({
            "benchmark": "extract",
            "date": dt.date.today().isoformat(),
            "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                        "torch_threads": torch.get_num_threads()},
            "teacher": {"arch": "llama", "params": params, "layers": args.layers, "hidden": args.hidden},
            "samples": args.samples, "tokens": tokens, "batch_size": args.batch_size,
            "bare_forward_s": round(bare, 3),
            "bare_forward_before_after_s": [round(bare_before, 3), round(bare_after, 3)],
            "extract_loop_s": round(result.loop_seconds, 3),
            "overhead_ratio": round(result.loop_seconds / bare, 3),
            "extract_forward_s": round(result.forward_seconds, 3),
            "writer_wait_s": round(result.write_wait_seconds, 3),
            "tokens_per_s": round(tokens / result.loop_seconds, 1),
            "MB_per_s_written_logical": round(result.bytes_logical / result.loop_seconds / 1e6, 2),
            "extract_total_s": round(result.seconds, 3),
        }, indent=2))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
