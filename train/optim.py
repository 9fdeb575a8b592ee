"""Optimizer parameter groups and the warm-up + cosine learning-rate schedule."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from train.config import TrainSection


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Matrices and embeddings decay; vectors (norm weights, biases, sink logits) never do."""
    decay, no_decay = [], []
    for p in model.parameters():
        if not p.requires_grad:
            continue
        (decay if p.dim() >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def lr_at(step: int, t: TrainSection) -> float:
    """Learning rate for optimizer step ``step`` (0-based): linear warm-up, then cosine down to min_lr."""
    if step < t.warmup_steps:
        return t.lr * (step + 1) / t.warmup_steps
    decay_steps = max(1, t.steps - t.warmup_steps)
    progress = min(1.0, (step - t.warmup_steps) / decay_steps)
    return t.min_lr + 0.5 * (t.lr - t.min_lr) * (1.0 + math.cos(math.pi * progress))


def build_optimizer(model: nn.Module, t: TrainSection) -> torch.optim.Optimizer:
    """torch AdamW: it works under every ZeRO stage and needs no compiled op."""
    return torch.optim.AdamW(param_groups(model, t.weight_decay), lr=t.lr, betas=(t.beta1, t.beta2), eps=t.eps)


def build_scheduler(optimizer: torch.optim.Optimizer, t: TrainSection) -> torch.optim.lr_scheduler.LambdaLR:
    """A LambdaLR over ``lr_at``; DeepSpeed steps it once per optimizer step."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_at(step, t) / t.lr)
