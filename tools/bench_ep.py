"""Expert-parallel communication per training step: all-to-all bytes each rank sends, counted, against the
analytic figure.

    python tools/bench.py ep-comm --preset moe-tiny --ep 2 --batch 4 --seq 128
    python tools/bench.py ep-comm --preset moe-tiny --ep 2 --tp 2 --batch 4 --seq 128 [--sp]

Runs one forward and backward (router losses included) of the preset on ``ep`` gloo ranks of this machine
(parallel.ep = ep = the data-parallel size), each with its own micro-batch, with every
``all_to_all_single`` counted. "Sent" is what leaves the rank: the rows to the other ranks of the group (rows
a rank routes to its own experts stay local). The analytic figure assumes balanced routing: per MoE layer a
rank's N = batch * seq tokens make N * top_k copies, (ep - 1) / ep of them go to other ranks, and they travel
four times per step (dispatch and return forward, the same two backward) as (dim,) rows:

    bytes/rank/step = n_moe_layers * 4 * N * top_k * (ep - 1) / ep * dim * element size

plus the count exchange (one (ep, E / ep) int64 all-to-all per layer and forward, negligible). The counted
figure differs from it by the routing's imbalance (a random router is nearly balanced).

With ``--tp T`` the run has ep x T ranks (parallel.tp = T, the experts' FFNs split over each TP group): every
TP rank routes its micro-batch's tokens and sends the same all-to-all as above over its expert-parallel group
(ranks of equal TP rank, the whole micro-batch's rows also under ``--sp``), and the tensor-parallel
collectives are counted too (`tools/bench_tp.py`'s counting) against the analytic figure of `tools/bench_tp.py`
with the MoE layers' MLP part replaced by `tools.estimate_memory.analytic_moe_tp_bytes`.
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

from model import ModelArgs, get_preset
from model.model import build_model
from parallel.dims import ParallelDims
from parallel.groups import build_process_groups
from parallel.parallelize import parallelize
from tools.bench_tp import _count_collectives, analytic_bytes
from tools.estimate_memory import analytic_ep_bytes, analytic_moe_tp_bytes
from train.config.schema import ParallelSection
from train.objectives.moe import MoETerms


def _rank(rank: int, ep: int, tp: int, sp: bool, init_file: str, args: ModelArgs, batch: int, seq: int,
          queue: Any) -> None:
    world = ep * tp
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        model = build_model(args, torch.device("cpu"), seed=0)
        groups = build_process_groups(ParallelDims(world, tp=tp, ep=ep))
        loss_fn = parallelize(model, groups, parallel=ParallelSection(tp=tp, ep=ep, sequence_parallel=sp)).loss_fn
        ep_rank = groups.ep_rank  # this rank's place in its expert-parallel group (where its rows stay)
        x = torch.randint(0, args.vocab_size, (batch, seq),
                          generator=torch.Generator().manual_seed(1 + groups.dp_rank))
        tp_counts: dict[str, list[int]] = defaultdict(list)
        if tp > 1:
            _count_collectives(tp_counts, tp)
        sent = {"rows": 0, "counts": 0, "calls": 0}
        original = dist.all_to_all_single

        def counted(out: torch.Tensor, inp: torch.Tensor, output_split_sizes: Any = None,
                    input_split_sizes: Any = None, **kw: Any) -> Any:
            row = inp[0].numel() * inp.element_size() if inp.dim() > 1 and inp.shape[0] else 0
            if input_split_sizes is None:  # the count exchange: equal parts
                sent["counts"] += inp.numel() * inp.element_size() * (ep - 1) // ep
            else:
                sent["rows"] += sum(n for r, n in enumerate(input_split_sizes) if r != ep_rank) * row
            sent["calls"] += 1
            return original(out, inp, output_split_sizes=output_split_sizes, input_split_sizes=input_split_sizes,
                            **kw)

        dist.all_to_all_single = counted
        loss, _ = MoETerms().add(model, loss_fn(model(x), x))
        loss.backward()
        dist.all_to_all_single = original
        ring = (tp - 1) / tp if tp > 1 else 0.0
        sent["tp"] = sum(sum(v) * (2 * ring if k == "all_reduce" else ring) for k, v in tp_counts.items())
        queue.put((rank, sent))
    finally:
        dist.destroy_process_group()


def bench_ep_comm(preset: str, ep: int, batch: int, seq: int, overrides: dict[str, Any], tp: int = 1,
                  sp: bool = False) -> dict[str, Any]:
    """Counted and analytic all-to-all bytes per rank of one step at parallel.ep = ``ep`` (and the
    tensor-parallel bytes at parallel.tp = ``tp`` > 1, on ep x tp ranks)."""
    args = dataclasses.replace(get_preset(preset), **overrides, max_seq_len=max(seq, 16)).validate()
    if not args.n_moe_layers or args.n_experts % ep:
        raise ValueError(f"--ep {ep}: the preset needs MoE layers whose {args.n_experts} experts ep divides")
    ParallelDims(ep * tp, tp=tp, ep=ep).check_model(args, seq_len=seq, sequence_parallel=sp)
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    world = ep * tp
    with tempfile.TemporaryDirectory() as tmp:
        procs = [ctx.Process(target=_rank, args=(r, ep, tp, sp, os.path.join(tmp, "rdzv"), args, batch, seq, queue))
                 for r in range(world)]
        for p in procs:
            p.start()
        per_rank = dict(queue.get(timeout=1800) for _ in procs)
        for p in procs:
            p.join()
    expected = analytic_ep_bytes(args, ep, batch * seq)
    rows = [per_rank[r]["rows"] for r in range(world)]
    result = {
        "preset": preset, "overrides": overrides, "ep": ep, "tp": tp, "sequence_parallel": sp, "batch": batch,
        "seq": seq, "moe_layers": args.n_moe_layers, "top_k": args.moe_top_k, "experts": args.n_experts,
        "all_to_all_calls_per_rank": per_rank[0]["calls"],
        "rows_sent_MB_per_rank": [round(b / 1e6, 3) for b in rows],
        "counts_sent_B_per_rank": per_rank[0]["counts"],
        "analytic_MB_per_rank": round(expected / 1e6, 3),
        "counted_over_analytic": round(sum(rows) / len(rows) / expected, 4),
    }
    if tp > 1:
        dense_mlp = args.n_moe_layers * 4 * (tp - 1) / tp * batch * seq * args.dim * 4  # what tp-comm counts for them
        tp_expected = analytic_bytes(args, tp, batch, seq, sp)["total_sent"] - dense_mlp + \
            analytic_moe_tp_bytes(args, tp, batch * seq)
        tp_sent = [per_rank[r]["tp"] for r in range(world)]
        result |= {"tp_sent_MB_per_rank": [round(b / 1e6, 3) for b in tp_sent],
                   "tp_analytic_MB_per_rank": round(tp_expected / 1e6, 3),
                   "tp_counted_over_analytic": round(sum(tp_sent) / len(tp_sent) / tp_expected, 4)}
    return result
