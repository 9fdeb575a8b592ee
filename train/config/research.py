"""The ``research`` recipe section: trainable modules, loss terms and hooks around a base model
(train/research/api.py).

Only what needs no import of the recipe is checked here; the recipe's own options, its layer indices against
the model and its optimizer groups against the parameters are checked by train/research/api.py before
training starts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, get_args

from train.config.fields import ConfigError, _choice, _f, as_number

Schedule = Literal["constant", "linear", "cosine", "warmup"]  # how a loss term's weight moves over the steps
SCHEDULES: tuple[Schedule, ...] = get_args(Schedule)
TERM_KEYS = ("weight", "schedule", "start", "end", "initial")
GROUP_KEYS = ("params", "lr", "weight_decay")


@dataclass
class ResearchSection:
    recipe: str | None = _f(None, "A research recipe around the model: 'injection', 'complex', or your own "
                                  "'package.module:Class' (a train.research.api.Extension subclass); None: "
                                  "off.")
    options: dict[str, Any] = _f({}, "The recipe's own options (its Options dataclass; unknown keys are "
                                     "refused).")
    init_from: str | None = _f(None, "Warm start: the recipe's own modules from another run of it (a run dir: its "
                                     "newest verified checkpoint, or a checkpoint dir), shapes checked; new "
                                     "options, fresh optimizer from step 0.")
    freeze_base: bool = _f(True, "Freeze the base model's weights (LoRA adapters on an hf.path base still "
                                 "train).")
    terms: dict[str, dict[str, Any]] = _f({}, "Per loss term, overrides of its weight schedule: {name: "
                                              "{weight, schedule: constant|linear|cosine|warmup, start, end, "
                                              "initial}}.")
    groups: list[dict[str, Any]] = _f([], "Optimizer groups: [{params: GLOB over parameter names (e.g. "
                                          "'head.*'), lr, weight_decay}]; parameters matching none train "
                                          "with train.lr.")
    resume_new_terms: bool = _f(False, "On --resume, accept research.terms that differ from the checkpoint's "
                                       "(the new weights apply from the resumed step on); off: a change is refused.")
    diagnostics_interval: int = _f(0, "Write per-module gradient / parameter norms and loss terms to "
                                      "diagnostics.jsonl every N steps, and first-token histograms at every "
                                      "evaluation (0: off).")

    def validate(self) -> None:
        """The section's shape: keys and schedules of ``terms``, keys and rates of ``groups``; nothing set
        without a recipe."""
        if self.diagnostics_interval < 0:
            raise ConfigError(f"research.diagnostics_interval={self.diagnostics_interval}: must be >= 0 "
                              f"(0: off).")
        if self.recipe is None:
            for key in ("options", "terms", "groups", "init_from"):
                if getattr(self, key):
                    raise ConfigError(f"research.{key} is set but research.recipe is not: name a recipe "
                                      f"('injection', 'complex' or 'package.module:Class') or remove "
                                      f"research.{key}.")
            return
        for name, spec in self.terms.items():
            if not isinstance(spec, dict):
                raise ConfigError(f"research.terms.{name}={spec!r}: write a mapping, e.g. {{weight: 0.1, "
                                  f"schedule: linear, start: 0, end: 100}}.")
            unknown = sorted(set(spec) - set(TERM_KEYS), key=str)
            if unknown:
                raise ConfigError(f"research.terms.{name}.{unknown[0]}: unknown key; a term takes "
                                  f"{', '.join(TERM_KEYS)}.")
            _choice(f"research.terms.{name}.schedule", spec.get("schedule", "constant"), SCHEDULES)
            for key in ("weight", "initial"):
                if key in spec:
                    spec[key] = as_number(f"research.terms.{name}.{key}", spec[key])
            for key in ("start", "end"):
                value = spec.get(key, 0)
                if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                    raise ConfigError(f"research.terms.{name}.{key}={value!r}: give a step number >= 0.")
        for i, g in enumerate(self.groups):
            if not isinstance(g, dict) or not isinstance(g.get("params"), str):
                raise ConfigError(f"research.groups[{i}]={g!r}: write {{params: GLOB, lr: ..., "
                                  f"weight_decay: ...}}.")
            unknown = sorted(set(g) - set(GROUP_KEYS), key=str)
            if unknown:
                raise ConfigError(f"research.groups[{i}].{unknown[0]}: unknown key; a group takes "
                                  f"{', '.join(GROUP_KEYS)}.")
            for key in ("lr", "weight_decay"):
                if g.get(key) is None:
                    continue
                value = as_number(f"research.groups[{i}].{key}", g[key])
                if value < 0 or (key == "lr" and value == 0):
                    raise ConfigError(f"research.groups[{i}].{key}={g[key]!r}: must be "
                                      f"{'> 0' if key == 'lr' else '>= 0'}.")
