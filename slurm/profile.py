"""SLURM profiles: what a kind of node offers, merged with command-line values into one checked job shape.

A profile is a YAML file in ``slurm/profiles/`` (or any path). Every field below may be set there; the
command line overrides any of them. ``resolve`` turns the merge into a ``JobShape``, refusing what cannot run
(unknown partition, more GPUs per node than the node has, a time limit too short for the warning signal or
shorter than the checkpoint interval) with one ``tessera: error`` line before anything is queued. Fields that
reach the sbatch script (partition, account, qos, constraint, setup lines, sbatch parameters) are checked as
slurm/script.py says when they are read.
"""

from __future__ import annotations

import dataclasses
import os
import shlex
import shutil
import subprocess
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from slurm.script import SlurmConfigError, check_sbatch, check_setup_line, check_value

PROFILE_DIR = Path(__file__).resolve().parent / "profiles"
# Slurm checks for due signals periodically: a warning signal may come up to this much earlier than asked.
SIGNAL_RESOLUTION_S = 60
# Time a job must have between its start and the earliest warning signal, to do more than start and requeue.
MIN_USEFUL_RUN_S = 60
# A submitit job runs as `python -u -m submitit.core._submit FOLDER` under srun.
SUBMITIT_ENTRY = "-u -m submitit.core._submit"
# The first line of the slurm.conf slurm/local_cluster.sh writes, and the partition it declares.
LOCAL_CLUSTER_MARK = "# Written by Tessera's slurm/local_cluster.sh"
LOCAL_PARTITION = "local"
# profile fields written into the sbatch script as they are (each checked by slurm/script.py)
SCRIPT_FIELDS = ("partition", "account", "qos", "constraint")


@dataclass
class Profile:
    """A kind of node (and its queue). Fields are in Slurm's terms; ``None`` leaves Slurm's default."""

    name: str = ""  # file stem, filled by ``load_profile``
    description: str = ""  # one line for `submit.py profiles`
    partition: str | None = None  # queue to submit to
    partitions: list[str] = field(default_factory=list)  # partitions this profile may use (empty: any)
    account: str | None = None  # --account
    qos: str | None = None  # --qos
    constraint: str | None = None  # --constraint (node features, e.g. h100)
    nodes: int = 1  # nodes per job
    max_nodes: int | None = None  # the most nodes a job of this profile may ask for
    gpus_per_node: int = 0  # GPUs a node has; a job uses this many (or fewer) with one task per GPU
    tasks_per_node: int = 1  # processes per node when the job uses no GPU (CPU training over gloo)
    cpus_per_task: int = 1  # --cpus-per-task
    mem_gb_per_task: float = 4.0  # memory per task; sbatch gets --mem = this x tasks per node
    time_min: int = 60  # time limit in minutes
    signal_delay_s: int | None = None  # warning signal this long before the limit (None: from time_min)
    checkpoint_every_min: float = 0.0  # wall-time checkpoint period inside the job (0: steps only)
    max_requeues: int = 3  # requeues after reaching the time limit (preemptions do not count)
    mps: bool = False  # the node runs CUDA MPS: preflight checks its daemon is reachable
    setup: list[str] = field(default_factory=list)  # shell lines run before the job (module load, ...)
    sbatch: dict[str, Any] = field(default_factory=dict)  # further sbatch parameters (name without --)
    ds_config: str | None = None  # DeepSpeed config when --ds_config is not given


@dataclass(frozen=True)
class JobShape:
    """A profile with its overrides applied and checked: what is submitted."""

    profile: Profile
    name: str  # job name ("" until plan_submission names it after the run)
    tasks_per_node: int  # = GPUs used per node, or the profile's CPU tasks
    gpus_per_node: int  # GPUs asked for per node (0: CPU job)
    signal_delay_s: int  # warning signal this long before the time limit

    @property
    def world_size(self) -> int:
        return self.profile.nodes * self.tasks_per_node

    @property
    def mem_gb(self) -> float:
        """Memory per node: --mem."""
        return self.profile.mem_gb_per_task * self.tasks_per_node

    def slurm_parameters(self) -> dict[str, Any]:
        """Parameters in submitit's SlurmExecutor vocabulary (sbatch option names with underscores)."""
        p = self.profile
        params: dict[str, Any] = {
            "job_name": self.name,
            "time": p.time_min,
            "nodes": p.nodes,
            "ntasks_per_node": self.tasks_per_node,
            "cpus_per_task": p.cpus_per_task,
            "mem": _mem_string(self.mem_gb),
            "signal_delay_s": self.signal_delay_s,
            # One task failing (preflight, a crash) ends the others at once instead of leaving them in a
            # collective until its timeout.
            "srun_args": ["--kill-on-bad-exit=1"],
        }
        if self.gpus_per_node:
            params["gpus_per_node"] = self.gpus_per_node
        for key in ("partition", "account", "qos", "constraint"):
            if getattr(p, key):
                params[key] = getattr(p, key)
        if p.setup:
            params["setup"] = list(p.setup)
        if p.sbatch:
            params["additional_parameters"] = {str(k): v for k, v in p.sbatch.items()}
        return params

    def as_dict(self) -> dict[str, Any]:
        """The resolved job, for --dry-run and the run directory."""
        p = dataclasses.asdict(self.profile)
        p.update(name=self.name, profile=self.profile.name, tasks_per_node=self.tasks_per_node,
                 gpus_per_node=self.gpus_per_node, signal_delay_s=self.signal_delay_s,
                 world_size=self.world_size, mem_gb_per_node=self.mem_gb)
        p.pop("description", None)
        return p


def _mem_string(gb: float) -> str:
    return f"{int(gb)}GB" if gb == int(gb) else f"{int(gb * 1024)}MB"


def known_profiles(directory: Path = PROFILE_DIR) -> list[str]:
    """The profile names in ``directory`` (its YAML files), sorted."""
    return sorted(p.stem for p in directory.glob("*.yaml"))


def local_cluster_up(*, conf: Path | None = None, timeout_s: float = 5.0) -> bool:
    """Whether the cluster of ``slurm/local_cluster.sh`` is up on this machine: the SLURM configuration in use
    (``$SLURM_CONF`` or /etc/slurm/slurm.conf) is the one that script writes, and ``sinfo`` reports its
    partition ``local`` up. Costs one file read and, only then, one sinfo call of at most ``timeout_s``."""
    path = conf or Path(os.environ.get("SLURM_CONF", "/etc/slurm/slurm.conf"))
    try:
        with path.open(encoding="utf-8") as f:
            first = f.readline()
    except OSError:
        return False
    if not first.startswith(LOCAL_CLUSTER_MARK) or shutil.which("sinfo") is None:
        return False
    try:
        out = subprocess.run(["sinfo", "-h", "-p", LOCAL_PARTITION, "-o", "%a"], capture_output=True, text=True,
                             timeout=timeout_s, check=False, env={**os.environ, "SLURM_CONF": str(path)})
    except (OSError, subprocess.TimeoutExpired):
        return False
    return out.returncode == 0 and out.stdout.split()[:1] == ["up"]


def choose_profile(name: str | None, directory: Path = PROFILE_DIR) -> tuple[str, str]:
    """The profile to submit with and why: ``name`` when given, else ``local`` when this machine's local
    cluster is up; else a SlurmConfigError listing the profiles and how to pick one."""
    if name is not None:
        return name, "--profile"
    if local_cluster_up():
        return LOCAL_PARTITION, "the local cluster (slurm/local_cluster.sh) is up"
    listing = "\n".join(f"  {n:12s} {load_profile(n, directory).description}" for n in known_profiles(directory))
    raise SlurmConfigError(
        "no --profile given and no local cluster is up on this machine (slurm/local_cluster.sh status); "
        f"pick a profile with --profile NAME (a name below, or the path of a profile YAML file):\n{listing}\n"
        "e.g. python slurm/submit.py --profile h100x8 --nodes 2 --config RECIPE.yaml, or start the local "
        "cluster: sudo slurm/local_cluster.sh start"
    )


def load_profile(name_or_path: str, directory: Path = PROFILE_DIR) -> Profile:
    """A profile by name (``slurm/profiles/NAME.yaml``) or by path to a YAML file."""
    path = Path(name_or_path)
    if not (path.suffix in (".yaml", ".yml") and path.is_file()):
        path = directory / f"{name_or_path}.yaml"
    if not path.is_file():
        raise SlurmConfigError(
            f"--profile {name_or_path}: no such profile; choose one of "
            f"{', '.join(known_profiles(directory))} (files in {directory}) or give the path of a profile "
            f"YAML file."
        )
    raw = yaml.safe_load(path.read_text()) or {}
    if not isinstance(raw, dict):
        raise SlurmConfigError(f"profile {path}: expected a mapping of fields, got {type(raw).__name__}.")
    return with_values(Profile(name=path.stem), raw, where=f"profile {path.stem}")


def with_values(profile: Profile, values: dict[str, Any], where: str) -> Profile:
    """``profile`` with ``values`` replacing its fields (``None`` values are left out); types are checked."""
    hints = typing.get_type_hints(Profile)
    known = [f.name for f in dataclasses.fields(Profile)]
    changes: dict[str, Any] = {}
    for key, value in values.items():
        if key not in known:
            raise SlurmConfigError(f"{where}: unknown field '{key}'; known fields: {', '.join(known)}.")
        if value is not None:
            changes[key] = _check_script_field(where, key, _check_type(f"{where}: {key}", value, hints[key]))
    return dataclasses.replace(profile, **changes)


def _check_script_field(where: str, key: str, value: Any) -> Any:
    """A field that reaches the sbatch script, checked as slurm/script.py says (returned as it is written)."""
    if key in SCRIPT_FIELDS:
        check_value(f"{where}: {key}", value)
    elif key == "setup":
        for line in value:
            check_setup_line(f"{where}: setup line", line)
    elif key == "sbatch":
        return check_sbatch(f"{where}: sbatch", value)
    elif key == "partitions" and not all(isinstance(v, str) for v in value):
        raise SlurmConfigError(f"{where}: partitions={value!r}: expected a list of partition names.")
    return value


def _check_type(where: str, value: Any, tp: Any) -> Any:
    if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union:  # X | None
        tp = next(t for t in typing.get_args(tp) if t is not type(None))
    base = typing.get_origin(tp) or tp
    if base is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if base is list and isinstance(value, str):
        return [value]
    if base is int and isinstance(value, bool) or not isinstance(value, base):
        raise SlurmConfigError(f"{where}={value!r}: expected {getattr(base, '__name__', base)}.")
    return value


def choose_signal_delay(time_min: int) -> int:
    """Seconds between the warning signal and the time limit: a tenth of the limit, within [30 s, 5 min].

    The signal must leave time to finish a step and save a checkpoint, and must not come so early that a short
    job is warned as soon as it starts (Slurm may send it up to a minute before the requested time).
    """
    return int(min(300, max(30, time_min * 60 // 10)))


def resolve(profile: Profile, *, gpus_per_node: int | None = None, tasks_per_node: int | None = None,
            name: str = "", live_partitions: list[str] | None = None) -> JobShape:
    """Check the merged profile and derive the job shape; ``live_partitions``: what the cluster has, if
    known."""
    p = profile
    for key in ("nodes", "cpus_per_task", "time_min"):
        if getattr(p, key) < 1:
            raise SlurmConfigError(f"{key}={getattr(p, key)}: must be at least 1.")
    if p.mem_gb_per_task <= 0:
        raise SlurmConfigError(f"mem_gb_per_task={p.mem_gb_per_task}: must be positive (GB per task).")
    if p.max_nodes is not None and p.nodes > p.max_nodes:
        raise SlurmConfigError(f"--nodes {p.nodes}: profile {p.name} allows at most {p.max_nodes} nodes; "
                               f"ask for fewer or use another profile.")
    _check_partition(p, live_partitions)

    gpus = p.gpus_per_node if gpus_per_node is None else gpus_per_node
    if gpus < 0 or gpus > p.gpus_per_node:
        raise SlurmConfigError(
            f"--gpus-per-node {gpus}: profile {p.name} nodes have {p.gpus_per_node} GPUs; ask for at most "
            f"{p.gpus_per_node} per node (and more nodes with --nodes) or use another profile."
        )
    if gpus > 0:
        if tasks_per_node is not None and tasks_per_node != gpus:
            raise SlurmConfigError(f"--tasks-per-node {tasks_per_node}: a GPU job runs one task per GPU; "
                                   f"leave it out (it is --gpus-per-node, {gpus}).")
        tasks = gpus
    else:
        tasks = p.tasks_per_node if tasks_per_node is None else tasks_per_node
        if tasks < 1:
            raise SlurmConfigError(f"--tasks-per-node {tasks}: must be at least 1.")

    delay = p.signal_delay_s if p.signal_delay_s is not None else choose_signal_delay(p.time_min)
    earliest_signal_s = p.time_min * 60 - delay - SIGNAL_RESOLUTION_S
    if delay < 1 or earliest_signal_s < MIN_USEFUL_RUN_S:
        shortest = -(-(delay + SIGNAL_RESOLUTION_S + MIN_USEFUL_RUN_S) // 60)
        raise SlurmConfigError(
            f"--time {p.time_min}: the warning signal comes {delay} s before the limit and Slurm may send "
            f"it {SIGNAL_RESOLUTION_S} s earlier still, so the job could be told to checkpoint and requeue "
            f"before it has run {MIN_USEFUL_RUN_S} s, again after every requeue; ask for --time {shortest} "
            f"or more (or a smaller --signal-delay-s)."
        )
    if p.checkpoint_every_min < 0:
        raise SlurmConfigError(f"--checkpoint-every-min {p.checkpoint_every_min}: must be >= 0 (0: off).")
    if p.checkpoint_every_min and p.checkpoint_every_min * 60 >= earliest_signal_s + SIGNAL_RESOLUTION_S:
        raise SlurmConfigError(
            f"--time {p.time_min}: shorter than the checkpoint interval (--checkpoint-every-min "
            f"{p.checkpoint_every_min:g}) plus the {delay} s warning: the job would reach its limit before "
            f"its first periodic checkpoint; raise --time or lower --checkpoint-every-min."
        )
    if p.max_requeues < 0:
        raise SlurmConfigError(f"--max-requeues {p.max_requeues}: must be >= 0.")
    for line in p.setup:
        check_setup_line("setup line", line)
    if name:
        check_value("job name", name)
    return JobShape(profile=p, name=name, tasks_per_node=tasks, gpus_per_node=gpus, signal_delay_s=delay)


def _check_partition(p: Profile, live: list[str] | None) -> None:
    if p.partition is None:
        return
    if p.partitions and p.partition not in p.partitions:
        raise SlurmConfigError(f"--partition {p.partition}: not a partition of profile {p.name}; use one of "
                               f"{', '.join(p.partitions)} or another profile.")
    if live is not None and p.partition not in live:
        raise SlurmConfigError(f"--partition {p.partition}: this cluster has no such partition (sinfo lists "
                               f"{', '.join(live) or 'none'}); use one of those.")


def submitit_command(folder: Path, python: str | None = None) -> str:
    """The command submitit runs under srun in each task (the job's Python is the submitting one)."""
    return " ".join([python or shlex.quote(sys.executable), SUBMITIT_ENTRY, shlex.quote(str(folder))])
