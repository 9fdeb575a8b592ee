"""Tessera's one entry point.

    python train/main.py [--config RECIPE.yaml] [--ds_config NAME|PATH] [--resume auto] [section.key=value ...]
    torchrun --nproc_per_node 2 train/main.py ...
    deepspeed --num_accelerators 2 train/main.py --ds_config ds_configs/zero3.json ...

Everything that can be checked without a device (recipe, overrides, DeepSpeed config, batch geometry, run
directory, corpus, tokenizer) is checked first; a problem ends the run with one line and exit code 2,
before any process group starts or any file is written.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: import from the repo root, never from train/ itself
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import argparse
import logging
import os
import warnings
from typing import TYPE_CHECKING, Any

# Start-up in three steps, each importing only what it needs: the arguments (argparse: --help answers at once),
# the recipe and the launcher variables (train.config.load, train.distributed: torch, yaml, the schema), then,
# once they are valid, the training stack (train/session.py: DeepSpeed, transformers, data, checkpoints).
if TYPE_CHECKING:
    from train.distributed import DistEnv
    from train.loop.preempt import RunControl
    from train.plan import Plan

DEFAULT_RECIPE = Path(__file__).resolve().parent / "configs" / "shakespeare.yaml"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="train/main.py", description="Train a decoder LM with DeepSpeed.")
    p.add_argument("--config", default=str(DEFAULT_RECIPE), help="YAML recipe (default: %(default)s)")
    p.add_argument("--ds_config", default=None,
                   help="DeepSpeed JSON, a path or a name in ds_configs/ (default: cpu without CUDA, else zero0)")
    p.add_argument("--resume", default="never",
                   help="'auto': continue from the newest complete checkpoint in train.out_dir if there is one, "
                        "else start; 'latest': the same, but an error when there is none; a checkpoint "
                        "directory: continue from it; 'never' (default): refuse a used out_dir")
    p.add_argument("--verify-checksums", action="store_true",
                   help="before resuming, compare each checkpoint file's sha256 with the one saved with it")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--help-config", action="store_true", help="list every recipe key with the value the recipe and overrides give it (and the "
                        "schema's default where it differs), and exit")
    p.add_argument("overrides", nargs="*", metavar="section.key=value", help="recipe overrides")
    return p.parse_intermixed_args(argv)  # overrides before and after the flags, in the order given


def _setup_logging(env: DistEnv) -> None:
    # DeepSpeed calls collectives that torch has renamed; the warning says nothing a user can act on.
    warnings.filterwarnings("ignore", message=".*(all_gather_into_tensor|reduce_scatter_tensor).*",
                            category=FutureWarning)
    logging.basicConfig(level=logging.INFO if env.is_main else logging.WARNING,
                        format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    # DeepSpeed's pipeline sends activations with an in-place broadcast on gloo; backward passes through it
    # unchanged on the sending rank, which torch reports as a missing autograd kernel.
    warnings.filterwarnings("ignore", message=r"c10d::broadcast_: an autograd kernel was not registered",
                            category=UserWarning)


def run(p: Plan, control: RunControl | None = None) -> dict[str, Any]:
    """Train the planned run (``train.session.run``). Collective: every rank calls it."""
    from train import session

    return session.run(p, control)


def main(argv: list[str] | None = None, *, control: RunControl | None = None) -> int:
    """Run from ``argv``; ``control`` (train/loop/preempt.py) lets a caller in this process stop the run."""
    args = parse_args(argv)  # --help answers here, before torch is imported
    import torch

    from train import distributed
    from train.config import load as config

    if args.help_config:
        try:
            cfg = config.load_config(args.config, args.overrides)
        except config.ConfigError as e:
            print(f"tessera: error: {e}", file=sys.stderr)
            return 2
        print(f"# the values of {args.config}{' with the overrides given' if args.overrides else ''}; "
              f"(default X): the schema's default, where it differs")
        print(config.describe_fields(cfg))
        return 0
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    try:
        env = distributed.read_env(args.local_rank)
    except distributed.LaunchEnvError as e:  # a launcher variable that cannot be right: every process says so
        print(f"tessera: error: {e}", file=sys.stderr)
        return 2
    _setup_logging(env)
    try:  # the recipe alone first: a bad key or value answers before the training stack is imported
        cfg = config.load_config(args.config, args.overrides)
    except config.ConfigError as e:
        if env.is_main:
            print(f"tessera: error: {e}", file=sys.stderr)
        return 2
    from train import session  # DeepSpeed, transformers, the data stack: only for a valid recipe

    try:
        p = session.plan(args, cfg)
    except session.USER_ERRORS as e:
        if env.is_main:
            print(f"tessera: error: {e}", file=sys.stderr)
        return 2
    try:
        run(p, control)
    # raised on every rank together: a checkpoint that cannot be written or read, a run that keeps diverging,
    # pretrained weights that do not match their config, a research loss term that is not a finite scalar
    except session.RUN_ERRORS as e:
        if env.is_main:
            print(f"tessera: error: {e}", file=sys.stderr)
        distributed.shutdown_distributed()
        return 1
    except distributed.RendezvousError as e:  # ranks that never came, or a rendezvous out of reach: all say so
        print(f"tessera: error: {e}", file=sys.stderr)
        return 1
    except session.PEER_ERRORS as e:  # a collective failed: a lost peer is one line on every surviving rank
        lost = distributed.describe_peer_loss(e, env)
        if lost is None:
            raise
        print(f"tessera: error: {lost}", file=sys.stderr, flush=True)
        return 1  # no shutdown: there is no one left to leave together with
    distributed.shutdown_distributed()
    return 0


def cli() -> None:
    sys.exit(main())


if __name__ == "__main__":
    cli()
