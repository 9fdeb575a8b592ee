"""A checkpoint's RNG file carries the tensor-parallel rank's own dropout generators, and a resume restores them."""

from __future__ import annotations

import torch

from parallel.layers import TPContext
from train.checkpoint.writer import rng_state, set_rng_state


def test_tp_generators_are_saved_and_restored() -> None:
    ctx = TPContext(None, 2, 1, seed=5)
    torch.rand(3, generator=ctx.generator("cpu"))  # the stream has moved on from its seed
    saved = rng_state(ctx)
    want = torch.rand(4, generator=ctx.generator("cpu"))
    fresh = TPContext(None, 2, 1, seed=5)  # a resumed run's context starts from the seed
    set_rng_state(saved, fresh)
    assert torch.equal(torch.rand(4, generator=fresh.generator("cpu")), want)


def test_one_rank_runs_keep_no_tp_state() -> None:
    ctx = TPContext(None, 1, 0)
    assert "tp" not in rng_state(ctx) and "tp" not in rng_state()
    set_rng_state(rng_state(), ctx)  # a checkpoint without TP state restores the rest
