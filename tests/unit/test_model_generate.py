"""Generation: KV cache vs recompute, seeded sampling, logits processing, stop tokens, mode handling."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from model import ModelArgs, Transformer, generate
from model.generate import apply_repetition_penalty, apply_top_k, apply_top_p, sample_next_token

NEG_INF = float("-inf")


def build(**overrides: object) -> Transformer:
    torch.manual_seed(0)
    base = ModelArgs(
        dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=97, max_seq_len=64, multiple_of=32,
        init_std=0.1,
    )
    return Transformer(dataclasses.replace(base, **overrides)).eval()


def prompt(batch: int = 2, length: int = 5) -> torch.Tensor:
    return torch.randint(0, 97, (batch, length), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("attn_sinks", [False, True])
def test_greedy_with_and_without_cache_agree(attn_sinks: bool) -> None:
    model = build(attn_sinks=attn_sinks)
    cached = generate(model, prompt(), 24)
    recomputed = generate(model, prompt(), 24, use_cache=False)
    assert cached.shape == (2, 5 + 24) and cached.dtype == torch.long
    assert torch.equal(cached[:, :5], prompt())
    assert torch.equal(cached, recomputed)
    # Greedy really is argmax of the model's own logits at every step.
    logits = model(cached[:, :-1])[:, 4:]  # (B, 24, V)
    assert torch.equal(logits.argmax(-1), cached[:, 5:])


def test_seeded_sampling_is_reproducible() -> None:
    model = build()

    def sample(seed: int, **kwargs: object) -> torch.Tensor:
        generator = torch.Generator().manual_seed(seed)
        return generate(model, prompt(), 20, temperature=1.0, generator=generator, **kwargs)

    assert torch.equal(sample(7), sample(7))
    assert torch.equal(sample(7, top_k=5, top_p=0.9), sample(7, top_k=5, top_p=0.9))
    assert not torch.equal(sample(7), sample(8))


def test_top_k_one_sampling_is_greedy() -> None:
    model = build()
    generator = torch.Generator().manual_seed(0)
    sampled = generate(model, prompt(), 10, temperature=1.5, top_k=1, generator=generator)
    assert torch.equal(sampled, generate(model, prompt(), 10))


def test_apply_top_k() -> None:
    logits = torch.tensor([[1.0, 5.0, 3.0, 2.0], [4.0, 4.0, 0.0, 1.0]])
    expected = torch.tensor([[NEG_INF, 5.0, 3.0, NEG_INF], [4.0, 4.0, NEG_INF, NEG_INF]])
    assert torch.equal(apply_top_k(logits, 2), expected)
    assert torch.equal(apply_top_k(logits, 10), logits)  # k larger than the vocabulary keeps everything


def test_apply_top_p() -> None:
    probs = torch.tensor([[0.15, 0.5, 0.05, 0.3]])  # sorted: 0.5, 0.3, 0.15, 0.05
    logits = probs.log()

    def kept(p: float) -> list[int]:
        return torch.isfinite(apply_top_p(logits, p))[0].nonzero().flatten().tolist()

    assert kept(0.7) == [1, 3]  # 0.5 < 0.7, then 0.8 >= 0.7
    assert kept(0.5) == [1]  # the top token alone already reaches p
    assert kept(0.01) == [1]  # never empty
    assert kept(0.96) == [0, 1, 2, 3]
    torch.testing.assert_close(apply_top_p(logits, 0.7)[0, [1, 3]], logits[0, [1, 3]])


def test_apply_repetition_penalty() -> None:
    logits = torch.tensor([[2.0, -2.0, 1.0, 0.5]])
    tokens = torch.tensor([[0, 1, 0]])
    expected = torch.tensor([[1.0, -4.0, 1.0, 0.5]])  # seen: positive / 2, negative * 2; unseen untouched
    assert torch.equal(apply_repetition_penalty(logits, tokens, 2.0), expected)
    assert torch.equal(apply_repetition_penalty(logits, tokens, 1.0), logits)


def test_sample_next_token_greedy_applies_the_penalty() -> None:
    logits = torch.tensor([[3.0, 2.0, 0.0]])
    assert sample_next_token(logits, torch.tensor([[2]])).item() == 0
    assert sample_next_token(logits, torch.tensor([[0]]), repetition_penalty=2.0).item() == 1


def test_repetition_penalty_makes_generation_less_repetitive() -> None:
    model = build()

    def distinct_new_tokens(penalty: float) -> int:
        return len(set(generate(model, prompt(), 30, repetition_penalty=penalty)[0, 5:].tolist()))

    assert distinct_new_tokens(100.0) > distinct_new_tokens(1.0)


def expected_with_stops(tokens: torch.Tensor, start: int, stops: set[int]) -> torch.Tensor:
    """Pad each row after its first generated stop token, from an unconstrained greedy run."""
    expected = tokens.clone()
    for row in expected:
        for pos in range(start, row.shape[0]):
            if row[pos].item() in stops:
                row[pos + 1 :] = row[pos]
                break
    return expected


def test_stop_tokens_pad_their_row() -> None:
    model = build()
    free = generate(model, prompt(), 20)
    stop = free[0, 5 + 3].item()
    out = generate(model, prompt(), 20, stop_tokens=(stop,))
    assert out.shape == free.shape
    assert torch.equal(out, expected_with_stops(free, 5, {stop}))
    assert (out[0, 5 + 3 :] == stop).all()


def test_generation_stops_early_once_every_row_stopped() -> None:
    model = build()
    free = generate(model, prompt(batch=1), 20)
    first_new = free[0, 5].item()
    calls: list[int] = []
    handle = model.register_forward_hook(lambda *_: calls.append(1))
    out = generate(model, prompt(batch=1), 20, stop_tokens=[first_new, 96])
    handle.remove()
    assert len(calls) == 1
    assert (out[0, 5:] == first_new).all()


def test_generate_restores_training_mode_and_runs_without_dropout() -> None:
    model = build(dropout=0.5).train()
    first = generate(model, prompt(), 8)
    assert model.training
    assert torch.equal(first, generate(model, prompt(), 8, use_cache=False))
    model.eval()
    generate(model, prompt(), 2)
    assert not model.training


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"max_new_tokens": 60}, "max_seq_len"),
        ({"max_new_tokens": -1}, "max_new_tokens"),
        ({"temperature": -1.0}, "temperature"),
        ({"top_k": 0}, "top_k"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"repetition_penalty": 0.0}, "repetition_penalty"),
    ],
)
def test_invalid_generate_arguments_are_named(kwargs: dict[str, object], name: str) -> None:
    arguments: dict[str, object] = {"max_new_tokens": 4, **kwargs}
    with pytest.raises(ValueError, match=name):
        generate(build(), prompt(), **arguments)
