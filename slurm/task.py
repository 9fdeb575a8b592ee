"""What runs in each SLURM task: map the task to torch.distributed, check the node, train in-process.

``TrainTask`` is the callable submitit pickles and runs once per task (one per GPU, or the profile's CPU
tasks). It needs no ssh between nodes and no ``deepspeed`` launcher: SLURM starts every task through srun,
and each task calls Tessera's entry point ``train.main.main`` with the rendezvous variables set.

Preemption and time limits: SLURM sends the warning signal (``USR2``) to every task. The task turns it into a
stop request (train/loop/preempt.py); the training loop agrees on it across ranks, saves a checkpoint of the
current step and returns. Rank 0 then hands the signal to submitit's own handler, which records this callable
for the next run and requeues the job (``scontrol requeue``); the requeued job starts with ``--resume auto``
and continues from that checkpoint. The other ranks wait for the requeue to end them.

A lost task (killed by a signal, its node gone): srun (``--kill-on-bad-exit``) ends the job step, so every
surviving task gets ``SIGTERM`` while the job itself is still RUNNING (a cancel, a time limit, a node failure
or a requeue change the job's state first). ``LostTaskRequeue`` turns that into ``scontrol requeue`` while the
job has been restarted fewer than ``max_requeues`` times (every restart counts, ``SLURM_RESTART_COUNT``); the
requeued job resumes from the last checkpoint, on the nodes SLURM gives it then (a job submitted with
``--nodes MIN-MAX`` starts without a node that stays down or drained, at the smaller data-parallel size:
SLURM would keep the last run's node and task counts, so the requeueing task sets the range again). A
task that fails on its own (bad recipe, preflight, a training error raised on every rank) first leaves a mark in
the submitit folder, so its job is not requeued only to fail again; one that stops because a peer was lost (it
gave up on a collective after ``train.dist_timeout_s``) leaves none.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import submitit
import torch.distributed as torch_dist

from slurm.env import DistVars, SlurmEnvError, dist_vars
from slurm.preflight import EXIT_PREFLIGHT, run_preflight
from train.checkpoint.writer import latest_complete
from train.config.fields import ConfigError
from train.config.load import load_config
from train.config.schema import JobConfig
from train.loop.preempt import RunControl
from train.main import main as train_main

REQUEUE_WAIT_S = 300  # how long ranks other than 0 wait for the requeue to end them
NODE_RANGE = re.compile(r"^#SBATCH --nodes=(\d+)-(\d+)$", re.MULTILINE)  # a job's node range, in its script
REQUEUED_STATES = ("PENDING", "REQUEUED", "REQUEUE_FED")  # a job being requeued (by a survivor or USR2)
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
    max_requeues: int = 0  # a job that lost a task is requeued while it has restarted fewer times than this


def _say(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def _resolve(host: str) -> str:
    """The address this node resolves ``host`` to (as torch's rendezvous will), or why it cannot."""
    try:
        return socket.gethostbyname(host)
    except OSError as e:
        return f"does not resolve: {e}"


def _scontrol(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["scontrol", *args], capture_output=True, text=True, timeout=30, check=False)


class LostTaskRequeue:
    """Requeue a multi-task job whose step srun ended because a task was lost (``SIGTERM`` while the job runs).

    ``install`` replaces submitit's SIGTERM handler (which only logs it); ``mark_own_failure`` records that
    this task is failing by itself, before it exits, so that the others do not requeue. Whoever requeued it,
    a job submitted with a node range gets its range back once it is pending again."""

    def __init__(self, job_env: submitit.JobEnvironment, node: str, max_requeues: int, tasks_per_node: int) -> None:
        self.job_id, self.rank, self.node = job_env.job_id, job_env.global_rank, node
        self.tasks_per_node = tasks_per_node
        self.restarts = int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0)
        self.max_requeues = max_requeues
        self.marks = Path(job_env.paths.folder)
        self.terminated = False  # SIGTERM came: this task is being ended, not failing by itself
        self.stopping = False  # a USR2 stop: the job requeues itself, no task was lost
        self.peer_lost = False  # this task ended because another one was lost: not a failure of its own
        self._previous: Any = None

    def _mark(self, rank: int) -> Path:
        return self.marks / f"{self.job_id}_restart{self.restarts}_task{rank}.failed"

    def install(self) -> None:
        self._previous = signal.signal(signal.SIGTERM, self._on_term)

    def uninstall(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)

    def mark_own_failure(self) -> None:
        if not (self.terminated or self.stopping or self.peer_lost):
            self._mark(self.rank).touch()

    def _on_term(self, signum: int, frame: Any) -> None:
        if self.terminated:
            return
        self.terminated = True
        line = self.decide()
        if line:
            _say(line)

    def decide(self) -> str:
        """Requeue the job if it lost a task; the line to log (empty: the job is ending for another reason)."""
        out = _scontrol("-o", "show", "job", self.job_id)
        fields = dict(t.split("=", 1) for t in out.stdout.split() if "=" in t)
        me = f"tessera: task {self.rank} on {self.node}"
        state = fields.get("JobState")
        if state in REQUEUED_STATES:  # another survivor, or rank 0 after USR2, requeued it
            self._restore_node_range(fields.get("Command", ""))
            return f"{me}: the job was requeued ({state}); it resumes from the last checkpoint"
        if state != "RUNNING" or self.stopping:
            return ""  # cancelled or timed out, or the USR2 requeue is under way
        failed = sorted(self.marks.glob(f"{self.job_id}_restart{self.restarts}_task*.failed"))
        if failed:
            who = ", ".join(f.name.rsplit("_task", 1)[1].removesuffix(".failed") for f in failed)
            return f"{me}: the job step ends after task {who} failed by itself (see its log); not requeued"
        if self.restarts >= self.max_requeues:
            return (f"{me}: a task of this job was lost; the job has restarted {self.restarts} times "
                    f"(max_requeues {self.max_requeues}), so it is not requeued; resubmit it with --resume auto")
        done = _scontrol("requeue", self.job_id)
        if done.returncode != 0:  # another survivor requeued it first
            return ""
        self._restore_node_range(fields.get("Command", ""))
        return (f"{me}: a task of this job was lost (the job step ended while the job runs); requeued the job "
                f"(restart {self.restarts + 1} of at most {self.max_requeues}): it resumes from the last "
                f"checkpoint on the nodes it gets")

    def _restore_node_range(self, script: str) -> None:
        """A requeued job keeps the node and task counts of its last run; a job submitted with a node range
        (``#SBATCH --nodes=MIN-MAX`` in its script) gets the range back, so it can start without a lost node."""
        # the script as sbatch got it, or submitit's copy under the job's id (an array's under the array's)
        candidates = [Path(script)] if script else []
        candidates += [self.marks / f"{self.job_id}_submission.sh",
                       self.marks / f"{self.job_id.split('_')[0]}_submission.sh"]
        text = next((c.read_text() for c in candidates if c.is_file()), "")
        found = NODE_RANGE.search(text)
        if found is not None:
            low, high = int(found.group(1)), int(found.group(2))
            _scontrol("update", f"JobId={self.job_id}", f"NumNodes={low}-{high}",
                      f"NumTasks={low * self.tasks_per_node}")


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
        if dist.world_size == 1:
            return self._run(run, job_env, dist, cfg, where, None)
        lost = LostTaskRequeue(job_env, dist.node_name, self.needs.max_requeues, dist.local_world_size)
        lost.install()
        try:
            return self._run(run, job_env, dist, cfg, where, lost)
        except BaseException as e:
            if not (isinstance(e, SystemExit) and e.code in (0, None)):
                lost.mark_own_failure()
            raise
        finally:
            lost.uninstall()

    def _run(self, run: RunSpec, job_env: submitit.JobEnvironment, dist: DistVars, cfg: JobConfig, where: str,
             lost: LostTaskRequeue | None) -> dict[str, Any]:
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
            if lost is not None:
                lost.stopping = True  # the USR2 requeue ends every task; nothing failed
            self._requeue(dist.rank, usr_sig, control)
        if code != 0:
            # train/main.py leaves a lost peer's run without tearing the process group down (no one to leave
            # with); every error it raises on all ranks together tears it down first
            if lost is not None and torch_dist.is_available() and torch_dist.is_initialized():
                lost.peer_lost = True
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
