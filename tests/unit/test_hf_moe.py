"""HF interchange of MoE models (model/hf_moe.py through model/hf.py): random Mixtral / Qwen3-MoE / Qwen2-MoE with
awkward shapes imported give transformers' logits; native MoE models trained a few steps and exported load in plain
transformers with the same logits; what no family describes is refused naming the field."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from huggingface_hub import save_torch_state_dict
from transformers import (
    AutoModelForCausalLM,
    MixtralConfig,
    MixtralForCausalLM,
    Qwen2MoeConfig,
    Qwen2MoeForCausalLM,
    Qwen3MoeConfig,
    Qwen3MoeForCausalLM,
)

from model import ModelArgs, ModelConfigError
from model.hf import hf_model_type, load_hf_pretrained, to_hf_config, to_hf_state_dict
from model.model import Transformer

COMMON = {"vocab_size": 37, "hidden_size": 24, "num_hidden_layers": 3, "num_attention_heads": 4,
          "num_key_value_heads": 1, "max_position_embeddings": 64, "tie_word_embeddings": False}


def _eager(hf_model: torch.nn.Module) -> torch.nn.Module:
    """transformers' per-expert loop: its grouped_mm path refuses widths whose strides are not 16-byte multiples."""
    hf_model.config._experts_implementation = "eager"
    return hf_model.eval()


def _hf_roundtrip(hf_model: torch.nn.Module, tmp_path: Path) -> None:
    _eager(hf_model)
    hf_model.save_pretrained(tmp_path)
    args, state = load_hf_pretrained(tmp_path)
    model = Transformer(args).eval()
    model.load_state_dict(state)
    ids = torch.randint(0, COMMON["vocab_size"], (2, 11), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = hf_model(ids).logits
        torch.testing.assert_close(model(ids), ref, rtol=0, atol=1e-5)
        assert ref.abs().max() > 1e-3  # not a degenerate comparison


@pytest.mark.parametrize("top_k", [1, 2])
def test_import_mixtral_logits(top_k: int, tmp_path: Path) -> None:
    torch.manual_seed(top_k)
    cfg = MixtralConfig(**COMMON, intermediate_size=20, num_local_experts=5, num_experts_per_tok=top_k,
                        initializer_range=0.2)
    _hf_roundtrip(MixtralForCausalLM(cfg), tmp_path)


@pytest.mark.parametrize(("norm", "sparse"), [(False, {"mlp_only_layers": [1]}), (True, {"decoder_sparse_step": 2}),
                                              (True, {})])
def test_import_qwen3_moe_logits(norm: bool, sparse: dict, tmp_path: Path) -> None:
    torch.manual_seed(5)
    cfg = Qwen3MoeConfig(**COMMON, head_dim=10, intermediate_size=28, moe_intermediate_size=14, num_experts=6,
                         num_experts_per_tok=2, norm_topk_prob=norm, initializer_range=0.2, **sparse)
    _hf_roundtrip(Qwen3MoeForCausalLM(cfg), tmp_path)


def test_import_qwen2_moe_shared_expert_logits(tmp_path: Path) -> None:
    torch.manual_seed(6)
    cfg = Qwen2MoeConfig(**COMMON, intermediate_size=28, moe_intermediate_size=12, shared_expert_intermediate_size=18,
                         num_experts=4, num_experts_per_tok=2, mlp_only_layers=[0], initializer_range=0.2)
    _hf_roundtrip(Qwen2MoeForCausalLM(cfg), tmp_path)


EXPORTS = {
    "mixtral": {"n_experts": 4, "moe_top_k": 2},
    "qwen3_moe": {"n_experts": 5, "moe_top_k": 1, "qk_norm": True, "head_dim": 8, "moe_ffn_dim": 12, "moe_layers": [0, 2],
                      "moe_norm_topk_prob": False},
    "qwen2_moe": {"n_experts": 4, "moe_top_k": 2, "attn_bias": True, "moe_ffn_dim": 12, "moe_shared_ffn_dim": 16,
                      "moe_shared_gate": True, "moe_layers": 2},
}


@pytest.mark.parametrize("family", sorted(EXPORTS))
def test_trained_native_moe_exports_to_transformers(family: str, tmp_path: Path) -> None:
    torch.manual_seed(0)
    args = ModelArgs(dim=24, n_layers=3, n_heads=4, n_kv_heads=1, vocab_size=37, max_seq_len=32, ffn_hidden_dim=20,
                     init_std=0.1, moe_aux_loss_coef=0.01, **EXPORTS[family])
    assert hf_model_type(args) == family
    model = Transformer(args)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    data = torch.randint(0, 37, (4, 13), generator=torch.Generator().manual_seed(2))
    for _ in range(3):  # move every weight off its initialisation
        loss = torch.nn.functional.cross_entropy(model(data[:, :-1]).flatten(0, 1), data[:, 1:].flatten())
        loss.backward()
        opt.step()
        opt.zero_grad()
    config = to_hf_config(args)
    config.architectures = [type(config).__name__.removesuffix("Config") + "ForCausalLM"]
    config.save_pretrained(tmp_path)
    save_torch_state_dict(to_hf_state_dict(model.state_dict(), family), tmp_path)
    hf_model = _eager(AutoModelForCausalLM.from_pretrained(tmp_path))
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(hf_model(data).logits, model(data), rtol=0, atol=1e-5)
    again, state = load_hf_pretrained(tmp_path)  # and back: the same network and weights
    assert [again.is_moe_layer(i) for i in range(3)] == [args.is_moe_layer(i) for i in range(3)]
    for name, tensor in model.state_dict().items():
        torch.testing.assert_close(state[name], tensor, rtol=0, atol=0)


@pytest.mark.parametrize(("fields", "named"), [
    ({"moe_bias_update_rate": 0.01}, "moe_bias_update_rate"),
    ({"moe_norm_topk_prob": False}, "moe_norm_topk_prob"),
    ({"moe_shared_ffn_dim": 8}, "moe_shared_ffn_dim"),
])
def test_moe_without_hf_family_refused(fields: dict, named: str) -> None:
    args = ModelArgs(dim=16, n_layers=2, n_heads=2, vocab_size=32, n_experts=2, moe_top_k=1, **fields)
    with pytest.raises(ModelConfigError, match=named):
        to_hf_config(args)
