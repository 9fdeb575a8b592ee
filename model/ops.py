"""Pure-torch reference ops: RMSNorm, SwiGLU and rotary position embeddings (RoPE).

These are the definitions of record: fused kernels chosen elsewhere must match them, and the
tests compare against them. RoPE follows the Hugging Face Llama convention (`rotate_half`: the
first and second halves of a head form the rotated pairs), so HF Llama weights load unpermuted.
"""

from __future__ import annotations

import math

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


def rope_inv_freq(
    head_dim: int,
    theta: float,
    *,
    rope_type: str = "default",
    factor: float = 1.0,
    low_freq_factor: float = 1.0,
    high_freq_factor: float = 4.0,
    original_max_seq_len: int = 8192,
    beta_fast: float = 32.0,
    beta_slow: float = 1.0,
    truncate: bool = True,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Inverse frequencies (head_dim / 2,) of RoPE, float32, as transformers computes them per `rope_type`.

    'default': theta^(-2i/D). 'linear': divided by `factor` (positions stretched). 'llama3' (Llama 3.1+):
    wavelengths longer than original_max_seq_len / low_freq_factor are divided by `factor`, those shorter
    than original_max_seq_len / high_freq_factor kept, and the band between interpolated smoothly. 'yarn':
    dimensions that turn fewer than beta_slow times over original_max_seq_len are divided by `factor`, those
    turning more than beta_fast times kept, a linear ramp between (the cos/sin scale is `yarn_attention_factor`).
    """
    if head_dim % 2:
        raise ValueError(f"head_dim={head_dim} must be even for RoPE: make dim / n_heads even")
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64, device=device).float() / head_dim
    inv_freq = 1.0 / (theta ** exponents)  # (D/2,)
    if rope_type == "default":
        return inv_freq
    if rope_type == "linear":
        return inv_freq / factor
    if rope_type == "yarn":
        return _yarn_inv_freq(inv_freq, head_dim, theta, factor, original_max_seq_len, beta_fast, beta_slow,
                              truncate)
    if rope_type != "llama3":
        raise ValueError(f"rope_type={rope_type!r} is not supported: use default, linear, llama3 or yarn")
    low_freq_wavelen = original_max_seq_len / low_freq_factor
    high_freq_wavelen = original_max_seq_len / high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (original_max_seq_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(medium, smoothed, scaled)


def _yarn_inv_freq(inv_freq: torch.Tensor, head_dim: int, theta: float, factor: float, original: int,
                   beta_fast: float, beta_slow: float, truncate: bool) -> torch.Tensor:
    """YaRN's blend of interpolated (divided by factor) and extrapolated (kept) frequencies (D/2,)."""

    def dim_of(rotations: float) -> float:  # the dimension that turns `rotations` times over `original` tokens
        return head_dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low, high = dim_of(beta_fast), dim_of(beta_slow)
    if truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, head_dim - 1)
    if low == high:
        high += 0.001  # no zero-width ramp
    ramp = ((torch.arange(head_dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    keep = (1 - ramp).to(inv_freq.device)  # 1: extrapolate (keep), 0: interpolate
    return (inv_freq / factor) * (1 - keep) + inv_freq * keep


def yarn_attention_factor(factor: float, attention_factor: float | None = None) -> float:
    """The cos/sin scale of YaRN: `attention_factor` when given, else 0.1 * ln(factor) + 1 (1 for factor <= 1)."""
    if attention_factor is not None:
        return attention_factor
    return 1.0 if factor <= 1 else 0.1 * math.log(factor) + 1.0


def precompute_rope(
    head_dim: int,
    max_seq_len: int,
    theta: float,
    *,
    device: torch.device | str | None = None,
    inv_freq: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Cos/sin tables of RoPE for positions 0..max_seq_len-1, in float32.

    inv_freq: (head_dim / 2,) frequencies from `rope_inv_freq` (a scaled RoPE); None: the plain ones of theta.
    Returns cos, sin: (max_seq_len, head_dim), each frequency repeated over both halves.
    """
    if inv_freq is None:
        inv_freq = rope_inv_freq(head_dim, theta, device=device)
    positions = torch.arange(max_seq_len, device=device, dtype=torch.float32)
    freqs = torch.outer(positions, inv_freq.to(device=device, dtype=torch.float32))  # (T, D/2)
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
