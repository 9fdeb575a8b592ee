"""Launch environments: the launcher's variables are checked before anything starts, the rendezvous says who
it waits for and gives up in time, and the heartbeat tells which peer is gone."""

from __future__ import annotations

import datetime
import io
import subprocess
import threading
from pathlib import Path

import pytest
from torch.distributed import TCPStore

import train.distributed as td
from tests.conftest import REPO, SMOKE, child_env, python_main
from train.distributed import (
    DistEnv,
    Heartbeat,
    RendezvousError,
    free_port,
    read_env,
    rendezvous,
    rendezvous_timeout_s,
)
from train.main import main

LAUNCH = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "LOCAL_SIZE", "MASTER_ADDR", "MASTER_PORT",
          "TESSERA_RENDEZVOUS_TIMEOUT_S", "TORCHELASTIC_USE_AGENT_STORE", "TORCHELASTIC_RESTART_COUNT")
TWO = {"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29511"}


@pytest.fixture
def launch(monkeypatch: pytest.MonkeyPatch):
    """Set exactly these launcher variables (the rest unset) for one test."""
    for key in LAUNCH:
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")

    def set_env(**values: str) -> None:
        for key, value in values.items():
            monkeypatch.setenv(key, value)

    return set_env


def _drop(env: dict[str, str], *keys: str) -> dict[str, str]:
    return {k: v for k, v in env.items() if k not in keys}


# Each: (variables, extra arguments, a fragment of the one error line: the variable, its value, what to set).
BAD = [
    ({"RANK": "1"}, [], "RANK=1 is set but WORLD_SIZE is not; set WORLD_SIZE to the number of processes"),
    ({"WORLD_SIZE": "4"}, [], "WORLD_SIZE=4 is set but RANK is not; set RANK to this process's rank, 0 to"),
    ({**TWO, "RANK": "abc"}, [], "RANK='abc': not an integer; set RANK to this process's rank"),
    ({**TWO, "RANK": "2"}, [], "RANK=2 with WORLD_SIZE=2: a rank must be 0 to 1; set RANK"),
    ({**TWO, "RANK": "-1"}, [], "RANK=-1: must be at least 0; set RANK"),
    ({**TWO, "WORLD_SIZE": "0"}, [], "WORLD_SIZE=0: must be at least 1; set WORLD_SIZE"),
    ({**TWO, "WORLD_SIZE": "two"}, [], "WORLD_SIZE='two': not an integer; set WORLD_SIZE"),
    (_drop(TWO, "MASTER_ADDR"), [], "MASTER_ADDR is not set (RANK=0, WORLD_SIZE=2); set MASTER_ADDR to the"),
    ({**TWO, "MASTER_ADDR": ""}, [], "MASTER_ADDR='' is empty (RANK=0, WORLD_SIZE=2); set MASTER_ADDR"),
    ({**TWO, "MASTER_ADDR": "node 1"}, [], "MASTER_ADDR='node 1': a host name has no spaces"),
    (_drop(TWO, "LOCAL_RANK"), [], "LOCAL_RANK is not set (RANK=0, WORLD_SIZE=2); set LOCAL_RANK to this"),
    (_drop(TWO, "MASTER_PORT"), [], "MASTER_PORT is not set (RANK=0, WORLD_SIZE=2); set MASTER_PORT to a"),
    ({**TWO, "MASTER_PORT": "http"}, [], "MASTER_PORT='http': not an integer; set MASTER_PORT to a free TCP"),
    ({**TWO, "MASTER_PORT": "70000"}, [], "MASTER_PORT=70000: not a TCP port; set MASTER_PORT to a free TCP"),
    ({**TWO, "MASTER_PORT": "0"}, [], "MASTER_PORT=0: must be at least 1; set MASTER_PORT"),
    ({**TWO, "LOCAL_RANK": "-2"}, [], "LOCAL_RANK=-2: must be at least 0; set LOCAL_RANK"),
    ({**TWO, "LOCAL_RANK": "2", "LOCAL_WORLD_SIZE": "2"}, [],
     "LOCAL_RANK=2 with LOCAL_WORLD_SIZE=2: a local rank must be 0 to 1; set LOCAL_RANK"),
    ({**TWO, "LOCAL_RANK": "2"}, [], "LOCAL_RANK=2 with WORLD_SIZE=2: a local rank must be 0 to 1"),
    ({**TWO, "LOCAL_WORLD_SIZE": "1"}, ["--local_rank=1"], "LOCAL_RANK=1 with LOCAL_WORLD_SIZE=1"),
    ({**TWO, "LOCAL_WORLD_SIZE": "4"}, [], "LOCAL_WORLD_SIZE=4 with WORLD_SIZE=2: a node cannot hold more"),
    ({**TWO, "LOCAL_SIZE": "x"}, [], "LOCAL_SIZE='x': not an integer; set LOCAL_SIZE (or LOCAL_WORLD_SIZE)"),
    ({**TWO, "TESSERA_RENDEZVOUS_TIMEOUT_S": "0"}, [],
     "TESSERA_RENDEZVOUS_TIMEOUT_S=0: must be at least 1; set TESSERA_RENDEZVOUS_TIMEOUT_S to the seconds"),
]


@pytest.mark.parametrize("variables, extra, fragment", BAD, ids=[b[2][:44] for b in BAD])
def test_a_bad_launch_environment_is_one_line_before_anything_starts(
        launch, tmp_path: Path, capsys: pytest.CaptureFixture[str], variables: dict[str, str],
        extra: list[str], fragment: str) -> None:
    launch(**variables)
    out = tmp_path / "run"
    code = main(["--config", str(SMOKE), *extra, f"train.out_dir={out}", f"data.cache_dir={tmp_path / 'c'}"])
    captured = capsys.readouterr()
    assert code == 2, captured.err
    assert captured.err.count("\n") == 1 and captured.err.startswith("tessera: error: "), captured.err
    assert fragment in captured.err, captured.err
    assert not captured.out and not out.exists() and not (tmp_path / "c").exists()


def test_the_real_entry_point_says_it_in_one_line(tmp_path: Path) -> None:
    env = {**child_env(tmp_path), **TWO, "RANK": "abc"}
    proc = subprocess.run(python_main("--config", str(SMOKE), f"train.out_dir={tmp_path / 'run'}"), cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 2 and not proc.stdout, proc.stderr
    assert proc.stderr.splitlines() == [
        "tessera: error: RANK='abc': not an integer; set RANK to this process's rank, 0 to WORLD_SIZE-1 "
        "(torchrun and the deepspeed launcher set it)."]
    assert not (tmp_path / "run").exists()


def test_launchers_environments_are_read(launch) -> None:
    launch()  # no launcher: a world of one that rendezvouses with itself
    assert read_env() == DistEnv(rank=0, local_rank=0, world_size=1, local_world_size=1)
    assert 0 < int(td.os.environ["MASTER_PORT"]) < 2**16 and td.os.environ["MASTER_ADDR"] == "127.0.0.1"
    launch(RANK="5", WORLD_SIZE="8", LOCAL_RANK="1", LOCAL_WORLD_SIZE="4", MASTER_ADDR="n0",
           MASTER_PORT="29500")
    assert read_env() == DistEnv(rank=5, local_rank=1, world_size=8, local_world_size=4)  # torchrun
    launch(LOCAL_RANK="0", LOCAL_SIZE="2")
    td.os.environ.pop("LOCAL_WORLD_SIZE")
    assert read_env(local_rank_arg=1) == DistEnv(rank=5, local_rank=1, world_size=8, local_world_size=2)


def test_the_rendezvous_timeout_is_shorter_than_the_collectives(launch) -> None:
    launch()
    assert rendezvous_timeout_s(1800) == 600 and rendezvous_timeout_s(60) == 60
    launch(TESSERA_RENDEZVOUS_TIMEOUT_S="45")
    assert rendezvous_timeout_s(1800) == 45


def _on(rank: int, world: int, timeout_s: float, out: io.StringIO,
        stores: list | None = None) -> Exception | None:
    """One rank's rendezvous; the store is kept in ``stores`` (rank 0's hosts the others')."""
    try:
        store = rendezvous(DistEnv(rank, rank, world, world), timeout_s, out)
    except RendezvousError as e:
        return e
    if stores is not None:
        stores.append(store)
    return None


def test_rank_zero_says_who_it_waits_for_and_names_who_never_came(launch,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    port = free_port()
    launch(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    monkeypatch.setattr(td, "RENDEZVOUS_NOTE_S", (0.3, 60.0))
    out = io.StringIO()
    error = _on(0, 4, 1.5, out)
    assert out.getvalue() == (f"tessera: waiting for 3 of 4 ranks at 127.0.0.1:{port} (missing: 1, 2, 3), up "
                              f"to 1 s more (TESSERA_RENDEZVOUS_TIMEOUT_S)\n")
    assert str(error) == (f"rank(s) 1, 2, 3 of 4 did not reach the rendezvous at 127.0.0.1:{port} within "
                          f"1.5 s (TESSERA_RENDEZVOUS_TIMEOUT_S); start them with the same MASTER_ADDR, "
                          f"MASTER_PORT and WORLD_SIZE, or read their logs for why they stopped.")


def test_a_rank_without_rank_zero_gives_up_in_time(launch) -> None:
    port = free_port()
    launch(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    error = _on(1, 2, 1.0, io.StringIO())
    assert str(error).startswith(f"rank 1: nothing answered at the rendezvous 127.0.0.1:{port} within 1 s: "
                                 f"rank 0 has not started")


def _together(ranks: list[int], world: int, timeout_s: float, stores: list) -> list[Exception | None]:
    results: list[Exception | None] = [None] * len(ranks)

    def one(i: int) -> None:
        results[i] = _on(ranks[i], world, timeout_s, io.StringIO(), stores)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(ranks))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    return results


def test_ranks_meet_and_two_processes_with_one_rank_are_refused(launch) -> None:
    port = free_port()
    launch(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    stores: list = []  # kept until every rank is done: rank 0's hosts the rendezvous
    assert _together([0, 1, 2], 3, 20, stores) == [None, None, None] and len(stores) == 3
    launch(TORCHELASTIC_RESTART_COUNT="1")  # a new attempt on the same store: keys of its own
    errors = _together([0, 1, 1], 3, 20, stores)
    assert all("rank(s) 2 did not: two processes were started with the same RANK" in str(e) for e in errors)
    assert str(errors[1]).startswith("rank 1: 3 processes reached the rendezvous")


def test_the_heartbeat_names_the_rank_that_stopped(launch) -> None:
    port = free_port()
    launch(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    server = TCPStore("127.0.0.1", port, None, True, datetime.timedelta(seconds=10), wait_for_workers=False)
    beats = [Heartbeat(rank, 4, period_s=0.1) for rank in range(4)]
    for beat in beats[:3]:  # rank 3 beat once and died
        beat.start()
    assert beats[2].lost_ranks() == [3]  # rank 2 leaves on a failed collective: it says so, then stops
    assert beats[0].lost_ranks() == [3]  # rank 2 is not lost: it left
    beats[1].stop()
    del server  # the store's host is gone: which rank is lost cannot be read there
    assert beats[1].lost_ranks() is None and "127.0.0.1" in str(beats[1].store_lost)
    assert not any(b.is_alive() for b in beats)
