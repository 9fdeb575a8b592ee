"""Generation evaluation of a policy, and best-of-N reranking with a verifier.

For every prompt of a JSONL file (`{"prompt": str, "answer": str}` or
`{"prompt": str, "answers": [str, ...]}`), the policy (an HF causal LM directory) samples N answers as one
batch; a verifier (an HF `*ForSequenceClassification` with one output, as Tessera exports reward / verifier
models) scores each (prompt, answer) pair and the highest score is kept (the first one on ties). With N = 1
and no verifier this is plain generation evaluation (greedy at temperature 0).

Preprocessing is training's: prompts go through `Renderer.prompt` (the chat template when the tokenizer has
one, else `"user: ...\\nassistant: "`), answers are the tokens after the prompt up to the first eos, and the
verifier reads `Renderer.example([user, assistant]).ids[:-1]` at its last token, as reward training batched it
(`collate_lm`, `SequenceScorer`). The policy and the verifier must share one tokenizer (same tokenizer.json).

Sampling is seeded per prompt (`seed + index`), so a prompt's answers do not depend on the other prompts.
Reported, for each metric kind: `best_of_n` (the verifier's choice), `first` (sample 0) and `oracle` (the best
of the N), as percentages, plus `verifier_score_mean` (over all answers) when there is a verifier.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from model.generate import generate
from model.heads import SequenceScorer
from model.hf_causal import WEIGHT_FILES, CausalLM, causal_lm_config, load_causal_lm
from train.data.collators import collate_lm
from train.data.corpus import DataError
from train.data.supervised import Renderer, read_jsonl
from train.data.tokenizer import load_tokenizer, same_tokenizer, tokenizer_identity
from train.eval.generations import (
    KINDS,
    classification_metrics,
    evaluate_generations,
    match_label,
    summarize,
    write_predictions,
)
from train.eval.text import EvalInputError, extract_number

VIEWS = ("best_of_n", "first", "oracle")
"""The metric views reported: the verifier's choice, sample 0, and the best of the N answers."""


class RerankError(ValueError):
    """Unusable input to a generation / best-of-N evaluation; the message names it and the fix."""


@dataclass(frozen=True)
class Item:
    """One prompt to answer and its reference answers."""

    id: Any  # the row's "id", else its 0-based position in the file
    prompt: str  # the user message
    references: list[str]  # one or more acceptable answers


@dataclass(frozen=True)
class Settings:
    """How answers are sampled and scored."""

    n: int = 1  # answers sampled per prompt
    max_new_tokens: int = 64  # generated tokens per answer, at most
    temperature: float = 0.0  # 0 = greedy (only with n = 1)
    top_k: int | None = None  # sample among the k most likely tokens, or None
    seed: int = 0  # prompt i samples with a generator seeded seed + i
    kinds: tuple[str, ...] = ("numeric",)  # metric kinds of `evaluate_generations` ("em", "f1", "numeric", "rouge")
    plain: bool = False  # the prompt as written (few-shot text), no chat scaffold; the tokenizer's own BOS only
    stop: tuple[str, ...] = ()  # an answer is cut before the first of these strings (e.g. "\n" after few-shot)
    stem: bool = True  # ROUGE with the Porter stemmer
    labels: tuple[str, ...] = ()  # classification: answers are mapped to one of these; accuracy and macro-F1


def check_settings(s: Settings, has_verifier: bool) -> None:
    """RerankError naming the first setting that cannot work."""
    if s.n < 1:
        raise RerankError(f"n={s.n} must be >= 1")
    if s.n > 1 and not has_verifier:
        raise RerankError(f"n={s.n} samples per prompt need a verifier to choose among them; give --verifier "
                          "DIR (or n=1 for plain evaluation)")
    if s.max_new_tokens < 1:
        raise RerankError(f"max_new_tokens={s.max_new_tokens} must be >= 1")
    if not (math.isfinite(s.temperature) and s.temperature >= 0):
        raise RerankError(f"temperature={s.temperature} must be a finite number >= 0 (0 = greedy)")
    if s.n > 1 and s.temperature == 0:
        raise RerankError(f"n={s.n} with temperature=0 gives {s.n} identical greedy answers; set a "
                          f"temperature > 0")
    if s.top_k is not None and s.top_k < 1:
        raise RerankError(f"top_k={s.top_k} must be >= 1")
    bad = [k for k in s.kinds if k not in KINDS]
    if bad or not s.kinds:
        raise RerankError(f"metrics={list(s.kinds)}: choose one or more of {', '.join(KINDS)}")
    if s.labels and (s.n > 1 or len(set(s.labels)) != len(s.labels) or len(s.labels) < 2):
        raise RerankError(f"labels={list(s.labels)}: classification takes two or more distinct labels and n=1")
    if any(not text for text in s.stop):
        raise RerankError("stop: an empty stop string would cut every answer to nothing; remove it")


def read_items(path: str | Path, kinds: Sequence[str] = (), labels: Sequence[str] = ()) -> list[Item]:
    """The rows of a JSONL file as Items; a row without a prompt or an answer is a RerankError naming its
    line.

    With the "numeric" kind every reference must hold a number; with `labels`, the first must be one of them.
    """
    items: list[Item] = []
    try:
        for where, row in read_jsonl(path):
            prompt = row.get("prompt")
            if not isinstance(prompt, str) or not prompt:
                raise RerankError(f"{where}: needs a non-empty string 'prompt' (found keys {sorted(row)})")
            refs = row["answers"] if "answers" in row else [row["answer"]] if "answer" in row else None
            if refs is None:
                raise RerankError(f"{where}: no 'answer' (a string) or 'answers' (a list of strings) to "
                                  "compare the generations with")
            if not isinstance(refs, list) or not refs or not all(isinstance(r, str) for r in refs):
                raise RerankError(f"{where}: the reference answer(s) {refs!r:.80} must be a string or a "
                                  "non-empty list of strings")
            if "numeric" in kinds:
                for ref in refs:
                    if extract_number(ref) is None:
                        raise RerankError(f"{where}: reference {ref!r:.80} holds no number, which the "
                                          "'numeric' metric needs; choose --metrics em,f1 for this data")
            if labels and refs[0] not in labels:
                raise RerankError(f"{where}: the answer {refs[0]!r:.80} is not one of the labels {list(labels)}")
            items.append(Item(row.get("id", len(items)), prompt, refs))
    except DataError as err:
        raise RerankError(str(err)) from None
    if not items:
        raise RerankError(f"{path}: no rows; give one JSON object per prompt")
    return items


def check_model_dirs(policy: str | Path, verifier: str | Path | None) -> None:
    """RerankError unless `policy` is an HF causal LM and `verifier` an HF sequence classifier with one
    output, both with weights and the same tokenizer.json. Reads configs only, loads no weights."""
    from transformers import AutoConfig

    try:
        causal_lm_config(policy, where="policy")
    except (ValueError, OSError) as err:
        raise RerankError(str(err)) from None
    try:
        policy_tok = tokenizer_identity(policy)
    except DataError as err:
        raise RerankError(f"policy={policy}: {err}") from None
    if verifier is None:
        return
    vdir = Path(verifier)
    if not (vdir / "config.json").is_file():
        raise RerankError(f"verifier={verifier}: no config.json there; give a directory written by "
                          "save_pretrained (tools/export_hf.py of a reward run)")
    if not any((vdir / name).is_file() for name in WEIGHT_FILES):
        raise RerankError(f"verifier={verifier}: no weights ({' / '.join(WEIGHT_FILES[:2])}) next to "
                          f"config.json")
    config = AutoConfig.from_pretrained(str(vdir))
    archs = config.architectures or []
    if not any(a.endswith("ForSequenceClassification") for a in archs) or config.num_labels != 1:
        raise RerankError(f"verifier={verifier}: architectures={archs}, num_labels={config.num_labels}; a "
                          "verifier is a *ForSequenceClassification with one output (a reward model export)")
    try:
        verifier_tok = tokenizer_identity(vdir)
    except DataError as err:
        raise RerankError(f"verifier={verifier}: {err}") from None
    if not same_tokenizer(policy_tok, verifier_tok):
        raise RerankError(f"verifier={verifier} has another tokenizer than policy={policy} (tokenizer.json "
                          f"sha256 {verifier_tok['sha256'][:12]} vs {policy_tok['sha256'][:12]}, vocab "
                          f"{verifier_tok['vocab_size']} vs {policy_tok['vocab_size']}); a verifier must "
                          "read the policy's tokens: train it from the same base")


def load_models(policy: str | Path, verifier: str | Path | None,
                device: torch.device) -> tuple[CausalLM, Any, SequenceScorer | None]:
    """(policy wrapped as CausalLM, its tokenizer, the verifier as a SequenceScorer or None), in eval mode."""
    from transformers import AutoModelForSequenceClassification

    model = CausalLM(load_causal_lm(policy, device=device)).to(device).eval()
    tokenizer = load_tokenizer(policy)
    scorer = None
    if verifier is not None:
        clf = AutoModelForSequenceClassification.from_pretrained(str(verifier), dtype=torch.float32)
        scorer = SequenceScorer.hf(clf).to(device).eval()
    return model, tokenizer, scorer


@torch.no_grad()
def sample_answers(policy: CausalLM, renderer: Renderer, prompt: str, settings: Settings,
                   seed: int) -> list[str]:
    """`settings.n` answers to one prompt, sampled as one batch with a generator seeded `seed`."""
    limit = policy.max_seq_len - settings.max_new_tokens
    if limit < 1:
        raise RerankError(f"max_new_tokens={settings.max_new_tokens} leaves no room for a prompt in the "
                          f"policy's {policy.max_seq_len} positions")
    if settings.plain:  # few-shot text as written: no chat template, no "user:" scaffold
        ids = renderer.tokenizer(prompt)["input_ids"][-limit:]
    else:
        ids = renderer.prompt([{"role": "user", "content": prompt}])[-limit:]
    device = next(policy.parameters()).device
    input_ids = torch.tensor([ids] * settings.n, dtype=torch.long, device=device)  # (N, T)
    generator = torch.Generator(device=device).manual_seed(seed)
    eos = renderer.tokenizer.eos_token_id
    out = generate(policy, input_ids, settings.max_new_tokens, temperature=settings.temperature,
                   top_k=settings.top_k, stop_tokens=[eos], generator=generator)  # (N, T + new)
    answers = []
    for row in out[:, len(ids):].tolist():
        cut = row.index(eos) if eos in row else len(row)
        text = renderer.tokenizer.decode(row[:cut], skip_special_tokens=True)
        cuts = [text.index(stop) for stop in settings.stop if stop in text]
        answers.append(text[:min(cuts)] if cuts else text)
    return answers


def verifier_inputs(renderer: Renderer, prompt: str, answers: Sequence[str]) -> dict[str, torch.Tensor]:
    """The (prompt, answer) pairs as reward training saw them: right-padded `collate_lm` inputs (N, T)."""
    user = {"role": "user", "content": prompt}
    examples = [renderer.example([user, {"role": "assistant", "content": a}], f"answer {i}")
                for i, a in enumerate(answers)]
    return collate_lm(examples, renderer.pad_id)


@torch.no_grad()
def score_answers(scorer: SequenceScorer, renderer: Renderer, prompt: str,
                  answers: Sequence[str]) -> list[float]:
    """The verifier's score of each answer to `prompt`, read at the last token of each pair."""
    device = next(scorer.parameters()).device
    batch = verifier_inputs(renderer, prompt, answers)
    scores = scorer(batch["input_ids"].to(device), position_ids=batch["position_ids"].to(device),
                    doc_ids=batch["doc_ids"].to(device))  # (N, 1)
    return scores[:, 0].tolist()


def view_metrics(rows: Sequence[dict[str, Any]], kinds: Sequence[str]) -> dict[str, dict[str, float]]:
    """`best_of_n`, `first` and `oracle` corpus metrics (percentages and count) of prediction rows."""
    def pick(row: dict[str, Any], view: str) -> dict[str, float]:
        per_answer = [a["metrics"] for a in row["answers"]]
        if view == "oracle":
            return {k: max(m[k] for m in per_answer) for k in per_answer[0]}  # rouge: rouge1, rouge2, ...
        return dict(per_answer[row["chosen"] if view == "best_of_n" else 0])

    return {view: summarize([pick(row, view) for row in rows]) for view in VIEWS}


def evaluate(items: Sequence[Item], policy: CausalLM, tokenizer: Any, scorer: SequenceScorer | None,
             settings: Settings) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """(metrics, prediction rows) of the policy's answers to `items`, reranked by `scorer` when N > 1."""
    check_settings(settings, scorer is not None)
    prompt_renderer = Renderer(tokenizer, policy.max_seq_len)
    answers = [sample_answers(policy, prompt_renderer, it.prompt, settings, settings.seed + i)
               for i, it in enumerate(items)]
    scores: list[list[float]] | None = None
    if scorer is not None:
        limit = getattr(scorer.model.config, "max_position_embeddings", None) or policy.max_seq_len
        pair_renderer = Renderer(tokenizer, int(limit))
        scores = [score_answers(scorer, pair_renderer, it.prompt, ans)
                  for it, ans in zip(items, answers, strict=True)]
    flat = [a for ans in answers for a in ans]
    refs = [it.references for it in items for _ in range(settings.n)]
    per_answer = evaluate_generations(flat, refs, settings.kinds, stem=settings.stem).rows
    rows: list[dict[str, Any]] = []
    for i, it in enumerate(items):
        entries = []
        for j in range(settings.n):
            scored = per_answer[i * settings.n + j]
            entry: dict[str, Any] = {"text": answers[i][j], "metrics": scored["metrics"]}
            if "extracted" in scored:
                entry["extracted"] = scored["extracted"]
            if scores is not None:
                entry["score"] = scores[i][j]
            entries.append(entry)
        chosen = 0 if scores is None else max(range(settings.n), key=lambda j, s=scores[i]: (s[j], -j))
        rows.append({"id": it.id, "prompt": it.prompt, "references": it.references,
                     "prediction": answers[i][chosen], "chosen": chosen,
                     "metrics": entries[chosen]["metrics"], "answers": entries})
    metrics: dict[str, Any] = {**view_metrics(rows, settings.kinds), "count": len(rows), "n": settings.n}
    if settings.labels:  # one answer per prompt: its label against the first reference
        predicted = [match_label(row["prediction"], settings.labels) for row in rows]
        for row, label in zip(rows, predicted):
            row["label"] = label
        metrics["classification"] = {**classification_metrics(predicted, [it.references[0] for it in items],
                                                               settings.labels), "labels": list(settings.labels)}
    if scores is not None:
        metrics["verifier_score_mean"] = sum(map(sum, scores)) / (len(items) * settings.n)
    return metrics, rows


def write_results(out_dir: str | Path, metrics: dict[str, Any],
                  rows: Sequence[dict[str, Any]]) -> tuple[Path, Path]:
    """`<out_dir>/metrics.json` and `<out_dir>/predictions.jsonl`; returns their paths."""
    out = Path(out_dir)
    preds = write_predictions(out / "predictions.jsonl", rows)
    path = out / "metrics.json"
    tmp = path.with_name(".metrics.json.tmp")
    tmp.write_text(json.dumps(metrics, indent=2, allow_nan=False) + "\n", encoding="utf-8")
    tmp.replace(path)
    return path, preds


def run(policy: str | Path, data: str | Path, settings: Settings, *, verifier: str | Path | None = None,
        out_dir: str | Path | None = None, device: torch.device | None = None) -> dict[str, Any]:
    """Check every input, load the models, evaluate and write metrics.json / predictions.jsonl to `out_dir`
    (default `<policy>/eval`); returns the metrics (with the settings under "settings")."""
    check_settings(settings, verifier is not None)
    items = read_items(data, settings.kinds, settings.labels)
    check_model_dirs(policy, verifier)
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, tokenizer, scorer = load_models(policy, verifier, device)
    try:
        metrics, rows = evaluate(items, model, tokenizer, scorer, settings)
    except EvalInputError as err:
        raise RerankError(str(err)) from None
    metrics["settings"] = {**asdict(settings), "kinds": list(settings.kinds), "stop": list(settings.stop),
                           "labels": list(settings.labels), "policy": str(policy),
                           "verifier": None if verifier is None else str(verifier), "data": str(data)}
    write_results(Path(out_dir) if out_dir is not None else Path(policy) / "eval", metrics, rows)
    return metrics
