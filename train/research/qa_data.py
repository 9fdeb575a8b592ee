"""Extractive QA data for the soft-prompt recipe: SQuAD-format files or a synthetic set, rendered once per base.

``render`` is the one preprocessing function: training, every evaluation mode and the baselines read what it
returns, so evaluation cannot drift from training. The prompt puts the question before the context, so the
truncated baseline (the prompt's first M tokens) keeps the question. An instruct base reads it in its own format
(``scaffold``): its BOS and chat template frame the prompt, the latents or the truncated prompt alike.
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


_SLOT = "\x00QA-PROMPT\x00"  # stands for the prompt while the chat template is rendered around it


@dataclass(frozen=True)
class Scaffold:
    """What a base's own format puts around the prompt: ``head`` (BOS and the chat template's text before the
    user's message) and ``tail`` (the template's text after it, up to the assistant's answer). Empty for a base
    with neither, or with ``chat=False``."""

    head: tuple[int, ...] = ()
    tail: str = ""

    @property
    def chat(self) -> bool:
        return bool(self.tail)


def scaffold(tokenizer: Any, *, chat: bool = True) -> Scaffold:
    """The base's BOS (when its tokenizer puts one before text) and chat template (when it has one), as the
    prompt's frame; ``chat=False``: plain text."""
    if not chat:
        return Scaffold()
    bos = tokenizer.bos_token_id
    probe = tokenizer.encode("a", add_special_tokens=True)
    head: list[int] = [bos] if bos is not None and probe[:1] == [bos] else []
    tail = ""
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template([{"role": "user", "content": _SLOT}], add_generation_prompt=True,
                                             tokenize=False)
        before, _, tail = text.partition(_SLOT)
        if head and tokenizer.bos_token and before.startswith(tokenizer.bos_token):
            head = []  # the template writes its own BOS
        head += tokenizer.encode(before, add_special_tokens=False) if before else []
    return Scaffold(tuple(head), tail)


def render(example: QAExample, tokenizer: Any, *, max_prompt_tokens: int, max_answer_tokens: int,
           anchor: str, frame: Scaffold = Scaffold()) -> dict[str, list[int]]:
    """Token ids of the frame's head, of the prompt (its first ``max_prompt_tokens``), of the anchor text (with the
    chat template's text after the user's message), and of the answer (then eos), for one base's tokenizer. The
    answer has a leading space in plain text, none as a chat answer."""
    prompt = tokenizer.encode(example.prompt, add_special_tokens=False)[:max_prompt_tokens]
    answer_text = example.answers[0] if frame.chat else " " + example.answers[0]
    answer = tokenizer.encode(answer_text, add_special_tokens=False)[:max_answer_tokens]
    eos = tokenizer.eos_token_id
    after = anchor + frame.tail
    return {"head": list(frame.head), "prompt": prompt,
            "anchor": tokenizer.encode(after, add_special_tokens=False) if after else [],
            "answer": answer + ([eos] if eos is not None else [])}


def cut_at_stop(text: str, stop: Sequence[str]) -> str:
    """A generated answer up to the first stop string (leading whitespace skipped first), stripped."""
    text = text.lstrip()
    for s in stop:
        if s and s in text:
            text = text[:text.index(s)]
    return text.strip()


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

    Keys: ``index``; ``enc_ids`` / ``enc_mask`` (the encoder's input); per base b: ``head_b`` (only when the base
    has a BOS or chat template: the same ids on every row), ``prompt_b`` /
    ``prompt_mask_b``, ``anchor_b`` / ``anchor_mask_b``, ``answer_b`` / ``answer_mask_b``.
    """

    def __init__(self, examples: Sequence[QAExample], tokenizers: Sequence[Any], *, encoder_tokenizer: Any | None,
                 max_prompt_tokens: int, max_answer_tokens: int, max_encoder_len: int, anchor: str,
                 chat: bool = True) -> None:
        self.examples = list(examples)
        self.pads = [t.pad_token_id if t.pad_token_id is not None else t.eos_token_id for t in tokenizers]
        self.frames = [scaffold(t, chat=chat) for t in tokenizers]
        self.rendered = [[render(e, t, max_prompt_tokens=max_prompt_tokens, max_answer_tokens=max_answer_tokens,
                                 anchor=anchor, frame=f) for e in self.examples]
                         for t, f in zip(tokenizers, self.frames, strict=True)]
        self.enc_pad = ENCODER_PAD if encoder_tokenizer is None else self.pads[0]
        self.encoded = [encoder_ids(e, encoder_tokenizer, max_encoder_len) for e in self.examples]

    def __len__(self) -> int:
        return len(self.examples)

    def batch(self, indices: Sequence[int]) -> dict[str, torch.Tensor]:
        out = {"index": torch.tensor(list(indices), dtype=torch.long)}
        out["enc_ids"], out["enc_mask"] = _pad([self.encoded[i] for i in indices], self.enc_pad)
        for b, rows in enumerate(self.rendered):
            if self.frames[b].head:  # the same for every example: (B, H), no padding
                out[f"head_{b}"] = torch.tensor([list(self.frames[b].head)] * len(indices), dtype=torch.long)
            for key in ("prompt", "anchor", "answer"):
                out[f"{key}_{b}"], out[f"{key}_mask_{b}"] = _pad([rows[i][key] for i in indices], self.pads[b])
        return out

    def prompt_tokens(self, base: int = 0) -> float:
        """Mean prompt length in tokens of ``base`` (for the compression ratio)."""
        return sum(len(r["prompt"]) for r in self.rendered[base]) / max(1, len(self))
