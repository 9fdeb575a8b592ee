"""Load a checkpoint into the engine, through a universal copy when the world size changed."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from train.checkpoint.resize import load_universal, resized_source
from train.checkpoint.writer import CheckpointError, has_frozen, read_meta, set_rng_state


def load_checkpoint(engine: Any, tag_dir: Path, *, rank: int) -> dict[str, Any]:
    """Restore engine, optimizer, scheduler and this rank's RNG state; return the Tessera metadata.

    Collective. A checkpoint saved by another number of ranks is loaded through ``train.checkpoint.resize``.
    """
    meta = read_meta(tag_dir)
    universal = resized_source(engine, tag_dir, meta, rank=rank)
    if universal is None:
        path, _ = engine.load_checkpoint(str(tag_dir.parent), tag=tag_dir.name,
                                         load_module_strict=not has_frozen(engine))
    else:
        path = load_universal(engine, universal)
    if path is None:
        raise CheckpointError(f"DeepSpeed could not load the checkpoint in {universal or tag_dir}.")
    rng_file = tag_dir / f"rng_rank{rank:05d}.pt"
    if rng_file.is_file():  # absent when the world size changed; the data order does not depend on it
        set_rng_state(torch.load(rng_file, weights_only=False))
    return meta
