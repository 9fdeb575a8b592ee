"""The files of a checkpoint directory and their sizes and sha256, as recorded in its metadata at save."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

FILES_KEY = "files"  # in tessera.json: {relative path: {"size": bytes, "sha256": hex}}


def sha256_of(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def checkpoint_files(tag_dir: Path, *, meta_file: str) -> list[str]:
    """The files of a checkpoint directory (relative, sorted), but its metadata ``meta_file``."""
    return sorted(str(p.relative_to(tag_dir)) for p in tag_dir.rglob("*")
                  if p.is_file() and p.name != meta_file)


def describe_files(tag_dir: Path, names: list[str]) -> dict[str, dict[str, Any]]:
    """Size and sha256 of each named file of ``tag_dir``."""
    return {name: {"size": (tag_dir / name).stat().st_size, "sha256": sha256_of(tag_dir / name)}
            for name in names}
