"""Routing by sample: an oracle that sends each sample to the teacher of its task family, and a policy over teachers
trained by REINFORCE.

Unlike the per-token fusions of :mod:`.fusion`, these pick one teacher for every token of a sample: a sample's task
(its family) is what a specialist teacher knows, and it is a property of the whole problem. Both return the weights
``[B, T, N]`` the K/V objective fuses with: one-hot on the chosen teacher at the tokens where it has a target, all 0
elsewhere.

**The reward of** ``--fusion rl`` **is the drop of the sample's own cross-entropy over the training step that used
its choice**: ``CE_before - CE_after`` on that sample's reference tokens, the student's loss of the problem just
before the optimizer step and again right after it (one extra forward pass, no backward). Why this one:

* the K/V loss against the chosen teacher would be circular: any teacher's target gets easier once the student is
  pulled towards it, and the policy would learn which teacher is easiest to imitate, not which one helps;
* a held-out probe batch gives one scalar a step for a whole batch of choices (B samples × N teachers), so each
  choice's credit is far noisier than one reward per sample; the sample's own CE is the task measured on the very
  problem the choice was made for, B rewards a step.

Its noise is every other sample's update in the same step (the same for every action, so the moving-average baseline
removes its mean), and the update is one step late: the policy is moved after the step whose choices it scores.

Each choice is a draw ``a ~ π(· | s)``; ``s`` is the student's keys at the last aligned layer, averaged over the
sample's tokens and normalised (the features the learnable router reads, detached), plus optionally the sample's
family tag (a learned logit offset per family). The update minimises
``-mean_i((r_i - b) / σ · log π(a_i | s_i)) - β · mean_i H(π(· | s_i))`` with plain SGD: ``b`` and ``σ²`` are
moving averages of the reward and of its squared deviation (buffers, so a checkpoint resumes them), ``β`` the entropy
bonus that keeps the policy exploring.

The second half of the module is the recipe's side: reading the sample families (:func:`load_sample_families`) and
:class:`PolicyTrainer`, which the training loop calls around each optimizer step.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from kava.core.errors import ConfigError, ShapeError

if TYPE_CHECKING:
    from .batch import Batch

ROUTING_KINDS = ("rl", "oracle")
"""The fusions that route whole samples (``--fusion``), built by :func:`kava.distill.fusion.build_fusion`."""


def _one_hot_weights(choice: torch.Tensor, available: torch.Tensor) -> torch.Tensor:
    """``[B]`` teacher index (-1: none) and ``[B, T, N]`` availability → ``[B, T, N]`` one-hot weights, 0 where the
    chosen teacher has no target."""
    n = available.shape[-1]
    hot = F.one_hot(choice.clamp(min=0), n).to(torch.float32) * (choice >= 0).unsqueeze(-1)  # [B, N]
    return hot.unsqueeze(1) * available.to(torch.float32)  # [B, T, N]


def _check(available: torch.Tensor, per_sample: torch.Tensor, what: str) -> None:
    if available.dim() != 3 or available.dtype != torch.bool:
        raise ShapeError(f"Expected available as a bool [B, T, N]. Got {available.dtype} {tuple(available.shape)} "
                         "instead. Pass one entry per token and teacher.")
    if per_sample.shape[0] != available.shape[0]:
        raise ShapeError(f"Expected {what} for the batch's {available.shape[0]} samples. Got "
                         f"{tuple(per_sample.shape)} instead. Pass one row per sample.")


class OracleRouter(nn.Module):
    """Every token of a sample to the teacher of its family; a sample of no known family weighs its available
    teachers equally (as ``--fusion fixed`` would)."""

    def forward(self, available: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """``available`` ``[B, T, N]`` bool, ``target`` ``[B]`` long (the teacher of each sample's family, -1 when
        unknown) → weights ``[B, T, N]``."""
        _check(available, target, "a target teacher")
        weights = _one_hot_weights(target, available)
        uniform = available.to(torch.float32)
        uniform = uniform / uniform.sum(-1, keepdim=True).clamp(min=1)
        return torch.where((target < 0).view(-1, 1, 1), uniform, weights)


def masked_log_softmax(logits: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """``log_softmax`` over the ``allowed`` entries of the last dim; ``-inf`` elsewhere (and on rows with none)."""
    return torch.log_softmax(logits.masked_fill(~allowed, float("-inf")), dim=-1).nan_to_num(nan=float("-inf"))


def reinforce_loss(logits: torch.Tensor, allowed: torch.Tensor, actions: torch.Tensor, advantages: torch.Tensor,
                   entropy_weight: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The REINFORCE surrogate: ``-mean(A · log π(a)) - β · mean(H(π))`` over the samples that made a choice.

    Args:
        logits: ``[B, N]`` the policy's logits, in the graph.
        allowed: ``[B, N]`` bool, the teachers a sample could be sent to.
        actions: ``[B]`` long, the teacher drawn (-1: none, the sample is left out).
        advantages: ``[B]`` the reward less the baseline (constants: no gradient flows into them).
        entropy_weight: ``β >= 0``.

    Returns:
        ``(loss, entropy)``: scalars; the mean entropy (nats) is detached, for the logs.
    """
    if logits.dim() != 2 or allowed.shape != logits.shape or actions.shape != logits.shape[:1] \
            or advantages.shape != actions.shape:
        raise ShapeError(f"Expected logits and allowed [B, N], actions and advantages [B]. Got "
                         f"{tuple(logits.shape)}, {tuple(allowed.shape)}, {tuple(actions.shape)} and "
                         f"{tuple(advantages.shape)} instead.")
    chose = actions >= 0
    if not chose.any():
        return logits.sum() * 0, torch.zeros(())
    logp = masked_log_softmax(logits[chose], allowed[chose])  # [b, N]
    taken = logp.gather(1, actions[chose].unsqueeze(1)).squeeze(1)  # [b]
    p = logp.exp()
    entropy = -(p * torch.where(allowed[chose], logp, torch.zeros_like(logp))).sum(-1)  # [b]
    loss = -(advantages[chose].detach() * taken).mean() - entropy_weight * entropy.mean()
    return loss, entropy.mean().detach()


class PolicyRouter(nn.Module):
    """A stochastic policy over teachers, one draw per sample: ``logits = W · norm(s) + c + E[family]``.

    ``W`` ``[N, F]`` and ``c`` start at zero (a uniform policy); ``E`` ``[K, N]`` (with ``num_families`` > 0) is a
    logit offset per family, also from zero. ``norm`` is a layer norm without weights, scaled to unit length: the
    student's keys change scale as it trains, and the policy should not have to follow them. The buffers hold the
    reward's moving averages (:meth:`advantages`).

    Args:
        num_teachers: N, ``>= 1``.
        feature_dim: F, ``>= 1``.
        num_families: K, ``>= 0``; 0 shows the policy no family tag.
        baseline_decay: the moving averages' decay, in ``[0, 1)``.
    """

    baseline: torch.Tensor
    spread: torch.Tensor
    seen: torch.Tensor

    def __init__(self, num_teachers: int, feature_dim: int, num_families: int = 0, baseline_decay: float = 0.9
                 ) -> None:
        super().__init__()
        for name, value, low in (("num_teachers", num_teachers, 1), ("feature_dim", feature_dim, 1),
                                 ("num_families", num_families, 0)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ConfigError(f"Expected {name} to be an integer >= {low}. Got {value!r} instead.")
        if not (isinstance(baseline_decay, (int, float)) and 0 <= baseline_decay < 1):
            raise ConfigError(f"Expected --rl-baseline in [0, 1). Got {baseline_decay!r} instead. Use e.g. 0.9.")
        self.num_teachers, self.feature_dim, self.decay = num_teachers, feature_dim, float(baseline_decay)
        self.head = nn.Linear(feature_dim, num_teachers)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)
        self.family = nn.Embedding(num_families, num_teachers) if num_families else None
        if self.family is not None:
            nn.init.zeros_(self.family.weight)
        self.register_buffer("baseline", torch.zeros(()))
        self.register_buffer("spread", torch.ones(()))
        self.register_buffer("seen", torch.zeros(()))

    def logits(self, pooled: torch.Tensor, family: torch.Tensor | None = None) -> torch.Tensor:
        """``pooled`` ``[B, F]`` features, ``family`` ``[B]`` long (-1: unknown, no offset) → logits ``[B, N]``."""
        if pooled.dim() != 2 or pooled.shape[-1] != self.feature_dim:
            raise ShapeError(f"Expected pooled features [B, {self.feature_dim}]. Got {tuple(pooled.shape)} instead. "
                             "Build the router with the student's head dim as feature_dim.")
        # Unit norm: a step of the policy moves a logit by about lr x advantage, whatever the student's width.
        x = F.layer_norm(pooled.detach().float(), (self.feature_dim,)) / math.sqrt(self.feature_dim)
        out = self.head(x)
        if self.family is not None and family is not None:
            out = out + self.family(family.clamp(min=0)) * (family >= 0).unsqueeze(-1)
        return out

    def forward(self, available: torch.Tensor, pooled: torch.Tensor, family: torch.Tensor | None = None, *,
                generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Draw a teacher per sample among those available at any of its tokens.

        Returns:
            ``(weights [B, T, N], actions [B] long (-1 for a sample with no teacher), allowed [B, N] bool)``; no
            gradient flows through any of them (the policy learns from :func:`reinforce_loss` only).
        """
        _check(available, pooled, "pooled features")
        allowed = available.any(dim=1)  # [B, N]
        with torch.no_grad():
            probs = masked_log_softmax(self.logits(pooled, family), allowed).exp().nan_to_num(0.0)  # [B, N]
            some = allowed.any(-1)
            draw = torch.multinomial(torch.where(some.unsqueeze(-1), probs, torch.ones_like(probs)), 1,
                                     generator=generator).squeeze(1)
            actions = torch.where(some, draw, torch.full_like(draw, -1))
        return _one_hot_weights(actions, available), actions, allowed

    @torch.no_grad()
    def advantages(self, rewards: torch.Tensor) -> torch.Tensor:
        """``[B]`` rewards → ``[B]`` advantages ``(r - b) / σ`` against the averages before this batch, then fold the
        batch into them (the first batch starts them at its own mean and spread)."""
        r = rewards.float()
        if self.seen == 0:
            self.baseline.fill_(r.mean())
            self.spread.fill_(((r - r.mean()) ** 2).mean().clamp(min=1e-12))
        adv = (r - self.baseline) / self.spread.sqrt().clamp(min=1e-6)
        self.spread.mul_(self.decay).add_((1 - self.decay) * ((r - self.baseline) ** 2).mean())
        self.baseline.mul_(self.decay).add_((1 - self.decay) * r.mean())
        self.seen.add_(1)
        return adv

    def extra_repr(self) -> str:
        return f"families={0 if self.family is None else self.family.num_embeddings}, decay={self.decay}"


def pool_features(features: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``features`` ``[B, T, F]`` over the tokens in ``mask`` ``[B, T]`` → ``[B, F]`` (0 with none)."""
    w = mask.to(features.dtype).unsqueeze(-1)  # [B, T, 1]
    return (features * w).sum(1) / w.sum(1).clamp(min=1)


def family_routes(weights: torch.Tensor, mask: torch.Tensor, family: torch.Tensor, num_families: int
                  ) -> torch.Tensor:
    """How many samples of each family went to each teacher: ``[K, N]``, a sample counting as its mean weight per
    teacher over its tokens in ``mask`` (1 in all for a sample sent whole to one teacher).

    Args:
        weights: ``[B, T, N]`` router output.
        mask: ``[B, T]`` the tokens distilled.
        family: ``[B]`` long (-1: unknown, not counted).
        num_families: K.
    """
    m = mask.to(weights.dtype).unsqueeze(-1)
    share = (weights * m).sum(1) / m.sum(1).clamp(min=1)  # [B, N]
    hot = F.one_hot(family.clamp(min=0), max(num_families, 1)).to(weights.dtype) * (family >= 0).unsqueeze(-1)
    return hot.T @ share  # [K, N]


# ---------------------------------------------------------------------------------------------------------------------
# The recipe's side: the families file, and the policy's update around each optimizer step


@dataclass(frozen=True)
class SampleFamilies:
    """Each store sample's task family, as the loader's ``sample_indices`` index the store."""

    names: tuple[str, ...]
    of_sample: torch.Tensor
    """``[num_samples]`` long: index into ``names``, -1 for a sample the file doesn't name."""

    def teacher_targets(self, teachers: Sequence[str], mapping: Mapping[str, str], *, flag: str) -> torch.Tensor:
        """``[K]`` long: the index in ``teachers`` of each family's teacher (``mapping``, default: the teacher named
        as the family). Every family needs one; a mapping naming an unknown family or teacher is refused."""
        p = [f"{flag}: {f!r} is not a family of the samples. Families: {', '.join(self.names)}."
             for f in mapping if f not in self.names]
        p += [f"{flag}: {f}={t} names no teacher of this run. Teachers: {', '.join(teachers)}."
              for f, t in mapping.items() if t not in teachers]
        out = []
        for name in self.names:
            teacher = mapping.get(name, name)
            if teacher not in teachers and name not in mapping:
                p.append(f"--fusion oracle: family {name!r} has no teacher (none is named {name!r}). Give "
                         f"{flag} {name}=TEACHER with one of {', '.join(teachers)}.")
            out.append(teachers.index(teacher) if teacher in teachers else -1)
        if p:
            raise ConfigError.from_problems(p)
        return torch.tensor(out, dtype=torch.long)


def write_sample_families(path: Path, families: Sequence[str], samples: Mapping[str, str]) -> None:
    """Write a families file: ``{"families": [...], "samples": {sample_id: family}}``."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"families": list(families), "samples": dict(samples)}))
    tmp.replace(path)


def load_sample_families(path: str | Path, sample_ids: Sequence[str]) -> SampleFamilies:
    """Read ``--sample-families`` for a store whose samples are ``sample_ids`` (in store order).

    The file is ``{"samples": {sample_id: family}}``, optionally with ``"families": [...]`` fixing their order (else
    sorted). Refuses a file that doesn't parse or names none of the store's samples (a file of another split).
    """
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as e:
        raise ConfigError(f"--sample-families {path}: no such file. Give the families file of the store's samples."
                          ) from e
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"--sample-families {path}: expected JSON {{\"samples\": {{sample_id: family}}}}. Got "
                          f"unreadable text ({e}) instead.") from e
    samples = data.get("samples") if isinstance(data, dict) else None
    if not isinstance(samples, dict) or not all(isinstance(v, str) for v in samples.values()):
        raise ConfigError(f"--sample-families {path}: expected {{\"samples\": {{sample_id: family}}}}. Got "
                          f"{type(samples).__name__} under 'samples' instead.")
    names = data.get("families") or sorted(set(samples.values()))
    missing = sorted(set(samples.values()) - set(names))
    if missing:
        raise ConfigError(f"--sample-families {path}: samples name families {missing} that 'families' does not list."
                          " List every family once.")
    index = {n: i for i, n in enumerate(names)}
    of_sample = torch.tensor([index[samples[s]] if s in samples else -1 for s in sample_ids], dtype=torch.long)
    if len(sample_ids) and not (of_sample >= 0).any():
        raise ConfigError(f"--sample-families {path}: names none of the store's {len(sample_ids)} samples (e.g. "
                          f"{sample_ids[0]!r}). Give the families file written with the store's split.")
    return SampleFamilies(tuple(names), of_sample)


@dataclass
class _Pending:
    batch: Batch
    ce_before: torch.Tensor  # [B]
    decision: Any  # the objective's RouteDecision of this micro-batch


@dataclass
class PolicyTrainer:
    """``--fusion rl``'s update, run by the training loop: :meth:`record` after each micro-batch's forward,
    :meth:`update` after the optimizer step (one no-grad forward of the student per micro-batch, then one SGD step
    of the policy). The student's logits are read by a forward hook, so the module's forward stays as it is."""

    student: nn.Module
    router: PolicyRouter
    objective: Any  # the KVObjective, whose forward leaves its decisions in ``decisions``
    ce_on: str
    lr: float
    entropy: float
    pending: list[_Pending] = field(default_factory=list)
    _logits: torch.Tensor | None = None
    _hook: Any = None

    def __post_init__(self) -> None:
        def keep(module: nn.Module, args: Any, output: Any) -> None:
            self._logits = output.logits.detach()

        self._hook = self.student.register_forward_hook(keep)
        self.optimizer = torch.optim.SGD(self.router.parameters(), lr=self.lr)

    def per_sample_ce(self, logits: torch.Tensor, batch: Batch) -> torch.Tensor:
        """``[B]`` mean cross-entropy of each sample's completion tokens (as the training loss counts them)."""
        from .module import completion_targets  # noqa: PLC0415 - module imports the objective, which imports this

        targets = completion_targets(batch.input_ids, batch.attention_mask, batch.segment_ids, self.ce_on)[:, 1:]
        ce = F.cross_entropy(logits[:, :-1].float().transpose(1, 2), batch.input_ids[:, 1:], reduction="none")
        return (ce * targets).sum(1) / targets.sum(1).clamp(min=1)  # [B]

    def record(self, batch: Batch) -> None:
        """After a micro-batch's forward: keep its CE per sample and the objective's decision for it."""
        assert self._logits is not None, "the student's forward hook did not run"
        decision = self.objective.decisions.pop()
        self.pending.append(_Pending(batch, self.per_sample_ce(self._logits, batch), decision))
        self._logits = None

    def update(self) -> dict[str, float]:
        """After the optimizer step: the rewards, the advantages and one SGD step of the policy; its logs."""
        if not self.pending:
            return {}
        rewards, losses, entropies = [], [], []
        self.optimizer.zero_grad(set_to_none=True)
        for item in self.pending:
            with torch.no_grad():
                b = item.batch
                logits = self.student(input_ids=b.input_ids, attention_mask=b.attention_mask, use_cache=False).logits
                reward = item.ce_before - self.per_sample_ce(logits, b)  # [B] the drop of the sample's own loss
            d = item.decision
            adv = self.router.advantages(reward[d.actions >= 0]) if (d.actions >= 0).any() else reward[:0]
            full = torch.zeros_like(reward)
            full[d.actions >= 0] = adv
            loss, entropy = reinforce_loss(self.router.logits(d.pooled, d.family), d.allowed, d.actions, full,
                                           self.entropy)
            (loss / len(self.pending)).backward()
            rewards.append(reward.mean().item())
            losses.append(loss.item())
            entropies.append(entropy.item())
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)  # the main optimizer must not see these gradients
        self.pending.clear()
        self._logits = None
        n = len(rewards)
        return {"rl/reward": sum(rewards) / n, "rl/policy_loss": sum(losses) / n, "rl/entropy": sum(entropies) / n,
                "rl/baseline": float(self.router.baseline), "rl/spread": math.sqrt(float(self.router.spread))}

    def close(self) -> None:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
