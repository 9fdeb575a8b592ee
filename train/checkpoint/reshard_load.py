"""Loading a layout-free copy (train/checkpoint/reshard.py) into an engine of another parallel layout.

Under ZeRO 1-3 (and bf16) each TP rank gets a *view*: a universal-format directory whose files hold that rank's
shard of every tensor, named as this engine names its parameters. DeepSpeed's universal load reads it (the
shapes already match, so it splits nothing by TP), partitions it over this run's ZeRO ranks and rebuilds the
16/32-bit weights. Under fp32 ZeRO 0 the optimizer is a plain torch one: weights and Adam state are set here.
"""

from __future__ import annotations

import logging
import os
import uuid
from pathlib import Path
from typing import Any

import torch

from parallel.layers import TPContext
from parallel.moe import ExpertParallelExperts
from train.checkpoint.reshard import (
    BUFFERS,
    MODEL_STATES,
    STATES,
    Layout,
    local_shard,
    named_engine_params,
    plain_name,
    prepare,
    resolve,
    saved_layout,
    saved_zero_family,
    zero_family,
)
from train.checkpoint.resize import repair_universal_load, universal_switch
from train.checkpoint.safe_load import load, weights_only_loads
from train.checkpoint.writer import CheckpointError

VIEWS = "views"
log = logging.getLogger("tessera")


def run_layout(engine: Any, tp_ctx: TPContext | None) -> Layout:
    """This run's layout, from its engine (pipeline stages, expert-parallel experts) and TP context."""
    import torch.distributed as dist

    ep = max((size for _, size in expert_slices(engine).values()), default=1)
    return Layout(tp=tp_ctx.size if tp_ctx is not None else 1, pp=int(getattr(engine, "num_stages", 1)),
                  world_size=dist.get_world_size(), ep=ep)


def expert_slices(engine: Any) -> dict[str, tuple[int, int]]:
    """Per engine parameter name of an expert-parallel experts module: (its expert-parallel rank, ep)."""
    found: dict[str, tuple[int, int]] = {}
    for prefix, module in engine.module.named_modules():
        if isinstance(module, ExpertParallelExperts):
            for name, _ in module.named_parameters(recurse=False):
                found[f"{prefix}.{name}" if prefix else name] = (module.ep_rank, module.ep_size)
    return found


def _this_rank_part(full: torch.Tensor, param: torch.nn.Parameter, name: str, experts: dict[str, tuple[int, int]],
                    tp_ctx: TPContext | None) -> torch.Tensor:
    """This rank's part of the full tensor ``full``: its experts (dim 0) under expert parallelism, then its TP
    shard."""
    if name in experts:
        rank, ep = experts[name]
        if full.shape[0] % ep:
            raise CheckpointError(f"layout-free copy: {name} holds {full.shape[0]} experts, which parallel.ep={ep} "
                                  f"does not divide")
        full = full.chunk(ep)[rank]
    return local_shard(full, param, tp_ctx, name)


def matched_groups(saved: list[dict[str, Any]], current: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The saved parameter groups' settings in the order of this optimizer's groups ``current``, matched by name
    when the names differ (an expert group appears, vanishes or is renamed when ep changes): a group the
    checkpoint lacks keeps its own settings, with the saved learning rate."""
    if [g.get("name") for g in saved] == [g.get("name") for g in current]:
        return saved
    by_name = {g.get("name"): g for g in saved}
    rate = {k: saved[0][k] for k in ("lr", "initial_lr") if saved and k in saved[0]}
    matched = []
    for group in current:
        source = by_name.get(group.get("name"))
        if source is None:
            source = {**{k: v for k, v in group.items() if k != "params"}, **rate, "params": []}
        matched.append(source)
    return matched


def _fit_scheduler(state: dict[str, Any] | None, n_groups: int) -> dict[str, Any] | None:
    """A LambdaLR state saved with another number of parameter groups (ep changed) fitted to ``n_groups``: every
    group of a Tessera run follows the one schedule from the same base rate."""
    if state is None or len(state.get("base_lrs", [])) in (0, n_groups):
        return state
    fitted = dict(state)
    for key in ("base_lrs", "_last_lr", "lr_lambdas"):
        if isinstance(state.get(key), list) and state[key]:
            fitted[key] = [state[key][0]] * n_groups
    return fitted


def _save(obj: Any, path: Path) -> None:
    """Write atomically: ranks holding the same tensor (a tied embedding, DP replicas) may write it at once."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _first_of_replicas(engine: Any, ep: int) -> bool:
    """Whether this rank writes the shards of its (tp, pp, expert-parallel) coordinate: data-parallel rank 0, or
    under expert parallelism the first ``ep`` data-parallel ranks (one per expert-parallel rank)."""
    import torch.distributed as dist

    group = getattr(engine, "data_parallel_group", None)
    return group is None or dist.get_rank(group=group) < ep


def write_view(engine: Any, free: Path, meta: dict[str, Any], tp_ctx: TPContext | None) -> Path:
    """Collective: this TP rank's view of the layout-free copy, in DeepSpeed's universal format."""
    import torch.distributed as dist

    layout = run_layout(engine, tp_ctx)
    ep_rank = max((rank for rank, _ in expert_slices(engine).values()), default=0)
    ep_tag = (f"-ep{layout.ep}", f"-ep{ep_rank}") if layout.ep > 1 else ("", "")
    view = (free / VIEWS / f"tp{layout.tp}-pp{layout.pp}{ep_tag[0]}" /
            f"tp{tp_ctx.rank if tp_ctx is not None else 0}{ep_tag[1]}")
    error = None
    try:
        _write_shards(engine, free, view, meta, tp_ctx)
    except (CheckpointError, OSError) as err:  # every rank stops with the first rank's line, none waits
        error = f"could not write the layout-free view {view}: {err}"
    gathered: list[str | None] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, error)
    failed = [e for e in gathered if e is not None]
    if failed:
        raise CheckpointError(failed[0])
    return view


def _write_shards(engine: Any, free: Path, view: Path, meta: dict[str, Any], tp_ctx: TPContext | None) -> None:
    """This rank's part of a view: its shards (one replica per data-parallel group) and the engine state."""
    n_layers = int((meta.get("model_args") or {}).get("n_layers", 0))
    experts = expert_slices(engine)
    groups = engine.optimizer.param_groups
    if _first_of_replicas(engine, run_layout(engine, tp_ctx).ep):
        for name, param in named_engine_params(engine):
            source = resolve(free, plain_name(name, n_layers))
            for state in STATES:
                full = load(source / f"{state}.pt")["param"]
                _save({"param": _this_rank_part(full, param, name, experts, tp_ctx)},
                      view / "zero" / name / f"{state}.pt")
            _save(load(source / "step.pt"), view / "zero" / name / "step.pt")
        optim = load(free / "zero" / "optimizer_state.pt")
        optim["param_groups"] = matched_groups(optim.get("param_groups") or [], groups)
        optim["optimizer_state_dict"]["param_groups"] = optim["param_groups"]
        _save(optim, view / "zero" / "optimizer_state.pt")
    # the engine-state file (step, samples, LR scheduler): one per view, which every rank's engine finds
    saved = load(free / MODEL_STATES)
    states = {**saved, "mp_world_size": 1, "lr_scheduler": _fit_scheduler(saved.get("lr_scheduler"), len(groups))}
    _save(states, Path(engine._get_ckpt_name(str(view.parent), view.name, mp_placeholder="00", pp_placeholder="0")))


def _place_plain(engine: Any, free: Path, meta: dict[str, Any], tp_ctx: TPContext | None) -> None:
    """fp32 ZeRO 0: weights into the module, Adam moments and step into the torch optimizer, engine counters."""
    optimizer = engine.optimizer
    n_layers = int((meta.get("model_args") or {}).get("n_layers", 0))
    saved = load(free / "zero" / "optimizer_state.pt")
    groups = matched_groups(saved.get("param_groups") or [], optimizer.param_groups)
    if len(groups) != len(optimizer.param_groups):
        raise CheckpointError(f"{free}: the checkpoint has {len(groups)} parameter groups, this optimizer "
                              f"{len(optimizer.param_groups)}; resume with the recipe it was trained with.")
    for group, saved_group in zip(optimizer.param_groups, groups):
        group.update({k: v for k, v in saved_group.items() if k != "params"})
    step = saved["optimizer_state_dict"]["state"][0]["step"]
    by_param = {id(p): n for n, p in named_engine_params(engine)}
    experts = expert_slices(engine)
    with torch.no_grad():
        for group in optimizer.param_groups:
            for param in group["params"]:
                name = by_param[id(param)]
                source = resolve(free, plain_name(name, n_layers))
                shards = {s: _this_rank_part(load(source / f"{s}.pt")["param"], param, name, experts, tp_ctx)
                          for s in STATES}
                param.copy_(shards["fp32"].to(param.dtype))
                optimizer.state[param] = {"step": torch.as_tensor(float(step), dtype=torch.float32),
                                          "exp_avg": shards["exp_avg"].to(param.dtype).clone(),
                                          "exp_avg_sq": shards["exp_avg_sq"].to(param.dtype).clone()}
    states = load(free / MODEL_STATES)
    if engine.lr_scheduler is not None and states.get("lr_scheduler") is not None:
        engine.lr_scheduler.load_state_dict(_fit_scheduler(states["lr_scheduler"], len(optimizer.param_groups)))
    engine.global_steps = int(states.get("global_steps", 0))
    engine.global_samples = int(states.get("global_samples", 0))
    engine.skipped_steps = int(states.get("skipped_steps", 0))


def load_resharded(engine: Any, tag_dir: Path, meta: dict[str, Any], *, rank: int,
                   tp_ctx: TPContext | None) -> str:
    """Collective: load ``tag_dir`` (saved on another layout) into ``engine``; the path loaded from."""
    free = prepare(tag_dir, rank=rank)
    if rank == 0:
        family = zero_family(engine.zero_optimization_stage(), bf16=bool(engine.bfloat16_enabled()))
        log.info("parallel layout changed from %s (ZeRO %s) to %s (ZeRO %s): checkpoint %s loads from its "
                 "layout-free copy %s", saved_layout(meta).describe(), saved_zero_family(tag_dir),
                 run_layout(engine, tp_ctx).describe(), family, tag_dir.name, free)
    if isinstance(engine.optimizer, torch.optim.Optimizer):
        _place_plain(engine, free, meta, tp_ctx)
        _place_buffers(engine, free, meta)
        return str(free)
    view = write_view(engine, free, meta, tp_ctx)
    with universal_switch(engine), weights_only_loads():
        path, _ = engine.load_checkpoint(str(view.parent), tag=view.name)
    if path is None:
        raise CheckpointError(f"DeepSpeed could not load the layout-free view {view}.")
    repair_universal_load(engine, view)
    _place_buffers(engine, free, meta)
    return path


def _place_buffers(engine: Any, free: Path, meta: dict[str, Any]) -> None:
    path = free / BUFFERS
    place_buffers(engine, load(path) if path.is_file() else {}, meta)


def place_buffers(engine: Any, saved: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    """The module's persistent buffers as saved, by plain name (DeepSpeed's universal load restores parameters
    only: an MoE router's aux-loss-free bias would restart from zero)."""
    n_layers = int((meta.get("model_args") or {}).get("n_layers", 0))
    with torch.no_grad():
        for name, buffer in engine.module.named_buffers():
            plain = plain_name(name, n_layers)
            if plain in saved and saved[plain].shape == buffer.shape:
                buffer.copy_(saved[plain].to(buffer.dtype))
