"""Storage codecs: bytes against float16 and per-layer cosine to the float16 values, per codec. Prints one JSON object.

Two teachers:

- ``stories260k``: the real pretrained stories260K Llama (``$KAVA_ASSETS``; 5 layers, 4 KV heads x 8, Q on 8
  heads) over GSM8K text, extracted for real with ``kava extract`` once per storage dtype into one store (pre-RoPE
  keys, Q stored). Bytes are the store's own (``kava store info``: logical and on disk); cosines are of each
  teacher's decoded K/V/Q against the float16 teacher's, per stored layer, over non-zero (token, head) rows.
- ``7b_shaped``: a config-built random Llama with a 7B teacher's attention geometry (4 KV heads x 128, 28 query
  heads; 2 layers instead of 28: per-layer figures don't depend on depth) over random token ids, K/V/Q captured
  pre-RoPE. Bytes come from the encoded arrays (logical) and their blosc-zstd encoding (on disk, as the store
  writes them); the ratio does not depend on the layer count.

For each teacher the alternatives the format decided against are measured in memory on the same values:
symmetric absmax codes, keys grouped per token, queries per token, key groups of 32/64/128 tokens, and a low-rank
codec (a per-layer PCA basis of the K/V rows, float16 coefficients, at the rank that takes int4's bytes).

Usage::

    KAVA_ASSETS=... python tests/benchmarks/codecs.py [--samples 200] [--tokens 2048]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np

DTYPES = ("float16", "bfloat16", "int8", "int4", "int2")


def layer_cos(x: np.ndarray, y: np.ndarray) -> list[float]:
    from kava.kvstore import codecs

    c, n = codecs.cosine_rows(x, y)
    return [round(float(a / max(b, 1)), 5) for a, b in zip(c, n)]


def blosc_bytes(arrays: dict[str, np.ndarray]) -> int:
    from numcodecs import Blosc

    from kava.kvstore import codecs

    conf = codecs.DEFAULT_COMPRESSOR["configuration"]
    total = 0
    for a in arrays.values():
        b = Blosc(cname=conf["cname"], clevel=conf["clevel"], shuffle=Blosc.SHUFFLE, blocksize=conf["blocksize"],
                  typesize=a.dtype.itemsize)
        total += len(b.encode(np.ascontiguousarray(a).tobytes()))
    return total


def lowrank(x: np.ndarray, rank: int) -> np.ndarray:
    """Per layer: project the ``[T*H, D]`` rows on their top-``rank`` PCA basis (float16 coefficients), back."""
    out = np.empty_like(x)
    for l in range(x.shape[1]):
        rows = x[:, l].reshape(-1, x.shape[-1])
        mean = rows.mean(0)
        _, _, vt = np.linalg.svd(rows[:: max(1, len(rows) // 20000)] - mean, full_matrices=False)
        basis = vt[:rank]  # [r, D]
        coef = ((rows - mean) @ basis.T).astype(np.float16).astype(np.float32)
        out[:, l] = (coef @ basis + mean).reshape(x[:, l].shape)
    return out


def alternatives(k: np.ndarray, v: np.ndarray, q: np.ndarray | None) -> dict:
    """Cosine (mean over layers) and logical bytes/float16 of the choices the format did not make, in memory."""
    from kava.kvstore import codecs

    D = k.shape[-1]
    gc = codecs.group_channels_for(D)

    def run(x, bits, per_channel, group, symmetric=False):
        g = min(group, D) if not per_channel else group
        p, s, z = codecs.quantize_lowbit(x, bits, per_channel=per_channel, group=g, symmetric=symmetric)
        y = codecs.dequantize_np(p, s, z, f"int{bits}", per_channel=per_channel, group=g)
        size = (p.nbytes + s.nbytes + z.nbytes) / (x.size * 2)
        return round(float(np.mean(layer_cos(x, y))), 5), round(size, 4)

    out: dict = {}
    for bits in (4, 2):
        r = out[f"int{bits}"] = {}
        r["k_per_channel_G64_asym (chosen)"] = run(k, bits, True, 64)
        r["k_per_channel_G64_sym"] = run(k, bits, True, 64, True)
        r["k_per_channel_G32"] = run(k, bits, True, 32)
        r["k_per_channel_G128"] = run(k, bits, True, 128)
        r["k_per_token"] = run(k, bits, False, gc)
        r["v_per_token_asym (chosen)"] = run(v, bits, False, gc)
        r["v_per_token_sym"] = run(v, bits, False, gc, True)
        r["v_per_channel_G64"] = run(v, bits, True, 64)
        if q is not None:
            r["q_per_channel_G64 (chosen)"] = run(q, bits, True, 64)
            r["q_per_token"] = run(q, bits, False, gc)
        r["_format"] = "[mean per-layer cosine to float16, logical bytes / float16]"
    # Low rank at int4's size: int4 keys take (D/2 + 4D/64) bytes a row, so r = that / 2 float16 coefficients
    # (the basis itself, D x r per layer, is free at scale). Same for values.
    r4 = max(1, int(round((D / 2 + 4 * D / 64) / 2)))
    out["lowrank_at_int4_size"] = {
        "rank": r4, "head_dim": D,
        "k_cos": round(float(np.mean(layer_cos(k, lowrank(k, r4)))), 5),
        "v_cos": round(float(np.mean(layer_cos(v, lowrank(v, r4)))), 5),
        "int4_k_cos": out["int4"]["k_per_channel_G64_asym (chosen)"][0],
        "int4_v_cos": out["int4"]["v_per_token_asym (chosen)"][0],
    }
    return out


def stories(assets: Path, samples: int, work: Path) -> dict:
    from kava.extract.config import ExtractConfig
    from kava.extract.recipe import run_extract
    from kava.kvstore import KVStore, summary

    path = work / "kv.zarr"
    model = assets / "models" / "stories260K_hf_derived"
    seconds = {}
    for dtype in DTYPES:
        t = time.perf_counter()
        run_extract(ExtractConfig.from_dict(dict(
            teacher=str(model), store=str(path), name=dtype, kv_dtype=dtype, with_q=True, dataset="gsm8k",
            data_files=str(assets / "gsm8k" / "train.jsonl"), limit=samples, progress=False,
            calibration_samples=0)), log=lambda _: None)
        seconds[dtype] = round(time.perf_counter() - t, 2)
    store = KVStore.open(path)
    info = summary(store)["teachers"]
    arrays = {d: {a: [] for a in "kvq"} for d in DTYPES}
    for shard in range(store.num_shards):
        rows = store.read_shard(shard, with_q=True)
        for d in DTYPES:
            for a in "kvq":
                arrays[d][a].append(getattr(rows.teachers[d], a))
    arrays = {d: {a: np.concatenate(x) for a, x in per.items()} for d, per in arrays.items()}
    ref = arrays["float16"]
    fp16_logical = info["float16"]["bytes_float16"]
    fp16_disk = info["float16"]["bytes_on_disk"]
    codecs_out = {}
    for d in DTYPES:
        t = info[d]
        codecs_out[d] = {
            "bytes_logical": t["bytes_logical"], "bytes_on_disk": t["bytes_on_disk"],
            "logical_vs_fp16": round(fp16_logical / t["bytes_logical"], 3),
            "disk_vs_fp16_logical": round(fp16_logical / t["bytes_on_disk"], 3),
            "disk_vs_fp16_disk": round(fp16_disk / t["bytes_on_disk"], 3),
            "cos_to_fp16": {a: layer_cos(ref[a], arrays[d][a]) for a in "kvq"},
            "cos_recorded_at_extract": t["quantization_cosine"],
            "extract_seconds": seconds[d],
        }
    return {
        "teacher": "stories260K_hf_derived (real, pretrained)", "samples": store.num_samples,
        "tokens": store.num_tokens, "geometry": {"layers": 5, "kv_heads": 4, "q_heads": 8, "head_dim": 8},
        "codecs": codecs_out,
        "alternatives": alternatives(ref["k"], ref["v"], ref["q"]),
    }


def seven_b(tokens: int) -> dict:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from kava.extract.capture import capture_qkv
    from kava.kvstore import codecs

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=3584, intermediate_size=1024, num_hidden_layers=2, num_attention_heads=28,
                      num_key_value_heads=4, head_dim=128, vocab_size=1000, max_position_embeddings=8192)
    model = LlamaForCausalLM(cfg).eval()
    ids = torch.randint(0, cfg.vocab_size, (tokens // 512, 512))
    ks, vs, qs = [], [], []
    for row in ids:
        cap = capture_qkv(model, row[None], with_q=True)
        to_rows = lambda d: torch.stack([d[l][0] for l in range(2)], 0).permute(2, 0, 1, 3).float().numpy()  # noqa
        ks.append(to_rows(cap.keys)), vs.append(to_rows(cap.values)), qs.append(to_rows(cap.queries))
    k, v, q = (np.concatenate(x).astype(np.float16).astype(np.float32) for x in (ks, vs, qs))
    ref_logical = (k.size + v.size + q.size) * 2
    ref_disk = sum(blosc_bytes({"x": x.astype(np.float16)}) for x in (k, v, q))
    out = {}
    for d in DTYPES:
        logical = disk = 0
        cos = {}
        for a, x in (("k", k), ("v", v), ("q", q)):
            parts = codecs.encode_arrays(x, a, d, group_tokens=codecs.DEFAULT_GROUP_TOKENS,
                                         group_channels=codecs.group_channels_for(128))
            y = codecs.decode_arrays(parts, a, d, np.float32, group_tokens=codecs.DEFAULT_GROUP_TOKENS,
                                     group_channels=codecs.group_channels_for(128))
            logical += sum(p.nbytes for p in parts.values())
            disk += blosc_bytes(parts)
            cos[a] = layer_cos(x, y)
        out[d] = {"logical_vs_fp16": round(ref_logical / logical, 3),
                  "disk_vs_fp16_logical": round(ref_logical / disk, 3),
                  "disk_vs_fp16_disk": round(ref_disk / disk, 3), "cos_to_fp16": cos}
    return {"teacher": "random Llama, 7B attention geometry (4 KV heads x 128, 28 query heads), 2 layers",
            "tokens": int(len(k)), "codecs": out, "alternatives": alternatives(k, v, q)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=200, help="GSM8K rows for the stories260K stores")
    ap.add_argument("--tokens", type=int, default=2048, help="random tokens through the 7B-shaped model")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if not os.environ.get("KAVA_ASSETS"):
        raise SystemExit("Set KAVA_ASSETS to the shared assets folder (GSM8K and stories260K).")
    import torch

    torch.set_num_threads(1)
    t = time.perf_counter()
    with tempfile.TemporaryDirectory() as work:
        real = stories(Path(os.environ["KAVA_ASSETS"]), args.samples, Path(work))
    shaped = seven_b(args.tokens)
    print(json.dumps({
        "benchmark": "codecs", "date": dt.date.today().isoformat(), "machine": platform.machine(),
        "cpus": os.cpu_count(), "seconds": round(time.perf_counter() - t, 1),
        "stories260k": real, "7b_shaped": shaped,
    }, indent=1))


if __name__ == "__main__":
    main()
