"""Soft prompts and key/value prefixes on HF causal LMs (model/prefix.py): parity with plain text, gradients, greedy."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from model.hf_causal import CausalLM, load_causal_lm
from model.prefix import greedy_from_embeds, kv_shape, prefix_cache, prefix_forward
from tests.hf_models import FAMILIES, make_hf_model

ATOL = 1e-5


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("prefix")
    return {family: make_hf_model(root, family) for family in FAMILIES}


def load(models: dict[str, Path], family: str) -> torch.nn.Module:
    """The tiny model in float32, in training mode (what `load_causal_lm` gives); GPT-2 (dropout 0.1) in eval."""
    model = load_causal_lm(models[family])
    return model.eval() if family == "gpt2" else model


def embed(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    return model.get_input_embeddings()(ids)


def text_prefix(model: torch.nn.Module, ids: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per-layer (K, V), each (B, n_kv, M, hd), that the model caches for the text ids (B, M)."""
    with torch.no_grad():
        past = model(input_ids=ids, use_cache=True).past_key_values
    return [(layer.keys.clone(), layer.values.clone()) for layer in past.layers]


def ids(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(1, 250, shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("family", FAMILIES)
def test_embeddings_of_ids_give_the_models_logits(models: dict[str, Path], family: str) -> None:
    model = load(models, family)
    x = ids(2, 9)
    with torch.no_grad():
        expected = model(input_ids=x).logits
        got = prefix_forward(model, embed(model, x), torch.ones_like(x))
        assert got.dtype == torch.float32 and got.shape == expected.shape
        torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)
        # right padding: row 1 holds 5 real tokens; its logits there are those of the 5 tokens alone
        mask = torch.ones_like(x)
        mask[1, 5:] = 0
        padded = prefix_forward(CausalLM(model), embed(model, x), mask)
        alone = model(input_ids=x[1:, :5]).logits
    torch.testing.assert_close(padded[0], expected[0], atol=ATOL, rtol=0)
    torch.testing.assert_close(padded[1, :5], alone[0], atol=ATOL, rtol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_kv_prefix_of_a_text_equals_the_text(models: dict[str, Path], family: str) -> None:
    model = load(models, family)
    p, c = ids(2, 6, seed=1), ids(2, 7, seed=2)
    prefix = text_prefix(model, p)
    assert [tuple(k.shape) for k, _ in prefix] == [(2, *kv_shape(model.config)[1:2], 6, kv_shape(model.config)[2])] * 2
    with torch.no_grad():
        full = model(input_ids=torch.cat([p, c], dim=1)).logits[:, 6:]  # (2, 7, V)
        got = prefix_forward(model, embed(model, c), torch.ones_like(c), kv_prefix=prefix)
        torch.testing.assert_close(got, full, atol=ATOL, rtol=0)
        # right-padded continuations: row 0 keeps 4 tokens, row 1 all 7
        mask = torch.ones_like(c)
        mask[0, 4:] = 0
        padded = prefix_forward(model, embed(model, c), mask, kv_prefix=prefix)
        short = model(input_ids=torch.cat([p[:1], c[:1, :4]], dim=1)).logits[:, 6:]
    torch.testing.assert_close(padded[0, :4], short[0], atol=ATOL, rtol=0)
    torch.testing.assert_close(padded[1], full[1], atol=ATOL, rtol=0)
    # the prefix tensors are left as they were (a fresh cache each call)
    torch.testing.assert_close(prefix[0][0], text_prefix(model, p)[0][0])


@pytest.mark.parametrize("family", FAMILIES)
def test_gradients_reach_the_prefix_and_the_embeddings(models: dict[str, Path], family: str) -> None:
    model = load(models, family)
    model.requires_grad_(False)
    prefix = [(k.requires_grad_(), v.requires_grad_()) for k, v in text_prefix(model, ids(2, 3, seed=3))]
    x = embed(model, ids(2, 5, seed=4)).detach().requires_grad_()
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    prefix_forward(model, x, mask, kv_prefix=prefix).logsumexp(-1).sum().backward()
    assert x.grad is not None and x.grad[:, :3].abs().sum(-1).min() > 0
    for k, v in prefix:
        assert k.grad is not None and v.grad is not None
        assert k.grad.abs().sum() > 0 and v.grad.abs().sum() > 0


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_from_embeds_matches_generate(models: dict[str, Path], family: str) -> None:
    model = load(models, family)
    prompts = [ids(1, n, seed=10 + n) for n in (3, 7, 5)]
    n_new = 8
    with torch.no_grad():
        expected = [model.generate(p, attention_mask=torch.ones_like(p), do_sample=False, max_new_tokens=n_new,
                                   eos_token_id=None, pad_token_id=0)[0, p.shape[1]:].tolist() for p in prompts]
    model.train()  # greedy decoding runs in eval mode (GPT-2's dropout off) and gives the mode back
    got = greedy_from_embeds(model, [embed(model, p[0]) for p in prompts], max_new_tokens=n_new, eos_id=None)
    assert got == expected
    assert model.training
    # a row stops before its eos: take as eos a token that first appears at step >= 1 of prompt 0's continuation
    first = next(i for i in range(1, n_new) if expected[0][i] not in expected[0][:i])
    eos = expected[0][first]
    stopped = greedy_from_embeds(model, [embed(model, p[0]) for p in prompts], max_new_tokens=n_new, eos_id=eos)
    for row, full in zip(stopped, expected):
        assert row == (full[:full.index(eos)] if eos in full else full)
    assert stopped[0] == expected[0][:first]


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_after_a_kv_prefix_matches_generate_on_the_text(models: dict[str, Path], family: str) -> None:
    model = load(models, family)
    p = ids(2, 4, seed=20)
    prompts = [ids(1, 6, seed=21), ids(1, 2, seed=22)]
    n_new = 6
    with torch.no_grad():
        expected = []
        for i, q in enumerate(prompts):
            text = torch.cat([p[i:i + 1], q], dim=1)
            expected.append(model.generate(text, attention_mask=torch.ones_like(text), do_sample=False,
                                           max_new_tokens=n_new, eos_token_id=None, pad_token_id=0)
                            [0, text.shape[1]:].tolist())
    got = greedy_from_embeds(CausalLM(model), [embed(model, q[0]) for q in prompts], max_new_tokens=n_new,
                             eos_id=None, kv_prefix=text_prefix(model, p))
    assert got == expected


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_peft_model_takes_a_prefix(models: dict[str, Path], family: str) -> None:
    from peft import LoraConfig, get_peft_model

    model = load(models, family)
    lora = LoraConfig(r=2, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    peft_model = get_peft_model(model, lora)
    p, c = ids(1, 4, seed=30), ids(1, 5, seed=31)
    prefix = text_prefix(peft_model, p)
    with torch.no_grad():
        full = peft_model(input_ids=torch.cat([p, c], dim=1)).logits[:, 4:]
        got = prefix_forward(peft_model, embed(peft_model, c), torch.ones_like(c), kv_prefix=prefix)
    torch.testing.assert_close(got, full, atol=ATOL, rtol=0)
    assert greedy_from_embeds(peft_model, [embed(peft_model, c[0])], max_new_tokens=3, eos_id=None,
                              kv_prefix=prefix)


@pytest.mark.parametrize("family", FAMILIES)
def test_a_bad_prefix_is_refused_naming_the_expected_shape(models: dict[str, Path], family: str) -> None:
    model = load(models, family)
    n_layers, n_kv, hd = kv_shape(model.config)
    assert (n_layers, n_kv, hd) == (2, 4 if family == "gpt2" else 2, 8)
    good = [(torch.zeros(1, n_kv, 3, hd), torch.zeros(1, n_kv, 3, hd)) for _ in range(n_layers)]
    x, mask = torch.zeros(1, 2, 32), torch.ones(1, 2, dtype=torch.long)
    with pytest.raises(ValueError, match=f"model_type='{family}'.*expected n_layers=2"):
        prefix_forward(model, x, mask, kv_prefix=good[:1])
    expected = rf"\(B, n_kv_heads={n_kv}, M, head_dim={hd}\)"
    with pytest.raises(ValueError, match=expected):
        prefix_forward(model, x, mask, kv_prefix=[(torch.zeros(1, n_kv + 1, 3, hd), v) for _, v in good])
    with pytest.raises(ValueError, match=expected):
        prefix_cache([(k, torch.zeros(1, n_kv, 3, hd // 2)) for k, _ in good], model.config)
    with pytest.raises(ValueError, match="expected batch and prefix length"):
        prefix_forward(model, x, mask, kv_prefix=[good[0], (good[1][0], torch.zeros(1, n_kv, 5, hd))])
    with pytest.raises(ValueError, match="batch size 1, expected 2"):
        prefix_forward(model, torch.zeros(2, 2, 32), torch.ones(2, 2), kv_prefix=good)
    with pytest.raises(ValueError, match="hidden_size=32"):
        prefix_forward(model, torch.zeros(1, 2, 16), mask)
    with pytest.raises(ValueError, match="T_i >= 1"):
        greedy_from_embeds(model, [torch.zeros(0, 32)], max_new_tokens=2, eos_id=None)


def test_a_bfloat16_model_takes_float32_inputs_and_gives_float32_logits(models: dict[str, Path]) -> None:
    model = load_causal_lm(models["llama"], dtype=torch.bfloat16)
    p, c = ids(1, 4, seed=40), ids(1, 5, seed=41)
    prefix = [(k.float(), v.float()) for k, v in text_prefix(model, p)]
    with torch.no_grad():
        full = model(input_ids=torch.cat([p, c], dim=1)).logits[:, 4:].float()
        got = prefix_forward(model, embed(model, c).float(), torch.ones_like(c), kv_prefix=prefix)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, full, atol=1e-2, rtol=0)
    assert len(greedy_from_embeds(model, [embed(model, c[0]).float()], max_new_tokens=3, eos_id=None,
                                  kv_prefix=prefix)[0]) == 3


def test_gradient_checkpointing_with_a_prefix_is_refused(models: dict[str, Path]) -> None:
    model = load(models, "llama")
    prefix = text_prefix(model, ids(1, 3))
    model.activation_checkpointing_enable()
    x, mask = embed(model, ids(1, 2)), torch.ones(1, 2)
    with pytest.raises(ValueError, match="activation_checkpointing_disable"):
        prefix_forward(model, x, mask, kv_prefix=prefix)
    model.eval()
    with torch.no_grad():
        prefix_forward(model, x, mask, kv_prefix=prefix)  # eval mode keeps the cache
