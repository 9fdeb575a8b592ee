"""HF causal LMs as they are: loading, the wrapper, shared generation, LoRA target selection, QLoRA gradients."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from model import generate
from model.args import ModelConfigError
from model.hf_causal import CausalLM, causal_lm_config, load_causal_lm, quantization_config
from model.lora import apply_lora, block_index, lora_targets
from tests.hf_models import FAMILIES, make_hf_model


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hf")
    return {family: make_hf_model(root, family) for family in FAMILIES}


@pytest.mark.parametrize("family", FAMILIES)
def test_wrapper_gives_the_hf_logits_and_masks_padding(models: dict[str, Path], family: str) -> None:
    hf = load_causal_lm(models[family])
    model = CausalLM(hf).eval()
    x = torch.randint(0, 250, (2, 12))
    with torch.no_grad():
        assert torch.equal(model(x), hf(input_ids=x).logits)
        # right padding: the real tokens' logits do not depend on what the padding holds
        doc_ids = torch.zeros_like(x)
        doc_ids[1, 8:] = 1
        padded = x.clone()
        padded[1, 8:] = 0
        a = model(x, doc_ids=doc_ids)[1, :8]
        b = model(padded, doc_ids=doc_ids)[1, :8]
    torch.testing.assert_close(a, b)


@pytest.mark.parametrize("family", FAMILIES)
def test_shared_generate_with_the_hf_cache_matches_recomputing(models: dict[str, Path], family: str) -> None:
    model = CausalLM(load_causal_lm(models[family]))
    prompt = torch.randint(0, 250, (2, 5))
    cached = generate(model, prompt, 8)
    recomputed = generate(model, prompt, 8, use_cache=False)
    assert torch.equal(cached, recomputed)
    assert model.training  # generate restores the mode


def test_lora_targets_by_name_layer_range_and_default(models: dict[str, Path]) -> None:
    llama = load_causal_lm(models["llama"])
    every = lora_targets(llama)
    assert len(every) == 2 * 7 and not any("lm_head" in n for n in every)
    assert lora_targets(llama, ["q_proj", "self_attn.v_proj"], [1]) == [
        "model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.v_proj"]
    gpt2 = load_causal_lm(models["gpt2"])
    assert {n.rsplit(".", 1)[1] for n in lora_targets(gpt2)} == {"c_attn", "c_proj", "c_fc"}
    assert block_index("transformer.h.1.attn.c_attn") == 1
    with pytest.raises(ModelConfigError, match=r"match no linear layer.*named: down_proj, gate_proj, k_proj"):
        lora_targets(llama, ["c_attn"])
    with pytest.raises(ModelConfigError, match=r"blocks \[5\] do not exist; the model has blocks 0-1"):
        lora_targets(llama, ["q_proj"], [0, 5])


def test_refuses_missing_dirs_and_models_that_are_not_causal_lms(tmp_path: Path, models: dict[str, Path]) -> None:
    with pytest.raises(ModelConfigError, match="no such directory"):
        causal_lm_config(tmp_path / "nope")
    t5 = tmp_path / "t5"
    t5.mkdir()
    (t5 / "config.json").write_text('{"model_type": "t5"}')
    with pytest.raises(ModelConfigError, match="model_type='t5' is not a causal language model"):
        causal_lm_config(t5)
    empty = tmp_path / "no_weights"
    empty.mkdir()
    (empty / "config.json").write_text((models["llama"] / "config.json").read_text())
    with pytest.raises(ModelConfigError, match="no weights"):
        causal_lm_config(empty)


def test_qlora_adapters_get_gradients_after_an_evaluation(models: dict[str, Path]) -> None:
    """The bitsandbytes CPU trap: an eval-mode no-grad forward must not leave LoRA without gradients."""
    base = load_causal_lm(models["llama"], quantization=quantization_config("4bit", compute_dtype=torch.float32))
    assert any(type(m).__name__ == "Linear4bit" for m in base.modules())
    model = CausalLM(apply_lora(base, lora_targets(base), r=4, alpha=8, quantized=True))
    x = torch.randint(0, 250, (2, 10))
    model.eval()
    with torch.no_grad():
        before = model(x)
    model.train()
    for _ in range(2):  # one step makes lora_B non-zero, the next sends gradients to lora_A as well
        model.zero_grad()
        model(x).float().logsumexp(-1).mean().backward()
        for p in model.parameters():
            if p.grad is not None:
                p.data -= 0.1 * p.grad
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads.values())
    with torch.no_grad():
        assert not torch.equal(model.eval()(x), before)
