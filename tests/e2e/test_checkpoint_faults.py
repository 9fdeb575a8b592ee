"""Checkpoints under faults, with real processes: kill -9 mid-save, a dead rank, a full disk (before the save,
and filling up during the write)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import (
    MAIN,
    REPO,
    SMOKE,
    child_env,
    free_port,
    python_main,
    read_rows,
    run_job,
    train_losses,
)

pytestmark = pytest.mark.slow


def _args(out_dir: Path, cache: Path, *extra: str) -> list[str]:
    return ["--config", str(SMOKE), f"train.out_dir={out_dir}", f"data.cache_dir={cache}",
            "log.progress=false", "sample.max_new_tokens=0", *extra]


def _ckpts(out_dir: Path) -> list[str]:
    return sorted(p.name for p in (out_dir / "checkpoints").iterdir() if not p.name.endswith(".py"))


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory, data_cache: Path) -> dict[int, float]:
    """Losses of an uninterrupted 20-step run (checkpoints at 10 and 20)."""
    out = tmp_path_factory.mktemp("reference") / "run"
    run_job(python_main(*_args(out, data_cache)), out.parent)
    return train_losses(out)


@pytest.mark.parametrize(
    "point, resumes_from",
    [("during_write", 10), ("after_engine_save", 10), ("before_rename", 10), ("before_latest", 20)],
)
def test_kill_during_checkpoint_write_then_resume(tmp_path: Path, data_cache: Path,
                                                  reference: dict[int, float], point: str,
                                                  resumes_from: int) -> None:
    out = tmp_path / "run"
    env = {**child_env(tmp_path), "TESSERA_FAILPOINT": f"{point}@20"}
    crashed = run_job(python_main(*_args(out, data_cache)), tmp_path, env=env, check=False)
    assert crashed.returncode == -signal.SIGKILL, crashed.stderr[-2000:]
    assert (out / "checkpoints" / "latest").read_text() == "step_00000010"  # latest moves last

    resumed = run_job(python_main(*_args(out, data_cache), "--resume", "auto"), tmp_path)
    assert f"resumed from {out / 'checkpoints' / f'step_{resumes_from:08d}'}" in resumed.stderr
    assert _ckpts(out) == ["best", "latest", "step_00000010", "step_00000020"]  # the partial write is gone
    losses = train_losses(out)
    assert [r["step"] for r in read_rows(out) if "loss" in r] == list(range(1, 21))
    for step in range(11, 21):
        assert losses[step] == pytest.approx(reference[step], abs=1e-6), step


def test_dead_rank_ends_the_job_instead_of_hanging(tmp_path: Path, data_cache: Path) -> None:
    """Two ranks started as SLURM would (no launcher agent to clean up); rank 1 is killed mid-training."""
    out, port = tmp_path / "run", free_port()
    procs = []
    for rank in (0, 1):
        env = {**child_env(tmp_path), "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2",
               "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
        cmd = python_main(*_args(out, data_cache, "train.steps=2000", "train.eval_interval=0",
                                 "train.save_interval=0", "train.dist_timeout_s=60"), "--ds_config", "zero2")
        procs.append(subprocess.Popen(cmd, env=env, cwd=MAIN.parents[1], stdout=subprocess.DEVNULL,
                                      stderr=subprocess.PIPE, text=True))
    try:
        deadline = time.monotonic() + 240
        while not ((out / "metrics.jsonl").exists() and len(read_rows(out)) >= 3):
            assert time.monotonic() < deadline and procs[0].poll() is None, "training did not start"
            time.sleep(0.5)
        procs[1].send_signal(signal.SIGKILL)
        killed_at = time.monotonic()
        rc = procs[0].wait(timeout=120)
        assert rc != 0
        assert time.monotonic() - killed_at < 90, "the surviving rank took longer than its timeout to exit"
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait()


@pytest.fixture
def small_disk(tmp_path: Path):
    """A mount point for a tmpfs of a chosen size (real ENOSPC semantics), unmounted afterwards."""
    mounted: list[Path] = []

    def mount(size_mb: int) -> Path:
        point = tmp_path / f"disk{size_mb}"
        point.mkdir()
        subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_mb}m", "tmpfs", str(point)], check=True)
        mounted.append(point)
        return point

    yield mount
    for point in mounted:
        subprocess.run(["umount", str(point)], check=False)


def test_disk_too_small_is_reported_before_training(tmp_path: Path, data_cache: Path, small_disk) -> None:
    disk = small_disk(8)  # one checkpoint of the 1M-parameter model needs about 17 MiB
    proc = run_job(python_main(*_args(disk / "run", data_cache)), tmp_path, check=False)
    assert proc.returncode == 2
    assert "tessera: error: train.out_dir=" in proc.stderr
    assert "MiB free but one checkpoint needs" in proc.stderr
    assert not (disk / "run").exists()


def test_disk_that_fills_up_keeps_the_previous_checkpoint(tmp_path: Path, data_cache: Path,
                                                          small_disk) -> None:
    disk = small_disk(20)  # room for the first checkpoint (~12.6 MB), not for a second beside it
    out = disk / "run"
    proc = run_job(python_main(*_args(out, data_cache, "train.keep_last=0")), tmp_path, check=False)
    assert proc.returncode == 1
    errors = [line for line in proc.stderr.splitlines() if line.startswith("tessera: error:")]
    assert len(errors) == 1 and "checkpoint at step 20 could not be written" in errors[0]
    assert "step_00000010 is intact" in errors[0]
    assert _ckpts(out) == ["best", "latest", "step_00000010"]


def _fill(disk: Path) -> None:
    """Write zeros into ``disk`` until it is full."""
    with open(disk / "ballast", "wb") as f:
        try:
            while True:
                f.write(bytes(2**16))
                f.flush()
        except OSError:
            pass


def test_disk_filling_up_during_the_write(tmp_path: Path, data_cache: Path, small_disk,
                                          reference: dict[int, float]) -> None:
    """The free-space check before the step-20 save passes; the disk fills up while the save writes (the
    process is stopped the moment step_00000020.tmp appears, the disk filled, the process let go on)."""
    disk = small_disk(40)
    out, log = disk / "run", tmp_path / "stderr.txt"
    started = out / "checkpoints" / "step_00000020.tmp"
    with open(log, "w") as stderr:
        proc = subprocess.Popen(python_main(*_args(out, data_cache)), cwd=REPO, env=child_env(tmp_path),
                                stdout=subprocess.DEVNULL, stderr=stderr, text=True)
        try:
            deadline = time.monotonic() + 300
            while not started.exists():
                assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
                time.sleep(0.0005)
            proc.send_signal(signal.SIGSTOP)
            assert not (out / "checkpoints" / "step_00000020").exists()  # caught before the save completed
            _fill(disk)
            proc.send_signal(signal.SIGCONT)
            rc = proc.wait(timeout=300)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    stderr_text = log.read_text()
    assert rc == 1 and "Traceback" not in stderr_text, stderr_text[-3000:]
    errors = [line for line in stderr_text.splitlines() if line.startswith("tessera: error:")]
    assert len(errors) == 1, stderr_text[-3000:]
    head = f"tessera: error: checkpoint at step 20 could not be written to {out / 'checkpoints'} ("
    assert errors[0].startswith(head)
    assert "MiB free there): rank 0: " in errors[0]
    assert errors[0].endswith(f"the previous checkpoint {out / 'checkpoints' / 'step_00000010'} is intact.")
    assert _ckpts(out) == ["best", "latest", "step_00000010"]  # no step_00000020.tmp left

    (disk / "ballast").unlink()
    resumed = run_job(python_main(*_args(out, data_cache), "--resume", "auto"), tmp_path)
    assert f"resumed from {out / 'checkpoints' / 'step_00000010'} at step 10" in resumed.stderr
    losses = train_losses(out)
    for step in range(11, 21):
        assert losses[step] == reference[step], step


def test_write_error_on_one_rank_fails_every_rank_cleanly(tmp_path: Path, data_cache: Path) -> None:
    out = tmp_path / "run"
    env = {**child_env(tmp_path), "TESSERA_FAILPOINT": "save_error_rank1@20"}
    cmd = [str(Path(sys.executable).parent / "deepspeed"), "--num_accelerators", "2", "--master_port",
           str(free_port()), str(MAIN), *_args(out, data_cache, "train.dist_timeout_s=60"), "--ds_config",
           "zero2"]
    start = time.monotonic()
    proc = run_job(cmd, tmp_path, env=env, check=False, timeout=300)
    assert proc.returncode != 0 and time.monotonic() - start < 200
    assert "checkpoint at step 20 could not be written" in proc.stderr
    assert "rank 1: [Errno 28] No space left on device" in proc.stderr
    assert _ckpts(out) == ["best", "latest", "step_00000010"]
    assert os.listdir(out / "checkpoints" / "step_00000010")
