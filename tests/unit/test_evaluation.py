"""Evaluation helpers against hand-computed values: SQuAD EM/F1, numeric answers, classification, ROUGE,
perplexity, token-weighted losses over ranks, predictions files."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from train.eval import (
    EvalInputError,
    accuracy,
    classification_metrics,
    confusion_matrix,
    evaluate_generations,
    exact_match,
    extract_number,
    f1_score,
    normalize_answer,
    numeric_match,
    predictions_path,
    read_predictions,
    rouge,
    summarize,
    token_f1,
    write_predictions,
)

# ---- SQuAD normalisation, exact match, token F1 -------------------------------------------------------


@pytest.mark.parametrize(("text", "normalised"), [
    ("The Cat!", "cat"),
    ("  Hello,   World  ", "hello world"),
    ("U.S. Army", "us army"),  # punctuation is dropped, not replaced by a space
    ("don't", "dont"),
    ("Theresa and the banana", "theresa and banana"),  # articles only as whole words
    ("A an THE", ""),
    ("the\tDenver\nBroncos.", "denver broncos"),
])
def test_normalize_answer(text: str, normalised: str) -> None:
    assert normalize_answer(text) == normalised


def test_exact_match_and_f1_by_hand() -> None:
    # [cat, sat] vs [cat, sat, on, mat]: P = 1, R = 1/2, F1 = 2/3
    assert exact_match("the cat sat", "cat sat on mat") == 0.0
    assert token_f1("the cat sat", "cat sat on mat") == pytest.approx(2 / 3)
    # repeated tokens count once per occurrence: [x, x, y] vs [y, x]: overlap 2, P = 2/3, R = 1, F1 = 0.8
    assert token_f1("x x y", "y x") == pytest.approx(0.8)
    # the best reference counts
    assert exact_match("Denver Broncos", ["Broncos", "The Denver Broncos!"]) == 1.0
    assert token_f1("paris france", ["london", "paris"]) == pytest.approx(2 / 3)
    assert token_f1("London", "Paris") == 0.0
    # answers that normalise to nothing: equal when both are empty (SQuAD v2), else 0
    assert exact_match("The", "an") == 1.0 and token_f1("The", "an") == 1.0
    assert token_f1("", "x") == 0.0 and token_f1("x", "a") == 0.0


# ---- numeric answers ------------------------------------------------------------------------------------

GSM8K_SOLUTION = ("Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n"
                  "Natalia sold 48+24 = <<48+24=72>>72 clips altogether in April and May.\n#### 72")


@pytest.mark.parametrize(("text", "value"), [
    (GSM8K_SOLUTION, 72.0),
    ("so she has 5 left.\n#### 1,234", 1234.0),
    ("#### -7", -7.0),
    ("The total is 3, then 17. #### 18 apples (not 20)", 18.0),  # first number after the marker
    ("#### unsure. Earlier I found 12", 12.0),  # a marker without a number: the last number
    ("The answer is $1,234.50.", 1234.5),
    ("It costs -$5 per day", -5.0),
    ("x = -3", -3.0),
    ("(-12) is the result", -12.0),
    ("pages 3-4", 4.0),  # a dash between numbers is not a sign
    ("It was 2.5.", 2.5),  # the sentence's full stop is not a decimal point
    ("3/4 of them", 0.75),
    ("1,000,000 people", 1_000_000.0),
    ("divide 1/0 and get 5", 5.0),  # a zero denominator is not a number
    ("I cannot tell.", None),
    ("", None),
])
def test_extract_number(text: str, value: float | None) -> None:
    assert extract_number(text) == value


def test_numeric_match() -> None:
    assert numeric_match("So the answer is 72.", GSM8K_SOLUTION) == 1.0
    assert numeric_match("#### 72.0", "72") == 1.0
    assert numeric_match("It is 71", 72) == 0.0
    assert numeric_match("no idea", "72") == 0.0
    assert numeric_match("1/3", "0.3333", tol=1e-3) == 1.0
    assert numeric_match("1/3", "0.3333", tol=1e-6) == 0.0
    with pytest.raises(ValueError, match=r"reference='seventy' holds no number"):
        numeric_match("72", "seventy")
    with pytest.raises(ValueError, match=r"tol=-1"):
        numeric_match("72", "72", tol=-1)


# ---- classification -------------------------------------------------------------------------------------

# Confusion matrix (rows: truth, columns: prediction), checked by hand:
#   t=0: [2, 1, 0]   t=1: [1, 2, 1]   t=2: [1, 0, 2]
LABELS = [0, 0, 0, 1, 1, 1, 1, 2, 2, 2]
PREDS = [0, 0, 1, 1, 1, 2, 0, 2, 2, 0]


def test_multiclass_metrics_by_hand() -> None:
    assert confusion_matrix(PREDS, LABELS, 3) == [[2, 1, 0], [1, 2, 1], [1, 0, 2]]
    m = classification_metrics(PREDS, LABELS, 3)
    assert m.accuracy == accuracy(PREDS, LABELS) == pytest.approx(0.6)
    assert m.precision == pytest.approx([2 / 4, 2 / 3, 2 / 3])  # TP / column sums 4, 3, 3
    assert m.recall == pytest.approx([2 / 3, 2 / 4, 2 / 3])  # TP / row sums 3, 4, 3
    assert m.f1 == pytest.approx([4 / 7, 4 / 7, 2 / 3])
    assert m.support == [3, 4, 3]
    assert m.macro_f1 == pytest.approx(38 / 63)  # (4/7 + 4/7 + 2/3) / 3
    assert m.micro_f1 == pytest.approx(0.6)  # pooled counts: equals accuracy
    assert m.binary_f1 is None
    assert f1_score(PREDS, LABELS, 3, average="binary", positive_label=2) == pytest.approx(2 / 3)
    assert json.loads(json.dumps(m.as_dict()))["confusion"] == m.confusion
    # a fourth class that occurs nowhere has F1 0 but is not averaged into macro-F1
    m4 = classification_metrics(PREDS, LABELS, 4)
    assert m4.f1[3] == 0.0 and m4.macro_f1 == pytest.approx(38 / 63)


def test_binary_metrics_by_hand() -> None:
    labels = [1, 1, 1, 0, 0, 0, 0, 1]
    preds = [1, 0, 0, 1, 0, 0, 0, 1]
    # class 1: TP 2, FP 1, FN 2 -> P 2/3, R 1/2, F1 4/7; class 0: TP 3, FP 2, FN 1 -> P 3/5, R 3/4, F1 2/3
    m = classification_metrics(preds, labels, 2)
    assert m.positive_label == 1 and m.binary_f1 == pytest.approx(4 / 7)
    assert m.accuracy == pytest.approx(5 / 8)
    assert m.macro_f1 == pytest.approx(13 / 21)
    assert f1_score(preds, labels, 2, average="binary") == pytest.approx(4 / 7)
    assert f1_score(preds, labels, 2, average="binary", positive_label=0) == pytest.approx(2 / 3)
    assert f1_score(preds, labels, 2, average="macro") == pytest.approx(13 / 21)
    assert f1_score(preds, labels, 2, average="micro") == pytest.approx(5 / 8)
    # tensors and numpy arrays of integer labels work too
    assert classification_metrics(torch.tensor(preds), np.array(labels), 2).binary_f1 == pytest.approx(4 / 7)


@pytest.mark.parametrize(("call", "message"), [
    (lambda: confusion_matrix([0, 5], [0, 1], 3), r"predictions\[1\]=5 is outside the class range \[0, 3\)"),
    (lambda: classification_metrics([0, 1], [0, -1], 2), r"labels\[1\]=-1 is outside"),
    (lambda: accuracy([0, 1, 1], [0, 1]), r"predictions has 3 entries but labels has 2"),
    (lambda: accuracy([], []), r"labels is empty"),
    (lambda: accuracy([0.5], [0]), r"predictions\[0\]=0.5 is not an integer label"),
    (lambda: confusion_matrix([0], [0], 1), r"num_classes=1 must be an integer >= 2"),
    (lambda: classification_metrics([0], [0], 2, positive_label=2), r"positive_label\[0\]=2 is outside"),
    (lambda: f1_score([0], [0], 3, average="binary"), r"needs a positive_label"),
    (lambda: f1_score([0], [0], 2, average="weighted"), r"average='weighted'"),
])
def test_classification_bad_input(call, message: str) -> None:
    with pytest.raises(EvalInputError, match=message):
        call()


# ---- ROUGE ----------------------------------------------------------------------------------------------


def test_rouge_by_hand() -> None:
    # ref [the cat sat on the mat], pred [the cat sat]: unigrams 3/3 vs 3/6 -> F 2/3; bigrams 2/2 vs 2/5
    # -> F 4/7; LCS 3 -> F 2/3
    assert rouge("the cat sat", "the cat sat on the mat") == pytest.approx(
        {"rouge1": 2 / 3, "rouge2": 4 / 7, "rougeL": 2 / 3, "rougeLsum": 2 / 3})
    # same words, other order: unigrams 4/4; bigrams "the gunman", "police killed" 2/3; LCS 2 -> 1/2
    assert rouge("the gunman police killed", "police killed the gunman") == pytest.approx(
        {"rouge1": 1.0, "rouge2": 2 / 3, "rougeL": 0.5, "rougeLsum": 0.5})
    # several references: the best per type
    assert rouge("the cat sat", ["a dog barked", "the cat sat on the mat"])["rouge1"] == pytest.approx(2 / 3)


def test_rouge_stemming_and_tokenizer() -> None:
    # without stemming only "the" and "running" overlap (2/4); stemmed, cats -> cat and running -> run (3/4)
    assert rouge("the cats were running", "the cat was running")["rouge1"] == pytest.approx(0.5)
    assert rouge("the cats were running", "the cat was running", stem=True)["rouge1"] == pytest.approx(0.75)
    # the default tokenizer keeps [a-z0-9] only: Cyrillic text has no tokens unless a tokenizer is given
    assert rouge("привет мир", "привет мир")["rouge1"] == 0.0
    assert rouge("привет мир", "привет мир", tokenize=str.split)["rougeL"] == 1.0


# ---- corpus evaluation, summaries and predictions files -------------------------------------------------


def test_evaluate_generations_by_hand(tmp_path: Path) -> None:
    preds = ["3 apples", "cat sat 2", "#### 18"]
    refs = [["3 apples", "3"], "The cat sat 3 times.", "She has 18 eggs.\n#### 18"]
    metrics, rows = evaluate_generations(preds, refs, kinds=("em", "f1", "numeric"), ids=["a", "b", "c"],
                                         prompts=["how many?", "what?", "how many eggs?"])
    # EM: 1, 0, 0 (the third normalises to "18", its reference to the whole solution).
    # F1: 1; [cat, sat, 2] vs [cat, sat, 3, times] -> P 2/3, R 1/2 -> 4/7; [18] vs [she, has, 18, eggs, 18]
    # -> P 1, R 1/5 -> 1/3. Numeric: 3 = 3, 2 != 3, 18 = 18.
    assert metrics["count"] == 3
    assert metrics["em"] == pytest.approx(100 / 3)
    assert metrics["f1"] == pytest.approx(100 * (1 + 4 / 7 + 1 / 3) / 3)
    assert metrics["numeric"] == pytest.approx(200 / 3)
    assert rows[2] == {"id": "c", "prompt": "how many eggs?", "prediction": "#### 18",
                       "references": [refs[2]], "extracted": 18.0,
                       "metrics": {"em": 0.0, "f1": pytest.approx(1 / 3), "numeric": 1.0}}
    assert rows[1]["extracted"] == 2.0 and rows[1]["metrics"]["numeric"] == 0.0
    assert summarize(rows) == pytest.approx(metrics)
    path = write_predictions(predictions_path(tmp_path, 200), rows)
    assert path == tmp_path / "predictions" / "eval_step_00000200.jsonl"
    assert read_predictions(path) == rows


def test_evaluate_generations_rouge_and_defaults() -> None:
    metrics, rows = evaluate_generations(["the cat sat"], ["the cat sat on the mat"], kinds=("rouge",))
    assert metrics == pytest.approx({"rouge1": 200 / 3, "rouge2": 400 / 7, "rougeL": 200 / 3, "rougeLsum": 200 / 3,
                                     "count": 1})
    assert rows[0]["id"] == 0 and "prompt" not in rows[0] and "extracted" not in rows[0]


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"predictions": ["a", "b"], "references": ["a"]}, r"references has 1 entries but predictions has 2"),
    ({"predictions": ["a"], "references": [[]]}, r"references\[0\]=\[\] is empty"),
    ({"predictions": [None], "references": ["a"]}, r"predictions\[0\]=None is a NoneType, not a string"),
    ({"predictions": [], "references": []}, r"predictions is empty"),
    ({"predictions": ["a"], "references": ["a"], "kinds": ("bleu",)}, r"kinds=\['bleu'\]"),
    ({"predictions": ["a"], "references": ["a"], "ids": [1, 2]}, r"ids has 2 entries"),
    ({"predictions": ["4"], "references": [["4", "four"]], "kinds": ("numeric",)},
     r"references\[0\]\[1\]='four' holds no number"),
])
def test_evaluate_generations_bad_input(kwargs: dict, message: str) -> None:
    with pytest.raises(EvalInputError, match=message):
        evaluate_generations(**kwargs)


def test_summarize() -> None:
    assert summarize([{"acc": True, "loss": 0.5}, {"acc": False, "loss": 1.5}], scale=1.0) == {
        "acc": 0.5, "loss": 1.0, "count": 2}
    with pytest.raises(EvalInputError, match=r"metric_rows\[1\] has metrics \['b'\]"):
        summarize([{"a": 1.0}, {"b": 1.0}])
    with pytest.raises(EvalInputError, match=r"metric_rows\[0\]\['a'\]='x' is not a number"):
        summarize([{"a": "x"}])
    with pytest.raises(EvalInputError, match=r"metric_rows is empty"):
        summarize([])


def test_predictions_round_trip(tmp_path: Path) -> None:
    rows = [{"id": 0, "prompt": "2+2?", "prediction": "4", "references": ["4"],
             "metrics": {"em": np.float32(1.0)}, "logits": torch.tensor([0.5, -1.0])},
            {"id": 1, "prompt": "héllo", "prediction": "naïve ✓", "references": ["x"],
             "metrics": {"em": 0.0}}]
    path = write_predictions(tmp_path / "p.jsonl", rows)
    back = read_predictions(path)
    assert back[0]["metrics"] == {"em": 1.0} and back[0]["logits"] == [0.5, -1.0]
    assert back[1] == rows[1]
    assert "naïve ✓" in path.read_text(encoding="utf-8")  # written as UTF-8, not \u escapes
    plain = tmp_path / "plain.txt"
    plain.write_text("")
    assert path.stat().st_mode == plain.stat().st_mode  # the usual permissions, not a temporary file's 0600


def _rows_then_failure():
    yield {"id": 0, "prediction": "ok"}
    raise RuntimeError("generation crashed")


@pytest.mark.parametrize(("rows", "error", "message"), [
    ([{"id": 0, "prediction": "ok"}, {"id": 1, "prediction": {1, 2}}], EvalInputError,
     r"rows\[1\] cannot be written as JSON"),
    ([{"id": 0, "prediction": "ok"}, {"id": 1, "prediction": float("nan")}], EvalInputError, r"rows\[1\]"),
    ([{"id": 0, "prediction": "ok"}, {"id": 1}], EvalInputError,
     r"rows\[1\] must be a mapping with a 'prediction'"),
    (_rows_then_failure(), RuntimeError, r"generation crashed"),
])
def test_write_predictions_is_atomic(tmp_path: Path, rows, error: type[Exception], message: str) -> None:
    path = tmp_path / "preds.jsonl"
    path.write_text('{"id": 9, "prediction": "previous"}\n')
    with pytest.raises(error, match=message):
        write_predictions(path, rows)
    assert path.read_text() == '{"id": 9, "prediction": "previous"}\n'  # the old file is intact
    assert sorted(p.name for p in tmp_path.iterdir()) == ["preds.jsonl"]  # and no temporary file is left
