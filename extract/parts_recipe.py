"""Extraction for encoder and encoder-decoder teachers: one store teacher per attention part, on the student's grid.

Reads top to bottom like ``recipe.py``, whose pieces it reuses: check what this path supports → data, student grid
and store → teacher → one spec per part → the loop over shards (one forward per batch captures every part; each
part's rows are aligned onto the student's tokens and written by that part's shard writer) → summary.

What each part reads of a sample (``TeacherPart.reads``): an encoder reads the whole text, like a decoder teacher.
An encoder-decoder's encoder reads the text before the reasoning (the prompt piece), and its decoder the reasoning
and answer, teacher-forced after its start token; the cross-attention keys are encoder states, so that part's rows
stand for the prompt's tokens. Each part's token spans are moved into the student text's coordinates and aligned
with the character-overlap rule every cross-tokenizer teacher uses (``align.align_tokens``); student tokens the part
did not read are covered by none of its tokens, so they get ``align_weight`` 0 and zero K/V.

The forward pass and writing run on one thread (a decoder teacher overlaps them, ``recipe.BackgroundWriter``).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from kava.core.errors import ConfigError
from kava.core.log import Log, log_stderr
from kava.core.models import ModelSource, describe_model, hub_offline, load_fast_tokenizer, load_model, load_tokenizer
from kava.core.placement import input_device
from kava.kvstore import ShardWriter, TeacherSpec, default_storage, remote

from .align import align_tokens, apply, token_spans
from .capture import QKVCapture
from .config import ExtractConfig
from .grid import GridSample, create_grid_store, tokenizer_fingerprint
from .layer_map import parse_layer_map
from .parts import Family, TeacherPart, capture_parts, teacher_family, teacher_parts
from .recipe import (
    ExtractResult,
    _q_layers,
    _shards_to_do,
    configure_process,
    default_teacher_name,
    hold_writer_lock,
    progress_bar,
    summary_line,
)

if TYPE_CHECKING:
    from transformers import PretrainedConfig, PreTrainedModel, PreTrainedTokenizerBase

EMPTY_SPANS = np.zeros((0, 2), np.int64)


def load_teacher_config(source: ModelSource) -> PretrainedConfig:
    """The teacher's config alone (no weights): enough to tell a decoder from an encoder before loading it."""
    from transformers import AutoConfig  # noqa: PLC0415 - heavy; only extraction needs it

    try:
        return AutoConfig.from_pretrained(source.model_id, revision=source.revision,
                                          trust_remote_code=source.trust_remote_code,
                                          local_files_only=source.is_local or hub_offline())
    except (OSError, ValueError) as e:
        raise ConfigError(f"--teacher {source.name}: its config could not be read ({e}). Pass a model directory "
                          "with a config.json, or a hub id in the local cache.") from e


def source_family(source: ModelSource) -> Family:
    """The teacher's family from its config; ``decoder`` where the config can't be read here (the decoder path
    then reports why, as it always has)."""
    try:
        return teacher_family(load_teacher_config(source))
    except ConfigError:
        return "decoder"


def check_supported(cfg: ExtractConfig, parts: Sequence[TeacherPart], family: Family) -> None:
    """Every option this path does not support, at once, before anything is written."""
    what = f"an {family} teacher"
    problems = [f"{flag}: not supported for {what} ({why})." for flag, on, why in (
        ("--teacher-generates", cfg.teacher_generates, "it does not continue the prompt by itself"),
        ("--prefill-chunk", cfg.prefill_chunk is not None, "it reads its text at once"),
        ("--kv-budget", cfg.kv_budget is not None, "eviction scores rows with causal attention"),
        ("--logit-top-k", cfg.logit_top_k > 0, "its logits are not next-token predictions of the student's text"),
        ("--layer-map cka", cfg.layer_map.strip().lower() == "cka",
         "use proportional or an explicit map; the cross-architecture CKA map is computed separately"),
        ("--prompt-template", cfg.prompt_template not in (None, cfg.student_template),
         "it reads the student's text"),
    ) if on]
    if cfg.k_rope == "pre" and any(p.positions == "rope" for p in parts):
        problems.append(f"--k-rope pre: not supported for {what} with rotary positions (its rotation differs per "
                        "layer type). Pass --k-rope post.")
    if problems:
        raise ConfigError("\n".join(problems))


def part_names(base: str, parts: Sequence[TeacherPart]) -> dict[str, str]:
    """part → store teacher name: the name itself for a one-part encoder, ``<name>.<part>`` for each part of an
    encoder-decoder."""
    if len(parts) == 1:
        return {parts[0].part: base}
    return {p.part: f"{base}.{p.part}" for p in parts}


def run_extract_parts(cfg: ExtractConfig, source: ModelSource, *, log: Log = log_stderr,
                      started: float | None = None) -> ExtractResult:
    """Extract an encoder or encoder-decoder ``source`` into ``cfg.store``, one teacher per attention part.

    ``source`` is ``recipe.validate_and_resolve(cfg)``. Returns what was done, counted over every part (one sample
    counts once). Raises KavaError on bad input, before anything is written.
    """
    started = time.perf_counter() if started is None else started
    # 1. What this path supports, from the config alone.
    config = load_teacher_config(source)
    family, parts = teacher_family(config), teacher_parts(config)
    check_supported(cfg, parts, family)
    configure_process(cfg.threads, progress=cfg.progress)
    base = cfg.name or default_teacher_name(cfg)
    names = part_names(base, parts)

    with contextlib.ExitStack() as held:
        held.enter_context(remote.writing(cfg.store, then=remote.RESUME_FIX))
        # 2. Data, grid and store; the teacher only after the store accepted this grid (as recipe.prepare_extract).
        rows = cfg.data.load()
        teacher_tok = load_tokenizer(source)
        student_tok = teacher_tok if cfg.student_tokenizer is None else load_fast_tokenizer(cfg.student_tokenizer)
        template, _ = cfg.resolve_templates(student_tok, teacher_tok)
        store, grid = create_grid_store(
            cfg.store, rows, student_tok, template, tokenizer_name=cfg.student_tokenizer or source.model_id,
            dataset=cfg.data.dataset, split=cfg.data.split, max_length=cfg.max_length, on_too_long=cfg.on_too_long,
            shard_tokens=cfg.shard_tokens, command=cfg.command, details=cfg.data.details(),
        )
        hold_writer_lock(cfg, held)
        todos = {p.part: _shards_to_do(cfg, store, names[p.part]) for p in parts}
        todo = sorted(set().union(*(t for t, _ in todos.values())))
        model = load_model(source, head="base")

        # 3. One spec per part.
        layers: dict[str, tuple[int, ...]] = {}
        q_layers: dict[str, tuple[int, ...]] = {}
        student_layers = cfg.student_layers or (None if cfg.student is None else _student_layers(cfg.student))
        for part in parts:
            layer_map = parse_layer_map(cfg.layer_map, part.num_layers, student_layers or part.num_layers)
            layers[part.part] = layer_map.teacher_layers
            q_layers[part.part] = _q_layers(cfg, layer_map.teacher_layers, part.num_layers)
            store.add_teacher(part_spec(cfg, source, model, teacher_tok, part, names[part.part], layer_map,
                                        q_layers[part.part], part_of=base if family == "encoder-decoder" else None))
        log(f"kava extract: {family} teacher {base!r} ({source.model_id}) → {store.where}: parts "
            + ", ".join(f"{names[p.part]} ({p.attention}, {p.positions}, layers {list(layers[p.part])})"
                        for p in parts) + f"; {len(todo)} shard(s) to write")

        # 4. The loop over shards: a part whose shard is complete (--resume) is not written again.
        result = ExtractResult(store=store.where, teacher=base, truncated=sum(s.status == "truncated" for s in grid),
                               skipped=sum(s.status == "skipped" for s in grid),
                               shards_kept=sorted(set.intersection(*(set(d) for _, d in todos.values()))))
        bar = progress_bar(sum(len(range(*store.shard_starts[s:s + 2])) for s in todo), cfg.progress)
        device = input_device(model)
        start_id = getattr(model.config, "decoder_start_token_id", None)
        try:
            for shard in todo:
                writers = {p.part: store.shard_writer(names[p.part], shard, nonfinite=cfg.on_nonfinite)
                           for p in parts if shard in todos[p.part][0]}
                samples = grid[int(store.shard_starts[shard]):int(store.shard_starts[shard + 1])]
                for b in range(0, len(samples), cfg.batch_size):
                    batch = samples[b : b + cfg.batch_size]
                    t0 = time.perf_counter()
                    rows_by_part = part_forward(model, teacher_tok, batch, family, layers, q_layers, device, start_id)
                    result.forward_seconds += time.perf_counter() - t0
                    for part in parts:
                        if part.part in writers:
                            write_part(writers[part.part], part, batch, rows_by_part[part.part], len(layers[part.part]),
                                       len(q_layers[part.part]), hard=cfg.alignment == "hard")
                    result.samples += len(batch)
                    result.student_tokens += sum(len(s.input_ids) for s in batch)
                    result.teacher_tokens += sum(len(r[3]) for p in ("enc", "dec") for r in rows_by_part.get(p, [])
                                                 if r is not None)
                    bar.update(len(batch))
                for w in writers.values():
                    marker = w.close()
                    result.quarantined += len(marker["quarantined"])
                    result.bytes_logical += marker["bytes_logical"]
                result.shards_written.append(shard)
        finally:
            bar.close()
    result.seconds = time.perf_counter() - started
    log(summary_line(result))
    return result


def _student_layers(student: str) -> int:
    from transformers import AutoConfig  # noqa: PLC0415 - heavy; only extraction needs it

    return int(AutoConfig.from_pretrained(student, local_files_only=hub_offline()).num_hidden_layers)


def part_spec(cfg: ExtractConfig, source: ModelSource, model: PreTrainedModel, tok: PreTrainedTokenizerBase,
              part: TeacherPart, name: str, layer_map: Any, q_layers: tuple[int, ...], *, part_of: str | None
              ) -> TeacherSpec:
    """The store's spec of one part."""
    from .rope import rope_params  # noqa: PLC0415 - small; kept beside its one use

    rope = rope_params(model.config) if part.positions == "rope" else None
    return TeacherSpec(
        name=name, model={**describe_model(model, source), "part": part.part}, num_layers=part.num_layers,
        layers=layer_map.teacher_layers, num_heads=part.num_heads, kv_heads=part.kv_heads, head_dim=part.head_dim,
        layer_map=layer_map, k_rope="post" if rope is not None else cfg.k_rope, rope=rope, q_layers=q_layers,
        alignment={"method": "char_iou", "mode": cfg.alignment, "teacher_tokenizer": tokenizer_fingerprint(tok),
                   "reads": part.reads},
        storage=default_storage(len(layer_map.teacher_layers), part.kv_heads, part.head_dim, cfg.kv_dtype,
                                compress=cfg.compress),
        created_by=cfg.command, details={"prompt_template": cfg.student_template, **cfg.extra},
        attention=part.attention, positions=part.positions, part_of=part_of,
    )


def split_text(sample: GridSample, family: Family) -> tuple[str, str, int]:
    """``(encoder text, decoder text, where the decoder text starts in the sample's text)``. An encoder reads all
    of it; an encoder-decoder's encoder the text before the reasoning, its decoder the rest."""
    if family == "encoder":
        return sample.text, "", len(sample.text)
    cut = sample.seg_spans["reasoning"][0] if "reasoning" in sample.seg_spans else len(sample.text)
    return sample.text[:cut], sample.text[cut:], cut


# One sample's rows of one part: (K [T_t, L, H, D], V, Q [T_t, Lq, Hq, D] or None, spans [T_t, 2] in the sample's
# text), or None for a sample with no text.
PartRows = tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, np.ndarray] | None


def _pad(encoded: Sequence[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
    T = max(len(x) for x in encoded)
    ids = torch.zeros(len(encoded), T, dtype=torch.long)
    mask = torch.zeros(len(encoded), T, dtype=torch.long)
    for row, x in enumerate(encoded):
        ids[row, : len(x)] = torch.as_tensor(x)
        mask[row, : len(x)] = 1
    return ids, mask


def part_forward(model: PreTrainedModel, tok: PreTrainedTokenizerBase, batch: Sequence[GridSample], family: Family,
                 layers: dict[str, tuple[int, ...]], q_layers: dict[str, tuple[int, ...]], device: torch.device,
                 start_id: int | None) -> dict[str, list[PartRows]]:
    """One padded forward pass of a batch → part → per sample its :data:`PartRows` on the teacher's tokens."""
    out: dict[str, list[PartRows]] = {p: [None] * len(batch) for p in layers}
    texts = [split_text(s, family) for s in batch]
    live = [i for i, (enc, _, _) in enumerate(texts) if enc]
    if not live:
        return out
    enc = [token_spans(tok, texts[i][0]) for i in live]
    limit = getattr(model.config, "max_position_embeddings", None)
    longest = max(len(e[0]) for e in enc)
    if isinstance(limit, int) and longest > limit:  # learned positions: the model has no embedding past its limit
        raise ConfigError(f"--teacher: a sample has {longest} teacher tokens; {type(model).__name__} reads at most "
                          f"{limit}. Lower --max-length (the student's tokens) or choose a teacher with longer "
                          "positions.")
    ids, mask = _pad([e[0] for e in enc])
    inputs: dict[str, Any] = {"input_ids": ids.to(device), "attention_mask": mask.to(device)}
    dec: list[tuple[np.ndarray, np.ndarray]] = []
    if family == "encoder-decoder":
        if start_id is None:
            raise ConfigError(f"Expected decoder_start_token_id in the config of {type(model).__name__}. Got none. "
                              "Set it in the teacher's config.json.")
        for i in live:
            ids, spans = token_spans(tok, texts[i][1], add_special_tokens=False) if texts[i][1] else (
                np.zeros(0, np.int64), EMPTY_SPANS)
            # Teacher forcing: the start token, then the continuation; the start token stands for no text.
            dec.append((np.concatenate([[start_id], ids]).astype(np.int64),
                        np.concatenate([np.zeros((1, 2), np.int64), spans]) + texts[i][2]))
        d_ids, d_mask = _pad([d[0] for d in dec])
        inputs.update(decoder_input_ids=d_ids.to(device), decoder_attention_mask=d_mask.to(device))
    caps = capture_parts(model, **inputs, layers=layers, with_q={p: q for p, q in q_layers.items() if q})

    def stack(cap: QKVCapture, per_layer: dict[int, torch.Tensor], which: Sequence[int]) -> torch.Tensor:
        # per layer (B, heads, T, D) → (B, T, L, heads, D), float32 on the CPU
        return torch.stack([per_layer[l] for l in which], 2).transpose(1, 3).float().cpu()

    for part, cap in caps.items():
        k, v = stack(cap, cap.keys, layers[part]), stack(cap, cap.values, layers[part])
        q = stack(cap, cap.queries, q_layers[part]) if q_layers[part] else None
        for row, i in enumerate(live):
            spans = dec[row][1] if part == "dec" else enc[row][1]
            n = len(spans)
            out[part][i] = (k[row, :n], v[row, :n], None if q is None else q[row, :n], spans)
    return out


def write_part(w: ShardWriter, part: TeacherPart, batch: Sequence[GridSample], rows: Sequence[PartRows],
               num_layers: int, num_q_layers: int, *, hard: bool) -> None:
    """Each sample's rows of one part, aligned onto its student tokens, into the part's shard writer."""
    for sample, kv in zip(batch, rows):
        n = len(sample.input_ids)
        if kv is None:  # a skipped sample (no tokens), or one with no text this part reads
            shape = (n, num_layers, part.kv_heads, part.head_dim)
            w.add(np.zeros(shape, np.float32), np.zeros(shape, np.float32),
                  q=np.zeros((n, num_q_layers, part.num_heads, part.head_dim), np.float32) if num_q_layers else None,
                  align_weight=np.zeros(n, np.float32) if n else None)
            continue
        k, v, q, spans = kv
        al = align_tokens(sample.spans, spans)
        al = al.hard() if hard else al
        w.add(apply(al, k), apply(al, v), q=None if q is None else apply(al, q), align_weight=al.coverage)
