"""Autoregressive generation: a preallocated KV cache, logits processing and the `generate` loop."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from model.args import ModelArgs
from model.model import Transformer


class KVCache:
    """Keys and values of every layer, preallocated as (B, max_len, Hkv, D) and filled left to right.

    Each attention layer calls `update` with its new keys/values; the model calls `advance` once
    per forward, after all layers, so `length` is the number of positions already cached.
    """

    def __init__(
        self,
        n_layers: int,
        batch_size: int,
        max_len: int,
        n_kv_heads: int,
        head_dim: int,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        # Allocated per layer on first use, with the head count of the keys written (under tensor parallelism
        # a rank caches only its own heads, fewer than n_kv_heads).
        self.shape = (batch_size, max_len, n_kv_heads, head_dim)
        self.device, self.dtype = device, dtype
        self.k: list[torch.Tensor | None] = [None] * n_layers
        self.v: list[torch.Tensor | None] = [None] * n_layers
        self.max_len = max_len
        self.length = 0

    @classmethod
    def for_model(
        cls,
        args: ModelArgs,
        batch_size: int,
        max_len: int,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> KVCache:
        """A cache shaped for a `Transformer(args)`."""
        return cls(
            args.n_layers, batch_size, max_len, args.kv_heads, args.head_dim, device=device, dtype=dtype
        )

    def update(self, layer_id: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v (B, T, Hkv, D) after the cached positions; return all of them (B, length+T, Hkv, D)."""
        end = self.length + k.shape[1]
        if end > self.max_len:
            raise ValueError(
                f"KVCache holds max_len={self.max_len} positions, {end} needed: allocate a larger max_len"
            )
        k_all, v_all = self.k[layer_id], self.v[layer_id]
        if k_all is None or v_all is None:
            B, max_len, _, D = self.shape
            shape = (B, max_len, k.shape[2], D)  # (B, max_len, Hkv, D)
            k_all = self.k[layer_id] = torch.zeros(shape, device=self.device, dtype=self.dtype)
            v_all = self.v[layer_id] = torch.zeros(shape, device=self.device, dtype=self.dtype)
        k_all[:, self.length : end] = k
        v_all[:, self.length : end] = v
        return k_all[:, :end], v_all[:, :end]

    def advance(self, n: int) -> None:
        """Mark n more positions as cached (called once per forward, after every layer has updated)."""
        self.length += n


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
