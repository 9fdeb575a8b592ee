"""The job's process groups as one explicit object, and the `mpu` interface DeepSpeed reads them through.

    dims = ParallelDims(world_size=8, tp=2)
    groups = build_process_groups(dims)          # collective: every rank calls it, in the same order
    engine, *_ = deepspeed.initialize(model=model, mpu=groups, ...)

Nothing here is module state: the groups live in the object the caller holds and passes on. DeepSpeed
uses `mpu` to reduce and partition (ZeRO) over the data-parallel group only, to count tensor-parallel
parameters once in the gradient norm, and to name checkpoint files per model-parallel rank.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch.distributed as dist

from parallel.dims import ParallelDims

ProcessGroup = Any  # torch.distributed.ProcessGroup (or None for a group of one in tests)


@dataclass
class ProcessGroups:
    """This rank's coordinates and the groups it belongs to."""

    dims: ParallelDims
    rank: int
    tp_group: ProcessGroup  # ranks that split each layer with this one
    dp_group: ProcessGroup  # ranks that hold the same shards of other replicas
    pp_group: ProcessGroup  # the stages of this rank's pipeline
    mp_group: ProcessGroup  # one whole model replica (pp x tp ranks)
    ep_group: ProcessGroup = None  # data-parallel ranks that split the experts with this one (ep > 1)
    edp_group: ProcessGroup = None  # ranks that hold this rank's experts too and average their gradients (ep > 1)

    @property
    def tp_rank(self) -> int:
        return self.dims.coords(self.rank)[2]

    @property
    def dp_rank(self) -> int:
        return self.dims.coords(self.rank)[1]

    @property
    def pp_rank(self) -> int:
        return self.dims.coords(self.rank)[0]

    @property
    def ep_rank(self) -> int:
        """This rank's place in its expert-parallel group (which E / ep experts it keeps)."""
        return self.dp_rank % self.dims.ep

    @property
    def tp_size(self) -> int:
        return self.dims.tp

    @property
    def dp_size(self) -> int:
        return self.dims.dp

    # ---- the `mpu` interface of DeepSpeed (and Megatron) ----
    def get_tensor_model_parallel_group(self) -> ProcessGroup:
        return self.tp_group

    def get_tensor_model_parallel_rank(self) -> int:
        return self.tp_rank

    def get_tensor_model_parallel_world_size(self) -> int:
        return self.dims.tp

    def get_tensor_model_parallel_src_rank(self) -> int:
        """Global rank of TP rank 0 in this rank's tensor-parallel group."""
        return self.rank - self.tp_rank

    def get_model_parallel_group(self) -> ProcessGroup:
        """One whole replica: its pipeline stages and tensor-parallel slices (the TP group when pp=1)."""
        return self.mp_group

    def get_model_parallel_rank(self) -> int:
        return self.pp_rank * self.dims.tp + self.tp_rank

    def get_model_parallel_world_size(self) -> int:
        return self.dims.tp * self.dims.pp

    def get_data_parallel_group(self) -> ProcessGroup:
        return self.dp_group

    def get_data_parallel_rank(self) -> int:
        return self.dp_rank

    def get_data_parallel_world_size(self) -> int:
        return self.dims.dp

    def get_pipeline_model_parallel_group(self) -> ProcessGroup:
        return self.pp_group

    def get_pipeline_model_parallel_rank(self) -> int:
        return self.pp_rank

    def get_pipeline_model_parallel_world_size(self) -> int:
        return self.dims.pp


def build_process_groups(dims: ParallelDims) -> ProcessGroups:
    """Create every TP, DP, PP and model-parallel group, and with ep > 1 the expert-parallel and
    expert-data-parallel ones (collective), and keep the ones this rank is in.

    Needs an initialised default group whose size is ``dims.world_size``. Every rank creates every group
    in the same order, as `torch.distributed.new_group` requires.
    """
    if not dist.is_initialized():
        raise RuntimeError("build_process_groups needs torch.distributed to be initialised first")
    world, rank = dist.get_world_size(), dist.get_rank()
    if world != dims.world_size:
        raise ValueError(f"ParallelDims was made for {dims.world_size} ranks but the job has {world}")
    mine: dict[str, ProcessGroup] = {}
    layouts = {"tp": dims.tp_groups(), "dp": dims.dp_groups(), "pp": dims.pp_groups(), "mp": dims.mp_groups()}
    if dims.ep > 1:
        layouts.update(ep=dims.ep_groups(), edp=dims.edp_groups())
    for kind, layout in layouts.items():
        for ranks in layout:
            group = dist.new_group(ranks)
            if rank in ranks:
                mine[kind] = group
    return ProcessGroups(dims, rank, tp_group=mine["tp"], dp_group=mine["dp"], pp_group=mine["pp"],
                         mp_group=mine["mp"], ep_group=mine.get("ep"), edp_group=mine.get("edp"))
