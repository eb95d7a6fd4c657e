"""Token id sequences of different lengths into one batch tensor."""

from __future__ import annotations

from collections.abc import Sequence

import torch


def left_pad(sequences: Sequence[Sequence[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token id sequences as ``(ids [B, T], attention_mask [B, T])``, left-padded with ``pad``: the layout batched
    generation needs (a decoder continues every row from the last column; generate derives positions from the
    mask, so a padded row sees the positions it would see alone)."""
    width = max(len(seq) for seq in sequences)
    ids = torch.full((len(sequences), width), pad, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        ids[row, width - len(seq):] = torch.as_tensor(seq, dtype=torch.long)
        mask[row, width - len(seq):] = 1
    return ids, mask
