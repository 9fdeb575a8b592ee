"""Checkpoints you can trust: written atomically, found by completeness, rotated, with a smoothed best.

Layout under ``<out_dir>/checkpoints``::

    step_00000100/          DeepSpeed files (model, optimizer and scheduler states, zero_to_fp32.py)
        rng_rank00000.pt    RNG states of each rank (tensors, ints and tuples: loadable weights-only)
        tessera.json        metadata: config, model args, tokenizer, consumed samples, code version, ...,
                            and the size and sha256 of every other file (train/checkpoint/verify.py)
    step_00000100.tmp/      a checkpoint being written (never resumed from; removed on the next start)
    step_00000100.universal/  its universal copy, made when a run resumes on another number of ranks
    latest                  the newest complete tag, moved into place last
    best                    the tag with the lowest smoothed (EMA) validation loss

A save writes everything into ``step_N.tmp``, renames it to ``step_N`` once every rank has finished and
the metadata is in, and only then moves ``latest``. A crash at any moment leaves the previous checkpoint
complete, and ``--resume auto`` takes the newest directory that is complete, whatever ``latest`` says.
A write that fails on any rank (a full disk shows as torch's ``RuntimeError: [enforce fail at
inline_container.cc ...]``, not as ``OSError``) fails the save on every rank together with one
``CheckpointError`` naming the directory and its free space; the partial directory is removed.

With ``train.async_save`` the same steps run in two halves: ``save`` takes a host-memory snapshot
(train/checkpoint/async_save.py) and returns while a thread writes the files into ``step_N.tmp``; the next
``poll`` after every rank's thread is done (or ``wait``: the next save, a stop, the end of the run) records the
file list, renames and moves ``latest``. A failed background write is the same CheckpointError, raised there.
"""

from __future__ import annotations

import copy
import errno
import json
import logging
import os
import random
import shutil
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from model import ModelArgs
from parallel.layers import TPContext
from train.checkpoint.async_save import BackgroundWrite, take_snapshot
from train.checkpoint.files import FILES_KEY, checkpoint_files, describe_files

log = logging.getLogger("tessera")

CKPT_DIR = "checkpoints"
META_FILE = "tessera.json"
TMP_SUFFIX = ".tmp"
UNIVERSAL_SUFFIX = ".universal"  # a checkpoint's universal copy (train/checkpoint/resize.py), never resumed
FORMAT_VERSION = 2  # 2: RNG files hold no numpy objects; tessera.json lists every file, its size and sha256


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


def rng_state(tp_ctx: TPContext | None = None) -> dict[str, Any]:
    """This process's RNG states as tensors, ints, floats, strings and tuples (weights-only loadable), with this
    tensor-parallel rank's own dropout generators under ``tp`` when there is a TP group."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    numpy_state = (name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached))
    state = {"python": random.getstate(), "numpy": numpy_state, "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    if tp_ctx is not None and tp_ctx.size > 1:
        state["tp"] = tp_ctx.rng_state()
    return state


def set_rng_state(state: dict[str, Any], tp_ctx: TPContext | None = None) -> None:
    """Restore ``rng_state()``'s states (also those of the first format, whose numpy keys are an array); the TP
    dropout generators too when both the checkpoint and this run have them."""
    random.setstate(state["python"])
    name, keys, *rest = state["numpy"]
    keys = keys.numpy() if isinstance(keys, torch.Tensor) else keys
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), *rest))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if "tp" in state and tp_ctx is not None and tp_ctx.size > 1:
        tp_ctx.set_rng_state(state["tp"])


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
    partial = (TMP_SUFFIX, UNIVERSAL_SUFFIX)
    found = [p for p in root.glob("step_*")
             if p.is_dir() and not p.name.endswith(partial) and (p / META_FILE).is_file()]
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


def existing_parent(path: str | Path) -> Path:
    """``path`` or the nearest of its parents that exists."""
    probe = Path(path).absolute()
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    return probe


def free_bytes(path: str | Path) -> int:
    """Free bytes on the filesystem of ``path`` (or of its nearest existing parent); -1 if unknown."""
    try:
        return shutil.disk_usage(existing_parent(path)).free
    except OSError:
        return -1


def check_out_dir(out_dir: str | Path) -> None:
    """Raise CheckpointError unless ``out_dir`` is, or can be made, a directory (not below a regular file)."""
    probe = existing_parent(out_dir)
    if not probe.is_dir():
        raise CheckpointError(f"train.out_dir={out_dir}: {probe} is a file, not a directory; choose a "
                              f"directory path.")


def check_free_space(out_dir: str | Path, needed_bytes: int, what: str) -> None:
    """Raise CheckpointError unless the filesystem of ``out_dir`` has room for ``needed_bytes``."""
    check_out_dir(out_dir)
    probe = existing_parent(out_dir)
    if not os.access(probe, os.W_OK):
        raise CheckpointError(f"train.out_dir={out_dir}: {probe} is not writable; choose a writable "
                              f"directory.")
    free = shutil.disk_usage(probe).free
    if free < needed_bytes:
        raise CheckpointError(
            f"train.out_dir={out_dir}: {free / 2**20:,.0f} MiB free but {what} needs about "
            f"{needed_bytes / 2**20:,.0f} MiB; free space, choose another train.out_dir, or lower "
            f"train.keep_last."
        )


# ----------------------------------------------------------------------------- saving and loading


@dataclass
class _Save:
    """One save between its snapshot and its completion."""

    step: int
    tmp_dir: Path  # step_N.tmp, written into
    final: Path  # step_N, once complete
    meta: dict[str, Any]  # the metadata the trainer gave (tessera.json adds the step, the file list, ...)
    best: bool  # move ``best`` too
    previous: Path | None  # the newest complete checkpoint before this one (intact whatever happens)
    write: BackgroundWrite | None = None  # the background write of an asynchronous save


def _torch_save(state: Any, path: str) -> None:
    torch.save(state, path)


class CheckpointWriter:
    """Collective checkpoint saves for one run (every rank holds one and calls ``save`` together)."""

    def __init__(self, out_dir: str | Path, *, rank: int, keep_last: int, estimate_bytes: int,
                 extra: Callable[[Path], None] | None = None, tp_ctx: TPContext | None = None,
                 async_save: bool = False) -> None:
        self.tp_ctx = tp_ctx  # its dropout generators are saved with each rank's RNG state
        self.extra = extra  # collective: writes more files (e.g. the PEFT adapter) into the checkpoint dir
        self.out_dir = Path(out_dir)
        self.root = checkpoint_root(out_dir)
        self.rank = rank
        self.keep_last = keep_last  # complete checkpoints kept besides the best one (0: all)
        self.estimate_bytes = estimate_bytes  # size of one checkpoint before one has been measured
        self.async_save = async_save  # snapshot to host memory and write in the background (train.async_save)
        self.last_pause_s = 0.0  # how long the last asynchronous save held up training
        self._pending: _Save | None = None  # the asynchronous save being written, at most one

    def _errors(self, error: BaseException | str | None) -> list[str]:
        """Every rank's error ("rank N: ..."), the same list on all ranks; empty when all succeeded."""
        if error is not None and not (isinstance(error, str) and error.startswith("rank ")):
            error = f"rank {self.rank}: {_short(error)}"
        gathered: list[str | None] = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, error)
        return [e for e in gathered if e is not None]

    def _settle(self, step: int, error: BaseException | str | None, previous: Path | None,
                remove: Path | None = None) -> None:
        """Collective: raise CheckpointError on every rank if any rank failed, after rank 0 measured the free
        space and removed ``remove`` (the partial directory)."""
        errors = self._errors(error)
        if not errors:
            return
        free = [free_bytes(self.root)]
        if self.rank == 0 and remove is not None:
            shutil.rmtree(remove, ignore_errors=True)
        dist.broadcast_object_list(free, src=0)
        dist.barrier()
        raise self._failure(step, errors, previous, free[0])

    def save(self, engine: Any, step: int, meta: dict[str, Any], *, best: bool = False) -> Path:
        """Write checkpoint ``step``; raise CheckpointError on every rank if any rank could not. With
        ``async_save`` only its snapshot is taken here (after the save in flight, if any, is complete): the
        files are written in the background and the checkpoint completes in ``poll`` or ``wait``."""
        self.wait()
        tag = tag_for(step)
        tmp_dir, final = self.root / (tag + TMP_SUFFIX), self.root / tag
        previous = latest_complete(self.out_dir)
        needed = int(1.1 * (dir_bytes(previous) if previous is not None else self.estimate_bytes))
        error: BaseException | str | None = None
        if self.rank == 0:
            try:
                self.root.mkdir(parents=True, exist_ok=True)
                if tmp_dir.exists():
                    shutil.rmtree(tmp_dir)
                check_free_space(self.root, needed, f"checkpoint {tag}")
            except (OSError, CheckpointError) as e:
                error = e
        self._settle(step, error, previous)

        in_engine, queue = True, None
        started = time.perf_counter()
        try:
            if _failpoint_hit(f"save_error_rank{self.rank}", step):
                _fail_file_writes(engine)
            tmp_dir.mkdir(parents=True, exist_ok=True)
            failpoint("during_write", step)

            def engine_save() -> None:
                engine.save_checkpoint(str(self.root), tag=tmp_dir.name, save_latest=False,
                                       exclude_frozen_parameters=has_frozen(engine))

            if self.async_save:
                queue = take_snapshot(engine, engine_save)
            else:
                engine_save()
            in_engine = False
            if self.extra is not None:
                self.extra(tmp_dir)
            failpoint("after_engine_save", step)
            rng_path = tmp_dir / f"rng_rank{self.rank:05d}.pt"
            if queue is None:
                torch.save(rng_state(self.tp_ctx), rng_path)
            else:
                queue.append((rng_state(self.tp_ctx), str(rng_path), _torch_save))
        except Exception as e:  # noqa: BLE001 - any failed write (torch.save: a full disk is a RuntimeError)
            error = e
            if in_engine:
                dist.barrier()  # the barrier DeepSpeed's save ends with, which the other ranks are in
        self._settle(step, error, previous, remove=tmp_dir)
        if queue is None:
            self._complete(_Save(step, tmp_dir, final, meta, best, previous), self._describe(tmp_dir))
            return final

        failpoint("async_snapshot", step)
        self.last_pause_s = time.perf_counter() - started
        write = BackgroundWrite(queue, tmp_dir, step=step)
        write.start()
        self._pending = _Save(step, tmp_dir, final, copy.deepcopy(meta), best, previous, write)
        return final

    @property
    def in_flight(self) -> int | None:
        """The step of the save being written in the background, if any."""
        return self._pending.step if self._pending is not None else None

    def poll(self, device: torch.device) -> None:
        """Collective, once per step: complete the save in flight when every rank has written its files."""
        if self._pending is None:
            return
        done = torch.tensor([int(self._pending.write.done())], dtype=torch.int32, device=device)
        dist.all_reduce(done, op=dist.ReduceOp.MIN)
        if int(done.item()):
            self._finish_pending()

    def wait(self) -> None:
        """Collective: wait for the save in flight (if any) and complete it (a CheckpointError if it failed)."""
        if self._pending is None:
            return
        start = time.perf_counter()
        self._pending.write.join()
        waited = time.perf_counter() - start
        if self.rank == 0 and waited >= 0.05:
            log.info("waited %.1f s for the checkpoint of step %d to be written", waited, self._pending.step)
        self._finish_pending()

    def _finish_pending(self) -> None:
        save, self._pending = self._pending, None
        assert save is not None and save.write is not None
        error = save.write.error
        if error is None and not save.tmp_dir.is_dir():
            error = f"{save.tmp_dir} disappeared while it was written"
        self._settle(save.step, error, save.previous, remove=save.tmp_dir)
        self._complete(save, self._describe(save.tmp_dir, known=save.write.files))
        if self.rank == 0:
            log.info("step %d: checkpoint %s complete (%.1f MiB written in the background in %.1f s)", save.step,
                     save.final, save.write.nbytes / 2**20, save.write.seconds)

    def _complete(self, save: _Save, files: dict[str, dict[str, Any]] | str) -> None:
        """Collective: record the file list in the metadata, rename the directory, then move ``latest``."""
        step, tmp_dir, final, previous = save.step, save.tmp_dir, save.final, save.previous
        if isinstance(files, str):  # the same on every rank: reported once
            self._settle(step, files if self.rank == 0 else None, previous, remove=tmp_dir)
        error, renamed = None, False
        if self.rank == 0:
            try:
                unseen = [n for n in checkpoint_files(tmp_dir, meta_file=META_FILE) if n not in files]
                files.update(describe_files(tmp_dir, unseen))  # a file another rank's listing missed
                full = {**save.meta, "step": step, "format_version": FORMAT_VERSION, "saved_at": time.time(),
                        "world_size": dist.get_world_size(), FILES_KEY: files}
                _atomic_write(tmp_dir / META_FILE, json.dumps(full, indent=2, default=str))
                failpoint("before_rename", step)
                if final.exists():  # a step saved again after a rollback replaces the old copy
                    shutil.rmtree(final)
                os.replace(tmp_dir, final)
                renamed = True
                failpoint("before_latest", step)
                _atomic_write(self.root / "latest", final.name)
                if save.best:
                    _atomic_write(self.root / "best", final.name)
                self._rotate()
            except Exception as e:  # noqa: BLE001 - as above
                error = f"{_short(e)} (after {final} was complete)" if renamed else e
                for pointer in ("latest", "best"):
                    (self.root / (pointer + TMP_SUFFIX)).unlink(missing_ok=True)
        self._settle(step, error, previous, remove=None if renamed else tmp_dir)
        dist.barrier()

    def _describe(self, tmp_dir: Path, known: dict[str, dict[str, Any]] | None = None
                  ) -> dict[str, dict[str, Any]] | str:
        """Collective: size and sha256 of every file written into ``tmp_dir`` (each rank hashes every
        world-size-th file, or gives ``known``: those of the files it wrote), the same on all ranks; or the first
        rank's error as a string."""
        world = dist.get_world_size()
        mine: dict[str, dict[str, Any]] | str
        try:
            if known is not None:
                mine = known
            else:
                names = checkpoint_files(tmp_dir, meta_file=META_FILE)
                mine = describe_files(tmp_dir, names[self.rank::world])
        except OSError as e:
            mine = f"rank {self.rank}: {_short(e)}"
        gathered: list[Any] = [None] * world
        dist.all_gather_object(gathered, mine)
        failed = [g for g in gathered if isinstance(g, str)]
        if failed:
            return failed[0]
        return {name: gathered[r][name] for r in range(world) for name in sorted(gathered[r])}

    def _failure(self, step: int, errors: list[str], previous: Path | None, free: int) -> CheckpointError:
        cause = "; ".join(errors)
        kept = f"the previous checkpoint {previous} is intact" if previous else "no earlier checkpoint exists"
        room = f" ({free / 2**20:,.1f} MiB free there)" if free >= 0 else ""
        return CheckpointError(f"checkpoint at step {step} could not be written to {self.root}{room}: "
                               f"{cause}; {kept}.")

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


def _short(error: BaseException | str) -> str:
    """One line for a write error; torch's ``[enforce fail at inline_container.cc:N] . `` prefix dropped."""
    if isinstance(error, str):
        return error
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    text = lines[0] if lines else type(error).__name__
    if "enforce fail at" in text:  # torch.save's writer: a full disk, a quota, an I/O error
        text = f"torch.save failed ({text.split('] ', 1)[-1].lstrip('. ')})"
    if not isinstance(error, (OSError, RuntimeError)):
        text = f"{type(error).__name__}: {text}"
    return text


# Bytes per parameter in a checkpoint: fp32 weights (4) + Adam moments (8) + an fp32 master copy (bf16, 4).
CKPT_BYTES_PER_PARAM = 16


def checkpoint_estimate(args: ModelArgs) -> int:
    """Bytes one checkpoint of this model takes, before one has been written and measured."""
    return args.num_params() * CKPT_BYTES_PER_PARAM + 2**20


def has_frozen(engine: Any) -> bool:
    """True when the model has frozen parameters (a base under adapters): checkpoints leave them out, and a
    resumed run takes them from the base model again."""
    return any(not p.requires_grad for p in engine.module.parameters())
