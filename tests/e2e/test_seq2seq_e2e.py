"""An HF encoder-decoder (T5-style) through the real entry point: target cross-entropy, ROUGE at every evaluation,
predictions written, export as the model's own class."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from tests.conftest import SMOKE, python_main, read_rows, run_job
from tests.hf_models import make_hf_model, make_t5_model, write_seq2seq

pytestmark = pytest.mark.slow


def test_t5_seq2seq_trains_and_reports_rouge(tmp_path: Path) -> None:
    from transformers import AutoModelForSeq2SeqLM

    model = make_t5_model(tmp_path)
    data = write_seq2seq(tmp_path / "s2s.jsonl")
    out = tmp_path / "run"
    args = ["--config", str(SMOKE), f"hf.path={model}", "train.objective=seq2seq", "data.corpus=seq2seq",
            f"data.files=[{data}]", "data.seq_len=32", "data.max_target_len=8", "data.val_fraction=0.25",
            "train.lr=1e-2", "train.steps=30", "train.warmup_steps=2", "train.eval_interval=10", "train.eval_batches=4",
            f"train.out_dir={out}", "log.progress=false", "lora.r=8", "lora.target_modules=[q, v, wi, wo]"]
    proc = run_job(python_main(*args), tmp_path)
    assert "validation loss" in proc.stdout and "perplexity" in proc.stdout
    evals = [r for r in read_rows(out) if "val_rougeL" in r]
    assert len(evals) == 3 and evals[-1]["val_loss"] < evals[0]["val_loss"] - 0.3, evals
    rows = [json.loads(line) for line in (out / "predictions" / "eval_step_00000030.jsonl").read_text().splitlines()]
    assert len(rows) == 16 and all(r["references"] and "rougeL" in r["metrics"] for r in rows)
    mean = 100 * sum(r["metrics"]["rougeL"] for r in rows) / len(rows)
    assert mean == pytest.approx(evals[-1]["val_rougeL"])
    run_job([sys.executable, "tools/export_hf.py", str(out), "--out", str(tmp_path / "hf"), "--merge"], tmp_path)
    assert type(AutoModelForSeq2SeqLM.from_pretrained(str(tmp_path / "hf"))).__name__ == "T5ForConditionalGeneration"

    # a decoder-only model is refused for seq2seq, and an encoder-decoder for the causal objectives
    llama = make_hf_model(tmp_path, "llama")
    bad = run_job(python_main(*args, f"hf.path={llama}", f"train.out_dir={tmp_path / 'bad'}"), tmp_path, check=False)
    assert bad.returncode == 2 and "model_type='llama' is not an encoder-decoder model" in bad.stderr
    bad = run_job(python_main("--config", str(SMOKE), f"hf.path={model}", "data.corpus=sft", f"data.files=[{data}]",
                              f"train.out_dir={tmp_path / 'bad2'}"), tmp_path, check=False)
    assert bad.returncode == 2 and "model_type='t5' is not a causal language model" in bad.stderr
