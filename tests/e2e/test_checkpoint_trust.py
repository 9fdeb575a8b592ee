"""Checkpoints from someone else, or damaged, through the real entry point and the export tool.

A planted pickle payload (an object whose unpickling creates a marker file) in any file kind is refused in one
line and never runs; a damaged newest checkpoint (cut short, or one flipped byte with checksums on) makes
``--resume auto`` fall back to the previous one and continue exactly; a damaged checkpoint named outright, or
exported, is one error naming the file.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import MAIN, REPO, SMOKE, free_port, python_main, read_rows, run_job, train_losses

pytestmark = pytest.mark.slow

EXPORT = REPO / "tools" / "export_hf.py"
SHORT = ["train.steps=2", "train.warmup_steps=1", "train.eval_interval=2", "train.save_interval=2"]
PLANT = """
import os, sys, torch
class Payload:
    def __reduce__(self):
        return (os.system, ("touch " + sys.argv[2],))
obj = torch.load(sys.argv[1], weights_only=False, map_location="cpu")
obj = {**obj, "payload": Payload()} if isinstance(obj, dict) else (obj, Payload())
torch.save(obj, sys.argv[1])
"""


def _args(out_dir: Path, cache: Path, *extra: str) -> list[str]:
    return ["--config", str(SMOKE), f"train.out_dir={out_dir}", f"data.cache_dir={cache}",
            "log.progress=false", "sample.max_new_tokens=0", *extra]


def _tag(run: Path, step: int) -> Path:
    return run / "checkpoints" / f"step_{step:08d}"


def plant(path: Path, marker: Path) -> None:
    """Add the payload to a checkpoint file (in a child process: its class lives nowhere importable)."""
    subprocess.run([sys.executable, "-c", PLANT, str(path), str(marker)], check=True, capture_output=True)


def _one_error(stderr: str, prefix: str) -> str:
    """The single error line of a failed command (and no traceback)."""
    assert "Traceback" not in stderr, stderr[-3000:]
    errors = [line for line in stderr.splitlines() if line.startswith(prefix)]
    assert len(errors) == 1, stderr[-3000:]
    return errors[0]


def _drop_file_list(tag: Path) -> None:
    """Make ``tag`` look written before file lists were recorded."""
    meta = json.loads((tag / "tessera.json").read_text())
    del meta["files"]
    (tag / "tessera.json").write_text(json.dumps(meta))


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory, data_cache: Path) -> Path:
    """An uninterrupted 20-step run (checkpoints at 10 and 20)."""
    out = tmp_path_factory.mktemp("trust_ref") / "run"
    run_job(python_main(*_args(out, data_cache)), out.parent)
    return out


@pytest.fixture(scope="module")
def zero1_run(tmp_path_factory: pytest.TempPathFactory, data_cache: Path) -> Path:
    """Two steps under ZeRO-1 (one rank): the checkpoint holds a ZeRO optimizer state file."""
    out = tmp_path_factory.mktemp("trust_zero1") / "run"
    run_job(python_main(*_args(out, data_cache, *SHORT), "--ds_config", "zero1"), out.parent)
    return out


@pytest.fixture(scope="module")
def pipeline_run(tmp_path_factory: pytest.TempPathFactory, data_cache: Path) -> Path:
    """Two steps of a 2-stage pipeline (two ranks): the checkpoint holds per-layer files."""
    out = tmp_path_factory.mktemp("trust_pp") / "run"
    torchrun = Path(sys.executable).parent / "torchrun"
    run_job([str(torchrun), "--nproc_per_node", "2", "--master_port", str(free_port()), str(MAIN),
             *_args(out, data_cache, *SHORT, "parallel.pp=2"), "--ds_config", "zero1"], out.parent)
    return out


def _copy(run: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    return copy


@pytest.mark.parametrize("kind, pattern, listed", [
    ("rng", "rng_rank00000.pt", True),
    ("model", "mp_rank_00_model_states.pt", True),
    ("model-before-file-lists", "mp_rank_00_model_states.pt", False),  # only the load's own check stands
    ("zero", "zero_pp_rank_0_mp_rank_00_optim_states.pt", True),
])
def test_planted_payload_is_refused_on_resume(tmp_path: Path, data_cache: Path, reference: Path,
                                              zero1_run: Path, kind: str, pattern: str, listed: bool) -> None:
    run = _copy(zero1_run if kind == "zero" else reference, tmp_path)
    tag = max((run / "checkpoints").glob("step_*"))
    if not listed:
        _drop_file_list(tag)
    marker = tmp_path / "payload_ran"
    plant(tag / pattern, marker)
    extra = [*SHORT, "--ds_config", "zero1"] if kind == "zero" else []
    proc = run_job(python_main(*_args(run, data_cache, *extra), "--resume", "auto"), tmp_path, check=False)
    assert proc.returncode == (2 if listed else 1)  # found before a device (file list), or by the load
    error = _one_error(proc.stderr, "tessera: error:")
    assert f"{tag / pattern}: holds objects a weights-only load refuses (posix.system)" in error
    assert not marker.exists()
    plant_check = subprocess.run([sys.executable, "-c", "import sys, torch; torch.load(sys.argv[1], "
                                  "weights_only=False)", str(tag / pattern)], capture_output=True)
    assert plant_check.returncode == 0 and marker.exists()  # the payload is real: an unguarded load runs it


@pytest.mark.parametrize("kind", ["model", "zero", "pipeline"])
def test_planted_payload_is_refused_by_export(tmp_path: Path, reference: Path, zero1_run: Path,
                                              pipeline_run: Path, kind: str) -> None:
    run = _copy({"model": reference, "zero": zero1_run, "pipeline": pipeline_run}[kind], tmp_path)
    tag = max((run / "checkpoints").glob("step_*"))
    target = {"model": "mp_rank_00_model_states.pt", "zero": "zero_pp_rank_0_mp_rank_00_optim_states.pt",
              "pipeline": "layer_02-model_00-model_states.pt"}[kind]
    _drop_file_list(tag)  # the files themselves are read: no file list to catch the change first
    marker = tmp_path / "payload_ran"
    plant(tag / target, marker)
    proc = subprocess.run([sys.executable, str(EXPORT), str(tag), "--out", str(tmp_path / "hf")], cwd=REPO,
                          capture_output=True, text=True, env={**os.environ, "DS_ACCELERATOR": "cpu"})
    assert proc.returncode == 2
    error = _one_error(proc.stderr, "tessera: error:")
    assert f"{tag / target}: holds objects a weights-only load refuses (posix.system)" in error
    assert not marker.exists() and not (tmp_path / "hf").exists()


def _assert_continues_exactly(run: Path, reference: Path) -> None:
    want, got = train_losses(reference), train_losses(run)
    assert [r["step"] for r in read_rows(run) if "loss" in r] == list(range(1, 21))
    for step in range(11, 21):
        assert got[step] == want[step], step


def test_truncated_newest_checkpoint_falls_back(tmp_path: Path, data_cache: Path, reference: Path) -> None:
    run = _copy(reference, tmp_path)
    damaged = _tag(run, 20) / "mp_rank_00_model_states.pt"
    with open(damaged, "r+b") as f:
        f.truncate(damaged.stat().st_size // 3)
    proc = run_job(python_main(*_args(run, data_cache), "--resume", "auto"), tmp_path)
    assert f"skipping step_00000020: {damaged} has " in proc.stderr
    assert f"resumed from {_tag(run, 10)} at step 10" in proc.stderr
    _assert_continues_exactly(run, reference)


def test_flipped_byte_falls_back_with_checksums(tmp_path: Path, data_cache: Path, reference: Path) -> None:
    run = _copy(reference, tmp_path)
    damaged = _tag(run, 20) / "mp_rank_00_model_states.pt"
    with open(damaged, "r+b") as f:  # one bit inside the tensor data: same size, loads without any error
        f.seek(damaged.stat().st_size // 2)
        byte = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([byte[0] ^ 1]))
    proc = run_job(python_main(*_args(run, data_cache), "--resume", "auto", "--verify-checksums"), tmp_path)
    assert f"skipping step_00000020: {damaged} differs from the file saved" in proc.stderr
    assert f"resumed from {_tag(run, 10)} at step 10" in proc.stderr
    _assert_continues_exactly(run, reference)


def test_older_checkpoint_without_file_list_still_resumes(tmp_path: Path, data_cache: Path,
                                                          reference: Path) -> None:
    """A checkpoint of the first format: no file list, numpy arrays in its RNG files."""
    run = _copy(reference, tmp_path)
    shutil.rmtree(_tag(run, 20))
    _drop_file_list(_tag(run, 10))
    rng = _tag(run, 10) / "rng_rank00000.pt"
    subprocess.run([sys.executable, "-c", "import sys, numpy as np, torch; s = torch.load(sys.argv[1]); "
                    "n, k, *r = s['numpy']; s['numpy'] = (n, k.numpy().astype(np.uint32), *r); "
                    "torch.save(s, sys.argv[1])", str(rng)], check=True)
    proc = run_job(python_main(*_args(run, data_cache), "--resume", "auto"), tmp_path)
    assert f"checkpoint {_tag(run, 10)} was written without a file list" in proc.stderr
    _assert_continues_exactly(run, reference)


def test_named_damaged_checkpoint_is_one_error(tmp_path: Path, data_cache: Path, reference: Path) -> None:
    run = _copy(reference, tmp_path)
    damaged = _tag(run, 20) / "rng_rank00000.pt"
    damaged.write_bytes(damaged.read_bytes()[:-1])
    named = python_main(*_args(run, data_cache), "--resume", str(_tag(run, 20)))
    proc = run_job(named, tmp_path, check=False)
    assert proc.returncode == 2
    error = _one_error(proc.stderr, "tessera: error:")
    assert f"--resume {_tag(run, 20)}: {damaged} has " in error and "--resume auto" in error

    (_tag(run, 10) / "tessera.json").write_text('{"step": 10,')
    named = python_main(*_args(run, data_cache), "--resume", str(_tag(run, 10)))
    proc = run_job(named, tmp_path, check=False)
    assert proc.returncode == 2
    assert f"{_tag(run, 10) / 'tessera.json'}: not valid JSON" in _one_error(proc.stderr, "tessera: error:")


def test_export_refuses_a_damaged_checkpoint(tmp_path: Path, reference: Path) -> None:
    run = _copy(reference, tmp_path)
    damaged = _tag(run, 20) / "mp_rank_00_model_states.pt"
    with open(damaged, "r+b") as f:
        f.seek(1000)
        byte = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([byte[0] ^ 1]))
    env = {**os.environ, "DS_ACCELERATOR": "cpu"}
    proc = subprocess.run([sys.executable, str(EXPORT), str(_tag(run, 20)), "--out", str(tmp_path / "hf")],
                          cwd=REPO, capture_output=True, text=True, env=env)
    assert proc.returncode == 2
    assert f"{damaged} differs from the file saved" in _one_error(proc.stderr, "tessera: error:")
    assert not (tmp_path / "hf").exists()
    proc = subprocess.run([sys.executable, str(EXPORT), str(run)], cwd=REPO, capture_output=True, text=True,
                          env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]  # a run dir: the newest checkpoint that verifies
    assert f"skipping step_00000020: {damaged} differs" in proc.stderr
    assert proc.stdout.strip() == str(run / "hf" / "step_00000010")
