"""Checks a job runs on its node before training: each failure is one line in the log and a non-zero exit.

A job that starts on a node without the GPUs it asked for, with a dead CUDA MPS daemon (CUDA error 805 at the
first kernel), a TMPDIR it cannot write, a disk without room for a checkpoint, without its data, or without the
network interface its profile names for NCCL or gloo, should say so in its first seconds, not as a stack trace
(or a rendezvous timeout) after the model is built. Every check returns the problems it
found as lines; ``run_preflight`` gathers all of them from the real node.
"""

from __future__ import annotations

import glob
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from train.config.schema import JobConfig
from train.data.corpus import SHAKESPEARE_SUBDIR

EXIT_PREFLIGHT = 3  # exit status of a task that failed preflight
MIN_TMP_FREE_BYTES = 512 * 2**20  # what TMPDIR must have free (compilers, DeepSpeed op builds, wandb)
MPS_PIPE_VARIABLE = "CUDA_MPS_PIPE_DIRECTORY"
MPS_DEFAULT_PIPE_DIR = "/tmp/nvidia-mps"


@dataclass(frozen=True)
class Problem:
    """One failed check: what, and how to fix it."""

    check: str  # gpus | mps | tmpdir | disk | data | network
    message: str  # what is wrong and the fix, one line

    def line(self, where: str) -> str:
        return f"tessera: preflight: {where}: {self.check}: {self.message}"


def check_gpus(requested: int, visible: int, cuda_visible_devices: str | None, per: str = "node") -> list[Problem]:
    """The job asked for ``requested`` GPUs per node (``per="task"``: bound to each task, --gpus-per-task);
    torch sees ``visible``."""
    if requested == 0 or visible == requested:
        return []
    shown = f"CUDA_VISIBLE_DEVICES={cuda_visible_devices}" if cuda_visible_devices is not None else \
        "CUDA_VISIBLE_DEVICES unset"
    if visible == 0:
        fix = "check the node's driver (nvidia-smi) and that this Python's torch is a CUDA build"
    else:
        fix = f"submit with --gpus-per-{per} matching what the node gives, or check the partition's gres"
    asked = f"{requested} GPU{'s' if requested > 1 else ''}"
    return [Problem("gpus", f"the job asked for {asked} per {per} but torch sees {visible} ({shown}); {fix}.")]


def check_interfaces(environ: dict[str, str] | os._Environ[str], present: list[str]) -> list[Problem]:
    """The interfaces ``NCCL_SOCKET_IFNAME`` / ``GLOO_SOCKET_IFNAME`` name exist on this node (``present``).

    gloo needs each named interface; NCCL takes names as prefixes (``=``: exact names), at least one must
    match, and a list after ``^`` excludes interfaces (nothing to check)."""
    problems = []
    gloo = environ.get("GLOO_SOCKET_IFNAME")
    if gloo:
        missing = [n for n in gloo.split(",") if n and n not in present]
        if missing:
            problems.append(Problem("network", f"GLOO_SOCKET_IFNAME={gloo}: no interface {', '.join(missing)} "
                                               f"on this node (it has {', '.join(present) or 'none'}); set "
                                               f"gloo_socket_ifname (--gloo-socket-ifname) to one every node "
                                               f"has."))
    nccl = environ.get("NCCL_SOCKET_IFNAME")
    if nccl and not nccl.startswith("^"):
        exact = nccl.startswith("=")
        names = [n for n in nccl.lstrip("=").split(",") if n]
        if not any(p == n or (not exact and p.startswith(n)) for n in names for p in present):
            problems.append(Problem("network", f"NCCL_SOCKET_IFNAME={nccl}: no interface of this node matches "
                                               f"(it has {', '.join(present) or 'none'}); set "
                                               f"nccl_socket_ifname (--nccl-socket-ifname) to one every node "
                                               f"has."))
    return problems


def network_interfaces(sys_net: Path = Path("/sys/class/net")) -> list[str]:
    """This node's network interfaces."""
    try:
        return sorted(p.name for p in sys_net.iterdir())
    except OSError:
        return []


def check_mps(required: bool, environ: dict[str, str] | os._Environ[str]) -> list[Problem]:
    """When MPS is configured (the profile says so, or CUDA_MPS_PIPE_DIRECTORY is set), its daemon must
    answer."""
    configured = required or MPS_PIPE_VARIABLE in environ
    if not configured:
        return []
    pipe_dir = Path(environ.get(MPS_PIPE_VARIABLE, MPS_DEFAULT_PIPE_DIR))
    control = pipe_dir / "control"
    if not control.exists():
        return [Problem("mps", f"CUDA MPS is configured but {control} does not exist: the MPS control daemon "
                               f"is not running; start it (nvidia-cuda-mps-control -d) or unset "
                               f"{MPS_PIPE_VARIABLE} and set mps: false in the profile.")]
    if torch.cuda.is_available():
        try:
            torch.zeros(1, device="cuda").add_(1)  # a client connects to MPS at its first kernel
            torch.cuda.synchronize()
        except RuntimeError as e:  # error 805: "MPS client failed to connect to the MPS control daemon"
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            return [Problem("mps", f"CUDA cannot reach the MPS daemon at {pipe_dir} ({first}); restart it "
                                   f"(echo quit | nvidia-cuda-mps-control; nvidia-cuda-mps-control -d).")]
    return []


def check_tmpdir(environ: dict[str, str] | os._Environ[str],
                 min_free: int = MIN_TMP_FREE_BYTES) -> list[Problem]:
    tmp = Path(environ.get("TMPDIR", "/tmp"))
    if not tmp.is_dir():
        return [Problem("tmpdir", f"TMPDIR={tmp} is not a directory; point TMPDIR at node-local scratch in "
                                  f"the profile's setup lines.")]
    try:
        with tempfile.NamedTemporaryFile(dir=tmp) as f:
            f.write(b"x")
            f.flush()
    except OSError as e:
        return [Problem("tmpdir", f"TMPDIR={tmp} is not writable ({e.strerror}); set TMPDIR to a writable "
                                  f"directory.")]
    free = shutil.disk_usage(tmp).free
    if free < min_free:
        return [Problem("tmpdir", f"TMPDIR={tmp} has {free / 2**20:,.0f} MiB free, less than "
                                  f"{min_free / 2**20:,.0f} MiB; free space or choose another TMPDIR.")]
    return []


def check_disk(out_dir: Path, needed_bytes: int) -> list[Problem]:
    """Room for a checkpoint beside the previous one in the run directory."""
    probe = out_dir
    while not probe.exists():
        probe = probe.parent
    if not os.access(probe, os.W_OK):
        return [Problem("disk", f"train.out_dir={out_dir}: {probe} is not writable; choose a writable "
                                f"train.out_dir.")]
    free = shutil.disk_usage(probe).free
    if free < needed_bytes:
        return [Problem("disk", f"train.out_dir={out_dir}: {free / 2**20:,.0f} MiB free, checkpoints need "
                                f"about {needed_bytes / 2**20:,.0f} MiB; free space or choose another "
                                f"train.out_dir.")]
    return []


def check_data(cfg: JobConfig) -> list[Problem]:
    """The corpus is on this node: prepared data, its input files, or the fetched Shakespeare texts.

    Compute nodes often have no network, so a corpus the login node never fetched is a failure here rather
    than a download attempt inside the job.
    """
    d = cfg.data
    if d.prepared_dir is not None:
        header = Path(d.prepared_dir) / "header.json"
        if not header.is_file():
            return [Problem("data", f"data.prepared_dir={d.prepared_dir}: no header.json; prepare it first "
                                    f"(python tools/prepare_data.py ... --out {d.prepared_dir}).")]
        return []
    problems = []
    if d.tokenizer is not None and not Path(d.tokenizer).is_dir():
        problems.append(Problem("data", f"data.tokenizer={d.tokenizer}: no such directory on this node; copy "
                                        f"the tokenizer to shared storage."))
    if d.corpus == "shakespeare":
        texts = Path(d.cache_dir) / SHAKESPEARE_SUBDIR
        if not any(texts.glob("*.txt")):
            problems.append(Problem(
                "data", f"data.cache_dir={d.cache_dir}: the Shakespeare corpus is not there ({texts} is "
                f"missing); fetch it on a machine with network access: python tools/prepare_data.py "
                f"--shakespeare {d.cache_dir} --vocab-size {d.vocab_size}."))
    else:
        missing = [f for f in d.files if not _visible(f)]
        if missing:
            problems.append(Problem("data", f"data.files: {', '.join(missing)} not found on this node (a glob: "
                                            f"it matches nothing); put the corpus on storage every node mounts."))
    return problems


def _visible(entry: str) -> bool:
    """A data.files entry exists on this node: a file or directory, or a glob matching at least one path."""
    if glob.has_magic(entry):
        return next(glob.iglob(entry, recursive=True), None) is not None
    return Path(entry).exists()


def run_preflight(cfg: JobConfig, *, gpus_per_node: int, mps: bool, checkpoint_bytes: int) -> list[Problem]:
    """Every check against this node; an empty list means the job may start training."""
    visible = torch.cuda.device_count() if torch.cuda.is_available() else 0
    per = "task" if "SLURM_GPUS_PER_TASK" in os.environ else "node"  # --gpus-per-task: each task sees its own
    problems = check_gpus(gpus_per_node, visible, os.environ.get("CUDA_VISIBLE_DEVICES"), per)
    problems += check_mps(mps, os.environ)
    problems += check_tmpdir(os.environ)
    problems += check_disk(Path(cfg.train.out_dir), checkpoint_bytes)
    problems += check_data(cfg)
    problems += check_interfaces(os.environ, network_interfaces())
    return problems
