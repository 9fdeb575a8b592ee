"""Asynchronous checkpoint saves (train.async_save) through the real entry point: the files equal a synchronous
save's, kill -9 at three points of the background save leaves the previous checkpoint the newest complete one
and ``--resume auto`` continues exactly, and a failed background write is the one-line CheckpointError of a
synchronous save (on two ranks under ZeRO-2)."""

from __future__ import annotations

import signal
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import MAIN, SMOKE, child_env, free_port, python_main, read_rows, run_job, train_losses

pytestmark = pytest.mark.slow

ASYNC = "train.async_save=true"


def _args(out_dir: Path, cache: Path, *extra: str) -> list[str]:
    return ["--config", str(SMOKE), f"train.out_dir={out_dir}", f"data.cache_dir={cache}",
            "log.progress=false", "sample.max_new_tokens=0", *extra]


def _ckpts(out_dir: Path) -> list[str]:
    return sorted(p.name for p in (out_dir / "checkpoints").iterdir() if not p.name.endswith(".py"))


def _tag(out_dir: Path, step: int) -> Path:
    return out_dir / "checkpoints" / f"step_{step:08d}"


@pytest.fixture(scope="module")
def sync_run(tmp_path_factory: pytest.TempPathFactory, data_cache: Path) -> Path:
    """An uninterrupted 20-step run saving synchronously (checkpoints at 10 and 20)."""
    out = tmp_path_factory.mktemp("sync") / "run"
    run_job(python_main(*_args(out, data_cache)), out.parent)
    return out


def _equal_states(a: object, b: object) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_equal_states(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_equal_states(x, y) for x, y in zip(a, b, strict=True))
    return True  # configs, paths and other objects: not the state


def test_async_run_writes_what_a_sync_run_writes(tmp_path: Path, data_cache: Path, sync_run: Path) -> None:
    out = tmp_path / "run"
    proc = run_job(python_main(*_args(out, data_cache, ASYNC)), tmp_path)
    assert "writing " in proc.stderr and "in the background" in proc.stderr
    assert f"checkpoint {_tag(out, 10)} complete" in proc.stderr
    assert train_losses(out) == train_losses(sync_run)  # saving in a thread does not touch the numbers
    assert _ckpts(out) == _ckpts(sync_run) == ["best", "latest", "step_00000010", "step_00000020"]
    assert (out / "checkpoints" / "latest").read_text() == "step_00000020"
    for step in (10, 20):
        names = sorted(p.name for p in _tag(out, step).iterdir())
        assert names == sorted(p.name for p in _tag(sync_run, step).iterdir())
        for name in names:
            if name.endswith(".pt"):
                mine = torch.load(_tag(out, step) / name, weights_only=False)
                theirs = torch.load(_tag(sync_run, step) / name, weights_only=False)
                if name.startswith("rng_rank"):  # python's and numpy's generators are not seeded per run
                    mine, theirs = mine["torch"], theirs["torch"]
                assert _equal_states(mine, theirs), (step, name)


@pytest.mark.parametrize("point, resumes_from", [
    ("async_snapshot@20", 10),  # the snapshot is in host memory, no file written yet
    ("async_half_written@20", 10),  # half of the files written by the background thread
    ("before_latest@10", 10),  # written and verified, renamed, latest not yet moved
])
def test_kill_during_async_save_then_resume(tmp_path: Path, data_cache: Path, sync_run: Path, point: str,
                                            resumes_from: int) -> None:
    out = tmp_path / "run"
    env = {**child_env(tmp_path), "TESSERA_FAILPOINT": point}
    crashed = run_job(python_main(*_args(out, data_cache, ASYNC)), tmp_path, env=env, check=False)
    assert crashed.returncode == -signal.SIGKILL, crashed.stderr[-2000:]
    latest = out / "checkpoints" / "latest"
    assert (latest.read_text() if latest.exists() else None) == (None if point.endswith("@10") else "step_00000010")
    assert (out / "checkpoints" / "step_00000020.tmp").is_dir() != point.endswith("@10")

    resumed = run_job(python_main(*_args(out, data_cache, ASYNC), "--resume", "auto"), tmp_path)
    assert f"resumed from {_tag(out, resumes_from)}" in resumed.stderr
    assert _ckpts(out) == ["best", "latest", "step_00000010", "step_00000020"]  # the partial write is gone
    assert [r["step"] for r in read_rows(out) if "loss" in r] == list(range(1, 21))
    want, got = train_losses(sync_run), train_losses(out)
    for step in range(resumes_from + 1, 21):  # an async-saved checkpoint resumes as the sync run went on
        assert got[step] == want[step], step


def test_failed_background_write_is_one_error_on_two_ranks(tmp_path: Path, data_cache: Path) -> None:
    out = tmp_path / "run"
    env = {**child_env(tmp_path), "TESSERA_FAILPOINT": "save_error_rank1@20"}
    cmd = [str(Path(sys.executable).parent / "deepspeed"), "--num_accelerators", "2", "--master_port",
           str(free_port()), str(MAIN), *_args(out, data_cache, ASYNC, "train.dist_timeout_s=60"),
           "--ds_config", "zero2"]
    proc = run_job(cmd, tmp_path, env=env, check=False, timeout=300)
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr.split("checkpoint at step 20")[0][-3000:]
    errors = {line.split("tessera: error: ", 1)[1] for line in proc.stderr.splitlines() if "tessera: error:" in line}
    assert len(errors) == 1, proc.stderr[-3000:]
    error = errors.pop()
    assert error.startswith(f"checkpoint at step 20 could not be written to {out / 'checkpoints'}")
    assert "rank 1: [Errno 28] No space left on device" in error
    assert error.endswith(f"the previous checkpoint {_tag(out, 10)} is intact.")
    assert _ckpts(out) == ["best", "latest", "step_00000010"]  # no step_00000020.tmp left
    assert (out / "checkpoints" / "latest").read_text() == "step_00000010"
    assert {p.name for p in _tag(out, 10).iterdir()} >= {"rng_rank00000.pt", "rng_rank00001.pt", "tessera.json"}
