"""Fused kernels and their pure-torch references, chosen once at start-up.

Four ops have a fused version from liger-kernel (Triton, CUDA only) and a reference used everywhere else:

| op | reference (definition of record) | fused (CUDA + liger-kernel) |
|---|---|---|
| RMSNorm | `model.ops.rms_norm` | `liger_rms_norm` (Llama casting: the inverse RMS in fp32) |
| SwiGLU | `model.ops.swiglu` | `liger_swiglu` |
| RoPE | `model.ops.apply_rope` | `liger_apply_rope` (same HF `rotate_half` convention) |
| head + cross-entropy | `linear_cross_entropy` (full logits) | `liger_linear_cross_entropy` (chunked: the (B, T, V) logits never exist) |

liger-kernel imports on a CPU-only machine, but its kernels fail on CPU tensors, so a fused op is chosen
only when the run's device is CUDA and liger-kernel is installed; otherwise the reference is used, quietly
unless the recipe asked for the fused op (a switch set to true), when the fallback is logged. `resolve_kernels` makes that choice once and logs one line; `parallel.perf.apply_kernels`
puts the chosen functions into the model's modules (`norm_fn`, `act_fn`, `rope_fn`, and the head).
"""

from __future__ import annotations

import functools
import importlib.util
import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from model.attention import describe_attention
from model.ops import apply_rope, rms_norm, swiglu

logger = logging.getLogger("tessera")

REFERENCE, LIGER = "reference", "liger"


@functools.cache
def liger_installed() -> bool:
    """True when liger-kernel (and so triton) can be imported."""
    return importlib.util.find_spec("liger_kernel") is not None


def liger_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """`rms_norm` as one Triton kernel: x (..., D), weight (D,) -> (..., D)."""
    from liger_kernel.transformers.functional import liger_rms_norm as _rms_norm

    # in_place=False: the incoming gradient is not overwritten (the residual stream may still need it)
    return _rms_norm(x, weight, eps, offset=0.0, casting_mode="llama", in_place=False)


def liger_swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """`swiglu` as one Triton kernel: silu(gate) * up, both (..., F)."""
    from liger_kernel.transformers.functional import liger_swiglu as _swiglu

    return _swiglu(gate, up)


def liger_apply_rope(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, position_ids: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """`apply_rope` as one Triton kernel; same arguments (q: (B, T, Hq, D), k: (B, T, Hkv, D))."""
    from liger_kernel.transformers.functional import liger_rope

    cos = cos[position_ids].to(q.dtype)  # (T, D) or (B, T, D)
    sin = sin[position_ids].to(q.dtype)
    # liger takes the (B, H, T, D) views of the (B, T, H, D) tensors it works on
    q_rot, k_rot = liger_rope(q.transpose(1, 2), k.transpose(1, 2), cos, sin)
    return q_rot.transpose(1, 2), k_rot.transpose(1, 2)  # (B, T, Hq, D), (B, T, Hkv, D)


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Reference: mean cross-entropy of the logits ``hidden @ weight.T`` (in fp32) over labels != -100.

    hidden: (B, T, dim), weight: (V, dim), labels: (B, T). Materialises the (B, T, V) logits.
    """
    logits = F.linear(hidden, weight).float()  # (B, T, V)
    return F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100)


def liger_linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """`linear_cross_entropy` in chunks of tokens: the logits of one chunk exist at a time (fp32 accumulation)."""
    from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

    return liger_fused_linear_cross_entropy(hidden.flatten(0, 1), weight, labels.flatten(), ignore_index=-100,
                                            reduction="mean", accum_dtype=torch.float32)


class LinearCrossEntropyHead(nn.Linear):
    """The output head, able to return the loss instead of the logits (same parameter: ``lm_head.weight``).

    ``head(h)`` gives float32 logits as `nn.Linear` would; ``head(h, labels)`` gives the mean cross-entropy
    through ``loss_fn(h, weight, labels)`` (fused or reference). The loss is computed inside this module's own
    forward, so wrappers that act per module (ZeRO-3 gathering the weight) see the weight used there.
    """

    loss_fn: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]

    @classmethod
    def from_linear(cls, linear: nn.Linear, loss_fn: Callable[..., torch.Tensor]) -> LinearCrossEntropyHead:
        """A head sharing ``linear``'s parameters (a tied weight stays tied)."""
        if linear.bias is not None:
            raise ValueError("LinearCrossEntropyHead: the output head has a bias; the fused loss takes none")
        head = cls.__new__(cls)
        nn.Module.__init__(head)
        head.in_features, head.out_features = linear.in_features, linear.out_features
        head.weight = linear.weight
        head.register_parameter("bias", None)
        head.loss_fn = loss_fn
        return head

    def forward(self, h: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        if labels is None:
            return F.linear(h, self.weight)  # (B, T, V)
        return self.loss_fn(h, self.weight, labels)  # scalar


@dataclass(frozen=True)
class KernelChoice:
    """What each op runs ("liger" or "reference"); ``linear_cross_entropy`` None keeps logits + `lm_loss`."""

    rms_norm: str = REFERENCE
    swiglu: str = REFERENCE
    rope: str = REFERENCE
    linear_cross_entropy: str | None = None
    attention: str = "sdpa"

    def rms_norm_fn(self) -> Callable[..., torch.Tensor]:
        return liger_rms_norm if self.rms_norm == LIGER else rms_norm

    def swiglu_fn(self) -> Callable[..., torch.Tensor]:
        return liger_swiglu if self.swiglu == LIGER else swiglu

    def rope_fn(self) -> Callable[..., tuple[torch.Tensor, torch.Tensor]]:
        return liger_apply_rope if self.rope == LIGER else apply_rope

    def linear_cross_entropy_fn(self) -> Callable[..., torch.Tensor]:
        return liger_linear_cross_entropy if self.linear_cross_entropy == LIGER else linear_cross_entropy

    def describe(self) -> str:
        ce = "off (logits + cross-entropy)" if self.linear_cross_entropy is None else self.linear_cross_entropy
        return (f"attention={self.attention}, rms_norm={self.rms_norm}, swiglu={self.swiglu}, rope={self.rope}, "
                f"linear_cross_entropy={ce}")


def resolve_kernels(
    device: torch.device,
    *,
    rms_norm: bool | None = None,
    swiglu: bool | None = None,
    rope: bool | None = None,
    linear_cross_entropy: bool = False,
    dtype: torch.dtype = torch.float32,
    attention: dict[str, object] | None = None,
) -> KernelChoice:
    """Choose each op for ``device`` from the switches; log the choice once.

    None (the default): the fused op where it can run (CUDA with liger-kernel installed), else the reference,
    quietly (a debug line). True: the fused op was asked for; where it cannot run, the reference runs and the
    log says why. False: the reference. ``attention``: keyword arguments of `describe_attention`.
    """
    fused_ok = device.type == "cuda" and liger_installed()
    why = None if fused_ok else ("liger-kernel needs a CUDA device" if device.type != "cuda"
                                 else "liger-kernel is not installed (pip install liger-kernel)")
    wanted = {"rms_norm": rms_norm, "swiglu": swiglu, "rope": rope, "linear_cross_entropy": linear_cross_entropy}
    chosen = {op: (LIGER if on is not False and fused_ok else REFERENCE) for op, on in wanted.items()}
    asked = [op for op, on in wanted.items() if on is True and not fused_ok]
    defaulted = [op for op, on in wanted.items() if on is None and not fused_ok]
    choice = KernelChoice(
        rms_norm=chosen["rms_norm"], swiglu=chosen["swiglu"], rope=chosen["rope"],
        linear_cross_entropy=chosen["linear_cross_entropy"] if linear_cross_entropy else None,
        attention=describe_attention(device, dtype, **(attention or {})),
    )
    logger.info("kernels: %s", choice.describe())
    if asked:
        logger.info("fused %s requested but %s: using the pure-torch reference", ", ".join(asked), why)
    if defaulted:
        logger.debug("fused %s where available: %s, so the pure-torch reference", ", ".join(defaulted), why)
    return choice
