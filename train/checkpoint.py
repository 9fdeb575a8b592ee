"""Checkpoints: DeepSpeed engine state plus Tessera metadata and every rank's RNG state.

Layout under ``<out_dir>/checkpoints``::

    step_00000100/          DeepSpeed files (model, optimizer and scheduler states, zero_to_fp32.py)
        rng_rank00000.pt    RNG states of each rank
        tessera.json        metadata, written last: a tag without it is incomplete and is never resumed
    latest                  the newest complete tag, moved into place after everything else is written
"""

from __future__ import annotations

import json
import os
import random
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

CKPT_DIR = "checkpoints"
META_FILE = "tessera.json"
FORMAT_VERSION = 1


def checkpoint_root(out_dir: str | Path) -> Path:
    return Path(out_dir) / CKPT_DIR


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
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


def latest_complete(out_dir: str | Path) -> Path | None:
    """The checkpoint ``latest`` points to, if it is complete; else None."""
    root = checkpoint_root(out_dir)
    pointer = root / "latest"
    if not pointer.is_file():
        return None
    tag_dir = root / pointer.read_text().strip()
    return tag_dir if (tag_dir / META_FILE).is_file() else None


def read_meta(tag_dir: Path) -> dict[str, Any]:
    return json.loads((tag_dir / META_FILE).read_text())


def save_checkpoint(engine: Any, out_dir: str | Path, step: int, meta: dict[str, Any], *, rank: int) -> Path:
    """Collective: every rank calls it. Returns the checkpoint directory."""
    import torch.distributed as dist

    root = checkpoint_root(out_dir)
    tag = tag_for(step)
    engine.save_checkpoint(str(root), tag=tag, save_latest=False)
    tag_dir = root / tag
    torch.save(rng_state(), tag_dir / f"rng_rank{rank:05d}.pt")
    dist.barrier()
    if rank == 0:
        full = {**meta, "step": step, "format_version": FORMAT_VERSION, "saved_at": time.time(),
                "world_size": dist.get_world_size()}
        _atomic_write(tag_dir / META_FILE, json.dumps(full, indent=2, default=str))
        _atomic_write(root / "latest", tag)
    dist.barrier()
    return tag_dir


def load_checkpoint(engine: Any, tag_dir: Path, *, rank: int) -> dict[str, Any]:
    """Restore engine, optimizer, scheduler and this rank's RNG state; return the Tessera metadata."""
    meta = read_meta(tag_dir)
    path, _ = engine.load_checkpoint(str(tag_dir.parent), tag=tag_dir.name)
    if path is None:
        raise RuntimeError(f"DeepSpeed could not load the checkpoint in {tag_dir}.")
    rng_file = tag_dir / f"rng_rank{rank:05d}.pt"
    if rng_file.is_file():  # absent when the world size changed; the data order does not depend on it
        set_rng_state(torch.load(rng_file, weights_only=False))
    return meta
