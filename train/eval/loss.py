"""Perplexity and token-weighted loss aggregation, on one process or across data-parallel ranks.

A corpus loss is the mean over *tokens*, not over batches: batches holding different numbers of trained
tokens (supervised data, the last partial batch) would otherwise be weighted wrongly. So each rank keeps two
sums, the summed token loss and the token count, and the ranks add them with one all-reduce (float64, so
counts stay exact up to 2**53 and sums lose no precision) before dividing.

    totals = TokenLoss()
    for batch in batches:
        totals.add(mean_loss_of_batch * n_tokens, n_tokens)   # or totals.add_mean(mean_loss_of_batch, n_tokens)
    totals = totals.all_reduce(dp_group)                      # a no-op without torch.distributed
    print(totals.mean_loss, totals.perplexity)

Under tensor or pipeline parallelism, pass the data-parallel group: ranks of one tensor-parallel group see
the same batch and would count it several times over the whole world.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist

from train.eval.text import EvalInputError

MAX_LOG_PERPLEXITY = math.log(torch.finfo(torch.float64).max)
"""Largest mean loss whose exponential is a finite float (about 709.78); beyond it perplexity is inf."""


def _number(value: float | torch.Tensor, name: str) -> float:
    """A Python float from a float or a one-element tensor; ValueError naming `name` otherwise."""
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise EvalInputError(f"{name} must be a single number, got a tensor of shape {tuple(value.shape)}")
        return float(value.detach().double().item())
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise EvalInputError(f"{name}={value!r} must be a number")
    return float(value)


def _count(value: int | torch.Tensor, name: str) -> int:
    """A token count as an int; ValueError unless it is a whole number >= 0."""
    n = _number(value, name)
    if n < 0 or n != int(n):
        raise EvalInputError(f"{name}={n} must be a whole number >= 0")
    return int(n)


def perplexity(mean_loss: float | torch.Tensor) -> float:
    """exp(mean token cross-entropy in nats); inf when that overflows a float (mean_loss > ~709.78).

    A NaN or negative loss is not a cross-entropy and raises ValueError naming the value.
    """
    loss = _number(mean_loss, "mean_loss")
    if math.isnan(loss) or loss < 0:
        raise EvalInputError(f"mean_loss={loss} is not a mean token cross-entropy (must be >= 0)")
    return math.exp(loss) if loss <= MAX_LOG_PERPLEXITY else math.inf


def _reduce_device(group: dist.ProcessGroup | None) -> torch.device:
    """Where the collective's tensor must live: the current CUDA device for nccl, else the CPU."""
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_token_loss(loss_sum: float | torch.Tensor, tokens: int | torch.Tensor,
                          group: dist.ProcessGroup | None = None) -> tuple[float, int]:
    """(summed token loss, token count) added over the ranks of `group`.

    Without an initialised torch.distributed the local sums come back unchanged. group=None with an
    initialised process group means the default (world) group.
    """
    local_sum = _number(loss_sum, "loss_sum")
    local_tokens = _count(tokens, "tokens")
    if not (dist.is_available() and dist.is_initialized()):
        if group is not None:
            raise EvalInputError(f"group={group!r} was given but torch.distributed is not initialised")
        return local_sum, local_tokens
    totals = torch.tensor([local_sum, local_tokens], dtype=torch.float64, device=_reduce_device(group))
    dist.all_reduce(totals, op=dist.ReduceOp.SUM, group=group)
    return float(totals[0].item()), int(totals[1].item())


@dataclass
class TokenLoss:
    """Running sums for a token-weighted mean loss: add per batch, all-reduce once, then read."""

    loss_sum: float = 0.0  # sum over tokens of the per-token loss (nats)
    tokens: int = 0  # how many tokens the sum covers

    def add(self, loss_sum: float | torch.Tensor, tokens: int | torch.Tensor) -> None:
        """Add a batch given as its summed token loss and its token count."""
        n = _count(tokens, "tokens")
        self.loss_sum += _number(loss_sum, "loss_sum")
        self.tokens += n

    def add_mean(self, mean_loss: float | torch.Tensor, tokens: int | torch.Tensor) -> None:
        """Add a batch given as its mean token loss and its token count."""
        n = _count(tokens, "tokens")
        self.add(_number(mean_loss, "mean_loss") * n, n)

    def all_reduce(self, group: dist.ProcessGroup | None = None) -> TokenLoss:
        """A new TokenLoss holding the sums over the ranks of `group` (see `all_reduce_token_loss`)."""
        loss_sum, tokens = all_reduce_token_loss(self.loss_sum, self.tokens, group)
        return TokenLoss(loss_sum, tokens)

    @property
    def mean_loss(self) -> float:
        """Token-weighted mean loss; ValueError when no token was added (nothing to average)."""
        if self.tokens == 0:
            raise EvalInputError("tokens=0: no token was added, so there is no mean loss")
        return self.loss_sum / self.tokens

    @property
    def perplexity(self) -> float:
        """perplexity(mean_loss)."""
        return perplexity(self.mean_loss)
