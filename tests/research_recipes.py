"""Research recipes used by the tests, loaded by name like a user's own (``research.recipe: tests.research_recipes:X``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from train.research.api import Extension, Term, outputs


@dataclass
class RatioOptions:
    nan_after: int = 4  # training forwards after which the 'ratio' term turns NaN


class NaNRatio(Extension):
    """A logit bias with a log-ratio term that becomes NaN after ``nan_after`` training forwards."""

    Options = RatioOptions
    terms: ClassVar[dict[str, Term]] = {"lm": Term(), "ratio": Term(0.1)}

    def setup(self) -> None:
        self.bias = nn.Parameter(torch.zeros(self.ctx.vocab_size))
        self.calls = 0

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, Any]:
        logits = self.base(batch["input_ids"]) + self.bias
        if self.training:
            self.calls += 1
        shift = -2.0 if self.training and self.calls > self.options.nan_after else 1.0
        ratio = torch.log(self.bias.square().mean() + shift)  # log of a negative number: NaN
        return outputs({"lm": self.ctx.lm_loss(logits, batch["labels"]), "ratio": ratio}, logits=logits)


class NotScalar(Extension):
    """A term that forgot its reduction."""

    terms: ClassVar[dict[str, Term]] = {"lm": Term(), "per_token": Term(1.0)}

    def setup(self) -> None:
        self.scale = nn.Parameter(torch.ones(1))

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, Any]:
        logits = self.base(batch["input_ids"]) * self.scale
        per_token = torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten(), reduction="none")
        return outputs({"lm": per_token.mean(), "per_token": per_token})


class ZeroDim(NotScalar):
    """A 0-dimensional parameter, which DeepSpeed cannot broadcast."""

    def setup(self) -> None:
        self.scale = nn.Parameter(torch.ones(()))



# The README's example, verbatim (tests/unit/test_research.py runs it)
@dataclass
class Options:                          # research.options, checked (unknown keys, types) before anything runs
    scale: float = 1.0


class Steer(Extension):
    Options = Options                   # terms: the default weights and schedules
    terms: ClassVar[dict[str, Term]] = {"lm": Term(), "norm": Term(0.1, schedule="linear", end=500)}

    def setup(self):
        self.shift = nn.Parameter(torch.zeros(1, self.ctx.dim))             # self.ctx: dim, n_layers, tokenizer, ...
        self.hooks.add("4-7", lambda layer, h: h + self.options.scale * self.shared(self.shift))

    def forward(self, batch):           # input_ids, labels and the data's other tensors, on the device
        lm, logits = self.base_lm(batch)          # the base's loss (vocab-parallel under TP) and logits
        return outputs({"lm": lm, "norm": self.shift.square().mean()}, logits=logits)
