"""Evaluation helpers for fine-tuning recipes: pure functions, no model or trainer state.

- `train.eval.text`: SQuAD answer normalisation, exact match and token F1 (best over several references),
  numeric answers of math word problems (GSM8K `####` answers, else the last number), ROUGE-1/2/L
  (Google's rouge-score);
- `train.eval.classification`: accuracy, confusion matrix, per-class precision / recall / F1, macro-,
  micro- and binary F1 from integer labels;
- `train.eval.loss`: perplexity from a mean token loss (inf on overflow) and token-weighted loss sums,
  all-reduced over a data-parallel group when torch.distributed is initialised.

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
from train.eval.loss import MAX_LOG_PERPLEXITY, TokenLoss, all_reduce_token_loss, perplexity
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
    "MAX_LOG_PERPLEXITY",
    "ROUGE_TYPES",
    "ClassificationMetrics",
    "EvalInputError",
    "RougeScorer",
    "TokenLoss",
    "accuracy",
    "all_reduce_token_loss",
    "classification_metrics",
    "confusion_matrix",
    "exact_match",
    "extract_number",
    "f1_score",
    "normalize_answer",
    "numeric_match",
    "perplexity",
    "rouge",
    "token_f1",
]
