"""Router terms in every objective that trains a native MoE model, not only the LM one: DPO (a policy whose
reference is a frozen copy) and reward / classifier heads add the auxiliary and z losses to their loss with the
model's coefficients, log them and the expert load like the LM objective, and move the aux-free selection bias
after the step."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
import torch

from model import ModelArgs
from model.heads import SequenceScorer
from model.model import build_model
from train.objectives.dpo import DPOObjective, ModelReference
from train.objectives.lm import Objective
from train.objectives.scoring import ScoreObjective

ARGS = ModelArgs(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=50, ffn_hidden_dim=48, max_seq_len=16,
                 n_experts=4, moe_top_k=2, moe_ffn_dim=24, moe_layers=[1], moe_aux_loss_coef=0.5,
                 moe_z_loss_coef=0.25, moe_bias_update_rate=0.01)
B, T = 2, 10


def _ids(seed: int) -> torch.Tensor:
    return torch.randint(0, ARGS.vocab_size, (B, T), generator=torch.Generator().manual_seed(seed))


def _preference_batch() -> dict[str, torch.Tensor]:
    batch: dict[str, torch.Tensor] = {"index": torch.arange(B)}
    for side, seed in (("chosen", 1), ("rejected", 2)):
        ids = _ids(seed)
        labels = torch.roll(ids, -1, dims=1)
        labels[:, :4] = -100  # the prompt
        batch |= {f"{side}_input_ids": ids, f"{side}_labels": labels,
                  f"{side}_position_ids": torch.arange(T).expand(B, T), f"{side}_doc_ids": torch.zeros(B, T).long()}
    return batch


def _classification_batch() -> dict[str, torch.Tensor]:
    return {"input_ids": _ids(3), "labels": torch.tensor([0, 2]), "position_ids": torch.arange(T).expand(B, T),
            "doc_ids": torch.zeros(B, T).long(), "index": torch.arange(B)}


def _dpo() -> tuple[Any, Objective, dict[str, torch.Tensor]]:
    policy = build_model(ARGS, torch.device("cpu"), seed=0)
    return policy, DPOObjective(ModelReference(build_model(ARGS, torch.device("cpu"), seed=0)), beta=0.1), \
        _preference_batch()


def _classifier() -> tuple[Any, Objective, dict[str, torch.Tensor]]:
    model = SequenceScorer.native(build_model(ARGS, torch.device("cpu"), seed=0), 3, pad_id=None)
    return model, ScoreObjective("classify", num_labels=3), _classification_batch()


def _reward() -> tuple[Any, Objective, dict[str, torch.Tensor]]:
    model = SequenceScorer.native(build_model(ARGS, torch.device("cpu"), seed=0), 1, pad_id=None)
    return model, ScoreObjective("pairwise", num_labels=1), _preference_batch()


def _router_grad(model: torch.nn.Module) -> torch.Tensor:
    return next(p.grad for n, p in model.named_parameters() if n.endswith("mlp.gate.weight"))


@pytest.mark.parametrize("make", [_dpo, _classifier, _reward], ids=["dpo", "classify", "reward"])
def test_objective_adds_logs_and_balances_the_router_terms(make: Any) -> None:
    model, objective, batch = make()
    inner = getattr(model, "model", model)  # the Transformer (under a sequence head)
    objective.begin_step(1)
    loss, terms = objective.loss(model, batch, torch.device("cpu"))
    assert {"moe_aux", "moe_z", "moe_dropped", "moe_max_mean.L1", "moe_load.L1.e0"} <= terms.keys(), terms.keys()
    loss.backward()
    with_router = _router_grad(model).clone()

    # the same micro-batch with the coefficients at 0: the loss differs by exactly the weighted router terms
    inner.args = dataclasses.replace(ARGS, moe_aux_loss_coef=0.0, moe_z_loss_coef=0.0)
    model.zero_grad(set_to_none=True)
    plain, _ = objective.loss(model, batch, torch.device("cpu"))
    plain.backward()
    added = ARGS.moe_aux_loss_coef * terms["moe_aux"] + ARGS.moe_z_loss_coef * terms["moe_z"]
    assert added.item() > 0.1
    assert (loss - plain).item() == pytest.approx(added.item(), rel=1e-5)
    assert not torch.allclose(with_router, _router_grad(model))  # the router losses reach the router's weights

    inner.args = ARGS
    bias = inner.layers[1].mlp.gate.e_score_correction_bias
    assert not bias.any()
    objective.end_step(model, 1, {k: float(v) for k, v in terms.items()})
    assert bias.abs().sum().item() > 0  # the aux-free balancing step ran from this step's load
