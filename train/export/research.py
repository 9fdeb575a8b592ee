"""Export of a research run: the recipe's own weights, and how to rebuild the recipe around its base.

    out/extension.safetensors   every tensor the checkpoint holds for the recipe (its modules, buffers, trainable
                                base parameters such as LoRA's); complex parameters are stored as real views, so
                                both parts survive
    out/research.json           recipe, options, step, and what the base was (hf identity or model args)
    out/adapter/                the PEFT adapter of an HF base with LoRA (as every checkpoint holds it)
    out/tokenizer files

``load_research(out, base)`` builds the recipe around ``base`` (the same frozen model the run started from; None
for a recipe that is its own model) and loads the exported weights: the outputs are the run's.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn

from model import ModelArgs, Transformer
from model.hf import load_hf_pretrained
from model.hf_causal import CausalLM, load_causal_lm
from train.data.corpus import atomic_dir
from train.export.consolidate import consolidated_state_dict
from train.objectives.lm import lm_loss
from train.research.api import Extension, RecipeContext, parse_options, resolve_recipe
from train.research.run import model_shape

WEIGHTS, META = "extension.safetensors", "research.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt")


def export_research(tag_dir: Path, meta: dict[str, Any], out: Path, *, overwrite: bool = False) -> Path:
    """Write the recipe's weights and its description from the checkpoint ``tag_dir``."""
    from safetensors.torch import save_file


    state = {k: v.contiguous() for k, v in consolidated_state_dict(tag_dir).items()}
    info = {"recipe": meta["research"]["recipe"], "options": meta["research"]["options"], "step": meta.get("step"),
            "hf": meta.get("hf"), "model_args": meta.get("model_args"),
            "freeze_base": meta.get("config", {}).get("research", {}).get("freeze_base", True),
            "seed": meta.get("config", {}).get("train", {}).get("seed", 0),
            "init_from": meta.get("config", {}).get("model", {}).get("init_from")}
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


def rebuild_base(export_dir: str | Path) -> nn.Module | None:
    """The base the run started from: the HF model of ``hf.path`` (with the exported adapter), or the native
    model from its args, initialised from the run's seed or loaded from ``model.init_from``; None for a recipe
    that is its own model."""
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

    args = ModelArgs(**info["model_args"])
    torch.manual_seed(info["seed"])  # as train/main.py's build_model
    model = Transformer(args)
    model.init_weights()
    if info.get("init_from"):
        model.load_state_dict(load_hf_pretrained(info["init_from"], max_seq_len=args.max_seq_len)[1])
    return model


def load_research(export_dir: str | Path, base: nn.Module | None = None, *, vocab_size: int | None = None,
                  device: torch.device | None = None) -> Extension:
    """The exported recipe around ``base`` (default: ``rebuild_base``), with its weights; every exported tensor
    must find its place."""
    from safetensors.torch import load_file

    export_dir = Path(export_dir)
    info = json.loads((export_dir / META).read_text())
    cls = resolve_recipe(info["recipe"])
    if base is None:
        base = rebuild_base(export_dir)
    dim, n_layers = model_shape(base) if base is not None else (0, 0)
    if vocab_size is None:
        vocab_size = (info.get("model_args") or {}).get("vocab_size") or 0
    ctx = RecipeContext(dim=dim, n_layers=n_layers, vocab_size=vocab_size, device=device or torch.device("cpu"),
                        out_dir=export_dir, rank=0, seed=info["seed"], lm_loss=lm_loss)
    torch.manual_seed(info["seed"] + 1)
    ext = cls(base, ctx, parse_options(cls, info["options"]))
    if base is None:
        ext.base = ext.build_model()
    state = load_file(str(export_dir / WEIGHTS))
    own = ext.state_dict()
    unknown = sorted(set(state) - set(own))
    if unknown:
        raise KeyError(f"{export_dir / WEIGHTS}: {unknown[0]} has no place in {cls.__name__} around this base")
    missing = sorted(k for k in set(own) - set(state) if not k.startswith("base."))
    if missing:
        raise KeyError(f"{export_dir / WEIGHTS}: the recipe's {missing[0]} is not in the export")
    ext.load_state_dict(state, strict=False)
    return ext.eval()
