"""From a Plan to what the loop trains: the model (HF, native or a research recipe's own), transformed for the
layout and given its loss by `parallel.parallelize.parallelize` (TP, activation checkpointing, kernels,
compile, the loss, a sequence head or research recipe around the model, pipeline stages), DeepSpeed's engine
and the objective.

    built = build(plan, groups, device)     # collective: every rank builds its part
    built.engine, built.objective, built.loss_fn, built.tp_ctx, built.n_params
"""

from __future__ import annotations

import dataclasses
import logging
import subprocess
import uuid
from pathlib import Path
from typing import Any

import torch
from torch import nn

from model import Transformer
from model.heads import SequenceScorer
from model.model import build_model
from parallel.groups import ProcessGroups
from parallel.layers import TPContext
from parallel.parallelize import Wrap, parallelize
from parallel.tp import HF_LLAMA_TP_PLAN, TRANSFORMER_TP_PLAN
from train.checkpoint.writer import CheckpointWriter
from train.data.tokenizer import load_tokenizer
from train.export.native import load_start
from train.hf_setup import ADAPTER_DIR, build_hf, save_adapter
from train.loop.optim import build_optimizer, build_scheduler, param_groups
from train.objectives import OBJECTIVES, ObjectiveInputs, head_meta, head_outputs
from train.objectives.lm import LossFn, Objective
from train.plan import Plan, checkpoint_bytes
from train.research.api import Extension
from train.research.api import param_groups as research_param_groups
from train.research.run import build_research, place, research_objective

log = logging.getLogger("tessera")


@dataclasses.dataclass
class Built:
    """The model of a run, ready for the loop."""

    engine: Any  # DeepSpeed's engine around the module (a PipelineModule under pp > 1)
    model: nn.Module | None  # the model before pipeline cutting; the research extension when there is one
    ext: Extension | None  # the research recipe around the model
    tp_ctx: TPContext
    loss_fn: LossFn  # the language-model loss, chosen for the layout
    n_params: int  # parameters of the model (the trainable extension's, for a research recipe)
    objective: Objective | None = None  # what a step optimizes and an evaluation measures (make_objective)

    def generator_model(self) -> nn.Module:
        """The model that generates text: the engine's module, or the base a research recipe wraps."""
        return self.engine.module if self.ext is None else self.ext.base


def build(p: Plan, groups: ProcessGroups, device: torch.device) -> Built:
    """Build, transform and wrap the model of ``p`` in DeepSpeed's engine, then the objective."""
    import deepspeed

    cfg, t = p.cfg, p.cfg.train
    keep_alive = None  # ZeRO-3 loading of an HF model: transformers reads the DeepSpeed config through it
    model: nn.Module | None
    if p.hf is not None:
        model, keep_alive = build_hf(p.hf, cfg, p.ds_config, device)
        n_params = p.hf.n_params
    elif p.research is not None and not p.research.cls.needs_base:  # a recipe that is its own model
        model, n_params = None, 0
    else:
        model, n_params = _native_model(p, device)
    bf16 = bool(p.ds_config.get("bf16", {}).get("enabled"))
    # TP (an HF model: by the native plan, on its inner model), then for a Tessera model activation
    # checkpointing, kernels and compile, the loss, `_wrap`, and the pipeline stages (pp > 1; each stage keeps
    # its pieces, DeepSpeed's grid, in the same rank order, is the mpu)
    hf = p.hf is not None
    par = parallelize(model, groups, parallel=cfg.parallel, perf=None if hf else cfg.perf, seed=t.seed,
                      tp_plan=HF_LLAMA_TP_PLAN if hf else TRANSFORMER_TP_PLAN, tp_root="model" if hf else "",
                      device=device, dtype=torch.bfloat16 if bf16 else torch.float32,
                      doc_mask=cfg.data.doc_mask, wrap=_wrap(p, device))
    model, module, ext = par.model, par.module, None
    if p.research is not None:  # the recipe's modules around the model (frozen base), by `_wrap`
        ext = model
        n_params = sum(x.numel() for x in ext.parameters())
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
    return Built(engine, model, ext, par.tp_ctx, par.loss_fn, n_params)


def _wrap(p: Plan, device: torch.device) -> Wrap | None:
    """What `parallelize` hands the model to once its loss is chosen: a Tessera model's LM head replaced by a
    sequence head (sequence objectives), then the research recipe's modules around it (None: nothing to
    add)."""
    cfg = p.cfg
    sequence_head = p.hf is None and OBJECTIVES[cfg.train.objective].sequence_head
    if not sequence_head and p.research is None:
        return None

    def wrap(model: nn.Module | None, loss_fn: LossFn, tp_ctx: TPContext) -> nn.Module:
        if sequence_head and model is not None:
            tok = load_tokenizer(p.bundle.tokenizer_dir)  # the pad (else eos) id, as the export records it
            pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
            model = SequenceScorer.native(model, head_outputs(cfg, p.train_ds), pad_id=pad)
        if p.research is not None:
            model = build_research(p.research, cfg, model, loss_fn=loss_fn, tp_ctx=tp_ctx, device=device,
                                   rank=p.env.rank, vocab_size=p.bundle.vocab_size,
                                   tokenizer_dir=p.bundle.tokenizer_dir, val_data=p.val_ds)
        assert model is not None, "only a research recipe comes without a model, and it builds its own"
        return model

    return wrap


def make_objective(p: Plan, built: Built, device: torch.device) -> Objective:
    """The research recipe's objective, or ``train.objective``'s from the table (after a resume has loaded the
    engine: DPO's reference may be computed from it)."""
    t = p.cfg.train
    if built.ext is not None:
        return research_objective(p.research, p.cfg, built.ext, out_dir=Path(t.out_dir), rank=p.env.rank,
                                  tp_ctx=built.tp_ctx)
    return OBJECTIVES[t.objective].make(ObjectiveInputs(
        cfg=p.cfg, engine=built.engine, loss_fn=built.loss_fn, train_ds=p.train_ds,
        tokenizer_dir=p.bundle.tokenizer_dir, ds_config=p.ds_config, device=device, rank=p.env.rank,
        resuming=p.resume_from is not None, adapters=p.hf is not None and p.hf.adapters,
        fresh_model=lambda: _fresh_model(p, device)))


def _fresh_model(p: Plan, device: torch.device) -> nn.Module:
    """The policy's starting point built again: DPO's reference (dpo.reference_from: another checkpoint of the
    same architecture, checked when planning). Built with the random state forked, so the run's own random
    streams (restored by a resume) go on as if it had not been built."""
    source = p.cfg.dpo.reference_from
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        if p.hf is not None:
            plan = dataclasses.replace(p.hf, lora_targets=[], path=Path(source) if source else p.hf.path)
            return build_hf(plan, p.cfg, p.ds_config, device)[0]
        model = _native_model(p, device)[0]  # DPO runs at tp = pp = 1: nothing to split
    if source:
        model.load_state_dict(load_start(source, max_seq_len=model.args.max_seq_len)[1])
    return model


def run_meta(p: Plan, built: Built) -> dict[str, Any]:
    """What every checkpoint of the run records about it (tessera.json)."""
    cfg = p.cfg
    return {
        "run_id": uuid.uuid4().hex[:12],
        "config": cfg.to_dict(),
        "model_args": dataclasses.asdict(p.model_args) if p.model_args is not None else None,
        "hf": p.hf.identity if p.hf is not None else None,
        "head": head_meta(cfg, built.model, p.train_ds),
        "research": {"recipe": cfg.research.recipe, "options": cfg.research.options} if built.ext else None,
        "tokenizer": p.bundle.tokenizer_id,
        "tokenizer_dir": str(p.bundle.tokenizer_dir),
        "prepared_dir": str(p.bundle.prepared_dir),
        "code_version": _code_version(),
    }


def _native_model(p: Plan, device: torch.device) -> tuple[Transformer, int]:
    """Build and initialise (or load) the whole Tessera model, and count its parameters.

    `parallelize` splits it afterwards: every tp and pp starts from the same weights. With tp or pp > 1 the
    whole model lives on the host until each rank keeps its part.
    """
    cfg, t = p.cfg, p.cfg.train
    assert p.model_args is not None
    split = p.dims.tp * p.dims.pp > 1
    model = build_model(p.model_args, torch.device("cpu") if split else device, t.seed)
    n_params = sum(x.numel() for x in model.parameters())
    frozen = p.research is not None and cfg.research.freeze_base  # a frozen base is not in the checkpoints
    if cfg.model.init_from is not None and (p.resume_from is None or frozen):  # every rank, then TP / ZeRO
        _, weights = load_start(cfg.model.init_from, max_seq_len=p.model_args.max_seq_len)  # HF or Tessera
        model.load_state_dict(weights)
        log.info("weights loaded from %s", cfg.model.init_from)
    return model, n_params


def checkpoint_writer(p: Plan, built: Built) -> CheckpointWriter:
    """The run's checkpoint writer; with LoRA adapters every checkpoint also holds them in PEFT's format."""
    extra = None
    if p.hf is not None and p.hf.adapters:
        def extra(tag_dir: Path) -> None:
            save_adapter(built.generator_model(), tag_dir / ADAPTER_DIR, rank=p.env.rank,
                         tokenizer_dir=p.bundle.tokenizer_dir)
    return CheckpointWriter(Path(p.cfg.train.out_dir), rank=p.env.rank, keep_last=p.cfg.train.keep_last,
                            estimate_bytes=checkpoint_bytes(p.model_args, p.hf), extra=extra,
                            tp_ctx=built.tp_ctx, async_save=p.cfg.train.async_save)


def _code_version() -> str:
    """The git commit of the code that trains (``unknown`` outside a git checkout)."""
    try:
        root = Path(__file__).resolve().parents[1]
        return subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, timeout=5, check=False).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"
