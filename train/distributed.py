"""Process-group start-up for every launch form: ``python``, ``torchrun``, ``deepspeed``, SLURM (slurm/).

``python train/main.py`` runs as a world of one: the rendezvous variables are filled in before the process
group starts, so the same code path serves one process and many.

Launch variables (``read_env``): a launcher sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``,
``MASTER_PORT`` (and ``LOCAL_WORLD_SIZE``, or the deepspeed launcher's ``LOCAL_SIZE``). They are checked
before anything starts: integers in range (``0 <= RANK < WORLD_SIZE``, ``0 <= LOCAL_RANK < LOCAL_WORLD_SIZE
<= WORLD_SIZE``), ``RANK`` and ``WORLD_SIZE`` together, ``MASTER_ADDR``, ``MASTER_PORT`` (1-65535) and
``LOCAL_RANK`` present when the world has more than one process (without them DeepSpeed falls back to MPI
discovery). A bad one raises ``LaunchEnvError``, whose message names the variable, its value and what to
set.

Rendezvous (``init_distributed``): rank 0 hosts a TCP store at ``MASTER_ADDR:MASTER_PORT`` (under torchrun,
its agent does), every rank checks in there, and rank 0 says who it waits for: ``waiting for 3 of 4 ranks at
host:port (missing: 1, 2, 3), up to 600 s``. The wait lasts ``TESSERA_RENDEZVOUS_TIMEOUT_S`` seconds, by
default ``min(train.dist_timeout_s, 600)``: a rank that was never started should end the job in minutes, while
the collectives of a running job keep the longer ``train.dist_timeout_s``. Ranks that have not come by then
are named in a ``RendezvousError`` on every rank that did. Then the process group starts on that store (gloo
on CPU, nccl on GPU) and DeepSpeed adopts it.

Lost peers: each rank beats a counter in the store every ``HEARTBEAT_S`` seconds. When a collective fails
because a peer is gone (gloo: connection reset / closed by peer, a timeout; nccl: a DistBackendError),
``describe_peer_loss`` watches the counters for a few beats and names the ranks whose counter stopped and who
did not say they are leaving; when the store itself is gone, the rank that hosted it (rank 0) is the lost one.
"""

from __future__ import annotations

import datetime
import importlib.metadata
import os
import re
import socket
import sys
import threading
import time
from dataclasses import dataclass
from typing import TextIO

import torch

RENDEZVOUS_TIMEOUT_VARIABLE = "TESSERA_RENDEZVOUS_TIMEOUT_S"
MAX_RENDEZVOUS_TIMEOUT_S = 600  # the default rendezvous timeout is min(train.dist_timeout_s, this)
RENDEZVOUS_NOTE_S = (3.0, 60.0)  # rank 0 says who it waits for after the first, then every second period
HEARTBEAT_S = 2.0  # a rank's counter in the store advances this often
# Messages of torch / gloo / nccl errors that mean a peer rank went away or stopped answering.
PEER_LOSS = re.compile(r"gloo|nccl|connection (reset|closed) by peer|broken pipe|timed out|socket timeout",
                       re.IGNORECASE)


class LaunchEnvError(ValueError):
    """A launcher variable that cannot describe this process: the message names it, its value and the fix."""


class RendezvousError(RuntimeError):
    """The ranks did not all meet at the rendezvous (or it could not be reached): one line, every rank."""


@dataclass(frozen=True)
class DistEnv:
    """Where this process sits in the job."""

    rank: int  # global rank
    local_rank: int  # rank on this node (selects the GPU)
    world_size: int  # all processes of the job
    local_world_size: int  # processes on this node

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def free_port() -> int:
    """A TCP port that was free a moment ago (for single-process rendezvous and tests)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# ----------------------------------------------------------------------------- launch variables

FIX = {
    "RANK": "set RANK to this process's rank, 0 to WORLD_SIZE-1 (torchrun and the deepspeed launcher set it)",
    "WORLD_SIZE": "set WORLD_SIZE to the number of processes of the job, the same on every rank",
    "LOCAL_RANK": "set LOCAL_RANK to this process's rank on its node, 0 to LOCAL_WORLD_SIZE-1",
    "LOCAL_WORLD_SIZE": "set LOCAL_WORLD_SIZE to the number of processes on this node",
    "LOCAL_SIZE": "set LOCAL_SIZE (or LOCAL_WORLD_SIZE) to the number of processes on this node",
    "MASTER_ADDR": "set MASTER_ADDR to the host name or address of rank 0's node, the same on every rank",
    "MASTER_PORT": "set MASTER_PORT to a free TCP port (1-65535) on rank 0's node, the same on every rank",
    RENDEZVOUS_TIMEOUT_VARIABLE: f"set {RENDEZVOUS_TIMEOUT_VARIABLE} to the seconds rank 0 waits for the "
                                 f"other ranks (a positive integer), or unset it",
}


def _int(name: str, minimum: int, environ: dict[str, str] | os._Environ[str]) -> int | None:
    """The variable as an integer >= minimum (None when unset)."""
    raw = environ.get(name)
    if raw is None:
        return None
    try:
        value = int(raw.strip())
    except ValueError:
        raise LaunchEnvError(f"{name}={raw!r}: not an integer; {FIX[name]}.") from None
    if value < minimum:
        raise LaunchEnvError(f"{name}={raw}: must be at least {minimum}; {FIX[name]}.")
    return value


def read_env(local_rank_arg: int | None = None) -> DistEnv:
    """Read and check the launcher's variables, filling a world of one when there is no launcher.

    Raises LaunchEnvError (nothing is started, nothing written) for a variable that cannot be right."""
    environ = os.environ
    if "RANK" not in environ and environ.get("WORLD_SIZE", "1").strip() == "1":  # no launcher: a world of one
        environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1")
    if local_rank_arg is not None and local_rank_arg >= 0:  # the deepspeed launcher passes --local_rank
        environ["LOCAL_RANK"] = str(local_rank_arg)
    rank, world = _int("RANK", 0, environ), _int("WORLD_SIZE", 1, environ)
    if rank is None:
        raise LaunchEnvError(f"WORLD_SIZE={environ['WORLD_SIZE']} is set but RANK is not; {FIX['RANK']}, or "
                             f"unset WORLD_SIZE to run one process.")
    if world is None:
        raise LaunchEnvError(f"RANK={rank} is set but WORLD_SIZE is not; {FIX['WORLD_SIZE']}, or unset RANK "
                             f"to run one process.")
    if rank >= world:
        raise LaunchEnvError(f"RANK={rank} with WORLD_SIZE={world}: a rank must be 0 to {world - 1}; "
                             f"{FIX['RANK']}.")
    if world == 1:  # one process: rendezvous with itself
        environ.setdefault("LOCAL_RANK", "0")
        environ.setdefault("MASTER_ADDR", "127.0.0.1")
        environ.setdefault("MASTER_PORT", str(free_port()))
    for name in ("MASTER_ADDR", "MASTER_PORT", "LOCAL_RANK"):
        if not environ.get(name, "").strip():
            shown = f"{name}={environ[name]!r} is empty" if name in environ else f"{name} is not set"
            raise LaunchEnvError(f"{shown} (RANK={rank}, WORLD_SIZE={world}); {FIX[name]}. Launchers "
                                 f"(torchrun, deepspeed, slurm/submit.py) set it.")
    addr = environ["MASTER_ADDR"]
    if any(c.isspace() for c in addr):
        raise LaunchEnvError(f"MASTER_ADDR={addr!r}: a host name has no spaces; {FIX['MASTER_ADDR']}.")
    port = _int("MASTER_PORT", 1, environ)
    if port is None or port > 65535:
        raise LaunchEnvError(f"MASTER_PORT={environ['MASTER_PORT']}: not a TCP port; {FIX['MASTER_PORT']}.")
    local_rank = _int("LOCAL_RANK", 0, environ)
    # torchrun sets LOCAL_WORLD_SIZE, the deepspeed launcher LOCAL_SIZE; a single node is assumed otherwise.
    local_name = "LOCAL_WORLD_SIZE" if "LOCAL_WORLD_SIZE" in environ else "LOCAL_SIZE"
    local_world = _int(local_name, 1, environ)
    if local_world is None:
        local_world = world
    elif local_world > world:
        raise LaunchEnvError(f"{local_name}={local_world} with WORLD_SIZE={world}: a node cannot hold more "
                             f"processes than the job; {FIX[local_name]}.")
    assert local_rank is not None
    if local_rank >= local_world:
        shown = f"{local_name}={local_world}" if local_name in environ else f"WORLD_SIZE={world}"
        raise LaunchEnvError(f"LOCAL_RANK={local_rank} with {shown}: a local rank must be 0 to "
                             f"{local_world - 1}; {FIX['LOCAL_RANK']}.")
    _int(RENDEZVOUS_TIMEOUT_VARIABLE, 1, environ)
    return DistEnv(rank=rank, local_rank=local_rank, world_size=world, local_world_size=local_world)


def rendezvous_timeout_s(dist_timeout_s: int) -> int:
    """Seconds the ranks wait for each other at start-up: ``TESSERA_RENDEZVOUS_TIMEOUT_S``, else
    ``min(dist_timeout_s, 600)``."""
    chosen = _int(RENDEZVOUS_TIMEOUT_VARIABLE, 1, os.environ)
    return chosen if chosen is not None else min(dist_timeout_s, MAX_RENDEZVOUS_TIMEOUT_S)


def device_for(env: DistEnv) -> torch.device:
    """This rank's device: its GPU when CUDA is present, else the CPU."""
    if torch.cuda.is_available():
        torch.cuda.set_device(env.local_rank % torch.cuda.device_count())
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


# ----------------------------------------------------------------------------- rendezvous


def _key_prefix() -> str:
    # torchrun's agent keeps one store across restarts of the workers: each attempt has its own keys
    return f"tessera/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}/"


def _ranks(ranks: list[int]) -> str:
    shown = ", ".join(map(str, ranks[:16]))
    return shown + (f" and {len(ranks) - 16} more" if len(ranks) > 16 else "")


def rendezvous(env: DistEnv, timeout_s: float, out: TextIO | None = None) -> torch.distributed.Store:
    """Meet every rank at ``MASTER_ADDR:MASTER_PORT`` within ``timeout_s``; return the store the process group
    starts on. Rank 0 reports on ``out`` (stderr) who it waits for. Raises RendezvousError."""
    from torch.distributed import DistError, TCPStore

    out = out or sys.stderr
    addr, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
    where, me, world, prefix = f"{addr}:{port}", env.rank, env.world_size, _key_prefix()
    agent = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"  # torchrun's agent hosts the store
    hosts = env.rank == 0 and not agent
    unreachable = RendezvousError(
        f"rank {me}: nothing answered at the rendezvous {where} within {timeout_s:g} s: rank 0 has not "
        f"started, or MASTER_ADDR / MASTER_PORT differ between the ranks; start rank 0 with the same values "
        f"({RENDEZVOUS_TIMEOUT_VARIABLE} sets the wait).")
    if not hosts and not _await_listener(addr, port, timeout_s, f"rank {me}", where, out):
        raise unreachable
    try:
        store = TCPStore(addr, port, world, hosts, datetime.timedelta(seconds=timeout_s),
                         wait_for_workers=False, multi_tenant=True)
    except DistError as e:
        if "EADDRINUSE" in str(e) or "address already in use" in str(e).lower():
            raise RendezvousError(f"rank 0: MASTER_PORT={port} is already in use on {socket.gethostname()}; "
                                  f"choose a free port (the same on every rank).") from None
        if hosts:
            raise RendezvousError(f"rank 0: cannot reach its own rendezvous at {where} within {timeout_s:g} "
                                  f"s: MASTER_ADDR={addr} must name this host ({socket.gethostname()}).") \
                from None
        raise unreachable from None
    if world == 1:
        return store
    try:
        store.set(f"{prefix}host/{me}", socket.gethostname())
        store.add(f"{prefix}arrived", 1)
        if me == 0:
            outcome = _await_ranks(store, prefix, world, timeout_s, where, out)
            store.set(f"{prefix}outcome", outcome or "ok")
        else:
            store.wait([f"{prefix}outcome"], datetime.timedelta(seconds=timeout_s + 60))
            outcome = store.get(f"{prefix}outcome").decode()
            outcome = None if outcome == "ok" else f"rank {me}: {outcome}"
    except DistError as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise RendezvousError(f"rank {me}: the rendezvous at {where} did not complete ({first}); see rank "
                              f"0's log.") from None
    if outcome is not None:
        raise RendezvousError(outcome)
    return store


def _await_listener(addr: str, port: int, timeout_s: float, who: str, where: str, out: TextIO) -> bool:
    """Wait until something listens at ``addr:port``, probing with plain connections (a store client that
    cannot connect logs each retry with a C++ stack); False after ``timeout_s``."""
    start = time.monotonic()
    said = False
    while True:
        try:
            with socket.create_connection((addr, port), timeout=min(10.0, timeout_s)):
                return True
        except OSError:
            pass
        waited = time.monotonic() - start
        if waited >= timeout_s:
            return False
        if waited >= RENDEZVOUS_NOTE_S[0] and not said:
            print(f"tessera: {who} waiting for rank 0's rendezvous at {where}, up to "
                  f"{timeout_s - waited:.0f} s more ({RENDEZVOUS_TIMEOUT_VARIABLE})", file=out, flush=True)
            said = True
        time.sleep(0.5)


def _await_ranks(store: torch.distributed.Store, prefix: str, world: int, timeout_s: float, where: str,
                 out: TextIO) -> str | None:
    """Rank 0: wait until every rank checked in; None, or what went wrong (one line)."""
    start = time.monotonic()
    note_at, said = start + RENDEZVOUS_NOTE_S[0], False

    def missing() -> list[int]:
        return [r for r in range(world) if not store.check([f"{prefix}host/{r}"])]

    while True:
        arrived, now = store.add(f"{prefix}arrived", 0), time.monotonic()
        if arrived >= world:
            absent = missing()
            if absent:  # as many check-ins as ranks, yet some rank is absent: two processes share a RANK
                return (f"{arrived} processes reached the rendezvous at {where} but rank(s) {_ranks(absent)} "
                        f"did not: two processes were started with the same RANK; give each its own.")
            if said:
                print(f"tessera: all {world} ranks arrived after {now - start:.0f} s", file=out, flush=True)
            return None
        if now - start >= timeout_s:
            absent = missing()
            return (f"rank(s) {_ranks(absent)} of {world} did not reach the rendezvous at {where} within "
                    f"{timeout_s:g} s ({RENDEZVOUS_TIMEOUT_VARIABLE}); start them with the same MASTER_ADDR, "
                    f"MASTER_PORT and WORLD_SIZE, or read their logs for why they stopped.")
        if now >= note_at:
            absent = missing()
            print(f"tessera: waiting for {len(absent)} of {world} ranks at {where} (missing: "
                  f"{_ranks(absent)}), up to {timeout_s - (now - start):.0f} s more "
                  f"({RENDEZVOUS_TIMEOUT_VARIABLE})", file=out, flush=True)
            note_at, said = now + RENDEZVOUS_NOTE_S[1], True
        time.sleep(0.2)


def init_distributed(env: DistEnv, timeout_s: int = 1800) -> None:
    """Meet the other ranks (within the rendezvous timeout), then start the default process group (nccl on
    GPU, gloo on CPU; collectives time out after ``timeout_s``) and hand it to DeepSpeed."""
    use_extensions_dir()
    import deepspeed
    import torch.distributed as dist

    if not torch.cuda.is_available():
        # Share the cores between the ranks of this node instead of oversubscribing them.
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // env.local_world_size))
    store = rendezvous(env, rendezvous_timeout_s(timeout_s))
    store.set_timeout(datetime.timedelta(seconds=timeout_s))
    cuda = torch.cuda.is_available()
    extra = {}
    # as DeepSpeed does: bind the process group to this rank's GPU (torch 2.6.x hangs with it, DeepSpeed says)
    if cuda and env.world_size > 1 and not "2.6.0" < torch.__version__ < "2.7.1":  # a TorchVersion compares
        extra["device_id"] = torch.device("cuda", env.local_rank % torch.cuda.device_count())
    dist.init_process_group("nccl" if cuda else "gloo", store=store, rank=env.rank, world_size=env.world_size,
                            timeout=datetime.timedelta(seconds=timeout_s), **extra)
    deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo",
                               timeout=datetime.timedelta(seconds=timeout_s), verbose=False)
    if not cuda:
        if env.world_size > 1:
            dist.barrier()  # every rank has mapped every other rank's buffer: the names can go
        unlink_shm_buffer(env.rank)
    if env.world_size > 1:
        Heartbeat(env.rank, env.world_size).start()


def use_extensions_dir() -> str:
    """The directory torch builds DeepSpeed's ops in (``TORCH_EXTENSIONS_DIR``; on CPU the shm_comm op, compiled
    at an environment's first start). torch's default is keyed by Python and CUDA only, so environments with
    another torch or DeepSpeed overwrite each other's build and each compiles again; unless the user set it,
    each Python / torch / DeepSpeed combination gets its own subdirectory and compiles once."""
    if not os.environ.get("TORCH_EXTENSIONS_DIR"):
        from torch.utils.cpp_extension import get_default_build_root

        name = (f"py{sys.version_info.major}{sys.version_info.minor}-torch{torch.__version__}-"
                f"deepspeed{importlib.metadata.version('deepspeed')}")
        os.environ["TORCH_EXTENSIONS_DIR"] = os.path.join(get_default_build_root(), "tessera", name)
    return os.environ["TORCH_EXTENSIONS_DIR"]


def shm_buffer_path(rank: int) -> str:
    """The shared memory (~67 MB) DeepSpeed's shm_comm op creates for ``rank`` when all ranks share a node
    (``deepspeed/ops/csrc/cpu/comm/shm.cpp``: ``deepspeed_allreduce_buffer_{uid}_{addr}_{port}_{rank}``)."""
    addr, port = os.environ.get("MASTER_ADDR", ""), os.environ.get("MASTER_PORT", "")
    return f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_{addr}_{port}_{rank}"


def unlink_shm_buffer(rank: int) -> None:
    """Unlink this rank's shm_comm buffer once every rank has opened it (after a barrier): DeepSpeed never does,
    so each multi-rank CPU run would leave its buffers in RAM-backed /dev/shm. The mappings stay valid."""
    try:
        os.unlink(shm_buffer_path(rank))
    except FileNotFoundError:  # not a single-node CPU world: DeepSpeed made none
        pass


def shutdown_distributed() -> None:
    """Leave together and tear the process group down before the interpreter exits.

    Without this, a rank that exits first closes its gloo connections while another rank's background
    threads still use them, which can abort that rank after a finished run ("terminate called without an
    active exception"). Called only where every rank arrives (after a finished run or an error raised on all
    of them). The heartbeat stops first, so that no rank beats into a store that is going away.
    """
    import torch.distributed as dist

    beat = Heartbeat.running()
    if beat is not None:
        beat.stop()
    if dist.is_available() and dist.is_initialized():
        try:
            dist.barrier()
        except RuntimeError:  # a peer is gone already: nothing left to leave together with
            return
        dist.destroy_process_group()


# ----------------------------------------------------------------------------- lost peers


class Heartbeat(threading.Thread):
    """This rank's counter in the rendezvous store, advanced every ``period_s`` seconds on its own connection.

    ``lost_ranks`` tells, after a collective failed, which other ranks stopped beating."""

    def __init__(self, rank: int, world: int, period_s: float = HEARTBEAT_S) -> None:
        from torch.distributed import TCPStore

        super().__init__(name="tessera-heartbeat", daemon=True)
        self.rank, self.world, self.period_s, self.prefix = rank, world, period_s, _key_prefix()
        self.addr, self.port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
        self.where = f"{self.addr}:{self.port}"
        self.store = TCPStore(self.addr, self.port, None, False,
                              datetime.timedelta(seconds=max(10.0, 5 * period_s)))
        self.store.add(self._beat(rank), 1)  # before the first collective: every rank's counter exists
        self.store_lost: str | None = None  # why the store stopped answering (it lived in the lost rank 0)
        self._halt = threading.Event()
        self._sentinel: socket.socket | None = None  # an idle connection that closes when the store does

    def store_answers(self) -> bool:
        """Whether the store still listens, asked without the store's client (whose failures torch logs with a
        C++ stack): the idle sentinel connection is open, or a new one can be made."""
        if self._sentinel is not None:
            try:
                self._sentinel.recv(1, socket.MSG_PEEK)
                self._sentinel.close()  # end of stream: the store closed it
            except BlockingIOError:
                return True  # open and idle
            except OSError:
                self._sentinel.close()
            self._sentinel = None
        try:
            self._sentinel = socket.create_connection((self.addr, self.port), timeout=10)
        except OSError as e:
            self.store_lost = f"{self.where}: {e.strerror or e}"
            return False
        self._sentinel.setblocking(False)
        return True

    @classmethod
    def running(cls) -> Heartbeat | None:
        """This process's heartbeat, if it has one."""
        return next((t for t in threading.enumerate() if isinstance(t, cls)), None)

    def _beat(self, rank: int) -> str:
        return f"{self.prefix}beat/{rank}"

    def run(self) -> None:
        while not self._halt.wait(self.period_s):
            if self.store_lost is not None or not self.store_answers():
                continue  # stay (idle) until stopped, so that lost_ranks can read why
            try:
                self.store.add(self._beat(self.rank), 1)
            except Exception as e:  # the store's host is gone; a thread must not print a traceback
                self.store_lost = _reason(str(e))

    def stop(self) -> None:
        self._halt.set()
        if self.is_alive() and self is not threading.current_thread():
            self.join(timeout=self.period_s + 30)
        if self._sentinel is not None and self._halt.is_set() and not self.is_alive():
            self._sentinel.close()
            self._sentinel = None

    def lost_ranks(self) -> list[int] | None:
        """The other ranks whose counter stopped and that did not say they are leaving, watched for up to
        three beats; None when the store does not answer. Says (in the store) that this rank is leaving."""
        self.stop()
        time.sleep(min(1.0, self.period_s))  # a dying process closes its sockets one by one: let it finish
        if self.store_lost is not None or not self.store_answers():
            return None
        try:
            self.store.set(f"{self.prefix}leaving/{self.rank}", "1")
            others = [r for r in range(self.world) if r != self.rank]
            before = {r: self.store.add(self._beat(r), 0) for r in others}
            lost = others
            for _ in range(2):  # a second look before calling a slow rank lost
                time.sleep(1.5 * self.period_s)
                lost = [r for r in lost if self.store.add(self._beat(r), 0) == before[r]
                        and not self.store.check([f"{self.prefix}leaving/{r}"])]
                if not lost:
                    break
            return lost
        except Exception as e:
            self.store_lost = _reason(str(e))
            return None


def _reason(text: str) -> str:
    """The first line of a torch / gloo / nccl error, without its source location and boilerplate."""
    line = (text.strip().splitlines() or ["unknown error"])[0]
    line = re.sub(r"^\[[^\]]*\.(cc|cpp|h|hpp):\d+\]\s*", "", line)
    line = line.split(". This is typically caused by")[0].rstrip(". ")
    return line if len(line) <= 200 else line[:197] + "..."


def describe_peer_loss(error: BaseException, env: DistEnv) -> str | None:
    """One line for a collective that failed because a peer rank is gone or stopped answering; None when
    ``error`` is not of that kind (no process group of several ranks, or an error of another origin)."""
    import torch.distributed as dist

    if env.world_size < 2 or not (dist.is_available() and dist.is_initialized()):
        return None
    text = str(error)
    if not (isinstance(error, dist.DistError) or PEER_LOSS.search(text)):
        return None
    reason, me = _reason(text), f"rank {env.rank}"
    beat = Heartbeat.running()
    lost = beat.lost_ranks() if beat is not None else None
    agent = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    if lost:
        who = f"lost rank{'s' if len(lost) > 1 else ''} {_ranks(lost)} (process ended or stopped answering)"
        see = f"rank {lost[0]}'s log"
    elif lost is None and beat is not None and env.rank != 0 and not agent:
        who = f"lost rank 0 (the rendezvous store it hosted at {beat.where} stopped answering)"
        see = "rank 0's log"
    elif lost is None:
        who, see = "lost a peer rank (which one is unknown: the rendezvous store does not answer)", "the logs"
    else:
        return (f"{me}: a collective failed ({reason}) while every other rank still answers: a rank is stuck "
                f"or the ranks ran different collectives; see the other ranks' logs.")
    return (f"{me}: {who}: {reason}; this rank stops too. See {see} for why; a restart with --resume auto "
            f"continues from the last checkpoint.")
