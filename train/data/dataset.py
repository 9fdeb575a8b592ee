"""Read prepared token files (memory-mapped) and cut them into fixed-length training samples."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from train.data.corpus import DataError, sha256_file
from train.data.prepare import FORMAT_NAME, FORMAT_VERSION, HEADER_FILE
from train.data.tokenizer import check_same_tokenizer

_MODES = ("blocks", "random")
_U64 = np.uint64
_GOLDEN = _U64(0x9E3779B97F4A7C15)
_MIX1 = _U64(0xBF58476D1CE4E5B9)
_MIX2 = _U64(0x94D049BB133111EB)


@dataclass(frozen=True)
class PreparedData:
    """A prepared dataset directory (see `train.data.prepare`), checked on open."""

    path: Path  # the prepared directory
    header: dict[str, Any]  # the parsed header.json

    @classmethod
    def open(
        cls, path: Path | str, *, expect_tokenizer: dict[str, Any] | None = None, verify: bool = False
    ) -> PreparedData:
        """Open `path`: check header and file sizes, plus tokenizer identity / checksums when asked."""
        root = Path(path)
        header_path = root / HEADER_FILE
        fix = "run tools/prepare_data.py to (re)create it"
        if not header_path.is_file():
            raise DataError(f"data_dir={root}: no {HEADER_FILE}, not a prepared dataset; {fix}")
        try:
            header = json.loads(header_path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as err:
            raise DataError(f"{header_path}: unreadable JSON ({err}); {fix}") from err
        if header.get("format") != FORMAT_NAME or header.get("format_version") != FORMAT_VERSION:
            raise DataError(
                f"{header_path}: format={header.get('format')!r} version={header.get('format_version')!r}, "
                f"expected {FORMAT_NAME!r} version {FORMAT_VERSION}; {fix}"
            )
        data = cls(root, header)
        if expect_tokenizer is not None:
            check_same_tokenizer(header["tokenizer"], expect_tokenizer, f"data_dir={root}")
        for name, info in header["splits"].items():
            file = root / info["file"]
            expected = info["n_tokens"] * data.dtype.itemsize
            actual = file.stat().st_size if file.is_file() else None
            if actual != expected:
                found = "is missing" if actual is None else f"has {actual} bytes"
                raise DataError(
                    f"{file}: split {name!r} {found}, header says {info['n_tokens']} tokens = {expected} "
                    f"bytes (truncated or foreign file); {fix}"
                )
            if verify and sha256_file(file) != info["sha256"]:
                raise DataError(f"{file}: sha256 differs from {HEADER_FILE} (corrupted); {fix}")
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

    def n_tokens(self, name: str) -> int:
        """Number of tokens in split `name`."""
        return int(self._split_info(name)["n_tokens"])

    def split(self, name: str) -> np.ndarray:
        """Split `name` ("train" / "val") as a read-only memory map of shape (n_tokens,)."""
        info = self._split_info(name)
        if info["n_tokens"] == 0:  # an empty file cannot be memory-mapped
            return np.empty(0, dtype=self.dtype)
        return np.memmap(self.path / info["file"], dtype=self.dtype, mode="r", shape=(info["n_tokens"],))

    def _split_info(self, name: str) -> dict[str, Any]:
        splits = self.header["splits"]
        if name not in splits:
            raise DataError(f"split={name!r} not in {self.path} (has {sorted(splits)}); use one of those")
        return splits[name]


def _mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser on a uint64 array (wrapping arithmetic): a well-spread hash of x."""
    x = (x ^ (x >> _U64(30))) * _MIX1
    x = (x ^ (x >> _U64(27))) * _MIX2
    return x ^ (x >> _U64(31))


class BlockDataset:
    """Samples of `seq_len` tokens from a flat token array, with labels = the next tokens.

    mode="blocks": sample i is tokens [i*T, i*T + T + 1): inputs its first T, labels its last T.
    Blocks step by T, so every token after the first is predicted exactly once; a last partial
    block is dropped. `len` = (n_tokens - 1) // T, or `num_samples` (<= that) to use fewer.
    mode="random": sample i starts at offset hash(seed, i) mod (n_tokens - T), the same for a given
    (seed, i) on every machine; `len` = `num_samples`, default (n_tokens - 1) // T.
    """

    def __init__(
        self,
        tokens: np.ndarray,
        seq_len: int,
        *,
        mode: str = "blocks",
        seed: int = 0,
        num_samples: int | None = None,
    ) -> None:
        if seq_len < 1:
            raise DataError(f"seq_len={seq_len} must be >= 1")
        if mode not in _MODES:
            raise DataError(f"mode={mode!r} is not one of {_MODES}")
        if tokens.ndim != 1 or tokens.shape[0] < seq_len + 1:
            raise DataError(
                f"the split has {tokens.shape[0] if tokens.ndim == 1 else tokens.shape} tokens, fewer "
                f"than seq_len+1={seq_len + 1}; lower seq_len or prepare more data"
            )
        n_blocks = (tokens.shape[0] - 1) // seq_len
        if num_samples is not None and (num_samples < 1 or (mode == "blocks" and num_samples > n_blocks)):
            allowed = f"[1, {n_blocks}]" if mode == "blocks" else "[1, inf)"
            raise DataError(
                f"num_samples={num_samples} must be in {allowed} for mode={mode!r} "
                f"(the split holds {n_blocks} blocks of seq_len={seq_len})"
            )
        self.tokens = tokens  # (N,) token ids, usually a read-only memmap
        self.seq_len = seq_len  # T: tokens per sample
        self.mode = mode  # "blocks" or "random"
        self.seed = seed  # seeds the random-mode offsets
        self.num_samples = num_samples if num_samples is not None else n_blocks  # dataset length
        self._seed_hash = _mix64(np.array([seed & 0xFFFFFFFFFFFFFFFF], dtype=_U64))[0]

    def __len__(self) -> int:
        return self.num_samples

    def offsets(self, indices: np.ndarray) -> np.ndarray:
        """Start token of each sample in `indices` (B,) -> (B,) int64, vectorised."""
        idx = np.asarray(indices, dtype=np.int64)
        if idx.size and (idx.min() < 0 or idx.max() >= self.num_samples):
            raise IndexError(f"sample index out of range [0, {self.num_samples}): {idx.min()}..{idx.max()}")
        if self.mode == "blocks":
            return idx * self.seq_len
        span = _U64(self.tokens.shape[0] - self.seq_len)  # number of valid start offsets
        counters = self._seed_hash + (idx.astype(_U64) + _U64(1)) * _GOLDEN
        return (_mix64(counters) % span).astype(np.int64)

    def batch(self, indices: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """Samples `indices` (B,) stacked: (input_ids (B, T), labels (B, T)), int64."""
        starts = self.offsets(indices)
        window = starts[:, None] + np.arange(self.seq_len + 1)  # (B, T+1)
        chunk = torch.from_numpy(np.asarray(self.tokens[window], dtype=np.int64))  # (B, T+1)
        return chunk[:, :-1].contiguous(), chunk[:, 1:].contiguous()

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Sample i: (input_ids (T,), labels (T,)), int64."""
        if not 0 <= i < self.num_samples:
            raise IndexError(f"sample index {i} out of range [0, {self.num_samples})")
        inputs, labels = self.batch(np.array([i]))
        return inputs[0], labels[0]
