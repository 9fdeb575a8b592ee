"""A complex-valued language model as a research recipe: next-token loss plus energy and coherence terms.

The model (model/complex.py) keeps its residual stream in complex64 and stores every complex parameter as a
real tensor with a trailing (real, imaginary) pair, so DeepSpeed's casts, ZeRO partitioning, checkpoints and the
export carry both parts; the complex math runs in complex64 whatever the run's precision.

    research: {recipe: complex, options: {dim: 64, n_layers: 2}, terms: {energy: {weight: 0.01}}}
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from model.complex import ComplexArgs, ComplexLM
from train.config.fields import ConfigError
from train.research.api import Extension, RecipeContext, Term, outputs


@dataclass
class ComplexOptions:
    dim: int = 64  # complex channels of the residual stream
    n_layers: int = 2
    n_heads: int = 4
    ffn_mult: int = 2
    phase_theta: float = 10000.0
    init_std: float = 0.02


class ComplexRecipe(Extension):
    """The recipe is its own model (no base): ``self.base`` is the ComplexLM."""

    Options = ComplexOptions
    needs_base: ClassVar[bool] = False
    terms: ClassVar[dict[str, Term]] = {"lm": Term(1.0), "energy": Term(0.01), "coherence": Term(0.0)}

    @classmethod
    def args(cls, options: ComplexOptions, ctx: RecipeContext) -> ComplexArgs:
        seq_len = ctx.config.data.seq_len if ctx.config is not None else 256
        return ComplexArgs(vocab_size=ctx.vocab_size, dim=options.dim, n_layers=options.n_layers,
                           n_heads=options.n_heads, ffn_mult=options.ffn_mult, phase_theta=options.phase_theta,
                           init_std=options.init_std, max_seq_len=seq_len)

    @classmethod
    def check(cls, options: ComplexOptions, ctx: RecipeContext) -> None:
        try:
            cls.args(options, ctx).validate()
        except ValueError as e:
            raise ConfigError(f"research.options: {e}") from None

    def build_model(self) -> nn.Module:
        return ComplexLM(self.args(self.options, self.ctx))

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, Any]:
        logits, aux = self.base(batch["input_ids"], return_aux=True)
        return outputs({"lm": self.ctx.lm_loss(logits, batch["labels"]), **aux}, logits=logits)
