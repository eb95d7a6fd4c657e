"""The latent student: a causal LM that reads a question, thinks in ``M`` continuous latent tokens, then answers.

PCCoT-style latent reasoning (Wu et al. 2025, as the KaVa paper uses it): the ``M`` latent positions start from a
learned embedding ``start [M, d]``; each of ``T`` Jacobi iterations runs the model over the question and the current
latents at once, and every latent's last hidden state, through a trainable projection ``d → d``, becomes that
latent's input embedding for the next iteration (``shift=True``: latent ``i`` takes the projected state of latent
``i - 1``, as PCCoT's code does, and the first latent keeps ``start[0]``). After the last iteration the cache holds
the question and the ``M`` latents; the answer is read (teacher-forced) or generated (greedy) after them.

Layout of a batch: questions left-padded to a common width ``Q``, so the latents sit at columns ``Q .. Q+M-1`` of
every row and the answer after them; ``position_ids`` count only real tokens, so a padded row computes exactly what
it computes alone. The question is run once; each iteration reruns only the ``M`` latents on a copy of the question's
cache.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn
from transformers import DynamicCache

from kava.core.errors import ConfigError, ShapeError

ProjectionKind = Literal["mlp", "linear", "identity"]
PROJECTIONS: tuple[ProjectionKind, ...] = ("mlp", "linear", "identity")


class Projection(nn.Module):
    """A latent's last hidden state ``[..., d]`` → its next input embedding ``[..., d]``.

    ``mlp`` (PCCoT's): Linear → GELU → Linear → LayerNorm; ``linear``: one Linear; ``identity``: none (Coconut).
    """

    def __init__(self, d_model: int, kind: ProjectionKind = "mlp") -> None:
        super().__init__()
        if kind not in PROJECTIONS:
            raise ConfigError(f"--projection: expected one of {', '.join(PROJECTIONS)}. Got {kind!r} instead.")
        if d_model < 1:
            raise ShapeError(f"Expected d_model >= 1. Got {d_model} instead.")
        self.kind = kind
        self.net: nn.Module
        if kind == "mlp":
            self.net = nn.Sequential(
                nn.Linear(d_model, d_model), nn.GELU(), nn.Linear(d_model, d_model), nn.LayerNorm(d_model)
            )
        elif kind == "linear":
            self.net = nn.Linear(d_model, d_model)
        else:
            self.net = nn.Identity()

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.net(hidden)


@dataclass
class Thought:
    """The state after the last Jacobi iteration, for a batch of ``B`` rows.

    Attributes:
        cache: the question's and the latents' K/V (``Q + M`` columns), ready for the answer.
        mask: ``[B, Q + M]`` 1 on real tokens (questions are left-padded).
        lengths: ``[B]`` real question tokens per row; latent ``m`` of row ``b`` sits at position ``lengths[b] + m``.
        embeds: ``[B, M, d]`` the latents' input embeddings in the last iteration.
        hidden: ``[B, M, d]`` the latents' last hidden states (after the final norm) in the last iteration.
    """

    cache: Any
    mask: torch.Tensor
    lengths: torch.Tensor
    embeds: torch.Tensor
    hidden: torch.Tensor

    @property
    def width(self) -> int:
        """Columns of the cache: ``Q + M``."""
        return int(self.mask.shape[1])


@dataclass
class AnswerPass:
    """A teacher-forced answer after the latents.

    Attributes:
        logits: ``[B, A, V]``; ``logits[:, j]`` predicts answer token ``j`` (the first from the last latent).
        hidden: ``L`` tensors ``[B, A, d]``, the answer tokens' hidden states after each layer.
        keys, values: ``[L, B, H, M, D]`` the K/V at the latent positions (keys as the cache holds them: post-RoPE).
        positions: ``[B, M]`` the latents' positions.
    """

    logits: torch.Tensor
    hidden: tuple[torch.Tensor, ...]
    keys: torch.Tensor
    values: torch.Tensor
    positions: torch.Tensor


def copy_cache(cache: Any) -> DynamicCache:
    """A cache holding the same K/V tensors as ``cache`` (no copy of the data): appending to it leaves ``cache``
    as it was, since a layer's update concatenates into new tensors. Keeps the autograd graph."""
    return DynamicCache(ddp_cache_data=[(layer.keys, layer.values) for layer in cache.layers])


def positions_of(mask: torch.Tensor) -> torch.Tensor:
    """``[B, T]`` position ids of a left-padded ``mask``: real tokens count from 0; padding gets 0."""
    return (mask.long().cumsum(-1) - 1).clamp_min(0)


class LatentReasoner(nn.Module):
    """A causal LM with ``M`` latent thoughts refined by ``T`` Jacobi iterations.

    Args:
        model: a transformers causal LM (Llama, Qwen2, ...) on sdpa or eager attention.
        latents: ``M``, latent tokens per question (>= 1).
        iterations: ``T``, Jacobi iterations (>= 1); ``T = 1`` is one forward over the initial embeddings.
        projection: the hidden → embedding map (``Projection``).
        shift: latent ``i`` takes latent ``i-1``'s projected state (PCCoT's code); else its own.
    """

    def __init__(
        self, model: Any, *, latents: int, iterations: int, projection: ProjectionKind = "mlp", shift: bool = False
    ) -> None:
        super().__init__()
        if not isinstance(latents, int) or latents < 1:
            raise ConfigError(f"--latent: expected an integer >= 1. Got {latents!r} instead.")
        if not isinstance(iterations, int) or iterations < 1:
            raise ConfigError(f"--jacobi: expected an integer >= 1. Got {iterations!r} instead.")
        self.model = model
        self.latents, self.iterations, self.shift = latents, iterations, shift
        d = int(model.config.hidden_size)
        self.project = Projection(d, projection)
        # Start near the scale of the token embeddings, so the first iteration reads inputs the model is used to.
        scale = float(model.get_input_embeddings().weight.detach().std())
        self.start = nn.Parameter(torch.randn(latents, d) * scale)

    @property
    def base(self) -> Any:
        """The decoder without its LM head (``model.model`` for Llama/Qwen2)."""
        return self.model.base_model

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """``[B, T]`` token ids → ``[B, T, d]`` input embeddings."""
        return self.model.get_input_embeddings()(ids)

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        """``[B, T, d]`` final hidden states → ``[B, T, V]`` logits."""
        return self.model.get_output_embeddings()(hidden)

    def think(self, question_ids: torch.Tensor, question_mask: torch.Tensor) -> Thought:
        """Run the question once and the latents ``T`` times; ``question_ids``/``question_mask`` ``[B, Q]``,
        left-padded."""
        if question_ids.ndim != 2 or question_ids.shape != question_mask.shape:
            raise ShapeError(
                f"Expected question ids and mask of one shape [B, Q]. Got {tuple(question_ids.shape)} "
                f"and {tuple(question_mask.shape)} instead."
            )
        b, m = question_ids.shape[0], self.latents
        mask = question_mask.long()
        lengths = mask.sum(-1)  # [B]
        prefix = self.base(
            input_ids=question_ids,
            attention_mask=mask,
            position_ids=positions_of(mask),
            cache=DynamicCache(),
            use_cache=True,
        )
        full_mask = torch.cat([mask, mask.new_ones(b, m)], dim=1)  # [B, Q + M]
        latent_at = lengths[:, None] + torch.arange(m, device=mask.device)  # [B, M]
        embeds = self.start.to(prefix.last_hidden_state.dtype).expand(b, -1, -1)  # [B, M, d]
        for step in range(self.iterations):
            cache = copy_cache(prefix.cache)
            out = self.base(
                inputs_embeds=embeds, attention_mask=full_mask, position_ids=latent_at, cache=cache, use_cache=True
            )
            hidden = out.last_hidden_state  # [B, M, d]
            if step + 1 < self.iterations:
                nxt = self.project(hidden)
                embeds = torch.cat([embeds[:, :1], nxt[:, :-1]], dim=1) if self.shift else nxt
        return Thought(cache=cache, mask=full_mask, lengths=lengths, embeds=embeds, hidden=hidden)

    def answer(self, thought: Thought, answer_ids: torch.Tensor, answer_mask: torch.Tensor) -> AnswerPass:
        """Teacher-force ``answer_ids`` ``[B, A]`` (right-padded, ``answer_mask`` 1 on real tokens) after the
        latents. The latent cache is copied first, so ``thought`` can be answered again."""
        b, a = answer_ids.shape
        q_m = thought.width
        m = self.latents
        mask = torch.cat([thought.mask, answer_mask.long()], dim=1)
        at = (thought.lengths + m)[:, None] + torch.arange(a, device=answer_ids.device)  # [B, A]
        cache = copy_cache(thought.cache)
        layers: list[Any] = list(cache.layers)  # full-attention layers: keys/values [B, H, Q + M, D]
        latent_keys = torch.stack([layer.keys[:, :, q_m - m : q_m] for layer in layers])  # [L, B, H, M, D]
        latent_values = torch.stack([layer.values[:, :, q_m - m : q_m] for layer in layers])
        out = self.base(
            input_ids=answer_ids,
            attention_mask=mask,
            position_ids=at,
            cache=cache,
            use_cache=True,
            output_hidden_states=True,
        )
        last = torch.cat([thought.hidden[:, -1:], out.last_hidden_state[:, :-1]], dim=1)  # [B, A, d]
        positions = thought.lengths[:, None] + torch.arange(m, device=answer_ids.device)
        return AnswerPass(
            logits=self.head(last),
            hidden=tuple(out.hidden_states[1:]),
            keys=latent_keys,
            values=latent_values,
            positions=positions,
        )

    def forward(
        self,
        question_ids: torch.Tensor,
        question_mask: torch.Tensor,
        answer_ids: torch.Tensor,
        answer_mask: torch.Tensor,
    ) -> AnswerPass:
        """``think`` then ``answer``."""
        return self.answer(self.think(question_ids, question_mask), answer_ids, answer_mask)

    @torch.no_grad()
    def generate(
        self, question_ids: torch.Tensor, question_mask: torch.Tensor, *, max_new_tokens: int, eos: list[int]
    ) -> list[list[int]]:
        """Greedy answers after the latents: per row the generated ids, up to and including the first id in
        ``eos``, or ``max_new_tokens`` of them."""
        thought = self.think(question_ids, question_mask)
        b = question_ids.shape[0]
        device = question_ids.device
        cache, mask = thought.cache, thought.mask
        at = thought.lengths + self.latents  # [B] the next token's position
        token = self.head(thought.hidden[:, -1:]).argmax(-1)  # [B, 1]
        stop = torch.tensor(eos, device=device)
        out: list[list[int]] = [[] for _ in range(b)]
        done = torch.zeros(b, dtype=torch.bool, device=device)
        for step in range(max_new_tokens):
            for i, t in enumerate(token[:, 0].tolist()):
                if not done[i]:
                    out[i].append(t)
            done |= torch.isin(token[:, 0], stop)
            if bool(done.all()) or step + 1 == max_new_tokens:
                break
            mask = torch.cat([mask, mask.new_ones(b, 1)], dim=1)
            nxt = self.base(input_ids=token, attention_mask=mask, position_ids=at[:, None], cache=cache, use_cache=True)
            cache, at = nxt.cache, at + 1
            token = self.head(nxt.last_hidden_state).argmax(-1)  # [B, 1]
        return out

    def latent_state(self) -> dict[str, torch.Tensor]:
        """The weights the latent mode adds to the model: ``start`` and the projection's."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith("model.")}
