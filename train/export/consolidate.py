"""DeepSpeed checkpoint files (any ZeRO stage, tensor- and pipeline-parallel shards) to one plain state dict
with Tessera's parameter names.

Weights come from DeepSpeed's own files: under ZeRO-0 the full `module` state dict of
`mp_rank_00_model_states.pt`; under ZeRO 1-3 DeepSpeed's `zero_to_fp32` consolidation of the fp32
master weights. Every file is read weights-only (train/checkpoint/safe_load.py, DeepSpeed's `zero_to_fp32`
included): a file holding any other object is refused, and nothing in it runs. The checkpoint is verified
first (the size and sha256 of each file against those recorded at save, train/checkpoint/verify.py).
"""

from __future__ import annotations

import contextlib
import io
import logging
import re
import tempfile
from pathlib import Path
from typing import Any

import torch

from model import ModelArgs, ModelConfigError
from model.hf_causal import causal_lm_config, meta_model
from parallel.pipeline import LAYER_FILE, pipe_to_plain_key
from parallel.tp import HF_LLAMA_TP_PLAN, merge_tp_shards, tp_shard_layout
from train.checkpoint.safe_load import load, weights_only_loads
from train.checkpoint.verify import newest_verified, verified
from train.checkpoint.writer import CKPT_DIR, META_FILE, CheckpointError, complete_checkpoints, read_meta
from train.checkpoint.zero_files import module_buffers, optim_files, read_zero12

log = logging.getLogger(__name__)


_STAGE0_FILE = "mp_rank_00_model_states.pt"


_ZERO_OPTIM_GLOB = "zero_pp_rank_*_mp_rank_*_optim_states.pt"


class ExportError(ValueError):
    """A checkpoint that cannot be exported; the message names the path, the problem and the fix."""


def resolve_checkpoint(path: str | Path) -> Path:
    """The complete, verified checkpoint tag dir named by `path`: a tag dir, a run's checkpoints/ dir or a run
    dir.

    For a run dir it is the newest complete checkpoint whose files match the sizes and sha256 recorded at save
    (a newer one that does not is skipped with a warning naming the file); a tag dir that does not verify is
    refused. A tag dir without tessera.json is incomplete (still being written, or cut off) and is refused.
    """
    p = Path(path)
    if not p.is_dir():
        raise ExportError(f"{p}: no such directory; pass a run dir or a checkpoint dir (checkpoints/step_N)")
    if (p / META_FILE).is_file():
        try:
            return verified(p, checksums=True)
        except CheckpointError as err:
            raise ExportError(f"{err} Export another checkpoint.") from None
    run_dir = p.parent if p.name == CKPT_DIR else p
    if (run_dir / CKPT_DIR).is_dir():
        if not complete_checkpoints(run_dir):
            raise ExportError(f"{run_dir}: no complete checkpoint under {CKPT_DIR}/ (none has {META_FILE})")
        try:
            tag_dir = newest_verified(run_dir, checksums=True)
        except CheckpointError as err:
            raise ExportError(str(err)) from None
        if tag_dir is None:
            raise ExportError(f"{run_dir}: no checkpoint under {CKPT_DIR}/ verifies (see the warnings above)")
        return tag_dir
    if any(p.glob("*model_states.pt")):
        raise ExportError(f"{p}: incomplete checkpoint (no {META_FILE}); export a complete one")
    raise ExportError(f"{p}: neither a Tessera run dir nor a checkpoint dir (no {META_FILE}, no {CKPT_DIR}/)")


def checkpoint_model_args(meta: dict[str, Any], tag_dir: Path) -> ModelArgs:
    """The ModelArgs a checkpoint was trained with, from its tessera.json."""
    fields = meta.get("model_args")
    if not isinstance(fields, dict):
        raise ExportError(f"{tag_dir / META_FILE}: no model_args; this checkpoint was not written by Tessera")
    try:
        return ModelArgs(**fields).validate()
    except (TypeError, ModelConfigError) as err:  # a field this version does not know, or a bad value
        raise ExportError(
            f"{tag_dir / META_FILE}: model_args do not fit this Tessera version ({err})"
        ) from err


def _pipeline_state_dict(tag: Path) -> dict[str, torch.Tensor]:
    """The plain state dict of a pipeline checkpoint: its per-piece files, joined over TP ranks when tp > 1.

    These are the module weights in the precision they were trained in (under bf16 the fp32 master copy in
    the ZeRO-1 optimizer files is not used).
    """
    args = checkpoint_model_args(read_meta(tag), tag)
    per_tp: dict[int, dict[str, torch.Tensor]] = {}
    for f in sorted(tag.glob("layer_*-model_states.pt")):
        m = LAYER_FILE.search(f.name)
        if m is None:
            continue
        layer, tp_rank = int(m.group(1)), int(m.group(2) or 0)
        try:
            saved = load(f)
        except CheckpointError as err:
            raise ExportError(f"{err} Export another checkpoint.") from None
        for key, tensor in saved.items():
            per_tp.setdefault(tp_rank, {})[pipe_to_plain_key(layer, key, args.n_layers)] = tensor
    if sorted(per_tp) != list(range(len(per_tp))):
        raise ExportError(f"{tag}: pipeline files of tensor-parallel ranks {sorted(per_tp)}; some are "
                          f"missing")
    shards = [per_tp[r] for r in range(len(per_tp))]
    state = shards[0] if len(shards) == 1 else merge_tp_shards(shards, tp_shard_layout(args, len(shards)))
    if args.tie_embeddings and "embed_tokens.weight" in state:
        state["lm_head.weight"] = state["embed_tokens.weight"]
    return state


def _model_parallel_ranks(tag_dir: Path) -> list[int]:
    """The model-parallel (tensor-parallel) ranks whose files the checkpoint holds: [0] without TP."""
    ranks = {int(m.group(1)) for f in tag_dir.glob("*mp_rank_*")
             if (m := re.search(r"mp_rank_(\d+)", f.name))}
    return sorted(ranks) or [0]


def consolidated_state_dict(tag_dir: str | Path) -> dict[str, torch.Tensor]:
    """The full model state dict (Tessera names, on CPU) of a DeepSpeed checkpoint of any ZeRO stage and tp.

    ZeRO 1-3 (per-rank `zero_pp_rank_*_optim_states.pt`): DeepSpeed's `zero_to_fp32` rebuilds the
    fp32 master weights. ZeRO-0: the `module` entry of `mp_rank_00_model_states.pt` (the weights in the
    precision they were trained in). A tensor-parallel checkpoint is consolidated per TP rank, then its
    shards are joined along the dimension each was split on (vocabulary padding dropped); a pipeline
    checkpoint is read from its per-piece files. A tied head appears under both of its names.
    """
    tag = Path(tag_dir)
    ep = int(read_meta(tag).get("config", {}).get("parallel", {}).get("ep", 1)) if (tag / META_FILE).is_file() else 1
    if ep > 1:
        return _expert_parallel_state_dict(tag, ep)
    if any(tag.glob("layer_*-model_states.pt")):
        return _pipeline_state_dict(tag)
    mp_ranks = _model_parallel_ranks(tag)
    if mp_ranks == [0]:
        return _consolidate_one(tag)
    if mp_ranks != list(range(len(mp_ranks))):
        raise ExportError(f"{tag}: tensor-parallel ranks {mp_ranks} are not 0..{len(mp_ranks) - 1}; files "
                          f"are missing")
    meta = read_meta(tag)
    layout, tied = _tp_layout(meta, tag, len(mp_ranks))
    shards = []
    for r in mp_ranks:
        with tempfile.TemporaryDirectory(prefix="tessera-tp-") as tmp:
            view = Path(tmp) / tag.name  # this TP rank's files, named as DeepSpeed's tools expect of rank 0
            view.mkdir()
            for f in tag.glob(f"*mp_rank_{r:02d}*"):
                (view / f.name.replace(f"mp_rank_{r:02d}", "mp_rank_00")).symlink_to(f.resolve())
            shards.append(_consolidate_one(view))
    # the merged vocabulary is a slice of the padded concatenation: each tensor gets its own storage
    state = {name: _own_storage(tensor) for name, tensor in merge_tp_shards(shards, layout).items()}
    if tied is not None and tied[0] in state:
        state[tied[1]] = state[tied[0]]
    return state


def _expert_parallel_state_dict(tag: Path, ep: int) -> dict[str, torch.Tensor]:
    """The full state dict of an expert-parallel (ZeRO 1/2) checkpoint: every rank's fp32 partitions joined, the
    experts of every expert-parallel rank joined along the expert dimension (train/checkpoint/zero_files.py), TP
    shards joined by the plan; buffers from the model-states file."""
    meta = read_meta(tag)
    try:
        files = optim_files(tag)
        shards = [{name: s["fp32"] for name, s in read_zero12(tag, mp, files[mp], ep=ep, keys=("fp32",)).states.items()}
                  for mp in range(len(files))]
        buffers = module_buffers(tag / _STAGE0_FILE)
    except CheckpointError as err:
        raise ExportError(f"{err} Export another checkpoint.") from None
    layout, tied = _tp_layout(meta, tag, len(shards))
    state = {name: _own_storage(t) for name, t in merge_tp_shards(shards, layout).items()}
    state.update(buffers)
    if tied is not None and tied[0] in state:
        state[tied[1]] = state[tied[0]]
    return state


def _tp_layout(meta: dict[str, Any], tag: Path, tp: int) -> tuple[dict[str, Any], tuple[str, str] | None]:
    """The split of each state-dict key of a tp-way checkpoint, and the (embedding, head) names when tied."""
    if not meta.get("hf"):
        args = checkpoint_model_args(meta, tag)
        tied = ("embed_tokens.weight", "lm_head.weight") if args.tie_embeddings else None
        return tp_shard_layout(args, tp), tied
    # an hf.path run: the wrapper puts `model.` in front
    try:
        config = causal_lm_config(meta["hf"]["path"], where="the run's base model")
    except ModelConfigError as err:
        raise ExportError(f"{tag}: {err}") from err
    layout = tp_shard_layout(meta_model(config), tp, HF_LLAMA_TP_PLAN)
    tied = ("model.model.embed_tokens.weight", "model.lm_head.weight") if config.tie_word_embeddings else None
    return {f"model.{name}": spec for name, spec in layout.items()}, tied


def _consolidate_one(tag: Path) -> dict[str, torch.Tensor]:
    """The state dict of model-parallel rank 0's files in ``tag`` (the whole model without TP)."""
    if any(tag.glob(_ZERO_OPTIM_GLOB)):
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        chatter = io.StringIO()  # zero_to_fp32 prints its progress; keep stdout for the caller
        try:
            with contextlib.redirect_stdout(chatter), weights_only_loads():
                state = get_fp32_state_dict_from_zero_checkpoint(str(tag.parent), tag=tag.name)
        except CheckpointError as err:
            raise ExportError(f"{err} Export another checkpoint.") from None
        except (FileNotFoundError, ValueError) as err:
            raise ExportError(f"{tag}: DeepSpeed could not consolidate this ZeRO checkpoint ({err})") from err
        log.debug("zero_to_fp32: %s", chatter.getvalue())
        return {name: _own_storage(tensor) for name, tensor in state.items()}
    stage0 = tag / _STAGE0_FILE
    if not stage0.is_file():
        raise ExportError(f"{tag}: no DeepSpeed model states ({_STAGE0_FILE} or {_ZERO_OPTIM_GLOB}) in it")
    try:
        saved = load(stage0, mmap=True)
    except CheckpointError as err:
        raise ExportError(f"{err} Export another checkpoint.") from None
    module = saved.get("module") if isinstance(saved, dict) else None
    if not module:
        raise ExportError(
            f"{stage0}: holds no 'module' state dict; was it written by engine.save_checkpoint?"
        )
    if any(tag.glob("bf16_zero_pp_rank_*_optim_states.pt")):
        log.warning("%s: bf16 ZeRO-0 checkpoint: exporting the bf16 module weights "
                    "(its fp32 master weights are not used)", tag)
    return {name: tensor.detach().clone() for name, tensor in module.items()}


def _own_storage(tensor: torch.Tensor) -> torch.Tensor:
    """`tensor`, copied when it is not a contiguous tensor filling its whole storage (a view into ZeRO 1/2 flat
    groups, or the vocabulary rows cut from a padded tensor-parallel merge), so safetensors saves it alone."""
    whole = tensor.untyped_storage().nbytes() == tensor.numel() * tensor.element_size()
    if whole and tensor.is_contiguous() and tensor.storage_offset() == 0:
        return tensor
    return tensor.contiguous().clone()
