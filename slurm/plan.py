"""Submit time: check the recipe against the job's shape, then render or submit it through submitit.

Everything a job would discover in its first seconds and that does not need the compute node is checked
here, before anything is queued: the recipe and its overrides, the batch geometry over the job's
data-parallel ranks, the DeepSpeed config, the model shape, a run directory that already holds a run.
"""

from __future__ import annotations

import dataclasses
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import submitit

# submitit's own renderer, the one SlurmExecutor writes each job's script with: --dry-run shows the real
# script.
from submitit.slurm.slurm import _make_sbatch_string

from parallel.dims import ParallelDims
from slurm.jobs import JobRecord, record_jobs
from slurm.profile import JobShape, submitit_command
from slurm.script import SlurmConfigError, check_parameters, check_value
from slurm.sweep import Sweep, point_name, point_overrides, write_sweep_record
from slurm.task import NodeNeeds, RunSpec, TrainTask
from train.checkpoint.reshard import refusal as reshard_refusal
from train.checkpoint.writer import (
    CKPT_BYTES_PER_PARAM,
    checkpoint_estimate,
    checkpoint_root,
    latest_complete,
    read_meta,
)
from train.config.deepspeed import find_ds_config, load_ds_config, resolve_ds_config
from train.config.fields import ConfigError
from train.config.load import load_config
from train.config.schema import JobConfig
from train.hf_setup import plan_hf
from train.research.run import config_shape, plan_research

ARRAY_PARALLELISM = 256  # array tasks SLURM may run at once (submitit's default)


@dataclass(frozen=True)
class Submission:
    """A checked job (or job array): its shape, the runs, where submitit keeps its files."""

    shape: JobShape
    runs: list[RunSpec]
    recipes: list[dict[str, Any]]  # each run's resolved recipe (for --dry-run)
    folder: Path  # submitit folder: sbatch script, pickles, logs (%j_%t_log.out/.err)
    needs: NodeNeeds
    sweep: Sweep | None = None

    def sbatch_script(self) -> str:
        """The script submitit writes for this submission (job ids appear as %j / %A_%a)."""
        params = self.shape.slurm_parameters()
        if self.sweep is not None:
            params |= {"map_count": len(self.runs), "array_parallelism": ARRAY_PARALLELISM}
        return _make_sbatch_string(command=submitit_command(self.folder), folder=self.folder, **params)

    def submit(self) -> list[JobRecord]:
        """Queue the job (or the array, one task per sweep point) and record it; one record per run."""
        if shutil.which("sbatch") is None or shutil.which("srun") is None:
            raise SlurmConfigError("sbatch/srun not found: this machine is not a SLURM submit host; start "
                                   "slurm/local_cluster.sh, or use --dry-run to see the script.")
        params = self.shape.slurm_parameters()
        check_parameters(params)  # what submitit writes into the script, once more before it is queued
        executor = submitit.AutoExecutor(folder=self.folder, cluster="slurm",
                                         slurm_max_num_timeout=self.shape.profile.max_requeues)
        executor.update_parameters(**{f"slurm_{k}": v for k, v in params.items()},
                                   slurm_array_parallelism=ARRAY_PARALLELISM)
        task = TrainTask(self.needs)
        if self.sweep is None:
            jobs = [executor.submit(task, self.runs[0])]
        else:
            jobs = executor.map_array(task, self.runs)
        records = [JobRecord(job_id=str(job.job_id), folder=str(self.folder), out_dir=run.out_dir,
                             tasks=self.shape.world_size, name=run.name) for job, run in zip(jobs, self.runs,
                                                                                              strict=True)]
        record_jobs(records)
        if self.sweep is not None:
            write_sweep_record(self.sweep, [
                {"name": r.name, "point": r.point, "out_dir": r.out_dir, "job_id": rec.job_id}
                for r, rec in zip(self.runs, records, strict=True)])
        return records


def cluster_partitions() -> dict[str, int] | None:
    """The reachable cluster's partitions and the nodes each has, in any state (sinfo), or None when this
    machine has no SLURM client."""
    if shutil.which("sinfo") is None:
        return None
    out = subprocess.run(["sinfo", "-h", "-N", "-o", "%R %N"], capture_output=True, text=True, timeout=30,
                         check=False)
    if out.returncode != 0:
        raise SlurmConfigError(f"sinfo failed ({out.stderr.strip() or out.returncode}): the cluster's "
                               f"controller is not reachable; start it (slurm/local_cluster.sh start) or use "
                               f"--dry-run.")
    return partition_nodes(out.stdout)


def partition_nodes(sinfo_lines: str) -> dict[str, int]:
    """``sinfo -h -N -o "%R %N"`` output (a line per node and partition) as partition -> node count."""
    nodes: dict[str, set[str]] = {}
    for line in sinfo_lines.splitlines():
        part, _, node = line.strip().partition(" ")
        if part:
            nodes.setdefault(part, set()).add(node.strip())
    return {part: len(names) for part, names in sorted(nodes.items())}


def _check_research(cfg: JobConfig, dim: int, n_layers: int, *, vocab_size: int) -> None:
    """A research recipe's options against the model's shape (layer indices, sizes), as the job checks
    them."""
    if cfg.research.recipe is not None:
        plan_research(cfg, dim=dim, n_layers=n_layers, vocab_size=vocab_size)


def _check_recipe(cfg: JobConfig, shape: JobShape, ds_config: str) -> int:
    """Raise on what the job would refuse at start-up, on each node count it may start with; return the
    bytes one checkpoint needs."""
    counts = shape.node_counts
    for nodes in counts[:-1]:  # a range: the job (and its requeues) may start on fewer nodes
        try:
            _check_recipe_at(cfg, shape, ds_config, nodes * shape.tasks_per_node)
        except (ConfigError, ValueError) as e:
            raise SlurmConfigError(f"--nodes {shape.nodes_parameter}: on {nodes} node(s) "
                                   f"({nodes * shape.tasks_per_node} tasks) the job would stop: {str(e).rstrip('.')}; narrow "
                                   f"the range or change the recipe.") from None
    return _check_recipe_at(cfg, shape, ds_config, shape.world_size)


def _check_recipe_at(cfg: JobConfig, shape: JobShape, ds_config: str, world_size: int) -> int:
    """``_check_recipe`` for a job of ``world_size`` tasks."""
    dims = ParallelDims(world_size, tp=cfg.parallel.tp, pp=cfg.parallel.pp)
    ds = resolve_ds_config(load_ds_config(ds_config), cfg, dp_size=dims.dp,
                           bf16_supported=shape.gpus_per_node > 0)
    # an HF model: its directory, LoRA targets and TP layout (its vocabulary is checked in the job)
    if cfg.hf.path is not None:
        hf = plan_hf(cfg, ds, dims, tokenizer_vocab=0)
        _check_research(cfg, *config_shape(hf.config), vocab_size=int(hf.config.vocab_size))
        return hf.trainable_estimate * CKPT_BYTES_PER_PARAM + 2**20
    # the vocabulary is the BPE's; a given tokenizer's is read in the job
    args = cfg.model_args(vocab_size=cfg.data.vocab_size) if cfg.data.tokenizer is None else cfg.model_args()
    _check_research(cfg, args.dim, args.n_layers, vocab_size=args.vocab_size)
    dims.check_model(args, seq_len=cfg.data.seq_len, sequence_parallel=cfg.parallel.sequence_parallel)
    dims.check_pipeline(args, zero_stage=int(ds.get("zero_optimization", {}).get("stage", 0)),
                        grad_accum=int(ds["gradient_accumulation_steps"]))
    return checkpoint_estimate(args)


def _check_resume_layout(cfg: JobConfig, out_dir: Path, resume: str) -> None:
    """A checkpoint of another tp / pp is accepted (the job re-splits it, train/checkpoint/reshard.py) unless it
    was saved under ZeRO 0: that one is refused here, before the job waits in the queue."""
    if resume == "never":
        return
    tag_dir = latest_complete(out_dir) if resume in ("auto", "latest") else Path(resume)
    if tag_dir is None or not (tag_dir / "tessera.json").is_file():
        return
    problem = reshard_refusal(tag_dir, read_meta(tag_dir), tp=cfg.parallel.tp, pp=cfg.parallel.pp)
    if problem is not None:
        raise ConfigError(f"{problem} (nothing was queued)")


def _check_out_dir(out_dir: Path, resume: str) -> None:
    used = checkpoint_root(out_dir).exists() or (out_dir / "metrics.jsonl").exists()
    if used and resume == "never":
        raise ConfigError(f"train.out_dir={out_dir} already holds a run: pass --resume auto to continue it, "
                          f"or choose another train.out_dir (nothing was queued).")
    if resume not in ("never", "auto", "latest") and not Path(resume).exists():
        raise ConfigError(f"--resume {resume}: no such checkpoint directory; give auto, latest, never or an "
                          f"existing checkpoint directory.")
    if resume not in ("never", "auto", "latest") and not (Path(resume) / "tessera.json").is_file():
        raise ConfigError(f"--resume {resume}: not a complete Tessera checkpoint (no tessera.json in it).")


def plan_submission(shape: JobShape, *, config: str, overrides: list[str], ds_config: str | None,
                    resume: str = "never", sweep: Sweep | None = None,
                    folder: str | None = None) -> Submission:
    """Check every run of the submission and build it.

    Raises ConfigError / SlurmConfigError / the model's and the parallel layout's errors."""
    config_path = str(Path(config).resolve())
    if not Path(config_path).is_file():
        raise ConfigError(f"--config {config}: no such recipe file.")
    ds = ds_config or shape.profile.ds_config or ("zero0" if shape.gpus_per_node else "cpu")
    ds_arg = str(find_ds_config(ds).resolve()) if Path(ds).is_file() else ds  # a path must work on the nodes
    points = sweep.points() if sweep is not None else [{}]
    if sweep is not None and resume not in ("never", "auto"):
        raise SlurmConfigError(f"--resume {resume}: a sweep resumes its points with --resume auto only.")
    # A log file is no place for a progress bar (the user's overrides still win); the run directory is set
    # below.
    overrides = ["log.progress=false", *(o for o in overrides if not o.startswith("train.out_dir="))] + \
        [o for o in overrides if o.startswith("train.out_dir=")][-1:]
    runs, recipes, biggest = [], [], 0
    for index, point in enumerate(points):
        extra = point_overrides(point)
        cfg = load_config(config_path, [*overrides, *extra])
        if sweep is not None:
            name = point_name(index, point)
            out_dir = sweep.out_dir / name
        else:
            out_dir = Path(cfg.train.out_dir).resolve()
            name = out_dir.name
        run_overrides = (*(o for o in overrides if not o.startswith("train.out_dir=")), *extra,
                         f"train.out_dir={out_dir}")
        cfg = load_config(config_path, list(run_overrides))
        biggest = max(biggest, _check_recipe(cfg, shape, ds))
        _check_out_dir(out_dir, resume)
        _check_resume_layout(cfg, out_dir, resume)
        runs.append(RunSpec(config=config_path, overrides=run_overrides, out_dir=str(out_dir),
                            ds_config=ds_arg, resume=resume, name=name, point=point))
        recipes.append(cfg.to_dict())
    if folder is not None:
        job_folder = Path(folder).resolve()
    else:
        job_folder = (sweep.out_dir if sweep is not None else Path(runs[0].out_dir)) / "slurm"
    # the folder is in the script (log paths, the srun command), and so is the job name
    paths = [("--folder", folder)] if folder is not None else [("train.out_dir", r.out_dir) for r in runs]
    for where, path in paths:
        check_value(where, str(path))
    if not shape.name:  # default job name: the sweep's or the run directory's
        default = sweep.name if sweep is not None else runs[0].name
        shape = dataclasses.replace(shape, name=f"tessera-{default}")
    check_parameters(shape.slurm_parameters())
    # what each task sees: the node's GPUs, or its own one when they are bound to tasks (--gpus-per-task)
    visible = shape.profile.gpus_per_task if shape.gpus_per_node and shape.profile.gpus_per_task else \
        shape.gpus_per_node
    needs = NodeNeeds(gpus_per_node=visible, mps=shape.profile.mps, checkpoint_bytes=biggest,
                      checkpoint_every_s=shape.profile.checkpoint_every_min * 60,
                      max_requeues=shape.profile.max_requeues)
    return Submission(shape=shape, runs=runs, recipes=recipes, folder=job_folder, needs=needs, sweep=sweep)
