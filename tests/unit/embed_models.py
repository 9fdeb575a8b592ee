"""Tiny random HF causal LMs and a small trained BPE tokenizer for the vocabulary-extension tests (no hub)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import transformers

from train.data.tokenizer import load_tokenizer, train_bpe_tokenizer
from train.vocab.extend import ExtensionInfo, encode_blocks, freeze_all_but_new_rows

CORPUS = (
    "the quick brown fox jumps over the lazy dog. a dog and a fox walk by the river bank. "
    "over the hills the old dog sleeps while the brown fox runs.\n"
) * 40 + "abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ 0123456789 .,;:!?'\"-\n" * 4
NEW_WORDS = ["zorblax", "quuxite", "snerg"]
TRAIN_TEXT = "the zorblax jumps over the quuxite dog. a snerg and a zorblax walk by the quuxite snerg. " * 12
KINDS = ("llama", "qwen2", "gpt2")


def make_tokenizer(root: Path) -> Path:
    """A byte-level BPE of about 300 tokens trained on CORPUS, saved as a HF tokenizer dir."""
    corpus = root / "corpus.txt"
    corpus.write_text(CORPUS, encoding="utf-8")
    return train_bpe_tokenizer([corpus], 300, root / "tok")


def hf_config(kind: str, vocab_size: int, tied: bool) -> transformers.PretrainedConfig:
    """A two-layer config of `kind` with hidden size 64."""
    if kind == "gpt2":
        return transformers.GPT2Config(
            vocab_size=vocab_size, n_embd=64, n_layer=2, n_head=4, n_positions=128, tie_word_embeddings=tied
        )
    cls = {"llama": transformers.LlamaConfig, "qwen2": transformers.Qwen2Config}[kind]
    return cls(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
        tie_word_embeddings=tied, initializer_range=0.1,
    )


def save_model(root: Path, tok_dir: Path, kind: str, tied: bool, *, seed: int = 0, extra_rows: int = 0) -> Path:
    """Build a random `kind` model for the tokenizer (plus `extra_rows` spare rows) and save it with it."""
    tokenizer = load_tokenizer(tok_dir)
    torch.manual_seed(seed)
    config = hf_config(kind, len(tokenizer) + extra_rows, tied)
    model = transformers.AutoModelForCausalLM.from_config(config)
    out = root / f"{kind}_{'tied' if tied else 'untied'}_{seed}_{extra_rows}"
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def load_model(path: Path, *, four_bit: bool = False, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """Load a saved model (nf4 body when `four_bit`), already in train mode (before any forward)."""
    from model.hf_causal import load_causal_lm, quantization_config

    quant = quantization_config("4bit", compute_dtype=torch.float32) if four_bit else None
    return load_causal_lm(path, dtype=dtype, quantization=quant)  # training mode, no CPU inference repacking


def train_new_rows(
    model: torch.nn.Module, tokenizer: object, info: ExtensionInfo, steps: int, *, lr: float = 3e-2
) -> list[float]:
    """Freeze all but the new rows and run `steps` AdamW steps (weight_decay 0) of causal LM loss on TRAIN_TEXT."""
    params = freeze_all_but_new_rows(model, info)
    opt = torch.optim.AdamW([{"params": params, "weight_decay": 0.0}], lr=lr)
    data = encode_blocks(tokenizer, [TRAIN_TEXT], 32)
    x, y = data.batch(np.arange(len(data)))[:2]
    losses = []
    for _ in range(steps):
        logits = model(input_ids=x).logits  # (B, T, V)
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), y.flatten())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses
