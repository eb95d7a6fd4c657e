"""`kava doctor`: check what a cluster run needs on this machine and say what is missing, with the fix.

Each check is a row: ``ok``, ``warn`` (the run can go on, perhaps slower or with a manual step) or ``fail`` (the run
would stop). Nothing is downloaded, loaded onto a GPU or left behind: models are looked up as files in the local
Hugging Face cache, and the write check creates and removes one temporary file.

The checks answer "can *this* machine run it", so run the doctor where the job will run (``srun --gpus=1 kava
doctor CONFIG``, or first thing in a job script). A config that asks for ``device: cuda`` therefore fails the CUDA
row on a machine without a GPU; without that ask, a missing GPU is a warning.

The store-size estimate needs no model: per teacher, the stored bytes per student token from its geometry (the
model's ``config.json`` when it is local or cached, else the published geometry of the models the shipped configs
name) — K and V on the layers its layer map stores, plus Q where ``with_q`` asks for it, in its ``kv_dtype`` — times
the student-train rows times ``tokens_per_sample``, uncompressed (blosc-zstd saves ~1.26×, so this errs on the
safe side). ``kava estimate`` predicts it from the real data and model when they are at hand.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import shutil
import sys
import tempfile
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from types import ModuleType
from typing import Any, Literal

from huggingface_hub import try_to_load_from_cache

from kava.core.errors import ConfigError
from kava.core.hub import hub_cache_dir, hub_offline
from kava.core.models import import_bitsandbytes
from kava.distill.student import PRESETS as STUDENT_PRESETS
from kava.extract.estimate import bytes_per_token
from kava.extract.teachers import PRESETS

from .config import RunConfig, load_config
from .scale import KNOWN_GEOMETRY, stored_layers

Status = Literal["ok", "warn", "fail"]

TOKENS_PER_SAMPLE = 224
"""Mean student tokens per sample for the size estimate: GSM8K's train split averages 181 Qwen2.5 tokens a problem
(question and worked answer, plain template); a chat or cot template adds a few dozen."""
GSM8K_ROWS = {"train": 7473, "test": 1319}
"""Rows of the GSM8K splits, for a config that takes the whole split (pool_size: null)."""
SYNTHETIC_DEFAULT_ROWS = 2000
"""Rows ``load_rows`` generates for the synthetic dataset without a limit."""
HEADROOM = 1.25
"""Free disk below this multiple of the estimate is a warning: the estimate is rough and the disk is shared."""


@dataclass(frozen=True)
class Check:
    """One row of the report."""

    name: str
    status: Status
    detail: str
    fix: str = ""


@dataclass
class DoctorReport:
    """Every check, in the order they ran."""

    checks: list[Check] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """No check failed (warnings allowed)."""
        return not self.problems

    @property
    def problems(self) -> list[Check]:
        return [c for c in self.checks if c.status == "fail"]

    @property
    def warnings(self) -> list[Check]:
        return [c for c in self.checks if c.status == "warn"]

    def check(self, name: str) -> Check:
        """The row called ``name`` (KeyError when there is none)."""
        for c in self.checks:
            if c.name == name:
                return c
        raise KeyError(name)

    def to_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, "problems": len(self.problems), "warnings": len(self.warnings),
                "checks": [asdict(c) for c in self.checks]}

    def format(self) -> str:
        """An aligned table, a ``fix:`` line under each row that has one, and a last line: ``ready`` or
        ``N problems``."""
        width = max((len(c.name) for c in self.checks), default=0)
        lines = []
        for c in self.checks:
            lines.append(f"{c.status.upper():<4}  {c.name:<{width}}  {c.detail}")
            if c.fix and c.status != "ok":
                lines.append(f"{'':<4}  {'':<{width}}  fix: {c.fix}")
        n = len(self.problems)
        lines.append("ready" if n == 0 else f"{n} problem{'s' if n > 1 else ''}")
        return "\n".join(lines)


def run_doctor(config: str | None = None, *, store: str | None = None, teachers: Sequence[str] = (),
               students: Sequence[str] = (), slurm: bool = False,
               tokens_per_sample: int = TOKENS_PER_SAMPLE) -> DoctorReport:
    """Check this machine for a run of ``config`` (a ``kava run`` YAML path or shipped config name) and/or of the
    given teachers, students and store.

    ``teachers`` take presets (``qwen-7b-4bit``), hub ids or local directories; ``students`` hub ids, directories or
    student presets. ``store`` (or the config's ``<out>/<name>/kv.zarr``) is where free disk and write access are
    checked; the output directory written to is the config's run directory, else the store. ``slurm`` makes
    ``dask_jobqueue`` and the Slurm commands required rather than optional.

    Expected CLI: ``kava doctor [CONFIG] [--store PATH] [--teacher NAME]... [--student NAME]... [--slurm] [--json]``,
    printing ``format()`` (or ``to_dict()`` as JSON) and exiting 0 when ``ok``, 1 otherwise.
    """
    report = DoctorReport()
    add = report.checks.append
    run: RunConfig | None = None
    if config is not None:
        try:
            run = load_config(config)
            add(Check("config", "ok", f"{config}: {len(run.teachers)} teacher(s), {len(run.variants)} variant(s) x "
                                      f"{len(run.seeds)} seed(s), device {run.device or 'cpu'}"))
        except ConfigError as e:
            add(Check("config", "fail", str(e).replace("\n", " "), f"fix the config (`kava run {config} --check`)"))

    # What the run asks for: devices, models, quantization.
    wants_cuda = run is not None and (run.device or "").startswith("cuda")
    models: list[tuple[str, str, str]] = []  # (row name, name as given, kind: teacher | student | tokenizer)
    quantized: list[str] = []
    if run is not None:
        for t in run.teachers:
            if t.model is not None:
                models.append((f"teacher {t.name}", t.model, "teacher"))
                if _quantization(t.model, t.extract) != "none":
                    quantized.append(t.name)
        models.append(("student", run.student.model, "student"))
        if run.student.tokenizer is not None:
            models.append(("student tokenizer", run.student.tokenizer, "tokenizer"))
    for name in teachers:
        models.append((f"teacher {name}", name, "teacher"))
        if _quantization(name, {}) != "none":
            quantized.append(name)
    for name in students:
        models.append((f"student {name}", name, "student"))

    add(_python())
    torch_row, torch = _torch(wants_cuda)
    add(torch_row)
    add(_cuda(torch, wants_cuda))
    add(_bitsandbytes(quantized))
    offline = hub_offline()
    cache = hub_cache_dir()
    add(Check("hub cache", "ok", f"{cache} ({'offline: models must be here' if offline else 'online'})"))
    for row, name, kind in models:
        add(_model(row, name, kind, cache, offline))
    if run is not None:
        add(_dataset(run, cache, offline))

    store_path = Path(store) if store is not None else (run.root / "kv.zarr" if run is not None else None)
    out_dir = run.root if run is not None else store_path
    if store_path is not None:
        add(_disk(run, store_path, cache, tokens_per_sample))
    if out_dir is not None:
        add(_writable(out_dir))

    for module, required in (("dask", True), ("distributed", True), ("dask_jobqueue", slurm)):
        add(_module(module, required))
    if slurm:
        add(_slurm_commands())
    return report


# ---------------------------------------------------------------------------------------------------------------------
# Software


def _python() -> Check:
    v = sys.version_info
    text = f"{v.major}.{v.minor}.{v.micro} ({sys.executable})"
    if v < (3, 11):
        return Check("python", "fail", text, "use Python 3.11 or newer")
    return Check("python", "ok", text)


def _torch(wants_cuda: bool) -> tuple[Check, ModuleType | None]:
    try:
        import torch  # noqa: PLC0415 - the check itself: the doctor runs, and says so, where torch is missing
    except ImportError:
        return Check("torch", "fail", "not installed", "install the torch build for this machine first "
                                                       "(see README: a CUDA build on GPU nodes)"), None
    build = torch.version.cuda
    detail = f"{torch.__version__} ({'CUDA ' + build if build else 'CPU-only build'})"
    if wants_cuda and not build:
        return Check("torch", "fail", detail, "the config asks for device: cuda; install a CUDA build of torch"), torch
    return Check("torch", "ok", detail), torch


def _cuda(torch: ModuleType | None, wants_cuda: bool) -> Check:
    if torch is not None and torch.cuda.is_available():
        devices = []
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            devices.append(f"{i}: {p.name} ({p.total_memory / 2**30:.0f} GiB)")
        return Check("cuda", "ok", f"{len(devices)} device(s): {'; '.join(devices)}")
    fix = "run the doctor (and the job) on a GPU node, e.g. `srun --gpus=1 kava doctor CONFIG`"
    if wants_cuda:
        return Check("cuda", "fail", "no CUDA device here, and the config asks for device: cuda", fix)
    return Check("cuda", "warn", "no CUDA device here: stages run on CPU", fix)


def _bitsandbytes(quantized: list[str]) -> Check:
    """Importable, and on which backend. Only a problem when a quantized (4-/8-bit) teacher is asked for."""
    needed = f" (needed by {', '.join(quantized)})" if quantized else ""
    if importlib.util.find_spec("accelerate") is None and quantized:
        return Check("bitsandbytes", "fail", f"accelerate is not installed{needed}", "pip install accelerate")
    try:
        import_bitsandbytes()  # imports it quietly, as the teachers do
        import bitsandbytes  # noqa: PLC0415 - an optional package, and the check itself
    except (ConfigError, ImportError, RuntimeError) as e:
        status: Status = "fail" if quantized else "warn"
        return Check("bitsandbytes", status, f"not importable: {e}{needed}", "pip install bitsandbytes")
    backend = str(getattr(getattr(bitsandbytes, "cextension", None), "BNB_BACKEND", "unknown"))
    detail = f"{bitsandbytes.__version__}, backend {backend}{needed}"
    if quantized and backend.upper() == "CPU":
        return Check("bitsandbytes", "warn", detail + ": 4-/8-bit teachers run on CPU, slowly",
                     "on a GPU node, install torch with CUDA and a bitsandbytes build for it")
    return Check("bitsandbytes", "ok", detail)


def _module(name: str, required: bool) -> Check:
    try:
        with warnings.catch_warnings():
            # Only "can it be imported" is asked here; a library's deprecation notes are not this check's business.
            warnings.simplefilter("ignore")
            importlib.import_module(name)
    except ImportError as e:
        package = name.replace("_", "-")
        return Check(name, "fail" if required else "warn", f"not importable ({e})", f"pip install {package}")
    try:
        v = version(name.replace("_", "-"))
    except PackageNotFoundError:
        v = "version unknown"
    return Check(name, "ok", v)


def _slurm_commands() -> Check:
    missing = [c for c in ("sbatch", "srun", "scontrol") if shutil.which(c) is None]
    if missing:
        return Check("slurm", "fail", f"{', '.join(missing)} not on PATH",
                     "run on a Slurm login node, or load its module (module load slurm)")
    return Check("slurm", "ok", f"sbatch at {shutil.which('sbatch')}")


# ---------------------------------------------------------------------------------------------------------------------
# Models and data in the local Hugging Face cache


def _hub_id(name: str) -> tuple[str, str | None]:
    """``(hub id or path, preset name)``: a teacher preset resolves to its checkpoint's hub id."""
    preset = PRESETS.get(name.strip().lower())
    return (preset.hf_id, preset.name) if preset else (name, None)


def _quantization(name: str, extract: dict[str, Any]) -> str:
    if extract.get("load_in_4bit"):
        return "nf4"
    if extract.get("load_in_8bit"):
        return "int8"
    preset = PRESETS.get(name.strip().lower())
    return preset.quantization if preset else "none"


def _cached(repo: str, filename: str, cache: Path, repo_type: str = "model") -> Path | None:
    found = try_to_load_from_cache(repo, filename, cache_dir=cache, repo_type=repo_type)
    return Path(found) if isinstance(found, str) else None


def _missing_files(repo: str, kind: str, cache: Path) -> list[str]:
    """Files a ``kind`` (teacher, student, tokenizer) needs that the cache lacks; config.json alone if absent."""
    if kind != "tokenizer" and _cached(repo, "config.json", cache) is None:
        return ["config.json"]
    missing = []
    if kind != "tokenizer":  # the weights: one file, or every shard an index lists
        index = next((f for f in ("model.safetensors.index.json", "pytorch_model.bin.index.json")
                      if _cached(repo, f, cache) is not None), None)
        if index is not None:
            shards = sorted(set(json.loads(_cached(repo, index, cache).read_text())["weight_map"].values()))
            missing += [s for s in shards if _cached(repo, s, cache) is None]
        elif not any(_cached(repo, f, cache) for f in ("model.safetensors", "pytorch_model.bin")):
            missing.append("model.safetensors")
    if _cached(repo, "tokenizer.json", cache) is None:  # fast tokenizers only: alignment needs offsets
        missing.append("tokenizer.json")
    return missing


def _model(row: str, name: str, kind: str, cache: Path, offline: bool) -> Check:
    if kind == "student" and name.lower() in STUDENT_PRESETS:
        return Check(row, "ok", f"{name}: a preset, built here at random")
    repo, preset = _hub_id(name)
    path = Path(name).expanduser()
    if preset is None and path.is_dir():
        wanted = "tokenizer.json" if kind == "tokenizer" else "config.json"
        if (path / wanted).is_file():
            return Check(row, "ok", f"local directory {path}")
        return Check(row, "fail", f"local directory {path} has no {wanted}",
                     "pass a directory written by save_pretrained")
    if preset is None and (name.startswith((".", "/", "~")) or name.count("/") != 1):
        return Check(row, "fail", f"{name}: no such directory, and not a hub id (org/name) or preset",
                     "pass a local model directory, a hub id or a preset (`kava extract --list-teachers`)")
    shown = f"{name} ({repo})" if preset else repo
    missing = _missing_files(repo, kind, cache)
    if not missing:
        snapshot = _cached(repo, "config.json" if kind != "tokenizer" else "tokenizer.json", cache)
        return Check(row, "ok", f"{shown}: cached ({snapshot.parent if snapshot else cache})")
    what = "not in the cache" if missing == ["config.json"] else f"incomplete in the cache: no {', '.join(missing)}"
    fix = (f"on a machine with hub access, `hf download {repo}` (older huggingface_hub: `huggingface-cli download "
           f"{repo}`), then copy the cache here or point HF_HOME at it")
    if offline:
        return Check(row, "fail", f"{shown}: {what}, and HF_HUB_OFFLINE=1 forbids downloading it", fix)
    return Check(row, "warn", f"{shown}: {what}; it will be downloaded on first use (compute nodes are often "
                              "offline)", fix)


def _dataset(run: RunConfig, cache: Path, offline: bool) -> Check:
    d = run.data
    if d.dataset == "synthetic":
        return Check("dataset", "ok", "synthetic: generated here")
    if d.dataset != "gsm8k":
        ok = Path(d.dataset).is_file()
        return Check("dataset", "ok" if ok else "fail", f"{d.dataset}{'' if ok else ': no such file'}",
                     "" if ok else "set data.dataset to an existing JSONL/Parquet file")
    files = [f for f in (d.data_files, d.eval_files) if f]
    if files:
        absent = [f for f in files if not Path(f).is_file()]
        if absent:
            return Check("dataset", "fail", f"gsm8k: {', '.join(absent)} not found",
                         "set data.data_files / data.eval_files to existing GSM8K JSONL files")
        if d.data_files and d.eval_files:
            return Check("dataset", "ok", f"gsm8k from {', '.join(files)}")
    # The hub dataset: the datasets library keeps it in the hub cache and/or its own processed cache.
    datasets_cache = Path(os.environ.get("HF_DATASETS_CACHE") or Path(cache).parent / "datasets")
    in_hub = _cached("openai/gsm8k", "README.md", cache, repo_type="dataset") is not None
    processed = datasets_cache.is_dir() and any(p.name.startswith("openai___gsm8k") for p in datasets_cache.iterdir())
    if in_hub or processed:
        return Check("dataset", "ok", f"gsm8k: cached ({cache if in_hub else datasets_cache})")
    fix = ("`hf download openai/gsm8k --repo-type dataset` where the hub is reachable, or set data.data_files and "
           "data.eval_files to local GSM8K JSONL files")
    if offline or os.environ.get("HF_DATASETS_OFFLINE") == "1":
        return Check("dataset", "fail", "gsm8k (openai/gsm8k) is not cached, and offline mode forbids downloading "
                                        "it", fix)
    return Check("dataset", "warn", "gsm8k (openai/gsm8k) is not cached; it will be downloaded on first use", fix)


# ---------------------------------------------------------------------------------------------------------------------
# Disk


def _existing_ancestor(path: Path) -> Path:
    path = path.expanduser().absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _geometry(name: str, cache: Path) -> tuple[tuple[int, int, int, int], str] | None:
    """``((layers, heads, kv_heads, head_dim), source)`` from a local or cached config.json, else the published
    geometry of a model the shipped configs name; None when neither is at hand."""
    repo, _ = _hub_id(name)
    local = Path(name).expanduser() / "config.json"
    config = local if local.is_file() else _cached(repo, "config.json", cache)
    if config is not None:
        c = json.loads(config.read_text())
        heads = c.get("num_attention_heads")
        if c.get("num_hidden_layers") and heads:
            head_dim = c.get("head_dim") or c["hidden_size"] // heads
            return (c["num_hidden_layers"], heads, c.get("num_key_value_heads") or heads, head_dim), "its config.json"
    if repo in KNOWN_GEOMETRY:
        return KNOWN_GEOMETRY[repo], "published config"
    return None


def _student_rows(run: RunConfig) -> int:
    d = run.data
    if d.dataset == "gsm8k":
        pool = d.pool_size or GSM8K_ROWS.get(d.pool_split, GSM8K_ROWS["train"])
    elif d.dataset == "synthetic":
        pool = d.pool_size or SYNTHETIC_DEFAULT_ROWS
    else:
        lines = sum(1 for line in Path(d.dataset).open() if line.strip()) if Path(d.dataset).is_file() else 0
        pool = min(d.pool_size, lines) if d.pool_size else lines
    return round(pool * (1 - d.teacher_fraction))


def _estimate(run: RunConfig, cache: Path, tokens_per_sample: int) -> tuple[int, str] | str:
    """``(bytes, how)`` of the run's store, or why it can't be estimated."""
    rows = _student_rows(run)
    total, parts = 0.0, []
    for t in run.teachers:
        if t.model is None:  # trained here: a preset of the config's size
            preset = STUDENT_PRESETS[t.train.preset.lower()]
            heads = preset["num_attention_heads"]
            geometry = ((t.train.layers or preset["num_hidden_layers"], heads, preset["num_key_value_heads"],
                         preset["hidden_size"] // heads), "its preset")
        else:
            geometry = _geometry(t.model, cache)
        if geometry is None:
            return f"teacher {t.name} ({t.model}): no config.json at hand to size it"
        (layers, heads, kv_heads, head_dim), _ = geometry
        if run.student.layers is not None:
            s_layers = run.student.layers
        else:
            student = _geometry(run.student.model, cache)
            s_layers = student[0][0] if student else layers
        kv, q = stored_layers(t.extract, layers, s_layers)
        dtype = str(t.extract.get("kv_dtype", "float16"))
        # bytes_per_token: the same arithmetic as `kava estimate`
        per_token = 2 * bytes_per_token(kv, kv_heads, head_dim, dtype) + bytes_per_token(q, heads, head_dim, dtype)
        tokens = rows * min(tokens_per_sample, int(t.extract.get("max_length", 1024)))
        total += per_token * tokens
        parts.append(f"{t.name}: {per_token / 1024:,.0f} KiB/token (K/V on {kv} layers, Q on {q}, {dtype})")
    how = f"{rows:,} rows x {tokens_per_sample} tokens; {'; '.join(parts)}; uncompressed"
    return int(total), how


def _disk(run: RunConfig | None, store: Path, cache: Path, tokens_per_sample: int) -> Check:
    where = _existing_ancestor(store)
    free = shutil.disk_usage(where).free
    have = f"{free / 2**30:,.1f} GiB free at {where}"
    if run is None:
        return Check("disk", "ok", f"{have}; store size unknown without a config",
                     "`kava estimate` predicts it from the data and the teacher")
    estimate = _estimate(run, cache, tokens_per_sample)
    if isinstance(estimate, str):
        return Check("disk", "warn", f"{have}; store size unknown: {estimate}",
                     "`kava estimate` predicts it once the model is at hand")
    need, how = estimate
    detail = f"store ~{need / 2**30:,.1f} GiB ({how}); {have}"
    fix = ("put the run's `out` on a larger file system (scratch), store fewer layers or no Q (`q_layers`, "
           "`layer_map`), or use kv_dtype int8")
    if free < need:
        return Check("disk", "fail", detail, fix)
    if free < HEADROOM * need:
        return Check("disk", "warn", detail + f"; less than {HEADROOM}x headroom", fix)
    return Check("disk", "ok", detail)


def _writable(out: Path) -> Check:
    """Create and remove a temporary file in ``out``, or in its nearest existing parent when the run would create
    ``out`` itself."""
    out = out.expanduser()
    where = _existing_ancestor(out)
    if not where.is_dir():
        return Check("output", "fail", f"{out}: {where} is a file, not a directory",
                     "choose another out directory (the run's `out`, or --store)")
    try:
        fd, probe = tempfile.mkstemp(dir=where, prefix=".kava-doctor-")
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        return Check("output", "fail", f"{out}: can't write in {where} ({e.strerror or e})",
                     f"choose a writable out directory, or make {where} writable (chmod u+w)")
    made = "" if where == out.absolute() else f" (created on first use under {where})"
    return Check("output", "ok", f"{out} is writable{made}")
