"""DPO through the real entry point: LoRA with the adapters-off reference, a native model under ZeRO-3 with a
sharded frozen copy, the cached reference across a resume."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from tests.conftest import MAIN, SMOKE, free_port, python_main, read_rows, run_job
from tests.e2e.test_hf_finetune import _resume_matches
from tests.hf_models import make_hf_model, make_tokenizer, write_preferences

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("dpo")
    make_hf_model(root, "llama")
    write_preferences(root / "pref.jsonl")
    return root


def _args(root: Path, out: Path, *extra: str) -> list[str]:
    return ["--config", str(SMOKE), "train.objective=dpo", "data.corpus=preference", f"data.files=[{root / 'pref.jsonl'}]",
            "data.seq_len=64", "data.val_fraction=0.25", "train.lr=3e-3", "train.steps=12", "train.warmup_steps=2",
            "train.eval_interval=4", "train.save_interval=4", "train.eval_batches=2", "train.keep_last=0",
            f"train.out_dir={out}", "log.progress=false", "sample.max_new_tokens=0", *extra]


def _learned(out: Path) -> None:
    rows = read_rows(out)
    first = next(r for r in rows if "accuracy" in r)
    assert first["step"] == 1 and first["accuracy"] == 0.0 and abs(first["margin"]) < 1e-6  # policy = reference
    evals = [r for r in rows if "val_accuracy" in r]
    margins = [r["val_margin"] for r in evals]
    assert margins == sorted(margins) and margins[0] > 0, margins
    assert evals[-1]["val_accuracy"] >= 0.9 and evals[-1]["val_loss"] < 0.5, evals[-1]


def test_lora_dpo_against_the_base_with_adapters_off_resumes_exactly(tmp_path: Path, root: Path) -> None:
    out = tmp_path / "run"
    args = _args(root, out, f"hf.path={root / 'llama-2l'}", "lora.r=8")
    proc = run_job(python_main(*args), tmp_path)
    assert "validation loss" in proc.stdout and "accuracy" in proc.stdout
    _learned(out)
    _resume_matches(tmp_path, out, args)


def test_native_zero3_dpo_with_a_sharded_copy_reference(tmp_path: Path, root: Path) -> None:
    out = tmp_path / "run"
    tok = make_tokenizer(root)
    launcher = str(Path(sys.executable).parent / "torchrun")
    run_job([launcher, "--nproc_per_node", "2", "--master_port", str(free_port()), str(MAIN),
             *_args(root, out, f"data.tokenizer={tok}", "--ds_config", "zero3")], tmp_path)
    _learned(out)


def test_cached_reference_is_written_once_and_read_on_resume(tmp_path: Path, root: Path) -> None:
    out = tmp_path / "run"
    args = _args(root, out, f"hf.path={root / 'llama-2l'}", "lora.r=8", "dpo.reference=cached")
    run_job(python_main(*args), tmp_path)
    assert (out / "reference_logps.pt").is_file()
    _learned(out)
    resumed = tmp_path / "run-resumed"
    resumed.mkdir()
    (resumed / "reference_logps.pt").write_bytes((out / "reference_logps.pt").read_bytes())
    _resume_matches(tmp_path, out, args)
