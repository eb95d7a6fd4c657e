"""Token id sequences of different lengths into one batch tensor."""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

if TYPE_CHECKING:  # pragma: no cover - torch is imported where it is used, keeping `kava --help` light
    import torch


def left_pad(sequences: Sequence[Sequence[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token id sequences as ``(ids [B, T], attention_mask [B, T])``, left-padded with ``pad``: the layout batched
    generation needs (a decoder continues every row from the last column; generate derives positions from the
    mask, so a padded row sees the positions it would see alone)."""
    import torch

    width = max(len(seq) for seq in sequences)
    ids = torch.full((len(sequences), width), pad, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        ids[row, width - len(seq):] = torch.as_tensor(seq, dtype=torch.long)
        mask[row, width - len(seq):] = 1
    return ids, mask
