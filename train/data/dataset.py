"""Packed pretraining samples: fixed-length windows over a split's token stream (documents joined by EOS).

With `doc_mask=True` a batch also carries, per token, the position inside its own document
(`position_ids`, restarting at 0 after every separator) and a document number (`doc_ids`), which
the model turns into attention that never crosses a document boundary; the label of a separator
(the first token of the next document, which its own document cannot predict) is then -100.
"""

from __future__ import annotations

from typing import Literal, get_args

import numpy as np
import torch

from train.data.corpus import DataError
from train.data.shards import PreparedData, ShardedTokens

__all__ = ["Batch", "BlockDataset", "PreparedData", "doc_positions"]

Batch = tuple[torch.Tensor, torch.Tensor] | tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]
"""(input_ids (B, T), labels (B, T)) or that plus model keyword tensors (e.g. position_ids, doc_ids)."""

Sampling = Literal["blocks", "random"]  # how training samples are cut from the token stream (data.sampling)
_MODES = get_args(Sampling)
_U64 = np.uint64
_GOLDEN = _U64(0x9E3779B97F4A7C15)
_MIX1 = _U64(0xBF58476D1CE4E5B9)
_MIX2 = _U64(0x94D049BB133111EB)


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
        doc_mask: bool = False,
        separator_id: int | None = None,
    ) -> None:
        if doc_mask and separator_id is None:
            raise DataError("doc_mask=True needs separator_id, the token that ends each document")
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
        self.tokens = tokens  # (N,) token ids: a read-only memmap or the ShardedTokens of a split
        self.seq_len = seq_len  # T: tokens per sample
        self.mode = mode  # "blocks" or "random"
        self.seed = seed  # seeds the random-mode offsets
        self.num_samples = num_samples if num_samples is not None else n_blocks  # dataset length
        self.doc_mask = doc_mask  # add position_ids / doc_ids so attention stops at document ends
        self.separator_id = separator_id  # token that ends every document
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

    def windows(self, indices: np.ndarray) -> np.ndarray:
        """Tokens of samples `indices` (B,): (B, T+1) int64, inputs then the last label."""
        starts = self.offsets(indices)
        if isinstance(self.tokens, ShardedTokens):
            return self.tokens.windows(starts, self.seq_len + 1)
        window = starts[:, None] + np.arange(self.seq_len + 1)  # (B, T+1)
        return np.asarray(self.tokens[window], dtype=np.int64)

    def batch(self, indices: np.ndarray) -> Batch:
        """Samples `indices` (B,) stacked: (input_ids (B, T), labels (B, T)) int64, plus with `doc_mask`
        a dict of position_ids (B, T) and doc_ids (B, T)."""
        chunk = self.windows(indices)  # (B, T+1)
        inputs, labels = chunk[:, :-1], chunk[:, 1:].copy()
        if not self.doc_mask:
            return torch.from_numpy(np.ascontiguousarray(inputs)), torch.from_numpy(labels)
        ends = inputs == self.separator_id  # (B, T): the last token of a document
        labels[ends] = -100
        positions, doc_ids = doc_positions(ends)
        extra = {"position_ids": torch.from_numpy(positions), "doc_ids": torch.from_numpy(doc_ids)}
        return torch.from_numpy(np.ascontiguousarray(inputs)), torch.from_numpy(labels), extra

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Sample i: (input_ids (T,), labels (T,)), int64."""
        if not 0 <= i < self.num_samples:
            raise IndexError(f"sample index {i} out of range [0, {self.num_samples})")
        inputs, labels = self.batch(np.array([i]))[:2]
        return inputs[0], labels[0]


def doc_positions(ends: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-token position in its document and document number, from where documents end.

    ends: (B, T) bool, True at a document's last token (its separator); a new document starts after
    each. Returns position_ids (B, T) int64 (0 at each document start) and doc_ids (B, T) int64
    (0 for the document the row starts in, counting up).
    """
    B, T = ends.shape
    starts = np.zeros((B, T), dtype=bool)
    starts[:, 0] = True
    starts[:, 1:] = ends[:, :-1]
    doc_ids = np.cumsum(starts, axis=1, dtype=np.int64) - 1  # (B, T)
    col = np.broadcast_to(np.arange(T, dtype=np.int64), (B, T))
    first = np.maximum.accumulate(np.where(starts, col, 0), axis=1)  # (B, T): where this document began
    return col - first, doc_ids
