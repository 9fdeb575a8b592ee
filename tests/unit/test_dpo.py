"""DPO pieces in one process: the loss against hand-computed values, the three references, learning on a toy set."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from model.hf_causal import CausalLM, load_causal_lm
from model.lora import apply_lora, lora_targets
from tests.hf_models import make_hf_model, write_preferences
from train.data.corpus import DataError
from train.data.supervised import Renderer, SupervisedDataset
from train.data.tokenizer import load_tokenizer
from train.objectives.dpo import (
    AdapterReference,
    CachedReference,
    DPOObjective,
    ModelReference,
    compute_reference_table,
    dpo_loss,
    sequence_logps,
)


@pytest.fixture(scope="module")
def world() -> None:
    """A one-rank gloo group, as the trainer runs under."""
    if not dist.is_initialized():
        store = dist.HashStore()
        dist.init_process_group("gloo", rank=0, world_size=1, store=store)
    yield
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("dpo")
    model_dir = make_hf_model(root, "llama")
    data = SupervisedDataset([write_preferences(root / "pref.jsonl", n=16)],
                             Renderer(load_tokenizer(model_dir), max_len=64), kind="preference")
    return {"dir": model_dir, "data": data, "root": root}


class Engine:
    """The part of a DeepSpeed engine the objective uses: calling it, and `.module`."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.module = module

    def __call__(self, *args: object, **kwargs: object) -> torch.Tensor:
        return self.module(*args, **kwargs)

    def eval(self) -> None:
        self.module.eval()

    def train(self) -> None:
        self.module.train()


def test_loss_and_logps_against_hand_computed_values() -> None:
    logits = torch.log(torch.tensor([[[0.5, 0.25, 0.25], [0.1, 0.8, 0.1]]]))  # (1, 2, 3) log-probs as logits
    labels = torch.tensor([[0, -100]])
    assert sequence_logps(logits, labels).item() == pytest.approx(math.log(0.5))
    policy, reference = torch.tensor([-1.0, -3.0]), torch.tensor([-2.0, -2.0])  # chosen, rejected
    loss, terms = dpo_loss(policy, reference, beta=0.5)
    z = 0.5 * ((-1 + 2) - (-3 + 2))  # = 1
    assert loss.item() == pytest.approx(-math.log(1 / (1 + math.exp(-z))))
    assert terms["margin"].item() == pytest.approx(z) and terms["accuracy"].item() == 1.0
    smoothed, _ = dpo_loss(policy, reference, beta=0.5, label_smoothing=0.1)
    sig = 1 / (1 + math.exp(-z))
    assert smoothed.item() == pytest.approx(-0.9 * math.log(sig) - 0.1 * math.log(1 - sig))


def test_identical_chosen_and_rejected_is_refused(setup: dict, tmp_path: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "p", "chosen": " same", "rejected": " same"}\n')
    with pytest.raises(DataError, match=r"bad.jsonl:1: chosen and rejected are the same text"):
        SupervisedDataset([bad], setup["data"].renderer, kind="preference")


def test_adapter_reference_is_the_base_model_exactly(setup: dict, world: None) -> None:
    base = CausalLM(load_causal_lm(setup["dir"]))
    peft = CausalLM(apply_lora(load_causal_lm(setup["dir"]), lora_targets(base.model), r=4, alpha=8))
    for p in peft.parameters():  # adapters that change the outputs
        if p.requires_grad:
            torch.nn.init.normal_(p, std=0.1)
    batch = setup["data"].batch([0, 1, 2])
    objective = DPOObjective(AdapterReference(), beta=0.1)
    from train.objectives.dpo import _pairs

    pairs = _pairs(batch, torch.device("cpu"))
    with torch.no_grad():
        expect = sequence_logps(base.eval()(pairs["input_ids"], position_ids=pairs["position_ids"],
                                            doc_ids=pairs["doc_ids"]), pairs["labels"])
        policy = sequence_logps(peft(pairs["input_ids"], position_ids=pairs["position_ids"],
                                     doc_ids=pairs["doc_ids"]), pairs["labels"])
    assert torch.equal(objective.reference.logps(Engine(peft), pairs), expect)
    assert not torch.allclose(policy, expect) and peft.training  # the adapters were on, and are on again


def test_dpo_learns_the_toy_rule_and_leaves_a_copy_reference_unchanged(setup: dict, world: None) -> None:
    policy = CausalLM(load_causal_lm(setup["dir"]))
    reference = CausalLM(load_causal_lm(setup["dir"]))
    before = {n: p.clone() for n, p in reference.state_dict().items()}
    engine = Engine(policy)
    table = compute_reference_table(engine, setup["data"], 4, torch.device("cpu"))
    objective = DPOObjective(ModelReference(reference), beta=0.5)
    cached = DPOObjective(CachedReference(table), beta=0.5)
    batch = setup["data"].batch(list(range(16)))
    first = objective.evaluate(engine, lambda: iter([batch]), torch.device("cpu"))
    assert first["val_margin"] == pytest.approx(0.0, abs=1e-6) and first["val_accuracy"] == 0.0  # policy = reference
    assert cached.evaluate(engine, lambda: iter([batch]), torch.device("cpu")) == pytest.approx(first, abs=1e-6)
    opt = torch.optim.AdamW(policy.parameters(), lr=3e-3)
    for _ in range(15):
        loss, _ = objective.loss(engine, batch, torch.device("cpu"))
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = objective.evaluate(engine, lambda: iter([batch]), torch.device("cpu"))
    assert after["val_accuracy"] == 1.0 and after["val_margin"] > 1.0 and after["val_loss"] < first["val_loss"] - 0.3
    assert all(torch.equal(before[n], p) for n, p in reference.state_dict().items())
    assert cached.evaluate(engine, lambda: iter([batch]), torch.device("cpu")) == pytest.approx(after, abs=1e-5)
