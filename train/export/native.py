"""Tessera models handed on without Hugging Face: native exports, and where ``model.init_from`` reads weights.

A model with a feature transformers has no class for (attention sinks) cannot become an HF directory, yet it
must go on past pretraining: SFT, DPO, reward / verifier and classification runs start from it with
``model.init_from=<source>`` (weights only, a fresh optimizer). A source is one of

- a local HF Llama / Mistral / Qwen2 / Qwen3 directory (``config.json``; `model.hf.load_hf_pretrained`);
- a native export (``tessera_model.json`` + ``model.safetensors`` with Tessera names + the tokenizer files),
  written by `export_native` (a chain of stages writes one where an HF export is impossible);
- a Tessera run directory or one of its checkpoints (``checkpoints/step_N``): the newest complete, verified
  checkpoint is consolidated (any ZeRO stage, tp, pp).

    args, state = load_start("runs/pretrain", max_seq_len=256)   # ModelArgs and a strict state dict
    export_native("runs/pretrain/checkpoints/step_40", "runs/pretrain/export")

A sequence head's checkpoint (reward, classification) is exported whole, its ``score`` included; as a start it
gives its decoder: the score head is dropped and an untied LM head starts at zero.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
from pathlib import Path
from typing import Any

import torch

from model import ModelArgs, ModelConfigError
from model.hf import args_from_hf_config, check_state_dict, load_hf_config, load_hf_pretrained
from train.checkpoint.writer import CKPT_DIR, META_FILE, latest_complete, read_meta
from train.data.corpus import atomic_dir
from train.export.consolidate import (
    ExportError,
    checkpoint_model_args,
    consolidated_state_dict,
    resolve_checkpoint,
)

log = logging.getLogger("tessera")

NATIVE_FILE = "tessera_model.json"
"""The file that marks a native export: the ModelArgs and where the weights came from."""
WEIGHTS_FILE = "model.safetensors"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "vocab.json", "merges.txt", "tokenizer.model", "chat_template.jinja")


def source_kind(path: str | Path) -> str:
    """What ``path`` holds: 'hf' (config.json), 'native' (a native export), 'run' (a Tessera run or checkpoint
    dir), or 'none'."""
    p = Path(path)
    if (p / NATIVE_FILE).is_file():
        return "native"
    if (p / "config.json").is_file():
        return "hf"
    if (p / META_FILE).is_file() or (p / CKPT_DIR).is_dir() or (p.name == CKPT_DIR and p.is_dir()):
        return "run"
    return "none"


def _newest_tag(path: Path) -> Path:
    """The checkpoint a run or checkpoint dir names (its newest complete one), unverified: for reading its
    tessera.json while a recipe is checked (`load_start` verifies the files it reads)."""
    if (path / META_FILE).is_file():
        return path
    tag = latest_complete(path.parent if path.name == CKPT_DIR else path)
    if tag is None:
        raise ModelConfigError(f"{path}: no complete checkpoint (none has {META_FILE}); train the run further or "
                               f"name another one")
    return tag


def start_tokenizer(path: str | Path) -> str | None:
    """The tokenizer a Tessera source trained with: a native export (its copy of the files), or the run's
    recorded tokenizer dir; None for an HF dir (the recipe names its tokenizer) or when none is found."""
    p = Path(path)
    kind = source_kind(p)
    if kind == "native":
        return str(p)
    if kind != "run":
        return None
    try:
        recorded = read_meta(_newest_tag(p)).get("tokenizer_dir")
    except (ModelConfigError, OSError, json.JSONDecodeError):
        return None
    return recorded if recorded and (Path(recorded) / "tokenizer.json").is_file() else None


def _native_args(fields: Any, where: str) -> ModelArgs:
    if not isinstance(fields, dict):
        raise ModelConfigError(f"{where}: no model_args object; re-export the run")
    try:
        return ModelArgs(**fields).validate()
    except TypeError as e:
        raise ModelConfigError(f"{where}: model_args do not fit this Tessera version ({e})") from None


def start_args(path: str | Path, *, max_seq_len: int | None = None) -> ModelArgs:
    """The ModelArgs of the model ``model.init_from=path`` starts from (cheap: no weights are read).

    max_seq_len replaces the source's when given. Anything unusable is one ModelConfigError naming the path.
    """
    p = Path(path)
    kind = source_kind(p)
    if kind == "hf":
        return args_from_hf_config(load_hf_config(p), max_seq_len=max_seq_len)
    if kind == "native":
        args = _native_args(json.loads((p / NATIVE_FILE).read_text()).get("model_args"), str(p / NATIVE_FILE))
    elif kind == "run":
        tag = _newest_tag(p)
        try:
            args = checkpoint_model_args(read_meta(tag), tag)
        except ExportError as e:
            raise ModelConfigError(str(e)) from None
    else:
        raise ModelConfigError(f"{p}: neither an HF model dir (config.json), a native export ({NATIVE_FILE}) nor "
                               f"a Tessera run or checkpoint dir; pass one of those")
    return args if max_seq_len is None else dataclasses.replace(args, max_seq_len=max_seq_len).validate()


def _decoder_state(state: dict[str, torch.Tensor], args: ModelArgs, meta: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The Transformer's own weights of a checkpoint: a sequence head's scorer gives its decoder."""
    if not meta.get("head"):
        return state
    decoder = {k.removeprefix("model."): v for k, v in state.items()}
    decoder.pop("score.weight", None)  # the scorer's head (model.score in its state dict)
    decoder["lm_head.weight"] = decoder["embed_tokens.weight"] if args.tie_embeddings else \
        torch.zeros(args.vocab_size, args.dim, dtype=decoder["embed_tokens.weight"].dtype)
    return decoder


def _run_state(path: Path) -> tuple[ModelArgs, dict[str, torch.Tensor], Path, dict[str, Any]]:
    """(args, the checkpoint's whole state, checkpoint tag dir, its meta) of a Tessera run or checkpoint dir."""
    try:
        tag = resolve_checkpoint(path)
        meta = read_meta(tag)
        if meta.get("hf") or meta.get("research"):
            raise ModelConfigError(f"{tag}: an {'hf.path' if meta.get('hf') else 'research'} run; model.init_from "
                                   f"takes Tessera models: export it (tools/export_hf.py) and use that")
        args = checkpoint_model_args(meta, tag)
        state = consolidated_state_dict(tag)
    except ExportError as e:
        raise ModelConfigError(str(e)) from None
    return args, state, tag, meta


def load_start(path: str | Path, *, max_seq_len: int | None = None) -> tuple[ModelArgs, dict[str, torch.Tensor]]:
    """(ModelArgs, state dict) of ``model.init_from=path``: `Transformer(args).load_state_dict(state)` is strict.

    Floating tensors are float32; a tied head is the embedding tensor itself.
    """
    from safetensors.torch import load_file

    p = Path(path)
    kind = source_kind(p)
    if kind == "hf":
        return load_hf_pretrained(p, max_seq_len=max_seq_len)
    args = start_args(p, max_seq_len=max_seq_len)
    if kind == "native":
        info = json.loads((p / NATIVE_FILE).read_text())
        state = _decoder_state(load_file(str(p / WEIGHTS_FILE)), args, info)
    else:
        _, state, _, meta = _run_state(p)
        state = _decoder_state(state, args, meta)
    if args.tie_embeddings:
        state["lm_head.weight"] = state["embed_tokens.weight"]
    check_state_dict(args, state, str(p))
    cast = {id(t): t.float() for t in state.values() if t.is_floating_point()}
    return args, {name: cast.get(id(t), t) for name, t in state.items()}


def export_native(path: str | Path, out: str | Path, *, overwrite: bool = False) -> Path:
    """Write the native export of a Tessera run or checkpoint dir ``path`` to ``out`` (the checkpoint's weights with
    Tessera names, a sequence head's score included, the ModelArgs, the run's tokenizer files); written beside and
    renamed into place. Returns ``out``."""
    from safetensors.torch import save_file

    args, state, tag, meta = _run_state(Path(path))
    tensors: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for name, tensor in state.items():  # a tied head is the embedding once (load_start ties it again)
        if id(tensor) not in seen and not (args.tie_embeddings and name.endswith("lm_head.weight")):
            tensors[name] = tensor.detach().contiguous()
            seen.add(id(tensor))
    info = {"model_args": dataclasses.asdict(args), "head": meta.get("head"), "source": str(tag),
            "step": meta.get("step"), "tokenizer": meta.get("tokenizer")}
    tok_dir = Path(meta.get("tokenizer_dir") or "")
    out = Path(out)
    with atomic_dir(out, overwrite=overwrite) as tmp:
        save_file(tensors, str(tmp / WEIGHTS_FILE))
        (tmp / NATIVE_FILE).write_text(json.dumps(info, indent=2))
        for name in TOKENIZER_FILES:
            if (tok_dir / name).is_file():
                shutil.copy2(tok_dir / name, tmp / name)
    log.info("native export of %s (step %s) written to %s", tag, meta.get("step"), out)
    return out


def write_native_placeholder(args: ModelArgs, out: Path) -> None:
    """A directory that reads as the native export of a model of ``args`` (no weights), for checking plans."""
    out.mkdir(parents=True)
    (out / NATIVE_FILE).write_text(json.dumps({"model_args": dataclasses.asdict(args)}))
    (out / WEIGHTS_FILE).touch()
