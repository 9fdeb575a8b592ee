"""Checks inside the job: preflight against this machine, and stop requests every rank agrees on."""

from __future__ import annotations

import os
import signal
import tempfile
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from slurm.preflight import (
    check_data,
    check_disk,
    check_gpus,
    check_interfaces,
    check_mps,
    check_tmpdir,
    network_interfaces,
    run_preflight,
)
from tests.conftest import SMOKE
from train.config.load import load_config
from train.loop.preempt import Action, RunControl


def test_gpus_requested_but_not_visible() -> None:
    assert check_gpus(0, 0, None) == [] and check_gpus(8, 8, "0,1,2,3,4,5,6,7") == []
    (p,) = check_gpus(2, 0, "0,1")
    assert p.check == "gpus"
    assert "asked for 2 GPUs per node but torch sees 0 (CUDA_VISIBLE_DEVICES=0,1)" in p.message
    (p,) = check_gpus(4, 2, "0,1")
    assert "--gpus-per-node" in p.message
    line = p.line("vm task 3")
    assert line.startswith("tessera: preflight: vm task 3: gpus: ") and "\n" not in line
    (p,) = check_gpus(1, 2, "0,1", per="task")  # --gpus-per-task 1: each task should see its own GPU alone
    assert "asked for 1 GPU per task but torch sees 2" in p.message and "--gpus-per-task" in p.message


def test_named_network_interfaces_exist_on_the_node() -> None:
    present = ["eth0", "ib0", "lo"]
    assert check_interfaces({}, present) == []
    ok = {"GLOO_SOCKET_IFNAME": "eth0,lo", "NCCL_SOCKET_IFNAME": "ib"}  # NCCL: a prefix matches ib0
    assert check_interfaces(ok, present) == []
    assert check_interfaces({"NCCL_SOCKET_IFNAME": "^docker,lo"}, present) == []  # exclusions: nothing to find
    (gloo, nccl) = check_interfaces({"GLOO_SOCKET_IFNAME": "eth0,bond0", "NCCL_SOCKET_IFNAME": "=ib"}, present)
    assert gloo.check == nccl.check == "network"
    assert gloo.message.startswith("GLOO_SOCKET_IFNAME=eth0,bond0: no interface bond0 on this node (it has "
                                   "eth0, ib0, lo); set gloo_socket_ifname (--gloo-socket-ifname)")
    assert nccl.message.startswith("NCCL_SOCKET_IFNAME==ib: no interface of this node matches")
    assert "lo" in network_interfaces()  # this machine's, from /sys/class/net


def test_mps_configured_but_daemon_missing(tmp_path: Path) -> None:
    assert check_mps(False, {}) == []
    (p,) = check_mps(False, {"CUDA_MPS_PIPE_DIRECTORY": str(tmp_path / "mps")})
    assert p.check == "mps" and f"{tmp_path / 'mps'}/control does not exist" in p.message
    (p,) = check_mps(True, {})  # the profile says MPS, the default pipe directory has no daemon
    assert "/tmp/nvidia-mps/control" in p.message
    os.mkfifo(tmp_path / "control")  # what nvidia-cuda-mps-control -d creates
    assert check_mps(True, {"CUDA_MPS_PIPE_DIRECTORY": str(tmp_path)}) == []


def test_tmpdir_missing_unwritable_or_full(tmp_path: Path) -> None:
    assert check_tmpdir({"TMPDIR": str(tmp_path)}) == []
    a_file = tmp_path / "f"
    a_file.write_text("x")
    (p,) = check_tmpdir({"TMPDIR": str(a_file)})
    assert "is not a directory" in p.message
    (p,) = check_tmpdir({"TMPDIR": "/proc"})  # no file can be created there, not even by root
    assert "TMPDIR=/proc is not writable" in p.message
    (p,) = check_tmpdir({"TMPDIR": str(tmp_path)}, min_free=2**62)
    assert "MiB free, less than" in p.message


def test_disk_too_small_for_checkpoints(tmp_path: Path) -> None:
    assert check_disk(tmp_path / "run" / "deeper", 2**20) == []
    (p,) = check_disk(tmp_path / "run", 2**62)
    assert p.check == "disk" and f"train.out_dir={tmp_path / 'run'}" in p.message
    assert "checkpoints need" in p.message


def test_data_not_on_the_node(tmp_path: Path) -> None:
    cfg = load_config(str(SMOKE), [f"data.cache_dir={tmp_path / 'empty'}"])
    (p,) = check_data(cfg)
    assert p.check == "data" and "the Shakespeare corpus is not there" in p.message
    assert f"python tools/prepare_data.py --shakespeare {tmp_path / 'empty'} --vocab-size 512" in p.message
    cfg = load_config(str(SMOKE), ["data.corpus=files", f"data.files=[{tmp_path / 'a.txt'}]",
                                   f"data.tokenizer={tmp_path / 'tok'}"])
    problems = check_data(cfg)
    assert [p.check for p in problems] == ["data", "data"]
    assert "data.tokenizer=" in problems[0].message and "a.txt not found on this node" in problems[1].message
    (tmp_path / "a.txt").write_text("text")
    (tmp_path / "tok").mkdir()
    assert check_data(cfg) == []
    glob = f"data.files=[{tmp_path / 'texts' / '**' / '*.txt'}]"  # a glob: found when it matches a file
    cfg = load_config(str(SMOKE), ["data.corpus=files", glob, f"data.tokenizer={tmp_path / 'tok'}"])
    (p,) = check_data(cfg)
    assert "*.txt not found on this node (a glob: it matches nothing)" in p.message
    (tmp_path / "texts" / "part").mkdir(parents=True)
    (tmp_path / "texts" / "part" / "b.txt").write_text("text")
    assert check_data(cfg) == []
    cfg = load_config(str(SMOKE), [f"data.prepared_dir={tmp_path / 'prep'}"])
    (p,) = check_data(cfg)
    assert "data.prepared_dir=" in p.message and "no header.json" in p.message


def test_run_preflight_reports_every_problem_of_this_machine(tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TMPDIR", str(tmp_path / "nowhere"))
    monkeypatch.setenv("CUDA_MPS_PIPE_DIRECTORY", str(tmp_path / "mps"))
    cfg = load_config(str(SMOKE), [f"data.cache_dir={tmp_path}", f"train.out_dir={tmp_path / 'run'}"])
    problems = run_preflight(cfg, gpus_per_node=0 if torch.cuda.is_available() else 2, mps=False,
                             checkpoint_bytes=2**62)
    checks = [p.check for p in problems]
    expected = ["mps", "tmpdir", "disk", "data"]
    assert checks == (expected if torch.cuda.is_available() else ["gpus", *expected])


# ---------------------------------------------------------------------- stop requests (train/loop/preempt.py)


def test_signal_becomes_a_stop_and_the_old_handler_is_kept() -> None:
    seen: list[int] = []
    old = signal.signal(signal.SIGUSR2, lambda s, f: seen.append(s))
    try:
        control = RunControl()
        control.install(signal.SIGUSR2)
        assert control.poll(torch.device("cpu")) == Action.CONTINUE  # no process group: this rank alone
        os.kill(os.getpid(), signal.SIGUSR2)
        assert control.stop_requested and control.stop_reason == "signal SIGUSR2" and not seen
        assert control.poll(torch.device("cpu")) == Action.STOP and control.stopped
        handler = control.previous(signal.SIGUSR2)
        control.uninstall()
        assert callable(handler)
        os.kill(os.getpid(), signal.SIGUSR2)
        assert seen == [signal.SIGUSR2]  # the handler from before install is back
    finally:
        signal.signal(signal.SIGUSR2, old)


def test_wall_time_checkpoints() -> None:
    now = [0.0]
    control = RunControl(checkpoint_every_s=60, clock=lambda: now[0])
    cpu = torch.device("cpu")
    assert control.poll(cpu) == Action.CONTINUE
    now[0] = 61.0
    assert control.poll(cpu) == Action.CHECKPOINT and not control.stopped
    now[0] = 100.0
    assert control.poll(cpu) == Action.CONTINUE  # the period restarted at 61 s
    control.request_stop("test")
    now[0] = 500.0
    assert control.poll(cpu) == Action.STOP  # a stop outranks a due checkpoint


def _rank_polls(rank: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    control = RunControl()
    control.install(signal.SIGUSR2)
    stopped_at = -1
    for step in range(10):
        if rank == 1 and step == 3:
            os.kill(os.getpid(), signal.SIGUSR2)  # only rank 1 is signalled
        if control.poll(torch.device("cpu")) == Action.STOP:
            stopped_at = step
            break
    Path(out_dir, f"rank{rank}").write_text(f"{stopped_at} {control.stop_reason}")
    dist.destroy_process_group()


def test_ranks_agree_on_a_stop_only_one_of_them_received(tmp_path: Path) -> None:
    init_file = tempfile.mktemp(dir=tmp_path)
    mp.start_processes(_rank_polls, args=(init_file, str(tmp_path)), nprocs=2, start_method="fork", join=True)
    assert (tmp_path / "rank0").read_text() == "3 another rank was asked to stop"
    assert (tmp_path / "rank1").read_text() == "3 signal SIGUSR2"
