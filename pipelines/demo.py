"""A first look at a real store, until `kava extract` lands: real K/V from a real pretrained model.

Runs the pretrained stories260K Llama (from ``$KAVA_ASSETS``) over seeded synthetic GSM8K-shaped problems, writes
its keys (before RoPE) and values on its own token grid into a store, and prints
``kava store info``. Usage::

    KAVA_ASSETS=../shared/assets python -m kava.pipelines.demo runs/demo.zarr [--samples 200]
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shlex
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m kava.pipelines.demo", description=__doc__.splitlines()[0])
    ap.add_argument("store", help="where to write the store (a new directory)")
    ap.add_argument("--samples", type=int, default=200)
    ap.add_argument("--batch", type=int, default=16)
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if not os.environ.get("KAVA_ASSETS"):
        print("error: set KAVA_ASSETS to the shared assets folder (it holds the stories260K model).", file=sys.stderr)
        return 2
    if Path(args.store).exists():
        print(f"error: {args.store} exists; choose a new path.", file=sys.stderr)
        return 2

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from kava.extract.capture import capture_qkv
    from kava.extract.data import dataset_fingerprint, synthetic_rows
    from kava.extract.rope import rope_params
    from kava.extract.templates import TEMPLATES, format_row, segment_ids
    from kava.kvstore import (
        DatasetSpec, KVStore, LayerMap, TeacherSpec, TokenizerSpec, default_storage, summary,
    )
    from kava.pipelines.cli import format_info

    started = time.perf_counter()
    model_dir = Path(os.environ["KAVA_ASSETS"]) / "models" / "stories260K_hf_derived"
    tok = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(model_dir, local_files_only=True).eval()
    cfg = model.config

    # The grid: the teacher's own tokenizer is the student's here, so alignment is the identity.
    rows = synthetic_rows(args.samples, seed=0, split="train")
    template = TEMPLATES["plain"]
    texts = [format_row(r, template) for r in rows]
    enc = [tok(t.text, return_offsets_mapping=True) for t in texts]
    ids = [np.asarray(e["input_ids"][: cfg.max_position_embeddings]) for e in enc]
    segs = [
        segment_ids(np.asarray(e["offset_mapping"])[: len(i)], t.spans,
                    special_mask=np.isin(i, tok.all_special_ids))
        for e, t, i in zip(enc, texts, ids)
    ]
    with tempfile.TemporaryDirectory() as tmp:
        tok.save_pretrained(tmp)
        files = {f.name: f.read_bytes() for f in Path(tmp).iterdir() if f.is_file()}
    store = KVStore.create(
        args.store,
        sample_ids=rows.sample_ids,
        input_ids=ids,
        segment_ids=segs,
        student_tokenizer=TokenizerSpec(
            name="stories260K", fingerprint=hashlib.sha256(tok.backend_tokenizer.to_str().encode()).hexdigest(),
            vocab_size=len(tok), kind=type(tok).__name__, files=tuple(sorted(files)),
            bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
        ),
        dataset=DatasetSpec("synthetic", "train", dataset_fingerprint(rows),
                            details={"template": template.name, "template_sha256": template.sha256, "seed": 0}),
        tokenizer_files=files,
        shard_tokens=8192,
        created_by=shlex.join(["python", "-m", "kava.pipelines.demo", *(argv or sys.argv[1:])]),
    )
    L, H = cfg.num_hidden_layers, cfg.num_key_value_heads
    D = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    store.add_teacher(TeacherSpec(
        name="stories260K", model={"id": "stories260K_hf_derived", "architecture": "LlamaForCausalLM"},
        num_layers=L, layers=tuple(range(L)), num_heads=cfg.num_attention_heads, kv_heads=H, head_dim=D,
        k_rope="pre", rope=rope_params(cfg),
        layer_map=LayerMap("explicit", tuple(((l, 1.0),) for l in range(L))), storage=default_storage(L, H, D),
        created_by=store.manifest.created_by,
    ))

    # One teacher-forced forward pass per batch; padded positions are dropped before writing.
    with torch.no_grad():
        for shard in range(store.num_shards):
            samples = list(store.shard_samples(shard))
            with store.shard_writer("stories260K", shard) as writer:
                for b in range(0, len(samples), args.batch):
                    batch = [ids[i] for i in samples[b : b + args.batch]]
                    T = max(len(x) for x in batch)
                    x = torch.zeros(len(batch), T, dtype=torch.long)
                    mask = torch.zeros(len(batch), T, dtype=torch.long)
                    for j, seq in enumerate(batch):
                        x[j, : len(seq)] = torch.as_tensor(seq)
                        mask[j, : len(seq)] = 1
                    cap = capture_qkv(model, x, mask, k_rope="pre")
                    # cap.keys[l]: (B, kv_heads, T, head_dim) → (B, T, L, kv_heads, head_dim)
                    k = torch.stack([cap.keys[l] for l in range(L)], 2).transpose(1, 3)
                    v = torch.stack([cap.values[l] for l in range(L)], 2).transpose(1, 3)
                    for j, seq in enumerate(batch):
                        writer.add(k[j, : len(seq)], v[j, : len(seq)])
    print(format_info(summary(KVStore.open(args.store))))
    print(f"wrote {store.num_tokens} tokens in {time.perf_counter() - started:.1f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
