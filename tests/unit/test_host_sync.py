"""The training step reads the device back once per optimizer step, however many micro-batches it accumulates.

A ``TorchFunctionMode`` sees every host read of a tensor's value: ``.item()``, ``.tolist()``, ``float(t)``,
``int(t)``, ``bool(t)`` (``if t:``, ``math.isfinite(t)``), ``t.numpy()``. On CPU these cost nothing, on a GPU
each one waits for all queued work, so the host could not run ahead of the device. torch's AdamW keeps its step
counters as host tensors (CPU even when the weights are on a GPU) and reads them per parameter: those reads
move nothing and are left out.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest
import torch
import torch.distributed as dist
from torch.overrides import TorchFunctionMode

from model import Transformer, get_preset
from tests.conftest import free_port
from tools.bench_step import build_trainer

READS = {torch.Tensor.item, torch.Tensor.tolist, torch.Tensor.__float__, torch.Tensor.__int__,
         torch.Tensor.__bool__, torch.Tensor.__index__, torch.Tensor.numpy}


class HostReads(TorchFunctionMode):
    """Counts reads of tensor values into Python, by the method used."""

    def __init__(self, host_tensors: tuple[torch.Tensor, ...] = ()) -> None:
        super().__init__()
        self.counts: Counter[str] = Counter()
        self.host = {id(t) for t in host_tensors}  # tensors that live on the host by design

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        if func in READS and id(args[0]) not in self.host:
            self.counts[func.__name__] += 1
        return func(*args, **(kwargs or {}))


def test_the_mode_sees_every_kind_of_read() -> None:
    t = torch.tensor([1.5])
    with HostReads() as reads:
        t.item(), t.tolist(), float(t), int(t), bool(t), t.numpy()
        if t > 0:
            pass
    assert reads.counts == {"item": 1, "tolist": 1, "__float__": 1, "__int__": 1, "__bool__": 2, "numpy": 1}


@pytest.fixture
def one_rank() -> Iterator[None]:
    """A one-process gloo group (DeepSpeed's engine needs one), removed afterwards."""
    if dist.is_initialized():
        pytest.skip("a process group is already set up in this process")
    env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "RANK": "0", "WORLD_SIZE": "1",
           "LOCAL_RANK": "0", "DS_ACCELERATOR": "cpu"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    dist.init_process_group("gloo", rank=0, world_size=1)
    yield
    dist.destroy_process_group()
    for k, v in saved.items():
        os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)


def _reads_per_step(grad_accum: int) -> tuple[Counter[str], float]:
    args = get_preset("test-1m")
    torch.manual_seed(0)
    state = {k: v.clone() for k, v in Transformer(args).state_dict().items()}
    pool = torch.randint(0, args.vocab_size, (4, 2, 17))

    def stream() -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        i = 0
        while True:
            seq = pool[i % len(pool)]
            i += 1
            yield seq[:, :-1], seq[:, 1:]

    trainer = build_trainer(args, 2, 16, stream(), torch.device("cpu"), "cpu", [], state, grad_accum=grad_accum)
    trainer._step(want_grad_norm=True)  # the first step sets things up
    optimizer_steps = tuple(s["step"] for s in trainer.engine.optimizer.state.values())
    with HostReads(optimizer_steps) as reads:
        loss, _ = trainer._step(want_grad_norm=False)
    return reads.counts, loss


def test_transfers_per_step_do_not_grow_with_gradient_accumulation(one_rank: None) -> None:
    once, loss1 = _reads_per_step(1)
    four, loss4 = _reads_per_step(4)
    assert four == once, f"1 micro-batch: {dict(once)}, 4 micro-batches: {dict(four)}"
    # the loss and the terms in one read; the optimizer's non-finite decision (fp32 without ZeRO) in one
    assert once == {"tolist": 1, "item": 1}, dict(once)
    assert loss1 > 0 and loss4 > 0
