"""Global sample order: determinism, rank disjointness, DP-size independence, exact resume, eval batches."""

from __future__ import annotations

from collections import Counter
from itertools import islice

import numpy as np
import pytest
import torch

from train.data.dataset import BlockDataset
from train.data.sampler import (
    BatchConfigError,
    GlobalOrder,
    eval_batches,
    filler,
    grad_accum_steps,
    is_filler,
    micro_batches,
)


class _Indices:
    """A dataset whose samples are their own indices: inputs (B, 1) = labels (B, 1) = index."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def batch(self, indices: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        ids = torch.as_tensor(indices, dtype=torch.int64)[:, None]
        return ids, ids.clone()


def _steps(
    n: int, *, seed: int, gb: int, mb: int, dp: int, steps: int, consumed: int = 0
) -> list[list[list[int]]]:
    """steps x dp lists of the sample indices each rank sees in each global step."""
    ds, order = _Indices(n), GlobalOrder(n, seed)
    per_rank = []
    for rank in range(dp):
        it = micro_batches(
            ds, order, consumed_samples=consumed, global_batch=gb, micro_batch=mb, dp_rank=rank, dp_size=dp
        )
        flat = [i for x, _ in islice(it, steps * grad_accum_steps(gb, mb, dp)) for i in x[:, 0].tolist()]
        per_rank.append([flat[s * gb // dp : (s + 1) * gb // dp] for s in range(steps)])
    return [[per_rank[r][s] for r in range(dp)] for s in range(steps)]


def test_grad_accum_steps_and_batch_size_errors_name_the_fields() -> None:
    assert grad_accum_steps(32, 4, 2) == 4 and grad_accum_steps(8, 8, 1) == 1
    with pytest.raises(BatchConfigError) as err:
        grad_accum_steps(12, 4, 2)
    message = str(err.value)
    assert "global_batch=12" in message and "micro_batch * dp_size = 4 * 2 = 8" in message
    assert "multiple of 8 (e.g. 8 or 16)" in message
    with pytest.raises(BatchConfigError, match="micro_batch=0 must be >= 1"):
        grad_accum_steps(8, 0, 1)
    with pytest.raises(BatchConfigError, match="global_batch=6 is not divisible"):
        next(
            micro_batches(
                _Indices(10),
                GlobalOrder(10),
                consumed_samples=0,
                global_batch=6,
                micro_batch=4,
                dp_rank=0,
                dp_size=1,
            )
        )


def test_global_order_is_a_seeded_permutation_per_epoch() -> None:
    order = GlobalOrder(100, seed=3)
    epoch0, epoch1 = order.indices(0, 100), order.indices(100, 100)
    assert sorted(epoch0.tolist()) == sorted(epoch1.tolist()) == list(range(100))
    assert not np.array_equal(epoch0, epoch1) and not np.array_equal(epoch0, np.arange(100))
    assert np.array_equal(GlobalOrder(100, seed=3).indices(0, 300), order.indices(0, 300))
    assert not np.array_equal(GlobalOrder(100, seed=4).indices(0, 100), epoch0)
    assert order.index(150) == epoch1[50] and order.indices(95, 10).tolist() == [*epoch0[95:], *epoch1[:5]]
    assert GlobalOrder(5, shuffle=False).indices(3, 6).tolist() == [3, 4, 0, 1, 2, 3]


def test_same_seed_same_stream() -> None:
    a = _steps(50, seed=1, gb=8, mb=2, dp=2, steps=10)
    assert a == _steps(50, seed=1, gb=8, mb=2, dp=2, steps=10)
    assert a != _steps(50, seed=2, gb=8, mb=2, dp=2, steps=10)


def test_ranks_are_disjoint_and_make_up_the_global_batch() -> None:
    order = GlobalOrder(40, 0)
    for step, ranks in enumerate(_steps(40, seed=0, gb=16, mb=2, dp=4, steps=6)):
        flat = [i for rank in ranks for i in rank]
        assert [len(r) for r in ranks] == [4, 4, 4, 4]
        assert flat == order.indices(step * 16, 16).tolist()  # rank r holds slice [r*gb/dp, (r+1)*gb/dp)
        if step * 16 // 40 == (step * 16 + 15) // 40:  # within one epoch (step 2 straddles two)
            assert len(set(flat)) == 16  # no sample shared between ranks


def test_samples_per_step_do_not_depend_on_dp_size() -> None:
    runs = {dp: _steps(37, seed=9, gb=8, mb=2, dp=dp, steps=12) for dp in (1, 2, 4)}
    for step in range(12):
        multisets = {dp: Counter(i for rank in runs[dp][step] for i in rank) for dp in runs}
        assert multisets[1] == multisets[2] == multisets[4]
    over_epochs = Counter(i for step in runs[2] for rank in step for i in rank)
    assert set(over_epochs) == set(range(37))  # 12 steps x 8 = 96 samples > 2 epochs: all seen


@pytest.mark.parametrize("consumed", [0, 24, 40, 13])
def test_resume_from_consumed_samples_reproduces_the_continuation(consumed: int) -> None:
    tokens = np.arange(2000, dtype=np.uint16)
    ds = BlockDataset(tokens, 16)  # 124 samples
    order = GlobalOrder(len(ds), seed=11)
    kwargs = {"global_batch": 8, "micro_batch": 2, "dp_rank": 1, "dp_size": 2}
    full = list(islice(micro_batches(ds, order, consumed_samples=0, **kwargs), 200))
    resumed = list(
        islice(micro_batches(ds, GlobalOrder(len(ds), seed=11), consumed_samples=consumed, **kwargs), 20)
    )
    if consumed % 8 == 0:
        skip = consumed // 8 * grad_accum_steps(8, 2, 2)
        for (x, y), (rx, ry) in zip(full[skip : skip + 20], resumed):
            assert torch.equal(x, rx) and torch.equal(y, ry)
    expected = order.indices(consumed + 4, 2)  # rank 1's first micro-batch after resuming
    assert torch.equal(resumed[0][0], ds.batch(expected)[0])


def test_stream_argument_errors() -> None:
    ds, order = _Indices(10), GlobalOrder(10)
    kwargs = {"consumed_samples": 0, "global_batch": 4, "micro_batch": 2, "dp_rank": 0, "dp_size": 2}
    with pytest.raises(BatchConfigError, match=r"dp_rank=2 must be in \[0, dp_size=2\)"):
        next(micro_batches(ds, order, **{**kwargs, "dp_rank": 2}))
    with pytest.raises(BatchConfigError, match="consumed_samples=-4 must be >= 0"):
        next(micro_batches(ds, order, **{**kwargs, "consumed_samples": -4}))
    with pytest.raises(BatchConfigError, match=r"order covers 9 samples but the dataset has 10"):
        next(micro_batches(ds, GlobalOrder(9), **kwargs))
    with pytest.raises(BatchConfigError, match="num_samples=0 must be >= 1"):
        GlobalOrder(0)


def _counted(ds: _Indices, dp: int, **kwargs: int) -> list[list[list[int]]]:
    """Per rank, the sample indices of each evaluation micro-batch it runs ([] for a filler)."""
    return [[[] if is_filler((x, y)) else x[:, 0].tolist()
             for x, y in eval_batches(ds, dp_rank=r, dp_size=dp, **kwargs)] for r in range(dp)]


@pytest.mark.parametrize("dp", [1, 2, 3, 4, 5, 8])
@pytest.mark.parametrize(("n", "mb", "max_batches"), [(23, 3, None), (23, 3, 5), (40, 4, 3), (7, 2, 1), (16, 4, 4)])
def test_eval_batches_are_the_single_rank_batches_for_any_dp(n: int, mb: int, max_batches: int | None,
                                                              dp: int) -> None:
    ds = _Indices(n)
    count = min(n // mb, max_batches or n)
    want = [list(range(j * mb, (j + 1) * mb)) for j in range(count)]
    per_rank = _counted(ds, dp, micro_batch=mb, max_batches=max_batches)
    assert {len(r) for r in per_rank} == {-(-count // dp)}  # every rank runs as many, fillers included
    got = [b for rank in per_rank for b in rank if b]
    assert sorted(got) == want  # each micro-batch of the one-rank evaluation exactly once
    assert sum(b == [] for rank in per_rank for b in rank) == -(-count // dp) * dp - count


def test_eval_batches_limits_and_fillers() -> None:
    ds = _Indices(23)
    assert _counted(ds, 2, micro_batch=3) == [[[0, 1, 2], [6, 7, 8], [12, 13, 14], [18, 19, 20]],
                                              [[3, 4, 5], [9, 10, 11], [15, 16, 17], []]]  # 21, 22: < mb
    x, y = next(iter(eval_batches(ds, micro_batch=3, max_batches=1, dp_rank=1, dp_size=2)))
    assert x[:, 0].tolist() == [0, 1, 2] and (y == -100).all()  # micro-batch 0's inputs, no label
    rows = {"index": torch.arange(3), "labels": torch.ones(3, dtype=torch.long), "chosen_labels": torch.ones(3, 4)}
    made = filler(rows)
    assert is_filler(made) and not is_filler(rows) and made["index"].tolist() == [-1, -1, -1]
    assert (made["chosen_labels"] == -100).all() and made["labels"].tolist() == [1, 1, 1]
    with pytest.raises(BatchConfigError, match=r"eval split has 23 samples, fewer than one micro-batch of 24"):
        next(eval_batches(ds, micro_batch=24, dp_size=4))
    with pytest.raises(BatchConfigError, match="max_batches=0 must be >= 1"):
        next(eval_batches(ds, micro_batch=1, max_batches=0))
