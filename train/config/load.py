"""YAML recipe + ``section.key=value`` overrides -> a typed, checked ``JobConfig``, key by key.

Each value is checked against its field's annotation (``_coerce``): a ``Literal`` field takes one of its
choices, so no section lists its allowed strings twice. The whole recipe is then checked by
``train.config.checks.validate``.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from model import ModelArgs
from train.config.checks import adapt_warmup, validate
from train.config.fields import ConfigError, Origin, _choice, as_number
from train.config.finetune import DPOSection, HFSection, LoraSection, VocabSection
from train.config.research import ResearchSection
from train.config.schema import (
    DataSection,
    JobConfig,
    LogSection,
    ModelSection,
    ParallelSection,
    PerfSection,
    SampleSection,
    TrainSection,
)


def _suggest(key: Any, choices: list[str], section: str = "") -> str:
    """The closest known key, or the list of them, each written in full (``train.lr``, not ``lr``)."""
    full = [f"{section}.{c}" if section else c for c in choices]
    close = difflib.get_close_matches(str(key), choices, n=1, cutoff=0.5)
    if close:
        return f" Did you mean '{full[choices.index(close[0])]}'?"
    return f" Known {'keys' if section else 'sections'}: {', '.join(sorted(full))}."


def _coerce(where: str, value: Any, tp: Any) -> Any:
    """Check ``value`` against the annotation ``tp``; ints are accepted where floats are expected."""
    origin = typing.get_origin(tp)
    if origin is typing.Literal:
        return _choice(where, value, typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(tp)
        if value is None and type(None) in options:
            return None
        errors = []
        for opt in options:
            if opt is type(None):
                continue
            try:
                return _coerce(where, value, opt)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0])
    if origin is list:
        if not isinstance(value, list):
            value = [value]  # a single path is a list of one
        (item_tp,) = typing.get_args(tp)
        return [_coerce(f"{where}[{i}]", v, item_tp) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}.")
        return dict(value)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {value!r}.")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}.")
        return value
    if tp is float:
        return as_number(where, value)
    if tp is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ConfigError(f"{where}: expected a string, got {value!r}.")
        return str(value)
    raise TypeError(f"unsupported annotation {tp!r} at {where}")


def _section_from_dict(name: str, cls: type, raw: Any) -> Any:
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{name}: expected a mapping of keys, got {raw!r}.")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in raw.items():
        if key not in names:
            raise ConfigError(f"Unknown config key '{name}.{key}'.{_suggest(key, names, name)}")
        kwargs[key] = _coerce(f"{name}.{key}", value, hints[key])
    return cls(**kwargs)


def _model_section(raw: Any) -> ModelSection:
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"model: expected a mapping of keys, got {raw!r}.")
    raw = dict(raw)
    preset = _coerce("model.preset", raw.pop("preset", ModelSection.preset), str)
    init_from = _coerce("model.init_from", raw.pop("init_from", None), str | None)
    arg_fields = {f.name: f for f in dataclasses.fields(ModelArgs)}
    hints = typing.get_type_hints(ModelArgs)
    overrides = {}
    for key, value in raw.items():
        if key not in arg_fields:
            known = ["preset", "init_from", *arg_fields]
            raise ConfigError(f"Unknown config key 'model.{key}'.{_suggest(key, known, 'model')}")
        overrides[key] = _coerce(f"model.{key}", value, hints[key])
    return ModelSection(preset=str(preset), init_from=init_from, overrides=overrides)


_SECTIONS: dict[str, type] = {
    "data": DataSection,
    "train": TrainSection,
    "parallel": ParallelSection,
    "log": LogSection,
    "sample": SampleSection,
    "hf": HFSection,
    "lora": LoraSection,
    "vocab": VocabSection,
    "dpo": DPOSection,
    "perf": PerfSection,
    "research": ResearchSection,
}


def config_from_dict(raw: dict[str, Any], origin: Origin | None = None) -> JobConfig:
    """Build and validate a JobConfig from a nested dict (the parsed YAML with overrides applied). ``origin``:
    which keys the recipe file and the overrides set (None: every key of ``raw`` counts as the recipe's)."""
    if not isinstance(raw, dict):
        raise ConfigError(f"A recipe must be a mapping of sections, got {type(raw).__name__}.")
    known = ["model", *_SECTIONS]
    for key in raw:
        if key not in known:
            raise ConfigError(f"Unknown config section '{key}'.{_suggest(key, known)}")
    cfg = JobConfig(
        model=_model_section(raw.get("model")),
        **{k: _section_from_dict(k, cls, raw.get(k)) for k, cls in _SECTIONS.items()},
    )
    cfg.origin = origin if origin is not None else Origin(recipe=_keys(raw))
    adapt_warmup(cfg)
    validate(cfg)
    return cfg


def _keys(raw: dict[str, Any]) -> frozenset[str]:
    """The ``section.key`` names a nested recipe dict sets."""
    return frozenset(f"{section}.{key}" for section, keys in raw.items() if isinstance(keys, dict)
                     for key in keys)


def _mapping_field(section: str, key: str) -> bool:
    """Whether ``section.key`` is a mapping field (e.g. research.options), whose own keys an override may name."""
    cls = _SECTIONS.get(section)
    if cls is None or key not in {f.name for f in dataclasses.fields(cls)}:
        return False
    return typing.get_origin(typing.get_type_hints(cls)[key]) is dict


def apply_override(raw: dict[str, Any], override: str) -> None:
    """Apply one ``section.key=value`` override to the nested dict; the value is parsed as YAML. A mapping field
    takes nested keys too: ``research.options.lr=1e-3``, ``research.options.a.b=1``."""
    if "=" not in override:
        raise ConfigError(f"Override '{override}' is not of the form section.key=value (e.g. train.lr=3e-4).")
    dotted, text = override.split("=", 1)
    parts = dotted.strip().split(".")
    if len(parts) < 2 or not all(parts):
        raise ConfigError(f"Override key '{dotted}' must be section.key (e.g. train.steps=100, "
                          f"model.n_layers=2).")
    if len(parts) > 2 and not _mapping_field(parts[0], parts[1]):
        raise ConfigError(f"Override key '{dotted}': {parts[0]}.{parts[1]} is not a mapping field, so it takes no "
                          f"nested key; write {parts[0]}.{parts[1]}=VALUE (nested keys work for mappings such "
                          f"as research.options.KEY=VALUE).")
    section, *path, key = parts
    raw.setdefault(section, {})
    node = raw[section]
    if not isinstance(node, dict):
        raise ConfigError(f"Override '{override}': section '{section}' is not a mapping in the recipe.")
    for i, name in enumerate(path):
        node = node.setdefault(name, {})
        if not isinstance(node, dict):
            where = ".".join([section, *path[:i + 1]])
            raise ConfigError(f"Override '{override}': {where} is {node!r} in the recipe, not a mapping; set "
                              f"{where}=... as a whole.")
    node[key] = _parse_yaml(text, f"Override '{override}'") if text.strip() else None


def _parse_yaml(text: str, where: str) -> Any:
    """YAML text -> Python values; a syntax error or absurd nesting is one ConfigError naming ``where``."""
    try:
        return yaml.safe_load(text)
    except yaml.MarkedYAMLError as e:
        m = e.problem_mark
        mark = f" at line {m.line + 1}, column {m.column + 1}" if m is not None else ""
        raise ConfigError(f"{where}: not valid YAML ({e.problem or e.context}{mark}); quote the value or "
                          f"fix the syntax.") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{where}: not valid YAML ({str(e).splitlines()[0]}).") from None
    except RecursionError:
        raise ConfigError(f"{where}: nested too deeply to be a recipe.") from None


def load_config(path: str | Path | None, overrides: list[str] = ()) -> JobConfig:
    """Read a YAML recipe (None: all defaults), apply overrides, validate."""
    raw: Any = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"--config {path}: no such file. Recipes live in train/configs/.")
        try:
            text = p.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise ConfigError(f"--config {path}: not a text file (not UTF-8); give a YAML recipe.") from None
        except OSError as e:
            raise ConfigError(f"--config {path}: cannot be read ({e.strerror}).") from None
        raw = _parse_yaml(text, f"--config {path}")
        if raw is None:  # an empty file: every default
            raw = {}
        if not isinstance(raw, dict):
            raise ConfigError(f"--config {path}: holds a YAML {type(raw).__name__}, not a recipe; a recipe "
                              f"is a mapping of sections (model:, data:, train:, ...), see train/configs/.")
    recipe = _keys(raw)
    for o in overrides:
        apply_override(raw, o)
    named = frozenset(".".join(o.split("=", 1)[0].strip().split(".")[:2]) for o in overrides)
    return config_from_dict(raw, Origin(recipe=recipe, overrides=named))


def describe_type(tp: Any) -> str:
    """An annotation as a recipe writer reads it: ``'blocks' | 'random'``, ``int | None``, ``list[str]``."""
    origin = typing.get_origin(tp)
    if origin is typing.Literal:
        return " | ".join(map(repr, typing.get_args(tp)))
    if origin in (typing.Union, types.UnionType):
        return " | ".join(describe_type(t) for t in typing.get_args(tp))
    if origin is list:
        return f"list[{describe_type(typing.get_args(tp)[0])}]"
    if origin is dict:
        return "mapping"
    return "None" if tp is type(None) else getattr(tp, "__name__", str(tp))


def describe_fields(cfg: JobConfig | None = None) -> str:
    """Every recipe key with its type (a choice field: its choices), the value ``cfg`` gives it (where that is
    not the schema's default, the default follows in brackets) and its help line, for ``main.py
    --help-config``. Without ``cfg``: the schema's defaults."""
    cfg = cfg if cfg is not None else JobConfig()

    def line(name: str, tp: Any, value: Any, default: Any, help_text: str) -> str:
        shown = f"{value!r}" if value == default else f"{value!r}  (default {default!r})"
        return f"  {name}: {describe_type(tp)} = {shown}  # {help_text}"

    lines = ["model:"]
    hints = typing.get_type_hints(ModelSection)
    for f in dataclasses.fields(ModelSection)[:2]:
        lines.append(line(f.name, hints[f.name], getattr(cfg.model, f.name), f.default, f.metadata["help"]))
    hints = typing.get_type_hints(ModelArgs)
    try:
        args = cfg.model_args() if cfg.hf.path is None else None
    except ConfigError:  # e.g. model.init_from names no readable HF model: list the keys without values
        args = None
    for f in dataclasses.fields(ModelArgs):
        if args is None:
            lines.append(f"  {f.name}: {describe_type(hints[f.name])}  # {f.metadata['help']}")
        else:
            shown = f"{getattr(args, f.name)!r}  ({'overridden' if f.name in cfg.model.overrides else 'the preset'})"
            if f.name == "vocab_size" and "vocab_size" not in cfg.model.overrides and cfg.model.init_from is None:
                shown = f"the tokenizer's  (not the preset's {args.vocab_size})"
            lines.append(f"  {f.name}: {describe_type(hints[f.name])} = {shown}  # {f.metadata['help']}")
    for section, cls in _SECTIONS.items():
        lines.append(f"{section}:")
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            lines.append(line(f.name, hints[f.name], getattr(getattr(cfg, section), f.name), default,
                              f.metadata["help"]))
    return "\n".join(lines)
