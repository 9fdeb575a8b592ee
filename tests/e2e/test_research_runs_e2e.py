"""Research runs through the real entry point: an evaluation-only run of a fixed injected vector (no optimizer
step, no checkpoint, a summary), the best checkpoint chosen by another validation metric and direction, and a
warm start from another run's extension weights."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from model import Transformer, get_preset
from tests.conftest import python_main, read_rows, run_job
from train.config.fields import ConfigError
from train.config.load import load_config
from train.research.api import RecipeContext
from train.research.injection import Injection, InjectionOptions
from train.research.warm_start import resolve_source, warm_start

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
        (row,) = read_rows(out)  # the evaluation is in metrics.jsonl too, at step 0
        assert row["step"] == 0 and row["val_lm"] == pytest.approx(summary["val_lm"], abs=1e-6)
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


def test_warm_start_from_another_runs_extension(tmp_path: Path) -> None:
    """Stage A trains the head; stage B starts from its weights with new options (an evaluation-only run here):
    its validation equals A's final one. A head of another size is refused in one line."""
    a, b = tmp_path / "a", tmp_path / "b"
    common = ["--config", CONFIG, *QUIET, "research.options.source=head", "research.terms={}"]
    run_job(python_main(*common, f"train.out_dir={a}", "train.steps=3", "train.eval_interval=0",
                        "train.warmup_steps=1"), tmp_path)
    proc = run_job(python_main(*common, f"train.out_dir={b}", "train.steps=0", f"research.init_from={a}",
                               "research.options.prompts=['Again?']"), tmp_path)
    assert "research.init_from: 4 tensors of the recipe's modules" in proc.stderr, proc.stderr[-2000:]
    final_a = [r for r in read_rows(a) if "val_lm" in r][-1]["val_lm"]
    assert json.loads((b / "summary.json").read_text())["val_lm"] == pytest.approx(final_a, rel=1e-6)

    cfg = load_config(CONFIG, ["research.options.rank=8"])
    ext = Injection(_native(), RecipeContext(dim=128, n_layers=4, vocab_size=512, device=torch.device("cpu"),
                                             out_dir=b, rank=0, seed=0, config=cfg), InjectionOptions(rank=8))
    with pytest.raises(ConfigError, match=r"head.down_bias has shape \(16,\) there and \(8,\) in this run"):
        warm_start(ext, resolve_source(a))
    with pytest.raises(ConfigError, match="research.init_from=.*no such directory"):
        resolve_source(tmp_path / "missing")


def _native() -> torch.nn.Module:
    return Transformer(dataclasses.replace(get_preset("test-1m"), vocab_size=512))
