"""End to end: a run resumed with more steps follows the schedule train.resume_schedule defines.

A 10-step run (warm-up 3) is resumed from its step-6 checkpoint with train.steps=16, once per mode. Every
logged rate must be the one `LRSchedule` defines, the first resumed step's included (DeepSpeed restores the
optimizer's saved rate after the scheduler; the old rate must not leak into step 7), and 'extend' must go on
from the rate reached without a jump. (Resuming with the same steps reproducing the uninterrupted run bit for
bit is checked by tests/e2e/test_train_e2e.py.)
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import copy_run_until, python_main, read_rows, run_job
from tests.e2e.test_train_e2e import _common
from train.config.schema import TrainSection
from train.loop.optim import LRSchedule, lr_at

pytestmark = pytest.mark.slow

RUN = ("train.warmup_steps=3", "train.eval_interval=0", "train.save_interval=6", "train.keep_last=0",
       "sample.max_new_tokens=0", "--ds_config", "cpu")


ROUNDED = 5.1e-7  # metrics.jsonl rounds floats to 6 decimals


def _rates(run_dir: Path) -> dict[int, float]:
    """Logged rate of each 1-based step (the rate of 0-based optimizer step step - 1)."""
    return {r["step"]: r["lr"] for r in read_rows(run_dir) if "lr" in r}


def test_resume_with_more_steps_follows_the_chosen_schedule(tmp_path: Path, data_cache: Path) -> None:
    first = tmp_path / "first"
    run_job(python_main(*_common(first, data_cache, "train.steps=10", *RUN)), tmp_path)
    t = TrainSection(steps=10, warmup_steps=3, lr=3e-3, min_lr=3e-4)  # the smoke recipe's rates
    assert _rates(first) == pytest.approx({s: lr_at(s - 1, t) for s in range(1, 11)}, rel=0, abs=ROUNDED)

    for mode in ("extend", "recompute"):
        resumed = copy_run_until(first, 6, tmp_path / mode)
        proc = run_job(python_main(*_common(resumed, data_cache, "train.steps=16", f"train.resume_schedule={mode}",
                                            *RUN, "--resume", "auto")), tmp_path)
        assert "learning-rate schedule changed at step 6" in proc.stderr, proc.stderr[-3000:]
        rates = _rates(resumed)
        assert sorted(rates) == list(range(1, 17))
        planned = LRSchedule.from_config(TrainSection(steps=16, warmup_steps=3, lr=3e-3, min_lr=3e-4))
        if mode == "recompute":  # the 16-step schedule from step 0: the rate jumps up at step 7
            want = {s: planned.rate(s - 1) for s in range(7, 17)}
            assert rates[7] > rates[6]
        else:  # from the rate step 7 had in the 10-step run, a cosine down to min_lr at step 16
            segment = LRSchedule(3e-3, 3e-4, 3, 16, restart_step=6, restart_lr=lr_at(6, t))
            want = {s: segment.rate(s - 1) for s in range(7, 17)}
            assert rates[7] == pytest.approx(lr_at(6, t), rel=0, abs=ROUNDED)  # no jump
            assert all(rates[s + 1] < rates[s] for s in range(6, 16))
        assert want[16] > 3e-4  # min_lr is reached after the last step
        assert {s: rates[s] for s in range(1, 7)} == {s: _rates(first)[s] for s in range(1, 7)}
        assert {s: rates[s] for s in range(7, 17)} == pytest.approx(want, rel=0, abs=ROUNDED), mode
