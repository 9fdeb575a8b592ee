"""The training loop: micro-batches through the DeepSpeed engine, evaluation, checkpoints, metrics."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

from train.checkpoint import CheckpointWriter
from train.config import JobConfig
from train.metrics import MetricsLogger, peak_memory_gb

Batch = tuple[torch.Tensor, torch.Tensor]


@dataclass
class TrainState:
    """What a resumed run needs besides the engine: the step and the data position."""

    step: int = 0  # optimizer steps completed
    consumed_samples: int = 0  # global samples consumed (independent of the data-parallel size)
    val_ema: float | None = None  # smoothed validation loss (exponential moving average over evaluations)
    best_val_ema: float | None = None  # lowest smoothed validation loss, the one the best checkpoint holds
    meta: dict[str, Any] = field(default_factory=dict)  # static checkpoint metadata (config, model, tokenizer)

    def observe_val_loss(self, val_loss: float, smoothing: float) -> bool:
        """Fold a validation loss into the EMA; True when the smoothed loss is the best so far."""
        ema = val_loss if self.val_ema is None else smoothing * self.val_ema + (1 - smoothing) * val_loss
        self.val_ema = ema
        if self.best_val_ema is None or ema < self.best_val_ema:
            self.best_val_ema = ema
            return True
        return False

    def checkpoint_meta(self) -> dict[str, Any]:
        return {**self.meta, "consumed_samples": self.consumed_samples, "val_ema": self.val_ema,
                "best_val_ema": self.best_val_ema}


def lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy in fp32; label -100 is ignored."""
    # logits: (B, T, V), labels: (B, T)
    return F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=-100)


def _mean_over_ranks(value: float, device: torch.device) -> float:
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.item() / dist.get_world_size()


def _engine_skips_grad_norm(engine: Any) -> bool:
    """DeepSpeed computes and keeps the global grad norm except for fp32 without ZeRO; there we do."""
    return engine.zero_optimization_stage() == 0 and not (engine.bfloat16_enabled() or engine.fp16_enabled())


@torch.no_grad()
def _grad_norm(module: torch.nn.Module) -> float:
    """L2 norm of the (already data-parallel averaged) gradients of an unsharded replica."""
    grads = [p.grad for p in module.parameters() if p.grad is not None]
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads])).item()


@torch.no_grad()
def evaluate(engine: Any, batches: Callable[[], Iterator[Batch]], device: torch.device) -> tuple[float, float]:
    """Token-weighted validation loss over all ranks and its perplexity."""
    engine.eval()
    totals = torch.zeros(2, dtype=torch.float64, device=device)  # (sum of token losses, token count)
    for x, y in batches():
        x, y = x.to(device), y.to(device)
        n = (y != -100).sum()
        totals += torch.stack([lm_loss(engine(x), y).double() * n, n.double()])
    dist.all_reduce(totals)
    engine.train()
    loss = (totals[0] / totals[1].clamp(min=1)).item()
    return loss, math.exp(min(loss, 50.0))


def train(
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
) -> dict[str, float]:
    """Run from ``state.step`` to ``cfg.train.steps``; returns the last validation result."""
    t = cfg.train
    tokens_per_step = t.global_batch_size * cfg.data.seq_len
    stream = batches(state.consumed_samples)
    engine.train()
    window_start, window_steps = time.perf_counter(), 0
    last_eval: dict[str, float] = {}
    while state.step < t.steps:
        lr = engine.get_lr()[0]  # the rate this step uses (the scheduler advances inside engine.step)
        log_now = (state.step + 1) % t.log_interval == 0 or state.step + 1 == t.steps
        loss_sum, grad_norm = 0.0, None
        for micro in range(grad_accum):
            x, y = next(stream)
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            loss = lm_loss(engine(x), y)
            engine.backward(loss)
            if log_now and micro == grad_accum - 1 and _engine_skips_grad_norm(engine):
                grad_norm = _grad_norm(engine.module)
            engine.step()  # DeepSpeed applies the update (with clipping) on the accumulation boundary
            loss_sum += loss.item()
        state.step += 1
        state.consumed_samples += t.global_batch_size
        window_steps += 1
        loss_avg = _mean_over_ranks(loss_sum / grad_accum, device)
        if not math.isfinite(loss_avg):
            raise FloatingPointError(f"loss is {loss_avg} at step {state.step}: lower train.lr or check the data.")
        elapsed = time.perf_counter() - window_start
        tok_s = tokens_per_step * window_steps / max(elapsed, 1e-9)
        logger.progress(state.step, loss=f"{loss_avg:.4f}", tok_s=f"{tok_s:,.0f}")

        if log_now:
            if grad_norm is None:
                grad_norm = engine.get_global_grad_norm()
            logger.log({
                "step": state.step,
                "loss": loss_avg,
                "lr": lr,
                "grad_norm": float(grad_norm) if grad_norm is not None else None,
                "tokens_per_s": tok_s,
                "consumed_samples": state.consumed_samples,
                "mem_gb": peak_memory_gb(device),
            })
            window_start, window_steps = time.perf_counter(), 0

        last_step = state.step == t.steps
        best = False
        if last_step or (t.eval_interval and state.step % t.eval_interval == 0):
            val_loss, val_ppl = evaluate(engine, val_batches, device)
            best = state.observe_val_loss(val_loss, t.best_smoothing)
            last_eval = {"val_loss": val_loss, "val_ppl": val_ppl}
            logger.log({"step": state.step, **last_eval, "val_ema": state.val_ema})
            logger.write(f"step {state.step}: val_loss {val_loss:.4f}  val_ppl {val_ppl:.2f}"
                         f"{'  (best so far)' if best else ''}")
            window_start, window_steps = time.perf_counter(), 0
        if last_step or best or (t.save_interval and state.step % t.save_interval == 0):
            path = checkpoints.save(engine, state.step, {**state.checkpoint_meta(), **last_eval}, best=best)
            logger.write(f"step {state.step}: checkpoint saved to {path}")
            window_start, window_steps = time.perf_counter(), 0
    return last_eval
