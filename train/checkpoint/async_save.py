"""Asynchronous checkpoint saves: the state is copied to host memory during the step, written in a thread.

With ``train.async_save`` a save pauses training only while DeepSpeed's ``save_checkpoint`` hands its state
dicts (module, optimizer partitions, scheduler, ...) to the checkpoint engine. ``SnapshotEngine`` replaces
DeepSpeed's engine for that call: its ``save`` copies each state dict to host memory (one copy per storage, so
tensors that share memory still share it in the file) and queues it; DeepSpeed's own engine writes the queue
from a background thread (``BackgroundWrite``), so the files are those a synchronous save writes. The RNG
states and the data position are taken at the same moment.

The writer (train/checkpoint/writer.py) completes such a save collectively on the training thread once every
rank's thread is done: the file list with sizes and sha256 goes into ``tessera.json``, ``step_N.tmp`` is
renamed and only then ``latest`` moves. A kill -9 at any point leaves the previous checkpoint the newest
complete one.
"""

from __future__ import annotations

import copy
import os
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from train.checkpoint.files import describe_files
from train.loop.faults import failpoint_hit

Item = tuple[Any, str, Callable[[Any, str], None]]  # a state to write, its path, the function writing it
HALF_WRITTEN = "async_half_written"  # failpoint: kill -9 after half of this rank's files are written


def snapshot(obj: Any, memo: dict[tuple[str, int], torch.Tensor] | None = None) -> Any:
    """A host-memory copy of a state dict that later in-place updates cannot reach: tensors copied to the CPU
    once per storage (views keep their offsets and strides, shared storages stay shared), containers rebuilt,
    other values deep-copied."""
    memo = {} if memo is None else memo
    if isinstance(obj, torch.Tensor):
        return _copy_tensor(obj, memo)
    if isinstance(obj, dict):
        out = copy.copy(obj)  # keeps the mapping's type (OrderedDict, ...)
        for key, value in obj.items():
            out[key] = snapshot(value, memo)
        return out
    if isinstance(obj, list):
        return [snapshot(v, memo) for v in obj]
    if isinstance(obj, tuple) and not hasattr(obj, "_fields"):
        return tuple(snapshot(v, memo) for v in obj)
    try:
        return copy.deepcopy(obj)
    except Exception:  # noqa: BLE001 - an object that cannot be copied is written as it is now
        return obj


def _copy_tensor(t: torch.Tensor, memo: dict[tuple[str, int], torch.Tensor]) -> torch.Tensor:
    storage = t.untyped_storage()
    key = (str(t.device), storage.data_ptr())
    base = memo.get(key)
    if base is None or base.numel() < storage.nbytes():
        raw = torch.empty(0, dtype=torch.uint8, device=t.device).set_(storage)  # (nbytes,)
        base = raw.to("cpu", copy=True)
        memo[key] = base
    out = torch.empty(0, dtype=t.dtype).set_(base.untyped_storage(), t.storage_offset(), t.size(), t.stride())
    if isinstance(t, torch.nn.Parameter):
        return torch.nn.Parameter(out, requires_grad=t.requires_grad)
    return out


class SnapshotEngine:
    """A DeepSpeed checkpoint engine (the methods of ``deepspeed.runtime.checkpoint_engine.CheckpointEngine``,
    not imported so that importing the writer does not import DeepSpeed) whose ``save`` only snapshots: the files
    are written later, by ``inner`` (DeepSpeed's engine of the run), in ``BackgroundWrite``."""

    def __init__(self, inner: Any) -> None:
        self.name = "TesseraSnapshotEngine"
        self.inner = inner
        self.queue: list[Item] = []  # (host copy of a state dict, its path, how to write it), in save order

    def create(self, info: Any) -> None:
        pass

    def makedirs(self, path: str, exist_ok: bool = False) -> None:
        os.makedirs(path, exist_ok=exist_ok)

    def save(self, state_dict: Any, path: str) -> None:
        self.queue.append((snapshot(state_dict), path, self.inner.save))

    def load(self, path: str, map_location: Any = None) -> Any:
        return self.inner.load(path, map_location=map_location)

    def commit(self, info: Any) -> bool:
        return True  # complete only once the writer has verified and renamed the directory

    def is_decoupled(self) -> bool:
        return False  # DeepSpeed's save ends with its barrier, as with its own engine

    def set_commit_info(self, info: Any) -> None:
        pass

    def get_commit_info(self) -> None:
        return None

    def cleanup(self) -> None:
        pass

    def is_data_parallel_writer(self, dp_rank: int) -> bool:
        return self.inner.is_data_parallel_writer(dp_rank)

    def preserves_storage_sharing(self) -> bool:
        return self.inner.preserves_storage_sharing()


def take_snapshot(engine: Any, save: Callable[[], None]) -> list[Item]:
    """Run ``save()`` (which calls ``engine.save_checkpoint``) with the engine's files snapshotted instead of
    written; return the queue of files to write."""
    inner = engine.checkpoint_engine
    engine.checkpoint_engine = SnapshotEngine(inner)
    try:
        save()
        return engine.checkpoint_engine.queue
    finally:
        engine.checkpoint_engine = inner


class BackgroundWrite:
    """This rank's files of one checkpoint, each written by its writer (DeepSpeed's engine for its files) in a
    daemon thread, then described (size and sha256 read back from the disk)."""

    def __init__(self, queue: list[Item], tag_dir: Path, *, step: int) -> None:
        self.queue, self.tag_dir, self.step = queue, tag_dir, step
        self.files: dict[str, dict[str, Any]] = {}  # relative name -> size and sha256, once done
        self.error: BaseException | None = None
        self.seconds = 0.0  # wall time of the write
        self.nbytes = 0
        self._thread = threading.Thread(target=self._run, name=f"checkpoint-{step}", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def done(self) -> bool:
        return not self._thread.is_alive()

    def join(self) -> None:
        self._thread.join()

    def _run(self) -> None:
        start = time.perf_counter()
        try:
            names = []
            half = (len(self.queue) + 1) // 2
            for i, (state, path, write) in enumerate(self.queue, 1):
                write(state, path)
                names.append(os.path.relpath(path, self.tag_dir))
                self.queue[i - 1] = (None, path, write)  # the host copy is freed as soon as it is on disk
                if i == half and failpoint_hit(HALF_WRITTEN, self.step):
                    os.kill(os.getpid(), signal.SIGKILL)
            self.files = describe_files(self.tag_dir, names)
            self.nbytes = sum(d["size"] for d in self.files.values())
        except BaseException as e:  # noqa: BLE001 - reported by the training thread at the next step or at exit
            self.error = e
        finally:
            self.seconds = time.perf_counter() - start

