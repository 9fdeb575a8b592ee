"""Everything decided before a device is touched: the recipe, the DeepSpeed config, the data, the model's shape,
the resume target and its compatibility, the HF and research plans. A problem here is one line and exit code 2,
before any process group starts or any file is written."""

from __future__ import annotations

import argparse
import dataclasses
import logging
from pathlib import Path
from typing import Any

import torch

from model import ModelArgs, ModelConfigError
from model.hf import args_from_hf_config, load_hf_config
from model.hf_causal import causal_lm_config
from parallel.dims import ParallelConfigError, ParallelDims
from train.checkpoint.reshard import refusal as reshard_refusal
from train.checkpoint.verify import BadCheckpoint, newest_verified, verified
from train.checkpoint.writer import (
    CKPT_BYTES_PER_PARAM,
    CheckpointError,
    check_free_space,
    check_out_dir,
    checkpoint_estimate,
    checkpoint_root,
    complete_checkpoints,
    read_meta,
)
from train.config.deepspeed import load_ds_config, resolve_ds_config
from train.config.fields import ConfigError
from train.config.load import load_config
from train.config.schema import JobConfig
from train.data import DataError
from train.data.setup import DataBundle, build_datasets, setup_data
from train.distributed import DistEnv, read_env
from train.hf_setup import HFPlan, plan_hf
from train.objectives import OBJECTIVES, head_outputs
from train.research.resume import check_research_resume
from train.research.run import ResearchPlan, config_shape, plan_research
from train.vocab.setup import plan_vocab

log = logging.getLogger("tessera")

# Errors of the user's input: one line, exit code 2.
USER_ERRORS = (ConfigError, ParallelConfigError, ModelConfigError, DataError, CheckpointError)


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


def _resume_target(cfg: JobConfig, resume: str, *, checksums: bool = False,
                   quiet: bool = False) -> Path | None:
    """The checkpoint to resume from: for 'auto' the newest that verifies (train/checkpoint/verify.py; each
    one skipped is a warning naming its damaged file), for 'latest' the same but an error when there is none, a
    named one only if it exists and verifies, None for a fresh run. ``train.out_dir`` below a regular file is one
    line here, before anything is written."""
    out_dir = Path(cfg.train.out_dir)
    check_out_dir(out_dir)
    warn = (lambda msg: None) if quiet else log.warning
    info = (lambda msg: None) if quiet else log.info
    if resume in ("auto", "latest"):
        found = newest_verified(out_dir, checksums=checksums, warn=warn, info=info)
        if found is None and complete_checkpoints(out_dir):
            raise CheckpointError(f"--resume {resume}: no checkpoint in {checkpoint_root(out_dir)} verifies (see "
                                  f"the warnings above); restore one, or start a new run in another "
                                  f"train.out_dir.")
        if found is None and resume == "latest":
            raise CheckpointError(f"--resume latest: train.out_dir={out_dir} holds no complete checkpoint; "
                                  f"check train.out_dir, or pass --resume auto to start fresh when there is none.")
        return found
    if resume == "never":
        used = checkpoint_root(out_dir).exists() or (out_dir / "metrics.jsonl").exists()
        if used:
            raise ConfigError(
                f"train.out_dir={out_dir} already holds a run: pass --resume auto to continue it, or choose "
                f"another train.out_dir (nothing there was touched)."
            )
        return None
    tag_dir = Path(resume)
    if not tag_dir.exists():
        raise CheckpointError(f"--resume {resume}: no such checkpoint directory; give auto, latest, never or an "
                              f"existing checkpoint directory (e.g. {checkpoint_root(out_dir) / 'step_00000200'}).")
    if not tag_dir.is_dir():
        raise CheckpointError(f"--resume {resume}: a file, not a checkpoint directory; give a step_* directory "
                              f"of checkpoints/ (or auto / latest).")
    if not (tag_dir / "tessera.json").is_file():
        inside = complete_checkpoints(tag_dir.parent if tag_dir.name == "checkpoints" else tag_dir)
        hint = f" (the newest complete one in it is {inside[-1]})" if inside else ""
        raise ConfigError(f"--resume {resume}: not a complete Tessera checkpoint (no tessera.json in it){hint}.")
    try:
        return verified(tag_dir, checksums=checksums, info=info)
    except BadCheckpoint as err:
        raise CheckpointError(f"--resume {resume}: {err} Resume from another checkpoint (--resume auto takes "
                              f"the newest one that verifies).") from None


def plan(args: argparse.Namespace, cfg: JobConfig | None = None) -> Plan:
    """The run of ``args`` (its recipe: ``cfg`` when the caller loaded it already), checked end to end."""
    cfg = cfg if cfg is not None else load_config(args.config, args.overrides)
    spec = OBJECTIVES[cfg.train.objective]
    env = read_env(args.local_rank)
    dims = ParallelDims(env.world_size, tp=cfg.parallel.tp, pp=cfg.parallel.pp, ep=cfg.parallel.ep)
    ds_name = args.ds_config or ("zero0" if torch.cuda.is_available() else "cpu")
    bf16_ok = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    ds_config = resolve_ds_config(load_ds_config(ds_name), cfg, dp_size=dims.dp, bf16_supported=bf16_ok)
    resume_from = _resume_target(cfg, args.resume, checksums=getattr(args, "verify_checksums", False),
                                 quiet=not env.is_main)
    vocab = None
    if cfg.hf.path is not None:  # the model directory first: its tokenizer is the data's
        causal_lm_config(cfg.hf.path, seq2seq=spec.encoder_decoder)
        if cfg.vocab.lexicon is not None or cfg.vocab.from_snapshot is not None:
            vocab = plan_vocab(cfg)  # the data are tokenized with the extended tokenizer
            cfg.data.tokenizer = str(vocab.tokenizer_dir)
    bundle = setup_data(cfg.data)
    if cfg.hf.path is not None and dims.ep > 1:
        raise ConfigError(f"parallel.ep={dims.ep} with hf.path={cfg.hf.path}: expert parallelism splits Tessera MoE "
                          f"models; import the HF model (tools/import_hf.py) and train it as model.init_from, or set "
                          f"parallel.ep=1.")
    hf = plan_hf(cfg, ds_config, dims, bundle.vocab_size, vocab) if cfg.hf.path is not None else None
    model_args = None if hf is not None else _native_model_args(cfg, dims, ds_config, bundle.vocab_size)
    research = None
    if cfg.research.recipe is not None:  # the recipe's options against the model's shape
        dim, n_layers = config_shape(hf.config) if hf is not None else (model_args.dim, model_args.n_layers)
        research = plan_research(cfg, dim=dim, n_layers=n_layers, vocab_size=bundle.vocab_size)
    if dims.pp > 1 and cfg.parallel.sequence_parallel:  # stages exchange sequence slices, not replicas
        ds_config.setdefault("pipeline", {}).update(pipe_partitioned=False, grad_partitioned=False)
    if resume_from is not None:
        _check_resume(cfg, resume_from, dims, hf=hf, model_args=model_args, bundle=bundle, research=research)
    train_ds, val_ds = _datasets(cfg, bundle, dims.dp, research)
    if cfg.train.objective == "dpo" and cfg.dpo.reference_from is not None:
        _check_reference(cfg, hf, model_args)
    if spec.sequence_head and hf is not None:  # an HF sequence-classification head
        hf = dataclasses.replace(hf, head_labels=head_outputs(cfg, train_ds))
    check_free_space(cfg.train.out_dir, checkpoint_bytes(model_args, hf), "one checkpoint")
    return Plan(cfg, env, dims, ds_config, bundle, model_args, resume_from, train_ds=train_ds, val_ds=val_ds, hf=hf,
                research=research)



def _check_resume(cfg: JobConfig, resume_from: Path, dims: ParallelDims, *, hf: HFPlan | None,
                  model_args: ModelArgs | None, bundle: DataBundle, research: ResearchPlan | None) -> None:
    """The checkpoint to resume was trained with this model, recipe, tokenizer and layout."""
    meta = read_meta(resume_from)
    _check_resume_layout(meta, resume_from, dims)
    check_research_resume(meta, cfg, research, resume_from)  # every base: recipe, options, term schedules
    if hf is not None:
        if meta.get("hf") != hf.identity or meta.get("config", {}).get("lora") != cfg.to_dict()["lora"]:
            raise ConfigError(f"--resume: the checkpoint {resume_from} was trained on {meta.get('hf')} with "
                              f"lora {meta.get('config', {}).get('lora')}; resume with that model and lora section.")
    elif ModelArgs(**(meta.get("model_args") or {})) != model_args:
        raise ConfigError(f"--resume: the checkpoint {resume_from} holds a different model "
                          f"({meta.get('model_args')}); resume with the recipe it was trained with.")
    if meta.get("tokenizer", {}).get("sha256") != bundle.tokenizer_id.get("sha256"):
        raise ConfigError(f"--resume: the checkpoint {resume_from} was trained with another tokenizer.")


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


def _native_model_args(cfg: JobConfig, dims: ParallelDims, ds_config: dict[str, Any], vocab_size: int) -> ModelArgs:
    """The Tessera model of the recipe, checked against the tokenizer and the parallel layout."""
    model_args = cfg.model_args(vocab_size=vocab_size)
    if model_args.vocab_size < vocab_size:
        raise ConfigError(f"model.vocab_size={model_args.vocab_size} is smaller than the tokenizer's "
                          f"{vocab_size}: remove the override or raise it.")
    dims.check_model(model_args, seq_len=cfg.data.seq_len, sequence_parallel=cfg.parallel.sequence_parallel)
    dims.check_pipeline(model_args, zero_stage=int(ds_config.get("zero_optimization", {}).get("stage", 0)),
                        grad_accum=int(ds_config["gradient_accumulation_steps"]))
    dims.check_experts(model_args, zero_stage=int(ds_config.get("zero_optimization", {}).get("stage", 0)))
    return model_args


def checkpoint_bytes(model_args: ModelArgs | None, hf: HFPlan | None) -> int:
    if hf is not None:
        return hf.trainable_estimate * CKPT_BYTES_PER_PARAM + 2**20
    assert model_args is not None
    return checkpoint_estimate(model_args)


def _check_resume_layout(meta: dict[str, Any], tag_dir: Path, dims: ParallelDims) -> None:
    """Any tp, pp, ep and DP size resume a ZeRO 1-3 checkpoint (train/checkpoint/reshard.py; an expert-parallel
    one is joined from every rank's files); a ZeRO-0 one keeps its tp and pp."""
    problem = reshard_refusal(tag_dir, meta, tp=dims.tp, pp=dims.pp)
    if problem is not None:
        raise ConfigError(problem)


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
