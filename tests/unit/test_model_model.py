"""Transformer: causality, GQA, KV-cache positions, meta-device init, pipeline stages, tying."""

from __future__ import annotations

import ast
import copy
import dataclasses
from pathlib import Path

import pytest
import torch
from torch import nn

import model as model_package
from model import KVCache, ModelArgs, Transformer


def small_args(**overrides: object) -> ModelArgs:
    # init_std 0.1 gives peaked attention, so position and masking mistakes show up in the logits.
    base = ModelArgs(
        dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=97, max_seq_len=64, multiple_of=32,
        init_std=0.1,
    )
    return dataclasses.replace(base, **overrides)


def build(seed: int = 0, **overrides: object) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(small_args(**overrides)).eval()


@pytest.mark.parametrize("attn_sinks", [False, True])
def test_changing_a_future_token_never_changes_earlier_logits(attn_sinks: bool) -> None:
    model = build(attn_sinks=attn_sinks)
    tokens = torch.randint(0, 97, (2, 16))
    logits = model(tokens)  # (B, T, V)
    assert logits.shape == (2, 16, 97) and logits.dtype == torch.float32
    for j in (0, 7, 15):
        changed = tokens.clone()
        changed[:, j] = (changed[:, j] + 1) % 97
        new_logits = model(changed)
        torch.testing.assert_close(new_logits[:, :j], logits[:, :j], atol=0.0, rtol=0.0)
        assert not torch.allclose(new_logits[:, j], logits[:, j])


def test_gqa_model_equals_mha_model_with_repeated_kv_weights() -> None:
    gqa = build(n_heads=4, n_kv_heads=2)
    mha = Transformer(small_args(n_heads=4, n_kv_heads=4)).eval()
    head_dim, n_rep = gqa.args.head_dim, 2
    state = gqa.state_dict()
    for key, weight in list(state.items()):
        if key.endswith(("k_proj.weight", "v_proj.weight")):
            per_head = weight.view(-1, head_dim, weight.shape[-1])  # (Hkv, D, dim)
            state[key] = per_head.repeat_interleave(n_rep, dim=0).reshape(-1, weight.shape[-1])  # (Hq*D, dim)
    mha.load_state_dict(state)
    tokens = torch.randint(0, 97, (2, 12))
    torch.testing.assert_close(mha(tokens), gqa(tokens), atol=1e-6, rtol=1e-6)


def test_kv_cache_prefix_then_suffix_equals_full_forward() -> None:
    model = build()
    tokens = torch.randint(0, 97, (2, 14))
    full = model(tokens)
    cache = KVCache.for_model(model.args, batch_size=2, max_len=14)
    prefix = model(tokens[:, :9], cache=cache)
    assert cache.length == 9
    suffix = model(tokens[:, 9:], cache=cache)
    assert cache.length == 14
    torch.testing.assert_close(prefix, full[:, :9], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(suffix, full[:, 9:], atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="max_len"):
        model(tokens[:, :1], cache=cache)


def test_explicit_position_ids_match_the_default() -> None:
    model = build()
    tokens = torch.randint(0, 97, (2, 10))
    torch.testing.assert_close(model(tokens, position_ids=torch.arange(10).expand(2, 10)), model(tokens))
    assert not torch.allclose(model(tokens, position_ids=torch.arange(3, 13)), model(tokens))


def test_sequences_longer_than_max_seq_len_are_refused() -> None:
    model = build(max_seq_len=8)
    with pytest.raises(ValueError, match="max_seq_len=8"):
        model(torch.zeros(1, 9, dtype=torch.long))


def test_meta_build_then_init_is_finite_and_deterministic() -> None:
    args = small_args(tie_embeddings=True, attn_sinks=True)
    tokens = torch.randint(0, 97, (2, 10))

    def materialise(seed: int) -> Transformer:
        with torch.device("meta"):
            model = Transformer(args)
        assert model.lm_head.weight.is_meta
        model.to_empty(device="cpu")
        torch.manual_seed(seed)
        model.init_weights()
        return model.eval()

    first, second, other = materialise(0), materialise(0), materialise(1)
    logits = first(tokens)
    assert torch.isfinite(logits).all()
    torch.testing.assert_close(second(tokens), logits, atol=0.0, rtol=0.0)
    assert not torch.allclose(other(tokens), logits)
    assert first.lm_head.weight is first.embed_tokens.weight  # re-tied after to_empty
    eager = Transformer(args).eval()  # init_weights must overwrite every parameter of an eager build too
    torch.manual_seed(0)
    eager.init_weights()
    torch.testing.assert_close(eager(tokens), logits, atol=0.0, rtol=0.0)
    assert "rope_cos" not in first.state_dict()  # derived buffers are not checkpointed


def test_init_weights_scales_residual_outputs_and_resets_norms() -> None:
    model = build(n_layers=8, init_std=0.02)
    with torch.no_grad():
        model.norm.weight.fill_(3.0)
    model.init_weights()
    assert torch.equal(model.norm.weight, torch.ones(64))
    q_std = model.layers[0].self_attn.q_proj.weight.std().item()
    o_std = model.layers[0].self_attn.o_proj.weight.std().item()
    assert q_std == pytest.approx(0.02, rel=0.1)
    assert o_std == pytest.approx(0.02 / 4, rel=0.1)  # 0.02 / sqrt(2 * 8)


@pytest.mark.parametrize("tie_embeddings", [False, True])
def test_pipeline_stages_compose_to_the_full_model(tie_embeddings: bool) -> None:
    full = build(n_layers=4, tie_embeddings=tie_embeddings)
    first, last = copy.deepcopy(full), copy.deepcopy(full)
    first.layers = nn.ModuleList(list(first.layers)[:2])
    first.norm, first.lm_head = None, None
    last.layers = nn.ModuleList(list(last.layers)[2:])
    last.embed_tokens = None
    tokens = torch.randint(0, 97, (2, 11))
    hidden = first(tokens)
    assert hidden.shape == (2, 11, 64)
    torch.testing.assert_close(last(hidden), full(tokens), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(last(inputs_embeds=hidden), full(tokens), atol=1e-6, rtol=1e-6)


def test_inputs_embeds_replace_the_lookup() -> None:
    model = build()
    tokens = torch.randint(0, 97, (2, 7))
    torch.testing.assert_close(model(inputs_embeds=model.embed_tokens(tokens)), model(tokens))
    with pytest.raises(ValueError, match="input_ids or inputs_embeds"):
        model()


def test_tied_head_shares_the_embedding_and_trains_as_one() -> None:
    model = build(tie_embeddings=True)
    assert model.lm_head.weight is model.embed_tokens.weight
    model.train()
    loss = model(torch.randint(0, 97, (2, 6))).logsumexp(-1).mean()
    loss.backward()
    assert model.embed_tokens.weight.grad is not None
    untied = build(tie_embeddings=False)
    assert untied.lm_head.weight is not untied.embed_tokens.weight


def test_parameter_names_follow_hf_llama() -> None:
    names = set(build(attn_sinks=True).state_dict())
    layer = "layers.1."
    expected = {
        "embed_tokens.weight", "norm.weight", "lm_head.weight",
        layer + "input_layernorm.weight", layer + "post_attention_layernorm.weight",
        layer + "self_attn.sinks",
        *(layer + f"self_attn.{p}_proj.weight" for p in "qkvo"),
        *(layer + f"mlp.{p}_proj.weight" for p in ("gate", "up", "down")),
    }
    assert expected <= names
    assert not any(name.endswith("bias") for name in names)


def test_dropout_is_active_only_in_training() -> None:
    model = build(dropout=0.5)
    tokens = torch.randint(0, 97, (1, 8))
    torch.testing.assert_close(model(tokens), model(tokens), atol=0.0, rtol=0.0)
    model.train()
    assert not torch.allclose(model(tokens), model(tokens))


def test_model_package_never_imports_deepspeed_or_torch_distributed() -> None:
    for path in Path(model_package.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                modules = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                modules = [node.module or ""]
            else:
                continue
            forbidden = [m for m in modules if m.startswith(("deepspeed", "torch.distributed"))]
            assert not forbidden, f"{path.name} imports {forbidden}"


@pytest.mark.parametrize("attn_sinks", [False, True])
def test_forward_traces_as_one_graph_under_torch_compile(attn_sinks: bool) -> None:
    model = build(attn_sinks=attn_sinks)
    tokens = torch.randint(0, 97, (2, 9))
    compiled = torch.compile(model, fullgraph=True, backend="eager")  # fullgraph: a graph break raises
    torch.testing.assert_close(compiled(tokens), model(tokens))
