"""Distillation losses on K/V and on attention maps, per token, plus the masked mean that reduces them.

Every per-token function returns ``[B, T]`` so the recipe can weight tokens (padding, prompt vs answer, alignment
confidence) with one ``weighted_mean``. Weights are float ``[B, T]``, ``>= 0``, and 0 means "ignore".

Nothing here produces NaN, in values or gradients, for zero vectors, all-masked rows or all-zero weights: masked
entries use a large finite negative score instead of ``-inf``, ``0 * log 0`` is taken as 0 through ``torch.where``
on sanitised inputs (a plain ``where`` still back-propagates NaN from the branch it drops), and divisions by a sum
that may be 0 are clamped.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from kava.core.errors import ConfigError, ShapeError
from kava.distill.projectors import head_share_matrix

# Score given to masked (future or padded) keys before the softmax: exp() of it is exactly 0 in float32, yet it
# stays finite after the max is subtracted, unlike -inf (NaN on all-masked rows) or finfo.min (overflows to -inf).
MASKED_SCORE = -1e9


def _accumulate(x: torch.Tensor) -> torch.Tensor:
    """Half-precision inputs are reduced in float32; float32/float64 keep their dtype (float64 for gradcheck)."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def _check_same(pred: torch.Tensor, target: torch.Tensor) -> None:
    if pred.dim() != 4 or pred.shape != target.shape:
        raise ShapeError(
            f"Expected pred and target of the same shape [B, H, T, D]. Got {tuple(pred.shape)} and "
            f"{tuple(target.shape)} instead. Project the student's K/V onto the teacher's layout first."
        )


def per_token_mse(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error per token.

    Args:
        pred, target: ``[B, H, T, D]``.

    Returns:
        ``[B, T]``: the mean over heads and channels of ``(pred - target)**2``.
    """
    _check_same(pred, target)
    diff = _accumulate(pred) - _accumulate(target)
    return diff.pow(2).mean(dim=(1, 3))


def per_token_cosine(pred: torch.Tensor, target: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Cosine similarity over channels for each (batch, head, token), averaged over heads.

    Norms are floored at ``eps`` before dividing (``sqrt(max(|x|², eps²))``), so a zero vector gives cosine 0 with
    finite gradients; ``torch.linalg.norm`` would have an undefined gradient there.

    Args:
        pred, target: ``[B, H, T, D]``.
        eps: floor on each vector's norm.

    Returns:
        ``[B, T]`` in ``[-1, 1]``.
    """
    _check_same(pred, target)
    if not eps > 0:
        raise ConfigError(f"Expected eps > 0. Got {eps!r} instead. Pass a small positive number such as 1e-8.")
    p, t = _accumulate(pred), _accumulate(target)
    floor = eps * eps
    norm_p = p.pow(2).sum(-1).clamp_min(floor).sqrt()  # [B, H, T]
    norm_t = t.pow(2).sum(-1).clamp_min(floor).sqrt()
    cos = (p * t).sum(-1) / (norm_p * norm_t)
    return cos.mean(dim=1)


def per_head_terms(pred: torch.Tensor, target: torch.Tensor, loss: str, eps: float = 1e-8
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(loss, cosine)`` per (batch, head, token), ``[B, H, T]`` each, for a compressed teacher whose heads kept
    different tokens: ``loss`` is ``mse`` (mean over channels of the squared error) or ``mercator`` (``1 - cosine``);
    the cosine is floored as in :func:`per_token_cosine`. Averaged over heads they are the per-token terms."""
    _check_same(pred, target)
    p, t = _accumulate(pred), _accumulate(target)
    floor = eps * eps
    cos = (p * t).sum(-1) / (p.pow(2).sum(-1).clamp_min(floor).sqrt() * t.pow(2).sum(-1).clamp_min(floor).sqrt())
    if loss == "mse":
        return (p - t).pow(2).mean(dim=-1), cos
    return 1.0 - cos, cos


def per_token_mercator(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Direction loss ``1 - per_token_cosine``: 0 when every head points the same way, blind to magnitude.

    Args:
        pred, target: ``[B, H, T, D]``.

    Returns:
        ``[B, T]`` in ``[0, 2]``.
    """
    return 1.0 - per_token_cosine(pred, target)


def weighted_mean(values: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``sum(weight * values) / sum(weight)``, and 0 (still in the graph) when all weights are 0.

    Entries with weight 0 are dropped before multiplying, so a NaN or inf there (say, a padded token) does not leak
    into the value or the gradient; the price is that the gradient with respect to a weight that is exactly 0 treats
    its value as 0 (weights here are masks and confidences, not trained).

    Args:
        values: ``[B, T]`` per-token losses.
        weight: ``[B, T]``, ``>= 0``.

    Returns:
        A scalar tensor.
    """
    if values.shape != weight.shape:
        raise ShapeError(
            f"Expected values and weight of the same shape. Got {tuple(values.shape)} and {tuple(weight.shape)} "
            "instead. Pass one weight per token, [B, T]."
        )
    values = _accumulate(values)
    weight = weight.to(values.dtype)
    kept = weight > 0
    safe = torch.where(kept, values, torch.zeros_like(values))
    total = weight.sum()
    # Divide by 1 rather than 0 when nothing is weighted: a clamp to a tiny floor would still send 0/0 = NaN back
    # through the division's gradient (num / den**2 with den**2 underflowing).
    mean = (safe * weight).sum() / torch.where(total > 0, total, torch.ones_like(total))
    return torch.where(total > 0, mean, (safe * 0).sum())


def _allowed_keys(lengths: torch.Tensor, seq_len: int, device: torch.device) -> torch.Tensor:
    """``[B, T, T]`` bool: key ``s`` is visible from query ``t`` iff ``s <= t < lengths[b]``."""
    pos = torch.arange(seq_len, device=device)
    causal = pos.view(1, -1, 1) >= pos.view(1, 1, -1)  # [1, T(query), T(key)]
    valid_query = pos.view(1, -1, 1) < lengths.to(device).view(-1, 1, 1)  # [B, T, 1]; implies the key is unpadded
    return causal & valid_query


def _check_lengths(lengths: torch.Tensor, batch: int) -> None:
    if lengths.shape != (batch,) or lengths.dtype.is_floating_point or lengths.dtype == torch.bool:
        raise ShapeError(
            f"Expected lengths as an integer tensor of shape [{batch}]. Got {lengths.dtype} of shape "
            f"{tuple(lengths.shape)} instead. Pass attention_mask.sum(-1) for right-padded batches."
        )


def attention_bias(lengths: torch.Tensor, seq_len: int, *, device: torch.device | None = None,
                   dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``[B, 1, T, T]`` additive mask: 0 where key ``s`` is visible from query ``t`` (``s <= t < lengths[b]``),
    ``MASKED_SCORE`` elsewhere; queries at padded positions see key 0 only, so every row stays a distribution.
    Build it once per batch and pass it to every layer's scores."""
    allowed = _allowed_keys(lengths, seq_len, device or lengths.device)  # [B, T, T]
    pos = torch.arange(seq_len, device=allowed.device)
    padded_query = pos.view(1, -1) >= lengths.to(allowed.device).view(-1, 1)  # [B, T]
    visible = allowed | (padded_query.unsqueeze(-1) & (pos == 0).view(1, 1, -1))
    zero = torch.zeros((), dtype=dtype, device=allowed.device)
    return torch.where(visible, zero, torch.full((), MASKED_SCORE, dtype=dtype, device=allowed.device)).unsqueeze(1)


def _masked_scores(q: torch.Tensor, k: torch.Tensor, lengths: torch.Tensor, scaling: float,
                   bias: torch.Tensor | None = None) -> torch.Tensor:
    """``[B, Hq, T, T]`` scaled scores plus the ``attention_bias`` (invisible keys at ``MASKED_SCORE``)."""
    if q.dim() != 4 or k.dim() != 4 or q.shape[0] != k.shape[0] or q.shape[2:] != k.shape[2:]:
        raise ShapeError(
            f"Expected q [B, Hq, T, D] and k [B, Hk, T, D]. Got {tuple(q.shape)} and {tuple(k.shape)} instead. "
            "Pass queries and keys of the same layer, heads before tokens."
        )
    batch, q_heads, seq_len, _ = q.shape
    kv_heads = k.shape[1]
    if q_heads % kv_heads:
        raise ShapeError(
            f"Expected the query heads to be a multiple of the key heads. Got Hq={q_heads}, Hk={kv_heads} instead. "
            "Pass the model's own q and k (grouped-query attention shares each key head among Hq // Hk heads)."
        )
    _check_lengths(lengths, batch)
    dtype = torch.promote_types(torch.promote_types(q.dtype, k.dtype), torch.float32)
    if bias is None:
        bias = attention_bias(lengths, seq_len, device=q.device, dtype=dtype)
    qg = q.to(dtype).unflatten(1, (kv_heads, q_heads // kv_heads))  # [B, Hk, G, T, D]
    scores = torch.einsum("bkgtd,bksd->bkgts", qg, k.to(dtype)).flatten(1, 2)  # [B, Hq, T, T]
    # One fused pass: scale and mask (an add, whose backward is free, rather than a masked_fill).
    return torch.addcmul(bias.to(dtype), scores, torch.full((), scaling, dtype=dtype, device=scores.device))


def attention_log_probs(q: torch.Tensor, k: torch.Tensor, lengths: torch.Tensor, scaling: float,
                        bias: torch.Tensor | None = None) -> torch.Tensor:
    """Causal, padding-masked attention log-probabilities, with grouped-query attention.

    Query head ``h`` reads key head ``h // (Hq // Hk)`` (the ``repeat_kv`` convention of transformers). Key ``s`` is
    visible from query ``t`` when ``s <= t < lengths[b]``; other keys get ``MASKED_SCORE`` (probability exactly 0,
    log-probability finite). Queries at padded positions (``t >= lengths[b]``) attend only to key 0, a harmless
    valid distribution, so every row is finite and sums to 1.

    Args:
        q: ``[B, Hq, T, D]`` queries after RoPE.
        k: ``[B, Hk, T, D]`` keys after RoPE; ``Hq`` must be a multiple of ``Hk``.
        lengths: ``[B]`` integer, number of real (left-aligned) tokens per row.
        scaling: score multiplier, usually ``D ** -0.5``.
        bias: ``attention_bias(lengths, T)``, when the caller has built it once for several layers.

    Returns:
        ``[B, Hq, T, T]`` log-probabilities over keys, in float32 (float64 if the inputs are).
    """
    return torch.log_softmax(_masked_scores(q, k, lengths, scaling, bias), dim=-1)


def attention_kl(teacher_logp: torch.Tensor, student_logp: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Per-query ``KL(teacher || student)`` over visible keys, averaged over student heads.

    With ``Ht != Hs`` the teacher's probabilities are first mixed onto student heads with
    ``head_share_matrix(Ht, Hs)``; a convex mix of distributions is a distribution. Only keys with
    ``s <= t < lengths[b]`` count, entries with teacher probability 0 contribute 0, and queries at padded positions
    give 0.

    Args:
        teacher_logp: ``[B, Ht, T, T]`` log-probabilities (e.g. from ``attention_log_probs``).
        student_logp: ``[B, Hs, T, T]`` log-probabilities.
        lengths: ``[B]`` integer, real tokens per row.

    Returns:
        ``[B, T]``, ``>= 0`` up to rounding.
    """
    if (
        teacher_logp.dim() != 4
        or student_logp.dim() != 4
        or teacher_logp.shape[0] != student_logp.shape[0]
        or teacher_logp.shape[2:] != student_logp.shape[2:]
        or teacher_logp.shape[2] != teacher_logp.shape[3]
    ):
        raise ShapeError(
            f"Expected teacher_logp [B, Ht, T, T] and student_logp [B, Hs, T, T]. Got {tuple(teacher_logp.shape)} "
            f"and {tuple(student_logp.shape)} instead. Pass attention over the same (aligned) tokens."
        )
    batch, t_heads, seq_len, _ = teacher_logp.shape
    s_heads = student_logp.shape[1]
    _check_lengths(lengths, batch)
    dtype = torch.promote_types(torch.promote_types(teacher_logp.dtype, student_logp.dtype), torch.float32)
    allowed = _allowed_keys(lengths, seq_len, teacher_logp.device).unsqueeze(1)  # [B, 1, T, T]
    zero = torch.zeros((), dtype=dtype, device=teacher_logp.device)

    t_logp = torch.where(allowed, teacher_logp.to(dtype), zero)
    p = torch.where(allowed, t_logp.exp(), zero)  # [B, Ht, T, T]
    if t_heads != s_heads:
        share = head_share_matrix(t_heads, s_heads).to(device=p.device, dtype=dtype)  # [Hs, Ht]
        p = torch.einsum("sh,bhqk->bsqk", share, p)  # [B, Hs, T, T]
        t_logp = torch.where(p > 0, p, torch.ones_like(p)).log()
    # Sanitise both logs wherever p == 0, or else where()'s dropped branch (0 * -inf) would send NaN backwards.
    counted = allowed & (p > 0)
    t_logp = torch.where(counted, t_logp, zero)
    s_logp = torch.where(counted, student_logp.to(dtype), zero)
    kl = (p * (t_logp - s_logp)).sum(-1)  # [B, Hs, T]
    return kl.mean(dim=1)


class TeacherAttention:
    """The teacher's side of the attention term, as stored: one or more layers' queries and keys, mixed.

    The target distribution of student head ``h`` at query ``t`` is ``Σ_i w_i · softmax(scaling · q_i k_iᵀ)`` over
    the visible keys, mapped onto the student's heads with ``head_share_matrix(Ht, Hs)`` when the head counts
    differ (a convex mix of distributions is a distribution). It is never built whole: ``block_probs`` gives the
    rows of one query block, on demand, under no gradient.

    Args:
        queries: per teacher layer ``[B, Ht, T, Dt]`` after RoPE, no gradient.
        keys: per teacher layer ``[B, Hkt, T, Dt]`` after RoPE; ``Ht`` must be a multiple of ``Hkt``.
        weights: the layer map's weight per layer (summing to 1 for a distribution).
        scaling: the teacher's score multiplier, usually ``Dt ** -0.5``.
    """

    def __init__(self, queries: Sequence[torch.Tensor], keys: Sequence[torch.Tensor], weights: Sequence[float],
                 scaling: float) -> None:
        if not queries or len(queries) != len(keys) or len(queries) != len(weights):
            raise ShapeError(
                f"Expected as many teacher queries, keys and weights, at least one. Got {len(queries)}, {len(keys)} "
                f"and {len(weights)} instead. Pass one (q, k, weight) per teacher layer of the layer map."
            )
        for q, k in zip(queries, keys):
            _check_qk(q, k)
            if q.shape != queries[0].shape or k.shape != keys[0].shape:
                raise ShapeError(
                    f"Expected every teacher layer's q and k in one layout. Got q {tuple(q.shape)}, k "
                    f"{tuple(k.shape)} against {tuple(queries[0].shape)}, {tuple(keys[0].shape)} instead. Mix "
                    "layers of one teacher only."
                )
        self.queries, self.keys = [q.detach() for q in queries], [k.detach() for k in keys]
        self.weights, self.scaling = [float(w) for w in weights], float(scaling)

    @property
    def heads(self) -> int:
        return self.queries[0].shape[1]

    def block_probs(self, start: int, stop: int, heads: int, dtype: torch.dtype, bias: torch.Tensor, *,
                    entropy: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``p [B, heads, n, stop]``: the mixed attention of queries ``start:stop`` (``n`` of them) over keys
        ``:stop`` (causal: keys after the query get probability 0), on ``heads`` (student) heads; with ``entropy``
        also ``Σ_keys p log p`` ``[B, heads, n]``, else None. ``bias`` is ``_future_bias``."""
        with torch.no_grad():
            if getattr(self, "_prepared", (None,))[0] != dtype:  # the scale folded into q once, not per block
                self._prepared = (dtype, [(q.to(dtype) * self.scaling, k.to(dtype))
                                          for q, k in zip(self.queries, self.keys)])
            pairs = self._prepared[1]
            if len(pairs) == 1 and self.weights[0] == 1.0 and self.heads == heads:
                # One softmax, already on the student's heads: Σ p log p = Σ p·s − logsumexp(s), where
                # Σ p·s = q·(p @ K) is a small matmul and logsumexp(s) = max(s) − log max(p). This avoids a log
                # over the whole block (xlogy costs as much as three softmaxes).
                q, k = pairs[0]
                scores = _block_scores(q, k, start, stop, bias)
                top = scores.amax(dim=-1)  # [B, H, n]
                p = torch.softmax(scores, dim=-1)
                if not entropy:
                    return p, None
                lse = top - p.amax(dim=-1).log_()
                kv_heads = k.shape[1]
                pk = torch.matmul(p.view(p.shape[0], kv_heads, -1, stop), k[:, :, :stop])  # [B, Hk, G·n, D]
                cross = (pk * _grouped(q, kv_heads, start, stop)).sum(-1).view_as(lse)
                return p, cross - lse
            mixed: torch.Tensor | None = None
            for (q, k), w in zip(pairs, self.weights):
                term = torch.softmax(_block_scores(q, k, start, stop, bias), dim=-1)
                if w != 1.0:
                    term.mul_(w)
                mixed = term if mixed is None else mixed.add_(term)
            assert mixed is not None
            p = mixed
            if p.shape[1] != heads:
                share = head_share_matrix(p.shape[1], heads).to(device=p.device, dtype=dtype)  # [Hs, Ht]
                p = torch.einsum("sh,bhqk->bsqk", share, p).contiguous()
            return p, (torch.xlogy(p, p).sum(-1) if entropy else None)


def _check_qk(q: torch.Tensor, k: torch.Tensor) -> None:
    if q.dim() != 4 or k.dim() != 4 or q.shape[0] != k.shape[0] or q.shape[2:] != k.shape[2:]:
        raise ShapeError(
            f"Expected q [B, Hq, T, D] and k [B, Hk, T, D]. Got {tuple(q.shape)} and {tuple(k.shape)} instead. "
            "Pass queries and keys of the same layer, heads before tokens."
        )
    if q.shape[1] % k.shape[1]:
        raise ShapeError(
            f"Expected the query heads to be a multiple of the key heads. Got Hq={q.shape[1]}, Hk={k.shape[1]} "
            "instead. Pass the model's own q and k (grouped-query attention shares each key head among Hq // Hk "
            "heads)."
        )


def _future_bias(block: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``[block, block]`` additive mask of a block's own square: ``MASKED_SCORE`` on keys after the query, 0 on the
    rest (an add is several times cheaper than a masked fill on the strided square)."""
    future = torch.ones(block, block, dtype=torch.bool, device=device).triu_(1)
    return torch.zeros(block, block, dtype=dtype, device=device).masked_fill_(future, MASKED_SCORE)


def _grouped(q: torch.Tensor, kv_heads: int, start: int, stop: int) -> torch.Tensor:
    """Queries ``start:stop`` of ``q [B, Hq, T, D]`` as ``[B, Hk, G·n, D]``: each key head's query heads stacked
    along the rows, so one batched matmul per key head serves its whole group (no repeated keys)."""
    batch, heads, _, dim = q.shape
    block = q[:, :, start:stop].unflatten(1, (kv_heads, heads // kv_heads))  # [B, Hk, G, n, D]
    return block.reshape(batch, kv_heads, -1, dim)


def _block_scores(q: torch.Tensor, k: torch.Tensor, start: int, stop: int, bias: torch.Tensor) -> torch.Tensor:
    """``[B, Hq, n, stop]`` causal scores ``q·k`` (``q`` already scaled) of queries ``start:stop`` over keys
    ``:stop``; keys after their query get ``MASKED_SCORE`` added (``bias``: ``_future_bias``). Only the diagonal
    ``n × n`` square needs the mask: keys before ``start`` are visible from every query of the block."""
    batch, heads, _, _ = q.shape
    kv_heads, n = k.shape[1], stop - start
    scores = torch.matmul(_grouped(q, kv_heads, start, stop), k[:, :, :stop].transpose(-1, -2))  # [B, Hk, G·n, stop]
    scores = scores.view(batch, heads, n, stop)
    scores[..., start:].add_(bias[:n, :n])
    return scores


class _BlockwiseAttentionKL(torch.autograd.Function):
    """Per-query ``KL(p || softmax(s))`` with ``s`` the student's causal scores, one query block at a time.

    Nothing of size ``T × T`` is kept for backward, which recomputes each block's teacher probabilities and student
    softmax and applies ``∂KL/∂s = softmax(s) − p`` straight to the matmuls
    (``dQ = dS·K·scale``, ``dK = dSᵀ·Q·scale``), as flash attention does. Peak memory is O(B·H·T·block).
    """

    @staticmethod
    def forward(ctx: Any, q: torch.Tensor, k: torch.Tensor, valid: torch.Tensor, teacher: TeacherAttention,
                scaling: float, block: int) -> torch.Tensor:
        dtype = q.dtype
        batch, heads, steps, _ = q.shape
        kv_heads = k.shape[1]
        qs = q * scaling  # [B, Hs, T, D]: s = qs·k, the scale applied once
        bias = _future_bias(block, dtype, q.device)
        kl = q.new_zeros(batch, heads, steps)
        for start in range(0, steps, block):
            stop = min(start + block, steps)
            p, neg_entropy = teacher.block_probs(start, stop, heads, dtype, bias, entropy=True)  # [B, Hs, n, stop]
            assert neg_entropy is not None  # asked for with entropy=True
            s = _block_scores(qs, k, start, stop, bias)  # [B, Hs, n, stop]
            # Σ_keys p·s = qs·(p @ K): one matmul instead of a pass over [n, T] (p is exactly 0 on masked keys, so
            # their MASKED_SCORE adds nothing either way).
            pk = torch.matmul(p.view(batch, kv_heads, -1, stop), k[:, :, :stop])  # [B, Hk, G·n, D]
            cross = (pk * _grouped(qs, kv_heads, start, stop)).sum(-1).view(batch, heads, -1)
            # logsumexp(s) = max(s) − log max(softmax(s)): the fused softmax is several times faster than exp() over
            # the block, which is slow on masked scores and on results that underflow to subnormals.
            lse = s.amax(dim=-1) - torch.softmax(s, dim=-1).amax(dim=-1).log_()
            kl[..., start:stop] = neg_entropy - cross + lse
        kl = torch.where(valid.unsqueeze(1), kl, torch.zeros((), dtype=dtype, device=kl.device))
        ctx.save_for_backward(qs, k, valid)
        ctx.teacher, ctx.scaling, ctx.block = teacher, scaling, block
        return kl

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        qs, k, valid = ctx.saved_tensors
        teacher, scaling, block = ctx.teacher, ctx.scaling, ctx.block
        batch, heads, steps, dim = qs.shape
        kv_heads = k.shape[1]
        bias = _future_bias(block, qs.dtype, qs.device)
        # [B, Hs, T, 1]: the upstream gradient per row; padded queries give 0. It multiplies the [n, D] operands and
        # results of the matmuls rather than each block's [n, T] scores: dS = row · (softmax(s) − p).
        row = torch.where(valid.unsqueeze(1), grad, torch.zeros((), dtype=grad.dtype, device=grad.device))
        row = row.unsqueeze(-1)
        row_q = qs * row  # [B, Hs, T, D]
        dq = torch.empty_like(qs).unflatten(1, (kv_heads, heads // kv_heads))  # [B, Hk, G, T, D]
        dk = torch.zeros_like(k)
        for start in range(0, steps, block):
            stop = min(start + block, steps)
            n = stop - start
            p, _ = teacher.block_probs(start, stop, heads, qs.dtype, bias)
            ds = torch.softmax(_block_scores(qs, k, start, stop, bias), dim=-1).sub_(p)  # ∂KL/∂s per row
            ds = ds.view(batch, kv_heads, -1, stop)  # [B, Hk, G·n, stop]
            dq[:, :, :, start:stop] = torch.matmul(ds, k[:, :, :stop]).view(batch, kv_heads, -1, n, dim)
            dk[:, :, :stop] += torch.matmul(ds.transpose(-1, -2), _grouped(row_q, kv_heads, start, stop))
        dq = dq.flatten(1, 2).mul_(row)
        # s = (q·scale)·k: the scale goes onto dq; dk already used the scaled queries.
        return dq.mul_(scaling), dk, None, None, None, None


def attention_kl_blockwise(teacher: TeacherAttention, q: torch.Tensor, k: torch.Tensor, lengths: torch.Tensor,
                           scaling: float, *, block: int = 64) -> torch.Tensor:
    """``KL(teacher attention || student attention)`` per query token, averaged over the student's heads, in
    blocks of ``block`` queries, never building a ``[B, H, T, T]`` tensor.

    Per query row ``KL(p || softmax(s)) = Σ p log p − Σ p·s + logsumexp(s)`` over the causal keys, ``s`` the
    student's scaled scores and ``p`` the teacher's (mixed) attention. Queries at padded positions
    (``t >= lengths[b]``) give 0 and no gradient; a real query only sees real keys (rows are right-padded).

    Args:
        teacher: the teacher's queries and keys (see ``TeacherAttention``); no gradient.
        q: ``[B, Hs, T, D]`` student queries after RoPE.
        k: ``[B, Hk, T, D]`` student keys after RoPE; ``Hs`` must be a multiple of ``Hk``.
        lengths: ``[B]`` integer, real tokens per row.
        scaling: the student's score multiplier.
        block: queries per block; memory is O(B·Hs·T·block).

    Returns:
        ``[B, T]``, ``>= 0`` up to rounding, in float32 (float64 if ``q`` is), the same values as
        ``attention_kl(teacher log-probabilities, attention_log_probs(q, k, lengths, scaling), lengths)``.
    """
    _check_qk(q, k)
    batch, _, steps, _ = q.shape
    _check_lengths(lengths, batch)
    t_q = teacher.queries[0]
    if t_q.shape[0] != batch or t_q.shape[2] != steps:
        raise ShapeError(
            f"Expected the teacher's queries over the student's batch and tokens [{batch}, Ht, {steps}, Dt]. Got "
            f"{tuple(t_q.shape)} instead. Pass attention over the same (aligned) tokens."
        )
    if not (isinstance(block, int) and block >= 1):
        raise ConfigError(f"Expected block to be an integer >= 1. Got {block!r} instead. Pass e.g. 64.")
    dtype = torch.promote_types(torch.promote_types(q.dtype, k.dtype), torch.float32)
    valid = torch.arange(steps, device=q.device).view(1, -1) < lengths.to(q.device).view(-1, 1)  # [B, T]
    kl = _BlockwiseAttentionKL.apply(q.to(dtype), k.to(dtype), valid, teacher, float(scaling), block)
    return kl.mean(dim=1)
