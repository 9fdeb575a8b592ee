"""The soft-prompt recipe's auxiliary terms (train/research/soft_prompt.py declares them, weight 0 by default):

- ``first_entropy``: minus the entropy of the student's first-answer-token distribution, so a positive weight is
  a bonus for a spread first token (against every answer starting alike);
- ``align``: 1 - cosine between each latent (in the base's embedding space) and the mean of the teacher's prompt
  token embeddings over the matching M-th of the prompt;
- ``hidden``: the student's hidden states at chosen layers against the teacher's (the same base reading the full
  prompt) over the answer positions, mean squared difference relative to the teacher's mean square.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from model.hooks import LayerHooks


def first_token_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Minus the mean entropy (nats) of the first answer token's distribution, over rows with a first target;
    logits (B, A, V), labels (B, A)."""
    rows = labels[:, 0] != -100
    logp = F.log_softmax(logits[:, 0].float(), -1)  # (B, V)
    entropy = -(logp.exp() * logp).sum(-1)  # (B,)
    return -(entropy * rows).sum() / rows.sum().clamp(min=1)


def chunk_means(embeds: torch.Tensor, lengths: torch.Tensor, m: int) -> torch.Tensor:
    """(B, P, D) token embeddings, each row's first ``lengths[i]`` real -> (B, m, D): the means of m contiguous,
    near-equal spans of the real tokens (a span shorter than one token takes its nearest token)."""
    P = embeds.shape[1]
    pos = torch.arange(P, device=embeds.device, dtype=torch.float32)  # (P,)
    n = lengths.to(torch.float32).clamp(min=1)[:, None]  # (B, 1)
    edges = torch.arange(m + 1, device=embeds.device, dtype=torch.float32)[None] * n / m  # (B, m + 1)
    lo, hi = edges[:, :-1].floor(), torch.maximum(edges[:, 1:].ceil(), edges[:, :-1].floor() + 1)  # (B, m)
    hi = torch.minimum(hi, n)
    lo = torch.minimum(lo, hi - 1)
    inside = (pos[None, None] >= lo[..., None]) & (pos[None, None] < hi[..., None])  # (B, m, P)
    weights = inside.float() / inside.float().sum(-1, keepdim=True).clamp(min=1)
    return weights.to(embeds.dtype) @ embeds  # (B, m, D)


def latent_alignment(prefix: torch.Tensor, prompt_embeds: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """1 - mean cosine between the latents (B, M, D) and the chunk means of the prompt's embeddings."""
    target = chunk_means(prompt_embeds.detach().float(), lengths, prefix.shape[1])
    return 1.0 - F.cosine_similarity(prefix.float(), target, dim=-1).mean()


def hidden_distance(student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean squared difference of (B, A, D) states over the real answer positions (mask (B, A)), relative to the
    teacher's mean square there."""
    keep = mask.bool()
    s, t = student[keep].float(), teacher[keep].float().detach()
    return (s - t).pow(2).mean() / t.pow(2).mean().clamp(min=1e-6)


class HiddenCapture:
    """Records each base's residual stream after chosen layers while ``recording(b)`` is open."""

    def __init__(self, bases: Sequence[nn.Module], layers: list[list[int]]) -> None:
        self.states: dict[int, torch.Tensor] = {}
        self._active: int | None = None
        self._hooks = []
        for b, (base, ids) in enumerate(zip(bases, layers, strict=True)):
            hooks = LayerHooks(base)
            hooks.add(ids, self._record(b))
            self._hooks.append(hooks)

    def _record(self, b: int) -> Callable[[int, torch.Tensor], None]:
        def record(layer: int, h: torch.Tensor) -> None:
            if self._active == b:
                self.states[layer] = h

        return record

    @contextlib.contextmanager
    def recording(self, b: int) -> Iterator[dict[int, torch.Tensor]]:
        """Yields the dict the layers of base ``b`` fill during the block (cleared first)."""
        self.states, self._active = {}, b
        try:
            yield self.states
        finally:
            self._active = None


def at_positions(states: torch.Tensor, starts: torch.Tensor, width: int) -> torch.Tensor:
    """(B, T, D) -> (B, width, D): each row's ``width`` positions from ``starts[i]``."""
    offsets = starts[:, None] + torch.arange(width, device=states.device)  # (B, width)
    return states.gather(1, offsets[..., None].expand(-1, -1, states.shape[-1]))
