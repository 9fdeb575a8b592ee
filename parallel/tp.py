"""Tensor parallelism as a transformation of the plain model: a plan, `apply_tp`, and the way back.

    groups = build_process_groups(ParallelDims(world, tp=2))
    ctx = apply_tp(model, groups.tp_group, sequence_parallel=True, seed=cfg.train.seed)
    loss = tp_lm_loss(model, ctx)(model(x), y)          # vocab-parallel cross-entropy
    full = gather_full_state_dict(model)                # the plain model's state dict, on every rank

A run applies it through `parallel.parallelize.parallelize`, which also chooses the loss.

A plan maps module-name patterns (`fnmatch`, on names like ``layers.3.mlp.up_proj``) to a style:

- ``column``: `nn.Linear` split by output features (q/k/v, gate/up: heads and hidden units per rank), a bias
  split with its columns;
- ``row``: `nn.Linear` split by input features, outputs summed (o_proj, down_proj), a bias added once after;
- ``vocab``: `nn.Embedding` split by token rows; ``vocab_head``: the output head split by token rows, the
  logits stay split (see `parallel.loss`); the vocabulary is padded to a multiple of tp;
- ``region``: a module whose input enters the TP region once (one all-gather / all-reduce for all the
  column layers under it, as Megatron's fused QKV and gate/up projections have); on an MoE block
  (`model.moe.MoEFeedForward`) it splits every expert's FFN and the shared expert inside the block and keeps
  the router whole (`parallel.moe_tp`): the block's own layers need no entries;
- ``heads``: an attention module: a ``region`` whose per-head parameters (sinks) are sliced and whose
  attention dropout draws per-rank masks;
- ``norm``: an RMSNorm whose weight gradient is summed over the group under sequence parallelism;
- ``head_norm``: an RMSNorm over head_dim shared by all heads (Qwen3's q/k norms): it stays whole and local
  to each rank's heads, its weight gradient is summed over the group;
- ``dropout``: residual dropout that draws per-rank masks under sequence parallelism.

Every `nn.Linear` and `nn.Embedding` of the model must be matched, or `apply_tp` refuses the model
(a layer silently left whole would be computed on replicated inputs and be wrong or wasteful).
A materialised model keeps its values (each rank copies its slice); a meta model gets meta shards.

Most split tensors are one contiguous slice per rank along their ``partition_dim``; the experts' fused
``gate_up_proj`` is two (``partition_stride = 2``: its gate rows and its up rows are each split). `tp_shard_layout`
says which, and `tp_split` / `tp_join` cut and join a tensor by its layout entry.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from model.args import ModelArgs
from model.cache import KVCache
from model.model import Transformer
from model.moe import MoEFeedForward
from parallel.comm import _gather, scatter_seq
from parallel.dims import ParallelDims, padded_vocab_size
from parallel.layers import (
    ColumnParallelLinear,
    HeadSharedRMSNorm,
    RowParallelLinear,
    SequenceParallelRMSNorm,
    TPContext,
    TPDropout,
    VocabParallelEmbedding,
    mark_sharded,
    region_input_hook,
)
from parallel.loss import gather_logits, vocab_parallel_cross_entropy
from parallel.moe_tp import shard_moe, tp_slice, tp_unslice

TRANSFORMER_TP_PLAN: Mapping[str, str] = {
    "embed_tokens": "vocab",
    "layers.*.self_attn": "heads",
    "layers.*.self_attn.q_proj": "column",
    "layers.*.self_attn.k_proj": "column",
    "layers.*.self_attn.v_proj": "column",
    "layers.*.self_attn.o_proj": "row",
    "layers.*.self_attn.q_norm": "head_norm",
    "layers.*.self_attn.k_norm": "head_norm",
    "layers.*.mlp": "region",
    "layers.*.mlp.gate_proj": "column",
    "layers.*.mlp.up_proj": "column",
    "layers.*.mlp.down_proj": "row",
    "layers.*.input_layernorm": "norm",
    "layers.*.post_attention_layernorm": "norm",
    "layers.*.resid_dropout": "dropout",
    "norm": "norm",
    "lm_head": "vocab_head",
}
"""The plan of `model.Transformer` (Llama names): Megatron's split of attention and MLP."""

HF_LLAMA_TP_PLAN: Mapping[str, str] = {
    **{f"model.{pattern}": style for pattern, style in TRANSFORMER_TP_PLAN.items()
       if pattern != "lm_head" and style not in ("norm", "dropout", "head_norm")},
    "lm_head": "vocab_head",
}
"""The same split for HF Llama / Mistral / Qwen2 causal LMs (`model.` in front; no sequence parallelism)."""
HF_TP_MODEL_TYPES = ("llama", "mistral", "qwen2")

STYLES = ("column", "row", "vocab", "vocab_head", "region", "heads", "norm", "head_norm", "dropout")


class TPPlanError(ValueError):
    """A plan that does not fit the model; the message names the module and the fix."""


def match_plan(model: nn.Module, plan: Mapping[str, str]) -> dict[str, str]:
    """Module name -> style for every module the plan matches; refuse unknown styles and uncovered layers."""
    for pattern, style in plan.items():
        if style not in STYLES:
            raise TPPlanError(f"TP plan entry {pattern!r}: unknown style {style!r}; use one of {', '.join(STYLES)}")
    matched: dict[str, str] = {}
    moe_blocks: list[str] = []  # MoE blocks split as a whole: their layers are theirs, not the plan's
    for name, module in model.named_modules():
        if any(name.startswith(block + ".") for block in moe_blocks):
            continue
        styles = {style for pattern, style in plan.items() if fnmatch.fnmatchcase(name, pattern)}
        if len(styles) > 1:
            raise TPPlanError(f"module {name!r} matches TP plan entries of several styles: {sorted(styles)}")
        if styles:
            matched[name] = styles.pop()
            if isinstance(module, MoEFeedForward):
                if matched[name] != "region":
                    raise TPPlanError(f"MoE block {name!r} has the TP style {matched[name]!r}; an MoE block is split "
                                      f"as a 'region' (its experts' FFNs column / row, the router whole)")
                moe_blocks.append(name)
        elif isinstance(module, nn.Linear | nn.Embedding):
            raise TPPlanError(
                f"module {name!r} ({type(module).__name__}) is not covered by the TP plan: add a pattern for it "
                f"(column, row, vocab or vocab_head)"
            )
    return matched


def _set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


def _shard_heads(attn: nn.Module, ctx: TPContext, name: str) -> None:
    """Slice per-head parameters (sinks) and have attention dropout draw from this rank's generator."""
    sinks = getattr(attn, "sinks", None)
    if sinks is not None:
        if sinks.shape[0] % ctx.size:
            raise TPPlanError(f"{name}.sinks: {sinks.shape[0]} heads do not split over tp={ctx.size}")
        n = sinks.shape[0] // ctx.size
        local = torch.empty(n, device=sinks.device, dtype=sinks.dtype)
        if not sinks.is_meta:
            local.copy_(sinks[ctx.rank * n : (ctx.rank + 1) * n])
        attn.sinks = mark_sharded(nn.Parameter(local), 0)
    # attention probabilities are over this rank's heads; attention kernels draw from the default generator
    attn.dropout_rng = ctx.default_rng


def apply_tp(
    model: nn.Module,
    group: Any,
    plan: Mapping[str, str] = TRANSFORMER_TP_PLAN,
    *,
    sequence_parallel: bool = False,
    seed: int = 0,
) -> TPContext:
    """Swap the plan's modules for tensor-parallel ones over ``group``, in place; return the shared context."""
    ctx = TPContext.for_group(group, sequence_parallel=sequence_parallel, seed=seed)
    shard_model(model, ctx, plan)
    return ctx


def shard_model(model: nn.Module, ctx: TPContext, plan: Mapping[str, str] = TRANSFORMER_TP_PLAN) -> None:
    """`apply_tp` for a given context (its size and rank decide the shards; its group is used at run time)."""
    matched = match_plan(model, plan)
    if ctx.size == 1:
        return
    if isinstance(model, Transformer):  # whole heads per rank, or GQA groups would be cut in half
        ParallelDims(ctx.size, tp=ctx.size).check_model(model.args, seq_len=ctx.size, sequence_parallel=False)
    tied = model.args.tie_embeddings if isinstance(model, Transformer) else \
        bool(getattr(getattr(model, "config", None), "tie_word_embeddings", False))
    regions = [name for name, style in matched.items() if style in ("region", "heads")]
    for name, style in matched.items():
        module = model.get_submodule(name)
        if isinstance(module, MoEFeedForward):
            shard_moe(module, ctx, name)  # the block enters and leaves the TP region itself
            continue
        if style in ("region", "heads"):
            module.register_forward_pre_hook(region_input_hook(ctx), with_kwargs=True)
        if style == "column":
            ready = any(name.startswith(region + ".") for region in regions)
            _set_submodule(model, name, ColumnParallelLinear(module, ctx, input_ready=ready))
        elif style == "row":
            _set_submodule(model, name, RowParallelLinear(module, ctx))
        elif style == "vocab":
            padded = padded_vocab_size(module.num_embeddings, ctx.size)
            _set_submodule(model, name, VocabParallelEmbedding(module, ctx, padded=padded))
        elif style == "vocab_head":
            padded = padded_vocab_size(module.out_features, ctx.size)
            head = ColumnParallelLinear(module, ctx, out_padded=padded)
            head.vocab_size = module.out_features
            _set_submodule(model, name, head)
        elif style == "heads":
            _shard_heads(module, ctx, name)
        elif style == "norm":
            _set_submodule(model, name, SequenceParallelRMSNorm(module, ctx))
        elif style == "head_norm":
            _set_submodule(model, name, HeadSharedRMSNorm(module, ctx))
        elif style == "dropout":
            _set_submodule(model, name, TPDropout(module.p, ctx))
    if tied:
        model.tie_weights()
    if isinstance(model, Transformer):
        model.register_forward_pre_hook(_split_inputs_embeds(ctx), with_kwargs=True)
    model.tp_context = ctx


def _split_inputs_embeds(ctx: TPContext) -> Any:
    """Under sequence parallelism, caller-given ``inputs_embeds`` (B, T, dim) enter as this rank's (B, T/tp, dim),
    as the embedding's own output does; their gradient comes back whole on every rank."""

    def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
        embeds = kwargs.get("inputs_embeds")
        if embeds is not None and ctx.sequence_parallel:
            T = embeds.shape[1]  # the positions are those of the whole sequence, not of this rank's slice
            positions = kwargs.get("position_ids")
            kwargs = {**kwargs, "inputs_embeds": scatter_seq(embeds, ctx.group),
                      "position_ids": torch.arange(T, device=embeds.device) if positions is None else positions}
        return args, kwargs

    return hook


TPSplit = tuple[int, int | None] | tuple[int, int | None, int]
"""How one tensor is split over TP ranks: (partition_dim, rows of the unpadded tensor or None), and a third
element, the stride, only for a tensor whose rank shard is ``stride`` pieces (the experts' ``gate_up_proj``:
(1, None, 2)). Cut and join with `tp_split` / `tp_join`."""


def split_spec(spec: TPSplit) -> tuple[int, int | None, int]:
    """(partition_dim, unpadded rows or None, stride) of a layout entry."""
    return (spec[0], spec[1], spec[2]) if len(spec) == 3 else (spec[0], spec[1], 1)


def tp_split(full: torch.Tensor, spec: TPSplit, tp: int, rank: int) -> torch.Tensor:
    """TP rank ``rank``'s shard of the plain tensor ``full`` under layout entry ``spec`` (vocabulary rows
    zero-padded to a multiple of ``tp``)."""
    dim, rows, stride = split_spec(spec)
    if rows is not None and full.shape[dim] % tp:
        pad = list(full.shape)
        pad[dim] = padded_vocab_size(full.shape[dim], tp) - full.shape[dim]
        full = torch.cat([full, full.new_zeros(pad)], dim=dim)
    return tp_slice(full, dim, stride, tp, rank)


def tp_join(parts: Sequence[torch.Tensor], spec: TPSplit) -> torch.Tensor:
    """The plain tensor from the shards of TP ranks 0..tp-1 under layout entry ``spec`` (padding cut off)."""
    dim, rows, stride = split_spec(spec)
    full = tp_unslice(list(parts), dim, stride)
    return full.narrow(dim, 0, rows) if rows is not None else full


def tp_shard_layout(args: ModelArgs | nn.Module, tp: int, plan: Mapping[str, str] = TRANSFORMER_TP_PLAN
                    ) -> dict[str, TPSplit | None]:
    """How a tp-way checkpoint of ``Transformer(args)`` (or of a given meta-device model) is split, per
    state-dict key (no process group needed).

    name -> (partition_dim, rows of the unpadded tensor or None[, stride when > 1]) for split tensors (see
    `TPSplit`), None for replicated ones.
    """
    if isinstance(args, nn.Module):
        model = args
    else:
        with torch.device("meta"):
            model = Transformer(args)
    shard_model(model, TPContext(group=None, size=tp, rank=0), plan)
    layout: dict[str, tuple[int, int | None] | None] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        if getattr(param, "tensor_model_parallel", False):
            owner = model.get_submodule(name.rpartition(".")[0])
            rows = getattr(owner, "vocab_size", None) or getattr(owner, "num_embeddings", None)
            spec = (param.partition_dim, rows if param.partition_dim == 0 else None)
            stride = getattr(param, "partition_stride", 1)
            layout[name] = (*spec, stride) if stride > 1 else spec
        else:
            layout[name] = None
    return layout


def merge_tp_shards(shards: Sequence[Mapping[str, torch.Tensor]], layout: Mapping[str, TPSplit | None]
                    ) -> dict[str, torch.Tensor]:
    """The plain model's state dict from the state dicts of TP ranks 0..tp-1 (as saved per model-parallel rank)."""
    merged: dict[str, torch.Tensor] = {}
    common = set.intersection(*(set(s) for s in shards))  # a tied head may be listed by some ranks only
    for name, tensor in shards[0].items():
        if name not in common:
            continue
        spec = layout.get(name)
        if spec is None:
            merged[name] = tensor
            continue
        merged[name] = tp_join([s[name] for s in shards], spec)
    return merged


def _head(model: nn.Module) -> ColumnParallelLinear | None:
    """The vocabulary-parallel output head, also inside a wrapper (model.hf_causal.CausalLM)."""
    for name, module in model.named_modules():
        if name.rpartition(".")[2] == "lm_head" and isinstance(module, ColumnParallelLinear):
            return module
    return None


def tp_lm_loss(model: nn.Module, ctx: TPContext) -> Any:
    """The language-model loss for this model: vocab-parallel cross-entropy when its head is split."""
    head = _head(model)
    if head is None:
        raise TPPlanError("the model has no vocabulary-parallel lm_head: apply_tp with a 'vocab_head' entry first")
    start, vocab = head.start, head.vocab_size

    def loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return vocab_parallel_cross_entropy(logits, labels, start=start, vocab_size=vocab, group=ctx.group)

    return loss


class FullLogits(nn.Module):
    """A tensor-parallel model seen whole: full-vocabulary logits, sequences of any length (for generation)."""

    def __init__(self, model: nn.Module, ctx: TPContext) -> None:
        super().__init__()
        self.model, self.ctx = model, ctx
        head = _head(model)
        self.vocab_size = head.vocab_size if head is not None else None

    @property
    def args(self) -> Any:
        return self.model.args

    @property
    def max_seq_len(self) -> int:
        inner = getattr(self.model, "max_seq_len", None)
        return int(inner) if inner is not None else self.model.args.max_seq_len

    def new_cache(self, batch_size: int, max_len: int, **kw: Any) -> Any:
        """The wrapped model's own cache, or a KVCache shaped for it (each rank caches its own heads)."""
        if hasattr(self.model, "new_cache"):
            return self.model.new_cache(batch_size, max_len, **kw)
        return KVCache.for_model(self.model.args, batch_size, max_len, **kw)

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        with self.ctx.sequence_parallel_off():
            out = self.model(*args, **kwargs)
        if self.vocab_size is None:
            return out
        return gather_logits(out, vocab_size=self.vocab_size, group=self.ctx.group)


@torch.no_grad()
def gather_full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The plain model's state dict, assembled from every TP rank's shards (collective over the TP group).

    Sharded tensors are gathered along their ``partition_dim`` and the vocabulary padding is cut off;
    replicated ones are returned as they are. Every rank gets the whole dict, on CPU.
    """
    return _gather_named(model, model.state_dict())


@torch.no_grad()
def gather_full_grads(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter's gradient as the plain model's full tensor (collective over the TP group)."""
    named = {n: p.grad for n, p in model.named_parameters(remove_duplicate=False) if p.grad is not None}
    return _gather_named(model, named)


def _gather_named(model: nn.Module, named: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    ctx: TPContext | None = getattr(model, "tp_context", None)
    params = dict(model.named_parameters(remove_duplicate=False))
    out: dict[str, torch.Tensor] = {}
    for name, tensor in named.items():
        param = params.get(name)
        if ctx is not None and ctx.size > 1 and getattr(param, "tensor_model_parallel", False):
            dim, stride = param.partition_dim, getattr(param, "partition_stride", 1)
            full = _gather(tensor.detach(), dim, ctx.group)
            if stride > 1:
                full = tp_unslice(list(full.chunk(ctx.size, dim=dim)), dim, stride)
            owner = model.get_submodule(name.rpartition(".")[0])
            full_rows = getattr(owner, "vocab_size", None) or getattr(owner, "num_embeddings", None)
            if param.partition_dim == 0 and full_rows is not None:
                full = full[:full_rows]
            out[name] = full.cpu()
        else:
            out[name] = tensor.detach().cpu()
    if ctx is not None and ctx.size > 1:
        dist.barrier(group=ctx.group)
    return out
