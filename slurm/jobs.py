"""Submitted jobs after the fact: where their logs are, their state in accounting, waiting, cancelling.

``submit.py`` appends one line per job to an index (``~/.cache/tessera/slurm_jobs.jsonl``, or
``$TESSERA_SLURM_JOBS``): job id, submitit folder, run directory. ``status``, ``cancel`` and ``tail`` find a
job there by its id (the newest entry wins: a wiped test cluster numbers its jobs from 1 again), or take a run
directory. States come from ``sacct``, which needs the cluster's accounting (slurmdbd); a job's nodes, its
tasks' places and its restarts are read from what it left behind (slurm/runlog.py).
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import submitit
import yaml
from submitit.core.utils import JobPaths

from slurm.runlog import JobHistory, NodeView, accounted_runs, job_history, node_states, node_views

INDEX_VARIABLE = "TESSERA_SLURM_JOBS"
RECORD_FILE = "slurm_job.json"  # in each run directory: the job that runs it
# sacct states after which a job will not run again (REQUEUED / PENDING / RUNNING may still change)
FINAL_STATES = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL", "BOOT_FAIL",
                "DEADLINE", "PREEMPTED")


class JobLookupError(LookupError):
    """A job id or run directory this machine knows nothing about."""


def index_path() -> Path:
    return Path(os.environ.get(INDEX_VARIABLE, Path.home() / ".cache" / "tessera" / "slurm_jobs.jsonl"))


@dataclass(frozen=True)
class JobRecord:
    """One submitted job (or one task of a job array)."""

    job_id: str  # "123", or "123_4" for array task 4
    folder: str  # submitit folder: the sbatch script, pickles and per-task logs
    out_dir: str  # run directory
    tasks: int  # tasks per job (each has its own log)
    name: str = ""

    def submitit_job(self) -> submitit.SlurmJob[Any]:
        return submitit.SlurmJob(folder=self.folder, job_id=self.job_id, tasks=tuple(range(self.tasks)))


def record_jobs(records: list[JobRecord]) -> None:
    """Append to the index and write each run directory's record."""
    path = index_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        f.writelines(json.dumps(dataclasses.asdict(r) | {"submitted_at": time.time()}) + "\n"
                     for r in records)
    for r in records:
        out = Path(r.out_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / RECORD_FILE).write_text(json.dumps(dataclasses.asdict(r), indent=2) + "\n")


def find_job(ref: str) -> JobRecord:
    """A job by id (``123`` or ``123_4``) from the index, or by its run directory."""
    run_record = Path(ref) / RECORD_FILE
    if run_record.is_file():
        return JobRecord(**json.loads(run_record.read_text()))
    path = index_path()
    found: JobRecord | None = None
    if path.is_file():
        for line in path.read_text().splitlines():
            row = json.loads(line)
            if row["job_id"] == ref:
                row.pop("submitted_at", None)
                found = JobRecord(**row)
    if found is None:
        raise JobLookupError(f"job {ref}: not in {path} and not a run directory with {RECORD_FILE}; give the "
                             f"id slurm/submit.py printed, or the run directory.")
    return found


@dataclass(frozen=True)
class JobState:
    job_id: str
    state: str  # sacct State, e.g. RUNNING, COMPLETED, FAILED, CANCELLED (the "by 0" suffix dropped)
    exit_code: str  # "0:0" = exit status : signal
    elapsed: str
    restarts: int  # times the job was requeued and started again

    @property
    def final(self) -> bool:
        return self.state in FINAL_STATES


def job_state(job_id: str) -> JobState | None:
    """The allocation's accounting record (None while accounting has not seen the job yet)."""
    out = subprocess.run(["sacct", "-j", job_id, "-X", "-n", "-P", "-o", "JobID,State,ExitCode,Elapsed"],
                         capture_output=True, text=True, timeout=30, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"sacct failed ({out.stderr.strip()}); is accounting (slurmdbd) running?")
    rows = [line.split("|") for line in out.stdout.splitlines() if line.strip()]
    rows = [r for r in rows if r[0] == job_id] or rows[-1:]
    if not rows:
        return None
    jid, state, code, elapsed = rows[-1][:4]
    restarts = _restart_count(job_id)
    return JobState(job_id=jid, state=state.split()[0], exit_code=code, elapsed=elapsed, restarts=restarts)


def _restart_count(job_id: str) -> int:
    """Restarts of a job the controller still holds (scontrol forgets jobs some minutes after they end)."""
    out = subprocess.run(["scontrol", "-o", "show", "job", job_id], capture_output=True, text=True,
                         timeout=30, check=False)
    for token in out.stdout.split():
        if token.startswith("Restarts="):
            return int(token.split("=", 1)[1])
    return 0


def wait_final(job_id: str, timeout_s: float, poll_s: float = 2.0) -> JobState:
    """Poll accounting until the job reaches a final state; TimeoutError after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    last: JobState | None = None
    while time.monotonic() < deadline:
        last = job_state(job_id)
        if last is not None and last.final:
            return last
        time.sleep(poll_s)
    raise TimeoutError(f"job {job_id} not finished after {timeout_s:.0f} s (last state: "
                       f"{last.state if last else 'unknown'})")


def log_tail(record: JobRecord, task: int = 0, lines: int = 30) -> str:
    """The last ``lines`` of one task's stderr and stdout (a requeued job appends to the same files)."""
    paths = JobPaths(record.folder, job_id=record.job_id, task_id=task)
    parts = []
    for label, path in (("stderr", paths.stderr), ("stdout", paths.stdout)):
        if path.is_file():
            text = path.read_text(errors="replace").splitlines()[-lines:]
            parts.append(f"==> {path} ({label}, last {len(text)} lines) <==\n" + "\n".join(text))
        else:
            parts.append(f"==> {path} ({label}): not written yet <==")
    return "\n".join(parts)


def node_status(record: JobRecord) -> list[NodeView]:
    """The nodes of the job's latest run: name, state (sinfo), tasks, the log of its first task; [] until a
    task has started."""
    views = node_views(record.folder, record.job_id)
    states = node_states([v.name for v in views])
    return [dataclasses.replace(v, state=states.get(v.name, v.state)) for v in views]


def history(record: JobRecord) -> JobHistory:
    """Every run of the job (restarts after a requeue) with the time each restart lost (slurm/runlog.py)."""
    return job_history(record.folder, record.job_id, accounted_runs(record.job_id))


def node_tails(record: JobRecord, node: str, lines: int = 30) -> str:
    """``log_tail`` of the first task of one node (its name or index in the job) or of every node
    (``all``)."""
    views = node_views(record.folder, record.job_id)
    if not views:
        raise JobLookupError(f"job {record.job_id}: no task has started yet (no node in its logs in "
                             f"{record.folder}); try again once it runs, or use --task.")
    chosen = views if node == "all" else [v for v in views if node in (v.name, str(v.index))]
    if not chosen:
        names = ", ".join(f"{v.index} ({v.name})" for v in views)
        raise JobLookupError(f"--node {node}: not a node of job {record.job_id}; its nodes are {names}, or give "
                             f"all.")
    return "\n".join(f"=== {v.line()} ===\n{log_tail(record, task=v.tasks[0], lines=lines)}" for v in chosen)


def status_text(record: JobRecord, state: JobState | None, nodes: list[NodeView], past: JobHistory) -> str:
    """``submit.py status``: the state line, each node of the latest run, the restarts, the paths."""
    restarts = max(past.restarts, state.restarts if state else 0)
    shown = "not in accounting yet" if state is None else \
        f"{state.state}  exit {state.exit_code}  elapsed {state.elapsed}  restarts {restarts}"
    lines = [f"{record.job_id}  {record.name}  {shown}  {progress(record.out_dir)}"]
    lines += [f"  {v.line()}" for v in nodes] or ["  nodes: none yet (no task has started)"]
    if past.restarts:
        lines.append(f"  restarts: {past.restarts}, lost {past.lost_words()} (details: python slurm/submit.py "
                     f"summary {record.out_dir})")
    return "\n".join([*lines, f"  run: {record.out_dir}", f"  logs: {record.folder}"])


def summary_text(record: JobRecord, state: JobState | None, past: JobHistory) -> str:
    """``submit.py summary RUN_DIR``: the result, the restarts and what each lost."""
    result_file = Path(record.out_dir) / "summary.json"
    result = json.loads(result_file.read_text()) if result_file.is_file() else {}
    shown = "not in accounting yet" if state is None else f"{state.state} (exit {state.exit_code})"
    head = f"{record.job_id}  {record.name}  {shown}  {progress(record.out_dir)}"
    if isinstance(result.get("val_loss"), (int, float)):
        head += f"  val_loss {result['val_loss']:.4f}"
    lines = [head, f"restarts: {past.restarts}, lost {past.lost_words()}"]
    return "\n".join([*lines, *(f"  {line}" for line in past.lines())])


def cancel(record: JobRecord) -> None:
    """scancel the job (through submitit's job object)."""
    record.submitit_job().cancel(check=True)


def progress(out_dir: str | Path) -> str:
    """The last training step a run directory logged, e.g. ``step 14 / 20``, or ``-``."""
    metrics, config = Path(out_dir) / "metrics.jsonl", Path(out_dir) / "config.yaml"
    if not metrics.is_file():
        return "-"
    steps = [json.loads(line).get("step", 0) for line in metrics.read_text().splitlines() if line.strip()]
    total = ""
    if config.is_file():
        total = f" / {yaml.safe_load(config.read_text())['train']['steps']}"
    return f"step {max(steps, default=0)}{total}"
