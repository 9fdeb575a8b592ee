"""HF causal LMs run from soft prompts: input embeddings after optional per-layer key / value prefixes.

    logits = prefix_forward(model, embeds, mask, kv_prefix=[(k, v), ...])   # k, v: (B, n_kv_heads, M, head_dim)
    answers = greedy_from_embeds(model, [prompt_embeds, ...], max_new_tokens=16, eos_id=tok.eos_token_id)

A KV prefix occupies positions 0..M-1 of every layer's cache; the inputs follow it (positions from M, counting
only real tokens), so a prefix taken from a text's own cache reproduces that text's continuation exactly. Both are
differentiable in the prefix and the embeddings. ``model`` is an HF model, a PEFT model around one, or
``model.hf_causal.CausalLM``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

KVPrefix = Sequence[tuple[torch.Tensor, torch.Tensor]]  # per layer: (K, V), each (B, n_kv_heads, M, head_dim)


def _hf(model: nn.Module) -> nn.Module:
    from model.hf_causal import CausalLM

    return model.model if isinstance(model, CausalLM) else model


def kv_shape(config: Any) -> tuple[int, int, int]:
    """(n_layers, n_kv_heads, head_dim) of an HF decoder config."""
    heads = config.num_attention_heads
    n_kv = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return int(config.num_hidden_layers), int(n_kv), int(head_dim)


def prefix_cache(prefix: KVPrefix, config: Any) -> Any:
    """A fresh cache holding ``prefix`` for ``config``'s model (forward appends to a cache: never reuse one)."""
    from transformers import DynamicCache

    if getattr(config, "model_type", None) not in ("llama", "qwen2", "mistral", "qwen3", "gemma", "gemma2"):
        raise ValueError(f"KV prefixes are supported for Llama / Mistral / Qwen2 / Qwen3 / Gemma models, not "
                         f"model_type={getattr(config, 'model_type', None)!r}")
    n_layers, n_kv, head_dim = kv_shape(config)
    if len(prefix) != n_layers:
        raise ValueError(f"a KV prefix needs one (K, V) per layer: {n_layers} expected, {len(prefix)} given")
    cache = DynamicCache()
    for i, (k, v) in enumerate(prefix):
        if k.dim() != 4 or k.shape != v.shape or k.shape[1] != n_kv or k.shape[3] != head_dim:
            raise ValueError(f"KV prefix layer {i}: K {tuple(k.shape)}, V {tuple(v.shape)}; expected (B, "
                             f"{n_kv}, M, {head_dim}) each (n_kv_heads, head_dim of this model)")
        cache.update(k, v, i)
    return cache


def _positions(mask: torch.Tensor, start: int) -> torch.Tensor:
    """(B, T) positions of the real tokens counted from ``start`` (padding gets the position of its neighbour)."""
    return start + (mask.long().cumsum(1) - 1).clamp(min=0)


def prefix_forward(model: nn.Module, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor, *,
                   kv_prefix: KVPrefix | None = None) -> torch.Tensor:
    """Logits (B, T, V) in float32 for ``inputs_embeds`` (B, T, D), ``attention_mask`` (B, T) (1 = real; right
    padding), after an optional KV prefix of M positions."""
    hf = _hf(model)
    B = inputs_embeds.shape[0]
    m = 0 if not kv_prefix else kv_prefix[0][0].shape[2]
    mask = attention_mask.long()
    if m:
        mask = torch.cat([torch.ones(B, m, dtype=mask.dtype, device=mask.device), mask], dim=1)
    cache = prefix_cache(kv_prefix, hf.config) if m else None
    out = hf(inputs_embeds=inputs_embeds, attention_mask=mask, position_ids=_positions(attention_mask, m),
             past_key_values=cache, use_cache=cache is not None)
    return out.logits.float()


@torch.no_grad()
def greedy_from_embeds(model: nn.Module, prompts: Sequence[torch.Tensor], *, max_new_tokens: int,
                       eos_id: int | None, kv_prefix: KVPrefix | None = None) -> list[list[int]]:
    """Greedy continuations (token ids, eos excluded) of prompts given as (T_i, D) input embeddings, batched with
    left padding; a KV prefix (B == len(prompts)) comes before every prompt. ``eos_id=None`` always generates
    ``max_new_tokens`` tokens (the same number of forwards on every rank, as ZeRO-3 needs)."""
    from transformers import DynamicCache

    hf = _hf(model)
    embed = hf.get_input_embeddings()
    B, width = len(prompts), max(p.shape[0] for p in prompts)
    D, device = prompts[0].shape[1], prompts[0].device
    embeds = torch.zeros(B, width, D, dtype=prompts[0].dtype, device=device)
    mask = torch.zeros(B, width, dtype=torch.long, device=device)
    for i, p in enumerate(prompts):
        embeds[i, width - p.shape[0]:] = p
        mask[i, width - p.shape[0]:] = 1
    m = 0 if not kv_prefix else kv_prefix[0][0].shape[2]
    full = torch.cat([torch.ones(B, m, dtype=torch.long, device=device), mask], dim=1)
    cache = prefix_cache(kv_prefix, hf.config) if m else DynamicCache()
    pos = _positions(mask, m)
    was_training = hf.training
    hf.eval()
    try:
        out = hf(inputs_embeds=embeds, attention_mask=full, position_ids=pos, past_key_values=cache, use_cache=True)
        tokens: list[list[int]] = [[] for _ in range(B)]
        done = torch.zeros(B, dtype=torch.bool, device=device)
        nxt = pos[:, -1:] + 1
        for step in range(max_new_tokens):
            choice = out.logits[:, -1].argmax(-1)  # (B,)
            for i in range(B):
                if not done[i]:
                    if eos_id is not None and int(choice[i]) == eos_id:
                        done[i] = True
                    else:
                        tokens[i].append(int(choice[i]))
            if bool(done.all()) or step == max_new_tokens - 1:
                break
            full = torch.cat([full, torch.ones(B, 1, dtype=torch.long, device=device)], dim=1)
            out = hf(inputs_embeds=embed(choice[:, None]), attention_mask=full, position_ids=nxt,
                     past_key_values=out.past_key_values, use_cache=True)
            nxt = nxt + 1
    finally:
        hf.train(was_training)
    return tokens
