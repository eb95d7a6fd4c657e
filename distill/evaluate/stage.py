"""`kava eval`, the stage: its config (``EvalConfig``), the template it prompts with (``resolve_template``), and the
recipe (``run_eval``).

The recipe, top to bottom: validate the config, resolve the template (the one recorded with the model by
``kava distill`` unless --template says otherwise), load the rows, load the tokenizer and model, generate in
length-sorted batches and score (``score.evaluate``), optionally the reference NLL (``nll``), write one JSONL line
per item (atomically), return an :class:`EvalResult`.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, ClassVar

from kava.core.config import config_from_dict, config_to_dict
from kava.core.data import DataSource, is_hub_id
from kava.core.errors import ConfigError, DatasetError
from kava.core.models import load_model, load_tokenizer, resolve_model
from kava.core.synthetic import SYNTHETIC_SPLITS, Difficulty
from kava.distill.latent.config import is_latent_checkpoint
from kava.extract.templates import TEMPLATES, PromptTemplate, load_template

from .cache import CacheBound
from .nll import reference_nll_items
from .score import EvalItem, EvalResult, evaluate

_DEVICE = re.compile(r"^(cpu|mps|cuda(:\d+)?)$")
_NAMED_DATASETS = ("synthetic", "gsm8k", "openai/gsm8k")


@dataclass
class EvalConfig:
    """Greedy-decode a model on a reasoning split and report the accuracy of its ``#### N`` answers."""

    model: str
    """A directory written by kava distill, or any causal LM directory or hub id."""
    data: DataSource = field(default_factory=lambda: DataSource(dataset="gsm8k", split="test"))
    """The rows evaluated (--dataset, --split, --limit, ...)."""
    template: str | None = None
    """Prompt template (plain, chat, cot or a file); default: the one recorded with the model, else plain."""
    batch_size: int = 16
    """Prompts per generate call."""
    max_new_tokens: int = 256
    """The most tokens generated per item."""
    out: str | None = None
    """JSONL of every item (default: eval-<dataset>-<split>.jsonl in the model directory, else here)."""
    device: str | None = None
    """cpu (default), cuda[:N] or mps."""
    threads: int | None = None
    """CPU threads for torch (default: torch's choice)."""
    progress: bool = True
    """Show a progress bar on stderr."""
    trust_remote_code: bool = False
    """Run modelling code shipped with the model (a model whose config names custom classes). Review it first."""
    nll: bool = False
    """Also score each row's reference reasoning and answer: negative log-likelihood per item in the JSONL (nats,
    tokens, characters, bytes) and per token, character and byte overall."""
    cache: str | None = None
    """sinks=S,window=W: generate with attention reading only each row's first S and latest W tokens (StreamingLLM);
    --nll still uses the full cache."""

    ALIASES: ClassVar[dict[str, str]] = {"seed": "data_seed"}
    """Old spellings still accepted (flag and YAML key): ``--seed`` was the synthetic dataset's seed."""

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> EvalConfig:
        """From flat option names, as flags and YAML spell them."""
        return config_from_dict(cls, data)

    def to_dict(self) -> dict[str, Any]:
        return config_to_dict(self)

    @property
    def dataset_name(self) -> str:
        """``gsm8k``, ``synthetic`` (``synthetic-easy`` at another difficulty), or a file dataset's stem: the name
        used in the default output file."""
        if self.data.dataset == "synthetic":
            return Difficulty.parse(self.data.difficulty).dataset_name
        if self.data.dataset in _NAMED_DATASETS:
            return self.data.dataset.rsplit("/", 1)[-1]
        return Path(self.data.dataset).stem

    @property
    def out_path(self) -> Path:
        if self.out is not None:
            return Path(self.out)
        name = f"eval-{self.dataset_name}-{self.data.split}.jsonl"
        return Path(self.model) / name if Path(self.model).is_dir() else Path(name)

    def validate(self) -> None:
        """Raise one ConfigError listing every problem, in the flags' spelling."""
        d = self.data
        p: list[str] = []
        if not self.model:
            p.append("--model: expected a model directory or hub id. Got nothing.")
        if d.dataset not in _NAMED_DATASETS and not Path(d.dataset).exists() and not is_hub_id(d.dataset):
            p.append(f"--dataset: expected synthetic, gsm8k, a JSONL/Parquet file, a folder or a datasets id "
                     f"(owner/name). Got {d.dataset!r} instead.")
        if d.data_files is not None:
            if d.dataset not in ("gsm8k", "openai/gsm8k"):
                p.append(f"--data-files is for --dataset gsm8k. Got --dataset {d.dataset!r} instead. "
                         "Drop --data-files.")
            elif not Path(d.data_files).is_file():
                p.append(f"--data-files: expected a JSONL or Parquet file. Got {d.data_files!r}, which does not "
                         "exist.")
        if d.dataset == "synthetic" and d.split not in SYNTHETIC_SPLITS:
            p.append(f"--split: expected one of {', '.join(SYNTHETIC_SPLITS)} for --dataset synthetic. "
                     f"Got {d.split!r} instead.")
        if self.template is not None and self.template not in TEMPLATES and not Path(self.template).is_file():
            p.append(f"--template: expected one of {', '.join(sorted(TEMPLATES))} or a template file. "
                     f"Got {self.template!r} instead.")
        for flag, value in (("--batch-size", self.batch_size), ("--max-new-tokens", self.max_new_tokens)):
            if not isinstance(value, int) or value < 1:
                p.append(f"{flag}: expected an integer >= 1. Got {value!r} instead.")
        p += d.problems()
        for flag, value in (("--threads", self.threads),):
            if value is not None and (not isinstance(value, int) or value < 1):
                p.append(f"{flag}: expected a positive integer. Got {value!r} instead.")
        if self.device is not None and not _DEVICE.match(self.device):
            p.append(f"--device: expected cpu, cuda, cuda:N or mps. Got {self.device!r} instead.")
        if self.cache is not None:
            try:
                CacheBound.parse(self.cache)
            except ConfigError as e:
                p.append(str(e))
        if p:
            raise ConfigError.from_problems(p)


def resolve_template(config: EvalConfig) -> PromptTemplate:
    """--template, else the ``"template"`` recorded in ``<model>/kava.json`` (a name, a file, or
    ``{"name", "format"}``), else plain."""
    if config.template is not None:
        return load_template(config.template)
    record = Path(config.model) / "kava.json"
    if not record.is_file():
        return TEMPLATES["plain"]
    try:
        recorded = json.loads(record.read_text(encoding="utf-8")).get("template", "plain")
    except (json.JSONDecodeError, AttributeError) as e:
        raise ConfigError(f"Expected {record} to hold a JSON object. Got unreadable content instead ({e}). "
                          "Pass --template.") from e
    if isinstance(recorded, dict) and {"name", "format"} <= recorded.keys():
        return PromptTemplate(recorded["name"], recorded["format"])
    if not isinstance(recorded, str):
        raise ConfigError(f"Expected the 'template' in {record} to be a template name or an object with 'name' "
                          f"and 'format'. Got {recorded!r} instead. Pass --template.")
    return load_template(recorded)


def _write_jsonl_atomic(path: Path, items: Sequence[EvalItem]) -> None:
    """Write one JSON object per item to a temporary file beside ``path``, then rename it into place, so a reader
    never sees half a file and an interrupted run leaves any earlier file intact."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            for item in items:
                f.write(json.dumps(asdict(item), ensure_ascii=False) + "\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def run_eval(config: EvalConfig) -> EvalResult:
    """Evaluate ``config.model`` on its split, write the items' JSONL, and return the summary."""
    import torch  # noqa: PLC0415 - heavy (package docstring)

    # 1. Everything that can be checked without loading a model, all at once.
    config.validate()
    template = resolve_template(config)
    out = config.out_path
    if config.threads is not None:
        torch.set_num_threads(config.threads)
    if not config.progress:
        from transformers.utils import logging as hf_logging  # noqa: PLC0415 - heavy (package docstring)

        hf_logging.disable_progress_bar()  # its "Loading weights" bars too

    # 2. Data before the model: a bad dataset fails in milliseconds, not after a multi-GB load.
    rows = config.data.load()
    if not len(rows):
        raise DatasetError(f"Expected at least one usable row in {rows.name}. Got none ({len(rows.problems)} "
                           "skipped). Check --dataset, --split and --data-files.")

    # A student written by `kava latent` thinks in latent tokens before it answers: it has its own scorer.
    if is_latent_checkpoint(config.model):
        from kava.distill.latent.evaluate import run_latent_eval  # noqa: PLC0415 - heavy (package docstring)

        return run_latent_eval(config, rows)

    # 3. Tokenizer and model, from the same directory (a distilled student is saved with its tokenizer), through the
    # loader every stage uses: the offline check, and modelling code shipped with the model runs only with
    # --trust-remote-code.
    source = resolve_model(config.model, role="model", trust_remote_code=config.trust_remote_code)
    tokenizer = load_tokenizer(source)
    model = load_model(source).to(config.device or "cpu").eval()

    # 4. Generate and score, then write every item.
    cache = None if config.cache is None else CacheBound.parse(config.cache)
    result = evaluate(model, tokenizer, rows, template, batch_size=config.batch_size,
                      max_new_tokens=config.max_new_tokens, progress=config.progress, cache=cache)
    nll: dict[str, Any] = {}
    if config.nll:  # per item into the JSONL, so a report can pair items across models and pick its unit; full cache
        from kava.extract.grid import tokenizer_fingerprint  # noqa: PLC0415 - heavy (package docstring)

        scored = reference_nll_items(model, tokenizer, rows, template, batch_size=config.batch_size)
        result.items[:] = [replace(item, nll_nats=s.nats, nll_tokens=s.tokens, nll_chars=s.chars, nll_bytes=s.bytes)
                           for item, s in zip(result.items, scored)]
        nats = sum(s.nats for s in scored)
        per = {unit: sum(getattr(s, unit) for s in scored) for unit in ("tokens", "chars", "bytes")}
        nll = {"reference_nll": nats / per["tokens"] if per["tokens"] else float("nan"),
               "reference_nll_per_char": nats / per["chars"] if per["chars"] else float("nan"),
               "reference_nll_per_byte": nats / per["bytes"] if per["bytes"] else float("nan"),
               "nll_tokenizer": tokenizer_fingerprint(tokenizer),
               "longest_reference": max((s.tokens for s in scored), default=None)}
    _write_jsonl_atomic(out, result.items)
    return replace(result, dataset=config.data.dataset, split=config.data.split, model=config.model, out=str(out),
                   **nll)
