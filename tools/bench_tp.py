"""Tensor-parallel communication per training step: bytes each rank sends, counted, against the analytic figure.

    python tools/bench.py tp-comm --preset llama3-8b --set n_layers=2 --tp 4 --batch 1 --seq 512 [--sp]

Runs one forward and backward (vocab-parallel cross-entropy included) of the preset on ``tp`` gloo ranks of
this machine, with every collective the TP layers call counted by kind and size. "Sent" is what a ring
algorithm sends per rank: an all-reduce of N bytes sends 2 (n-1)/n N, an all-gather or reduce-scatter of
N bytes (the full tensor) sends (n-1)/n N. The analytic figure is Megatron's: per layer two all-reduces of
the (B, T, dim) activations forward and two backward (or the all-gather / reduce-scatter pairs of sequence
parallelism, which send the same), one each for the embedding and the head, three (B, T) float reductions
in the loss, and under sequence parallelism one all-reduce per norm weight.
"""

from __future__ import annotations

import dataclasses
import multiprocessing as mp
import os
import tempfile
from collections import defaultdict
from typing import Any

import torch
import torch.distributed as dist

from model import ModelArgs, Transformer, get_preset
from parallel.dims import ParallelDims
from parallel.groups import build_process_groups
from parallel.parallelize import parallelize
from train.config.schema import ParallelSection

_KINDS = ("all_reduce", "all_gather", "reduce_scatter")


def _nbytes(t: torch.Tensor | list[torch.Tensor]) -> int:
    if isinstance(t, list):
        return sum(x.numel() * x.element_size() for x in t)
    return t.numel() * t.element_size()


def _count_collectives(counts: dict[str, list[int]], n: int) -> None:
    """Wrap the torch.distributed collectives the TP code calls so each call adds its full-tensor bytes."""
    originals = {k: getattr(dist, k) for k in _KINDS}

    def all_reduce(tensor: torch.Tensor, *a: Any, **kw: Any) -> Any:
        counts["all_reduce"].append(_nbytes(tensor))
        return originals["all_reduce"](tensor, *a, **kw)

    def all_gather(out: list[torch.Tensor], tensor: torch.Tensor, *a: Any, **kw: Any) -> Any:
        counts["all_gather"].append(_nbytes(tensor) * n)
        return originals["all_gather"](out, tensor, *a, **kw)

    def reduce_scatter(out: torch.Tensor, parts: list[torch.Tensor], *a: Any, **kw: Any) -> Any:
        counts["reduce_scatter"].append(_nbytes(parts))
        return originals["reduce_scatter"](out, parts, *a, **kw)

    dist.all_reduce, dist.all_gather, dist.reduce_scatter = all_reduce, all_gather, reduce_scatter


def analytic_bytes(args: ModelArgs, tp: int, batch: int, seq: int, sp: bool, elem: int = 4) -> dict[str, float]:
    """Bytes a rank sends in one forward + backward, by Megatron's accounting (see the module docstring)."""
    act = batch * seq * args.dim * elem  # one (B, T, dim) activation
    ring = (tp - 1) / tp
    layers = 4 * args.n_layers + 2  # 2 per layer forward, 2 backward; the embedding; the head's input
    loss = 3 * batch * seq * 4 * 2 * ring  # max, target logit, sum of exponentials: fp32 all-reduces
    if not sp:
        return {"all_reduce_sent": layers * act * 2 * ring + loss, "total_sent": layers * act * 2 * ring + loss}
    norms = (2 * args.n_layers + 1) * args.dim * elem * 2 * ring
    # each all-reduce becomes an all-gather plus a reduce-scatter of the same full tensor: the same bytes
    gathered = layers * act * ring
    return {"all_gather_sent": gathered, "reduce_scatter_sent": gathered, "all_reduce_sent": loss + norms,
            "total_sent": 2 * gathered + loss + norms}


def _rank(rank: int, tp: int, init_file: str, args: ModelArgs, batch: int, seq: int, sp: bool,
          queue: Any) -> None:
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // tp))
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=tp)
    try:
        torch.manual_seed(0)
        with torch.device("meta"):
            model = Transformer(args)
        groups = build_process_groups(ParallelDims(tp, tp=tp))
        loss_fn = parallelize(model, groups, parallel=ParallelSection(tp=tp, sequence_parallel=sp)).loss_fn
        model.to_empty(device="cpu")
        model.init_weights()
        x = torch.randint(0, args.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(1))
        counts: dict[str, list[int]] = defaultdict(list)
        _count_collectives(counts, tp)
        loss_fn(model(x), x).backward()
        queue.put((rank, {k: (len(v), sum(v)) for k, v in counts.items()}))
    finally:
        dist.destroy_process_group()


def bench_tp_comm(preset: str, tp: int, batch: int, seq: int, sp: bool, overrides: dict[str, Any]) -> dict[str, Any]:
    args = dataclasses.replace(get_preset(preset), **overrides, max_seq_len=max(seq, 16)).validate()
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    with tempfile.TemporaryDirectory() as tmp:
        procs = [ctx.Process(target=_rank, args=(r, tp, os.path.join(tmp, "rdzv"), args, batch, seq, sp, queue))
                 for r in range(tp)]
        for p in procs:
            p.start()
        per_rank = dict(queue.get(timeout=1800) for _ in procs)
        for p in procs:
            p.join()
    ring = (tp - 1) / tp
    counted = per_rank[0]
    sent = {f"{k}_sent": total * (2 * ring if k == "all_reduce" else ring) for k, (_, total) in counted.items()}
    sent["total_sent"] = sum(sent.values())
    expected = analytic_bytes(args, tp, batch, seq, sp)
    return {
        "preset": preset, "overrides": overrides, "tp": tp, "sequence_parallel": sp, "batch": batch, "seq": seq,
        "calls": {k: n for k, (n, _) in counted.items()},
        "sent_MB": {k: round(v / 1e6, 3) for k, v in sent.items()},
        "analytic_MB": {k: round(v / 1e6, 3) for k, v in expected.items()},
        "counted_over_analytic": round(sent["total_sent"] / expected["total_sent"], 4),
        "ranks_agree": all(v == counted for v in per_rank.values()),
    }
