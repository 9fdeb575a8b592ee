"""End to end: checkpoints of real runs (ZeRO-0 in one process, ZeRO-3 on two gloo ranks) exported to HF.

The exported directory must load with `transformers.AutoModelForCausalLM` / `AutoTokenizer` and no custom
code, give Tessera's logits on real validation text, and reproduce the validation loss the run itself
measured before saving (which checks the consolidated weights independently of Tessera's own model).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import transformers

from model import ModelArgs, Transformer
from tests.conftest import REPO, python_main, run_job
from tests.e2e.test_train_e2e import _common, _deepspeed
from train.data.dataset import BlockDataset, PreparedData
from train.export.consolidate import consolidated_state_dict

pytestmark = pytest.mark.slow

EXPORT_TOOL = str(REPO / "tools" / "export_hf.py")
SHORT_RUN = ("train.steps=4", "train.warmup_steps=1", "train.save_interval=0", "train.eval_interval=0",
             "sample.max_new_tokens=0")  # save_interval=0: one checkpoint, at the end


def _train(stage: str, run_dir: Path, tmp_path: Path, data_cache: Path, zero3_config: Path) -> int:
    """Train the smoke model for 4 steps under `stage`; returns the world size."""
    args = _common(run_dir, data_cache, *SHORT_RUN)
    if stage == "zero0":
        run_job(python_main(*args, "--ds_config", "cpu"), tmp_path)
        return 1
    run_job(_deepspeed(2, *args, "--ds_config", str(zero3_config)), tmp_path)
    return 2


def _validation_batch(meta: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """The samples of the run's final evaluation: the first eval_batches x micro_batch, whatever the world size."""
    cfg = meta["config"]
    n = cfg["train"]["eval_batches"] * cfg["train"]["micro_batch_size"]
    tokens = PreparedData.open(meta["prepared_dir"]).split("val")
    val = BlockDataset(tokens, cfg["data"]["seq_len"], mode="blocks")
    return val.batch(np.arange(n))  # (N, T) inputs, (N, T) labels


@pytest.mark.parametrize("stage", ["zero0", "zero3"])
def test_exported_checkpoint_loads_in_transformers(
    tmp_path: Path, data_cache: Path, zero3_test_config: Path, stage: str
) -> None:
    run_dir = tmp_path / "run"
    _train(stage, run_dir, tmp_path, data_cache, zero3_test_config)
    tag_dir = run_dir / "checkpoints" / "step_00000004"
    shard_files = sorted(p.name for p in tag_dir.glob("*model_states.pt"))
    assert shard_files == (["mp_rank_00_model_states.pt"] if stage == "zero0" else [
        "zero_pp_rank_0_mp_rank_00_model_states.pt", "zero_pp_rank_1_mp_rank_00_model_states.pt"])

    out = tmp_path / "hf"
    proc = run_job([sys.executable, EXPORT_TOOL, str(run_dir), "--out", str(out)], tmp_path)
    assert proc.stdout.strip() == str(out)
    hf = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(hf) is transformers.LlamaForCausalLM and hf.dtype == torch.float32

    meta = json.loads((tag_dir / "tessera.json").read_text())
    model = Transformer(ModelArgs(**meta["model_args"])).eval()
    model.load_state_dict(consolidated_state_dict(tag_dir), strict=True)
    inputs, labels = _validation_batch(meta)
    with torch.no_grad():
        hf_logits = hf(inputs, use_cache=False).logits  # (N, T, V)
        assert (model(inputs) - hf_logits).abs().max().item() < 1e-5
    loss = F.cross_entropy(hf_logits.flatten(0, 1), labels.flatten()).item()
    summary = json.loads((run_dir / "summary.json").read_text())
    assert loss == pytest.approx(summary["val_loss"], abs=1e-5)  # what the engine measured before saving

    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    original = transformers.AutoTokenizer.from_pretrained(meta["tokenizer_dir"])
    text = original.decode(inputs[0].tolist())
    assert tokenizer.encode(text) == original.encode(text) and len(tokenizer.encode(text)) > 10
    assert hf.config.eos_token_id == original.eos_token_id == hf.generation_config.eos_token_id

    if stage == "zero3":  # bf16 export of the same checkpoint: the fp32 weights rounded, nothing else
        from safetensors.torch import load_file

        bf16_out = tmp_path / "hf_bf16"
        cmd = [sys.executable, EXPORT_TOOL, str(tag_dir), "--out", str(bf16_out), "--dtype", "bfloat16"]
        run_job(cmd, tmp_path)
        saved = load_file(bf16_out / "model.safetensors")
        expected = model.state_dict()
        assert all(t.dtype == torch.bfloat16 for t in saved.values())
        for name, tensor in saved.items():
            assert torch.equal(tensor, expected[name.removeprefix("model.")].to(torch.bfloat16)), name
        assert transformers.AutoModelForCausalLM.from_pretrained(bf16_out).dtype == torch.bfloat16
