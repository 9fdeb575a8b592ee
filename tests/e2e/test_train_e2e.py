"""End to end on the real Shakespeare corpus: the three launch forms, ZeRO 1-3 on two gloo ranks, exact resume."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest

from tests.conftest import MAIN, SMOKE, free_port, python_main, read_rows, run_job, train_losses

pytestmark = pytest.mark.slow


def _common(out_dir: Path, cache: Path, *extra: str) -> list[str]:
    return ["--config", str(SMOKE), f"train.out_dir={out_dir}", f"data.cache_dir={cache}", "log.progress=false",
            *extra]


def _launcher(name: str) -> str:
    """The launcher installed beside this interpreter (the venv's), whatever PATH says."""
    return str(Path(sys.executable).parent / name)


def _deepspeed(n: int, *args: str) -> list[str]:
    return [_launcher("deepspeed"), "--num_accelerators", str(n), "--master_port", str(free_port()), str(MAIN), *args]


def test_python_run_reports_perplexity_sample_checkpoint(tmp_path: Path, data_cache: Path) -> None:
    out = tmp_path / "run"
    proc = run_job(python_main(*_common(out, data_cache, "log.progress=true", "log.wandb=offline")), tmp_path)
    assert "validation loss" in proc.stdout and "perplexity" in proc.stdout
    assert "--- sample ---\nROMEO:" in proc.stdout
    assert "step/s" in proc.stderr or "s/step" in proc.stderr  # the progress bar
    rows = read_rows(out)
    train_rows = [r for r in rows if "loss" in r]
    assert [r["step"] for r in train_rows] == list(range(1, 21))
    for key in ("lr", "grad_norm", "tokens_per_s", "mem_gb"):
        assert all(r[key] is not None and r[key] > 0 for r in train_rows), key
    assert [r["step"] for r in rows if "val_loss" in r] == [10, 20]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["val_ppl"] == pytest.approx(2.718281828 ** summary["val_loss"], rel=1e-4)
    assert (out / "checkpoints" / "latest").read_text() == "step_00000020"
    meta = json.loads((out / "checkpoints" / "step_00000020" / "tessera.json").read_text())
    assert meta["consumed_samples"] == 20 * 8 and meta["model_args"]["dim"] == 128
    assert meta["tokenizer"]["sha256"] and meta["config"]["train"]["steps"] == 20
    assert list((out / "wandb").glob("offline-run-*")), "wandb offline run directory missing"


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_two_ranks_train_and_resume_exactly(tmp_path: Path, data_cache: Path, zero3_test_config: Path,
                                            stage: int) -> None:
    """deepspeed launcher, ZeRO 1-3 over 2 gloo ranks: loss falls; resuming at step 10 replays 11-20 exactly."""
    ds = str(zero3_test_config) if stage == 3 else f"zero{stage}"
    full = tmp_path / "full"
    run_job(_deepspeed(2, *_common(full, data_cache), "--ds_config", ds), tmp_path)
    losses = train_losses(full)
    assert len(losses) == 20
    first, last = sum(losses[s] for s in range(1, 4)) / 3, sum(losses[s] for s in range(18, 21)) / 3
    assert last < first - 0.5, f"loss did not fall: {first:.3f} -> {last:.3f}"
    ckpt = full / "checkpoints" / "step_00000010"
    assert sorted(p.name for p in ckpt.glob("zero_pp_rank_*_optim_states.pt")) == [
        "zero_pp_rank_0_mp_rank_00_optim_states.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt"]

    # A run that stopped right after its step-10 checkpoint: same files, `latest` at step 10.
    resumed = tmp_path / "resumed"
    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copytree(ckpt, resumed / "checkpoints" / ckpt.name)
    (resumed / "checkpoints" / "latest").write_text(ckpt.name)
    rows = [r for r in read_rows(full) if r["step"] <= 12]  # rows past the checkpoint must be dropped on resume
    (resumed / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))

    proc = run_job(_deepspeed(2, *_common(resumed, data_cache), "--ds_config", ds, "--resume", "auto"), tmp_path)
    assert "resumed from" in proc.stderr
    assert [r["step"] for r in read_rows(resumed) if "loss" in r] == list(range(1, 21))  # no step twice
    again = train_losses(resumed)
    for step in range(11, 21):
        assert again[step] == pytest.approx(losses[step], abs=1e-6), (step, again[step], losses[step])


def test_launchers_and_zero_stages_agree(tmp_path: Path, data_cache: Path, zero3_test_config: Path) -> None:
    """python (1 process, no ZeRO) and torchrun (2 processes, ZeRO-2 / ZeRO-3) follow the same loss curve."""
    steps = ["train.steps=8", "train.eval_interval=0", "train.save_interval=0", "sample.max_new_tokens=0"]
    single = tmp_path / "single"
    run_job(python_main(*_common(single, data_cache, *steps), "--ds_config", "cpu"), tmp_path)
    reference = train_losses(single)
    for name, ds in (("zero2", "zero2"), ("zero3", str(zero3_test_config))):
        out = tmp_path / name
        cmd = [_launcher("torchrun"), "--nproc_per_node", "2", "--master_port", str(free_port()), str(MAIN),
               *_common(out, data_cache, *steps), "--ds_config", ds]
        run_job(cmd, tmp_path)
        got = train_losses(out)
        assert got[1] == pytest.approx(reference[1], abs=1e-5), name  # same samples, same initial weights
        for step in reference:
            assert got[step] == pytest.approx(reference[step], abs=2e-4), (name, step)
