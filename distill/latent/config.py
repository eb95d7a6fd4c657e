"""`kava latent` options: one typed dataclass; click flags and YAML keys load into the same fields.

``validate()`` reports every problem at once, in the flags' spelling, before a model loads or a file is written.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kava.core.config import config_from_dict, config_to_dict
from kava.core.errors import ConfigError

LATENT_JSON = "latent.json"
"""What marks a directory written by `kava latent` (its mode, M, T, projection and shift)."""
DATASETS = ("chain", "gsm8k")
TEACHERS = ("self", "store")
_MODES = ("latent", "cot", "direct")
_PROJECTIONS = ("mlp", "linear", "identity")
_DISTANCES = ("l1", "mse", "smooth-l1")


@dataclass
class LatentConfig:
    """Train a student to reason in continuous latent tokens, distilled from its own compressed CoT cache (KaVa)."""

    out: str
    """Output directory: the student, its latent weights (latent.safetensors), latent.json, metrics.jsonl."""
    student: str = "tiny-llama"
    """Preset (tiny-llama, tiny-qwen2; random initialisation on --tokenizer) or a causal LM directory."""
    tokenizer: str | None = None
    """Tokenizer directory for a preset student (required for presets)."""
    dataset: str = "chain"
    """chain (digit arithmetic mod 10, one CoT line per step) or gsm8k (its reasoning lines as the CoT)."""
    data_files: str | None = None
    """GSM8K JSONL to train on (--dataset gsm8k)."""
    eval_files: str | None = None
    """GSM8K JSONL to evaluate on (--dataset gsm8k; default: none, no evaluation)."""
    chain_steps: int = 4
    """Operations per chain problem."""
    train_size: int = 4000
    """Training rows."""
    eval_size: int = 200
    """Rows evaluated after training (0: none)."""
    eval_split: str = "test"
    """--dataset chain: the split evaluated, test or validation (settings are chosen on validation, never test)."""
    data_seed: int = 0
    """Seed of the generated rows."""
    mode: str = "latent"
    """latent (the KaVa objective), cot (CoT SFT: question → CoT → answer) or direct (no-CoT SFT)."""
    latent: int = 24
    """M: latent tokens per question (and CoT rows the teacher's cache is compressed to)."""
    jacobi: int = 3
    """T: Jacobi iterations over the latents."""
    projection: str = "mlp"
    """Hidden state → next latent embedding: mlp (Linear-GELU-Linear-LayerNorm), linear or identity."""
    shift: bool = False
    """Latent i takes latent i-1's projected state (PCCoT's code) instead of its own."""
    teacher: str = "self"
    """self: the student's own teacher mode, its CoT cache compressed by R-KV on the fly; store: a CoT teacher's
    compressed store (--store), its K/V extracted once with --evict r-kv --kv-budget M."""
    store: str | None = None
    """The store of --teacher store: made by `kava extract` from the rows --export-rows writes."""
    store_teacher: str | None = None
    """The teacher of --store to read (default: its only one)."""
    export_rows: str | None = None
    """Write the training rows (train.jsonl) and their template (template.txt) to this folder for `kava extract`,
    then exit without training."""
    cot_weight: float = 1.0
    """Weight of teacher mode's CoT and answer cross-entropy."""
    codi_weight: float = 10.0
    """α₁: weight of the CODI term (hidden states of the token before the answer, every layer)."""
    kv_weight: float = 1.0
    """α₂: weight of the K/V term (latents' K/V against the teacher's R-KV-compressed CoT K/V)."""
    codi_loss: str = "l1"
    """CODI distance: l1, mse or smooth-l1."""
    codi_norm: bool = True
    """Divide each layer's CODI term by the teacher's std there (CODI's normalisation)."""
    kv_loss: str = "mse"
    """K/V distance: mse, smooth-l1 or l1."""
    kv_norm: bool = False
    """Divide each layer's K/V term by the teacher's std there."""
    kv_rope: str = "pre"
    """Compare keys before RoPE (pre: positions differ between modes) or as cached (post)."""
    steps: int = 600
    """Optimizer steps."""
    batch_size: int = 32
    """Rows per step."""
    lr: float = 1e-3
    """Peak learning rate (AdamW; linear warmup, cosine decay)."""
    warmup: int = 30
    """Warmup steps."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    seed: int = 0
    """Seeds the student's initialisation, the latent weights and the batch order."""
    max_new_tokens: int = 64
    """Evaluation: the most tokens generated per problem."""
    eval_batch_size: int = 64
    """Evaluation: problems per generate call."""
    log_every: int = 50
    """Log the losses every N steps."""
    threads: int | None = None
    """CPU threads for torch (default: torch's choice)."""
    progress: bool = True
    """Log progress on stderr."""

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LatentConfig:
        return config_from_dict(cls, data)

    def to_dict(self) -> dict[str, Any]:
        return config_to_dict(self)

    def validate(self) -> None:
        """Raise one ConfigError listing every problem, in the flags' spelling."""
        p: list[str] = []
        if not self.out:
            p.append("--out: expected an output directory. Got nothing.")
        choices = (
            ("--dataset", self.dataset, DATASETS),
            ("--mode", self.mode, _MODES),
            ("--projection", self.projection, _PROJECTIONS),
            ("--teacher", self.teacher, TEACHERS),
            ("--codi-loss", self.codi_loss, _DISTANCES),
            ("--kv-loss", self.kv_loss, _DISTANCES),
            ("--kv-rope", self.kv_rope, ("pre", "post")),
            ("--eval-split", self.eval_split, ("test", "validation")),
        )
        for flag, value, allowed in choices:
            if value not in allowed:
                p.append(f"{flag}: expected one of {', '.join(allowed)}. Got {value!r} instead.")
        for flag, number_of, low in (
            ("--latent", self.latent, 1),
            ("--jacobi", self.jacobi, 1),
            ("--chain-steps", self.chain_steps, 1),
            ("--train-size", self.train_size, 1),
            ("--eval-size", self.eval_size, 0),
            ("--steps", self.steps, 1),
            ("--batch-size", self.batch_size, 1),
            ("--warmup", self.warmup, 0),
            ("--max-new-tokens", self.max_new_tokens, 1),
            ("--eval-batch-size", self.eval_batch_size, 1),
            ("--log-every", self.log_every, 1),
        ):
            if not isinstance(number_of, int) or isinstance(number_of, bool) or number_of < low:
                p.append(f"{flag}: expected an integer >= {low}. Got {number_of!r} instead.")
        for flag, number in (
            ("--cot-weight", self.cot_weight),
            ("--codi-weight", self.codi_weight),
            ("--kv-weight", self.kv_weight),
            ("--weight-decay", self.weight_decay),
        ):
            if not isinstance(number, (int, float)) or not math.isfinite(number) or number < 0:
                p.append(f"{flag}: expected a number >= 0. Got {number!r} instead.")
        if not isinstance(self.lr, (int, float)) or not math.isfinite(self.lr) or self.lr <= 0:
            p.append(f"--lr: expected a number > 0. Got {self.lr!r} instead.")
        if self.threads is not None and (not isinstance(self.threads, int) or self.threads < 1):
            p.append(f"--threads: expected a positive integer. Got {self.threads!r} instead.")
        if self.teacher == "store" and self.export_rows is None:
            if not self.store:
                p.append("--teacher store: expected --store (a store extracted with --evict r-kv --kv-budget M). "
                         "Got none.")
            if self.mode != "latent":
                p.append(f"--teacher store: only --mode latent has a K/V term. Got --mode {self.mode}.")
            if self.kv_weight == 0:
                p.append("--teacher store: the store feeds only the K/V term, and --kv-weight is 0. Raise it.")
        elif self.store is not None or self.store_teacher is not None:
            p.append("--store and --store-teacher are for --teacher store. Got --teacher self. Drop them or pass "
                     "--teacher store.")
        if self.dataset == "gsm8k" and self.eval_split != "test":
            p.append("--eval-split: for --dataset chain. Got --dataset gsm8k: pass the rows to score as --eval-files.")
        if self.dataset == "gsm8k":
            for flag, path in (("--data-files", self.data_files), ("--eval-files", self.eval_files)):
                if path is not None and not Path(path).is_file():
                    p.append(f"{flag}: expected a GSM8K JSONL file. Got {path!r}, which does not exist.")
            if self.data_files is None:
                p.append("--dataset gsm8k: expected --data-files (a GSM8K JSONL file). Got none.")
        elif self.data_files is not None or self.eval_files is not None:
            p.append(
                f"--data-files and --eval-files are for --dataset gsm8k. Got --dataset {self.dataset!r}. Drop them."
            )
        if p:
            raise ConfigError.from_problems(p)


def is_latent_checkpoint(path: str | Path) -> bool:
    """Whether ``path`` is a directory written by `kava latent` (`kava eval` scores it with the latent scorer)."""
    return (Path(path) / LATENT_JSON).is_file()
