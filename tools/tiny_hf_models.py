"""Write tiny random HF causal LMs (Llama- and Qwen2-style, each with its own byte-level BPE of another size) for CPU
smoke runs of recipes that need HF bases, e.g. train/configs/soft_prompt_cpu.yaml.

    python tools/tiny_hf_models.py --out models/tiny          # models/tiny/llama, models/tiny/qwen2

The tokenizers are trained on the synthetic QA set's text (train/research/qa_data.py), so they cover it. Existing
model directories are kept. Prints the directories written.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

from tools import ToolParser
from train.data.tokenizer import train_bpe_tokenizer
from train.research.qa_data import synthetic_qa

FAMILIES = {"llama": 300, "qwen2": 360}  # family -> tokenizer vocabulary size (different on purpose)


def write_model(out: Path, family: str, vocab_size: int, *, seed: int = 0) -> Path:
    """A 2-layer random ``family`` model with a BPE of ``vocab_size`` tokens, saved in ``out/family``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, Qwen2Config

    target = out / family
    if (target / "config.json").is_file():
        return target
    with tempfile.TemporaryDirectory() as tmp:
        corpus = Path(tmp) / "qa.txt"
        corpus.write_text("\n".join(f"{e.prompt}\nAnswer: {e.answers[0]}" for e in synthetic_qa(400, seed=seed)))
        tok_dir = train_bpe_tokenizer([corpus], vocab_size, Path(tmp) / "tok")
        tok = AutoTokenizer.from_pretrained(str(tok_dir))
    ids = {"bos_token_id": tok.eos_token_id, "eos_token_id": tok.eos_token_id, "pad_token_id": tok.eos_token_id,
           "initializer_range": 0.3}  # random weights large enough for the inputs to matter
    cls = LlamaConfig if family == "llama" else Qwen2Config
    config = cls(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, **ids)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(str(target))
    tok.save_pretrained(str(target))
    return target


def main(argv: list[str] | None = None) -> int:
    parser = ToolParser(prog="tools/tiny_hf_models.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("models/tiny"), help="parent directory (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    for family, vocab in FAMILIES.items():
        print(write_model(args.out, family, vocab, seed=args.seed))
    return 0


if __name__ == "__main__":
    sys.exit(main())
