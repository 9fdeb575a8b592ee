"""The training loop: micro-batches through the DeepSpeed engine, evaluation, checkpoints, metrics."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from parallel.layers import TPContext
from train.checkpoint.resume import load_checkpoint
from train.checkpoint.writer import CheckpointWriter, latest_complete, tag_for
from train.config.fields import ConfigError
from train.config.schema import JobConfig
from train.loop.faults import failpoint_hit
from train.loop.guards import BadStepCounter, SpikeDetector, TrainingDiverged
from train.loop.metrics import MetricsLogger, peak_memory_gb
from train.loop.preempt import Action, RunControl
from train.objectives.lm import Batch, LossFn, Objective, is_pipeline, lm_loss


@dataclass
class TrainState:
    """What a resumed run needs besides the engine: the step and the data position."""

    step: int = 0  # optimizer steps completed
    consumed_samples: int = 0  # global samples consumed (independent of the data-parallel size)
    val_ema: float | None = None  # smoothed train.best_metric (exponential moving average over evaluations)
    best_val_ema: float | None = None  # best smoothed train.best_metric, the one the best checkpoint holds
    meta: dict[str, Any] = field(default_factory=dict)  # static checkpoint metadata (config, model, tokenizer)

    def observe_val_loss(self, val_loss: float, smoothing: float, mode: str = "min") -> bool:
        """Fold a validation metric into the EMA; True when the smoothed value is the best so far (the lowest
        for ``mode='min'``, the highest for ``'max'``)."""
        ema = val_loss if self.val_ema is None else smoothing * self.val_ema + (1 - smoothing) * val_loss
        self.val_ema = ema
        better = self.best_val_ema is None or (ema > self.best_val_ema if mode == "max" else ema < self.best_val_ema)
        if better:
            self.best_val_ema = ema
            return True
        return False

    def checkpoint_meta(self) -> dict[str, Any]:
        return {**self.meta, "consumed_samples": self.consumed_samples, "val_ema": self.val_ema,
                "best_val_ema": self.best_val_ema}


def _accumulate(totals: dict[str, torch.Tensor], name: str, value: Any, device: torch.device) -> None:
    """Add a micro-batch's scalar (a tensor, or a number) to a float64 running sum on the device, no host read."""
    v = value.detach() if isinstance(value, torch.Tensor) else torch.as_tensor(value)
    v = v.to(device=device, dtype=torch.float64, non_blocking=True).reshape(())
    totals[name] = v if name not in totals else totals[name] + v


def _read_step_means(sums: dict[str, torch.Tensor], n: int, device: torch.device) -> dict[str, float]:
    """Means over micro-batches and ranks of the step's sums: one all-reduce and one host read per step.

    float64 throughout, in the order the values arrived, so the figures equal the host-side arithmetic of
    reading each micro-batch's value and summing it in Python (the golden curves pin that)."""
    names = sorted(sums)
    t = torch.stack([sums[k] for k in names]).to(device) / n
    dist.all_reduce(t)
    return dict(zip(names, (t / dist.get_world_size()).tolist(), strict=True))


def loss_scale_overflow(engine: Any, loss_avg: float) -> bool:
    """A skipped step of fp16 with a dynamic loss scale whose loss is finite: the scaler overflowed and halves
    its scale (DeepSpeed's protocol; it raises itself when the scale reaches its minimum). Not a bad step: the
    first steps of an fp16 run skip this way while the scale is found."""
    return math.isfinite(loss_avg) and bool(engine.fp16_enabled()) and bool(engine.dynamic_loss_scale())


def _engine_skips_grad_norm(engine: Any) -> bool:
    """DeepSpeed computes and keeps the global grad norm except for fp32 without ZeRO; there we do."""
    return engine.zero_optimization_stage() == 0 and not (engine.bfloat16_enabled() or engine.fp16_enabled())


@torch.no_grad()
def _grad_norm(module: torch.nn.Module, tp_ctx: TPContext | None = None) -> float:
    """L2 norm of the (already data-parallel averaged) gradients of a replica that ZeRO does not shard.

    Under tensor parallelism each rank holds a shard of the split parameters and a copy of the replicated
    ones: the split ones are summed over the group, the replicated ones counted once (from TP rank 0).
    """
    split = tp_ctx is not None and tp_ctx.size > 1
    squares = torch.zeros((), dtype=torch.float64, device=next(module.parameters()).device)
    for p in module.parameters():
        if p.grad is None or (split and tp_ctx.rank != 0 and not getattr(p, "tensor_model_parallel", False)):
            continue
        squares += torch.linalg.vector_norm(p.grad.double()).to(squares.device) ** 2  # stays on the device
    if split:
        dist.all_reduce(squares, group=tp_ctx.group)
    return squares.sqrt().item()  # the one host read


_LOSS = "loss"  # the key of the loss among the step's device-side sums (terms are "term:<name>")


class Trainer:
    """Runs optimizer steps through the engine, with evaluation, checkpoints and the bad-step guards."""

    def __init__(
        self,
        cfg: JobConfig,
        engine: Any,
        state: TrainState,
        *,
        batches: Callable[[int], Iterator[Batch]],
        val_batches: Callable[[], Iterator[Batch]],
        grad_accum: int,
        logger: MetricsLogger,
        device: torch.device,
        checkpoints: CheckpointWriter,
        loss_fn: LossFn = lm_loss,
        tp_ctx: TPContext | None = None,
        control: RunControl | None = None,
        after_step: Callable[[int], None] | None = None,
        objective: Objective | None = None,
    ) -> None:
        self.cfg, self.t = cfg, cfg.train
        self.engine, self.state = engine, state
        self.batches, self.val_batches = batches, val_batches
        self.grad_accum, self.logger, self.device, self.checkpoints = grad_accum, logger, device, checkpoints
        self.loss_fn, self.tp_ctx = loss_fn, tp_ctx
        self.objective = objective or Objective(loss_fn)
        self.terms: dict[str, float] = {}  # the last step's logged loss terms
        self.pipeline = is_pipeline(engine)
        self.spikes = SpikeDetector(zscore=self.t.spike_zscore)
        self.bad_steps = BadStepCounter(max_bad_steps=self.t.max_bad_steps, max_rollbacks=self.t.max_rollbacks)
        self.stream = batches(state.consumed_samples)
        self.last_eval: dict[str, float] = {}
        self.control = control  # stop / checkpoint requests from outside (train/loop/preempt.py), polled per step
        self.after_step = after_step  # called with the step number after every applied optimizer step

    def run(self) -> dict[str, float]:
        """Train from ``state.step`` to ``train.steps``; return the last validation result."""
        t, state = self.t, self.state
        tokens_per_step = t.global_batch_size * self.cfg.data.seq_len
        self.engine.train()
        window_start, window_steps = time.perf_counter(), 0
        while state.step < t.steps:
            self.checkpoints.poll(self.device)  # completes a background save once every rank has written it
            if self.control is not None and self._obey(self.control.poll(self.device)):
                break  # stopped on request, after saving this step: a resumed run continues from here
            lr = self.engine.get_lr()[0]  # the rate this step uses (the scheduler advances inside engine.step)
            log_now = (state.step + 1) % t.log_interval == 0 or state.step + 1 == t.steps
            loss_avg, grad_norm = self._step(want_grad_norm=log_now)
            state.step += 1
            state.consumed_samples += t.global_batch_size
            window_steps += 1
            if not (self.engine.was_step_applied() and math.isfinite(loss_avg)):
                if loss_scale_overflow(self.engine, loss_avg):
                    self._overflow(loss_avg)
                else:
                    self._bad_step(loss_avg)
                continue
            self.bad_steps.good()
            z = self.spikes.update(loss_avg)
            if z is not None and self._spike(loss_avg, z):
                continue
            tok_s = tokens_per_step * window_steps / max(time.perf_counter() - window_start, 1e-9)
            self.logger.progress(state.step, loss=f"{loss_avg:.4f}", tok_s=f"{tok_s:,.0f}")
            if log_now:
                if grad_norm is None:
                    grad_norm = self.engine.get_global_grad_norm()
                self.logger.log({
                    "step": state.step,
                    "loss": loss_avg,
                    **self.terms,
                    "lr": lr,
                    "grad_norm": float(grad_norm) if grad_norm is not None else None,
                    "tokens_per_s": tok_s,
                    "consumed_samples": state.consumed_samples,
                    "skipped_steps": self.bad_steps.skipped_total,
                    "mem_gb": peak_memory_gb(self.device),
                })
                window_start, window_steps = time.perf_counter(), 0
            if self.after_step is not None:
                self.after_step(state.step)
            if self._evaluate_and_save():
                window_start, window_steps = time.perf_counter(), 0
        self.checkpoints.wait()  # the run ends (or stops) with its last checkpoint complete
        return self.last_eval

    def _obey(self, action: Action) -> bool:
        """Checkpoint on request (unless this step is saved already); True when the loop must stop."""
        state = self.state
        if action == Action.CONTINUE:
            return False
        self.checkpoints.wait()
        latest = latest_complete(self.checkpoints.out_dir)
        if state.step > 0 and (latest is None or latest.name != tag_for(state.step)):
            path = self.checkpoints.save(self.engine, state.step, {**state.checkpoint_meta(), **self.last_eval})
            self.logger.write(f"step {state.step}: checkpoint saved to {path} (requested)")
        if action != Action.STOP:
            return False
        reason = self.control.stop_reason if self.control is not None else None
        self.logger.log({"step": state.step, "event": "stopped", "reason": reason,
                         "consumed_samples": state.consumed_samples})
        self.logger.write(f"step {state.step}: stopping before step {state.step + 1} of {self.t.steps} ({reason})")
        return True

    def _step(self, *, want_grad_norm: bool) -> tuple[float, float | None]:
        """One optimizer step over ``grad_accum`` micro-batches; the loss averaged over ranks.

        Nothing inside the accumulation waits for the device: the loss and the objective's terms are summed
        on the device, and read back once, after the engine's step, with one all-reduce for all of them."""
        grad_norm = None
        if self.pipeline:  # the engine pulls grad_accum micro-batches, runs the schedule and steps
            return float(self.engine.train_batch(data_iter=self.stream)), None
        batch_no = self.state.consumed_samples // self.t.global_batch_size + 1  # 1-based, across rollbacks
        step = self.state.step + 1
        self.objective.begin_step(step)
        sums: dict[str, torch.Tensor] = {}
        for micro in range(self.grad_accum):
            loss, parts = self.objective.loss(self.engine, next(self.stream), self.device)
            for name, value in parts.items():
                _accumulate(sums, f"term:{name}", value, self.device)
            loss = _injected_fault(loss, batch_no)
            self.engine.backward(loss)
            if micro == self.grad_accum - 1:
                if want_grad_norm and _engine_skips_grad_norm(self.engine):
                    grad_norm = _grad_norm(self.engine.module, self.tp_ctx)
                self.objective.before_update(self.engine, step)
            self.engine.step()  # DeepSpeed applies the update (with clipping) on the accumulation boundary
            _accumulate(sums, _LOSS, loss, self.device)
        means = _read_step_means(sums, self.grad_accum, self.device)
        self.terms = {k.removeprefix("term:"): v for k, v in means.items() if k != _LOSS}
        self.objective.end_step(self.engine, step, self.terms)
        return means[_LOSS], grad_norm

    def _bad_step(self, loss_avg: float) -> None:
        """The optimizer skipped this step on every rank (non-finite loss or gradients)."""
        step = self.state.step
        rollback = self.bad_steps.bad()
        self.logger.log({"step": step, "event": "skipped", "loss": loss_avg,
                         "consumed_samples": self.state.consumed_samples,
                         "skipped_steps": self.bad_steps.skipped_total})
        self.logger.write(f"step {step}: non-finite loss or gradients (loss {loss_avg}); update skipped on "
                          f"every rank ({self.bad_steps.streak} in a row)")
        if rollback:
            self._rollback(f"{self.bad_steps.streak} bad steps in a row")

    def _overflow(self, loss_avg: float) -> None:
        """fp16's loss scaler skipped this step (gradients overflowed at the current scale) and lowered the scale."""
        self.bad_steps.skipped_total += 1
        scale = float(self.engine.loss_scale())
        self.logger.log({"step": self.state.step, "event": "loss_scale", "loss": loss_avg, "loss_scale": scale,
                         "skipped_steps": self.bad_steps.skipped_total})
        self.logger.write(f"step {self.state.step}: fp16 gradients overflowed; update skipped, loss scale now "
                          f"{scale:g}")

    def _spike(self, loss_avg: float, z: float) -> bool:
        """Report a loss spike; True when it rolled the run back."""
        step = self.state.step
        self.logger.log({"step": step, "event": "spike", "loss": loss_avg, "zscore": z})
        self.logger.write(f"step {step}: loss spike {loss_avg:.4f} (z-score {z:.1f} against the running mean "
                          f"{self.spikes.mean:.4f})")
        if self.t.spike_action != "rollback":
            return False
        self.bad_steps.streak = 1
        self._rollback(f"a loss spike (z-score {z:.1f})")
        return True

    def _rollback(self, why: str) -> None:
        """Reload the last complete checkpoint and continue with the data after the offending batches."""
        import torch.distributed as dist

        bad_step, consumed = self.state.step, self.state.consumed_samples
        self.bad_steps.begin_rollback(bad_step)
        self.checkpoints.wait()
        target = latest_complete(self.checkpoints.out_dir)
        if target is None:
            raise TrainingDiverged(f"step {bad_step}: {why} and no checkpoint to roll back to; set "
                                   f"train.save_interval so one exists, or lower train.lr.")
        saved = load_checkpoint(self.engine, target, rank=dist.get_rank(), tp_ctx=self.tp_ctx)
        self.state.step = int(saved["step"])
        self.state.val_ema, self.state.best_val_ema = saved.get("val_ema"), saved.get("best_val_ema")
        self.state.consumed_samples = consumed  # move past the batches that went bad
        self.stream = self.batches(consumed)
        self.logger.truncate_after(self.state.step)
        self.logger.progress(self.state.step)
        self.logger.log({"step": self.state.step, "event": "rollback", "from_step": bad_step,
                         "consumed_samples": consumed, "reason": why})
        self.logger.write(f"step {bad_step}: {why}; rolled back to {target.name}, continuing with the data "
                          f"after sample {consumed}")

    def _evaluate_and_save(self) -> bool:
        """Evaluate and checkpoint when due; True when anything ran (the throughput window restarts)."""
        t, state = self.t, self.state
        last_step = state.step == t.steps
        best = ran = False
        if last_step or (t.eval_interval and state.step % t.eval_interval == 0):
            self.last_eval = self.objective.evaluate(self.engine, self.val_batches, self.device, step=state.step)
            best = state.observe_val_loss(best_metric(self.last_eval, t.best_metric), t.best_smoothing, t.best_mode)
            self.logger.log({"step": state.step, **self.last_eval, "val_ema": state.val_ema})
            shown = "  ".join(f"{k} {v:.4f}" if k != "val_ppl" else f"{k} {v:.2f}" for k, v in self.last_eval.items())
            self.logger.write(f"step {state.step}: {shown}{'  (best so far)' if best else ''}")
            ran = True
        if last_step or best or (t.save_interval and state.step % t.save_interval == 0):
            meta = {**state.checkpoint_meta(), **self.last_eval}
            if hasattr(self.stream, "state_dict"):  # a streamed corpus: its position goes into the checkpoint
                meta["data_state"] = self.stream.state_dict()
            path = self.checkpoints.save(self.engine, state.step, meta, best=best)
            if self.checkpoints.in_flight is None:
                self.logger.write(f"step {state.step}: checkpoint saved to {path}")
            else:
                self.logger.write(f"step {state.step}: checkpoint snapshot taken in "
                                  f"{self.checkpoints.last_pause_s:.2f} s, writing {path} in the background")
            ran = True
        return ran


def best_metric(result: dict[str, float], name: str) -> float:
    """The value of ``train.best_metric`` in an evaluation's result; a metric it does not hold is a ConfigError
    naming the ones it does (on every rank together: every rank has the same result)."""
    if name not in result:
        raise ConfigError(f"train.best_metric={name!r} is not among the validation metrics this run logs "
                          f"({', '.join(sorted(result))}); choose one of them.")
    return float(result[name])


def _injected_fault(loss: torch.Tensor, batch_no: int) -> torch.Tensor:
    """Test faults on the last rank: a NaN loss (``nan_batch@N``) or a 20x loss (``spike_batch@N``)."""
    if dist.get_rank() != dist.get_world_size() - 1:
        return loss
    if failpoint_hit("nan_batch", batch_no):
        return loss * float("nan")
    if failpoint_hit("spike_batch", batch_no):
        return loss * 20.0
    return loss


def train(cfg: JobConfig, engine: Any, state: TrainState, **parts: Any) -> dict[str, float]:
    """Run a ``Trainer`` (keyword parts as in its constructor); return the last validation result."""
    return Trainer(cfg, engine, state, **parts).run()
