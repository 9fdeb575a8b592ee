"""Reward / verifier models and classifiers through the real entry point, native and HF, with their metrics."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import SMOKE, python_main, read_rows, run_job
from tests.hf_models import make_hf_model, make_tokenizer, write_classification, write_preferences

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("scoring")
    for family in ("llama", "gpt2"):
        make_hf_model(root, family)
    write_preferences(root / "pref.jsonl")
    write_classification(root / "reviews.jsonl")
    with open(root / "verdicts.jsonl", "w") as f:  # a verifier's data: correct (1) / incorrect (0) solutions
        for i in range(96):
            colour, animal = ["red", "blue", "green", "yellow"][i % 4], ["cat", "dog", "fish", "bird"][i % 4]
            f.write(json.dumps({"text": f"Question {i}: name a colour. Answer: {colour if i % 2 else animal}.",
                                "label": i % 2}) + "\n")
    return root


def _args(root: Path, out: Path, *extra: str) -> list[str]:
    return ["--config", str(SMOKE), "data.seq_len=64", "data.val_fraction=0.25", "train.lr=3e-3", "train.steps=16",
            "train.warmup_steps=2", "train.eval_interval=8", "train.save_interval=8", "train.eval_batches=4",
            f"train.out_dir={out}", "log.progress=false", *extra]


def _final(out: Path) -> dict:
    return [r for r in read_rows(out) if "val_accuracy" in r][-1]


def test_native_reward_model_ranks_held_out_pairs(tmp_path: Path, root: Path) -> None:
    out = tmp_path / "run"
    proc = run_job(python_main(*_args(root, out, "train.objective=reward", "data.corpus=preference",
                                      f"data.files=[{root / 'pref.jsonl'}]", f"data.tokenizer={make_tokenizer(root)}")),
                   tmp_path)
    assert "--- sample ---" not in proc.stdout
    final = _final(out)
    assert final["val_accuracy"] >= 0.9 and final["val_margin"] > 0, final
    rows = [json.loads(line) for line in (out / "predictions" / "eval_step_00000016.jsonl").read_text().splitlines()]
    assert len(rows) == 16 and all({"index", "loss", "prediction", "margin"} <= set(r) for r in rows)
    assert sum(r["prediction"] for r in rows) / len(rows) == pytest.approx(final["val_accuracy"])
    # exported as a standard LlamaForSequenceClassification that scores a chosen answer above a rejected one
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    run_job([sys.executable, "tools/export_hf.py", str(out), "--out", str(tmp_path / "hf")], tmp_path)
    model = AutoModelForSequenceClassification.from_pretrained(str(tmp_path / "hf")).eval()
    tok = AutoTokenizer.from_pretrained(str(tmp_path / "hf"))
    from train.data.supervised import Renderer

    row = {"prompt": "Question 7: name a thing. Answer:", "chosen": " green.", "rejected": " dog."}
    pair = Renderer(tok, 64).preference(row, "test")  # rendered as in training; the score is read before eos
    with torch.no_grad():
        good, bad = (model(input_ids=torch.tensor([e.ids[:-1]])).logits for e in pair)
    assert type(model).__name__ == "LlamaForSequenceClassification" and good.item() > bad.item()


def test_hf_verifier_on_labelled_solutions(tmp_path: Path, root: Path) -> None:
    out = tmp_path / "run"
    run_job(python_main(*_args(root, out, f"hf.path={root / 'llama-2l'}", "train.objective=reward",
                               "data.corpus=classification", f"data.files=[{root / 'verdicts.jsonl'}]",
                               "train.lr=1e-2")), tmp_path)
    final = _final(out)
    assert final["val_accuracy"] >= 0.9 and final["val_f1"] >= 0.9, final


def test_gpt2_classifier_runs_end_to_end_with_metrics(tmp_path: Path, root: Path) -> None:
    out = tmp_path / "run"
    run_job(python_main(*_args(root, out, f"hf.path={root / 'gpt2-2l'}", "train.objective=classify",
                               "data.corpus=classification", f"data.files=[{root / 'reviews.jsonl'}]",
                               "train.steps=24")), tmp_path)
    evals = [r for r in read_rows(out) if "val_accuracy" in r]
    assert len(evals) == 3 and evals[-1]["val_loss"] < evals[0]["val_loss"], evals
    assert evals[-1]["val_accuracy"] >= 0.9 and {"val_macro_f1", "val_f1"} <= set(evals[-1]), evals
    assert sorted(p.name for p in (out / "predictions").iterdir()) == [
        f"eval_step_{s:08d}.jsonl" for s in (8, 16, 24)]


def test_lora_classifier_exports_a_standard_sequence_classifier(tmp_path: Path, root: Path) -> None:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    out = tmp_path / "run"
    run_job(python_main(*_args(root, out, f"hf.path={root / 'llama-2l'}", "train.objective=classify", "lora.r=8",
                               "data.corpus=classification", f"data.files=[{root / 'reviews.jsonl'}]",
                               "train.lr=1e-2", "train.steps=32")), tmp_path)
    evals = [r for r in read_rows(out) if "val_accuracy" in r]
    assert evals[-1]["val_loss"] < evals[0]["val_loss"] and evals[-1]["val_accuracy"] >= 0.75, evals
    exported = tmp_path / "hf"
    run_job([sys.executable, "tools/export_hf.py", str(out), "--out", str(exported), "--merge"], tmp_path)
    model = AutoModelForSequenceClassification.from_pretrained(str(exported)).eval()
    tok = AutoTokenizer.from_pretrained(str(exported))
    assert model.config.id2label == {0: "negative", 1: "positive"}
    # transformers' own forward on the merged export predicts what the run predicted for every validation review
    texts = [json.loads(line)["text"] for line in (root / "reviews.jsonl").read_text().splitlines()]
    rows = [json.loads(line) for line in (out / "predictions" / "eval_step_00000032.jsonl").read_text().splitlines()]
    assert len(rows) == 16
    with torch.no_grad():
        for row in rows:
            ids = torch.tensor([tok(texts[row["index"]], add_special_tokens=False)["input_ids"][:64]])
            assert model(input_ids=ids).logits.argmax(-1).item() == row["prediction"], row
