"""Plot training runs: loss (train and val), learning rate and tokens/s against step, one line per run.

Examples:
    python tools/plot_metrics.py runs/tiny                    # writes runs/tiny/metrics.png
    python tools/plot_metrics.py runs/a/metrics.jsonl runs/b --out compare.png --title "a vs b"

Each input is a run directory holding `metrics.jsonl` or the file itself. Without `--out` the figure goes
into the run directory: `metrics.png` for one run, `metrics-compare.png` in the first run's directory for
several. Train rows carry
"step", "loss", "lr", "tokens_per_s" (and more); eval rows carry "step", "val_loss", "val_ppl".
A run is labelled by its directory name. A cut-off last line (a run still writing) is ignored.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tools import ToolParser, report_error

METRICS_FILE = "metrics.jsonl"
"""File name of a run's metrics inside its run directory."""
PLOT_FILE = "metrics.png"
"""Default figure of one run, written into its run directory."""
COMPARE_FILE = "metrics-compare.png"
"""Default figure of several runs, written into the first run's directory."""
_PANELS = (("loss", "loss"), ("lr", "learning rate"), ("tokens_per_s", "tokens / s"))


class MetricsError(ValueError):
    """A metrics file is missing or unreadable; the message names it and the fix."""


@dataclass
class RunMetrics:
    """The rows of one run's metrics.jsonl, split into train and eval rows."""

    label: str  # legend label (the run directory name)
    train: list[dict[str, Any]] = field(default_factory=list)  # rows with "loss"
    evals: list[dict[str, Any]] = field(default_factory=list)  # rows with "val_loss"

    def series(self, key: str, rows: str = "train") -> tuple[list[float], list[float]]:
        """(steps, values) of `key` over the train or eval rows that have both."""
        picked = [r for r in (self.train if rows == "train" else self.evals) if key in r and "step" in r]
        return [float(r["step"]) for r in picked], [float(r[key]) for r in picked]


def metrics_path(run: Path) -> Path:
    """The metrics.jsonl of a run directory, or `run` itself when it is a file."""
    path = run / METRICS_FILE if run.is_dir() else run
    if not path.is_file():
        raise MetricsError(f"{path}: no such metrics file; pass a run dir holding {METRICS_FILE} or the file")
    return path


def read_metrics(run: Path, label: str | None = None) -> RunMetrics:
    """Parse one run's metrics.jsonl (blank lines skipped, a cut-off last line ignored)."""
    path = metrics_path(run)
    lines = path.read_text(encoding="utf-8").splitlines()
    metrics = RunMetrics(label or path.parent.name)
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            if lineno == len(lines):  # the run is still writing its last line
                break
            raise MetricsError(f"{path}:{lineno}: not JSON ({err}); fix or delete the line") from err
        if "val_loss" in row:
            metrics.evals.append(row)
        elif "loss" in row:
            metrics.train.append(row)
    if not metrics.train and not metrics.evals:
        raise MetricsError(f"{path}: no train ('loss') or eval ('val_loss') rows; is it a metrics file?")
    return metrics


def _labels(paths: Sequence[Path]) -> list[str]:
    """Run directory names, or their full paths where two runs share a name."""
    names = [p.parent.name for p in paths]
    return [str(p.parent) if names.count(n) > 1 else n for p, n in zip(paths, names)]


def default_out(runs: Sequence[Path | str]) -> Path:
    """Where the figure goes without `--out`: into the (first) run's directory."""
    if not runs:
        raise MetricsError("runs=[]: pass at least one run dir or metrics.jsonl")
    run_dir = metrics_path(Path(runs[0])).parent
    return run_dir / (PLOT_FILE if len(runs) == 1 else COMPARE_FILE)


def plot_metrics(runs: Sequence[Path | str], out: Path | str | None = None, *, title: str | None = None) -> Path:
    """Draw loss (train solid, val dashed with dots), lr and tokens/s vs step for `runs` into PNG `out`
    (default: `default_out(runs)`, in the run directory)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if not runs:
        raise MetricsError("runs=[]: pass at least one run dir or metrics.jsonl")
    paths = [metrics_path(Path(r)) for r in runs]
    all_metrics = [read_metrics(p, label) for p, label in zip(paths, _labels(paths))]
    fig = Figure(figsize=(9, 9), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(_PANELS), 1, sharex=True)
    palette = [f"C{i % 10}" for i in range(len(all_metrics))]
    for metrics, color in zip(all_metrics, palette):
        for ax, (key, _) in zip(axes, _PANELS):
            steps, values = metrics.series(key)
            if steps:
                label = f"{metrics.label} train" if key == "loss" else metrics.label
                ax.plot(steps, values, color=color, label=label)
        steps, values = metrics.series("val_loss", rows="evals")
        if steps:
            axes[0].plot(steps, values, "o--", color=color, label=f"{metrics.label} val")
    for ax, (_, name) in zip(axes, _PANELS):
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize="small")
    axes[-1].set_xlabel("step")
    if title:
        fig.suptitle(title)
    out_path = default_out(runs) if out is None else Path(out)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_path, format="png", dpi=110)
    return out_path


def main(argv: list[str] | None = None) -> int:
    """Run the tool; returns the process exit code."""
    parser = ToolParser(prog="tools/plot_metrics.py", description=__doc__,
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", type=Path, help="run directories or metrics.jsonl files")
    parser.add_argument("--out", type=Path, default=None,
                        help=f"output PNG path (default: RUN_DIR/{PLOT_FILE}; several runs: the first one's "
                        f"RUN_DIR/{COMPARE_FILE})")
    parser.add_argument("--title", help="figure title")
    args = parser.parse_args(argv)
    try:
        print(plot_metrics(args.runs, args.out, title=args.title))
    except MetricsError as err:
        return report_error(err)
    return 0


if __name__ == "__main__":
    sys.exit(main())
