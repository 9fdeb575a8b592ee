"""Resuming on a different number of data-parallel ranks.

The data position (consumed samples) does not depend on the number of ranks; the engine state may:

* ZeRO 0 keeps whole optimizer states in one file, and DeepSpeed loads it at any world size.
* ZeRO 1-3 split the optimizer states (and, for ZeRO 3, the weights) over the ranks that saved them, and
  DeepSpeed refuses to load them at another world size. Such a checkpoint is converted once, by rank 0, into
  DeepSpeed's *universal* format (one file per parameter and state) beside it::

      checkpoints/step_00000100/             the checkpoint as saved (still the one that counts)
      checkpoints/step_00000100.universal/   its universal copy, reused by later resumes from it

  The engine loads that copy with DeepSpeed's ``load_universal`` switch on for this one load only: a later
  load in the same run (a rollback) or a later resume reads the run's own checkpoints natively.

``train.checkpoint.resume.load_checkpoint`` goes through ``resized_source`` for every load, so a resume and a
rollback to a checkpoint of the old world size take the same path. A checkpoint of another tp or pp, of a
tp / pp > 1 run at another world size, or of another ZeRO format goes through train/checkpoint/reshard.py instead
(which builds on this universal copy).

DeepSpeed 0.19.8's universal load under ZeRO 3 gives every parameter group the hyper-parameters of the first
one and lets all groups share one Adam ``step`` tensor; ``repair_universal_load`` undoes both.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from train.checkpoint.safe_load import load
from train.checkpoint.writer import TMP_SUFFIX, UNIVERSAL_SUFFIX, CheckpointError, read_meta

SOURCE_FILE = "tessera_source.json"  # in a universal copy: which save of the checkpoint it was made from
CONVERT_MODULE = "deepspeed.checkpoint.ds_to_universal"
SAFE_RUNNER = "train.checkpoint.run_safely"  # runs the converter with every torch.load in it weights-only
REPO = Path(__file__).resolve().parents[2]
log = logging.getLogger("tessera")


@dataclasses.dataclass(frozen=True)
class Resize:
    """A resume whose checkpoint was saved by ``saved_world_size`` ranks and is loaded by ``world_size``."""

    saved_world_size: int
    world_size: int
    zero_stage: int

    @property
    def needs_universal(self) -> bool:
        """ZeRO 1-3 states are partitioned by rank and must go through the universal format."""
        return self.zero_stage >= 1


def plan_resize(meta: dict[str, Any], *, world_size: int, zero_stage: int) -> Resize | None:
    """The resize a resume from a checkpoint with metadata ``meta`` needs, or None for the same world size.

    A checkpoint whose metadata does not record its world size is taken to match; should it not, DeepSpeed's
    own load refuses it.
    """
    saved = meta.get("world_size")
    if saved is None or int(saved) == world_size:
        return None
    return Resize(saved_world_size=int(saved), world_size=world_size, zero_stage=zero_stage)


def universal_dir(tag_dir: Path) -> Path:
    """Where the universal copy of checkpoint ``tag_dir`` lives."""
    return tag_dir.with_name(tag_dir.name + UNIVERSAL_SUFFIX)


def _source_stamp(tag_dir: Path) -> dict[str, Any]:
    """What identifies one save of ``tag_dir`` (a step saved again after a rollback gets a new stamp)."""
    meta = read_meta(tag_dir)
    return {"tag": tag_dir.name, "step": meta.get("step"), "saved_at": meta.get("saved_at"),
            "world_size": meta.get("world_size")}


def is_current(tag_dir: Path) -> bool:
    """Whether a finished universal copy of this very save of ``tag_dir`` exists."""
    stamp = universal_dir(tag_dir) / SOURCE_FILE
    try:
        return json.loads(stamp.read_text()) == _source_stamp(tag_dir)
    except (OSError, ValueError):
        return False


def start_copy(tag_dir: Path) -> Path:
    """An empty universal directory for ``tag_dir`` without DeepSpeed's files (a stale copy removed), for a
    layout-free copy made from the checkpoint's own files (train/checkpoint/reshard.py); ``mark_current``
    stamps it once that copy is complete."""
    final = universal_dir(tag_dir)
    try:
        shutil.rmtree(final, ignore_errors=False) if final.exists() else None
        final.mkdir(parents=True)
    except OSError as e:
        raise CheckpointError(f"could not make {final} for the layout-free copy of {tag_dir}: {e}") from None
    return final


def mark_current(tag_dir: Path) -> None:
    """Record that the copy beside ``tag_dir`` was made from this very save of it (see ``is_current``)."""
    (universal_dir(tag_dir) / SOURCE_FILE).write_text(json.dumps(_source_stamp(tag_dir)))


def convert(tag_dir: Path) -> Path:
    """Write the universal copy of ``tag_dir`` (atomically: a ``.tmp`` directory renamed) and return it.

    An up-to-date copy is reused. Runs DeepSpeed's converter in a child process, its loads weights-only
    (``train.checkpoint.run_safely``); any failure raises CheckpointError and leaves ``tag_dir`` untouched.
    """
    final = universal_dir(tag_dir)
    if is_current(tag_dir):
        return final
    tmp = final.with_name(final.name + TMP_SUFFIX)
    latest_universal = tag_dir.parent / "latest_universal"  # the converter writes it; Tessera loads by tag
    try:
        for stale in (tmp, final):
            if stale.exists():
                shutil.rmtree(stale)
        cmd = [sys.executable, "-m", SAFE_RUNNER, CONVERT_MODULE, "--input_folder", str(tag_dir),
               "--output_folder", str(tmp), "--inject_missing_state"]
        path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
        env = {**os.environ, "PYTHONPATH": path}
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False, env=env)
        if proc.returncode != 0:
            cause = ((proc.stderr or proc.stdout).strip().splitlines() or ["no output"])[-1].strip()
            raise CheckpointError(f"could not convert {tag_dir} to a universal checkpoint for the new world "
                                  f"size ({CONVERT_MODULE} exited {proc.returncode}: {cause})")
        (tmp / SOURCE_FILE).write_text(json.dumps(_source_stamp(tag_dir)))
        os.replace(tmp, final)
    except OSError as e:
        raise CheckpointError(f"could not write the universal copy of {tag_dir} to {final}: {e}") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        latest_universal.unlink(missing_ok=True)
    return final


def prepare_universal(tag_dir: Path, *, rank: int) -> tuple[Path, bool]:
    """Collective: rank 0 converts ``tag_dir`` (or reuses its copy) while the others wait.

    Returns the universal directory and whether it was reused. Raises CheckpointError on every rank when
    the conversion failed.
    """
    import torch.distributed as dist

    reused, error = False, None
    if rank == 0:
        reused = is_current(tag_dir)
        try:
            convert(tag_dir)
        except CheckpointError as e:
            error = str(e)
    outcome: list[Any] = [(reused, error)]
    dist.broadcast_object_list(outcome, src=0)
    reused, error = outcome[0]
    if error is not None:
        raise CheckpointError(error)
    return universal_dir(tag_dir), reused


def resized_source(engine: Any, tag_dir: Path, meta: dict[str, Any], *, rank: int) -> Path | None:
    """Collective: the universal copy to load ``tag_dir`` from, or None when it loads as saved.

    Logs one line on rank 0 when the world size differs from the checkpoint's.
    """
    import torch.distributed as dist

    resize = plan_resize(meta, world_size=dist.get_world_size(), zero_stage=engine.zero_optimization_stage())
    if resize is None:
        return None
    universal, reused = prepare_universal(tag_dir, rank=rank) if resize.needs_universal else (None, False)
    if rank == 0:
        log.info(describe(resize, tag_dir, reused=reused))
    return universal


@contextlib.contextmanager
def universal_switch(engine: Any) -> Iterator[None]:
    """DeepSpeed's ``load_universal`` switch on for the loads inside the block, as it was afterwards.

    DeepSpeed reads the switch from the engine's parsed config at each load (nothing set up at initialise
    time depends on it), so scoping it to one load is exact.
    """
    config = getattr(engine, "_config", None)
    if config is None or not hasattr(config, "load_universal_checkpoint"):
        raise CheckpointError("this DeepSpeed version has no load_universal switch on its engine; resume "
                              "with the number of ranks the checkpoint was saved with.")
    before = config.load_universal_checkpoint
    config.load_universal_checkpoint = True
    try:
        yield
    finally:
        config.load_universal_checkpoint = before


def load_universal(engine: Any, universal: Path) -> str | None:
    """Load the engine state from a universal copy; the path DeepSpeed loaded, or None if it found nothing."""
    with universal_switch(engine):
        path, _ = engine.load_checkpoint(str(universal.parent), tag=universal.name)
    if path is not None:
        repair_universal_load(engine, universal)
    return path


def repair_universal_load(engine: Any, source: Path) -> None:
    """Undo what DeepSpeed 0.19.8's ZeRO-3 universal load gets wrong; nothing to do for ZeRO 1 and 2.

    Each parameter group gets the hyper-parameters saved for it (the load copies the first group's, so the
    no-decay group would decay), and each flat fp32 partition its own Adam ``step`` (the load shares one
    tensor, which the optimizer then advances once per group and step).
    """
    if engine.zero_optimization_stage() != 3:
        return
    inner = engine.optimizer.optimizer
    saved = load(source / "zero" / "optimizer_state.pt")
    groups = saved.get("optimizer_state_dict", {}).get("param_groups", [])
    if len(groups) != len(inner.param_groups):
        raise CheckpointError(f"{source}: the universal checkpoint has {len(groups)} parameter groups, the "
                              f"optimizer {len(inner.param_groups)}; resume with the recipe it was trained "
                              f"with.")
    for group, saved_group in zip(inner.param_groups, groups):
        group.update({k: v for k, v in saved_group.items() if k != "params"})
    for flat in engine.optimizer.fp32_partitioned_groups_flat:
        state = inner.state.get(flat, {})
        if isinstance(state.get("step"), torch.Tensor):
            state["step"] = state["step"].clone()


def describe(resize: Resize, tag_dir: Path, *, reused: bool) -> str:
    """The one log line of a resized resume."""
    head = f"world size changed from {resize.saved_world_size} to {resize.world_size}"
    if not resize.needs_universal:
        return f"{head}: the ZeRO-0 checkpoint {tag_dir.name} loads as saved"
    how = "reused its universal copy" if reused else "converted it to a universal checkpoint"
    return f"{head}: ZeRO-{resize.zero_stage} checkpoint {tag_dir.name}, {how} {universal_dir(tag_dir).name}"

