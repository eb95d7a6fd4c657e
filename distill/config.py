"""`kava distill` options as one typed dataclass of small groups; click flags and YAML keys load into the same fields.

Each component takes its group whole: the K/V objective ``objective`` and ``teacher_fusion``, the module its loss
weights (``objective``, with logit distillation's ``objective.logits``), the loop and optimizer ``trainer``. Options
of one mode sit in that mode's group: with --store, ``reads`` (which teachers and layers to read); without it, the
rows fine-tuned on (``data: DataSource``, the same ``--dataset`` options as `kava extract`) and ``fine_tune`` (their
template, tokenizer and length), read only then. Flags, YAML keys and ``config.yaml`` stay flat (``--lr``, ``lr:``),
in the order the groups sit (see :mod:`kava.core.config`). List options (--teachers, --kv-layers, --attn-layers,
--fusion-weights) are lists and --segment-weights a mapping, parsed once in their group's ``__post_init__``.

``validate()`` reports every problem at once, in the flags' spelling, before a model loads or a file is written.
Rules that need the store (which teachers and layers it has) are checked by the trainer right after it opens the
store, still before training.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

from kava.core.config import (
    as_float,
    as_int,
    as_name,
    config_from_dict,
    config_to_dict,
    flat_options,
    format_list,
    parse_list,
)
from kava.core.data import DataSource
from kava.core.errors import ConfigError, short_repr
from kava.kvstore.manifest import SEGMENT_NAMES

from .trackers import TRACKERS

LOSSES = ("mse", "mercator", "structural")
FUSIONS = ("fixed", "similarity", "learnable", "rl", "oracle")
PROJECTORS = ("structured", "flat")
DIVERGENCES = ("auto", "forward-kl", "reverse-kl", "skew-kl", "jsd", "tvd")
"""--logit-divergence choices (``kava.distill.logit_kd.logit_divergence`` computes each)."""
_WEIGHT = re.compile(r"^\s*([a-z]+)\s*=\s*([0-9.eE+-]+)\s*$")

MAX_GRAD_ACCUM = 4096
"""--grad-accum's bound: more micro-batches per step is a mistyped number (raise --batch-size instead)."""
MAX_SEED = 2**32 - 1
"""--seed's bound: what every generator it seeds accepts (numpy's is the narrowest)."""

ATTN_IMPLEMENTATIONS = ("sdpa", "eager")
"""Student attention kernels whose Q/K/V the training capture reads (``kava.extract.capture``)."""
RESUME_MAY_DIFFER = frozenset({"out", "resume", "progress", "threads", "command", "log_every", "tensorboard",
                               "parallel", "tracker", "tracker_project", "tracker_name"})
"""Fields a resumed run may change; any other difference would change the loss sequence, so it is refused. (Like
--threads, --parallel changes only the order floats are summed in: DDP and FSDP checkpoints share one format.)"""


def _segment_weights(value: Any, problems: list[str]) -> dict[str, float] | None:
    """--segment-weights as a mapping: from 'prompt=0.5,answer=2' (a flag) or a YAML mapping; names it leaves out
    weigh 1. A bad entry is reported in ``problems`` (and the option dropped)."""
    if value is None:
        return None
    if isinstance(value, str):
        pairs = []
        for part in (x for x in value.split(",") if x.strip()):
            m = _WEIGHT.match(part)
            pairs.append((m.group(1), m.group(2)) if m else (part.strip(), None))
    elif isinstance(value, Mapping):
        pairs = [(str(k), v) for k, v in value.items()]
    else:
        problems.append(f"--segment-weights: expected name=weight pairs like 'prompt=0.5,answer=2'. Got {value!r} "
                        "instead.")
        return None
    out: dict[str, float] = {}
    before = len(problems)
    for name, weight in pairs:
        try:
            number = as_float(weight)
        except (TypeError, ValueError):
            number = None
        if name not in SEGMENT_NAMES or number is None:
            problems.append(f"--segment-weights: expected name=weight with names in {', '.join(SEGMENT_NAMES)}. "
                            f"Got {name + ('' if weight is None else f'={weight}')!r} instead.")
        elif number < 0:
            problems.append(f"--segment-weights: expected weights >= 0. Got {f'{name}={weight}'!r} instead.")
        else:
            out[name] = number
    return out if len(problems) == before else None


# ---------------------------------------------------------------------------------------------------------------------
# The groups, in the order their options appear in `kava distill --help` and config.yaml


@dataclass
class StoreReads:
    """With --store: what the run reads from it."""

    teachers: list[str] | None = None
    """Teachers to learn from, comma-separated (default: the store's only teacher)."""
    kv_layers: list[int] | None = None
    """Student layers whose K/V are aligned, e.g. '0,2,3' (default: every layer of the store's layer map)."""
    attn_layers: list[int] | None = None
    """With --loss structural: student layers whose attention is matched, e.g. '5' (default: every aligned layer).
    The attention term costs O(T^2) per layer; fewer layers make it cheaper."""
    allow_incomplete: bool = False
    """Train on the shards every teacher finished instead of refusing a store with unfinished shards."""

    def __post_init__(self) -> None:
        p: list[str] = []
        self.teachers = parse_list(self.teachers, as_name, "--teachers", "teacher names like 'a,b'", p)
        self.kv_layers = parse_list(self.kv_layers, as_int, "--kv-layers", "integers like '0,2,3'", p)
        self.attn_layers = parse_list(self.attn_layers, as_int, "--attn-layers", "integers like '3,5'", p)
        self._parse_problems = p


@dataclass
class FineTuneOptions:
    """Without --store: how the run tokenizes its own rows (into <out>/grid.zarr) and sizes a preset student."""

    student_template: str = "plain"
    """Without --store: the text template (plain, chat, cot, chat:tokenizer for the tokenizer's own chat template,
    or a file); with one, the store's."""
    system_prompt: str | None = None
    """Without --store, with --student-template chat:tokenizer: the system message (default: the template's own)."""
    tokenizer: str | None = None
    """Without --store, for a preset student: the tokenizer to build it on."""
    layers: int | None = None
    """Without --store (or with --kv-weight 0), for a preset student: its depth (default: the store's layer map,
    else the preset's)."""
    max_length: int = 1024
    """Without --store: longest sequence; longer samples are cut at a segment boundary."""


@dataclass
class LoraOptions:
    """LoRA adapters instead of training every weight of the student."""

    lora_r: int | None = None
    """LoRA rank through peft; unset trains every weight."""
    lora_alpha: float | None = None
    """LoRA alpha (default: 2 x rank)."""
    lora_targets: str = "all-linear"
    """Modules LoRA adapts: all-linear or a comma-separated list (q_proj,v_proj)."""


@dataclass
class LogitOptions:
    """Logit distillation against the teachers' top-k log-probabilities stored by `kava extract --logit-top-k`."""

    logit_weight: float = 0.0
    """Weight of logit distillation against the teachers' stored top-k (extract with --logit-top-k); 0 turns it off."""
    logit_divergence: str = "auto"
    """forward-kl, reverse-kl, skew-kl, jsd or tvd over the top-k plus a tail bucket; auto: forward KL with the
    teacher's tokenizer, ULD's sorted distance across tokenizers."""
    logit_temperature: float = 1.0
    """Softens both sides' top-k buckets (p^(1/T)); the term is scaled by T^2."""
    logit_skew: float = 0.1
    """With --logit-divergence skew-kl: the teacher's share alpha of the mixture KL(t || alpha t + (1-alpha) s)."""


@dataclass
class ObjectiveOptions:
    """What the loss is made of: the K/V term (its projectors, loss and weights), cross-entropy and logit
    distillation. The K/V objective and the training module each take it whole."""

    projector: str = "structured"
    """structured (head mixer, then head-dim projection) or flat (heads and dims concatenated, the baseline)."""
    init_uniform: bool = True
    """Start the head mixer as the mean of each head's share of the other side's heads (--no-init-uniform: random)."""
    share_dim_proj: bool = False
    """One head-dim projection shared by all heads instead of one per head."""
    project: str = "student"
    """Which side the projector maps: student (into the teacher's space; the target stays fixed) or teacher."""
    loss: str = "mercator"
    """mse, mercator (1 - cosine over head_dim) or structural (mercator on K and V plus attention KL)."""
    alpha_k: float = 1.0
    """Weight of the key term."""
    alpha_v: float = 1.0
    """Weight of the value term."""
    alpha_attn: float = 1.0
    """Weight of the attention KL term (structural loss; needs stored teacher queries)."""
    kv_weight: float = 1.0
    """Weight of the whole K/V term against cross-entropy; 0 trains CE only."""
    ce_weight: float = 1.0
    """Weight of the cross-entropy term."""
    logits: LogitOptions = field(default_factory=LogitOptions)
    """Logit distillation: --logit-weight."""
    ce_on: str = "completion"
    """Tokens cross-entropy is computed on: completion (reasoning and answer) or all."""
    segment_weights: dict[str, float] | None = None
    """K/V loss weight per segment, e.g. 'prompt=0.5,reasoning=1,answer=2' (others 1)."""
    balance: str = "none"
    """none, or gradnorm: on the first step scale each term so its gradient norm on the student equals CE's (the
    weights then scale those), frozen for the run."""

    def __post_init__(self) -> None:
        self._parse_problems: list[str] = []
        self.segment_weights = _segment_weights(self.segment_weights, self._parse_problems)

    @property
    def segment_weight_list(self) -> list[float]:
        """The weight of each segment id, in ``SEGMENT_NAMES`` order (names --segment-weights leaves out weigh 1)."""
        segments = self.segment_weights or {}
        return [segments.get(n, 1.0) for n in SEGMENT_NAMES]


@dataclass
class FusionOptions:
    """How several teachers combine, per token; each mode's own option says which mode it needs."""

    fusion: str = "fixed"
    """How several teachers combine: fixed, similarity (softmax of cosine / temperature), learnable (router), rl (a
    policy picks one teacher per sample, trained by REINFORCE) or oracle (the teacher of the sample's family)."""
    fusion_weights: list[float] | None = None
    """With --fusion fixed: one weight per teacher, e.g. '0.7,0.3' (default equal)."""
    fusion_temperature: float = 0.1
    """With --fusion similarity: softmax temperature."""
    router_hidden: int = 64
    """With --fusion learnable: hidden width of the router MLP."""
    sample_families: str | None = None
    """A JSON file of each store sample's task family, {"samples": {sample_id: family}}: --fusion oracle routes by
    it, --rl-family shows it to the policy, and the metrics log each family's share sent to each teacher."""
    family_teachers: list[str] | None = None
    """With --fusion oracle: the teacher of each family, e.g. 'add=t_add,sub=t_sub' (default: the teacher named as
    the family)."""
    rl_lr: float = 0.5
    """With --fusion rl: the policy's learning rate (plain SGD on the REINFORCE loss, after each training step)."""
    rl_entropy: float = 0.01
    """With --fusion rl: weight of the entropy bonus that keeps the policy exploring."""
    rl_baseline: float = 0.9
    """With --fusion rl: decay of the moving averages of the reward (the baseline) and of its spread, in [0, 1)."""
    rl_family: bool = False
    """With --fusion rl: show the policy the sample's family tag (from --sample-families) besides the student's
    pooled keys."""

    def __post_init__(self) -> None:
        self._parse_problems: list[str] = []
        self.fusion_weights = parse_list(self.fusion_weights, as_float, "--fusion-weights", "numbers like '0.7,0.3'",
                                         self._parse_problems)
        self.family_teachers = parse_list(self.family_teachers, _family_teacher, "--family-teachers",
                                          "family=teacher pairs like 'add=t_add,sub=t_sub'", self._parse_problems)

    @property
    def family_teacher_map(self) -> dict[str, str]:
        """--family-teachers as family → teacher (empty when not given)."""
        return dict(x.split("=", 1) for x in self.family_teachers or [])  # type: ignore[misc]


def _family_teacher(x: Any) -> str:
    """One ``family=teacher`` pair of --family-teachers, spaces stripped."""
    family, eq, teacher = as_name(x).partition("=")
    if not eq or not family.strip() or not teacher.strip():
        raise ValueError(x)
    return f"{family.strip()}={teacher.strip()}"


@dataclass
class TrainerOptions:
    """The training loop: how long, in what batches, the optimizer and its schedule, the data order, where it runs
    and how often it checkpoints."""

    steps: int | None = None
    """Optimizer steps to train (default: --epochs)."""
    epochs: int | None = None
    """Passes over the data (default 1 when --steps is not given)."""
    batch_size: int = 8
    """Samples per micro-batch."""
    max_tokens: int | None = None
    """Cap on padded tokens per micro-batch (batch size x longest sample)."""
    grad_accum: int = 1
    """Micro-batches per optimizer step."""
    lr: float = 3e-4
    """Peak learning rate (student and projectors)."""
    weight_decay: float = 0.01
    """AdamW weight decay (not applied to norms and biases)."""
    warmup_steps: int | None = None
    """Linear warmup steps (default: 5% of the steps)."""
    min_lr_ratio: float = 0.1
    """The cosine schedule ends at this fraction of --lr."""
    max_grad_norm: float = 1.0
    """Gradient clipping norm; 0 turns clipping off."""
    seed: int = 0
    """Seeds the student's initialisation, the projectors and the data order."""
    workers: int = 0
    """Loader worker processes (0: read in the training process)."""
    buffer_shards: int = 4
    """Shards per shuffle window."""
    device: str | None = None
    """cpu or cuda[:N] (default: cuda when available)."""
    precision: str = "auto"
    """auto (bf16 autocast on GPU, fp32 on CPU), bf16 or fp32."""
    parallel: str = "ddp"
    """Under torchrun (--nproc): ddp (every rank holds the whole student) or fsdp (parameters, gradients and
    optimizer state sharded across the ranks, one decoder layer at a time: a student too large for one GPU)."""
    checkpoint_every: int = 100
    """Write a resumable checkpoint every N steps (0: only at the end)."""
    keep_checkpoints: int = 2
    """Checkpoints kept (older ones are deleted)."""


@dataclass
class ReportOptions:
    """What the run reports while it trains (none of it changes the training)."""

    log_every: int = 10
    """Print progress every N steps (metrics.jsonl gets every step)."""
    grad_shares_every: int = 0
    """Every N steps, log each loss term's share of the gradient norm on the student (grad_share/* in
    metrics.jsonl; one extra backward per term on those steps); 0: never."""
    tensorboard: bool = False
    """Also write TensorBoard event files under <out>/tb: the same as --tracker tensorboard."""
    tracker: list[str] | None = field(default=None, metadata={"repeatable": True})
    """Also log the config, every metric and the store's digest to an experiment tracker: wandb, mlflow or
    tensorboard, repeatable. Offline, under --out, unless the tracker's own environment variables say otherwise
    (WANDB_MODE, WANDB_DIR, MLFLOW_TRACKING_URI); needs pip install 'kava[trackers]'."""
    tracker_project: str = "kava"
    """With --tracker: the wandb project or MLflow experiment."""
    tracker_name: str | None = None
    """With --tracker: the tracker run's name (default: --out's folder name)."""
    progress: bool = True
    """Print progress lines on stderr."""

    def __post_init__(self) -> None:
        self._parse_problems: list[str] = []
        # A repeated flag gives a list, YAML a list or one name, a rendered command 'wandb,mlflow': all the same.
        names = [self.tracker] if isinstance(self.tracker, str) else self.tracker
        if isinstance(names, (list, tuple)) and all(isinstance(n, str) for n in names):
            names = [part for n in names for part in n.split(",") if part.strip()]
        self.tracker = parse_list(names, as_name, "--tracker", f"names from {', '.join(TRACKERS)}",
                                  self._parse_problems)

    @property
    def trackers(self) -> list[str]:
        """Every tracker the run logs to, once each: --tracker's, and tensorboard with --tensorboard."""
        names = list(self.tracker or []) + (["tensorboard"] if self.tensorboard else [])
        return list(dict.fromkeys(names))


# ---------------------------------------------------------------------------------------------------------------------
# kava distill


@flat_options
@dataclass
class DistillConfig:
    """Train a student on cross-entropy plus K/V alignment against a store's teachers."""

    student: str
    """Preset (tiny-qwen2, tiny-llama), local model directory, or hub id."""
    out: str
    """Output directory: the trained student, checkpoints, metrics.jsonl, the resolved config."""
    store: str | None = None
    """Store written by `kava extract`. Without it: CE-only fine-tuning on --dataset."""
    reads: StoreReads = field(default_factory=StoreReads)
    """With --store: --teachers, --kv-layers, --attn-layers, --allow-incomplete."""
    data: DataSource = field(default_factory=DataSource, metadata={"help_prefix": "Without --store"})
    """Without --store: the rows fine-tuned on (tokenized into <out>/grid.zarr)."""
    fine_tune: FineTuneOptions = field(default_factory=FineTuneOptions, metadata={"help_prefix": "Without --store"})
    """Without --store: --student-template, --system-prompt, --tokenizer, --layers, --max-length."""
    lora: LoraOptions = field(default_factory=LoraOptions)
    """--lora-r, --lora-alpha, --lora-targets."""
    objective: ObjectiveOptions = field(default_factory=ObjectiveOptions)
    """The loss: projectors, K/V loss and weights, cross-entropy, logit distillation."""
    teacher_fusion: FusionOptions = field(default_factory=FusionOptions)
    """--fusion and each fusion mode's option."""
    trainer: TrainerOptions = field(default_factory=TrainerOptions)
    """Steps, batches, optimizer and schedule, seed, loader, device, precision, checkpoints."""
    resume: bool = False
    """Continue the run in --out from its latest checkpoint (a run without one starts from step 0)."""
    report: ReportOptions = field(default_factory=ReportOptions)
    """--log-every, --tracker, --progress."""
    threads: int | None = None
    """CPU threads for torch (default: torch's choice)."""
    trust_remote_code: bool = False
    """Allow modelling code shipped with the student checkpoint."""
    attn_implementation: str = "sdpa"
    """The student's attention: sdpa (torch's fused kernels; flash kernels on a CUDA GPU in bf16/fp16) or eager
    (the model's own matmuls and softmax)."""
    command: str = ""
    """The command line, recorded with the outputs."""
    extra: dict[str, Any] = field(default_factory=dict)
    """Free-form details recorded with the outputs."""

    ALIASES: ClassVar[dict[str, str]] = {"template": "student_template"}
    """Old spellings still accepted (flag and YAML key)."""

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> DistillConfig:
        """From flat option names, as flags, YAML and ``to_dict()`` (a run's config.yaml) spell them."""
        return config_from_dict(cls, data)

    def to_dict(self) -> dict[str, Any]:
        """Flat option names to values: written as ``<out>/config.yaml`` and compared by --resume."""
        return config_to_dict(self)

    def resume_differences(self, saved: Mapping[str, Any]) -> list[str]:
        """The options (outside RESUME_MAY_DIFFER) whose value in ``saved`` (a checkpoint's or config.yaml's
        ``to_dict()``) differs from this config's, as "--flag: saved, now" lines. ``saved`` is read back through
        ``from_dict`` first, so a config written before an option became a list (``'0,2'``) compares equal."""
        try:
            saved = DistillConfig.from_dict(saved).to_dict()
        except (ConfigError, TypeError):  # an option since removed: compare the raw values
            saved = dict(saved)
        now = self.to_dict()
        return [f"--{k.replace('_', '-')}: {saved.get(k)!r} in the checkpoint, {now[k]!r} now"
                for k in now if k not in RESUME_MAY_DIFFER and saved.get(k) != now[k]]

    @property
    def uses_kv(self) -> bool:
        o = self.objective
        return self.store is not None and o.kv_weight > 0 and (
            o.alpha_k > 0 or o.alpha_v > 0 or (o.loss == "structural" and o.alpha_attn > 0))

    @property
    def uses_logits(self) -> bool:
        return self.store is not None and self.objective.logits.logit_weight > 0

    @property
    def uses_attention(self) -> bool:
        return self.uses_kv and self.objective.loss == "structural" and self.objective.alpha_attn > 0

    def validate(self) -> None:
        """Raise one ConfigError listing every problem, in the flags' spelling."""
        # Options are read through their groups (``tr.lr`` is ``self.lr``), so a type checker sees each one's type.
        o, tr, tf = self.objective, self.trainer, self.teacher_fusion
        p: list[str] = [*self.reads._parse_problems, *tf._parse_problems, *o._parse_problems, *self.data.problems(),
                        *self.report._parse_problems]

        def choice(flag: str, value: str, options: tuple[str, ...]) -> None:
            if value not in options:
                p.append(f"{flag}: expected one of {', '.join(options)}. Got {value!r} instead.")

        choice("--loss", o.loss, LOSSES)
        choice("--fusion", tf.fusion, FUSIONS)
        choice("--projector", o.projector, PROJECTORS)
        choice("--project", o.project, ("student", "teacher"))
        choice("--ce-on", o.ce_on, ("completion", "all"))
        choice("--logit-divergence", o.logits.logit_divergence, DIVERGENCES)
        choice("--balance", o.balance, ("none", "gradnorm"))
        choice("--precision", tr.precision, ("auto", "bf16", "fp32"))
        choice("--parallel", tr.parallel, ("ddp", "fsdp"))
        for name in self.report.tracker or []:
            choice("--tracker", name, TRACKERS)
        if not isinstance(self.report.tracker_project, str) or not self.report.tracker_project.strip():
            p.append(f"--tracker-project: expected a name. Got {self.report.tracker_project!r} instead.")
        if tr.parallel == "fsdp":
            # Each needs the whole student in one process (kava.distill.fsdp): refused before anything loads.
            if self.lora.lora_r:
                p.append("Can't use --lora-r with --parallel fsdp: the LoRA student is merged into its base weights "
                         "at the end, in one process. Drop --lora-r, or use --parallel ddp (LoRA's frozen base "
                         "weights need no optimizer state, so a larger student fits each GPU).")
            if o.balance != "none":
                p.append(f"Can't use --balance {o.balance} with --parallel fsdp: its scales come from gradients on "
                         "the whole student, which FSDP shards across ranks. Drop --balance, or train in one process.")
            if self.report.grad_shares_every:
                p.append("Can't use --grad-shares-every with --parallel fsdp: the shares come from gradients on the "
                         "whole student, which FSDP shards across ranks. Set --grad-shares-every 0, or measure them "
                         "in one process.")
        if self.attn_implementation.startswith("flash_attention"):
            p.append(f"--attn-implementation {self.attn_implementation}: the student's Q/K/V are read by wrapping its "
                     "attention function, and the models branch on flash attention's name (padding-free paths), so "
                     "it can't be wrapped. Use sdpa: on a CUDA GPU in bf16/fp16 torch runs it with flash kernels.")
        else:
            choice("--attn-implementation", self.attn_implementation, ATTN_IMPLEMENTATIONS)
        if isinstance(tr.grad_accum, int) and tr.grad_accum > MAX_GRAD_ACCUM:
            p.append(f"--grad-accum: expected at most {MAX_GRAD_ACCUM:,} micro-batches per step. Got "
                     f"{short_repr(tr.grad_accum)} instead. Raise --batch-size instead.")
        if not isinstance(tr.seed, int) or not 0 <= tr.seed <= MAX_SEED:
            p.append(f"--seed: expected an integer in [0, 2**32 - 1]. Got {short_repr(tr.seed)} instead.")
        for flag, value, low in (("--batch-size", tr.batch_size, 1), ("--grad-accum", tr.grad_accum, 1),
                                 ("--buffer-shards", tr.buffer_shards, 1), ("--workers", tr.workers, 0),
                                 ("--checkpoint-every", tr.checkpoint_every, 0),
                                 ("--log-every", self.report.log_every, 1),
                                 ("--keep-checkpoints", tr.keep_checkpoints, 1),
                                 ("--max-length", self.fine_tune.max_length, 2),
                                 ("--router-hidden", tf.router_hidden, 1),
                                 ("--grad-shares-every", self.report.grad_shares_every, 0)):
            if not isinstance(value, int) or value < low:
                p.append(f"{flag}: expected an integer >= {low}. Got {value!r} instead.")
        for flag, count in (("--steps", tr.steps), ("--epochs", tr.epochs), ("--max-tokens", tr.max_tokens),
                            ("--threads", self.threads), ("--layers", self.fine_tune.layers),
                            ("--lora-r", self.lora.lora_r)):
            if count is not None and (not isinstance(count, int) or count < (0 if flag == "--lora-r" else 1)):
                p.append(f"{flag}: expected a positive integer. Got {count!r} instead.")
        if tr.warmup_steps is not None and tr.warmup_steps < 0:
            p.append(f"--warmup-steps: expected an integer >= 0. Got {tr.warmup_steps!r} instead.")
        if tr.steps is not None and tr.epochs is not None:
            p.append("Can't set both --steps and --epochs. Choose one.")
        for flag, number in (("--alpha-k", o.alpha_k), ("--alpha-v", o.alpha_v),
                             ("--alpha-attn", o.alpha_attn), ("--kv-weight", o.kv_weight),
                             ("--ce-weight", o.ce_weight), ("--logit-weight", o.logits.logit_weight),
                             ("--weight-decay", tr.weight_decay),
                             ("--max-grad-norm", tr.max_grad_norm)):
            if not isinstance(number, (int, float)) or not math.isfinite(number) or number < 0:
                p.append(f"{flag}: expected a finite number >= 0. Got {number!r} instead.")
        if not isinstance(tr.lr, (int, float)) or not math.isfinite(tr.lr) or tr.lr <= 0:
            p.append(f"--lr: expected a finite positive number. Got {tr.lr!r} instead.")
        if not isinstance(tr.min_lr_ratio, (int, float)) or not 0 <= tr.min_lr_ratio <= 1:
            p.append(f"--min-lr-ratio: expected a number in [0, 1]. Got {tr.min_lr_ratio!r} instead.")
        if not isinstance(o.logits.logit_temperature, (int, float)) or not o.logits.logit_temperature > 0:
            p.append(f"--logit-temperature: expected a positive number. Got {o.logits.logit_temperature!r} instead.")
        if not isinstance(o.logits.logit_skew, (int, float)) or not 0 < o.logits.logit_skew < 1:
            p.append(f"--logit-skew: expected a number in (0, 1). Got {o.logits.logit_skew!r} instead.")
        if tf.fusion_temperature <= 0:
            p.append(f"--fusion-temperature: expected a positive number. Got {tf.fusion_temperature!r} instead.")
        p += _routing_problems(tf)
        if o.ce_weight == 0 and not self.uses_kv and not self.uses_logits:
            p.append("Nothing to train: --ce-weight is 0 and there is no K/V or logit term (no --store, or "
                     "--kv-weight and --logit-weight 0). Set --ce-weight or give a --store.")
        if self.store is None and isinstance(o.logits.logit_weight, (int, float)) and o.logits.logit_weight > 0:
            p.append("--logit-weight needs --store (the teachers' top-k logits are stored there).")
        if tf.fusion_weights is not None:
            weights = tf.fusion_weights
            if tf.fusion != "fixed":
                p.append("--fusion-weights needs --fusion fixed.")
            elif any(w < 0 for w in weights) or not any(w > 0 for w in weights):
                p.append(f"--fusion-weights: expected non-negative weights, one positive. Got {weights} instead.")
            elif self.reads.teachers is not None and len(weights) != len(self.reads.teachers):
                p.append(f"--fusion-weights: expected one weight per teacher ({len(self.reads.teachers)}). "
                         f"Got {len(weights)} instead.")
        if self.reads.kv_layers is not None:
            layers = self.reads.kv_layers
            if not layers or any(x < 0 for x in layers) or len(set(layers)) != len(layers):
                p.append(f"--kv-layers: expected distinct layer indices >= 0. Got {format_list(layers)!r} instead.")
        if self.reads.attn_layers is not None:
            attn = self.reads.attn_layers
            if not attn or len(set(attn)) != len(attn) or any(x < 0 for x in attn):
                p.append(f"--attn-layers: expected distinct layer indices >= 0. Got {format_list(attn)!r} instead.")
            elif self.reads.kv_layers is not None and not set(attn) <= set(self.reads.kv_layers):
                p.append(f"--attn-layers {format_list(attn)}: expected a subset of --kv-layers "
                         f"{format_list(self.reads.kv_layers)}.")
            if o.loss != "structural":
                p.append("--attn-layers needs --loss structural (the only loss with an attention term).")
        if self.store is None and (self.reads.teachers is not None or self.reads.kv_layers is not None):
            p.append("--teachers and --kv-layers need --store (they pick what to read from it).")
        if self.fine_tune.system_prompt is not None and (self.store is not None
                                                         or self.fine_tune.student_template != "chat:tokenizer"):
            p.append("--system-prompt is for --student-template chat:tokenizer without --store (a store fixes the "
                     "student's text). Drop --system-prompt.")
        if self.store is not None and self.fine_tune.tokenizer is not None:
            p.append("Can't set both --store and --tokenizer (the store fixes the student's tokenizer). Choose one.")
        if tr.device is not None and not re.match(r"^(cpu|cuda(:\d+)?)$", tr.device):
            p.append(f"--device: expected cpu or cuda[:N]. Got {tr.device!r} instead.")
        if not self.out:
            p.append("--out: expected a directory path. Got nothing.")
        if p:
            raise ConfigError.from_problems(p)



def _routing_problems(tf: FusionOptions) -> list[str]:
    """What is wrong with the options of --fusion rl and oracle."""
    p: list[str] = []
    if tf.fusion == "oracle" and tf.sample_families is None:
        p.append("--fusion oracle routes by each sample's family: give --sample-families (a JSON file "
                 "{\"samples\": {sample_id: family}}).")
    if tf.rl_family and (tf.fusion != "rl" or tf.sample_families is None):
        p.append("--rl-family needs --fusion rl and --sample-families (the tag it shows the policy).")
    if tf.family_teachers is not None:
        families = [x.split("=", 1)[0] for x in tf.family_teachers]
        if tf.fusion != "oracle":
            p.append("--family-teachers needs --fusion oracle.")
        elif len(set(families)) != len(families):
            p.append(f"--family-teachers: expected each family once. Got {format_list(tf.family_teachers)!r} "
                     "instead.")
    if not isinstance(tf.rl_lr, (int, float)) or not math.isfinite(tf.rl_lr) or tf.rl_lr <= 0:
        p.append(f"--rl-lr: expected a finite positive number. Got {tf.rl_lr!r} instead.")
    if not isinstance(tf.rl_entropy, (int, float)) or not math.isfinite(tf.rl_entropy) or tf.rl_entropy < 0:
        p.append(f"--rl-entropy: expected a finite number >= 0. Got {tf.rl_entropy!r} instead.")
    if not isinstance(tf.rl_baseline, (int, float)) or not 0 <= tf.rl_baseline < 1:
        p.append(f"--rl-baseline: expected a number in [0, 1). Got {tf.rl_baseline!r} instead.")
    return p
