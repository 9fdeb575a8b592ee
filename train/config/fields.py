"""The pieces every recipe section is built from: the error type, the documented field, the value checks."""

from __future__ import annotations

import difflib
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any


class ConfigError(ValueError):
    """A recipe, override or DeepSpeed config that cannot run; the message says which key and what to do."""


def _f(default: Any, help: str, **kw: Any) -> Any:
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help}, **kw)
    return field(default=default, metadata={"help": help}, **kw)


def _positive(where: str, value: float, *, allow_zero: bool = False) -> None:
    if value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise ConfigError(f"{where}={value}: must be {bound}.")


def _choice(where: str, value: Any, choices: Sequence[Any]) -> Any:
    """``value`` if it is one of ``choices`` (the arguments of a ``Literal``), else one ConfigError naming
    the key, the value, every allowed value and the closest one."""
    if value in choices and not isinstance(value, bool):
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool) and str(value) in choices:
        return str(value)  # YAML reads 8 as a number where the choices are strings
    close = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1, cutoff=0.5)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    listed = [repr(c) for c in choices]
    allowed = listed[0] if len(listed) == 1 else f"{', '.join(listed[:-1])} or {listed[-1]}"
    raise ConfigError(f"{where}={value!r}: use {allowed}.{hint}")


def as_number(where: str, value: Any) -> float:
    """``value`` as a finite float (YAML reads 1e-3, without a dot, as a string), or a ConfigError naming
    ``where``: not a number, or NaN / infinite (YAML's ``.nan``, ``.inf``)."""
    number = value
    if isinstance(value, str):
        try:
            number = float(value)
        except ValueError:
            pass
    if isinstance(number, bool) or not isinstance(number, (int, float)):
        raise ConfigError(f"{where}: expected a number, got {value!r}.")
    try:
        number = float(number)
    except OverflowError:  # an integer too large for a float
        number = math.inf
    if not math.isfinite(number):
        raise ConfigError(f"{where}={value!r}: not a finite number; give a number such as 3e-4.")
    return number


@dataclass(frozen=True)
class Origin:
    """Where a recipe's values came from. A key the recipe file does not write and no override names holds the
    schema's default. Values Tessera derives (train/config/checks.py) adapt only a key set at a lower level than
    the one it contradicts; a contradiction between keys of the same level is the user's, and an error."""

    recipe: frozenset[str] = frozenset()  # "section.key" written in the --config file
    overrides: frozenset[str] = frozenset()  # "section.key" given on the command line as section.key=value

    def level(self, key: str) -> int:
        """0: the schema's default, 1: the recipe file, 2: an override."""
        return 2 if key in self.overrides else 1 if key in self.recipe else 0

    def source(self, key: str) -> str:
        """How a message names where ``key``'s value came from."""
        return ("the schema's default", "the recipe", "an override")[self.level(key)]
