"""Reward / verifier models and classifiers: objectives over a `model.heads.SequenceScorer`.

- ``reward`` on preference pairs (``data.corpus: preference``): the Bradley-Terry loss -log sigmoid(r_c - r_r);
  logged: accuracy (r_c > r_r) and margin (r_c - r_r);
- ``reward`` on labelled solutions (``data.corpus: classification`` with labels 0 / 1, e.g. incorrect / correct
  answers): binary cross-entropy on the score (a verifier); logged: accuracy and F1 of score > 0;
- ``classify`` (``data.corpus: classification``): cross-entropy over the classes; logged: accuracy, macro-F1
  (and F1 of class 1 with two classes).

Evaluations gather the predictions of every data-parallel rank (each example once, fillers dropped), compute
the metrics with `train.eval`, and rank 0 writes the predictions to ``<out_dir>/predictions/eval_step_N.jsonl``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

from train.data.sampler import FILLER_INDEX
from train.eval import classification_metrics, predictions_path, write_predictions
from train.objectives.lm import Objective, dp_group


def _on(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def _score(engine: Any, ids: torch.Tensor, pos: torch.Tensor, doc: torch.Tensor) -> torch.Tensor:
    return engine(ids, position_ids=pos, doc_ids=doc)  # (B, n_out)


class ScoreObjective(Objective):
    """mode: 'pairwise' (reward on preference pairs), 'pointwise' (verifier, labels 0/1) or 'classify'."""

    def __init__(self, mode: str, *, num_labels: int, out_dir: Path | None = None, rank: int = 0) -> None:
        super().__init__()
        if mode not in ("pairwise", "pointwise", "classify"):
            raise ValueError(f"mode={mode!r}: use 'pairwise', 'pointwise' or 'classify'")
        self.mode, self.num_labels, self.out_dir, self.rank = mode, num_labels, out_dir, rank

    def _outputs(self, engine: Any, batch: Any, device: torch.device) -> tuple[torch.Tensor, ...]:
        """(per-example loss, prediction, label-or-margin, example index) of one micro-batch."""
        b = _on(batch, device)
        if self.mode == "pairwise":
            ids = torch.cat([b["chosen_input_ids"], b["rejected_input_ids"]])
            pos = torch.cat([b["chosen_position_ids"], b["rejected_position_ids"]])
            doc = torch.cat([b["chosen_doc_ids"], b["rejected_doc_ids"]])
            rc, rr = _score(engine, ids, pos, doc)[:, 0].chunk(2)
            margin = rc - rr
            return -F.logsigmoid(margin), (margin > 0).long(), margin, b["index"]
        out = _score(engine, b["input_ids"], b["position_ids"], b["doc_ids"])
        labels = b["labels"]
        if self.mode == "pointwise":
            s = out[:, 0]
            loss = F.binary_cross_entropy_with_logits(s, labels.float(), reduction="none")
            return loss, (s > 0).long(), labels, b["index"]
        return F.cross_entropy(out, labels, reduction="none"), out.argmax(-1), labels, b["index"]

    def loss(self, engine: Any, batch: Any, device: torch.device) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        losses, pred, target, _ = self._outputs(engine, batch, device)
        if self.mode == "pairwise":
            terms = {"accuracy": pred.float().mean().detach(), "margin": target.mean().detach()}
        else:
            terms = {"accuracy": (pred == target).float().mean().detach()}
        loss, moe_terms = self.moe.add(engine, losses.mean())  # router losses of an MoE body
        return loss, terms | moe_terms

    @torch.no_grad()
    def evaluate(self, engine: Any, batches: Callable[[], Iterator[Any]], device: torch.device,
                 step: int | None = None) -> dict[str, float]:
        rows: list[tuple[int, float, int, float]] = []  # (index, loss, prediction, label or margin)
        engine.eval()
        for batch in batches():
            losses, pred, target, index = self._outputs(engine, batch, device)
            rows += [r for r in zip(index.tolist(), losses.tolist(), pred.tolist(), target.tolist(), strict=True)
                     if r[0] != FILLER_INDEX]  # a filler batch's rows are no examples
        engine.train()
        group = dp_group(engine)  # the ranks of a tensor-parallel group hold the same rows
        gathered: list[Any] = [None] * dist.get_world_size(group)
        dist.all_gather_object(gathered, rows, group=group)
        rows = sorted(r for part in gathered for r in part)
        n = max(len(rows), 1)
        result = {"val_loss": sum(r[1] for r in rows) / n}
        if self.mode == "pairwise":
            result |= {"val_accuracy": sum(r[2] for r in rows) / n, "val_margin": sum(r[3] for r in rows) / n}
        else:
            preds, labels = [r[2] for r in rows], [int(r[3]) for r in rows]
            m = classification_metrics(preds, labels, max(self.num_labels, 2))
            result |= {"val_accuracy": m.accuracy, "val_macro_f1": m.macro_f1}
            if m.binary_f1 is not None:
                result["val_f1"] = m.binary_f1
        if self.rank == 0 and self.out_dir is not None and step is not None:
            keys = ("index", "loss", "prediction", "margin" if self.mode == "pairwise" else "label")
            write_predictions(predictions_path(self.out_dir, step), [dict(zip(keys, r, strict=True)) for r in rows])
        return result
