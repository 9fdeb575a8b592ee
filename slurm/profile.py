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
import re
import shlex
import shutil
import subprocess
import sys
import types
import typing
from collections.abc import Mapping
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
SCRIPT_FIELDS = ("partition", "account", "qos", "constraint", "exclude", "cpu_bind", "nccl_socket_ifname",
                 "gloo_socket_ifname")
NODE_RANGE = re.compile(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?")  # --nodes 2 or --nodes 1-2
HOST_LIST = re.compile(r"[A-Za-z0-9_.-]+(?:\[[0-9,-]+\])?(?:,[A-Za-z0-9_.-]+(?:\[[0-9,-]+\])?)*")
# srun --cpu-bind: an optional "verbose," then a type, the map/mask types with their list
CPU_BIND = re.compile(r"(?:verbose,)?(?:none|no|cores|threads|sockets|ldoms|rank|rank_ldom|"
                      r"(?:map|mask)_(?:cpu|ldom):[0-9A-Fa-fx,*]+)")
# a network interface list: NCCL takes a "^" (all but these) and "=" (exact names) prefix, gloo names only
IFNAMES = {"nccl_socket_ifname": re.compile(r"\^?=?[A-Za-z0-9_.:@-]{1,15}(?:,[A-Za-z0-9_.:@-]{1,15})*"),
           "gloo_socket_ifname": re.compile(r"[A-Za-z0-9_.:@-]{1,15}(?:,[A-Za-z0-9_.:@-]{1,15})*")}


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
    nodes: int = 1  # nodes per job (with min_nodes: the most it may get); `nodes: MIN-MAX` sets both
    min_nodes: int | None = None  # fewest nodes the job may start on (sbatch --nodes=MIN-MAX); None: = nodes
    max_nodes: int | None = None  # the most nodes a job of this profile may ask for (None: the cluster's)
    exclude: str | None = None  # nodes never to run on, a Slurm host list (sbatch --exclude), e.g. n[3-4]
    exclusive: bool = False  # whole nodes, shared with no other job (sbatch --exclusive)
    gpus_per_node: int = 0  # GPUs a node has; a job uses this many (or fewer) with one task per GPU
    gpus_per_task: int = 0  # 1: each task bound to its own GPU (--gpus-per-task=1); 0: --gpus-per-node
    tasks_per_node: int = 1  # processes per node when the job uses no GPU (CPU training over gloo)
    cpu_bind: str | None = None  # srun --cpu-bind for every task (cores, sockets, none, map_cpu:0,8, ...)
    nccl_socket_ifname: str | None = None  # NCCL_SOCKET_IFNAME exported in the job (e.g. ib0 or ^docker,lo)
    gloo_socket_ifname: str | None = None  # GLOO_SOCKET_IFNAME exported in the job (e.g. eth0 or lo)
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
    def node_counts(self) -> range:
        """The node counts the job may start with: ``nodes``, or ``min_nodes`` to ``nodes``."""
        p = self.profile
        return range(p.nodes if p.min_nodes is None else p.min_nodes, p.nodes + 1)

    @property
    def nodes_parameter(self) -> int | str:
        """sbatch --nodes: a count, or MIN-MAX."""
        counts = self.node_counts
        return counts[0] if len(counts) == 1 else f"{counts[0]}-{counts[-1]}"

    @property
    def world_size(self) -> int:
        """Tasks of the job on its most nodes."""
        return self.profile.nodes * self.tasks_per_node

    def env_lines(self) -> list[str]:
        """The ``export`` lines the job runs after the profile's setup lines (interface choices)."""
        p = self.profile
        return [f"export {name.upper()}={shlex.quote(getattr(p, name))}" for name in IFNAMES
                if getattr(p, name) is not None]

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
            # submitit counts the tasks as nodes x ntasks_per_node, so it gets the most nodes; a range reaches
            # sbatch as an extra parameter, which replaces that --nodes line
            "nodes": self.profile.nodes,
            "ntasks_per_node": self.tasks_per_node,
            "cpus_per_task": p.cpus_per_task,
            "mem": _mem_string(self.mem_gb),
            "signal_delay_s": self.signal_delay_s,
            # One task failing (preflight, a crash) ends the others at once instead of leaving them in a
            # collective until its timeout.
            "srun_args": ["--kill-on-bad-exit=1", *([f"--cpu-bind={p.cpu_bind}"] if p.cpu_bind else [])],
        }
        if self.gpus_per_node and p.gpus_per_task:
            params["gpus_per_task"] = p.gpus_per_task
        elif self.gpus_per_node:
            params["gpus_per_node"] = self.gpus_per_node
        for key in ("partition", "account", "qos", "constraint", "exclude"):
            if getattr(p, key):
                params[key] = getattr(p, key)
        if p.exclusive:
            params["exclusive"] = True
        if p.setup or self.env_lines():
            params["setup"] = [*p.setup, *self.env_lines()]
        extras = {str(k): v for k, v in p.sbatch.items()}
        if len(self.node_counts) > 1:
            extras["nodes"] = self.nodes_parameter
        if extras:
            params["additional_parameters"] = extras
        return params

    def as_dict(self) -> dict[str, Any]:
        """The resolved job, for --dry-run and the run directory."""
        p = dataclasses.asdict(self.profile)
        p.update(name=self.name, profile=self.profile.name, tasks_per_node=self.tasks_per_node,
                 gpus_per_node=self.gpus_per_node, signal_delay_s=self.signal_delay_s,
                 world_size=self.world_size, mem_gb_per_node=self.mem_gb)
        if len(self.node_counts) > 1:
            p["world_size"] = f"{self.node_counts[0] * self.tasks_per_node}-{self.world_size}"
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
    if "nodes" in values and values["nodes"] is not None:
        values = {**values, **_node_range(where, values["nodes"], values.get("min_nodes"))}
    for key, value in values.items():
        if key not in known:
            raise SlurmConfigError(f"{where}: unknown field '{key}'; known fields: {', '.join(known)}.")
        if value is not None:
            changes[key] = _check_script_field(where, key, _check_type(f"{where}: {key}", value, hints[key]))
    if "nodes" in changes and "min_nodes" not in changes:  # an exact count replaces an earlier range
        changes["min_nodes"] = None
    return dataclasses.replace(profile, **changes)


def _node_range(where: str, nodes: Any, min_nodes: Any) -> dict[str, Any]:
    """``nodes`` as a count (``2``) or a range (``"1-2"``: ``min_nodes`` 1, ``nodes`` 2)."""
    if isinstance(nodes, bool) or not isinstance(nodes, (int, str)):
        return {"nodes": nodes}  # the type check names it
    match = NODE_RANGE.fullmatch(str(nodes))
    if match is None:
        raise SlurmConfigError(f"{where}: nodes={nodes!r}: expected int nodes or a range MIN-MAX (e.g. 2 or "
                               f"1-2: the job starts on as many as are free, at least MIN).")
    low, high = match.group(1), match.group(2)
    if high is None:
        return {"nodes": int(low), "min_nodes": min_nodes}
    if min_nodes is not None:
        raise SlurmConfigError(f"{where}: nodes={nodes!r} with min_nodes={min_nodes!r}: give the range once "
                               f"(nodes: MIN-MAX, or nodes and min_nodes).")
    return {"nodes": int(high), "min_nodes": int(low)}


def _check_script_field(where: str, key: str, value: Any) -> Any:
    """A field that reaches the sbatch script, checked as slurm/script.py says (returned as it is written)."""
    if key in SCRIPT_FIELDS:
        check_value(f"{where}: {key}", value)
    if key == "setup":
        for line in value:
            check_setup_line(f"{where}: setup line", line)
    elif key == "sbatch":
        return check_sbatch(f"{where}: sbatch", value)
    elif key == "exclude" and not HOST_LIST.fullmatch(value):
        raise SlurmConfigError(f"{where}: exclude={value!r}: not a Slurm host list; name the nodes as sinfo "
                               f"does, joined by commas, e.g. node3,node[5-7].")
    elif key == "cpu_bind" and not CPU_BIND.fullmatch(value):
        raise SlurmConfigError(f"{where}: cpu_bind={value!r}: not an srun --cpu-bind type; use none, cores, "
                               f"threads, sockets, ldoms, rank, map_cpu:LIST or mask_cpu:LIST (man srun).")
    elif key in IFNAMES and not IFNAMES[key].fullmatch(value):
        nccl = key == "nccl_socket_ifname"
        fix = "interface names joined by commas" + \
            (", optionally after ^ (all but these) or = (exact names), e.g. ^docker0,lo" if nccl else ", e.g. eth0")
        raise SlurmConfigError(f"{where}: {key}={value!r}: not a network interface list; give {fix} (`ip link` "
                               f"lists a node's interfaces).")
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
            name: str = "", live_partitions: Mapping[str, int] | list[str] | None = None) -> JobShape:
    """Check the merged profile and derive the job shape; ``live_partitions``: what the cluster has, if
    known (a mapping: each partition's node count, slurm/plan.py's ``cluster_partitions``)."""
    p = profile
    for key in ("nodes", "cpus_per_task", "time_min"):
        if getattr(p, key) < 1:
            raise SlurmConfigError(f"{key}={getattr(p, key)}: must be at least 1.")
    if p.mem_gb_per_task <= 0:
        raise SlurmConfigError(f"mem_gb_per_task={p.mem_gb_per_task}: must be positive (GB per task).")
    shown = str(p.nodes) if p.min_nodes is None else f"{p.min_nodes}-{p.nodes}"
    if p.min_nodes is not None and not 1 <= p.min_nodes <= p.nodes:
        raise SlurmConfigError(f"--nodes {shown}: a range MIN-MAX needs 1 <= MIN <= MAX; e.g. --nodes "
                               f"1-{p.nodes} (start on as many as are free, at least 1).")
    if p.max_nodes is not None and p.nodes > p.max_nodes:
        raise SlurmConfigError(f"--nodes {shown}: profile {p.name} allows at most {p.max_nodes} nodes; "
                               f"ask for fewer or use another profile.")
    _check_partition(p, live_partitions)
    if isinstance(live_partitions, Mapping) and p.partition in live_partitions \
            and p.nodes > live_partitions[p.partition]:
        have = live_partitions[p.partition]
        raise SlurmConfigError(f"--nodes {shown}: partition {p.partition} has {have} node(s) (sinfo); ask for "
                               f"at most {have}, or a range such as --nodes 1-{have}.")

    gpus = p.gpus_per_node if gpus_per_node is None else gpus_per_node
    asked, per_gpu = "--gpus-per-node", ""
    if p.gpus_per_node and gpus_per_node is None and tasks_per_node is not None:
        gpus, asked, per_gpu = tasks_per_node, "--ntasks-per-node", " (a GPU job runs one task per GPU)"
    if gpus < 0 or gpus > p.gpus_per_node:
        raise SlurmConfigError(
            f"{asked} {gpus}: profile {p.name} nodes have {p.gpus_per_node} GPUs{per_gpu}; ask for at most "
            f"{p.gpus_per_node} per node (and more nodes with --nodes) or use another profile."
        )
    if gpus > 0:
        if tasks_per_node is not None and tasks_per_node != gpus:
            raise SlurmConfigError(f"--ntasks-per-node {tasks_per_node}: a GPU job runs one task per GPU and "
                                   f"uses {gpus} per node (--gpus-per-node); give one of the two, or equal "
                                   f"values.")
        tasks = gpus
    else:
        tasks = p.tasks_per_node if tasks_per_node is None else tasks_per_node
        if tasks < 1:
            raise SlurmConfigError(f"--ntasks-per-node {tasks}: must be at least 1.")
    if p.gpus_per_task not in (0, 1):
        raise SlurmConfigError(f"--gpus-per-task {p.gpus_per_task}: Tessera runs one rank per GPU; use 1 (each "
                               f"task bound to its own GPU) or 0 (the tasks of a node share its GPUs).")
    if p.gpus_per_task and gpus == 0:
        raise SlurmConfigError(f"--gpus-per-task {p.gpus_per_task}: this job uses no GPU (profile {p.name}, "
                               f"--gpus-per-node 0); leave it out or ask for GPUs.")

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
