"""Bad steps in real runs: a NaN on one rank is skipped by all, a streak rolls back, a spike is caught."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest

from tests.conftest import MAIN, SMOKE, child_env, free_port, python_main, read_rows, run_job

pytestmark = pytest.mark.slow


def _args(out_dir: Path, cache: Path, *extra: str) -> list[str]:
    return ["--config", str(SMOKE), f"train.out_dir={out_dir}", f"data.cache_dir={cache}", "log.progress=false",
            "sample.max_new_tokens=0", *extra]


def _two_ranks(*args: str) -> list[str]:
    return [str(Path(sys.executable).parent / "deepspeed"), "--num_accelerators", "2", "--master_port",
            str(free_port()), str(MAIN), *args]


def _events(out: Path, kind: str) -> list[dict]:
    return [r for r in read_rows(out) if r.get("event") == kind]


def _train_steps(out: Path) -> list[int]:
    return [r["step"] for r in read_rows(out) if "loss" in r and "event" not in r]


@pytest.mark.parametrize("ds", ["cpu", "zero2", "zero3"])
def test_nan_on_one_rank_skips_the_step_on_all(tmp_path: Path, data_cache: Path, zero3_test_config: Path,
                                               ds: str) -> None:
    out = tmp_path / "run"
    env = {**child_env(tmp_path), "TESSERA_FAILPOINT": "nan_batch@7"}  # injected on the last rank only
    ds_config = str(zero3_test_config) if ds == "zero3" else ds
    cmd = (python_main if ds == "cpu" else _two_ranks)(*_args(out, data_cache), "--ds_config", ds_config)
    proc = run_job(cmd, tmp_path, env=env)
    assert "step 7: non-finite loss or gradients" in proc.stderr
    assert [e["step"] for e in _events(out, "skipped")] == [7]
    rows = {r["step"]: r for r in read_rows(out) if "loss" in r and "event" not in r}
    assert sorted(rows) == [s for s in range(1, 21) if s != 7]
    assert all(math.isfinite(r["loss"]) for r in rows.values())  # no NaN reached the weights
    assert rows[20]["skipped_steps"] == 1 and rows[20]["loss"] < rows[1]["loss"] - 0.5


def test_streak_of_bad_steps_rolls_back_past_the_batches(tmp_path: Path, data_cache: Path,
                                                         zero3_test_config: Path) -> None:
    out = tmp_path / "run"
    env = {**child_env(tmp_path), "TESSERA_FAILPOINT": "nan_batch@12-14"}
    proc = run_job(_two_ranks(*_args(out, data_cache), "--ds_config", str(zero3_test_config)), tmp_path, env=env)
    assert "3 bad steps in a row; rolled back to step_00000010" in proc.stderr
    (rollback,) = _events(out, "rollback")
    assert rollback["step"] == 10 and rollback["from_step"] == 14 and rollback["consumed_samples"] == 14 * 8
    assert [e["step"] for e in _events(out, "skipped")] == [12, 13, 14]
    assert _train_steps(out) == list(range(1, 21))  # the redone steps replace the bad ones, each once
    last = [r for r in read_rows(out) if "loss" in r and "event" not in r][-1]
    assert last["consumed_samples"] == (20 + 4) * 8 and math.isfinite(last["loss"])
    assert (out / "checkpoints" / "step_00000020" / "tessera.json").is_file()


def test_loss_spike_rolls_back_when_asked(tmp_path: Path, data_cache: Path) -> None:
    out = tmp_path / "run"
    env = {**child_env(tmp_path), "TESSERA_FAILPOINT": "spike_batch@15"}
    proc = run_job(python_main(*_args(out, data_cache, "train.spike_action=rollback")), tmp_path, env=env)
    assert "step 15: loss spike" in proc.stderr
    (spike,) = _events(out, "spike")
    assert spike["step"] == 15 and spike["zscore"] > 6
    (rollback,) = _events(out, "rollback")
    assert rollback["step"] == 10 and rollback["from_step"] == 15
    assert _train_steps(out) == list(range(1, 21))


def test_run_that_keeps_diverging_stops_with_one_clear_error(tmp_path: Path, data_cache: Path) -> None:
    out = tmp_path / "run"
    env = {**child_env(tmp_path), "TESSERA_FAILPOINT": "nan_batch@12-99"}
    proc = run_job(python_main(*_args(out, data_cache, "train.max_rollbacks=1")), tmp_path, env=env, check=False)
    assert proc.returncode == 1
    errors = [line for line in proc.stderr.splitlines() if line.startswith("tessera: error:")]
    assert len(errors) == 1 and "after 1 rollback(s)" in errors[0] and "train.max_rollbacks=1" in errors[0]
    assert "Traceback" not in proc.stderr
    assert (out / "checkpoints" / "step_00000010" / "tessera.json").is_file()  # the good checkpoint is kept
