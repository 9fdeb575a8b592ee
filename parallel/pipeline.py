"""Pipeline parallelism: the plain model's flat layer list as a DeepSpeed `PipelineModule`.

    pipe = build_pipeline(model, dims, loss_fn=loss, tp_ctx=ctx)        # after apply_tp, if any
    engine, *_ = deepspeed.initialize(model=pipe, ...)                 # the pipeline engine, ZeRO 0-1
    loss = engine.train_batch(data_iter)                                # micro-batches from the DS config

The stages are cut from one list: the embedding, one piece per transformer block, the final norm and the
head. Tied input/output embeddings become a `TiedLayerSpec` that DeepSpeed keeps in sync between the first
and the last stage. Tensor parallelism composes: each piece keeps the TP layers `apply_tp` put in it, and
DeepSpeed's grid is built with the same rank order (pipe, data, model), so the TP group of a stage is the
grid's slice-parallel group. Between stages travel (B, T, dim) hidden states (B, T/tp, dim) under sequence
parallelism).

Every rank builds the whole model (on the host, or on the meta device) and each stage keeps only its pieces.
Checkpoint files are DeepSpeed's ``layer_NN-model_MM-model_states.pt``; `pipe_to_plain_key` maps their keys
back to the plain model's names.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any, Literal, get_args

import torch
import torch.nn.functional as F
from torch import nn

from model.model import Transformer, TransformerBlock
from parallel.dims import ParallelDims
from parallel.layers import TPContext, enter_tp_region

# How the layer list is cut into stages; the recipe's parallel.partition_method takes this type.
PartitionMethod = Literal["parameters", "uniform"]
PARTITION_METHODS: tuple[PartitionMethod, ...] = get_args(PartitionMethod)


class EmbeddingPipe(nn.Module):
    """Stage piece 0: token ids (B, T) -> hidden states (B, T, dim)."""

    def __init__(self, embed_tokens: nn.Module) -> None:
        super().__init__()
        self.embed_tokens = embed_tokens

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.embed_tokens(ids)


class BlockPipe(nn.Module):
    """One transformer block with its own view of the RoPE tables; positions are 0..T-1 of the full sequence."""

    def __init__(self, block: TransformerBlock, rope_cos: torch.Tensor, rope_sin: torch.Tensor,
                 tp_ctx: TPContext | None) -> None:
        super().__init__()
        self.layer = block
        self.tp_ctx = tp_ctx
        self.register_buffer("rope_cos", rope_cos, persistent=False)
        self.register_buffer("rope_sin", rope_sin, persistent=False)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        split = self.tp_ctx is not None and self.tp_ctx.sequence_parallel
        T = h.shape[1] * (self.tp_ctx.size if split else 1)  # h may hold this rank's slice of the sequence
        positions = torch.arange(T, device=h.device)
        return self.layer(h, self.rope_cos, self.rope_sin, positions, None)


class NormPipe(nn.Module):
    def __init__(self, norm: nn.Module) -> None:
        super().__init__()
        self.norm = norm

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.norm(h)


class HeadPipe(nn.Module):
    """The output head (untied): hidden states -> float32 logits (this rank's vocabulary rows under TP)."""

    def __init__(self, lm_head: nn.Module) -> None:
        super().__init__()
        self.lm_head = lm_head

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.lm_head(h).float()


def _tied_head(tp_ctx: TPContext | None) -> Callable[[EmbeddingPipe, torch.Tensor], torch.Tensor]:
    """The head of a tied model: the embedding matrix (this rank's rows under TP) applied to hidden states."""

    def head(embedding: EmbeddingPipe, h: torch.Tensor) -> torch.Tensor:
        if tp_ctx is not None and tp_ctx.size > 1:
            h = enter_tp_region(h, tp_ctx)
        return F.linear(h, embedding.embed_tokens.weight).float()

    return head


def pipe_pieces(model: Transformer, tp_ctx: TPContext | None = None) -> list[Any]:
    """The layer list a `PipelineModule` takes: embedding, blocks, norm, head (tied ones as a TiedLayerSpec)."""
    from deepspeed.pipe import TiedLayerSpec

    if model.embed_tokens is None or model.norm is None or model.lm_head is None:
        raise ValueError("build_pipeline needs the whole model (embedding, norm and head); it cuts the stages")
    blocks = [BlockPipe(b, model.rope_cos, model.rope_sin, tp_ctx) for b in model.layers]
    if model.args.tie_embeddings:
        return [TiedLayerSpec("embed", EmbeddingPipe, model.embed_tokens, tied_weight_attr="embed_tokens.weight"),
                *blocks, NormPipe(model.norm),
                TiedLayerSpec("embed", EmbeddingPipe, model.embed_tokens, forward_fn=_tied_head(tp_ctx),
                              tied_weight_attr="embed_tokens.weight")]
    return [EmbeddingPipe(model.embed_tokens), *blocks, NormPipe(model.norm), HeadPipe(model.lm_head)]


def build_pipeline(
    model: Transformer,
    dims: ParallelDims,
    *,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    tp_ctx: TPContext | None = None,
    partition_method: str = "parameters",
    activation_checkpoint_interval: int = 0,
) -> Any:
    """A `deepspeed.pipe.PipelineModule` of ``model`` over ``dims.pp`` stages (collective: builds the grid)."""
    from deepspeed.pipe import PipelineModule
    from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology

    if partition_method not in PARTITION_METHODS:
        raise ValueError(f"partition_method={partition_method!r}: use one of {', '.join(PARTITION_METHODS)}")
    topology = PipeModelDataParallelTopology(num_pp=dims.pp, num_mp=dims.tp, num_dp=dims.dp)
    return PipelineModule(layers=pipe_pieces(model, tp_ctx), topology=topology, loss_fn=loss_fn,
                          partition_method=partition_method,
                          activation_checkpoint_interval=activation_checkpoint_interval,
                          # blocks only: the embedding's input ids carry no gradient for recomputation to follow
                          checkpointable_layers=[BlockPipe.__name__])


def pipe_to_plain_key(layer_idx: int, key: str, n_layers: int) -> str:
    """The plain model's name of key ``key`` of pipeline piece ``layer_idx`` (0 embedding .. n_layers + 2 head)."""
    if 1 <= layer_idx <= n_layers:
        return f"layers.{layer_idx - 1}.{key.removeprefix('layer.')}"
    if layer_idx == n_layers + 2 and key.startswith("embed_tokens."):  # the tied head's copy of the embedding
        return "lm_head." + key.removeprefix("embed_tokens.")
    return key  # embed_tokens.*, norm.*, lm_head.*


LAYER_FILE = re.compile(r"layer_(\d+)(?:-model_(\d+))?-model_states\.pt$")
"""DeepSpeed's per-piece checkpoint file: layer index and (with TP) the model-parallel rank."""
