"""Padding supervised examples into batches whose labels train on response tokens only.

An `Example` is a token sequence plus, per token, whether predicting it is trained (a response
token) or not (prompt, template scaffolding). Batches follow the pretraining convention: `labels[b, t]`
is the target of position t, i.e. the *next* token `input_ids[b, t+1]` when that one is trained,
else -100; padding is always -100.

Padding side is chosen per purpose: teacher forcing pads on the right (`side="right"`), generation
pads prompts on the left (`side="left"`, so every prompt ends where generation starts). Either way
the batch carries what keeps attention off the padding:

- `attention_mask` (B, T): 1 on real tokens (what Hugging Face models take);
- `doc_ids` (B, T): 0 on the real tokens and 1 on padding (what Tessera's model takes: attention
  stays within a doc id, so real tokens never see padding);
- `position_ids` (B, T): 0 at the first real token, counting up (padding repeats the nearest value).

A batch in which no label is trained is an error naming its examples (`EmptyLabelsError`): it is
never trained on silently. `SupervisedDataset` drops such examples when it reads them, with a warning.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from train.data.corpus import DataError

IGNORE_INDEX = -100
"""Label value the loss skips."""
_SIDES = ("right", "left")


class EmptyLabelsError(DataError):
    """A batch whose labels are all -100: nothing in it would be trained."""


@dataclass(frozen=True)
class Example:
    """A tokenized supervised example."""

    ids: list[int]  # the whole sequence: prompt, scaffolding and response tokens
    trained: list[bool]  # per token: True where predicting this token is trained on
    source: str  # where it came from, "file:line"

    @property
    def n_trained(self) -> int:
        """How many tokens are trained on (the first token never is: nothing predicts it)."""
        return sum(self.trained[1:])


def _check_side(side: str) -> None:
    if side not in _SIDES:
        raise DataError(f"padding side={side!r} must be 'right' (teacher forcing) or 'left' (generation)")


def _pad_rows(rows: Sequence[Sequence[int]], width: int, value: int, side: str) -> torch.Tensor:
    """Rows padded with `value` to (B, width) int64, on `side`."""
    out = torch.full((len(rows), width), value, dtype=torch.int64)
    for b, row in enumerate(rows):
        if row:
            t = torch.as_tensor(row, dtype=torch.int64)
            if side == "right":
                out[b, : len(row)] = t
            else:
                out[b, width - len(row) :] = t
    return out


def _masks(lengths: Sequence[int], width: int, side: str) -> dict[str, torch.Tensor]:
    """attention_mask, doc_ids and position_ids (each (B, width)) for rows of `lengths` real tokens."""
    col = torch.arange(width).expand(len(lengths), width)  # (B, W)
    n = torch.as_tensor(list(lengths), dtype=torch.int64)[:, None]  # (B, 1)
    real = col < n if side == "right" else col >= width - n  # (B, W)
    first = 0 if side == "right" else width - n  # (B, 1) or scalar: where the real tokens start
    positions = (col - first).clamp(min=0)
    if side == "right":
        positions = positions.minimum((n - 1).clamp(min=0))
    return {"attention_mask": real.long(), "doc_ids": (~real).long(), "position_ids": positions}


def collate_lm(examples: Sequence[Example], pad_id: int, *, side: str = "right") -> dict[str, torch.Tensor]:
    """Teacher-forcing batch: input_ids, labels, attention_mask, doc_ids, position_ids, each (B, T).

    T is the longest example minus one (its last token is only a target).
    """
    _check_side(side)
    if not examples:
        raise DataError("an empty batch: give at least one example")
    inputs = [e.ids[:-1] for e in examples]
    targets = [[tok if tr else IGNORE_INDEX for tok, tr in zip(e.ids[1:], e.trained[1:], strict=True)]
               for e in examples]
    width = max(len(r) for r in inputs)
    labels = _pad_rows(targets, width, IGNORE_INDEX, side)
    if not (labels != IGNORE_INDEX).any():
        raise EmptyLabelsError(
            f"a batch of {len(examples)} examples ({', '.join(e.source for e in examples[:4])}"
            f"{', ...' if len(examples) > 4 else ''}) has no response token to train on (all labels -100): "
            "raise the length limit or fix the examples"
        )
    return {"input_ids": _pad_rows(inputs, width, pad_id, side), "labels": labels,
            **_masks([len(r) for r in inputs], width, side)}


def collate_prompts(prompts: Sequence[Sequence[int]], pad_id: int, *, side: str = "left") -> dict[str, torch.Tensor]:
    """Generation batch of prompts: input_ids, attention_mask, doc_ids, position_ids (B, T), left-padded by default."""
    _check_side(side)
    if not prompts:
        raise DataError("an empty batch: give at least one prompt")
    width = max(len(p) for p in prompts)
    return {"input_ids": _pad_rows(prompts, width, pad_id, side), **_masks([len(p) for p in prompts], width, side)}


def collate_preference(
    pairs: Sequence[tuple[Example, Example]], pad_id: int, *, side: str = "right"
) -> dict[str, torch.Tensor]:
    """Preference batch: chosen_* and rejected_* teacher-forcing tensors (as `collate_lm`), one width for both,
    so the two halves can go through the model as one (2B, T) batch."""
    both = collate_lm([c for c, _ in pairs] + [r for _, r in pairs], pad_id, side=side)  # (2B, T) each
    n = len(pairs)
    return {f"{name}_{k}": v[part] for k, v in both.items()
            for name, part in (("chosen", slice(0, n)), ("rejected", slice(n, None)))}


def collate_classification(
    rows: Sequence[tuple[list[int], int]], pad_id: int, *, side: str = "right"
) -> dict[str, torch.Tensor]:
    """Classification batch: input_ids, attention_mask, doc_ids, position_ids (B, T), labels (B,), and
    last_index (B,), the position of each row's last real token (where a causal model's summary is)."""
    _check_side(side)
    if not rows:
        raise DataError("an empty batch: give at least one example")
    width = max(len(ids) for ids, _ in rows)
    lengths = [len(ids) for ids, _ in rows]
    last = [n - 1 if side == "right" else width - 1 for n in lengths]
    return {"input_ids": _pad_rows([ids for ids, _ in rows], width, pad_id, side),
            "labels": torch.as_tensor([label for _, label in rows], dtype=torch.int64),
            "last_index": torch.as_tensor(last, dtype=torch.int64), **_masks(lengths, width, side)}
