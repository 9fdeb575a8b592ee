"""Resuming on another parallel layout: another tensor-parallel (tp), pipeline (pp) or expert-parallel (ep)
degree, data-parallel size or ZeRO stage.

A checkpoint is made layout-free once, beside it, and every later resume from it (on any layout) slices that
copy::

    checkpoints/step_00000100/                         the checkpoint as saved (the one that counts)
    checkpoints/step_00000100.universal/               DeepSpeed's universal copy (train/checkpoint/resize.py)
    checkpoints/step_00000100.universal/layout_free/   full tensors per parameter, by the plain model's name:
        zero/<name>/fp32.pt, exp_avg.pt, exp_avg_sq.pt, step.pt    fp32 master weight and Adam moments
        zero/optimizer_state.pt                                   parameter groups, Adam step, loss scaler
        model_states.pt                                           step, samples, LR scheduler (DeepSpeed's)
        buffers.pt                                                persistent module buffers (a router's bias)
        views/tp2-pp1/tp0/ ...                                    one TP rank's shards, for DeepSpeed to place
        views/tp2-pp1-ep2/tp0-ep1/ ...                            ... and, under ep, one expert-parallel rank's

DeepSpeed's converter (``ds_to_universal``) joins the ZeRO partitions of every rank; without parameter
patterns it joins tensor-parallel shards along dim 0, and Tessera splits them again and joins each along the
dimension its own TP plan split it on (column: rows, row: columns, vocabulary: rows with the padding cut off,
norms: replicated), then renames pipeline pieces (``3.layer.mlp...``, ``tied_modules.embed...``) to the plain
names. DeepSpeed's converter cannot read two kinds of checkpoint, which Tessera reads from their own files
(train/checkpoint/zero_files.py): an expert-parallel one (each rank's experts live only in its own ZeRO 1/2
partition: joined along the expert dimension) and an fp32 ZeRO-0 one (whole weights and the torch optimizer's
Adam state per TP rank). A new layout loads a *view*: per TP rank, a universal-format directory holding that rank's shard of
every tensor (vocabulary rows padded for the new tp; under ep only its own experts) under the new engine's
parameter names. DeepSpeed's own
universal load then splits it over the new ZeRO partition (ZeRO 1-3) and rebuilds the 16/32-bit weights; under
ZeRO 0 Tessera writes weights and Adam state into the module and the torch optimizer itself.

Kept exactly: weights, fp32 master weights, Adam moments and step, parameter-group settings, the LR schedule,
step and data position. Not kept: per-rank RNG streams (which stream a rank owns depends on the layout); they
restart from the run's seed, which changes nothing without dropout.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from model import ModelArgs
from model.hf_causal import causal_lm_config, meta_model
from model.model import Transformer
from parallel.layers import TPContext
from parallel.pipeline import pipe_to_plain_key
from parallel.tp import (
    HF_LLAMA_TP_PLAN,
    TPSplit,
    merge_tp_shards,
    split_spec,
    tp_join,
    tp_shard_layout,
    tp_split,
)
from train.checkpoint.resize import convert, is_current, mark_current, start_copy, universal_dir
from train.checkpoint.safe_load import load
from train.checkpoint.writer import TMP_SUFFIX, CheckpointError, read_meta
from train.checkpoint.zero_files import module_buffers, optim_files, read_zero0, read_zero12, saved_ep
from train.loop.optim import decays

FREE_DIR = "layout_free"  # inside the universal copy: removed with it when the checkpoint is rotated out
STATES = ("fp32", "exp_avg", "exp_avg_sq")
MODEL_STATES = "model_states.pt"
BUFFERS = "buffers.pt"  # persistent module buffers by plain name
ZERO_OPTIM_GLOB = "*zero_pp_rank_*_optim_states.pt"
log = logging.getLogger("tessera")


@dataclasses.dataclass(frozen=True)
class Layout:
    """The parallel layout a checkpoint was saved with, or a run has."""

    tp: int
    pp: int
    world_size: int
    ep: int = 1  # expert-parallel degree (MoE experts split over data-parallel ranks)

    def describe(self) -> str:
        return f"tp={self.tp}, pp={self.pp}{f', ep={self.ep}' if self.ep > 1 else ''}, {self.world_size} ranks"


def saved_layout(meta: dict[str, Any]) -> Layout:
    """The layout recorded in a checkpoint's tessera.json (a field it lacks counts as 1)."""
    parallel = meta.get("config", {}).get("parallel", {})
    return Layout(tp=int(parallel.get("tp", 1)), pp=int(parallel.get("pp", 1)),
                  world_size=int(meta.get("world_size") or 1), ep=saved_ep(meta))


def is_zero_partitioned(tag_dir: Path) -> bool:
    """Whether ``tag_dir`` was saved under ZeRO 1-3 (per-rank optimizer partitions)."""
    return any(tag_dir.glob(ZERO_OPTIM_GLOB))


def saved_zero_family(tag_dir: Path) -> str:
    """How ``tag_dir`` keeps its optimizer state: "0" (whole, fp32 ZeRO 0), "bf16" (bf16 ZeRO 0 partitions),
    "1-2" (ZeRO 1 and 2 share one format) or "3"."""
    if any(tag_dir.glob("zero_pp_rank_*_mp_rank_*_model_states.pt")):
        return "3"
    if any(tag_dir.glob("zero_pp_rank_*_optim_states.pt")):
        return "1-2"
    return "bf16" if any(tag_dir.glob("bf16_zero_pp_rank_*_optim_states.pt")) else "0"


def zero_family(stage: int, *, bf16: bool) -> str:
    """The format an engine of ZeRO ``stage`` loads natively (see saved_zero_family)."""
    return "3" if stage == 3 else "1-2" if stage >= 1 else "bf16" if bf16 else "0"


def needs_reshard(tag_dir: Path, meta: dict[str, Any], now: Layout, family: str | None = None) -> bool:
    """Whether a resume on layout ``now`` (its engine loading ZeRO format ``family``) goes through the
    layout-free copy: another tp or pp, another ZeRO format, or another number of ranks for a tp / pp > 1
    ZeRO 1-3 checkpoint (DeepSpeed's universal load alone would join its tensor-parallel shards wrongly).
    Another DP size of a plain run goes through train/checkpoint/resize.py; a ZeRO-0 checkpoint of the same tp,
    pp and format loads as saved (an fp32 ZeRO-0 one under ZeRO 1-3 goes through the copy, which keeps its Adam
    state)."""
    saved = saved_layout(meta)
    saved_family = saved_zero_family(tag_dir)
    if (saved.tp, saved.pp, saved.ep) != (now.tp, now.pp, now.ep) or (family is not None and family != saved_family):
        return True
    if saved.ep > 1 and saved.world_size != now.world_size:  # each rank's experts live in its own files
        return True
    return saved.tp * saved.pp > 1 and saved.world_size != now.world_size and is_zero_partitioned(tag_dir)


def refusal(tag_dir: Path, meta: dict[str, Any], *, tp: int, pp: int) -> str | None:
    """Why ``tag_dir`` cannot be resumed with ``tp`` and ``pp``, or None when it can: every layout loads a ZeRO 1-3
    checkpoint and an fp32 ZeRO-0 one of pp=1 (its weights and torch Adam state per TP rank); a ZeRO-0 pipeline
    checkpoint (written before the pipeline required ZeRO-1) keeps its layout."""
    saved = saved_layout(meta)
    if (saved.tp, saved.pp) == (tp, pp) or is_zero_partitioned(tag_dir) or saved.pp == 1:
        return None
    return (f"--resume: {tag_dir} is a ZeRO-0 pipeline checkpoint of parallel.tp={saved.tp} parallel.pp={saved.pp}; "
            f"its optimizer state cannot be re-split for tp={tp}, pp={pp}: resume it with tp={saved.tp} "
            f"pp={saved.pp} (its data-parallel size may change).")


# ----------------------------------------------------------------------------- names and splits of the saved run


def plain_name(engine_name: str, n_layers: int) -> str:
    """The plain model's parameter name of an engine parameter (pipeline pieces renamed, others as they are)."""
    if engine_name.startswith("tied_modules."):
        return engine_name.split(".", 2)[2]  # tied_modules.<key>.embed_tokens.weight
    head, _, rest = engine_name.partition(".")
    if head.isdigit() and rest:
        return pipe_to_plain_key(int(head), rest, n_layers)
    return engine_name


def _plain_model(meta: dict[str, Any]) -> tuple[torch.nn.Module, str, dict[str, str] | None]:
    """The checkpoint's model on the meta device, the prefix its engine puts before the names, its TP plan."""
    hf = meta.get("hf")
    if not hf:
        with torch.device("meta"):
            return Transformer(ModelArgs(**meta["model_args"])), "", None
    return meta_model(causal_lm_config(hf["path"], where="the checkpoint's base model")), "model.", HF_LLAMA_TP_PLAN


def tp_layout(meta: dict[str, Any], tp: int) -> dict[str, TPSplit | None]:
    """Per plain name, how a ``tp``-way run splits it: (dim, unpadded rows or None), None when replicated."""
    model, prefix, plan = _plain_model(meta)
    layout = tp_shard_layout(model, tp, plan) if plan is not None else tp_shard_layout(model, tp)
    return {prefix + name: spec for name, spec in layout.items()}


def plain_shapes(meta: dict[str, Any]) -> tuple[dict[str, tuple[int, ...]], set[str]]:
    """Per plain name, the full (unsplit, unpadded) shape of the parameter; and the names that are another
    name's tensor (a tied head), which the copy keeps once, under the first name."""
    model, prefix, _ = _plain_model(meta)
    every = {prefix + name: tuple(p.shape) for name, p in model.named_parameters(remove_duplicate=False)}
    return every, set(every) - {prefix + name for name, _ in model.named_parameters()}


def n_layers_of(meta: dict[str, Any]) -> int:
    return int((meta.get("model_args") or {}).get("n_layers", 0))


def _join(saved: dict[str, Any] | torch.Tensor, spec: TPSplit | None, tp: int, name: str,
          shape: tuple[int, ...] | None = None) -> torch.Tensor:
    """The full tensor of one state from DeepSpeed's universal file of a ``tp``-way run (a ZeRO-3 run of tp=1
    saves the bare tensor, flattened: ``shape`` restores it)."""
    if isinstance(saved, torch.Tensor):
        if tp != 1 or shape is None or saved.numel() != torch.Size(shape).numel():
            raise CheckpointError(f"universal copy: {name} holds a bare tensor of {saved.numel()} values that does "
                                  f"not fit its shape {shape} at tp={tp}")
        return saved.reshape(shape)
    tensor = saved["param"]
    if tp == 1:
        return tensor[: split_spec(spec)[1]] if spec is not None and split_spec(spec)[1] is not None else tensor
    cat_dim = int(saved.get("cat_dim", 0))
    if tensor.shape[cat_dim] % tp:
        raise CheckpointError(f"universal copy: {name} has {tensor.shape[cat_dim]} rows along dim {cat_dim}, not "
                              f"a multiple of the checkpoint's tp={tp}")
    shards = tensor.chunk(tp, cat_dim)
    if spec is None:
        return shards[0].clone()
    return tp_join(shards, spec).clone()


# ----------------------------------------------------------------------------- the layout-free copy


def free_dir(tag_dir: Path) -> Path:
    return universal_dir(tag_dir) / FREE_DIR


def _model_states_file(root: Path) -> Path:
    """The engine-state file DeepSpeed wrote (step, samples, LR scheduler), any rank's."""
    for pattern in ("mp_rank_00_model_states.pt", "mp_rank_*_model_states.pt", "*zero_pp_rank_*_model_states.pt"):
        found = sorted(root.glob(pattern))
        if found:
            return found[0]
    raise CheckpointError(f"{root}: no DeepSpeed model-states file (mp_rank_*_model_states.pt) in it")


def _adam_step(optim: dict[str, Any], universal: Path) -> Any:
    """The Adam step of the saved run: per parameter in a ZeRO 1/2 copy, in the optimizer state under ZeRO 3."""
    state = optim.get("optimizer_state_dict", {}).get("state", {})
    if state and "step" in state.get(0, {}):
        return state[0]["step"]
    for step_file in sorted((universal / "zero").glob("*/step.pt")):
        return load(step_file)
    raise CheckpointError(f"{universal}: no Adam step in the universal copy")


def consolidate(tag_dir: Path) -> Path:
    """Write the layout-free copy of a ZeRO 1-3 checkpoint (reused when current) and return it.

    Runs on one process; the universal copy is made first when it is missing or stale. An expert-parallel
    checkpoint (ep > 1), which DeepSpeed's converter cannot join, is read from its ZeRO 1/2 files directly
    (train/checkpoint/zero_files.py).
    """
    meta = read_meta(tag_dir)
    final = free_dir(tag_dir)
    if is_current(tag_dir) and (final / MODEL_STATES).is_file():
        return final
    from_zero_files = saved_ep(meta) > 1 or saved_zero_family(tag_dir) == "0"
    if from_zero_files:
        start_copy(tag_dir)
    else:
        convert(tag_dir)
    tmp = final.with_name(final.name + TMP_SUFFIX)
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.rmtree(final, ignore_errors=True)
    try:
        if from_zero_files:
            _free_from_zero_files(tag_dir, meta, tmp)
        else:
            _free_from_universal(tag_dir, meta, tmp)
        torch.save(persistent_buffers(tag_dir, meta), tmp / BUFFERS)
        torch.save(load(_model_states_file(tag_dir)), tmp / MODEL_STATES)
        (tmp / "layout.json").write_text(json.dumps(dataclasses.asdict(saved_layout(meta))))
        os.replace(tmp, final)
        if from_zero_files:
            mark_current(tag_dir)
    except OSError as e:
        raise CheckpointError(f"could not write the layout-free copy of {tag_dir} to {final}: {e}") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def _save_state(tmp: Path, name: str, state: str, tensor: torch.Tensor) -> None:
    out = tmp / "zero" / name
    out.mkdir(parents=True, exist_ok=True)
    torch.save({"param": tensor}, out / f"{state}.pt")


def _save_optimizer_state(tmp: Path, global_state: dict[str, Any], groups: Any, step: Any) -> None:
    torch.save({**global_state, "param_groups": groups,
                "optimizer_state_dict": {"state": {0: {"step": step}}, "param_groups": groups}},
               tmp / "zero" / "optimizer_state.pt")


def _free_from_universal(tag_dir: Path, meta: dict[str, Any], tmp: Path) -> None:
    """The layout-free tensors from DeepSpeed's universal copy: TP shards split again and joined by Tessera's
    plan, pipeline names made plain."""
    universal = universal_dir(tag_dir)
    saved = saved_layout(meta)
    layout, n_layers = tp_layout(meta, saved.tp), n_layers_of(meta)
    shapes, aliases = plain_shapes(meta)
    buffers = persistent_buffers(tag_dir, meta)  # DeepSpeed's converter writes them as parameters too
    optim = load(universal / "zero" / "optimizer_state.pt")
    step = _adam_step(optim, universal)
    groups = optim.get("param_groups") or optim.get("optimizer_state_dict", {}).get("param_groups")
    for param_dir in sorted(p for p in (universal / "zero").iterdir() if p.is_dir()):
        name = plain_name(param_dir.name, n_layers)
        if name in aliases or name in buffers:  # a tied head is the embedding; buffers go to buffers.pt
            continue
        if name not in layout:
            raise CheckpointError(f"{universal}: parameter {param_dir.name} ({name}) is not in the model "
                                  f"the checkpoint records")
        for state in STATES:
            _save_state(tmp, name, state, _join(load(param_dir / f"{state}.pt"), layout[name], saved.tp, name,
                                                shapes.get(name)))
        torch.save(step, tmp / "zero" / name / "step.pt")
    global_state = {k: v for k, v in optim.items() if k not in ("optimizer_state_dict", "param_groups")}
    global_state.setdefault("ds_version", load(_model_states_file(tag_dir)).get("ds_version"))  # ZeRO-3 lacks it
    _save_optimizer_state(tmp, global_state, groups, step)


def _free_from_zero_files(tag_dir: Path, meta: dict[str, Any], tmp: Path) -> None:
    """The layout-free tensors read from the checkpoint's own files (train/checkpoint/zero_files.py): an
    expert-parallel ZeRO 1/2 checkpoint (every rank's partitions joined, the experts of every expert-parallel rank
    along the expert dimension) or an fp32 ZeRO-0 one (weights and torch Adam state per TP rank); TP shards joined
    by the plan."""
    saved = saved_layout(meta)
    if saved_zero_family(tag_dir) == "0":
        if saved.pp > 1:
            raise CheckpointError(f"{tag_dir}: a ZeRO-0 pipeline checkpoint (pp={saved.pp}); resume it with "
                                  f"tp={saved.tp} pp={saved.pp}")
        names = optimizer_names(meta)
        per_tp = [read_zero0(tag_dir, mp, names) for mp in range(saved.tp)]
    else:
        files = optim_files(tag_dir)
        if len(files) != saved.tp:
            raise CheckpointError(f"{tag_dir}: optimizer files of {len(files)} model-parallel ranks, its "
                                  f"tessera.json records tp={saved.tp}")
        per_tp = [read_zero12(tag_dir, mp, files[mp], ep=saved.ep) for mp in range(len(files))]
    layout, n_layers = tp_layout(meta, saved.tp), n_layers_of(meta)
    _, aliases = plain_shapes(meta)
    names = [plain_name(name, n_layers) for name in per_tp[0].states]
    for name in names:
        if name not in layout and name not in aliases:
            raise CheckpointError(f"{tag_dir}: parameter {name} is not in the model the checkpoint records")
    for state in STATES:
        shards = [{plain_name(n, n_layers): s[state] for n, s in part.states.items()} for part in per_tp]
        for name, full in merge_tp_shards(shards, layout).items():
            if name not in aliases:
                _save_state(tmp, name, state, full.clone())
    for name in names:
        if name not in aliases:
            torch.save(per_tp[0].step, tmp / "zero" / name / "step.pt")
    _save_optimizer_state(tmp, per_tp[0].global_state, per_tp[0].param_groups, per_tp[0].step)


def optimizer_names(meta: dict[str, Any]) -> list[list[str]]:
    """The parameter names of each group of the run's torch optimizer, in its order: `param_groups` of the
    checkpoint's model (matrices and embeddings decay, vectors do not; a tied head counted once)."""
    model, prefix, _ = _plain_model(meta)
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        (decay if decays(param) else no_decay).append(prefix + name)
    return [decay, no_decay] if no_decay else [decay]


def persistent_buffers(tag_dir: Path, meta: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The module's persistent buffers by plain name (e.g. the router's aux-loss-free bias), from the model-states
    file when the checkpoint has one (a universal load restores parameters only)."""
    n_layers = n_layers_of(meta)
    return {plain_name(name, n_layers): t for name, t in module_buffers(_model_states_file(tag_dir)).items()}


def prepare(tag_dir: Path, *, rank: int) -> Path:
    """Collective: rank 0 makes (or reuses) the layout-free copy; CheckpointError on every rank if it failed."""
    import torch.distributed as dist

    error = None
    if rank == 0:
        try:
            consolidate(tag_dir)
        except CheckpointError as e:
            error = str(e)
    outcome: list[Any] = [error]
    dist.broadcast_object_list(outcome, src=0)
    if outcome[0] is not None:
        raise CheckpointError(outcome[0])
    return free_dir(tag_dir)


# ----------------------------------------------------------------------------- this rank's shard of a tensor


def local_shard(full: torch.Tensor, param: torch.nn.Parameter, tp_ctx: TPContext | None, name: str) -> torch.Tensor:
    """This TP rank's part of ``full`` in the shape of ``param`` (vocabulary rows zero-padded for this tp)."""
    shape = tuple(getattr(param, "ds_shape", param.shape))
    if not getattr(param, "tensor_model_parallel", False) or tp_ctx is None or tp_ctx.size == 1:
        if tuple(full.shape) != shape:
            raise CheckpointError(f"layout-free copy: {name} has shape {tuple(full.shape)}, this run's parameter "
                                  f"{shape}; resume with the model the checkpoint was trained with.")
        return full
    dim, size = param.partition_dim, tp_ctx.size
    local = shape[dim]
    if full.shape[dim] > local * size or full.shape[dim] < local * (size - 1):
        raise CheckpointError(f"layout-free copy: {name} has {full.shape[dim]} along dim {dim}, which does not "
                              f"split into {size} shards of {local}")
    if full.shape[dim] < local * size:  # vocabulary padding of this tp
        pad = list(full.shape)
        pad[dim] = local * size - full.shape[dim]
        full = torch.cat([full, full.new_zeros(pad)], dim=dim)
    stride = int(getattr(param, "partition_stride", 1))  # the experts' gate_up_proj: gate and up rows per rank
    return tp_split(full, (dim, None, stride), size, tp_ctx.rank).contiguous()


def named_engine_params(engine: Any) -> list[tuple[str, torch.nn.Parameter]]:
    return list(engine.module.named_parameters())


def resolve(free: Path, name: str) -> Path:
    """The layout-free directory of plain name ``name`` (a tied head falls back on the embedding)."""
    path = free / "zero" / name
    if path.is_dir():
        return path
    if name.endswith("lm_head.weight"):  # a tied head is saved once, as the embedding (plain or HF names)
        embeddings = [p for p in (free / "zero").iterdir() if p.name.endswith("embed_tokens.weight")]
        if len(embeddings) == 1:
            return embeddings[0]
    raise CheckpointError(f"layout-free copy {free}: no parameter {name}; resume with the model the "
                          f"checkpoint was trained with.")
