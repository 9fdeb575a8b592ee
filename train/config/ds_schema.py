"""The keys and value types a DeepSpeed config may hold, read from DeepSpeed itself.

DeepSpeed ignores a top-level key it does not read (``"zero_optimizationn": {"stage": 3}`` trains at ZeRO-0)
and refuses a misspelled key inside its pydantic sections only when the engine starts. Tessera checks both
before anything runs. The lists are not typed here: the top-level keys (and their defaults, which give their
types) are the keys ``deepspeed.runtime.config.DeepSpeedConfig`` asks for when it parses a config, recorded
with a dictionary that notes every lookup; the keys of a section parsed by a pydantic model (ZeRO, bf16, fp16,
compile, monitors) are the model's field names and aliases; the pipeline's are the keys of DeepSpeed's
pipeline defaults. A DeepSpeed upgrade brings its new keys along.
"""

from __future__ import annotations

import difflib
import functools
import logging
import typing
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel, ValidationError

from train.config.fields import ConfigError

# Sections DeepSpeed reads key by key from a dict (recorded with a non-empty stand-in, so every key is asked
# for).
_RECORDED_SECTIONS = {
    "optimizer": {"type": "AdamW"},
    "scheduler": {"type": "WarmupLR"},
    "activation_checkpointing": {},
    "data_types": {},
    "checkpoint": {},
    "flops_profiler": {},
}
# Sections whose keys belong to something else (the optimizer's or scheduler's constructor): a JSON object.
_OPEN_SECTIONS = ("optimizer.params", "scheduler.params")


@dataclass(frozen=True)
class Schema:
    """Known keys per section (``""`` is the top level), their default values where DeepSpeed gives one, and
    the pydantic model of each section that has one."""

    keys: dict[str, frozenset[str]]
    defaults: dict[str, Any]
    models: dict[str, Any] = field(default_factory=dict)


class _Recorder(dict):
    """A dict that notes every key asked for (``get``, ``in``, ``[]``, ``keys()``) with the default given."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.seen: dict[str, Any] = {}

    def _note(self, key: Any, default: Any = None) -> None:
        if isinstance(key, str):
            self.seen.setdefault(key, default)

    def get(self, key: Any, default: Any = None) -> Any:
        self._note(key, default)
        return super().get(key, default)

    def __contains__(self, key: object) -> bool:
        self._note(key)
        return super().__contains__(key)

    def __getitem__(self, key: Any) -> Any:
        self._note(key)
        return super().__getitem__(key)

    def keys(self) -> Any:
        recorder = self

        class _Keys:
            def __contains__(self, key: object) -> bool:
                return key in recorder

            def __iter__(self) -> Any:
                return iter(dict.keys(recorder))

            def __len__(self) -> int:
                return dict.__len__(recorder)

        return _Keys()


def _model_keys(model: Any, prefix: str, out: dict[str, frozenset[str]], models: dict[str, Any]) -> None:
    """Field names and aliases of a pydantic model, and of the models nested in it, under ``prefix``."""
    names = set()
    models[prefix] = model
    for name, info in model.model_fields.items():
        names.add(name)
        if info.alias:
            names.add(info.alias)
        inner = [t for t in (typing.get_args(info.annotation) or (info.annotation,)) if isinstance(t, type)]
        for tp in inner:
            if issubclass(tp, BaseModel):
                _model_keys(tp, f"{prefix}.{name}", out, models)
                if info.alias:
                    out[f"{prefix}.{info.alias}"] = out[f"{prefix}.{name}"]
    out[prefix] = frozenset(names)


@functools.lru_cache(maxsize=1)
def ds_schema() -> Schema:
    """What DeepSpeed (the installed version) reads; computed once per process."""
    from deepspeed.compile.config import CompileConfig
    from deepspeed.monitor.config import CometConfig, CSVConfig, TensorBoardConfig, WandbConfig
    from deepspeed.runtime import config as dsc
    from deepspeed.runtime.precision_config import DeepSpeedBF16Config, DeepSpeedFP16Config
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig
    from deepspeed.utils import logger as ds_logger

    sections = {name: _Recorder(value) for name, value in _RECORDED_SECTIONS.items()}
    root = _Recorder({"train_batch_size": 1, **sections})
    level = ds_logger.level
    ds_logger.setLevel(logging.WARNING)  # its parse logs the stand-in's world size at INFO
    try:
        dsc.DeepSpeedConfig(root)
    finally:
        ds_logger.setLevel(level)
    keys: dict[str, frozenset[str]] = {"": frozenset(root.seen)}
    defaults = dict(root.seen)
    for name, rec in sections.items():
        keys[name] = frozenset(rec.seen)
        defaults.update({f"{name}.{k}": v for k, v in rec.seen.items()})
    keys["pipeline"] = frozenset(dsc.get_pipeline_config({}))
    models: dict[str, Any] = {}
    pydantic_sections = {
        "zero_optimization": DeepSpeedZeroConfig,
        "bf16": DeepSpeedBF16Config,
        "bfloat16": DeepSpeedBF16Config,
        "fp16": DeepSpeedFP16Config,
        "compile": CompileConfig,
        "tensorboard": TensorBoardConfig,
        "wandb": WandbConfig,
        "csv_monitor": CSVConfig,
        "comet": CometConfig,
    }
    for name, model in pydantic_sections.items():
        _model_keys(model, name, keys, models)
    return Schema(keys=keys, defaults=defaults, models=models)


def _hint(key: str, known: frozenset[str], prefix: str) -> str:
    close = difflib.get_close_matches(key, sorted(known), n=1, cutoff=0.6)
    return f" Did you mean '{prefix}{close[0]}'?" if close else ""


def _type_error(where: str, path: str, value: Any, default: Any) -> str | None:
    """Why ``value`` cannot stand where DeepSpeed's default is ``default`` (None: it can)."""
    if default is None or value == "auto":
        return None
    if isinstance(default, bool):
        ok, want = isinstance(value, bool), "true or false"
    elif isinstance(default, (int, float)):
        ok, want = isinstance(value, (int, float)) and not isinstance(value, bool), "a number"
    elif isinstance(default, str):
        ok, want = isinstance(value, str), "a string"
    elif isinstance(default, dict):
        ok, want = isinstance(value, dict), "a JSON object"
    else:
        return None
    return None if ok else f"{where}: '{path}' is {value!r}; DeepSpeed expects {want} there."


def check_ds_keys(ds: dict[str, Any], where: str) -> None:
    """Refuse keys DeepSpeed does not read, at the top level and in every section it parses, with the closest
    known key; a section must be a JSON object and a scalar must have its default's type. ``where`` starts
    each message (``--ds_config PATH``)."""
    from deepspeed.runtime import config as dsc

    schema = ds_schema()
    reject = getattr(dsc, "_reject_removed_config_keys", None)
    if reject is not None:  # keys DeepSpeed has removed: its own message
        try:
            reject(ds)
        except dsc.DeepSpeedConfigError as e:
            raise ConfigError(f"{where}: {str(e).splitlines()[0].strip()}") from None
    _check_level(ds, "", schema, where)


def _check_level(obj: dict[str, Any], prefix: str, schema: Schema, where: str) -> None:
    known = schema.keys[prefix]
    dotted = f"{prefix}." if prefix else ""
    for key, value in obj.items():
        path = f"{dotted}{key}"
        if key not in known:
            raise ConfigError(f"{where}: unknown key '{path}'.{_hint(str(key), known, dotted)}")
        if path in _OPEN_SECTIONS and not isinstance(value, dict):
            raise ConfigError(f"{where}: '{path}' is {value!r}; write a JSON object of its keys there.")
        if path in schema.keys:
            if not isinstance(value, dict):
                raise ConfigError(f"{where}: '{path}' is {value!r}; write a JSON object of its keys there "
                                  f"(e.g. \"{path.rsplit('.', 1)[-1]}\": {{...}}).")
            _check_level(value, path, schema, where)
            continue
        problem = _type_error(where, path, value, schema.defaults.get(path))
        if problem:
            raise ConfigError(problem)


def check_ds_values(ds: dict[str, Any]) -> None:
    """Validate every section DeepSpeed parses with a pydantic model (ZeRO, bf16, fp16, ...) with that model,
    once the "auto" values are filled in: a wrong type or value is one ConfigError naming the key."""
    schema = ds_schema()
    for name, model in schema.models.items():
        if "." in name or not isinstance(ds.get(name), dict):
            continue
        try:
            model(**ds[name])
        except ValidationError as e:
            err = e.errors()[0]
            loc = ".".join(str(p) for p in err.get("loc", ()))
            path = f"{name}.{loc}" if loc else name
            raise ConfigError(f"DeepSpeed config {path}={err.get('input')!r}: {err.get('msg')}; fix the "
                              f"value in the JSON.") from None
        except (ValueError, TypeError) as e:  # a DeepSpeed validator's own refusal
            raise ConfigError(f"DeepSpeed config {name}: {str(e).splitlines()[0]}") from None
