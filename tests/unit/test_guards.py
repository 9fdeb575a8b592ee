"""Loss-spike detection, bad-step bookkeeping and the fault-injection switch."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from train.loop.faults import failpoint_hit
from train.loop.guards import BadStepCounter, SpikeDetector, TrainingDiverged
from train.loop.trainer import loss_scale_overflow


def test_spike_detector_flags_a_jump_not_a_falling_or_noisy_loss() -> None:
    det = SpikeDetector(zscore=6.0)
    losses = [6.0 - 0.05 * i + (0.02 if i % 2 else -0.02) for i in range(40)]  # falling, with noise
    assert all(det.update(x) is None for x in losses)
    z = det.update(losses[-1] * 3)
    assert z is not None and z > 6.0
    assert det.update(losses[-1] * 3) is not None  # a spike does not move the statistics
    assert det.update(losses[-1]) is None


def test_spike_detector_waits_for_its_warmup_and_can_be_off() -> None:
    det = SpikeDetector(zscore=6.0, warmup=10)
    assert [det.update(x) for x in (5.0, 5.0, 500.0)] == [None, None, None]
    off = SpikeDetector(zscore=0.0, warmup=0)
    assert all(off.update(x) is None for x in (1.0, 1.0, 1e6))


def test_bad_step_counter_rolls_back_after_a_streak_then_gives_up() -> None:
    c = BadStepCounter(max_bad_steps=3, max_rollbacks=1)
    assert [c.bad(), c.bad(), c.bad()] == [False, False, True]
    c.begin_rollback(step=14)
    assert c.rollbacks == 1 and c.streak == 0 and c.skipped_total == 3
    c.bad()
    c.good()
    assert c.streak == 0
    assert [c.bad(), c.bad(), c.bad()] == [False, False, True]
    with pytest.raises(TrainingDiverged, match="train.max_rollbacks=1"):
        c.begin_rollback(step=20)


def test_max_bad_steps_zero_fails_at_the_first() -> None:
    c = BadStepCounter(max_bad_steps=0, max_rollbacks=3)
    assert c.bad()
    with pytest.raises(TrainingDiverged, match="train.max_bad_steps=0"):
        c.begin_rollback(step=1)


def test_failpoints(monkeypatch: pytest.MonkeyPatch) -> None:
    assert not failpoint_hit("nan_batch", 3)
    monkeypatch.setenv("TESSERA_FAILPOINT", "nan_batch@12-14")
    assert [failpoint_hit("nan_batch", n) for n in (11, 12, 14, 15)] == [False, True, True, False]
    assert not failpoint_hit("spike_batch", 12)
    monkeypatch.setenv("TESSERA_FAILPOINT", "before_rename@20")
    assert failpoint_hit("before_rename", 20) and not failpoint_hit("before_rename", 10)


def test_an_fp16_loss_scale_overflow_is_not_a_bad_step() -> None:
    """fp16 with a dynamic scale skips steps while the scale is found; only then is a finite-loss skip benign."""

    def engine(fp16: bool, dynamic: bool) -> SimpleNamespace:
        return SimpleNamespace(fp16_enabled=lambda: fp16, dynamic_loss_scale=lambda: dynamic)

    assert loss_scale_overflow(engine(True, True), 2.5)
    assert not loss_scale_overflow(engine(True, True), float("nan"))  # a non-finite loss is bad in any precision
    assert not loss_scale_overflow(engine(True, False), 2.5)  # a static scale that overflows is a bad step
    assert not loss_scale_overflow(engine(False, False), 2.5)  # bf16 / fp32: a skip means non-finite gradients
