"""Each communication primitive of parallel/comm.py on 2 and 4 gloo ranks: the forward equals the collective
computed by hand from every rank's input, and the backward applies its dual to a non-trivial upstream
gradient.

Every rank's input and upstream gradient differ (so a missing sum, a wrong slice or a swapped dual changes the
result) and are integer-valued floats, so sums in any order are exact and the comparisons are exact too. One
spawn per world size runs every check; on 4 ranks the checks run on the whole world and again on two
tensor-parallel groups of 2 ({0, 1}, {2, 3}), where a function that used the global rank would fail.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch

from parallel import comm
from tests.gloo import run_ranks

B = 2  # batch
PRIMITIVES = ["copy_to_tp", "reduce_from_tp", "gather_last", "scatter_last", "gather_seq",
              "reduce_scatter_seq", "scatter_seq"]
LAYOUTS = {2: ["world"], 4: ["world", "pairs"]}


def _input(rank: int, shape: tuple[int, ...]) -> torch.Tensor:
    """Rank ``rank``'s input: integer-valued, different on every rank and at every position."""
    n = torch.arange(int(torch.tensor(shape).prod())).reshape(shape)
    return ((n % 11) * (rank + 1) + 3 * rank - 5).float()


def _upstream(rank: int, shape: tuple[int, ...]) -> torch.Tensor:
    """Rank ``rank``'s gradient of the loss with respect to the primitive's output (not ones, not shared)."""
    n = torch.arange(int(torch.tensor(shape).prod())).reshape(shape)
    return ((n % 7) - 2 * rank + 1).float() * (rank + 2)


def _chunk(x: torch.Tensor, n: int, dim: int) -> list[torch.Tensor]:
    return list(x.chunk(n, dim=dim))


# Per primitive: (input shape on a group of n, output shape, forward expectation, backward expectation).
# The expectations take the group members' inputs xs / upstream gradients gs (in group order) and this
# rank's index i in the group: the collective written out by hand, without torch.distributed.
Expect = Callable[[list[torch.Tensor], int], torch.Tensor]


def _cases(n: int) -> dict[str, tuple[tuple[int, ...], tuple[int, ...], Expect, Expect]]:
    T, H = 2 * n, 3 * n  # full sequence length and hidden size; T/n and H/n on each rank after a split
    full, seq_shard, last_shard = (B, T, H), (B, T // n, H), (B, T, H // n)
    return {
        # identity forward; backward all-reduce
        "copy_to_tp": (full, full, lambda xs, i: xs[i], lambda gs, i: sum(gs)),
        # all-reduce forward; backward identity
        "reduce_from_tp": (full, full, lambda xs, i: sum(xs), lambda gs, i: gs[i]),
        # all-gather on the last dim forward; backward keeps this rank's slice
        "gather_last": (last_shard, full, lambda xs, i: torch.cat(xs, -1),
                        lambda gs, i: _chunk(gs[i], n, -1)[i]),
        # keep this rank's slice forward; backward all-gathers on the last dim
        "scatter_last": (full, last_shard, lambda xs, i: _chunk(xs[i], n, -1)[i],
                         lambda gs, i: torch.cat(gs, -1)),
        # all-gather on the sequence forward; backward reduce-scatters on the sequence
        "gather_seq": (seq_shard, full, lambda xs, i: torch.cat(xs, 1),
                       lambda gs, i: sum(_chunk(g, n, 1)[i] for g in gs)),
        # reduce-scatter on the sequence forward; backward all-gathers on the sequence
        "reduce_scatter_seq": (full, seq_shard, lambda xs, i: sum(_chunk(x, n, 1)[i] for x in xs),
                               lambda gs, i: torch.cat(gs, 1)),
        # keep this rank's sequence slice forward; backward all-gathers on the sequence
        "scatter_seq": (full, seq_shard, lambda xs, i: _chunk(xs[i], n, 1)[i],
                        lambda gs, i: torch.cat(gs, 1)),
    }


def _mismatch(what: str, got: torch.Tensor, want: torch.Tensor) -> str | None:
    if got.shape != want.shape:
        return f"{what}: shape {tuple(got.shape)}, expected {tuple(want.shape)}"
    if not torch.equal(got, want):
        where = (got != want).nonzero()[0].tolist()
        return (f"{what}: differs at {where} ({got[tuple(where)].item()} != {want[tuple(where)].item()}), "
                f"max |diff| {(got - want).abs().max().item()}")
    return None


def _check_group(rank: int, group: Any, members: list[int]) -> dict[str, list[str]]:
    n, i = len(members), members.index(rank)
    failures: dict[str, list[str]] = {}
    for name, (in_shape, out_shape, forward, backward) in _cases(n).items():
        x = _input(rank, in_shape).requires_grad_(True)
        g = _upstream(rank, out_shape)
        out = getattr(comm, name)(x, group)
        (out * g).sum().backward()  # d loss / d out == g on this rank
        xs = [_input(r, in_shape) for r in members]
        gs = [_upstream(r, out_shape) for r in members]
        problems = [_mismatch(f"rank {rank} forward", out.detach(), forward(xs, i)),
                    _mismatch(f"rank {rank} backward", x.grad, backward(gs, i))]
        failures[name] = [p for p in problems if p]
    return failures


def check_every_primitive(rank: int, world: int) -> dict[str, dict[str, list[str]]]:
    """Every primitive on the whole world and, on 4 ranks, on two groups of 2; failures by layout and name."""
    import torch.distributed as dist

    results = {"world": _check_group(rank, dist.group.WORLD, list(range(world)))}
    if world == 4:
        pairs = [[0, 1], [2, 3]]
        groups = [dist.new_group(p) for p in pairs]  # every rank creates every group, in the same order
        mine = rank // 2
        results["pairs"] = _check_group(rank, groups[mine], pairs[mine])
    # A dimension that does not split over the group is refused with the sizes named, on every rank.
    refused = []
    for fn, x in [(comm.scatter_last, torch.zeros(B, 2, 2 * world + 1)),
                  (comm.reduce_scatter_seq, torch.zeros(B, 2 * world + 1, 3))]:
        try:
            fn(x, dist.group.WORLD)
            refused.append(f"rank {rank}: {fn.__name__} accepted a dimension of size {2 * world + 1}")
        except ValueError as e:
            if str(2 * world + 1) not in str(e) or str(world) not in str(e):
                refused.append(f"rank {rank}: {fn.__name__}: the message names no sizes: {e}")
    results["indivisible"] = {"refused": refused}
    return results


@pytest.fixture(scope="module")
def spawned() -> Callable[[int], list[dict[str, dict[str, list[str]]]]]:
    """One spawn per world size, shared by every test of that size."""
    cache: dict[int, list[dict[str, dict[str, list[str]]]]] = {}

    def get(world: int) -> list[dict[str, dict[str, list[str]]]]:
        if world not in cache:
            cache[world] = run_ranks(world, check_every_primitive, timeout=240)
        return cache[world]
    return get


@pytest.mark.slow  # one spawn of 2 and one of 4 gloo ranks for every primitive
@pytest.mark.parametrize("primitive", PRIMITIVES)
@pytest.mark.parametrize(("world", "layout"), [(w, lay) for w, lays in LAYOUTS.items() for lay in lays],
                         ids=lambda v: str(v))
def test_forward_and_backward_dual(spawned, world: int, layout: str, primitive: str) -> None:
    failures = [f for by_rank in spawned(world) for f in by_rank[layout][primitive]]
    assert not failures, f"{primitive} on {world} ranks ({layout}):\n" + "\n".join(failures)


@pytest.mark.slow
@pytest.mark.parametrize("world", list(LAYOUTS))
def test_indivisible_dimension_is_refused(spawned, world: int) -> None:
    failures = [f for by_rank in spawned(world) for f in by_rank["indivisible"]["refused"]]
    assert not failures, "\n".join(failures)


@pytest.mark.parametrize("primitive", PRIMITIVES)
def test_group_of_one_is_the_identity(primitive: str) -> None:
    x = _input(1, (B, 4, 6)).requires_grad_(True)
    g = _upstream(1, (B, 4, 6))
    out = getattr(comm, primitive)(x, None)
    (out * g).sum().backward()
    assert torch.equal(out.detach(), x.detach()) and torch.equal(x.grad, g)


def test_every_primitive_is_checked() -> None:
    public = {n for n in dir(comm) if not n.startswith("_") and callable(getattr(comm, n))
              and getattr(getattr(comm, n), "__module__", None) == comm.__name__ and n[0].islower()}
    assert public == set(PRIMITIVES) == set(_cases(2))
