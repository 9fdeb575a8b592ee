"""Process-group start-up for every launch form: ``python``, ``torchrun``, ``deepspeed`` (and SLURM later).

``python train/main.py`` runs as a world of one: the rendezvous variables are filled in before DeepSpeed
initialises, so the same code path serves one process and many.
"""

from __future__ import annotations

import datetime
import os
import socket
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class DistEnv:
    """Where this process sits in the job."""

    rank: int  # global rank
    local_rank: int  # rank on this node (selects the GPU)
    world_size: int  # all processes of the job
    local_world_size: int  # processes on this node

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def free_port() -> int:
    """A TCP port that was free a moment ago (for single-process rendezvous and tests)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def read_env(local_rank_arg: int | None = None) -> DistEnv:
    """Read the launcher's variables, filling a world of one when there is no launcher."""
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))
    if local_rank_arg is not None and local_rank_arg >= 0:  # the deepspeed launcher passes --local_rank
        os.environ["LOCAL_RANK"] = str(local_rank_arg)
    world = int(os.environ["WORLD_SIZE"])
    return DistEnv(
        rank=int(os.environ["RANK"]),
        local_rank=int(os.environ.get("LOCAL_RANK", "0")),
        world_size=world,
        # torchrun sets LOCAL_WORLD_SIZE, the deepspeed launcher LOCAL_SIZE; a single node is assumed otherwise.
        local_world_size=int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("LOCAL_SIZE", str(world)))),
    )


def device_for(env: DistEnv) -> torch.device:
    """This rank's device: its GPU when CUDA is present, else the CPU."""
    if torch.cuda.is_available():
        torch.cuda.set_device(env.local_rank % torch.cuda.device_count())
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def init_distributed(env: DistEnv, timeout_s: int = 1800) -> None:
    """Start the default process group through DeepSpeed: nccl on GPU, gloo on CPU."""
    import deepspeed

    if not torch.cuda.is_available():
        # Share the cores between the ranks of this node instead of oversubscribing them.
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // env.local_world_size))
    deepspeed.init_distributed(
        dist_backend="nccl" if torch.cuda.is_available() else "gloo",
        timeout=datetime.timedelta(seconds=timeout_s),
        verbose=False,
    )


def shutdown_distributed() -> None:
    """Leave together and tear the process group down before the interpreter exits.

    Without this, a rank that exits first closes its gloo connections while another rank's background threads
    still use them, which can abort that rank after a finished run ("terminate called without an active
    exception"). Called only where every rank arrives (after a finished run or an error raised on all of them).
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
