"""Checkpoints you can trust: written atomically, found by completeness, rotated, with a smoothed best.

Layout under ``<out_dir>/checkpoints``::

    step_00000100/          DeepSpeed files (model, optimizer and scheduler states, zero_to_fp32.py)
        rng_rank00000.pt    RNG states of each rank
        tessera.json        metadata: config, model args, tokenizer, consumed samples, code version, ...
    step_00000100.tmp/      a checkpoint being written (never resumed from; removed on the next start)
    step_00000100.universal/  its universal copy, made when a run resumes on another number of ranks
    latest                  the newest complete tag, moved into place last
    best                    the tag with the lowest smoothed (EMA) validation loss

A save writes everything into ``step_N.tmp``, renames it to ``step_N`` once every rank has finished and
the metadata is in, and only then moves ``latest``. A crash at any moment leaves the previous checkpoint
complete, and ``--resume auto`` takes the newest directory that is complete, whatever ``latest`` says.
"""

from __future__ import annotations

import errno
import json
import os
import random
import shutil
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from model import ModelArgs

CKPT_DIR = "checkpoints"
META_FILE = "tessera.json"
TMP_SUFFIX = ".tmp"
UNIVERSAL_SUFFIX = ".universal"  # a DeepSpeed universal copy of a checkpoint (train/checkpoint/resize.py), never resumed
FORMAT_VERSION = 1


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be written or read; the message says where and what is still intact."""


def checkpoint_root(out_dir: str | Path) -> Path:
    return Path(out_dir) / CKPT_DIR


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def _failpoint_hit(name: str, step: int) -> bool:
    """Fault injection for tests: ``TESSERA_FAILPOINT=name@step`` (or just ``name``) selects a point."""
    want = os.environ.get("TESSERA_FAILPOINT")
    return want in (name, f"{name}@{step}")


def failpoint(name: str, step: int) -> None:
    """Kill this process with SIGKILL here when the test asks for it (see ``_failpoint_hit``)."""
    if _failpoint_hit(name, step):
        os.kill(os.getpid(), signal.SIGKILL)


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + TMP_SUFFIX)
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ----------------------------------------------------------------------------- finding checkpoints


def _fail_file_writes(engine: Any) -> None:
    """Test fault: every file DeepSpeed writes for this rank fails as on a full disk."""

    def full_disk(state_dict: Any, path: str) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)

    engine.checkpoint_engine.save = full_disk


# ----------------------------------------------------------------------------- finding checkpoints


def complete_checkpoints(out_dir: str | Path) -> list[Path]:
    """Complete checkpoint directories, oldest first."""
    root = checkpoint_root(out_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.glob("step_*") if p.is_dir() and not p.name.endswith((TMP_SUFFIX, UNIVERSAL_SUFFIX))
             and (p / META_FILE).is_file()]
    return sorted(found, key=lambda p: p.name)


def latest_complete(out_dir: str | Path) -> Path | None:
    """The newest complete checkpoint (by step), or None."""
    done = complete_checkpoints(out_dir)
    return done[-1] if done else None


def read_meta(tag_dir: Path) -> dict[str, Any]:
    return json.loads((tag_dir / META_FILE).read_text())


def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def remove_partial(out_dir: str | Path) -> list[Path]:
    """Delete checkpoints a crash left half-written (call on rank 0 before training)."""
    root = checkpoint_root(out_dir)
    stale = sorted(root.glob(f"*{TMP_SUFFIX}")) if root.is_dir() else []
    for p in stale:
        shutil.rmtree(p) if p.is_dir() else p.unlink()
    return stale


def check_free_space(out_dir: str | Path, needed_bytes: int, what: str) -> None:
    """Raise CheckpointError unless the filesystem of ``out_dir`` has room for ``needed_bytes``."""
    probe = Path(out_dir)
    while not probe.exists():
        probe = probe.parent
    if not os.access(probe, os.W_OK):
        raise CheckpointError(f"train.out_dir={out_dir}: {probe} is not writable; choose a writable directory.")
    free = shutil.disk_usage(probe).free
    if free < needed_bytes:
        raise CheckpointError(
            f"train.out_dir={out_dir}: {free / 2**20:,.0f} MiB free but {what} needs about "
            f"{needed_bytes / 2**20:,.0f} MiB; free space, choose another train.out_dir, or lower train.keep_last."
        )


# ----------------------------------------------------------------------------- saving and loading


class CheckpointWriter:
    """Collective checkpoint saves for one run (every rank holds one and calls ``save`` together)."""

    def __init__(self, out_dir: str | Path, *, rank: int, keep_last: int, estimate_bytes: int,
                 extra: Callable[[Path], None] | None = None) -> None:
        self.extra = extra  # collective: writes more files (e.g. the PEFT adapter) into the checkpoint directory
        self.out_dir = Path(out_dir)
        self.root = checkpoint_root(out_dir)
        self.rank = rank
        self.keep_last = keep_last  # complete checkpoints kept besides the best one (0: all)
        self.estimate_bytes = estimate_bytes  # size of one checkpoint before one has been measured

    def _errors(self, error: BaseException | None) -> list[str]:
        """Every rank's error ("rank N: ..."), the same list on all ranks; empty when all succeeded."""
        import torch.distributed as dist

        gathered: list[str | None] = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, None if error is None else f"rank {self.rank}: {error}")
        return [e for e in gathered if e is not None]

    def save(self, engine: Any, step: int, meta: dict[str, Any], *, best: bool = False) -> Path:
        """Write checkpoint ``step``; raise CheckpointError on every rank if any rank could not."""
        import torch.distributed as dist

        tag = tag_for(step)
        tmp_dir, final = self.root / (tag + TMP_SUFFIX), self.root / tag
        previous = latest_complete(self.out_dir)
        needed = int(1.1 * (dir_bytes(previous) if previous is not None else self.estimate_bytes))
        error: BaseException | None = None
        if self.rank == 0:
            try:
                self.root.mkdir(parents=True, exist_ok=True)
                if tmp_dir.exists():
                    shutil.rmtree(tmp_dir)
                check_free_space(self.root, needed, f"checkpoint {tag}")
            except (OSError, CheckpointError) as e:
                error = e
        errors = self._errors(error)
        if errors:
            raise self._failure(step, errors, previous)

        in_engine = True
        try:
            if _failpoint_hit(f"save_error_rank{self.rank}", step):
                _fail_file_writes(engine)
            tmp_dir.mkdir(parents=True, exist_ok=True)
            failpoint("during_write", step)
            engine.save_checkpoint(str(self.root), tag=tmp_dir.name, save_latest=False,
                                   exclude_frozen_parameters=has_frozen(engine))
            in_engine = False
            if self.extra is not None:
                self.extra(tmp_dir)
            failpoint("after_engine_save", step)
            torch.save(rng_state(), tmp_dir / f"rng_rank{self.rank:05d}.pt")
        except OSError as e:
            error = e
            if in_engine:
                dist.barrier()  # the barrier DeepSpeed's save ends with, which the other ranks are in
        errors = self._errors(error)
        if errors:
            if self.rank == 0:
                shutil.rmtree(tmp_dir, ignore_errors=True)
            dist.barrier()
            raise self._failure(step, errors, previous)

        if self.rank == 0:
            full = {**meta, "step": step, "format_version": FORMAT_VERSION, "saved_at": time.time(),
                    "world_size": dist.get_world_size()}
            _atomic_write(tmp_dir / META_FILE, json.dumps(full, indent=2, default=str))
            failpoint("before_rename", step)
            if final.exists():  # a step saved again after a rollback replaces the old copy
                shutil.rmtree(final)
            os.replace(tmp_dir, final)
            failpoint("before_latest", step)
            _atomic_write(self.root / "latest", tag)
            if best:
                _atomic_write(self.root / "best", tag)
            self._rotate()
        dist.barrier()
        return final

    def _failure(self, step: int, errors: list[str], previous: Path | None) -> CheckpointError:
        cause = "; ".join(errors)
        kept = f"the previous checkpoint {previous} is intact" if previous else "no earlier checkpoint exists"
        return CheckpointError(f"checkpoint at step {step} could not be written to {self.root}: {cause}; {kept}.")

    def _rotate(self) -> None:
        if self.keep_last <= 0:
            return
        best = self.root / "best"
        best_tag = best.read_text().strip() if best.is_file() else None
        done = complete_checkpoints(self.out_dir)
        for old in done[: -self.keep_last]:
            if old.name != best_tag:
                shutil.rmtree(old)
                shutil.rmtree(old.with_name(old.name + UNIVERSAL_SUFFIX), ignore_errors=True)


# Bytes per parameter in a checkpoint: fp32 weights (4) + Adam moments (8) + an fp32 master copy under bf16 (4).
CKPT_BYTES_PER_PARAM = 16


def checkpoint_estimate(args: ModelArgs) -> int:
    """Bytes one checkpoint of this model takes, before one has been written and measured."""
    return args.num_params() * CKPT_BYTES_PER_PARAM + 2**20


def has_frozen(engine: Any) -> bool:
    """True when the model has frozen parameters (a base under adapters): checkpoints leave them out, and a
    resumed run takes them from the base model again."""
    return any(not p.requires_grad for p in engine.module.parameters())
