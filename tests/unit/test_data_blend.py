"""Blending: proportions, determinism, per-dataset coverage, the cached index, and weight errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from train.data.blend import BlendDataset, blend_index, check_weights, largest_unrepeated
from train.data.corpus import DataError
from train.data.dataset import BlockDataset


class _Tagged:
    """Dataset d of size n: sample s is the row [d, s] (inputs) / [d, s] (labels)."""

    def __init__(self, d: int, n: int) -> None:
        self.d, self.n = d, n

    def __len__(self) -> int:
        return self.n

    def batch(self, indices: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        idx = torch.as_tensor(np.asarray(indices), dtype=torch.int64)
        rows = torch.stack([torch.full_like(idx, self.d), idx], dim=1)  # (B, 2)
        return rows, rows.clone()


def test_proportions_hold_over_a_large_sample_and_every_prefix() -> None:
    weights, sizes, n = [0.5, 0.3, 0.2], [1000, 100_000, 300], 200_000
    owners, samples = blend_index(weights, sizes, n, seed=3)
    counts = np.bincount(owners, minlength=3)
    assert np.allclose(counts / n, weights, atol=1e-4)
    for prefix in (10, 333, 4096, 77_777):  # every prefix is within one sample of its share
        got = np.bincount(owners[:prefix], minlength=3)
        assert np.all(np.abs(got - np.array(weights) * prefix) <= 1.0 + 1e-9)
    for d, size in enumerate(sizes):
        mine = samples[owners == d]
        assert mine.min() >= 0 and mine.max() < size
        passes = counts[d] // size
        assert np.all(np.bincount(mine, minlength=size) >= passes)  # whole passes over the dataset first
    assert np.unique(samples[owners == 1]).size == counts[1]  # an under-sampled dataset repeats nothing


def test_index_is_deterministic_and_depends_on_seed_and_weights() -> None:
    a = blend_index([1, 1], [100, 100], 500, seed=0)
    b = blend_index([1, 1], [100, 100], 500, seed=0)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not np.array_equal(a[1], blend_index([1, 1], [100, 100], 500, seed=1)[1])
    assert not np.array_equal(a[0], blend_index([2, 1], [100, 100], 500, seed=0)[0])
    owners, _ = blend_index([0.0, 1.0], [5, 100], 50, seed=0)
    assert (owners == 1).all()  # a zero weight never draws


def test_blend_batches_rows_in_order_and_the_cache_reopens(tmp_path: Path) -> None:
    parts = [_Tagged(0, 40), _Tagged(1, 1000)]
    blend = BlendDataset(parts, [0.25, 0.75], num_samples=4000, seed=1, fingerprints=["a", "b"], cache_dir=tmp_path)
    idx = np.array([7, 3, 3999, 0, 1])
    x, _ = blend.batch(idx)
    assert x[:, 0].tolist() == blend.dataset_index[idx].tolist()
    assert x[:, 1].tolist() == blend.sample_index[idx].tolist()
    assert blend.counts(0, 4000).tolist() == [1000, 3000]
    files = sorted(p.name for p in blend.cache_path.iterdir())
    assert files == ["dataset_index.npy", "sample_index.npy"]
    again = BlendDataset(parts, [0.25, 0.75], num_samples=4000, seed=1, fingerprints=["a", "b"], cache_dir=tmp_path)
    assert isinstance(again.dataset_index, np.memmap) and np.array_equal(again.sample_index, blend.sample_index)
    other = BlendDataset(parts, [0.25, 0.75], num_samples=4000, seed=1, fingerprints=["a", "c"], cache_dir=tmp_path)
    assert other.cache_path != blend.cache_path  # another dataset content gets its own index


def test_blend_of_block_datasets_carries_doc_masks() -> None:
    a = BlockDataset(np.array([5, 6, 0, 7, 8, 9, 0] * 10, dtype=np.uint16), 4, doc_mask=True, separator_id=0)
    b = BlockDataset(np.arange(1, 60, dtype=np.uint16), 4, doc_mask=True, separator_id=0)
    blend = BlendDataset([a, b], [1, 1], num_samples=20, seed=0)
    x, y, extra = blend.batch(np.arange(6))
    for row in range(6):
        part = (a, b)[int(blend.dataset_index[row])]
        px, py, pextra = part.batch(np.array([blend.sample_index[row]]))
        assert torch.equal(x[row], px[0]) and torch.equal(y[row], py[0])
        assert torch.equal(extra["doc_ids"][row], pextra["doc_ids"][0])


@pytest.mark.parametrize("weights", [[0, 0], [-1, 2], [float("nan"), 1], []])
def test_weights_that_do_not_sum_to_a_positive_number(weights: list[float]) -> None:
    with pytest.raises(DataError, match=r"weights must be finite, >= 0 and sum to a positive number|one weight"):
        check_weights(weights)


def test_errors_and_unrepeated_length() -> None:
    with pytest.raises(DataError, match="dataset 1 has weight 0.5 but no samples"):
        blend_index([1, 1], [10, 0], 5, seed=0)
    with pytest.raises(DataError, match="2 weights for 3 datasets"):
        blend_index([1, 1], [1, 2, 3], 5, seed=0)
    assert largest_unrepeated([0.5, 0.5], [10, 100]) == 20
    assert largest_unrepeated([0.0, 1.0], [0, 7]) == 7


def test_a_longer_mixture_extends_the_same_order() -> None:
    short = blend_index([0.6, 0.3, 0.1], [50, 400, 7], 900, seed=2)
    long = blend_index([0.6, 0.3, 0.1], [50, 400, 7], 5000, seed=2)
    assert all(np.array_equal(s, lg[:900]) for s, lg in zip(short, long))  # more steps keep the first samples
