"""Golden loss curves: three shipped recipes run on the CPU, their logged numbers kept in this folder.

    python -m tests.golden.curves --write      # record (after a change that is meant to change the numbers)

A restructuring must not change a single number: the test (tests/e2e/test_golden.py) reruns the recipes and
compares every logged training and validation value exactly when the CPU is the one they were recorded on, and
to a relative 1e-4 on another CPU (another instruction set sums in another order).
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
MAIN = REPO / "train" / "main.py"
STAGES = REPO / "tools" / "run_stages.py"
CONFIGS = REPO / "train" / "configs"
# Values that depend on the machine's speed or memory, not on the numerics.
TIMING = {"tokens_per_s", "mem_gb", "step_time_s", "train_time_s", "elapsed_s", "time_s", "eval_time_s"}
RECIPES = ("smoke", "shakespeare_short", "stages_cpu")


def cpu_fingerprint() -> str:
    """The CPU kernels torch picks here: the same fingerprint gives the same numbers."""
    import torch

    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{platform.machine()} {model} {torch.backends.cpu.get_cpu_capability()} torch {torch.__version__}"


def numbers(run_dir: Path) -> list[dict[str, Any]]:
    """The rows of metrics.jsonl without timings; and the generated sample, when there is one."""
    rows = []
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        if line.strip():
            row = json.loads(line)
            rows.append({k: v for k, v in row.items() if k not in TIMING})
    summary = run_dir / "summary.json"
    if summary.exists():
        rows.append({"sample": json.loads(summary.read_text()).get("sample")})
    return rows


def _run(cmd: list[str], env: dict[str, str]) -> None:
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=1200, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {proc.returncode}\n{proc.stderr[-4000:]}")


def run_recipe(name: str, tmp: Path, data_cache: Path, env: dict[str, str]) -> dict[str, Any]:
    """Run one golden recipe under ``tmp``; its numbers by run (one run, or one per stage)."""
    common = [f"data.cache_dir={data_cache}", "log.progress=false", "log.wandb=disabled"]
    if name == "smoke":
        _run([sys.executable, str(MAIN), "--config", str(CONFIGS / "smoke.yaml"),
              f"train.out_dir={tmp / name}", *common], env)
        return {"run": numbers(tmp / name)}
    if name == "shakespeare_short":
        _run([sys.executable, str(MAIN), "--config", str(CONFIGS / "shakespeare.yaml"),
              f"train.out_dir={tmp / name}", "train.steps=24", "train.warmup_steps=8",
              "train.eval_interval=12", "train.save_interval=12", "train.eval_batches=4",
              "train.log_interval=4", "sample.max_new_tokens=32", *common], env)
        return {"run": numbers(tmp / name)}
    assert name == "stages_cpu"
    raw = yaml.safe_load((CONFIGS / "stages_cpu.yaml").read_text())
    raw["out_dir"] = str(tmp / name)
    raw["overrides"] += common
    path = tmp / "stages_cpu.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    _run([sys.executable, str(STAGES), str(path)], env)
    return {stage["name"]: numbers(tmp / name / stage["name"]) for stage in raw["stages"]}


def golden_path(name: str) -> Path:
    return HERE / f"{name}.json"


def load_golden(name: str) -> dict[str, Any]:
    """The recorded ``{"cpu": fingerprint, "runs": {run: rows}}`` of one recipe."""
    return json.loads(golden_path(name).read_text())


# On another CPU: numbers within a relative 1e-4, or within one unit of the sixth decimal (the precision
# metrics.jsonl logs, so a value near zero may round the other way).
REL_TOL, ABS_TOL = 1e-4, 1e-6


def _same(want: Any, got: Any, exact: bool) -> bool:
    if exact or isinstance(want, (bool, str)) or want is None or got is None:
        return want == got and isinstance(want, bool) == isinstance(got, bool)
    if isinstance(want, (int, float)) and isinstance(got, (int, float)) and not isinstance(got, bool):
        return math.isclose(want, got, rel_tol=REL_TOL, abs_tol=ABS_TOL)
    return want == got


def first_difference(name: str, golden: dict[str, Any], got: dict[str, Any], exact: bool) -> str | None:
    """The first place where a rerun's numbers differ from the recorded ones, in words; None if none.

    ``exact``: every number and the sample text equal; else numbers within ``REL_TOL`` / ``ABS_TOL`` and the
    sample text not compared (it is decoded from numbers that may differ in the last place).
    """
    want_runs = golden["runs"]
    if list(want_runs) != list(got):
        return f"{name}: runs {list(got)}, recorded {list(want_runs)}"
    for run, want_rows in want_runs.items():
        rows = got[run]
        for i, (want, row) in enumerate(zip(want_rows, rows)):
            step = want.get("step", "after the last step" if "sample" in want else f"row {i}")
            where = f"{name}: run {run!r}, step {step}"
            if list(want) != list(row):
                return f"{where}: keys {list(row)}, recorded {list(want)}"
            for key, value in want.items():
                if key == "sample" and not exact:
                    continue
                if not _same(value, row[key], exact):
                    return f"{where}, key {key!r}: {row[key]!r}, recorded {value!r}"
        if len(rows) != len(want_rows):
            return f"{name}: run {run!r}: {len(rows)} logged rows, recorded {len(want_rows)}"
    return None


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--write", action="store_true", help="record the golden numbers of every recipe")
    p.add_argument("--only", choices=RECIPES, help="one recipe")
    args = p.parse_args()
    if not args.write:
        p.error("nothing to do: pass --write")
    import os

    env = {**os.environ, "DS_ACCELERATOR": "cpu", "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1",
           "HF_DATASETS_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    with tempfile.TemporaryDirectory() as tmp:
        for name in [args.only] if args.only else RECIPES:
            got = run_recipe(name, Path(tmp), Path(tmp) / "data_cache", env)
            golden_path(name).write_text(json.dumps({"cpu": cpu_fingerprint(), "runs": got}, indent=1) + "\n")
            print(f"wrote {golden_path(name)}")


if __name__ == "__main__":
    main()
