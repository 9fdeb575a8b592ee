"""Mixture-of-experts feed-forward block: a top-k router, grouped SwiGLU experts, optional shared expert.

Layout and names follow transformers 5's in-memory Mixtral / Qwen3-MoE modules, so a state dict moves with
only the per-expert <-> stacked conversion that `model/hf.py` does for the on-disk HF names:

    mlp.gate.weight                    (E, dim)       router logits = x @ W^T
    mlp.gate.e_score_correction_bias   (E,)           auxiliary-loss-free balancing bias (only when used)
    mlp.experts.gate_up_proj           (E, 2*I, dim)  per expert [gate_proj; up_proj] stacked on the rows
    mlp.experts.down_proj              (E, dim, I)
    mlp.shared_expert.{gate,up,down}_proj, mlp.shared_expert_gate.weight (1, dim)   (optional)

Why one stacked parameter per projection rather than a ModuleList of `nn.Linear`s: the grouped GEMM takes
exactly this (E, N, K) operand, so the forward is two grouped matmuls with no per-expert Python work; the
stacked tensor is what transformers itself keeps in memory; and expert parallelism later only has to slice
the leading E dimension (each rank keeps E / ep experts as one local parameter, which ZeRO partitions like
any other) and tensor parallelism splits the I dimension of both (column / row inside every expert).

The forward is written as three separable steps so an expert-parallel transformation can put an
all-to-all between them: `route` (router: choices and weights per token), `dispatch` (sort the token copies
by expert, apply the capacity limit, count), `experts(...)` on the sorted rows (one grouped GEMM per
projection: `torch.nn.functional.grouped_mm` / `torch._grouped_mm` where this torch has it, else a loop over
experts on contiguous slices with the same result) and `combine` (weight and scatter-add back to tokens).
Three seams (`enter`, `into_experts`, `leave`: identities here) are where tensor parallelism puts its communication
(`parallel.moe_tp`): the block's code is the same whether its experts hold all or a slice of their hidden units.

Routing matches transformers: softmax over all experts in float32, top-k of the probabilities, then either
renormalised over the k (`moe_norm_topk_prob=True`: Mixtral, Qwen3-MoE `norm_topk_prob: true`; the same as a
softmax over the k top logits) or left as they are (Qwen3-MoE / Qwen2-MoE `norm_topk_prob: false`). The
auxiliary-loss-free bias (DeepSeek-V3) is added to the probabilities for the choice only; the weights stay the
unbiased probabilities. Each forward leaves its routing statistics in `last` (a `RoutingStats`): the
objective adds the auxiliary / z losses to the training loss and logs the load from there.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from model.ops import swiglu

_GROUPED_MM = getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)


def grouped_mm(x: torch.Tensor, w: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Rows of `x` (M, K) sorted by group, group g of `counts[g]` rows times `w[g]` (G, K, N) -> (M, N).

    One grouped GEMM where torch has it for these operands; otherwise a loop over the groups' contiguous
    slices (the same result)."""
    if _GROUPED_MM is not None and x.dtype in (torch.float32, torch.bfloat16) and x.device.type in ("cpu", "cuda"):
        offs = torch.cumsum(counts, 0).to(torch.int32)
        try:
            return _GROUPED_MM(x, w, offs=offs)
        except (RuntimeError, NotImplementedError):
            pass  # operands this build's kernel refuses (strides not 16-byte multiples, dtype): the loop below
    return looped_mm(x, w, counts)


def looped_mm(x: torch.Tensor, w: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """`grouped_mm` as a loop over the groups' contiguous slices (one matmul per expert, never per token)."""
    outs = [x[a:a + n] @ w[g] for g, (a, n) in enumerate(_slices(counts))]
    return torch.cat(outs) if outs else x.new_zeros(0, w.shape[-1])


def _slices(counts: torch.Tensor) -> list[tuple[int, int]]:
    sizes = counts.tolist()
    starts = [0]
    for n in sizes[:-1]:
        starts.append(starts[-1] + n)
    return list(zip(starts, sizes, strict=True))


@dataclass
class RoutingStats:
    """What one MoE forward leaves behind for the objective (losses keep their graph; counts are detached)."""

    aux_loss: torch.Tensor | None  # switch-style balance loss E * sum_i f_i * P_i (None when not asked for)
    z_loss: torch.Tensor | None  # mean over tokens of logsumexp(router logits)^2 (None when not asked for)
    load: torch.Tensor  # (E,) token copies routed to each expert (before the capacity limit)
    dropped: torch.Tensor  # () token copies dropped by the capacity limit (0 when dropless)
    routed: int  # token copies routed (tokens * top_k)


@dataclass
class Dispatch:
    """Token copies sorted by expert: which token each row is, its routing weight, rows per expert."""

    token: torch.Tensor  # (M,) token index of each sorted row
    weight: torch.Tensor  # (M,) routing weight of each sorted row
    counts: torch.Tensor  # (E,) rows per expert (after the capacity limit)
    dropped: torch.Tensor  # () token copies over capacity


class Router(nn.Module):
    """Linear router over `n_experts` with top-k selection; `e_score_correction_bias` is the aux-free bias."""

    def __init__(self, dim: int, n_experts: int, top_k: int, norm_topk_prob: bool, with_bias: bool) -> None:
        super().__init__()
        self.top_k, self.norm_topk_prob = top_k, norm_topk_prob
        self.weight = nn.Parameter(torch.empty(n_experts, dim))
        # Not trained by the optimizer: updated after each step from the load (DeepSeek-V3); saved in checkpoints.
        self.e_score_correction_bias: torch.Tensor | None
        self.register_buffer("e_score_correction_bias", torch.zeros(n_experts) if with_bias else None)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x (N, dim) -> router logits (N, E), chosen experts (N, k), routing weights (N, k) in x's dtype."""
        logits = F.linear(x, self.weight)  # (N, E)
        probs = torch.softmax(logits.float(), dim=-1)  # (N, E)
        scores = probs if self.e_score_correction_bias is None else probs + self.e_score_correction_bias.float()
        chosen = torch.topk(scores, self.top_k, dim=-1).indices  # (N, k)
        weights = probs.gather(1, chosen)  # (N, k)
        if self.norm_topk_prob:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return logits, chosen, weights.to(x.dtype)


class GroupedExperts(nn.Module):
    """`n_experts` SwiGLU FFNs of width `hidden_dim`, run on expert-sorted rows by grouped GEMMs."""

    def __init__(self, dim: int, hidden_dim: int, n_experts: int) -> None:
        super().__init__()
        self.gate_up_proj = nn.Parameter(torch.empty(n_experts, 2 * hidden_dim, dim))  # (E, 2I, dim)
        self.down_proj = nn.Parameter(torch.empty(n_experts, dim, hidden_dim))  # (E, dim, I)
        self.act_fn = swiglu

    def init_weights(self, std: float, out_std: float) -> None:
        nn.init.normal_(self.gate_up_proj, mean=0.0, std=std)
        nn.init.normal_(self.down_proj, mean=0.0, std=out_std)

    def forward(self, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """x (M, dim) sorted by expert, `counts` (E,) rows per expert -> (M, dim)."""
        gate_up = grouped_mm(x, self.gate_up_proj.transpose(1, 2), counts)  # (M, 2I)
        gate, up = gate_up.chunk(2, dim=-1)
        return grouped_mm(self.act_fn(gate, up), self.down_proj.transpose(1, 2), counts)  # (M, dim)


class SharedExpert(nn.Module):
    """A dense SwiGLU FFN every token goes through (Qwen2-MoE `shared_expert`; DeepSeek's shared experts are
    one such FFN of their summed width)."""

    def __init__(self, dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden_dim, bias=False)
        self.up_proj = nn.Linear(dim, hidden_dim, bias=False)
        self.down_proj = nn.Linear(hidden_dim, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(swiglu(self.gate_proj(x), self.up_proj(x)))


class MoEFeedForward(nn.Module):
    """Routed experts (+ optional shared expert, optionally sigmoid-gated) in place of a dense FFN."""

    def __init__(self, dim: int, *, n_experts: int, top_k: int, hidden_dim: int, norm_topk_prob: bool,
                 capacity_factor: float | None = None, aux_loss: bool = False, z_loss: bool = False,
                 bias_balancing: bool = False, shared_hidden_dim: int | None = None,
                 shared_gate: bool = False) -> None:
        super().__init__()
        self.n_experts, self.top_k, self.capacity_factor = n_experts, top_k, capacity_factor
        self.want_aux, self.want_z = aux_loss, z_loss
        self.gate = Router(dim, n_experts, top_k, norm_topk_prob, bias_balancing)
        self.experts = GroupedExperts(dim, hidden_dim, n_experts)
        self.shared_expert = SharedExpert(dim, shared_hidden_dim) if shared_hidden_dim else None
        self.shared_expert_gate = nn.Linear(dim, 1, bias=False) if shared_hidden_dim and shared_gate else None
        self.last: RoutingStats | None = None  # the last forward's statistics

    def init_weights(self, std: float, out_std: float) -> None:
        nn.init.normal_(self.gate.weight, mean=0.0, std=std)
        if self.gate.e_score_correction_bias is not None:
            self.gate.e_score_correction_bias.zero_()
        self.experts.init_weights(std, out_std)
        if self.shared_expert is not None:
            for proj in (self.shared_expert.gate_proj, self.shared_expert.up_proj):
                nn.init.normal_(proj.weight, mean=0.0, std=std)
            nn.init.normal_(self.shared_expert.down_proj.weight, mean=0.0, std=out_std)
        if self.shared_expert_gate is not None:
            nn.init.normal_(self.shared_expert_gate.weight, mean=0.0, std=std)

    def capacity(self, n_tokens: int) -> int | None:
        """Token copies one expert takes per forward (None: dropless)."""
        if self.capacity_factor is None:
            return None
        return math.ceil(self.capacity_factor * n_tokens * self.top_k / self.n_experts)

    def dispatch(self, chosen: torch.Tensor, weights: torch.Tensor) -> Dispatch:
        """Sort the (N, k) token copies by expert (stable: token order inside an expert) and drop the copies
        past an expert's capacity (the later tokens)."""
        flat = chosen.reshape(-1)  # (N*k,)
        order = torch.argsort(flat, stable=True)  # (N*k,)
        counts = torch.bincount(flat, minlength=self.n_experts)  # (E,)
        cap = self.capacity(chosen.shape[0])
        dropped = counts.new_zeros(())
        if cap is not None:
            starts = torch.cumsum(counts, 0) - counts  # (E,)
            rank_in_expert = torch.arange(flat.numel(), device=flat.device) - starts[flat[order]]
            keep = rank_in_expert < cap
            order = order[keep]
            kept = counts.clamp(max=cap)
            dropped = (counts - kept).sum()
            counts = kept
        return Dispatch(token=order // self.top_k, weight=weights.reshape(-1)[order], counts=counts,
                        dropped=dropped)

    def combine(self, rows: torch.Tensor, d: Dispatch, n_tokens: int, weight: torch.Tensor | None = None
                ) -> torch.Tensor:
        """Weighted expert outputs (M, dim) added back to their tokens -> (N, dim) (``weight``: d.weight)."""
        w = d.weight if weight is None else weight
        out = rows.new_zeros(n_tokens, rows.shape[-1])
        return out.index_add(0, d.token, rows * w.unsqueeze(-1).to(rows.dtype))

    # The seams of tensor parallelism: identities here. `parallel.moe_tp.TensorParallelMoE` puts its communication
    # in them (its experts and shared expert hold a slice of every FFN's hidden units and give partial sums).
    def enter(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The block's input -> every token of the micro-batch (B, T, dim) twice: as the router sees it, and as
        the experts (routed and shared) take it."""
        return x, x

    def into_experts(self, t: torch.Tensor) -> torch.Tensor:
        """A tensor the router side made (routing weights, shared gate) as the experts' side uses it."""
        return t

    def leave(self, out: torch.Tensor) -> torch.Tensor:
        """The experts' (B, T, dim) output -> the block's output."""
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, x_experts = self.enter(x)
        shape = x.shape
        flat = x.reshape(-1, shape[-1])  # (N, dim)
        logits, chosen, weights = self.gate(flat)
        d = self.dispatch(chosen, weights)
        inner = x_experts.reshape(-1, shape[-1])  # (N, dim)
        rows = self.experts(inner[d.token], d.counts)  # (M, dim)
        out = self.combine(rows, d, flat.shape[0], self.into_experts(d.weight))  # (N, dim)
        if self.shared_expert is not None:
            shared = self.shared_expert(inner)
            if self.shared_expert_gate is not None:
                shared = self.into_experts(torch.sigmoid(self.shared_expert_gate(flat))) * shared
            out = out + shared
        self.last = self._stats(logits, chosen, d.dropped.detach())
        return self.leave(out.view(shape))

    def _stats(self, logits: torch.Tensor, chosen: torch.Tensor, dropped: torch.Tensor) -> RoutingStats:
        """This forward's routing statistics: switch aux loss and z-loss (when asked for), load, drops."""
        n = logits.shape[0]
        load = torch.bincount(chosen.reshape(-1), minlength=self.n_experts).detach()
        aux = z = None
        if self.want_aux:
            probs = torch.softmax(logits.float(), dim=-1)  # (N, E)
            aux = self.n_experts * torch.sum(load.float() / n * probs.mean(dim=0))
        if self.want_z:
            z = torch.logsumexp(logits.float(), dim=-1).square().mean()
        return RoutingStats(aux_loss=aux, z_loss=z, load=load, dropped=dropped, routed=n * self.top_k)

    @torch.no_grad()
    def update_bias(self, load: torch.Tensor, rate: float) -> None:
        """Aux-loss-free balancing step: bias += rate * sign(mean load - load) (DeepSeek-V3)."""
        bias = self.gate.e_score_correction_bias
        if bias is None:
            return
        load = load.to(bias.device, torch.float32)
        bias.add_(rate * torch.sign(load.mean() - load))
