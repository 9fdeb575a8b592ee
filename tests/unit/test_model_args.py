"""ModelArgs: validation errors, derived sizes, exact parameter counts and presets."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from model import PRESETS, ModelArgs, ModelConfigError, Transformer, get_preset


def small_args(**overrides: object) -> ModelArgs:
    base = ModelArgs(
        dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=97, max_seq_len=64, multiple_of=32
    )
    return dataclasses.replace(base, **overrides)


def count_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())  # shared (tied) parameters are yielded once


@pytest.mark.parametrize(
    ("overrides", "field_name"),
    [
        ({"dim": 0}, "dim"),
        ({"n_layers": -1}, "n_layers"),
        ({"n_heads": 0}, "n_heads"),
        ({"vocab_size": 0}, "vocab_size"),
        ({"max_seq_len": 0}, "max_seq_len"),
        ({"n_kv_heads": 0}, "n_kv_heads"),
        ({"ffn_hidden_dim": -5}, "ffn_hidden_dim"),
        ({"multiple_of": 0}, "multiple_of"),
        ({"dim": 2.5}, "dim"),
        ({"norm_eps": 0.0}, "norm_eps"),
        ({"rope_theta": -1.0}, "rope_theta"),
        ({"init_std": 0.0}, "init_std"),
        ({"dropout": 1.0}, "dropout"),
        ({"dropout": -0.1}, "dropout"),
        ({"n_heads": 3}, "n_heads"),  # 64 % 3
        ({"n_kv_heads": 3}, "n_kv_heads"),  # 4 % 3
        ({"dim": 36}, "head_dim"),  # 36 / 4 = 9: odd, RoPE cannot rotate it
    ],
)
def test_validate_names_field_value_and_fix(overrides: dict[str, object], field_name: str) -> None:
    args = small_args(**overrides)
    with pytest.raises(ModelConfigError) as excinfo:
        args.validate()
    message = str(excinfo.value)
    assert field_name in message
    assert any(repr(value) in message or str(value) in message for value in overrides.values())
    assert any(word in message for word in ("set", "choose", "make", "use"))  # says how to fix it
    assert isinstance(excinfo.value, ValueError)


def test_transformer_validates_its_args() -> None:
    with pytest.raises(ModelConfigError, match="n_kv_heads"):
        Transformer(small_args(n_kv_heads=3))


def test_derived_sizes() -> None:
    args = small_args(n_kv_heads=None)
    assert args.kv_heads == args.n_heads == 4
    assert args.head_dim == 16
    assert args.ffn_dim == 192  # int(8 * 64 / 3) = 170, rounded up to a multiple of 32
    assert small_args(ffn_hidden_dim=100).ffn_dim == 100
    assert ModelArgs(dim=4096, multiple_of=256).ffn_dim == 11008  # Llama-2 7B


@pytest.mark.parametrize(
    "overrides",
    [{}, {"tie_embeddings": True}, {"attn_sinks": True}, {"n_kv_heads": None, "ffn_hidden_dim": 80}],
)
def test_num_params_is_exact(overrides: dict[str, object]) -> None:
    args = small_args(**overrides)
    model = Transformer(args)
    assert count_params(model) == args.num_params()
    embeddings = model.embed_tokens.weight.numel() * (1 if args.tie_embeddings else 2)
    assert args.num_params(include_embeddings=False) == args.num_params() - embeddings


def test_num_params_matches_real_llama3_shapes_on_meta() -> None:
    args = dataclasses.replace(get_preset("llama3-8b"), n_layers=2)  # real widths, few layers
    with torch.device("meta"):
        model = Transformer(args)
    assert count_params(model) == args.num_params()


def test_presets_sizes() -> None:
    assert 0.9e6 <= get_preset("test-1m").num_params() <= 1.1e6
    assert get_preset("llama3-8b").num_params() == 8_030_261_248  # published: 8.03B
    assert 70.5e9 <= get_preset("llama3-70b").num_params() <= 70.6e9
    assert 1.23e9 <= get_preset("llama3-1b").num_params() <= 1.24e9
    assert 120e6 <= get_preset("small-125m").num_params() <= 130e6
    for name, args in PRESETS.items():
        assert args.validate() is args, name


def test_get_preset_returns_a_copy() -> None:
    args = get_preset("tiny")
    args.vocab_size = 123
    assert PRESETS["tiny"].vocab_size != 123
    assert get_preset("tiny") == PRESETS["tiny"]


def test_unknown_preset_lists_the_names() -> None:
    with pytest.raises(ModelConfigError) as excinfo:
        get_preset("llama9-1t")
    assert "llama9-1t" in str(excinfo.value)
    for name in PRESETS:
        assert name in str(excinfo.value)


def test_flops_per_token() -> None:
    args = get_preset("llama3-8b")
    norms = (2 * args.n_layers + 1) * args.dim  # element-wise weights cost no matmul
    matmul_params = args.num_params() - args.vocab_size * args.dim - norms  # nor does the embedding lookup
    assert args.flops_per_token(0) == 6 * matmul_params
    slope = args.flops_per_token(2048) - args.flops_per_token(1024)
    assert slope == 12 * args.n_layers * args.dim * 1024
    tied = dataclasses.replace(args, tie_embeddings=True)
    assert tied.flops_per_token(1024) == args.flops_per_token(1024)  # a tied head still costs its matmul
