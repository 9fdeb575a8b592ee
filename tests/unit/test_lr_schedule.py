"""The learning-rate schedule and what a resumed run with other settings follows (train/loop/optim.py)."""

from __future__ import annotations

import pytest
import torch

from train.config.schema import TrainSection
from train.loop.optim import LRSchedule, build_scheduler, lr_at, scheduler_schedule, set_schedule

T10 = TrainSection(steps=10, warmup_steps=3, lr=1e-3, min_lr=1e-4)


def test_schedule_is_lr_at_and_survives_the_scheduler_state() -> None:
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=T10.lr)
    sched = build_scheduler(opt, T10)
    seen = []
    for _ in range(10):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert seen == [lr_at(s, T10) for s in range(10)]
    state = sched.state_dict()
    assert state["lr_lambdas"][0]["steps"] == 10  # the fields travel with the checkpoint
    other = build_scheduler(torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=T10.lr),
                            TrainSection(steps=30, warmup_steps=3, lr=1e-3, min_lr=1e-4))
    other.load_state_dict(state)
    assert scheduler_schedule(other) == LRSchedule.from_config(T10)


@pytest.mark.parametrize("step", [0, 2, 3, 6, 10])
def test_resumed_schedules(step: int) -> None:
    saved = LRSchedule.from_config(T10)
    longer = TrainSection(steps=20, warmup_steps=3, lr=1e-3, min_lr=1e-4)
    extend = LRSchedule.from_config(longer).resumed(saved, step)
    recompute = LRSchedule.from_config(TrainSection(steps=20, warmup_steps=3, lr=1e-3, min_lr=1e-4,
                                                    resume_schedule="recompute")).resumed(saved, step)
    assert LRSchedule.from_config(T10).resumed(saved, step) == saved  # same settings: the same schedule
    assert [recompute.rate(s) for s in range(20)] == [lr_at(s, longer) for s in range(20)]
    assert extend.rate(step) == pytest.approx(saved.rate(step))  # no jump where the run goes on
    assert extend.rate(20) == pytest.approx(extend.min_lr)
    # a finished run extended goes on at min_lr; an unfinished one still decays at its last step
    assert (extend.rate(19) == pytest.approx(extend.min_lr)) if step == 10 else (extend.rate(19) > extend.min_lr)
    if step >= 3:  # past the warm-up: a cosine from the rate reached, never rising
        assert all(extend.rate(s + 1) <= extend.rate(s) for s in range(step, 25))
        # resumed again with its own settings, the segment is kept
        assert LRSchedule.from_config(longer).resumed(extend, step + 2) == extend
    else:  # inside the warm-up: the warm-up goes on, then the longer run's cosine
        assert extend == LRSchedule.from_config(longer)


def test_set_schedule_sets_the_current_rate() -> None:
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=T10.lr)
    sched = build_scheduler(opt, T10)
    for _ in range(5):
        opt.step()
        sched.step()
    new = LRSchedule(1e-3, 1e-4, 3, 20, restart_step=5, restart_lr=5e-4)
    set_schedule(sched, new)
    assert opt.param_groups[0]["lr"] == pytest.approx(5e-4) and sched.get_last_lr() == [opt.param_groups[0]["lr"]]
    opt.step()
    sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(new.rate(6))
