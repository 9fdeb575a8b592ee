"""Run a chain of training stages on this machine, each from an earlier stage's exported weights.

    python tools/run_stages.py STAGES.yaml [--dry-run] [--only STAGE]

Every stage's recipe is checked first (train/stages.py). Then, in file order, each stage that has not
finished runs as a subprocess: ``python train/main.py --resume auto ...``, or ``torchrun`` when it asks for
``nproc`` > 1, its output streamed as it comes; its checkpoint is then exported for the stages that start from
it. Finished stages (summary.json and export present) are skipped. The first stage that fails stops the
chain with one line naming it and its exit code (2 for a stages file that fails its checks); running the same
command again continues with that stage, from its newest checkpoint.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: import from the repo root, never from tools/ itself
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import argparse
import os
import shlex
import subprocess
import time

from tools import ToolParser, report_error
from train.distributed import free_port
from train.stages import StagePlan, StagesError, export_stage, load_stages, plan_stages

PROG = "run_stages"
MAIN = Path(__file__).resolve().parents[1] / "train" / "main.py"


def build_parser() -> argparse.ArgumentParser:
    p = ToolParser(prog=PROG, description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("stages", type=Path, metavar="STAGES.yaml", help="the stages file (train/stages.py)")
    p.add_argument("--dry-run", action="store_true", help="check every stage and print the plan; run nothing")
    p.add_argument("--only", metavar="STAGE",
                   help="run this stage alone (the stage it starts from must be finished)")
    return p


def stage_command(plan: StagePlan, python: str = sys.executable) -> list[str]:
    """The launch of one stage: the entry point in one process, or torchrun with ``nproc`` processes."""
    if plan.stage.nproc == 1:
        return [python, str(MAIN), *plan.main_args()]
    return [python, "-m", "torch.distributed.run", "--nproc_per_node", str(plan.stage.nproc), "--master_port",
            str(free_port()), str(MAIN), *plan.main_args()]


def _say(line: str) -> None:
    print(f"{PROG}: {line}", flush=True)


def run_stage(plan: StagePlan, position: str) -> int:
    """Train (unless trained already) and export one stage; 0, or the exit code it failed with."""
    name = plan.stage.name
    if plan.status != "trained":
        start = f" from {plan.start}" if plan.start is not None else ""
        resume = " (resuming its run)" if plan.status == "partial" else ""
        _say(f"stage {position} '{name}'{start}{resume}: {shlex.join(stage_command(plan))}")
        began = time.monotonic()
        code = subprocess.run(stage_command(plan), check=False).returncode  # its output goes straight through
        if code != 0:
            return report_error(f"stage '{name}' failed with exit code {code} (its output is above; run "
                                f"{plan.run_dir}); later stages did not run. Run the same command again to "
                                f"continue from this stage.", code=code if code > 0 else 1)
        if not (plan.run_dir / "summary.json").is_file():
            return report_error(f"stage '{name}' ended without {plan.run_dir / 'summary.json'} (it stopped "
                                f"before its last step); run the same command again to continue it.", code=1)
        _say(f"stage '{name}' trained in {time.monotonic() - began:.0f} s")
    try:
        out = export_stage(plan)
    except StagesError as e:
        return report_error(e, code=1)
    _say(f"stage '{name}': {plan.stage.checkpoint} checkpoint exported to {out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    import torch

    if not torch.cuda.is_available():  # the export consolidates DeepSpeed checkpoints: no accelerator needed
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    try:
        chain = load_stages(args.stages)
        plans, _ = plan_stages(chain)
        if args.only is not None:
            stage = chain.stage(args.only)
            source = next((p for p in plans if p.stage.name == stage.source), None)
            if source is not None and source.status != "done":
                raise StagesError(f"stages {chain.path}: stage '{stage.name}' starts from stage "
                                  f"'{source.stage.name}', which has not finished ({source.status}); run it "
                                  f"first.")
            plans = [p for p in plans if p.stage.name == stage.name]
    except StagesError as e:
        return report_error(e)
    total = len(chain.stages)
    for plan in plans:
        position = f"{chain.stages.index(plan.stage) + 1}/{total}"
        if args.dry_run:
            print(f"# stage {position} '{plan.stage.name}': {plan.status}; run {plan.run_dir}, export "
                  f"{plan.export_dir} ({plan.stage.checkpoint} checkpoint)")
            print(shlex.join(stage_command(plan)))
            continue
        if plan.status == "done":
            _say(f"stage {position} '{plan.stage.name}': finished, skipped (export {plan.export_dir})")
            continue
        code = run_stage(plan, position)
        if code != 0:
            return code
    if not args.dry_run:
        _say(f"stages '{chain.name}' finished: {chain.out_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
