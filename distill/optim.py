"""The optimizer and the learning-rate schedule of a distillation run."""

from __future__ import annotations

import math
from functools import partial

import torch
from torch import nn

from .config import DistillConfig


def make_optimizer(module: nn.Module, cfg: DistillConfig) -> torch.optim.Optimizer:
    """AdamW over everything trainable; norms, biases and other vectors get no weight decay."""
    decay, no_decay = [], []
    for p in module.parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.trainer.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=cfg.trainer.lr, betas=(0.9, 0.95))


def lr_factor(step: int, total: int, warmup: int, min_ratio: float) -> float:
    """Multiplier of the peak lr for optimizer step ``step`` (0-based): linear warmup, then cosine to min_ratio."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def make_schedule(optimizer: torch.optim.Optimizer, total: int, warmup: int,
                  min_ratio: float) -> torch.optim.lr_scheduler.LambdaLR:
    """The schedule of ``lr_factor`` over ``total`` optimizer steps, ``warmup`` of them warming up."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, partial(lr_factor, total=total, warmup=warmup, min_ratio=min_ratio))
