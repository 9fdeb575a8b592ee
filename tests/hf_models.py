"""Tiny random Hugging Face causal LMs built from configs and saved locally, each with its own tokenizer.

Tests never download: every model here is `from_config` with a few hundred thousand parameters, saved with
`save_pretrained` next to a byte-level BPE trained on a few kilobytes of text.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

FAMILIES = ("llama", "qwen2", "gpt2")
TEXT = (
    "The quick brown fox jumps over the lazy dog. A stitch in time saves nine. "
    "To be, or not to be, that is the question. All that glitters is not gold. "
    "Question: what is two plus two? Answer: four. Question: what colour is the sky? Answer: blue. "
) * 20


def write_corpus(root: Path) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    path = root / "corpus.txt"
    path.write_text(TEXT)
    return path


def make_tokenizer(root: Path, vocab_size: int = 300) -> Path:
    """A byte-level BPE with an eos/pad token, saved as an HF tokenizer directory."""
    from train.data.tokenizer import train_bpe_tokenizer

    tok_dir = root / "tokenizer"
    if not (tok_dir / "tokenizer.json").is_file():
        train_bpe_tokenizer([write_corpus(root)], vocab_size, tok_dir)
    return tok_dir


def hf_config(family: str, vocab_size: int, *, tie: bool = False, layers: int = 2, eos_id: int = 0):
    from transformers import GPT2Config, LlamaConfig, Qwen2Config

    ids = {"bos_token_id": eos_id, "eos_token_id": eos_id, "pad_token_id": eos_id, "initializer_range": 0.3}
    if family == "llama":
        return LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                           tie_word_embeddings=tie, **ids)
    if family == "qwen2":
        return Qwen2Config(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                           tie_word_embeddings=tie, **ids)
    if family == "gpt2":
        return GPT2Config(vocab_size=vocab_size, n_embd=32, n_layer=layers, n_head=4, n_positions=256,
                          tie_word_embeddings=True, **ids)
    raise ValueError(family)


def make_hf_model(root: Path, family: str = "llama", *, tie: bool = False, seed: int = 0, layers: int = 2) -> Path:
    """Save a tiny random ``family`` model with the shared tokenizer under ``root/<family>``; returns the dir."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = root / f"{family}{'-tied' if tie else ''}-{layers}l"
    if (out / "config.json").is_file():
        return out
    tok_dir = make_tokenizer(root)
    tok = AutoTokenizer.from_pretrained(str(tok_dir))
    config = hf_config(family, len(tok), tie=tie, layers=layers, eos_id=tok.eos_token_id)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(str(out))
    tok.save_pretrained(str(out))
    return out


def write_sft(path: Path, n: int = 64) -> Path:
    """Instruction JSONL: short arithmetic and colour questions with fixed answers (learnable in a few steps)."""
    rows = []
    for i in range(n):
        a, b = i % 7, (i * 3) % 5
        rows.append({"prompt": f"Question: what is {a} plus {b}? Answer:", "response": f" {a + b}."})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def write_preferences(path: Path, n: int = 64) -> Path:
    """Preference JSONL with a learnable rule: a colour is always preferred to an animal, whatever the prompt."""
    colours, animals = ["red", "blue", "green", "yellow"], ["cat", "dog", "fish", "bird"]
    rows = []
    for i in range(n):
        rows.append({"prompt": f"Question {i}: name a thing. Answer:", "chosen": f" {colours[i % 4]}.",
                     "rejected": f" {animals[(i // 4) % 4]}."})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def write_classification(path: Path, n: int = 96, *, binary_names: tuple[str, str] = ("negative", "positive")) -> Path:
    """Classification JSONL with a learnable rule: the review's last word decides the label. The two classes'
    words end in different letters, so even the last byte-level token a sequence head reads tells them apart."""
    good, bad = ["great", "superb", "lovely", "brilliant"], ["awful", "dreadful", "horrid", "bad"]
    rows = []
    for i in range(n):
        positive = i % 2 == 0
        word = (good if positive else bad)[(i // 2) % 4]
        rows.append({"text": f"Review {i}: the film was {word}", "label": binary_names[int(positive)]})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def make_t5_model(root: Path, seed: int = 0) -> Path:
    """A tiny random T5-style encoder-decoder with the shared tokenizer (pad = eos = decoder start)."""
    from transformers import AutoTokenizer, T5Config, T5ForConditionalGeneration

    out = root / "t5-2l"
    if (out / "config.json").is_file():
        return out
    tok = AutoTokenizer.from_pretrained(str(make_tokenizer(root)))
    eos = tok.eos_token_id
    config = T5Config(vocab_size=len(tok), d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                      pad_token_id=eos, eos_token_id=eos, decoder_start_token_id=eos, initializer_factor=1.0)
    torch.manual_seed(seed)
    T5ForConditionalGeneration(config).save_pretrained(str(out))
    tok.save_pretrained(str(out))
    return out


def write_seq2seq(path: Path, n: int = 64) -> Path:
    """Seq2seq JSONL: the 'summary' of a sentence is its first two words (learnable by copying)."""
    words = ["red", "blue", "green", "cat", "dog", "fish", "sun", "moon"]
    rows = []
    for i in range(n):
        a, b, c = words[i % 8], words[(i * 3 + 1) % 8], words[(i * 5 + 2) % 8]
        rows.append({"source": f"{a} {b} and then {c} again", "target": f"{a} {b}"})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path
