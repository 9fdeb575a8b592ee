"""A weighted mixture of datasets with one deterministic, cached sample order.

`blend_index(weights, sizes, num_samples, seed)` decides, for each of `num_samples` positions, which
dataset it draws from and which sample of that dataset:

- dataset i gets its j-th sample at "time" (j + 1/2) / w_i (weights normalised); merging all
  datasets by time (one stable argsort) makes every prefix of the order hold within one sample of
  w_i * n samples of dataset i, with the datasets evenly interleaved;
- dataset i's samples come in a seeded permutation of its own (a fresh one each time it wraps),
  so a dataset that is under-sampled still contributes from all of its data.

Everything is vectorised numpy (an argsort of about `num_samples` floats plus one permutation per
dataset pass), and `BlendDataset` caches the two arrays as `.npy` files keyed by the datasets'
fingerprints and the settings, so a restarted run memory-maps them instead of building them again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from train.data.corpus import DataError, atomic_dir
from train.data.dataset import Batch
from train.data.sampler import BatchSource

_log = logging.getLogger("tessera")
INDEX_FILES = ("dataset_index.npy", "sample_index.npy")
"""Files of a cached blend index."""


def check_weights(weights: Sequence[float], where: str = "weights") -> np.ndarray:
    """Weights as a float64 array that sums to 1, or a DataError naming them."""
    w = np.asarray(weights, dtype=np.float64)
    if w.ndim != 1 or w.size == 0:
        raise DataError(f"{where}={list(weights)}: give one weight per dataset")
    if not np.all(np.isfinite(w)) or (w < 0).any() or w.sum() <= 0:
        raise DataError(
            f"{where}={list(weights)}: weights must be finite, >= 0 and sum to a positive number "
            "(e.g. [0.7, 0.3])"
        )
    return w / w.sum()


def _dataset_samples(i: int, n: int, size: int, seed: int) -> np.ndarray:
    """The first n samples dataset i gives: seeded permutations of [0, size), one per pass. (n,) int64."""
    passes = -(-n // size)
    perms = [np.random.default_rng([seed, i, p]).permutation(size) for p in range(passes)]
    return np.concatenate(perms)[:n] if perms else np.empty(0, np.int64)


def blend_index(
    weights: Sequence[float], sizes: Sequence[int], num_samples: int, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """(dataset_index (N,) uint16, sample_index (N,) int64) of an N-sample weighted mixture."""
    w = check_weights(weights)
    sizes_arr = np.asarray(sizes, dtype=np.int64)
    if len(sizes_arr) != len(w) or len(w) > np.iinfo(np.uint16).max:
        raise DataError(f"{len(w)} weights for {len(sizes_arr)} datasets; give one weight per dataset")
    if num_samples < 1:
        raise DataError(f"num_samples={num_samples} must be >= 1")
    empty = [i for i in range(len(w)) if w[i] > 0 and sizes_arr[i] < 1]
    if empty:
        raise DataError(f"dataset {empty[0]} has weight {w[empty[0]]:.3g} but no samples; drop it or add data")
    active = np.flatnonzero(w > 0)
    caps = np.ceil(w[active] * num_samples).astype(np.int64) + 1  # more than any prefix of N can take
    times = np.concatenate([(np.arange(c) + 0.5) / w[i] for i, c in zip(active, caps, strict=True)])
    owner = np.repeat(active.astype(np.uint16), caps)
    order = np.argsort(times, kind="stable")[:num_samples]  # (N,)
    dataset_index = owner[order]
    sample_index = np.empty(num_samples, dtype=np.int64)
    for i in active:
        sel = dataset_index == i
        count = int(sel.sum())  # dataset i's draws come in the order of their times: j = 0, 1, ...
        sample_index[sel] = _dataset_samples(int(i), count, int(sizes_arr[i]), seed)
    return dataset_index, sample_index


def largest_unrepeated(weights: Sequence[float], sizes: Sequence[int]) -> int:
    """The longest mixture in which no dataset repeats a sample (used for validation)."""
    w = check_weights(weights)
    return int(min(sizes[i] / w[i] for i in range(len(w)) if w[i] > 0))


class BlendDataset:
    """Samples drawn from several datasets by weight: sample k is `parts[d[k]]` sample `s[k]`.

    parts: datasets with `batch(indices)` that return batches of the same shapes (same seq_len,
    same doc masking); fingerprints: one string per part that changes when its data does (keys
    the cache); cache_dir: where the index is cached (None: build in memory every time).
    """

    def __init__(
        self,
        parts: Sequence[BatchSource],
        weights: Sequence[float],
        *,
        num_samples: int,
        seed: int,
        fingerprints: Sequence[str] | None = None,
        cache_dir: Path | str | None = None,
    ) -> None:
        self.parts = list(parts)  # the datasets mixed
        self.weights = check_weights(weights)  # (K,) normalised weights
        self.num_samples = num_samples  # N: length of the mixture
        sizes = [len(p) for p in self.parts]
        start = time.perf_counter()
        if cache_dir is None or fingerprints is None:
            self.dataset_index, self.sample_index = blend_index(self.weights, sizes, num_samples, seed)
            self.cache_path: Path | None = None
        else:
            key = json.dumps([list(fingerprints), self.weights.tolist(), sizes, num_samples, seed])
            self.cache_path = Path(cache_dir) / f"blend-{hashlib.sha256(key.encode()).hexdigest()[:16]}"
            self.dataset_index, self.sample_index = _cached_index(self.cache_path, self.weights, sizes,
                                                                  num_samples, seed)
        self.build_s = time.perf_counter() - start  # seconds spent building or opening the index

    def __len__(self) -> int:
        return self.num_samples

    def batch(self, indices: np.ndarray) -> Batch:
        """Samples `indices` (B,) of the mixture, rows in the order asked, as the parts return them."""
        idx = np.asarray(indices, dtype=np.int64)
        if idx.size and (idx.min() < 0 or idx.max() >= self.num_samples):
            raise IndexError(f"sample index out of range [0, {self.num_samples}): {idx.min()}..{idx.max()}")
        owners = np.asarray(self.dataset_index[idx])
        samples = np.asarray(self.sample_index[idx])
        out: list[torch.Tensor] | None = None
        extra: dict[str, torch.Tensor] = {}
        for d in np.unique(owners).tolist():
            rows = np.flatnonzero(owners == d)
            got = self.parts[d].batch(samples[rows])
            if out is None:
                out = [torch.empty((idx.size, *t.shape[1:]), dtype=t.dtype) for t in got[:2]]
                if len(got) == 3:
                    extra = {k: torch.empty((idx.size, *v.shape[1:]), dtype=v.dtype) for k, v in got[2].items()}
            rows_t = torch.from_numpy(rows)
            for dest, src in zip(out, got[:2], strict=True):
                dest[rows_t] = src
            for k, v in (got[2].items() if len(got) == 3 else ()):
                extra[k][rows_t] = v
        if out is None:
            raise IndexError("an empty batch: give at least one sample index")
        return (out[0], out[1], extra) if extra else (out[0], out[1])

    def counts(self, start: int, count: int) -> np.ndarray:
        """How many of positions [start, start + count) each dataset supplies: (K,) int64."""
        owners = np.asarray(self.dataset_index[start : start + count])
        return np.bincount(owners, minlength=len(self.parts)).astype(np.int64)


def _cached_index(
    path: Path, weights: np.ndarray, sizes: list[int], num_samples: int, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Memory-map the index at `path`, building and saving it first when it is not there."""
    if not all((path / f).is_file() for f in INDEX_FILES):
        arrays = blend_index(weights, sizes, num_samples, seed)
        try:
            with atomic_dir(path) as tmp:
                for name, array in zip(INDEX_FILES, arrays, strict=True):
                    np.save(tmp / name, array)
            _log.info("blend index of %d samples cached in %s", num_samples, path)
        except DataError:  # another rank published it first: use theirs (the same content)
            if not all((path / f).is_file() for f in INDEX_FILES):
                raise
    dataset_index, sample_index = (np.load(path / f, mmap_mode="r") for f in INDEX_FILES)
    if dataset_index.shape != (num_samples,) or sample_index.shape != (num_samples,):
        raise DataError(f"{path}: a damaged blend index cache; delete the folder and it is rebuilt")
    return dataset_index, sample_index
