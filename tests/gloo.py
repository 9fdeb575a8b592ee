"""Run a function on N gloo ranks in fresh processes, with a deadline, and collect what each rank returns.

    results = run_ranks(world_size=2, fn=my_check, args=(3,))   # fn(rank, world_size, *args) -> picklable

A rank that raises fails the call with that rank's traceback; a rank that hangs (a collective nobody else
joins) fails it after ``timeout`` seconds instead of hanging the test session. The functions must be
importable module-level functions (they are pickled into spawned processes).
"""

from __future__ import annotations

import multiprocessing as mp
import os
import queue as queue_mod
import tempfile
import traceback
from collections.abc import Callable
from typing import Any


def _entry(fn: Callable[..., Any], rank: int, world: int, init_file: str, args: tuple, queue: Any) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    try:
        dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
        try:
            queue.put((rank, "ok", fn(rank, world, *args)))
        finally:
            dist.destroy_process_group()
    except BaseException:  # noqa: BLE001 - every failure, assertion errors included, goes to the parent
        queue.put((rank, "error", traceback.format_exc()))


def run_ranks(world_size: int, fn: Callable[..., Any], args: tuple = (), *, timeout: float = 180) -> list[Any]:
    """``fn(rank, world_size, *args)`` on each of ``world_size`` gloo ranks; their results by rank."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    with tempfile.TemporaryDirectory() as tmp:
        init_file = os.path.join(tmp, "rendezvous")
        procs = [ctx.Process(target=_entry, args=(fn, r, world_size, init_file, args, queue), daemon=True)
                 for r in range(world_size)]
        for p in procs:
            p.start()
        results: dict[int, Any] = {}
        errors: list[str] = []
        try:
            for _ in range(world_size):
                rank, status, value = queue.get(timeout=timeout)
                if status == "error":
                    errors.append(f"--- rank {rank} ---\n{value}")
                    break
                results[rank] = value
        except queue_mod.Empty:  # some rank never reported
            missing = sorted(set(range(world_size)) - set(results))
            errors.append(f"ranks {missing} did not finish within {timeout}s: a hang?")
        finally:
            for p in procs:
                p.join(timeout=5 if not errors else 0.5)
                if p.is_alive():
                    p.kill()
        if errors:
            raise AssertionError("\n".join(errors))
    return [results[r] for r in range(world_size)]
