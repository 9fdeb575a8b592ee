"""Guards against bad steps: a loss-spike detector and the bookkeeping of skipped steps and rollbacks.

A step whose loss or gradients are not finite is skipped by the optimizer on every rank together (DeepSpeed's
overflow protocol; see ``train.loop.optim.SkipNonFiniteAdamW`` for fp32 without ZeRO). After
``train.max_bad_steps`` such steps in a row, the trainer rolls back to the last complete checkpoint and
continues with the data that follows the offending batches. A loss spike (a z-score against an exponential
moving average of recent losses) is logged, or treated the same way with ``train.spike_action=rollback``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


class TrainingDiverged(RuntimeError):
    """Bad steps that the guards could not recover from; the message says what happened and what to try."""


@dataclass
class SpikeDetector:
    """z-score of each step's loss against an EMA of the mean and variance of the losses before it."""

    zscore: float  # threshold; 0 disables detection
    beta: float = 0.95  # EMA factor of the running mean and variance
    warmup: int = 10  # steps observed before any spike is reported
    mean: float = 0.0
    var: float = 0.0
    seen: int = 0

    def update(self, loss: float) -> float | None:
        """Observe a finite loss; return its z-score when it is a spike (spikes don't move the statistics)."""
        if self.zscore > 0 and self.seen >= self.warmup:
            z = (loss - self.mean) / math.sqrt(self.var + 1e-12)
            if z > self.zscore:
                return z
        if self.seen == 0:
            self.mean = loss
        else:
            delta = loss - self.mean
            self.mean += (1 - self.beta) * delta
            self.var = self.beta * (self.var + (1 - self.beta) * delta * delta)
        self.seen += 1
        return None


@dataclass
class BadStepCounter:
    """Consecutive bad steps and rollbacks of a run, with the limits from the recipe."""

    max_bad_steps: int  # consecutive bad steps that trigger a rollback (0: fail at the first)
    max_rollbacks: int  # rollbacks allowed before the run stops
    streak: int = 0
    skipped_total: int = 0
    rollbacks: int = 0

    def bad(self) -> bool:
        """Count a skipped step; True when it is time to roll back."""
        self.streak += 1
        self.skipped_total += 1
        return self.streak >= max(1, self.max_bad_steps)

    def good(self) -> None:
        self.streak = 0

    def begin_rollback(self, step: int) -> None:
        if self.max_bad_steps == 0 or self.rollbacks >= self.max_rollbacks:
            raise TrainingDiverged(
                f"step {step}: {self.streak} bad step(s) in a row after {self.rollbacks} rollback(s) "
                f"(train.max_bad_steps={self.max_bad_steps}, train.max_rollbacks={self.max_rollbacks}); "
                f"lower train.lr, raise train.warmup_steps or check the data."
            )
        self.rollbacks += 1
        self.streak = 0
