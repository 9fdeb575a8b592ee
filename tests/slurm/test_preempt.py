"""Stop and checkpoint requests (train/preempt.py): a signal on one rank, the same action on every rank."""

from __future__ import annotations

import os
import signal
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from train.preempt import Action, RunControl


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
