"""Export of a research run: every weight of the recipe around its base, and how to rebuild that structure.

    out/extension.safetensors   every tensor of the extension: the recipe's modules and buffers, the trainable
                                base parameters the checkpoint holds (LoRA's, an unfrozen base's), and for a
                                Tessera base the frozen weights the checkpoints leave out (the run's initial
                                weights: `model.model.build_model` from its seed, or ``model.init_from``);
                                complex parameters are stored as real views, so both parts survive
    out/research.json           recipe, options, step, and what the base was (hf identity or model args)
    out/adapter/                the PEFT adapter of an HF base with LoRA (as every checkpoint holds it)
    out/tokenizer files

``load_research(out, base)`` builds the recipe's modules (around ``base``, by default `rebuild_base`) and
loads every weight from the export, refusing an export that misses one: nothing is re-initialised from a seed,
so the outputs are the run's whatever the random state. An HF base comes from its ``hf.path`` (and the
adapter).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn

from model import ModelArgs, Transformer
from model.hf_causal import CausalLM, load_causal_lm
from model.model import build_model
from train.data.corpus import atomic_dir
from train.export.consolidate import consolidated_state_dict
from train.export.native import load_start
from train.objectives.lm import lm_loss
from train.research.api import Extension, RecipeContext, parse_options, resolve_recipe
from train.research.run import model_shape

WEIGHTS, META = "extension.safetensors", "research.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
                   "merges.txt")


class ResearchExportError(KeyError):
    """An export whose weights do not fit the recipe built from its description; the message names the key."""


def export_research(tag_dir: Path, meta: dict[str, Any], out: Path, *, overwrite: bool = False) -> Path:
    """Write the weights of the recipe and its Tessera base, and their description, from ``tag_dir``."""
    from safetensors.torch import save_file

    state = {k: v.contiguous() for k, v in consolidated_state_dict(tag_dir).items()}
    info = {"recipe": meta["research"]["recipe"], "options": meta["research"]["options"],
            "step": meta.get("step"), "hf": meta.get("hf"), "model_args": meta.get("model_args"),
            "freeze_base": meta.get("config", {}).get("research", {}).get("freeze_base", True),
            "seed": meta.get("config", {}).get("train", {}).get("seed", 0),
            "init_from": meta.get("config", {}).get("model", {}).get("init_from")}
    if _native_base(info):  # a frozen base is not in the checkpoints: the weights the run started from
        for name, tensor in _initial_base(info).items():
            state.setdefault(f"base.{name}", tensor.clone())  # a tied head shares the embedding's memory
    tok_dir = Path(meta.get("tokenizer_dir") or "")
    with atomic_dir(out, overwrite=overwrite) as tmp:
        save_file(state, str(tmp / WEIGHTS))
        (tmp / META).write_text(json.dumps(info, indent=2))
        if (tag_dir / "adapter").is_dir():
            shutil.copytree(tag_dir / "adapter", tmp / "adapter")
        for name in TOKENIZER_FILES:
            if (tok_dir / name).is_file():
                shutil.copy2(tok_dir / name, tmp / name)
    return out


def _native_base(info: dict[str, Any]) -> bool:
    """The recipe wraps a Tessera model (not an HF one, not a model of its own)."""
    return not info.get("hf") and bool(info.get("model_args")) and resolve_recipe(info["recipe"]).needs_base


def _initial_base(info: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The Tessera base's weights as the run started from them: ``model.init_from``'s, else those of
    `build_model` from the run's seed (as `train.build` makes them, and a resumed run makes them again)."""
    args = ModelArgs(**info["model_args"])
    if info.get("init_from"):
        return load_start(info["init_from"], max_seq_len=args.max_seq_len)[1]
    with torch.random.fork_rng(devices=[]):  # the caller's random state is left as it was
        return build_model(args, torch.device("cpu"), info["seed"]).state_dict()


def rebuild_base(export_dir: str | Path) -> nn.Module | None:
    """The base the run started from, with the weights of the export: the HF model of ``hf.path`` (with the
    exported adapter), or the Tessera model of the recorded args with the exported base weights (all of them,
    checked); None for a recipe that is its own model."""
    from safetensors.torch import load_file

    export_dir = Path(export_dir)
    info = json.loads((export_dir / META).read_text())
    if not resolve_recipe(info["recipe"]).needs_base:
        return None
    if info.get("hf"):
        model = load_causal_lm(info["hf"]["path"])
        if (export_dir / "adapter").is_dir():
            from peft import PeftModel

            model = PeftModel.from_pretrained(model, str(export_dir / "adapter"))
        return CausalLM(model)

    state = {k.removeprefix("base."): v for k, v in load_file(str(export_dir / WEIGHTS)).items()
             if k.startswith("base.")}
    with torch.random.fork_rng(devices=[]):  # every weight is loaded next: the initial values do not matter
        model = Transformer(ModelArgs(**info["model_args"]))
    _load_every_tensor(model, state, export_dir / WEIGHTS, what="the base")
    return model


def load_research(export_dir: str | Path, base: nn.Module | None = None, *, vocab_size: int | None = None,
                  device: torch.device | None = None) -> Extension:
    """The exported recipe around ``base`` (default: ``rebuild_base``), with its weights: every exported
    tensor must find its place, and every parameter and buffer of the recipe (and of a Tessera base or the
    recipe's own model) must be in the export. A caller's ``base``, or an HF one, keeps what the export does
    not hold."""
    from safetensors.torch import load_file

    export_dir = Path(export_dir)
    info = json.loads((export_dir / META).read_text())
    cls = resolve_recipe(info["recipe"])
    base_from_outside = base is not None or bool(info.get("hf"))  # its weights need not all be in the export
    if base is None:
        base = rebuild_base(export_dir)
    dim, n_layers = model_shape(base) if base is not None else (0, 0)
    if vocab_size is None:
        vocab_size = (info.get("model_args") or {}).get("vocab_size") or 0
    ctx = RecipeContext(dim=dim, n_layers=n_layers, vocab_size=vocab_size,
                        device=device or torch.device("cpu"), out_dir=export_dir, rank=0, seed=info["seed"],
                        lm_loss=lm_loss)
    with torch.random.fork_rng(devices=[]):  # every weight is loaded next: the initial values do not matter
        ext = cls(base, ctx, parse_options(cls, info["options"]))
        if base is None:
            ext.base = ext.build_model()
    _load_every_tensor(ext, load_file(str(export_dir / WEIGHTS)), export_dir / WEIGHTS, what=cls.__name__,
                       optional="base." if base_from_outside else None)
    return ext.eval()


def _load_every_tensor(module: nn.Module, state: dict[str, torch.Tensor], path: Path, *, what: str,
                       optional: str | None = None) -> None:
    """Load ``state`` into ``module``: every tensor must have a place, and every parameter and (persistent)
    buffer of ``module`` must be in ``state``, except those under the prefix ``optional``."""
    own = module.state_dict()
    unknown = sorted(set(state) - set(own))
    if unknown:
        raise ResearchExportError(f"{path}: {unknown[0]} has no place in {what} (as {path.parent / META} "
                                  f"describes it)")
    missing = sorted(k for k in set(own) - set(state) if optional is None or not k.startswith(optional))
    if missing:
        raise ResearchExportError(f"{path}: {what}'s {missing[0]} is not in the export ({len(missing)} "
                                  f"tensors missing); export the run again with this version")
    module.load_state_dict(state, strict=False)
