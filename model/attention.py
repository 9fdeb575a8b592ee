"""The single attention entry point of Tessera.

`attention(q, k, v)` takes (B, T, H, D) tensors and picks a backend:

- ``flash_attn``: the flash-attn package, when it is importable, the tensors are fp16/bf16 on CUDA and
  there are no sinks;
- ``sdpa``: `torch.nn.functional.scaled_dot_product_attention`, which itself chooses a kernel
  (flash / cuDNN / memory-efficient on GPU, math on CPU);
- ``eager_sinks``: an explicit softmax, for attention sinks (a learned per-head logit that joins the
  softmax denominator but carries no value, as in gpt-oss), which neither of the above expresses.

With ``doc_ids`` (B, T) (packed documents), a query only sees keys of its own document: a block-diagonal
causal mask on SDPA / eager, flash-attn's variable-length kernel on CUDA (``flash_attn_varlen``).
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


def _import_flash_attn_varlen() -> Callable[..., torch.Tensor] | None:
    """flash_attn.flash_attn_varlen_func when the package is installed, else None."""
    try:
        from flash_attn import flash_attn_varlen_func
    except ImportError:
        return None
    return flash_attn_varlen_func


# Resolved at import, so that torch.compile sees a constant.
_FLASH_ATTN_FUNC = _import_flash_attn()
_FLASH_ATTN_VARLEN_FUNC = _import_flash_attn_varlen()


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
    doc_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """Scaled dot-product attention with GQA, bottom-right causal masking and optional sinks.

    q: (B, T, Hq, D); k, v: (B, S, Hkv, D) with Hq a multiple of Hkv and T <= S;
    sinks: (Hq,) sink logits or None; dropout_p: dropout on the attention probabilities
    (pass 0.0 in eval); scale: defaults to 1/sqrt(D); doc_ids: (B, T) document number of each token
    (no KV cache: T == S), attention stays inside a document. Returns (B, T, Hq, D).
    """
    _, T, Hq, D = q.shape  # (B, T, Hq, D)
    S, Hkv = k.shape[1], k.shape[2]
    if Hq % Hkv:
        raise ValueError(f"query heads ({Hq}) must be a multiple of key/value heads ({Hkv})")
    if causal and T > S:
        raise ValueError(f"causal attention with more queries ({T}) than keys ({S}): cache the new keys too")
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    if doc_ids is not None and T != S:
        raise ValueError(f"doc_ids needs as many queries as keys (got {T} and {S}): no KV cache with doc masking")

    if _FLASH_ATTN_FUNC is not None and sinks is None and q.is_cuda and q.dtype in _FLASH_DTYPES:
        if doc_ids is not None and _FLASH_ATTN_VARLEN_FUNC is not None:
            _log_backend("flash_attn_varlen")
            return _flash_varlen(q, k, v, doc_ids, causal=causal, dropout_p=dropout_p, scale=scale)
        if doc_ids is not None:
            raise RuntimeError("flash_attn without flash_attn_varlen_func cannot mask documents; update flash-attn")
        _log_backend("flash_attn")
        return _FLASH_ATTN_FUNC(q, k, v, dropout_p=dropout_p, softmax_scale=scale, causal=causal)

    q = q.transpose(1, 2)  # (B, Hq, T, D)
    k = _repeat_kv(k, Hq // Hkv).transpose(1, 2)  # (B, Hq, S, D)
    v = _repeat_kv(v, Hq // Hkv).transpose(1, 2)  # (B, Hq, S, D)
    mask = _causal_mask(T, S, q.device) if causal and T != S else None  # (T, S) or None
    if doc_ids is not None:
        mask = doc_ids[:, None, :, None] == doc_ids[:, None, None, :]  # (B, 1, T, S): same document
        if causal:
            mask = mask & _causal_mask(T, S, q.device)

    if sinks is None:
        _log_backend("sdpa")
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=dropout_p, is_causal=causal and T == S and mask is None, scale=scale
        )
    else:
        _log_backend("eager_sinks")
        out = _attention_with_sinks(q, k, v, sinks, causal=causal, dropout_p=dropout_p, scale=scale,
                                    mask=mask if doc_ids is not None else None)
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
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Softmax attention where each head's sink logit joins the denominator.

    q: (B, H, T, D), k/v: (B, H, S, D), sinks: (H,), mask: (B, 1, T, S) bool replacing the causal
    mask (True: may attend) or None -> (B, H, T, D).
    """
    B, H, T, _ = q.shape
    S = k.shape[2]
    scores = (q @ k.transpose(-2, -1)).float() * scale  # (B, H, T, S)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    elif causal:
        scores = scores.masked_fill(~_causal_mask(T, S, q.device), float("-inf"))
    sink = sinks.float().view(1, H, 1, 1).expand(B, H, T, 1)  # (B, H, T, 1)
    probs = torch.softmax(torch.cat((scores, sink), dim=-1), dim=-1)[..., :S]  # (B, H, T, S)
    probs = F.dropout(probs, p=dropout_p)
    return probs.to(v.dtype) @ v


def varlen_segments(doc_ids: torch.Tensor) -> tuple[torch.Tensor, int]:
    """The runs of equal ids in each row of doc_ids (B, T), flattened over the batch.

    Returns cu_seqlens (n_runs + 1,) int32, the start of every run in the flattened (B*T,) tokens and
    then B*T, and the longest run's length: the layout flash-attn's variable-length kernel takes.
    """
    B, T = doc_ids.shape
    new = torch.ones((B, T), dtype=torch.bool, device=doc_ids.device)
    new[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]  # a run starts at every row start and id change
    starts = new.flatten().nonzero().flatten()
    end = torch.tensor([B * T], dtype=starts.dtype, device=doc_ids.device)
    cu_seqlens = torch.cat((starts, end)).to(torch.int32)
    return cu_seqlens, int((cu_seqlens[1:] - cu_seqlens[:-1]).max().item())


def _flash_varlen(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    doc_ids: torch.Tensor,
    *,
    causal: bool,
    dropout_p: float,
    scale: float,
) -> torch.Tensor:
    """flash-attn over each document separately: q (B, T, Hq, D), k/v (B, T, Hkv, D) -> (B, T, Hq, D)."""
    B, T, Hq, D = q.shape
    cu_seqlens, max_len = varlen_segments(doc_ids)
    out = _FLASH_ATTN_VARLEN_FUNC(  # type: ignore[misc]
        q.reshape(B * T, Hq, D), k.reshape(B * T, k.shape[2], D), v.reshape(B * T, v.shape[2], D),
        cu_seqlens, cu_seqlens, max_len, max_len, dropout_p=dropout_p, softmax_scale=scale, causal=causal,
    )  # (B*T, Hq, D)
    return out.view(B, T, Hq, D)
