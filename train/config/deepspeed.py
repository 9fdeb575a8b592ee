"""DeepSpeed configs: find them, fill their ``"auto"`` values from the recipe, and refuse contradictions.

The JSON files in ``ds_configs/`` describe the engine (precision, ZeRO stage, offload, buckets). The recipe
owns the optimisation (batch sizes, learning rate, clipping). A DeepSpeed field set to ``"auto"`` is filled
from the recipe; a field set to a number must agree with the recipe, or the run stops before it starts.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

from train.config.checks import derive_micro_batch
from train.config.ds_schema import check_ds_keys, check_ds_values
from train.config.fields import ConfigError
from train.config.schema import JobConfig

REPO_ROOT = Path(__file__).resolve().parents[2]
DS_CONFIG_DIR = REPO_ROOT / "ds_configs"


def find_ds_config(name_or_path: str) -> Path:
    """A path to a JSON file, or the bare name of one in ds_configs/ (``zero3`` or ``zero3.json``)."""
    p = Path(name_or_path)
    if p.is_file():
        return p
    stem = p.name if p.suffix == ".json" else f"{p.name}.json"
    candidate = DS_CONFIG_DIR / stem
    if candidate.is_file():
        return candidate
    known = sorted(f.stem for f in DS_CONFIG_DIR.glob("*.json"))
    raise ConfigError(f"--ds_config {name_or_path}: no such file. Give a path or one of: {', '.join(known)}.")


def load_ds_config(name_or_path: str) -> dict[str, Any]:
    """The JSON object of a DeepSpeed config, without its ``_comment``-style keys; unknown keys, sections that
    are not objects and scalars of the wrong type are refused (train/config/ds_schema.py)."""
    path = find_ds_config(name_or_path)
    try:
        raw = json.loads(path.read_text(encoding="utf-8"), parse_constant=_no_constant)
    except (json.JSONDecodeError, UnicodeDecodeError, ValueError) as e:
        raise ConfigError(f"--ds_config {path}: not valid JSON ({str(e).splitlines()[0]}); fix the file or "
                          f"start from one in ds_configs/.") from None
    except OSError as e:
        raise ConfigError(f"--ds_config {path}: cannot be read ({e.strerror}).") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"--ds_config {path}: holds a JSON {type(raw).__name__}; a DeepSpeed config is a "
                          f"JSON object of sections ({{\"zero_optimization\": {{\"stage\": 1}}, ...}}).")
    ds = {k: v for k, v in raw.items() if not (isinstance(k, str) and k.startswith("_"))}
    check_ds_keys(ds, f"--ds_config {path}")
    if "bfloat16" in ds:  # DeepSpeed's older name of the bf16 section
        if "bf16" in ds:
            raise ConfigError(f"--ds_config {path}: both 'bf16' and 'bfloat16' are set; keep 'bf16'.")
        ds["bf16"] = ds.pop("bfloat16")
    return ds


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a number JSON allows")


def _fill(ds: dict[str, Any], key: str, want: Any, recipe_key: str, where: str = "") -> None:
    """Set ``ds[key]`` to ``want`` when absent or "auto"; otherwise it must already equal ``want``."""
    have = ds.get(key, "auto")
    if have == "auto":
        ds[key] = want
    elif have != want and not (isinstance(have, (int, float)) and isinstance(want, (int, float))
                               and abs(have - want) <= 1e-12 * max(1.0, abs(want))):
        raise ConfigError(
            f"DeepSpeed config {where}{key}={have!r} contradicts the recipe ({recipe_key} gives {want!r}): "
            f'set it to "auto" in the JSON or change {recipe_key}.'
        )


def resolve_ds_config(
    ds: dict[str, Any], cfg: JobConfig, *, dp_size: int, bf16_supported: bool
) -> dict[str, Any]:
    """A copy of ``ds`` with every "auto" filled in and every explicit value checked against the recipe; the
    recipe's micro-batch is fitted to ``dp_size`` first where the user did not give it (``derive_micro_batch``)."""
    ds = copy.deepcopy(ds)
    t = cfg.train
    accum = derive_micro_batch(cfg, dp_size)  # may lower a micro-batch the user did not give (logged)
    _fill(ds, "train_batch_size", t.global_batch_size, "train.global_batch_size")
    _fill(ds, "train_micro_batch_size_per_gpu", t.micro_batch_size, "train.micro_batch_size")
    _fill(ds, "gradient_accumulation_steps", accum, "train.global_batch_size / (micro_batch_size x dp)")
    _fill(ds, "gradient_clipping", t.grad_clip, "train.grad_clip")

    for half in ("bf16", "fp16"):
        sec = ds.get(half)
        if isinstance(sec, dict) and sec.get("enabled") == "auto":
            sec["enabled"] = bf16_supported if half == "bf16" else False
    if ds.get("bf16", {}).get("enabled") and not bf16_supported:
        raise ConfigError(
            "DeepSpeed config bf16.enabled=true but this device has no bf16 support: "
            'use ds_configs/cpu.json, or set bf16.enabled to "auto".'
        )
    if ds.get("fp16", {}).get("enabled") and not _has_cuda():
        raise ConfigError("DeepSpeed config fp16.enabled=true needs a CUDA device: use ds_configs/cpu.json.")

    if "optimizer" in ds:
        params = ds["optimizer"].setdefault("params", {})
        _fill(params, "lr", t.lr, "train.lr", "optimizer.params.")
        _fill(params, "betas", [t.beta1, t.beta2], "train.beta1/beta2", "optimizer.params.")
        _fill(params, "eps", t.eps, "train.eps", "optimizer.params.")
        _fill(params, "weight_decay", t.weight_decay, "train.weight_decay", "optimizer.params.")
    if "scheduler" in ds:
        raise ConfigError(
            "DeepSpeed config has a 'scheduler' section: Tessera owns the LR schedule (train.lr, "
            "train.min_lr, train.warmup_steps); remove the section."
        )
    stage = ds.get("zero_optimization", {}).get("stage", 0)
    if stage not in (0, 1, 2, 3):
        raise ConfigError(f"DeepSpeed config zero_optimization.stage={stage!r}: use 0, 1, 2 or 3.")
    leftover = _find_auto(ds)
    if leftover:
        raise ConfigError(f'DeepSpeed config field {leftover} is "auto" but Tessera cannot infer it: set a '
                          f'value.')
    check_ds_values(ds)
    return ds


def _find_auto(obj: Any, path: str = "") -> str | None:
    if obj == "auto":
        return path or "<root>"
    if isinstance(obj, dict):
        for k, v in obj.items():
            found = _find_auto(v, f"{path}.{k}" if path else k)
            if found:
                return found
    return None


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()
