"""End to end: a small MoE on Shakespeare on two gloo ranks (ZeRO-2) logs its router terms and expert load,
resumes exactly (the aux-loss-free bias buffer included), and a one-process run exports to HF Mixtral that plain
transformers loads with the run's logits."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import transformers

from model import ModelArgs, Transformer
from tests.conftest import REPO, copy_run_until, python_main, read_rows, run_job, train_losses
from tests.e2e.test_train_e2e import _common, _deepspeed
from train.export.consolidate import consolidated_state_dict

pytestmark = pytest.mark.slow

MOE = ("model.n_experts=4", "model.moe_top_k=2", "model.moe_ffn_dim=128", "model.moe_aux_loss_coef=0.01",
       "model.moe_z_loss_coef=0.001", "train.steps=8", "train.save_interval=4", "train.eval_interval=0",
       "sample.max_new_tokens=8")
BIAS_KEY = "layers.1.mlp.gate.e_score_correction_bias"


def export_gives_checkpoint_logits(tag: Path, out: Path) -> dict:
    """Transformers' logits of the HF export in ``out`` equal those of checkpoint ``tag`` (1e-5); its config."""
    meta = json.loads((tag / "tessera.json").read_text())
    args = ModelArgs(**meta["model_args"])
    model = Transformer(args).eval()
    model.load_state_dict(consolidated_state_dict(tag))
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, experts_implementation="eager").eval()
    ids = torch.randint(0, args.vocab_size, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, model(ids), rtol=0, atol=1e-5)
    return json.loads((out / "config.json").read_text())


def _bias(run: Path, step: int) -> torch.Tensor:
    state = torch.load(run / "checkpoints" / f"step_{step:08d}" / "mp_rank_00_model_states.pt", weights_only=False)
    return state["module"][BIAS_KEY]


def test_moe_two_ranks_logs_load_and_resumes_exactly(tmp_path: Path, data_cache: Path) -> None:
    train_and_resume(tmp_path, data_cache, "zero2")  # ZeRO 0 (cpu) and 1 pass too; one launch pair keeps it cheap


def train_and_resume(tmp_path: Path, data_cache: Path, ds: str) -> None:
    """Two ranks under DeepSpeed config ``ds``: terms and load logged, resumed at step 4 exactly."""
    extra = (*MOE, "model.moe_bias_update_rate=0.001")
    full = tmp_path / "full"
    run_job(_deepspeed(2, *_common(full, data_cache, *extra), "--ds_config", ds), tmp_path)
    rows = [r for r in read_rows(full) if "loss" in r]
    assert len(rows) == 8
    for row in rows:  # router terms and the load of every layer and expert
        assert row["moe_aux"] > 0 and row["moe_z"] > 0 and row["moe_dropped"] == 0.0  # dropless: no token lost
        for layer in range(4):
            shares = [row[f"moe_load.L{layer}.e{e}"] for e in range(4)]
            assert sum(shares) == pytest.approx(1.0, abs=1e-5)  # every token copy counted once
            # the mean over micro-batches and ranks of each one's max / mean is at least the max of the mean shares
            assert row[f"moe_max_mean.L{layer}"] >= 4 * max(shares) - 1e-4
    bias = _bias(full, 8)
    assert bias.abs().sum() > 0  # the balancing bias moved, and is saved with the model

    resumed = copy_run_until(full, 4, tmp_path / "resumed")
    run_job(_deepspeed(2, *_common(resumed, data_cache, *extra), "--ds_config", ds, "--resume", "auto"), tmp_path)
    want, got = train_losses(full), train_losses(resumed)
    for step in range(5, 9):
        assert got[step] == pytest.approx(want[step], abs=1e-6), (step, got[step], want[step])
    assert torch.equal(_bias(resumed, 8), bias)


def test_moe_run_exports_to_mixtral(tmp_path: Path, data_cache: Path) -> None:
    run = tmp_path / "run"
    run_job(python_main(*_common(run, data_cache, *MOE, "train.steps=3", "train.save_interval=0")), tmp_path)
    tag = run / "checkpoints" / "step_00000003"
    out = tmp_path / "hf"
    run_job(python_main_tool("export_hf.py", str(tag), "--out", str(out)), tmp_path)
    config = export_gives_checkpoint_logits(tag, out)
    assert config["model_type"] == "mixtral" and config["num_local_experts"] == 4


def python_main_tool(name: str, *args: str) -> list[str]:
    return [python_main()[0], str(REPO / "tools" / name), *args]
