"""Tensor parallelism of an MoE block (Megatron's split of every expert's FFN), applied by `parallel.tp.apply_tp`.

What each of the ``tp`` ranks of a TP group holds of a `model.moe.MoEFeedForward` (names unchanged):

    mlp.gate.weight, mlp.gate.e_score_correction_bias     whole (the router is replicated)
    mlp.experts.gate_up_proj     (E, 2I/tp, dim)  this rank's gate rows then its up rows (dim 1, stride 2)
    mlp.experts.down_proj        (E, dim, I/tp)   this rank's hidden columns (dim 2)
    mlp.shared_expert.gate_proj / up_proj (S/tp, dim) rows (dim 0); down_proj (dim, S/tp) columns (dim 1)
    mlp.shared_expert_gate.weight                 whole

``gate_up_proj`` stacks [gate; up] on its rows, so a rank's slice is two pieces of the full tensor: with the
full rows cut into 2 * tp equal chunks, rank r holds chunks r and tp + r (Megatron's ``partition_stride = 2``,
kept on the parameter and in `parallel.tp.tp_shard_layout`). `parallel.tp.tp_split` / `tp_join` cut and join
such tensors.

The forward (`TensorParallelMoE`, the block's class swapped in place):

    x (B, T, dim) -> the router's copy as it is, the experts' through `copy_to_tp` (its gradient, a partial sum
      on each rank, is all-reduced); under sequence parallelism x (B, T/tp, dim) is all-gathered along T once
      and its backward adds this rank's slice of the router side's gradient (alike on every rank: not summed)
      to the reduce-scatter of the experts' side's (partial sums), one reduce-scatter as a dense MLP's
    router, top-k, dispatch, routing statistics: on every token, identical on the ranks of the group
    routing weights, shared-expert gate -> `copy_to_tp` (their gradients are summed over the group)
    experts (grouped GEMMs, with the expert-parallel all-to-all when ep > 1) and shared expert on this rank's
      hidden units -> partial sums, combined -> one all-reduce (reduce-scatter along T under sequence parallelism)

So the router sees exactly the tokens of one process, in the same order: its choices, the auxiliary and z losses,
the capacity limit and the bias update do not depend on tp, and its weights' gradients are the same full
gradient on every rank without any reduction (which the replicated-parameter rule of DeepSpeed's gradient norm,
counting them on TP rank 0 only, also assumes). Under sequence parallelism the tokens are gathered before routing
rather than routed per rank: routing local tokens would change the auxiliary loss and the capacity limit, which
are means and counts over the micro-batch.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from model.moe import MoEFeedForward
from parallel.comm import (
    _gather_seq,
    _reduce_scatter_seq,
    _split_seq,
    copy_to_tp,
    reduce_from_tp,
    reduce_scatter_seq,
)
from parallel.layers import TPContext, mark_sharded

GATE_UP_STRIDE = 2  # gate_up_proj holds two row blocks (gate, up), each split over the TP ranks


class _GatherForRouterAndExperts(torch.autograd.Function):
    """(B, T/tp, ...) -> (B, T, ...) twice from one all-gather: for the router (computed alike on every TP rank:
    the backward keeps this rank's slice of its gradient) and for the split experts (partial gradients: the
    backward reduce-scatters them), the two gradients added."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, group: Any) -> tuple[torch.Tensor, torch.Tensor]:
        ctx.group = group
        full = _gather_seq(x, group)
        return full, full.clone()

    @staticmethod
    def backward(ctx: Any, g_router: torch.Tensor | None, g_experts: torch.Tensor | None
                 ) -> tuple[torch.Tensor | None, None]:
        grad = None if g_experts is None else _reduce_scatter_seq(g_experts, ctx.group)
        if g_router is not None:
            own = _split_seq(g_router, ctx.group)
            grad = own if grad is None else grad + own
        return grad, None


def gather_for_router_and_experts(x: torch.Tensor, group: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """Sequence parallelism at an MoE block: this rank's (B, T/tp, ...) -> the whole (B, T, ...) for the router
    and for the experts (see `_GatherForRouterAndExperts`): one all-gather forward, one reduce-scatter backward."""
    return _GatherForRouterAndExperts.apply(x, group)


class TensorParallelMoE(MoEFeedForward):
    """An `MoEFeedForward` whose experts and shared expert hold this rank's slice of their hidden units; made by
    `shard_moe` (see the module docstring)."""

    tp_ctx: TPContext

    def enter(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.tp_ctx.sequence_parallel:
            return gather_for_router_and_experts(x, self.tp_ctx.group)
        return x, copy_to_tp(x, self.tp_ctx.group)

    def into_experts(self, t: torch.Tensor) -> torch.Tensor:
        return copy_to_tp(t, self.tp_ctx.group)

    def leave(self, out: torch.Tensor) -> torch.Tensor:
        if self.tp_ctx.sequence_parallel:
            return reduce_scatter_seq(out, self.tp_ctx.group)  # (B, T/tp, dim)
        return reduce_from_tp(out, self.tp_ctx.group)


def tp_slice(full: torch.Tensor, dim: int, stride: int, size: int, rank: int) -> torch.Tensor:
    """Rank ``rank``'s shard of ``full`` along ``dim`` over ``size`` ranks: ``full`` cut into ``stride * size``
    equal chunks, chunks rank, size + rank, ... joined (one contiguous slice at stride 1)."""
    if full.shape[dim] % (stride * size):
        raise ValueError(f"{full.shape[dim]} along dim {dim} do not split into {stride} x {size} equal chunks")
    chunks = full.chunk(stride * size, dim=dim)
    return torch.cat(chunks[rank::size], dim=dim)


def tp_unslice(parts: list[torch.Tensor], dim: int, stride: int) -> torch.Tensor:
    """The full tensor from every rank's `tp_slice` (in rank order)."""
    if stride == 1:
        return torch.cat(parts, dim=dim)
    pieces = [p.chunk(stride, dim=dim) for p in parts]
    return torch.cat([piece[s] for s in range(stride) for piece in pieces], dim=dim)


def _shard(param: nn.Parameter, dim: int, stride: int, ctx: TPContext) -> nn.Parameter:
    """This rank's shard of ``param`` as a new parameter marked for DeepSpeed (meta stays meta)."""
    full = param.detach()
    if full.shape[dim] % (stride * ctx.size):
        raise ValueError(f"{full.shape[dim]} along dim {dim} do not split over tp={ctx.size}")
    if full.is_meta:
        shape = list(full.shape)
        shape[dim] //= ctx.size
        local = torch.empty(shape, dtype=full.dtype, device="meta")
    else:
        local = tp_slice(full, dim, stride, ctx.size, ctx.rank).clone()
    part = mark_sharded(nn.Parameter(local, requires_grad=param.requires_grad), dim)
    part.partition_stride = stride
    return part


def shard_moe(block: MoEFeedForward, ctx: TPContext, name: str = "mlp") -> None:
    """Split ``block``'s experts and shared expert over the TP group of ``ctx``, in place (see the module
    docstring); the router and the shared-expert gate stay whole."""
    hidden = block.experts.down_proj.shape[-1]
    if hidden % ctx.size:
        raise ValueError(f"{name}: the experts' {hidden} hidden units (model.moe_ffn_dim) do not split over "
                         f"tp={ctx.size}")
    experts = block.experts
    experts.gate_up_proj = _shard(experts.gate_up_proj, 1, GATE_UP_STRIDE, ctx)  # (E, 2I/tp, dim)
    experts.down_proj = _shard(experts.down_proj, 2, 1, ctx)  # (E, dim, I/tp)
    shared = block.shared_expert
    if shared is not None:
        if shared.down_proj.in_features % ctx.size:
            raise ValueError(f"{name}: the shared expert's {shared.down_proj.in_features} hidden units "
                             f"(model.moe_shared_ffn_dim) do not split over tp={ctx.size}")
        for proj in (shared.gate_proj, shared.up_proj):
            proj.weight = _shard(proj.weight, 0, 1, ctx)
            proj.out_features = proj.weight.shape[0]
        shared.down_proj.weight = _shard(shared.down_proj.weight, 1, 1, ctx)
        shared.down_proj.in_features = shared.down_proj.weight.shape[1]
    block.__class__ = TensorParallelMoE
    block.tp_ctx = ctx
