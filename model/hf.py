"""Conversion between Tessera `Transformer` and Hugging Face `LlamaForCausalLM` (weights and configs).

Parameter names already match HF Llama apart from the `model.` prefix that HF puts in front of
everything but `lm_head`, and RoPE uses the same rotate-half layout, so weights move without
permutation. transformers is imported only inside the config functions.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch

from model.args import ModelArgs, ModelConfigError

if TYPE_CHECKING:
    from transformers import LlamaConfig

_HF_PREFIX = "model."
_HEAD_KEY = "lm_head.weight"
_EMBED_KEY = "embed_tokens.weight"


def to_hf_state_dict(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Tessera names -> HF Llama names: prefix everything but the head with `model.`.

    A tied head is kept under `lm_head.weight` too, as `LlamaForCausalLM.state_dict()` does.
    """
    return {key if key == _HEAD_KEY else _HF_PREFIX + key: value for key, value in state_dict.items()}


def from_hf_state_dict(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """HF Llama names -> Tessera names: strip `model.`, drop stale RoPE buffers, fill a tied head.

    Checkpoints of tied models often omit `lm_head.weight`; it is then set to the embedding.
    """
    converted = {
        key.removeprefix(_HF_PREFIX): value
        for key, value in state_dict.items()
        if not key.endswith("rotary_emb.inv_freq")  # older transformers saved this derived buffer
    }
    if _HEAD_KEY not in converted and _EMBED_KEY in converted:
        converted[_HEAD_KEY] = converted[_EMBED_KEY]
    return converted


def to_hf_llama_config(args: ModelArgs) -> LlamaConfig:
    """A `transformers.LlamaConfig` describing the same network as `Transformer(args)`.

    Token ids (bos/eos/pad) are left unset: they belong to the tokenizer, set them on the result.
    HF Llama has no residual dropout; `dropout` maps to its attention dropout.
    """
    from transformers import LlamaConfig

    args.validate()
    if args.attn_sinks:
        raise ModelConfigError(
            "ModelArgs.attn_sinks=True has no LlamaConfig equivalent: "
            "export a model built with attn_sinks=False"
        )
    return LlamaConfig(
        vocab_size=args.vocab_size,
        hidden_size=args.dim,
        intermediate_size=args.ffn_dim,
        num_hidden_layers=args.n_layers,
        num_attention_heads=args.n_heads,
        num_key_value_heads=args.kv_heads,
        head_dim=args.head_dim,
        hidden_act="silu",
        max_position_embeddings=args.max_seq_len,
        initializer_range=args.init_std,
        rms_norm_eps=args.norm_eps,
        rope_theta=args.rope_theta,
        tie_word_embeddings=args.tie_embeddings,
        attention_bias=False,
        mlp_bias=False,
        attention_dropout=args.dropout,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
    )


def _rope_theta(config: Any) -> float:
    """RoPE base of an HF config (transformers 5 `rope_parameters`, or the older `rope_theta`)."""
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type != "default":
        raise ModelConfigError(
            f"HF config rope type {rope_type!r} is not supported (only plain RoPE): "
            f"use a model without RoPE scaling, or load it with transformers directly"
        )
    theta = rope.get("rope_theta", getattr(config, "rope_theta", None))
    if theta is None:
        raise ModelConfigError("HF config has no rope_theta: set config.rope_theta (10000.0 for Llama 2)")
    return float(theta)


def args_from_hf_config(config: Any) -> ModelArgs:
    """ModelArgs for a Llama-architecture HF config (`LlamaConfig` or one with the same fields)."""
    for name, expected in (("hidden_act", "silu"), ("attention_bias", False), ("mlp_bias", False)):
        value = getattr(config, name, expected)
        if value != expected:
            raise ModelConfigError(
                f"HF config {name}={value!r} is not supported: Tessera models use {name}={expected!r}"
            )
    head_dim = getattr(config, "head_dim", None)
    if head_dim is not None and head_dim * config.num_attention_heads != config.hidden_size:
        raise ModelConfigError(
            f"HF config head_dim={head_dim} differs from hidden_size / num_attention_heads "
            f"({config.hidden_size} / {config.num_attention_heads}): Tessera derives head_dim from dim"
        )
    return ModelArgs(
        dim=config.hidden_size,
        n_layers=config.num_hidden_layers,
        n_heads=config.num_attention_heads,
        n_kv_heads=getattr(config, "num_key_value_heads", None) or config.num_attention_heads,
        vocab_size=config.vocab_size,
        ffn_hidden_dim=config.intermediate_size,
        norm_eps=config.rms_norm_eps,
        rope_theta=_rope_theta(config),
        max_seq_len=config.max_position_embeddings,
        tie_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
        dropout=float(getattr(config, "attention_dropout", 0.0)),
        init_std=getattr(config, "initializer_range", 0.02),
    ).validate()
