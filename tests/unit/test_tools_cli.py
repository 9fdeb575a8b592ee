"""tools/train_tokenizer.py and tools/prepare_data.py as a user runs them (subprocesses)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from train.data.dataset import PreparedData
from train.data.tokenizer import tokenizer_identity

REPO = Path(__file__).resolve().parents[2]


def _run(tool: str, *args: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(REPO / "tools" / tool), *map(str, args)],
        check=False,
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
    )


@pytest.mark.parametrize("tool", ["train_tokenizer.py", "prepare_data.py", "plot_metrics.py"])
def test_help(tool: str) -> None:
    proc = _run(tool, "--help")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("usage:") and "--out" in proc.stdout


def test_train_tokenizer_then_prepare_data(tmp_path: Path) -> None:
    for i in range(6):
        (tmp_path / f"play{i}.txt").write_text(
            f"ACT {i}.\n" + "What light through yonder window breaks?\n" * 30
        )
    tok = tmp_path / "tok"
    proc = _run("train_tokenizer.py", *sorted(tmp_path.glob("*.txt")), "--vocab-size", 300, "--out", tok)
    assert proc.returncode == 0, proc.stderr
    identity = json.loads(proc.stdout)
    assert identity == tokenizer_identity(tok)

    out = tmp_path / "data"
    args = [*sorted(tmp_path.glob("*.txt")), "--tokenizer", tok, "--out", out, "--val-fraction", "0.34"]
    proc = _run("prepare_data.py", *args)
    assert proc.returncode == 0, proc.stderr
    assert "train: " in proc.stdout and "in 4 docs" in proc.stdout and "val: " in proc.stdout
    data = PreparedData.open(out, expect_tokenizer=identity, verify=True)
    assert data.header["splits"]["val"]["n_docs"] == 2

    again = _run("prepare_data.py", *args)  # refuses to overwrite, cleanly
    assert again.returncode == 2
    assert again.stderr.startswith("tessera: error: out_dir=") and "Traceback" not in again.stderr


def test_cli_errors_are_one_line_not_tracebacks(tmp_path: Path) -> None:
    proc = _run("train_tokenizer.py", tmp_path / "missing.txt", "--vocab-size", 300, "--out", tmp_path / "t")
    assert (
        proc.returncode == 2
        and "missing.txt: does not exist" in proc.stderr
        and "Traceback" not in proc.stderr
    )
    proc = _run("prepare_data.py", tmp_path / "x.txt", "--out", tmp_path / "d")
    assert proc.returncode == 2 and "--tokenizer is missing" in proc.stderr
