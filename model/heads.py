"""Sequence-level heads on a decoder: reward / verifier scores and class logits read at the last real token.

    scorer = SequenceScorer.native(transformer, n_out=1)            # a Tessera model, its LM head dropped
    scorer = SequenceScorer.hf(AutoModelForSequenceClassification.from_pretrained(path, num_labels=3))
    out = scorer(input_ids, position_ids=..., doc_ids=...)          # (B, n_out)

A causal decoder's summary of a sequence is its hidden state at the last real token that is not the pad token:
`doc_ids` follows the collators' convention (0: a real token, else padding), and a trailing token equal to
`pad_id` (an eos that doubles as the pad token) is skipped as well. That is the position transformers'
`*ForSequenceClassification` reads, so an exported model scores exactly as it trained. An HF model keeps its own
`score` head and its config's `pad_token_id`.
"""

from __future__ import annotations

import torch
from torch import nn

from model.model import Transformer


def last_real_index(doc_ids: torch.Tensor | None, input_ids: torch.Tensor, pad_id: int | None = None) -> torch.Tensor:
    """(B,) position of each row's last real token other than ``pad_id`` (0 when there is none)."""
    real = torch.ones_like(input_ids, dtype=torch.bool) if doc_ids is None else doc_ids == 0  # (B, T)
    if pad_id is not None:
        real &= input_ids != pad_id
    positions = torch.arange(input_ids.shape[1], device=input_ids.device)
    return (positions * real).argmax(-1)


class SequenceScorer(nn.Module):
    """A decoder body and a linear head over its hidden state at each row's last real token: (B, T) -> (B, n_out)."""

    def __init__(self, model: nn.Module, *, kind: str, n_out: int, pad_id: int | None) -> None:
        super().__init__()
        self.model = model  # the Transformer (with `score`), or the HF *ForSequenceClassification (or PEFT) model
        self.kind, self.n_out, self.pad_id = kind, n_out, pad_id

    @classmethod
    def native(cls, transformer: Transformer, n_out: int, *, pad_id: int | None, init_std: float = 0.02
               ) -> SequenceScorer:
        """Drop the LM head (its forward then returns hidden states) and add ``score`` (dim -> n_out)."""
        transformer.lm_head = None
        transformer.score = nn.Linear(transformer.args.dim, n_out, bias=False,
                                      device=transformer.embed_tokens.weight.device,
                                      dtype=transformer.embed_tokens.weight.dtype)
        nn.init.normal_(transformer.score.weight, std=init_std)
        return cls(transformer, kind="native", n_out=n_out, pad_id=pad_id)

    @classmethod
    def hf(cls, model: nn.Module) -> SequenceScorer:
        """An HF ``*ForSequenceClassification`` model (its ``num_labels`` outputs), or a PEFT model around one."""
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        return cls(model, kind="hf", n_out=int(base.config.num_labels), pad_id=base.config.pad_token_id)

    def _hf_parts(self) -> tuple[nn.Module, nn.Module]:
        base = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
        return base.base_model, base.score

    def forward(self, input_ids: torch.Tensor, *, position_ids: torch.Tensor | None = None,
                doc_ids: torch.Tensor | None = None) -> torch.Tensor:
        last = last_real_index(doc_ids, input_ids, self.pad_id)  # (B,)
        rows = torch.arange(input_ids.shape[0], device=input_ids.device)
        if self.kind == "native":
            h = self.model(input_ids, position_ids=position_ids, doc_ids=doc_ids)  # (B, T, dim): no LM head
            return self.model.score(h[rows, last]).float()  # (B, n_out)
        body, score = self._hf_parts()
        mask = None if doc_ids is None else (doc_ids == 0).long()
        h = body(input_ids=input_ids, position_ids=position_ids, attention_mask=mask).last_hidden_state
        return score(h[rows, last]).float()  # (B, n_out)

