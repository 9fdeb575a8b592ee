"""The soft-prompt recipe through the real entry point: two frozen bases of different vocabularies share one
encoder, train with falling loss, evaluate in the three modes, resume exactly, and run under ZeRO-3."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import copy_run_until, python_main, read_rows, run_job, train_losses
from tests.e2e.test_train_e2e import _deepspeed

pytestmark = pytest.mark.slow
CONFIG = "train/configs/soft_prompt_cpu.yaml"


@pytest.fixture(scope="module")
def tiny(tiny_bases: Path) -> Path:
    return tiny_bases


def _args(tiny: Path, out: Path, *extra: str) -> list[str]:
    options = (f"{{synthetic: 192, latents: 8, encoder_dim: 64, bases: [{tiny / 'qwen2'}], kv_prefix: true, "
               f"max_new_tokens: 4, eval_examples: 8}}")
    return ["--config", CONFIG, f"hf.path={tiny / 'llama'}", f"train.out_dir={out}", "log.progress=false",
            f"research.options={options}", "train.steps=16", "train.eval_interval=8",
            "train.save_interval=8", "train.keep_last=0", "train.log_interval=1", *extra]


def test_two_bases_train_evaluate_every_mode_and_resume(tmp_path: Path, tiny: Path) -> None:
    out = tmp_path / "run"
    args = _args(tiny, out)
    run_job(python_main(*args), tmp_path)
    losses = [r["term_answer_ce"] for r in read_rows(out) if "term_answer_ce" in r]
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.5, losses
    evals = [r for r in read_rows(out) if "val_loss" in r]
    assert [r["step"] for r in evals] == [8, 16]
    for b in (0, 1):  # both bases (vocabularies of 300 and 360 tokens), every mode
        for mode in ("text", "truncated", "latent"):
            for metric in ("em", "f1", "top1", "top5"):
                assert 0 <= evals[-1][f"val_b{b}_{mode}_{metric}"] <= 100
        assert evals[-1][f"val_b{b}_compression"] > 2
    preds = [json.loads(line) for line in (out / "predictions" / "qa_step_16.jsonl").read_text().splitlines()]
    assert len(preds) == 16 and {p["base"] for p in preds} == {0, 1}
    assert all({"text", "truncated", "latent", "answers", "question"} <= set(p) for p in preds)

    resumed = copy_run_until(out, 8, tmp_path / "resumed")
    run_job(python_main(*_args(tiny, resumed), "--resume", "auto"), tmp_path)
    assert train_losses(resumed) == train_losses(out)


def test_two_bases_with_lora_under_zero3_on_two_ranks(tmp_path: Path, tiny: Path, zero3_test_config: Path) -> None:
    """ZeRO-3 shards both bases, the encoder and the adapters over the ranks; LoRA on the first base trains, and the
    evaluation's generations stay in step across the ranks."""
    out = tmp_path / "z3"
    proc = run_job(_deepspeed(2, "--ds_config", str(zero3_test_config), *_args(tiny, out, "train.steps=8",
                                                                              "train.eval_interval=8", "lora.r=4")),
                   tmp_path)
    assert "ZeRO stage 3" in proc.stderr
    assert (out / "checkpoints/step_00000008/adapter/adapter_config.json").is_file()
    losses = [r["term_answer_ce"] for r in read_rows(out) if "term_answer_ce" in r]
    assert losses[-1] < losses[0], losses
    last = [r for r in read_rows(out) if "val_loss" in r][-1]
    assert "val_b1_latent_f1" in last and "val_b0_text_em" in last
