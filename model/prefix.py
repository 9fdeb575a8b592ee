"""Hugging Face causal LMs run from soft prompts (input embeddings) and per-layer key/value prefixes.

A compressed prompt reaches a (usually frozen) HF decoder in one of two forms:

* as input embeddings ``(B, T, D)``, the rows of `model.get_input_embeddings()` or anything of that width;
* as a key/value prefix: per layer a pair (K, V), each ``(B, n_kv_heads, M, head_dim)``, read by every layer's
  attention as if M earlier tokens had produced it. The inputs that follow take positions M, M+1, ...

::

    logits = prefix_forward(model, embeds, mask, kv_prefix=[(k, v) for each layer])   # (B, T, V), float32
    tokens = greedy_from_embeds(model, [embeds_0, embeds_1], max_new_tokens=16, eos_id=tok.eos_token_id)

Gradients flow to the embeddings and to the prefix tensors. The prefix goes in through transformers' own
`DynamicCache` (built fresh for every call, since a forward appends to it), so the model's attention code is
used as it is: Llama, Qwen2, GPT-2 and other decoders whose cache is one (K, V) pair per layer.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from model.hf_causal import CausalLM

KVPrefix = Sequence[tuple[Tensor, Tensor]]


def _unwrap(model: nn.Module) -> nn.Module:
    """The HF (or PEFT) model inside a `model.hf_causal.CausalLM`; other models as they are."""
    return model.model if isinstance(model, CausalLM) else model


def _decoder_config(config: Any) -> Any:
    """The text decoder's config (a multimodal config's text part; a plain decoder's own config)."""
    get = getattr(config, "get_text_config", None)
    return get(decoder=True) if get is not None else config


def kv_shape(config: Any) -> tuple[int, int, int]:
    """(n_layers, n_kv_heads, head_dim) of an HF decoder config (num_key_value_heads falling back to
    num_attention_heads; head_dim from config.head_dim or hidden_size // heads)."""
    c = _decoder_config(config)
    heads = int(c.num_attention_heads)
    kv_heads = getattr(c, "num_key_value_heads", None) or heads
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // heads
    return int(c.num_hidden_layers), int(kv_heads), int(head_dim)


def _check_prefix(prefix: KVPrefix, config: Any) -> tuple[int, int]:
    """Raise ValueError unless `prefix` is one (K, V) pair per layer of `config`'s shape; returns (B, M)."""
    n_layers, n_kv, head_dim = kv_shape(config)
    model_type = getattr(config, "model_type", type(config).__name__)
    where = f"kv_prefix for model_type={model_type!r}"
    if len(prefix) != n_layers:
        raise ValueError(f"{where}: {len(prefix)} layers given, expected n_layers={n_layers} (K, V) pairs.")
    batch_len: tuple[int, int] | None = None
    for i, pair in enumerate(prefix):
        if len(pair) != 2:
            raise ValueError(f"{where}: layer {i} holds {len(pair)} tensors, expected a (K, V) pair.")
        for name, t in zip("KV", pair):
            if t.dim() != 4 or t.shape[1] != n_kv or t.shape[3] != head_dim:
                raise ValueError(f"{where}: layer {i} {name} has shape {tuple(t.shape)}, expected "
                                 f"(B, n_kv_heads={n_kv}, M, head_dim={head_dim}).")
            if batch_len is None:
                batch_len = (t.shape[0], t.shape[2])
            elif (t.shape[0], t.shape[2]) != batch_len:
                raise ValueError(f"{where}: layer {i} {name} has shape {tuple(t.shape)}, expected batch and prefix "
                                 f"length (B, M)={batch_len} like layer 0's K.")
    if batch_len is None or batch_len[1] == 0:
        raise ValueError(f"{where}: the prefix is empty (M=0); pass kv_prefix=None for no prefix.")
    return batch_len


def prefix_cache(prefix: KVPrefix, config: Any) -> Any:
    """A fresh `DynamicCache` holding per-layer (K, V), each (B, n_kv_heads, M, head_dim), for `config`'s model;
    differentiable (gradients reach the prefix through the model's attention)."""
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer

    if getattr(config, "is_encoder_decoder", False):
        raise ValueError(f"kv_prefix: model_type={config.model_type!r} is an encoder-decoder; a key/value prefix "
                         f"is supported for decoder-only models.")
    _check_prefix(prefix, config)
    cache = DynamicCache(config=config)  # one layer per decoder layer, of the kinds the config names
    odd = sorted({type(layer).__name__ for layer in cache.layers if not isinstance(layer, DynamicLayer)})
    if odd or len(cache.layers) != len(prefix):
        raise ValueError(f"kv_prefix: model_type={config.model_type!r} caches more than one (K, V) pair per "
                         f"attention layer ({', '.join(odd) or f'{len(cache.layers)} cache layers'}); a key/value "
                         f"prefix is supported for decoders such as llama, qwen2 or gpt2.")
    for layer, (k, v) in zip(cache.layers, prefix):
        layer.update(k, v)  # concatenated after an empty tensor: a new tensor, still in the autograd graph
    return cache


def _refuse_dropped_cache(model: nn.Module) -> None:
    """Raise ValueError where a training-mode forward would silently drop the cache (HF gradient checkpointing)."""
    if not model.training:
        return
    for module in model.modules():
        if getattr(module, "gradient_checkpointing", False) is True and \
                not getattr(module, "_can_checkpoint_with_cache", False):
            raise ValueError(f"kv_prefix: {type(module).__name__} has gradient checkpointing on, under which "
                             f"transformers drops past_key_values (the prefix) in training mode; turn it off with "
                             f"model.activation_checkpointing_disable() (formerly gradient_checkpointing_disable()) "
                             f"or run the model in eval mode.")


def _refuse_prompt_learning(model: nn.Module) -> None:
    """Raise ValueError for a PEFT prompt-learning model, whose virtual tokens would shift our positions."""
    peft_config = getattr(model, "active_peft_config", None)
    if peft_config is not None and getattr(peft_config, "is_prompt_learning", False):
        raise ValueError(f"model: a PEFT {peft_config.peft_type} model adds its own virtual tokens; soft prompts and "
                         f"kv_prefix need a model without prompt learning (LoRA and other adapters are fine).")


def _model_dtype_device(model: nn.Module) -> tuple[torch.dtype, torch.device]:
    """The dtype and device of the model's input embedding (what its first layer computes in)."""
    weight = model.get_input_embeddings().weight
    return weight.dtype, weight.device


def _position_ids(attention_mask: Tensor, start: int | Tensor) -> Tensor:
    """Positions (B, T) of the real tokens of attention_mask (B, T) from `start` on (padding repeats a neighbour's)."""
    counted = attention_mask.long().cumsum(-1) - 1  # (B, T): index among the row's real tokens
    return counted.clamp(min=0) + start


def _prefix_mask(attention_mask: Tensor, prefix_len: int) -> Tensor:
    """attention_mask (B, T) preceded by `prefix_len` real positions: (B, prefix_len + T)."""
    ones = attention_mask.new_ones(attention_mask.shape[0], prefix_len)
    return torch.cat([ones, attention_mask], dim=1)


def _prepare(model: nn.Module, kv_prefix: KVPrefix | None, batch: int) -> tuple[nn.Module, Any, int]:
    """The unwrapped model, a fresh cache holding `kv_prefix` in the model's dtype (or None) and its length M."""
    model = _unwrap(model)
    _refuse_prompt_learning(model)
    if kv_prefix is None:
        return model, None, 0
    _refuse_dropped_cache(model)
    B, M = _check_prefix(kv_prefix, model.config)
    if B != batch:
        raise ValueError(f"kv_prefix has batch size {B}, expected {batch} (one prefix per input row).")
    dtype, device = _model_dtype_device(model)
    prefix = [(k.to(device=device, dtype=dtype), v.to(device=device, dtype=dtype)) for k, v in kv_prefix]
    return model, prefix_cache(prefix, model.config), M


def prefix_forward(model: nn.Module, inputs_embeds: Tensor, attention_mask: Tensor, *,
                   kv_prefix: KVPrefix | None = None) -> Tensor:
    """Logits (B, T, V) in float32 for inputs_embeds (B, T, D) with attention_mask (B, T) (1 = real token),
    after an optional kv_prefix (per-layer (K, V), prefix length M, all real); positions start at M.

    `model`: an HF PreTrainedModel, a PEFT model, or `model.hf_causal.CausalLM`. Padding may sit on either side:
    position ids count only the real tokens.
    """
    if inputs_embeds.dim() != 3:
        raise ValueError(f"inputs_embeds has shape {tuple(inputs_embeds.shape)}, expected (B, T, D).")
    B, T, D = inputs_embeds.shape
    if tuple(attention_mask.shape) != (B, T):
        raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)}, expected (B, T)={(B, T)} "
                         f"like inputs_embeds.")
    model, cache, M = _prepare(model, kv_prefix, B)
    hidden = _decoder_config(model.config).hidden_size
    if D != hidden:
        raise ValueError(f"inputs_embeds has width D={D}, expected the model's hidden_size={hidden}.")
    dtype, device = _model_dtype_device(model)
    inputs_embeds = inputs_embeds.to(device=device, dtype=dtype)
    attention_mask = attention_mask.to(device=device, dtype=torch.long)
    position_ids = _position_ids(attention_mask, M)  # (B, T)
    out = model(inputs_embeds=inputs_embeds, attention_mask=_prefix_mask(attention_mask, M),  # mask (B, M + T)
                position_ids=position_ids, past_key_values=cache, use_cache=cache is not None)
    return out.logits.float()  # (B, T, V)


def _left_pad(prompts: Sequence[Tensor], dtype: torch.dtype, device: torch.device) -> tuple[Tensor, Tensor]:
    """Prompts (T_i, D) stacked with zeros on the left: embeddings (B, T, D) and their mask (B, T)."""
    T = max(p.shape[0] for p in prompts)
    D = prompts[0].shape[1]
    embeds = torch.zeros(len(prompts), T, D, dtype=dtype, device=device)  # (B, T, D)
    mask = torch.zeros(len(prompts), T, dtype=torch.long, device=device)  # (B, T)
    for i, p in enumerate(prompts):
        embeds[i, T - p.shape[0]:] = p.to(device=device, dtype=dtype)
        mask[i, T - p.shape[0]:] = 1
    return embeds, mask


@torch.no_grad()
def greedy_from_embeds(model: nn.Module, prompts: Sequence[Tensor], *, max_new_tokens: int, eos_id: int | None,
                       kv_prefix: KVPrefix | None = None) -> list[list[int]]:
    """Greedy continuation (token ids, eos excluded) of each prompt, a (T_i, D) tensor of input embeddings.

    The prompts are batched with left padding and explicit position ids; new tokens go through the KV cache, their
    embeddings from the model's input embedding. kv_prefix: per-layer (K, V), each (B, n_kv, M, hd) with
    B == len(prompts), placed before every prompt. The model runs in eval mode and gets its mode back.
    """
    if not prompts:
        return []
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens={max_new_tokens} must be >= 0")
    for i, p in enumerate(prompts):
        if p.dim() != 2 or p.shape[0] == 0 or p.shape[1] != prompts[0].shape[1]:
            raise ValueError(f"prompts[{i}] has shape {tuple(p.shape)}, expected (T_i, D) with T_i >= 1 and "
                             f"D={prompts[0].shape[-1]} like prompts[0].")
    B = len(prompts)
    inner = _unwrap(model)
    dtype, device = _model_dtype_device(inner)
    embeds, mask = _left_pad(prompts, dtype, device)  # (B, T, D), (B, T)
    out: list[list[int]] = [[] for _ in range(B)]
    if max_new_tokens == 0:
        return out
    was_training = inner.training
    inner.eval()
    try:
        inner, cache, M = _prepare(inner, kv_prefix, B)
        if cache is None:
            from transformers import DynamicCache

            cache = DynamicCache(config=inner.config)
        full_mask = _prefix_mask(mask, M)  # (B, M + T): prefix, left padding, prompt
        positions = _position_ids(mask, M)  # (B, T)
        next_pos = positions[:, -1:] + 1  # (B, 1): every prompt ends in the last column
        embed = inner.get_input_embeddings()
        finished = torch.zeros(B, dtype=torch.bool, device=device)
        step_embeds = embeds
        for _ in range(max_new_tokens):
            logits = inner(inputs_embeds=step_embeds, attention_mask=full_mask, position_ids=positions,
                           past_key_values=cache, use_cache=True).logits[:, -1]  # (B, V)
            token = logits.float().argmax(dim=-1)  # (B,)
            for i in range(B):
                if not finished[i]:
                    if eos_id is not None and int(token[i]) == eos_id:
                        finished[i] = True
                    else:
                        out[i].append(int(token[i]))
            if bool(finished.all()):
                break
            step_embeds = embed(token[:, None]).to(dtype)  # (B, 1, D)
            positions = next_pos
            next_pos = next_pos + 1
            full_mask = torch.cat([full_mask, full_mask.new_ones(B, 1)], dim=1)  # (B, M + T + steps)
    finally:
        inner.train(was_training)
    return out
