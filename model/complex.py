"""A small causal language model whose hidden states are complex: amplitude/phase embeddings, complex attention.

Every complex parameter is stored as a real float tensor with a trailing dimension of 2 (real, imaginary)
and viewed as complex64 inside `forward` (`as_complex`). Stored that way it survives what DeepSpeed and
`module.to(torch.bfloat16)` do to parameters: a complex parameter cast to a real dtype loses its imaginary
part, and DeepSpeed's optimizers and ZeRO partitioning expect real tensors. The views are upcast to float32
first (there is no bfloat16 complex), and the complex math runs with autocast disabled, so blocks compute in
complex64 under bf16 weights or `torch.autocast`; only the real output head follows autocast. Complex linear
layers use a matmul rather than `F.linear`, which ZeRO-3 replaces with a backward that does not conjugate.

Token -> amplitude a = softplus(amp_embed) and phase phi = phase_embed -> z = a e^{i phi}; blocks of
z + attn(norm(z)), z + mlp(norm(z)); readout [Re z, Im z] -> real linear head. Attention scores are
Re(q conj(k)) / sqrt(head_dim) with q and k rotated by position-dependent phases (RoPE in the complex plane),
so scores depend on relative position only.

Building on the meta device, then materialising::

    with torch.device("meta"):
        model = ComplexLM(args)
    model.to_empty(device="cuda")
    model.init_weights()  # also re-tags the complex-stored parameters (`p.complex_view`)
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal, overload

import torch
import torch.nn.functional as F
from torch import nn

from model.args import ModelConfigError


@dataclass
class ComplexArgs:
    """Shape and initialisation of `ComplexLM`."""

    vocab_size: int = field(default=256, metadata={"help": "number of token ids (embedding rows)"})
    dim: int = field(default=64, metadata={"help": "number of complex channels in the residual stream"})
    n_layers: int = field(default=2, metadata={"help": "number of blocks"})
    n_heads: int = field(default=4, metadata={"help": "number of attention heads; must divide dim"})
    max_seq_len: int = field(default=256, metadata={"help": "longest sequence forward accepts"})
    ffn_mult: int = field(default=2, metadata={"help": "complex MLP hidden width as a multiple of dim"})
    phase_theta: float = field(default=10000.0, metadata={"help": "base of the positional phase frequencies"})
    norm_eps: float = field(default=1e-6, metadata={"help": "epsilon in the complex RMS norm and modReLU"})
    init_std: float = field(default=0.02, metadata={"help": "std of the normal init of weight matrices"})

    @property
    def head_dim(self) -> int:
        """Complex channels per attention head."""
        return self.dim // self.n_heads

    def validate(self) -> ComplexArgs:
        """Raise `ModelConfigError` (a ValueError) on the first bad field; return self so calls can chain."""
        for name in ("vocab_size", "dim", "n_layers", "n_heads", "max_seq_len", "ffn_mult"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ModelConfigError(f"ComplexArgs.{name}={value!r} is invalid: set it to a positive integer")
        for name in ("phase_theta", "norm_eps", "init_std"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise ModelConfigError(f"ComplexArgs.{name}={value!r} is invalid: set it to a positive number")
        if self.dim % self.n_heads:
            raise ModelConfigError(
                f"ComplexArgs.dim={self.dim} is not divisible by n_heads={self.n_heads}: "
                f"choose dim as a multiple of n_heads"
            )
        return self


def complex_param(*shape: int) -> nn.Parameter:
    """An uninitialised complex parameter of `shape`, stored as a real (*shape, 2) tensor and tagged."""
    p = nn.Parameter(torch.empty(*shape, 2))
    p.complex_view = True  # type: ignore[attr-defined]
    return p


def as_complex(p: torch.Tensor) -> torch.Tensor:
    """Complex64 view of a real (..., 2) tensor, upcast to float32 first (there is no bfloat16 complex)."""
    return torch.view_as_complex(p.float().contiguous())  # (...)


def position_phases(seq_len: int, n: int, theta: float, device: torch.device) -> torch.Tensor:
    """Unit phasors e^{i t w_c} with w_c = theta^(-c/n): (seq_len, n) complex64, computed in float32."""
    freqs = theta ** (-torch.arange(n, device=device, dtype=torch.float32) / n)  # (n,)
    angles = torch.arange(seq_len, device=device, dtype=torch.float32)[:, None] * freqs  # (T, n)
    return torch.polar(torch.ones_like(angles), angles)  # (T, n)


def energy_term(z: torch.Tensor) -> torch.Tensor:
    """Amplitude calibration: mean of (|z|^2 - 1)^2 over every element; zero when all |z| = 1."""
    power = z.real.square() + z.imag.square()  # (B, T, C)
    return (power - 1).square().mean()


def coherence_term(z: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """1 - R with R = |mean over positions of z/|z||, per (batch, channel), averaged; z: (B, T, C).

    R is 1 when a channel has the same phase at every position and 0 when its phases cancel, so
    minimising this term pushes phases to agree across positions; give it a negative weight to spread them.
    An element with |z| < eps contributes z / eps instead of a unit phasor (0 for z = 0), so it stays finite.
    """
    unit = z / z.abs().clamp_min(eps)  # (B, T, C)
    return 1 - unit.mean(dim=-2).abs().mean()


def aux_terms(z: torch.Tensor, eps: float = 1e-6) -> dict[str, torch.Tensor]:
    """The auxiliary loss terms of a complex hidden state z (B, T, C): {"energy", "coherence"}, scalars."""
    return {"energy": energy_term(z), "coherence": coherence_term(z, eps)}


class ComplexLinear(nn.Module):
    """y = x W^T + b with complex W (out, in) and b (out,), both stored as real (..., 2) parameters."""

    complex_names = ("weight", "bias")

    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.weight = complex_param(out_dim, in_dim)  # (out, in, 2)
        self.bias = complex_param(out_dim)  # (out, 2)

    def init_weights(self, std: float) -> None:
        # Real and imaginary parts each N(0, std^2 / 2), so E|w|^2 = std^2.
        nn.init.normal_(self.weight, mean=0.0, std=std / math.sqrt(2))
        nn.init.normal_(self.bias, mean=0.0, std=std / math.sqrt(2))
        for name in self.complex_names:  # `to_empty` and deepcopy make new Parameters without the tag
            getattr(self, name).complex_view = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # A matmul, not F.linear: ZeRO-3 replaces F.linear process-wide with a function whose backward does
        # not conjugate, which silently gives wrong gradients for complex inputs.
        return x @ as_complex(self.weight).mT + as_complex(self.bias)  # (..., out)


class ComplexRMSNorm(nn.Module):
    """z / sqrt(mean_c |z_c|^2 + eps) times a real per-channel scale (`weight`, initialised to ones)."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def init_weights(self) -> None:
        nn.init.ones_(self.weight)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        power = (z.real.square() + z.imag.square()).mean(dim=-1, keepdim=True)  # (..., 1)
        return z * torch.rsqrt(power + self.eps) * self.weight.float()  # (..., C)


class ModReLU(nn.Module):
    """relu(|z| + b) z / |z| with a real per-channel bias b: gates the amplitude, keeps the phase."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.bias = nn.Parameter(torch.empty(dim))

    def init_weights(self) -> None:
        # Zero: the identity at init (inputs are small, a negative bias would switch them all off); it learns
        # where to cut from there.
        nn.init.zeros_(self.bias)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        mag = z.abs()  # (..., C)
        return z * (F.relu(mag + self.bias.float()) / mag.clamp_min(self.eps))  # (..., C)


class ComplexAttention(nn.Module):
    """Causal multi-head attention: scores Re(q conj(k)) / sqrt(head_dim), real softmax, complex values."""

    def __init__(self, args: ComplexArgs) -> None:
        super().__init__()
        self.n_heads, self.head_dim = args.n_heads, args.head_dim
        self.qkv = ComplexLinear(args.dim, 3 * args.dim)
        self.o_proj = ComplexLinear(args.dim, args.dim)

    def init_weights(self, std: float, out_std: float) -> None:
        self.qkv.init_weights(std)
        self.o_proj.init_weights(out_std)

    def forward(self, x: torch.Tensor, phases: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.n_heads, self.head_dim).unbind(2)  # each (B, T, H, D)
        q, k = q * phases[:, None, :], k * phases[:, None, :]  # rotate position t by e^{i t w}
        scores = torch.einsum("bthd,bshd->bhts", q, k.conj()).real / math.sqrt(self.head_dim)  # (B, H, T, T)
        future = torch.ones(T, T, dtype=torch.bool, device=x.device).triu(1)  # (T, T)
        probs = scores.masked_fill(future, float("-inf")).softmax(dim=-1)  # (B, H, T, T)
        out = torch.einsum("bhts,bshd->bthd", probs.to(v.dtype), v)  # (B, T, H, D)
        return self.o_proj(out.reshape(B, T, -1))  # (B, T, C)


class ComplexMLP(nn.Module):
    """down(modReLU(up(z))) with complex linear layers."""

    def __init__(self, args: ComplexArgs) -> None:
        super().__init__()
        self.up = ComplexLinear(args.dim, args.ffn_mult * args.dim)
        self.act = ModReLU(args.ffn_mult * args.dim, args.norm_eps)
        self.down = ComplexLinear(args.ffn_mult * args.dim, args.dim)

    def init_weights(self, std: float, out_std: float) -> None:
        self.up.init_weights(std)
        self.act.init_weights()
        self.down.init_weights(out_std)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.down(self.act(self.up(z)))  # (B, T, C)


class ComplexBlock(nn.Module):
    """Pre-norm block: z + attn(norm(z)), then z + mlp(norm(z))."""

    def __init__(self, args: ComplexArgs) -> None:
        super().__init__()
        self.attn_norm = ComplexRMSNorm(args.dim, args.norm_eps)
        self.attn = ComplexAttention(args)
        self.mlp_norm = ComplexRMSNorm(args.dim, args.norm_eps)
        self.mlp = ComplexMLP(args)

    def init_weights(self, std: float, out_std: float) -> None:
        self.attn_norm.init_weights()
        self.attn.init_weights(std, out_std)
        self.mlp_norm.init_weights()
        self.mlp.init_weights(std, out_std)

    def forward(self, z: torch.Tensor, phases: torch.Tensor) -> torch.Tensor:
        z = z + self.attn(self.attn_norm(z), phases)
        return z + self.mlp(self.mlp_norm(z))  # (B, T, C)


class ComplexLM(nn.Module):
    """Causal LM with complex64 hidden states: amplitude/phase embedding -> blocks -> norm -> real head."""

    def __init__(self, args: ComplexArgs) -> None:
        super().__init__()
        self.args = args.validate()
        self.amp_embed = nn.Embedding(args.vocab_size, args.dim)  # softplus gives the amplitude
        self.phase_embed = nn.Embedding(args.vocab_size, args.dim)  # radians
        self.layers = nn.ModuleList(ComplexBlock(args) for _ in range(args.n_layers))
        self.norm = ComplexRMSNorm(args.dim, args.norm_eps)
        self.head = nn.Linear(2 * args.dim, args.vocab_size, bias=False)  # reads [Re z, Im z]
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """(Re)initialise every parameter in place from torch's global RNG, and re-tag the complex ones.

        Amplitudes start near 1 (softplus^-1(1) plus N(0, init_std) noise), phases uniform in [-pi, pi);
        complex weights have E|w|^2 = init_std^2, residual output projections init_std / sqrt(2 n_layers).
        """
        std = self.args.init_std
        out_std = std / math.sqrt(2 * self.args.n_layers)
        nn.init.normal_(self.amp_embed.weight, mean=math.log(math.e - 1), std=std)
        nn.init.uniform_(self.phase_embed.weight, -math.pi, math.pi)
        for layer in self.layers:
            layer.init_weights(std, out_std)
        self.norm.init_weights()
        nn.init.normal_(self.head.weight, mean=0.0, std=std)

    def hidden(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Complex64 output of the last block (B, T, dim), before the final norm; input_ids: (B, T)."""
        T = input_ids.shape[1]
        if T > self.args.max_seq_len:
            raise ValueError(
                f"sequence length {T} exceeds ComplexArgs.max_seq_len={self.args.max_seq_len}: "
                f"feed shorter sequences or raise max_seq_len"
            )
        # Autocast must not touch the complex path; bf16 weights are upcast where they are read.
        with torch.autocast(device_type=input_ids.device.type, enabled=False):
            amp = F.softplus(self.amp_embed(input_ids).float())  # (B, T, C)
            z = torch.polar(amp, self.phase_embed(input_ids).float())  # (B, T, C) complex64
            phases = position_phases(T, self.args.head_dim, self.args.phase_theta, input_ids.device)  # (T, D)
            for layer in self.layers:
                z = layer(z, phases)  # (B, T, C)
        return z

    def logits(self, z: torch.Tensor) -> torch.Tensor:
        """Float32 logits (B, T, V) from a hidden state of `hidden`; the head may run under autocast."""
        with torch.autocast(device_type=z.device.type, enabled=False):
            z = self.norm(z)  # (B, T, C)
        features = torch.cat([z.real, z.imag], dim=-1).to(self.head.weight.dtype)  # (B, T, 2C)
        return self.head(features).float()  # (B, T, V)

    @overload
    def forward(self, input_ids: torch.Tensor, *, return_aux: Literal[False] = ...) -> torch.Tensor: ...

    @overload
    def forward(
        self, input_ids: torch.Tensor, *, return_aux: Literal[True]
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]: ...

    def forward(
        self, input_ids: torch.Tensor, *, return_aux: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Logits (B, T, V) in float32; with return_aux, also `aux_terms` of the last block's output."""
        z = self.hidden(input_ids)  # (B, T, C)
        logits = self.logits(z)
        if not return_aux:
            return logits
        return logits, aux_terms(z, self.args.norm_eps)


def complex_parameters(model: nn.Module) -> dict[str, torch.Tensor]:
    """Complex64 views of every complex-stored parameter of `model`, by parameter name.

    Found through the modules that own them (`ComplexLinear.complex_names`), so the result does not
    depend on the `complex_view` tag, which `to_empty` and `copy.deepcopy` drop until `init_weights`.
    """
    views: dict[str, torch.Tensor] = {}
    for prefix, module in model.named_modules():
        for name in getattr(module, "complex_names", ()):
            views[f"{prefix}.{name}" if prefix else name] = as_complex(getattr(module, name))
    return views
