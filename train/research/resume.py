"""What a resumed research run must share with its checkpoint: the recipe, its options and its loss terms.

`check_research_resume` runs at planning time for every base (native, `hf.path`, a recipe's own model). The
checkpoint's `tessera.json` records the run's whole config; its `research` section is compared with this run's
after both are checked by the recipe (so `lam: 1` and `lam: 1.0`, or an option left at its default and the same
default written out, are the same). The first difference is refused in one line naming the key
(`research.options.layers`, `research.terms.kl.weight`, ...). Term schedules may change on purpose with
`research.resume_new_terms=true`: the new weights apply from the resumed step on, and the change is logged.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

from train.config.fields import ConfigError
from train.config.schema import JobConfig
from train.research.api import Term, parse_options, resolve_terms
from train.research.run import ResearchPlan

log = logging.getLogger("tessera")
_NEW_TERMS = "research.resume_new_terms=true"


def first_difference(prefix: str, was: Any, now: Any) -> tuple[str, Any, Any] | None:
    """(dotted key, checkpoint's value, this run's value) of the first difference between two JSON-like values."""
    if isinstance(was, dict) and isinstance(now, dict):
        for key in sorted(set(was) | set(now), key=str):
            diff = first_difference(f"{prefix}.{key}", was.get(key), now.get(key))
            if diff is not None:
                return diff
        return None
    return None if was == now else (prefix, was, now)


def _plain(value: Any) -> Any:
    """Options or a term as a dict (dataclasses), anything else as it is."""
    return dataclasses.asdict(value) if dataclasses.is_dataclass(value) and not isinstance(value, type) else value


def _terms(terms: dict[str, Term]) -> dict[str, dict[str, Any]]:
    return {name: dataclasses.asdict(term) for name, term in terms.items()}


def check_research_resume(meta: dict[str, Any], cfg: JobConfig, research: ResearchPlan | None, where: Path) -> None:
    """Refuse resuming `where` with another research recipe, options, freeze_base or term schedules (module doc)."""
    saved = dict((meta.get("config") or {}).get("research") or {})
    if not saved and meta.get("research"):  # a checkpoint that recorded only the recipe and options
        saved = dict(meta["research"])
    now = cfg.research

    def refuse(key: str, was: Any, value: Any, hint: str = "") -> None:
        raise ConfigError(f"--resume: {key}={value!r} here but {was!r} in the checkpoint {where}; resume with the "
                          f"checkpoint's value{hint}, or start a new run (train.out_dir) from its weights.")

    if saved.get("recipe") != now.recipe:
        refuse("research.recipe", saved.get("recipe"), now.recipe)
    if now.recipe is None or research is None:
        return
    if saved.get("freeze_base", True) != now.freeze_base:
        refuse("research.freeze_base", saved.get("freeze_base", True), now.freeze_base)
    was_raw = saved.get("options") or {}
    try:  # both sides through the recipe's own checks: defaults filled in, numbers as the option's type
        was_options, now_options = _plain(parse_options(research.cls, was_raw)), _plain(research.options)
    except ConfigError:  # the recipe's options changed since: compare the values as written
        was_options, now_options = dict(was_raw), dict(now.options)
    diff = first_difference("research.options", was_options, now_options)
    if diff is not None:
        refuse(*diff)
    try:
        was_terms = _terms(resolve_terms(research.cls, saved.get("terms") or {}))
    except ConfigError:  # a term the recipe no longer declares
        was_terms = {name: dict(spec) for name, spec in (saved.get("terms") or {}).items()}
    diff = first_difference("research.terms", was_terms, _terms(research.terms))
    if diff is None:
        return
    if not now.resume_new_terms:
        refuse(*diff, hint=f" (to change the loss terms' weights on purpose from the resumed step on, add {_NEW_TERMS})")
    log.warning("--resume with new loss-term schedules (%s): %s=%r, was %r; the new weights apply from the resumed "
                "step on", _NEW_TERMS, diff[0], diff[2], diff[1])
