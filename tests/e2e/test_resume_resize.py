"""Resuming on another number of data-parallel ranks: ZeRO 0 as saved, ZeRO 2 and 3 through a universal copy.

Each stage has one uninterrupted 2-rank reference run (checkpoints at 10 and 20). Its step-10 checkpoint is
copied into a fresh run directory and resumed with 1 or 4 ranks; steps 11-20 must be the reference's.
Micro batch 2 lets the global batch of 8 factor at 1, 2 and 4 ranks (accumulation 4, 2 and 1).
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest

from tests.conftest import MAIN, SMOKE, child_env, free_port, python_main, read_rows, run_job, train_losses
from train.checkpoint.resize import convert
from train.checkpoint.writer import CheckpointError, complete_checkpoints

pytestmark = pytest.mark.slow

TAG = "step_00000010"


def _args(out_dir: Path, cache: Path, ds_config: str, *extra: str) -> list[str]:
    return ["--config", str(SMOKE), f"train.out_dir={out_dir}", f"data.cache_dir={cache}", "log.progress=false",
            "train.micro_batch_size=2", "sample.max_new_tokens=0", "--ds_config", ds_config, *extra]


def _launch(n: int, *args: str) -> list[str]:
    """One plain process for a single rank, torchrun for more."""
    if n == 1:
        return python_main(*args)
    torchrun = str(Path(sys.executable).parent / "torchrun")
    return [torchrun, "--nproc_per_node", str(n), "--master_port", str(free_port()), str(MAIN), *args]


@pytest.fixture(scope="module")
def ds_configs(zero3_test_config: Path) -> dict[int, str]:
    return {0: "cpu", 2: "zero2", 3: str(zero3_test_config)}


@pytest.fixture(scope="module")
def references(tmp_path_factory: pytest.TempPathFactory, data_cache: Path, ds_configs: dict[int, str]):
    """Per ZeRO stage, made on first use: the run directory of an uninterrupted 2-rank, 20-step run."""
    made: dict[int, Path] = {}

    def get(stage: int) -> Path:
        if stage not in made:
            out = tmp_path_factory.mktemp(f"reference_zero{stage}") / "run"
            run_job(_launch(2, *_args(out, data_cache, ds_configs[stage])), out.parent)
            assert json.loads((out / "checkpoints" / TAG / "tessera.json").read_text())["world_size"] == 2
            made[stage] = out
        return made[stage]

    return get


def _stopped_at_step_10(reference: Path, out: Path) -> None:
    """A run directory as the reference left it right after its step-10 checkpoint."""
    (out / "checkpoints").mkdir(parents=True)
    shutil.copytree(reference / "checkpoints" / TAG, out / "checkpoints" / TAG)
    (out / "checkpoints" / "latest").write_text(TAG)
    rows = [r for r in read_rows(reference) if r["step"] <= 10]
    (out / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def _check_resumed(reference: Path, out: Path, proc_stderr: str, ranks: int) -> None:
    """Steps 11-20 equal the reference's, each logged once, with the data position carried on."""
    assert f"resumed from {out / 'checkpoints' / TAG} at step 10 (80 samples consumed)" in proc_stderr
    rows = [r for r in read_rows(out) if "loss" in r]
    assert [r["step"] for r in rows] == list(range(1, 21))  # every step once
    assert [r["consumed_samples"] for r in rows] == [8 * s for s in range(1, 21)]
    want, got = train_losses(reference), train_losses(out)
    for step in range(11, 21):
        assert got[step] == pytest.approx(want[step], abs=1e-5), (step, got[step], want[step])
    assert [p.name for p in complete_checkpoints(out)] == [TAG, "step_00000020"]
    assert not (out / "checkpoints" / "latest_universal").exists()
    assert "load_universal" not in (out / "ds_config.json").read_text()
    meta = json.loads((out / "checkpoints" / "step_00000020" / "tessera.json").read_text())
    assert meta["world_size"] == ranks and meta["consumed_samples"] == 160


@pytest.mark.parametrize("stage, ranks", [(0, 1), (2, 1), (2, 4), (3, 4)])
def test_resume_on_another_world_size_replays_the_reference(tmp_path: Path, data_cache: Path, references,
                                                             ds_configs: dict[int, str], stage: int,
                                                             ranks: int) -> None:
    reference = references(stage)
    out = tmp_path / "run"
    _stopped_at_step_10(reference, out)
    proc = run_job(_launch(ranks, *_args(out, data_cache, ds_configs[stage], "--resume", "auto")), tmp_path)
    assert f"world size changed from 2 to {ranks}" in proc.stderr
    assert ("converted it to a universal checkpoint" in proc.stderr) == (stage > 0)
    assert (out / "checkpoints" / f"{TAG}.universal").is_dir() == (stage > 0)
    _check_resumed(reference, out, proc.stderr, ranks)


def test_zero3_one_rank_reuses_the_copy_and_later_loads_natively(tmp_path: Path, data_cache: Path, references,
                                                                  ds_configs: dict[int, str]) -> None:
    """ZeRO-3 from 2 ranks to 1; resumed from step 10 again (the universal copy is reused), then from the
    resumed run's own step 20 (same world size: a native load, with ``load_universal`` nowhere in force)."""
    reference, out = references(3), tmp_path / "run"
    _stopped_at_step_10(reference, out)
    args = _args(out, data_cache, ds_configs[3])
    first = run_job(_launch(1, *args, "--resume", "auto"), tmp_path)
    assert "world size changed from 2 to 1: ZeRO-3 checkpoint step_00000010, converted" in first.stderr
    _check_resumed(reference, out, first.stderr, 1)

    again = run_job(_launch(1, *args, "--resume", str(out / "checkpoints" / TAG)), tmp_path)
    assert "reused its universal copy step_00000010.universal" in again.stderr
    _check_resumed(reference, out, again.stderr, 1)

    later = run_job(_launch(1, *args, "--resume", "auto"), tmp_path)
    assert "world size changed" not in later.stderr
    assert f"resumed from {out / 'checkpoints' / 'step_00000020'} at step 20" in later.stderr


def test_a_checkpoint_that_cannot_be_converted_fails_in_one_line(tmp_path: Path) -> None:
    """A ZeRO-2 resume on another world size from a checkpoint without ZeRO files: one clear error."""
    tag_dir = tmp_path / "checkpoints" / TAG
    tag_dir.mkdir(parents=True)
    (tag_dir / "tessera.json").write_text(json.dumps({"step": 10, "saved_at": 1.0, "world_size": 2}))
    with pytest.raises(CheckpointError, match=f"could not convert {tag_dir} to a universal checkpoint"):
        convert(tag_dir)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == [TAG]  # no copy, no tmp, no latest


def test_rollback_in_a_resized_run_reloads_the_old_world_size_checkpoint(tmp_path: Path, data_cache: Path,
                                                                         references,
                                                                         ds_configs: dict[int, str]) -> None:
    """ZeRO-2 from 2 ranks to 1, then bad steps 12-14 roll back to step 10 (saved by 2 ranks) mid-run."""
    out = tmp_path / "run"
    _stopped_at_step_10(references(2), out)
    env = {**child_env(tmp_path), "TESSERA_FAILPOINT": "nan_batch@12-14"}
    proc = run_job(_launch(1, *_args(out, data_cache, ds_configs[2], "--resume", "auto")), tmp_path, env=env)
    assert "converted it to a universal checkpoint" in proc.stderr
    assert "reused its universal copy" in proc.stderr  # the rollback's load
    assert "rolled back to step_00000010" in proc.stderr
    rows = [r for r in read_rows(out) if "loss" in r and "event" not in r]
    assert [r["step"] for r in rows] == list(range(1, 21))
    (rollback,) = [r for r in read_rows(out) if r.get("event") == "rollback"]
    assert rollback["step"] == 10 and rollback["consumed_samples"] == 14 * 8  # past the three bad batches
    assert rows[-1]["consumed_samples"] == (14 + 10) * 8
