"""Submit Tessera training to SLURM through submitit, and follow it up.

    python slurm/submit.py [--profile NAME] [--nodes N|MIN-MAX] [--gpus-per-node G] [--time MIN] ... \\
        [--config RECIPE.yaml] [--ds_config NAME|PATH] [--resume auto] [--sweep GRID.yaml] [--dry-run] \\
        [--wait SECONDS] [section.key=value ...]

Bare, `python slurm/submit.py` submits the default recipe (train/configs/shakespeare.yaml, as
`train/main.py` runs it) with the profile `local` when the local cluster (slurm/local_cluster.sh) is up
on this machine; elsewhere it lists the profiles and asks for one (exit code 2).

Commands after a submission (JOB is the id printed at submission, e.g. 12 or 12_3 in a sweep, or the run
directory):

    python slurm/submit.py status 12                   state, exit code, restarts, last step, each node's
                                                       state, tasks and log
    python slurm/submit.py tail 12 --task 1            the end of task 1's log
    python slurm/submit.py tail 12 --node all          the end of each node's first task's log (or --node n2)
    python slurm/submit.py cancel runs/smoke           scancel the job of a run directory
    python slurm/submit.py summary runs/smoke          a run's result, restarts and the time they lost
    python slurm/submit.py summary runs/sweeps/lr      a sweep's results, best validation loss first
    python slurm/submit.py profiles                    the profiles in slurm/profiles/
    python slurm/submit.py stages train/configs/stages_cpu.yaml --profile local [--dry-run] [--wait SECONDS]
                                                       a chain of stages: one job per stage, each after the
                                                       previous (slurm/stages.py)

Examples of submissions:

    python slurm/submit.py --profile local --config train/configs/smoke.yaml --wait 600
    python slurm/submit.py --profile h100x8 --nodes 4 --config my_recipe.yaml train.out_dir=/shared/runs/big
    python slurm/submit.py --profile local --config train/configs/smoke.yaml --dry-run

Every setting is checked before anything is queued; a problem is one line ``tessera: error: ...`` and exit
code 2. ``--dry-run`` prints the resolved job, the resolved recipe and the sbatch script, and queues nothing.
"""
from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: import from the repo root, never from slurm/ itself
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import argparse
from typing import Any

import yaml

from slurm import jobs
from slurm.options import add_job_options, with_command_line
from slurm.plan import cluster_partitions, plan_submission
from slurm.profile import choose_profile, known_profiles, load_profile, resolve
from slurm.script import SlurmConfigError, check_value
from slurm.stages import cmd_stages
from slurm.sweep import SWEEP_FILE, format_table, load_sweep, summarize
from train.cli_errors import ToolParser, report_error
from train.plan import USER_ERRORS

COMMANDS = ("status", "cancel", "tail", "summary", "profiles")
DEFAULT_RECIPE = Path(__file__).resolve().parents[1] / "train" / "configs" / "shakespeare.yaml"
"""The recipe of a bare submission: train/main.py's default."""


def submit_parser() -> argparse.ArgumentParser:
    p = ToolParser(prog="slurm/submit.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_job_options(p, profile_required=False)
    p.add_argument("--config", default=str(DEFAULT_RECIPE), help="training recipe (YAML; default: %(default)s)")
    p.add_argument("--ds_config", default=None, help="DeepSpeed config (default: the profile's)")
    p.add_argument("--resume", default="never",
                   help="as train/main.py: never (default), auto, or a checkpoint")
    p.add_argument("--sweep", default=None, help="YAML grid of overrides: one array task per point")
    p.add_argument("--dry-run", action="store_true",
                   help="print the job, recipe and sbatch script; queue nothing")
    p.add_argument("--wait", type=float, default=None, metavar="SECONDS",
                   help="wait for the job(s) to end; print the result (a sweep: its summary)")
    p.add_argument("--name", default=None, help="job name (default: tessera-<run directory name>)")
    p.add_argument("--folder", default=None, help="submitit folder (default: RUN_DIR/slurm)")
    p.add_argument("overrides", nargs="*", metavar="section.key=value", help="recipe overrides")
    return p


def followup_parser() -> argparse.ArgumentParser:
    p = ToolParser(prog="slurm/submit.py", description="Follow up Tessera SLURM jobs.")
    sub = p.add_subparsers(dest="command", required=True)
    for name, what in (("status", "state, exit code, restarts and progress"), ("cancel", "scancel the job"),
                       ("tail", "the end of a task's log")):
        s = sub.add_parser(name, help=what)
        s.add_argument("job",
                       help="job id as printed at submission (123, or 123_4 in an array), or run directory")
        if name == "tail":
            s.add_argument("--task", type=int, default=0, help="task (rank) whose log to show (default 0)")
            s.add_argument("--node", default=None,
                           help="instead: the log of the first task of this node (name or index), or of all")
            s.add_argument("--lines", type=int, default=30)
    sub.add_parser("summary", help="a run's restarts and lost time, or a sweep's results").add_argument(
        "run_dir", metavar="RUN_OR_SWEEP_DIR")
    sub.add_parser("profiles", help="list the profiles")
    return p


def cmd_submit(argv: list[str]) -> int:
    args = submit_parser().parse_intermixed_args(argv)
    try:
        if args.name is not None:
            check_value("--name", args.name)
        name, why = choose_profile(args.profile)
        if args.profile is None:
            print(f"profile {name}: {why}", file=sys.stderr)
        profile = with_command_line(load_profile(name), args)
        live = None if args.dry_run else cluster_partitions()
        sweep = load_sweep(args.sweep) if args.sweep else None
        shape = resolve(profile, gpus_per_node=args.gpus_per_node, tasks_per_node=args.tasks_per_node,
                        name=args.name or "", live_partitions=live)
        sub = plan_submission(shape, config=args.config, overrides=args.overrides, ds_config=args.ds_config,
                              resume=args.resume, sweep=sweep, folder=args.folder)
        if args.dry_run:
            _print_dry_run(sub)
            return 0
        records = sub.submit()
    except (SlurmConfigError, *USER_ERRORS) as e:
        return report_error(e)
    for r in records:
        print(f"submitted {r.job_id}: {r.name} -> {r.out_dir}")
    print(f"logs: {sub.folder}/<job>_<task>_log.{{out,err}}; follow with: python slurm/submit.py "
          f"status|tail|cancel {records[0].job_id}")
    if args.wait is None:
        return 0
    return _wait(records, args.wait, sub.sweep.out_dir if sub.sweep else None)


def _wait(records: list[jobs.JobRecord], timeout_s: float, sweep_dir: Path | None) -> int:
    failed = 0
    for r in records:
        state = jobs.wait_final(r.job_id, timeout_s)
        print(f"{r.job_id}: {state.state} (exit {state.exit_code}, {state.elapsed}, "
              f"{state.restarts} restarts)")
        if state.state != "COMPLETED":
            failed += 1
            print(jobs.log_tail(r), file=sys.stderr)
    if sweep_dir is not None:
        print(format_table(summarize(sweep_dir)))
    return 1 if failed else 0


def _print_dry_run(sub: Any) -> None:
    print(f"# job (profile {sub.shape.profile.name}; nothing was queued)")
    print(yaml.safe_dump(sub.shape.as_dict(), sort_keys=False).rstrip())
    for run, recipe in zip(sub.runs, sub.recipes, strict=True):
        print(f"\n# run {run.name}: train/main.py {' '.join(run.argv())}")
        print(yaml.safe_dump(recipe, sort_keys=False).rstrip())
    print("\n# sbatch script")
    print(sub.sbatch_script())


def cmd_followup(argv: list[str]) -> int:
    args = followup_parser().parse_args(argv)
    try:
        if args.command == "profiles":
            for name in known_profiles():
                p = load_profile(name)
                print(f"{name:12s} {p.description}")
            return 0
        if args.command == "summary":
            print(_summary(Path(args.run_dir)))
            return 0
        record = jobs.find_job(args.job)
        if args.command == "tail" and args.node is not None:
            print(jobs.node_tails(record, args.node, lines=args.lines))
        elif args.command == "tail":
            print(jobs.log_tail(record, task=args.task, lines=args.lines))
        elif args.command == "cancel":
            jobs.cancel(record)
            print(f"cancelled {record.job_id} ({record.name})")
        else:
            print(_status(record))
    except (jobs.JobLookupError, SlurmConfigError, RuntimeError) as e:
        return report_error(e)
    return 0


def _status(record: jobs.JobRecord) -> str:
    """The job's state, each node of its latest run, its restarts and their lost time, its paths."""
    return jobs.status_text(record, jobs.job_state(record.job_id), jobs.node_status(record), jobs.history(record))


def _summary(path: Path) -> str:
    """A sweep's table (sweep.json), or one run's result, restarts and lost time (slurm_job.json)."""
    if (path / SWEEP_FILE).is_file():
        return format_table(summarize(path))
    if not (path / jobs.RECORD_FILE).is_file():
        raise SlurmConfigError(f"summary {path}: neither a sweep ({SWEEP_FILE}) nor a submitted run "
                               f"({jobs.RECORD_FILE}); give the out_dir of a run or sweep slurm/submit.py "
                               f"submitted.")
    record = jobs.find_job(str(path))
    return jobs.summary_text(record, jobs.job_state(record.job_id), jobs.history(record))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "stages":
        return cmd_stages(argv[1:])
    if argv and argv[0] in COMMANDS:
        return cmd_followup(argv)
    return cmd_submit(argv)


if __name__ == "__main__":
    sys.exit(main())
