"""Load a checkpoint into the engine, through a universal copy when the world size changed and through a
layout-free copy when the tensor- or pipeline-parallel degree changed (train/checkpoint/reshard.py).

Nothing in a checkpoint runs: before DeepSpeed reads a file, every file it may read is unpickled weights-only
by one of the ranks (``preflight``: the files are shared out over the ranks, their memory-mapped tensors are
not read), and all ranks stop together with one line when any file is refused or unreadable. DeepSpeed's own
loads then run inside ``safe_load.weights_only_loads``, so a file changed in between is refused too.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path
from typing import Any

from parallel.layers import TPContext
from parallel.moe import restore_expert_weights
from train.checkpoint.reshard import needs_reshard, persistent_buffers, zero_family
from train.checkpoint.reshard_load import load_resharded, place_buffers, run_layout
from train.checkpoint.resize import load_universal, resized_source
from train.checkpoint.safe_load import UnreadableFile, load, probe, weights_only_loads
from train.checkpoint.verify import damage_report, load_meta
from train.checkpoint.writer import CheckpointError, has_frozen, set_rng_state
from train.loop.optim import LRSchedule, scheduler_schedule, set_schedule

log = logging.getLogger("tessera")


def _is_rng(path: Path) -> bool:
    return path.name.startswith("rng_rank")


def preflight(tag_dir: Path, *, rank: int, world_size: int, root: Path | None = None) -> None:
    """Collective: unpickle (weights-only, tensors memory-mapped) every ``.pt`` file under ``root`` (default
    ``tag_dir``; or its universal copy), each rank a share; CheckpointError on every rank if any file fails.

    An unreadable file is compared with the size and sha256 recorded at save, and the error says whether it
    was damaged after the save.
    """
    import torch.distributed as dist

    files = sorted((root or tag_dir).rglob("*.pt"))
    error = None
    for path in files[rank::world_size]:
        try:
            probe(path, rng=_is_rng(path))
        except UnreadableFile as err:
            error = f"{err}{damage_report(tag_dir, path) if path.is_relative_to(tag_dir) else ''}"
            break
        except CheckpointError as err:
            error = str(err)
            break
    gathered: list[str | None] = [None] * world_size
    dist.all_gather_object(gathered, error)
    failed = [e for e in gathered if e is not None]
    if failed:
        raise CheckpointError(failed[0])


def load_checkpoint(engine: Any, tag_dir: Path, *, rank: int, tp_ctx: TPContext | None = None) -> dict[str, Any]:
    """Restore engine, optimizer, scheduler and this rank's RNG state; return the Tessera metadata.

    Collective. A checkpoint saved by another number of ranks is loaded through ``train.checkpoint.resize``,
    one saved with another tp or pp through ``train.checkpoint.reshard`` (per-rank RNG states are then not
    restored: which stream a rank owns depends on the layout).
    """
    import torch.distributed as dist

    meta = load_meta(tag_dir)
    world_size = dist.get_world_size()
    preflight(tag_dir, rank=rank, world_size=world_size)  # before a resize converts the files
    layout = run_layout(engine, tp_ctx)
    family = zero_family(engine.zero_optimization_stage(), bf16=bool(engine.bfloat16_enabled()))
    reshard = needs_reshard(tag_dir, meta, layout, family)
    universal = None if reshard else resized_source(engine, tag_dir, meta, rank=rank)
    if universal is not None:
        preflight(tag_dir, rank=rank, world_size=world_size, root=universal)
    planned = scheduler_schedule(engine.lr_scheduler)  # this run's schedule, before the checkpoint's replaces it
    if planned is not None:  # a copy: loading updates the scheduler's object; an older checkpoint leaves steps 0
        planned = replace(planned)
        set_schedule(engine.lr_scheduler, replace(planned, steps=0))
    if reshard:
        path: str | None = load_resharded(engine, tag_dir, meta, rank=rank, tp_ctx=tp_ctx)
    else:
        path = _load_as_saved(engine, tag_dir, universal)
        if universal is not None and path is not None:  # the universal load restores parameters only
            place_buffers(engine, persistent_buffers(tag_dir, meta), meta)
    if path is None:
        raise CheckpointError(f"DeepSpeed could not load the checkpoint in {universal or tag_dir}.")
    restore_expert_weights(engine)  # expert parallelism: each rank's own experts, from its ZeRO partition
    if planned is not None:
        _resume_schedule(engine.lr_scheduler, planned, meta, rank=rank)
    rng_file = tag_dir / f"rng_rank{rank:05d}.pt"
    if rng_file.is_file() and not reshard:  # absent when the world size changed; the data order needs none
        set_rng_state(load(rng_file, rng=True), tp_ctx)
    return meta


def _load_as_saved(engine: Any, tag_dir: Path, universal: Path | None) -> str | None:
    """The engine state from the checkpoint (same layout) or its universal copy (another DP size)."""
    with weights_only_loads():
        if universal is None:
            path, _ = engine.load_checkpoint(str(tag_dir.parent), tag=tag_dir.name,
                                             load_module_strict=not has_frozen(engine))
        else:
            path = load_universal(engine, universal)
    return path


def _resume_schedule(scheduler: Any, planned: LRSchedule, meta: dict[str, Any], *, rank: int) -> None:
    """Follow ``planned.resumed(...)`` from the restored step on, starting with that step's own rate (the loaded
    optimizer holds the rate its checkpoint saved, which the first resumed step would otherwise use)."""
    saved = scheduler_schedule(scheduler)  # the scheduler's own object: copied, set_schedule changes it
    saved = replace(saved) if saved is not None else None
    if saved is None or saved.steps == 0:  # an older checkpoint: its schedule from its recorded settings
        t = meta.get("config", {}).get("train", {})
        saved = replace(planned, **{k: t[k] for k in ("lr", "min_lr", "warmup_steps", "steps") if k in t},
                        restart_step=0, restart_lr=0.0)
    step = scheduler.last_epoch
    schedule = planned.resumed(saved, step)
    set_schedule(scheduler, schedule)
    if schedule != replace(saved, on_resume=schedule.on_resume) and rank == 0:
        log.info("learning-rate schedule changed at step %d (train.resume_schedule=%s): %s", step,
                 planned.on_resume, schedule.describe())
