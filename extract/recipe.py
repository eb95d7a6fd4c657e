"""The extraction recipe: one teacher, one pass over the data, its K/V aligned onto the student grid.

Reads top to bottom: resolve and validate → data and student grid → store (and its writer lock) → teacher → layer
map (with CKA on a calibration subset) → teacher spec → the loop over shards (forward pass on this thread, alignment
and writing on a background thread) → summary. Components it calls take tensors and return tensors; I/O and logging
live here.

``run_extract`` is the single process: ``prepare_extract`` (everything up to the teacher's spec) and then
``write_shards`` over this job's shards, holding the store's writer lock from the moment the store exists (a shard
job shares it with the other jobs: :func:`hold_writer_lock`). A scale-out driver runs the same two pieces as tasks:
the preparation once, and ``write_shards`` for one shard at a time on workers that keep their teacher loaded; it
takes no lock, as it coordinates its workers itself.
"""

from __future__ import annotations

import contextlib
import queue
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from tqdm import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase
from transformers.utils import logging as hf_logging

from kava.core import models
from kava.core.errors import ConfigError
from kava.core.locks import beside, split_lock, writer_lock
from kava.core.log import Log, log_stderr
from kava.core.models import ModelSource, describe_model, load_fast_tokenizer, load_tokenizer, resolve_model
from kava.core.placement import input_device
from kava.kvstore import (
    EvictionSpec,
    KVStore,
    LayerMap,
    LogitSpec,
    ShardWriter,
    StorageSpec,
    TeacherSpec,
    default_storage,
    remote,
)

from .align import apply, token_spans
from .calibrate import calibrate_cka
from .capture import attention_geometry, capture_qkv
from .config import ExtractConfig
from .evict import evict_sample
from .grid import GridSample, create_grid_store, tokenizer_fingerprint
from .layer_map import format_layer_map, parse_layer_map
from .prefill import Prefilled, prefill_forward
from .rope import rope_params
from .teacher_pass import (
    TeacherRows,
    generate_reasoning,
    sample_alignment,
    student_logits,
    teacher_forward,
    teacher_texts,
)
from .teachers import resolve_teacher
from .templates import PromptTemplate, check_template_name, load_template


@dataclass
class ExtractResult:
    store: str
    teacher: str
    shards_written: list[int] = field(default_factory=list)
    shards_kept: list[int] = field(default_factory=list)
    samples: int = 0
    student_tokens: int = 0
    teacher_tokens: int = 0
    quarantined: int = 0
    truncated: int = 0
    skipped: int = 0
    seconds: float = 0.0
    loop_seconds: float = 0.0
    """Wall time of the shard loop (forward passes, alignment, writing), without loading and calibration."""
    forward_seconds: float = 0.0
    write_wait_seconds: float = 0.0
    bytes_logical: int = 0

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


class BackgroundWriter:
    """Runs submitted callables in order on one thread, so encoding and writing overlap the next forward pass.

    The queue is bounded (the forward pass waits when the writer falls behind, keeping memory flat); an error on
    the writer thread is raised on the caller's next ``submit`` or ``close``.
    """

    def __init__(self, depth: int = 4) -> None:
        self._queue: queue.Queue[Callable[[], None] | None] = queue.Queue(maxsize=depth)
        self._error: BaseException | None = None
        self.wait_seconds = 0.0
        self._thread = threading.Thread(target=self._run, name="kava-writer", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while (job := self._queue.get()) is not None:
            if self._error is None:
                try:
                    job()
                except BaseException as e:  # noqa: BLE001 - re-raised on the caller's thread
                    self._error = e

    def _check(self) -> None:
        if self._error is not None:
            raise self._error

    def submit(self, job: Callable[[], None]) -> None:
        self._check()
        t = time.perf_counter()
        self._queue.put(job)
        self.wait_seconds += time.perf_counter() - t

    def close(self) -> None:
        self._queue.put(None)
        t = time.perf_counter()
        self._thread.join()
        self.wait_seconds += time.perf_counter() - t
        self._check()


def default_teacher_name(cfg: ExtractConfig) -> str:
    base = Path(cfg.teacher.rstrip("/")).name if ("/" in cfg.teacher or Path(cfg.teacher).exists()) else cfg.teacher
    name = base if cfg.teacher_template == cfg.student_template else f"{base}+{Path(cfg.teacher_template).stem}"
    return "".join(c if c.isalnum() or c in "._+-" else "-" for c in name).lstrip("._+-") or "teacher"


class LoadedTeacher(NamedTuple):
    """A teacher ready to run: its model (eval mode, on its device) and its fast tokenizer."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase


@dataclass
class ExtractPlan:
    """What writing a shard needs besides the loaded teacher, fixed by :func:`prepare_extract`.

    Small and picklable, so a driver can send it to worker processes along with each shard's grid samples.
    """

    cfg: ExtractConfig
    source: ModelSource
    """The resolved teacher: what a worker loads, and the key of its cache."""
    name: str
    """The teacher's name inside the store."""
    store: str
    """The store as messages name it."""
    todo: list[int]
    """Shards to write, in order."""
    done: list[int]
    """Complete shards kept (with --resume)."""
    shard_starts: tuple[int, ...]
    """The store's shard plan: shard s holds samples shard_starts[s]:shard_starts[s+1]."""
    layers: tuple[int, ...]
    q_layers: tuple[int, ...]
    num_heads: int
    kv_heads: int
    head_dim: int
    same_tokenizer: bool
    """The teacher's tokenizer is the student's (with the same text, rows need no alignment)."""
    truncated: int
    skipped: int
    eviction: EvictionSpec | None = None
    """A compressed teacher's rule and budget (``--kv-budget``); None keeps every row."""
    templates: tuple[PromptTemplate, PromptTemplate] | None = None
    """(the student's, the teacher's) templates as resolved when their tokenizers were loaded (a chat:tokenizer
    template is the tokenizer's own); None resolves them by name."""

    def shard_samples(self, shard: int) -> range:
        return range(self.shard_starts[shard], self.shard_starts[shard + 1])

    @property
    def samples_to_write(self) -> int:
        return sum(len(self.shard_samples(s)) for s in self.todo)

    def new_result(self) -> ExtractResult:
        """An empty result for this plan: counters at zero, the kept shards and the grid's counts filled in."""
        return ExtractResult(store=self.store, teacher=self.name, shards_kept=list(self.done),
                             truncated=self.truncated, skipped=self.skipped)


def run_extract(cfg: ExtractConfig, *, log: Log = log_stderr) -> ExtractResult:
    """Extract one teacher into ``cfg.store``; returns what was done. Raises KavaError on bad input."""
    started = time.perf_counter()
    # 1. Everything that can be checked without loading a model, all at once.
    source = validate_and_resolve(cfg)
    from .parts_recipe import run_extract_parts, source_family  # noqa: PLC0415 - it builds on this module

    if source_family(source) != "decoder":  # encoders and encoder-decoders: one store teacher per attention part
        return run_extract_parts(cfg, source, log=log, started=started)
    configure_process(cfg.threads, progress=cfg.progress)

    with contextlib.ExitStack() as held:  # the store's writer lock, from when the store exists to the end
        # On object storage: a write that fails for good (network, credentials) is one line naming the object.
        held.enter_context(remote.writing(cfg.store, then=remote.RESUME_FIX))
        # 2-6. Data, grid, store, teacher, layer map and the teacher's spec.
        plan, grid, teacher = prepare_extract(cfg, source, log=log, hold=held)

        # 7. The loop over this job's shards.
        result = plan.new_result()
        bar = progress_bar(plan.samples_to_write, cfg.progress)
        try:
            write_shards(plan, teacher, [(s, [grid[i] for i in plan.shard_samples(s)]) for s in plan.todo], result,
                         bar=bar)
        finally:
            bar.close()
    result.seconds = time.perf_counter() - started
    log(summary_line(result))
    return result


def configure_process(threads: int | None, *, progress: bool) -> None:
    """Torch's intra-op threads and transformers' own progress bars: set once per process, before models load."""
    if threads is not None:
        torch.set_num_threads(threads)
    if not progress:
        hf_logging.disable_progress_bar()  # its "Loading weights" bars too


def summary_line(result: ExtractResult) -> str:
    """The line an extraction ends with."""
    return (f"kava extract: wrote {len(result.shards_written)} shard(s), {result.samples} samples, "
            f"{result.student_tokens} student tokens in {result.seconds:.1f} s; {result.quarantined} quarantined, "
            f"{result.truncated} truncated, {result.skipped} skipped")


def prepare_extract(cfg: ExtractConfig, source: ModelSource, *, log: Log = log_stderr,
                    load_model: Callable[[ModelSource], PreTrainedModel] | None = None,
                    hold: contextlib.ExitStack | None = None
                    ) -> tuple[ExtractPlan, list[GridSample], LoadedTeacher]:
    """Everything before the first shard: data, student grid, store, teacher, layer map and the teacher's spec.

    Creates the store (or checks that it holds this grid), chooses the shards to write (complete ones are refused
    without --resume), loads the teacher, computes its layer map and CKA matrices and registers it. ``source`` is
    ``validate_and_resolve(cfg)``; ``load_model`` turns it into the model (default ``kava.core.models.load_model``; a
    worker passes its cache's). With ``hold``, the store's writer lock (:func:`hold_writer_lock`) is taken into it
    as soon as the store exists. Returns the plan, the grid (indexed by store sample) and the loaded teacher.
    """
    name = cfg.name or default_teacher_name(cfg)
    from .parts_recipe import source_family  # noqa: PLC0415 - it builds on this module

    if source_family(source) != "decoder":
        raise ConfigError(f"--teacher {cfg.teacher}: an encoder or encoder-decoder is extracted in one process "
                          "(run_extract: one store teacher per attention part), not shard by shard. Run kava extract "
                          "without the scale-out driver.")

    # 2. Data and the student grid. The tokenizer comes first: the grid depends on it, not on the teacher.
    rows = cfg.data.load()
    teacher_tok = load_tokenizer(source)
    student_tok = teacher_tok if cfg.student_tokenizer is None else load_fast_tokenizer(cfg.student_tokenizer)
    template, teacher_template = cfg.resolve_templates(student_tok, teacher_tok)
    if cfg.prefill_chunk is not None and tokenizer_fingerprint(student_tok) != tokenizer_fingerprint(teacher_tok):
        raise ConfigError(f"--prefill-chunk needs the teacher's own tokenizer as the student's: --student-tokenizer "
                          f"{cfg.student_tokenizer} differs (rows kept chunk by chunk are the teacher's own tokens, "
                          "with no alignment onto others). Drop --student-tokenizer, or --prefill-chunk.")
    # 3. The grid and the store (created by the first extraction, checked by every later one).
    store, grid = create_grid_store(
        cfg.store, rows, student_tok, template, tokenizer_name=cfg.student_tokenizer or source.model_id,
        dataset=cfg.data.dataset, split=cfg.data.split, max_length=cfg.max_length, on_too_long=cfg.on_too_long,
        shard_tokens=cfg.shard_tokens, command=cfg.command, details=cfg.data.details(),
    )
    if hold is not None:
        hold_writer_lock(cfg, hold)

    todo, done = _shards_to_do(cfg, store, name)

    # 4. The teacher (only now: a store that refuses this grid or this run fails before minutes of model loading).
    teacher_model = (load_model or models.load_model)(source)

    # 5. Geometry, layer map (CKA on a calibration subset), and the teacher's spec.
    num_layers, num_heads, kv_heads, head_dim = attention_geometry(teacher_model.config)
    same_tokenizer = tokenizer_fingerprint(teacher_tok) == store.manifest.student_tokenizer.fingerprint
    layer_map, cka = _layer_map(cfg, teacher_model, teacher_tok, grid, num_layers, log)
    layers = layer_map.teacher_layers
    q_layers = _q_layers(cfg, layers, num_layers)
    storage: StorageSpec = default_storage(len(layers), kv_heads, head_dim, cfg.kv_dtype, compress=cfg.compress)
    # With --teacher-generates the teacher reads its own text, so rows are resampled segment by segment.
    same_text = teacher_template.format == template.format
    alignment = {"method": "time_warp" if cfg.teacher_generates else
                 "identity" if same_tokenizer and same_text else "char_iou",
                 "mode": cfg.alignment, "teacher_tokenizer": tokenizer_fingerprint(teacher_tok)}
    store.add_teacher(TeacherSpec(
        name=name, model=describe_model(teacher_model, source), num_layers=num_layers, layers=layers,
        num_heads=num_heads, kv_heads=kv_heads, head_dim=head_dim, layer_map=layer_map, k_rope=cfg.k_rope,
        rope=rope_params(teacher_model.config), q_layers=q_layers, alignment=alignment, storage=storage,
        created_by=cfg.command,
        details={"prompt_template": teacher_template.name, "template_sha256": teacher_template.sha256,
                 "teacher_generates": cfg.teacher_generates,
                 **({"prefill_chunk": cfg.prefill_chunk} if cfg.prefill_chunk is not None else {}), **cfg.extra},
        logits=_logit_spec(cfg, teacher_model, teacher_tok), eviction=cfg.evicting.eviction(),
    ))
    for matrix_name, (matrix, attrs) in cka.items():
        store.write_cka(name, matrix_name, matrix, **attrs)

    # 6. The shards to write were chosen right after the store opened.
    plan = ExtractPlan(
        cfg=cfg, source=source, name=name, store=store.where, todo=todo, done=done,
        shard_starts=tuple(int(s) for s in store.shard_starts), layers=layers, q_layers=q_layers,
        num_heads=num_heads, kv_heads=kv_heads, head_dim=head_dim, same_tokenizer=same_tokenizer,
        truncated=sum(s.status == "truncated" for s in grid), skipped=sum(s.status == "skipped" for s in grid),
        eviction=cfg.evicting.eviction(), templates=(template, teacher_template),
    )
    log(f"kava extract: teacher {name!r} ({source.model_id}, {source.quantization}) → {store.where}: "
        f"{len(todo)} shard(s) to write, {len(done)} kept; layers {list(layers)}, K {cfg.k_rope}-RoPE, "
        f"{storage.dtype}")
    return plan, grid, LoadedTeacher(teacher_model, teacher_tok)


def write_shards(plan: ExtractPlan, teacher: LoadedTeacher, shards: Sequence[tuple[int, Sequence[GridSample]]],
                 result: ExtractResult, *, bar: tqdm | None = None) -> None:
    """Write ``shards`` (each with its grid samples, in store order), adding to ``result``'s counters.

    The forward pass runs on this thread, alignment and writing on a background thread, one shard writer at a
    time; a shard becomes visible when its marker is written, so one left unfinished by an error is redone by a
    resumed run. ``bar`` (a tqdm bar, optional) advances per batch.
    """
    cfg = plan.cfg
    store = KVStore.open(cfg.store, mode="a")
    template, teacher_template = plan.templates or (load_template(cfg.student_template),
                                                    load_template(cfg.teacher_template))
    same_text = teacher_template.format == template.format
    name, layers, q_layers = plan.name, plan.layers, plan.q_layers
    num_heads, kv_heads, head_dim = plan.num_heads, plan.kv_heads, plan.head_dim
    teacher_model, teacher_tok = teacher
    special_ids = np.asarray(sorted(teacher_tok.all_special_ids), dtype=np.int64)
    device = input_device(teacher_model)
    # A compressed teacher scores its rows with the queries of every stored layer (stored only on --q-layers).
    evicting, rope = plan.eviction, rope_params(teacher_model.config)
    capture_q = layers if evicting is not None else q_layers
    writer = BackgroundWriter()
    loop_started = time.perf_counter()
    open_writers: dict[int, ShardWriter] = {}  # touched only on the writer thread
    for shard, samples in shards:
        def open_writer(shard: int = shard) -> None:  # runs later, on the writer thread: binds this shard
            open_writers[shard] = store.shard_writer(name, shard, nonfinite=cfg.on_nonfinite)

        writer.submit(open_writer)
        for b in range(0, len(samples), cfg.batch_size):
            batch = samples[b : b + cfg.batch_size]
            texts, pieces = teacher_texts(batch, template, teacher_template)
            if cfg.teacher_generates:
                texts = generate_reasoning(teacher_model, teacher_tok, texts, pieces, cfg.max_new_tokens, device)
            encoded = [token_spans(teacher_tok, t) if t else (np.zeros(0, np.int64), np.zeros((0, 2), np.int64))
                       for t in texts]
            t0 = time.perf_counter()
            captured: Sequence[TeacherRows | Prefilled | None]
            if cfg.prefill_chunk is None:
                captured = teacher_forward(teacher_model, encoded, layers, capture_q, cfg.k_rope, device, capture_qkv,
                                           logit_top_k=cfg.logit_top_k)
            else:  # one sample at a time, chunk by chunk, its cache cut to the budget after each chunk
                assert evicting is not None  # --prefill-chunk needs --kv-budget
                captured = prefill_forward(teacher_model, encoded, [s.input_ids for s in batch],
                                           [s.segment_ids for s in batch], evicting, chunk=cfg.prefill_chunk,
                                           layers=layers, q_layers=q_layers, k_rope=cfg.k_rope,
                                           first_sample=plan.shard_starts[shard] + b, logit_top_k=cfg.logit_top_k)
            result.forward_seconds += time.perf_counter() - t0

            # Runs later, on the writer thread: binds this batch's values.
            def write(batch: Sequence[GridSample] = batch, encoded: list[tuple[np.ndarray, np.ndarray]] = encoded,
                      captured: Sequence[TeacherRows | Prefilled | None] = captured, texts: list[str] = texts,
                      pieces: list[dict[str, tuple[int, int]]] = pieces, shard: int = shard) -> None:
                w = open_writers[shard]
                for sample, (t_ids, t_spans), kv, text, piece in zip(batch, encoded, captured, texts, pieces):
                    if not len(sample.input_ids):  # a skipped sample: nothing on the grid
                        shape = (0, len(layers), kv_heads, head_dim)
                        top_k = cfg.logit_top_k
                        w.add(np.zeros(shape, np.float32), np.zeros(shape, np.float32),
                              q=np.zeros((0, len(q_layers), num_heads, head_dim), np.float32) if q_layers
                              else None,
                              logits=(np.zeros((0, top_k), np.int32), np.zeros((0, top_k), np.float32)) if top_k
                              else None,
                              kept=np.zeros(shape[:3], np.int32) if evicting is not None else None)
                        continue
                    assert kv is not None  # the sample has tokens
                    top = kv.logits
                    # Each student token's top-k from the teacher token ending where it ends (-1 rows: none does).
                    logits = None if top is None else student_logits(
                        sample, t_spans, piece, top, generated=cfg.teacher_generates, same_text=same_text)
                    al = sample_alignment(sample, t_ids, t_spans, text, piece, generated=cfg.teacher_generates,
                                    same_text=same_text, same_tokenizer=plan.same_tokenizer,
                                    hard=cfg.alignment == "hard", special_ids=special_ids)
                    weight = np.ones(len(sample.input_ids), np.float32) if al is None else al.coverage
                    if isinstance(kv, Prefilled):  # --prefill-chunk: the rows its cache kept, the teacher's tokens
                        ev = kv.on_grid(sample.segment_ids, evicting)
                        w.add(ev.k, ev.v, q=ev.q, align_weight=weight, logits=logits, kept=ev.kept,
                              fidelity=ev.fidelity)
                        continue
                    k, v, q = kv.k, kv.v, kv.q
                    if al is not None:  # onto the student's tokens
                        k, v, q = apply(al, k), apply(al, v), None if q is None else apply(al, q)
                    if evicting is not None:  # only the kept rows, chosen from this very pass
                        assert q is not None  # captured at the stored layers for the scores
                        ev = evict_sample(k, v, q, torch.as_tensor(sample.segment_ids), evicting, rope=rope,
                                          k_rope=cfg.k_rope, sample=w.next_sample,
                                          q_layers=tuple(layers.index(layer) for layer in q_layers))
                        w.add(ev.k, ev.v, q=ev.q, align_weight=weight, logits=logits, kept=ev.kept,
                              fidelity=ev.fidelity)
                    else:
                        w.add(k, v, q=q, align_weight=weight, logits=logits)
            writer.submit(write)
            result.samples += len(batch)
            result.student_tokens += sum(len(s.input_ids) for s in batch)
            result.teacher_tokens += sum(len(e[0]) for e in encoded)
            if bar is not None:
                bar.update(len(batch))
                rate = result.student_tokens / max(1e-9, time.perf_counter() - loop_started)
                bar.set_postfix_str(f"{rate:,.0f} tok/s", refresh=False)

        def finish(shard: int = shard) -> None:
            marker = open_writers.pop(shard).close()
            result.shards_written.append(shard)
            result.quarantined += len(marker["quarantined"])
            result.bytes_logical += marker["bytes_logical"]
        writer.submit(finish)
    writer.close()
    result.loop_seconds += time.perf_counter() - loop_started
    result.write_wait_seconds += writer.wait_seconds


# ---------------------------------------------------------------------------------------------------------------------
# Pieces of the recipe


def validate_and_resolve(cfg: ExtractConfig) -> ModelSource:
    """Check the options and resolve the teacher, reporting every problem of both at once."""
    problems: list[str] = []
    try:
        cfg.validate()
    except ConfigError as e:
        problems.append(str(e))
    for flag, value in (("--student-template", cfg.student_template), ("--prompt-template", cfg.prompt_template)):
        if value is not None:
            try:
                check_template_name(value, flag=flag)
            except ConfigError as e:
                problems.append(f"{flag}: {e}")
    source: ModelSource | None = None
    try:
        source = resolve_teacher(cfg.teacher, load_in_4bit=cfg.load_in_4bit and not cfg.load_in_8bit,
                                 load_in_8bit=cfg.load_in_8bit and not cfg.load_in_4bit, dtype=cfg.dtype,
                                 device=cfg.device, revision=cfg.revision, trust_remote_code=cfg.trust_remote_code,
                                 device_map=cfg.device_map, max_memory=cfg.max_memory)
    except ConfigError as e:
        problems.append(str(e))
    if problems:
        raise ConfigError("\n".join(problems))
    assert source is not None  # resolved, or its problem was raised above
    return source


def hold_writer_lock(cfg: ExtractConfig, hold: contextlib.ExitStack) -> None:
    """One writer per store (:mod:`kava.core.locks`), its lock file beside it: an extraction holds the store's
    lock, a shard job (``--shard i/n``) holds it shared with the other jobs and its own slice's exclusively. A store
    that is not a local directory (a URL: object storage has no file locks) is not locked."""
    if remote.is_url(cfg.store):
        return
    store = Path(cfg.store)
    if not store.is_dir():
        return
    fix = "write another --store"
    if cfg.shard_slice is None:
        hold.enter_context(writer_lock(beside(store), output=store, fix=fix))
        return
    i, n = cfg.shard_slice
    hold.enter_context(writer_lock(beside(store), output=store, shared=True,
                                   fix=f"{fix}, or run only shard jobs (--shard i/n) on it"))
    hold.enter_context(writer_lock(beside(store, f".shard-{i}-of-{n}"), output=store,
                                   fix="give this job another --shard"))
    hold.enter_context(split_lock(store, n))


def _shards_to_do(cfg: ExtractConfig, store: KVStore, name: str) -> tuple[list[int], list[int]]:
    """(shards to write, complete shards kept): this job's slice, minus complete ones when resuming."""
    todo = list(range(store.num_shards))
    if cfg.shard_slice is not None:
        i, n = cfg.shard_slice
        todo = [s for s in todo if s % n == i]
    done = set(store.complete_shards(name)) & set(todo)
    if done and not cfg.resume:
        raise ConfigError(
            f"{store.where}: teacher {name!r} already has {len(done)} complete shard(s) of this slice. "
            "Pass --resume to keep them and finish the rest, or choose another --name."
        )
    return [s for s in todo if s not in done], sorted(done)


def _logit_spec(cfg: ExtractConfig, teacher_model: PreTrainedModel, teacher_tok: PreTrainedTokenizerBase
                ) -> LogitSpec | None:
    """What the teacher's stored top-k means: how many, over which vocabulary, of which tokenizer."""
    if not cfg.logit_top_k:
        return None
    head = teacher_model.get_output_embeddings()
    vocab = int(head.weight.shape[0]) if head is not None else int(teacher_model.config.vocab_size)
    if cfg.logit_top_k > vocab:
        raise ConfigError(f"--logit-top-k: expected at most the teacher's vocabulary size {vocab}. "
                          f"Got {cfg.logit_top_k} instead.")
    return LogitSpec(top_k=cfg.logit_top_k, vocab_size=vocab, tokenizer_fingerprint=tokenizer_fingerprint(teacher_tok))


def _q_layers(cfg: ExtractConfig, layers: tuple[int, ...], num_layers: int) -> tuple[int, ...]:
    if not cfg.with_q:
        return ()
    if cfg.q_layers is None:
        return layers
    chosen = tuple(cfg.q_layers)  # parsed by ExtractConfig
    bad = [l for l in chosen if not 0 <= l < num_layers]
    if bad:
        raise ConfigError(f"--q-layers: the teacher has layers 0-{num_layers - 1}. Got {bad} instead.")
    # Q is captured in the same pass as K/V, so only stored K/V layers can have their Q stored too.
    outside = [l for l in chosen if l not in layers]
    if outside:
        raise ConfigError(f"--q-layers: expected layers among the stored K/V layers {list(layers)} (set by "
                          f"--layer-map). Got {outside} instead.")
    return chosen


def _layer_map(cfg: ExtractConfig, teacher_model: PreTrainedModel, teacher_tok: PreTrainedTokenizerBase,
               grid: Sequence[GridSample], num_layers: int, log: Log
               ) -> tuple[LayerMap, dict[str, tuple[np.ndarray, dict[str, Any]]]]:
    """The layer map, plus CKA matrices computed on a calibration subset (name → (matrix, attributes))."""
    student_layers = cfg.student_layers or num_layers
    student_model = None
    if cfg.student is not None:
        student_model = models.load_model(resolve_model(cfg.student, role="student"))
        student_layers = student_model.config.num_hidden_layers
    calibration = [s for s in grid if s.status != "skipped"][: cfg.calibration_samples]
    cka = calibrate_cka(teacher_model, teacher_tok, student_model, calibration, batch_size=cfg.batch_size) \
        if calibration else {}
    ts = cka.get("teacher_student_unbiased")
    layer_map = parse_layer_map(cfg.layer_map, num_layers, student_layers, cka=None if ts is None else ts[0],
                                k=cfg.cka_top_k, estimator="unbiased")
    log(f"kava extract: layer map {layer_map.method}: {format_layer_map(layer_map)} "
        f"(teacher layer per student layer)")
    return layer_map, cka


def progress_bar(total: int, enabled: bool) -> tqdm:
    """The extraction's tqdm bar on stderr, counting samples."""
    return tqdm(total=total, unit="sample", file=sys.stderr, disable=not enabled, dynamic_ncols=True,
                desc="extract")


