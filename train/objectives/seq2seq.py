"""Encoder-decoder fine-tuning (e.g. T5-style summarisation): token cross-entropy on the target, ROUGE on
greedy generations at every evaluation.

The batches are `train.data.supervised.Seq2SeqDataset`'s; the model is `model.hf_causal.Seq2SeqLM`. An
evaluation reports the token-weighted `val_loss` / `val_ppl` and `val_rouge1` / `val_rouge2` / `val_rougeL`
(percent) of greedy generations against the targets; rank 0 writes the predictions to
``<out_dir>/predictions/eval_step_N.jsonl``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from train.data.sampler import FILLER_INDEX
from train.eval import TokenLoss, evaluate_generations, predictions_path, write_predictions
from train.objectives.lm import Objective, dp_group, lm_loss


def _on(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def _token_losses(engine: Any, b: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of target-token losses, number of target tokens) of one batch."""
    logits = engine(b["input_ids"], attention_mask=b["attention_mask"], labels=b["labels"])  # (B, T', V)
    return lm_loss(logits, b["labels"], reduction="sum"), (b["labels"] != -100).sum()


class Seq2SeqObjective(Objective):
    def __init__(self, dataset: Any, tokenizer: Any, *, max_new_tokens: int, zero3: bool,
                 out_dir: Path | None, rank: int) -> None:
        super().__init__()
        self.dataset, self.tokenizer, self.max_new_tokens = dataset, tokenizer, max_new_tokens
        self.zero3, self.out_dir, self.rank = zero3, out_dir, rank

    def loss(self, engine: Any, batch: Any,
             device: torch.device) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        total, n = _token_losses(engine, _on(batch, device))
        return self.moe.add(engine, total / n.clamp(min=1))  # (no native MoE layers in an HF encoder-decoder)

    @torch.no_grad()
    def evaluate(self, engine: Any, batches: Callable[[], Iterator[Any]], device: torch.device,
                 step: int | None = None) -> dict[str, float]:
        engine.eval()
        totals = TokenLoss(device)
        mine: list[tuple[int, str]] = []  # (example index, generated target)
        for batch in batches():
            b = _on(batch, device)
            totals.add(*_token_losses(engine, b))
            # every rank generates for as many batches as the others (ZeRO-3 gathers weights collectively)
            out = engine.module.generate(b["input_ids"], b["attention_mask"], self.max_new_tokens,
                                         synced_gpus=self.zero3)
            texts = self.tokenizer.batch_decode(out, skip_special_tokens=True)
            mine += [r for r in zip(b["index"].tolist(), texts, strict=True) if r[0] != FILLER_INDEX]
        engine.train()
        group = dp_group(engine)  # the ranks of a tensor-parallel group hold the same rows and sums
        totals = totals.all_reduce(group)
        gathered: list[Any] = [None] * dist.get_world_size(group)
        dist.all_gather_object(gathered, mine, group=group)
        rows = sorted(r for part in gathered for r in part)
        result = {"val_loss": totals.mean_loss, "val_ppl": totals.perplexity}
        if rows:
            sources = [self.dataset.texts[i][0] for i, _ in rows]
            refs = [self.dataset.texts[i][1] for i, _ in rows]
            scored = evaluate_generations([t for _, t in rows], refs, kinds=("rouge",),
                                          ids=[i for i, _ in rows], prompts=sources)
            result |= {f"val_{k}": v for k, v in scored.metrics.items() if k.startswith("rouge")}
            if self.rank == 0 and self.out_dir is not None and step is not None:
                write_predictions(predictions_path(self.out_dir, step), scored.rows)
        return result
