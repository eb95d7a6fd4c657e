"""Eviction rules for a compressed teacher cache: fidelity and bytes per original token, per rule and budget. Prints
one JSON object.

Two teachers: the real stories260K Llama (``$KAVA_ASSETS``; 5 layers, 4 KV heads x 8, Q on 8 heads) over real
GSM8K test problems, each as ``Question: ... Answer: <solution> #### N``: the prompt, the reasoning (the solution)
and the answer (``#### N``). Keys, values and queries are captured after RoPE, as the teacher's cache holds them.
Each rule keeps ``budget`` of the reasoning tokens per (layer, KV head), prompt and answer whole; the observation
window is the answer's queries (what R-KV scores importance by). And a random Llama of a 7B teacher's attention
geometry (4 KV heads x 128, 28 query heads, 2 layers) over random ids of the same lengths: its bytes are the
geometry's, its fidelity a random model's.

- **fidelity**: the relative L2 error of the answer queries' attention output when each head reads only its kept
  cache, against the full cache, per layer, averaged over problems (0 = nothing lost).
- **bytes per original token**: K and V of the kept tokens in float16, int8 or int4 (per-group scales and zeros
  counted as the codecs store them, approximately), plus a 2-byte position per kept (token, layer, head), over all
  tokens of the input: what a compressed store would hold per token the teacher read.

Usage::

    KAVA_ASSETS=... python tests/benchmarks/evict.py [--samples 64] [--max-length 256]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import tempfile
import time
from pathlib import Path

RULES = ("r-kv", "attention", "streaming", "random")
BUDGETS = (1.0, 0.5, 0.25, 0.1)
BYTES_PER_VALUE = {"float16": 2.0, "int8": 1.0 + 2 / 8, "int4": 0.5 + 4 / 32}
"""Stored bytes per K/V value, scales and zeros included (int8: one fp16 scale per (token, layer, head) of 8
channels here; int4: an fp16 scale and zero per 32 values, the codecs' default groups)."""


def measure(model, problems: list[list[list[int]]]) -> dict:
    """Fidelity per rule and budget, kept shares and bytes per original token for ``model`` over ``problems``
    (each ``[prompt ids, reasoning ids, answer ids]``)."""
    import torch

    from kava.extract import evict
    from kava.extract.capture import capture_qkv

    t0 = time.perf_counter()
    errors: dict[str, dict[float, list[list[float]]]] = {r: {b: [] for b in BUDGETS} for r in RULES}
    kept_share: dict[float, list[float]] = {b: [] for b in BUDGETS}
    for ids in problems:
        seq = torch.tensor([sum(ids, [])])
        t = seq.shape[1]
        segment = torch.zeros(t, dtype=torch.bool)
        segment[len(ids[0]) : len(ids[0]) + len(ids[1])] = True
        query_at = torch.arange(t - len(ids[2]), t)
        cap = capture_qkv(model, seq, with_q=True, k_rope="post")
        for budget in BUDGETS:
            kept_share[budget].append(1 - (len(ids[1]) - evict.keep_count(len(ids[1]), budget)) / t)
        for rule in RULES:
            for budget in BUDGETS:
                per_layer = []
                for layer in sorted(cap.keys):
                    k, v = cap.keys[layer][0], cap.values[layer][0]
                    q, scale = cap.queries[layer][0][:, query_at], cap.scaling[layer]
                    kept = evict.keep(rule, k, segment, budget, queries=q, query_at=query_at, scale=scale)
                    per_layer.append(float(evict.fidelity(k, v, q, query_at, kept, scale=scale).mean()))
                errors[rule][budget].append(per_layer)
    cfg = model.config
    layers, heads, dim = cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.hidden_size // cfg.num_attention_heads

    def per_token(dtype: str, share: float) -> float:
        values = 2 * layers * heads * dim * BYTES_PER_VALUE[dtype]
        positions = 2 * layers * heads if share < 1 else 0
        return share * (values + positions)

    return {
        "problems": len(problems),
        "geometry": {"layers": layers, "kv_heads": heads, "head_dim": dim},
        "seconds": round(time.perf_counter() - t0, 1),
        "fidelity_relative_l2": {
            rule: {str(b): {"mean": round(sum(map(sum, e)) / sum(map(len, e)), 4),
                            "per_layer": [round(sum(x[i] for x in e) / len(e), 4) for i in range(layers)]}
                   for b, e in by_budget.items()}
            for rule, by_budget in errors.items()},
        "kept_share_of_all_tokens": {str(b): round(sum(s) / len(s), 3) for b, s in kept_share.items()},
        "bytes_per_original_token": {
            dtype: {str(b): round(per_token(dtype, sum(s) / len(s)), 1) for b, s in kept_share.items()}
            for dtype in BYTES_PER_VALUE},
        "float16_whole_bytes_per_token": per_token("float16", 1.0),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=64)
    ap.add_argument("--max-length", type=int, default=256)
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if not os.environ.get("KAVA_ASSETS"):
        raise SystemExit("Set KAVA_ASSETS to the shared assets folder (the stories260K model, GSM8K).")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    assets = Path(os.environ["KAVA_ASSETS"])
    stories = assets / "models" / "stories260K_hf_derived"
    model = AutoModelForCausalLM.from_pretrained(stories).eval()
    tok = AutoTokenizer.from_pretrained(stories)
    rows = [json.loads(line) for line in (assets / "gsm8k" / "test.jsonl").read_text().splitlines()[: args.samples]]
    problems = []
    for row in rows:
        solution, _, final = row["answer"].rpartition("####")
        parts = [f"Question: {row['question']}\nAnswer: ", solution, f"#### {final.strip()}"]
        ids = [tok(p, add_special_tokens=False)["input_ids"] for p in parts]
        room = args.max_length - len(ids[0]) - len(ids[2])
        if room >= 8:
            problems.append([ids[0], ids[1][:room], ids[2]])
    report = {"benchmark": "evict", "date": dt.date.today().isoformat(), "max_length": args.max_length,
              "stories260k": measure(model, problems)}

    # A random Llama with a 7B teacher's attention geometry (4 KV heads x 128, 28 query heads; 2 layers), loaded
    # through from_pretrained, over random ids shaped like the GSM8K inputs above. Its attention is a random
    # model's: the fidelity figures say little about a trained 7B; the bytes are the geometry's.
    g = torch.Generator().manual_seed(0)
    config = LlamaConfig(hidden_size=3584, num_attention_heads=28, num_key_value_heads=4, num_hidden_layers=2,
                         intermediate_size=1024, vocab_size=1000, max_position_embeddings=4096)
    with tempfile.TemporaryDirectory() as tmp:
        LlamaForCausalLM(config).save_pretrained(tmp)
        big = AutoModelForCausalLM.from_pretrained(tmp).eval()
    shaped = [[torch.randint(3, 1000, (len(part),), generator=g).tolist() for part in ids] for ids in problems[:16]]
    report["7b_shaped"] = measure(big, shaped)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
