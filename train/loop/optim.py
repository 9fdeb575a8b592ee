"""Optimizer parameter groups and the warm-up + cosine learning-rate schedule."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from train.config.schema import TrainSection


def decays(p: torch.Tensor) -> bool:
    """Matrices and embeddings decay; vectors do. A complex parameter stored as real pairs (model/complex.py,
    ``complex_view``) has one trailing dimension that is not a shape of its own."""
    return p.dim() - int(bool(getattr(p, "complex_view", False))) >= 2


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Matrices and embeddings decay; vectors (norm weights, biases, sink logits) never do."""
    decay, no_decay = [], []
    for p in model.parameters():
        if not p.requires_grad:
            continue
        (decay if decays(p) else no_decay).append(p)
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


class SkipNonFiniteAdamW(torch.optim.AdamW):
    """AdamW that skips its step on every rank when any rank's gradients are not finite.

    DeepSpeed's ZeRO 1-3 and bf16 optimizers already do this; fp32 without ZeRO hands the raw optimizer
    the gradients, where one NaN would reach every weight. This follows DeepSpeed's own protocol: the engine
    reads ``overflow`` after ``step()``, counts a skipped step and holds the LR schedule back.
    """

    overflow = False

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        import torch.distributed as dist

        grads = [p.grad for g in self.param_groups for p in g["params"] if p.grad is not None]
        bad = torch.zeros(1, device=grads[0].device if grads else "cpu")
        for g in grads:
            bad = torch.maximum(bad, (~torch.isfinite(g)).any().float())
        if dist.is_initialized():
            dist.all_reduce(bad, op=dist.ReduceOp.MAX)  # every rank is inside step() at the boundary
        self.overflow = bool(bad.item())
        return None if self.overflow else super().step(closure)


def build_optimizer(model: nn.Module, t: TrainSection, ds_config: dict[str, Any],
                    groups: list[dict[str, Any]] | None = None) -> torch.optim.Optimizer:
    """torch AdamW (every ZeRO stage takes it, no compiled op); without ZeRO and half precision, the
    non-finite-skipping subclass, since nothing else would guard the weights there. ``groups``: parameter
    groups to use instead of ``param_groups(model)`` (a group's own ``lr`` follows the same schedule)."""
    cls = torch.optim.AdamW
    stage = ds_config.get("zero_optimization", {}).get("stage", 0)
    half = ds_config.get("bf16", {}).get("enabled") or ds_config.get("fp16", {}).get("enabled")
    if stage == 0 and not half:
        cls = SkipNonFiniteAdamW
    groups = groups if groups is not None else param_groups(model, t.weight_decay)
    return cls(groups, lr=t.lr, betas=(t.beta1, t.beta2), eps=t.eps)


def build_scheduler(optimizer: torch.optim.Optimizer, t: TrainSection) -> torch.optim.lr_scheduler.LambdaLR:
    """A LambdaLR over ``lr_at``; DeepSpeed steps it once per optimizer step."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_at(step, t) / t.lr)
