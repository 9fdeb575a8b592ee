"""From a SLURM task (through submitit's ``JobEnvironment``) to the variables ``torch.distributed`` reads.

Inside a submitit job every task knows its place from SLURM's variables (``SLURM_PROCID``, ``SLURM_LOCALID``,
``SLURM_NTASKS``, ``SLURM_JOB_NUM_NODES``, ``SLURM_JOB_NODELIST``, ...); ``JobEnvironment`` reads them. The
rendezvous is the first node of the allocation, on a port derived from the job id and its restart count, so
every task computes the same one without talking to the others, and a requeued job does not reuse the port
its previous run may still hold.

``MASTER_ADDR`` is the first node's name as SLURM lists it: every task resolves it as its own node does (DNS,
/etc/hosts), which is the address that node's rank 0 serves the rendezvous store on. A task's node is
``SLURMD_NODENAME`` (the name slurmd was started as), not ``hostname``: several slurmd on one machine (SLURM's
multiple-slurmd mode) share a host name, and a node's name need not be its host name.

    RANK, LOCAL_RANK, WORLD_SIZE, LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping, MutableMapping
from dataclasses import dataclass

import submitit

PORT_RANGE = (20000, 60000)  # rendezvous ports are drawn from [low, high)
PORT_VARIABLE = "TESSERA_MASTER_PORT"  # set it (e.g. in a profile's setup) to choose the port yourself


class SlurmEnvError(RuntimeError):
    """The task's SLURM variables do not describe a consistent job."""


@dataclass(frozen=True)
class DistVars:
    """This task's place in the job, as torch.distributed's env:// rendezvous wants it."""

    rank: int  # global rank = SLURM_PROCID
    local_rank: int  # rank on this node = SLURM_LOCALID (selects the GPU among the node's)
    world_size: int  # all tasks = SLURM_NTASKS
    local_world_size: int  # tasks per node
    node_rank: int  # = SLURM_NODEID
    num_nodes: int
    master_addr: str  # first host of the allocation
    master_port: int
    node_name: str  # this task's node: SLURMD_NODENAME, else the node list's entry SLURM_NODEID

    def as_env(self) -> dict[str, str]:
        return {
            "RANK": str(self.rank),
            "LOCAL_RANK": str(self.local_rank),
            "WORLD_SIZE": str(self.world_size),
            "LOCAL_WORLD_SIZE": str(self.local_world_size),
            "MASTER_ADDR": self.master_addr,
            "MASTER_PORT": str(self.master_port),
        }

    def export(self, environ: MutableMapping[str, str] | None = None) -> None:
        """Write the variables into ``environ`` (default: this process's environment), replacing old ones."""
        (os.environ if environ is None else environ).update(self.as_env())


def rendezvous_port(job_id: str, restart_count: int) -> int:
    """A port every task of one job run derives alike; another run (requeue, other job) gets another."""
    digest = hashlib.sha256(f"{job_id}/{restart_count}".encode()).digest()
    low, high = PORT_RANGE
    return low + int.from_bytes(digest[:4], "big") % (high - low)


def dist_vars(job_env: submitit.JobEnvironment, environ: Mapping[str, str] | None = None) -> DistVars:
    """Map submitit's view of this task (and ``SLURM_RESTART_COUNT`` / ``TESSERA_MASTER_PORT``) to
    DistVars."""
    environ = os.environ if environ is None else environ
    world, nodes = job_env.num_tasks, job_env.num_nodes
    if nodes < 1 or world < nodes or world % nodes:
        raise SlurmEnvError(
            f"{world} tasks on {nodes} nodes: Tessera needs the same number of tasks on every node; "
            f"submit with tasks per node (slurm/submit.py does) rather than a total task count."
        )
    rank, local_rank, node = job_env.global_rank, job_env.local_rank, job_env.node
    per_node = world // nodes
    if not (0 <= rank < world and 0 <= local_rank < per_node and 0 <= node < nodes):
        raise SlurmEnvError(f"task rank {rank} (local {local_rank}, node {node}) does not fit {world} "
                            f"tasks on {nodes} nodes.")
    hosts = list(job_env.hostnames)
    if len(hosts) != nodes:
        raise SlurmEnvError(f"SLURM_JOB_NODELIST names {len(hosts)} hosts ({', '.join(hosts)}) for "
                            f"{nodes} nodes.")
    if PORT_VARIABLE in environ:
        raw = environ[PORT_VARIABLE]
        if not raw.strip().isdigit() or not 0 < int(raw) < 2**16:
            raise SlurmEnvError(f"{PORT_VARIABLE}={raw!r}: not a TCP port; set it to a free port from 1 to "
                                f"65535 on the first node, or unset it to derive one from the job id.")
        port = int(raw)
    else:
        port = rendezvous_port(job_env.job_id, int(environ.get("SLURM_RESTART_COUNT", "0") or 0))
    node_name = environ.get("SLURMD_NODENAME") or hosts[node]
    if node_name != hosts[node]:
        raise SlurmEnvError(f"SLURMD_NODENAME={node_name} but SLURM_NODEID={node} names {hosts[node]} in the node "
                            f"list {','.join(hosts)}: the task's variables come from different jobs or steps.")
    return DistVars(rank=rank, local_rank=local_rank, world_size=world, local_world_size=per_node,
                    node_rank=node, num_nodes=nodes, master_addr=hosts[0], master_port=port, node_name=node_name)
