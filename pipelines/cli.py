"""The `kava` command line. Callbacks only parse options, build a config and call a stage.

Heavy imports (torch, transformers, zarr, dask) happen inside the commands that need them, so `kava --help`
answers at once. Every command with ``--json`` prints only JSON on stdout; logs and progress go to stderr.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import json
import os
import shlex
import sys
from collections.abc import Callable
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import click

from kava.core.errors import KavaError, disk_full_message
from kava.core.log import human_bytes

from .cluster_config import ClusterConfig
from .options import build_config, build_configs, config_options

if TYPE_CHECKING:  # annotations only: the stages load inside their commands
    from kava.extract.config import ExtractConfig
    from kava.extract.recipe import ExtractResult
    from kava.kvstore import VerifyReport

_AFTER_DISK_FULL = {
    "extract": "What was finished is kept: free space, then rerun the same command with --resume to continue.",
    "distill": "What was finished is kept: free space, then rerun the same command with --resume to continue.",
    "run": "What was finished is kept: free space, then run the same command again; it continues where it stopped.",
}
"""What a command says to do after its disk filled (any other: free space and run it again)."""


def _version() -> str:
    try:
        return version("kava")
    except PackageNotFoundError:  # pragma: no cover - running from a source tree
        return "0+unknown"


def fail(message: str, code: int = 1) -> NoReturn:
    click.echo(f"error: {message}", err=True)
    sys.exit(code)


def run_stage(config_cls: type | tuple[type, ...], values: dict[str, Any], config_file: str | None, stage: str, *,
              record_command: bool = False, **kwargs: Any) -> Any:
    """Build ``config_cls`` (or each of several classes, e.g. ExtractConfig and ClusterConfig) from ``--config`` YAML
    and the flags, then call ``stage`` (``"module:function"``, imported only now) with it (them). Any KavaError
    becomes one ``error:`` line on stderr and exit status 1 (a full disk too: see ``_Main.invoke``)."""
    classes = config_cls if isinstance(config_cls, tuple) else (config_cls,)
    if record_command:
        values = {**values, "command": shlex.join(["kava", *sys.argv[1:]])}
    module, function = stage.split(":")
    try:
        configs = build_configs(classes, values, config_file)
        return getattr(importlib.import_module(module), function)(*configs, **kwargs)
    except KavaError as e:
        fail(str(e))


def emit_json(payload: Any) -> None:
    click.echo(json.dumps(payload, indent=2, sort_keys=False, default=str))


class _Main(click.Group):
    """Builds the commands that need their stage's config only when they are asked for (keeps --help instant)."""

    lazy: dict[str, Callable[[], click.Command]] = {}
    """name → a function building the command."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(set(super().list_commands(ctx)) | set(self.lazy))

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name in self.lazy:
            return self.lazy[name]()
        return super().get_command(ctx, name)

    def invoke(self, ctx: click.Context) -> Any:
        """A full disk in any command is one ``error:`` line saying what to do next (``_AFTER_DISK_FULL``)."""
        try:
            return super().invoke(ctx)
        except Exception as e:
            then = _AFTER_DISK_FULL.get(ctx.invoked_subcommand or "", "Free space, then run the command again.")
            message = disk_full_message(e, then)
            if message is None:
                raise
            fail(message)


@click.group(cls=_Main, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(_version(), prog_name="kava")
def main() -> None:
    """KaVa: distil reasoning from a large LLM into a small one through its key-value cache.

    Two stages with a store between them: `kava extract` runs each teacher once and writes its keys and values,
    aligned to the student's tokens, into a chunked Zarr store; `kava distill` streams that store into a student
    trainer. Teachers and student never share a GPU.
    """


def _extract_command() -> click.Command:
    from kava.extract.config import ExtractConfig  # noqa: PLC0415 - zarr: only once the command is built

    @click.command("extract", short_help="Run each teacher once over a dataset and write its aligned K/V into a store.")
    @config_options(ExtractConfig, exclude=("command", "extra", "teacher", "store"))
    @config_options(ClusterConfig, config_flag=False)
    @click.option("--store", "store", help="The store directory (created on first use). [required]")
    @click.option("--teacher", "teacher", help="Preset name (see --list-teachers), local model directory, or hub id. "
                                               "[required]")
    @click.option("--list-teachers", is_flag=True, help="List the teacher presets and exit.")
    @click.option("--json", "as_json", is_flag=True, help="Print only the run's summary as JSON on stdout.")
    def extract(list_teachers: bool, as_json: bool, config_file: str | None, **values: Any) -> None:
        """Run a teacher once over a dataset (teacher forcing) and write its K/V, aligned to the student's tokens,
        into a store. Run it again with another --teacher, --name or --prompt-template to add teachers; --resume
        finishes a killed run; --shard i/n splits the work over jobs."""
        if list_teachers:
            from kava.extract.teachers import format_preset_table  # noqa: PLC0415 - keeps kava --help free of torch

            click.echo(format_preset_table())
            return
        result = run_stage((ExtractConfig, ClusterConfig), values, config_file, "kava.pipelines.cli:extract_stage",
                           record_command=True)
        if as_json:
            emit_json(result.to_dict())

    return extract


def extract_stage(cfg: ExtractConfig, cluster: ClusterConfig) -> ExtractResult:
    """`kava extract`: in this process, or on a dask cluster with --cluster / --scheduler (``cluster``, a
    ClusterConfig; only the launcher reads it)."""
    if cluster.active:
        from .cluster import run_extract_cluster  # noqa: PLC0415 - dask.distributed and torch, only with --cluster

        return run_extract_cluster(cfg, cluster)
    from kava.extract.recipe import run_extract  # noqa: PLC0415 - keeps kava --help free of torch

    return run_extract(cfg)


def _estimate_command() -> click.Command:
    from kava.extract.config import ExtractConfig  # noqa: PLC0415 - zarr: only once the command is built

    @click.command("estimate", short_help="Predict store size and extraction time before anything runs.")
    @config_options(ExtractConfig, exclude=("command", "extra", "teacher", "store"))
    @config_options(ClusterConfig, config_flag=False)
    @click.option("--store", "store", default="(estimate)", help="Accepted so an extract command line can be reused.")
    @click.option("--teacher", "teacher", help="Preset name, local model directory, or hub id. [required]")
    @click.option("--timed-samples", default=16, show_default=True, help="Samples run through the teacher to time it.")
    @click.option("--run-config", help="Plan a `kava run` config instead (e.g. gsm8k-qwen7b4bit-to-qwen0.5b): sizes "
                                       "from the models' geometry, no teacher is loaded.")
    @click.option("--tokens-per-s", default=5000.0, show_default=True,
                  help="With --run-config: the teacher throughput to assume (tokens/s per GPU).")
    @click.option("--step-seconds", default=0.5, show_default=True,
                  help="With --run-config: the student step time to assume.")
    @click.option("--read-store", help="With --run-config: measure how fast this machine streams this store.")
    @click.option("--json", "as_json", is_flag=True, help="Print only JSON on stdout.")
    def estimate(as_json: bool, timed_samples: int, run_config: str | None, tokens_per_s: float,
                 step_seconds: float, read_store: str | None, config_file: str | None, **values: Any) -> None:
        """Takes the same options as `kava extract`; prints the store size for each storage dtype (with the
        compression measured on a timed sample) and the predicted extraction time. Writes nothing.

        With --run-config it plans a whole experiment instead: store size per dtype and layer subset, extraction
        GPU-hours and the read bandwidth a student step needs (--student-tokenizer, --data-files and --limit
        apply)."""
        from kava.extract.estimate import format_estimate  # noqa: PLC0415 - keeps kava --help free of torch

        if run_config is not None:
            from .config import load_config  # noqa: PLC0415 - the run config pulls every stage config (zarr)
            from .scale import format_plan, plan  # noqa: PLC0415 - keeps kava --help free of torch

            try:
                result = plan(load_config(run_config), student_tokenizer=values.get("student_tokenizer"),
                              data_files=values.get("data_files"), limit=values.get("limit"),
                              tokens_per_s=tokens_per_s, step_seconds=step_seconds, store=read_store)
            except KavaError as e:
                fail(str(e))
            emit_json(result) if as_json else click.echo(format_plan(result))
            return

        result = run_stage((ExtractConfig, ClusterConfig), values, config_file, "kava.pipelines.cli:estimate_stage",
                           timed_samples=timed_samples)
        emit_json(result) if as_json else click.echo(format_estimate(result))

    return estimate


def estimate_stage(cfg: ExtractConfig, cluster: ClusterConfig, *, timed_samples: int) -> dict[str, Any]:
    """`kava estimate`: the cluster options of an extract command line are accepted (and checked), not used."""
    cluster.validate(shard=cfg.shard)
    from kava.extract.estimate import estimate  # noqa: PLC0415 - keeps kava --help free of torch

    return estimate(cfg, timed_samples=timed_samples)


def _distill_command() -> click.Command:
    from kava.distill.config import DistillConfig  # noqa: PLC0415 - zarr: only once the command is built

    @click.command("distill", short_help="Train a student on cross-entropy plus K/V alignment against a store.")
    @config_options(DistillConfig, exclude=("command", "extra", "student", "out"))
    @click.option("--out", "out", help="Output directory: the trained student, checkpoints, metrics.jsonl. [required]")
    @click.option("--student", "student", help="Preset (tiny-qwen2, tiny-llama), local model directory, or hub id. "
                                               "[required]")
    @click.option("--nproc", type=int, default=None,
                  help="Run N DDP processes on this machine (launches torchrun); batch sizes are per process.")
    @click.option("--json", "as_json", is_flag=True, help="Print only the run's summary as JSON on stdout.")
    def distill(nproc: int | None, as_json: bool, config_file: str | None, **values: Any) -> None:
        """Train a student with cross-entropy plus losses that make its keys and values (and attention) follow
        the teachers' stored ones, streaming the store's shards; no teacher is loaded. Without --store it is plain
        fine-tuning on --dataset (the CE-only baseline). --resume continues a killed run exactly. --nproc N (or
        `torchrun --nproc-per-node N -m kava.pipelines.cli distill ...`) trains with DDP, each rank on its own
        shards."""
        if nproc is not None and nproc > 1 and "LOCAL_RANK" not in os.environ:
            from kava.distill.ddp import launch  # noqa: PLC0415 - keeps kava --help free of torch

            sys.exit(launch(sys.argv[2:], nproc))
        result = run_stage(DistillConfig, values, config_file, "kava.distill.trainer:run_distill", record_command=True)
        if os.environ.get("RANK", "0") != "0":
            return  # rank 0 speaks for the job
        if as_json:
            emit_json(result.to_dict())
        else:
            click.echo(f"wrote {result.out} after {result.steps} steps ({result.tokens:,} tokens, "
                       f"{result.seconds:.0f} s)", err=True)

    return distill


def _eval_command() -> click.Command:
    from kava.distill.evaluate import EvalConfig  # noqa: PLC0415 - only once the command is built

    @click.command("eval", short_help="Score a model on a reasoning dataset (greedy generation, accuracy).")
    @config_options(EvalConfig, exclude=("model",))
    @click.option("--model", "--student", "model", help="A directory written by `kava distill` (its --out), or "
                                                        "any causal LM dir/id. [required]")
    @click.option("--json", "as_json", is_flag=True, help="Print only the result as JSON on stdout.")
    def eval_(as_json: bool, config_file: str | None, **values: Any) -> None:
        """Generate greedily (batched) for each question, extract the answer (#### N, else the last number) and
        report accuracy; every item goes to a JSONL file."""
        result = run_stage(EvalConfig, values, config_file, "kava.distill.evaluate:run_eval")
        if as_json:
            emit_json(result.to_dict())
        else:
            click.echo(f"accuracy {result.accuracy:.4f} ({result.correct}/{result.n}) on {result.dataset}:"
                       f"{result.split}; items in {result.out}")
        if note := result.truncation_note():
            click.echo(f"Warning: {note}", err=True)

    return eval_


def _latent_command() -> click.Command:
    from kava.distill.latent.config import LatentConfig  # noqa: PLC0415 - only once the command is built

    @click.command("latent", short_help="Train a latent-reasoning student from its own compressed CoT cache (KaVa).")
    @config_options(LatentConfig)
    @click.option("--json", "as_json", is_flag=True, help="Print only the run's summary as JSON on stdout.")
    def latent(as_json: bool, config_file: str | None, **values: Any) -> None:
        """One model in two modes: teacher mode reads question, CoT and answer; student mode reads the question,
        --latent M continuous tokens refined by --jacobi T iterations, then the answer. The student is trained on
        the answer, the CoT, CODI's hidden-state term and the K/V of its latents against the teacher mode's CoT
        cache compressed by R-KV to M rows; --mode cot / direct train the CoT and no-CoT baselines. With
        --teacher store the K/V targets come from a CoT teacher extracted once (--export-rows, then kava extract
        --evict r-kv --kv-budget M)."""
        result = run_stage(LatentConfig, values, config_file, "kava.distill.latent.train:train_latent")
        if as_json:
            emit_json(result.to_dict())
        elif result.steps:  # --export-rows trains nothing and has said what it wrote
            click.echo(f"wrote {result.out} after {result.steps} steps ({result.seconds:.0f} s)", err=True)

    return latent


_Main.lazy.update(extract=_extract_command, estimate=_estimate_command, distill=_distill_command, eval=_eval_command,
                  latent=_latent_command)




@main.group()
def store() -> None:
    """Inspect, check, copy and share a KV store."""


@store.command("info")
@click.argument("path", type=click.Path(file_okay=False, path_type=str))
@click.option("--json", "as_json", is_flag=True, help="Print only JSON on stdout.")
def store_info(path: str, as_json: bool) -> None:
    """Summarise the store at PATH: samples, tokens, teachers, sizes."""
    from kava.kvstore import KVStore, summary  # noqa: PLC0415 - zarr: only the store commands load it

    try:
        info = summary(KVStore.open(path))
    except KavaError as e:
        fail(str(e))
    if as_json:
        emit_json(info)
        return
    click.echo(format_info(info))


def format_info(info: dict[str, Any]) -> str:
    by = info["samples_by_status"]
    lines = [
        f"store       {info['path']}  (format v{info['format_version']})",
        f"samples     {info['samples']}  ({by['ok']} ok, {by['truncated']} truncated, {by['skipped']} skipped)",
        f"tokens      {info['tokens']}  in {info['shards']} shards",
        f"student     {info['student_tokenizer']['name']}  (tokenizer {info['student_tokenizer']['fingerprint'][:12]},"
        f" vocab {info['student_tokenizer']['vocab_size']})",
        f"dataset     {info['dataset']['name']}:{info['dataset']['split']}"
        f"  (ids {info['dataset']['sample_ids_hash'][:12]})",
        f"on disk     {human_bytes(info['bytes_on_disk'])}",
    ]
    if info["created_by"]:
        lines.append(f"created by  {info['created_by']}")
    if not info["teachers"]:
        lines.append("teachers    none yet")
    for name, t in info["teachers"].items():
        ratio = (t["bytes_logical"] / t["bytes_on_disk"]) if t["bytes_on_disk"] else float("nan")
        lines += [
            f"teacher     {name}  ({t['model']}, {t['quantization']})",
            f"  layers    {t['layers']} of {t['num_layers']}, map {t['layer_map']}, alignment {t['alignment']}",
            f"  heads     {t['kv_heads']} kv x {t['head_dim']}, K {t['k_rope']}-RoPE,"
            f" Q {'layers ' + str(t['q_layers']) if t['has_q'] else 'not stored'}",
            f"  attention {t['attention']}, positions {t['positions']}"
            + (f", part of {t['part_of']}" if t["part_of"] else ""),
            f"  storage   {t['dtype']} + {t['compressor']}: {human_bytes(t['bytes_logical'])} logical,"
            f" {human_bytes(t['bytes_on_disk'])} on disk ({ratio:.2f}x)",
            f"  shards    {t['shards_complete']} of {info['shards']} complete, {t['quarantined']} samples quarantined",
        ]
        logits = t.get("logits")
        lines.append("  logits    " + (
            f"top {logits['top_k']} of {logits['vocab_size']} (tokenizer {logits['tokenizer_fingerprint'][:12]}),"
            f" {logits['bytes_per_token']} B per token" if logits else "not stored"))
        if t.get("bytes_per_token") is not None:
            lines.append(f"  per token {t['bytes_per_token']:,.0f} B logical (K/V, Q and logits)"
                         + (" per original token" if t.get("eviction") else ""))
        if ev := t.get("eviction"):  # a compressed teacher: what it kept, and what that lost
            kept = "n/a" if ev["kept_fraction"] is None else f"{100 * ev['kept_fraction']:.1f}%"
            lines.append(f"  evicted   {ev['rule']}, budget {ev['budget']} of the {', '.join(ev['segments'])} rows: "
                         f"{kept} of all rows kept")
            if ev.get("fidelity_error"):
                lines.append("  fidelity  " + " ".join(f"{e:.4f}" for e in ev["fidelity_error"])
                             + "  (per stored layer: relative error of the answer's attention output)")
        if t.get("quantization_cosine"):  # a lossy dtype: its size against float16 and its measured fidelity
            smaller = t["bytes_float16"] / max(t["bytes_on_disk"] or t["bytes_logical"], 1)
            lines.append(f"  vs fp16   K/V/Q as float16 would be {human_bytes(t['bytes_float16'])}: "
                         f"{smaller:.2f}x smaller on disk")
            lines += [f"  cosine {name}  " + " ".join(f"{c:.5f}" for c in cos)
                      + "  (per stored layer, to the teacher's)" for name, cos in t["quantization_cosine"].items()]
    return "\n".join(lines)


@store.command("verify")
@click.argument("path", type=click.Path(file_okay=False, path_type=str))
@click.option("--teacher", "teachers", multiple=True, help="Check only this teacher (repeatable).")
@click.option("--json", "as_json", is_flag=True, help="Print only JSON on stdout.")
def store_verify(path: str, teachers: tuple[str, ...], as_json: bool) -> None:
    """Check schema, completeness and every chunk's crc32c. Exit 0 when sound, 1 when not."""
    from kava.kvstore import verify_store  # noqa: PLC0415 - zarr: only the store commands load it

    try:
        report = verify_store(path, teachers=list(teachers) or None)
    except KavaError as e:
        if as_json:
            emit_json({"store": path, "ok": False, "problems": [{"where": path, "message": str(e)}]})
            sys.exit(1)
        fail(str(e))
    _print_report(report, as_json)
    sys.exit(0 if report.ok else 1)


def _print_report(report: VerifyReport, as_json: bool, sound: str = "sound") -> None:
    """A verify report as `kava store verify` prints it: JSON, or one line per problem and a summary line."""
    if as_json:
        emit_json(report.to_dict())
        return
    for p in report.problems:
        click.echo(f"PROBLEM {p}")
    for w in report.warnings:
        click.echo(f"WARNING {w}")
    status = sound if report.ok else f"{len(report.problems)} problem(s)"
    shards = ", ".join(f"{n}: {c}/{report.shards_expected} shards" for n, c in report.shards_complete.items())
    click.echo(f"{report.store}: {status}; {report.chunks_checked} chunks ({human_bytes(report.bytes_checked)}) checked"
               + (f"; {shards}" if shards else ""))


@store.command("seal")
@click.argument("path", type=click.Path(file_okay=False, path_type=str))
@click.option("--json", "as_json", is_flag=True, help="Print only JSON on stdout.")
def store_seal(path: str, as_json: bool) -> None:
    """Seal a format-1 store (no metadata digests), which readers refuse: verify it whole, then write its digests.
    Nothing is written when verify finds another problem. Exit 0 when sealed, 1 when not."""
    from kava.core.locks import beside, writer_lock  # noqa: PLC0415
    from kava.kvstore import seal_store  # noqa: PLC0415 - zarr: only the store commands load it

    try:
        with contextlib.ExitStack() as hold:
            if Path(path).is_dir():  # (a lock file beside a path that is no store would be litter)
                hold.enter_context(writer_lock(beside(Path(path)), output=Path(path), fix="wait, then seal it"))
            report = seal_store(path)
    except KavaError as e:
        fail(str(e))
    _print_report(report, as_json, sound="sealed")
    sys.exit(0 if report.ok else 1)


@store.command("cp")
@click.argument("source")
@click.argument("destination")
@click.option("--json", "as_json", is_flag=True, help="Print only JSON on stdout.")
def store_cp(source: str, destination: str, as_json: bool) -> None:
    """Copy the store at SOURCE to DESTINATION, each a path or a URL (s3://bucket/kv.zarr), either way.

    Every chunk's crc32c is checked as it is read and the copy is verified whole at the end (the manifest goes
    last). A destination holding a store is refused; run a killed copy again to resume it."""
    from tqdm import tqdm  # noqa: PLC0415 - only this command shows a bar

    from kava.kvstore.create import copy_store  # noqa: PLC0415 - zarr: only the store commands load it

    try:
        with tqdm(unit="B", unit_scale=True, desc="copy", disable=None, file=sys.stderr) as bar:
            report = copy_store(source, destination, progress=bar.update)
    except KavaError as e:
        fail(str(e))
    if as_json:
        emit_json(dataclasses.asdict(report))
        return
    kept = f", kept {report.objects_kept} from an interrupted copy" if report.objects_kept else ""
    click.echo(f"{report.destination}: copied {report.objects_copied} objects ({human_bytes(report.bytes_copied)}) "
               f"from {report.source}{kept}; {report.chunks_checked} chunks checked; verified sound")


def _hub_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """--hub-dir and --revision, shared by `kava store push|pull` and `kava push|pull`."""
    command = click.option("--revision", default="main", show_default=True,
                           help="The branch pushed to or pulled from (in a --hub-dir: a subfolder of the repo)."
                           )(command)
    return click.option("--hub-dir", envvar="KAVA_HUB_DIR", show_envvar=True, type=click.Path(file_okay=False),
                        help="A local directory standing in for the Hub (DIR/datasets/OWNER/NAME/, "
                             "DIR/models/OWNER/NAME/). Default: the Hugging Face Hub (HF_ENDPOINT for a private one; "
                             "token from HF_TOKEN or `hf auth login`).")(command)


def _hub_call(function: str, *args: Any, write: bool, hub_dir: str | None, **kwargs: Any) -> Any:
    """Run ``pipelines.hub.<function>`` against the backend --hub-dir chooses; a KavaError is one ``error:`` line."""
    from . import hub  # noqa: PLC0415 - huggingface_hub's client and zarr: only these commands load them

    try:
        return getattr(hub, function)(*args, hub=hub.open_hub(hub_dir, write=write),
                                      log=lambda m: click.echo(m, err=True), **kwargs)
    except KavaError as e:
        fail(str(e))


@store.command("push")
@click.argument("path", type=click.Path(file_okay=False, path_type=str))
@click.argument("repo_id")
@_hub_options
@click.option("--private", is_flag=True, help="Create the repo private (an existing repo keeps its visibility).")
@click.option("--json", "as_json", is_flag=True, help="Print only JSON on stdout.")
def store_push(path: str, repo_id: str, hub_dir: str | None, revision: str, private: bool, as_json: bool) -> None:
    """Push the store at PATH to the dataset repo REPO_ID (owner/name), with a dataset card written from its manifest.

    Refused unless it verifies whole and every teacher is complete (`kava store verify`). A store at a URL is
    copied here first with `kava store cp`. Pull it back with `kava store pull`."""
    report = _hub_call("push_store", path, repo_id, write=True, hub_dir=hub_dir, revision=revision, private=private)
    if as_json:
        emit_json(dataclasses.asdict(report))
        return
    click.echo(f"{report.source}: pushed {report.files} files ({human_bytes(report.bytes)}) to dataset repo "
               f"{report.repo} ({report.revision}) on {report.where}; store digest {report.digest}")


@store.command("pull")
@click.argument("repo_id")
@click.argument("dest", type=click.Path(file_okay=False, path_type=str))
@_hub_options
@click.option("--json", "as_json", is_flag=True, help="Print only JSON on stdout.")
def store_pull(repo_id: str, dest: str, hub_dir: str | None, revision: str, as_json: bool) -> None:
    """Download the store in the dataset repo REPO_ID into DEST, then verify it whole (as `kava store verify`).

    DEST must be empty or new; run an interrupted pull again to resume it. A copy that fails verification is not
    left as an openable store."""
    report = _hub_call("pull_store", repo_id, dest, write=False, hub_dir=hub_dir, revision=revision)
    _print_pull(report, as_json)


def _print_pull(report: Any, as_json: bool) -> None:
    if as_json:
        emit_json(dataclasses.asdict(report))
        return
    click.echo(f"{report.dest}: pulled {report.kind} repo {report.repo} ({report.revision}) from {report.where}"
               + (", resumed" if report.resumed else "") + f": {report.files} files ({human_bytes(report.bytes)}); "
               f"checked {report.checked}")


@main.command("run", short_help="Run a whole experiment from a YAML config (default: the embedded one).")
@click.argument("config", required=False, type=click.Path(dir_okay=False))
@click.option("--check", is_flag=True, help="Only validate the config (every problem at once) and exit.")
@click.option("--force", "force", multiple=True, metavar="STAGE",
              help="Redo a stage even if its outputs are there: data, teachers, extract, distill, eval or report "
                   "(repeatable).")
@click.option("--out", "out", help="Parent directory of the run (overrides the config's `out`).")
@click.option("--name", "name", help="The run's name (overrides the config's `name`).")
@click.option("--json", "as_json", is_flag=True, help="Print only the run's summary as JSON on stdout.")
def run(config: str | None, check: bool, force: tuple[str, ...], out: str | None, name: str | None,
        as_json: bool) -> None:
    """Run an experiment end to end: data splits, teachers, one store, each variant x seed, eval, report.

    With no CONFIG it runs the embedded default (offline, minutes on a laptop CPU): a teacher trained here on
    synthetic arithmetic, a smaller student with another tokenizer, CE-only vs CE + K/V at equal compute over five
    seeds, and a report with significance tests. A rerun reuses every finished stage; --force redoes one.
    CONFIG is a YAML file or the name of a shipped config: default, multi-teacher, ablation, alignment, codecs,
    convergence-quick (and the longer convergence-*), gsm8k-qwen7b4bit-to-qwen0.5b, latent (the KaVa paper's
    latent reasoning: `kind: latent` configs train `kava latent` students).
    """
    from .config import check_force, config_data, parse_config  # noqa: PLC0415 - every stage config (zarr)
    from .latent_run import is_latent_config, parse_latent_config  # noqa: PLC0415 - as the line above

    try:
        data, source = config_data(config)
        latent = is_latent_config(data)
        cfg: Any = parse_latent_config(data, source=source) if latent else parse_config(data, source=source)
        check_force(force)
        if out is not None:
            cfg.out = out
        if name is not None:
            cfg.name = name
        if check:
            teachers = ("a CoT teacher" if cfg.needs_teacher else "no teacher") if latent else \
                f"{len(cfg.teachers)} teachers"
            click.echo(f"{config or 'embedded default'}: ok ({teachers}, {len(cfg.variants)} "
                       f"variants x {len(cfg.seeds)} seeds)", err=True)
            return
        from .runner import Runner  # noqa: PLC0415 - every stage (torch): `kava run --check` validates without it

        if latent:
            from .latent_run import LatentRunner  # noqa: PLC0415 - as the line above

            result = LatentRunner(cfg, force=force).run()
        else:
            result = Runner(cfg, force=force).run()
    except KavaError as e:
        fail(str(e))
    if as_json:
        emit_json({"root": str(result.root), "report": str(result.report), "ran": result.ran,
                   "timings": result.timings})
    else:
        click.echo(f"report: {result.report}", err=True)


@main.command("push", short_help="Push a distilled student to a model repo on the Hub, with a model card.")
@click.argument("student", type=click.Path(file_okay=False, path_type=str))
@click.argument("repo_id")
@_hub_options
@click.option("--results", type=click.Path(dir_okay=False, path_type=str),
              help="An evaluation for the card: the JSONL `kava eval --out` writes, the summary `kava eval --json` "
                   "prints, or a `kava run` report.json.")
@click.option("--store-repo", help="The dataset repo its store was pushed to (`kava store push`): listed in the "
                                   "card, and read for the store's digest when the store is not on this machine.")
@click.option("--private", is_flag=True, help="Create the repo private (an existing repo keeps its visibility).")
@click.option("--json", "as_json", is_flag=True, help="Print only JSON on stdout.")
def push(student: str, repo_id: str, hub_dir: str | None, revision: str, results: str | None,
         store_repo: str | None, private: bool, as_json: bool) -> None:
    """Push the student in STUDENT (the --out of `kava distill` or `kava latent`) to the model repo REPO_ID: its
    weights, tokenizer, kava.json (a latent student's latent.json and latent.safetensors), config.yaml and a model
    card naming its teachers, the store's digest, the objective, steps and final losses. Pull it with `kava pull`
    (stores: `kava store push|pull`)."""
    report = _hub_call("push_student", student, repo_id, write=True, hub_dir=hub_dir, revision=revision,
                       private=private, results=results, store_repo=store_repo)
    if as_json:
        emit_json(dataclasses.asdict(report))
        return
    click.echo(f"{report.source}: pushed {report.files} files ({human_bytes(report.bytes)}) and its card to model repo "
               f"{report.repo} ({report.revision}) on {report.where}")


@main.command("pull", short_help="Download a student pushed by `kava push` and check every file's sha256.")
@click.argument("repo_id")
@click.argument("dest", type=click.Path(file_okay=False, path_type=str))
@_hub_options
@click.option("--json", "as_json", is_flag=True, help="Print only JSON on stdout.")
def pull(repo_id: str, dest: str, hub_dir: str | None, revision: str, as_json: bool) -> None:
    """Download the student in the model repo REPO_ID into DEST and check every file against the sha256 its card
    records; DEST then loads with `from_pretrained` and `kava eval --model DEST`. DEST must be empty or new; run an
    interrupted pull again to resume it. Stores: `kava store pull`."""
    _print_pull(_hub_call("pull_student", repo_id, dest, write=False, hub_dir=hub_dir, revision=revision), as_json)


@main.command("compare", short_help="Finished runs side by side by the students' data size (table and figure).")
@click.argument("runs", nargs=-1, required=True, type=click.Path(file_okay=False))
@click.option("--out", "out", required=True, type=click.Path(file_okay=False),
              help="Folder for compare.md and figures/accuracy-by-data.png.")
def compare(runs: tuple[str, ...], out: str) -> None:
    """Put finished `kava run` folders (RUNS: runs/NAME ...) side by side by the size of the students' training
    split: each run's accuracy per variant, its paired Δ against the baseline, and accuracy against data size
    with seed bands. Nothing is retrained; the numbers are the runs' own report.json."""
    from .compare import compare_runs  # noqa: PLC0415 - matplotlib, as `kava run`'s report

    try:
        path = compare_runs([Path(r) for r in runs], Path(out))
    except KavaError as e:
        fail(str(e))
    click.echo(f"comparison: {path}", err=True)


@main.command("cka", short_help="Layer-by-layer CKA of a teacher's stored K/V, out of core with dask.")
@click.option("--store", "store", required=True, help="The store: a directory or a URL (s3://bucket/kv.zarr).")
@click.option("--teacher", required=True, help="The teacher whose layers are compared.")
@click.option("--vs", default=None, help="Compare with this other teacher of the store instead of with itself.")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Directory for .npy, .csv, .png, .json.")
@click.option("--array", default="k", show_default=True, help="Features: k, v or kv (both concatenated).")
@click.option("--estimator", default="biased", show_default=True,
              help="biased (linear CKA) or unbiased (minibatch HSIC_1, one minibatch per block).")
@click.option("--block-tokens", default=4096, show_default=True, help="Tokens per block held in memory.")
@click.option("--segments", default=None, help="Only tokens of these segments, e.g. reasoning,answer.")
@click.option("--json", "as_json", is_flag=True, help="Print only the result as JSON on stdout.")
def cka(store: str, teacher: str, vs: str | None, out: str, array: str, estimator: str, block_tokens: int,
        segments: str | None, as_json: bool) -> None:
    """Linear CKA between every pair of a teacher's stored layers (or against another teacher's), computed out
    of core with dask: memory stays near one block of tokens. Writes the matrix as .npy and .csv, a heatmap .png
    and a .json summary into --out."""
    from kava.analysis.cka import run_cka  # noqa: PLC0415 - keeps kava --help free of torch

    try:
        result = run_cka(store, teacher, vs=vs, out=out, array=array, estimator=estimator, block_tokens=block_tokens,
                         segments=segments.split(",") if segments else None,
                         log=lambda line: click.echo(line, err=True))
    except KavaError as e:
        fail(str(e))
    if as_json:
        emit_json(result.to_dict())


def _write_scripts(scripts: list[tuple[str, str]], out_dir: str | None) -> None:
    """Print one script to stdout, or write each to ``out_dir/<name>.sbatch`` and say how to submit them."""
    if out_dir is None:
        if len(scripts) != 1:
            fail(f"This renders {len(scripts)} scripts ({', '.join(n for n, _ in scripts)}): pass --out-dir DIR.")
        click.echo(scripts[0][1], nl=False)
        return
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    for name, text in scripts:
        path = Path(out_dir) / f"{name}.sbatch"
        path.write_text(text)
        click.echo(f"wrote {path}", err=True)


def _slurm_command(stage: str) -> click.Command:
    """`kava slurm extract|distill`: every option of the stage, the Slurm options, and where the script goes."""
    # Imported when the command is built, like the stage commands' configs.
    from .slurm import SlurmOptions, render_distill, render_extract, render_verify  # noqa: PLC0415 - zarr

    if stage == "extract":
        from kava.extract.config import ExtractConfig as cls  # noqa: PLC0415 - zarr: only once the command is built

        required, exclude = ("teacher", "store"), ("command", "extra", "shard", "resume")
    else:
        from kava.distill.config import DistillConfig as cls  # noqa: PLC0415 - zarr: only once the command is built

        required, exclude = ("student", "out"), ("command", "extra", "resume")
    slurm_fields = {f.name for f in dataclasses.fields(SlurmOptions)}

    @click.command(stage, short_help=f"An sbatch script for `kava {stage}`"
                   + (" (a job array over shards)." if stage == "extract" else " under torchrun."))
    @config_options(SlurmOptions, config_flag=False)
    @config_options(cls, exclude=exclude + required)
    @click.option("--jobs", default=8, show_default=True,
                  help="Extraction: array tasks (each writes 1/N of the shards).")
    @click.option("--out-dir", help="Write <job-name>.sbatch files here instead of printing the script.")
    def command(jobs: int, out_dir: str | None, config_file: str | None, **values: Any) -> None:
        slurm_values = {k: values.pop(k) for k in list(values) if k in slurm_fields}
        try:
            opts = SlurmOptions(**{k: v for k, v in slurm_values.items() if v is not None})
            cfg = build_config(cls, values, config_file)
            if stage == "extract":
                scripts = [(f"{opts.job_name}-extract", render_extract(cfg, opts, jobs=jobs)),
                           (f"{opts.job_name}-verify", render_verify(cfg, opts))]
                scripts = scripts if out_dir else scripts[:1]
            else:
                scripts = [(f"{opts.job_name}-distill", render_distill(cfg, opts))]
        except KavaError as e:
            fail(str(e))
        _write_scripts(scripts, out_dir)

    for name in reversed(required):  # the stage's required options, spelled as in `kava extract|distill`
        command = click.option(f"--{name}", name, help=f"As in `kava {stage}`. [required]")(command)
    return command


class _SlurmGroup(click.Group):
    """Builds `extract` and `distill` (options from their stage's config) only when they are asked for."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(set(super().list_commands(ctx)) | {"extract", "distill"})

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        return _slurm_command(name) if name in ("extract", "distill") else super().get_command(ctx, name)


@main.group("slurm", cls=_SlurmGroup, short_help="Render sbatch scripts: extraction job arrays, torchrun distillation.")
def slurm() -> None:
    """Render sbatch scripts from the same options (or config) as the commands they run: `kava slurm extract` is a
    job array whose task i writes shards i, i+N, ... of one store (`--shard i/N --resume`, so a requeued task
    finishes its slice); `kava slurm distill` launches torchrun on every node with a c10d rendezvous on the first;
    `kava slurm run CONFIG` renders one stage of a `kava run` experiment. Print to stdout or write to --out-dir."""


@slurm.command("run", short_help="The scripts of one stage of a `kava run` experiment.")
@click.argument("config", type=str)
@click.option("--stage", type=click.Choice(["extract", "distill"]), required=True)
@click.option("--jobs", default=8, show_default=True, help="Extraction: array tasks per teacher.")
@click.option("--out-dir", required=True, help="Directory for the <name>.sbatch files.")
def slurm_run(config: str, stage: str, jobs: int, out_dir: str) -> None:
    """One script per teacher (extraction array + verify) or per variant and seed (distillation), at the paths
    `kava run CONFIG` uses, so `kava run` picks up a store the cluster extracted."""
    from .config import load_config  # noqa: PLC0415 - the run config pulls every stage config (zarr)
    from .slurm import SlurmOptions, render_from_run_config  # noqa: PLC0415 - stage configs (zarr)

    try:
        scripts = render_from_run_config(load_config(config), SlurmOptions(), stage=stage, jobs=jobs, config=config)
    except KavaError as e:
        fail(str(e))
    _write_scripts(scripts, out_dir)


@main.command("doctor", short_help="Check what a cluster run needs: CUDA, bitsandbytes, cached models, disk, dask.")
@click.argument("config", required=False)
@click.option("--store", help="Where the store goes (default: the config's run directory).")
@click.option("--teacher", "teachers", multiple=True, help="A teacher to check (preset, hub id or directory).")
@click.option("--student", "students", multiple=True, help="A student to check.")
@click.option("--slurm", "use_slurm", is_flag=True, help="Also require dask-jobqueue and the Slurm commands.")
@click.option("--json", "as_json", is_flag=True, help="Print only JSON on stdout.")
def doctor(config: str | None, store: str | None, teachers: tuple[str, ...], students: tuple[str, ...],
           use_slurm: bool, as_json: bool) -> None:
    """Check this machine for a run of CONFIG (a `kava run` YAML or a shipped config's name) or of the given
    teachers and students: Python and torch, CUDA devices, bitsandbytes' backend, every model in the local Hugging
    Face cache when offline, free disk for the estimated store, write access, dask and dask-jobqueue. Exit 0 when
    nothing fails, 1 otherwise; each problem names its fix."""
    from .doctor import run_doctor  # noqa: PLC0415 - its checks (zarr, the hub client): only `kava doctor` loads them

    try:
        report = run_doctor(config, store=store, teachers=teachers, students=students, slurm=use_slurm)
    except KavaError as e:
        fail(str(e))
    emit_json(report.to_dict()) if as_json else click.echo(report.format())
    sys.exit(0 if report.ok else 1)


if __name__ == "__main__":  # pragma: no cover
    main()
