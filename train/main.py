"""Tessera's one entry point.

    python train/main.py [--config RECIPE.yaml] [--ds_config NAME|PATH] [--resume auto] [section.key=value ...]
    torchrun --nproc_per_node 2 train/main.py ...
    deepspeed --num_accelerators 2 train/main.py --ds_config ds_configs/zero3.json ...

Everything that can be checked without a device (recipe, overrides, DeepSpeed config, batch geometry, run
directory, corpus, tokenizer) is checked first; a problem ends the run with one line and exit code 2,
before any process group starts or any file is written.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: import from the repo root, never from train/ itself
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import argparse
import dataclasses
import json
import logging
import os
import time
import uuid
import warnings
from typing import Any

import torch
import yaml

from model import ModelArgs, ModelConfigError, Transformer, generate
from model.heads import SequenceScorer
from model.hf import args_from_hf_config, load_hf_config, load_hf_pretrained
from model.hf_causal import causal_lm_config
from parallel.dims import ParallelConfigError, ParallelDims
from parallel.groups import build_process_groups
from parallel.perf import apply_perf, build_loss_fn
from parallel.pipeline import build_pipeline
from parallel.tp import HF_LLAMA_TP_PLAN, FullLogits, TPContext, apply_tp, tp_lm_loss
from train.checkpoint.writer import (
    CheckpointError,
    CheckpointWriter,
    check_free_space,
    checkpoint_root,
    latest_complete,
    load_checkpoint,
    read_meta,
    remove_partial,
)
from train.config.deepspeed import load_ds_config, resolve_ds_config
from train.config.fields import ConfigError
from train.config.load import describe_fields, load_config
from train.config.schema import JobConfig
from train.data import DataError, eval_batches
from train.data.setup import DataBundle, batch_stream, build_datasets, setup_data
from train.data.supervised import ClassificationDataset
from train.data.tokenizer import load_tokenizer
from train.distributed import DistEnv, device_for, init_distributed, read_env, shutdown_distributed
from train.hf_setup import ADAPTER_DIR, HFPlan, build_hf, plan_hf, save_adapter
from train.loop.guards import TrainingDiverged
from train.loop.metrics import MetricsLogger
from train.loop.optim import build_optimizer, build_scheduler, param_groups
from train.loop.preempt import RunControl
from train.loop.trainer import TrainState, train
from train.objectives.lm import Objective, lm_loss
from train.objectives.dpo import DPOObjective, build_reference
from train.objectives.scoring import ScoreObjective
from train.objectives.seq2seq import Seq2SeqObjective
from train.research.api import LossTermError
from train.research.api import param_groups as research_param_groups
from train.research.run import (
    ResearchPlan,
    build_research,
    config_shape,
    place,
    plan_research,
    research_objective,
)
from train.vocab.setup import SnapshotWriter, plan_vocab

DEFAULT_RECIPE = Path(__file__).resolve().parent / "configs" / "shakespeare.yaml"
USER_ERRORS = (ConfigError, ParallelConfigError, ModelConfigError, DataError, CheckpointError)
RUN_ERRORS = (CheckpointError, TrainingDiverged, ModelConfigError, LossTermError, ConfigError)
# Bytes per parameter in a checkpoint: fp32 weights (4) + Adam moments (8) + an fp32 master copy under bf16 (4).
CKPT_BYTES_PER_PARAM = 16
log = logging.getLogger("tessera")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="train/main.py", description="Train a decoder LM with DeepSpeed.")
    p.add_argument("--config", default=str(DEFAULT_RECIPE), help="YAML recipe (default: %(default)s)")
    p.add_argument("--ds_config", default=None,
                   help="DeepSpeed JSON, a path or a name in ds_configs/ (default: cpu without CUDA, else zero0)")
    p.add_argument("--resume", default="never",
                   help="'auto': continue from the newest complete checkpoint in train.out_dir if there is one; "
                        "a checkpoint directory: continue from it; 'never' (default): refuse a used out_dir")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--help-config", action="store_true", help="list every recipe key with its default and exit")
    p.add_argument("overrides", nargs="*", metavar="section.key=value", help="recipe overrides")
    return p.parse_intermixed_args(argv)  # overrides before and after the flags, in the order given


@dataclasses.dataclass
class Plan:
    """Everything decided before touching a device."""

    cfg: JobConfig
    env: DistEnv
    dims: ParallelDims
    ds_config: dict[str, Any]
    bundle: DataBundle
    model_args: ModelArgs | None  # None for an HF model (hf.path)
    resume_from: Path | None
    train_ds: Any  # a dataset with batch(indices), or a stream (train/data/setup.py)
    val_ds: Any  # a dataset with batch(indices)
    hf: HFPlan | None = None  # the HF model of hf.path, checked
    research: ResearchPlan | None = None  # the research recipe around the model (train/research/api.py), checked


def _resume_target(cfg: JobConfig, resume: str) -> Path | None:
    out_dir = Path(cfg.train.out_dir)
    if resume == "auto":
        return latest_complete(out_dir)
    if resume == "never":
        used = checkpoint_root(out_dir).exists() or (out_dir / "metrics.jsonl").exists()
        if used:
            raise ConfigError(
                f"train.out_dir={out_dir} already holds a run: pass --resume auto to continue it, or choose "
                f"another train.out_dir (nothing there was touched)."
            )
        return None
    tag_dir = Path(resume)
    if not (tag_dir / "tessera.json").is_file():
        raise ConfigError(f"--resume {resume}: not a complete Tessera checkpoint (no tessera.json in it).")
    return tag_dir


def plan(args: argparse.Namespace) -> Plan:
    cfg = load_config(args.config, args.overrides)
    env = read_env(args.local_rank)
    dims = ParallelDims(env.world_size, tp=cfg.parallel.tp, pp=cfg.parallel.pp)
    ds_name = args.ds_config or ("zero0" if torch.cuda.is_available() else "cpu")
    bf16_ok = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    ds_config = resolve_ds_config(load_ds_config(ds_name), cfg, dp_size=dims.dp, bf16_supported=bf16_ok)
    resume_from = _resume_target(cfg, args.resume)
    vocab = None
    if cfg.hf.path is not None:  # the model directory first: its tokenizer is the data's
        causal_lm_config(cfg.hf.path, seq2seq=cfg.train.objective == "seq2seq")
        if cfg.vocab.lexicon is not None or cfg.vocab.from_snapshot is not None:
            vocab = plan_vocab(cfg)  # the data are tokenized with the extended tokenizer
            cfg.data.tokenizer = str(vocab.tokenizer_dir)
    bundle = setup_data(cfg)
    hf = plan_hf(cfg, ds_config, dims, bundle.vocab_size, vocab) if cfg.hf.path is not None else None
    model_args = None if hf is not None else _native_model_args(cfg, dims, ds_config, bundle.vocab_size)
    research = None
    if cfg.research.recipe is not None:  # the recipe's options against the model's shape
        dim, n_layers = config_shape(hf.config) if hf is not None else (model_args.dim, model_args.n_layers)
        research = plan_research(cfg, dim=dim, n_layers=n_layers, vocab_size=bundle.vocab_size)
    if dims.pp > 1 and cfg.parallel.sequence_parallel:  # stages exchange sequence slices, not replicas
        ds_config.setdefault("pipeline", {}).update(pipe_partitioned=False, grad_partitioned=False)
    if resume_from is not None:
        meta = read_meta(resume_from)
        _check_resume_layout(meta, resume_from, dims)
        if hf is not None:
            if meta.get("hf") != hf.identity or meta.get("config", {}).get("lora") != cfg.to_dict()["lora"]:
                raise ConfigError(f"--resume: the checkpoint {resume_from} was trained on {meta.get('hf')} with "
                                  f"lora {meta.get('config', {}).get('lora')}; resume with that model and lora section.")
        elif (meta.get("research") or {}).get("recipe") != cfg.research.recipe or \
                (meta.get("research") or {}).get("options", {}) != cfg.research.options:
            raise ConfigError(f"--resume: the checkpoint {resume_from} was trained with research "
                              f"{meta.get('research')}; resume with that research.recipe and research.options.")
        elif ModelArgs(**(meta.get("model_args") or {})) != model_args:
            raise ConfigError(f"--resume: the checkpoint {resume_from} holds a different model "
                              f"({meta.get('model_args')}); resume with the recipe it was trained with.")
        if meta.get("tokenizer", {}).get("sha256") != bundle.tokenizer_id.get("sha256"):
            raise ConfigError(f"--resume: the checkpoint {resume_from} was trained with another tokenizer.")
    train_ds, val_ds = _datasets(cfg, bundle, dims.dp, research)
    if cfg.train.objective == "dpo" and cfg.dpo.reference_from is not None:
        _check_reference(cfg, hf, model_args)
    if cfg.train.objective in ("reward", "classify") and hf is not None:  # an HF sequence-classification head
        hf = dataclasses.replace(hf, head_labels=_head_outputs(cfg, train_ds))
    check_free_space(cfg.train.out_dir, _checkpoint_bytes(model_args, hf), "one checkpoint")
    return Plan(cfg, env, dims, ds_config, bundle, model_args, resume_from, train_ds=train_ds, val_ds=val_ds, hf=hf,
                research=research)


def _check_reference(cfg: JobConfig, hf: HFPlan | None, model_args: ModelArgs | None) -> None:
    """dpo.reference_from must hold the policy's architecture (its weights replace the policy's starting ones)."""
    ref = cfg.dpo.reference_from
    if hf is not None:
        other = causal_lm_config(ref, where="dpo.reference_from")
        keys = ("model_type", "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "intermediate_size", "n_embd", "n_layer", "n_head")
        for key in keys:
            mine, theirs = getattr(hf.config, key, None), getattr(other, key, None)
            if mine != theirs:
                raise ConfigError(f"dpo.reference_from={ref}: {key}={theirs!r} there but {mine!r} in the policy "
                                  f"(hf.path={hf.path}); the reference must have the policy's architecture.")
        return
    assert model_args is not None
    theirs = dataclasses.replace(args_from_hf_config(load_hf_config(ref), max_seq_len=model_args.max_seq_len),
                                 dropout=model_args.dropout)
    diff = [f.name for f in dataclasses.fields(ModelArgs) if getattr(theirs, f.name) != getattr(model_args, f.name)]
    if diff:
        raise ConfigError(f"dpo.reference_from={ref}: {diff[0]}={getattr(theirs, diff[0])!r} there but "
                          f"{getattr(model_args, diff[0])!r} in the policy; the reference must have the policy's "
                          f"architecture.")


def _head_meta(cfg: JobConfig, model: Any, train_ds: Any) -> dict[str, Any] | None:
    """A sequence head's outputs and class names, for export (None for language models)."""
    if cfg.train.objective not in ("reward", "classify"):
        return None
    data = getattr(train_ds, "dataset", None)
    names = list(getattr(data, "names", []) or []) if cfg.train.objective == "classify" else []
    return {"kind": model.kind, "num_labels": model.n_out, "labels": names}


def _head_outputs(cfg: JobConfig, train_ds: Any) -> int:
    """Outputs of the sequence head: one score for a reward model, one logit per class for a classifier."""
    if cfg.train.objective == "reward":
        data = getattr(train_ds, "dataset", None)
        if isinstance(data, ClassificationDataset) and data.num_labels > 2:
            raise ConfigError(f"train.objective='reward' on data.corpus='classification' scores labels 0 / 1 (incorrect "
                              f"/ correct); the data have {data.num_labels} classes: use train.objective='classify'.")
        return 1
    return int(train_ds.dataset.num_labels)


def _native_model_args(cfg: JobConfig, dims: ParallelDims, ds_config: dict[str, Any], vocab_size: int) -> ModelArgs:
    """The Tessera model of the recipe, checked against the tokenizer and the parallel layout."""
    model_args = cfg.model_args(vocab_size=vocab_size)
    if model_args.vocab_size < vocab_size:
        raise ConfigError(f"model.vocab_size={model_args.vocab_size} is smaller than the tokenizer's "
                          f"{vocab_size}: remove the override or raise it.")
    dims.check_model(model_args, seq_len=cfg.data.seq_len, sequence_parallel=cfg.parallel.sequence_parallel)
    dims.check_pipeline(model_args, zero_stage=int(ds_config.get("zero_optimization", {}).get("stage", 0)),
                        grad_accum=int(ds_config["gradient_accumulation_steps"]))
    return model_args


def _checkpoint_bytes(model_args: ModelArgs | None, hf: HFPlan | None) -> int:
    if hf is not None:
        return hf.trainable_estimate * CKPT_BYTES_PER_PARAM + 2**20
    assert model_args is not None
    return checkpoint_estimate(model_args)


def _check_resume_layout(meta: dict[str, Any], tag_dir: Path, dims: ParallelDims) -> None:
    """A tensor-parallel checkpoint resumes with the same tp, and at the same world size."""
    saved = meta.get("config", {}).get("parallel", {})
    for name in ("tp", "pp"):
        was, now = int(saved.get(name, 1)), getattr(dims, name)
        if was != now:
            raise ConfigError(f"--resume: {tag_dir} was trained with parallel.{name}={was}, this run has "
                              f"parallel.{name}={now}; resume with parallel.{name}={was} (a checkpoint's "
                              f"{'tensor' if name == 'tp' else 'pipeline'}-parallel degree cannot be changed on "
                              f"resume).")
    saved_world = meta.get("world_size")
    if dims.tp * dims.pp > 1 and saved_world is not None and int(saved_world) != dims.world_size:
        raise ConfigError(f"--resume: {tag_dir} is a tensor/pipeline-parallel checkpoint of {saved_world} ranks; "
                          f"resume it on {saved_world} ranks (changing the data-parallel size of a tp or pp > 1 run "
                          f"is not supported).")


def _datasets(cfg: JobConfig, bundle: DataBundle, dp_size: int, research: ResearchPlan | None = None
              ) -> tuple[Any, Any]:
    """Training and validation data (a research recipe may bring its own); splits too short for one sequence or
    one evaluation round fail here."""
    if research is not None and hasattr(research.cls, "datasets"):
        train, val = research.cls.datasets(research.options, cfg)
        if len(val) < cfg.train.micro_batch_size * dp_size:
            raise ConfigError(f"the validation split holds {len(val)} examples, fewer than train.micro_batch_size="
                              f"{cfg.train.micro_batch_size} x {dp_size} data-parallel ranks needed to evaluate: "
                              f"raise data.val_fraction or lower train.micro_batch_size.")
        return train, val
    return build_datasets(cfg, bundle, dp_size)


def checkpoint_estimate(args: ModelArgs) -> int:
    """Bytes one checkpoint of this model takes, before one has been written and measured."""
    return args.num_params() * CKPT_BYTES_PER_PARAM + 2**20


def build_model(args: ModelArgs, device: torch.device, seed: int) -> Transformer:
    """Build on the meta device, materialise on ``device``, initialise deterministically from ``seed``."""
    with torch.device("meta"):
        model = Transformer(args)
    model.to_empty(device=device)
    torch.manual_seed(seed)
    model.init_weights()
    return model


def _setup_logging(env: DistEnv) -> None:
    # DeepSpeed calls collectives that torch has renamed; the warning says nothing a user can act on.
    warnings.filterwarnings("ignore", message=".*(all_gather_into_tensor|reduce_scatter_tensor).*",
                            category=FutureWarning)
    logging.basicConfig(level=logging.INFO if env.is_main else logging.WARNING,
                        format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    # DeepSpeed's pipeline sends activations with an in-place broadcast on gloo; backward passes through it
    # unchanged on the sending rank, which torch reports as a missing autograd kernel.
    warnings.filterwarnings("ignore", message=r"c10d::broadcast_: an autograd kernel was not registered",
                            category=UserWarning)


def run(p: Plan, control: RunControl | None = None) -> dict[str, Any]:
    import deepspeed

    cfg, env = p.cfg, p.env
    t = cfg.train
    out_dir = Path(t.out_dir)
    init_distributed(env, timeout_s=t.dist_timeout_s)
    device = device_for(env)
    groups = build_process_groups(p.dims)
    dp_rank, dp_size = groups.dp_rank, p.dims.dp

    keep_alive = None  # ZeRO-3 loading of an HF model: transformers reads the DeepSpeed config through it
    if p.hf is not None:
        model, keep_alive = build_hf(p.hf, cfg, p.ds_config, device)
        n_params = p.hf.n_params
        tp_ctx = TPContext(None, 1, 0)
        if p.dims.tp > 1:  # the HF model's modules swapped for Tessera's TP layers, by the native plan
            tp_ctx = apply_tp(model.model, groups.tp_group, plan=HF_LLAMA_TP_PLAN, seed=t.seed)
        loss_fn = tp_lm_loss(model, tp_ctx) if tp_ctx.size > 1 else lm_loss
    elif p.research is not None and not p.research.cls.needs_base:  # a recipe that is its own model
        model, tp_ctx, n_params, loss_fn = None, TPContext(None, 1, 0), 0, lm_loss
    else:
        model, tp_ctx, n_params = _native_model(p, groups, device)
        bf16 = bool(p.ds_config.get("bf16", {}).get("enabled"))  # then activation checkpointing, kernels, compile
        apply_perf(model, tp_ctx=tp_ctx, device=device, dtype=torch.bfloat16 if bf16 else torch.float32,
                   doc_mask=cfg.data.doc_mask, **dataclasses.asdict(cfg.perf))
        loss_fn = build_loss_fn(model, tp_ctx, default=lm_loss)
        if t.objective in ("reward", "classify"):  # the LM head replaced by a sequence head
            tok = load_tokenizer(p.bundle.tokenizer_dir)  # the pad (else eos) id, as the export records it
            pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
            model = SequenceScorer.native(model, _head_outputs(cfg, p.train_ds), pad_id=pad)
    ext = None
    if p.research is not None:  # the recipe's modules around the model; frozen base, placed with the activations
        model = ext = build_research(p.research, p.cfg, model, loss_fn=loss_fn, tp_ctx=tp_ctx, device=device,
                                     rank=env.rank, vocab_size=p.bundle.vocab_size, tokenizer_dir=p.bundle.tokenizer_dir,
                                     val_data=p.val_ds)
        n_params = sum(x.numel() for x in ext.parameters())
    module: torch.nn.Module = model
    if p.dims.pp > 1:  # each stage keeps its pieces; DeepSpeed's grid (same rank order) is the mpu
        module = build_pipeline(model, p.dims, loss_fn=loss_fn, tp_ctx=tp_ctx,
                                partition_method=cfg.parallel.partition_method,
                                activation_checkpoint_interval=cfg.parallel.activation_checkpoint_interval)
    quantized = p.hf is not None and p.hf.quantization is not None  # bitsandbytes placed the weights already
    if ext is not None:
        place(ext, device, move_base=not quantized)
    elif not quantized:
        module.to(device)
    opt_groups = (research_param_groups(module, cfg.research.groups, lr=t.lr, weight_decay=t.weight_decay)
                  if ext is not None else param_groups(module, t.weight_decay))
    optimizer = None if "optimizer" in p.ds_config else build_optimizer(module, t, p.ds_config, groups=opt_groups)
    engine, _, _, _ = deepspeed.initialize(
        model=module,
        optimizer=optimizer,
        model_parameters=None if optimizer is not None else opt_groups,
        lr_scheduler=lambda opt: build_scheduler(opt, t),
        config=p.ds_config,
        mpu=groups if p.dims.pp == 1 else None,
    )
    del keep_alive

    meta = {
        "run_id": uuid.uuid4().hex[:12],
        "config": cfg.to_dict(),
        "model_args": dataclasses.asdict(p.model_args) if p.model_args is not None else None,
        "hf": p.hf.identity if p.hf is not None else None,
        "head": _head_meta(cfg, model, p.train_ds),
        "research": {"recipe": cfg.research.recipe, "options": cfg.research.options} if ext is not None else None,
        "tokenizer": p.bundle.tokenizer_id,
        "tokenizer_dir": str(p.bundle.tokenizer_dir),
        "prepared_dir": str(p.bundle.prepared_dir),
        "code_version": _code_version(),
    }
    state = TrainState(meta=meta)
    if p.resume_from is not None:
        saved = load_checkpoint(engine, p.resume_from, rank=env.rank)
        state.step, state.consumed_samples = int(saved["step"]), int(saved["consumed_samples"])
        state.val_ema, state.best_val_ema = saved.get("val_ema"), saved.get("best_val_ema")
        meta["run_id"] = saved.get("run_id", meta["run_id"])
    if env.is_main:
        for stale in remove_partial(out_dir):
            log.info("removed %s, a checkpoint an earlier run did not finish writing", stale)
    extra = None
    if p.hf is not None and p.hf.adapters:  # every checkpoint also holds the adapter in PEFT's format
        def extra(tag_dir: Path) -> None:
            base = engine.module if ext is None else ext.base
            save_adapter(base, tag_dir / ADAPTER_DIR, rank=env.rank, tokenizer_dir=p.bundle.tokenizer_dir)
    checkpoints = CheckpointWriter(out_dir, rank=env.rank, keep_last=t.keep_last,
                                   estimate_bytes=_checkpoint_bytes(p.model_args, p.hf), extra=extra)

    if env.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        (out_dir / "ds_config.json").write_text(json.dumps(p.ds_config, indent=2))
        own = ext is not None and not p.research.cls.needs_base  # a recipe that is its own model
        log.info("model: %s parameters, %s", f"{n_params:,}",
                 f"{type(ext.base).__name__}({ext.base.args})" if own else p.model_args or p.hf.path)
        log.info("world %d (dp %d x tp %d%s x pp %d), ZeRO stage %d, grad accumulation %d, %s", env.world_size,
                 dp_size, p.dims.tp, ", sequence parallel" if tp_ctx.sequence_parallel else "", p.dims.pp,
                 engine.zero_optimization_stage(), engine.gradient_accumulation_steps(), device)
        if p.resume_from is not None:
            log.info("resumed from %s at step %d (%d samples consumed)", p.resume_from, state.step,
                     state.consumed_samples)

    logger = MetricsLogger(
        out_dir, enabled=env.is_main, total_steps=t.steps, start_step=state.step, progress=cfg.log.progress,
        wandb_mode=cfg.log.wandb, wandb_project=cfg.log.wandb_project,
        run_name=cfg.log.run_name or out_dir.name, run_id=meta["run_id"], config=cfg.to_dict(),
    )
    train_ds, val_ds = p.train_ds, p.val_ds
    data_state = read_meta(p.resume_from).get("data_state") if p.resume_from is not None else None
    batches = batch_stream(cfg, train_ds, dp_rank=dp_rank, dp_size=dp_size, data_state=data_state)

    def val_batches():
        return eval_batches(val_ds, micro_batch=t.micro_batch_size, max_batches=t.eval_batches,
                            dp_rank=dp_rank, dp_size=dp_size)

    after_step = None
    if getattr(model, "extension", None) is not None:  # embedding snapshots of a vocabulary extension
        info, tokenizer = model.extension
        after_step = SnapshotWriter(model.model, info, tokenizer, out_dir, interval=cfg.vocab.snapshot_interval,
                                    last_step=t.steps, rank=env.rank)
    objective = Objective(loss_fn)
    if ext is not None:
        objective = research_objective(p.research, cfg, ext, out_dir=out_dir, rank=env.rank, tp_ctx=tp_ctx)
    elif t.objective == "dpo":
        objective = _dpo_objective(p, engine, groups, device, train_ds)
    elif t.objective == "seq2seq":
        objective = Seq2SeqObjective(train_ds.dataset, load_tokenizer(p.bundle.tokenizer_dir),
                                     max_new_tokens=cfg.data.max_target_len or cfg.data.seq_len,
                                     zero3=engine.zero_optimization_stage() == 3, out_dir=out_dir, rank=env.rank)
    elif t.objective in ("reward", "classify"):
        mode = "classify" if t.objective == "classify" else \
            "pairwise" if cfg.data.corpus == "preference" else "pointwise"
        objective = ScoreObjective(mode, num_labels=engine.module.n_out, out_dir=out_dir, rank=env.rank)
    start = time.perf_counter()
    result = train(cfg, engine, state, batches=batches, val_batches=val_batches,
                   grad_accum=engine.gradient_accumulation_steps(), logger=logger, device=device,
                   checkpoints=checkpoints, loss_fn=loss_fn, tp_ctx=tp_ctx, control=control, after_step=after_step,
                   objective=objective)
    if state.step < t.steps:  # stopped on request (preemption): the checkpoint is saved, a resume continues
        logger.close()
        return {"steps": state.step, "stopped": True}
    if not result:  # resumed a finished run: nothing to train, still report
        result = objective.evaluate(engine, val_batches, device)
    sample = None
    if ext is not None:
        result = {**result, **ext.report(state.step)}
    if ext is not None and not p.research.cls.needs_base:
        pass  # a recipe's own model: its evaluations are its report
    elif t.objective in ("reward", "classify", "seq2seq"):
        pass  # a sequence head generates nothing; an encoder-decoder's generations are in its evaluations
    elif p.dims.pp > 1:
        log.info("no sample under pipeline parallelism: export the checkpoint (tools/export_hf.py) to generate")
    else:
        sample = _sample(cfg, engine.module if ext is None else ext.base, p.bundle.tokenizer_dir, device, tp_ctx)
    summary = {"steps": state.step, "train_time_s": round(time.perf_counter() - start, 1), "params": n_params,
               **result, "sample": sample}
    logger.close(summary)
    if env.is_main:
        (out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        if "val_ppl" in result:
            print(f"\nvalidation loss {result['val_loss']:.4f} | perplexity {result['val_ppl']:.2f}")
        else:
            print("\nvalidation " + " | ".join(f"{k.removeprefix('val_')} {v:.4f}" for k, v in result.items()))
        if sample is not None:
            print(f"--- sample ---\n{sample}\n--------------")
    return summary


def _dpo_objective(p: Plan, engine: Any, groups: Any, device: torch.device, train_ds: Any) -> DPOObjective:
    """DPO against a reference built from the policy's starting point (train/objectives/dpo.py)."""
    cfg = p.cfg

    source = cfg.dpo.reference_from

    def fresh_model() -> torch.nn.Module:
        if p.hf is not None:
            plan = dataclasses.replace(p.hf, lora_targets=[], path=Path(source) if source else p.hf.path)
            return build_hf(plan, cfg, p.ds_config, device)[0]
        model = _native_model(p, groups, device)[0]
        if source:  # another checkpoint of the same architecture (checked when planning)
            model.load_state_dict(load_hf_pretrained(source, max_seq_len=model.args.max_seq_len)[1])
        return model

    dataset = train_ds.dataset  # every pair, training and validation (the batches' `index` counts in it)
    reference = build_reference(cfg.dpo.reference, engine=engine, adapters=p.hf is not None and p.hf.adapters,
                                fresh_model=fresh_model, ds_config=p.ds_config, device=device,
                                out_dir=Path(cfg.train.out_dir), dataset=dataset,
                                micro_batch=cfg.train.micro_batch_size, resuming=p.resume_from is not None,
                                rank=p.env.rank)
    return DPOObjective(reference, beta=cfg.dpo.beta, label_smoothing=cfg.dpo.label_smoothing)


def _native_model(p: Plan, groups: Any, device: torch.device) -> tuple[Transformer, TPContext, int]:
    """Build, initialise (or load) and split the Tessera model.

    The whole model is built and initialised (or loaded) first, then split: every tp and pp starts from the
    same weights. With tp or pp > 1 the whole model lives on the host until each rank keeps its part.
    """
    cfg, t = p.cfg, p.cfg.train
    assert p.model_args is not None
    split = p.dims.tp * p.dims.pp > 1
    model = build_model(p.model_args, torch.device("cpu") if split else device, t.seed)
    n_params = sum(x.numel() for x in model.parameters())
    frozen = p.research is not None and cfg.research.freeze_base  # a frozen base is not in the checkpoints
    if cfg.model.init_from is not None and (p.resume_from is None or frozen):  # every rank, then TP / ZeRO
        _, weights = load_hf_pretrained(cfg.model.init_from, max_seq_len=p.model_args.max_seq_len)
        model.load_state_dict(weights)
        log.info("weights loaded from %s", cfg.model.init_from)
    tp_ctx = apply_tp(model, groups.tp_group, sequence_parallel=cfg.parallel.sequence_parallel, seed=t.seed)
    return model, tp_ctx, n_params


def _sample(cfg: JobConfig, model: torch.nn.Module, tokenizer_dir: Path, device: torch.device,
            tp_ctx: TPContext) -> str | None:
    """Every rank generates the same text (same seed): ZeRO-3 gathers layers and TP the logits as it goes."""
    s = cfg.sample
    if s.max_new_tokens == 0:
        return None
    if tp_ctx.size > 1:
        model = FullLogits(model, tp_ctx)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    ids = torch.tensor([tok.encode(s.prompt) or [tok.eos_token_id]], device=device)
    gen = torch.Generator(device=device).manual_seed(cfg.train.seed)
    out = generate(model, ids, s.max_new_tokens, temperature=s.temperature, top_k=s.top_k, top_p=s.top_p,
                   repetition_penalty=s.repetition_penalty, stop_tokens=(tok.eos_token_id,), generator=gen)
    return tok.decode(out[0].tolist(), skip_special_tokens=True)


def _code_version() -> str:
    import subprocess

    try:
        root = Path(__file__).resolve().parents[1]
        return subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, timeout=5, check=False).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def main(argv: list[str] | None = None, *, control: RunControl | None = None) -> int:
    """Run from ``argv``; ``control`` (train/loop/preempt.py) lets a caller in the same process stop the run."""
    args = parse_args(argv)
    if args.help_config:
        print(describe_fields())
        return 0
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    env = read_env(args.local_rank)
    _setup_logging(env)
    try:
        p = plan(args)
    except USER_ERRORS as e:
        if env.is_main:
            print(f"tessera: error: {e}", file=sys.stderr)
        return 2
    try:
        run(p, control)
    # raised on every rank together: a checkpoint that cannot be written or read, a run that keeps diverging,
    # pretrained weights that do not match their config, a research loss term that is not a finite scalar
    except RUN_ERRORS as e:
        if env.is_main:
            print(f"tessera: error: {e}", file=sys.stderr)
        shutdown_distributed()
        return 1
    shutdown_distributed()
    return 0


def cli() -> None:
    sys.exit(main())


if __name__ == "__main__":
    cli()
