"""Tessera on a real single-node SLURM cluster (slurm/local_cluster.sh): training, sweeps, preemption,
failures.

The module starts the cluster (root only: it installs Debian's packages and starts system daemons), submits
the long jobs at once so they run side by side, and stops the cluster at the end. Every wait has a timeout.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import submitit

from slurm.jobs import JobRecord, job_state, wait_final
from tests.conftest import REPO, SMOKE, child_env, read_rows, train_losses
from train.config.load import load_config
from train.data.setup import setup_data

pytestmark = pytest.mark.slow

CLUSTER = REPO / "slurm" / "local_cluster.sh"
SUBMIT = REPO / "slurm" / "submit.py"
# The smoke model for 40 steps: long enough to interrupt, short enough for CI.
RUN = ["train.steps=40", "train.eval_interval=20", "train.save_interval=20", "sample.max_new_tokens=8"]
JOB_TIMEOUT_S = 300


def _cluster_env(base: Path) -> dict[str, str]:
    # More CPUs than the machine has, so the module's jobs run side by side; two fake GPUs for preflight.
    return {**os.environ, "TESSERA_SLURM_DIR": str(base), "TESSERA_SLURM_CPUS": "10",
            "TESSERA_SLURM_GPUS": "2"}


def _controller_up() -> bool:
    if shutil.which("scontrol") is None:
        return False
    return subprocess.run(["scontrol", "ping"], capture_output=True, text=True, timeout=30,
                          check=False).stdout.count("UP") > 0


def skip_without_root_or_slurm() -> None:
    """Skip where slurm/local_cluster.sh cannot run: it needs root and Debian's packages (or apt-get)."""
    if os.geteuid() != 0:
        pytest.skip("the local SLURM cluster needs root: slurm/local_cluster.sh installs packages and starts "
                    "munged, MariaDB, slurmdbd, slurmctld and slurmd")
    if shutil.which("sbatch") is None and shutil.which("apt-get") is None:
        pytest.skip("no SLURM client and no apt-get to install Debian's slurm packages")


@pytest.fixture(scope="module")
def cluster() -> Iterator[None]:
    """The local cluster: reused when one is already up, else started here and stopped (and wiped) after."""
    skip_without_root_or_slurm()
    if _controller_up():
        nodes = subprocess.run(["sinfo", "-h", "-N", "-o", "%N"], capture_output=True, text=True, timeout=30,
                               check=False).stdout.split()
        if len(set(nodes)) > 1:  # tests/slurm/test_multinode.py's kind: host names and node names differ there
            pytest.skip(f"a cluster of nodes {','.join(sorted(set(nodes)))} is up; these tests run on the "
                        f"single-node one: stop it (slurm/local_cluster.sh stop)")
        yield
        return
    # Not under pytest's private temporary root: munged runs as user munge and must reach its PID directory.
    base = Path(tempfile.mkdtemp(prefix="tessera-slurm-test-"))
    base.chmod(0o755)
    env = _cluster_env(base)
    try:
        start = subprocess.run(["bash", str(CLUSTER), "start"], env=env, capture_output=True, text=True,
                               timeout=600, check=False)
        assert start.returncode == 0, f"local_cluster.sh start failed:\n{start.stdout}\n{start.stderr}"
        yield
    finally:  # a failed start has undone itself; stopping again is harmless
        stop = subprocess.run(["bash", str(CLUSTER), "stop", "--wipe"], env=env, capture_output=True,
                              text=True, timeout=180, check=False)
        shutil.rmtree(base, ignore_errors=True)
    assert stop.returncode == 0, stop.stderr


@pytest.fixture(scope="module")
def job_env(tmp_path_factory: pytest.TempPathFactory, data_cache: Path) -> dict[str, str]:
    """Environment of submit.py (sbatch hands it to the jobs); the corpus is prepared before any job
    starts."""
    setup_data(load_config(str(SMOKE), [f"data.cache_dir={data_cache}"]).data)
    tmp = tmp_path_factory.mktemp("slurm_jobs")
    return {**child_env(tmp), "TESSERA_SLURM_JOBS": str(tmp / "jobs.jsonl")}


def submit(env: dict[str, str], *args: str, timeout: int = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(SUBMIT), *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=timeout, check=False)


def record_of(out_dir: Path) -> JobRecord:
    return JobRecord(**json.loads((out_dir / "slurm_job.json").read_text()))


def wait_until(what: str, timeout_s: float, probe: Callable[[], Any], poll_s: float = 0.2) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = probe()
        if value:
            return value
        time.sleep(poll_s)
    raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")


def _last_step(out: Path) -> int:
    try:
        return max((r["step"] for r in read_rows(out) if "loss" in r), default=0)
    except (FileNotFoundError, json.JSONDecodeError):  # not written yet, or a row being written
        return 0


@pytest.fixture(scope="module")
def runs(cluster: None, job_env: dict[str, str], data_cache: Path,
         tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Submit the long jobs together: an uninterrupted 2-task run, the same run to preempt, a 3-point
    sweep."""
    root = tmp_path_factory.mktemp("slurm_runs")
    common = ["--profile", "local", "--config", str(SMOKE), *RUN, f"data.cache_dir={data_cache}"]
    train_out, preempt_out, sweep_out = root / "train", root / "preempt", root / "sweep"
    dry = submit(job_env, *common, f"train.out_dir={train_out}", "--dry-run")
    assert dry.returncode == 0, dry.stderr
    for out in (train_out, preempt_out):
        proc = submit(job_env, *common, f"train.out_dir={out}")
        assert proc.returncode == 0, proc.stderr
    grid = root / "grid.yaml"
    grid.write_text(f"out_dir: {sweep_out}\ngrid:\n  train.lr: [1.0e-3, 3.0e-3, 1.0e-2]\n")
    proc = submit(job_env, "--profile", "local", "--config", str(SMOKE), "--tasks-per-node", "1", "--sweep",
                  str(grid), f"data.cache_dir={data_cache}", "train.steps=12", "train.eval_interval=0",
                  "train.save_interval=0", "sample.max_new_tokens=0")
    assert proc.returncode == 0, proc.stderr
    return {"train": train_out, "preempt": preempt_out, "sweep": sweep_out, "dry_run": dry.stdout,
            "sweep_stdout": proc.stdout}


def _queue() -> str:
    return subprocess.run(["squeue", "-h"], capture_output=True, text=True, timeout=30, check=True).stdout


def test_bad_partition_is_refused_by_the_live_cluster(cluster: None, job_env: dict[str, str],
                                                      tmp_path: Path) -> None:
    profile = tmp_path / "anywhere.yaml"
    # no partitions list to vet it
    profile.write_text("partition: gpu-a100\ntasks_per_node: 2\ntime_min: 30\n")
    before = _queue()
    proc = submit(job_env, "--profile", str(profile), "--config", str(SMOKE),
                  f"train.out_dir={tmp_path / 'r'}")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [(
        "tessera: error: --partition gpu-a100: this cluster has no such partition (sinfo lists local); use "
        "one of those.")]
    assert _queue() == before
    assert not (tmp_path / "r").exists()


def test_bare_submit_picks_the_running_local_cluster(cluster: None, job_env: dict[str, str], tmp_path: Path) -> None:
    """No --profile, no --config: the default recipe on the profile `local`, found from the live cluster."""
    proc = submit(job_env, "--dry-run", f"train.out_dir={tmp_path / 'r'}")
    assert proc.returncode == 0, proc.stderr
    assert "profile local: the local cluster (slurm/local_cluster.sh) is up" in proc.stderr
    assert "# job (profile local; nothing was queued)" in proc.stdout
    assert "train/configs/shakespeare.yaml" in proc.stdout


def test_usr2_checkpoints_requeues_and_continues(runs: dict[str, Any], job_env: dict[str, str]) -> None:
    """scancel --signal=USR2: the job saves its current step, requeues, and the next run continues from it."""
    out = runs["preempt"]
    record = record_of(out)
    wait_until("step 5 of the job to preempt", JOB_TIMEOUT_S, lambda: _last_step(out) >= 5)
    signalled = time.monotonic()
    subprocess.run(["scancel", "--signal=USR2", record.job_id], timeout=30, check=True)
    stop = wait_until("the stop", 120,
                      lambda: next((r for r in read_rows(out) if r.get("event") == "stopped"), None))
    stopped_at = stop["step"]
    wait_until("training to continue", JOB_TIMEOUT_S, lambda: _last_step(out) > stopped_at)
    print(f"USR2 at step >= 5: stopped at step {stopped_at}, the requeued job trained step {stopped_at + 1} "
          f"{time.monotonic() - signalled:.1f} s after the signal")
    state = wait_final(record.job_id, JOB_TIMEOUT_S)
    assert state.state == "COMPLETED" and state.restarts == 1, state
    assert stopped_at < 40
    log = Path(record.folder, f"{record.job_id}_0_log.err").read_text()
    tag = f"step_{stopped_at:08d}"
    assert f"step {stopped_at}: checkpoint saved to {out}/checkpoints/{tag} (requested)" in log
    resumed_line = rf"resumed from {re.escape(str(out))}/checkpoints/{tag} at step {stopped_at} "
    assert re.search(resumed_line, log), log[-3000:]
    # the step counter continues and nothing is trained twice ...
    steps = [r["step"] for r in read_rows(out) if "loss" in r]
    assert steps == list(range(1, 41))
    # ... and the interrupted run follows the uninterrupted one exactly
    assert wait_final(record_of(runs["train"]).job_id, JOB_TIMEOUT_S).state == "COMPLETED"
    reference, resumed = train_losses(runs["train"]), train_losses(out)
    for step in range(1, 41):
        assert resumed[step] == pytest.approx(reference[step], abs=1e-6), step


def test_failing_job_is_reported_failed_with_its_log_tail(cluster: None, job_env: dict[str, str],
                                                         data_cache: Path, tmp_path: Path) -> None:
    """One fake GPU asked for: SLURM sets CUDA_VISIBLE_DEVICES, torch sees none, preflight fails the job."""
    gres = subprocess.run(["sinfo", "-h", "-o", "%G"], capture_output=True, text=True, timeout=30,
                          check=True).stdout
    if "gpu" not in gres:
        pytest.skip("the running cluster declares no GPUs (start it with TESSERA_SLURM_GPUS=2)")
    profile = tmp_path / "fakegpu.yaml"
    profile.write_text("partition: local\ngpus_per_node: 2\ncpus_per_task: 1\nmem_gb_per_task: 2\n"
                       "time_min: 30\n")
    out = tmp_path / "run"
    start = time.monotonic()
    proc = submit(job_env, "--profile", str(profile), "--gpus-per-node", "1", "--config", str(SMOKE),
                  "--ds_config", "cpu", f"data.cache_dir={data_cache}", f"train.out_dir={out}", "--wait",
                  "180", timeout=240)
    print(f"failing job reported after {time.monotonic() - start:.1f} s")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    record = record_of(out)
    assert f"{record.job_id}: FAILED (exit 3:0" in proc.stdout
    line = (f"tessera: preflight: {socket.gethostname()} task 0: gpus: the job asked for 1 GPU per node but "
            f"torch sees 0 (CUDA_VISIBLE_DEVICES=0)")
    assert line in proc.stderr  # the log tail
    assert "Traceback" not in proc.stderr and not (out / "metrics.jsonl").exists()
    status = submit(job_env, "status", record.job_id)
    assert "FAILED  exit 3:0" in status.stdout
    tail = submit(job_env, "tail", str(out), "--lines", "5")
    assert "tessera: preflight:" in tail.stdout and "gpus:" in tail.stdout


def test_cancel(cluster: None, job_env: dict[str, str], data_cache: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    proc = submit(job_env, "--profile", "local", "--tasks-per-node", "1", "--config", str(SMOKE),
                  f"data.cache_dir={data_cache}", f"train.out_dir={out}", "train.steps=100000")
    assert proc.returncode == 0, proc.stderr
    record = record_of(out)
    wait_until("the job to run", 120,
               lambda: (s := job_state(record.job_id)) is not None and s.state == "RUNNING")
    cancel = submit(job_env, "cancel", record.job_id)
    assert cancel.returncode == 0 and f"cancelled {record.job_id}" in cancel.stdout, cancel.stderr
    assert wait_final(record.job_id, 120).state == "CANCELLED"
    wait_until("the job's processes to end", 60, lambda: subprocess.run(
        ["pgrep", "-f", f"submitit.core._submit {record.folder}"], capture_output=True, timeout=30,
        check=False).returncode == 1)


def test_two_task_job_trains_to_completion(runs: dict[str, Any], job_env: dict[str, str]) -> None:
    out = runs["train"]
    record = record_of(out)
    state = wait_final(record.job_id, JOB_TIMEOUT_S)
    assert state.state == "COMPLETED", submit(job_env, "tail", record.job_id).stdout
    results = submitit.SlurmJob(folder=record.folder, job_id=record.job_id, tasks=(0, 1)).results()
    assert [r["rank"] for r in results] == [0, 1] and all(r["status"] == "completed" for r in results)
    assert results[0]["steps"] == 40 and results[0]["val_ppl"] > 1
    losses = train_losses(out)
    assert sorted(losses) == list(range(1, 41))
    first, last = sum(losses[s] for s in (1, 2, 3)) / 3, sum(losses[s] for s in (38, 39, 40)) / 3
    assert last < first - 0.5, f"loss did not fall: {first:.3f} -> {last:.3f}"
    assert (out / "checkpoints" / "latest").read_text() == "step_00000040"
    assert (out / "checkpoints" / "step_00000020" / "tessera.json").is_file()
    # the script --dry-run printed is the one submitit wrote and sbatch ran
    submitted = (Path(record.folder) / f"{record.job_id}_submission.sh").read_text()
    assert runs["dry_run"].split("# sbatch script\n", 1)[1].rstrip() == submitted.rstrip()
    status = submit(job_env, "status", str(out))
    assert "COMPLETED  exit 0:0" in status.stdout and "step 40 / 40" in status.stdout


def test_sweep_is_one_job_array_with_a_summary(runs: dict[str, Any], job_env: dict[str, str]) -> None:
    sweep = runs["sweep"]
    points = json.loads((sweep / "sweep.json").read_text())["points"]
    ids = [p["job_id"] for p in points]
    array = ids[0].split("_")[0]
    assert ids == [f"{array}_{i}" for i in range(3)], ids  # one array, one task per point
    for job_id in ids:
        assert wait_final(job_id, JOB_TIMEOUT_S).state == "COMPLETED", submit(job_env, "tail", job_id).stdout
    proc = submit(job_env, "summary", str(sweep))
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].split() == ["name", "train.lr", "job_id", "state", "restarts", "lost", "steps", "val_loss",
                                "val_ppl"]
    assert len(lines) == 4 and all(" COMPLETED " in line for line in lines[1:])
    rows = json.loads((sweep / "summary.json").read_text())
    assert {r["train.lr"] for r in rows} == {1e-3, 3e-3, 1e-2} and all(r["steps"] == 12 for r in rows)
    assert len({r["val_loss"] for r in rows}) == 3  # three different runs
    for p in points:
        assert (Path(p["out_dir"]) / "checkpoints" / "step_00000012" / "tessera.json").is_file()
