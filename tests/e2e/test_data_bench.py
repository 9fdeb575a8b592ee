"""tools/bench.py data subcommands run end to end on small sizes and report consistent figures."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO, run_job

pytestmark = pytest.mark.slow


def _bench(tmp_path: Path, *args: str) -> dict:
    out = tmp_path / "result.json"
    run_job([sys.executable, str(REPO / "tools" / "bench.py"), *args, "--out", str(tmp_path / "scratch"),
             "--json", str(out)], tmp_path)
    assert not (tmp_path / "scratch").exists()  # scratch data is removed
    return json.loads(out.read_text())


def test_data_benchmarks(tmp_path: Path) -> None:
    prep = _bench(tmp_path, "data-prepare", "--mb", "1", "--workers", "2", "--vocab", "512")
    assert prep["workers_1"]["tokens"] == prep["workers_2"]["tokens"] > 100_000
    assert prep["workers_2"]["tokens_per_s_per_worker"] * 2 == pytest.approx(prep["workers_2"]["tokens_per_s"], abs=2)
    loader = _bench(tmp_path, "data-loader", "--tokens", "2000000", "--seq-len", "256", "--seconds", "0.3")
    assert set(loader) >= {"random_tokens_per_s", "blocks+doc_mask_tokens_per_s"}
    assert all(v > 0 for k, v in loader.items() if k.endswith("_per_s"))
    index = _bench(tmp_path, "data-index", "--tokens", "1e7", "--seq-len", "128")
    assert index["samples"] == sum((int(1e7 * s) - 1) // 128 for s in (0.6, 0.3, 0.1))  # one pass of each
    assert index["cached_reopen_s"] < index["build_s"] + 1
