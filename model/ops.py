"""Pure-torch reference ops: RMSNorm, SwiGLU and rotary position embeddings (RoPE).

These are the definitions of record: fused kernels chosen elsewhere must match them, and the
tests compare against them. RoPE follows the Hugging Face Llama convention (`rotate_half`: the
first and second halves of a head form the rotated pairs), so HF Llama weights load unpermuted.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Root-mean-square norm over the last dim, computed in float32, then scaled by `weight`.

    x: (..., D), weight: (D,) -> (..., D) in x's dtype.
    """
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(dim=-1, keepdim=True) + eps)
    return weight * x32.to(x.dtype)


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """SwiGLU activation: silu(gate) * up (both (..., F))."""
    return F.silu(gate) * up


def precompute_rope(
    head_dim: int,
    max_seq_len: int,
    theta: float,
    *,
    device: torch.device | str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Cos/sin tables of RoPE for positions 0..max_seq_len-1, in float32.

    Returns cos, sin: (max_seq_len, head_dim), each frequency repeated over both halves.
    """
    if head_dim % 2:
        raise ValueError(f"head_dim={head_dim} must be even for RoPE: make dim / n_heads even")
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim))
    positions = torch.arange(max_seq_len, device=device, dtype=torch.float32)
    freqs = torch.outer(positions, inv_freq)  # (T, D/2)
    angles = torch.cat((freqs, freqs), dim=-1)  # (T, D)
    return angles.cos(), angles.sin()


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """(x1, x2) -> (-x2, x1) over the two halves of the last dim."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(
    q: torch.Tensor,
    k: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    position_ids: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate queries and keys by the angles of their positions.

    q: (B, T, Hq, D), k: (B, T, Hkv, D); cos/sin: (max_seq_len, D) tables from `precompute_rope`;
    position_ids: (B, T) or (T,) integer positions. Returns rotated q, k in their own dtype.
    """
    cos = cos[position_ids].unsqueeze(-2).to(q.dtype)  # (B, T, 1, D)
    sin = sin[position_ids].unsqueeze(-2).to(q.dtype)  # (B, T, 1, D)
    q_rot = q * cos + rotate_half(q) * sin
    k_rot = k * cos + rotate_half(k) * sin
    return q_rot, k_rot
