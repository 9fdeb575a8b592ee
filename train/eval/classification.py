"""Classification metrics from integer labels: accuracy, confusion matrix, per-class and averaged F1.

Labels are integers in `[0, num_classes)` (Python ints, numpy integers or integer 0-d tensors; a 1-D
integer tensor or array works as a sequence). Conventions, the same as scikit-learn's defaults:

- `confusion[t][p]` counts examples whose true label is t and predicted label is p (rows: truth);
- precision of class c = TP / (TP + FP), recall = TP / (TP + FN), F1 = 2PR / (P + R); a zero denominator
  gives 0.0 (a class never predicted has precision 0);
- macro-F1 is the unweighted mean of the per-class F1 over the classes that occur in the labels or the
  predictions (a class absent from both says nothing about the classifier and is not averaged);
- micro-F1 pools TP, FP and FN over the classes; with one label per example it equals accuracy;
- binary F1 is the F1 of the positive class (`positive_label`, default 1 when there are two classes).

Values are fractions in [0, 1], as classification is usually reported (the text metrics of
`train.eval.generations` are percentages, as SQuAD reports them).
"""

from __future__ import annotations

import operator
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from train.eval.text import EvalInputError


def _as_labels(values: Sequence[Any], name: str, num_classes: int | None = None) -> list[int]:
    """`values` as a list of ints, each in [0, num_classes) when that is given; ValueError naming `name`."""
    if isinstance(values, (str, bytes)) or not hasattr(values, "__len__"):
        raise EvalInputError(f"{name} must be a sequence of integer labels, got {type(values).__name__}")
    out: list[int] = []
    for i, v in enumerate(values):
        if isinstance(v, bool):
            raise EvalInputError(f"{name}[{i}]={v!r} is a bool, not an integer label")
        try:
            label = operator.index(v)
        except TypeError:
            raise EvalInputError(f"{name}[{i}]={v!r} is not an integer label") from None
        if num_classes is not None and not 0 <= label < num_classes:
            raise EvalInputError(f"{name}[{i}]={label} is outside the class range [0, {num_classes})")
        out.append(label)
    return out


def _pair(predictions: Sequence[Any], labels: Sequence[Any], num_classes: int | None) -> tuple[list[int], list[int]]:
    """Both label lists, checked: equal, non-zero lengths and (with num_classes) in range."""
    if num_classes is not None and (isinstance(num_classes, bool) or not isinstance(num_classes, int)
                                    or num_classes < 2):
        raise EvalInputError(f"num_classes={num_classes!r} must be an integer >= 2")
    preds = _as_labels(predictions, "predictions", num_classes)
    gold = _as_labels(labels, "labels", num_classes)
    if len(preds) != len(gold):
        raise EvalInputError(f"predictions has {len(preds)} entries but labels has {len(gold)}; they must match")
    if not gold:
        raise EvalInputError("labels is empty; metrics need at least one example")
    return preds, gold


def accuracy(predictions: Sequence[Any], labels: Sequence[Any]) -> float:
    """Fraction of examples whose predicted label equals the true label."""
    preds, gold = _pair(predictions, labels, None)
    return sum(p == t for p, t in zip(preds, gold)) / len(gold)


def confusion_matrix(predictions: Sequence[Any], labels: Sequence[Any], num_classes: int) -> list[list[int]]:
    """`num_classes` x `num_classes` counts; entry [t][p]: true label t predicted as p."""
    preds, gold = _pair(predictions, labels, num_classes)
    matrix = [[0] * num_classes for _ in range(num_classes)]
    for p, t in zip(preds, gold):
        matrix[t][p] += 1
    return matrix


def _ratio(num: float, den: float) -> float:
    """num / den, or 0.0 when den is 0 (scikit-learn's zero_division=0)."""
    return num / den if den else 0.0


def _f(precision: float, recall: float) -> float:
    return _ratio(2 * precision * recall, precision + recall)


@dataclass(frozen=True)
class ClassificationMetrics:
    """Everything `classification_metrics` computes; fractions in [0, 1]."""

    accuracy: float  # fraction of correct predictions
    precision: list[float]  # per class c: TP / (TP + FP), 0.0 when c is never predicted
    recall: list[float]  # per class c: TP / (TP + FN), 0.0 when c never occurs
    f1: list[float]  # per class c: harmonic mean of precision and recall
    support: list[int]  # per class c: how many examples have true label c
    macro_f1: float  # mean per-class F1 over the classes present in labels or predictions
    micro_f1: float  # F1 of the pooled TP / FP / FN counts (= accuracy for single-label data)
    binary_f1: float | None  # F1 of positive_label (two classes, or when one is named), else None
    positive_label: int | None  # the class binary_f1 is about
    confusion: list[list[int]]  # [true][predicted] counts

    def as_dict(self) -> dict[str, Any]:
        """A JSON-ready dict of every field."""
        return asdict(self)


def classification_metrics(predictions: Sequence[Any], labels: Sequence[Any], num_classes: int,
                           positive_label: int | None = None) -> ClassificationMetrics:
    """Accuracy, per-class precision / recall / F1, macro-, micro- and binary F1 and the confusion matrix.

    positive_label: the class whose F1 is `binary_f1`; defaults to 1 when num_classes == 2, and with more
    classes gives the one-vs-rest F1 of that class (None: no binary F1).
    """
    confusion = confusion_matrix(predictions, labels, num_classes)
    if positive_label is None and num_classes == 2:
        positive_label = 1
    if positive_label is not None:
        _as_labels([positive_label], "positive_label", num_classes)
    n = num_classes
    tp = [confusion[c][c] for c in range(n)]
    predicted = [sum(confusion[t][c] for t in range(n)) for c in range(n)]  # column sums: TP + FP
    support = [sum(confusion[c]) for c in range(n)]  # row sums: TP + FN
    precision = [_ratio(tp[c], predicted[c]) for c in range(n)]
    recall = [_ratio(tp[c], support[c]) for c in range(n)]
    f1 = [_f(precision[c], recall[c]) for c in range(n)]
    present = [c for c in range(n) if support[c] or predicted[c]]
    total = sum(support)
    micro_p = _ratio(sum(tp), sum(predicted))
    micro_r = _ratio(sum(tp), total)
    return ClassificationMetrics(
        accuracy=sum(tp) / total,
        precision=precision,
        recall=recall,
        f1=f1,
        support=support,
        macro_f1=sum(f1[c] for c in present) / len(present),
        micro_f1=_f(micro_p, micro_r),
        binary_f1=None if positive_label is None else f1[positive_label],
        positive_label=positive_label,
        confusion=confusion,
    )


def f1_score(predictions: Sequence[Any], labels: Sequence[Any], num_classes: int,
             average: str = "macro", positive_label: int | None = None) -> float:
    """One F1 number: average "macro", "micro" or "binary" (the F1 of `positive_label`, default 1)."""
    if average not in ("macro", "micro", "binary"):
        raise EvalInputError(f"average={average!r} must be 'macro', 'micro' or 'binary'")
    if average == "binary" and positive_label is None and num_classes != 2:
        raise EvalInputError(f"average='binary' with num_classes={num_classes} needs a positive_label")
    m = classification_metrics(predictions, labels, num_classes, positive_label)
    if average == "macro":
        return m.macro_f1
    if average == "micro":
        return m.micro_f1
    if m.binary_f1 is None:  # not reached: binary always has a positive label by now
        raise EvalInputError("average='binary' needs a positive_label")
    return m.binary_f1
