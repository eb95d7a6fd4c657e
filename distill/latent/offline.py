"""The offline teacher of `kava latent --teacher store`: a CoT teacher extracted once, compressed by R-KV, read back.

The paper distills each latent student from its own teacher mode (self-distillation). This project's way is to run
the expensive teacher once: a model trained on the CoT (``kava latent --mode cot``, or any causal LM) is extracted
with ``kava extract --evict r-kv --kv-budget M`` over the training rows, and any latent student with the same K/V
geometry is trained from the store. Only the K/V term's target comes from the store; the CoT cross-entropy and
CODI's hidden states still come from the student's own teacher mode (the model must read the CoT to learn it).

The round trip:

1. ``kava latent --export-rows DIR`` writes the training rows as GSM8K JSONL (``DIR/train.jsonl``: the CoT lines,
   then ``#### N``) and the template that lays them out as both modes do (``DIR/template.txt``:
   ``{question}\\n{reasoning}\\nThe answer is: {answer}``);
2. ``kava extract --dataset DIR/train.jsonl --student-template DIR/template.txt --student-tokenizer TOK
   --evict r-kv --kv-budget M`` (the student's tokenizer, so the store's rows are the student's tokens);
3. ``kava latent --teacher store --store kv.zarr`` with the same rows (``--chain-steps``, ``--train-size``,
   ``--data-seed``) and ``--latent M``.

Memory: every training row's targets are read once, before the first step, into ``[N, L, H, M, D]`` float32 keys
and values (4,000 rows of a 4-layer, 4-head, 32-dim student at M = 8: 33 MB); the log says how much.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kava.core.errors import ConfigError
from kava.extract.templates import SEGMENT_PROMPT, SEGMENT_REASONING

from .data import ANSWER_PREFIX, LatentRow

TEMPLATE = "{question}\n{reasoning}\n" + ANSWER_PREFIX + " {answer}"
"""The text of both modes as `kava extract` lays it out: the question, the CoT lines, the answer line."""
TRAIN_FILE, TEMPLATE_FILE = "train.jsonl", "template.txt"


def export_rows(rows: Sequence[LatentRow], folder: str | Path) -> tuple[Path, Path]:
    """Write ``rows`` as GSM8K JSONL (row ``i`` on line ``i``) and the template for `kava extract`."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    data, template = folder / TRAIN_FILE, folder / TEMPLATE_FILE
    with data.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps({"question": row.question, "answer": f"{row.cot}\n#### {row.answer}"}) + "\n")
    template.write_text(TEMPLATE + "\n", encoding="utf-8")
    return data, template


@dataclass
class StoreTargets:
    """Every training row's K/V target. ``keys``/``values`` ``[N, L, H, M, D]`` (student layers; pre-RoPE keys when
    the store's are), ``valid`` ``[N, M]`` bool: slot ``j`` of row ``i`` holds a kept CoT row (a CoT shorter than M
    fills fewer slots; a row the store lacks fills none)."""

    keys: torch.Tensor
    values: torch.Tensor
    valid: torch.Tensor

    def batch(self, index: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The targets of rows ``index`` as the objective takes them: ``[L, B, H, M, D]`` twice and ``[B, M]``."""
        picked = torch.as_tensor(list(index), dtype=torch.long)
        return (
            self.keys[picked].transpose(0, 1),
            self.values[picked].transpose(0, 1),
            self.valid[picked],
        )


def reasoning_slots(kept: np.ndarray, segment_ids: np.ndarray, budget: int) -> tuple[np.ndarray, np.ndarray]:
    """Which of one sample's slots hold its kept CoT rows, per (layer, head), in token order.

    ``kept`` ``[S, L, H]``: each slot's token; ``segment_ids`` ``[T]``. Returns ``order`` ``[budget, L, H]`` (slot
    indices; the first ``count`` are the CoT rows) and ``count``, the CoT rows kept (the same for every layer and head,
    by the store's rule).
    """
    is_cot = segment_ids[kept] == SEGMENT_REASONING  # [S, L, H]
    counts = is_cot.sum(axis=0)
    if counts.size and (counts != counts.flat[0]).any():
        raise ConfigError(
            "Expected every layer and head of a compressed teacher to keep the same number of CoT rows. Got "
            f"{sorted(set(counts.ravel().tolist()))}. Verify the store (kava store verify)."
        )
    count = int(counts.flat[0]) if counts.size else 0
    # Stable: CoT slots first, each (layer, head)'s in slot order, which is token order (the store's rule).
    order = np.argsort(~is_cot, axis=0, kind="stable")[:budget]
    if order.shape[0] < budget:  # fewer slots than the budget (a very short sample): pad with slot 0, masked out
        order = np.concatenate([order, np.zeros((budget - order.shape[0], *order.shape[1:]), order.dtype)])
    return order, min(count, budget)


def _student_mix(spec: Any, student_layers: int) -> np.ndarray:
    """``[L_student, L_stored]`` weights: student layer ``s`` takes ``Σ w · K[t]`` over its mapped teacher layers."""
    sources = spec.layer_map.sources
    if len(sources) != student_layers:
        raise ConfigError(
            f"--store: teacher {spec.name!r} is mapped onto {len(sources)} student layers; the student has "
            f"{student_layers}. Extract with --student-layers {student_layers} (or --student pointing at it)."
        )
    mix = np.zeros((student_layers, len(spec.layers)), np.float32)
    for s, pairs in enumerate(sources):
        for layer, weight in pairs:
            mix[s, spec.layers.index(layer)] += weight
    return mix


def _pick_teacher(store: Any, name: str | None) -> Any:
    teachers = store.teachers
    if name is None:
        if len(teachers) != 1:
            raise ConfigError(f"--store-teacher: the store has teachers {sorted(teachers)}. Name one.")
        name = next(iter(teachers))
    if name not in teachers:
        raise ConfigError(f"--store-teacher: expected one of {sorted(teachers)}. Got {name!r} instead.")
    return teachers[name]


def load_store_targets(
    location: str,
    rows: Sequence[LatentRow],
    *,
    model_config: Any,
    tokenizer: Any,
    budget: int,
    kv_rope: str,
    teacher: str | None = None,
    log: Callable[[str], None] = lambda line: None,
) -> StoreTargets:
    """Read the K/V target of every row in ``rows`` from the compressed teacher at ``location``.

    Store sample ``prefix/split/NNNNNN`` is row ``NNNNNN`` (the line of the exported file); each one's question is
    checked against the row's, decoded from the store's prompt tokens, so a store made from other rows is refused.
    """
    from kava.kvstore import KVStore  # noqa: PLC0415 - zarr, only for --teacher store

    store = KVStore.open(location)
    spec = _pick_teacher(store, teacher)
    problems = []
    ev = spec.eviction
    if ev is None or ev.budget != budget or isinstance(ev.budget, float) or "reasoning" not in ev.segments:
        got = "keeps every row" if ev is None else f"keeps {ev.budget!r} of {list(ev.segments)}"
        problems.append(
            f"--store: teacher {spec.name!r} {got}; --latent {budget} needs {budget} CoT rows per layer and head. "
            f"Extract with --evict r-kv --kv-budget {budget}."
        )
    heads = getattr(model_config, "num_key_value_heads", None) or model_config.num_attention_heads
    head_dim = getattr(model_config, "head_dim", None) or model_config.hidden_size // model_config.num_attention_heads
    if (spec.kv_heads, spec.head_dim) != (heads, head_dim):
        problems.append(
            f"--store: teacher {spec.name!r} has {spec.kv_heads} KV heads of {spec.head_dim} dims; the student has "
            f"{heads} of {head_dim}. The K/V term compares them one to one: use a teacher of the student's geometry."
        )
    if spec.k_rope != kv_rope:
        problems.append(
            f"--store: teacher {spec.name!r} stores keys {spec.k_rope} RoPE; --kv-rope is {kv_rope}. Pass "
            f"--kv-rope {spec.k_rope}, or extract with --k-rope {kv_rope}."
        )
    if problems:
        raise ConfigError.from_problems(problems)
    mix = torch.from_numpy(_student_mix(spec, model_config.num_hidden_layers))  # [L, L_stored]

    n, layers = len(rows), mix.shape[0]
    keys = torch.zeros(n, layers, heads, budget, head_dim)
    values = torch.zeros_like(keys)
    valid = torch.zeros(n, budget, dtype=torch.bool)
    found = 0
    for shard in store.iter_shards(teachers=[spec.name], dtype=np.float32):
        kv = shard.teachers[spec.name]
        assert kv.kept is not None and kv.slot_offsets is not None  # a compressed teacher (checked above)
        for i, sample_id in enumerate(shard.sample_ids):
            index = _row_index(sample_id, n)
            if index is None or kv.status[i] != 0:
                continue
            tokens = slice(int(shard.offsets[i]), int(shard.offsets[i + 1]))
            _check_question(tokenizer, shard.input_ids[tokens], shard.segment_ids[tokens], rows[index], sample_id)
            slots = slice(int(kv.slot_offsets[i]), int(kv.slot_offsets[i + 1]))
            order, count = reasoning_slots(kv.kept[slots], shard.segment_ids[tokens], budget)  # [M, L_s, H]
            k = np.take_along_axis(kv.k[slots], order[..., None], axis=0)  # [M, L_s, H, D]
            v = np.take_along_axis(kv.v[slots], order[..., None], axis=0)
            # Student layer s: Σ_t mix[s, t] · stored layer t; [M, L_s, H, D] → [L, H, M, D]
            keys[index] = torch.einsum("st,mthd->shmd", mix, torch.from_numpy(k))
            values[index] = torch.einsum("st,mthd->shmd", mix, torch.from_numpy(v))
            valid[index, :count] = True
            found += 1
    missing = n - found
    if missing > max(1, n // 100):
        raise ConfigError(
            f"--store: {missing} of {n} training rows have no sample in teacher {spec.name!r}. Extract the rows "
            "`kava latent --export-rows` writes for these options (--chain-steps, --train-size, --data-seed)."
        )
    mib = 2 * keys.numel() * 4 / 2**20
    log(f"teacher {spec.name!r} from {location}: {found}/{n} rows, {int(valid.sum())} CoT slots, {mib:.0f} MiB")
    return StoreTargets(keys, values, valid)


def _row_index(sample_id: str, n: int) -> int | None:
    tail = sample_id.rsplit("/", 1)[-1]
    if not tail.isdigit() or int(tail) >= n:
        return None
    return int(tail)


def _check_question(tokenizer: Any, ids: np.ndarray, segments: np.ndarray, row: LatentRow, sample_id: str) -> None:
    prompt = tokenizer.decode(ids[segments == SEGMENT_PROMPT].tolist(), skip_special_tokens=True)
    if row.question not in prompt:
        raise ConfigError(
            f"--store: sample {sample_id!r} reads {prompt.strip()[:60]!r}; training row {sample_id.rsplit('/', 1)[-1]} "
            f"is {row.question!r}. The store was made from other rows: extract the file `kava latent --export-rows` "
            "writes for these options."
        )
