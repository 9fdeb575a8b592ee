"""Model hyper-parameters (`ModelArgs`), their validation, parameter/FLOP counts and named presets."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Literal


class ModelConfigError(ValueError):
    """An invalid model configuration; the message names the field, its value and the fix."""


RopeType = Literal["default", "linear", "llama3", "yarn"]
ROPE_TYPES: tuple[str, ...] = ("default", "linear", "llama3", "yarn")
"""RoPE frequency schemes the model computes (transformers' `rope_type` names)."""


class _DerivedHeadDim(int):
    """A head width derived from dim / n_heads, not set by the user: `dataclasses.replace` passes it back to
    `__init__`, which then derives it again from the new dim and n_heads instead of keeping a stale width."""


@dataclass
class ModelArgs:
    """Shape and initialisation of a Llama-style decoder (RMSNorm, SwiGLU, RoPE, GQA, optional sinks).

    The optional fields (all off by default) make it Llama 3.x (`rope_type='llama3'`, `attn_bias` with
    `o_bias`), Mistral (`sliding_window`), Qwen2 (`attn_bias`, `sliding_window` on `sliding_layers`) and Qwen3
    (`qk_norm`, an explicit `head_dim`).
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
    head_dim: int | None = field(
        default=None, metadata={"help": "width of one attention head; None means dim / n_heads (Qwen3 sets it)"}
    )
    o_bias: bool = field(
        default=False, metadata={"help": "bias on o_proj too (Llama attention_bias=true: set with attn_bias)"}
    )
    qk_norm: bool = field(
        default=False, metadata={"help": "RMSNorm over head_dim on each query and key head before RoPE (Qwen3)"}
    )
    sliding_window: int | None = field(
        default=None, metadata={"help": "attention window in tokens (query i sees keys i-W+1..i); None: full"}
    )
    sliding_layers: list[int] | None = field(
        default=None, metadata={"help": "layers that use sliding_window; None: every layer (Mistral)"}
    )
    rope_type: RopeType = field(
        default="default", metadata={"help": "RoPE frequencies: 'default', 'linear', 'llama3' (Llama 3.1+) or 'yarn'"}
    )
    rope_factor: float = field(
        default=1.0, metadata={"help": "rope_type 'linear' / 'llama3' / 'yarn': context extension factor"}
    )
    rope_low_freq_factor: float = field(default=1.0, metadata={"help": "rope_type 'llama3': low_freq_factor"})
    rope_high_freq_factor: float = field(default=4.0, metadata={"help": "rope_type 'llama3': high_freq_factor"})
    rope_original_max_seq_len: int = field(
        default=8192, metadata={"help": "rope_type 'llama3' / 'yarn': original_max_position_embeddings"}
    )
    rope_beta_fast: float = field(default=32.0, metadata={"help": "rope_type 'yarn': beta_fast (rotations)"})
    rope_beta_slow: float = field(default=1.0, metadata={"help": "rope_type 'yarn': beta_slow (rotations)"})
    rope_attention_factor: float | None = field(
        default=None, metadata={"help": "rope_type 'yarn': scale of cos/sin; None: 0.1 * ln(rope_factor) + 1"}
    )
    rope_truncate: bool = field(
        default=True, metadata={"help": "rope_type 'yarn': round the correction range to whole dimensions"}
    )

    n_experts: int = field(default=0, metadata={"help": "routed experts of each MoE layer; 0: every layer dense"})
    moe_top_k: int = field(default=2, metadata={"help": "experts each token is routed to (num_experts_per_tok)"})
    moe_ffn_dim: int | None = field(
        default=None, metadata={"help": "SwiGLU width of one routed expert; None means ffn_dim"})
    moe_layers: str | int | list[int] = field(
        default="all", metadata={"help": "MoE layers: 'all', k (every k-th: layers k-1, 2k-1, ...) or a list"})
    moe_norm_topk_prob: bool = field(
        default=True, metadata={"help": "renormalise the top-k probabilities (Mixtral; Qwen3-MoE norm_topk_prob)"})
    moe_shared_ffn_dim: int | None = field(
        default=None, metadata={"help": "width of a shared expert every token passes (None: none)"})
    moe_shared_gate: bool = field(
        default=False, metadata={"help": "sigmoid gate on the shared expert's output (Qwen2-MoE)"})
    moe_aux_loss_coef: float = field(
        default=0.0, metadata={"help": "coefficient of the switch-style load-balancing loss (0: off)"})
    moe_z_loss_coef: float = field(default=0.0, metadata={"help": "coefficient of the router z-loss (0: off)"})
    moe_bias_update_rate: float = field(
        default=0.0, metadata={"help": "aux-loss-free balancing: bias step per optimizer step (0: off)"})
    moe_capacity_factor: float | None = field(
        default=None, metadata={"help": "expert capacity = factor * tokens * top_k / n_experts; None: dropless"})

    def __post_init__(self) -> None:
        ints = (self.dim, self.n_heads)
        if self.head_dim is None or isinstance(self.head_dim, _DerivedHeadDim):
            valid = all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in ints)
            self.head_dim = _DerivedHeadDim(self.dim // self.n_heads) if valid else None

    @property
    def head_dim_is_derived(self) -> bool:
        """Whether head_dim comes from dim / n_heads (rather than being set)."""
        return self.head_dim is None or isinstance(self.head_dim, _DerivedHeadDim)

    def layer_window(self, layer_id: int) -> int | None:
        """The attention window of layer `layer_id` (None: full causal attention)."""
        if self.sliding_window is None:
            return None
        if self.sliding_layers is not None and layer_id not in self.sliding_layers:
            return None
        return self.sliding_window

    def is_moe_layer(self, layer_id: int) -> bool:
        """Whether layer `layer_id` has routed experts instead of the dense FFN."""
        if self.n_experts <= 0:
            return False
        if self.moe_layers == "all":
            return True
        if isinstance(self.moe_layers, int):
            return (layer_id + 1) % self.moe_layers == 0
        return layer_id in self.moe_layers

    @property
    def n_moe_layers(self) -> int:
        """Number of layers with routed experts."""
        return sum(self.is_moe_layer(i) for i in range(self.n_layers))

    @property
    def expert_dim(self) -> int:
        """Resolved SwiGLU width of one routed expert (`moe_ffn_dim`, or `ffn_dim`)."""
        return self.ffn_dim if self.moe_ffn_dim is None else self.moe_ffn_dim

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
        for name in ("head_dim", "sliding_window"):
            if getattr(self, name) is not None:
                positive_ints[name] = getattr(self, name)
        positive_ints["rope_original_max_seq_len"] = self.rope_original_max_seq_len
        for name, value in positive_ints.items():
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ModelConfigError(f"ModelArgs.{name}={value!r} is invalid: set it to a positive integer")
        for name, value in {"tie_embeddings": self.tie_embeddings, "attn_sinks": self.attn_sinks,
                            "attn_bias": self.attn_bias, "o_bias": self.o_bias, "qk_norm": self.qk_norm,
                            "rope_truncate": self.rope_truncate}.items():
            if not isinstance(value, bool):
                raise ModelConfigError(f"ModelArgs.{name}={value!r} is invalid: set it to true or false")
        for name, value in {"norm_eps": self.norm_eps, "rope_theta": self.rope_theta,
                            "init_std": self.init_std, "rope_factor": self.rope_factor,
                            "rope_low_freq_factor": self.rope_low_freq_factor,
                            "rope_high_freq_factor": self.rope_high_freq_factor,
                            "rope_beta_fast": self.rope_beta_fast, "rope_beta_slow": self.rope_beta_slow,
                            **({"rope_attention_factor": self.rope_attention_factor}
                               if self.rope_attention_factor is not None else {})}.items():
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise ModelConfigError(f"ModelArgs.{name}={value!r} is invalid: set it to a positive number")
        if not 0.0 <= self.dropout < 1.0:
            raise ModelConfigError(f"ModelArgs.dropout={self.dropout!r} is invalid: use a value in [0, 1)")
        self._validate_families()
        self._validate_moe()
        if self.head_dim_is_derived and self.dim % self.n_heads:
            raise ModelConfigError(
                f"ModelArgs.dim={self.dim} is not divisible by n_heads={self.n_heads}: "
                f"choose dim as a multiple of n_heads"
            )
        if self.n_heads % self.kv_heads:
            raise ModelConfigError(
                f"ModelArgs.n_kv_heads={self.kv_heads} does not divide n_heads={self.n_heads}: "
                f"choose n_kv_heads among the divisors of n_heads"
            )
        if self.head_dim % 2:  # type: ignore[operator]
            if not self.head_dim_is_derived:
                raise ModelConfigError(f"ModelArgs.head_dim={self.head_dim} is odd, which RoPE cannot rotate: "
                                       f"set an even head_dim")
            raise ModelConfigError(
                f"ModelArgs.dim={self.dim} gives an odd head_dim={self.head_dim} (dim / n_heads), "
                f"which RoPE cannot rotate: make dim / n_heads even"
            )
        return self

    def _validate_families(self) -> None:
        """The fields of the Llama 3 / Mistral / Qwen families: RoPE scheme, window layers, o_proj bias."""
        if self.rope_type not in ROPE_TYPES:
            raise ModelConfigError(f"ModelArgs.rope_type={self.rope_type!r} is not supported: use one of "
                                   f"{', '.join(ROPE_TYPES)}")
        if self.rope_type == "llama3" and not self.rope_high_freq_factor > self.rope_low_freq_factor:
            raise ModelConfigError(
                f"ModelArgs.rope_high_freq_factor={self.rope_high_freq_factor} must exceed rope_low_freq_factor="
                f"{self.rope_low_freq_factor} for rope_type='llama3': set it larger (Llama 3.1 uses 4.0 and 1.0)")
        if self.sliding_layers is not None:
            if not isinstance(self.sliding_layers, list) or not all(
                    isinstance(i, int) and not isinstance(i, bool) and 0 <= i < self.n_layers
                    for i in self.sliding_layers):
                raise ModelConfigError(f"ModelArgs.sliding_layers={self.sliding_layers!r} is invalid: use a list of "
                                       f"layer indices in [0, {self.n_layers})")
            if self.sliding_window is None:
                raise ModelConfigError(f"ModelArgs.sliding_layers={self.sliding_layers!r} needs sliding_window: "
                                       f"set sliding_window (tokens) or drop sliding_layers")
        if self.o_bias and not self.attn_bias:
            raise ModelConfigError("ModelArgs.o_bias=True needs attn_bias=True (Llama's attention_bias biases "
                                   "q/k/v and o_proj together): set attn_bias=true too")

    def _validate_moe(self) -> None:
        """The MoE fields (checked only when n_experts > 0)."""
        if isinstance(self.n_experts, bool) or not isinstance(self.n_experts, int) or self.n_experts < 0:
            raise ModelConfigError(f"ModelArgs.n_experts={self.n_experts!r} is invalid: set 0 (dense) or a positive "
                                   f"number of experts")
        if not self.n_experts:
            return
        ints = {"moe_top_k": self.moe_top_k, "moe_ffn_dim": self.moe_ffn_dim,
                "moe_shared_ffn_dim": self.moe_shared_ffn_dim}
        for name, value in ints.items():
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value <= 0):
                raise ModelConfigError(f"ModelArgs.{name}={value!r} is invalid: set it to a positive integer")
        if self.moe_top_k > self.n_experts:
            raise ModelConfigError(f"ModelArgs.moe_top_k={self.moe_top_k} exceeds n_experts={self.n_experts}: "
                                   f"route each token to at most n_experts experts")
        layers = self.moe_layers
        ok = (layers == "all" or (isinstance(layers, int) and not isinstance(layers, bool) and layers > 0)
              or (isinstance(layers, list) and all(isinstance(i, int) and not isinstance(i, bool)
                                                   and 0 <= i < self.n_layers for i in layers)))
        if not ok:
            raise ModelConfigError(f"ModelArgs.moe_layers={layers!r} is invalid: use 'all', a positive step k "
                                   f"(every k-th layer) or a list of layer indices in [0, {self.n_layers})")
        for name in ("moe_norm_topk_prob", "moe_shared_gate"):
            if not isinstance(getattr(self, name), bool):
                raise ModelConfigError(f"ModelArgs.{name}={getattr(self, name)!r} is invalid: set true or false")
        for name in ("moe_aux_loss_coef", "moe_z_loss_coef", "moe_bias_update_rate"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
                raise ModelConfigError(f"ModelArgs.{name}={value!r} is invalid: set a number >= 0 (0: off)")
        cf = self.moe_capacity_factor
        if cf is not None and (isinstance(cf, bool) or not isinstance(cf, (int, float)) or not cf > 0):
            raise ModelConfigError(f"ModelArgs.moe_capacity_factor={cf!r} is invalid: set a positive factor "
                                   f"(1.0 = an even share) or null for dropless routing")
        if self.moe_shared_gate and self.moe_shared_ffn_dim is None:
            raise ModelConfigError("ModelArgs.moe_shared_gate=True needs a shared expert: set moe_shared_ffn_dim")

    def _moe_counts(self) -> tuple[int, int]:
        """(all, active) parameters of the MoE FFNs over the model beyond what dense FFNs would hold there."""
        if not self.n_experts:
            return 0, 0
        expert = 3 * self.dim * self.expert_dim
        shared = 3 * self.dim * (self.moe_shared_ffn_dim or 0) + (self.dim if self.moe_shared_gate else 0)
        router = self.n_experts * self.dim
        dense = 3 * self.dim * self.ffn_dim
        n = self.n_moe_layers
        return (n * (self.n_experts * expert + shared + router - dense),
                n * (self.moe_top_k * expert + shared + router - dense))

    def num_params(self, *, include_embeddings: bool = True) -> int:
        """Exact parameter count of `Transformer(self)` (a tied head counted once).

        Without embeddings, the token embedding and the (untied) output head are left out.
        """
        q_width, kv_width = self.n_heads * self.head_dim, self.kv_heads * self.head_dim
        attention = self.dim * q_width + 2 * self.dim * kv_width + q_width * self.dim
        sinks = self.n_heads if self.attn_sinks else 0
        biases = (q_width + 2 * kv_width if self.attn_bias else 0) + (self.dim if self.o_bias else 0)
        mlp = 3 * self.dim * self.ffn_dim
        norms = 2 * self.dim + (2 * self.head_dim if self.qk_norm else 0)  # type: ignore[operator]
        body = self.n_layers * (attention + sinks + biases + mlp + norms) + self.dim  # + final norm
        body += self._moe_counts()[0]
        if not include_embeddings:
            return body
        embeddings = self.vocab_size * self.dim * (1 if self.tie_embeddings else 2)
        return body + embeddings

    def num_active_params(self, *, include_embeddings: bool = True) -> int:
        """Parameters one token passes through: `num_params` with only top_k routed experts per MoE layer."""
        all_moe, active = self._moe_counts()
        return self.num_params(include_embeddings=include_embeddings) - all_moe + active

    def matmul_params(self) -> int:
        """Weights that multiply one token's activations: q/k/v/o, gate/up/down per block (a MoE layer: its
        router, top_k routed experts and the shared expert), and the output head.

        Not counted: the embedding lookup (a gather), norm weights, biases and sinks (element-wise).
        """
        q_width, kv_width = self.n_heads * self.head_dim, self.kv_heads * self.head_dim
        per_layer = 2 * self.dim * q_width + 2 * self.dim * kv_width + 3 * self.dim * self.ffn_dim
        return self.n_layers * per_layer + self.vocab_size * self.dim + self._moe_counts()[1]

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
# Llama 3.1 / 3.2 long-context RoPE (rope_scaling of their config.json); factor 8 for 3.1, 32 for 3.2.
_LLAMA31_ROPE = {"rope_type": "llama3", "rope_low_freq_factor": 1.0, "rope_high_freq_factor": 4.0,
                 "rope_original_max_seq_len": 8192}
_QWEN_COMMON = {"rope_theta": 1000000.0, "norm_eps": 1e-6, "max_seq_len": 32768}

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
        # Llama-3.2-1B shapes without its long-context RoPE scaling (see llama3.2-1b for the real model).
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
        # The published models' shapes (config.json of each); max_seq_len is a training length, raise it (up to
        # max_position_embeddings) for longer context. Weights come from the user's disk (model.init_from).
        "llama3.2-1b": ModelArgs(
            dim=2048, n_layers=16, n_heads=32, n_kv_heads=8, ffn_hidden_dim=8192, tie_embeddings=True,
            rope_factor=32.0, **_LLAMA31_ROPE, **_LLAMA3_COMMON,
        ),
        "llama3.2-3b": ModelArgs(
            dim=3072, n_layers=28, n_heads=24, n_kv_heads=8, ffn_hidden_dim=8192, tie_embeddings=True,
            rope_factor=32.0, **_LLAMA31_ROPE, **_LLAMA3_COMMON,
        ),
        "llama3.1-8b": ModelArgs(
            dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, ffn_hidden_dim=14336, rope_factor=8.0,
            **_LLAMA31_ROPE, **_LLAMA3_COMMON,
        ),
        # Qwen2.5 base models (q/k/v biases; their sliding window is off: use_sliding_window=false).
        "qwen2.5-0.5b": ModelArgs(
            dim=896, n_layers=24, n_heads=14, n_kv_heads=2, ffn_hidden_dim=4864, vocab_size=151936,
            tie_embeddings=True, attn_bias=True, **_QWEN_COMMON,
        ),
        "qwen2.5-1.5b": ModelArgs(
            dim=1536, n_layers=28, n_heads=12, n_kv_heads=2, ffn_hidden_dim=8960, vocab_size=151936,
            tie_embeddings=True, attn_bias=True, **_QWEN_COMMON,
        ),
        "qwen2.5-7b": ModelArgs(
            dim=3584, n_layers=28, n_heads=28, n_kv_heads=4, ffn_hidden_dim=18944, vocab_size=152064,
            attn_bias=True, **_QWEN_COMMON,
        ),
        # Qwen3 (head_dim 128 whatever the width, q/k RMSNorm, no biases).
        "qwen3-0.6b": ModelArgs(
            dim=1024, n_layers=28, n_heads=16, n_kv_heads=8, head_dim=128, ffn_hidden_dim=3072,
            vocab_size=151936, tie_embeddings=True, qk_norm=True, **_QWEN_COMMON,
        ),
        "qwen3-1.7b": ModelArgs(
            dim=2048, n_layers=28, n_heads=16, n_kv_heads=8, head_dim=128, ffn_hidden_dim=6144,
            vocab_size=151936, tie_embeddings=True, qk_norm=True, **_QWEN_COMMON,
        ),
        "qwen3-8b": ModelArgs(
            dim=4096, n_layers=36, n_heads=32, n_kv_heads=8, head_dim=128, ffn_hidden_dim=12288,
            vocab_size=151936, qk_norm=True, **_QWEN_COMMON,
        ),
        # A small MoE for Shakespeare on a CPU: 8 experts of width 256, top-2, on every layer, with z-loss and
    # aux-loss-free balancing (about the active parameters of a dense "tiny" with ffn_hidden_dim 512).
    "moe-tiny": ModelArgs(dim=256, n_layers=4, n_heads=4, n_kv_heads=2, vocab_size=4096, max_seq_len=256,
                          n_experts=8, moe_top_k=2, moe_ffn_dim=256, moe_z_loss_coef=1e-3,
                          moe_aux_loss_coef=1e-2),
    # Mistral-7B-v0.1: a 4096-token sliding window on every layer.
        "mistral-7b": ModelArgs(
            dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, ffn_hidden_dim=14336, vocab_size=32000,
            rope_theta=10000.0, norm_eps=1e-5, max_seq_len=8192, sliding_window=4096,
        ),
    }
)


def get_preset(name: str) -> ModelArgs:
    """A fresh copy of the preset `name` (safe to modify)."""
    if name not in PRESETS:
        raise ModelConfigError(f"unknown model preset {name!r}: choose one of {', '.join(PRESETS)}")
    return dataclasses.replace(PRESETS[name])
