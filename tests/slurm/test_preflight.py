"""Preflight checks against this machine: each failure is one line naming the check and the fix."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from slurm.preflight import check_data, check_disk, check_gpus, check_mps, check_tmpdir, run_preflight
from tests.conftest import SMOKE
from train.config import load_config


def test_gpus_requested_but_not_visible() -> None:
    assert check_gpus(0, 0, None) == [] and check_gpus(8, 8, "0,1,2,3,4,5,6,7") == []
    (p,) = check_gpus(2, 0, "0,1")
    assert p.check == "gpus" and "asked for 2 GPUs per node but torch sees 0 (CUDA_VISIBLE_DEVICES=0,1)" in p.message
    (p,) = check_gpus(4, 2, "0,1")
    assert "--gpus-per-node" in p.message
    line = p.line("vm task 3")
    assert line.startswith("tessera: preflight: vm task 3: gpus: ") and "\n" not in line


def test_mps_configured_but_daemon_missing(tmp_path: Path) -> None:
    assert check_mps(False, {}) == []
    (p,) = check_mps(False, {"CUDA_MPS_PIPE_DIRECTORY": str(tmp_path / "mps")})
    assert p.check == "mps" and f"{tmp_path / 'mps'}/control does not exist" in p.message
    (p,) = check_mps(True, {})  # the profile says MPS, the default pipe directory has no daemon
    assert "/tmp/nvidia-mps/control" in p.message
    os.mkfifo(tmp_path / "control")  # what nvidia-cuda-mps-control -d creates
    assert check_mps(True, {"CUDA_MPS_PIPE_DIRECTORY": str(tmp_path)}) == []


def test_tmpdir_missing_unwritable_or_full(tmp_path: Path) -> None:
    assert check_tmpdir({"TMPDIR": str(tmp_path)}) == []
    a_file = tmp_path / "f"
    a_file.write_text("x")
    (p,) = check_tmpdir({"TMPDIR": str(a_file)})
    assert "is not a directory" in p.message
    (p,) = check_tmpdir({"TMPDIR": "/proc"})  # no file can be created there, not even by root
    assert "TMPDIR=/proc is not writable" in p.message
    (p,) = check_tmpdir({"TMPDIR": str(tmp_path)}, min_free=2**62)
    assert "MiB free, less than" in p.message


def test_disk_too_small_for_checkpoints(tmp_path: Path) -> None:
    assert check_disk(tmp_path / "run" / "deeper", 2**20) == []
    (p,) = check_disk(tmp_path / "run", 2**62)
    assert p.check == "disk" and f"train.out_dir={tmp_path / 'run'}" in p.message and "checkpoints need" in p.message


def test_data_not_on_the_node(tmp_path: Path) -> None:
    cfg = load_config(str(SMOKE), [f"data.cache_dir={tmp_path / 'empty'}"])
    (p,) = check_data(cfg)
    assert p.check == "data" and "the Shakespeare corpus is not there" in p.message
    assert f"python tools/prepare_data.py --shakespeare {tmp_path / 'empty'} --vocab-size 512" in p.message
    cfg = load_config(str(SMOKE), ["data.corpus=files", f"data.files=[{tmp_path / 'a.txt'}]",
                                   f"data.tokenizer={tmp_path / 'tok'}"])
    problems = check_data(cfg)
    assert [p.check for p in problems] == ["data", "data"]
    assert "data.tokenizer=" in problems[0].message and "a.txt not found on this node" in problems[1].message
    (tmp_path / "a.txt").write_text("text")
    (tmp_path / "tok").mkdir()
    assert check_data(cfg) == []
    cfg = load_config(str(SMOKE), [f"data.prepared_dir={tmp_path / 'prep'}"])
    (p,) = check_data(cfg)
    assert "data.prepared_dir=" in p.message and "no header.json" in p.message


def test_run_preflight_reports_every_problem_of_this_machine(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TMPDIR", str(tmp_path / "nowhere"))
    monkeypatch.setenv("CUDA_MPS_PIPE_DIRECTORY", str(tmp_path / "mps"))
    cfg = load_config(str(SMOKE), [f"data.cache_dir={tmp_path}", f"train.out_dir={tmp_path / 'run'}"])
    problems = run_preflight(cfg, gpus_per_node=0 if torch.cuda.is_available() else 2, mps=False,
                             checkpoint_bytes=2**62)
    checks = [p.check for p in problems]
    expected = ["mps", "tmpdir", "disk", "data"]
    assert checks == (expected if torch.cuda.is_available() else ["gpus", *expected])
