"""tools/plot_metrics.py: metrics.jsonl files of several runs -> one PNG."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from tools.plot_metrics import MetricsError, plot_metrics, read_metrics

REPO = Path(__file__).resolve().parents[2]
_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _write_run(run_dir: Path, scale: float, *, evals: bool = True, cut_last_line: bool = False) -> Path:
    run_dir.mkdir(parents=True)
    lines = []
    for step in range(1, 31):
        loss = scale * 5 / math.sqrt(step)
        lines.append(
            {
                "step": step,
                "loss": loss,
                "lr": 1e-3 * min(1.0, step / 10),
                "grad_norm": 1.0,
                "tokens_per_s": 900.0 + step,
                "mem_gb": 0.2,
                "elapsed_s": step * 0.5,
            }
        )
        if evals and step % 10 == 0:
            lines.append({"step": step, "val_loss": loss * 1.1, "val_ppl": math.exp(loss * 1.1)})
    text = "".join(json.dumps(row) + "\n" for row in lines)
    (run_dir / "metrics.jsonl").write_text(text + ('{"step": 31, "lo' if cut_last_line else ""))
    return run_dir


def _assert_png(path: Path) -> None:
    data = path.read_bytes()
    assert data.startswith(_PNG_MAGIC) and len(data) > 10_000
    assert data[12:16] == b"IHDR" and int.from_bytes(data[16:20], "big") > 300  # width in pixels


def test_two_runs_make_a_png(tmp_path: Path) -> None:
    a = _write_run(tmp_path / "runs" / "a", 1.0, cut_last_line=True)
    b = _write_run(tmp_path / "runs" / "b", 1.3, evals=False)
    out = plot_metrics([a, b / "metrics.jsonl"], tmp_path / "plots" / "loss.png", title="a vs b")
    _assert_png(out)
    metrics = read_metrics(a)
    assert metrics.label == "a" and len(metrics.train) == 30 and len(metrics.evals) == 3
    assert metrics.series("val_loss", rows="evals")[0] == [10.0, 20.0, 30.0]


def test_cli_writes_the_png(tmp_path: Path) -> None:
    runs = [_write_run(tmp_path / "x" / "run", 1.0), _write_run(tmp_path / "y" / "run", 0.8)]
    out = tmp_path / "cmp.png"
    proc = subprocess.run(
        [sys.executable, str(REPO / "tools" / "plot_metrics.py"), *map(str, runs), "--out", str(out)],
        check=False,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == str(out)
    _assert_png(out)


def test_unusable_metrics_are_reported(tmp_path: Path) -> None:
    with pytest.raises(MetricsError, match=r"no such metrics file; pass a run dir holding metrics\.jsonl"):
        plot_metrics([tmp_path / "nope"], tmp_path / "o.png")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "metrics.jsonl").write_text('{"step": 1, "loss": 2}\n{oops\n{"step": 2, "loss": 1}\n')
    with pytest.raises(MetricsError, match=r"metrics\.jsonl:2: not JSON"):
        read_metrics(tmp_path / "bad")
    (tmp_path / "bad" / "metrics.jsonl").write_text('{"step": 1, "other": 2}\n')
    with pytest.raises(MetricsError, match="no train .* or eval .* rows"):
        read_metrics(tmp_path / "bad")
    assert not (tmp_path / "o.png").exists()


def test_the_figure_goes_into_the_run_directory_by_default(tmp_path: Path) -> None:
    a = _write_run(tmp_path / "runs" / "a", 1.0)
    b = _write_run(tmp_path / "runs" / "b", 1.2)
    assert plot_metrics([a]) == a / "metrics.png"
    assert plot_metrics([a / "metrics.jsonl", b], title="a vs b") == a / "metrics-compare.png"
    _assert_png(a / "metrics.png")
    _assert_png(a / "metrics-compare.png")
    assert not (b / "metrics.png").exists()
