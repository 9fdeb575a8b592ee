"""The ``research`` recipe section: trainable modules, loss terms and hooks around a base model (train/research/api.py).

Only what needs no import of the recipe is checked here; the recipe's own options, its layer indices against the
model and its optimizer groups against the parameters are checked by train/research/api.py before training starts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from train.config.fields import _f

SCHEDULES = ("constant", "linear", "cosine", "warmup")
TERM_KEYS = ("weight", "schedule", "start", "end", "initial")
GROUP_KEYS = ("params", "lr", "weight_decay")


@dataclass
class ResearchSection:
    recipe: str | None = _f(None, "A research recipe around the model: 'injection', 'complex', or your own "
                                  "'package.module:Class' (a train.research.api.Extension subclass); None: off.")
    options: dict[str, Any] = _f({}, "The recipe's own options (its Options dataclass; unknown keys are refused).")
    freeze_base: bool = _f(True, "Freeze the base model's weights (LoRA adapters on an hf.path base still train).")
    terms: dict[str, dict[str, Any]] = _f({}, "Per loss term, overrides of its weight schedule: {name: {weight, "
                                              "schedule: constant|linear|cosine|warmup, start, end, initial}}.")
    groups: list[dict[str, Any]] = _f([], "Optimizer groups: [{params: GLOB over parameter names (e.g. 'head.*'), "
                                          "lr, weight_decay}]; parameters matching none train with train.lr.")
    diagnostics_interval: int = _f(0, "Write per-module gradient / parameter norms and loss terms to "
                                      "diagnostics.jsonl every N steps, and first-token histograms at every "
                                      "evaluation (0: off).")


