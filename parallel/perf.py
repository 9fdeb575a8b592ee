"""Speed and memory transformations of the (possibly tensor-parallel) model, applied after `apply_tp`.
`parallel.parallelize.parallelize` applies them in this order, each logged once:

1. `apply_activation_checkpointing`: ``full`` recomputes whole transformer blocks in backward, ``selective``
   only their attention (projections, RoPE, attention, output projection); ``every=k`` takes blocks
   0, k, 2k, ... only. Blocks keep their parameter names (the forward is wrapped, not the module), so
   checkpoints, ZeRO and the TP plan see the same model. Recomputation redraws the dropout masks of the first
   pass: torch restores the default generators, and the TP context's own per-rank generators (used for
   dropout on split heads or sequence slices) are rewound here.
2. `apply_kernels`: the fused ops `model.kernels.resolve_kernels` chose (liger-kernel on CUDA, references
   elsewhere), and the output head that computes the loss itself when the fused linear cross-entropy is on.
3. `apply_compile`: `torch.compile` of each transformer block, in place (names unchanged).

Pipeline parallelism composes: `build_pipeline` wraps the same block objects afterwards.
"""

from __future__ import annotations

import contextlib
import types
from typing import Any, Literal, get_args

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from model.kernels import KernelChoice, LinearCrossEntropyHead
from parallel.layers import TPContext

# What activation checkpointing recomputes; the recipe's perf.activation_checkpointing takes this type.
ACMode = Literal["none", "full", "selective"]
AC_MODES: tuple[ACMode, ...] = get_args(ACMode)


class PerfConfigError(ValueError):
    """Settings that cannot work together; the message names the setting and the fix."""


def _blocks(model: nn.Module) -> nn.ModuleList:
    layers = getattr(model, "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise PerfConfigError(f"{type(model).__name__} has no `layers` list of transformer blocks to transform")
    return layers


def _checkpointed_forward(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
    """The module's own forward, its activations recomputed in backward (bound to the module as ``forward``)."""
    inner = type(self).forward.__get__(self)
    if not torch.is_grad_enabled():  # evaluation and generation (KV caches must not be updated twice)
        return inner(*args, **kwargs)
    ctx: TPContext | None = self._ac_tp_ctx
    if ctx is None:  # the default generators are saved and restored by torch itself (preserve_rng_state)
        return checkpoint(inner, *args, use_reentrant=False, **kwargs)

    def context_fn() -> tuple[Any, Any]:  # called as the first pass starts: remember the generators there
        return contextlib.nullcontext(), ctx.replay_rng(ctx.rng_state())

    return checkpoint(inner, *args, use_reentrant=False, context_fn=context_fn, **kwargs)


def _checkpoint_module(module: nn.Module, tp_ctx: TPContext | None) -> None:
    module._ac_tp_ctx = tp_ctx  # None when nothing draws from a per-rank generator
    module.forward = types.MethodType(_checkpointed_forward, module)  # a bound method: deepcopy rebinds it


def apply_activation_checkpointing(model: nn.Module, mode: str = "full", *, every: int = 1,
                                   tp_ctx: TPContext | None = None) -> int:
    """Recompute activations in backward (``full`` blocks or ``selective``: attention) of every ``every``-th
    block, in place; returns how many modules were wrapped."""
    if mode not in AC_MODES:
        raise PerfConfigError(f"activation checkpointing mode {mode!r}: use one of {', '.join(AC_MODES)}")
    if every < 1:
        raise PerfConfigError(f"activation checkpointing every={every}: must be >= 1 (1: every block)")
    if mode == "none":
        return 0
    dropout = float(getattr(getattr(model, "args", None), "dropout", 1.0))  # unknown models: assume dropout
    if tp_ctx is not None and (tp_ctx.size == 1 or dropout == 0.0):
        tp_ctx = None  # no mask is drawn from the per-rank generators: nothing to rewind
    wrapped = 0
    for i, block in enumerate(_blocks(model)):
        if i % every:
            continue
        target = block if mode == "full" else block.self_attn
        if "forward" in vars(target):
            raise PerfConfigError(f"block {i} is already checkpointed: apply activation checkpointing once")
        _checkpoint_module(target, tp_ctx)
        wrapped += 1
    return wrapped


def apply_kernels(model: nn.Module, choice: KernelChoice) -> None:
    """Put the chosen ops into every module that has a slot for them, and the loss-computing head if asked."""
    for module in model.modules():
        if hasattr(module, "norm_fn"):
            module.norm_fn = choice.rms_norm_fn()
        if hasattr(module, "act_fn"):
            module.act_fn = choice.swiglu_fn()
        if hasattr(module, "rope_fn"):
            module.rope_fn = choice.rope_fn()
    if choice.linear_cross_entropy is None:
        return
    head = getattr(model, "lm_head", None)
    if type(head) is not nn.Linear:  # a vocabulary-parallel head (TP), no head (a pipeline stage), or done
        raise PerfConfigError(
            f"the fused linear cross-entropy needs the model's whole output head (an nn.Linear), found "
            f"{type(head).__name__}: it cannot run with tensor or pipeline parallelism; set "
            f"perf.fused_linear_cross_entropy=false"
        )
    model.lm_head = LinearCrossEntropyHead.from_linear(head, choice.linear_cross_entropy_fn())


def apply_compile(model: nn.Module) -> int:
    """`torch.compile` each transformer block in place (parameter names unchanged); returns the count."""
    blocks = _blocks(model)
    if any(getattr(m, "_ac_tp_ctx", None) is not None for m in model.modules()):
        raise PerfConfigError(
            "torch.compile cannot trace activation checkpointing that rewinds a tensor-parallel rank's dropout "
            "stream (tp > 1 with dropout > 0): set perf.compile=false, perf.activation_checkpointing=none or "
            "model.dropout=0"
        )
    for block in blocks:
        block.compile()
    return len(blocks)
