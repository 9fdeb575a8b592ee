"""Perplexity and the token-weighted validation loss, on one process or summed over ranks: the one place
where a loss becomes a perplexity and where validation sums are reduced.

A corpus loss is the mean over *tokens*, not over batches: batches holding different numbers of trained
tokens (supervised data, the last partial batch) would otherwise be weighted wrongly. So each rank keeps two
float64 sums on its device, the summed token loss and the token count, adds every batch to them without a
host sync, and the ranks add them with one all-reduce before dividing (float64: counts stay exact up to
2**53 and the sums lose no precision).

    totals = TokenLoss(device)
    for batch in batches:
        totals.add_mean(lm_loss(logits, labels), (labels != -100).sum())   # or totals.add(loss_sum, n_tokens)
    totals = totals.all_reduce(group)            # None: the world; a no-op without torch.distributed
    print(totals.mean_loss, totals.perplexity)

`WeightedMean` is the same reduction for several named values sharing one weight (DPO's per-pair metrics,
the batch means of a research recipe's terms); `TokenLoss` is its one-value case weighted by tokens.

Under tensor parallelism every rank of a tensor-parallel group sees the same batch: summing over the world
counts that batch once per TP rank in the loss sum and in the token count alike, so the mean is unchanged
(the training loop reduces over the world); passing the data-parallel group counts it once, which is what every
evaluation does (`train.objectives.lm.dp_group`), over micro-batches that are the same for any layout
(`train.data.sampler.eval_batches`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

from train.eval.text import EvalInputError

if TYPE_CHECKING:
    from typing_extensions import Self  # typing.Self from Python 3.11

MAX_LOG_PERPLEXITY = 50.0
"""The cap on the loss a perplexity is computed from: perplexity(loss) = exp(min(loss, 50)), at most
exp(50) ~ 5.2e21.

Why 50 nats: a uniform guess over any practical vocabulary costs log(V) nats (13.8 for a million tokens), so a
mean token loss above 50 only says that the model has diverged; its exact exponential carries no information,
and above ~709.8 it overflows a float. A capped value stays a finite number, so metrics.jsonl (which writes
non-finite floats as null), plots on a log axis and comparisons between runs keep a point for it. 50 is also
the cap the training loop has always logged ``val_ppl`` with, so earlier metrics files stay comparable. Read a
perplexity of exp(50) as "at least exp(50)".
"""


def _one(value: torch.Tensor, name: str) -> torch.Tensor:
    """A one-element tensor as a 0-d tensor (detached); EvalInputError naming `name` otherwise."""
    if value.numel() != 1:
        raise EvalInputError(f"{name} must be a single number, got a tensor of shape {tuple(value.shape)}")
    return value.detach().reshape(())


def _number(value: float | torch.Tensor, name: str) -> float:
    """A Python float from a float or a one-element tensor; EvalInputError naming `name` otherwise."""
    if isinstance(value, torch.Tensor):
        return float(_one(value, name).double().item())
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise EvalInputError(f"{name}={value!r} must be a number")
    return float(value)


def _count(value: float, name: str) -> int:
    """A Python token count as an int; EvalInputError unless it is a whole number >= 0."""
    n = _number(value, name)
    if n < 0 or n != int(n):
        raise EvalInputError(f"{name}={n} must be a whole number >= 0")
    return int(n)


def perplexity(mean_loss: float | torch.Tensor) -> float:
    """exp(mean token cross-entropy in nats), the loss capped at `MAX_LOG_PERPLEXITY` (50) first.

    Every perplexity the project reports comes from here. NaN comes back as NaN (a diverged evaluation is
    reported as it is, for the loop's guards to act on); a negative loss is not a cross-entropy and raises
    EvalInputError naming the value.
    """
    loss = _number(mean_loss, "mean_loss")
    if math.isnan(loss):
        return math.nan
    if loss < 0:
        raise EvalInputError(f"mean_loss={loss} is not a mean token cross-entropy (must be >= 0)")
    return math.exp(min(loss, MAX_LOG_PERPLEXITY))


def _reduce_device(group: dist.ProcessGroup | None, device: torch.device) -> torch.device:
    """Where the collective's tensor must live: a CUDA device for nccl, else where the sums already are."""
    if dist.get_backend(group) == "nccl" and device.type != "cuda":
        return torch.device("cuda", torch.cuda.current_device())
    return device


def _scalar(value: float | torch.Tensor, name: str, device: torch.device) -> torch.Tensor:
    """A 0-d float64 tensor on `device` (a tensor is not read back to the host: no sync)."""
    if isinstance(value, torch.Tensor):
        return _one(value, name).double().to(device)
    return torch.tensor(_number(value, name), dtype=torch.float64, device=device)


def _weight(value: int | torch.Tensor, name: str, device: torch.device) -> torch.Tensor:
    """A 0-d weight tensor on `device`: a Python count is checked (whole, >= 0); a tensor is kept as it is."""
    if isinstance(value, torch.Tensor):
        return _one(value, name).to(device)
    return torch.tensor(_count(value, name), dtype=torch.int64, device=device)


class WeightedMean:
    """Weighted means of named values over batches and ranks.

    Per batch, each value's weighted sum (the value times the batch's weight) and the weight are added to
    float64 sums on one device; `all_reduce` adds the ranks' sums with one collective; each mean is its sum
    over the total weight. Batches are added in the order they come, one addition per batch.
    """

    weight_name = "weight"  # what the weight is called in error messages

    def __init__(self, names: Sequence[str], device: torch.device | str | None = None) -> None:
        self.names = tuple(names)
        if len(set(self.names)) != len(self.names):
            raise EvalInputError(f"names={list(self.names)} must be distinct")
        # (one sum per name..., total weight)
        self.totals = torch.zeros(len(self.names) + 1, dtype=torch.float64, device=device)

    @property
    def device(self) -> torch.device:
        return self.totals.device

    def add_sums(self, sums: Sequence[float | torch.Tensor], weight: int | torch.Tensor) -> None:
        """Add one batch: the weighted sum of each value (in the order of `names`) and the batch's weight."""
        if len(sums) != len(self.names):
            raise EvalInputError(f"sums has {len(sums)} values for the {len(self.names)} names "
                                 f"{list(self.names)}")
        w = _weight(weight, self.weight_name, self.device)
        parts = [_scalar(s, f"sums[{name!r}]", self.device) for s, name in zip(sums, self.names, strict=True)]
        self.totals += torch.stack([*parts, w.double()])

    def add_means(self, means: Sequence[float | torch.Tensor], weight: int | torch.Tensor) -> None:
        """Add one batch given as the mean of each value over the batch and its weight (e.g. its tokens)."""
        w = _weight(weight, self.weight_name, self.device)
        self.add_sums([_scalar(m, "mean", self.device) * w for m in means], w)

    def all_reduce(self, group: dist.ProcessGroup | None = None) -> Self:
        """A copy holding the sums over the ranks of `group` (None: the world group).

        Without an initialised torch.distributed the copy holds the local sums.
        """
        out = type(self).__new__(type(self))
        out.names = self.names
        if not (dist.is_available() and dist.is_initialized()):
            if group is not None:
                raise EvalInputError(f"group={group!r} was given but torch.distributed is not initialised")
            out.totals = self.totals.clone()
            return out
        totals = self.totals.to(_reduce_device(group, self.device), copy=True)
        dist.all_reduce(totals, op=dist.ReduceOp.SUM, group=group)
        out.totals = totals.to(self.device)
        return out

    @property
    def weight(self) -> float:
        """The total weight added (a token count for `TokenLoss`)."""
        return float(self.totals[-1].item())

    def means(self) -> dict[str, float]:
        """Each name's weighted mean; EvalInputError when the total weight is 0 (nothing to average)."""
        if self.weight == 0:
            raise EvalInputError(f"{self.weight_name}=0: nothing was added to {list(self.names)} (no batch, "
                                 f"or only labels of -100), so there is no mean")
        return dict(zip(self.names, (self.totals[:-1] / self.totals[-1]).tolist(), strict=True))


class TokenLoss(WeightedMean):
    """The token-weighted mean loss: the summed token loss and the token count; add per batch, all-reduce
    once, then read `mean_loss` and `perplexity`."""

    weight_name = "tokens"

    def __init__(self, device: torch.device | str | None = None) -> None:
        super().__init__(("loss",), device)

    def add(self, loss_sum: float | torch.Tensor, tokens: int | torch.Tensor) -> None:
        """Add a batch given as its summed token loss and its token count."""
        self.add_sums([loss_sum], tokens)

    def add_mean(self, mean_loss: float | torch.Tensor, tokens: int | torch.Tensor) -> None:
        """Add a batch given as its mean token loss and its token count (adds the loss times the count)."""
        self.add_means([mean_loss], tokens)

    @property
    def loss_sum(self) -> float:
        """Sum over tokens of the per-token loss (nats)."""
        return float(self.totals[0].item())

    @property
    def tokens(self) -> int:
        """How many tokens the sum covers."""
        return int(self.totals[1].item())

    @property
    def mean_loss(self) -> float:
        """Token-weighted mean loss; EvalInputError when no token was added (nothing to average)."""
        return self.means()["loss"]

    @property
    def perplexity(self) -> float:
        """perplexity(mean_loss)."""
        return perplexity(self.mean_loss)


def all_reduce_token_loss(loss_sum: float | torch.Tensor, tokens: int | torch.Tensor,
                          group: dist.ProcessGroup | None = None) -> tuple[float, int]:
    """(summed token loss, token count) added over the ranks of `group` (see `WeightedMean.all_reduce`)."""
    totals = TokenLoss()
    totals.add(loss_sum, tokens)
    reduced = totals.all_reduce(group)
    return reduced.loss_sum, reduced.tokens
