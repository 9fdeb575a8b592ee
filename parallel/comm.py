"""Tensor-parallel communication as autograd functions: each forward has its dual as backward.

| function                     | forward                          | backward                        |
|------------------------------|----------------------------------|---------------------------------|
| `copy_to_tp`                 | identity                         | all-reduce (sum)                |
| `reduce_from_tp`             | all-reduce (sum)                 | identity                        |
| `gather_last`                | all-gather along the last dim    | keep this rank's slice          |
| `scatter_last`               | keep this rank's slice (last dim)| all-gather along the last dim   |
| `gather_seq`                 | all-gather along dim 1 (sequence)| reduce-scatter along dim 1      |
| `reduce_scatter_seq`         | reduce-scatter along dim 1       | all-gather along dim 1          |
| `scatter_seq`                | keep this rank's slice (dim 1)   | all-gather along dim 1          |

Activations are (B, T, ...) throughout, so the sequence dimension is dim 1. A group of one makes every
function the identity. The group is always passed in: there is no module-level process-group state.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist


def _size(group: Any) -> int:
    return 1 if group is None else dist.get_world_size(group)


def _rank(group: Any) -> int:
    return 0 if group is None else dist.get_rank(group)


def _all_reduce(x: torch.Tensor, group: Any) -> torch.Tensor:
    if _size(group) == 1:
        return x
    x = x.contiguous()
    dist.all_reduce(x, group=group)
    return x


def _split(x: torch.Tensor, dim: int, group: Any) -> torch.Tensor:
    n = _size(group)
    if n == 1:
        return x
    if x.shape[dim] % n:
        raise ValueError(f"cannot split dim {dim} of size {x.shape[dim]} over {n} tensor-parallel ranks")
    return x.chunk(n, dim=dim)[_rank(group)].contiguous()


def _gather(x: torch.Tensor, dim: int, group: Any) -> torch.Tensor:
    n = _size(group)
    if n == 1:
        return x
    x = x.contiguous()
    parts = [torch.empty_like(x) for _ in range(n)]
    dist.all_gather(parts, x, group=group)
    return torch.cat(parts, dim=dim)


def _reduce_scatter(x: torch.Tensor, dim: int, group: Any) -> torch.Tensor:
    n = _size(group)
    if n == 1:
        return x
    if x.shape[dim] % n:
        raise ValueError(f"cannot reduce-scatter dim {dim} of size {x.shape[dim]} over {n} ranks")
    parts = [p.contiguous() for p in x.chunk(n, dim=dim)]
    out = torch.empty_like(parts[0])
    dist.reduce_scatter(out, parts, group=group)
    return out


def _identity(x: torch.Tensor, group: Any) -> torch.Tensor:
    return x


def _sum(x: torch.Tensor, group: Any) -> torch.Tensor:
    return _all_reduce(x.clone(), group)


def _split_last(x: torch.Tensor, group: Any) -> torch.Tensor:
    return _split(x, -1, group)


def _gather_last(x: torch.Tensor, group: Any) -> torch.Tensor:
    return _gather(x, -1, group)


def _split_seq(x: torch.Tensor, group: Any) -> torch.Tensor:
    return _split(x, 1, group)


def _gather_seq(x: torch.Tensor, group: Any) -> torch.Tensor:
    return _gather(x, 1, group)


def _reduce_scatter_seq(x: torch.Tensor, group: Any) -> torch.Tensor:
    return _reduce_scatter(x, 1, group)


Collective = Callable[[torch.Tensor, Any], torch.Tensor]


class _Dual(torch.autograd.Function):
    """Apply ``forward_op`` to the input and its dual ``backward_op`` to the gradient."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, group: Any, forward_op: Collective, backward_op: Collective
                ) -> torch.Tensor:
        ctx.group, ctx.backward_op = group, backward_op
        return forward_op(x, group)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None, None]:
        return ctx.backward_op(grad, ctx.group), None, None, None


def copy_to_tp(x: torch.Tensor, group: Any) -> torch.Tensor:
    """Enter a tensor-parallel region with a replicated tensor: identity; gradients are summed over ranks."""
    return _Dual.apply(x, group, _identity, _sum)


def reduce_from_tp(x: torch.Tensor, group: Any) -> torch.Tensor:
    """Leave a tensor-parallel region: sum the ranks' partial results; the gradient passes through."""
    return _Dual.apply(x, group, _sum, _identity)


def gather_last(x: torch.Tensor, group: Any) -> torch.Tensor:
    """(..., N/tp) on each rank -> (..., N) everywhere; the gradient is split back."""
    return _Dual.apply(x, group, _gather_last, _split_last)


def scatter_last(x: torch.Tensor, group: Any) -> torch.Tensor:
    """(..., N) -> this rank's (..., N/tp); the gradient is gathered."""
    return _Dual.apply(x, group, _split_last, _gather_last)


def gather_seq(x: torch.Tensor, group: Any) -> torch.Tensor:
    """Sequence parallelism, before a column-parallel layer: (B, T/tp, ...) -> (B, T, ...)."""
    return _Dual.apply(x, group, _gather_seq, _reduce_scatter_seq)


def reduce_scatter_seq(x: torch.Tensor, group: Any) -> torch.Tensor:
    """Sequence parallelism, after a row-parallel layer: partial (B, T, ...) -> summed (B, T/tp, ...)."""
    return _Dual.apply(x, group, _reduce_scatter_seq, _gather_seq)


def scatter_seq(x: torch.Tensor, group: Any) -> torch.Tensor:
    """Enter the sequence-parallel region with a replicated (B, T, ...): keep this rank's (B, T/tp, ...)."""
    return _Dual.apply(x, group, _split_seq, _gather_seq)

