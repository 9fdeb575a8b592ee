"""From what a user names (files, directories, globs) to the list of inputs that are read.

One resolver serves `data.files` (every corpus that reads it), the streamed sources of `data.blend`,
`tools/train_tokenizer.py` and `tools/prepare_data.py`:

- a file named on its own is read whatever its suffix: `.jsonl` / `.json` as JSON lines, `.parquet` as a
  table, anything else as one plain-text document;
- a directory holding `state.json` or `dataset_dict.json` is a dataset written by `datasets`'
  `save_to_disk` and is read as one;
- any other directory is walked recursively (sorted, hidden entries left out): files whose suffix is one of
  `TEXT_SUFFIXES`, `.jsonl` / `.json` or `.parquet` are read, other files are skipped and counted by suffix;
  a sub-directory written by `save_to_disk` is read as a dataset;
- a glob (`*`, `?`, `[`; `**` recurses) expands like the files and directories it matches, except that a
  match whose suffix the pattern itself names (`logs/*.log`) is read as text.

A caller that reads only some formats narrows the suffixes taken from directories and globs (`accept`; the
supervised corpora take `.jsonl` / `.json` / `.parquet`).

Empty (0-byte) files are skipped and counted, never a refusal of the whole list. Several formats in one list
are fine: each file is read by its own suffix. A path that does not exist, or a glob that matches nothing, is
an error naming it; so is a list that leaves no usable file at all (the message says what was skipped).
"""

from __future__ import annotations

import glob
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePath

TEXT_SUFFIXES = (".txt", ".text", ".md", ".rst")
"""Suffixes read as plain text (one document per file) when found in a directory or a glob."""
JSON_SUFFIXES = (".jsonl", ".json")
"""Suffixes read as JSON lines (one document per line's `text_field`)."""
PARQUET_SUFFIXES = (".parquet",)
"""Suffixes read as parquet tables (one document per row's `text_field`)."""
HF_SAVED_MARKERS = ("state.json", "dataset_dict.json")
"""Files that mark a directory written by `datasets`' `save_to_disk`."""


class DataError(ValueError):
    """A data input, file or setting is unusable; the message names it and says how to fix it."""


class InputError(DataError):
    """Named inputs that do not exist or leave nothing to read; the message names them and the fix."""


def input_kind(path: Path) -> str:
    """'dataset', 'jsonl', 'parquet' or 'text': how `path` (a resolved input) is read."""
    if path.is_dir():
        return "dataset"
    if path.suffix.lower() in JSON_SUFFIXES:
        return "jsonl"
    if path.suffix.lower() in PARQUET_SUFFIXES:
        return "parquet"
    return "text"


def is_saved_dataset(path: Path) -> bool:
    """Whether `path` is a directory written by `datasets`' `save_to_disk`."""
    return path.is_dir() and any((path / marker).is_file() for marker in HF_SAVED_MARKERS)


ALL_SUFFIXES = (*TEXT_SUFFIXES, *JSON_SUFFIXES, *PARQUET_SUFFIXES)
"""Suffixes read by default when found in a directory or a glob."""


@dataclass
class ResolvedInputs:
    """The inputs to read, in order, and what was left out."""

    paths: list[Path] = field(default_factory=list)  # files and saved-dataset directories, in reading order
    empty: list[Path] = field(default_factory=list)  # 0-byte files skipped
    other: Counter[str] = field(default_factory=Counter)  # skipped files by suffix ('' for none)

    def kinds(self) -> Counter[str]:
        """How many inputs of each kind ('text', 'jsonl', 'parquet', 'dataset')."""
        return Counter(input_kind(p) for p in self.paths)

    def skipped(self) -> str:
        """What was left out, in words ('' when nothing was)."""
        parts = []
        if self.empty:
            parts.append(f"{len(self.empty)} empty file{'s' if len(self.empty) != 1 else ''}")
        if self.other:
            by_suffix = ", ".join(f"{n} {s or 'without suffix'}" for s, n in sorted(self.other.items()))
            parts.append(f"{sum(self.other.values())} of other types ({by_suffix})")
        return "; ".join(parts)

    def summary(self) -> str:
        """One line: the inputs by kind, then what was skipped."""
        kinds = ", ".join(f"{n} {k}" for k, n in sorted(self.kinds().items()))
        skipped = self.skipped()
        return f"{len(self.paths)} inputs ({kinds})" + (f"; skipped {skipped}" if skipped else "")


def _add_file(found: ResolvedInputs, path: Path, *, named: bool, seen: set[Path], accept: Sequence[str]) -> None:
    key = path.resolve()
    if key in seen:
        return
    seen.add(key)
    if not named and path.suffix.lower() not in accept:
        found.other[path.suffix.lower()] += 1
    elif path.stat().st_size == 0:
        found.empty.append(path)
    else:
        found.paths.append(path)


def _add_dir(found: ResolvedInputs, folder: Path, seen: set[Path], accept: Sequence[str]) -> None:
    key = folder.resolve()
    if key in seen:  # named twice, or reached again through a symbolic link (a loop ends here)
        return
    seen.add(key)
    if is_saved_dataset(folder):
        found.paths.append(folder)
        return
    for entry in sorted(folder.iterdir()):
        if entry.name.startswith("."):
            continue
        if entry.is_dir():
            _add_dir(found, entry, seen, accept)
        elif entry.is_file():
            _add_file(found, entry, named=False, seen=seen, accept=accept)


def resolve_inputs(inputs: Sequence[Path | str], *, where: str = "inputs",
                   accept: Sequence[str] = ALL_SUFFIXES) -> ResolvedInputs:
    """Expand files, directories and globs into the inputs to read (see the module doc).

    where: how the caller names the list in messages (e.g. 'data.files').
    accept: the suffixes read when found in a directory or a glob (others are skipped and counted); a file
    named on its own is kept whatever its suffix.
    Raises InputError naming every missing path and unmatched glob, or saying that nothing usable is left.
    """
    if not inputs:
        raise InputError(f"{where}=[]: no input given; name text / .jsonl / .parquet files, directories or globs")
    found = ResolvedInputs()
    seen: set[Path] = set()
    problems = []
    for item in inputs:
        text = str(item)
        if glob.has_magic(text):
            matches = sorted(Path(m) for m in glob.glob(text, recursive=True))
            if not matches:
                problems.append(f"{text}: the glob matches nothing")
            suffix = PurePath(text).suffix.lower()
            for match in matches:
                if match.is_dir():
                    _add_dir(found, match, seen, accept)
                elif match.is_file():
                    _add_file(found, match, named=bool(suffix) and match.suffix.lower() == suffix, seen=seen,
                              accept=accept)
            continue
        path = Path(text)
        if path.is_dir():
            _add_dir(found, path, seen, accept)
        elif path.is_file():
            _add_file(found, path, named=True, seen=seen, accept=accept)
        else:
            problems.append(f"{path}: does not exist")
    if problems:
        raise InputError(f"{where}: " + "; ".join(problems) + "; fix the paths or drop them")
    if not found.paths:
        skipped = found.skipped() or "nothing found in the directories"
        what = (f"text ({', '.join(TEXT_SUFFIXES)}), .jsonl or .parquet" if tuple(accept) == ALL_SUFFIXES
                else " / ".join(accept))
        raise InputError(
            f"{where}={[str(i) for i in inputs]} leave no file to read (skipped {skipped}); name non-empty "
            f"{what} files, directories holding them, or globs"
        )
    return found
