"""A chain of stages on SLURM: one job per stage, each queued to start only after the job before it succeeded.

    python slurm/submit.py stages STAGES.yaml --profile NAME [--dry-run] [--wait SECONDS] [job shape options]

Every stage is checked as ``submit.py`` checks a single run (slurm/plan.py: the recipe over the job's
data-parallel ranks, the DeepSpeed config, the model, the HF model and its LoRA targets), the exports that
later stages start from being placeholders until they exist (train/stages.py). Then the stages that have not
finished are queued in file order: each job gets ``--dependency=afterok:<the job before it>`` and
``--kill-on-invalid-dep=yes``, so a failed stage cancels the jobs after it instead of leaving them pending
forever. A stage's job trains its run (``--resume auto``) and then, on task 0, exports the checkpoint that the
next stages start from, so a job only succeeds once its export is written.

A stage's job shape: the profile, then the stage's ``slurm:`` fields (profile fields, e.g. ``tasks_per_node``,
``time_min``), then the command line's options.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import submitit
import yaml
from submitit.slurm.slurm import _make_sbatch_string

from slurm import jobs
from slurm.options import add_job_options, with_command_line
from slurm.plan import Submission, cluster_partitions, plan_submission
from slurm.profile import Profile, load_profile, resolve, submitit_command, with_values
from slurm.script import SlurmConfigError, check_parameters
from slurm.task import RunSpec, TrainTask
from train.cli_errors import ToolParser, report_error
from train.config.schema import JobConfig
from train.plan import USER_ERRORS
from train.stages import (
    SUMMARY_FILE,
    Stage,
    StageChain,
    StagePlan,
    StagesError,
    export_stage,
    exported,
    load_stages,
    plan_stages,
    swap_paths,
)

JOBS_FILE = "stage_jobs.json"  # in the chain's out_dir: each submitted stage's job
ON_INVALID_DEPENDENCY = {"kill-on-invalid-dep": "yes"}  # a failed stage cancels the jobs that wait for it


@dataclass(frozen=True)
class StageJob:
    """A checked stage and the job that runs it."""

    plan: StagePlan
    submission: Submission  # its shape, run, resolved recipe, submitit folder, node checks

    @property
    def run(self) -> RunSpec:
        return self.submission.runs[0]


class StageTask(TrainTask):
    """TrainTask, then task 0 exports the stage's checkpoint (no training when the run already finished)."""

    def __init__(self, needs: Any, plan: StagePlan) -> None:
        super().__init__(needs)
        self.plan = plan

    def __call__(self, run: RunSpec) -> dict[str, Any]:
        if (Path(run.out_dir) / SUMMARY_FILE).is_file():  # trained by an earlier job that did not export
            result: dict[str, Any] = {"status": "completed", "name": run.name, "out_dir": run.out_dir}
        else:
            result = super().__call__(run)
        if submitit.JobEnvironment().global_rank != 0 or exported(self.plan.export_dir):
            return result
        try:
            out = export_stage(self.plan)
        except StagesError as e:
            print(f"tessera: error: {e}", file=sys.stderr, flush=True)
            sys.exit(1)
        stage = self.plan.stage
        print(f"tessera: stage '{stage.name}': {stage.checkpoint} checkpoint exported to {out}",
              file=sys.stderr, flush=True)
        return {**result, "export": str(out)}


def plan_jobs(chain: StageChain, profile: Profile, *, cli: argparse.Namespace | None = None,
              live_partitions: dict[str, int] | None = None) -> list[StageJob]:
    """Check every stage as a job of ``profile`` (with its ``slurm:`` fields and the command line's
    options)."""

    def check(stage: Stage, cfg: JobConfig, overrides: list[str], swaps: dict[str, str]) -> Submission:
        try:
            prof = with_values(profile, stage.slurm, where=f"stage '{stage.name}' slurm")
            if cli is not None:
                prof = with_command_line(prof, cli)
            shape = resolve(prof, gpus_per_node=getattr(cli, "gpus_per_node", None),
                            tasks_per_node=getattr(cli, "tasks_per_node", None),
                            name=f"tessera-{chain.name}-{stage.name}", live_partitions=live_partitions)
            chained = sorted({"dependency", *ON_INVALID_DEPENDENCY} & set(prof.sbatch))
            if chained:
                raise SlurmConfigError(f"sbatch {chained[0]}: the chain sets --{chained[0]} itself (each "
                                       f"stage waits for the one before it); leave it out.")
        except SlurmConfigError as e:
            raise SlurmConfigError(f"stages {chain.path}: stage '{stage.name}': {e}") from None
        sub = plan_submission(shape, config=str(stage.config), overrides=overrides, ds_config=stage.ds_config,
                              resume="auto")
        swapped = tuple(swap_paths(list(sub.runs[0].overrides), swaps))
        run = dataclasses.replace(sub.runs[0], overrides=swapped)
        return dataclasses.replace(sub, runs=[run], recipes=swap_paths(sub.recipes, swaps))

    plans, submissions = plan_stages(chain, check)
    return [StageJob(plan, sub) for plan, sub in zip(plans, submissions, strict=True)]


def job_parameters(job: StageJob, after: str | None) -> dict[str, Any]:
    """submitit's SlurmExecutor parameters of a stage's job; ``after``: the job id it waits for."""
    params = job.submission.shape.slurm_parameters()
    params["additional_parameters"] = {**params.get("additional_parameters", {}), **ON_INVALID_DEPENDENCY}
    if after is not None:
        params["dependency"] = f"afterok:{after}"
    return params


def sbatch_script(job: StageJob, after: str | None) -> str:
    """The script submitit writes for the stage's job."""
    folder = job.submission.folder
    return _make_sbatch_string(command=submitit_command(folder), folder=folder, **job_parameters(job, after))


def submit_jobs(chain: StageChain, stage_jobs: list[StageJob]) -> list[tuple[StageJob, jobs.JobRecord]]:
    """Queue the stages that have not finished, each after the one queued before it; record them."""
    if shutil.which("sbatch") is None or shutil.which("srun") is None:
        raise SlurmConfigError("sbatch/srun not found: this machine is not a SLURM submit host; start "
                               "slurm/local_cluster.sh, or use --dry-run to see the scripts.")
    queued: list[tuple[StageJob, jobs.JobRecord]] = []
    after: str | None = None
    for job in stage_jobs:
        if job.plan.status == "done":
            continue
        sub = job.submission
        executor = submitit.AutoExecutor(folder=sub.folder, cluster="slurm",
                                         slurm_max_num_timeout=sub.shape.profile.max_requeues)
        params = job_parameters(job, after)
        check_parameters(params)  # what submitit writes into the script, once more before it is queued
        executor.update_parameters(**{f"slurm_{k}": v for k, v in params.items()})
        submitted = executor.submit(StageTask(sub.needs, job.plan), job.run)
        record = jobs.JobRecord(job_id=str(submitted.job_id), folder=str(sub.folder), out_dir=job.run.out_dir,
                                tasks=sub.shape.world_size, name=f"{chain.name}/{job.plan.stage.name}")
        jobs.record_jobs([record])
        queued.append((job, record))
        after = record.job_id
    chain.out_dir.mkdir(parents=True, exist_ok=True)
    rows = [{"stage": job.plan.stage.name, "job_id": rec.job_id, "out_dir": rec.out_dir,
             "after": queued[i - 1][1].job_id if i else None} for i, (job, rec) in enumerate(queued)]
    (chain.out_dir / JOBS_FILE).write_text(json.dumps(rows, indent=2) + "\n")
    return queued


def _print_dry_run(stage_jobs: list[StageJob]) -> None:
    previous: str | None = None
    for index, job in enumerate(stage_jobs):
        stage = job.plan.stage
        head = f"# stage {index + 1}/{len(stage_jobs)} '{stage.name}': {job.plan.status}"
        if job.plan.status == "done":
            print(f"{head}; finished, not queued (export {job.plan.export_dir})\n")
            continue
        after = None if previous is None else f"JOB_OF_{previous}"  # the job id sbatch gives that stage
        waits = f"after the job of stage {previous!r}" if after else "no dependency"
        print(f"{head}; {waits} (nothing was queued)")
        print(yaml.safe_dump(job.submission.shape.as_dict(), sort_keys=False).rstrip())
        print(f"\n# run: train/main.py {' '.join(job.run.argv())}")
        print(yaml.safe_dump(job.submission.recipes[0], sort_keys=False).rstrip())
        print("\n# sbatch script")
        print(sbatch_script(job, after) + "\n")
        previous = stage.name


def stages_parser() -> argparse.ArgumentParser:
    p = ToolParser(prog="slurm/submit.py stages",
                                description="Submit a chain of stages: one job per stage, each after the "
                                            "previous one.")
    p.add_argument("stages", help="the stages file (train/stages.py)")
    add_job_options(p)
    p.add_argument("--dry-run", action="store_true",
                   help="print each job, recipe and sbatch script; queue nothing")
    p.add_argument("--wait", type=float, default=None, metavar="SECONDS",
                   help="wait for the jobs to end (each within SECONDS); print their states")
    return p


def cmd_stages(argv: list[str]) -> int:
    args = stages_parser().parse_args(argv)
    try:
        chain = load_stages(args.stages)
        live = None if args.dry_run else cluster_partitions()
        stage_jobs = plan_jobs(chain, load_profile(args.profile), cli=args, live_partitions=live)
        if args.dry_run:
            _print_dry_run(stage_jobs)
            return 0
        queued = submit_jobs(chain, stage_jobs)
    except (StagesError, SlurmConfigError, *USER_ERRORS) as e:
        return report_error(e)
    for job in stage_jobs:
        if job.plan.status == "done":
            print(f"stage {job.plan.stage.name}: finished, not queued")
    for i, (job, rec) in enumerate(queued):
        after = f" (after {queued[i - 1][1].job_id})" if i else ""
        print(f"submitted {rec.job_id}: stage {job.plan.stage.name}{after} -> {rec.out_dir}")
    if args.wait is None or not queued:
        return 0
    failed = 0
    for job, rec in queued:
        state = jobs.wait_final(rec.job_id, args.wait)
        print(f"{rec.job_id} ({job.plan.stage.name}): {state.state} (exit {state.exit_code}, "
              f"{state.elapsed})")
        if state.state != "COMPLETED" and not failed:
            failed += 1
            print(jobs.log_tail(rec), file=sys.stderr)
        elif state.state != "COMPLETED":
            failed += 1
    return 1 if failed else 0
