"""Warm start of a research run from another run's extension weights (stage A -> stage B).

    research: {recipe: soft_prompt, init_from: runs/stage_a, options: {...new options...}}

``research.init_from`` names a run directory (its newest verified checkpoint) or a checkpoint directory
(``checkpoints/step_N``). The recipe's own modules (everything outside ``base``) take the checkpoint's weights
where the names agree; the base comes from the recipe as usual, the optimizer, its schedule and the step start
fresh. A tensor of both whose shape differs is refused in one line; a module the new options add keeps its fresh
initialisation and one the checkpoint has but this run does not is left out, both said in the log.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from train.config.fields import ConfigError
from train.export.consolidate import ExportError, consolidated_state_dict, resolve_checkpoint

BASE = "base."  # the prefix of the base model's tensors in an extension's state dict


def resolve_source(path: str | Path) -> Path:
    """The verified checkpoint directory ``research.init_from`` names, or a ConfigError naming the field."""
    try:
        return resolve_checkpoint(path)
    except ExportError as e:
        raise ConfigError(f"research.init_from={str(path)!r}: {e}") from None


@dataclass
class WarmStart:
    """What a warm start took from its checkpoint."""

    source: Path
    loaded: list[str]  # tensors taken from the checkpoint
    fresh: list[str]  # this run's tensors the checkpoint does not have (initialised as usual)
    unused: list[str]  # the checkpoint's tensors this run has no place for

    def describe(self) -> str:
        text = f"research.init_from: {len(self.loaded)} tensors of the recipe's modules from {self.source}"
        if self.fresh:
            text += f"; {len(self.fresh)} start fresh ({', '.join(self.fresh[:4])}{', ...' if len(self.fresh) > 4 else ''})"
        if self.unused:
            text += f"; {len(self.unused)} of the checkpoint unused ({', '.join(self.unused[:4])}" \
                    f"{', ...' if len(self.unused) > 4 else ''})"
        return text + "; fresh optimizer from step 0"


def warm_start(ext: nn.Module, source: Path) -> WarmStart:
    """Load the checkpoint's recipe-module tensors into ``ext`` (before the engine is built); shapes must agree."""
    saved = {k: v for k, v in consolidated_state_dict(source).items() if not k.startswith(BASE)}
    own = {k: v for k, v in ext.state_dict().items() if not k.startswith(BASE)}
    common = sorted(set(saved) & set(own))
    for name in common:
        if tuple(saved[name].shape) != tuple(own[name].shape):
            raise ConfigError(f"research.init_from={str(source)!r}: {name} has shape {tuple(saved[name].shape)} "
                              f"there and {tuple(own[name].shape)} in this run; warm start from a run with the "
                              f"same module sizes (or change the options that size {name.split('.')[0]}).")
    if not common:
        raise ConfigError(f"research.init_from={str(source)!r}: none of its tensors "
                          f"({', '.join(sorted(saved)[:4]) or 'none'}) is a module of this recipe "
                          f"({', '.join(sorted(own)[:4]) or 'none'}); name a run of the same recipe.")
    with torch.no_grad():
        for name in common:
            own[name].copy_(saved[name].to(own[name].dtype))
    return WarmStart(source, common, sorted(set(own) - set(saved)), sorted(set(saved) - set(own)))
