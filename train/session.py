"""One training run on every rank, after the plan is made: build -> resume -> train -> finish.

``train/main.py`` imports this module only once the recipe and the launcher variables are valid, so that
``--help``, ``--help-config`` and a bad key answer without DeepSpeed, transformers or the data stack.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import yaml

from model import ModelConfigError
from parallel.groups import build_process_groups
from train.build import Built, build, checkpoint_writer, make_objective, run_meta
from train.checkpoint.resume import load_checkpoint
from train.checkpoint.writer import CheckpointError, read_meta, remove_partial
from train.config.fields import ConfigError
from train.data import eval_batches
from train.data.setup import batch_stream
from train.distributed import device_for, init_distributed
from train.eval.sample import generate_sample
from train.loop.guards import TrainingDiverged
from train.loop.metrics import MetricsLogger
from train.loop.preempt import RunControl
from train.loop.trainer import TrainState, train
from train.objectives import OBJECTIVES
from train.plan import USER_ERRORS, Plan, plan
from train.research.api import LossTermError
from train.vocab.setup import SnapshotWriter

__all__ = ["PEER_ERRORS", "RUN_ERRORS", "USER_ERRORS", "plan", "run"]

RUN_ERRORS = (CheckpointError, TrainingDiverged, ModelConfigError, LossTermError, ConfigError)
# What torch raises when a collective fails: torch.distributed.DistError and gloo's errors are RuntimeErrors;
# train.distributed.describe_peer_loss tells which of them mean a lost peer rank.
PEER_ERRORS = (RuntimeError,)
log = logging.getLogger("tessera")


def run(p: Plan, control: RunControl | None = None) -> dict[str, Any]:
    """Train the planned run: build -> resume -> train -> finish. Collective: every rank calls it."""
    cfg, env, t = p.cfg, p.env, p.cfg.train
    out_dir = Path(t.out_dir)
    init_distributed(env, timeout_s=t.dist_timeout_s)
    device = device_for(env)
    groups = build_process_groups(p.dims)
    built = build(p, groups, device)
    engine = built.engine

    state = TrainState(meta=run_meta(p, built))
    if p.resume_from is not None:
        saved = load_checkpoint(engine, p.resume_from, rank=env.rank, tp_ctx=built.tp_ctx)
        state.step, state.consumed_samples = int(saved["step"]), int(saved["consumed_samples"])
        state.val_ema, state.best_val_ema = saved.get("val_ema"), saved.get("best_val_ema")
        state.meta["run_id"] = saved.get("run_id", state.meta["run_id"])
    if env.is_main:
        for stale in remove_partial(out_dir):
            log.info("removed %s, a checkpoint an earlier run did not finish writing", stale)
    checkpoints = checkpoint_writer(p, built)
    if env.is_main:
        _write_run_files(p, built, state)
    logger = MetricsLogger(
        out_dir, enabled=env.is_main, total_steps=t.steps, start_step=state.step, progress=cfg.log.progress,
        wandb_mode=cfg.log.wandb, wandb_project=cfg.log.wandb_project,
        run_name=cfg.log.run_name or out_dir.name, run_id=state.meta["run_id"], config=cfg.to_dict(),
    )
    data_state = read_meta(p.resume_from).get("data_state") if p.resume_from is not None else None
    batches = batch_stream(cfg, p.train_ds, dp_rank=groups.dp_rank, dp_size=p.dims.dp, data_state=data_state)

    def val_batches():
        return eval_batches(p.val_ds, micro_batch=t.micro_batch_size, max_batches=t.eval_batches,
                            dp_rank=groups.dp_rank, dp_size=p.dims.dp)

    after_step = None
    if getattr(built.model, "extension", None) is not None:  # embedding snapshots of a vocabulary extension
        info, tokenizer = built.model.extension
        after_step = SnapshotWriter(built.model.model, info, tokenizer, out_dir,
                                    interval=cfg.vocab.snapshot_interval, last_step=t.steps, rank=env.rank)
    objective = built.objective = make_objective(p, built, device)

    start = time.perf_counter()
    result = train(cfg, engine, state, batches=batches, val_batches=val_batches,
                   grad_accum=engine.gradient_accumulation_steps(), logger=logger, device=device,
                   checkpoints=checkpoints, loss_fn=built.loss_fn, tp_ctx=built.tp_ctx, control=control,
                   after_step=after_step, objective=objective)
    if state.step < t.steps:  # stopped on request (preemption): the checkpoint is saved, a resume continues
        logger.close()
        return {"steps": state.step, "stopped": True}
    if not result:  # an evaluation-only run (train.steps=0), or a finished run resumed: nothing to train
        result = objective.evaluate(engine, val_batches, device)
        if state.step == 0:  # the starting weights' evaluation is a row of metrics.jsonl like any other
            logger.log({"step": 0, **result})
    if built.ext is not None:
        result = {**result, **built.ext.report(state.step)}
    sample = None
    if built.ext is not None and not p.research.cls.needs_base:
        pass  # a recipe's own model: its evaluations are its report
    elif not OBJECTIVES[t.objective].samples:
        pass  # a sequence head generates nothing; an encoder-decoder's generations are in its evaluations
    elif p.dims.pp > 1:
        log.info("no sample under pipeline parallelism: export the checkpoint (tools/export_hf.py) to generate")
    else:
        sample = generate_sample(cfg.sample, built.generator_model(), p.bundle.tokenizer_dir, device, built.tp_ctx,
                                 seed=t.seed)
    summary = {"steps": state.step, "train_time_s": round(time.perf_counter() - start, 1),
               "params": built.n_params, **result, "sample": sample}
    logger.close(summary)
    if env.is_main:
        _report(out_dir, summary, result, sample)
    return summary


def _write_run_files(p: Plan, built: Built, state: TrainState) -> None:
    """config.yaml and ds_config.json in the run directory, and the run's shape in the log (rank 0)."""
    out_dir, engine = Path(p.cfg.train.out_dir), built.engine
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "config.yaml").write_text(yaml.safe_dump(p.cfg.to_dict(), sort_keys=False))
    (out_dir / "ds_config.json").write_text(json.dumps(p.ds_config, indent=2))
    own = built.ext is not None and not p.research.cls.needs_base  # a recipe that is its own model
    log.info("model: %s parameters, %s", f"{built.n_params:,}",
             f"{type(built.ext.base).__name__}({built.ext.base.args})" if own else p.model_args or p.hf.path)
    log.info("world %d (dp %d x tp %d%s x pp %d), ZeRO stage %d, grad accumulation %d, %s", p.env.world_size,
             p.dims.dp, p.dims.tp, ", sequence parallel" if built.tp_ctx.sequence_parallel else "", p.dims.pp,
             engine.zero_optimization_stage(), engine.gradient_accumulation_steps(), engine.device)
    if p.resume_from is not None:  # the save time lets slurm/submit.py summary tell what a restart lost
        saved = read_meta(Path(p.resume_from)).get("saved_at")
        when = f", saved {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(saved))}" \
            if isinstance(saved, (int, float)) else ""
        log.info("resumed from %s at step %d (%d samples consumed)%s", p.resume_from, state.step,
                 state.consumed_samples, when)


def _report(out_dir: Path, summary: dict[str, Any], result: dict[str, Any], sample: str | None) -> None:
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    if "val_ppl" in result:
        print(f"\nvalidation loss {result['val_loss']:.4f} | perplexity {result['val_ppl']:.2f}")
    else:
        print("\nvalidation " + " | ".join(f"{k.removeprefix('val_')} {v:.4f}" for k, v in result.items()))
    if sample is not None:
        print(f"--- sample ---\n{sample}\n--------------")
