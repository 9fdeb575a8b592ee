"""The single attention entry point of Tessera.

`attention(q, k, v)` takes (B, T, H, D) tensors and picks a backend:

- ``flash_attn3``: FlashAttention-3 for Hopper (the ``flash_attn_interface`` module of flash-attention's
  ``hopper/`` build), when it is importable, the device is compute capability 9.x, the tensors are
  fp16/bf16, there are no sinks and no attention dropout (FA3 has none);
- ``flash_attn``: the flash-attn 2 package, when it is importable, the tensors are fp16/bf16 on CUDA and
  there are no sinks;
- ``sdpa``: `torch.nn.functional.scaled_dot_product_attention`, which itself chooses a kernel
  (flash / cuDNN / memory-efficient on GPU, math on CPU);
- ``eager_sinks``: an explicit softmax, for attention sinks (a learned per-head logit that joins the
  softmax denominator but carries no value, as in gpt-oss), which neither of the above expresses.

With ``doc_ids`` (B, T) (packed documents), a query only sees keys of its own document: a block-diagonal
causal mask on SDPA / eager, flash-attn's variable-length kernel on CUDA (``flash_attn_varlen``,
``flash_attn3_varlen``). `describe_attention` names the backend a device and dtype will get (logged once at
start-up by `parallel.parallelize.parallelize`); each backend is also logged once, the first time it runs. Grouped-query attention (fewer key/value heads
than query heads) is handled here. With a KV cache the T queries are the *last* T of the S keys, so
the causal mask is aligned bottom-right: query i sees keys 0..S-T+i. With ``window`` W (sliding-window attention,
Mistral / Qwen2) it sees only the last W of those, keys S-T+i-W+1..S-T+i: an explicit mask on SDPA and the sinks
softmax, flash-attn's ``window_size=(W - 1, 0)`` on CUDA; a window of at least S keys binds nothing and is dropped.
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

logger = logging.getLogger("tessera")

_FLASH_DTYPES = (torch.float16, torch.bfloat16)
_SDPA_GQA = tuple(int(part) for part in torch.__version__.split(".")[:2]) >= (2, 5)  # enable_gqa=True exists


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


def _import_flash_attn3() -> tuple[Callable[..., Any] | None, Callable[..., Any] | None]:
    """(flash_attn_func, flash_attn_varlen_func) of FlashAttention-3 (``flash_attn_interface``), or Nones."""
    try:
        from flash_attn_interface import flash_attn_func, flash_attn_varlen_func
    except ImportError:
        return None, None
    return flash_attn_func, flash_attn_varlen_func


# Resolved at import, so that torch.compile sees a constant.
_FLASH_ATTN_FUNC = _import_flash_attn()
_FLASH_ATTN_VARLEN_FUNC = _import_flash_attn_varlen()
_FLASH_ATTN3_FUNC, _FLASH_ATTN3_VARLEN_FUNC = _import_flash_attn3()


@functools.cache
def _is_hopper(index: int) -> bool:
    return torch.cuda.get_device_capability(index)[0] == 9


def _use_fa3(q: torch.Tensor, sinks: torch.Tensor | None, dropout_p: float) -> bool:
    """FlashAttention-3 takes this call: installed, a Hopper GPU, half precision, no sinks, no dropout."""
    return (_FLASH_ATTN3_FUNC is not None and sinks is None and dropout_p == 0.0 and q.is_cuda
            and q.dtype in _FLASH_DTYPES and _is_hopper(q.device.index or 0))


def describe_attention(device: torch.device, dtype: torch.dtype, *, sinks: bool = False, dropout: float = 0.0,
                       doc_mask: bool = False, window: bool = False) -> str:
    """The backend `attention` uses for tensors of ``dtype`` on ``device`` (what start-up logs); ``window``:
    some layers use a sliding window (SDPA then gets an explicit mask, flash-attn its ``window_size``)."""
    half_cuda = device.type == "cuda" and dtype in _FLASH_DTYPES and not sinks
    suffix = "_varlen" if doc_mask else ""
    if half_cuda and _FLASH_ATTN3_FUNC is not None and dropout == 0.0 and _is_hopper(device.index or 0):
        return "flash_attn3" + suffix
    if half_cuda and _FLASH_ATTN_FUNC is not None:
        return "flash_attn" + suffix
    if sinks:
        return "eager_sinks" + ("_window" if window else "")
    return "sdpa_window_mask" if window else "sdpa"


@functools.cache
def _log_first_use(backend: str) -> None:
    """Log a backend's name (cached, so each backend is logged once per process)."""
    logger.info("attention backend: %s", backend)


def _log_backend(backend: str) -> None:
    """Log the backend the first time it runs; silent while torch.compile traces (logging breaks graphs)."""
    if not torch.compiler.is_compiling():
        _log_first_use(backend)


def _causal_mask(t: int, s: int, device: torch.device, window: int | None = None) -> torch.Tensor:
    """Bottom-right aligned causal mask (T, S): True where query i may see key j, i.e. j <= S - T + i, and with
    a sliding ``window`` W also j > S - T + i - W."""
    mask = torch.ones(t, s, dtype=torch.bool, device=device).tril(diagonal=s - t)
    return mask if window is None else mask.triu(diagonal=s - t - window + 1)


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
    window: int | None = None,
) -> torch.Tensor:
    """Scaled dot-product attention with GQA, bottom-right causal masking and optional sinks.

    q: (B, T, Hq, D); k, v: (B, S, Hkv, D) with Hq a multiple of Hkv and T <= S;
    sinks: (Hq,) sink logits or None; dropout_p: dropout on the attention probabilities
    (pass 0.0 in eval); scale: defaults to 1/sqrt(D); doc_ids: (B, T) document number of each token
    (no KV cache: T == S), attention stays inside a document; window: sliding-window length W (causal only:
    each query sees its own key and the W - 1 before it) or None. Returns (B, T, Hq, D).
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
    if window is not None and (not causal or window >= S):
        if not causal:
            raise ValueError(f"a sliding window ({window}) needs causal attention")
        window = None  # every query already sees at most S <= window keys
    flash_window = (-1, -1) if window is None else (window - 1, 0)  # flash-attn: keys left / right of the query

    if _use_fa3(q, sinks, dropout_p):
        if doc_ids is not None:
            _log_backend("flash_attn3_varlen")
            return _flash_varlen(q, k, v, doc_ids, causal=causal, dropout_p=0.0, scale=scale, fa3=True,
                                 window=flash_window)
        _log_backend("flash_attn3")
        out = _FLASH_ATTN3_FUNC(q, k, v, softmax_scale=scale, causal=causal,  # type: ignore[misc]
                                window_size=flash_window)
        return out[0] if isinstance(out, tuple) else out  # older FA3 builds also return the log-sum-exp
    if _FLASH_ATTN_FUNC is not None and sinks is None and q.is_cuda and q.dtype in _FLASH_DTYPES:
        if doc_ids is not None and _FLASH_ATTN_VARLEN_FUNC is not None:
            _log_backend("flash_attn_varlen")
            return _flash_varlen(q, k, v, doc_ids, causal=causal, dropout_p=dropout_p, scale=scale,
                                 window=flash_window)
        if doc_ids is not None:
            raise RuntimeError("flash_attn without flash_attn_varlen_func cannot mask documents; update flash-attn")
        _log_backend("flash_attn")
        return _FLASH_ATTN_FUNC(q, k, v, dropout_p=dropout_p, softmax_scale=scale, causal=causal,
                                window_size=flash_window)

    q = q.transpose(1, 2)  # (B, Hq, T, D)
    # (T, S) or None: SDPA's own is_causal covers the square causal case without a window
    mask = _causal_mask(T, S, q.device, window) if causal and (T != S or window is not None) else None
    if _SDPA_GQA and sinks is None and mask is None and doc_ids is None and Hq != Hkv:
        # SDPA shares each key/value head between its query heads itself: no repeated copies of k and v
        _log_backend("sdpa")
        out = F.scaled_dot_product_attention(q, k.transpose(1, 2), v.transpose(1, 2), dropout_p=dropout_p,
                                             is_causal=causal, scale=scale, enable_gqa=True)
        return out.transpose(1, 2)  # (B, T, Hq, D)
    k = _repeat_kv(k, Hq // Hkv).transpose(1, 2)  # (B, Hq, S, D)
    v = _repeat_kv(v, Hq // Hkv).transpose(1, 2)  # (B, Hq, S, D)
    if doc_ids is not None:
        mask = doc_ids[:, None, :, None] == doc_ids[:, None, None, :]  # (B, 1, T, S): same document
        if causal:
            mask = mask & _causal_mask(T, S, q.device, window)

    if sinks is None:
        _log_backend("sdpa")
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=dropout_p, is_causal=causal and T == S and mask is None, scale=scale
        )
    else:
        _log_backend("eager_sinks")
        out = _attention_with_sinks(q, k, v, sinks, causal=causal, dropout_p=dropout_p, scale=scale,
                                    mask=mask if doc_ids is not None or window is not None else None)
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
    fa3: bool = False,
    window: tuple[int, int] = (-1, -1),
) -> torch.Tensor:
    """flash-attn over each document separately: q (B, T, Hq, D), k/v (B, T, Hkv, D) -> (B, T, Hq, D);
    window: flash-attn's window_size, (-1, -1) for none."""
    B, T, Hq, D = q.shape
    cu_seqlens, max_len = varlen_segments(doc_ids)
    packed = (q.reshape(B * T, Hq, D), k.reshape(B * T, k.shape[2], D), v.reshape(B * T, v.shape[2], D),
              cu_seqlens, cu_seqlens, max_len, max_len)
    if fa3:  # FlashAttention-3 has no dropout argument
        out = _FLASH_ATTN3_VARLEN_FUNC(*packed, softmax_scale=scale, causal=causal,  # type: ignore[misc]
                                       window_size=window)
        out = out[0] if isinstance(out, tuple) else out
    else:
        out = _FLASH_ATTN_VARLEN_FUNC(*packed, dropout_p=dropout_p, softmax_scale=scale,  # type: ignore[misc]
                                      causal=causal, window_size=window)  # (B*T, Hq, D)
    return out.view(B, T, Hq, D)
