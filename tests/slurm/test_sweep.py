"""Sweep files: the grid, one run per point with its own directory, and the rendered job array."""

from __future__ import annotations

from pathlib import Path

import pytest

from slurm.plan import plan_submission
from slurm.profile import SlurmConfigError, load_profile, resolve
from slurm.sweep import format_table, load_sweep, point_name, point_overrides
from tests.conftest import SMOKE
from train.config import load_config


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "grid.yaml"
    path.write_text(text)
    return path


def test_grid_points_names_and_overrides(tmp_path: Path) -> None:
    sweep = load_sweep(_write(tmp_path, f"out_dir: {tmp_path / 'sw'}\ngrid:\n  train.lr: [1.0e-3, 3.0e-3, 0.01]\n"
                                        f"  data.sampling: [random, blocks]\n"))
    assert sweep.name == "grid" and sweep.out_dir == tmp_path / "sw"
    points = sweep.points()
    assert len(points) == 6 and points[1] == {"train.lr": 1e-3, "data.sampling": "blocks"}
    assert point_name(1, points[1]) == "001-lr=0.001-sampling=blocks"
    assert point_name(7, {"model.overrides": {"dim": 64}}) == "007-overrides=__dim___64_"
    overrides = point_overrides(points[5])
    assert overrides == ["train.lr=0.01", "data.sampling=blocks"]
    cfg = load_config(str(SMOKE), overrides)  # the recipe loader reads the values back as they were
    assert cfg.train.lr == 0.01 and cfg.data.sampling == "blocks"


@pytest.mark.parametrize(
    "text, fragment",
    [
        ("grid: {}\n", "non-empty 'grid:'"),
        ("grid:\n  lr: [1, 2]\n", "grid key 'lr' must be section.key"),
        ("grid:\n  train.lr: 0.1\n", "grid.train.lr=0.1: give a non-empty list"),
        ("grid:\n  train.lr: [0.1]\nrepeat: 2\n", "unknown field 'repeat'"),
    ],
)
def test_bad_sweep_files(tmp_path: Path, text: str, fragment: str) -> None:
    with pytest.raises(SlurmConfigError, match=fragment):
        load_sweep(_write(tmp_path, text))
    with pytest.raises(SlurmConfigError, match="no such file"):
        load_sweep(tmp_path / "missing.yaml")


def test_sweep_becomes_one_array_with_a_directory_per_point(tmp_path: Path) -> None:
    sweep = load_sweep(_write(tmp_path, f"name: seeds\nout_dir: {tmp_path / 'sw'}\ngrid:\n  train.seed: [1, 2, 3]\n"))
    shape = resolve(load_profile("local"), tasks_per_node=1)
    sub = plan_submission(shape, config=str(SMOKE), overrides=["train.steps=6"], ds_config=None, sweep=sweep)
    assert [r.name for r in sub.runs] == ["000-seed=1", "001-seed=2", "002-seed=3"]
    assert [r.out_dir for r in sub.runs] == [str(tmp_path / "sw" / r.name) for r in sub.runs]
    assert sub.runs[2].overrides[-2:] == ("train.seed=3", f"train.out_dir={tmp_path / 'sw' / '002-seed=3'}")
    assert [r["train"]["seed"] for r in sub.recipes] == [1, 2, 3]
    assert sub.folder == tmp_path / "sw" / "slurm"
    script = sub.sbatch_script().splitlines()
    assert "#SBATCH --array=0-2%3" in script and "#SBATCH --job-name=tessera-seeds" in script
    assert f"#SBATCH --output={tmp_path}/sw/slurm/%A_%a_0_log.out" in script
    # every point is validated: a point whose recipe is wrong refuses the whole sweep
    bad = load_sweep(_write(tmp_path, "grid:\n  train.micro_batch_size: [4, 3]\n"))
    with pytest.raises(Exception, match="micro_batch_size"):
        plan_submission(shape, config=str(SMOKE), overrides=[], ds_config=None, sweep=bad)


def test_summary_table_puts_the_best_first() -> None:
    rows = [{"name": "000-lr=0.1", "train.lr": 0.1, "state": "FAILED", "val_loss": None},
            {"name": "001-lr=0.01", "train.lr": 0.01, "state": "COMPLETED", "val_loss": 4.25},
            {"name": "002-lr=0.001", "train.lr": 0.001, "state": "COMPLETED", "val_loss": 5.5}]
    lines = format_table(rows).splitlines()
    assert lines[0].split() == ["name", "train.lr", "state", "val_loss"]
    assert [line.split()[0] for line in lines[1:]] == ["001-lr=0.01", "002-lr=0.001", "000-lr=0.1"]
    assert lines[1].split()[-1] == "4.2500" and lines[3].split()[-1] == "-"
