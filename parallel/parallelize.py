"""`parallelize`: the one place where a built model is transformed for the layout and its loss is chosen.

    par = parallelize(model, groups, parallel=cfg.parallel, perf=cfg.perf, seed=cfg.train.seed, device=device)
    par.module     # what DeepSpeed's engine wraps: the model, or the PipelineModule cut from it (pp > 1)
    par.loss_fn    # the loss it trains with (call the model with the loss's ``forward_kwargs``, if any)
    par.tp_ctx     # the TP group, this rank's place in it and its dropout generators

The steps, always in this order (as torchtitan's ``parallelize_llama``: apply_tp -> apply_ac ->
apply_compile), each logged as it is applied ("parallelize: ...") and all of them once more in one line at
the end:

1. tensor parallelism: `apply_tp` with the plan (the native one, or the HF Llama one on ``tp_root``), with
   sequence parallelism when asked and the plan has sequence-parallel norms; nothing at tp = 1;
1b. expert parallelism: `apply_ep` keeps each rank's E / ep experts of every MoE block and routes tokens by
   all-to-all; `register_expert_groups` gives DeepSpeed the expert groups (ep > 1; nothing at ep = 1);
2. activation checkpointing: `apply_activation_checkpointing`, rewinding the TP ranks' dropout generators;
3. kernels: `model.kernels.resolve_kernels` + `apply_kernels` (fused ops, and a head that computes the
   loss itself when the fused linear cross-entropy is on);
4. compile: `apply_compile`, torch.compile of each transformer block;
5. the loss: the head's own (fused linear cross-entropy), the vocabulary-parallel cross-entropy when the head
   is split over TP ranks, else `parallel.loss.lm_loss` on the logits;
6. ``wrap``: the caller's change to the model once its loss is known (train/: a sequence head instead of the
   LM head, a research recipe around the model);
7. pipeline: `build_pipeline` cuts the stages when pp > 1, the last one computing the loss.

Steps 2-4 need ``perf`` (a Tessera model); an HF model brings its own kernels and checkpointing. With no model
(a research recipe that builds its own in ``wrap``) steps 1-4 have nothing to do. Of the steps, only ``wrap``
draws random numbers (new modules' initial weights), after the model was built and before the pipeline.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Mapping
from typing import Protocol

import torch
from torch import nn

from model.kernels import KernelChoice, LinearCrossEntropyHead, resolve_kernels
from parallel.groups import ProcessGroups
from parallel.layers import TPContext
from parallel.loss import HeadLoss, LossFn, lm_loss
from parallel.moe import apply_ep, register_expert_groups
from parallel.perf import apply_activation_checkpointing, apply_compile, apply_kernels
from parallel.pipeline import build_pipeline
from parallel.tp import TRANSFORMER_TP_PLAN, apply_tp, tp_lm_loss

log = logging.getLogger("tessera")


class ParallelOptions(Protocol):
    """What parallelize reads of the ``parallel:`` section (`train.config.schema.ParallelSection`)."""

    @property
    def sequence_parallel(self) -> bool: ...
    @property
    def partition_method(self) -> str: ...
    @property
    def activation_checkpoint_interval(self) -> int: ...


class PerfOptions(Protocol):
    """What parallelize reads of the recipe's ``perf:`` section (`train.config.schema.PerfSection`)."""

    @property
    def fused_rms_norm(self) -> bool | None: ...  # None: fused where it can run, quietly
    @property
    def fused_swiglu(self) -> bool | None: ...  # None: fused where it can run, quietly
    @property
    def fused_rope(self) -> bool | None: ...  # None: fused where it can run, quietly
    @property
    def fused_linear_cross_entropy(self) -> bool: ...
    @property
    def activation_checkpointing(self) -> str: ...
    @property
    def ac_every(self) -> int: ...
    @property
    def compile(self) -> bool: ...


Wrap = Callable[[nn.Module | None, LossFn, TPContext], nn.Module]
"""(model after steps 1-5 or None, its loss, the TP context) -> the model the engine trains."""


@dataclasses.dataclass
class Parallelized:
    """A model transformed for the run's layout, with its loss."""

    model: nn.Module | None  # after every step but the pipeline cutting (what ``wrap`` returned, if given)
    module: nn.Module | None  # what the engine runs: ``model``, or the PipelineModule cut from it (pp > 1)
    tp_ctx: TPContext
    loss_fn: LossFn
    kernels: KernelChoice | None  # the kernels chosen (None without perf options)
    steps: list[str]  # what each step did, in order, as logged


def parallelize(
    model: nn.Module | None,
    groups: ProcessGroups,
    *,
    parallel: ParallelOptions,
    perf: PerfOptions | None = None,
    seed: int = 0,
    tp_plan: Mapping[str, str] = TRANSFORMER_TP_PLAN,
    tp_root: str = "",
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    doc_mask: bool = False,
    wrap: Wrap | None = None,
) -> Parallelized:
    """Apply TP/SP, activation checkpointing, kernels and compile to ``model`` in place, choose its loss, let
    ``wrap`` change it, and cut it into pipeline stages (see the module docstring for the order).

    groups: this rank's process groups (``groups.dims`` gives tp and pp). tp_plan / tp_root: the TP plan and
    the submodule its names start from ("" the model itself; "model" the HF model inside `CausalLM`).
    seed: the base seed of the TP ranks' dropout generators. device, dtype, doc_mask: what the kernels are
    chosen for (the activations' device and precision, packed-document attention).
    """
    dims = groups.dims
    steps: list[str] = []

    def done(text: str) -> None:
        log.info("parallelize: %s", text)
        steps.append(text)

    tp_ctx = TPContext(None, 1, 0, seed=seed)
    kernels = None
    if model is not None:
        tp_ctx = _tensor_parallel(model, groups, tp_plan, tp_root, parallel.sequence_parallel, seed, done)
        _expert_parallel(model, groups, done)
        if perf is None:
            done("activation checkpointing, kernels, compile: none (no perf options: the model's own)")
        else:
            kernels = _perf(model, perf, tp_ctx, torch.device(device), dtype, doc_mask, done)
    loss_fn, what = _choose_loss(model, tp_ctx)
    done(f"loss: {what}")
    if wrap is not None:
        model = wrap(model, loss_fn, tp_ctx)
        done(f"wrapped: {type(model).__name__}")
    module = model
    if dims.pp > 1:
        if model is None:
            raise ValueError("parallelize: pp > 1 needs a model to cut into stages")
        module = build_pipeline(model, dims, loss_fn=loss_fn, tp_ctx=tp_ctx,
                                partition_method=parallel.partition_method,
                                activation_checkpoint_interval=parallel.activation_checkpoint_interval)
        every = parallel.activation_checkpoint_interval
        done(f"pipeline: {dims.pp} stages cut by {parallel.partition_method}"
             + (f", activations recomputed every {every} pieces" if every else ""))
    else:
        done("pipeline: none (pp=1)")
    log.info("parallelize: %s", " -> ".join(steps))
    return Parallelized(model, module, tp_ctx, loss_fn, kernels, steps)


def _tensor_parallel(model: nn.Module, groups: ProcessGroups, plan: Mapping[str, str], root: str,
                     sequence_parallel: bool, seed: int, done: Callable[[str], None]) -> TPContext:
    """Step 1: the plan's layers swapped for tensor-parallel ones (tp > 1); the context they share."""
    tp = groups.dims.tp
    if tp == 1:
        done("tp=1")
        return TPContext(None, 1, 0, seed=seed)
    sp = sequence_parallel and "norm" in plan.values()
    if sequence_parallel and not sp:
        log.warning("parallel.sequence_parallel=true is not applied: this model's TP plan has no "
                    "sequence-parallel norms (HF models run tp without it)")
    ctx = apply_tp(model.get_submodule(root), groups.tp_group, plan=plan, sequence_parallel=sp, seed=seed)
    done(f"tp={tp}" + (" (sequence parallel)" if ctx.sequence_parallel else ""))
    return ctx


def _expert_parallel(model: nn.Module, groups: ProcessGroups, done: Callable[[str], None]) -> None:
    """Step 1b: each MoE block's experts split over the expert-parallel group (ep > 1)."""
    ep = groups.dims.ep
    if ep == 1:
        return
    n = apply_ep(model, groups)
    register_expert_groups(groups)
    done(f"ep={ep}: {n} MoE blocks keep experts of expert-parallel rank {groups.ep_rank}, tokens by all-to-all")


def _perf(model: nn.Module, perf: PerfOptions, tp_ctx: TPContext, device: torch.device, dtype: torch.dtype,
          doc_mask: bool, done: Callable[[str], None]) -> KernelChoice:
    """Steps 2-4: activation checkpointing, kernels, compile."""
    mode, every = perf.activation_checkpointing, perf.ac_every
    n = apply_activation_checkpointing(model, mode, every=every, tp_ctx=tp_ctx)
    what = "blocks" if mode == "full" else "attention modules"
    done(f"activation checkpointing: {mode}, {n} {what} recomputed in backward (every {every})" if n
         else "activation checkpointing: none")

    args = getattr(model, "args", None)
    attention = {"sinks": bool(getattr(args, "attn_sinks", False)),
                 "dropout": float(getattr(args, "dropout", 0.0)), "doc_mask": doc_mask,
                 "window": getattr(args, "sliding_window", None) is not None}
    choice = resolve_kernels(device, rms_norm=perf.fused_rms_norm, swiglu=perf.fused_swiglu,
                             rope=perf.fused_rope, linear_cross_entropy=perf.fused_linear_cross_entropy,
                             dtype=dtype, attention=attention)
    apply_kernels(model, choice)
    done(f"kernels: {choice.describe()}")

    if perf.compile:
        done(f"torch.compile: {apply_compile(model)} transformer blocks")
    else:
        done("torch.compile: off")
    return choice


def _choose_loss(model: nn.Module | None, tp_ctx: TPContext) -> tuple[LossFn, str]:
    """Step 5: the model's one loss, and how it is logged."""
    head = getattr(model, "lm_head", None)
    if isinstance(head, LinearCrossEntropyHead):
        return HeadLoss(head), "linear cross-entropy in the head (hidden states in, no logits)"
    if model is not None and tp_ctx.size > 1:
        return tp_lm_loss(model, tp_ctx), f"vocabulary-parallel cross-entropy over tp={tp_ctx.size}"
    return lm_loss, "cross-entropy on the logits"

