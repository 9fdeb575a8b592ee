"""The perf switches through the real entry point: activation checkpointing and the head-computed loss under
ZeRO-3 on two gloo ranks follow the plain run's losses (ZeRO-3 gathers the head weight inside the head's forward)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from tests.conftest import MAIN, SMOKE, free_port, run_job, train_losses

pytestmark = pytest.mark.slow


def _torchrun(out: Path, cache: Path, ds_config: Path, *extra: str) -> list[str]:
    return [str(Path(sys.executable).parent / "torchrun"), "--nproc_per_node", "2", "--master_port", str(free_port()),
            str(MAIN), "--config", str(SMOKE), "--ds_config", str(ds_config), f"train.out_dir={out}",
            f"data.cache_dir={cache}", "log.progress=false", "train.steps=8", "sample.max_new_tokens=4", *extra]


def test_zero3_with_checkpointing_and_head_loss_follows_the_plain_run(tmp_path: Path, data_cache: Path,
                                                                       zero3_test_config: Path) -> None:
    plain, perf = tmp_path / "plain", tmp_path / "perf"
    run_job(_torchrun(plain, data_cache, zero3_test_config), tmp_path)
    proc = run_job(_torchrun(perf, data_cache, zero3_test_config, "perf.activation_checkpointing=full",
                             "perf.fused_linear_cross_entropy=true"), tmp_path)
    assert "activation checkpointing: full, 4 blocks" in proc.stderr
    assert "linear_cross_entropy=reference" in proc.stderr  # no CUDA here: the reference, through the head
    expected, got = train_losses(plain), train_losses(perf)
    assert sorted(got) == list(range(1, 9))
    for step, loss in expected.items():
        assert got[step] == pytest.approx(loss, abs=1e-5), step
