"""Research runs through the real entry point: an evaluation-only run of a fixed injected vector (no optimizer
step, no checkpoint, a summary), and the best checkpoint chosen by another validation metric and direction."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import python_main, read_rows, run_job

pytestmark = pytest.mark.slow
CONFIG = "train/configs/injection.yaml"
QUIET = ["log.progress=false", "sample.max_new_tokens=0", "research.options.max_new_tokens=2",
         "research.diagnostics_interval=0"]


def test_steps_zero_evaluates_the_starting_weights_of_a_fixed_vector(tmp_path: Path) -> None:
    """A zero-shot point: nothing trains (a fixed vector on a frozen base), the recipe's evaluation and report run,
    and lambda changes the result (the vector is really injected)."""
    results = {}
    for scale in (0, 4):
        out = tmp_path / f"scale{scale}"
        run_job(python_main("--config", CONFIG, f"train.out_dir={out}", "train.steps=0", *QUIET,
                            "research.options.source=fixed", f"research.options.scale={scale}",
                            "research.options.layers='1-2'", "research.terms={}", "research.groups=[]"), tmp_path)
        summary = json.loads((out / "summary.json").read_text())
        assert summary["steps"] == 0 and summary["consistency_turns"] == 2
        assert not (out / "checkpoints").exists()
        results[scale] = summary["val_lm"]
    assert results[4] > results[0] + 1e-3, results


def test_best_checkpoint_by_the_highest_logged_metric(tmp_path: Path) -> None:
    out = tmp_path / "best"
    run_job(python_main("--config", CONFIG, f"train.out_dir={out}", "train.steps=6", "train.eval_interval=2",
                        "train.save_interval=0", "train.keep_last=0", "train.warmup_steps=1", *QUIET,
                        "train.best_metric=val_kl", "train.best_mode=max", "train.best_smoothing=0"), tmp_path)
    evals = {r["step"]: r["val_kl"] for r in read_rows(out) if "val_kl" in r}
    assert sorted(evals) == [2, 4, 6]
    best = max(evals, key=evals.get)
    assert (out / "checkpoints" / "best").read_text().strip() == f"step_{best:08d}", evals
    lowest = min(evals, key=evals.get)
    assert lowest != best
