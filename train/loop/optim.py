"""Optimizer parameter groups and the warm-up + cosine learning-rate schedule."""

from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace
from typing import Any

import torch
from torch import nn

from train.config.schema import TrainSection


def decays(p: torch.Tensor) -> bool:
    """Matrices and embeddings decay; vectors do. A complex parameter stored as real pairs (model/complex.py,
    ``complex_view``) has one trailing dimension that is not a shape of its own. A parameter ZeRO-3 partitioned
    at construction (an HF model loaded under ``HfDeepSpeedConfig``) is judged by its full shape (``ds_shape``)."""
    return len(getattr(p, "ds_shape", p.shape)) - int(bool(getattr(p, "complex_view", False))) >= 2


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Matrices and embeddings decay; vectors (norm weights, biases, sink logits) never do.

    Expert-parallel expert parameters (DeepSpeed's ``is_moe_param``: ``allreduce=False``, set by
    `parallel.moe.apply_ep`) go into groups of their own marked ``'moe': True`` and named by their expert
    group, by DeepSpeed's `split_params_into_different_moe_groups_for_optimizer`: ZeRO partitions and reduces
    those over the expert-data-parallel group."""
    decay, no_decay = [], []
    for p in model.parameters():
        if not p.requires_grad:
            continue
        (decay if decays(p) else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    if any(getattr(p, "allreduce", True) is False for p in decay + no_decay):  # DeepSpeed's is_moe_param
        # deepspeed is imported here, not with the module: the config checks import this module without it
        from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer

        for group, name in zip(groups, ("decay", "no_decay"), strict=False):
            group["name"] = name
        groups = split_params_into_different_moe_groups_for_optimizer(groups)
    return groups


def lr_at(step: int, t: TrainSection) -> float:
    """Learning rate for optimizer step ``step`` (0-based): linear warm-up, then cosine down to min_lr."""
    return LRSchedule.from_config(t).rate(step)


@dataclass
class LRSchedule:
    """The learning rate of every optimizer step (0-based): a linear warm-up to ``lr``, then a cosine down to
    ``min_lr`` at ``steps``; a run resumed with ``train.resume_schedule='extend'`` and other settings starts a
    new cosine segment at ``restart_step``, from the rate ``restart_lr`` reached there, down to ``min_lr`` at
    ``steps``.

    As the multiplier of DeepSpeed's LambdaLR (``__call__``), its fields are saved with the scheduler's state in
    every checkpoint, so a resumed run knows the schedule its checkpoint followed (``resumed``).
    """

    lr: float  # peak rate after the warm-up
    min_lr: float  # rate at the end of the decay
    warmup_steps: int  # steps of the linear warm-up
    steps: int  # the step the decay ends at (train.steps)
    restart_step: int = 0  # a resumed run's new decay segment begins at this step (0: none)
    restart_lr: float = 0.0  # the rate the segment begins from (the rate reached at restart_step)
    on_resume: str = "extend"  # train.resume_schedule: what a resumed run with other settings does

    @classmethod
    def from_config(cls, t: TrainSection) -> LRSchedule:
        """The schedule of a run planned from step 0 with the train section ``t``."""
        return cls(lr=t.lr, min_lr=t.min_lr, warmup_steps=t.warmup_steps, steps=t.steps,
                   on_resume=t.resume_schedule)

    def _settings(self) -> tuple[float, float, int, int]:
        return self.lr, self.min_lr, self.warmup_steps, self.steps

    def rate(self, step: int) -> float:
        """The learning rate of optimizer step ``step`` (0-based)."""
        if self.restart_step and step >= self.restart_step:
            progress = min(1.0, (step - self.restart_step) / max(1, self.steps - self.restart_step))
            return self.min_lr + 0.5 * (self.restart_lr - self.min_lr) * (1.0 + math.cos(math.pi * progress))
        if step < self.warmup_steps:
            return self.lr * (step + 1) / self.warmup_steps
        decay_steps = max(1, self.steps - self.warmup_steps)
        progress = min(1.0, (step - self.warmup_steps) / decay_steps)
        return self.min_lr + 0.5 * (self.lr - self.min_lr) * (1.0 + math.cos(math.pi * progress))

    def __call__(self, step: int) -> float:
        """LambdaLR's multiplier of a parameter group's own base rate."""
        return self.rate(step) / self.lr

    def resumed(self, saved: LRSchedule, step: int) -> LRSchedule:
        """The schedule of this run (planned from its settings) resumed at ``step`` (the optimizer steps taken)
        from a checkpoint that followed ``saved``.

        Same settings: ``saved`` itself (with any segment it began), so the run continues exactly. Otherwise,
        ``on_resume='recompute'``: this run's own schedule from step 0; ``'extend'``: the warm-up goes on with
        this run's settings while ``step`` is inside it, else a new cosine segment from ``saved.rate(step)`` (the
        rate reached) down to ``min_lr`` at ``steps``. Steps before ``step`` are never run again.
        """
        if saved._settings() == self._settings():
            return replace(saved, on_resume=self.on_resume)
        planned = replace(self, restart_step=0, restart_lr=0.0)
        if self.on_resume == "recompute" or step < self.warmup_steps:
            return planned
        return replace(planned, restart_step=step, restart_lr=saved.rate(step))

    def describe(self) -> str:
        """One line for the log: the warm-up and the decay, with a resumed segment when there is one."""
        text = (f"warm-up {self.warmup_steps} steps to {self.lr:g}, cosine to {self.min_lr:g} at step "
                f"{self.steps}")
        if self.restart_step:
            text += (f", from step {self.restart_step} a new cosine from {self.restart_lr:.6g} to "
                     f"{self.min_lr:g} at step {self.steps}")
        return text


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
    """A LambdaLR over the run's `LRSchedule` (one object for every group); DeepSpeed steps it once per
    optimizer step and saves the schedule's fields with the scheduler's state."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, LRSchedule.from_config(t))


def scheduler_schedule(scheduler: Any) -> LRSchedule | None:
    """The `LRSchedule` a scheduler built by `build_scheduler` follows (None for any other scheduler)."""
    fns = getattr(scheduler, "lr_lambdas", None) or [None]
    return fns[0] if isinstance(fns[0], LRSchedule) else None


def set_schedule(scheduler: Any, schedule: LRSchedule) -> None:
    """Make ``scheduler`` follow ``schedule`` from its current step on, the rate of that step included: each
    parameter group's rate is set now (a loaded optimizer holds the rate its checkpoint saved)."""
    for fn in {id(f): f for f in scheduler.lr_lambdas}.values():
        for f in fields(LRSchedule):
            setattr(fn, f.name, getattr(schedule, f.name))
    step = scheduler.last_epoch
    for group, base in zip(scheduler.optimizer.param_groups, scheduler.base_lrs, strict=True):
        group["lr"] = base * schedule(step)
    scheduler._last_lr = [group["lr"] for group in scheduler.optimizer.param_groups]
