"""What runs in each SLURM task: map the task to torch.distributed, check the node, train in-process.

``TrainTask`` is the callable submitit pickles and runs once per task (one per GPU, or the profile's CPU
tasks). It needs no ssh between nodes and no ``deepspeed`` launcher: SLURM starts every task through srun,
and each task calls Tessera's entry point ``train.main.main`` with the rendezvous variables set.

Preemption and time limits: SLURM sends the warning signal (``USR2``) to every task. The task turns it into a
stop request (train/loop/preempt.py); the training loop agrees on it across ranks, saves a checkpoint of the
current step and returns. Rank 0 then hands the signal to submitit's own handler, which records this callable
for the next run and requeues the job (``scontrol requeue``); the requeued job starts with ``--resume auto``
and continues from that checkpoint. The other ranks wait for the requeue to end them.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import submitit

from slurm.env import SlurmEnvError, dist_vars
from slurm.preflight import EXIT_PREFLIGHT, run_preflight
from train.checkpoint.writer import latest_complete
from train.config.fields import ConfigError
from train.config.load import load_config
from train.loop.preempt import RunControl
from train.main import main as train_main

REQUEUE_WAIT_S = 300  # how long ranks other than 0 wait for the requeue to end them
EXIT_USAGE = 2  # the task could not read its recipe or SLURM environment (as train/main.py's user errors)


@dataclass(frozen=True)
class RunSpec:
    """One training run: the entry point's arguments. The run directory is ``train.out_dir``."""

    config: str  # recipe path (absolute)
    overrides: tuple[str, ...]  # section.key=value, including train.out_dir
    out_dir: str  # absolute run directory (the same as the train.out_dir override)
    ds_config: str | None = None  # DeepSpeed config name or path
    resume: str = "never"  # as train/main.py --resume; a run directory with a checkpoint always resumes
    name: str = ""  # sweep point name, or the run directory's name
    point: dict[str, Any] = field(default_factory=dict)  # the sweep point's values (empty for a single run)

    def argv(self) -> list[str]:
        """train/main.py arguments for this start of the run (first start or after a requeue)."""
        resume = self.resume
        if resume == "never" or latest_complete(self.out_dir) is not None:
            resume = "auto"  # a requeued job continues; a fresh directory starts from scratch
        args = ["--config", self.config, "--resume", resume]
        if self.ds_config is not None:
            args += ["--ds_config", self.ds_config]
        return [*args, *self.overrides]


@dataclass(frozen=True)
class NodeNeeds:
    """What preflight checks on each node, and the in-job checkpoint period."""

    gpus_per_node: int = 0
    mps: bool = False
    checkpoint_bytes: int = 0  # room one checkpoint needs (twice this must be free: old + new)
    checkpoint_every_s: float = 0.0


def _say(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def _resolve(host: str) -> str:
    """The address this node resolves ``host`` to (as torch's rendezvous will), or why it cannot."""
    try:
        return socket.gethostbyname(host)
    except OSError as e:
        return f"does not resolve: {e}"


class TrainTask(submitit.helpers.Checkpointable):
    """submitit callable: ``executor.submit(TrainTask(needs), run)`` or ``executor.map_array(task, runs)``."""

    def __init__(self, needs: NodeNeeds) -> None:
        self.needs = needs

    def __call__(self, run: RunSpec) -> dict[str, Any]:
        job_env = submitit.JobEnvironment()
        where = f"{os.environ.get('SLURMD_NODENAME') or job_env.hostname} task {job_env.global_rank}"
        try:
            dist = dist_vars(job_env)
            cfg = load_config(run.config, list(run.overrides))
        except (SlurmEnvError, ConfigError) as e:
            _say(f"tessera: error: {where}: {e}")
            sys.exit(EXIT_USAGE)
        dist.export()
        _say(f"tessera: task {dist.rank} on node {dist.node_name} ({dist.node_rank} of {dist.num_nodes}): "
             f"RANK={dist.rank} LOCAL_RANK={dist.local_rank} WORLD_SIZE={dist.world_size} "
             f"MASTER_ADDR={dist.master_addr} ({_resolve(dist.master_addr)})")

        problems = run_preflight(cfg, gpus_per_node=self.needs.gpus_per_node, mps=self.needs.mps,
                                 checkpoint_bytes=2 * self.needs.checkpoint_bytes)
        if problems:
            for problem in problems:
                _say(problem.line(where))
            sys.exit(EXIT_PREFLIGHT)
        if dist.rank == 0:
            _say(f"tessera: {job_env.job_id}: {dist.world_size} tasks on {dist.num_nodes} node(s), "
                 f"rendezvous {dist.master_addr}:{dist.master_port}, preflight passed")

        usr_sig = signal.Signals[f"SIG{submitit.JobEnvironment.USR_SIG}"]
        control = RunControl(checkpoint_every_s=self.needs.checkpoint_every_s)
        control.install(usr_sig)
        try:
            code = train_main(run.argv(), control=control)
        finally:
            control.uninstall()
        if control.stopped:
            self._requeue(dist.rank, usr_sig, control)
        if code != 0:
            sys.exit(code)  # the entry point printed its one-line error; the job is FAILED with this code
        summary_file = Path(run.out_dir) / "summary.json"
        summary = json.loads(summary_file.read_text()) if dist.rank == 0 and summary_file.is_file() else {}
        return {"status": "completed", "rank": dist.rank, "name": run.name, "out_dir": run.out_dir, **summary}

    def _requeue(self, rank: int, usr_sig: signal.Signals, control: RunControl) -> None:
        """The checkpoint is saved on every rank: rank 0 requeues through submitit, the others wait.

        Does not return."""
        if rank != 0:
            time.sleep(REQUEUE_WAIT_S)
            _say(f"tessera: error: task {rank}: stopped ({control.stop_reason}) but the job was not requeued "
                 f"within {REQUEUE_WAIT_S} s; see task 0's log.")
            sys.exit(1)
        _say(f"tessera: checkpoint saved after {control.stop_reason}; requeueing the job")
        handler = control.previous(usr_sig)
        if not callable(handler):
            _say("tessera: error: no submitit signal handler to requeue with; run this task through "
                 "submitit.")
            sys.exit(1)
        handler(int(usr_sig), None)  # submitit: pickle this callable for the next run, scontrol requeue, exit
        sys.exit(1)  # not reached: the handler exits or raises
