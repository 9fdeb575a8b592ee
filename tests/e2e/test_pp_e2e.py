"""Pipeline parallelism through the real entry point: pp=2 and tp=2 x pp=2 follow the single-process run."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tests.conftest import assert_same_weights, python_main, read_rows, run_job, train_losses
from tests.e2e.test_train_e2e import _common, _deepspeed
from train.export.consolidate import consolidated_state_dict

pytestmark = pytest.mark.slow

STEPS = ["train.steps=10", "train.warmup_steps=2", "train.eval_interval=5", "train.save_interval=5",
         "sample.max_new_tokens=0"]


def _reference(tmp_path_factory: pytest.TempPathFactory, data_cache: Path, tied: bool) -> Path:
    """One process, no ZeRO: the run a pipeline must reproduce."""
    tmp = tmp_path_factory.mktemp("pp_ref")
    run_job(python_main(*_common(tmp / "run", data_cache, *STEPS, f"model.tie_embeddings={str(tied).lower()}"),
                        "--ds_config", "cpu"), tmp)
    return tmp / "run"


@pytest.fixture(scope="module")
def tied_reference(tmp_path_factory: pytest.TempPathFactory, data_cache: Path) -> Path:
    return _reference(tmp_path_factory, data_cache, tied=True)


def _assert_same_run(out: Path, ref: Path) -> None:
    got, want = train_losses(out), train_losses(ref)
    assert sorted(got) == sorted(want) == list(range(1, 11))
    for step, loss in want.items():
        assert got[step] == pytest.approx(loss, abs=1e-5), (step, got[step], loss)
    norms = {r["step"]: r["grad_norm"] for r in read_rows(out) if "grad_norm" in r}
    for r in read_rows(ref):
        if "grad_norm" in r and r["step"] <= 5:  # each stage's and the tied embedding's gradients counted once
            assert norms[r["step"]] == pytest.approx(r["grad_norm"], rel=1e-3), r["step"]
    val = {r["step"]: r["val_loss"] for r in read_rows(out) if "val_loss" in r}
    for r in read_rows(ref):
        if "val_loss" in r:
            assert val[r["step"]] == pytest.approx(r["val_loss"], abs=1e-5)
    assert_same_weights(*(consolidated_state_dict(d / "checkpoints/step_00000010") for d in (out, ref)))


def _pp_args(out: Path, cache: Path, tied: bool, *extra: str) -> list[str]:
    return [*_common(out, cache, *STEPS, f"model.tie_embeddings={str(tied).lower()}", "parallel.pp=2", *extra),
            "--ds_config", "zero1"]


def _resume_at_step_5(out: Path, resumed: Path, cmd: list[str], tmp_path: Path) -> None:
    """A copy of ``out`` stopped right after its step-5 checkpoint, resumed: steps 6-10 replay exactly."""
    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copytree(out / "checkpoints" / "step_00000005", resumed / "checkpoints" / "step_00000005")
    (resumed / "checkpoints" / "latest").write_text("step_00000005")
    rows = [r for r in read_rows(out) if r["step"] <= 5]
    (resumed / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    proc = run_job([*cmd, "--resume", "auto"], tmp_path)
    assert "resumed from" in proc.stderr
    again, first = train_losses(resumed), train_losses(out)
    for step in range(6, 11):
        assert again[step] == pytest.approx(first[step], abs=1e-6), step


def test_pp2_tied(tmp_path: Path, data_cache: Path, tied_reference: Path) -> None:
    """pp=2, tied embeddings (kept in sync between the first and the last stage): the one-process run."""
    out = tmp_path / "pp2"
    proc = run_job(_deepspeed(2, *_pp_args(out, data_cache, True)), tmp_path)
    assert "(dp 1 x tp 1 x pp 2), ZeRO stage 1" in proc.stderr
    _assert_same_run(out, tied_reference)
    assert any((out / "checkpoints" / "step_00000005").glob("layer_*-model_states.pt"))


def test_pp2_untied(tmp_path: Path, data_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> None:
    ref = _reference(tmp_path_factory, data_cache, tied=False)
    out = tmp_path / "pp2"  # with activation checkpointing: recomputation gives the same numbers
    run_job(_deepspeed(2, *_pp_args(out, data_cache, False, "parallel.activation_checkpoint_interval=1")),
            tmp_path)
    _assert_same_run(out, ref)


def test_tp2_pp2_on_four_ranks(tmp_path: Path, data_cache: Path, tied_reference: Path) -> None:
    """tp=2 inside each of 2 stages, sequence parallel: the same run as one process; export joins both cuts;
    a resume at step 5 replays steps 6-10 exactly."""
    out = tmp_path / "tp2pp2"
    extra = ("parallel.tp=2", "parallel.sequence_parallel=true")
    proc = run_job(_deepspeed(4, *_pp_args(out, data_cache, True, *extra)), tmp_path)
    assert "(dp 1 x tp 2, sequence parallel x pp 2), ZeRO stage 1" in proc.stderr
    _assert_same_run(out, tied_reference)
    resumed = tmp_path / "resumed"
    _resume_at_step_5(out, resumed, _deepspeed(4, *_pp_args(resumed, data_cache, True, *extra)), tmp_path)
