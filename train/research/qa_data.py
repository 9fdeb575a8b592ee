"""Extractive QA data for the soft-prompt recipe: SQuAD-format files or a synthetic set, rendered once per base.

``render`` is the one preprocessing function: training, every evaluation mode and the baselines read what it
returns, so evaluation cannot drift from training. The prompt puts the question before the context, so the
truncated baseline (the prompt's first M tokens) keeps the question.
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from train.data.corpus import DataError

ENCODER_PAD, ENCODER_BYTES = 256, 257  # byte-level encoder ids: 0-255 bytes, 256 padding


@dataclass(frozen=True)
class QAExample:
    qid: str
    context: str
    question: str
    answers: tuple[str, ...]  # gold answers; the first is the training target

    @property
    def prompt(self) -> str:
        return f"Question: {self.question}\nContext: {self.context}"


def _answers(value: Any, where: str) -> tuple[str, ...]:
    if isinstance(value, dict):  # SQuAD: {"text": [...], "answer_start": [...]}
        value = value.get("text", [])
    if isinstance(value, str):
        value = [value]
    if isinstance(value, list):  # SQuAD JSON: [{"text": ..., "answer_start": ...}, ...]
        value = [a.get("text") if isinstance(a, dict) else a for a in value]
    if not isinstance(value, list) or not all(isinstance(a, str) for a in value):
        raise DataError(f"{where}: 'answers' must be a string, a list of strings or {{'text': [...]}}")
    return tuple(a.strip() for a in value if a.strip())


def read_qa(files: Sequence[str | Path]) -> list[QAExample]:
    """SQuAD v1/v2 JSON ({"data": [{"paragraphs": [{"context", "qas": [...]}]}]}) or JSONL rows {"context",
    "question", "answers"[, "id"]}; questions without an answer are skipped."""
    out: list[QAExample] = []
    for file in files:
        path = Path(file)
        if not path.is_file():
            raise DataError(f"data.files: {path} does not exist")
        text = path.read_text(encoding="utf-8")
        if path.suffix == ".json":
            try:
                articles = json.loads(text)["data"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise DataError(f"{path}: not SQuAD JSON with a top-level 'data' list ({e})") from None
            for a, article in enumerate(articles):
                for p, para in enumerate(article.get("paragraphs", [])):
                    for q in para.get("qas", []):
                        answers = _answers(q.get("answers", []), f"{path}: data[{a}].paragraphs[{p}]")
                        if answers:
                            out.append(QAExample(str(q.get("id", len(out))), para["context"], q["question"], answers))
            continue
        for line_no, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                context, question = row["context"], row["question"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise DataError(f"{path}:{line_no}: expected a JSON object with 'context', 'question' and "
                                f"'answers' ({e})") from None
            answers = _answers(row.get("answers", []), f"{path}:{line_no}")
            if answers:
                out.append(QAExample(str(row.get("id", len(out))), context, question, answers))
    if not out:
        raise DataError(f"data.files={list(map(str, files))}: no question with an answer")
    return out


NAMES = ["Alice", "Bob", "Carol", "Dave", "Erin", "Frank", "Grace", "Heidi"]
PLACES = ["Paris", "Rome", "Oslo", "Lima", "Cairo", "Delhi", "Tokyo", "Quito"]


def synthetic_qa(n: int, seed: int = 0) -> list[QAExample]:
    """Learnable extractive QA: a context says where three people live; the question asks about one of them."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        people = rng.sample(NAMES, 3)
        places = rng.sample(PLACES, 3)
        context = " ".join(f"{p} lives in {c}." for p, c in zip(people, places, strict=True))
        k = rng.randrange(3)
        out.append(QAExample(f"syn-{i}", context, f"Where does {people[k]} live?", (places[k],)))
    return out


def render(example: QAExample, tokenizer: Any, *, max_prompt_tokens: int, max_answer_tokens: int,
           anchor: str) -> dict[str, list[int]]:
    """Token ids of the prompt (its first ``max_prompt_tokens``), of the anchor text, and of the answer (a leading
    space, then eos), for one base's tokenizer."""
    prompt = tokenizer.encode(example.prompt, add_special_tokens=False)[:max_prompt_tokens]
    answer = tokenizer.encode(" " + example.answers[0], add_special_tokens=False)[:max_answer_tokens]
    eos = tokenizer.eos_token_id
    return {"prompt": prompt, "anchor": tokenizer.encode(anchor, add_special_tokens=False) if anchor else [],
            "answer": answer + ([eos] if eos is not None else [])}


def encoder_ids(example: QAExample, tokenizer: Any | None, max_len: int) -> list[int]:
    """The encoder's input: the prompt's UTF-8 bytes, or (with a tokenizer) the first base's prompt tokens."""
    if tokenizer is None:
        return list(example.prompt.encode("utf-8"))[:max_len]
    return tokenizer.encode(example.prompt, add_special_tokens=False)[:max_len]


def _pad(rows: Sequence[Sequence[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded (B, L) ids and their (B, L) mask (1 = real)."""
    width = max(1, max(len(r) for r in rows))
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, :len(r)] = torch.tensor(r, dtype=torch.long)
        mask[i, :len(r)] = 1
    return ids, mask


class QADataset:
    """Every example rendered for every base; ``batch(indices)`` pads them into the recipe's tensors.

    Keys: ``index``; ``enc_ids`` / ``enc_mask`` (the encoder's input); per base b: ``prompt_b`` /
    ``prompt_mask_b``, ``anchor_b`` / ``anchor_mask_b``, ``answer_b`` / ``answer_mask_b``.
    """

    def __init__(self, examples: Sequence[QAExample], tokenizers: Sequence[Any], *, encoder_tokenizer: Any | None,
                 max_prompt_tokens: int, max_answer_tokens: int, max_encoder_len: int, anchor: str) -> None:
        self.examples = list(examples)
        self.pads = [t.pad_token_id if t.pad_token_id is not None else t.eos_token_id for t in tokenizers]
        self.rendered = [[render(e, t, max_prompt_tokens=max_prompt_tokens, max_answer_tokens=max_answer_tokens,
                                 anchor=anchor) for e in self.examples] for t in tokenizers]
        self.enc_pad = ENCODER_PAD if encoder_tokenizer is None else self.pads[0]
        self.encoded = [encoder_ids(e, encoder_tokenizer, max_encoder_len) for e in self.examples]

    def __len__(self) -> int:
        return len(self.examples)

    def batch(self, indices: Sequence[int]) -> dict[str, torch.Tensor]:
        out = {"index": torch.tensor(list(indices), dtype=torch.long)}
        out["enc_ids"], out["enc_mask"] = _pad([self.encoded[i] for i in indices], self.enc_pad)
        for b, rows in enumerate(self.rendered):
            for key in ("prompt", "anchor", "answer"):
                out[f"{key}_{b}"], out[f"{key}_mask_{b}"] = _pad([rows[i][key] for i in indices], self.pads[b])
        return out

    def prompt_tokens(self, base: int = 0) -> float:
        """Mean prompt length in tokens of ``base`` (for the compression ratio)."""
        return sum(len(r["prompt"]) for r in self.rendered[base]) / max(1, len(self))
