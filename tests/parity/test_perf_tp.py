"""Activation checkpointing on a tensor-parallel model (2 gloo ranks, dropout > 0): the same losses and
gradients as without it, on every rank, because recomputation rewinds each rank's dropout generator and
redraws its masks; `parallelize` applies the same transformations and chooses the same loss."""

from __future__ import annotations

import pytest
import torch

from tests.gloo import run_ranks

pytestmark = pytest.mark.slow


def _run(sequence_parallel: bool, mode: str | None, rewind: bool, via_parallelize: bool = False
         ) -> tuple[list[float], dict[str, torch.Tensor]]:
    import torch.distributed as dist

    from model import ModelArgs, Transformer
    from parallel.dims import ParallelDims
    from parallel.groups import build_process_groups
    from parallel.parallelize import parallelize
    from parallel.perf import apply_activation_checkpointing
    from parallel.tp import apply_tp, tp_lm_loss
    from train.config.schema import ParallelSection, PerfSection

    args = ModelArgs(dim=64, n_layers=3, n_heads=4, n_kv_heads=2, vocab_size=101, ffn_hidden_dim=96,
                     max_seq_len=32, dropout=0.2)
    torch.manual_seed(0)
    model = Transformer(args)
    if via_parallelize:  # as a run does it: TP, checkpointing (rewinding), kernels, compile off, the loss
        world = dist.get_world_size()
        par = parallelize(model, build_process_groups(ParallelDims(world, tp=world)),
                          parallel=ParallelSection(tp=world, sequence_parallel=sequence_parallel),
                          perf=PerfSection(activation_checkpointing=mode or "none"), seed=5)
        loss_fn = par.loss_fn
    else:
        ctx = apply_tp(model, dist.group.WORLD, sequence_parallel=sequence_parallel, seed=5)
        if mode is not None:
            apply_activation_checkpointing(model, mode, tp_ctx=ctx if rewind else None)
        loss_fn = tp_lm_loss(model, ctx)
    g = torch.Generator().manual_seed(1)
    losses, grads = [], {}
    for step in range(2):  # the second step checks the streams continue where a run without recomputation is
        x = torch.randint(0, args.vocab_size, (2, 16), generator=g)
        y = torch.randint(0, args.vocab_size, (2, 16), generator=g)
        model.zero_grad(set_to_none=True)
        torch.manual_seed(100 + step)
        loss = loss_fn(model(x), y)
        loss.backward()
        losses.append(loss.item())
        grads.update({f"{n}@{step}": p.grad.clone() for n, p in model.named_parameters()
                      if p.grad is not None})
    return losses, grads


def check_ac_matches(rank: int, world: int, sequence_parallel: bool, mode: str) -> float:
    ref_losses, ref_grads = _run(sequence_parallel, None, rewind=False)
    losses, grads = _run(sequence_parallel, mode, rewind=True)
    assert losses == pytest.approx(ref_losses, abs=1e-6)
    worst = max((g - ref_grads[n]).abs().max().item() for n, g in grads.items())
    assert worst < 1e-6, f"rank {rank}: gradients differ by {worst}"
    par_losses, par_grads = _run(sequence_parallel, mode, rewind=True, via_parallelize=True)
    assert par_losses == losses and all(torch.equal(g, grads[n]) for n, g in par_grads.items())
    # the control: the test can tell the difference
    _, unrewound = _run(sequence_parallel, mode, rewind=False)
    return max((g - ref_grads[n]).abs().max().item() for n, g in unrewound.items())


@pytest.mark.parametrize(("sequence_parallel", "mode"), [(True, "full"), (False, "selective")],
                         ids=["sp-full", "tp-selective"])
def test_tp_activation_checkpointing_redraws_each_ranks_masks(sequence_parallel: bool, mode: str) -> None:
    control = run_ranks(2, check_ac_matches, (sequence_parallel, mode))
    assert all(diff > 1e-4 for diff in control), f"recomputation without the rewind should differ: {control}"
