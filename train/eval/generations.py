"""Scoring a corpus of generations in one call, summarising per-example metrics, writing predictions.

`evaluate_generations` scores each prediction with the requested kinds (`train.eval.text`) and returns the
corpus metrics and one row per example:

    metrics, rows = evaluate_generations(preds, refs, kinds=("em", "f1"), ids=ids, prompts=prompts)
    write_predictions(predictions_path(out_dir, step), rows)

Corpus metrics are means over the examples times 100, as the SQuAD evaluation reports them (EM 81.2 means
81.2 % of the answers match); per-example values stay in [0, 1]. `count` is the number of examples.

Predictions are JSONL, one object per example: `id`, `prompt` (when given), `prediction`, `references`
(a list), `metrics` (per-example values) and, with the numeric kind, `extracted` (the prediction's numeric
answer or null). `write_predictions` writes a temporary file beside the target, flushes it to disk and
renames it over the target, so a reader sees the old file or the complete new one, never a partial one.
By convention they go to `<run dir>/predictions/<split>_step_<step>.jsonl`, beside `metrics.jsonl`.
"""

from __future__ import annotations

import json
import math
import os
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

from train.eval.text import (
    EvalInputError,
    RougeScorer,
    as_references,
    check_text,
    exact_match,
    extract_number,
    normalize_answer,
    numeric_match,
    token_f1,
)

KINDS = ("em", "f1", "numeric", "rouge")
"""Metric kinds of `evaluate_generations`; "rouge" yields rouge1, rouge2, rougeL and rougeLsum."""
PERCENT = 100.0
"""Scale of corpus-level generation metrics (percentages, as SQuAD reports)."""


class GenerationEval(NamedTuple):
    """What `evaluate_generations` returns."""

    metrics: dict[str, float]  # corpus metrics: percentages, plus "count"
    rows: list[dict[str, Any]]  # one JSON-ready row per example (see the module docstring)


def _check_kinds(kinds: Sequence[str]) -> tuple[str, ...]:
    if isinstance(kinds, str):
        kinds = (kinds,)
    kinds = tuple(kinds)
    bad = [k for k in kinds if k not in KINDS]
    if bad or not kinds:
        raise EvalInputError(f"kinds={list(kinds)!r}: choose one or more of {list(KINDS)}")
    return tuple(dict.fromkeys(kinds))


def _column(values: Sequence[Any], name: str, n: int) -> list[Any]:
    """`values` as a list of n entries, one per prediction; ValueError naming `name` otherwise."""
    if isinstance(values, str) or not isinstance(values, Sequence):
        raise EvalInputError(f"{name} must be a list with one entry per prediction, got {type(values).__name__}")
    if len(values) != n:
        raise EvalInputError(f"{name} has {len(values)} entries but predictions has {n}; they must match")
    return list(values)


def evaluate_generations(
    predictions: Sequence[str],
    references: Sequence[str | Sequence[str]],
    kinds: Sequence[str] = KINDS,
    *,
    ids: Sequence[Any] | None = None,
    prompts: Sequence[str] | None = None,
    tol: float = 1e-6,
    stem: bool = False,
    tokenize: Callable[[str], list[str]] | None = None,
) -> GenerationEval:
    """Corpus metrics and per-example rows for generated answers against their references.

    references[i] is one reference string or a list of them (the best-scoring one counts). kinds: any of
    "em", "f1" (SQuAD), "numeric" (every reference must hold a number; see `numeric_match`, `tol`) and
    "rouge" (`stem`, `tokenize` as in `RougeScorer`). ids default to 0..n-1; prompts are copied into the rows.
    """
    kinds = _check_kinds(kinds)
    if isinstance(predictions, str) or not isinstance(predictions, Sequence):
        raise EvalInputError(f"predictions must be a list of strings, got {type(predictions).__name__}")
    n = len(predictions)
    if n == 0:
        raise EvalInputError("predictions is empty; give at least one example to evaluate")
    refs = _column(references, "references", n)
    id_col = list(range(n)) if ids is None else _column(ids, "ids", n)
    prompt_col = None if prompts is None else _column(prompts, "prompts", n)
    scorer = RougeScorer(stem=stem, tokenize=tokenize) if "rouge" in kinds else None
    rows: list[dict[str, Any]] = []
    for i, pred in enumerate(predictions):
        pred = check_text(pred, f"predictions[{i}]")
        ref_list = as_references(refs[i], f"references[{i}]")
        scores: dict[str, float] = {}
        row: dict[str, Any] = {"id": id_col[i]}
        if prompt_col is not None:
            row["prompt"] = check_text(prompt_col[i], f"prompts[{i}]")
        row.update(prediction=pred, references=ref_list)
        if "em" in kinds:
            scores["em"] = exact_match(pred, ref_list)
        if "f1" in kinds:
            scores["f1"] = token_f1(pred, ref_list)
        if "numeric" in kinds:
            for j, ref in enumerate(ref_list):
                if extract_number(ref) is None:
                    raise EvalInputError(f"references[{i}][{j}]={ref!r} holds no number; the 'numeric' kind "
                                     "needs numeric references (leave it out of kinds for this data)")
            scores["numeric"] = max(numeric_match(pred, ref, tol) for ref in ref_list)
            row["extracted"] = extract_number(pred)
        if scorer is not None:
            scores.update(scorer(pred, ref_list))
        row["metrics"] = scores
        rows.append(row)
    return GenerationEval(summarize(rows), rows)


def summarize(metric_rows: Sequence[Mapping[str, Any]], scale: float = PERCENT) -> dict[str, float]:
    """Mean of each metric over the rows, times `scale` (default 100), plus "count" (the number of rows).

    A row is a mapping from metric name to number, or a prediction row holding one under "metrics". Every
    row must have the same metric names; booleans count as 0 / 1.
    """
    if isinstance(metric_rows, Mapping) or not isinstance(metric_rows, Sequence):
        raise EvalInputError(f"metric_rows must be a list of rows, got {type(metric_rows).__name__}")
    if not metric_rows:
        raise EvalInputError("metric_rows is empty; there is nothing to summarise")
    tables: list[Mapping[str, Any]] = []
    for i, row in enumerate(metric_rows):
        table = row.get("metrics", row) if isinstance(row, Mapping) else None
        if not isinstance(table, Mapping):
            raise EvalInputError(f"metric_rows[{i}]={row!r} is not a mapping of metric values")
        tables.append(table)
    names = list(tables[0])
    if "count" in names:
        raise EvalInputError("metric_rows[0] has a metric named 'count', which summarize reserves")
    sums = dict.fromkeys(names, 0.0)
    for i, table in enumerate(tables):
        if set(table) != set(names):
            raise EvalInputError(f"metric_rows[{i}] has metrics {sorted(table)} but metric_rows[0] has "
                             f"{sorted(names)}; every row must have the same ones")
        for name in names:
            value = table[name]
            if not isinstance(value, (int, float)) or math.isnan(value):
                raise EvalInputError(f"metric_rows[{i}][{name!r}]={value!r} is not a number")
            sums[name] += float(value)
    summary = {name: scale * total / len(tables) for name, total in sums.items()}
    summary["count"] = len(tables)
    return summary


def predictions_path(out_dir: str | Path, step: int, split: str = "eval") -> Path:
    """`<out_dir>/predictions/<split>_step_<step, 8 digits>.jsonl`, the conventional place for predictions."""
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise EvalInputError(f"step={step!r} must be an integer >= 0")
    if not split or "/" in split or os.sep in split:
        raise EvalInputError(f"split={split!r} must be a non-empty name without path separators")
    return Path(out_dir) / "predictions" / f"{split}_step_{step:08d}.jsonl"


def _jsonable(value: Any) -> Any:
    """numpy and torch values as plain Python (their `tolist()`); anything else is not JSON."""
    if hasattr(value, "tolist"):
        return value.tolist()
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def write_predictions(path: str | Path, rows: Iterable[Mapping[str, Any]]) -> Path:
    """Write `rows` as JSONL to `path` atomically (temporary file, fsync, os.replace); returns the path.

    Each row must be a mapping with a "prediction" key and JSON-serialisable values (numpy / torch values
    are converted). On any error the temporary file is removed and an existing `path` is left as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # a fresh name beside the target (same file system, so os.replace is atomic); opened with "x" rather
    # than mkstemp so the file gets the usual permissions (mkstemp's are 0600)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}.tmp")
    try:
        with open(tmp, "x", encoding="utf-8") as f:
            for i, row in enumerate(rows):
                if not isinstance(row, Mapping) or "prediction" not in row:
                    raise EvalInputError(f"rows[{i}] must be a mapping with a 'prediction' key, got {row!r:.200}")
                try:
                    line = json.dumps(dict(row), ensure_ascii=False, allow_nan=False, default=_jsonable)
                except (TypeError, ValueError) as e:
                    raise EvalInputError(f"rows[{i}] cannot be written as JSON: {e}") from e
                f.write(line + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def read_predictions(path: str | Path) -> list[dict[str, Any]]:
    """The rows of a predictions JSONL file, in order."""
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def match_label(prediction: str, labels: Sequence[str]) -> str | None:
    """The label a generated answer names: after SQuAD normalisation, the longest label the answer starts with,
    else the label that occurs first in it as whole words; None when it names none."""
    pred = normalize_answer(check_text(prediction, "prediction"))
    norm = {label: normalize_answer(label) for label in labels}
    starts = [label for label, n in norm.items() if n and (pred == n or pred.startswith(n + " "))]
    if starts:
        return max(starts, key=lambda label: len(norm[label]))
    padded = f" {pred} "
    found = [(padded.find(f" {n} "), label) for label, n in norm.items() if n and f" {n} " in padded]
    return min(found)[1] if found else None


def classification_metrics(predicted: Sequence[str | None], gold: Sequence[str],
                           labels: Sequence[str]) -> dict[str, float]:
    """Accuracy and macro-F1 (the unweighted mean of each label's F1), as percentages, plus "count" and
    "unmatched" (answers naming no label: wrong, and a miss for their gold label)."""
    if len(predicted) != len(gold) or not gold:
        raise EvalInputError(f"predicted has {len(predicted)} entries and gold {len(gold)}; give one per example")
    unknown = sorted({g for g in gold if g not in labels})
    if unknown:
        raise EvalInputError(f"gold label {unknown[0]!r} is not in the label set {list(labels)}")
    f1s = []
    for label in labels:
        tp = sum(p == label and g == label for p, g in zip(predicted, gold))
        fp = sum(p == label and g != label for p, g in zip(predicted, gold))
        fn = sum(p != label and g == label for p, g in zip(predicted, gold))
        f1s.append(0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn))
    accuracy = sum(p == g for p, g in zip(predicted, gold)) / len(gold)
    return {"accuracy": PERCENT * accuracy, "macro_f1": PERCENT * sum(f1s) / len(f1s), "count": len(gold),
            "unmatched": sum(p is None for p in predicted)}
