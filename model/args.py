"""Model hyper-parameters (`ModelArgs`), their validation, parameter/FLOP counts and named presets."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType


class ModelConfigError(ValueError):
    """An invalid model configuration; the message names the field, its value and the fix."""


@dataclass
class ModelArgs:
    """Shape and initialisation of a Llama-style decoder (RMSNorm, SwiGLU, RoPE, GQA, optional sinks).

    With `attn_bias` it is also the Qwen2 architecture (q/k/v biases).
    """

    dim: int = field(default=4096, metadata={"help": "model (residual stream) width"})
    n_layers: int = field(default=32, metadata={"help": "number of transformer blocks"})
    n_heads: int = field(default=32, metadata={"help": "number of query heads"})
    n_kv_heads: int | None = field(
        default=None, metadata={"help": "number of key/value heads (GQA); None means n_heads (plain MHA)"}
    )
    vocab_size: int = field(default=32000, metadata={"help": "number of token ids (embedding rows)"})
    ffn_hidden_dim: int | None = field(
        default=None,
        metadata={"help": "SwiGLU hidden width; None means int(8*dim/3) rounded up to multiple_of"},
    )
    multiple_of: int = field(default=256, metadata={"help": "rounding unit of the derived SwiGLU width"})
    norm_eps: float = field(default=1e-5, metadata={"help": "epsilon inside RMSNorm"})
    rope_theta: float = field(default=10000.0, metadata={"help": "RoPE base frequency"})
    max_seq_len: int = field(default=2048, metadata={"help": "longest sequence (size of the RoPE tables)"})
    tie_embeddings: bool = field(
        default=False, metadata={"help": "share the output head weight with the token embedding"}
    )
    attn_sinks: bool = field(
        default=False, metadata={"help": "learned per-head sink logit in the softmax (gpt-oss style)"}
    )
    attn_bias: bool = field(
        default=False, metadata={"help": "biases on the q/k/v projections (Qwen2 style; o_proj has none)"}
    )
    dropout: float = field(
        default=0.0, metadata={"help": "dropout on attention probabilities and on each residual branch"}
    )
    init_std: float = field(default=0.02, metadata={"help": "std of the normal init of weight matrices"})

    @property
    def head_dim(self) -> int:
        """Width of one attention head."""
        return self.dim // self.n_heads

    @property
    def kv_heads(self) -> int:
        """Resolved number of key/value heads (`n_kv_heads`, or `n_heads` when it is None)."""
        return self.n_heads if self.n_kv_heads is None else self.n_kv_heads

    @property
    def ffn_dim(self) -> int:
        """Resolved SwiGLU hidden width (`ffn_hidden_dim`, or the Llama rule when it is None)."""
        if self.ffn_hidden_dim is not None:
            return self.ffn_hidden_dim
        hidden = int(8 * self.dim / 3)
        return self.multiple_of * ((hidden + self.multiple_of - 1) // self.multiple_of)

    def validate(self) -> ModelArgs:
        """Raise `ModelConfigError` on the first inconsistent field; return self so calls can chain."""
        positive_ints = {
            "dim": self.dim,
            "n_layers": self.n_layers,
            "n_heads": self.n_heads,
            "vocab_size": self.vocab_size,
            "multiple_of": self.multiple_of,
            "max_seq_len": self.max_seq_len,
        }
        if self.n_kv_heads is not None:
            positive_ints["n_kv_heads"] = self.n_kv_heads
        if self.ffn_hidden_dim is not None:
            positive_ints["ffn_hidden_dim"] = self.ffn_hidden_dim
        for name, value in positive_ints.items():
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ModelConfigError(f"ModelArgs.{name}={value!r} is invalid: set it to a positive integer")
        for name, value in {"tie_embeddings": self.tie_embeddings, "attn_sinks": self.attn_sinks,
                            "attn_bias": self.attn_bias}.items():
            if not isinstance(value, bool):
                raise ModelConfigError(f"ModelArgs.{name}={value!r} is invalid: set it to true or false")
        for name, value in {"norm_eps": self.norm_eps, "rope_theta": self.rope_theta,
                            "init_std": self.init_std}.items():
            if not value > 0:
                raise ModelConfigError(f"ModelArgs.{name}={value!r} is invalid: set it to a positive number")
        if not 0.0 <= self.dropout < 1.0:
            raise ModelConfigError(f"ModelArgs.dropout={self.dropout!r} is invalid: use a value in [0, 1)")
        if self.dim % self.n_heads:
            raise ModelConfigError(
                f"ModelArgs.dim={self.dim} is not divisible by n_heads={self.n_heads}: "
                f"choose dim as a multiple of n_heads"
            )
        if self.n_heads % self.kv_heads:
            raise ModelConfigError(
                f"ModelArgs.n_kv_heads={self.kv_heads} does not divide n_heads={self.n_heads}: "
                f"choose n_kv_heads among the divisors of n_heads"
            )
        if self.head_dim % 2:
            raise ModelConfigError(
                f"ModelArgs.dim={self.dim} gives an odd head_dim={self.head_dim} (dim / n_heads), "
                f"which RoPE cannot rotate: make dim / n_heads even"
            )
        return self

    def num_params(self, *, include_embeddings: bool = True) -> int:
        """Exact parameter count of `Transformer(self)` (a tied head counted once).

        Without embeddings, the token embedding and the (untied) output head are left out.
        """
        q_width, kv_width = self.n_heads * self.head_dim, self.kv_heads * self.head_dim
        attention = self.dim * q_width + 2 * self.dim * kv_width + q_width * self.dim
        sinks = self.n_heads if self.attn_sinks else 0
        biases = q_width + 2 * kv_width if self.attn_bias else 0
        mlp = 3 * self.dim * self.ffn_dim
        norms = 2 * self.dim
        body = self.n_layers * (attention + sinks + biases + mlp + norms) + self.dim  # + final norm
        if not include_embeddings:
            return body
        embeddings = self.vocab_size * self.dim * (1 if self.tie_embeddings else 2)
        return body + embeddings

    def matmul_params(self) -> int:
        """Weights that multiply activations: q/k/v/o, gate/up/down per block, and the output head.

        Not counted: the embedding lookup (a gather), norm weights, biases and sinks (element-wise).
        """
        q_width, kv_width = self.n_heads * self.head_dim, self.kv_heads * self.head_dim
        per_layer = 2 * self.dim * q_width + 2 * self.dim * kv_width + 3 * self.dim * self.ffn_dim
        return self.n_layers * per_layer + self.vocab_size * self.dim

    def flops_per_token(self, seq_len: int) -> int:
        """Training FLOPs (forward + backward) per token at `seq_len`: 6 N + 12 * L * H * D * T.

        N is `matmul_params` (a matmul costs 2 FLOPs per weight per token forward, 4 backward); the
        attention term counts QK^T and PV (4 * T * H * D per layer forward, twice that backward) over the
        full T x T square, as PaLM's appendix B does (no halving for the causal mask). This is what
        `torch.utils.flop_counter.FlopCounterMode` counts for the model (tests/unit/test_perf.py).
        """
        attention = 12 * self.n_layers * self.n_heads * self.head_dim * seq_len
        return 6 * self.matmul_params() + attention


_LLAMA3_COMMON = {"vocab_size": 128256, "rope_theta": 500000.0, "max_seq_len": 8192, "norm_eps": 1e-5}

PRESETS: Mapping[str, ModelArgs] = MappingProxyType(
    {
        # ~1M parameters: the model of the unit tests.
        "test-1m": ModelArgs(
            dim=128, n_layers=4, n_heads=4, n_kv_heads=2, vocab_size=512, max_seq_len=256, tie_embeddings=True
        ),
        # Shakespeare on a CPU in minutes; vocab_size is replaced by the tokenizer's at run time.
        "tiny": ModelArgs(dim=256, n_layers=4, n_heads=4, n_kv_heads=2, vocab_size=4096, max_seq_len=256),
        # GPT-2 small sized Llama (tied head, GPT-2 padded vocabulary).
        "small-125m": ModelArgs(
            dim=768, n_layers=12, n_heads=12, vocab_size=50304, max_seq_len=1024, tie_embeddings=True
        ),
        # Llama-3.2-1B shapes (its long-context RoPE scaling is not modelled).
        "llama3-1b": ModelArgs(
            dim=2048, n_layers=16, n_heads=32, n_kv_heads=8, ffn_hidden_dim=8192, tie_embeddings=True,
            **_LLAMA3_COMMON,
        ),
        "llama3-8b": ModelArgs(
            dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, ffn_hidden_dim=14336, **_LLAMA3_COMMON
        ),
        "llama3-70b": ModelArgs(
            dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, ffn_hidden_dim=28672, **_LLAMA3_COMMON
        ),
    }
)


def get_preset(name: str) -> ModelArgs:
    """A fresh copy of the preset `name` (safe to modify)."""
    if name not in PRESETS:
        raise ModelConfigError(f"unknown model preset {name!r}: choose one of {', '.join(PRESETS)}")
    return dataclasses.replace(PRESETS[name])
