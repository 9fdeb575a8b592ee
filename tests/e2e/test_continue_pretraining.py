"""Continued pretraining from a Hugging Face checkpoint: `model.init_from` starts from its exact weights."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from tests.conftest import SMOKE, python_main, read_rows, run_job, train_losses
from tests.e2e.test_train_e2e import _deepspeed
from train.data import BlockDataset, GlobalOrder, PreparedData, micro_batches

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("tp", [1, 2])
def test_training_continues_from_hf_weights(tmp_path: Path, data_cache: Path, tp: int) -> None:
    """One process, and two tensor-parallel ranks (the HF weights are loaded whole, then split)."""
    torch.manual_seed(0)
    hf_dir = tmp_path / "hf"
    config = LlamaConfig(hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=512, max_position_embeddings=128)
    hf = LlamaForCausalLM(config).eval()
    hf.save_pretrained(hf_dir)

    out = tmp_path / "run"
    args = ["--config", str(SMOKE), f"model.init_from={hf_dir}", f"train.out_dir={out}",
            f"data.cache_dir={data_cache}", "log.progress=false", "train.steps=6", "train.warmup_steps=2",
            "train.eval_interval=0", "train.save_interval=0", "sample.max_new_tokens=0", f"parallel.tp={tp}"]
    cmd = python_main(*args) if tp == 1 else _deepspeed(tp, *args)
    proc = run_job(cmd, tmp_path)
    assert f"weights loaded from {hf_dir}" in proc.stderr
    losses = train_losses(out)
    assert len(losses) == 6 and losses[6] < losses[1]

    # The first step's loss is the HF model's loss on the same global batch: the run started from its weights.
    meta = json.loads((out / "checkpoints" / "step_00000006" / "tessera.json").read_text())
    assert meta["model_args"]["dim"] == 64 and meta["config"]["model"]["init_from"] == str(hf_dir)
    cfg = meta["config"]
    data = PreparedData.open(meta["prepared_dir"])
    train_ds = BlockDataset(data.split("train"), cfg["data"]["seq_len"], mode=cfg["data"]["sampling"],
                            seed=cfg["train"]["seed"])
    stream = micro_batches(train_ds, GlobalOrder(len(train_ds), seed=cfg["train"]["seed"]), consumed_samples=0,
                           global_batch=8, micro_batch=4, dp_rank=0, dp_size=1)
    with torch.no_grad():
        hf_losses = [hf(input_ids=x, labels=None).logits.float().flatten(0, 1).log_softmax(-1)
                     .gather(1, y.flatten()[:, None]).neg().mean().item() for x, y in (next(stream), next(stream))]
    assert losses[1] == pytest.approx(sum(hf_losses) / 2, abs=1e-5)
    assert read_rows(out)[0]["step"] == 1
