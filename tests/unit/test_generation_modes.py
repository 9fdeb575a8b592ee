"""evaluate_generations for prompting baselines: plain few-shot prompts, stop strings, ROUGE-Lsum with stemming,
and the classification mode (labels matched in the answers, accuracy and macro-F1), against hand values and a
tiny HF policy."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import REPO
from tests.hf_models import make_hf_model
from train.eval.generations import classification_metrics, match_label
from train.eval.rerank import Settings, run
from train.eval.text import EvalInputError, rouge


def test_rouge_lsum_splits_lines_and_stems() -> None:
    # one line: Lsum is L. Two sentences in another order: L finds LCS "the cat sat" only partly, Lsum per line
    ref, pred = "the cat sat\nthe dog ran", "the dog ran\nthe cat sat"
    scores = rouge(pred, ref)
    assert scores["rougeLsum"] == pytest.approx(1.0) and scores["rougeL"] == pytest.approx(0.5)
    assert rouge("cats running", "cat run", stem=True)["rougeLsum"] == pytest.approx(1.0)


def test_labels_are_matched_and_scored_by_hand() -> None:
    labels = ["positive", "negative", "very negative"]
    assert match_label("Very negative.", labels) == "very negative"  # the longest label it starts with
    assert match_label("I think it is negative, not positive", labels) == "negative"  # the first one in it
    assert match_label("positively great", labels) is None  # whole words only
    # gold p p n n v; predicted p n n None v -> acc 3/5; F1 p 2/3 (tp1 fn1), n 1/2 (tp1 fp1 fn1), v 1 -> 13/18
    got = classification_metrics(["positive", "negative", "negative", None, "very negative"],
                                 ["positive", "positive", "negative", "negative", "very negative"], labels)
    assert got == pytest.approx({"accuracy": 60.0, "macro_f1": 100 * 13 / 18, "count": 5, "unmatched": 1})
    with pytest.raises(EvalInputError, match=r"gold label 'neutral' is not in the label set"):
        classification_metrics(["positive"], ["neutral"], labels)


@pytest.fixture(scope="module")
def policy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_hf_model(tmp_path_factory.mktemp("fewshot"), "llama")


def test_plain_prompts_are_the_text_as_written(policy: Path, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    prompts = ["Q: what is two plus two?\nA: four\nQ: what colour is the sky?\nA:", "The quick brown"]
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"prompt": p, "answer": a}) + "\n" for p, a in zip(prompts, ["a", "b"])))
    settings = Settings(kinds=("em", "rouge"), plain=True, max_new_tokens=6)
    run(policy, data, settings, out_dir=tmp_path / "out", device=torch.device("cpu"))
    rows = [json.loads(line) for line in (tmp_path / "out" / "predictions.jsonl").read_text().splitlines()]
    tok = AutoTokenizer.from_pretrained(str(policy))
    model = AutoModelForCausalLM.from_pretrained(str(policy), dtype=torch.float32).eval()
    for prompt, row in zip(prompts, rows):
        ids = tok(prompt, return_tensors="pt")["input_ids"]
        out = model.generate(ids, max_new_tokens=6, do_sample=False, eos_token_id=tok.eos_token_id,
                             pad_token_id=tok.eos_token_id)[0, ids.shape[1]:].tolist()
        out = out[:out.index(tok.eos_token_id)] if tok.eos_token_id in out else out
        assert row["prediction"] == tok.decode(out, skip_special_tokens=True)
        assert set(row["metrics"]) == {"em", "rouge1", "rouge2", "rougeL", "rougeLsum"}


@pytest.mark.slow
def test_cli_classification_with_stop_strings(policy: Path, tmp_path: Path) -> None:
    data = tmp_path / "cls.jsonl"
    rows = [{"prompt": f"Review {i}: fine.\nSentiment:", "answer": "positive" if i % 2 else "negative"}
            for i in range(4)]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    target = shutil.copytree(policy, tmp_path / "policy")
    cmd = [sys.executable, str(REPO / "tools" / "evaluate_generations.py"), "--policy", str(target), "--data",
           str(data), "--plain", "--stop", "\\n", "--stop", ".", "--labels", "positive,negative", "--metrics", "em",
           "--max-new-tokens", "8"]
    ok = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=300, cwd=REPO)
    assert ok.returncode == 0, ok.stderr
    metrics = json.loads(ok.stdout)["classification"]
    assert set(metrics) == {"accuracy", "macro_f1", "count", "unmatched", "labels"} and metrics["count"] == 4
    preds = [json.loads(line) for line in (target / "eval" / "predictions.jsonl").read_text().splitlines()]
    assert all("\n" not in p["prediction"] and "." not in p["prediction"] and "label" in p for p in preds)
    bad = subprocess.run([*cmd[:-6], "--labels", "positive", "--metrics", "em"], check=False, capture_output=True,
                         text=True, timeout=120, cwd=REPO)
    assert bad.returncode == 2 and bad.stderr.startswith("tessera: error: --labels='positive'"), bad.stderr
