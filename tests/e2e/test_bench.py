"""tools/bench.py runs and reports consistent figures (the figures themselves go to BENCHMARKS.md)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO, run_job

pytestmark = pytest.mark.slow


def test_checkpoint_benchmark(tmp_path: Path) -> None:
    result_file = tmp_path / "result.json"
    cmd = [sys.executable, str(REPO / "tools" / "bench.py"), "checkpoint", "--preset", "test-1m",
           "--out", str(tmp_path / "scratch"), "--json", str(result_file)]
    run_job(cmd, tmp_path)
    result = json.loads(result_file.read_text())
    assert result["params"] == 1_049_728
    # fp32 weights + two AdamW moments, plus a little metadata
    assert 12 * result["params"] <= result["checkpoint_bytes"] <= 12 * result["params"] + 2**20
    assert result["save_s"] > 0 and result["load_s"] > 0
    assert result["save_GBps"] > 0 and result["load_GBps"] > 0
    assert not (tmp_path / "scratch").exists()  # the scratch checkpoint is removed


@pytest.mark.parametrize("sp", [False, True], ids=["tp", "tp+sp"])
def test_tp_comm_benchmark_counts_what_megatron_predicts(tmp_path: Path, sp: bool) -> None:
    result_file = tmp_path / "result.json"
    cmd = [sys.executable, str(REPO / "tools" / "bench.py"), "tp-comm", "--preset", "test-1m", "--tp", "2",
           "--batch", "2", "--seq", "32", "--json", str(result_file), *(["--sp"] if sp else [])]
    run_job(cmd, tmp_path)
    result = json.loads(result_file.read_text())
    assert result["ranks_agree"] and result["counted_over_analytic"] == pytest.approx(1.0, abs=1e-4)
    layers = 4  # test-1m: 2 collectives per layer forward, 2 backward, + embedding + head (+ 3 in the loss)
    if sp:
        assert result["calls"] == {"all_gather": 4 * layers + 2, "reduce_scatter": 4 * layers + 2,
                                   "all_reduce": 3 + 2 * layers + 1}  # loss + one per norm weight
    else:
        assert result["calls"] == {"all_reduce": 4 * layers + 2 + 3}
