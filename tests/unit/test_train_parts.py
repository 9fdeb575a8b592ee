"""The loop's parts that need no process group: LR schedule, parameter groups, parallel degrees, metrics file."""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import pytest
import torch

from model import Transformer, get_preset
from parallel.dims import ParallelConfigError, ParallelDims
from train.config.schema import TrainSection
from train.loop.metrics import MetricsLogger, read_metrics
from train.loop.optim import build_optimizer, build_scheduler, lr_at, param_groups


def test_lr_warms_up_linearly_then_decays_by_cosine_to_min_lr() -> None:
    t = TrainSection(steps=110, lr=1e-3, min_lr=1e-4, warmup_steps=10)
    assert lr_at(0, t) == pytest.approx(1e-4)
    assert lr_at(9, t) == pytest.approx(1e-3)
    assert lr_at(10, t) == pytest.approx(1e-3)
    assert lr_at(60, t) == pytest.approx(1e-4 + 0.5 * (1e-3 - 1e-4))  # half-way through the cosine
    assert lr_at(110, t) == pytest.approx(1e-4)
    rates = [lr_at(s, t) for s in range(10, 111)]
    assert all(a >= b for a, b in itertools.pairwise(rates))


def test_scheduler_follows_lr_at() -> None:
    t = TrainSection(steps=20, lr=2e-3, min_lr=2e-4, warmup_steps=5)
    model = torch.nn.Linear(4, 4)
    opt = build_optimizer(model, t, {"zero_optimization": {"stage": 2}})
    assert type(opt) is torch.optim.AdamW  # ZeRO 1-3 accept only the optimizers DeepSpeed knows
    sched = build_scheduler(opt, t)
    for step in range(20):
        assert opt.param_groups[0]["lr"] == pytest.approx(lr_at(step, t))
        opt.step()
        sched.step()


def test_norms_are_not_decayed() -> None:
    model = Transformer(get_preset("test-1m"))
    decay, no_decay = param_groups(model, 0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() == 2 for p in decay["params"]) and all(p.dim() == 1 for p in no_decay["params"])
    n_norms = 2 * model.args.n_layers + 1
    assert len(no_decay["params"]) == n_norms
    assert sum(p.numel() for g in (decay, no_decay) for p in g["params"]) == sum(
        p.numel() for p in model.parameters())


def test_parallel_dims() -> None:
    assert ParallelDims(8, tp=2, pp=2).dp == 2
    assert ParallelDims(1024, tp=8, pp=4).dp == 32
    with pytest.raises(ParallelConfigError, match="not divisible by parallel.tp=3"):
        ParallelDims(8, tp=3)
    with pytest.raises(ParallelConfigError, match="parallel.tp=0"):
        ParallelDims(8, tp=0)
    args = get_preset("test-1m")
    with pytest.raises(ParallelConfigError, match="parallel.pp=2 with a ZeRO-2 DeepSpeed config"):
        ParallelDims(4, pp=2).check_pipeline(args, zero_stage=2, grad_accum=2)
    with pytest.raises(ParallelConfigError, match="parallel.pp=8 stages for a model of 4 blocks"):
        ParallelDims(8, pp=8).check_pipeline(args, zero_stage=1, grad_accum=2)
    with pytest.raises(ParallelConfigError, match="parallel.pp=2 with a ZeRO-0 DeepSpeed config.*counts tied"):
        ParallelDims(2, pp=2).check_pipeline(args, zero_stage=0, grad_accum=2)
    ParallelDims(4, tp=2, pp=2).check_pipeline(args, zero_stage=1, grad_accum=1)


def _logger(out: Path, start_step: int) -> MetricsLogger:
    return MetricsLogger(out, enabled=True, total_steps=10, start_step=start_step, progress=False,
                         wandb_mode="disabled", wandb_project="t", run_name="r", run_id="x", config={})


def test_metrics_rows_and_resume_truncation(tmp_path: Path) -> None:
    log = _logger(tmp_path, 0)
    for step in range(1, 7):
        log.log({"step": step, "loss": 1.0 / step, "lr": 1e-3, "grad_norm": float("nan")})
    log.log({"step": 5, "val_loss": 0.5, "val_ppl": math.exp(0.5)})
    log.log({"step": 6, "event": "skipped", "loss": float("nan")})
    log.close()
    rows = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6, 5, 6]
    assert rows[0]["grad_norm"] is None  # non-finite numbers become null: the file stays strict JSON
    json.dumps(rows, allow_nan=False)
    # a run resumed from its step-4 checkpoint redoes steps 5 and 6: their old rows go, events stay
    _logger(tmp_path, 4).close()
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [1, 2, 3, 4, 6]


def test_fp32_without_zero_skips_non_finite_steps() -> None:
    t = TrainSection(steps=10, lr=1e-2, min_lr=1e-3, warmup_steps=1)
    model = torch.nn.Linear(4, 4)
    opt = build_optimizer(model, t, {"zero_optimization": {"stage": 0}})
    assert opt.__class__.__name__ == "SkipNonFiniteAdamW"
    before = model.weight.detach().clone()
    model(torch.ones(2, 4)).sum().mul(float("nan")).backward()
    opt.step()
    assert opt.overflow and torch.equal(model.weight, before) and not opt.state  # nothing moved
    opt.zero_grad()
    model(torch.ones(2, 4)).sum().backward()
    opt.step()
    assert not opt.overflow and not torch.equal(model.weight, before)
