"""Direct preference optimisation: the sigmoid DPO loss against a reference policy, as a training objective.

The policy and the reference start from the same weights. The reference is one of:

- ``adapters``: the policy's own base with its LoRA adapters switched off (PEFT's ``disable_adapter``): no
  second copy in memory; exactly the base model's log-probabilities;
- ``copy``: a frozen second copy of the starting weights, built the way the policy was (same seed, same
  ``model.init_from`` / ``hf.path``), placed on the device, or sharded by its own ZeRO-3 engine under ZeRO-3;
- ``cached``: the starting weights' log-probabilities of every example, computed once by the policy before its
  first step and kept in ``<out_dir>/reference_logps.pt`` (a resumed run reads them back): no reference model.

For a pair with summed response log-probabilities (pi_c, pi_r) under the policy and (ref_c, ref_r) under the
reference, z = beta * ((pi_c - ref_c) - (pi_r - ref_r)) and the loss is
-(1 - eps) * log sigmoid(z) - eps * log sigmoid(-z) (eps: label smoothing). Logged per step and per
evaluation: the implicit rewards beta * (pi - ref) of the chosen and rejected responses, their margin, and
the preference accuracy (the share of pairs with z > 0).
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from train.data.sampler import is_filler
from train.eval import WeightedMean
from train.objectives.lm import Objective, dp_group, lm_loss

REFERENCE_FILE = "reference_logps.pt"
log = logging.getLogger("tessera")


def sequence_logps(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sum of the log-probabilities of the labelled tokens of each row (`lm_loss` per token, negated):
    logits (B, T, V), labels (B, T) -> (B,)."""
    B, T = labels.shape
    return (-lm_loss(logits, labels, reduction="none")).view(B, T).sum(-1)


def dpo_loss(policy: torch.Tensor, reference: torch.Tensor, beta: float, label_smoothing: float = 0.0
             ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Mean sigmoid DPO loss of pairs from (2B,) log-probs ordered chosen first.

    Returns (loss, per-pair terms)."""
    pc, pr = policy.chunk(2)
    rc, rr = reference.chunk(2)
    chosen, rejected = beta * (pc - rc), beta * (pr - rr)  # implicit rewards (B,)
    z = chosen - rejected
    losses = -(1 - label_smoothing) * F.logsigmoid(z) - label_smoothing * F.logsigmoid(-z)
    terms = {"reward_chosen": chosen.detach(), "reward_rejected": rejected.detach(), "margin": z.detach(),
             "accuracy": (z > 0).float().detach()}
    return losses.mean(), terms


def _pairs(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """A preference batch as one (2B, T) batch, chosen rows first."""
    b = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
    keys = ("input_ids", "labels", "position_ids", "doc_ids")
    return {k: torch.cat([b[f"chosen_{k}"], b[f"rejected_{k}"]]) for k in keys} | {"index": b["index"]}


def _forward(model: Any, pairs: dict[str, torch.Tensor]) -> torch.Tensor:
    return model(pairs["input_ids"], position_ids=pairs["position_ids"], doc_ids=pairs["doc_ids"])


class Reference(ABC):
    """Log-probabilities of a (2B, T) pair batch under the reference policy (no gradient)."""

    @abstractmethod
    def logps(self, engine: Any, pairs: dict[str, torch.Tensor]) -> torch.Tensor: ...


class AdapterReference(Reference):
    """The policy's base: the same module with its LoRA adapters switched off, in eval mode (no dropout)."""

    @torch.no_grad()
    def logps(self, engine: Any, pairs: dict[str, torch.Tensor]) -> torch.Tensor:
        module = engine.module
        peft_model = getattr(module, "model", None)
        if not hasattr(peft_model, "disable_adapter"):
            raise TypeError("dpo.reference='adapters' needs a PEFT model (lora.r > 0)")
        was_training = module.training
        module.eval()
        try:
            with peft_model.disable_adapter():
                return sequence_logps(_forward(module, pairs), pairs["labels"])
        finally:
            module.train(was_training)


class ModelReference(Reference):
    """A frozen copy of the starting weights (a module, or a ZeRO-3 engine holding its shards)."""

    def __init__(self, model: Any) -> None:
        self.model = model
        for p in model.parameters():
            p.requires_grad_(False)
        model.eval()

    @torch.no_grad()
    def logps(self, engine: Any, pairs: dict[str, torch.Tensor]) -> torch.Tensor:
        return sequence_logps(_forward(self.model, pairs), pairs["labels"])


class CachedReference(Reference):
    """Per-example (chosen, rejected) log-probs of the starting weights, looked up by the batch's
    ``index``."""

    def __init__(self, table: torch.Tensor) -> None:
        self.table = table  # (N, 2) float64 on CPU

    def logps(self, engine: Any, pairs: dict[str, torch.Tensor]) -> torch.Tensor:
        rows = self.table[pairs["index"].cpu()].to(pairs["input_ids"].device, torch.float32)  # (B, 2)
        return torch.cat([rows[:, 0], rows[:, 1]])


@torch.no_grad()
def compute_reference_table(engine: Any, dataset: Any, micro_batch: int,
                            device: torch.device) -> torch.Tensor:
    """(N, 2) log-probs of every pair of ``dataset`` under the engine's current weights; ranks share the
    work."""
    n, rank, world = len(dataset), dist.get_rank(), dist.get_world_size()
    table = torch.zeros(n, 2, dtype=torch.float64, device=device)
    mine = list(range(rank, n, world))
    module = engine.module
    was_training = module.training
    module.eval()
    try:
        for start in range(0, -(-n // world), micro_batch):
            chunk = mine[start : start + micro_batch]
            # a rank with nothing left still runs a forward: ZeRO-3 gathers the weights collectively
            pairs = _pairs(dataset.batch(chunk or [0]), device)
            logps = sequence_logps(_forward(module, pairs), pairs["labels"]).double()
            if chunk:
                table[torch.as_tensor(chunk, device=device)] = torch.stack(logps.chunk(2), dim=1)
    finally:
        module.train(was_training)
    dist.all_reduce(table)
    return table.cpu()


class DPOObjective(Objective):
    """The trainer's objective for preference pairs (see the module docstring)."""

    def __init__(self, reference: Reference, *, beta: float, label_smoothing: float = 0.0) -> None:
        super().__init__()
        self.reference, self.beta, self.label_smoothing = reference, beta, label_smoothing

    def _pair_loss(self, engine: Any, batch: Any, device: torch.device
                   ) -> tuple[torch.Tensor, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """(DPO loss with the policy's router losses, per-pair terms, MoE terms)."""
        pairs = _pairs(batch, device)
        policy = sequence_logps(_forward(engine, pairs), pairs["labels"])
        # the router losses of the policy's forward, read before the reference runs (the 'adapters' reference is
        # the same module, whose forward would leave its own routing statistics)
        router, moe_terms = self.moe.add(engine, policy.new_zeros(()))
        loss, terms = dpo_loss(policy, self.reference.logps(engine, pairs), self.beta, self.label_smoothing)
        return loss + router, terms, moe_terms

    def loss(self, engine: Any, batch: Any,
             device: torch.device) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        loss, terms, moe_terms = self._pair_loss(engine, batch, device)
        return loss, {k: v.mean() for k, v in terms.items()} | moe_terms

    @torch.no_grad()
    def evaluate(self, engine: Any, batches: Callable[[], Iterator[Any]], device: torch.device,
                 step: int | None = None) -> dict[str, float]:
        """Pair-weighted means over the evaluation's pairs, added over the data-parallel group (eval mode: no
        dropout); a filler batch runs and counts nothing."""
        names = ("loss", "accuracy", "margin", "reward_chosen", "reward_rejected")
        totals = WeightedMean(names, device)  # weighted by pairs
        engine.eval()
        for batch in batches():
            skip = is_filler(batch)
            pairs = _pairs(batch, device)
            policy = sequence_logps(_forward(engine, pairs), pairs["labels"])
            ref = self.reference.logps(engine, pairs)
            pc, pr = policy.chunk(2)
            rc, rr = ref.chunk(2)
            z = self.beta * ((pc - rc) - (pr - rr))
            losses = -(1 - self.label_smoothing) * F.logsigmoid(z) - self.label_smoothing * F.logsigmoid(-z)
            values = [losses, (z > 0).float(), z, self.beta * (pc - rc), self.beta * (pr - rr)]
            if not skip:
                totals.add_sums([v.double().sum() for v in values], len(z))
        totals = totals.all_reduce(dp_group(engine))
        engine.train()
        return {f"val_{name}": v for name, v in totals.means().items()}


def build_reference(kind: str, *, engine: Any, adapters: bool, fresh_model: Callable[[], nn.Module],
                    ds_config: dict[str, Any], device: torch.device, out_dir: Path, dataset: Any,
                    micro_batch: int, resuming: bool, rank: int) -> Reference:
    """The reference policy of ``dpo.reference`` (resolving 'auto'); collective."""
    if kind == "auto":
        kind = "adapters" if adapters else "copy"
    if kind == "adapters":
        return AdapterReference()
    if kind == "cached":
        path = out_dir / REFERENCE_FILE
        if resuming:
            if not path.is_file():
                raise FileNotFoundError(f"{path}: the cached reference log-probs of this run are missing; "
                                        f"start the run again, or use dpo.reference='copy'")
            return CachedReference(torch.load(path, weights_only=True))
        table = compute_reference_table(engine, dataset, micro_batch, device)
        if rank == 0:
            out_dir.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(path.name + ".tmp")
            torch.save(table, tmp)
            tmp.replace(path)
        log.info("reference log-probs of %d pairs cached in %s", len(table), path)
        return CachedReference(table)
    model = fresh_model()
    if int(ds_config.get("zero_optimization", {}).get("stage", 0)) == 3:  # sharded like the policy
        import deepspeed

        training_only = ("optimizer", "scheduler", "gradient_clipping")
        frozen = {k: v for k, v in ds_config.items() if k not in training_only}
        ref_engine, *_ = deepspeed.initialize(model=model, config=frozen)
        return ModelReference(ref_engine)
    return ModelReference(model.to(device))
