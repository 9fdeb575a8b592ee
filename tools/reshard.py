"""Prepare a checkpoint for resuming on another parallel layout, offline (before a cluster job starts).

Examples:
    python tools/reshard.py runs/pretrain --tp 2 --pp 1                     # beside the newest checkpoint
    python tools/reshard.py runs/pretrain/checkpoints/step_00001000 --tp 1 --pp 4 --out runs/pretrain_pp4
    python tools/reshard.py runs/moe --tp 1 --ep 4                          # an MoE run: experts over 4 ranks

CKPT is a run directory (its newest complete, verified checkpoint is used), its checkpoints/ directory, or one
checkpoint (checkpoints/step_N), saved under any ZeRO stage (only a ZeRO-0 pipeline checkpoint keeps its tp and
pp). The tool writes the checkpoint's layout-free copy (full fp32 weights and Adam moments per parameter, every
expert of an expert-parallel run joined from the files of all its ranks, train/checkpoint/reshard.py) in
``checkpoints/step_N.universal/layout_free``, exactly as a resuming job would, so the job only slices it. With
--out the checkpoint is first copied into the run directory DIR (``DIR/checkpoints/step_N`` and ``latest``):
resume there with ``train.out_dir=DIR --resume auto``. The target layout is checked against the model (tp must
divide the heads, key/value heads and SwiGLU width; pp at most the number of layers; ep must divide the experts
and runs with pp=1). Any world size of that tp, pp and ep resumes from it. The prepared directory is printed on
success; bad input is one line ``tessera: error: ...`` with exit code 2, a failure to read or write files the
same with exit code 1.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path

from model import ModelArgs
from parallel.dims import ParallelConfigError, ParallelDims
from tools import ToolParser, report_error
from train.checkpoint.reshard import consolidate, refusal, saved_layout
from train.checkpoint.writer import CKPT_DIR, CheckpointError, read_meta
from train.export.consolidate import ExportError, resolve_checkpoint

PROG = "reshard"


def build_parser() -> argparse.ArgumentParser:
    """Command-line options of this tool."""
    parser = ToolParser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("ckpt", type=Path, metavar="CKPT", help="run dir, its checkpoints/ dir, or checkpoints/step_N")
    parser.add_argument("--tp", type=int, required=True, help="tensor-parallel degree of the resuming run")
    parser.add_argument("--pp", type=int, default=1, help="pipeline stages of the resuming run (default: 1)")
    parser.add_argument("--ep", type=int, default=1, help="expert-parallel degree of the resuming run (default: 1)")
    parser.add_argument("--out", type=Path, metavar="DIR",
                        help="copy the checkpoint into this new run directory first (default: prepare it in place)")
    return parser


def check_target(meta: dict, tag_dir: Path, tp: int, pp: int, ep: int = 1) -> None:
    """The resuming layout fits the checkpoint's model and optimizer state (ExportError naming the fix if not)."""
    if tp < 1 or pp < 1 or ep < 1:
        raise ExportError(f"--tp {tp} --pp {pp} --ep {ep}: each must be at least 1")
    problem = refusal(tag_dir, meta, tp=tp, pp=pp)
    if problem is not None:
        raise ExportError(problem.removeprefix("--resume: "))
    if meta.get("model_args") and not meta.get("hf"):
        args = ModelArgs(**meta["model_args"])
        try:
            ParallelDims(world_size=tp * pp, tp=tp, pp=pp).check_model(args, seq_len=tp, sequence_parallel=False)
        except ParallelConfigError as err:
            raise ExportError(str(err).replace("parallel.tp", "--tp")) from None
        if pp > args.n_layers:
            raise ExportError(f"--pp {pp}: the model has {args.n_layers} layers; use at most {args.n_layers} stages")
        try:
            ParallelDims(world_size=tp * pp * ep, tp=tp, pp=pp, ep=ep).check_experts(args, zero_stage=2)
        except ParallelConfigError as err:
            raise ExportError(str(err).replace("parallel.ep=", "--ep ").replace("parallel.pp=", "--pp ")) from None
    elif ep > 1:
        raise ExportError(f"--ep {ep}: expert parallelism splits Tessera MoE models; this checkpoint's model is an "
                          f"HF model (hf.path); use --ep 1")


def copy_into(tag_dir: Path, out: Path) -> Path:
    """``tag_dir`` copied into the new run directory ``out`` as its latest checkpoint."""
    dest = out / CKPT_DIR / tag_dir.name
    if dest.exists():
        raise ExportError(f"--out {out}: {dest} exists already; choose a new directory")
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.copytree(tag_dir, dest)
    (dest.parent / "latest").write_text(tag_dir.name)
    return dest


def main(argv: list[str] | None = None) -> int:
    """Run the tool; returns the process exit code."""
    args = build_parser().parse_args(argv)
    os.environ.setdefault("DS_ACCELERATOR", "cpu")  # the converter needs no accelerator
    try:
        tag_dir = resolve_checkpoint(args.ckpt)
        meta = read_meta(tag_dir)
        check_target(meta, tag_dir, args.tp, args.pp, args.ep)
        if args.out is not None:
            tag_dir = copy_into(tag_dir, args.out)
        free = consolidate(tag_dir)
    except (ExportError, CheckpointError) as err:
        return report_error(err)
    except OSError as err:
        return report_error(f"{PROG}: {err}", code=1)
    saved = saved_layout(meta)
    eps = (f", ep={saved.ep}" if saved.ep > 1 else "", f", ep={args.ep}" if args.ep > 1 else "")
    print(f"{tag_dir}: saved with tp={saved.tp}, pp={saved.pp}{eps[0]} on {saved.world_size} ranks; resumes with "
          f"tp={args.tp}, pp={args.pp}{eps[1]} on any number of ranks from {free}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
