"""Tensor parallelism through the real entry point: tp x dp under ZeRO 0-3 follows the single-process loss curve."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest
import torch

from model import Transformer
from tests.conftest import assert_same_weights, python_main, read_rows, run_job, train_losses
from tests.e2e.test_train_e2e import _common, _deepspeed
from train.checkpoint.writer import read_meta
from train.export.consolidate import checkpoint_model_args, consolidated_state_dict

pytestmark = pytest.mark.slow

STEPS = ["train.steps=20", "train.eval_interval=10", "train.save_interval=10", "sample.max_new_tokens=8"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory, data_cache: Path) -> Path:
    """One process, no ZeRO, the smoke recipe's global batch of 8: its run directory."""
    tmp = tmp_path_factory.mktemp("tp_ref")
    run_job(python_main(*_common(tmp / "run", data_cache, *STEPS), "--ds_config", "cpu"), tmp)
    return tmp / "run"


def _assert_same_run(out: Path, reference: Path, what: str) -> None:
    """Same loss curve within 1e-4, same logged gradient norms (each parameter counted once), the same weights
    (each tensor within 1e-3 in relative norm)."""
    got, ref = train_losses(out), train_losses(reference)
    assert sorted(got) == sorted(ref) == list(range(1, 21)), what
    for step, loss in ref.items():
        assert got[step] == pytest.approx(loss, abs=1e-4), (what, step, got[step], loss)
    norms = {r["step"]: r["grad_norm"] for r in read_rows(out) if "grad_norm" in r}
    for step, norm in {r["step"]: r["grad_norm"] for r in read_rows(reference) if "grad_norm" in r}.items():
        # float rounding grows over the steps (spiky steps amplify it); early steps must agree closely
        assert norms[step] == pytest.approx(norm, rel=1e-5 if step <= 5 else 1e-2), (what, "grad_norm", step)
    tag = "checkpoints/step_00000020"
    assert_same_weights(consolidated_state_dict(out / tag), consolidated_state_dict(reference / tag), what)


def test_tp2_dp2_zero3_matches_one_process_and_resumes(tmp_path: Path, data_cache: Path, zero3_test_config: Path,
                                                      reference: Path) -> None:
    """deepspeed, 4 ranks = tp 2 x dp 2, sequence parallel, ZeRO-3: the loss curve of one process; a resume at
    step 10 replays steps 11-20 exactly; the final sample comes out whole."""
    out = tmp_path / "tp2dp2"
    args = [*_common(out, data_cache, *STEPS, "parallel.tp=2", "parallel.sequence_parallel=true"),
            "--ds_config", str(zero3_test_config)]
    proc = run_job(_deepspeed(4, *args), tmp_path)
    assert "(dp 2 x tp 2, sequence parallel x pp 1), ZeRO stage 3" in proc.stderr
    _assert_same_run(out, reference, "tp2 x dp2 zero3")
    assert "--- sample ---\nROMEO:" in proc.stdout
    ckpt = out / "checkpoints" / "step_00000010"
    assert sorted(p.name for p in ckpt.glob("*optim_states.pt")) == [
        f"zero_pp_rank_{d}_mp_rank_0{t}_optim_states.pt" for d in (0, 1) for t in (0, 1)]
    grad_norms = {r["step"]: r["grad_norm"] for r in read_rows(out) if "grad_norm" in r}

    resumed = tmp_path / "resumed"
    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copytree(ckpt, resumed / "checkpoints" / ckpt.name)
    (resumed / "checkpoints" / "latest").write_text(ckpt.name)
    rows = [r for r in read_rows(out) if r["step"] <= 10]
    (resumed / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    args = [*_common(resumed, data_cache, *STEPS, "parallel.tp=2", "parallel.sequence_parallel=true"),
            "--ds_config", str(zero3_test_config), "--resume", "auto"]
    proc = run_job(_deepspeed(4, *args), tmp_path)
    assert "resumed from" in proc.stderr
    again = train_losses(resumed)
    for step in range(11, 21):
        assert again[step] == pytest.approx(train_losses(out)[step], abs=1e-6), step
    again_norms = {r["step"]: r["grad_norm"] for r in read_rows(resumed) if "grad_norm" in r}
    assert again_norms[20] == pytest.approx(grad_norms[20], rel=1e-5)


@pytest.mark.parametrize(("ds", "sp"), [("cpu", False), ("zero1", True), ("zero2", False)])
def test_tp2_under_zero_0_1_2(tmp_path: Path, data_cache: Path, reference: Path, ds: str, sp: bool) -> None:
    """tp=2 on 2 ranks under the other ZeRO stages: the same curve, gradient norms and exported weights."""
    out = tmp_path / ds
    args = [*_common(out, data_cache, *STEPS, "parallel.tp=2", f"parallel.sequence_parallel={str(sp).lower()}",
                     "sample.max_new_tokens=0"), "--ds_config", ds]
    run_job(_deepspeed(2, *args), tmp_path)
    _assert_same_run(out, reference, ds)
    if ds == "cpu":  # a tensor-parallel checkpoint exports to a Hugging Face model like any other
        from transformers import AutoModelForCausalLM

        from train.export.hf import export_hf

        hf = AutoModelForCausalLM.from_pretrained(export_hf(out, tmp_path / "hf"))
        x = torch.randint(0, hf.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
        plain = Transformer(checkpoint_model_args(read_meta(out / "checkpoints/step_00000020"), out))
        plain.load_state_dict(consolidated_state_dict(out / "checkpoints/step_00000020"))
        with torch.no_grad():
            assert torch.allclose(hf(x).logits, plain(x), atol=1e-4)


def test_bad_layout_stops_every_rank_without_a_hang(tmp_path: Path, data_cache: Path) -> None:
    """tp=4 on a model with 2 key/value heads: every rank stops with one line before any collective runs."""
    start = time.monotonic()
    proc = run_job(_deepspeed(4, *_common(tmp_path / "bad", data_cache, "parallel.tp=4")), tmp_path, check=False,
                   timeout=180)
    assert proc.returncode != 0 and time.monotonic() - start < 120
    errors = [line for line in proc.stderr.splitlines() if "tessera: error:" in line]
    assert len(errors) == 1 and "parallel.tp=4 does not divide the model's 2 key/value heads" in errors[0]
    assert not (tmp_path / "bad").exists()
