"""Reference NLL: how likely a model finds each row's own reasoning and answer given its prompt (teacher-forced),
per item in tokens, characters and bytes, so that models with different tokenizers compare (``kava eval --nll``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from kava.core.rows import ReasoningRow
from kava.extract.templates import PromptTemplate, format_row

from .generate import prompt_text


@dataclass(frozen=True)
class ItemNLL:
    """Teacher-forced NLL of one row's reference reasoning and answer, in units that compare across tokenizers."""

    nats: float
    """Negative log-likelihood summed over the scored tokens."""
    tokens: int
    """Tokens scored (this tokenizer's)."""
    chars: int
    """Characters of the scored text: from where the first scored token starts to the end of the sample."""
    bytes: int
    """UTF-8 bytes of the same text."""


def reference_nll_items(model: Any, tokenizer: Any, rows: Sequence[ReasoningRow], template: PromptTemplate, *,
                        batch_size: int) -> list[ItemNLL]:
    """Per row, the negative log-likelihood of its own reasoning and answer given its prompt.

    Teacher-forced, so it moves with every bit of learning even where greedy accuracy sits at the floor. The text
    scored is what eval asks the model to write: the training text (``format_row``) after the prompt
    (``prompt_text``), and the tokens scored are those of the training text that reach past the prompt, so a
    token that fuses the space before the first word with it (``ĠJanet``, ``▁Jan``) is scored with the word. That
    makes the scored text the same characters under every tokenizer. Rows are right-padded into batches; padding
    and prompt positions are not scored. Nats per token depend on the tokenizer (a coarser one has fewer, harder
    tokens), so each item also counts the characters and bytes of the scored text: nats per character compare
    models that tokenize differently.

    Returns:
        ``[N]`` :class:`ItemNLL`, in the rows' order.
    """
    import torch  # noqa: PLC0415 - heavy (package docstring)

    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    seqs: list[tuple[list[int], int, str]] = []  # (ids, index of the first scored token, the scored text)
    for row in rows:
        text = format_row(row, template).text
        cut = len(prompt_text(row, template))  # the scored text is text[cut:]
        enc = tokenizer(text, add_special_tokens=True, return_offsets_mapping=True)
        # Special tokens (BOS) have empty spans and are skipped; the EOS at the end is scored.
        first = next((i for i, (a, b) in enumerate(enc["offset_mapping"]) if b > a and b > cut),
                     len(enc["input_ids"]))
        ids = list(enc["input_ids"])
        if tokenizer.eos_token_id is not None and (not ids or ids[-1] != tokenizer.eos_token_id):
            ids.append(tokenizer.eos_token_id)  # as the grid ends every training sample: stopping is scored too
        seqs.append((ids, max(first, 1), text[cut:]))  # token 0 has nothing before it to predict it
    out = []
    for lo in range(0, len(seqs), batch_size):
        batch = seqs[lo : lo + batch_size]
        width = max(len(ids) for ids, _, _ in batch)
        ids = torch.full((len(batch), width), pad, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        scored = torch.zeros((len(batch), width), dtype=torch.bool)  # [B, T]: positions whose token is scored
        for r, (seq, first, _) in enumerate(batch):
            ids[r, : len(seq)] = torch.tensor(seq)
            mask[r, : len(seq)] = 1
            scored[r, first : len(seq)] = True
        with torch.no_grad():
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.float()  # [B, T, V]
        logp = torch.log_softmax(logits[:, :-1], dim=-1)  # position t predicts token t + 1
        nll = -logp.gather(-1, ids[:, 1:, None].to(device))[..., 0]  # [B, T-1]
        keep = scored[:, 1:].to(device)
        nats = (nll * keep).sum(dim=1).tolist()  # [B]
        for r, (_, _, text) in enumerate(batch):
            out.append(ItemNLL(float(nats[r]), int(keep[r].sum()), len(text), len(text.encode("utf-8"))))
    return out


def reference_nll(model: Any, tokenizer: Any, rows: Sequence[ReasoningRow], template: PromptTemplate, *,
                  batch_size: int) -> float:
    """Mean negative log-likelihood (nats per token) of each row's own reasoning and answer, given its prompt:
    the summed nats of :func:`reference_nll_items` over their summed tokens; NaN when nothing was scored."""
    items = reference_nll_items(model, tokenizer, rows, template, batch_size=batch_size)
    count = sum(i.tokens for i in items)
    return sum(i.nats for i in items) / count if count else float("nan")
