"""The prepared-data format: token shards, a document index per shard, and a manifest with checksums.

A prepared dataset is a directory:

- `header.json`, the manifest: format name/version, tokenizer identity, vocab size, token dtype,
  document separator, the settings used, and per split (`train`, `val`) its document and token
  counts and the list of its shards, each with its file names, counts and sha256 checksums;
- `{split}-{k:05d}.bin`: raw little-endian token ids (`uint16` or `uint32`, no header bytes),
  documents concatenated, each followed by the separator token; a split's token stream is its
  shards in order;
- `{split}-{k:05d}.idx`: little-endian uint64 end offsets (exclusive, separator included) of the
  shard's documents, one per document, so document i of the shard is `bin[idx[i-1]:idx[i]]`.

`PreparedData.open` checks the manifest and every file's size (always, cheap), and the sha256 of
every file when `verify=True`; a truncated, missing or altered shard is one `DataError` naming the
file. A split is read as a `ShardedTokens`: one flat token stream over memory-mapped shards.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np

from train.data.corpus import DataError, sha256_file
from train.data.tokenizer import check_same_tokenizer

FORMAT_NAME = "tessera-tokens"
"""`format` field of header.json."""
FORMAT_VERSION = 2
"""`format_version` field of header.json; bumped on any incompatible change (1: one file per split)."""
HEADER_FILE = "header.json"
"""Name of the manifest inside a prepared dir."""
SPLITS = ("train", "val")
"""Split names."""
INDEX_DTYPE = np.dtype("<u8")
"""dtype of the `.idx` document end offsets."""
_FIX = "run tools/prepare_data.py to (re)create it"


def token_dtype(vocab_size: int, dtype: str = "auto") -> np.dtype:
    """On-disk token dtype: 'auto' is little-endian uint16 up to 65535 entries, else uint32.

    An explicit 'uint16' / 'uint32' is checked against the vocabulary (every id must fit).
    """
    if vocab_size < 1 or vocab_size > 2**32:
        raise DataError(f"vocab_size={vocab_size} must be in [1, 2**32]")
    if dtype == "auto":
        return np.dtype("<u2") if vocab_size <= 65535 else np.dtype("<u4")
    if dtype not in ("uint16", "uint32"):
        raise DataError(f"dtype={dtype!r} must be 'auto', 'uint16' or 'uint32'")
    chosen = np.dtype(dtype).newbyteorder("<")
    if vocab_size - 1 > np.iinfo(chosen).max:
        raise DataError(
            f"dtype={dtype!r} holds ids up to {np.iinfo(chosen).max} but the vocabulary has {vocab_size} "
            "entries; use dtype='uint32' (or 'auto')"
        )
    return chosen


def shard_name(split: str, k: int) -> str:
    """Base name (no suffix) of shard `k` of `split`."""
    return f"{split}-{k:05d}"


class ShardWriter:
    """Writes one shard of one split: its `.bin` tokens and `.idx` document ends, hashing both."""

    def __init__(self, folder: Path, split: str, k: int, dtype: np.dtype) -> None:
        self.name = shard_name(split, k)  # base name of both files
        self.bin_path = folder / f"{self.name}.bin"  # token file
        self.idx_path = folder / f"{self.name}.idx"  # document index file
        self.dtype = dtype  # on-disk token dtype
        self._bin: IO[bytes] = self.bin_path.open("wb")
        self._bin_digest = hashlib.sha256()
        self._ends: list[np.ndarray] = []  # document end offsets, one array per write
        self.n_docs = 0  # documents written so far
        self.n_tokens = 0  # tokens written so far (separators included)

    def write(self, docs: list[np.ndarray]) -> None:
        """Append documents (each already ending with the separator)."""
        if not docs:
            return
        tokens = np.concatenate(docs).astype(self.dtype, copy=False)
        lengths = np.fromiter((d.size for d in docs), dtype=np.int64, count=len(docs))
        self._ends.append((self.n_tokens + np.cumsum(lengths)).astype(INDEX_DTYPE))
        self._bin.write(tokens.data)
        self._bin_digest.update(tokens.data)
        self.n_docs += len(docs)
        self.n_tokens += int(tokens.size)

    def close(self) -> dict[str, Any]:
        """Flush both files to disk; return the shard's manifest entry."""
        self._bin.flush()
        self._bin.close()
        ends = np.concatenate(self._ends) if self._ends else np.empty(0, INDEX_DTYPE)
        ends.tofile(self.idx_path)
        return {
            "file": self.bin_path.name,
            "index": self.idx_path.name,
            "n_docs": self.n_docs,
            "n_tokens": self.n_tokens,
            "sha256": self._bin_digest.hexdigest(),
            "index_sha256": hashlib.sha256(ends.tobytes()).hexdigest(),
        }

    def abort(self) -> None:
        """Close without publishing (the caller deletes the folder or rewrites the shard)."""
        self._bin.close()


def check_shard_files(root: Path, shard: dict[str, Any], itemsize: int, *, verify: bool) -> str | None:
    """None when a shard's files have the sizes (and, with `verify`, the sha256) of its entry, else why not."""
    expected = {shard["file"]: shard["n_tokens"] * itemsize, shard["index"]: shard["n_docs"] * INDEX_DTYPE.itemsize}
    digests = {shard["file"]: shard["sha256"], shard["index"]: shard["index_sha256"]}
    for name, size in expected.items():
        path = root / name
        actual = path.stat().st_size if path.is_file() else None
        if actual is None:
            return f"{path} is missing"
        if actual != size:
            return f"{path} has {actual} bytes, the manifest says {size} (truncated or foreign file)"
    if verify:
        for name, digest in digests.items():
            if sha256_file(root / name) != digest:
                return f"{root / name}: sha256 differs from {HEADER_FILE} (altered or corrupted)"
    return None


class ShardedTokens:
    """One split's token stream: its shards' memory maps read as one flat (n_tokens,) array."""

    def __init__(self, shards: list[np.ndarray]) -> None:
        self.shards = [s for s in shards if s.size]  # non-empty (n_k,) memmaps, in order
        sizes = np.array([s.size for s in self.shards], dtype=np.int64)
        self.starts = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)  # (n_shards + 1,)
        self.dtype = self.shards[0].dtype if self.shards else np.dtype("<u2")
        self.ndim = 1
        self.shape = (int(self.starts[-1]),)

    def __len__(self) -> int:
        return self.shape[0]

    def windows(self, starts: np.ndarray, length: int) -> np.ndarray:
        """Tokens [s, s + length) for each s in `starts` (B,) -> (B, length) int64."""
        starts = np.asarray(starts, dtype=np.int64)
        out = np.empty((starts.size, length), dtype=np.int64)
        if starts.size and (starts.min() < 0 or starts.max() + length > self.shape[0]):
            raise IndexError(f"token window out of range [0, {self.shape[0]})")
        shard_of = np.searchsorted(self.starts, starts, side="right") - 1  # (B,)
        for row, (s, k) in enumerate(zip(starts.tolist(), shard_of.tolist(), strict=True)):
            local = s - int(self.starts[k])
            shard = self.shards[k]
            if local + length <= shard.size:  # the common case: inside one shard
                out[row] = shard[local : local + length]
            else:
                out[row] = self[s : s + length]
        return out

    def __getitem__(self, key: slice) -> np.ndarray:
        """A contiguous slice of the stream, copied across shard boundaries when needed."""
        if not isinstance(key, slice) or key.step not in (None, 1):
            raise TypeError("ShardedTokens supports contiguous slices and windows() only")
        start, stop, _ = key.indices(self.shape[0])
        parts = []
        for k, shard in enumerate(self.shards):
            lo, hi = max(start, int(self.starts[k])), min(stop, int(self.starts[k + 1]))
            if lo < hi:
                parts.append(shard[lo - self.starts[k] : hi - self.starts[k]])
        return np.concatenate(parts) if parts else np.empty(0, dtype=self.dtype)


@dataclass(frozen=True)
class PreparedData:
    """A prepared dataset directory, its manifest checked on open."""

    path: Path  # the prepared directory
    header: dict[str, Any]  # the parsed header.json (the manifest)

    @classmethod
    def open(
        cls, path: Path | str, *, expect_tokenizer: dict[str, Any] | None = None, verify: bool = False
    ) -> PreparedData:
        """Open `path`: check the manifest and file sizes, plus tokenizer identity / checksums when asked."""
        root = Path(path)
        header_path = root / HEADER_FILE
        if not header_path.is_file():
            raise DataError(f"data_dir={root}: no {HEADER_FILE}, not a prepared dataset; {_FIX}")
        try:
            header = json.loads(header_path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as err:
            raise DataError(f"{header_path}: unreadable JSON ({err}); {_FIX}") from err
        if header.get("format") != FORMAT_NAME or header.get("format_version") != FORMAT_VERSION:
            raise DataError(
                f"{header_path}: format={header.get('format')!r} version={header.get('format_version')!r}, "
                f"expected {FORMAT_NAME!r} version {FORMAT_VERSION}; {_FIX}"
            )
        data = cls(root, header)
        if data.vocab_size - 1 > np.iinfo(data.dtype).max:
            raise DataError(f"{header_path}: vocab_size={data.vocab_size} does not fit dtype={data.dtype.name}; {_FIX}")
        if expect_tokenizer is not None:
            check_same_tokenizer(header["tokenizer"], expect_tokenizer, f"data_dir={root}")
        for name, info in header["splits"].items():
            for shard in info["shards"]:
                problem = check_shard_files(root, shard, data.dtype.itemsize, verify=verify)
                if problem is not None:
                    raise DataError(f"split {name!r}: {problem}; {_FIX}")
        return data

    @property
    def vocab_size(self) -> int:
        """Number of token ids of the tokenizer the data was made with."""
        return int(self.header["vocab_size"])

    @property
    def dtype(self) -> np.dtype:
        """On-disk token dtype (little-endian uint16 or uint32)."""
        return np.dtype(self.header["dtype"]).newbyteorder("<")

    @property
    def doc_separator_id(self) -> int:
        """Token id that ends every document."""
        return int(self.header["doc_separator_id"])

    @property
    def fingerprint(self) -> str:
        """sha256 of the manifest: changes whenever any shard or setting does (keys index caches)."""
        return hashlib.sha256((self.path / HEADER_FILE).read_bytes()).hexdigest()

    def n_tokens(self, name: str) -> int:
        """Number of tokens in split `name`."""
        return int(self._split_info(name)["n_tokens"])

    def n_docs(self, name: str) -> int:
        """Number of documents in split `name`."""
        return int(self._split_info(name)["n_docs"])

    def split(self, name: str) -> ShardedTokens:
        """Split `name` ("train" / "val") as one read-only token stream of shape (n_tokens,)."""
        maps = [
            np.memmap(self.path / s["file"], dtype=self.dtype, mode="r", shape=(s["n_tokens"],))
            for s in self._split_info(name)["shards"]
            if s["n_tokens"]
        ]
        return ShardedTokens(maps)

    def doc_ends(self, name: str) -> np.ndarray:
        """End offsets (exclusive) of every document of split `name` in its token stream: (n_docs,) int64."""
        parts, base = [], 0
        for s in self._split_info(name)["shards"]:
            ends = np.fromfile(self.path / s["index"], dtype=INDEX_DTYPE).astype(np.int64)
            parts.append(ends + base)
            base += int(s["n_tokens"])
        return np.concatenate(parts) if parts else np.empty(0, np.int64)

    def _split_info(self, name: str) -> dict[str, Any]:
        splits = self.header["splits"]
        if name not in splits:
            raise DataError(f"split={name!r} not in {self.path} (has {sorted(splits)}); use one of those")
        return splits[name]
