"""`parallelize`: the fixed, logged order of TP, activation checkpointing, kernels, compile, the loss, the
caller's wrap and pipeline cutting; the one choice of the loss; no random number drawn by any of its steps."""

from __future__ import annotations

import logging
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import parallel.parallelize as parallelize_mod
from model import ModelArgs, Transformer
from model.kernels import LinearCrossEntropyHead
from parallel.dims import ParallelDims
from parallel.groups import ProcessGroups, build_process_groups
from parallel.layers import TPContext
from parallel.loss import HeadLoss, lm_loss
from parallel.parallelize import parallelize
from parallel.tp import TRANSFORMER_TP_PLAN, ColumnParallelLinear
from train.config.load import load_config
from train.config.schema import ParallelSection, PerfSection
from train.objectives.lm import forward_kwargs
from train.objectives.lm import lm_loss as train_lm_loss


def _args(**kw: Any) -> ModelArgs:
    base = {"dim": 64, "n_layers": 4, "n_heads": 4, "n_kv_heads": 2, "vocab_size": 97, "ffn_hidden_dim": 96,
            "max_seq_len": 64}
    base.update(kw)
    return ModelArgs(**base)


def _one_process(dims: ParallelDims | None = None) -> ProcessGroups:
    return ProcessGroups(dims or ParallelDims(1), 0, tp_group=None, dp_group=None, pp_group=None,
                         mp_group=None)


def _batch(args: ModelArgs) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    x = torch.randint(0, args.vocab_size, (2, 16), generator=g)
    y = torch.randint(0, args.vocab_size, (2, 16), generator=g)
    y[0, :4] = -100
    return x, y


def test_steps_run_in_order_and_are_logged(caplog: pytest.LogCaptureFixture) -> None:
    model = Transformer(_args())
    perf = PerfSection(activation_checkpointing="selective", ac_every=2, fused_linear_cross_entropy=True)
    with caplog.at_level(logging.INFO, logger="tessera"):
        par = parallelize(model, _one_process(), parallel=ParallelSection(), perf=perf)
    assert [s.split(":")[0].split("=")[0] for s in par.steps] == [
        "tp", "activation checkpointing", "kernels", "torch.compile", "loss", "pipeline"]
    assert par.steps[0] == "tp=1"
    assert par.steps[1] == ("activation checkpointing: selective, 2 attention modules recomputed in backward "
                            "(every 2)")
    assert par.steps[2].startswith("kernels: attention=sdpa, rms_norm=reference")
    assert par.steps[3:] == ["torch.compile: off",
                             "loss: linear cross-entropy in the head (hidden states in, no logits)",
                             "pipeline: none (pp=1)"]
    logged = [r.getMessage() for r in caplog.records if r.getMessage().startswith("parallelize: ")]
    assert logged == [f"parallelize: {s}" for s in par.steps] + ["parallelize: " + " -> ".join(par.steps)]
    assert "forward" in vars(model.layers[0].self_attn) and "forward" not in vars(model.layers[1].self_attn)
    assert isinstance(model.lm_head, LinearCrossEntropyHead)
    assert par.kernels is not None and par.kernels.linear_cross_entropy == "reference"
    assert par.model is model and par.module is model and par.tp_ctx.size == 1


@pytest.mark.parametrize("fused", [False, True], ids=["logits", "head"])
def test_the_loss_is_chosen_here(fused: bool) -> None:
    args = _args()
    torch.manual_seed(0)
    ref = Transformer(args)
    model = Transformer(args)
    model.load_state_dict(ref.state_dict())
    par = parallelize(model, _one_process(), parallel=ParallelSection(),
                      perf=PerfSection(fused_linear_cross_entropy=fused))
    assert isinstance(par.loss_fn, HeadLoss) if fused else par.loss_fn is lm_loss
    x, y = _batch(args)
    expected = F.cross_entropy(ref(x).flatten(0, 1), y.flatten(), ignore_index=-100)
    got = par.loss_fn(model(x, **forward_kwargs(par.loss_fn)), y)
    assert torch.allclose(got, expected, atol=1e-6) if fused else torch.equal(got, expected)
    assert train_lm_loss is lm_loss  # one definition: train's objectives use parallel's


def test_the_perf_section_is_what_parallelize_reads() -> None:
    cfg = load_config(None, ["perf.activation_checkpointing=full", "perf.ac_every=2"])
    model = Transformer(_args())
    par = parallelize(model, _one_process(), parallel=cfg.parallel, perf=cfg.perf)
    assert "forward" in vars(model.layers[0]) and "forward" not in vars(model.layers[1])
    assert par.steps[1] == "activation checkpointing: full, 2 blocks recomputed in backward (every 2)"


def test_no_step_draws_random_numbers() -> None:
    """The golden loss curves depend on the order of random draws: the steps themselves draw none."""
    model = Transformer(_args(dropout=0.1))
    torch.manual_seed(7)
    before = torch.get_rng_state()
    parallelize(model, _one_process(), parallel=ParallelSection(),
                perf=PerfSection(activation_checkpointing="full"))
    assert torch.equal(torch.get_rng_state(), before)


def test_wrap_comes_after_the_loss_and_before_the_pipeline(monkeypatch: pytest.MonkeyPatch,
                                                           caplog: pytest.LogCaptureFixture) -> None:
    calls: list[Any] = []

    class Around(nn.Module):
        def __init__(self, inner: nn.Module) -> None:
            super().__init__()
            self.inner = inner

    def wrap(model: nn.Module | None, loss_fn: Any, tp_ctx: TPContext) -> nn.Module:
        calls.append((model, loss_fn, tp_ctx))
        return Around(model)

    def fake_pipeline(model: nn.Module, dims: ParallelDims, **kw: Any) -> str:
        calls.append(("pipeline", model, dims, kw))
        return "pipe"

    monkeypatch.setattr(parallelize_mod, "build_pipeline", fake_pipeline)
    model = Transformer(_args())
    dims = ParallelDims(2, pp=2)
    parallel = ParallelSection(pp=2, partition_method="uniform", activation_checkpoint_interval=1)
    with caplog.at_level(logging.INFO, logger="tessera"):
        par = parallelize(model, _one_process(dims), parallel=parallel, perf=PerfSection(), wrap=wrap)
    (inner, loss_fn, tp_ctx), (what, cut, got_dims, kw) = calls
    assert inner is model and loss_fn is lm_loss and tp_ctx is par.tp_ctx
    assert what == "pipeline" and cut is par.model and isinstance(cut, Around) and got_dims is dims
    assert kw == {"loss_fn": lm_loss, "tp_ctx": par.tp_ctx, "partition_method": "uniform",
                  "activation_checkpoint_interval": 1}
    assert par.module == "pipe"
    assert par.steps[-2:] == ["wrapped: Around",
                              "pipeline: 2 stages cut by uniform, activations recomputed every 1 pieces"]


def test_a_recipe_without_a_base_gets_the_plain_loss_and_builds_its_model() -> None:
    built = nn.Linear(2, 2)
    par = parallelize(None, _one_process(), parallel=ParallelSection(), perf=PerfSection(),
                      wrap=lambda model, loss_fn, tp_ctx: built if model is None else model)
    assert par.model is built and par.module is built and par.loss_fn is lm_loss and par.kernels is None
    assert par.steps == ["loss: cross-entropy on the logits", "wrapped: Linear", "pipeline: none (pp=1)"]


def test_tensor_parallel_loss_and_sequence_parallel(fake_world) -> None:
    fake_world(4, 1)
    groups = build_process_groups(ParallelDims(4, tp=2))
    model = Transformer(_args())
    par = parallelize(model, groups, parallel=ParallelSection(tp=2, sequence_parallel=True),
                      perf=PerfSection(), seed=3)
    assert par.steps[0] == "tp=2 (sequence parallel)"
    assert isinstance(model.layers[0].self_attn.q_proj, ColumnParallelLinear)
    ctx = par.tp_ctx
    assert (ctx.size, ctx.rank, ctx.seed, ctx.sequence_parallel) == (2, 1, 3, True)
    assert par.loss_fn is not lm_loss and par.steps[4] == "loss: vocabulary-parallel cross-entropy over tp=2"


def test_a_plan_without_sequence_parallel_norms_runs_tp_without_it(fake_world,
                                                                  caplog: pytest.LogCaptureFixture) -> None:
    """As an HF model: the plan on a submodule (``tp_root``), no sequence-parallel norms, no perf options."""
    fake_world(2, 0)
    groups = build_process_groups(ParallelDims(2, tp=2))

    class Wrapper(nn.Module):
        def __init__(self, model: nn.Module) -> None:
            super().__init__()
            self.model = model

    outer = Wrapper(Transformer(_args()))
    plan = {k: v for k, v in TRANSFORMER_TP_PLAN.items() if v not in ("norm", "dropout")}
    with caplog.at_level(logging.INFO, logger="tessera"):
        par = parallelize(outer, groups, parallel=ParallelSection(tp=2, sequence_parallel=True), tp_plan=plan,
                          tp_root="model")
    assert "parallel.sequence_parallel=true is not applied" in caplog.text
    assert par.steps[:3] == ["tp=2", "activation checkpointing, kernels, compile: none (no perf options: the "
                             "model's own)", "loss: vocabulary-parallel cross-entropy over tp=2"]
    assert not par.tp_ctx.sequence_parallel and par.kernels is None
    assert isinstance(outer.model.lm_head, ColumnParallelLinear)
