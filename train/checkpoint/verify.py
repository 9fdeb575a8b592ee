"""Which checkpoint to trust: the size and sha256 of every file, recorded at save and checked before a load.

A save records, in its ``tessera.json`` (before the rename that makes the checkpoint complete)::

    "files": {"mp_rank_00_model_states.pt": {"size": 12646383, "sha256": "9f2c..."}, ...}

every file of the checkpoint directory but ``tessera.json`` itself (the ranks hash their shares of the files
in parallel). Before a resume or an export:

* sizes are always compared (a stat per file): a file cut short by a full disk or a failed copy is found;
* checksums when asked (``--verify-checksums``; an export always), or after a file failed to load: a flipped
  bit inside tensor data loads without any error, only its checksum shows it.

``--resume auto`` (and an export of a run directory) takes the newest checkpoint that verifies and warns
naming each file that made it skip a newer one; a checkpoint named outright that fails is one error naming
the file. A ``tessera.json`` that is not JSON is skipped (or, named, refused) the same way. A checkpoint
written before file lists were recorded loads with its sizes unchecked, and the log says so.

A mismatching file is also unpickled weights-only (``safe_load.probe``): one that holds objects such a load
refuses was put there by someone, and is refused outright rather than skipped as damage.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from train.checkpoint.files import FILES_KEY, sha256_of
from train.checkpoint.safe_load import UnreadableFile, probe
from train.checkpoint.writer import META_FILE, CheckpointError, complete_checkpoints

log = logging.getLogger("tessera")
_verified: dict[tuple[str, bool], tuple] = {}  # this process's passed verifications: the files' stats then


class BadCheckpoint(CheckpointError):
    """A checkpoint that fails verification (a damaged file or unreadable metadata)."""


def load_meta(tag_dir: Path) -> dict[str, Any]:
    """The checkpoint's tessera.json; BadCheckpoint when it is missing, unreadable or not a JSON object."""
    path = tag_dir / META_FILE
    try:
        meta = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError) as err:
        raise BadCheckpoint(f"{path}: unreadable ({err}).") from None
    except json.JSONDecodeError as err:
        raise BadCheckpoint(f"{path}: not valid JSON ({err}); the checkpoint's metadata is damaged.") \
            from None
    if not isinstance(meta, dict):
        raise BadCheckpoint(f"{path}: not a JSON object; the checkpoint's metadata is damaged.")
    _check_fields(meta, path)
    return meta


# The type of each field of tessera.json that resuming and exporting read (None is allowed for each).
META_FIELDS: dict[str, type | tuple[type, ...]] = {
    "step": int, "consumed_samples": int, "world_size": int, "format_version": int, "saved_at": (int, float),
    "val_ema": (int, float), "best_val_ema": (int, float), "run_id": str, "tokenizer_dir": str,
    "model_args": dict, "config": dict, "tokenizer": dict, "hf": dict, "research": dict, "head": dict,
    FILES_KEY: dict,
}
LAYOUT_FIELDS = ("tp", "pp")  # config.parallel.tp / .pp: ints


def _check_fields(meta: dict[str, Any], path: Path) -> None:
    """BadCheckpoint naming the first field of ``meta`` of the wrong type."""
    def wrong(field: str, value: Any, want: str) -> BadCheckpoint:
        shown = json.dumps(value)[:40]
        return BadCheckpoint(f"{path}: {field} is {type(value).__name__} {shown}, not {want}; the "
                             f"checkpoint's metadata is damaged.")

    for field, kind in META_FIELDS.items():
        value = meta.get(field)
        if value is not None and (not isinstance(value, kind) or isinstance(value, bool) and kind is int):
            names = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
            want = {"dict": "an object", "str": "a string"}.get(names, f"a number ({names})")
            raise wrong(field, value, want)
    parallel = (meta.get("config") or {}).get("parallel")
    if parallel is not None and not isinstance(parallel, dict):
        raise wrong("config.parallel", parallel, "an object")
    for name in LAYOUT_FIELDS:
        value = (parallel or {}).get(name)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool)):
            raise wrong(f"config.parallel.{name}", value, "an integer")


def file_problem(tag_dir: Path, name: str, want: dict[str, Any], *, checksums: bool) -> str | None:
    """Why file ``name`` of ``tag_dir`` is not the file saved (None when it is)."""
    path = tag_dir / name
    try:
        size = path.stat().st_size
    except OSError:
        return f"{path} is missing"
    if size != want.get("size"):
        return f"{path} has {size:,} bytes, {want.get('size', 0):,} were saved"
    if checksums and want.get("sha256") and sha256_of(path) != want["sha256"]:
        return f"{path} differs from the file saved (sha256 {want['sha256'][:12]}...)"
    return None


def verify(tag_dir: Path, *, checksums: bool) -> dict[str, Any]:
    """Check ``tag_dir`` against the file list in its metadata; return the metadata.

    Raises BadCheckpoint naming the first damaged file, or RefusedFile (not a BadCheckpoint) when that file
    holds objects a weights-only load refuses. A checkpoint without a file list passes (nothing to compare).
    """
    meta = load_meta(tag_dir)
    files = meta.get(FILES_KEY)
    if files is None:
        return meta
    seen = _stats(tag_dir, [META_FILE, *files])
    key = str(tag_dir.resolve())
    if seen is not None and seen in (_verified.get((key, True)), _verified.get((key, checksums))):
        return meta  # verified already in this process, and no file changed since (an export resolves twice)
    if not isinstance(files, dict):
        raise BadCheckpoint(f"{tag_dir / META_FILE}: its file list is damaged.")
    for name in sorted(files):
        problem = file_problem(tag_dir, name, files[name], checksums=checksums)
        if problem is not None:
            path = tag_dir / name
            if path.is_file() and path.suffix == ".pt":
                try:  # a file with foreign objects in it is refused outright (RefusedFile), not skipped
                    probe(path, rng=path.name.startswith("rng_rank"))
                except UnreadableFile:
                    pass
            raise BadCheckpoint(f"{problem}; the checkpoint {tag_dir.name} is damaged.")
    if seen is not None:
        _verified[(key, checksums)] = seen
    return meta


def _stats(tag_dir: Path, names: list[str]) -> tuple | None:
    """Size and modification time of each file (None if one is missing): what a rewrite would change."""
    try:
        return tuple((name, st.st_size, st.st_mtime_ns) for name in names for st in [(tag_dir / name).stat()])
    except OSError:
        return None


def _note_unlisted(tag_dir: Path, meta: dict[str, Any], say: Callable[[str], None]) -> None:
    if meta.get(FILES_KEY) is None:
        say(f"checkpoint {tag_dir} was written without a file list (by an earlier Tessera): the sizes and "
            f"checksums of its files are not checked")


def newest_verified(out_dir: str | Path, *, checksums: bool, warn: Callable[[str], None] | None = None,
                    info: Callable[[str], None] | None = None) -> Path | None:
    """The newest complete checkpoint of ``out_dir`` that verifies (None if none does); each one skipped is
    reported through ``warn`` with the file that failed."""
    warn = warn or log.warning
    info = info or log.info
    for tag_dir in reversed(complete_checkpoints(out_dir)):
        try:
            meta = verify(tag_dir, checksums=checksums)
        except BadCheckpoint as err:
            warn(f"skipping {tag_dir.name}: {err}")
            continue
        _note_unlisted(tag_dir, meta, info)
        return tag_dir
    return None


def verified(tag_dir: Path, *, checksums: bool, info: Callable[[str], None] | None = None) -> Path:
    """``tag_dir`` if it verifies, else CheckpointError naming the damaged file (for a named checkpoint)."""
    meta = verify(tag_dir, checksums=checksums)
    _note_unlisted(tag_dir, meta, info or log.info)
    return tag_dir


def damage_report(tag_dir: Path, path: Path) -> str:
    """After ``path`` of ``tag_dir`` failed to load: whether it is still the file that was saved."""
    try:
        meta = load_meta(tag_dir)
        rel = str(Path(path).resolve().relative_to(tag_dir.resolve()))
    except (BadCheckpoint, ValueError):
        return ""
    want = (meta.get(FILES_KEY) or {}).get(rel)
    if not isinstance(want, dict):
        return ""
    problem = file_problem(tag_dir, rel, want, checksums=True)
    if problem is None:
        return " It matches the checksum recorded when it was saved: it was written this way."
    return (f" {problem}: it was damaged after the save. Resume with --resume auto --verify-checksums to "
            f"continue from the newest checkpoint that verifies.")
