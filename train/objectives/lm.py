"""The language-model objective and what every objective is built on: the micro-batch format, the loss
function's contract, the one LM cross-entropy (`lm_loss`) and the training run's token-weighted evaluation
(`evaluate`, reduced over ranks and turned into a perplexity by `train.eval.loss`)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import torch

from parallel.loss import lm_loss  # the one LM cross-entropy, beside the losses parallelize chooses from
from train.eval.loss import TokenLoss
from train.objectives.moe import MoETerms

Batch = tuple[torch.Tensor, torch.Tensor] | tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]


LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (model output, labels) -> mean loss


def forward_kwargs(loss_fn: LossFn) -> dict[str, Any]:
    """What the model must be called with for ``loss_fn`` (a head-computed loss wants hidden states)."""
    return getattr(loss_fn, "forward_kwargs", {})


def unpack(batch: Batch, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """(input_ids, labels[, model keyword tensors such as position_ids / doc_ids]) moved to ``device``."""
    x, y, *rest = batch
    extra = {k: v.to(device, non_blocking=True) for k, v in (rest[0] if rest else {}).items()}
    return x.to(device, non_blocking=True), y.to(device, non_blocking=True), extra


def is_pipeline(engine: Any) -> bool:
    """True for DeepSpeed's pipeline engine (pp > 1), which runs whole batches through `train_batch`."""
    return hasattr(engine, "train_batch") and hasattr(engine, "eval_batch")


def dp_group(engine: Any) -> Any:
    """The engine's data-parallel group (one rank per replica: the ranks of a tensor-parallel group or of a
    pipeline see the same batches); None (the world) for an engine without model parallelism."""
    mpu = getattr(engine, "mpu", None)
    return mpu.get_data_parallel_group() if mpu is not None else None


def counts(engine: Any) -> bool:
    """Whether this rank adds its evaluation sums: one rank per replica, the last pipeline stage's (which holds
    the loss) of tensor-parallel rank 0; every rank without a pipeline (the sums go over `dp_group`)."""
    if not is_pipeline(engine):
        return True
    return bool(engine.is_last_stage()) and engine.grid.get_slice_parallel_rank() == 0


def labelled_tokens(labels: torch.Tensor) -> int:
    """Labelled tokens of a CPU label tensor (a filler's: 0), read before the batch moves (no device sync)."""
    return int((labels != -100).sum())


@torch.no_grad()
def evaluate(engine: Any, batches: Callable[[], Iterator[Batch]], device: torch.device,
             loss_fn: LossFn = lm_loss) -> tuple[float, float]:
    """Token-weighted validation loss over the evaluation's micro-batches and its perplexity.

    Each micro-batch's mean loss times its labelled tokens is summed with `train.eval.loss.TokenLoss` (a filler
    micro-batch, `train.data.sampler.filler`, holds none and adds nothing), the sums are added over the
    data-parallel group, and `train.eval.loss.perplexity` caps the perplexity. Under pipeline parallelism the
    last stage returns each micro-batch's mean loss, weighted the same way, and the sums are added over the
    world with one contributing rank per replica. The result does not depend on the layout.
    """
    totals = TokenLoss(device)
    if is_pipeline(engine):
        micro = list(batches())
        tokens = [labelled_tokens(b[1]) for b in micro]
        losses = engine.eval_batch(iter(micro), num_micro_batches=len(micro), reduce_output=None,
                                   bcast_loss=False)
        if counts(engine):
            for loss, n in zip(losses, tokens, strict=True):
                if n:
                    totals.add_mean(loss, n)
        engine.train()
        totals = totals.all_reduce()
        return totals.mean_loss, totals.perplexity
    engine.eval()
    for batch in batches():
        n = labelled_tokens(batch[1])
        x, y, extra = unpack(batch, device)
        # logits, or hidden states for a head-computed loss
        out = engine(x, **extra, **forward_kwargs(loss_fn))
        if n:
            totals.add_mean(loss_fn(out, y), n)
    totals = totals.all_reduce(dp_group(engine))
    engine.train()
    return totals.mean_loss, totals.perplexity


class Objective:
    """What a step optimizes and what an evaluation measures; the default is the language-model loss.

    ``loss`` gets one micro-batch (whatever the dataset's ``batch`` returned) and returns the loss to
    backpropagate with named terms to log (detached scalars, averaged over micro-batches and ranks).
    ``evaluate`` returns the validation metrics; ``val_loss`` picks the best checkpoint.
    """

    def __init__(self, loss_fn: LossFn = lm_loss) -> None:
        self.loss_fn = loss_fn

    @property
    def moe(self) -> MoETerms:
        """Router losses, expert load terms and bias balancing of a native MoE model (made on first use, so a
        subclass need not call this __init__)."""
        if "_moe" not in self.__dict__:
            self.__dict__["_moe"] = MoETerms()
        return self.__dict__["_moe"]

    def loss(self, engine: Any, batch: Any,
             device: torch.device) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        x, y, extra = unpack(batch, device)
        return self.moe.add(engine, self.loss_fn(engine(x, **extra, **forward_kwargs(self.loss_fn)), y))

    def evaluate(self, engine: Any, batches: Callable[[], Iterator[Any]], device: torch.device,
                 step: int | None = None) -> dict[str, float]:
        """Validation metrics after optimizer step ``step`` (None: outside the loop)."""
        val_loss, val_ppl = evaluate(engine, batches, device, self.loss_fn)
        return {"val_loss": val_loss, "val_ppl": val_ppl}

    # Called on every rank around each optimizer step (1-based ``step``); the default does nothing.
    def begin_step(self, step: int) -> None:
        """Before the first micro-batch of ``step``."""
        self.moe.begin_step()

    def before_update(self, engine: Any, step: int) -> None:
        """After the last micro-batch's backward, before the engine applies the update (gradients are
        there)."""

    def end_step(self, engine: Any, step: int, terms: dict[str, float]) -> None:
        """After the update, with the step's logged terms averaged over micro-batches and ranks (the base
        class moves the MoE selection biases; an override calls it)."""
        self.moe.end_step(engine, dp_group(engine))
