"""Expert parallelism on 2 gloo ranks (ep=2): each rank keeps half the experts and trades tokens by all-to-all.

One launch checks the all-to-all autograd function (uneven splits arrive by source rank; gradients go back),
and, against one process that runs every expert on both ranks' micro-batches:
- the gradients of every expert (each rank's local ones) and of the dense parameters, and that dropless
  routing loses no token copy (rows received over the group == copies routed);
- a ZeRO-1 and a ZeRO-2 DeepSpeed run with the optimizer's MoE parameter groups (expert gradients averaged
  over the expert-data-parallel group, dense ones over the data-parallel group, clipping on): the loss curve
  to 1e-5 and the final expert weights;
- save, two more steps, then a fresh engine loads the checkpoint and repeats them exactly.
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.gloo import run_ranks

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
MICRO, SEQ, STEPS, LR, CLIP = 2, 12, 4, 3e-3, 1.0


def _args() -> Any:
    from model.args import ModelArgs

    return ModelArgs(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=67, ffn_hidden_dim=48,
                     max_seq_len=SEQ, n_experts=4, moe_top_k=2, moe_ffn_dim=24, moe_shared_ffn_dim=16,
                     moe_aux_loss_coef=1e-2, moe_z_loss_coef=1e-3)


def _data(world: int, steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    x = torch.randint(0, 67, (steps, world, MICRO, SEQ), generator=g)
    return x, torch.roll(x, -1, dims=-1)


def _loss(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    from parallel.loss import lm_loss
    from train.objectives.moe import MoETerms

    return MoETerms().add(model, lm_loss(model(x), y))[0]


def _ds_config(stage: int, world: int) -> dict[str, Any]:
    cfg = json.loads((REPO / "ds_configs" / f"zero{stage}.json").read_text())
    cfg.update(train_batch_size=MICRO * world, train_micro_batch_size_per_gpu=MICRO, gradient_accumulation_steps=1,
               gradient_clipping=CLIP, bf16={"enabled": False})
    z = cfg["zero_optimization"]
    z.update(reduce_bucket_size=200, allgather_bucket_size=200)  # gradients cross bucket boundaries
    return cfg


def _ep_model(base: torch.nn.Module, world: int) -> tuple[torch.nn.Module, Any]:
    from parallel.dims import ParallelDims
    from parallel.groups import build_process_groups
    from parallel.parallelize import parallelize
    from train.config.schema import ParallelSection, PerfSection

    groups = build_process_groups(ParallelDims(world, ep=world))
    model = copy.deepcopy(base)
    par = parallelize(model, groups, parallel=ParallelSection(ep=world), perf=PerfSection(), seed=0)
    assert any(s.startswith(f"ep={world}") for s in par.steps), par.steps
    return model, groups


def _engine(model: torch.nn.Module, groups: Any, stage: int, world: int) -> Any:
    import deepspeed

    from train.config.schema import TrainSection
    from train.loop.optim import build_optimizer, param_groups

    t = TrainSection(lr=LR, weight_decay=0.1)
    cfg = _ds_config(stage, world)
    opt = build_optimizer(model, t, cfg, groups=param_groups(model, t.weight_decay))
    assert sum(bool(g.get("moe")) for g in opt.param_groups) >= 1
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=cfg, mpu=groups)
    assert engine.has_moe_layers
    return engine


def _reference(base: torch.nn.Module, xs: torch.Tensor, ys: torch.Tensor) -> tuple[list[list[float]], Any]:
    """One process, every expert: each step averages the ranks' micro-batch losses (DeepSpeed's DP mean)."""
    from train.config.schema import TrainSection
    from train.loop.optim import param_groups

    model = copy.deepcopy(base)
    opt = torch.optim.AdamW(param_groups(model, 0.1), lr=LR, betas=(TrainSection().beta1, TrainSection().beta2),
                            eps=TrainSection().eps)
    losses = []
    for step in range(xs.shape[0]):
        opt.zero_grad(set_to_none=True)
        row = []
        for r in range(xs.shape[1]):
            loss = _loss(model, xs[step, r], ys[step, r])
            (loss / xs.shape[1]).backward()
            row.append(loss.item())
        torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
        opt.step()
        losses.append(row)
    return losses, model


def check_ep(rank: int, world: int, out_dir: str) -> dict[str, Any]:
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    os.environ.update(LOCAL_RANK=str(rank), RANK=str(rank), WORLD_SIZE=str(world))
    import torch.distributed as dist

    from model.model import build_model
    from parallel.moe import (
        ExpertParallelExperts,
        all_to_all_rows,
        exchange_counts,
        local_expert_slice,
        restore_expert_weights,
    )

    # the all-to-all itself: rank r sends d + r + 1 rows to rank d; the backward brings each row's gradient home
    send = torch.tensor([[d + rank + 1] for d in range(world)])  # (ep, 1)
    recv = exchange_counts(send, dist.group.WORLD)
    assert recv.reshape(-1).tolist() == [rank + s + 1 for s in range(world)]
    x = (100.0 * rank + torch.arange(int(send.sum()), dtype=torch.float32)).unsqueeze(1).repeat(1, 3)
    x.requires_grad_(True)
    got = all_to_all_rows(x, send.sum(1).tolist(), recv.sum(1).tolist(), dist.group.WORLD)
    offsets = [sum(d + s + 1 for d in range(rank)) for s in range(world)]  # where rank s's rows for me start
    want = torch.cat([100.0 * s + torch.arange(offsets[s], offsets[s] + rank + s + 1, dtype=torch.float32)
                      for s in range(world)]).unsqueeze(1).repeat(1, 3)
    assert torch.equal(got.detach(), want)
    got.square().sum().backward()
    assert torch.equal(x.grad, 2 * x.detach())

    base = build_model(_args(), torch.device("cpu"), seed=3)
    xs, ys = _data(world, STEPS + 2)
    out: dict[str, Any] = {}

    # gradients of one step, and the token count
    ref = copy.deepcopy(base)
    for r in range(world):
        (_loss(ref, xs[0, r], ys[0, r]) / world).backward()
    model, groups = _ep_model(base, world)
    (_loss(model, xs[0, rank], ys[0, rank]) / world).backward()
    ref_grads = dict(ref.named_parameters())
    experts = local_expert_slice(groups, _args().n_experts)
    worst = 0.0
    for name, p in model.named_parameters():
        g = p.grad.clone()
        if getattr(p, "allreduce", True):
            dist.all_reduce(g)  # a dense gradient: DP sum of the per-rank means
            want = ref_grads[name].grad
        else:
            want = ref_grads[name].grad[experts]
        assert g.shape == want.shape, name
        worst = max(worst, ((g - want).abs().max() / want.abs().max().clamp_min(1e-12)).item())
    out["grad_rel"] = worst
    blocks = [m for m in model.modules() if isinstance(getattr(m, "experts", None), ExpertParallelExperts)]
    counts = torch.tensor([[b.experts.received, b.last.routed] for b in blocks], dtype=torch.float64)
    dist.all_reduce(counts)
    out["received_routed"] = counts.tolist()

    ref_losses, ref_model = _reference(base, xs[:STEPS], ys[:STEPS])
    for stage in (1, 2):
        model, groups = _ep_model(base, world)
        engine = _engine(model, groups, stage, world)
        losses = []
        for step in range(STEPS):
            loss = _loss(engine, xs[step, rank], ys[step, rank])
            engine.backward(loss)
            engine.step()
            losses.append(loss.item())
        out[f"zero{stage}"] = [(a - ref_losses[s][rank]) / ref_losses[s][rank] for s, a in enumerate(losses)]
        final = max(((p.detach() - ref_model.get_parameter(n).detach()[experts]).abs().max()).item()
                    for n, p in model.named_parameters() if not getattr(p, "allreduce", True))
        out[f"zero{stage}_experts"] = final
    # resume (ZeRO-2, the last engine): save, two steps, load into a fresh engine, the same two steps
    engine.save_checkpoint(out_dir, tag="ep")
    after = []
    for step in range(STEPS, STEPS + 2):
        loss = _loss(engine, xs[step, rank], ys[step, rank])
        engine.backward(loss)
        engine.step()
        after.append(loss.item())
    model, groups = _ep_model(base, world)
    fresh = _engine(model, groups, 2, world)
    fresh.load_checkpoint(out_dir, tag="ep")
    restore_expert_weights(fresh)
    again = []
    for step in range(STEPS, STEPS + 2):
        loss = _loss(fresh, xs[step, rank], ys[step, rank])
        fresh.backward(loss)
        fresh.step()
        again.append(loss.item())
    out["resume"] = (after, again)
    return out


def test_ep2_matches_one_process_and_resumes(tmp_path: Path) -> None:
    results = run_ranks(2, check_ep, (str(tmp_path),), timeout=400)
    for rank, res in enumerate(results):
        assert res["grad_rel"] < 1e-5, f"rank {rank}: gradients differ by {res['grad_rel']:.2e} (relative)"
        for received, routed in res["received_routed"]:
            assert received == routed, f"dropless routing lost token copies: {received} received of {routed}"
        for stage in (1, 2):
            rel = max(abs(d) for d in res[f"zero{stage}"])
            assert rel < 1e-5, f"rank {rank} ZeRO-{stage}: losses differ by {res[f'zero{stage}']}"
            assert res[f"zero{stage}_experts"] < 1e-5, f"rank {rank} ZeRO-{stage}: expert weights differ"
        after, again = res["resume"]
        assert after == again, f"rank {rank}: resumed losses {again} != uninterrupted {after}"
