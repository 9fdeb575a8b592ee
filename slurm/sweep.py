"""Sweeps: a grid of recipe overrides in a YAML file becomes one SLURM job array, one run directory per point.

    # sweeps/lr.yaml
    name: lr                       # optional (default: the file's name)
    out_dir: runs/sweeps/lr        # optional (default: runs/sweeps/<name>); points go in subdirectories
    grid:                          # every combination is a point (here 3 x 2 = 6)
      train.lr: [1.0e-3, 3.0e-3, 1.0e-2]
      train.seed: [1, 2]

A grid key may name a key inside a mapping field (``research.options.layers: ["0-1", "1-2"]``); with
``train.steps: [0]`` (or ``train.steps=0`` in the recipe) every point only evaluates its starting weights, a
zero-shot sweep.

``python slurm/submit.py --profile P --config R --sweep sweeps/lr.yaml`` submits it with ``map_array``;
``python slurm/submit.py summary runs/sweeps/lr`` (or ``--wait`` at submission) tabulates the results.
"""

from __future__ import annotations

import itertools
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from slurm.jobs import RECORD_FILE, JobRecord, history, job_state
from slurm.profile import SlurmConfigError

SWEEP_FILE = "sweep.json"  # in the sweep directory: points, run directories, job ids
SUMMARY_FILE = "summary.json"


@dataclass(frozen=True)
class Sweep:
    name: str
    out_dir: Path
    keys: list[str]  # section.key of each grid axis, in file order
    values: list[list[Any]]  # the values of each axis

    def points(self) -> list[dict[str, Any]]:
        """Every combination, the last axis varying fastest."""
        return [dict(zip(self.keys, combo, strict=True)) for combo in itertools.product(*self.values)]


def point_name(index: int, point: dict[str, Any]) -> str:
    """A directory name: ``003-lr=0.01-seed=2`` (the last part of each key, path-safe)."""
    parts = [f"{key.rsplit('.', 1)[-1]}={value}" for key, value in point.items()]
    return re.sub(r"[^A-Za-z0-9_.=+-]", "_", "-".join([f"{index:03d}", *parts]))


def point_overrides(point: dict[str, Any]) -> list[str]:
    """``section.key=value`` overrides, values written as YAML so the recipe loader reads them back alike."""
    return [f"{key}={yaml.safe_dump(value, default_flow_style=True).strip().removesuffix('...').strip()}"
            for key, value in point.items()]


def load_sweep(path: str | Path) -> Sweep:
    path = Path(path)
    if not path.is_file():
        raise SlurmConfigError(f"--sweep {path}: no such file; give a YAML file with a grid: mapping.")
    raw = yaml.safe_load(path.read_text()) or {}
    if not isinstance(raw, dict) or not isinstance(raw.get("grid"), dict) or not raw["grid"]:
        raise SlurmConfigError(f"--sweep {path}: expected a mapping with a non-empty 'grid:' of section.key: "
                               f"[values, ...] (see slurm/sweep.py).")
    unknown = sorted(set(raw) - {"name", "out_dir", "grid"})
    if unknown:
        raise SlurmConfigError(f"--sweep {path}: unknown field '{unknown[0]}'; a sweep has name, out_dir, "
                               f"grid.")
    keys, values = [], []
    for key, vals in raw["grid"].items():
        if not isinstance(key, str) or "." not in key or not all(key.split(".")):
            raise SlurmConfigError(f"--sweep {path}: grid key {key!r} must be section.key (e.g. train.lr) or a "
                                   f"nested key of a mapping (e.g. research.options.scale).")
        if not isinstance(vals, list) or not vals:
            raise SlurmConfigError(f"--sweep {path}: grid.{key}={vals!r}: give a non-empty list of values.")
        keys.append(key)
        values.append(vals)
    name = str(raw.get("name") or path.stem)
    out_dir = Path(raw.get("out_dir") or Path("runs") / "sweeps" / name)
    return Sweep(name=name, out_dir=out_dir.resolve(), keys=keys, values=values)


def write_sweep_record(sweep: Sweep, rows: list[dict[str, Any]]) -> Path:
    """``rows``: one per point with name, point, out_dir, job_id."""
    sweep.out_dir.mkdir(parents=True, exist_ok=True)
    path = sweep.out_dir / SWEEP_FILE
    path.write_text(json.dumps({"name": sweep.name, "keys": sweep.keys, "points": rows}, indent=2) + "\n")
    return path


def summarize(sweep_dir: str | Path) -> list[dict[str, Any]]:
    """One row per point: its values, job state, restarts and the time they lost (slurm/runlog.py), last step,
    final validation loss and perplexity.

    Writes ``summary.json`` beside ``sweep.json``. Rows of points without a result have None there.
    """
    sweep_dir = Path(sweep_dir)
    record_file = sweep_dir / SWEEP_FILE
    if not record_file.is_file():
        raise SlurmConfigError(f"{sweep_dir}: no {SWEEP_FILE}; give the out_dir of a submitted sweep.")
    record = json.loads(record_file.read_text())
    rows = []
    for p in record["points"]:
        state = job_state(p["job_id"])
        summary_file = Path(p["out_dir"]) / "summary.json"
        result = json.loads(summary_file.read_text()) if summary_file.is_file() else {}
        run_record = Path(p["out_dir"]) / RECORD_FILE
        past = history(JobRecord(**json.loads(run_record.read_text()))) if run_record.is_file() else None
        rows.append({"name": p["name"], **p["point"], "job_id": p["job_id"],
                     "state": state.state if state else "UNKNOWN",
                     "restarts": past.restarts if past else None, "lost": past.lost_text() if past else None,
                     "steps": result.get("steps"),
                     "val_loss": result.get("val_loss"), "val_ppl": result.get("val_ppl")})
    (sweep_dir / SUMMARY_FILE).write_text(json.dumps(rows, indent=2) + "\n")
    return rows


def format_table(rows: list[dict[str, Any]]) -> str:
    """Rows as aligned text columns, the best validation loss first (points without one last)."""
    if not rows:
        return "(no points)"
    rows = sorted(rows, key=lambda r: (r["val_loss"] is None, r["val_loss"] or 0.0))
    cols = list(rows[0])

    def cell(col: str, v: Any) -> str:
        return "-" if v is None else f"{v:.4f}" if col in ("val_loss", "val_ppl") else str(v)

    width = {c: max(len(c), *(len(cell(c, r[c])) for r in rows)) for c in cols}
    lines = ["  ".join(c.ljust(width[c]) for c in cols)]
    lines += ["  ".join(cell(c, r[c]).ljust(width[c]) for c in cols) for r in rows]
    return "\n".join(lines)
