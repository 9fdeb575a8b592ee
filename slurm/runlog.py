"""A job read back from what it left behind: which node ran each task, each start of the job, and what each
restart cost.

Sources, all written by the job itself or by SLURM (nothing extra is recorded at run time):

- each task's submitit log (``FOLDER/JOB_TASK_log.out``) opens every start of the job with
  ``submitit INFO (2026-12-07 13:02:17,896) - Starting with JobEnvironment(job_id=3, hostname=n1,
  local_rank=0(2), node=0(2), global_rank=0(4))``: the task's node, its ranks, and when it started; a requeued
  job appends a new such line to the same file;
- task 0's stderr holds the trainer's ``13:02:37 tessera: resumed from DIR at step K (...), saved DATE TIME``
  after each start that resumed: the checkpoint it loaded and when that checkpoint was saved (the ``saved_at``
  of its ``tessera.json``, also read from the checkpoint itself while it exists);
- accounting (``sacct --duplicates``) keeps one row per run of the job: how each run ended and on which nodes.

Lost time of a restart: the wall time from the save of the checkpoint the restart resumed from to the moment
the restarted job had loaded it. It holds the steps computed after that checkpoint and thrown away by the stop,
the wait in the queue, and the restart (start-up, model build, checkpoint load): everything between the last
progress kept and progress made again. A preemption saves the current step before it stops, so its lost time
is the wait and the restart alone. A restart whose save time is in neither place (a log from before the trainer
wrote it, the checkpoint since removed by ``train.keep_last``) has no known lost time and is shown as such.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

from submitit.core.utils import JobPaths

START = re.compile(r"submitit \w+ \((\d{4}-\d\d-\d\d \d\d:\d\d:\d\d)[,.]\d+\) - Starting with JobEnvironment\("
                   r"job_id=([^,]+), hostname=([^,]+), local_rank=(\d+)\((\d+)\), node=(\d+)\((\d+)\), "
                   r"global_rank=(\d+)\((\d+)\)\)")
RESUMED = re.compile(r"^(\d\d:\d\d:\d\d) [\w.]+: resumed from (.+) at step (\d+) \([^)\n]*\)"
                     r"(?:, saved (\d{4}-\d\d-\d\d \d\d:\d\d:\d\d))?", re.MULTILINE)
TIME_FORMAT = "%Y-%m-%d %H:%M:%S"
CHECKPOINT_META = "tessera.json"  # train/checkpoint/writer.py's META_FILE: holds saved_at


@dataclass(frozen=True)
class TaskStart:
    """One start of one task, from its submitit log line."""

    time: datetime
    task: int  # global rank
    world_size: int
    hostname: str
    node: int  # node index in this run of the job
    num_nodes: int
    local_rank: int


@dataclass(frozen=True)
class NodeView:
    """A node of the job's latest run: its tasks, its state, the log of its first task."""

    name: str
    index: int
    tasks: list[int]
    state: str  # sinfo's state (allocated, idle, down, drained, ...), or "-" when unknown
    log: Path  # stderr of the node's first task

    def line(self) -> str:
        tasks = f"task {self.tasks[0]}" if len(self.tasks) == 1 else f"tasks {self.tasks[0]}-{self.tasks[-1]}"
        return f"node {self.index} {self.name}: {self.state}, {tasks}, log {self.log}"


@dataclass(frozen=True)
class JobRun:
    """One run of the job: its first start, a restart after a requeue."""

    started: datetime
    hosts: list[str]  # node names, by node index
    resumed_step: int | None = None  # the step of the checkpoint it resumed from (None: started fresh)
    checkpoint: str | None = None  # that checkpoint's directory
    checkpoint_saved: datetime | None = None  # when it was saved (None: unknown, e.g. since removed)
    resumed_at: datetime | None = None  # when the run had loaded it
    ended_as: str | None = None  # how the run ended (accounting: REQUEUED, NODE_FAIL, PREEMPTED, ...)

    @property
    def lost_s(self) -> float | None:
        """Seconds between the save of its checkpoint and its resuming (None: not known)."""
        if self.resumed_at is None or self.checkpoint_saved is None:
            return None
        return max(0.0, (self.resumed_at - self.checkpoint_saved).total_seconds())


@dataclass(frozen=True)
class JobHistory:
    """Every run of one job, the first included."""

    runs: list[JobRun]

    @property
    def restarts(self) -> int:
        return max(0, len(self.runs) - 1)

    @property
    def lost_s(self) -> float:
        """Known lost seconds over every restart."""
        return sum(r.lost_s or 0.0 for r in self.runs[1:])

    @property
    def unknown(self) -> int:
        """Restarts whose lost time is not known."""
        return sum(r.lost_s is None for r in self.runs[1:])

    def lost_text(self) -> str:
        """The lost time in one word (a table cell), e.g. ``1m15s``, or ``1m15s+1?`` when a restart's is not
        known."""
        known = format_seconds(self.lost_s)
        return known if not self.unknown else f"{known}+{self.unknown}?"

    def lost_words(self) -> str:
        """The lost time in words, e.g. ``1m15s``, or ``1m15s (+1 restart whose checkpoint is gone)``."""
        gone = f" (+{self.unknown} restart(s) whose checkpoint is gone)" if self.unknown else ""
        return format_seconds(self.lost_s) + gone

    def lines(self) -> list[str]:
        """One line per run: when, where, from which step, what the restart lost."""
        out = []
        for i, run in enumerate(self.runs):
            what = "start" if i == 0 else f"restart {i}"
            where = ",".join(run.hosts) or "-"
            line = f"{what}: {run.started:%Y-%m-%d %H:%M:%S} on {where}"
            line += f", resumed step {run.resumed_step}" if run.resumed_step is not None else ", from step 0"
            if i > 0:
                lost = run.lost_s
                line += f", lost {format_seconds(lost)}" if lost is not None else \
                    ", lost time not known (its checkpoint's save time is gone)"
            if run.ended_as:
                line += f"; ended {run.ended_as}"
            out.append(line)
        return out


def format_seconds(seconds: float) -> str:
    """``42`` -> ``42s``; ``75`` -> ``1m15s``; ``3725`` -> ``1h02m``."""
    s = round(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def task_starts(text: str, task: int | None = None) -> list[TaskStart]:
    """Every start recorded in a task's submitit log (``task``: only that global rank's lines)."""
    starts = []
    for m in START.finditer(text):
        start = TaskStart(time=datetime.strptime(m.group(1), TIME_FORMAT), task=int(m.group(8)),
                          world_size=int(m.group(9)), hostname=m.group(3), node=int(m.group(6)),
                          num_nodes=int(m.group(7)), local_rank=int(m.group(4)))
        if task is None or start.task == task:
            starts.append(start)
    return starts


def task_logs(folder: str | Path, job_id: str) -> dict[int, JobPaths]:
    """The tasks of a job that left a log in its submitit folder, by global rank."""
    pattern = re.compile(rf"{re.escape(job_id)}_(\d+)_log\.out")
    found = {}
    for path in Path(folder).glob(f"{job_id}_*_log.out"):
        m = pattern.fullmatch(path.name)
        if m is not None:
            found[int(m.group(1))] = JobPaths(folder, job_id=job_id, task_id=int(m.group(1)))
    return dict(sorted(found.items()))


def latest_starts(folder: str | Path, job_id: str) -> list[TaskStart]:
    """Each task's start in the job's latest run (a task of an earlier, larger run is left out)."""
    logs = task_logs(folder, job_id)
    runs = [s.time for s in task_starts(_read(logs[0].stdout), 0)] if 0 in logs else []
    if not runs:
        return []
    last = {t: (task_starts(_read(p.stdout), t) or [None])[-1] for t, p in logs.items()}
    return [s for s in last.values() if s is not None and _run_index(runs, s.time) == len(runs) - 1]


def node_views(folder: str | Path, job_id: str, states: dict[str, str] | None = None) -> list[NodeView]:
    """The nodes of the job's latest run from its tasks' logs, with their states (``states``: sinfo's)."""
    starts = latest_starts(folder, job_id)
    by_node: dict[tuple[int, str], list[int]] = {}
    for s in starts:
        by_node.setdefault((s.node, s.hostname), []).append(s.task)
    states = states or {}
    return [NodeView(name=host, index=node, tasks=sorted(tasks), state=states.get(host, "-"),
                     log=JobPaths(folder, job_id=job_id, task_id=min(tasks)).stderr)
            for (node, host), tasks in sorted(by_node.items())]


def node_states(names: list[str]) -> dict[str, str]:
    """sinfo's state of each named node ({} without a reachable cluster); a host name that is longer than its
    node's name (``n1.cluster.org`` for ``n1``) is matched by its first label."""
    if not names or shutil.which("sinfo") is None:
        return {}
    out = subprocess.run(["sinfo", "-h", "-N", "-o", "%N %T"], capture_output=True, text=True, timeout=30,
                         check=False)
    if out.returncode != 0:
        return {}
    known = dict(line.split(None, 1) for line in out.stdout.splitlines() if len(line.split(None, 1)) == 2)
    found = {name: known.get(name) or known.get(name.split(".")[0]) for name in names}
    return {name: state.strip() for name, state in found.items() if state}


def accounted_runs(job_id: str) -> list[str]:
    """How each run of the job ended, oldest first, from ``sacct --duplicates`` ([] without accounting)."""
    if shutil.which("sacct") is None:
        return []
    out = subprocess.run(["sacct", "-j", job_id, "-X", "-D", "-n", "-P", "-o", "JobID,State"],
                         capture_output=True, text=True, timeout=30, check=False)
    if out.returncode != 0:
        return []
    return parse_accounted(out.stdout, job_id)


def parse_accounted(text: str, job_id: str) -> list[str]:
    """``sacct -X -D -n -P -o JobID,State`` rows of ``job_id`` -> each run's state (``CANCELLED by 0`` ->
    ``CANCELLED``)."""
    rows = [line.split("|") for line in text.splitlines() if line.strip()]
    return [row[1].split()[0] for row in rows if len(row) > 1 and row[0] == job_id and row[1].strip()]


def job_history(folder: str | Path, job_id: str, ended: list[str] | None = None) -> JobHistory:
    """The runs of a job from task 0's log and the checkpoints it resumed from; ``ended``: each run's end
    state (``accounted_runs``), when known."""
    paths = JobPaths(folder, job_id=job_id, task_id=0)
    starts = task_starts(_read(paths.stdout), 0)
    hosts = _hosts_by_run(folder, job_id, [s.time for s in starts])
    resumed = _resumed_lines(_read(paths.stderr), [s.time for s in starts])
    runs = []
    for i, start in enumerate(starts):
        step, ckpt, at, saved = resumed.get(i, (None, None, None, None))
        state = ended[i] if ended is not None and i < len(ended) and i < len(starts) - 1 else None
        runs.append(JobRun(started=start.time, hosts=hosts[i], resumed_step=step, checkpoint=ckpt,
                           checkpoint_saved=saved or _saved_at(ckpt), resumed_at=at, ended_as=state))
    return JobHistory(runs=runs)


def _hosts_by_run(folder: str | Path, job_id: str, run_starts: list[datetime]) -> list[list[str]]:
    """The node names of each run (by node index), from every task's start lines."""
    hosts: list[dict[int, str]] = [{} for _ in run_starts]
    for task, paths in task_logs(folder, job_id).items():
        for s in task_starts(_read(paths.stdout), task):
            i = _run_index(run_starts, s.time)
            if i is not None:
                hosts[i].setdefault(s.node, s.hostname)
    return [[h[n] for n in sorted(h)] for h in hosts]


def _run_index(run_starts: list[datetime], t: datetime) -> int | None:
    """The run a task's start belongs to: the run whose task 0 started nearest to it (srun starts the tasks of
    one run within seconds; runs are at least a requeue apart). None: more than 5 minutes from any."""
    if not run_starts:
        return None
    gaps = [abs((t - start).total_seconds()) for start in run_starts]
    best = min(range(len(gaps)), key=gaps.__getitem__)
    return best if gaps[best] <= 300 else None


def _resumed_lines(text: str, run_starts: list[datetime]) -> dict[int, tuple[int, str, datetime, datetime | None]]:
    """The resumed-from line of each run (its time of day placed after the run's start): step, checkpoint,
    when it was resumed, when the checkpoint was saved (None: the line does not say)."""
    found: dict[int, tuple[int, str, datetime, datetime | None]] = {}
    for m in RESUMED.finditer(text):
        clock = datetime.strptime(m.group(1), "%H:%M:%S").time()
        for i, start in enumerate(run_starts):
            t = datetime.combine(start.date(), clock)
            if t < start - timedelta(seconds=1):
                t += timedelta(days=1)
            following = run_starts[i + 1] if i + 1 < len(run_starts) else None
            if i not in found and (following is None or t < following):
                saved = datetime.strptime(m.group(4), TIME_FORMAT) if m.group(4) else None
                found[i] = (int(m.group(3)), m.group(2).strip(), t, saved)
                break
    return found


def _saved_at(checkpoint: str | None) -> datetime | None:
    if checkpoint is None:
        return None
    try:
        saved = json.loads((Path(checkpoint) / CHECKPOINT_META).read_text()).get("saved_at")
    except (OSError, ValueError):
        return None
    return datetime.fromtimestamp(saved) if isinstance(saved, (int, float)) else None


def _read(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except OSError:
        return ""
