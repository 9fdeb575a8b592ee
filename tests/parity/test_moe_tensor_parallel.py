"""MoE under tensor parallelism on 4 gloo ranks, against one process that runs every expert on both data-parallel
ranks' micro-batches. One launch, two layouts of the same 4 ranks:

- ep=2 x tp=2 (dp=2) with sequence parallelism: each rank keeps half the experts and half of each expert's hidden
  units, tokens are gathered before routing and travel by all-to-all between ranks of equal TP rank;
- tp=2 alone (dp=2), no sequence parallelism: every expert on every rank, each with half its hidden units.

For each: one step's gradients of every parameter, the experts' gathered back to full (E, ...) tensors over TP
and EP; that dropless routing loses no token copy (rows the experts took == copies routed, counted over the
ranks); then a DeepSpeed run (ZeRO-2 for the first, ZeRO-1 for the second; the optimizer's MoE parameter groups,
clipping on) whose loss curve equals one process's to 1e-5 (relative), and whose final expert weights are one
process's within 2% of one learning-rate step (Adam moves a weight whose gradient is near its eps by a step that
depends on the gradient's last bits: a gradient of -9.5e-9 summed in another order moved one weight by 1.26e-3
instead of 1.27e-3; a wrong expert slice or a missed update moves it by a whole step).
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
MICRO, SEQ, STEPS, LR, CLIP, DP = 2, 12, 4, 3e-3, 1.0, 2
LAYOUTS = ({"tp": 2, "ep": 2, "sequence_parallel": True, "zero": 2}, {"tp": 2, "ep": 1, "zero": 1})


def _args() -> Any:
    from model.args import ModelArgs

    return ModelArgs(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=67, ffn_hidden_dim=48,
                     max_seq_len=SEQ, n_experts=4, moe_top_k=2, moe_ffn_dim=24, moe_shared_ffn_dim=16,
                     moe_shared_gate=True, moe_aux_loss_coef=1e-2, moe_z_loss_coef=1e-3)


def _data(steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(11)
    x = torch.randint(0, 67, (steps, DP, MICRO, SEQ), generator=g)
    return x, torch.roll(x, -1, dims=-1)


def _moe_loss(model: torch.nn.Module, loss_fn: Any, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    from train.objectives.moe import MoETerms

    return MoETerms().add(model, loss_fn(model(x), y))[0]


def _reference(base: torch.nn.Module, xs: torch.Tensor, ys: torch.Tensor) -> tuple[list[list[float]], Any, Any]:
    """One process: the first step's gradients, then every step's per-DP-rank losses and the final model."""
    from parallel.loss import lm_loss
    from train.config.schema import TrainSection
    from train.loop.optim import param_groups

    model = copy.deepcopy(base)
    t = TrainSection()
    opt = torch.optim.AdamW(param_groups(model, 0.1), lr=LR, betas=(t.beta1, t.beta2), eps=t.eps)
    losses, grads = [], {}
    for step in range(xs.shape[0]):
        opt.zero_grad(set_to_none=True)
        row = []
        for r in range(DP):
            loss = _moe_loss(model, lm_loss, xs[step, r], ys[step, r])
            (loss / DP).backward()
            row.append(loss.item())
        if step == 0:
            grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
        opt.step()
        losses.append(row)
    return losses, grads, model


def _build(base: torch.nn.Module, layout: dict[str, Any]) -> tuple[torch.nn.Module, Any, Any]:
    from parallel.dims import ParallelDims
    from parallel.groups import build_process_groups
    from parallel.parallelize import parallelize
    from train.config.schema import ParallelSection, PerfSection

    groups = build_process_groups(ParallelDims(4, tp=layout["tp"], ep=layout["ep"]))
    model = copy.deepcopy(base)
    section = ParallelSection(tp=layout["tp"], ep=layout["ep"], sequence_parallel=layout.get("sequence_parallel", False))
    par = parallelize(model, groups, parallel=section, perf=PerfSection(), seed=0)
    return model, groups, par.loss_fn


def _full(model: torch.nn.Module, groups: Any, grads: bool) -> dict[str, torch.Tensor]:
    """The parameters (or their gradients) as the plain model's tensors: gathered over TP, then the experts over
    EP (collective)."""
    import torch.distributed as dist

    from parallel.tp import gather_full_grads, gather_full_state_dict

    params = dict(model.named_parameters())
    out = gather_full_grads(model) if grads else {n: t for n, t in gather_full_state_dict(model).items() if n in params}
    for name, t in out.items():
        if groups.dims.ep > 1 and not getattr(params[name], "allreduce", True):
            parts = [torch.empty_like(t) for _ in range(groups.dims.ep)]
            dist.all_gather(parts, t.contiguous(), group=groups.ep_group)
            out[name] = torch.cat(parts)
    return out


def _abs(got: torch.Tensor, want: torch.Tensor) -> float:
    return (got - want).abs().max().item()


def _rel(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got - want).abs().max() / want.abs().max().clamp_min(1e-12)).item()


def _ds_config(stage: int) -> dict[str, Any]:
    cfg = json.loads((REPO / "ds_configs" / f"zero{stage}.json").read_text())
    cfg.update(train_batch_size=MICRO * DP, train_micro_batch_size_per_gpu=MICRO, gradient_accumulation_steps=1,
               gradient_clipping=CLIP, bf16={"enabled": False})
    cfg["zero_optimization"].update(reduce_bucket_size=200, allgather_bucket_size=200)
    return cfg


def _check_layout(rank: int, layout: dict[str, Any], base: torch.nn.Module, ref: tuple[Any, Any, Any],
                  xs: torch.Tensor, ys: torch.Tensor) -> dict[str, Any]:
    import deepspeed
    import torch.distributed as dist

    from model.moe import MoEFeedForward
    from train.config.schema import TrainSection
    from train.loop.optim import build_optimizer, param_groups

    ref_losses, ref_grads, ref_model = ref
    out: dict[str, Any] = {}
    model, groups, loss_fn = _build(base, layout)
    dp = groups.dp_rank
    blocks = [m for m in model.modules() if isinstance(m, MoEFeedForward)]
    taken = [0] * len(blocks)  # rows this rank's experts took (with ep: received from the group's ranks)

    def counter(i: int) -> Any:
        def hook(module: torch.nn.Module, args: tuple[Any, ...], output: torch.Tensor) -> None:
            taken[i] += int(getattr(module, "received", output.shape[0]))
        return hook

    handles = [b.experts.register_forward_hook(counter(i)) for i, b in enumerate(blocks)]
    (_moe_loss(model, loss_fn, xs[0, dp], ys[0, dp]) / DP).backward()
    for h in handles:
        h.remove()
    params = dict(model.named_parameters())
    for name, g in _full(model, groups, grads=True).items():
        if getattr(params[name], "allreduce", True):  # a dense gradient: summed over the data-parallel ranks
            g = g.clone()
            dist.all_reduce(g, group=groups.dp_group)
        assert g.shape == ref_grads[name].shape, (name, g.shape)
        out.setdefault("grad_rel", {})[name] = _rel(g, ref_grads[name])
    # token copies: per data-parallel rank (one TP rank counts), rows taken == copies routed, for every block
    counts = torch.tensor([[taken[i], b.last.routed] for i, b in enumerate(blocks)], dtype=torch.float64)
    counts *= float(groups.tp_rank == 0)
    dist.all_reduce(counts)
    out["taken_routed"] = counts.tolist()

    t = TrainSection(lr=LR, weight_decay=0.1)
    cfg = _ds_config(layout["zero"])
    opt = build_optimizer(model, t, cfg, groups=param_groups(model, t.weight_decay))
    model.zero_grad(set_to_none=True)
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=cfg, mpu=groups)
    assert engine.has_moe_layers == (layout["ep"] > 1)
    losses = []
    for step in range(STEPS):
        loss = _moe_loss(engine, loss_fn, xs[step, dp], ys[step, dp])
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
    out["loss_rel"] = [abs(a - ref_losses[s][dp]) / ref_losses[s][dp] for s, a in enumerate(losses)]
    final = _full(model, groups, grads=False)
    out["experts_abs"] = {n: _abs(w, ref_model.get_parameter(n).detach()) for n, w in final.items() if ".experts." in n}
    return out


def check_moe_tp(rank: int, world: int) -> list[dict[str, Any]]:
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    os.environ.update(LOCAL_RANK=str(rank), RANK=str(rank), WORLD_SIZE=str(world))
    from model.model import build_model

    base = build_model(_args(), torch.device("cpu"), seed=5)
    xs, ys = _data(STEPS)
    ref = _reference(base, xs, ys)
    return [_check_layout(rank, layout, base, ref, xs, ys) for layout in LAYOUTS]


def test_moe_ep2_tp2_and_tp2_match_one_process() -> None:
    results = run_ranks(4, check_moe_tp, timeout=500)
    for rank, per_layout in enumerate(results):
        for layout, res in zip(LAYOUTS, per_layout, strict=True):
            where = f"rank {rank} {layout}"
            worst = max(res["grad_rel"].items(), key=lambda kv: kv[1])
            assert worst[1] < 1e-5, f"{where}: gradient of {worst[0]} differs by {worst[1]:.2e} (relative)"
            assert any(".experts.gate_up_proj" in n for n in res["grad_rel"]), res["grad_rel"].keys()
            for taken, routed in res["taken_routed"]:
                assert taken == routed > 0, f"{where}: dropless routing lost token copies: {taken} of {routed}"
            assert max(res["loss_rel"]) < 1e-5, f"{where}: losses differ by {res['loss_rel']} (relative)"
            worst = max(res["experts_abs"].items(), key=lambda kv: kv[1])
            assert worst[1] < 0.02 * LR, f"{where}: final {worst[0]} differs by {worst[1]:.2e} (lr {LR})"
