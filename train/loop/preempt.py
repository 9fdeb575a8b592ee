"""Asking a running training loop to checkpoint, or to checkpoint and stop, from outside it.

A scheduler announces the end of a job with a signal (SLURM sends ``USR2`` some time before a time limit or a
preemption). A signal handler cannot save a DeepSpeed checkpoint itself: the save is collective and the
handler interrupts one rank at an arbitrary point. So the handler only records the request, and the loop asks
``RunControl.poll`` once per optimizer step; the answer is all-reduced, so every rank takes the same action
at the same step even when the signal reached only some of them.

    control = RunControl(checkpoint_every_s=1800)   # also a checkpoint every 30 min of wall time
    control.install(signal.SIGUSR2)                 # the handler only sets a flag
    main(argv, control=control)                     # the loop polls it; a stop saves and returns early
    if control.stopped: ...                         # requeue, resubmit, ...

This module knows nothing of SLURM: ``slurm/`` installs the handler and requeues the job.
"""

from __future__ import annotations

import enum
import signal
import time
from collections.abc import Callable
from types import FrameType
from typing import Any

import torch
import torch.distributed as dist

SignalHandler = Callable[[int, FrameType | None], Any] | int | None


class Action(enum.IntEnum):
    """What the loop does after a step; ranks agree on the largest value any of them asked for."""

    CONTINUE = 0
    CHECKPOINT = 1  # save a checkpoint of the current step, keep training
    STOP = 2  # save a checkpoint of the current step, return before train.steps


class RunControl:
    """Stop and checkpoint requests for one run, polled collectively once per optimizer step."""

    def __init__(self, checkpoint_every_s: float = 0.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.checkpoint_every_s = checkpoint_every_s  # wall-time checkpoint period (0: only on request)
        self._clock = clock
        self._last_checkpoint = clock()
        self._stop_requested = False  # set on this rank by a signal or ``request_stop``
        self.stop_reason: str | None = None
        self.stopped = False  # every rank agreed to stop; the loop saved and returned
        self._previous: dict[int, SignalHandler] = {}

    # ------------------------------------------------------------------ requests (any thread, any rank)

    def request_stop(self, reason: str) -> None:
        """Ask the loop to checkpoint and return at the end of the current step."""
        self._stop_requested = True
        self.stop_reason = self.stop_reason or reason

    @property
    def stop_requested(self) -> bool:
        return self._stop_requested

    def install(self, *signums: int) -> None:
        """Turn each signal into a stop request; the handlers in place before are kept for ``previous``."""
        for signum in signums:
            self._previous[signum] = signal.getsignal(signum)
            signal.signal(signum, self._on_signal)

    def uninstall(self) -> None:
        """Put back the handlers ``install`` replaced."""
        for signum, handler in self._previous.items():
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)

    def previous(self, signum: int) -> SignalHandler:
        """The handler ``signum`` had before ``install`` (to hand the signal on once the checkpoint is saved)."""
        return self._previous.get(signum)

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self.request_stop(f"signal {signal.Signals(signum).name}")

    # ------------------------------------------------------------------ polling (the loop, every rank)

    def poll(self, device: torch.device) -> Action:
        """Collective: the action every rank takes after this step. Call it on all ranks, once per step."""
        local = Action.STOP if self._stop_requested else Action.CONTINUE
        due = self.checkpoint_every_s > 0 and self._clock() - self._last_checkpoint >= self.checkpoint_every_s
        if local == Action.CONTINUE and due:
            local = Action.CHECKPOINT
        agreed = torch.tensor([int(local)], dtype=torch.int32, device=device)
        if dist.is_initialized():
            dist.all_reduce(agreed, op=dist.ReduceOp.MAX)
        action = Action(int(agreed.item()))
        if action != Action.CONTINUE:
            self._last_checkpoint = self._clock()
        if action == Action.STOP:
            self.stopped = True
            self.stop_reason = self.stop_reason or "another rank was asked to stop"
        return action
