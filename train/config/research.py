"""The ``research`` recipe section: trainable modules, loss terms and hooks around a base model (train/research/api.py).

Only what needs no import of the recipe is checked here; the recipe's own options, its layer indices against the
model and its optimizer groups against the parameters are checked by train/research/api.py before training starts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from train.config.fields import ConfigError, _f

if TYPE_CHECKING:
    from train.config.schema import JobConfig

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


def validate_research(cfg: JobConfig) -> None:
    """The section's shape; everything that needs the recipe class is checked when the run is planned."""
    r = cfg.research
    if cfg.data.corpus == "qa" and r.recipe is None:
        raise ConfigError("data.corpus='qa' is read by a research recipe: set research.recipe='soft_prompt'.")
    if r.diagnostics_interval < 0:
        raise ConfigError(f"research.diagnostics_interval={r.diagnostics_interval}: must be >= 0 (0: off).")
    if r.recipe is None:
        for key in ("options", "terms", "groups"):
            if getattr(r, key):
                raise ConfigError(f"research.{key} is set but research.recipe is not: name a recipe ('injection', "
                                  f"'complex' or 'package.module:Class') or remove research.{key}.")
        return
    if cfg.train.objective != "lm":
        raise ConfigError(f"research.recipe={r.recipe!r} with train.objective={cfg.train.objective!r}: a research "
                          f"recipe defines its own losses; set train.objective='lm'.")
    if cfg.parallel.pp > 1:
        raise ConfigError(f"research.recipe={r.recipe!r} with parallel.pp={cfg.parallel.pp}: the pipeline engine "
                          f"runs only the model's own layers; use tensor / data parallelism (parallel.pp=1).")
    if cfg.vocab.lexicon is not None:
        raise ConfigError(f"research.recipe={r.recipe!r} with vocab.lexicon: run the vocabulary extension on its "
                          f"own; remove one.")
    for name, spec in r.terms.items():
        if not isinstance(spec, dict):
            raise ConfigError(f"research.terms.{name}={spec!r}: write a mapping, e.g. {{weight: 0.1, schedule: "
                              f"linear, start: 0, end: 100}}.")
        unknown = sorted(set(spec) - set(TERM_KEYS))
        if unknown:
            raise ConfigError(f"research.terms.{name}.{unknown[0]}: unknown key; a term takes {', '.join(TERM_KEYS)}.")
        if spec.get("schedule", "constant") not in SCHEDULES:
            raise ConfigError(f"research.terms.{name}.schedule={spec['schedule']!r}: use one of "
                              f"{', '.join(SCHEDULES)}.")
    for i, g in enumerate(r.groups):
        if not isinstance(g, dict) or "params" not in g:
            raise ConfigError(f"research.groups[{i}]={g!r}: write {{params: GLOB, lr: ..., weight_decay: ...}}.")
        unknown = sorted(set(g) - set(GROUP_KEYS))
        if unknown:
            raise ConfigError(f"research.groups[{i}].{unknown[0]}: unknown key; a group takes "
                              f"{', '.join(GROUP_KEYS)}.")
        if g.get("lr") is not None and not float(g["lr"]) > 0:
            raise ConfigError(f"research.groups[{i}].lr={g['lr']}: must be > 0.")
