"""The text sample a language-model run ends with."""

from __future__ import annotations

from pathlib import Path

import torch

from model import generate
from parallel.tp import FullLogits, TPContext
from train.config.schema import SampleSection


def generate_sample(s: SampleSection, model: torch.nn.Module, tokenizer_dir: Path, device: torch.device,
                    tp_ctx: TPContext, *, seed: int) -> str | None:
    """Every rank generates the same text (same seed): ZeRO-3 gathers layers and TP the logits as it goes."""
    if s.max_new_tokens == 0:
        return None
    if tp_ctx.size > 1:
        model = FullLogits(model, tp_ctx)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    ids = torch.tensor([tok.encode(s.prompt) or [tok.eos_token_id]], device=device)
    gen = torch.Generator(device=device).manual_seed(seed)
    out = generate(model, ids, s.max_new_tokens, temperature=s.temperature, top_k=s.top_k, top_p=s.top_p,
                   repetition_penalty=s.repetition_penalty, stop_tokens=(tok.eos_token_id,), generator=gen)
    return tok.decode(out[0].tolist(), skip_special_tokens=True)
