"""The job options every submitting command shares: the profile, then the command line's job-shape overrides.

``slurm/submit.py`` (one run or a sweep) and ``slurm/submit.py stages`` (one job per stage, slurm/stages.py)
read the same options and apply them the same way: ``add_job_options`` adds them to a parser and
``with_command_line`` applies the parsed values to a loaded profile (``--setup`` lines are appended to the
profile's, ``--sbatch`` parameters merged over its own).
"""

from __future__ import annotations

import argparse
from typing import Any

from slurm.profile import PROFILE_DIR, Profile, with_values
from slurm.script import SlurmConfigError, check_key, check_setup_line, check_value

# command-line option (argparse dest) -> profile field
PROFILE_OPTIONS = {"nodes": "nodes", "partition": "partition", "account": "account", "qos": "qos",
                   "constraint": "constraint", "cpus_per_task": "cpus_per_task", "mem_gb": "mem_gb_per_task",
                   "time": "time_min", "signal_delay_s": "signal_delay_s",
                   "checkpoint_every_min": "checkpoint_every_min", "max_requeues": "max_requeues",
                   "exclude": "exclude", "exclusive": "exclusive", "gpus_per_task": "gpus_per_task",
                   "cpu_bind": "cpu_bind", "nccl_socket_ifname": "nccl_socket_ifname",
                   "gloo_socket_ifname": "gloo_socket_ifname"}


def add_job_options(p: argparse.ArgumentParser, *, profile_required: bool = True) -> None:
    """``--profile`` and the options that override the profile's fields (``profile_required=False``: the
    caller chooses a profile when it is left out)."""
    g = p.add_argument_group("job shape (a profile; the options below override its fields)")
    g.add_argument("--profile", required=profile_required,
                   help=f"a name in {PROFILE_DIR} or a YAML path"
                   + ("" if profile_required else " (default: local when the local cluster is up)"))
    g.add_argument("--nodes", metavar="N|MIN-MAX",
                   help="nodes, or a range: the job starts on as many as are free (at least MIN)")
    g.add_argument("--exclude", metavar="HOSTS", help="nodes never to run on, e.g. node3,node[5-6]")
    g.add_argument("--exclusive", action=argparse.BooleanOptionalAction, default=None,
                   help="whole nodes, shared with no other job")
    g.add_argument("--gpus-per-node", type=int, help="GPUs per node; one task per GPU")
    g.add_argument("--ntasks-per-node", "--tasks-per-node", dest="tasks_per_node", type=int,
                   help="tasks per node (a GPU job: one per GPU, so the GPUs it uses per node)")
    g.add_argument("--gpus-per-task", type=int, choices=(0, 1),
                   help="1: bind each task to its own GPU; 0: the tasks of a node share its GPUs")
    g.add_argument("--cpu-bind", metavar="TYPE", help="srun --cpu-bind of every task (cores, sockets, none, ...)")
    g.add_argument("--nccl-socket-ifname", metavar="IFNAMES", help="NCCL_SOCKET_IFNAME in the job (e.g. ib0)")
    g.add_argument("--gloo-socket-ifname", metavar="IFNAMES", help="GLOO_SOCKET_IFNAME in the job (e.g. eth0)")
    g.add_argument("--cpus-per-task", type=int)
    g.add_argument("--mem-gb", type=float, help="memory per task in GB")
    g.add_argument("--time", type=int, help="time limit in minutes")
    g.add_argument("--partition")
    g.add_argument("--account")
    g.add_argument("--qos")
    g.add_argument("--constraint")
    g.add_argument("--setup", action="append", default=[],
                   help="a shell line run before the job (repeatable)")
    g.add_argument("--sbatch", action="append", default=[], metavar="KEY=VALUE",
                   help="a further sbatch parameter, e.g. --sbatch mail-type=END (repeatable)")
    g.add_argument("--signal-delay-s", type=int, help="warning signal this long before the time limit")
    g.add_argument("--checkpoint-every-min", type=float, help="wall-time checkpoint period (0: off)")
    g.add_argument("--max-requeues", type=int, help="requeues after the time limit")


def _profile_values(args: argparse.Namespace) -> dict[str, Any]:
    """The profile fields the command line sets (options left out keep the profile's value)."""
    values: dict[str, Any] = {field: getattr(args, opt) for opt, field in PROFILE_OPTIONS.items()}
    return {k: v for k, v in values.items() if v is not None}


def _sbatch_extras(items: list[str]) -> dict[str, str]:
    """``--sbatch KEY=VALUE`` items as sbatch parameters (a leading ``--`` on the key is dropped); keys and
    values are checked as slurm/script.py says."""
    extras = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise SlurmConfigError(f"--sbatch {item!r}: expected KEY=VALUE (e.g. --sbatch mail-type=END).")
        name = check_key("--sbatch", key)
        check_value(f"--sbatch {name}", value)
        extras[name] = value
    return extras


def with_command_line(profile: Profile, args: argparse.Namespace) -> Profile:
    """``profile`` with the job-shape options of the command line applied (``--setup`` lines are appended)."""
    for opt in ("partition", "account", "qos", "constraint"):  # written into the script as given
        if getattr(args, opt) is not None:
            check_value(f"--{opt}", getattr(args, opt))
    for line in args.setup:
        check_setup_line("--setup", line)
    profile = with_values(profile, _profile_values(args), where="command line")
    setup = [*profile.setup, *args.setup]
    sbatch = {**profile.sbatch, **_sbatch_extras(args.sbatch)}
    return with_values(profile, {"setup": setup, "sbatch": sbatch}, where="command line")
