"""Resharding: a run resumed on another data-parallel size consumes exactly the samples not yet consumed."""

from __future__ import annotations

from itertools import islice

import numpy as np
import pytest

from tests.conftest import SMOKE
from train.config.load import load_config
from train.data.blend import BlendDataset
from train.data.dataset import BlockDataset
from train.data.sampler import GlobalOrder, grad_accum_steps, micro_batches
from train.data.setup import batch_stream

GB, MB = 16, 2


def _ids(batch: tuple) -> list[tuple[int, int]]:
    """(dataset, sample) of each row: the blend's parts below return rows [dataset, sample, ...]."""
    x = batch[0]
    return [(int(r[0]), int(r[1])) for r in x]


class _Tagged:
    def __init__(self, d: int, n: int) -> None:
        self.d, self.n = d, n

    def __len__(self) -> int:
        return self.n

    def batch(self, indices: np.ndarray):
        import torch

        idx = torch.as_tensor(np.asarray(indices), dtype=torch.int64)
        rows = torch.stack([torch.full_like(idx, self.d), idx], dim=1)
        return rows, rows.clone()


def _consume(ds, order: GlobalOrder, *, consumed: int, steps: int, dp: int) -> list[tuple[int, int]]:
    """The samples of `steps` global steps from `consumed` on, rank 0's slice first, as dp ranks see them."""
    per_rank = []
    accum = grad_accum_steps(GB, MB, dp)
    for rank in range(dp):
        it = micro_batches(ds, order, consumed_samples=consumed, global_batch=GB, micro_batch=MB, dp_rank=rank,
                           dp_size=dp)
        per_rank.append([s for b in islice(it, steps * accum) for s in _ids(b)])
    out = []
    for step in range(steps):
        for rank in range(dp):
            out += per_rank[rank][step * GB // dp : (step + 1) * GB // dp]
    return out


@pytest.mark.parametrize("shuffle", [True, False])
def test_dp2_then_dp4_then_dp1_consumes_exactly_the_remaining_samples(shuffle: bool) -> None:
    blend = BlendDataset([_Tagged(0, 37), _Tagged(1, 500), _Tagged(2, 90)], [0.2, 0.5, 0.3], num_samples=400, seed=5)
    order = GlobalOrder(len(blend), seed=9, shuffle=shuffle)
    reference = _consume(blend, order, consumed=0, steps=25, dp=1)  # 400 samples: one whole pass
    first = _consume(blend, order, consumed=0, steps=7, dp=2)
    second = _consume(blend, order, consumed=7 * GB, steps=11, dp=4)
    third = _consume(blend, order, consumed=18 * GB, steps=7, dp=1)
    resumed = first + second + third
    assert resumed == reference  # the same samples in the same order: nothing skipped, nothing repeated
    positions = [order.index(k) for k in range(400)]
    assert sorted(positions) == list(range(400))  # one pass over the blend: every position once
    expected = [(int(blend.dataset_index[p]), int(blend.sample_index[p])) for p in positions]
    assert resumed == expected


def test_resume_through_the_run_config_on_packed_blocks() -> None:
    tokens = np.arange(5000, dtype=np.uint16)
    ds = BlockDataset(tokens, 8, mode="random", seed=1)
    cfg = load_config(SMOKE, [f"train.global_batch_size={GB}", f"train.micro_batch_size={MB}"])
    full = [row for b in islice(batch_stream(cfg, ds, dp_rank=0, dp_size=1, data_state=None)(0), 40)
            for row in b[0][:, 0].tolist()]
    got = []
    for consumed, dp, steps in ((0, 2, 2), (2 * GB, 4, 1), (3 * GB, 1, 2)):
        ranks = [batch_stream(cfg, ds, dp_rank=r, dp_size=dp, data_state=None)(consumed) for r in range(dp)]
        accum = grad_accum_steps(GB, MB, dp)
        for _ in range(steps):
            for it in ranks:
                got += [row for b in islice(it, accum) for row in b[0][:, 0].tolist()]
    assert got == full[: len(got)] and len(got) == 5 * GB
