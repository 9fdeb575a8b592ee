"""Which sample each rank trains on, independent of the data-parallel size and exactly resumable.

One global stream of sample indices is defined by `GlobalOrder` alone (dataset length, seed):
epoch e is a permutation of [0, N) seeded by (seed, e), and the k-th consumed sample is
`order.index(k)`. Global step s trains on stream positions [c, c + global_batch) where c is the
number of samples consumed before it; data-parallel rank r takes the contiguous slice
[r * gb/dp, (r+1) * gb/dp) of that window and cuts it into micro-batches of `micro_batch`, in
order (gradient accumulation = gb / (mb * dp)). So the samples of a global step do not depend on
dp, ranks never share a stream position, and `consumed_samples` alone resumes the stream. (Within
an epoch that means no shared sample; a step that straddles an epoch boundary takes the end of one
permutation and the start of the next, so it can hold one sample twice.)
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Protocol

import numpy as np
import torch

from train.data.corpus import DataError
from train.data.dataset import Batch

_CACHED_EPOCHS = 2


class BatchConfigError(DataError):
    """Batch sizes or ranks that cannot be combined; the message names the fields."""


class BatchSource(Protocol):
    """A dataset that builds a whole micro-batch from sample indices (e.g. `BlockDataset`)."""

    def __len__(self) -> int: ...

    def batch(self, indices: np.ndarray) -> Batch: ...


def _check_positive(**fields: int) -> None:
    for name, value in fields.items():
        if value < 1:
            raise BatchConfigError(f"{name}={value} must be >= 1")


def grad_accum_steps(global_batch: int, micro_batch: int, dp_size: int) -> int:
    """Micro-batches per rank per optimizer step, = global_batch / (micro_batch * dp_size)."""
    _check_positive(global_batch=global_batch, micro_batch=micro_batch, dp_size=dp_size)
    per_step = micro_batch * dp_size
    if global_batch % per_step:
        lower = max(per_step, global_batch // per_step * per_step)
        raise BatchConfigError(
            f"global_batch={global_batch} is not divisible by micro_batch * dp_size = {micro_batch} * "
            f"{dp_size} = {per_step}; set global_batch to a multiple of {per_step} (e.g. {lower} or "
            f"{lower + per_step}) or change micro_batch"
        )
    return global_batch // per_step


class GlobalOrder:
    """The global sample stream: position k -> sample index, over as many epochs as needed."""

    def __init__(self, num_samples: int, seed: int = 0, shuffle: bool = True) -> None:
        if num_samples < 1:
            raise BatchConfigError(f"num_samples={num_samples} must be >= 1 (is the split empty?)")
        if seed < 0:
            raise BatchConfigError(f"seed={seed} must be >= 0")
        self.num_samples = num_samples  # N: samples per epoch (the dataset length)
        self.seed = seed  # seeds the per-epoch permutations
        self.shuffle = shuffle  # False: every epoch is 0, 1, ..., N-1
        self._epochs: dict[int, np.ndarray] = {}  # the last few epoch permutations, (N,) int64 each

    def __len__(self) -> int:
        return self.num_samples

    def permutation(self, epoch: int) -> np.ndarray:
        """Sample order of `epoch`: (N,) int64, a permutation seeded by (seed, epoch)."""
        if epoch not in self._epochs:
            if len(self._epochs) >= _CACHED_EPOCHS:
                del self._epochs[min(self._epochs)]
            if self.shuffle:
                perm = np.random.default_rng([self.seed, epoch]).permutation(self.num_samples)
            else:
                perm = np.arange(self.num_samples, dtype=np.int64)
            self._epochs[epoch] = perm
        return self._epochs[epoch]

    def indices(self, start: int, count: int) -> np.ndarray:
        """Sample indices at stream positions [start, start + count): (count,) int64."""
        if start < 0 or count < 0:
            raise BatchConfigError(f"stream positions start={start}, count={count} must be >= 0")
        positions = np.arange(start, start + count, dtype=np.int64)
        epochs = positions // self.num_samples
        out = np.empty(count, dtype=np.int64)
        for epoch in np.unique(epochs):  # one or two epochs per global batch in practice
            sel = epochs == epoch
            out[sel] = self.permutation(int(epoch))[positions[sel] % self.num_samples]
        return out

    def index(self, k: int) -> int:
        """Sample index of the k-th consumed sample (k counts from 0 over all epochs)."""
        return int(self.indices(k, 1)[0])


def _check_rank(dp_rank: int, dp_size: int) -> None:
    if not 0 <= dp_rank < dp_size:
        raise BatchConfigError(f"dp_rank={dp_rank} must be in [0, dp_size={dp_size})")


def micro_batches(
    dataset: BatchSource,
    order: GlobalOrder,
    *,
    consumed_samples: int,
    global_batch: int,
    micro_batch: int,
    dp_rank: int,
    dp_size: int,
) -> Iterator[Batch]:
    """Endless micro-batches (input_ids (mb, T), labels (mb, T)[, model kwargs]) of this rank, from `consumed_samples` on.

    Every `grad_accum_steps(global_batch, micro_batch, dp_size)` micro-batches make one optimizer
    step, after which `consumed_samples` grows by `global_batch` on every rank.
    """
    accum = grad_accum_steps(global_batch, micro_batch, dp_size)
    _check_rank(dp_rank, dp_size)
    if consumed_samples < 0:
        raise BatchConfigError(f"consumed_samples={consumed_samples} must be >= 0")
    if len(order) != len(dataset):
        raise BatchConfigError(
            f"order covers {len(order)} samples but the dataset has {len(dataset)}; build "
            "GlobalOrder(len(dataset), seed)"
        )
    per_rank = global_batch // dp_size
    step_start = consumed_samples
    while True:
        mine = order.indices(step_start + dp_rank * per_rank, per_rank)  # (gb/dp,)
        for j in range(accum):
            yield dataset.batch(mine[j * micro_batch : (j + 1) * micro_batch])
        step_start += global_batch


FILLER_INDEX = -1
"""The ``index`` of every row of a filler batch (and its token labels are all -100)."""


def filler(batch: Batch) -> Batch:
    """``batch`` marked as a filler: the same inputs (a model runs it like any other), nothing to count.

    (inputs, labels[, extra]): every label -100, so it holds no token. A mapping: ``index`` set to
    `FILLER_INDEX` on every row and every token-label tensor (a ``*labels`` key of two or more dimensions)
    set to -100; class labels are kept, the index says the rows are not examples.
    """
    if isinstance(batch, dict):
        out = dict(batch)
        rows = next(v for v in batch.values() if isinstance(v, torch.Tensor)).shape[0]
        out["index"] = torch.full((rows,), FILLER_INDEX, dtype=torch.long)
        for key, value in batch.items():
            if key.endswith("labels") and isinstance(value, torch.Tensor) and value.dim() >= 2:
                out[key] = torch.full_like(value, -100)
        return out
    x, y, *rest = batch
    return (x, torch.full_like(y, -100), *rest)


def is_filler(batch: Batch) -> bool:
    """True for a batch `filler` made (a mapping whose rows all have index -1; labels that are all -100), which
    evaluations run but never count. Reads CPU tensors only (no device sync when called before moving)."""
    if isinstance(batch, dict):
        index = batch.get("index")
        return isinstance(index, torch.Tensor) and bool((index == FILLER_INDEX).all())
    return not bool((batch[1] != -100).any())


def eval_batch_count(num_samples: int, micro_batch: int, max_batches: int | None) -> int:
    """Micro-batches in one evaluation: ``max_batches`` (train.eval_batches) full micro-batches of the split,
    or as many as it holds (a tail shorter than one micro-batch is not evaluated); BatchConfigError if none."""
    _check_positive(micro_batch=micro_batch)
    if max_batches is not None and max_batches < 1:
        raise BatchConfigError(f"max_batches={max_batches} must be >= 1 or None (all)")
    full = num_samples // micro_batch
    if full == 0:
        raise BatchConfigError(
            f"the eval split has {num_samples} samples, fewer than one micro-batch of {micro_batch}; lower the "
            "eval micro_batch or seq_len, or add validation data"
        )
    return full if max_batches is None else min(full, max_batches)


def eval_batches(
    dataset: BatchSource,
    *,
    micro_batch: int,
    max_batches: int | None = None,
    dp_rank: int = 0,
    dp_size: int = 1,
) -> Iterator[Batch]:
    """This rank's share of one evaluation: the same micro-batches for any number of ranks, each run once.

    The evaluation is the first `eval_batch_count` micro-batches of the split as one rank would cut them:
    micro-batch j holds samples [j * mb, (j + 1) * mb). Rank r runs micro-batches r, r + dp, r + 2 dp, ...; every
    rank runs ceil(count / dp) of them (collectives of ZeRO-3 or a pipeline stay in step), a rank past the end
    running a `filler` copy of micro-batch 0 that no metric counts. So a metric summed per micro-batch and added
    over the ranks is the same for any data-parallel size, and so is each micro-batch's own mean.
    """
    _check_positive(micro_batch=micro_batch, dp_size=dp_size)
    _check_rank(dp_rank, dp_size)
    count = eval_batch_count(len(dataset), micro_batch, max_batches)
    for j in range(dp_rank, -(-count // dp_size) * dp_size, dp_size):
        if j < count:
            yield dataset.batch(np.arange(j * micro_batch, (j + 1) * micro_batch))
        else:
            yield filler(dataset.batch(np.arange(micro_batch)))
