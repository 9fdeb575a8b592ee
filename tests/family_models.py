"""Tiny random Llama 3.x / Mistral / Qwen2 / Qwen3 models with awkward shapes, built from transformers configs.

Each family's config has what makes its architecture differ from plain Llama, at sizes a CPU runs in
milliseconds: an odd vocabulary, one or two KV heads, a head width that is not hidden_size / heads, scaled RoPE,
a sliding window shorter than the test sequences, tied and untied heads. `perturb` draws every weight (norms and
biases included) at random, so a missing bias or norm shows in the logits.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

FAMILIES = ("llama3", "mistral", "qwen2", "qwen3")
SEQ_LEN = 24  # longer than every window below
WINDOWS = {"mistral": 5, "qwen2": 6, "qwen3": 7}


def family_config(family: str, *, layers: int = 2) -> Any:
    """The transformers config of `family`'s tiny awkward model."""
    from transformers import LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config

    common: dict[str, Any] = {"max_position_embeddings": 64, "num_hidden_layers": layers, "bos_token_id": None,
                              "eos_token_id": None, "pad_token_id": None}
    if family == "llama3":  # Llama 3.1 RoPE scaling, attention_bias (o_proj too), 1 KV head, head_dim 16 != 48 / 4
        return LlamaConfig(vocab_size=97, hidden_size=48, intermediate_size=72, num_attention_heads=4,
                           num_key_value_heads=1, head_dim=16, attention_bias=True, tie_word_embeddings=False,
                           rope_parameters={"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0,
                                            "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                            "original_max_position_embeddings": 16}, **common)
    if family == "mistral":  # a window on every layer, head_dim 12 != 32 / 4, tied
        return MistralConfig(vocab_size=101, hidden_size=32, intermediate_size=56, num_attention_heads=4,
                             num_key_value_heads=1, head_dim=12, sliding_window=WINDOWS["mistral"],
                             tie_word_embeddings=True, rope_parameters={"rope_type": "default", "rope_theta": 500.0},
                             **common)
    if family == "qwen2":  # q/k/v biases, windows on the layers from 1 on, linear RoPE scaling, untied
        return Qwen2Config(vocab_size=89, hidden_size=32, intermediate_size=48, num_attention_heads=4,
                           num_key_value_heads=2, use_sliding_window=True, sliding_window=WINDOWS["qwen2"],
                           max_window_layers=1, tie_word_embeddings=False,
                           rope_parameters={"rope_type": "linear", "rope_theta": 1000.0, "factor": 2.0}, **common)
    if family == "qwen3":  # q/k RMSNorm, head_dim 16 != 40 / 4, 1 KV head, a window on layer 1, tied
        return Qwen3Config(vocab_size=103, hidden_size=40, intermediate_size=64, num_attention_heads=4,
                           num_key_value_heads=1, head_dim=16, use_sliding_window=True,
                           sliding_window=WINDOWS["qwen3"], max_window_layers=1, tie_word_embeddings=True,
                           rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}, **common)
    raise ValueError(f"unknown family {family!r}: choose one of {FAMILIES}")


@torch.no_grad()
def perturb(model: torch.nn.Module, seed: int) -> None:
    """Draw every parameter at random: matrices and biases ~ N(0, 0.15), norm weights ~ 1 + N(0, 0.2)."""
    gen = torch.Generator().manual_seed(seed)
    for name, param in model.named_parameters():
        noise = torch.randn(param.shape, generator=gen)
        param.copy_(1.0 + 0.2 * noise if "norm" in name else 0.15 * noise)


def make_family_model(root: Path, family: str, *, seed: int = 0, layers: int = 2) -> Path:
    """Save `family`'s tiny random model (fp32 safetensors, eager attention) under root/family; returns the dir."""
    from transformers import AutoModelForCausalLM

    out = root / family
    if (out / "config.json").is_file():
        return out
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(family_config(family, layers=layers), dtype=torch.float32)
    perturb(model, seed)
    model.save_pretrained(out)
    return out


def load_reference(path: Path) -> Any:
    """The saved model as transformers loads it: fp32, eval mode."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def sample_ids(vocab_size: int, batch: int = 2, seq_len: int = SEQ_LEN, seed: int = 1) -> torch.Tensor:
    """(batch, seq_len) random token ids."""
    return torch.randint(0, vocab_size, (batch, seq_len), generator=torch.Generator().manual_seed(seed))
