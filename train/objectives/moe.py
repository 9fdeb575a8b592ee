"""The MoE side of an objective: router losses into the training loss, expert load into the logged terms, and
the auxiliary-loss-free bias update after each optimizer step. Every objective that trains a native MoE model uses
it the same way (`Objective.moe`): the LM objective (pretraining and SFT), DPO, reward / classifier heads, and
seq2seq (whose HF encoder-decoders have no native MoE layers: nothing to add there).

Each MoE forward leaves its `model.moe.RoutingStats` on its block; `MoETerms.add` reads them right after the
model's forward (before backward, so an activation-checkpointing recompute cannot count twice) and returns:

    loss + moe_aux_loss_coef * mean_layers(aux) + moe_z_loss_coef * mean_layers(z)

with the terms `moe_aux`, `moe_z` (means over MoE layers, before their coefficients), `moe_dropped` (fraction
of token copies over capacity, 0 when dropless), per layer `moe_max_mean.L<i>` (max / mean tokens per
expert) and, up to 16 experts, `moe_load.L<i>.e<j>` (share of layer i's token copies on expert j). Terms are
averaged over micro-batches and ranks by the trainer and land in metrics.jsonl and the diagnostics.
`end_step` adds the step's token counts over the data-parallel group and moves each layer's selection bias by
`moe_bias_update_rate * sign(mean load - load)` (DeepSeek-V3): every replica applies the same update.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from model.args import ModelArgs
from model.moe import MoEFeedForward

_LOAD_TERMS_UP_TO = 16  # experts per layer up to which each expert's share is a logged term


def moe_blocks(engine: Any) -> tuple[ModelArgs | None, list[tuple[int, MoEFeedForward]]]:
    """The model's args and its (layer, MoE block) pairs; (None, []) for a model without MoE layers.

    The model is the engine's module or the first module inside it that has MoE blocks (a sequence head's or a
    research recipe's wrapped Transformer)."""
    module = getattr(engine, "module", engine)
    for inner in module.modules():
        find = getattr(inner, "moe_blocks", None)
        if callable(find) and isinstance(getattr(inner, "args", None), ModelArgs):
            blocks = find()
            if blocks:
                return inner.args, blocks
    return None, []


class MoETerms:
    """Router losses and load statistics of one run's MoE layers (one instance per objective)."""

    def __init__(self) -> None:
        self.step_load: dict[int, torch.Tensor] = {}  # layer -> tokens per expert over this step's micro-batches

    def begin_step(self) -> None:
        self.step_load = {}

    def add(self, engine: Any, loss: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The loss with the router losses added, and the MoE terms of this micro-batch."""
        args, blocks = moe_blocks(engine)
        stats = [(i, b.last) for i, b in blocks if b.last is not None]
        if args is None or not stats:
            return loss, {}
        terms: dict[str, torch.Tensor] = {}
        aux = [s.aux_loss for _, s in stats if s.aux_loss is not None]
        z = [s.z_loss for _, s in stats if s.z_loss is not None]
        if aux:
            mean_aux = torch.stack(aux).mean()
            loss = loss + args.moe_aux_loss_coef * mean_aux
            terms["moe_aux"] = mean_aux.detach()
        if z:
            mean_z = torch.stack(z).mean()
            loss = loss + args.moe_z_loss_coef * mean_z
            terms["moe_z"] = mean_z.detach()
        dropped = sum(s.dropped.float() for _, s in stats)
        terms["moe_dropped"] = dropped / sum(s.routed for _, s in stats)  # type: ignore[operator]
        for i, s in stats:
            load = s.load.float()
            terms[f"moe_max_mean.L{i}"] = load.max() / load.mean().clamp_min(1e-9)
            if load.numel() <= _LOAD_TERMS_UP_TO:
                share = load / load.sum().clamp_min(1.0)
                for j in range(load.numel()):
                    terms[f"moe_load.L{i}.e{j}"] = share[j]
            previous = self.step_load.get(i)
            self.step_load[i] = s.load if previous is None else previous + s.load
        return loss, terms

    @torch.no_grad()
    def end_step(self, engine: Any, dp_group: Any) -> None:
        """Aux-loss-free balancing: move each layer's selection bias from the step's load over all replicas."""
        args, blocks = moe_blocks(engine)
        if args is None or not args.moe_bias_update_rate or not self.step_load:
            return
        layers = sorted(self.step_load)
        loads = torch.stack([self.step_load[i].float() for i in layers])  # (L, E)
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(loads, group=dp_group)
        by_layer = dict(blocks)
        for row, i in zip(loads, layers, strict=True):
            by_layer[i].update_bias(row, args.moe_bias_update_rate)
        self.step_load = {}
