"""The language-model losses a model can be trained with; `parallel.parallelize.parallelize` picks one.

- `lm_loss`: next-token cross-entropy on whole logits (B, T, V), the one definition (`train.objectives.lm`
  re-exports it);
- `HeadLoss`: the loss computed by an output head that never materialises the logits (fused linear
  cross-entropy, `model.kernels.LinearCrossEntropyHead`);
- `vocab_parallel_cross_entropy`: cross-entropy over vocabulary-parallel logits, without ever gathering the
  full (B, T, V) logits (`parallel.tp.tp_lm_loss` binds it to a model's split head).

Vocabulary-parallel: each rank holds logits for its rows [start, start + V_local) of the padded vocabulary.
The softmax denominator and the target logit are each one all-reduce of a (B, T) tensor. Padding rows (ids at
or beyond the real vocabulary size) are masked to the lowest float before anything else, so they carry no
probability and get no gradient: the padding can never be predicted.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

import torch
import torch.distributed as dist
import torch.nn.functional as F

from model.kernels import LinearCrossEntropyHead
from parallel.comm import gather_last

LossFn = Callable[..., torch.Tensor]
"""(model output, labels (B, T)) -> the mean loss over labelled positions; the model is called with the loss's
``forward_kwargs`` attribute when it has one (`HeadLoss`: hidden states instead of logits)."""


def lm_loss(logits: torch.Tensor, labels: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Next-token cross-entropy in fp32 (nats); label -100 is ignored.

    reduction: "mean" over the labelled tokens (the `LossFn` contract), "sum" over them, or "none": one loss
    per position, (B * T,), 0 where the label is -100.
    """
    # logits: (B, T, V), labels: (B, T)
    return F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=-100,
                           reduction=reduction)


class HeadLoss:
    """The loss of a model whose head computes it (`LinearCrossEntropyHead`): the model returns hidden states
    (``forward_kwargs``), and the head turns them and the labels into the mean cross-entropy."""

    forward_kwargs: ClassVar[dict[str, Any]] = {"return_hidden": True}

    def __init__(self, head: LinearCrossEntropyHead) -> None:
        self.head = head

    def __call__(self, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self.head(hidden, labels)


def _all_reduce(x: torch.Tensor, group: Any, op: Any = dist.ReduceOp.SUM) -> torch.Tensor:
    if group is not None and dist.get_world_size(group) > 1:
        dist.all_reduce(x, op=op, group=group)
    return x


def mask_padding(logits: torch.Tensor, start: int, vocab_size: int) -> torch.Tensor:
    """Logits (..., V_local) of rows start.. with every row >= vocab_size set to the lowest float."""
    local = logits.shape[-1]
    if start + local <= vocab_size:
        return logits
    real = max(0, vocab_size - start)
    masked = logits.clone()
    masked[..., real:] = torch.finfo(logits.dtype).min
    return masked


class _VocabParallelCE(torch.autograd.Function):
    """Per-token loss from this rank's logit columns; backward is softmax - one_hot on the same columns."""

    @staticmethod
    def forward(ctx: Any, logits: torch.Tensor, target: torch.Tensor, start: int, group: Any) -> torch.Tensor:
        # logits: (N, V_local) float32, target: (N,) with -100 for ignored positions
        logits_max = logits.max(dim=-1).values  # (N,)
        _all_reduce(logits_max, group, dist.ReduceOp.MAX)
        shifted = logits - logits_max.unsqueeze(-1)  # (N, V_local)
        local_t = target - start
        mine = (local_t >= 0) & (local_t < logits.shape[-1])  # (N,) targets this rank owns
        idx = local_t.clamp(0, logits.shape[-1] - 1)
        target_logit = shifted.gather(-1, idx.unsqueeze(-1)).squeeze(-1) * mine  # (N,)
        _all_reduce(target_logit, group)
        exp = shifted.exp()  # (N, V_local)
        sum_exp = exp.sum(dim=-1)  # (N,)
        _all_reduce(sum_exp, group)
        loss = sum_exp.log() - target_logit  # (N,)
        ignored = target == -100
        loss = loss.masked_fill(ignored, 0.0)
        exp.div_(sum_exp.unsqueeze(-1))  # softmax, in place
        ctx.save_for_backward(exp, idx, mine & ~ignored, ignored)
        return loss

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None, None]:
        softmax, idx, hit, ignored = ctx.saved_tensors
        g = softmax.clone()  # (N, V_local)
        rows = torch.arange(g.shape[0], device=g.device)
        g[rows, idx] -= hit.to(g.dtype)
        g.mul_((grad * ~ignored).unsqueeze(-1))
        return g, None, None, None


def vocab_parallel_cross_entropy(
    logits: torch.Tensor, labels: torch.Tensor, *, start: int, vocab_size: int, group: Any
) -> torch.Tensor:
    """Mean next-token cross-entropy over labels != -100, from vocabulary-parallel logits.

    logits: (B, T, V_local) this rank's columns (rows start.. of the padded vocabulary); labels: (B, T)
    global token ids. Equals `F.cross_entropy` on the gathered, unpadded logits.
    """
    local = mask_padding(logits.float(), start, vocab_size).flatten(0, 1)  # (B*T, V_local)
    per_token = _VocabParallelCE.apply(local, labels.flatten(), start, group)  # (B*T,)
    count = (labels != -100).sum().clamp(min=1)
    return per_token.sum() / count


def gather_logits(logits: torch.Tensor, *, vocab_size: int, group: Any) -> torch.Tensor:
    """(..., V_local) on each rank -> the full (..., vocab_size) logits everywhere (padding dropped)."""
    return gather_last(logits, group)[..., :vocab_size]
