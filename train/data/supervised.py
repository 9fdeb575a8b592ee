"""Supervised formats read from JSONL (or parquet): instruction / chat, preference pairs, classification.

Files: `supervised_files` resolves what the user names (files, directories walked recursively, globs) with
`train.data.inputs`: directories and globs give their `.jsonl` / `.json` / `.parquet` files in sorted order
(others are skipped and counted), a file named on its own is read as JSON lines unless it is `.parquet`, empty
files are skipped and counted, and a directory saved by `datasets` is refused. One JSON object per line (or
one parquet row):

- instruction: `{"prompt": str, "response": str}` or `{"messages": [{"role": ..., "content": ...}, ...]}`
  (roles system / user / assistant; every assistant message is a response);
- preference: `{"prompt": str, "chosen": str, "rejected": str}`;
- classification: `{"text": str, "label": int | str}`.

A line that is not JSON, not UTF-8 or misses a field is a `DataError` naming the file and line.

Rendering: with a tokenizer that has a chat template, prompts and conversations go through
`apply_chat_template`; the rendered text is split where each assistant response starts and ends (the
template must render a conversation's prefix as a prefix of the whole, else a clear error) and the pieces
are tokenized one by one, so the masks are exact: only response tokens (and the end-of-turn text the
template puts right after them) are trained. Without a template: `prompt + response + eos`, and messages
as `"{role}: {content}\\n"` lines with each assistant content (plus eos) trained.

Length: `max_len` is the model input length T; an example keeps its first T+1 tokens (the last one is
only a target). `max_prompt_len` cuts what precedes the first response from the left (its most recent
tokens are kept). An example left without a trained token (a prompt longer than the limit) is dropped and
reported with its file and line.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from train.data.collators import Example, collate_classification, collate_lm, collate_preference
from train.data.corpus import DataError, jsonl_rows
from train.data.inputs import JSON_SUFFIXES, PARQUET_SUFFIXES, InputError, ResolvedInputs, resolve_inputs

_log = logging.getLogger("tessera")
FORMATS = {"instruction": None, "preference": ("prompt", "chosen", "rejected"), "classification": ("text", "label"),
           "seq2seq": ("source", "target")}
"""Supported formats and their required fields (instruction: prompt + response, or messages)."""


def read_jsonl(path: Path | str) -> Iterator[tuple[str, dict[str, Any]]]:
    """(where, row) for every non-blank line; bad lines are DataErrors naming file and line."""
    path = Path(path)
    if not path.is_file() or path.stat().st_size == 0:
        raise DataError(f"{path}: {'is empty' if path.is_file() else 'does not exist'}; give a JSONL file")
    yield from jsonl_rows(path)


ROW_SUFFIXES = (*JSON_SUFFIXES, *PARQUET_SUFFIXES)
"""Suffixes of the files a supervised corpus takes from a directory or a glob."""


def supervised_files(files: Sequence[Path | str], where: str = "data.files") -> ResolvedInputs:
    """The files of a supervised corpus (see the module doc), in reading order; a missing path, an unmatched
    glob, a saved `datasets` directory or a list leaving no file is one InputError naming it."""
    found = resolve_inputs(files, where=where, accept=ROW_SUFFIXES)
    for path in found.paths:
        if path.is_dir():
            raise InputError(f"{where}: {path} is a dataset saved by `datasets` (save_to_disk); supervised corpora "
                             f"read {' / '.join(ROW_SUFFIXES)} files: write it out with `Dataset.to_json` or "
                             f"`Dataset.to_parquet`")
    return found


def read_rows(path: Path | str) -> Iterator[tuple[str, dict[str, Any]]]:
    """(where, row) of a JSON lines file, or of a parquet table (`.parquet`, where = `file:row N`)."""
    path = Path(path)
    if path.suffix.lower() not in PARQUET_SUFFIXES:
        yield from read_jsonl(path)
        return
    import pyarrow
    import pyarrow.parquet as pq

    try:
        table = pq.ParquetFile(path)
    except pyarrow.ArrowException as err:
        raise DataError(f"{path}: not a readable parquet file ({err}); rewrite it or convert it to JSONL") from None
    n = 0
    for batch in table.iter_batches():
        for row in batch.to_pylist():
            n += 1
            yield f"{path}:row {n}", row


def _require(row: dict[str, Any], where: str, fields: Sequence[str], kind: str) -> None:
    missing = [f for f in fields if f not in row]
    if missing:
        raise DataError(f"{where}: {kind} rows need {list(fields)}; missing {missing} (found {sorted(row)})")
    for f in fields:
        if f != "label" and not isinstance(row[f], str):
            raise DataError(f"{where}: field {f!r} holds {type(row[f]).__name__}, not a string")


def _messages(row: dict[str, Any], where: str) -> list[dict[str, str]]:
    if "messages" in row:
        msgs = row["messages"]
        ok = isinstance(msgs, list) and msgs and all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in msgs)
        if not ok:
            raise DataError(f"{where}: 'messages' must be a non-empty list of {{role: str, content: str}}")
        if not any(m["role"] == "assistant" for m in msgs):
            raise DataError(f"{where}: 'messages' has no assistant message to train on")
        return msgs
    _require(row, where, ("prompt", "response"), "instruction")
    return [{"role": "user", "content": row["prompt"]}, {"role": "assistant", "content": row["response"]}]


class Renderer:
    """Turns rows into token sequences with trained-token masks, for one tokenizer and length limit.

    tokenizer: a transformers tokenizer (its chat_template is used when it has one); max_len: model
    input length T; max_prompt_len: keep at most this many tokens before the first response (None: all).
    """

    def __init__(self, tokenizer: Any, max_len: int, max_prompt_len: int | None = None,
                 use_chat_template: bool = True) -> None:
        if max_len < 1 or (max_prompt_len is not None and max_prompt_len < 1):
            raise DataError(f"max_len={max_len} and max_prompt_len={max_prompt_len} must be >= 1")
        if tokenizer.eos_token_id is None:
            raise DataError("the tokenizer names no eos_token; set one in its tokenizer_config.json")
        self.tokenizer = tokenizer  # transformers tokenizer
        self.max_len = max_len  # T
        self.max_prompt_len = max_prompt_len  # left-truncation of the prompt part, or None
        self.templated = use_chat_template and bool(getattr(tokenizer, "chat_template", None))  # chat template?
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    def _encode(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"]) if text else []

    def _pieces(self, msgs: list[dict[str, str]], where: str) -> list[tuple[str, bool]]:
        """The conversation as (text, trained) pieces, in order."""
        if not self.templated:
            pieces: list[tuple[str, bool]] = []
            for m in msgs:
                if m["role"] == "assistant":
                    pieces += [("assistant: ", False), (m["content"], True), (self.tokenizer.eos_token, True),
                               ("\n", False)]
                else:
                    pieces.append((f"{m['role']}: {m['content']}\n", False))
            return pieces

        def render(part: list[dict[str, str]], gen: bool) -> str:
            return self.tokenizer.apply_chat_template(part, tokenize=False, add_generation_prompt=gen)

        full = render(msgs, False)
        pieces, done = [], 0
        for i, m in enumerate(msgs):
            if m["role"] != "assistant":
                continue
            before, upto = render(msgs[:i], True), render(msgs[: i + 1], False)
            if not (full.startswith(upto) and upto.startswith(before) and len(before) >= done):
                raise DataError(f"{where}: the tokenizer's chat template does not render a conversation's "
                                "beginning as the beginning of the whole; masks cannot be cut, pass "
                                "use_chat_template=False or fix the template")
            pieces += [(full[done : len(before)], False), (full[len(before) : len(upto)], True)]
            done = len(upto)
        return [*pieces, (full[done:], False)]

    def example(self, msgs: list[dict[str, str]], where: str) -> Example:
        """Tokens and masks of a conversation, truncated to the limits."""
        ids: list[int] = []
        trained: list[bool] = []
        for text, is_trained in self._pieces(msgs, where):
            piece = self._encode(text)
            ids += piece
            trained += [is_trained] * len(piece)
        first = trained.index(True) if True in trained else len(ids)
        if self.max_prompt_len is not None and first > self.max_prompt_len:
            cut = first - self.max_prompt_len
            ids, trained = ids[cut:], trained[cut:]
        keep = self.max_len + 1
        return Example(ids[:keep], trained[:keep], where)

    def instruction(self, row: dict[str, Any], where: str) -> Example:
        """An instruction or chat row."""
        return self.example(_messages(row, where), where)

    def preference(self, row: dict[str, Any], where: str) -> tuple[Example, Example]:
        """A preference row: (chosen, rejected), both after the same prompt."""
        _require(row, where, FORMATS["preference"], "preference")
        if row["chosen"] == row["rejected"]:
            raise DataError(f"{where}: chosen and rejected are the same text; a preference needs two different "
                            f"responses (drop the row)")
        user = {"role": "user", "content": row["prompt"]}
        return (self.example([user, {"role": "assistant", "content": row["chosen"]}], where),
                self.example([user, {"role": "assistant", "content": row["rejected"]}], where))

    def prompt(self, msgs: list[dict[str, str]]) -> list[int]:
        """Tokens of a prompt ready for generation (the template's assistant header included)."""
        if self.templated:
            text = self.tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        else:
            text = "".join(f"{m['role']}: {m['content']}\n" for m in msgs) + "assistant: "
        ids = self._encode(text)
        return ids[-self.max_len :]


class SupervisedDataset:
    """Rendered instruction or preference examples; `batch(indices)` gives trainer batches (instruction).

    Examples left without a trained token are dropped and reported (`dropped` holds their sources).
    """

    def __init__(self, paths: Sequence[Path | str], renderer: Renderer, kind: str = "instruction") -> None:
        if kind not in ("instruction", "preference"):
            raise DataError(f"kind={kind!r} must be 'instruction' or 'preference' (classification: ClassificationData)")
        self.renderer, self.kind = renderer, kind
        self.examples: list[Any] = []  # Example, or (chosen, rejected) pairs
        self.dropped: list[str] = []  # sources of examples with nothing to train on
        for path in supervised_files(paths).paths:
            for where, row in read_rows(path):
                item = renderer.instruction(row, where) if kind == "instruction" else renderer.preference(row, where)
                parts = item if isinstance(item, tuple) else (item,)
                if any(p.n_trained == 0 for p in parts):
                    self.dropped.append(where)
                else:
                    self.examples.append(item)
        if self.dropped:
            _log.warning("%d examples have no response token within max_len=%d (prompt too long) and are left out: "
                         "%s%s", len(self.dropped), renderer.max_len, ", ".join(self.dropped[:5]),
                         " ..." if len(self.dropped) > 5 else "")
        if not self.examples:
            raise DataError(f"{[str(p) for p in paths]}: no example keeps a response token within "
                            f"max_len={renderer.max_len}; raise max_len or set max_prompt_len")

    def __len__(self) -> int:
        return len(self.examples)

    def batch(self, indices: np.ndarray) -> Any:
        """Instruction examples `indices` as (input_ids, labels, {position_ids, doc_ids}), right-padded;
        preference pairs as `collate_preference`'s dict plus `index` (B,), the pairs' positions here."""
        picked = np.asarray(indices).tolist()
        if self.kind == "preference":
            out = collate_preference([self.examples[i] for i in picked], self.renderer.pad_id)
            return {**out, "index": torch.as_tensor(picked, dtype=torch.int64)}
        out = collate_lm([self.examples[i] for i in picked], self.renderer.pad_id)
        return out["input_ids"], out["labels"], {"position_ids": out["position_ids"], "doc_ids": out["doc_ids"]}


def read_classification(paths: Sequence[Path | str], tokenizer: Any, max_len: int,
                        label_names: Sequence[str] | None = None) -> tuple[list[tuple[list[int], int]], list[str]]:
    """(token ids, label id) rows and the label names; string labels map through `label_names`
    (default: their sorted set), integer labels must lie in [0, len(label_names)) when names are given."""
    rows: list[tuple[str, str, Any]] = []
    for path in supervised_files(paths).paths:
        for where, row in read_rows(path):
            _require(row, where, FORMATS["classification"], "classification")
            label = row["label"]
            if isinstance(label, bool) or not isinstance(label, (int, str)):
                raise DataError(f"{where}: label={label!r} must be an integer or a string")
            rows.append((where, row["text"], label))
    if not rows:
        raise DataError(f"{[str(p) for p in paths]}: no classification rows")
    names = list(label_names) if label_names is not None else sorted({str(x) for _, _, x in rows if isinstance(x, str)})
    out = []
    for where, text, label in rows:
        if isinstance(label, str):
            if label not in names:
                raise DataError(f"{where}: label={label!r} is not one of {names}")
            label = names.index(label)
        elif label < 0 or (names and label >= len(names)):
            raise DataError(f"{where}: label={label} is outside [0, {len(names) or 'inf'})")
        ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])[:max_len]
        if not ids:
            raise DataError(f"{where}: text is empty; drop the row")
        out.append((ids, int(label)))
    return out, names


class ClassificationDataset:
    """Rows of `read_classification`; `batch(indices)` gives `collate_classification`'s dict plus `index`."""

    def __init__(self, rows: list[tuple[list[int], int]], names: list[str], pad_id: int) -> None:
        self.rows, self.names, self.pad_id = rows, names, pad_id
        self.num_labels = max(len(names), max(label for _, label in rows) + 1)

    def __len__(self) -> int:
        return len(self.rows)

    def batch(self, indices: np.ndarray) -> dict[str, torch.Tensor]:
        picked = np.asarray(indices).tolist()
        out = collate_classification([self.rows[i] for i in picked], self.pad_id)
        return {**out, "index": torch.as_tensor(picked, dtype=torch.int64)}


class Seq2SeqDataset:
    """`{"source", "target"}` rows for an encoder-decoder: the source (cut to `max_len` tokens) is encoded, the
    target (cut to `max_target_len`, then eos) is decoded; `batch(indices)` gives input_ids, attention_mask
    (B, S), labels (B, T') with -100 padding, and `index`. Rows keep their texts for evaluation."""

    def __init__(self, paths: Sequence[Path | str], tokenizer: Any, max_len: int, max_target_len: int) -> None:
        if tokenizer.eos_token_id is None:
            raise DataError("the tokenizer names no eos_token; set one in its tokenizer_config.json")
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.rows: list[tuple[list[int], list[int]]] = []
        self.texts: list[tuple[str, str]] = []
        for path in supervised_files(paths).paths:
            for where, row in read_rows(path):
                _require(row, where, FORMATS["seq2seq"], "seq2seq")
                source = list(tokenizer(row["source"], add_special_tokens=False)["input_ids"])[:max_len]
                target = list(tokenizer(row["target"], add_special_tokens=False)["input_ids"])[:max_target_len]
                if not source or not target:
                    raise DataError(f"{where}: {'source' if not source else 'target'} is empty; drop the row")
                self.rows.append((source, [*target, tokenizer.eos_token_id]))
                self.texts.append((row["source"], row["target"]))
        if not self.rows:
            raise DataError(f"{[str(p) for p in paths]}: no seq2seq rows")

    def __len__(self) -> int:
        return len(self.rows)

    def batch(self, indices: np.ndarray) -> dict[str, torch.Tensor]:
        picked = np.asarray(indices).tolist()
        sources, targets = zip(*(self.rows[i] for i in picked), strict=True)
        width, t_width = max(map(len, sources)), max(map(len, targets))
        ids = torch.full((len(picked), width), self.pad_id, dtype=torch.int64)
        mask = torch.zeros(len(picked), width, dtype=torch.int64)
        labels = torch.full((len(picked), t_width), -100, dtype=torch.int64)
        for b, (src, tgt) in enumerate(zip(sources, targets, strict=True)):
            ids[b, : len(src)], mask[b, : len(src)] = torch.as_tensor(src), 1
            labels[b, : len(tgt)] = torch.as_tensor(tgt)
        return {"input_ids": ids, "attention_mask": mask, "labels": labels,
                "index": torch.as_tensor(picked, dtype=torch.int64)}
