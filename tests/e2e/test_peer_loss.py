"""A lost peer and a rank that never comes, with real processes started as SLURM would (no launcher agent):
the survivors say which rank is gone in one line, with no traceback, and exit in time."""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.conftest import REPO, SMOKE, child_env, free_port, python_main, read_rows

pytestmark = pytest.mark.slow


def _start(tmp_path: Path, data_cache: Path, world: int, ranks: list[int], **extra_env: str) -> list:
    out, port = tmp_path / "run", free_port()
    procs = []
    for rank in ranks:
        env = {**child_env(tmp_path), "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world),
               "LOCAL_WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
               **extra_env}
        cmd = python_main("--config", str(SMOKE), f"train.out_dir={out}", f"data.cache_dir={data_cache}",
                          "log.progress=false", "sample.max_new_tokens=0", "train.steps=2000",
                          "train.eval_interval=0", "train.save_interval=0", "train.dist_timeout_s=60",
                          f"train.global_batch_size={4 * world}", "--ds_config", "zero2")
        procs.append(subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.DEVNULL,
                                      stderr=subprocess.PIPE, text=True))
    return procs


def _one_line_each(procs: list, data_out: Path, kill: int, timeout_s: float = 90) -> list[str]:
    """Kill rank ``kill`` once training runs; the others' one error line each (checked to come in time)."""
    try:
        deadline = time.monotonic() + 300
        while not ((data_out / "metrics.jsonl").exists() and len(read_rows(data_out)) >= 3):
            assert time.monotonic() < deadline and all(p.poll() is None for p in procs), "no training"
            time.sleep(0.5)
        procs[kill].send_signal(signal.SIGKILL)
        killed_at = time.monotonic()
        lines = []
        for rank, p in enumerate(procs):
            if rank == kill:
                continue
            _, err = p.communicate(timeout=timeout_s + 30)
            assert p.returncode == 1, err[-3000:]
            assert time.monotonic() - killed_at < timeout_s, "a surviving rank took longer than its timeout"
            assert "Traceback" not in err and "Exception raised from" not in err, err[-3000:]
            errors = [line for line in err.splitlines() if line.startswith("tessera: error:")]
            assert len(errors) == 1, err[-3000:]
            lines.append(errors[0])
        return lines
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait()


def test_the_survivors_name_the_lost_rank(tmp_path: Path, data_cache: Path) -> None:
    """Three ranks; rank 1 is killed mid-training: ranks 0 and 2 each name it."""
    procs = _start(tmp_path, data_cache, 3, [0, 1, 2])
    lines = _one_line_each(procs, tmp_path / "run", kill=1)
    for rank, line in zip((0, 2), lines, strict=True):
        assert line.startswith(f"tessera: error: rank {rank}: lost rank 1 (process ended or stopped "
                               f"answering): ")
        assert line.endswith("this rank stops too. See rank 1's log for why; a restart with --resume auto "
                             "continues from the last checkpoint.")


def test_losing_the_rank_that_hosts_the_store(tmp_path: Path, data_cache: Path) -> None:
    procs = _start(tmp_path, data_cache, 2, [0, 1])
    [line] = _one_line_each(procs, tmp_path / "run", kill=0)
    assert line.startswith("tessera: error: rank 1: lost rank 0 (the rendezvous store it hosted at "
                           "127.0.0.1:")


def test_a_rank_that_never_comes_is_named(tmp_path: Path, data_cache: Path) -> None:
    """Rank 0 of 2 alone: it says it waits, then names rank 1, within TESSERA_RENDEZVOUS_TIMEOUT_S."""
    [proc] = _start(tmp_path, data_cache, 2, [0], TESSERA_RENDEZVOUS_TIMEOUT_S="6")
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 1 and "Traceback" not in err, err[-3000:]
    notes = [line for line in err.splitlines() if line.startswith("tessera:")]
    assert notes[0].startswith("tessera: waiting for 1 of 2 ranks at 127.0.0.1:")
    assert "(missing: 1)" in notes[0] and notes[1:] == [notes[-1]]
    assert notes[-1].startswith("tessera: error: rank(s) 1 of 2 did not reach the rendezvous at 127.0.0.1:")
    assert "within 6 s (TESSERA_RENDEZVOUS_TIMEOUT_S)" in notes[-1]
    assert not (tmp_path / "run").exists()
