"""The single attention entry point of Tessera.

`attention(q, k, v)` takes (B, T, H, D) tensors and picks a backend:

- ``flash_attn``: the flash-attn package, when it is importable, the tensors are fp16/bf16 on CUDA and
  there are no sinks;
- ``sdpa``: `torch.nn.functional.scaled_dot_product_attention`, which itself chooses a kernel
  (flash / cuDNN / memory-efficient on GPU, math on CPU);
- ``eager_sinks``: an explicit softmax, for attention sinks (a learned per-head logit that joins the
  softmax denominator but carries no value, as in gpt-oss), which neither of the above expresses.

Each backend is logged once, the first time it is used. Grouped-query attention (fewer key/value heads
than query heads) is handled here. With a KV cache the T queries are the *last* T of the S keys, so
the causal mask is aligned bottom-right: query i sees keys 0..S-T+i.
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

logger = logging.getLogger("tessera")

_FLASH_DTYPES = (torch.float16, torch.bfloat16)


def _import_flash_attn() -> Callable[..., torch.Tensor] | None:
    """flash_attn.flash_attn_func when the package is installed, else None."""
    try:
        from flash_attn import flash_attn_func
    except ImportError:
        return None
    return flash_attn_func


# Resolved at import, so that torch.compile sees a constant.
_FLASH_ATTN_FUNC = _import_flash_attn()


@functools.cache
def _log_first_use(backend: str) -> None:
    """Log a backend's name (cached, so each backend is logged once per process)."""
    logger.info("attention backend: %s", backend)


def _log_backend(backend: str) -> None:
    """Log the backend the first time it runs; silent while torch.compile traces (logging breaks graphs)."""
    if not torch.compiler.is_compiling():
        _log_first_use(backend)


def _causal_mask(t: int, s: int, device: torch.device) -> torch.Tensor:
    """Bottom-right aligned causal mask (T, S): True where query i may see key j, i.e. j <= S - T + i."""
    return torch.ones(t, s, dtype=torch.bool, device=device).tril(diagonal=s - t)


def _repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """(B, S, Hkv, D) -> (B, S, Hkv * n_rep, D): kv head j serves query heads j*n_rep .. (j+1)*n_rep - 1."""
    return x if n_rep == 1 else x.repeat_interleave(n_rep, dim=2)


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = True,
    sinks: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    scale: float | None = None,
) -> torch.Tensor:
    """Scaled dot-product attention with GQA, bottom-right causal masking and optional sinks.

    q: (B, T, Hq, D); k, v: (B, S, Hkv, D) with Hq a multiple of Hkv and T <= S;
    sinks: (Hq,) sink logits or None; dropout_p: dropout on the attention probabilities
    (pass 0.0 in eval); scale: defaults to 1/sqrt(D). Returns (B, T, Hq, D).
    """
    _, T, Hq, D = q.shape  # (B, T, Hq, D)
    S, Hkv = k.shape[1], k.shape[2]
    if Hq % Hkv:
        raise ValueError(f"query heads ({Hq}) must be a multiple of key/value heads ({Hkv})")
    if causal and T > S:
        raise ValueError(f"causal attention with more queries ({T}) than keys ({S}): cache the new keys too")
    scale = 1.0 / math.sqrt(D) if scale is None else scale

    if _FLASH_ATTN_FUNC is not None and sinks is None and q.is_cuda and q.dtype in _FLASH_DTYPES:
        _log_backend("flash_attn")
        return _FLASH_ATTN_FUNC(q, k, v, dropout_p=dropout_p, softmax_scale=scale, causal=causal)

    q = q.transpose(1, 2)  # (B, Hq, T, D)
    k = _repeat_kv(k, Hq // Hkv).transpose(1, 2)  # (B, Hq, S, D)
    v = _repeat_kv(v, Hq // Hkv).transpose(1, 2)  # (B, Hq, S, D)
    mask = _causal_mask(T, S, q.device) if causal and T != S else None  # (T, S) or None

    if sinks is None:
        _log_backend("sdpa")
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=dropout_p, is_causal=causal and T == S, scale=scale
        )
    else:
        _log_backend("eager_sinks")
        out = _attention_with_sinks(q, k, v, sinks, causal=causal, dropout_p=dropout_p, scale=scale)
    return out.transpose(1, 2)  # (B, T, Hq, D)


def _attention_with_sinks(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    sinks: torch.Tensor,
    *,
    causal: bool,
    dropout_p: float,
    scale: float,
) -> torch.Tensor:
    """Softmax attention where each head's sink logit joins the denominator.

    q: (B, H, T, D), k/v: (B, H, S, D), sinks: (H,) -> (B, H, T, D).
    """
    B, H, T, _ = q.shape
    S = k.shape[2]
    scores = (q @ k.transpose(-2, -1)).float() * scale  # (B, H, T, S)
    if causal:
        scores = scores.masked_fill(~_causal_mask(T, S, q.device), float("-inf"))
    sink = sinks.float().view(1, H, 1, 1).expand(B, H, T, 1)  # (B, H, T, 1)
    probs = torch.softmax(torch.cat((scores, sink), dim=-1), dim=-1)[..., :S]  # (B, H, T, S)
    probs = F.dropout(probs, p=dropout_p)
    return probs.to(v.dtype) @ v
