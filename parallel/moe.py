"""Expert parallelism: each MoE layer's experts split over the ranks of an expert-parallel group.

    groups = build_process_groups(ParallelDims(world, ep=2))
    n = apply_ep(model, groups)                  # every MoEFeedForward keeps its E / ep experts
    register_expert_groups(groups)               # DeepSpeed's expert groups := ours (before deepspeed.initialize)
    engine = deepspeed.initialize(model=model, model_parameters=param_groups(model, wd), mpu=groups, ...)

What a block does under ``ep`` (the same numbers as one process running every expert, row by row): the
block itself is unchanged, its experts module (`ExpertParallelExperts`) does the travelling:

    route (local tokens) -> dispatch (sort the token copies by expert, capacity, counts (E,)) -> experts:
      exchange_counts: (ep, E/ep) rows this rank sends to each expert of each rank -> rows it receives
      -> all_to_all_rows: the rows travel to the ranks of their experts (grouped by source rank)
      -> sort the received rows by local expert -> grouped GEMMs of the local experts -> unsort
      -> all_to_all_rows back; then the block's combine (weights, scatter-add to the tokens) (+ shared expert)

The router, the shared expert and the routing statistics (aux / z losses, load, dropped) stay local, as
they are without ``ep``: a data-parallel rank's losses are those of its own micro-batch either way.

With tensor parallelism too (`parallel.moe_tp`, applied first), the local experts hold this TP rank's slice of
their hidden units (`apply_ep` keeps the TP marks when it cuts the expert dimension), every TP rank routes the
micro-batch's tokens, and the all-to-all runs over the expert-parallel group of ranks of equal TP rank (see
`parallel.dims.ParallelDims.ep_groups`); the rows that come back are partial sums, reduced by the block.

DeepSpeed's MoE machinery does the rest: the local expert parameters are marked as DeepSpeed's expert
parameters (``allreduce=False``, ``group_name``), `param_groups` (train/loop/optim.py) splits them into
parameter groups with ``'moe': True`` (DeepSpeed's `split_params_into_different_moe_groups_for_optimizer`),
ZeRO-1/2 then partitions and averages their gradients over the expert-data-parallel group (divided by the
whole data-parallel size, so a gradient does not depend on ``ep``), and dense parameters over the whole
data-parallel group. DeepSpeed recognises MoE models by its own `deepspeed.moe.layer.MoE` modules: each
expert-parallel experts module carries a parameterless `ExpertGroupMarker` of that type, which names the group and
makes the engine set up its expert groups (ours, registered by `register_expert_groups`) and the optimizer's
MoE settings.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from model.moe import GroupedExperts, MoEFeedForward
from parallel.groups import ProcessGroups

# ---- the all-to-all of expert parallelism (parallel/comm.py style: the backward is the forward's dual) ----

def exchange_counts(send: torch.Tensor, group: Any) -> torch.Tensor:
    """(ep, n) counts, row r for rank r -> (ep, n): row r is what rank r sends to this one (not differentiable).

    The first half of every token all-to-all: each rank learns how many rows it will receive before the rows
    travel (``all_to_all_single`` with split sizes needs both sides' sizes)."""
    if _group_size(group) == 1:
        return send
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send.contiguous(), group=group)
    return recv


def _all_to_all_rows(x: torch.Tensor, send_splits: list[int], recv_splits: list[int], group: Any) -> torch.Tensor:
    out = x.new_empty((sum(recv_splits), *x.shape[1:]))
    dist.all_to_all_single(out, x.contiguous(), output_split_sizes=recv_splits, input_split_sizes=send_splits,
                           group=group)
    return out


class _AllToAllRows(torch.autograd.Function):
    """Rows ``send_splits[r]`` to rank r forward; the gradient of the received rows goes back the same way."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, send_splits: list[int], recv_splits: list[int], group: Any
                ) -> torch.Tensor:
        ctx.send_splits, ctx.recv_splits, ctx.group = send_splits, recv_splits, group
        return _all_to_all_rows(x, send_splits, recv_splits, group)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None, None]:
        return _all_to_all_rows(grad, ctx.recv_splits, ctx.send_splits, ctx.group), None, None, None


def all_to_all_rows(x: torch.Tensor, send_splits: list[int], recv_splits: list[int], group: Any) -> torch.Tensor:
    """(sum(send_splits), ...) rows, the first ``send_splits[0]`` to rank 0 of ``group`` and so on ->
    (sum(recv_splits), ...) rows received, by source rank. The backward is the reverse all-to-all.
    ``recv_splits`` comes from `exchange_counts`."""
    if _group_size(group) == 1:
        return x
    return _AllToAllRows.apply(x, send_splits, recv_splits, group)


def _group_size(group: Any) -> int:
    return 1 if group is None else dist.get_world_size(group)


def expert_group_name(ep: int) -> str:
    """DeepSpeed's name of the expert-parallel group of size ``ep`` (its ``group_name`` of expert parameters)."""
    return f"ep_size_{ep}"


@functools.cache
def _marker_class() -> type[nn.Module]:
    """The marker type, a subclass of `deepspeed.moe.layer.MoE`: made on first use, so that importing this
    module (every run imports `parallel`) does not import DeepSpeed before a recipe is validated."""
    from deepspeed.moe.layer import MoE  # DeepSpeed is imported once a run is being built

    class ExpertGroupMarker(MoE):
        """A parameterless `deepspeed.moe.layer.MoE` that tells DeepSpeed's engine the model has expert-parallel
        layers, and of which group. It computes nothing: the experts it sits in (`ExpertParallelExperts`) do.

        ``num_local_experts`` is 0 for DeepSpeed's per-expert checkpoint files: the local experts are stacked
        parameters that its file naming (``deepspeed_moe.experts.deepspeed_experts.<i>``) cannot address; they
        are saved with the rank's ZeRO optimizer partition (its fp32 copy) and restored from it."""

        def __init__(self, n_experts: int, ep: int, tp: int) -> None:
            nn.Module.__init__(self)  # none of MoE's own gate / experts: only the attributes the engine reads
            self.ep_size, self.num_experts, self.num_local_experts = ep, n_experts, 0
            self.expert_group_name = expert_group_name(ep)
            self.enable_expert_tensor_parallelism, self.use_residual = tp > 1, False

        def set_deepspeed_parallelism(self, use_data_before_expert_parallel_: bool = False) -> None:
            """The engine's hook: the groups exist already (`register_expert_groups`); check they are there."""
            if self.expert_group_name not in _ds_groups()._get_expert_parallel_group_dict():
                raise RuntimeError(f"expert group {self.expert_group_name} is not registered with DeepSpeed: "
                                   f"call parallel.moe.register_expert_groups(groups) before deepspeed.initialize")

        def forward(self, *args: Any, **kwargs: Any) -> Any:
            raise RuntimeError("ExpertGroupMarker computes nothing; its block does")

    return ExpertGroupMarker


def expert_group_marker(n_experts: int, ep: int, tp: int = 1) -> nn.Module:
    """A parameterless module by which DeepSpeed's engine recognises an expert-parallel layer and its group
    (``tp``: the experts are split over tensor-parallel ranks too)."""
    return _marker_class()(n_experts, ep, tp)


def _ds_groups() -> Any:
    """DeepSpeed's registry of expert groups (`deepspeed.utils.groups`)."""
    from deepspeed.utils import groups  # DeepSpeed is imported once a run is being built

    return groups


class ExpertParallelExperts(GroupedExperts):
    """`GroupedExperts` holding this rank's E / ep experts, fed by all-to-all over ``ep_group``.

    The block (`MoEFeedForward`) is unchanged: it routes, dispatches and combines as in one process, and hands
    this module the rows sorted by global expert with the (E,) counts. Made from the whole experts by
    `apply_ep` (the class is swapped in place, so parameter names stay the model's:
    ``mlp.experts.gate_up_proj`` is now (E / ep, 2I, dim))."""

    ep_group: Any
    ep_size: int
    ep_rank: int
    ep_marker: nn.Module
    received: int = 0  # token copies the last forward received for this rank's experts (all ranks' tokens)

    def forward(self, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """x (M, dim) sorted by global expert, ``counts`` (E,) -> (M, dim), each row through its expert."""
        local = self.gate_up_proj.shape[0]
        send = counts.view(self.ep_size, local)  # (ep, E/ep): rows for each expert of each rank
        recv = exchange_counts(send, self.ep_group)  # (ep, E/ep): rows from each rank for each local expert
        send_splits, recv_splits = send.sum(1).tolist(), recv.sum(1).tolist()
        rows = all_to_all_rows(x, send_splits, recv_splits, self.ep_group)  # (R, dim) by source rank
        expert_of_row = torch.repeat_interleave(torch.arange(local, device=recv.device).repeat(self.ep_size),
                                                recv.reshape(-1))  # (R,)
        order = torch.argsort(expert_of_row, stable=True)  # by local expert, then source rank, then token
        self.received = rows.shape[0]
        out = super().forward(rows[order], recv.sum(0))  # (R, dim): the local experts' grouped GEMMs
        out = out[torch.argsort(order)]  # back to the received order
        return all_to_all_rows(out, recv_splits, send_splits, self.ep_group)  # (M, dim) in x's order


def apply_ep(model: nn.Module, groups: ProcessGroups) -> int:
    """Keep this rank's E / ep experts of every `MoEFeedForward` of ``model`` (in place) and route its tokens
    by all-to-all over the expert-parallel group; mark the expert parameters for DeepSpeed. Returns the
    number of blocks changed (0 at ep = 1: nothing is done)."""
    ep = groups.dims.ep
    if ep == 1:
        return 0
    n = 0
    for block in model.modules():
        if not isinstance(block, MoEFeedForward) or isinstance(block.experts, ExpertParallelExperts):
            continue
        if block.n_experts % ep:
            raise ValueError(f"parallel.ep={ep} does not divide a block's {block.n_experts} experts")
        local = block.n_experts // ep
        lo = groups.ep_rank * local
        experts = block.experts
        for name in ("gate_up_proj", "down_proj"):
            full = getattr(experts, name)
            part = nn.Parameter(full.detach()[lo:lo + local].clone(), requires_grad=full.requires_grad)
            for mark in ("tensor_model_parallel", "partition_dim", "partition_stride"):  # split over TP too
                if hasattr(full, mark):
                    setattr(part, mark, getattr(full, mark))
            part.allreduce = False  # DeepSpeed's mark of an expert parameter (moe/utils.py is_moe_param)
            part.group_name = expert_group_name(ep)
            setattr(experts, name, part)
        experts.__class__ = ExpertParallelExperts
        experts.ep_group, experts.ep_size, experts.ep_rank = groups.ep_group, ep, groups.ep_rank
        experts.ep_marker = expert_group_marker(block.n_experts, ep, tp=groups.dims.tp)
        n += 1
    return n


def register_expert_groups(groups: ProcessGroups) -> None:
    """Make DeepSpeed's expert-parallel and expert-data-parallel groups of size ``ep`` the ones in ``groups``
    (DeepSpeed keeps them by name in `deepspeed.utils.groups`; its own `_create_expert_and_data_parallel` would
    make the same layout at tp = pp = 1 as a second set of communicators)."""
    dims = groups.dims
    if dims.ep == 1:
        return
    name = expert_group_name(dims.ep)
    ep_ranks = next(r for r in dims.ep_groups() if groups.rank in r)
    edp_ranks = next(r for r in dims.edp_groups() if groups.rank in r)
    ds_groups = _ds_groups()
    known = ds_groups._get_expert_parallel_group_dict()
    if name in known:
        if list(ds_groups._EXPERT_PARALLEL_GROUP_RANKS[name]) != ep_ranks:
            raise RuntimeError(f"DeepSpeed already has an expert group {name} of other ranks")
        return
    ds_groups._EXPERT_PARALLEL_GROUP[name] = groups.ep_group
    ds_groups._EXPERT_PARALLEL_GROUP_RANKS[name] = ep_ranks
    ds_groups._EXPERT_DATA_PARALLEL_GROUP[name] = groups.edp_group
    ds_groups._EXPERT_DATA_PARALLEL_GROUP_RANKS[name] = edp_ranks


def local_expert_slice(groups: ProcessGroups, n_experts: int) -> slice:
    """The global expert ids this rank keeps at ``groups.dims.ep`` (all of them at ep = 1)."""
    local = n_experts // groups.dims.ep
    return slice(groups.ep_rank * local, (groups.ep_rank + 1) * local)


def restore_expert_weights(engine: Any) -> None:
    """After ``engine.load_checkpoint`` of an expert-parallel run: put each rank's own experts back in the
    model from its ZeRO optimizer partition (fp32).

    DeepSpeed writes the model file once per data-parallel group (rank 0's module, so rank 0's experts), and
    every rank loads it; the ZeRO-1/2 optimizer restores the rank's fp32 partition from its own file, which
    for an expert group is this rank's experts. `update_lp_params` copies that partition to the model's
    weights and gathers them over each group's ranks (the expert-data-parallel group for expert groups)."""
    if not getattr(engine, "has_moe_layers", False):
        return
    update = getattr(engine.optimizer, "update_lp_params", None)
    if update is None:
        raise RuntimeError("an expert-parallel checkpoint is restored through the ZeRO-1/2 optimizer's fp32 "
                           "partitions; this engine has none (ZeRO-1 or ZeRO-2 is required with parallel.ep > 1)")
    update()
