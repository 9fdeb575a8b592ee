"""Loading checkpoint files without running code from them.

A ``.pt`` file is a pickle, and a plain ``torch.load(weights_only=False)`` runs whatever a pickle asks for: a
checkpoint copied from someone else could run any command. Every checkpoint, RNG state and optimizer state
Tessera reads goes through ``load``: ``torch.load(weights_only=True)``, which rebuilds tensors and plain
containers only, with the few classes DeepSpeed's own files hold allow-listed (measured by saving real
checkpoints under ZeRO 0-3, bf16 and a 2-stage pipeline, and their universal copies). A file that needs
anything else is refused with one line (``CheckpointError``) and nothing in it runs.

DeepSpeed reads its files itself (``engine.load_checkpoint``, its universal-checkpoint load, ``zero_to_fp32``,
``ds_to_universal``) with ``weights_only=False`` in some forty call sites. ``weights_only_loads`` routes them
through ``load``: for the duration of the block it replaces ``torch.load`` (the attribute every one of those
call sites looks up when it runs) with a weights-only loader. A custom DeepSpeed checkpoint engine would only
cover the loads made through the engine's ``checkpoint_engine``; the universal load, ``zero_to_fp32`` and the
converter call ``torch.load`` directly. The block is used only around Tessera's own checkpoint loads, in
the process that loads (no other thread loads files then); ``python -m train.checkpoint.run_safely MODULE
ARGS...`` runs a module (DeepSpeed's converter) under it in a child process.
"""

from __future__ import annotations

import contextlib
import importlib
import pickle
import re
import runpy
import sys
import zipfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch

from train.checkpoint.writer import CheckpointError

DEEPSPEED_GLOBALS = (
    "deepspeed.runtime.fp16.loss_scaler.LossScaler",  # ZeRO 1-3 optimizer states (fp32 and bf16)
    "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",  # the same under fp16
    "deepspeed.runtime.zero.config.ZeroStageEnum",  # ZeRO 1-3 optimizer states, universal optimizer_state.pt
    "deepspeed.utils.tensor_fragment.fragment_address",  # ZeRO 1-2 optimizer states
)
"""Classes DeepSpeed 0.19 pickles into its checkpoint files (attribute holders, an enum, a dataclass)."""

LEGACY_RNG_GLOBALS = (
    "numpy._core.multiarray._reconstruct",
    "numpy.ndarray",
    "numpy.dtype",
    "numpy.dtypes.UInt32DType",
)
"""What RNG files of Tessera's first checkpoint format hold (numpy's generator state as an array); only
``rng_rank*.pt`` files are read with these allowed."""


class RefusedFile(CheckpointError):
    """A checkpoint file whose pickle asks for objects a weights-only load refuses."""


class UnreadableFile(CheckpointError):
    """A checkpoint file that cannot be read (cut short, overwritten, not a torch file)."""


_TORCH_LOAD = torch.load  # the real loader, kept before any block replaces ``torch.load``
_GLOBAL = re.compile(r"GLOBAL ([\w.]+?)(?:\s|\.?$)", re.MULTILINE)


def _resolve(names: Iterable[str]) -> list[Any]:
    """The objects named ``module.qualname``; a name this installation does not have is left out."""
    found = []
    for name in names:
        module, _, attr = name.rpartition(".")
        try:
            found.append(getattr(importlib.import_module(module), attr))
        except (ImportError, AttributeError):
            continue
    return found


def refusal(path: Any, err: Exception) -> RefusedFile:
    """The one line for a file whose pickle asks for something a weights-only load refuses."""
    what = _GLOBAL.search(str(err))
    named = f" ({what.group(1)})" if what else ""
    return RefusedFile(f"{path}: holds objects a weights-only load refuses{named}; nothing in it was run. It "
                       f"was not written by Tessera or DeepSpeed, or was altered since: do not load it.")


def unreadable(path: Any, err: BaseException) -> UnreadableFile:
    """The one line for a file that cannot be read as a checkpoint file (cut short, overwritten, not one)."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    cause = lines[0] if lines else type(err).__name__
    if len(cause) > 200:
        cause = cause[:200] + "..."
    return UnreadableFile(f"{path}: unreadable ({type(err).__name__}: {cause}); the checkpoint file is "
                          f"damaged.")


def _refused(err: pickle.UnpicklingError) -> bool:
    """Whether torch's weights-only unpickler stopped at something it does not allow (not at broken bytes)."""
    text = str(err)
    return "GLOBAL" in text or "allowlisted" in text


def load(path: Any, *, map_location: Any = "cpu", mmap: bool | None = None, rng: bool = False,
         **kwargs: Any) -> Any:
    """``torch.load(path, weights_only=True)`` with DeepSpeed's classes (and with ``rng`` the old RNG format's
    numpy types) allowed; raises CheckpointError naming the file when it is refused or unreadable."""
    allowed = _resolve(DEEPSPEED_GLOBALS + (LEGACY_RNG_GLOBALS if rng else ()))
    kwargs.pop("pickle_module", None)  # weights_only brings its own unpickler
    kwargs.pop("weights_only", None)
    try:
        with torch.serialization.safe_globals(allowed):
            return _TORCH_LOAD(path, map_location=map_location, weights_only=True, mmap=mmap, **kwargs)
    except pickle.UnpicklingError as err:
        raise (refusal(path, err) if _refused(err) else unreadable(path, err)) from None
    except CheckpointError:
        raise
    except FileNotFoundError:
        raise  # DeepSpeed probes for optional files and handles their absence itself
    except Exception as err:  # a file cut short or overwritten fails in many ways (zip, unicode, EOF, ...)
        raise unreadable(path, err) from None


def probe(path: Path, *, rng: bool = False) -> None:
    """Unpickle ``path`` weights-only without reading its tensor data (memory-mapped); CheckpointError if it
    is refused or unreadable. Files in the old (non-zip) format are loaded whole."""
    try:
        mapped = zipfile.is_zipfile(path)
    except OSError as err:
        raise unreadable(path, err) from None
    load(path, mmap=mapped or None, rng=rng)


@contextlib.contextmanager
def weights_only_loads() -> Iterator[None]:
    """Every ``torch.load`` inside the block, DeepSpeed's included, is ``load`` (weights-only, allow-listed);
    ``weights_only=False`` asked by the caller is ignored. Restores the previous ``torch.load`` afterwards."""
    def guarded(f: Any, map_location: Any = None, pickle_module: Any = None, *,
                weights_only: bool | None = None, mmap: bool | None = None, **kwargs: Any) -> Any:
        return load(f, map_location=map_location, mmap=mmap, **kwargs)

    before = torch.load
    torch.load = guarded
    try:
        yield
    finally:
        torch.load = before


def run_module(argv: list[str]) -> None:
    """Run MODULE as ``__main__`` with ARGS (``argv``) and every load in it weights-only; a refused or
    unreadable file ends it with the one line and exit code 3. Its worker processes (forked) inherit the
    loader; the files the converter reads were checked by ``resume.preflight`` before it started."""
    module, *args = argv
    sys.argv = [module, *args]
    try:
        with weights_only_loads():
            runpy.run_module(module, run_name="__main__", alter_sys=True)
    except CheckpointError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(3)

