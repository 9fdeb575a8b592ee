"""HF models from input embeddings and KV prefixes (model/prefix.py) against their plain text runs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from model.prefix import greedy_from_embeds, kv_shape, prefix_forward
from tools.tiny_hf_models import write_model


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def hf(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    path = write_model(tmp_path_factory.mktemp("prefix"), request.param, 300)
    return AutoModelForCausalLM.from_pretrained(str(path)).eval()


def _kv(model: torch.nn.Module, ids: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The per-layer keys / values a text leaves in the model's cache."""
    cache = model(input_ids=ids, use_cache=True).past_key_values
    return [(layer.keys, layer.values) for layer in cache.layers]


@torch.no_grad()
def test_embeds_and_kv_prefixes_reproduce_the_text(hf: torch.nn.Module) -> None:
    emb = hf.get_input_embeddings()
    ids = torch.randint(3, 300, (2, 12), generator=torch.Generator().manual_seed(0))
    full = hf(input_ids=ids).logits
    assert torch.equal(prefix_forward(hf, emb(ids), torch.ones(2, 12)), full)
    kv = _kv(hf, ids[:, :5])
    torch.testing.assert_close(prefix_forward(hf, emb(ids[:, 5:]), torch.ones(2, 7), kv_prefix=kv), full[:, 5:],
                               rtol=0, atol=1e-5)
    mask = torch.ones(2, 7)
    mask[1, 4:] = 0  # a right-padded continuation
    padded = prefix_forward(hf, emb(ids[:, 5:]), mask, kv_prefix=kv)
    torch.testing.assert_close(padded[1, :4], full[1, 5:9], rtol=0, atol=1e-5)


def test_gradients_reach_the_prefix_and_the_embeddings(hf: torch.nn.Module) -> None:
    n_layers, n_kv, hd = kv_shape(hf.config)
    kv = [(torch.randn(2, n_kv, 3, hd, requires_grad=True), torch.randn(2, n_kv, 3, hd, requires_grad=True))
          for _ in range(n_layers)]
    embeds = torch.randn(2, 4, hf.config.hidden_size, requires_grad=True)
    prefix_forward(hf, embeds, torch.ones(2, 4), kv_prefix=kv).logsumexp(-1).sum().backward()
    assert embeds.grad.abs().sum() > 0 and all(k.grad.abs().sum() > 0 and v.grad.abs().sum() > 0 for k, v in kv)


@torch.no_grad()
def test_greedy_from_embeds_is_generate(hf: torch.nn.Module) -> None:
    emb = hf.get_input_embeddings()
    ids = torch.randint(3, 300, (2, 12), generator=torch.Generator().manual_seed(1))

    def generate(x: torch.Tensor, n: int) -> list[int]:
        return hf.generate(x[None], do_sample=False, max_new_tokens=n, eos_token_id=None,
                           pad_token_id=0)[0, len(x):].tolist()

    got = greedy_from_embeds(hf, [emb(ids[0, :6]), emb(ids[1, :9])], max_new_tokens=5, eos_id=None)
    assert got == [generate(ids[0, :6], 5), generate(ids[1, :9], 5)]  # prompts of two lengths, left-padded
    kv = _kv(hf, ids[:, :5])
    got = greedy_from_embeds(hf, [emb(ids[0, 5:8]), emb(ids[1, 5:10])], max_new_tokens=4, eos_id=None, kv_prefix=kv)
    assert got == [generate(ids[0, :8], 4), generate(ids[1, :10], 4)]
    first = generate(ids[0, :6], 1)[0]  # stopping: that token as eos ends the row before it
    assert greedy_from_embeds(hf, [emb(ids[0, :6])], max_new_tokens=5, eos_id=first) == [[]]


def test_a_prefix_of_the_wrong_shape_is_refused(hf: torch.nn.Module) -> None:
    n_layers, n_kv, hd = kv_shape(hf.config)
    good = (torch.zeros(1, n_kv, 2, hd), torch.zeros(1, n_kv, 2, hd))
    with pytest.raises(ValueError, match=rf"one \(K, V\) per layer: {n_layers} expected, 1 given"):
        prefix_forward(hf, torch.zeros(1, 2, hf.config.hidden_size), torch.ones(1, 2), kv_prefix=[good])
    bad = (torch.zeros(1, n_kv + 1, 2, hd), torch.zeros(1, n_kv + 1, 2, hd))
    with pytest.raises(ValueError, match=rf"expected \(B, {n_kv}, M, {hd}\)"):
        prefix_forward(hf, torch.zeros(1, 2, hf.config.hidden_size), torch.ones(1, 2), kv_prefix=[bad] * n_layers)


def test_write_model_gives_two_vocabularies(tmp_path: Path) -> None:
    from transformers import AutoConfig

    a, b = write_model(tmp_path, "llama", 300), write_model(tmp_path, "qwen2", 360)
    assert AutoConfig.from_pretrained(str(a)).vocab_size != AutoConfig.from_pretrained(str(b)).vocab_size
