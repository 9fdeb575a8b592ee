"""Full per-parameter optimizer states read straight from DeepSpeed's files, for checkpoints DeepSpeed's universal
converter cannot read: those of an expert-parallel run (``parallel.ep > 1``, ZeRO 1/2) and fp32 ZeRO-0 ones.

Under ZeRO 1/2 each data-parallel rank ``d`` writes ``zero_pp_rank_<d>_mp_rank_<m>_optim_states.pt``: per
parameter group its partition of the flat fp32 master weights and of the Adam moments, and in
``param_slice_mappings`` where each parameter's fragment lies in that partition. A dense group is partitioned
over the whole data-parallel group (partition ``d``). An expert group (DeepSpeed's ``'moe': True`` group) holds
only the rank's own experts and is partitioned over its expert-data-parallel group: with Tessera's layout
(parallel/dims.py, ``ep`` adjacent data-parallel ranks split the experts) rank ``d`` keeps the experts of
expert-parallel rank ``d % ep`` and is partition ``d // ep`` of them. Joining the fragments in partition order
rebuilds each parameter of one expert-parallel rank; joining those along dim 0 (the expert index) over the
expert-parallel ranks rebuilds all experts::

    layers.0.mlp.experts.gate_up_proj    ep rank 0: experts 0..E/ep-1   ep rank 1: E/ep..2E/ep-1   ...

An fp32 ZeRO-0 run keeps its optimizer whole, a plain torch AdamW, in each TP rank's
``mp_rank_<m>_model_states.pt``: ``module`` holds the rank's (fp32) weights by name, ``optimizer`` the Adam
moments by parameter index in the order of the optimizer's groups. That order is the one `param_groups`
(train/loop/optim.py) gives the model: ``read_zero0`` takes the names per group, and checks every count and shape
against the file before trusting it.

Either way the result is one state dict per model-parallel (TP) rank, by engine parameter name, which
train/checkpoint/reshard.py joins over TP like every other checkpoint. The module's persistent buffers (the
router's aux-loss-free bias) come from the model-states file; they are the same on every rank.
"""

from __future__ import annotations

import dataclasses
import re
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch

from train.checkpoint.safe_load import load
from train.checkpoint.writer import CheckpointError

OPTIM_FILE = re.compile(r"^(?:bf16_)?zero_pp_rank_(\d+)_mp_rank_(\d+)_optim_states\.pt$")
MODEL_FILE = "mp_rank_{:02d}_model_states.pt"
STATE_KEYS = ("fp32", "exp_avg", "exp_avg_sq")
# what optimizer_state.pt of a universal copy keeps from a rank's optimizer file (its global state)
PARTITION_KEYS = ("base_optimizer_state", "single_partition_of_fp32_groups", "param_slice_mappings",
                  "group_paddings", "param_alignment_paddings", "partition_count")


def saved_ep(meta: dict[str, Any]) -> int:
    """The expert-parallel degree a checkpoint was saved with (1 when its tessera.json has none)."""
    return int(meta.get("config", {}).get("parallel", {}).get("ep", 1) or 1)


def optim_files(tag_dir: Path) -> dict[int, dict[int, Path]]:
    """Per model-parallel rank, per data-parallel rank, its ZeRO 1/2 optimizer file (CheckpointError if a rank's
    file is missing)."""
    found: dict[int, dict[int, Path]] = defaultdict(dict)
    for path in tag_dir.iterdir():
        m = OPTIM_FILE.match(path.name)
        if m:
            found[int(m.group(2))][int(m.group(1))] = path
    if not found:
        raise CheckpointError(f"{tag_dir}: no ZeRO 1/2 optimizer files (zero_pp_rank_*_optim_states.pt) in it")
    for mp, by_dp in found.items():
        if sorted(by_dp) != list(range(len(by_dp))):
            raise CheckpointError(f"{tag_dir}: optimizer files of data-parallel ranks {sorted(by_dp)} for "
                                  f"model-parallel rank {mp}; some are missing")
    if sorted(found) != list(range(len(found))):
        raise CheckpointError(f"{tag_dir}: optimizer files of model-parallel ranks {sorted(found)}; some are missing")
    return dict(found)


def _group_states(sd: dict[str, Any], group: int) -> dict[str, torch.Tensor]:
    """The flat partition of each state of one parameter group in one rank's optimizer state."""
    base = sd["base_optimizer_state"]
    adam = base["state"][group] if isinstance(base, dict) else base[group]  # torch's state dict, or elastic
    return {"fp32": sd["single_partition_of_fp32_groups"][group], "exp_avg": adam["exp_avg"],
            "exp_avg_sq": adam["exp_avg_sq"]}


def _is_expert_group(sd: dict[str, Any], group: int, dp: int, ep: int) -> bool:
    base = sd["base_optimizer_state"]
    if isinstance(base, dict) and "param_groups" in base:
        return bool(base["param_groups"][group].get("moe", False))
    return ep > 1 and int(sd["partition_count"][group]) == dp // ep


@dataclasses.dataclass
class ZeroStates:
    """The full states of one model-parallel rank's files: ``states[name][key]`` (key in STATE_KEYS, all experts
    joined), plus the Adam step, the parameter groups and the optimizer's global state."""

    states: dict[str, dict[str, torch.Tensor]]
    step: Any  # the Adam step (one for every parameter)
    param_groups: list[dict[str, Any]]  # the optimizer's groups, their settings as saved
    global_state: dict[str, Any]  # what DeepSpeed's universal load reads besides the tensors (ds_version, ...)


def read_zero12(tag_dir: Path, mp_rank: int, files: dict[int, Path], *, ep: int,
                keys: tuple[str, ...] = STATE_KEYS) -> ZeroStates:
    """Join model-parallel rank ``mp_rank``'s optimizer files (by data-parallel rank) of a run of expert-parallel
    degree ``ep`` into full tensors per engine parameter name."""
    dp = len(files)
    if dp % ep:
        raise CheckpointError(f"{tag_dir}: {dp} data-parallel optimizer files do not split into parallel.ep={ep}")
    model_file = tag_dir / MODEL_FILE.format(mp_rank)
    shapes: dict[str, tuple[int, ...]] = {}
    for group in load(model_file).get("param_shapes") or []:
        shapes.update({name: tuple(shape) for name, shape in group.items()})
    # name -> key -> (ep rank, partition) -> fragment
    pieces: dict[str, dict[str, dict[tuple[int, int], torch.Tensor]]] = defaultdict(lambda: defaultdict(dict))
    experts: set[str] = set()
    first: dict[str, Any] = {}
    for d in range(dp):
        sd = load(files[d], mmap=True)["optimizer_state_dict"]  # read as the fragments are copied
        first = first or sd
        for group, mapping in enumerate(sd["param_slice_mappings"]):
            expert = _is_expert_group(sd, group, dp, ep)
            where = (d % ep, d // ep) if expert else (0, d)
            flat = _group_states(sd, group)
            for name, frag in mapping.items():
                if expert:
                    experts.add(name)
                for key in keys:
                    pieces[name][key][where] = flat[key].narrow(0, frag.start, frag.numel)
    states: dict[str, dict[str, torch.Tensor]] = {}
    for name, by_key in pieces.items():
        if name not in shapes:
            raise CheckpointError(f"{model_file}: no shape recorded for parameter {name}")
        shape, states[name] = shapes[name], {}
        for key, frags in by_key.items():
            per_ep = []
            for e in range(ep if name in experts else 1):
                flat = torch.cat([t for (er, _), t in sorted(frags.items()) if er == e])
                if flat.numel() != torch.Size(shape).numel():
                    raise CheckpointError(f"{tag_dir}: the fragments of {name} hold {flat.numel()} values, its "
                                          f"shape {shape} {torch.Size(shape).numel()}; the checkpoint is incomplete")
                per_ep.append(flat.reshape(shape))
            states[name][key] = (torch.cat(per_ep) if len(per_ep) > 1 else per_ep[0]).detach().clone()
    base = first["base_optimizer_state"]
    groups = base.get("param_groups", []) if isinstance(base, dict) else []
    step = _adam_step(first)
    global_state = {k: v for k, v in first.items() if k not in PARTITION_KEYS}
    return ZeroStates(states, step, groups, global_state)


def _adam_step(sd: dict[str, Any]) -> Any:
    base = sd["base_optimizer_state"]
    if isinstance(base, dict):
        state = base.get("state", {})
        if state and "step" in state.get(0, {}):
            return state[0]["step"]
    if "base_optimizer_state_step" in sd:
        return sd["base_optimizer_state_step"]
    raise CheckpointError("a ZeRO 1/2 optimizer file holds no Adam step")


def module_buffers(model_states: Path) -> dict[str, torch.Tensor]:
    """The module's persistent buffers (engine names) in a DeepSpeed model-states file (none for a pipeline)."""
    saved = load(model_states)
    module = saved.get("module") or {}
    return {name: module[name].clone() for name in saved.get("buffer_names") or [] if name in module}


def read_zero0(tag_dir: Path, mp_rank: int, names: list[list[str]]) -> ZeroStates:
    """Model-parallel rank ``mp_rank``'s weights and Adam state of an fp32 ZeRO-0 checkpoint; ``names``: the
    parameter names of each optimizer group, in the optimizer's order."""
    path = tag_dir / MODEL_FILE.format(mp_rank)
    saved = load(path)
    module, optim = saved.get("module") or {}, saved.get("optimizer")
    if not isinstance(optim, dict) or "state" not in optim or "param_groups" not in optim:
        raise CheckpointError(f"{path}: no torch optimizer state in it; only an fp32 ZeRO-0 checkpoint keeps its "
                              f"Adam state there")
    groups = optim["param_groups"]
    counts, expected = [len(g["params"]) for g in groups], [len(n) for n in names]
    if counts != expected:
        raise CheckpointError(f"{path}: the optimizer's parameter groups hold {counts} parameters, the model the "
                              f"checkpoint records {expected}; its Adam state cannot be matched to names (a recipe "
                              f"with its own parameter groups): resume it with the layout it was saved with.")
    states: dict[str, dict[str, torch.Tensor]] = {}
    step: Any = None
    for group, group_names in zip(groups, names, strict=True):
        for index, name in zip(group["params"], group_names, strict=True):
            weight, adam = module.get(name), optim["state"].get(index)
            if weight is None or adam is None or tuple(adam["exp_avg"].shape) != tuple(weight.shape):
                raise CheckpointError(f"{path}: parameter {name} (optimizer index {index}) has no weight or Adam "
                                      f"state of its shape; resume it with the layout it was saved with.")
            states[name] = {"fp32": weight.detach().float().clone(), "exp_avg": adam["exp_avg"].float().clone(),
                            "exp_avg_sq": adam["exp_avg_sq"].float().clone()}
            step = adam["step"] if step is None else step
    if step is None:
        raise CheckpointError(f"{path}: the optimizer holds no parameter")
    return ZeroStates(states, step, groups, {"ds_version": saved.get("ds_version")})
