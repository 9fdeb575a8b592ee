"""Benchmarks whose figures go to BENCHMARKS.md (always with the command and the machine).

    python tools/bench.py checkpoint --preset llama3-1b --out /tmp/ckpt_bench [--async-save] [--json result.json]
    python tools/bench.py tp-comm --preset llama3-8b --set n_layers=2 --tp 4 --batch 1 --seq 512 [--sp]
    python tools/bench.py ep-comm --preset moe-tiny --ep 2 --batch 4 --seq 128
    python tools/bench.py data-prepare --mb 64 --workers 2 --out /tmp/bench_prep
    python tools/bench.py data-loader --out /tmp/bench_loader
    python tools/bench.py data-index --tokens 1e9 --out /tmp/bench_index
    python tools/bench.py train-step --preset tiny --batch 16 --seq 256 --compare hf bare [--json result.json]

``checkpoint``: builds the model of a preset (optionally resized), gives every parameter full AdamW state
(as after the first step, without spending memory on gradients), hands it to a one-process DeepSpeed engine
(ZeRO-0, fp32: the state every stage writes in total) and times Tessera's checkpoint save (the whole pause a
save puts into training: DeepSpeed files, RNG states, metadata, rename, rotation) and load into a fresh
engine. Reports seconds, bytes and GB/s. With ``--async-save`` the save is ``train.async_save``'s: the pause is
the snapshot to host memory, the total runs until the background write is complete (no load is timed).

``tp-comm``: the bytes each tensor-parallel rank sends in one training step, counted, against the analytic
figure (see `tools/bench_tp.py`). ``ep-comm``: the same for the all-to-all of expert parallelism
(`tools/bench_ep.py`).

The ``data-*`` subcommands are described in ``tools/bench_data.py``, ``train-step`` (step time, tokens/s,
MFU, time shares, peak memory; ``--compare hf bare``) in ``tools/bench_step.py``.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import torch
import yaml

from model import ModelConfigError, Transformer, get_preset
from tools import ToolParser, bench_data, report_error
from tools.bench_ep import bench_ep_comm
from tools.bench_step import bench_train_step
from tools.bench_tp import bench_tp_comm
from train.checkpoint.resume import load_checkpoint
from train.checkpoint.writer import CheckpointWriter, dir_bytes
from train.distributed import init_distributed, read_env


def _engine(args: Any, lr: float, *, with_state: bool) -> Any:
    import deepspeed

    torch.manual_seed(0)
    with torch.device("meta"):
        model = Transformer(args)
    model.to_empty(device="cpu")
    model.init_weights()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    for p in model.parameters() if with_state else ():  # the state AdamW holds after its first step
        optimizer.state[p] = {"step": torch.tensor(1.0), "exp_avg": torch.zeros_like(p),
                              "exp_avg_sq": torch.zeros_like(p)}
    config = {"train_batch_size": 1, "train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 0},
              "steps_per_print": 10**9}
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    return engine


def bench_checkpoint(preset: str, out: Path, overrides: dict[str, Any], *, async_save: bool = False
                     ) -> dict[str, Any]:
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    env = read_env()
    init_distributed(env)
    args = dataclasses.replace(get_preset(preset), **overrides).validate()
    if out.exists():
        raise SystemExit(report_error(f"--out {out} exists; give a new directory (it is deleted afterwards)"))
    engine = _engine(args, 1e-4, with_state=True)
    writer = CheckpointWriter(out, rank=0, keep_last=0, estimate_bytes=args.num_params() * 16,
                              async_save=async_save)
    start = time.perf_counter()
    tag_dir = writer.save(engine, 1, {"model_args": dataclasses.asdict(args)})
    paused_s = time.perf_counter() - start  # an asynchronous save returns after its snapshot
    writer.wait()  # the background write, its file list and the move of `latest`
    save_s = time.perf_counter() - start
    size = dir_bytes(tag_dir)
    if async_save:  # the snapshot doubles the state in memory: no load here
        shutil.rmtree(out)
        return {"preset": preset, "overrides": overrides, "params": args.num_params(), "checkpoint_bytes": size,
                "async_save": True, "training_paused_s": round(paused_s, 2), "save_s": round(save_s, 2),
                "save_GBps": round(size / save_s / 1e9, 3)}
    engine.optimizer.state.clear()  # free the first copy before the load makes the second
    engine.module.to_empty(device="meta")
    del engine
    gc.collect()
    fresh = _engine(args, 1e-4, with_state=False)  # loading creates the Adam state: one copy in memory
    start = time.perf_counter()
    load_checkpoint(fresh, tag_dir, rank=0)
    load_s = time.perf_counter() - start
    shutil.rmtree(out)
    return {
        "preset": preset, "overrides": overrides, "params": args.num_params(), "checkpoint_bytes": size,
        "save_s": round(save_s, 2), "save_GBps": round(size / save_s / 1e9, 3),
        "load_s": round(load_s, 2), "load_GBps": round(size / load_s / 1e9, 3),
        "training_paused_s": round(paused_s, 2),
    }


def _train_step(ns: argparse.Namespace) -> dict[str, Any]:
    try:
        overrides = {k: yaml.safe_load(v) for k, v in (item.split("=", 1) for item in ns.set)}
        args = dataclasses.replace(get_preset(ns.preset), **overrides).validate()
    except (ModelConfigError, TypeError, ValueError) as e:
        raise SystemExit(report_error(e)) from None
    if ns.seq > args.max_seq_len:
        raise SystemExit(report_error(f"--seq {ns.seq} exceeds the model's max_seq_len={args.max_seq_len}"))
    return bench_train_step(args, batch=ns.batch, seq=ns.seq, steps=ns.steps, warmup=ns.warmup,
                            compare=ns.compare, ds_name=ns.ds_config, perf=ns.perf, peak_tflops=ns.peak_tflops)


def main(argv: list[str] | None = None) -> int:
    parser = ToolParser(prog="tools/bench.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="what", required=True)
    ck = sub.add_parser("checkpoint", help="save/load time and throughput of a full training state")
    ck.add_argument("--preset", default="llama3-1b", help="model preset (model/args.py)")
    ck.add_argument("--set", nargs="*", default=[], metavar="FIELD=INT",
                    help="integer ModelArgs overrides, e.g. n_layers=8 vocab_size=32000")
    ck.add_argument("--out", type=Path, required=True, help="scratch directory on the disk to measure")
    ck.add_argument("--json", type=Path, help="also write the result here")
    ck.add_argument("--async-save", action="store_true",
                    help="save as train.async_save does: training paused for the snapshot only (no load timed)")
    tpc = sub.add_parser("tp-comm", help="tensor-parallel bytes sent per step, counted and analytic")
    tpc.add_argument("--preset", default="llama3-8b", help="model preset (model/args.py)")
    tpc.add_argument("--set", nargs="*", default=[], metavar="FIELD=INT", help="integer ModelArgs overrides")
    tpc.add_argument("--tp", type=int, default=2, help="tensor-parallel degree (gloo ranks on this machine)")
    tpc.add_argument("--batch", type=int, default=1, help="micro-batch size")
    tpc.add_argument("--seq", type=int, default=256, help="sequence length")
    tpc.add_argument("--sp", action="store_true", help="sequence parallelism")
    tpc.add_argument("--json", type=Path, help="also write the result here")
    epc = sub.add_parser("ep-comm", help="expert-parallel all-to-all bytes sent per step, counted and analytic")
    epc.add_argument("--preset", default="moe-tiny", help="MoE model preset (model/args.py)")
    epc.add_argument("--set", nargs="*", default=[], metavar="FIELD=INT", help="integer ModelArgs overrides")
    epc.add_argument("--ep", type=int, default=2, help="expert-parallel degree (gloo ranks on this machine)")
    epc.add_argument("--batch", type=int, default=4, help="micro-batch size per rank")
    epc.add_argument("--seq", type=int, default=128, help="sequence length")
    epc.add_argument("--tp", type=int, default=1, help="tensor-parallel degree (ep x tp gloo ranks)")
    epc.add_argument("--sp", action="store_true", help="sequence parallelism (with --tp > 1)")
    epc.add_argument("--json", type=Path, help="also write the result here")
    dp = sub.add_parser("data-prepare", help="preparation tokens/s with 1 and N worker processes")
    dp.add_argument("--mb", type=float, default=64, help="synthetic corpus size in MB of JSONL")
    dp.add_argument("--workers", type=int, default=2, help="worker processes of the second measurement")
    dp.add_argument("--vocab", type=int, default=8192, help="BPE vocabulary size")
    dl = sub.add_parser("data-loader", help="packed pretraining batch assembly, tokens/s in one process")
    dl.add_argument("--tokens", type=int, default=200_000_000, help="tokens of the synthetic dataset")
    dl.add_argument("--seq-len", type=int, default=2048)
    dl.add_argument("--micro-batch", type=int, default=8)
    dl.add_argument("--seconds", type=float, default=3.0, help="time per measurement")
    di = sub.add_parser("data-index", help="blend index build time (cold and cached)")
    di.add_argument("--tokens", type=float, default=1e9, help="total tokens of the three blended datasets")
    di.add_argument("--seq-len", type=int, default=256)
    for p in (dp, dl, di):
        p.add_argument("--out", type=Path, required=True, help="scratch directory (deleted afterwards)")
        p.add_argument("--json", type=Path, help="also write the result here")
    ts = sub.add_parser("train-step", help="training step time, tokens/s, MFU and time shares (vs HF / a bare loop)")
    ts.add_argument("--preset", default="tiny", help="model preset (model/args.py)")
    ts.add_argument("--set", nargs="*", default=[], metavar="FIELD=VALUE",
                    help="ModelArgs overrides, e.g. n_layers=8 vocab_size=32000 (YAML values)")
    ts.add_argument("--batch", type=int, default=16, help="micro-batch size (sequences per step)")
    ts.add_argument("--seq", type=int, default=256, help="sequence length")
    ts.add_argument("--steps", type=int, default=20, help="measured steps per variant")
    ts.add_argument("--warmup", type=int, default=3, help="unmeasured steps per variant first")
    ts.add_argument("--compare", nargs="*", default=[], choices=["hf", "bare", "dense"],
                    help="also run transformers' LlamaForCausalLM / a bare PyTorch loop, same shape and batches; "
                         "dense (a MoE model): Tessera's step on the dense model of the same active parameters")
    ts.add_argument("--ds-config", default=None, help="DeepSpeed config name or path (default: cpu / zero0)")
    ts.add_argument("--perf", nargs="*", default=[], metavar="KEY=VALUE",
                    help="perf section settings, e.g. activation_checkpointing=full compile=true")
    ts.add_argument("--peak-tflops", type=float, default=None, help="the device's peak TFLOP/s for MFU")
    ts.add_argument("--json", type=Path, help="also write the result here")
    args = parser.parse_args(argv)
    if args.what == "tp-comm":
        overrides = {k: int(v) for k, v in (item.split("=", 1) for item in args.set)}
        result = bench_tp_comm(args.preset, args.tp, args.batch, args.seq, args.sp, overrides)
    elif args.what == "ep-comm":
        overrides = {k: int(v) for k, v in (item.split("=", 1) for item in args.set)}
        result = bench_ep_comm(args.preset, args.ep, args.batch, args.seq, overrides, tp=args.tp, sp=args.sp)
    elif args.what == "train-step":
        result = _train_step(args)
    elif args.what == "checkpoint":
        overrides = {k: int(v) for k, v in (item.split("=", 1) for item in args.set)}
        result = bench_checkpoint(args.preset, args.out, overrides, async_save=args.async_save)
    elif args.what == "data-prepare":
        result = bench_data.bench_prepare(args.out, args.mb, args.workers, args.vocab)
    elif args.what == "data-loader":
        result = bench_data.bench_loader(args.out, args.tokens, args.seq_len, args.micro_batch, args.seconds)
    else:
        result = bench_data.bench_index(args.out, args.tokens, args.seq_len)
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
