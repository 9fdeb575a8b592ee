"""End to end: the MoE smoke run on two gloo ranks with parallel.ep=2 (ZeRO-2) trains the losses of the same
run without expert parallelism, logs no dropped token and resumes exactly (resuming with another ep:
tests/e2e/test_resume_ep.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import copy_run_until, read_rows, run_job, train_losses
from tests.e2e.test_moe_e2e import MOE
from tests.e2e.test_train_e2e import _common, _deepspeed

pytestmark = pytest.mark.slow


def test_ep2_trains_like_dp_and_resumes(tmp_path: Path, data_cache: Path) -> None:
    extra = (*MOE, "model.moe_bias_update_rate=0.001")
    dense_dp, ep = tmp_path / "dp", tmp_path / "ep"
    run_job(_deepspeed(2, *_common(dense_dp, data_cache, *extra), "--ds_config", "zero2"), tmp_path)
    proc = run_job(_deepspeed(2, *_common(ep, data_cache, *extra, "parallel.ep=2"), "--ds_config", "zero2"),
                   tmp_path)
    assert "parallelize: ep=2" in proc.stdout + proc.stderr
    want, got = train_losses(dense_dp), train_losses(ep)
    assert sorted(got) == list(range(1, 9))
    for step in got:
        assert got[step] == pytest.approx(want[step], rel=1e-5), (step, got[step], want[step])
    assert all(r["moe_dropped"] == 0.0 for r in read_rows(ep) if "loss" in r)

    resumed = copy_run_until(ep, 4, tmp_path / "resumed")
    run_job(_deepspeed(2, *_common(resumed, data_cache, *extra, "parallel.ep=2"), "--ds_config", "zero2",
                       "--resume", "auto"), tmp_path)
    again = train_losses(resumed)
    for step in range(5, 9):
        assert again[step] == got[step], (step, again[step], got[step])
