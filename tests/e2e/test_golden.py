"""Golden loss curves: three shipped recipes rerun and compared with the numbers recorded before a restructure
(tests/golden/*.json, written by ``python -m tests.golden.curves --write``).

On the CPU they were recorded on (same instruction set and torch), every logged number and the generated
sample must be identical; on another CPU the numbers must agree to a relative 1e-4 (or one unit of the sixth
decimal that metrics.jsonl logs) and the sample is not compared. About 2, 4 and 7 minutes (smoke,
shakespeare_short, stages_cpu) on a busy 2-core machine.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import child_env
from tests.golden.curves import RECIPES, cpu_fingerprint, first_difference, load_golden, run_recipe

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("recipe", RECIPES)
def test_loss_curve_equals_the_recorded_one(recipe: str, tmp_path: Path, data_cache: Path) -> None:
    golden = load_golden(recipe)
    exact = golden["cpu"] == cpu_fingerprint()
    got = run_recipe(recipe, tmp_path, data_cache, child_env(tmp_path))
    difference = first_difference(recipe, golden, got, exact)
    mode = "exactly (same CPU)" if exact else f"to a relative 1e-4 (recorded on {golden['cpu']!r})"
    assert difference is None, f"differs from tests/golden/{recipe}.json, compared {mode}: {difference}"
