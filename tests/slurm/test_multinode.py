"""Tessera across the nodes of a real multi-node SLURM cluster on this machine (slurm/local_cluster.sh start
--nodes 2): ranks and rendezvous on the second node, ZeRO-3 and tp x dp across nodes against one process, a
node lost mid-run (requeued onto the node left), USR2 preemption of a 2-node job, and a stop that leaves
nothing behind.

One cluster for the module (its own TESSERA_SLURM_DIR and database port); the four jobs are submitted
together and run side by side. Every wait has a timeout. The cluster is stopped by the last test, and by the
fixture if that test did not run.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from slurm.jobs import JobRecord, wait_final
from tests.conftest import REPO, SMOKE, child_env, python_main, read_rows, run_job, train_losses
from tests.slurm.test_cluster import _last_step, record_of, skip_without_root_or_slurm, submit, wait_until
from train.config.load import load_config
from train.data.setup import setup_data

pytestmark = pytest.mark.slow

CLUSTER = REPO / "slurm" / "local_cluster.sh"
SUBMIT = REPO / "slurm" / "submit.py"
NODES = ("tessera-n1", "tessera-n2")
ADDRESSES = ("127.0.77.1", "127.0.77.2")
STEPS = 24  # every job's (the LR schedule follows it); over ~30 steps fp32 sums drift past 1e-5 across layouts
# The smoke model, short: every job logs each step; no evaluation, no samples.
RUN = [f"train.steps={STEPS}", "train.eval_interval=0", "train.save_interval=0", "sample.max_new_tokens=0"]
DIST_TIMEOUT_S = 60  # the node-loss job's collectives give up on a lost peer after this
JOB_TIMEOUT_S = 300


def _cluster_env(base: Path) -> dict[str, str]:
    # 8 CPUs per node: the four 2-task-per-node jobs of the module run side by side.
    return {**os.environ, "TESSERA_SLURM_DIR": str(base), "TESSERA_SLURM_CPUS": "8",
            "TESSERA_SLURM_DB_PORT": "3318"}


def _sh(*cmd: str, check: bool = True) -> str:
    return subprocess.run(list(cmd), capture_output=True, text=True, timeout=60, check=check).stdout


def _running_nodes() -> list[str] | None:
    """Nodes of the cluster whose controller answers (None: none does)."""
    if shutil.which("scontrol") is None or "UP" not in _sh("scontrol", "ping", check=False):
        return None
    return sorted(_sh("sinfo", "-h", "-N", "-o", "%N", check=False).split())


def _own_processes(base: Path) -> list[str]:
    """Processes whose command line names the cluster's directory or node names (slurmd -N, mariadbd)."""
    out = _sh("ps", "-eo", "pid=,args=")
    mine = str(os.getpid())
    return [line.strip() for line in out.splitlines()
            if (str(base) in line or "slurmd -N tessera-n" in line or "slurmstepd" in line)
            and line.split()[0] != mine]


class Cluster:
    """The module's cluster: started here (or reused when a 2-node one is up), stopped once."""

    def __init__(self, base: Path | None) -> None:
        self.base = base
        self.stopped = base is None  # a reused cluster is not ours to stop

    def stop(self) -> subprocess.CompletedProcess[str]:
        assert self.base is not None
        self.stopped = True
        return subprocess.run(["bash", str(CLUSTER), "stop", "--wipe"], env=_cluster_env(self.base),
                              capture_output=True, text=True, timeout=180, check=False)


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    skip_without_root_or_slurm()
    running = _running_nodes()
    if running is not None:
        if running != list(NODES):
            pytest.skip(f"a cluster of nodes {','.join(running)} is up; stop it (slurm/local_cluster.sh stop) to "
                        f"run the multi-node tests")
        yield Cluster(None)
        return
    base = Path(tempfile.mkdtemp(prefix="tessera-slurm-multinode-"))
    base.chmod(0o755)  # munged (user munge) must reach its PID directory
    cluster = Cluster(base)
    try:
        start = subprocess.run(["bash", str(CLUSTER), "start", "--nodes", "2"], env=_cluster_env(base),
                               capture_output=True, text=True, timeout=600, check=False)
        assert start.returncode == 0, f"local_cluster.sh start --nodes 2 failed:\n{start.stdout}\n{start.stderr}"
        yield cluster
    finally:
        if not cluster.stopped:
            cluster.stop()
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="module")
def job_env(tmp_path_factory: pytest.TempPathFactory, data_cache: Path) -> dict[str, str]:
    setup_data(load_config(str(SMOKE), [f"data.cache_dir={data_cache}"]).data)
    tmp = tmp_path_factory.mktemp("multinode_jobs")
    return {**child_env(tmp), "TESSERA_SLURM_JOBS": str(tmp / "jobs.jsonl")}


def _task_pids(job_id: str, node: str) -> list[int]:
    """The job's task processes on one node (their environment names the job and the node)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            environ = (entry / "environ").read_bytes().split(b"\0")
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        argv = cmdline.split(b"\0")
        if (f"SLURM_JOB_ID={job_id}".encode() in environ and f"SLURMD_NODENAME={node}".encode() in environ
                and b"submitit.core._submit" in argv and Path(argv[0].decode()).name != "srun"):
            pids.append(int(entry.name))
    return pids


def _listening(pids: list[int]) -> set[str]:
    """Addresses the processes listen on (TCP)."""
    out = _sh("ss", "-Htlnp")
    found = set()
    for line in out.splitlines():
        if any(f"pid={pid}," in line for pid in pids):
            found.add(line.split()[3].rsplit(":", 1)[0])
    return found


@pytest.fixture(scope="module")
def runs(cluster: Cluster, job_env: dict[str, str], data_cache: Path, zero3_test_config: Path,
         tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Submit the module's jobs together: ZeRO-3 and tp=2 x dp=2 on 2 nodes x 2 tasks, the job that loses a
    node (--nodes 1-2, so it may restart on one), the job to preempt."""
    root = tmp_path_factory.mktemp("multinode_runs")
    common = ["--profile", "local", "--config", str(SMOKE), *RUN, f"data.cache_dir={data_cache}"]
    jobs = {  # the jobs to interrupt last: they are watched as soon as they are queued (24 steps go fast)
        "zero3": ["--nodes", "2", "--ds_config", str(zero3_test_config)],
        "tp": ["--nodes", "2", "parallel.tp=2"],
        "usr2": ["--nodes", "2", "train.save_interval=4"],
        "loss": ["--nodes", "1-2", "--max-requeues", "1", "train.save_interval=4",
                 f"train.dist_timeout_s={DIST_TIMEOUT_S}"],
    }
    outs = {}
    for name, extra in jobs.items():
        outs[name] = root / name
        proc = submit(job_env, *common, *extra, f"train.out_dir={outs[name]}")
        assert proc.returncode == 0, f"{name}: {proc.stderr}"
    return outs


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory, data_cache: Path) -> dict[int, float]:
    """The one-process loss curve of the same recipe, trained here without SLURM."""
    tmp = tmp_path_factory.mktemp("multinode_reference")
    run_job(python_main("--config", str(SMOKE), *RUN, f"data.cache_dir={data_cache}",
                        f"train.out_dir={tmp / 'r'}", "log.progress=false"), tmp)
    return train_losses(tmp / "r")


def _same_curve(got: dict[int, float], want: dict[int, float]) -> None:
    assert sorted(got) == list(range(1, STEPS + 1))
    for step, loss in got.items():
        assert loss == pytest.approx(want[step], rel=1e-5), (step, loss, want[step])


@pytest.fixture(scope="module")
def interventions(runs: dict[str, Path]) -> dict[str, Any]:
    """While the jobs run: USR2 to the job to preempt at step >= 4; at step >= 6 of the other, node 2 drained
    (so it stays out of the requeue) and the job's tasks there killed. Returns what happened when."""
    loss, usr2 = record_of(runs["loss"]), record_of(runs["usr2"])
    seen: dict[str, Any] = {}
    deadline = time.monotonic() + JOB_TIMEOUT_S
    try:
        while not ("killed" in seen and "signalled" in seen):
            assert time.monotonic() < deadline, f"the jobs did not reach their steps in time: {seen}"
            for name, done in (("usr2", "signalled"), ("loss", "killed")):  # one that ended first tests nothing
                assert done in seen or _last_step(runs[name]) < STEPS, f"job {name} ended before it was interrupted"
            if "signalled" not in seen and _last_step(runs["usr2"]) >= 4:
                _sh("scancel", "--signal=USR2", usr2.job_id)
                seen["signalled"] = time.monotonic()
            if "killed" not in seen and _last_step(runs["loss"]) >= 6:
                # gloo serves each task on its own node's address (the node's host name resolves to it)
                seen["listening"] = {node: _listening(_task_pids(loss.job_id, node)) for node in NODES}
                seen["survivors"] = _task_pids(loss.job_id, NODES[0])
                _sh("scontrol", "update", f"nodename={NODES[1]}", "state=drain", "reason=tessera-test-lost-node")
                for pid in _task_pids(loss.job_id, NODES[1]):
                    os.kill(pid, 9)
                seen["killed"] = time.monotonic()
                time.sleep(1.0)  # no step completes without node 2: the last one logged is the last one trained
                seen["killed_at_step"] = _last_step(runs["loss"])
            time.sleep(0.2)
        logs = [Path(loss.folder, f"{loss.job_id}_{task}_log.err") for task in (0, 1)]
        while "requeued_s" not in seen or "ended_s" not in seen:
            waited = time.monotonic() - seen["killed"]
            assert waited < DIST_TIMEOUT_S, f"the job that lost a node did not end everywhere in time: {seen}"
            if "requeued_s" not in seen and any("requeued the job" in log.read_text() for log in logs):
                seen["requeued_s"] = waited
            if "ended_s" not in seen and not any(Path(f"/proc/{pid}").exists() for pid in seen["survivors"]):
                seen["ended_s"] = waited
            time.sleep(0.1)
        wait_until("the requeued job to start on node 1", JOB_TIMEOUT_S, lambda: _restarted(loss))
    finally:
        _sh("scontrol", "update", f"nodename={NODES[1]}", "state=resume", check=False)
    print(f"node 2's tasks killed at step {seen['killed_at_step']}: job requeued after {seen['requeued_s']:.1f} s, "
          f"node 1's tasks ended after {seen['ended_s']:.1f} s")
    return seen


def _restarted(record: JobRecord) -> bool:
    return "2 tasks on 1 node(s)" in Path(record.folder, f"{record.job_id}_0_log.err").read_text()


def test_a_lost_node_ends_the_job_everywhere_and_it_resumes_on_the_node_left(
        runs: dict[str, Path], interventions: dict[str, Any], reference: dict[int, float]) -> None:
    """Node 2's tasks are killed at step >= 6 while node 2 is drained (it stays out of the requeue): the
    survivors requeue the job within the collective timeout, SLURM starts it on node 1 alone (--nodes 1-2),
    and it resumes from the last checkpoint at data-parallel size 2, with the losses of one process."""
    out = runs["loss"]
    record = record_of(out)
    # each node's tasks listen on their node's address only (rank 0's rendezvous store besides on all)
    loopback = {node: {a for a in found if a.startswith("127.")} for node, found in interventions["listening"].items()}
    assert loopback == {node: {address} for node, address in zip(NODES, ADDRESSES, strict=True)}, loopback
    assert interventions["ended_s"] < DIST_TIMEOUT_S
    state = wait_final(record.job_id, JOB_TIMEOUT_S)
    assert state.state == "COMPLETED" and state.restarts == 1, state
    survivors = "".join(Path(record.folder, f"{record.job_id}_{task}_log.err").read_text() for task in (0, 1))
    assert re.search(r"tessera: task [01] on tessera-n1: a task of this job was lost .*requeued the job "
                     r"\(restart 1 of at most 1\)", survivors), survivors[-3000:]
    log = Path(record.folder, f"{record.job_id}_0_log.err").read_text()
    resumed = re.search(rf"resumed from {re.escape(str(out))}/checkpoints/step_(\d+) at step (\d+)", log)
    assert resumed is not None, log[-3000:]
    k = int(resumed.group(2))
    assert k % 4 == 0 and 4 <= k <= interventions["killed_at_step"] < STEPS, (k, interventions)
    history = _sh("sacct", "-j", record.job_id, "-X", "-D", "-n", "-P", "-o", "State,NNodes")
    assert history.split() == ["REQUEUED|2", "COMPLETED|1"], history
    # no sample lost or trained twice: the curve is the one-process curve, across the resize
    _same_curve(train_losses(out), reference)


def test_two_nodes_train_the_one_process_curve_under_zero3_and_tp_x_dp(
        runs: dict[str, Path], reference: dict[int, float]) -> None:
    """ZeRO-3 over 4 ranks on 2 nodes, and tp=2 inside each node x dp=2 across them."""
    address = socket.gethostbyname(NODES[0])
    assert address == ADDRESSES[0]
    for name in ("zero3", "tp"):
        record = record_of(runs[name])
        state = wait_final(record.job_id, JOB_TIMEOUT_S)
        assert state.state == "COMPLETED", (name, state)
        _same_curve(train_losses(runs[name]), reference)
        places = {}
        for task in range(4):
            log = Path(record.folder, f"{record.job_id}_{task}_log.err").read_text()
            line = re.search(r"tessera: task (\d) on node (\S+) \((\d) of 2\): RANK=(\d) LOCAL_RANK=(\d) "
                             r"WORLD_SIZE=(\d) MASTER_ADDR=(\S+) \((\S+)\)", log)
            assert line is not None, log[-2000:]
            places[task] = line.groups()
        assert places == {
            0: ("0", NODES[0], "0", "0", "0", "4", NODES[0], address),
            1: ("1", NODES[0], "0", "1", "1", "4", NODES[0], address),
            2: ("2", NODES[1], "1", "2", "0", "4", NODES[0], address),
            3: ("3", NODES[1], "1", "3", "1", "4", NODES[0], address),
        }, name


def test_usr2_preempts_a_two_node_job_which_resumes_without_losing_a_step(
        runs: dict[str, Path], interventions: dict[str, Any], reference: dict[int, float]) -> None:
    out = runs["usr2"]
    record = record_of(out)
    state = wait_final(record.job_id, JOB_TIMEOUT_S)
    assert state.state == "COMPLETED" and state.restarts == 1, state
    stop = next(r for r in read_rows(out) if r.get("event") == "stopped")
    log = Path(record.folder, f"{record.job_id}_0_log.err").read_text()
    assert f"resumed from {out}/checkpoints/step_{stop['step']:08d} at step {stop['step']} " in log, log[-3000:]
    assert log.count("4 tasks on 2 node(s)") == 2  # both runs on both nodes
    _same_curve(train_losses(out), reference)


def test_stop_leaves_nothing_of_its_own_behind(cluster: Cluster, runs: dict[str, Path]) -> None:
    """After the jobs: stop --wipe ends every daemon of every node and removes its files, hosts lines and
    config links; the namespaces it made (one UTS namespace per slurmd) end with their processes."""
    if cluster.base is None:
        pytest.skip("the cluster was already running before this module: not ours to stop")
    base = cluster.base
    assert _own_processes(base), "the cluster is not running"
    hosts_before = Path("/etc/hosts").read_text()
    assert all(name in hosts_before for name in NODES)
    stop = cluster.stop()
    assert stop.returncode == 0, stop.stderr
    assert _own_processes(base) == []
    assert "tessera-local-slurm" not in Path("/etc/hosts").read_text()
    assert not [p for p in Path("/etc/slurm").glob("*") if p.is_symlink() and str(base) in os.readlink(p)]
    assert sorted(p.name for p in base.iterdir()) == []
    assert str(base) not in Path("/proc/mounts").read_text()
    assert not [line for line in _sh("ip", "-o", "addr", check=False).splitlines() if "127.0.77." in line]
    assert _sh("ss", "-Htln", check=False).count(":683") == 0  # no slurmd port left listening
