"""A Llama-style decoder in plain PyTorch: RMSNorm, SwiGLU, RoPE, grouped-query attention, optional sinks,
optional mixture-of-experts FFNs on chosen layers (`model/moe.py`, Mixtral / Qwen3-MoE).

The optional pieces of today's families are fields of `ModelArgs`: scaled RoPE (Llama 3.1+), an explicit head
width and q/k RMSNorm (Qwen3), q/k/v and o_proj biases (Qwen2, Llama attention_bias), sliding-window layers
(Mistral, Qwen2/Qwen3 layer types).

Parameter names are those of Hugging Face `LlamaForCausalLM` without the `model.` prefix
(`embed_tokens`, `layers.N.self_attn.q_proj`, ..., `norm`, `lm_head`), so state dicts map one to one
(see `model/hf.py`). Layers live in one flat `nn.ModuleList`, so a pipeline stage can keep any slice of
them and set `embed_tokens`, `norm` or `lm_head` to None; `forward` then takes hidden states in and/or
gives hidden states out.

Building on the meta device, then materialising::

    with torch.device("meta"):
        model = Transformer(args)
    model.to_empty(device="cuda")
    model.init_weights()  # also re-ties the head and recomputes the RoPE tables
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from contextlib import AbstractContextManager

import torch
from torch import nn

from model.args import ModelArgs
from model.attention import attention
from model.cache import KVCache
from model.moe import MoEFeedForward
from model.ops import apply_rope, precompute_rope, rms_norm, rope_inv_freq, swiglu, yarn_attention_factor


class RMSNorm(nn.Module):
    """RMSNorm with a learned per-channel scale (`weight`, initialised to ones)."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))
        self.norm_fn = rms_norm  # the reference; `apply_kernels` may swap in a fused kernel of the same contract

    def init_weights(self) -> None:
        nn.init.ones_(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm_fn(x, self.weight, self.eps)


def rope_tables(args: ModelArgs, device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The cos/sin tables (max_seq_len, head_dim) of `args`' RoPE, scaled as its `rope_type` says."""
    head_dim = int(args.head_dim)  # type: ignore[arg-type]
    inv_freq = rope_inv_freq(head_dim, args.rope_theta, rope_type=args.rope_type, factor=args.rope_factor,
                             low_freq_factor=args.rope_low_freq_factor, high_freq_factor=args.rope_high_freq_factor,
                             original_max_seq_len=args.rope_original_max_seq_len, beta_fast=args.rope_beta_fast,
                             beta_slow=args.rope_beta_slow, truncate=args.rope_truncate, device=device)
    cos, sin = precompute_rope(head_dim, args.max_seq_len, args.rope_theta, device=device, inv_freq=inv_freq)
    if args.rope_type != "yarn":
        return cos, sin
    scale = yarn_attention_factor(args.rope_factor, args.rope_attention_factor)
    return cos * scale, sin * scale


class Attention(nn.Module):
    """Multi-head self-attention with RoPE, GQA, optional q/k/v (and o_proj) biases, optional q/k RMSNorm per
    head, an optional sliding window and an optional sink logit per head."""

    def __init__(self, args: ModelArgs, layer_id: int) -> None:
        super().__init__()
        self.layer_id = layer_id  # index of this layer's slot in a KVCache
        self.head_dim = head_dim = int(args.head_dim)  # type: ignore[arg-type]
        self.dropout = args.dropout
        self.window = args.layer_window(layer_id)  # sliding-window length of this layer, None: full attention
        self.q_proj = nn.Linear(args.dim, args.n_heads * head_dim, bias=args.attn_bias)
        self.k_proj = nn.Linear(args.dim, args.kv_heads * head_dim, bias=args.attn_bias)
        self.v_proj = nn.Linear(args.dim, args.kv_heads * head_dim, bias=args.attn_bias)
        self.o_proj = nn.Linear(args.n_heads * head_dim, args.dim, bias=args.o_bias)
        # Qwen3: RMSNorm over each head's width, shared by all heads (so tensor parallelism keeps it whole)
        self.q_norm = RMSNorm(head_dim, args.norm_eps) if args.qk_norm else None
        self.k_norm = RMSNorm(head_dim, args.norm_eps) if args.qk_norm else None
        self.sinks = nn.Parameter(torch.zeros(args.n_heads)) if args.attn_sinks else None
        # Context for drawing attention dropout; tensor parallelism gives each rank its own stream here.
        self.dropout_rng: Callable[[], AbstractContextManager[None]] = contextlib.nullcontext
        self.rope_fn = apply_rope  # the reference; `apply_kernels` may swap in a fused kernel

    def init_weights(self, std: float, out_std: float) -> None:
        for proj in (self.q_proj, self.k_proj, self.v_proj):
            nn.init.normal_(proj.weight, mean=0.0, std=std)
            if proj.bias is not None:
                nn.init.zeros_(proj.bias)
        nn.init.normal_(self.o_proj.weight, mean=0.0, std=out_std)
        if self.o_proj.bias is not None:
            nn.init.zeros_(self.o_proj.bias)
        for norm in (self.q_norm, self.k_norm):
            if norm is not None:
                norm.init_weights()
        if self.sinks is not None:
            nn.init.zeros_(self.sinks)

    def forward(
        self,
        x: torch.Tensor,
        rope_cos: torch.Tensor,
        rope_sin: torch.Tensor,
        position_ids: torch.Tensor,
        cache: KVCache | None,
        doc_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        # Shapes come from the projections' outputs, not from x: under tensor parallelism the heads are this
        # rank's share and, with sequence parallelism, x holds a slice of the sequence that q_proj gathers.
        q = self.q_proj(x)
        B, T = q.shape[:2]
        q = q.view(B, T, -1, self.head_dim)  # (B, T, Hq, D)
        k = self.k_proj(x).view(B, T, -1, self.head_dim)  # (B, T, Hkv, D)
        v = self.v_proj(x).view(B, T, -1, self.head_dim)  # (B, T, Hkv, D)
        if self.q_norm is not None and self.k_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)  # over D, per head
        q, k = self.rope_fn(q, k, rope_cos, rope_sin, position_ids)
        if cache is not None:
            k, v = cache.update(self.layer_id, k, v)  # (B, S, Hkv, D): cached positions + these T
        dropout_p = self.dropout if self.training else 0.0
        with self.dropout_rng() if dropout_p > 0 else contextlib.nullcontext():
            out = attention(q, k, v, causal=True, sinks=self.sinks, dropout_p=dropout_p,
                            doc_ids=doc_ids, window=self.window)  # (B, T, Hq, D)
        return self.o_proj(out.reshape(B, T, -1))  # (B, T, dim)


class FeedForward(nn.Module):
    """SwiGLU MLP: down_proj(silu(gate_proj(x)) * up_proj(x))."""

    def __init__(self, dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden_dim, bias=False)
        self.up_proj = nn.Linear(dim, hidden_dim, bias=False)
        self.down_proj = nn.Linear(hidden_dim, dim, bias=False)
        self.act_fn = swiglu  # the reference; `apply_kernels` may swap in a fused kernel

    def init_weights(self, std: float, out_std: float) -> None:
        nn.init.normal_(self.gate_proj.weight, mean=0.0, std=std)
        nn.init.normal_(self.up_proj.weight, mean=0.0, std=std)
        nn.init.normal_(self.down_proj.weight, mean=0.0, std=out_std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x), self.up_proj(x)))  # (B, T, dim)


def moe_feed_forward(args: ModelArgs) -> MoEFeedForward:
    """The routed-expert FFN of an MoE layer of `args` (model/moe.py)."""
    return MoEFeedForward(args.dim, n_experts=args.n_experts, top_k=args.moe_top_k, hidden_dim=args.expert_dim,
                          norm_topk_prob=args.moe_norm_topk_prob, capacity_factor=args.moe_capacity_factor,
                          aux_loss=args.moe_aux_loss_coef > 0, z_loss=args.moe_z_loss_coef > 0,
                          bias_balancing=args.moe_bias_update_rate > 0, shared_hidden_dim=args.moe_shared_ffn_dim,
                          shared_gate=args.moe_shared_gate)


class TransformerBlock(nn.Module):
    """Pre-norm block: h + attn(norm(h)), then h + mlp(norm(h))."""

    def __init__(self, args: ModelArgs, layer_id: int) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(args.dim, args.norm_eps)
        self.self_attn = Attention(args, layer_id)
        self.post_attention_layernorm = RMSNorm(args.dim, args.norm_eps)
        self.mlp: FeedForward | MoEFeedForward = (
            moe_feed_forward(args) if args.is_moe_layer(layer_id) else FeedForward(args.dim, args.ffn_dim))
        self.resid_dropout = nn.Dropout(args.dropout)

    def init_weights(self, std: float, out_std: float) -> None:
        self.input_layernorm.init_weights()
        self.self_attn.init_weights(std, out_std)
        self.post_attention_layernorm.init_weights()
        self.mlp.init_weights(std, out_std)

    def forward(
        self,
        h: torch.Tensor,
        rope_cos: torch.Tensor,
        rope_sin: torch.Tensor,
        position_ids: torch.Tensor,
        cache: KVCache | None,
        doc_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        attn_out = self.self_attn(self.input_layernorm(h), rope_cos, rope_sin, position_ids, cache, doc_ids)
        h = h + self.resid_dropout(attn_out)
        h = h + self.resid_dropout(self.mlp(self.post_attention_layernorm(h)))
        return h  # (B, T, dim)


class Transformer(nn.Module):
    """Decoder-only language model: embed_tokens -> layers -> norm -> lm_head."""

    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.args = args.validate()
        self.embed_tokens: nn.Embedding | None = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(TransformerBlock(args, layer_id) for layer_id in range(args.n_layers))
        self.norm: RMSNorm | None = RMSNorm(args.dim, args.norm_eps)
        self.lm_head: nn.Linear | None = nn.Linear(args.dim, args.vocab_size, bias=False)
        # RoPE tables are derived, not learned: non-persistent, recomputed by init_weights.
        rope_cos, rope_sin = rope_tables(args)
        self.register_buffer("rope_cos", rope_cos, persistent=False)  # (max_seq_len, head_dim)
        self.register_buffer("rope_sin", rope_sin, persistent=False)  # (max_seq_len, head_dim)
        self.init_weights()

    def moe_blocks(self) -> list[tuple[int, MoEFeedForward]]:
        """(layer index, MoE FFN) of this model's (or pipeline stage's) MoE layers."""
        return [(layer.self_attn.layer_id, layer.mlp) for layer in self.layers  # type: ignore[union-attr]
                if isinstance(layer.mlp, MoEFeedForward)]

    def tie_weights(self) -> None:
        """Share the embedding matrix with the head when `tie_embeddings` (and this stage has both).

        Needed again after `to_empty`, which gives each module its own fresh tensor.
        """
        if self.args.tie_embeddings and self.embed_tokens is not None and self.lm_head is not None:
            self.lm_head.weight = self.embed_tokens.weight

    @torch.no_grad()
    def init_weights(self) -> None:
        """(Re)initialise every parameter and the RoPE tables in place, deterministically for a torch seed.

        Weights ~ N(0, init_std); the residual output projections (o_proj, down_proj) use
        init_std / sqrt(2 * n_layers) so the residual stream does not grow with depth; norms are ones.
        """
        self.tie_weights()
        std = self.args.init_std
        out_std = std / math.sqrt(2 * self.args.n_layers)
        if self.embed_tokens is not None:
            nn.init.normal_(self.embed_tokens.weight, mean=0.0, std=std)
        for layer in self.layers:
            layer.init_weights(std, out_std)
        if self.norm is not None:
            self.norm.init_weights()
        if self.lm_head is not None and not self.args.tie_embeddings:
            nn.init.normal_(self.lm_head.weight, mean=0.0, std=std)
        self.rope_cos, self.rope_sin = rope_tables(self.args, device=self.rope_cos.device)

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        *,
        inputs_embeds: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        cache: KVCache | None = None,
        doc_ids: torch.Tensor | None = None,
        return_hidden: bool = False,
    ) -> torch.Tensor:
        """Next-token logits (B, T, V) in float32, or hidden states (B, T, dim) on a stage without a head.

        input_ids: (B, T) token ids; on a stage without `embed_tokens` it holds the incoming hidden
        states (B, T, dim) instead. inputs_embeds: (B, T, dim) used in place of the embedding lookup.
        position_ids: (B, T) or (T,); defaults to the positions following what `cache` already holds.
        cache: a `KVCache` to read earlier keys/values from and append this call's to.
        doc_ids: (B, T) document number of each token of packed sequences (with position_ids restarting
        per document): attention stays inside a document. Not with a cache.
        return_hidden: skip the head and return the final-normed hidden states (B, T, dim), for a loss that
        applies the head itself without materialising the logits (`model.kernels.LinearCrossEntropyHead`).
        """
        if inputs_embeds is not None:
            h = inputs_embeds
        elif input_ids is None:
            raise ValueError("Transformer.forward needs input_ids or inputs_embeds; both were None")
        elif self.embed_tokens is None:
            h = input_ids  # hidden states from the previous pipeline stage
        else:
            h = self.embed_tokens(input_ids)  # (B, T, dim)
        # The length of the input, not of h: under sequence parallelism h holds this rank's slice of it.
        T = (input_ids if inputs_embeds is None else inputs_embeds).shape[1]

        if position_ids is None:
            start = 0 if cache is None else cache.length
            if start + T > self.args.max_seq_len:
                raise ValueError(
                    f"positions up to {start + T} exceed ModelArgs.max_seq_len={self.args.max_seq_len}: "
                    f"feed shorter sequences or raise max_seq_len"
                )
            position_ids = torch.arange(start, start + T, device=h.device)  # (T,)

        for layer in self.layers:
            h = layer(h, self.rope_cos, self.rope_sin, position_ids, cache, doc_ids)  # (B, T, dim)
        if cache is not None:
            cache.advance(T)

        if self.norm is not None:
            h = self.norm(h)
        if self.lm_head is None or return_hidden:
            return h  # (B, T, dim)
        return self.lm_head(h).float()  # (B, T, V)


def build_model(args: ModelArgs, device: torch.device, seed: int) -> Transformer:
    """Build on the meta device, materialise on ``device``, initialise deterministically from ``seed``."""
    with torch.device("meta"):
        model = Transformer(args)
    model.to_empty(device=device)
    torch.manual_seed(seed)
    model.init_weights()
    return model
