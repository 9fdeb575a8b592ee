"""Evaluation helpers for fine-tuning recipes: pure functions, no model or trainer state.

- `train.eval.text`: SQuAD answer normalisation, exact match and token F1 (best over several references),
  numeric answers of math word problems (GSM8K `####` answers, else the last number), ROUGE-1/2/L
  (Google's rouge-score);
- `train.eval.classification`: accuracy, confusion matrix, per-class precision / recall / F1, macro-,
  micro- and binary F1 from integer labels;
- `train.eval.loss`: the one `perplexity` (from a mean token loss, capped at `MAX_LOG_PERPLEXITY` = 50 nats)
  and the one validation reduction: `TokenLoss` (token-weighted loss sums) and `WeightedMean` (several named
  values sharing one weight), float64 sums on the device added over ranks with one all-reduce;
- `train.eval.generations`: `evaluate_generations` (corpus metrics, as percentages, and per-example rows
  in one call), `summarize`, and atomic JSONL predictions (`write_predictions`, `read_predictions`,
  `predictions_path`).

Bad input (lengths that differ, an empty reference list, a label outside the class range, a non-string
prediction) is an `EvalInputError` (a ValueError) naming the argument and the value.
"""

from train.eval.classification import (
    ClassificationMetrics,
    accuracy,
    classification_metrics,
    confusion_matrix,
    f1_score,
)
from train.eval.generations import (
    KINDS,
    PERCENT,
    GenerationEval,
    evaluate_generations,
    predictions_path,
    read_predictions,
    summarize,
    write_predictions,
)
from train.eval.loss import MAX_LOG_PERPLEXITY, TokenLoss, WeightedMean, all_reduce_token_loss, perplexity
from train.eval.text import (
    ROUGE_TYPES,
    EvalInputError,
    RougeScorer,
    exact_match,
    extract_number,
    normalize_answer,
    numeric_match,
    rouge,
    token_f1,
)

__all__ = [
    "KINDS",
    "MAX_LOG_PERPLEXITY",
    "PERCENT",
    "ROUGE_TYPES",
    "ClassificationMetrics",
    "EvalInputError",
    "GenerationEval",
    "RougeScorer",
    "TokenLoss",
    "WeightedMean",
    "accuracy",
    "all_reduce_token_loss",
    "classification_metrics",
    "confusion_matrix",
    "evaluate_generations",
    "exact_match",
    "extract_number",
    "f1_score",
    "normalize_answer",
    "numeric_match",
    "perplexity",
    "predictions_path",
    "read_predictions",
    "rouge",
    "summarize",
    "token_f1",
    "write_predictions",
]
