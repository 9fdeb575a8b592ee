"""The research extension API: your modules and losses around a base model, and Tessera owns the rest.

Write a subclass of ``Extension``; name it in a recipe (``research.recipe: mypkg.mymod:MyRecipe``)::

    @dataclass
    class Options:                       # the recipe's ``research.options``, checked before anything runs
        scale: float = 1.0

    class MyRecipe(Extension):
        Options = Options
        terms = {"lm": Term(), "aux": Term(0.1, schedule="linear", end=100)}   # default weights and schedules

        def setup(self) -> None:         # declare trainable modules as attributes
            self.head = nn.Linear(self.ctx.dim, self.ctx.dim)
            self.hooks.add("2-5", self.inject)                 # residual stream after layers 2..5

        def forward(self, batch):        # batch: input_ids, labels and the data's other tensors, on the device
            self.vector = self.head(...) # compute from your modules here, hooks use the tensors
            lm, logits = self.base_lm(batch)
            return outputs({"lm": lm, "aux": ...}, logits=logits)

Because the extension is one module around the base, every parameter it declares is in the optimizer (by its
own group if ``research.groups`` names it), sharded by ZeRO, moved to the activations' device, saved in every
checkpoint and restored on resume; each loss term is logged with its weight. ``research.terms`` overrides the
class's schedules; ``research.diagnostics_interval`` writes per-module norms (train/loop/diagnostics.py).
"""

from __future__ import annotations

import dataclasses
import importlib
import math
from collections.abc import Mapping
from dataclasses import dataclass
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from model.hooks import LayerHooks, parse_layers
from parallel.comm import copy_to_tp
from train.config.fields import ConfigError
from train.config.research import SCHEDULES
from train.loop.optim import decays

RECIPES = {
    "injection": "train.research.injection:Injection",
    "soft_prompt": "train.research.soft_prompt:SoftPrompt",
    "complex": "train.research.complex_lm:ComplexRecipe",
}


class LossTermError(ValueError):
    """A loss term that is not a finite scalar; the message names the term, its value and the step."""


@dataclass
class Term:
    """A loss term's weight over optimizer steps (0-based).

    constant: ``weight`` throughout. linear / cosine: ``initial`` until ``start``, a linear or cosine ramp to
    ``weight`` at ``end``, then ``weight``. warmup: 0 until ``start`` (the term is off), then ``weight``.
    """

    weight: float = 1.0
    schedule: str = "constant"
    start: int = 0
    end: int = 0
    initial: float = 0.0

    def __post_init__(self) -> None:
        if self.schedule not in SCHEDULES:
            raise ConfigError(f"schedule={self.schedule!r}: use one of {', '.join(SCHEDULES)}.")
        if self.schedule in ("linear", "cosine") and self.end < self.start:
            raise ConfigError(f"a {self.schedule} ramp ends at step {self.end}, before its start {self.start}: "
                              f"set end >= start.")
        if not (math.isfinite(self.weight) and math.isfinite(self.initial)):
            raise ConfigError(f"weight={self.weight}, initial={self.initial}: term weights must be finite.")

    def at(self, step: int) -> float:
        """The weight this term has at optimizer step ``step``."""
        if self.schedule == "constant":
            return self.weight
        if self.schedule == "warmup":
            return 0.0 if step < self.start else self.weight
        if step < self.start:
            return self.initial
        if step >= self.end:
            return self.weight
        frac = (step - self.start) / (self.end - self.start)
        if self.schedule == "cosine":
            frac = 0.5 * (1.0 - math.cos(math.pi * frac))
        return self.initial + frac * (self.weight - self.initial)


@dataclass
class RecipeContext:
    """What an extension may use: the shapes of its base, the loss of its base, the run's settings."""

    dim: int  # hidden size of the base's residual stream (0 for a recipe that builds its own model)
    n_layers: int
    vocab_size: int
    device: torch.device
    out_dir: Path
    rank: int
    seed: int
    lm_loss: Any = None  # (base output, labels) -> mean loss; vocab-parallel under TP
    forward_kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)  # what the base is called with
    tp_ctx: Any = None  # parallel.layers.TPContext, or None
    tokenizer: Any = None
    config: Any = None  # the JobConfig
    terms: dict[str, Term] | None = None  # the run's term schedules (the recipe's, with research.terms applied)
    val_data: Any = None  # the validation split (a recipe's own evaluation reads its examples by batch index)


def outputs(terms: Mapping[str, torch.Tensor], logits: torch.Tensor | None = None) -> dict[str, Any]:
    """What ``Extension.forward`` returns: the named loss terms (unweighted scalars) and optionally the logits
    (B, T, V) of the supervised positions' predictions, for the first-token diagnostics."""
    out: dict[str, Any] = {"terms": dict(terms)}
    if logits is not None:
        out["logits"] = logits
    return out


@dataclass
class NoOptions:
    """A recipe without options."""


class Extension(nn.Module):
    """Trainable pieces around a base model (``self.base``; None for a recipe that is its own model)."""

    Options: ClassVar[type] = NoOptions
    terms: ClassVar[dict[str, Term]] = {"lm": Term()}
    needs_base: ClassVar[bool] = True

    def __init__(self, base: nn.Module | None, ctx: RecipeContext, options: Any) -> None:
        super().__init__()
        self.base = base
        self.ctx, self.options = ctx, options
        self._hooks: LayerHooks | None = None
        self.setup()

    # ----------------------------------------------------------------------------------- for subclasses
    @classmethod
    def check(cls, options: Any, ctx: RecipeContext) -> None:
        """Raise ConfigError for options this model cannot take (layer indices, sizes); runs before training."""

    def setup(self) -> None:
        """Declare trainable modules and hooks."""

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, Any]:
        lm, logits = self.base_lm(batch)
        return outputs({"lm": lm}, logits=logits)

    def build_model(self) -> nn.Module:
        """A recipe with ``needs_base = False`` returns its own model here (it becomes ``self.base``)."""
        raise TypeError(f"{type(self).__name__} sets needs_base=False, so it must define build_model() returning "
                        f"its own model")

    def evaluate(self, batches: Any, step: int | None) -> dict[str, float]:
        """Extra validation metrics (without the ``val_`` prefix), on every rank, in eval mode without gradients;
        ``batches()`` yields this rank's validation batches as dicts on the device: its share of the
        evaluation's micro-batches, the same ones for any layout, as many on every rank. A batch whose
        ``index`` is -1 on every row is a filler (``train.data.sampler.filler``): run it where the ranks must stay
        in step, count nothing from it."""
        return {}

    @classmethod
    def metrics(cls, options: Any) -> list[str] | None:
        """The names (without ``val_``) of the metrics ``evaluate`` returns for these options, when known before
        training (``train.best_metric`` is then checked before anything runs); None: known only at the first
        evaluation. By default: none for a recipe without its own ``evaluate``, else unknown."""
        return [] if cls.evaluate is Extension.evaluate else None

    def report(self, step: int) -> dict[str, Any]:
        """Called on every rank after training (e.g. to run and record an evaluation); returns what to print."""
        return {}

    # ----------------------------------------------------------------------------------- helpers
    @property
    def hooks(self) -> LayerHooks:
        """Residual-stream hooks on the base's decoder layers (model/hooks.py)."""
        if self._hooks is None:
            self._hooks = LayerHooks(self.base)
        return self._hooks

    def base_lm(self, batch: dict[str, torch.Tensor], **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The base's next-token loss on ``batch`` and its logits (None when the loss applies the head itself)."""
        model_kwargs = {k: v for k, v in batch.items() if k not in ("input_ids", "labels", "index")}
        out = self.base(batch.get("input_ids"), **model_kwargs, **self.ctx.forward_kwargs, **kwargs)
        logits = None if self.ctx.forward_kwargs else out
        return self.ctx.lm_loss(out, batch["labels"]), logits

    def shared(self, p: torch.Tensor) -> torch.Tensor:
        """A replicated parameter as used on this rank's activations. Under sequence parallelism each TP rank
        sees a slice of the positions, so the parameter's gradient is summed over the TP group (identity
        otherwise). Use it for every parameter a hook applies to the residual stream."""
        tp = self.ctx.tp_ctx
        if tp is None or tp.size == 1 or not tp.sequence_parallel:
            return p

        return copy_to_tp(p, tp.group)

    def declared_modules(self) -> dict[str, nn.Module]:
        """The modules this recipe added (its direct children other than the base)."""
        return {name: m for name, m in self.named_children() if name != "base"}


# --------------------------------------------------------------------------------------- resolution


def resolve_recipe(name: str) -> type[Extension]:
    """The Extension class of a registered name or of 'package.module:Class'."""
    target = RECIPES.get(name, name)
    module_name, sep, attr = target.partition(":")
    if not sep:
        raise ConfigError(f"research.recipe={name!r}: use one of {', '.join(map(repr, RECIPES))} or "
                          f"'package.module:Class'.")
    try:
        cls = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as e:
        raise ConfigError(f"research.recipe={name!r}: cannot import {target} ({e}).") from None
    if not (isinstance(cls, type) and issubclass(cls, Extension)):
        raise ConfigError(f"research.recipe={name!r}: {target} is not a train.research.api.Extension subclass.")
    return cls


def parse_options(cls: type[Extension], raw: Mapping[str, Any]) -> Any:
    """The recipe's Options dataclass from ``research.options``; unknown keys and wrong types are errors."""
    fields = {f.name: f for f in dataclasses.fields(cls.Options)}
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        raise ConfigError(f"research.options.{unknown[0]}: not an option of {cls.__name__}; it takes "
                          f"{', '.join(fields) or 'none'}.")
    if not fields:
        return cls.Options()
    values = {}
    for key, value in raw.items():
        default = fields[key].default
        if isinstance(default, bool) and not isinstance(value, bool):
            raise ConfigError(f"research.options.{key}={value!r}: expected true or false.")
        if isinstance(default, float) and isinstance(value, (int, str)) and not isinstance(value, bool):
            try:
                value = float(value)
            except ValueError:
                raise ConfigError(f"research.options.{key}={value!r}: expected a number.") from None
        if isinstance(default, int) and not isinstance(default, bool) and not isinstance(value, int):
            raise ConfigError(f"research.options.{key}={value!r}: expected an integer.")
        values[key] = value
    try:
        return cls.Options(**values)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"research.options: {e}") from None


def resolve_terms(cls: type[Extension], overrides: Mapping[str, Mapping[str, Any]]) -> dict[str, Term]:
    """The recipe's terms with ``research.terms`` applied; a term the recipe does not declare is an error."""
    terms = dict(cls.terms)
    for name, spec in overrides.items():
        if name not in terms:
            raise ConfigError(f"research.terms.{name}: {cls.__name__} has no loss term {name!r}; its terms are "
                              f"{', '.join(terms)}.")
        try:
            terms[name] = dataclasses.replace(terms[name], **dict(spec))
        except (ConfigError, TypeError) as e:
            raise ConfigError(f"research.terms.{name}: {e}") from None
    return terms


def check_parameters(module: nn.Module, recipe: str | None) -> None:
    """Refuse a complex-dtype parameter before training, naming it and the helpers that store it as real pairs.

    DeepSpeed's optimizers and ZeRO take real tensors only (step 1 fails on a complex gradient), and a cast to
    bf16 keeps only the real part; ``model.complex.complex_param`` stores the same values as a real (..., 2)
    tensor that ``as_complex`` views as complex64 inside ``forward``.
    """
    for name, p in module.named_parameters():
        if p.is_complex():
            shape = ", ".join(map(str, p.shape))
            raise ConfigError(f"{name}: a {str(p.dtype).removeprefix('torch.')} parameter of research.recipe="
                              f"{recipe!r}, which DeepSpeed cannot train (its optimizers and ZeRO take real "
                              f"tensors; bf16 would keep only the real part); declare it as "
                              f"model.complex.complex_param({shape}) and use model.complex.as_complex(p) in "
                              f"forward.")


def check_layers(spec: Any, n_layers: int, where: str) -> list[int]:
    """Layer indices of an option, or a ConfigError naming the option, the index and the model's depth."""
    try:
        return parse_layers(spec, n_layers, where=where)
    except ValueError as e:
        raise ConfigError(str(e)) from None


def param_groups(module: nn.Module, groups: list[dict[str, Any]], *, lr: float,
                 weight_decay: float) -> list[dict[str, Any]]:
    """Optimizer groups: each of ``groups`` takes the trainable parameters its glob matches (first match wins),
    with its own lr / weight decay; the rest decay when they are matrices, as everywhere else."""
    named = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
    taken: set[int] = set()
    out = []
    for i, g in enumerate(groups):
        params = [p for n, p in named if fnmatchcase(n, g["params"]) and id(p) not in taken]
        if not params:
            sample = ", ".join(n for n, _ in named[:12]) + (", ..." if len(named) > 12 else "")
            raise ConfigError(f"research.groups[{i}].params={g['params']!r} matches no trainable parameter; the "
                              f"trainable ones are: {sample or 'none'}.")
        taken.update(id(p) for p in params)
        out.append({"params": params, "lr": float(g.get("lr") or lr),
                    "weight_decay": float(g.get("weight_decay", weight_decay))})
    rest = [p for _, p in named if id(p) not in taken]
    decay, no_decay = [p for p in rest if decays(p)], [p for p in rest if not decays(p)]
    if decay:
        out.append({"params": decay, "lr": lr, "weight_decay": weight_decay})
    if no_decay:
        out.append({"params": no_decay, "lr": lr, "weight_decay": 0.0})
    return out


def weigh_terms(terms: Mapping[str, torch.Tensor], schedule: Mapping[str, Term],
                step: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The weighted sum of the terms at ``step`` and what to log (each term unweighted, and its weight)."""
    total, logged = None, {}
    for name, value in terms.items():
        if name not in schedule:
            raise LossTermError(f"loss term {name!r} is not declared in the recipe's terms "
                                f"({', '.join(schedule)}); declare it so its weight is known.")
        if not isinstance(value, torch.Tensor) or value.numel() != 1:
            shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
            raise LossTermError(f"loss term {name!r} returned {shape}; a loss term must be a scalar tensor "
                                f"(reduce it, e.g. with .mean()).")
        w = schedule[name].at(step)
        part = value.reshape(()).float() * w
        total = part if total is None else total + part
        logged[f"term_{name}"] = value.detach().float().reshape(())
        logged[f"weight_{name}"] = torch.tensor(w)
    if total is None:
        raise LossTermError("the recipe's forward returned no loss term")
    return total, logged


def check_finite(terms: Mapping[str, float], step: int) -> None:
    """Every rank sees the same averaged terms, so every rank raises together."""
    bad = {k.removeprefix("term_"): v for k, v in terms.items() if k.startswith("term_") and not math.isfinite(v)}
    if bad:
        name, value = next(iter(bad.items()))
        raise LossTermError(f"loss term {name!r} is {value} at step {step} (averaged over ranks); the run stops "
                            f"here, the last checkpoint is intact. Check the term's inputs (log, sqrt, division).")
