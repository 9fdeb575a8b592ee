"""Per-example metrics on generated text: SQuAD exact match and token F1, numeric answers, ROUGE.

Every function here scores one prediction against one or more references and returns a value in [0, 1];
corpus-level numbers (means, reported as percentages) are built in `train.eval.generations`.

SQuAD answer normalisation (`normalize_answer`), as in the official SQuAD evaluation script, in this order:
lowercase; remove every ASCII punctuation character (`string.punctuation`); remove the articles "a", "an",
"the" as whole words; collapse runs of whitespace to one space and strip the ends. `exact_match` compares
normalised strings, `token_f1` the bags of whitespace tokens of the normalised strings; both take the best
score over the references.

Numeric answers (`extract_number`): a GSM8K solution states its final answer after `####`; the first number
after the last `####` is taken, else the last number anywhere in the text. A number may carry a leading `-`
(not when it follows a letter, digit or `)`, so `3-4` reads as 3 and 4), a `$`, thousands commas
(`1,234`), decimals (`2.50`) and one `/` fraction (`3/4` is 0.75). A sentence's final `.` is not a decimal
point. `numeric_match` compares the extracted values with a relative and absolute tolerance.

ROUGE (`rouge`) is Google's `rouge-score` package: ROUGE-1, ROUGE-2, ROUGE-L (longest common subsequence over
the whole text) and ROUGE-Lsum (summary-level LCS: the union of the LCS of each reference sentence with every
predicted sentence, sentences being the text's lines, so no NLTK data is needed) F-measures, the best over the
references per type. ROUGE-Lsum equals ROUGE-L on one-line texts; write one sentence per line to use it.
Its default tokenizer keeps only `[a-z0-9]` runs after lowercasing (text in other scripts scores 0): pass
`tokenize` (e.g. `str.split`) for such text. `stem=True` applies the Porter stemmer to words of more than
three characters.
"""

from __future__ import annotations

import math
import re
import string
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any


class EvalInputError(ValueError):
    """Bad input to an evaluation helper; the message names the argument and the value."""


ROUGE_TYPES = ("rouge1", "rouge2", "rougeL", "rougeLsum")
"""The ROUGE variants `rouge` returns, as named by rouge-score."""

_PUNCTUATION = frozenset(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")
# sign, dollar, integer part (with thousands commas or plain digits), decimals, optional "/denominator"
_NUMBER = re.compile(
    r"(?P<neg>-)?\$?(?P<int>\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?P<frac>\.\d+)?(?:/(?P<den>\d+))?"
)
_FINAL_ANSWER = "####"


def as_references(references: str | Sequence[str], name: str = "references") -> list[str]:
    """`references` as a non-empty list of strings (one string is one reference); ValueError otherwise."""
    if isinstance(references, str):
        return [references]
    if not isinstance(references, Sequence):
        raise EvalInputError(f"{name} must be a string or a list of strings, got {type(references).__name__}")
    refs = list(references)
    if not refs:
        raise EvalInputError(f"{name}=[] is empty; give at least one reference answer")
    for i, ref in enumerate(refs):
        if not isinstance(ref, str):
            raise EvalInputError(f"{name}[{i}]={ref!r} is a {type(ref).__name__}, not a string")
    return refs


def check_text(value: Any, name: str) -> str:
    """`value` if it is a string; ValueError naming `name` otherwise."""
    if not isinstance(value, str):
        raise EvalInputError(f"{name}={value!r} is a {type(value).__name__}, not a string")
    return value


def normalize_answer(text: str) -> str:
    """SQuAD normalisation: lowercase, drop punctuation, drop articles a/an/the, collapse whitespace."""
    text = "".join(ch for ch in check_text(text, "text").lower() if ch not in _PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def exact_match(prediction: str, references: str | Sequence[str]) -> float:
    """1.0 if the normalised prediction equals some normalised reference, else 0.0."""
    pred = normalize_answer(check_text(prediction, "prediction"))
    return float(any(pred == normalize_answer(ref) for ref in as_references(references)))


def _f1(pred_tokens: list[str], ref_tokens: list[str]) -> float:
    if not pred_tokens or not ref_tokens:  # SQuAD v2: two empty answers agree, one empty answer scores 0
        return float(pred_tokens == ref_tokens)
    same = sum((Counter(pred_tokens) & Counter(ref_tokens)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred_tokens), same / len(ref_tokens)
    return 2 * precision * recall / (precision + recall)


def token_f1(prediction: str, references: str | Sequence[str]) -> float:
    """SQuAD token F1: harmonic mean of token precision and recall of the normalised strings, best reference."""
    pred = normalize_answer(check_text(prediction, "prediction")).split()
    return max(_f1(pred, normalize_answer(ref).split()) for ref in as_references(references))


def _value(match: re.Match[str], text: str) -> float | None:
    """The number a regex match spells, or None for a zero denominator."""
    value = float(match["int"].replace(",", "") + (match["frac"] or ""))
    if match["den"] is not None:
        den = float(match["den"])
        if den == 0:
            return None
        value /= den
    start = match.start()
    if match["neg"] and not (start > 0 and (text[start - 1].isalnum() or text[start - 1] == ")")):
        value = -value
    return value


def _numbers(text: str) -> list[float]:
    return [v for m in _NUMBER.finditer(text) if (v := _value(m, text)) is not None]


def extract_number(text: str) -> float | None:
    """The final numeric answer of a solution: the first number after the last `####`, else the last number.

    None when the text holds no number. Examples: "... #### 1,234" -> 1234.0; "-$5" -> -5.0;
    "3/4 of them" -> 0.75; "The answer is 18." -> 18.0; "pages 3-4" -> 4.0.
    """
    text = check_text(text, "text")
    if _FINAL_ANSWER in text:
        after = _numbers(text.rsplit(_FINAL_ANSWER, 1)[1])
        if after:
            return after[0]
    numbers = _numbers(text)
    return numbers[-1] if numbers else None


def numeric_match(prediction: str, reference: str | float, tol: float = 1e-6) -> float:
    """1.0 if the prediction's numeric answer equals the reference's within `tol`, else 0.0.

    `reference` is a number or a text (a GSM8K solution or a bare answer) that must hold a number. The
    values match when `math.isclose(p, r, rel_tol=tol, abs_tol=tol)`. A prediction without a number is 0.0.
    """
    if not (isinstance(tol, (int, float)) and math.isfinite(tol) and tol >= 0):
        raise EvalInputError(f"tol={tol!r} must be a finite number >= 0")
    if isinstance(reference, bool) or not isinstance(reference, (str, int, float)):
        raise EvalInputError(f"reference={reference!r} must be a number or a text holding one")
    if isinstance(reference, str):
        ref = extract_number(reference)
        if ref is None:
            raise EvalInputError(f"reference={reference!r} holds no number to compare with")
    else:
        ref = float(reference)
    pred = extract_number(check_text(prediction, "prediction"))
    return float(pred is not None and math.isclose(pred, ref, rel_tol=tol, abs_tol=tol))


class _CallableTokenizer:
    """Adapts a `str -> list[str]` function to rouge-score's tokenizer interface (a `tokenize` method)."""

    def __init__(self, fn: Callable[[str], list[str]]) -> None:
        self.fn = fn  # the user's tokenizer

    def tokenize(self, text: str) -> list[str]:
        return list(self.fn(text))


class RougeScorer:
    """ROUGE-1/2/L/Lsum F-measures of predictions against references, built once and reused for a corpus.

    stem: Porter-stem words longer than three characters (default tokenizer only); tokenize: a function
    from text to tokens replacing rouge-score's `[a-z0-9]+` tokenizer (stemming is then not applied).
    """

    def __init__(self, *, stem: bool = False, tokenize: Callable[[str], list[str]] | None = None) -> None:
        from rouge_score import rouge_scorer  # imported here: it loads nltk (~0.3 s), needed only for ROUGE

        if tokenize is not None and not callable(tokenize):
            raise EvalInputError(f"tokenize={tokenize!r} must be a function from a string to a list of tokens")
        tokenizer = _CallableTokenizer(tokenize) if tokenize is not None else None
        self._scorer = rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=stem and tokenizer is None,
                                                tokenizer=tokenizer)

    def __call__(self, prediction: str, references: str | Sequence[str]) -> dict[str, float]:
        """{"rouge1", "rouge2", "rougeL", "rougeLsum"}: F-measure in [0, 1], each the best over the references."""
        scores = self._scorer.score_multi(as_references(references), check_text(prediction, "prediction"))
        return {kind: float(scores[kind].fmeasure) for kind in ROUGE_TYPES}


def rouge(prediction: str, references: str | Sequence[str], *, stem: bool = False,
          tokenize: Callable[[str], list[str]] | None = None) -> dict[str, float]:
    """ROUGE-1/2/L/Lsum F-measures of one prediction (see `RougeScorer`; build one of those for a corpus)."""
    return RougeScorer(stem=stem, tokenize=tokenize)(prediction, references)
