"""Autoregressive generation: a preallocated KV cache, logits processing and the `generate` loop."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from model.cache import KVCache
from model.model import Transformer


def apply_repetition_penalty(logits: torch.Tensor, tokens: torch.Tensor, penalty: float) -> torch.Tensor:
    """Make already-seen tokens less likely (CTRL rule): positive logits / penalty, negative * penalty.

    logits: (B, V), tokens: (B, T) -> (B, V). A penalty of 1.0 changes nothing.
    """
    seen = logits.gather(-1, tokens)  # (B, T)
    seen = torch.where(seen > 0, seen / penalty, seen * penalty)
    return logits.scatter(-1, tokens, seen)


def apply_top_k(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the k largest logits of each row (ties with the k-th included), set the rest to -inf."""
    kth = torch.topk(logits, min(k, logits.shape[-1]), dim=-1).values[..., -1:]  # (B, 1)
    return logits.masked_fill(logits < kth, float("-inf"))


def apply_top_p(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Nucleus filter: keep the most likely tokens until their probability mass reaches p (at least one)."""
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)  # (B, V)
    probs = sorted_logits.softmax(dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs  # (B, V): mass of the strictly more likely tokens
    sorted_logits = sorted_logits.masked_fill(mass_before >= p, float("-inf"))
    return logits.scatter(-1, order, sorted_logits)


def sample_next_token(
    logits: torch.Tensor,
    tokens: torch.Tensor,
    *,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    repetition_penalty: float = 1.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Pick one token per row from logits (B, V) given the tokens so far (B, T); returns (B,).

    temperature 0 is greedy (argmax); otherwise sample from softmax(logits / temperature) after the
    top-k and top-p filters.
    """
    logits = logits.float()
    if repetition_penalty != 1.0:
        logits = apply_repetition_penalty(logits, tokens, repetition_penalty)
    if temperature == 0.0:
        return logits.argmax(dim=-1)
    logits = logits / temperature
    if top_k is not None:
        logits = apply_top_k(logits, top_k)
    if top_p is not None and top_p < 1.0:
        logits = apply_top_p(logits, top_p)
    probs = logits.softmax(dim=-1)  # (B, V)
    return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(-1)


def _check_generate_args(
    input_ids: torch.Tensor,
    max_new_tokens: int,
    max_seq_len: int,
    temperature: float,
    top_k: int | None,
    top_p: float | None,
    repetition_penalty: float,
) -> None:
    """Raise ValueError naming the first invalid argument of `generate`."""
    if input_ids.dim() != 2 or input_ids.shape[1] == 0:
        raise ValueError(f"input_ids must be (B, T) with T >= 1, got shape {tuple(input_ids.shape)}")
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens={max_new_tokens} must be >= 0")
    if input_ids.shape[1] + max_new_tokens > max_seq_len:
        raise ValueError(
            f"prompt length {input_ids.shape[1]} + max_new_tokens={max_new_tokens} exceeds the model's "
            f"max_seq_len={max_seq_len}: shorten the prompt or ask for fewer tokens"
        )
    if temperature < 0:
        raise ValueError(f"temperature={temperature} must be >= 0 (0 means greedy)")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k={top_k} must be >= 1, or None to disable it")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p={top_p} must be in (0, 1], or None to disable it")
    if repetition_penalty <= 0:
        raise ValueError(f"repetition_penalty={repetition_penalty} must be > 0 (1.0 disables it)")


@torch.no_grad()
def generate(
    model: Transformer | torch.nn.Module,
    input_ids: torch.Tensor,
    max_new_tokens: int,
    *,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    repetition_penalty: float = 1.0,
    stop_tokens: Sequence[int] = (),
    use_cache: bool = True,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Extend each prompt of input_ids (B, T) by max_new_tokens tokens; returns (B, T + max_new_tokens).

    `model` is a `Transformer` (or a wrapper with its `args`), or any module with `max_seq_len` and
    `new_cache` such as `model.hf_causal.CausalLM`.
    A row that produces one of `stop_tokens` is padded with that token up to the end; the loop stops
    early once every row has stopped. The model runs in eval mode and gets its previous mode back.
    `generator` must live on input_ids' device; it makes sampling reproducible.
    """
    max_seq_len = model.max_seq_len if hasattr(model, "max_seq_len") else model.args.max_seq_len
    _check_generate_args(input_ids, max_new_tokens, max_seq_len, temperature, top_k, top_p, repetition_penalty)
    B, T = input_ids.shape
    device = input_ids.device
    out = torch.empty(B, T + max_new_tokens, dtype=torch.long, device=device)  # (B, T + n)
    out[:, :T] = input_ids
    stops = torch.tensor(list(stop_tokens), dtype=torch.long, device=device)
    finished = torch.zeros(B, dtype=torch.bool, device=device)
    pad = torch.zeros(B, dtype=torch.long, device=device)  # the stop token each finished row repeats
    cache = None
    if use_cache:
        dtype = next(model.parameters()).dtype
        if hasattr(model, "new_cache"):  # a model with its own cache (model/hf_causal.py)
            cache = model.new_cache(B, T + max_new_tokens, device=device, dtype=dtype)
        else:
            cache = KVCache.for_model(model.args, B, T + max_new_tokens, device=device, dtype=dtype)

    was_training = model.training
    model.eval()
    try:
        for pos in range(T, T + max_new_tokens):
            # With a cache, the prompt goes in once, then one new token per step.
            step_input = out[:, pos - 1 : pos] if cache is not None and cache.length > 0 else out[:, :pos]
            logits = model(step_input, cache=cache)[:, -1]  # (B, V)
            token = sample_next_token(
                logits, out[:, :pos], temperature=temperature, top_k=top_k, top_p=top_p,
                repetition_penalty=repetition_penalty, generator=generator,
            )  # (B,)
            token = torch.where(finished, pad, token)
            newly_stopped = torch.isin(token, stops) & ~finished
            pad = torch.where(newly_stopped, token, pad)
            finished |= newly_stopped
            out[:, pos] = token
            if len(stops) and bool(finished.all()):
                out[:, pos + 1 :] = pad[:, None]
                break
    finally:
        model.train(was_training)
    return out
