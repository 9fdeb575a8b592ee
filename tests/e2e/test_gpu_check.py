"""tools/gpu/check.sh: its dry run on CPU (tiny shapes, gloo) runs every stage of the GPU check and writes a
report that says what passed; a failed correctness stage makes the exit status non-zero.

The dry run took 94 s on a 2-core machine at load average 4-7, and 269 s at load average 7-14 (other test runs and
a benchmark beside it): env 18 s, gpu tests 15 s, two smoke trainings 57 + 65 s, bench 36 s, memory 48 s, 2-process
gloo run 11 s, compile 19 s. With the configs and qlora stages, 404 s at load average 11-12: env 20 s, gpu tests
32 s, smoke 67 + 28 s, configs 32 + 17 s (rtx3060 and h100 stand-ins), qlora 37 s, bench 27 s, memory 82 s, gloo
32 s, compile 32 s.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO, child_env
from tools.gpu.check import Check, table

STAGES = ["install", "env", "gpu_tests", "smoke", "configs", "qlora", "bench", "memory", "nccl", "compile"]


@pytest.mark.slow
def test_dry_run_runs_every_stage_and_reports(tmp_path: Path, data_cache: Path) -> None:
    out = tmp_path / "out"
    # a generous total budget: on a machine shared with other test runs the stages take several times longer
    proc = subprocess.run([str(REPO / "tools" / "gpu" / "check.sh"), "--dry-run", str(out), "--data-cache",
                           str(data_cache), "--bundle", str(tmp_path / "no-bundle"), "--budget-s", "800"], cwd=REPO,
                          env=child_env(tmp_path), capture_output=True, text=True, timeout=900, check=False)
    report = json.loads((out / "report.json").read_text())
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{(out / 'check.log').read_text()[-6000:]}"
    stages = report["stages"]
    assert list(stages) == STAGES and report["failed"] == [] and report["dry_run"]
    assert stages["install"]["status"] == "skip" and "no bundle" in stages["install"]["why"]
    assert all(stages[s]["status"] == "pass" for s in STAGES[1:]), {s: stages[s]["status"] for s in STAGES}
    assert stages["gpu_tests"]["tests"] >= 10 and stages["gpu_tests"]["skipped"] == stages["gpu_tests"]["tests"]
    smoke = stages["smoke"]["variants"]
    assert len(smoke) == 2 and all(v["max_rel_diff"] <= 1e-4 and v["last_loss"] < v["first_loss"]
                                   for v in smoke.values())
    configs = stages["configs"]["runs"]
    assert [n for n, r in configs.items() if r["status"] == "pass"] == ["rtx3060", "h100"], configs
    assert all(configs[n]["last_loss"] < configs[n]["first_loss"] and configs[n]["skipped_steps"] == 0
               for n in ("rtx3060", "h100"))
    assert configs["rtx3060"]["ops"] and all(o["seconds"] >= 0 for o in configs["rtx3060"]["ops"])  # timed loads
    assert configs["fp16"]["status"] == "skip" and "CUDA" in configs["fp16"]["why"]
    fp16 = json.loads((out / "work" / "ds_fp16.json").read_text())
    assert fp16["fp16"] == {"enabled": True} and "bf16" not in fp16
    qlora = stages["qlora"]
    assert qlora["lora_b_matrices"] == 14 and qlora["lora_b_zero"] == [] and qlora["evaluations"] >= 1
    assert all(n > 0 for n in qlora["grad_norms"]) and qlora["losses"][-1] < qlora["losses"][0]
    bench = stages["bench"]["figures"]
    assert set(bench) >= {"tessera", "hf", "bare", "tessera_speed_over_hf_min", "tessera_overhead_over_bare_min"}
    assert bench["tessera"]["first_step_loss"] == pytest.approx(bench["hf"]["first_step_loss"], rel=1e-5)
    assert set(stages["memory"]["modes"]) == {"none", "full", "selective"}
    assert all(0.75 <= m["estimate_over_measured"] <= 1.25 for m in stages["memory"]["modes"].values())
    assert stages["nccl"]["backend"] == "gloo" and stages["nccl"]["max_rel_diff"] <= 1e-3
    assert stages["compile"]["figures"]["tessera"]["tokens_per_s"] > 0
    text = (out / "report.txt").read_text()
    assert text.startswith("Tessera GPU check (dry run on CPU)") and "all checks passed" in text
    assert "memory: checkpointing" in text and "===== nccl" in (out / "check.log").read_text()


def test_a_failed_stage_fails_the_check_and_a_used_folder_is_refused(tmp_path: Path) -> None:
    check = Check(tmp_path, tmp_path / "bundle", None, dry_run=True)
    check.stage("smoke", lambda: {"status": "fail", "why": "liger: differs from the reference"})
    check.stage("bench", lambda: 1 / 0)  # a bug in a stage is a failure, the stages after it still run
    check.stage("nccl", lambda: {"status": "skip", "why": "1 GPU"})
    assert check.report() == 1
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["failed"] == ["smoke", "bench"] and "ZeroDivisionError" in report["stages"]["bench"]["why"]
    assert "FAILED: smoke, bench" in table(report)
    proc = subprocess.run([str(REPO / "tools" / "gpu" / "check.sh"), "--dry-run", str(tmp_path)], cwd=REPO,
                          capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 2 and proc.stderr.startswith("tessera: error: ") and "not empty" in proc.stderr


def test_gpu_configs_are_the_shipped_files_and_fp16_is_a_valid_config(tmp_path: Path) -> None:
    from train.config.deepspeed import load_ds_config

    check = Check(tmp_path, tmp_path / "bundle", None, dry_run=False)
    check.work.mkdir(parents=True)
    variants = check.ds_variants()
    assert list(variants) == ["rtx3060", "rtx4090", "h100", "fp16"]
    assert all(variants[n][0] == REPO / "ds_configs" / f"{n}.json" for n in ("rtx3060", "rtx4090", "h100"))
    fp16 = load_ds_config(str(variants["fp16"][0]))  # Tessera's own key and type checks
    assert fp16["fp16"] == {"enabled": True} and "bf16" not in fp16
    assert fp16["zero_optimization"] == {"stage": 0}


def test_qlora_is_skipped_with_a_reason_without_bitsandbytes(tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    from tools.gpu.probes import run_qlora

    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # find_spec then answers None: not installed
    result = run_qlora(tmp_path, 2)
    assert result["status"] == "skip" and "bitsandbytes" in result["why"] and not any(tmp_path.iterdir())
