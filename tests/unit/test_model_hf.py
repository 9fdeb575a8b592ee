"""Parity with Hugging Face `LlamaForCausalLM` through model/hf.py (weights, configs, logits, generation)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import transformers

from model import ModelArgs, ModelConfigError, Transformer, generate
from model.hf import args_from_hf_config, from_hf_state_dict, to_hf_llama_config, to_hf_state_dict


def small_args(**overrides: object) -> ModelArgs:
    # init_std 0.1: attention is peaked, so a RoPE or masking mismatch moves the logits well past 1e-5.
    base = ModelArgs(
        dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=97, max_seq_len=64, multiple_of=32,
        init_std=0.1,
    )
    return dataclasses.replace(base, **overrides)


def hf_twin(model: Transformer, args: ModelArgs | None = None) -> torch.nn.Module:
    """An HF LlamaForCausalLM holding `model`'s weights (with the config of `args`, default the model's)."""
    config = to_hf_llama_config(args or model.args)
    hf = transformers.LlamaForCausalLM(config).eval()
    hf.load_state_dict(to_hf_state_dict(model.state_dict()), strict=True)
    return hf


def max_logit_diff(model: Transformer, hf: torch.nn.Module, tokens: torch.Tensor) -> float:
    with torch.no_grad():
        return (model(tokens) - hf(tokens).logits).abs().max().item()


@pytest.mark.parametrize(
    "overrides",
    [{}, {"tie_embeddings": True}, {"rope_theta": 500000.0}, {"n_kv_heads": None, "norm_eps": 1e-6}],
    ids=["default", "tied", "rope_theta", "mha"],
)
def test_logits_match_hf_llama(overrides: dict[str, object]) -> None:
    torch.manual_seed(0)
    model = Transformer(small_args(**overrides)).eval()
    tokens = torch.randint(0, 97, (2, 40))
    assert max_logit_diff(model, hf_twin(model), tokens) < 1e-5


def test_parity_check_detects_a_rope_theta_mismatch() -> None:
    torch.manual_seed(0)
    model = Transformer(small_args(rope_theta=500000.0)).eval()
    hf = hf_twin(model, small_args(rope_theta=10000.0))
    assert max_logit_diff(model, hf, torch.randint(0, 97, (2, 40))) > 1e-3


@pytest.mark.parametrize("tie_embeddings", [False, True])
def test_hf_weights_load_into_tessera(tie_embeddings: bool) -> None:
    args = small_args(tie_embeddings=tie_embeddings)
    config = to_hf_llama_config(args)
    config.initializer_range = 0.1
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(config).eval()
    hf_state = hf.state_dict()
    if tie_embeddings:
        hf_state.pop("lm_head.weight")  # as in checkpoints saved from tied models
    model = Transformer(args_from_hf_config(hf.config)).eval()
    model.load_state_dict(from_hf_state_dict(hf_state), strict=True)
    assert max_logit_diff(model, hf, torch.randint(0, 97, (2, 40))) < 1e-5


def test_state_dict_names_round_trip() -> None:
    state = Transformer(small_args()).state_dict()
    hf_state = to_hf_state_dict(state)
    assert "model.layers.0.self_attn.q_proj.weight" in hf_state and "lm_head.weight" in hf_state
    assert from_hf_state_dict(hf_state).keys() == state.keys()
    stale = {**hf_state, "model.layers.0.self_attn.rotary_emb.inv_freq": torch.ones(8)}
    assert from_hf_state_dict(stale).keys() == state.keys()


@pytest.mark.parametrize("overrides", [{}, {"tie_embeddings": True, "rope_theta": 500000.0, "n_kv_heads": 1}])
def test_config_round_trip(overrides: dict[str, object]) -> None:
    args = small_args(**overrides)
    config = to_hf_llama_config(args)
    assert config.eos_token_id is None and config.bos_token_id is None
    back = args_from_hf_config(config)
    assert (back.dim, back.n_layers, back.n_heads, back.kv_heads, back.ffn_dim) == (
        args.dim, args.n_layers, args.n_heads, args.kv_heads, args.ffn_dim
    )
    assert (back.vocab_size, back.rope_theta, back.tie_embeddings, back.norm_eps, back.max_seq_len) == (
        args.vocab_size, args.rope_theta, args.tie_embeddings, args.norm_eps, args.max_seq_len
    )


def test_unsupported_configs_are_refused() -> None:
    with pytest.raises(ModelConfigError, match="attn_sinks"):
        to_hf_llama_config(small_args(attn_sinks=True))
    config = to_hf_llama_config(small_args())
    config.hidden_act = "gelu"
    with pytest.raises(ModelConfigError, match="hidden_act"):
        args_from_hf_config(config)
    config = to_hf_llama_config(small_args())
    config.rope_parameters = {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0}
    with pytest.raises(ModelConfigError, match="rope_type='dynamic'"):
        args_from_hf_config(config)


def test_greedy_generation_matches_hf() -> None:
    torch.manual_seed(0)
    model = Transformer(small_args()).eval()
    hf = hf_twin(model)
    tokens = torch.randint(0, 97, (2, 6))
    with torch.no_grad():
        expected = hf.generate(tokens, max_new_tokens=12, do_sample=False, min_new_tokens=12, pad_token_id=0)
    assert torch.equal(generate(model, tokens, 12), expected)
