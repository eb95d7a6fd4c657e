"""Eval speed: `kava eval`'s generation loop against plain ``model.generate`` on the same model, prompts and batches.

For each model (a Llama built from a config with a fixed seed and saved/loaded through ``from_pretrained``, and the
real pretrained stories260K from ``$KAVA_ASSETS``), seeded synthetic test problems are turned into prompts exactly as
``kava eval`` does (``prompt_text``, tokenized with special tokens, sorted longest first, left-padded) and generated
three ways, interleaved over ``--reps`` repetitions (the median time of each is kept):

- **kava**: ``kava.distill.evaluate.generate_with_stops``, the loop behind ``kava eval`` (greedy, the stop-at-answer
  check, EOS and terminator handling, decoding and cutting of every row).
- **plain**: ``model.generate(do_sample=False)`` on the same batches with no stop criterion at all, run for exactly
  as many steps as kava ran on each batch (kava stops a batch once every row has finished), so both do the same
  model work.
- **eos**: ``model.generate(do_sample=False)`` with only the EOS stop and ``--max-new-tokens``.

Tokens are counted fairly as decoding steps × rows, from the model's own forward calls (a hook counts them):
a row that has finished still costs its batch a step. Prints one JSON object with tokens/s of each and the ratios.
Usage::

    KAVA_ASSETS=... python tests/benchmarks/eval.py [--samples 64] [--batch-size 16] [--max-new-tokens 96]
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
from typing import Any


def time_model(path: Path, prompts: list[str], template: Any, args: argparse.Namespace) -> dict[str, Any]:
    """The three ways of generating, timed on the model at ``path``: one entry of the report's ``models``."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    from kava.core.padding import left_pad
    from kava.distill.evaluate import eos_ids, generate_with_stops

    model = AutoModelForCausalLM.from_pretrained(path).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    eos = eos_ids(model, tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos[0]
    # The batches generate_with_stops makes: tokenized with special tokens, longest first, left-padded.
    encoded = [tokenizer(p, add_special_tokens=True)["input_ids"] for p in prompts]
    order = sorted(range(len(prompts)), key=lambda i: -len(encoded[i]))
    batches = [left_pad([encoded[i] for i in order[s : s + args.batch_size]], pad)
               for s in range(0, len(order), args.batch_size)]

    calls: list[tuple[int, int]] = []  # (rows, input width) of each forward call: one per decoding step

    def count(_module, _args, kwargs):
        calls.append(tuple(kwargs["input_ids"].shape))

    model.register_forward_pre_hook(count, with_kwargs=True)

    def steps_of(rows_widths: list[tuple[int, int]]) -> list[int]:
        """Forward calls per batch: a batch's first call reads its whole prompt (width > 1), later ones the
        newest token only."""
        out: list[int] = []
        for _, width in rows_widths:
            if width > 1 or not out:
                out.append(0)
            out[-1] += 1
        return out

    def kava() -> tuple[float, list[tuple[int, int]]]:
        calls.clear()
        t0 = time.perf_counter()
        out = generate_with_stops(model, tokenizer, prompts, batch_size=args.batch_size,
                                  max_new_tokens=args.max_new_tokens, terminator=template.terminator)
        seconds = time.perf_counter() - t0
        kava_out[:] = out
        return seconds, list(calls)

    def generate(steps_per_batch: list[int] | None) -> tuple[float, list[tuple[int, int]]]:
        calls.clear()
        t0 = time.perf_counter()
        for b, (ids, mask) in enumerate(batches):
            if steps_per_batch is None:  # the EOS stop only
                config = GenerationConfig(max_new_tokens=args.max_new_tokens, do_sample=False, num_beams=1,
                                          pad_token_id=pad, eos_token_id=eos)
            else:  # no stop criterion: exactly kava's number of steps on this batch
                config = GenerationConfig(max_new_tokens=steps_per_batch[b], do_sample=False, num_beams=1,
                                          pad_token_id=pad, eos_token_id=None)
            with torch.no_grad():
                model.generate(input_ids=ids, attention_mask=mask, generation_config=config)
        return time.perf_counter() - t0, list(calls)

    kava_out: list[tuple[str, int, str]] = []
    _, rows_widths = kava()  # warm-up, and the steps kava runs on each batch (greedy: the same each time)
    steps_per_batch = steps_of(rows_widths)
    assert len(steps_per_batch) == len(batches), (steps_per_batch, len(batches))
    generate(steps_per_batch)  # warm-up
    generate(None)
    times: dict[str, list[float]] = {"kava": [], "plain": [], "eos": []}
    row_steps: dict[str, int] = {}
    for rep in range(args.reps):
        for variant in (("kava", "plain", "eos") if rep % 2 == 0 else ("eos", "plain", "kava")):
            if variant == "kava":
                seconds, rows = kava()
            else:
                seconds, rows = generate(steps_per_batch if variant == "plain" else None)
            times[variant].append(seconds)
            row_steps[variant] = sum(r for r, _ in rows)
            if variant == "plain":
                assert steps_of(rows) == steps_per_batch  # the same model work as kava's
    tps = {v: row_steps[v] / statistics.median(t) for v, t in times.items()}
    return {
        "parameters": sum(p.numel() for p in model.parameters()),
        "row_steps": row_steps,
        "seconds": {v: round(statistics.median(t), 3) for v, t in times.items()},
        "tokens_per_s": {v: round(x, 1) for v, x in tps.items()},
        "kava_steps_per_batch": steps_per_batch,
        "kava_counted_tokens": sum(n for _, n, _ in kava_out),  # up to each row's own stop
        "kava_stops": {s: sum(why == s for _, _, why in kava_out) for s in ("answer", "eos", "budget")},
        "ratio_kava_to_plain": round(tps["kava"] / tps["plain"], 3),
        "ratio_kava_to_eos": round(tps["kava"] / tps["eos"], 3),
        "target_ratio": 0.9,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--max-new-tokens", type=int, default=96)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--models", default="config,stories260K", help="which models to time")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if not os.environ.get("KAVA_ASSETS"):
        raise SystemExit("Set KAVA_ASSETS to the shared assets folder (the stories260K model).")
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from kava.core.synthetic import synthetic_rows
    from kava.distill.evaluate import prompt_text
    from kava.extract.templates import TEMPLATES

    torch.set_num_threads(args.threads)
    stories = Path(os.environ["KAVA_ASSETS"]) / "models" / "stories260K_hf_derived"
    template = TEMPLATES["plain"]
    work = Path(tempfile.mkdtemp(prefix="kava-bench-eval-"))
    try:
        tok = AutoTokenizer.from_pretrained(stories)
        paths = {"stories260K": stories}
        if "config" in args.models.split(","):
            torch.manual_seed(0)
            config = LlamaConfig(vocab_size=len(tok), hidden_size=args.hidden,
                                 intermediate_size=int(args.hidden * 2.75), num_hidden_layers=args.layers,
                                 num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=1024,
                                 bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
            LlamaForCausalLM(config).save_pretrained(work / "config")
            tok.save_pretrained(work / "config")
            paths["config"] = work / "config"
        prompts = [prompt_text(row, template) for row in synthetic_rows(args.samples, seed=0, split="test")]

        report: dict = {
            "benchmark": "eval",
            "date": dt.date.today().isoformat(),
            "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
                        "threads": args.threads},
            "samples": args.samples, "batch_size": args.batch_size, "max_new_tokens": args.max_new_tokens,
            "models": {},
        }
        for name in args.models.split(","):
            report["models"][name] = time_model(paths[name], prompts, template, args)
        print(json.dumps(report, indent=2))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
