"""Run output on rank 0: a progress bar, a JSONL metrics file and wandb (offline unless configured)."""

from __future__ import annotations

import json
import math
import os
import resource
import sys
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm


def peak_memory_gb(device: torch.device) -> float:
    """Peak allocated GPU memory on CUDA, else the process's peak resident memory."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # Linux reports KiB
    return kb / 2**20


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """All rows of a metrics.jsonl file."""
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


class MetricsLogger:
    """Writes metrics rows, drives the progress bar and mirrors rows to wandb; a no-op on other ranks."""

    def __init__(
        self,
        out_dir: Path,
        *,
        enabled: bool,
        total_steps: int,
        start_step: int,
        progress: bool,
        wandb_mode: str,
        wandb_project: str,
        run_name: str,
        run_id: str,
        config: dict[str, Any],
    ) -> None:
        self.enabled = enabled
        self.path = out_dir / "metrics.jsonl"
        self._wandb = None
        self._bar = None
        if not enabled:
            return
        self.truncate_after(start_step)
        if progress:
            self._bar = tqdm(total=total_steps, initial=start_step, desc="train", unit="step",
                             dynamic_ncols=True, file=sys.stderr, mininterval=0.5)
        if wandb_mode != "disabled":
            self._wandb = self._start_wandb(out_dir, wandb_mode, wandb_project, run_name, run_id, config)

    def truncate_after(self, step: int) -> None:
        """On resume or rollback, drop rows of steps the run will redo, so the file shows one curve."""
        if not self.enabled or not self.path.exists():
            return
        # events (skipped steps, spikes, rollbacks) stay: they are the history of what was redone
        kept = [r for r in read_metrics(self.path) if r.get("step", 0) <= step or "event" in r]
        tmp = self.path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
        os.replace(tmp, self.path)

    @staticmethod
    def _start_wandb(out_dir: Path, mode: str, project: str, name: str, run_id: str, config: dict) -> Any:
        os.environ.setdefault("WANDB_SILENT", "true")
        import wandb

        return wandb.init(project=project, name=name, id=run_id, resume="allow", dir=str(out_dir), mode=mode,
                          config=config, settings=wandb.Settings(console="off", silent=True))

    def log(self, row: dict[str, Any]) -> None:
        if not self.enabled:
            return
        # strict JSON: non-finite numbers (an overflowed grad norm) are written as null
        row = {k: ((round(v, 6) if math.isfinite(v) else None) if isinstance(v, float) else v)
               for k, v in row.items()}
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        if self._wandb is not None:
            self._wandb.log({k: v for k, v in row.items() if k != "step"}, step=row["step"])

    def progress(self, step: int, **postfix: Any) -> None:
        if self._bar is None:
            return
        self._bar.update(step - self._bar.n)
        self._bar.set_postfix(postfix, refresh=False)

    def write(self, message: str) -> None:
        """Print a line without breaking the progress bar."""
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.write(message, file=sys.stderr)
        else:
            print(message, file=sys.stderr, flush=True)

    def close(self, summary: dict[str, Any] | None = None) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        if self._wandb is not None:
            if summary:
                self._wandb.summary.update(summary)
            self._wandb.finish()
            self._wandb = None
