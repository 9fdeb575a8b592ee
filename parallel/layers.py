"""Tensor-parallel layers whose local shards are plain `nn.Parameter`s (so ZeRO can partition them).

Each layer keeps the attribute names of the layer it replaces (`weight`, `bias`), so state-dict keys stay
the plain model's, and marks its sharded parameters the way DeepSpeed reads them:
``tensor_model_parallel = True`` (count once per rank in the gradient norm) and ``partition_dim``.
Replicated parameters carry no mark and are counted on TP rank 0 only.

All layers share one `TPContext`: the group, this rank's place in it, whether sequence parallelism
is on, and the generator for randomness that must differ between TP ranks.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from model.ops import rms_norm
from parallel.comm import copy_to_tp, gather_seq, reduce_from_tp, reduce_scatter_seq


@dataclass
class TPContext:
    """What every tensor-parallel layer of one model shares.

    Randomness that must differ between the ranks of a TP group (dropout over this rank's heads, or over its
    slice of the sequence) draws from the context's own `torch.Generator`, one per device, seeded
    ``seed + 2718 + rank`` at its first draw. The default generator, used everywhere else, stays identical on
    the ranks of a group, so dropout on replicated activations draws the same mask on each of them.
    """

    group: Any  # the tensor-parallel process group (None: a group of one)
    size: int
    rank: int
    sequence_parallel: bool = False  # activations between blocks are split along the sequence
    seed: int = 0  # base seed of the per-TP-rank generator
    _generators: dict[str, torch.Generator] = field(default_factory=dict, repr=False)  # device -> this rank's

    @classmethod
    def for_group(cls, group: Any, *, sequence_parallel: bool = False, seed: int = 0) -> TPContext:
        size = 1 if group is None else dist.get_world_size(group)
        rank = 0 if group is None else dist.get_rank(group)
        return cls(group, size, rank, sequence_parallel=sequence_parallel and size > 1, seed=seed)

    def generator(self, device: torch.device | str) -> torch.Generator:
        """This TP rank's generator on ``device`` (made and seeded at the first call for that device)."""
        key = _device_key(device)
        g = self._generators.get(key)
        if g is None:
            g = self._generators[key] = torch.Generator(key).manual_seed(self.seed + 2718 + self.rank)
        return g

    @contextlib.contextmanager
    def default_rng(self) -> Iterator[None]:
        """Run the block with the default generators drawing this rank's stream, for kernels that take no
        generator (attention dropout inside SDPA / flash-attn): the CPU one, and the current CUDA device's
        once CUDA is in use. They hold this rank's generator states for the block, which then keep what was
        drawn, and the default generators get their own states back."""
        devices = ["cpu"]
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            devices.append(f"cuda:{torch.cuda.current_device()}")
        pairs = [(self.generator(d), _default_generator(d)) for d in devices]
        saved = [default.get_state() for _, default in pairs]
        for own, default in pairs:
            default.set_state(own.get_state())
        try:
            yield
        finally:
            for (own, default), state in zip(pairs, saved, strict=True):
                own.set_state(default.get_state())
                default.set_state(state)

    def rng_state(self) -> dict[str, torch.Tensor]:
        """The state of each of this rank's generators, by device (empty before the first draw): what
        `set_rng_state` and `replay_rng` go back to, and what a checkpoint keeps to resume the stream."""
        return {key: g.get_state() for key, g in self._generators.items()}

    def set_rng_state(self, state: dict[str, torch.Tensor]) -> None:
        """Put the generators back to ``state`` (`rng_state`'s); a device it does not name starts from the
        seed again at its next draw."""
        for key in [k for k in self._generators if k not in state]:
            del self._generators[key]
        for key, value in state.items():
            self.generator(key).set_state(value)

    @contextlib.contextmanager
    def replay_rng(self, state: dict[str, torch.Tensor]) -> Iterator[None]:
        """Draw again from ``state`` (activation recomputation redraws the masks of the first pass), then
        leave the generators where they were, so later draws are those of a run without recomputation."""
        current = self.rng_state()
        self.set_rng_state(state)
        try:
            yield
        finally:
            self.set_rng_state(current)

    @contextlib.contextmanager
    def sequence_parallel_off(self) -> Iterator[None]:
        """Run whole sequences of any length (generation, evaluation of odd lengths) without SP."""
        saved = self.sequence_parallel
        self.sequence_parallel = False
        try:
            yield
        finally:
            self.sequence_parallel = saved


def enter_tp_region(x: torch.Tensor, ctx: TPContext) -> torch.Tensor:
    """A replicated (or, under SP, sequence-split) activation about to feed column-parallel layers."""
    return gather_seq(x, ctx.group) if ctx.sequence_parallel else copy_to_tp(x, ctx.group)


def region_input_hook(ctx: TPContext) -> Any:
    """A forward pre-hook (``with_kwargs=True``) that brings a module's input into the TP region once for all its
    layers: the first positional argument, or ``hidden_states`` when it is passed by keyword (HF modules)."""

    def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
        if args:
            return (enter_tp_region(args[0], ctx), *args[1:]), kwargs
        if "hidden_states" not in kwargs:
            raise TypeError(f"{type(module).__name__}: a TP region needs its input as the first argument or as "
                            f"hidden_states=")
        return args, {**kwargs, "hidden_states": enter_tp_region(kwargs["hidden_states"], ctx)}

    return hook


def mark_sharded(param: nn.Parameter, dim: int) -> nn.Parameter:
    """Tag a parameter as this rank's shard along ``dim`` (read by DeepSpeed and by `gather_full_state_dict`)."""
    param.tensor_model_parallel = True
    param.partition_dim = dim
    param.partition_stride = 1
    return param


def _new_param(shape: tuple[int, ...], like: torch.Tensor, source: torch.Tensor | None) -> nn.Parameter:
    """A parameter of ``shape`` on ``like``'s device and dtype, holding ``source`` when it is given."""
    data = torch.empty(shape, device=like.device, dtype=like.dtype)
    if source is not None and not data.is_meta:
        data.copy_(source)
    return nn.Parameter(data)


def _rows(full: torch.Tensor, start: int, length: int) -> torch.Tensor | None:
    """Rows [start, start + length) of ``full``, zero-padded past its end (padded vocabulary); None on meta."""
    if full.is_meta:
        return None
    out = torch.zeros((length, *full.shape[1:]), dtype=full.dtype, device=full.device)
    take = max(0, min(full.shape[0], start + length) - start)
    out[:take] = full[start : start + take]
    return out


class ColumnParallelLinear(nn.Module):
    """y = x A^T + b with A split by output rows: each rank computes its slice of the output features.

    Input: (B, T, in) replicated, or (B, T/tp, in) under sequence parallelism (gathered here). With
    ``input_ready`` the enclosing module has already done that once for all its column layers (see
    `enter_tp_region`), so q/k/v or gate/up share one all-gather forward and one all-reduce backward.
    Output: (B, T, out/tp), this rank's features.
    """

    def __init__(self, linear: nn.Linear, ctx: TPContext, *, out_padded: int | None = None,
                 input_ready: bool = False) -> None:
        super().__init__()
        self.ctx, self.input_ready = ctx, input_ready
        self.in_features, self.full_out = linear.in_features, linear.out_features
        padded = out_padded or self.full_out
        if padded % ctx.size:
            raise ValueError(f"{padded} output features do not split over {ctx.size} tensor-parallel ranks")
        self.out_features = padded // ctx.size  # local
        self.start = ctx.rank * self.out_features
        w = _rows(linear.weight, self.start, self.out_features)
        self.weight = mark_sharded(_new_param((self.out_features, self.in_features), linear.weight, w), 0)
        self.bias: nn.Parameter | None = None
        if linear.bias is not None:
            b = _rows(linear.bias, self.start, self.out_features)
            self.bias = mark_sharded(_new_param((self.out_features,), linear.bias, b), 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.input_ready:
            x = enter_tp_region(x, self.ctx)
        return F.linear(x, self.weight, self.bias)  # (B, T, out/tp)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.full_out} (local {self.out_features}), tp={self.ctx.size}"


class RowParallelLinear(nn.Module):
    """y = x A^T + b with A split by input columns: each rank multiplies its slice, the results are summed.

    Input: (B, T, in/tp), this rank's features. Output: (B, T, out) summed over ranks, or (B, T/tp, out)
    reduce-scattered under sequence parallelism. The bias is replicated and added after the sum.
    """

    def __init__(self, linear: nn.Linear, ctx: TPContext) -> None:
        super().__init__()
        self.ctx = ctx
        self.full_in, self.out_features = linear.in_features, linear.out_features
        if self.full_in % ctx.size:
            raise ValueError(f"{self.full_in} input features do not split over {ctx.size} tensor-parallel ranks")
        self.in_features = self.full_in // ctx.size  # local
        start = ctx.rank * self.in_features
        w = None if linear.weight.is_meta else linear.weight[:, start : start + self.in_features]
        self.weight = mark_sharded(_new_param((self.out_features, self.in_features), linear.weight, w), 1)
        self.bias: nn.Parameter | None = None
        if linear.bias is not None:
            b = None if linear.bias.is_meta else linear.bias
            self.bias = _new_param((self.out_features,), linear.bias, b)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight)  # (B, T, out), this rank's partial sum
        if self.ctx.sequence_parallel:
            y = reduce_scatter_seq(y, self.ctx.group)  # (B, T/tp, out)
            bias = None if self.bias is None else copy_to_tp(self.bias, self.ctx.group)
        else:
            y = reduce_from_tp(y, self.ctx.group)
            bias = self.bias
        return y if bias is None else y + bias

    def extra_repr(self) -> str:
        return f"in={self.full_in} (local {self.in_features}), out={self.out_features}, tp={self.ctx.size}"


class VocabParallelEmbedding(nn.Module):
    """Embedding table split by rows (token ids): each rank looks up the ids it owns, the rest are summed in.

    Input: (B, T) ids. Output: (B, T, dim) replicated, or (B, T/tp, dim) under sequence parallelism.
    """

    def __init__(self, embedding: nn.Embedding, ctx: TPContext, *, padded: int) -> None:
        super().__init__()
        self.ctx = ctx
        self.num_embeddings, self.embedding_dim = embedding.num_embeddings, embedding.embedding_dim
        self.rows = padded // ctx.size  # local
        self.start = ctx.rank * self.rows
        w = _rows(embedding.weight, self.start, self.rows)
        self.weight = mark_sharded(_new_param((self.rows, self.embedding_dim), embedding.weight, w), 0)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        local = ids - self.start
        outside = (local < 0) | (local >= self.rows)  # ids another rank owns
        h = F.embedding(local.masked_fill(outside, 0), self.weight)  # (B, T, dim)
        h = h.masked_fill(outside.unsqueeze(-1), 0.0)
        if self.ctx.sequence_parallel:
            return reduce_scatter_seq(h, self.ctx.group)  # (B, T/tp, dim)
        return reduce_from_tp(h, self.ctx.group)

    def extra_repr(self) -> str:
        return (f"{self.num_embeddings}, {self.embedding_dim} (local rows {self.start}..{self.start + self.rows}), "
                f"tp={self.ctx.size}")


class SequenceParallelRMSNorm(nn.Module):
    """RMSNorm whose (replicated) weight sees only this rank's sequence slice under sequence parallelism.

    The weight's gradient is then a partial sum over the slice; `copy_to_tp` sums it over the TP group in
    backward, so every rank applies the same full gradient. Without sequence parallelism it is plain RMSNorm.
    """

    def __init__(self, norm: nn.Module, ctx: TPContext) -> None:
        super().__init__()
        self.ctx, self.eps = ctx, norm.eps
        self.weight = norm.weight
        self.norm_fn = getattr(norm, "norm_fn", rms_norm)  # `apply_kernels` may swap in a fused kernel

    def init_weights(self) -> None:
        nn.init.ones_(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = copy_to_tp(self.weight, self.ctx.group) if self.ctx.sequence_parallel else self.weight
        return self.norm_fn(x, w, self.eps)


class HeadSharedRMSNorm(SequenceParallelRMSNorm):
    """An RMSNorm over each head's width whose one weight serves every head (Qwen3's q_norm / k_norm).

    Under tensor parallelism each rank normalises its own heads, so the weight's gradient is a partial sum over
    them; `copy_to_tp` sums it over the TP group in backward (with or without sequence parallelism, the heads are
    split either way). The weight stays whole on every rank.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm_fn(x, copy_to_tp(self.weight, self.ctx.group), self.eps)  # (B, T, H/tp, D)


class TPDropout(nn.Dropout):
    """Dropout on sequence-parallel activations: each TP rank holds other positions, so it draws its own mask
    from the context's generator (replicated activations, without sequence parallelism, draw from the default
    generator, alike on every rank)."""

    def __init__(self, p: float, ctx: TPContext) -> None:
        super().__init__(p)
        self.ctx = ctx

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and self.p > 0):
            return x
        if not self.ctx.sequence_parallel:
            return super().forward(x)
        # what F.dropout computes on the CPU, with the mask drawn from this rank's generator
        keep = torch.empty_like(x).bernoulli_(1 - self.p, generator=self.ctx.generator(x.device))
        return x * keep.div_(1 - self.p)


def _device_key(device: torch.device | str) -> str:
    """``device`` as a generator's key: "cpu", or "cuda:<index>" (the current device when none is named)."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return str(device)


def _default_generator(key: str) -> torch.Generator:
    """The generator that ops without a ``generator`` argument draw from on the device ``key``."""
    device = torch.device(key)
    if device.type == "cpu":
        return torch.default_generator
    if device.type == "cuda":
        return torch.cuda.default_generators[device.index]
    raise ValueError(f"no default generator known for {key}: TP dropout runs on CPU or CUDA")
