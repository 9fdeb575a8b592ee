"""Stages: a chain of training runs, each from an earlier stage's weights (pretrain -> SFT -> DPO -> ...).

    # a stages file
    name: align                      # optional (default: the file's name)
    out_dir: runs/align              # optional (default: runs/<name>); stage runs in out_dir/<stage name>
    overrides: [log.wandb=disabled]  # optional; applied to every stage before its own
    stages:
      - name: pretrain
        config: train/configs/smoke.yaml
      - name: sft
        config: train/configs/smoke.yaml
        overrides: [data.corpus=sft, "data.files=[sft.jsonl]", lora.r=8]
        from: previous               # default after the first stage; or an earlier stage's name, or none
        start_key: hf.path           # or model.init_from (a Tessera model); default hf.path
        checkpoint: latest           # which of this stage's checkpoints it hands on: latest or best
        ds_config: cpu               # optional, as train/main.py --ds_config
        nproc: 1                     # local processes (torchrun when > 1)
        slurm: {tasks_per_node: 1}   # this stage's job: profile fields (slurm/stages.py)

A finished stage's run is exported to ``<run dir>/export`` with ``train.export.hf.export_hf`` (LoRA adapters
merged into the base, so every later stage starts from full weights) and the stages that start from it get
``hf.path=<export>`` or ``model.init_from=<export>`` (and then ``data.tokenizer=<export>`` unless they name
one). A Tessera model transformers has no class for (attention sinks) is exported natively instead
(``train.export.native.export_native``: Tessera weights, its ModelArgs, the tokenizer): later stages continue
from it with ``start_key: model.init_from``; one that asks for ``hf.path`` is refused, naming the reason. A stage is finished when its run wrote ``summary.json`` and its export exists; finished stages are
skipped, so a chain that stopped runs again from the stage that failed (which resumes from its newest
checkpoint).

Everything is checked before anything runs: the file, every stage's recipe and overrides (``load_config``),
its DeepSpeed config and batch geometry. The exports later stages start from do not exist yet; they are
checked against placeholders: a directory with the ``config.json`` the earlier stage will export.
"""

from __future__ import annotations

import dataclasses
import re
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml

from model import ModelConfigError
from model.hf import to_hf_config
from model.hf_causal import causal_lm_config
from parallel.dims import ParallelConfigError, ParallelDims
from train.checkpoint.writer import checkpoint_root, latest_complete, read_meta
from train.config.deepspeed import load_ds_config, resolve_ds_config
from train.config.fields import ConfigError
from train.config.load import load_config
from train.config.schema import JobConfig
from train.export.consolidate import checkpoint_model_args
from train.export.hf import ExportError, export_hf
from train.export.native import NATIVE_FILE, export_native, write_native_placeholder
from train.hf_setup import plan_hf
from train.objectives import OBJECTIVES

CHAIN_KEYS = ("name", "out_dir", "overrides", "stages")  # the top level of a stages file
STAGE_KEYS = ("name", "config", "overrides", "from", "start_key", "checkpoint", "ds_config", "nproc", "slurm")
START_KEYS = ("hf.path", "model.init_from")
CHECKPOINTS = ("latest", "best")
EXPORT_DIR = "export"  # in each stage's run directory
SUMMARY_FILE = "summary.json"  # written by train/main.py when a run ends
# done: trained and exported (skipped); trained: only the export is missing; partial: resumes; new: starts
STATUSES = ("done", "trained", "partial", "new")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


class StagesError(ValueError):
    """A chain of stages that cannot run; the message names the file, the stage, the field and the fix."""


@dataclass(frozen=True)
class Stage:
    """One training run of a chain."""

    name: str  # also its run directory's name
    config: Path  # the recipe (absolute)
    overrides: tuple[str, ...] = ()  # section.key=value, after the chain's own
    source: str | None = None  # the stage whose export it starts from (None: from its recipe as written)
    start_key: str = "hf.path"  # the recipe key that receives the source's export
    checkpoint: str = "latest"  # which of its checkpoints is exported and handed on
    ds_config: str | None = None  # DeepSpeed config name or path (None: train/main.py's default)
    nproc: int = 1  # processes of a local run
    slurm: dict[str, Any] = dataclasses.field(default_factory=dict)  # profile fields for its SLURM job


@dataclass(frozen=True)
class StageChain:
    """A stages file, checked: its stages in the order they run."""

    name: str
    path: Path  # the stages file
    out_dir: Path  # absolute; stage runs in out_dir/<stage name>
    overrides: tuple[str, ...]  # applied to every stage first
    stages: tuple[Stage, ...]

    def stage(self, name: str) -> Stage:
        for s in self.stages:
            if s.name == name:
                return s
        raise StagesError(f"stages {self.path}: no stage '{name}'; its stages are "
                          f"{', '.join(s.name for s in self.stages)}.")

    def run_dir(self, stage: Stage) -> Path:
        return self.out_dir / stage.name

    def export_dir(self, stage: Stage) -> Path:
        return self.run_dir(stage) / EXPORT_DIR


@dataclass(frozen=True)
class StagePlan:
    """A checked stage: the arguments train/main.py gets, and how far an earlier attempt got."""

    stage: Stage
    run_dir: Path
    export_dir: Path
    start: Path | None  # the export it starts from
    overrides: tuple[str, ...]  # every override, the start and train.out_dir included
    status: str  # one of STATUSES
    recipe: dict[str, Any]  # the resolved recipe

    def main_args(self) -> list[str]:
        """train/main.py arguments; a stage always resumes its own run directory when it holds a
        checkpoint."""
        args = ["--config", str(self.stage.config), "--resume", "auto"]
        if self.stage.ds_config is not None:
            args += ["--ds_config", self.stage.ds_config]
        return [*args, *self.overrides]


def _fail(path: Path, where: str, what: str) -> StagesError:
    return StagesError(f"stages {path}: {where}{what}")


def _override_list(path: Path, where: str, value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    if not isinstance(value, list) or not all(isinstance(o, str) for o in value):
        raise _fail(path, where, f"overrides={value!r}: give a list of 'section.key=value' strings.")
    for o in value:
        key = o.split("=", 1)[0].strip()
        if "=" not in o or key.count(".") != 1:
            raise _fail(path, where, f"override {o!r} is not of the form section.key=value "
                                     f"(e.g. train.lr=3e-4).")
        if key == "train.out_dir":
            raise _fail(path, where, f"override {o!r}: the chain sets train.out_dir (out_dir/<stage name>); "
                                     f"set the stages file's out_dir instead.")
    return tuple(value)


def _stage(path: Path, index: int, raw: Any, names: list[str], later: list[str]) -> Stage:
    """Stage ``index`` of the file; ``names``: the stages before it, ``later``: the names after it."""
    where = f"stages[{index}]: "
    if not isinstance(raw, dict):
        raise _fail(path, where, f"expected a mapping with name and config, got {raw!r}.")
    name = raw.get("name")
    if not isinstance(name, str) or not _NAME.match(name):
        raise _fail(path, where, f"name={name!r}: give a name of letters, digits, '_', '.' or '-' (it names "
                                 f"the stage's run directory).")
    if name in names:
        raise _fail(path, where, f"name={name!r} is used by an earlier stage; stage names must be unique.")
    where = f"stage '{name}': "
    unknown = sorted(set(raw) - set(STAGE_KEYS))
    if unknown:
        raise _fail(path, where, f"unknown field '{unknown[0]}'; a stage has {', '.join(STAGE_KEYS)}.")
    config = raw.get("config")
    if not isinstance(config, str) or not Path(config).is_file():
        raise _fail(path, where, f"config={config!r}: no such recipe file (paths are relative to the "
                                 f"directory the stages run from).")
    default_from = "previous" if index else "none"
    source = raw.get("from", default_from)
    if source == "previous":
        if not index:
            raise _fail(path, where, "from=previous: the first stage has no previous stage; remove 'from' "
                                     "(it starts from its recipe).")
        source = names[-1]
    elif source in (None, "none"):
        source = None
    elif not isinstance(source, str) or source not in names:
        what = "a later stage" if source in later else "not a stage" if source != name else "the stage itself"
        raise _fail(path, where, f"from={source!r}: {what}; use previous, none, or one of "
                                 f"{', '.join(names) or '(no earlier stage)'} (stages run in file order).")
    start_key = raw.get("start_key", "hf.path")
    if start_key not in START_KEYS:
        raise _fail(path, where, f"start_key={start_key!r}: use hf.path (an HF model) or model.init_from "
                                 f"(a Tessera model).")
    if source is None and "start_key" in raw:
        raise _fail(path, where, "start_key is set but the stage starts from no earlier stage; remove it or "
                                 "set 'from'.")
    checkpoint = raw.get("checkpoint", "latest")
    if checkpoint not in CHECKPOINTS:
        raise _fail(path, where, f"checkpoint={checkpoint!r}: use latest (the newest) or best (the lowest "
                                 f"smoothed validation loss).")
    nproc = raw.get("nproc", 1)
    if isinstance(nproc, bool) or not isinstance(nproc, int) or nproc < 1:
        raise _fail(path, where, f"nproc={nproc!r}: give a whole number of processes, at least 1.")
    ds_config = raw.get("ds_config")
    if ds_config is not None and not isinstance(ds_config, str):
        raise _fail(path, where, f"ds_config={ds_config!r}: give a name in ds_configs/ or a path.")
    slurm = raw.get("slurm") or {}
    if not isinstance(slurm, dict):
        raise _fail(path, where, f"slurm={slurm!r}: give a mapping of profile fields "
                                 f"(e.g. {{tasks_per_node: 1}}).")
    overrides = _override_list(path, where, raw.get("overrides"))
    clash = [o for o in overrides if source is not None and o.split("=", 1)[0].strip() == start_key]
    if clash:
        raise _fail(path, where, f"override {clash[0]!r}: the chain sets {start_key} to the export of stage "
                                 f"'{source}'; remove the override (or set from: none).")
    return Stage(name=name, config=Path(config).resolve(), overrides=overrides, source=source,
                 start_key=start_key, checkpoint=checkpoint, ds_config=ds_config, nproc=nproc,
                 slurm=dict(slurm))


def load_stages(path: str | Path) -> StageChain:
    """Read and check a stages file (not yet the stages' recipes: see ``plan_stages``)."""
    path = Path(path)
    if not path.is_file():
        raise StagesError(f"stages {path}: no such file.")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise StagesError(f"stages {path}: not valid YAML ({e}).") from None
    if not isinstance(raw, dict) or not isinstance(raw.get("stages"), list) or not raw["stages"]:
        raise StagesError(f"stages {path}: expected a mapping with a non-empty 'stages:' list.")
    unknown = sorted(set(raw) - set(CHAIN_KEYS))
    if unknown:
        raise StagesError(f"stages {path}: unknown field '{unknown[0]}'; a stages file has "
                          f"{', '.join(CHAIN_KEYS)}.")
    name = str(raw.get("name") or path.stem)
    out_dir = Path(raw.get("out_dir") or Path("runs") / name).resolve()
    overrides = _override_list(path, "", raw.get("overrides"))
    stages: list[Stage] = []
    for index, item in enumerate(raw["stages"]):
        later = [s.get("name") for s in raw["stages"][index + 1:] if isinstance(s, dict)]
        stages.append(_stage(path, index, item, [s.name for s in stages], later))
    return StageChain(name=name, path=path.resolve(), out_dir=out_dir, overrides=overrides,
                      stages=tuple(stages))


def exported(export_dir: Path) -> bool:
    """Whether a stage's export is written: an HF directory or a native export."""
    return (export_dir / "config.json").is_file() or (export_dir / NATIVE_FILE).is_file()


def stage_status(run_dir: Path, export_dir: Path) -> str:
    """How far a stage got: done (trained, exported), trained (export missing), partial (resumes), new."""
    if (run_dir / SUMMARY_FILE).is_file():
        return "done" if exported(export_dir) else "trained"
    used = checkpoint_root(run_dir).exists() or (run_dir / "metrics.jsonl").exists()
    return "partial" if used else "new"


def check_local(stage: Stage, cfg: JobConfig) -> None:
    """What a local launch of ``stage.nproc`` processes refuses: the layout, the DeepSpeed config, the batch,
    and for an HF model its LoRA targets, precision and length (checked on its config)."""
    dims = ParallelDims(stage.nproc, tp=cfg.parallel.tp, pp=cfg.parallel.pp)
    cuda = torch.cuda.is_available()
    ds_name = stage.ds_config or ("zero0" if cuda else "cpu")
    ds = resolve_ds_config(load_ds_config(ds_name), cfg, dp_size=dims.dp,
                           bf16_supported=cuda and torch.cuda.is_bf16_supported())
    if cfg.hf.path is not None:
        plan_hf(cfg, ds, dims, tokenizer_vocab=0)


def _write_placeholder(cfg: JobConfig, out: Path) -> str | None:
    """A directory with the config.json the stage of ``cfg`` will export (and an empty weights file), or the
    native export's description for a model transformers has no class for; returns why it is native (None: HF)."""
    if cfg.hf.path is not None:  # an HF model exports as its own architecture (adapters merged)
        out.mkdir(parents=True)
        shutil.copy2(Path(cfg.hf.path) / "config.json", out / "config.json")
        (out / "model.safetensors").touch()  # the HF model checks look for weights beside the config
        return None
    args = cfg.model_args(vocab_size=cfg.data.vocab_size if cfg.data.tokenizer is None else None)
    try:
        config = to_hf_config(args)
    except ModelConfigError as e:
        write_native_placeholder(args, out)
        return str(e)
    out.mkdir(parents=True)
    config.save_pretrained(str(out))
    (out / "model.safetensors").touch()
    return None


def swap_paths(value: Any, swaps: dict[str, str]) -> Any:
    """``value`` (a string, or lists / tuples / dicts of them) with each placeholder path replaced."""
    if isinstance(value, str):
        for old, new in swaps.items():
            value = value.replace(old, new)
        return value
    if isinstance(value, dict):
        return {k: swap_paths(v, swaps) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(swap_paths(v, swaps) for v in value)
    return value


StageCheck = Callable[[Stage, JobConfig, list[str], dict[str, str]], Any]
"""A launcher's own checks of a stage: (stage, recipe, overrides, placeholder -> export path) -> a result."""


def plan_stages(chain: StageChain, check: StageCheck | None = None) -> tuple[list[StagePlan], list[Any]]:
    """Check every stage and plan it; returns the plans and what ``check`` returned for each stage.

    Each recipe is loaded with its overrides and its start (placeholders stand in for exports that do not
    exist yet; error messages and the plans name the real paths). ``check`` (default: ``check_local``) adds
    the launcher's checks. Raises StagesError, also when a stage that has to run again (not finished) has a
    later stage starting from it whose run directory is already used: that run was trained from the old
    weights.
    """
    plans: list[StagePlan] = []
    results: list[Any] = []
    swaps: dict[str, str] = {}
    native_only: dict[str, str] = {}  # stage -> why its model cannot be exported to HF
    with tempfile.TemporaryDirectory(prefix="tessera-stages-") as tmp:
        placeholders: dict[str, Path] = {}
        for index, stage in enumerate(chain.stages):
            run_dir, export_dir = chain.run_dir(stage), chain.export_dir(stage)
            start = chain.export_dir(chain.stage(stage.source)) if stage.source is not None else None
            where = f"stages {chain.path}: stage '{stage.name}' ({stage.config}): "
            try:
                overrides = [*chain.overrides, *stage.overrides]
                if stage.source in native_only and stage.start_key == "hf.path":
                    raise ConfigError(f"it starts from stage '{stage.source}' with hf.path, but that stage's model "
                                      f"cannot be exported as a Hugging Face model ({native_only[stage.source]}); "
                                      f"set start_key: model.init_from to continue from its native export")
                if stage.source is not None:
                    overrides.append(f"{stage.start_key}={placeholders[stage.source]}")
                cfg = load_config(stage.config, [*overrides, f"train.out_dir={run_dir}"])
                tessera_start = stage.start_key == "model.init_from" and stage.source is not None
                if tessera_start and cfg.data.tokenizer is None:
                    overrides.append(f"data.tokenizer={placeholders[stage.source]}")  # the export's tokenizer
                overrides.append(f"train.out_dir={run_dir}")
                cfg = load_config(stage.config, overrides)
                if cfg.hf.path is not None:
                    causal_lm_config(cfg.hf.path, seq2seq=OBJECTIVES[cfg.train.objective].encoder_decoder)
                placeholders[stage.name] = Path(tmp) / f"{index:03d}-{stage.name}" / EXPORT_DIR
                why_native = _write_placeholder(cfg, placeholders[stage.name])
                if why_native is not None:
                    native_only[stage.name] = why_native
                swaps[str(placeholders[stage.name])] = str(export_dir)
                if check is None:
                    check_local(stage, cfg)
                    results.append(None)
                else:
                    results.append(check(stage, cfg, overrides, dict(swaps)))
            except (ConfigError, ModelConfigError, ParallelConfigError) as e:
                raise StagesError(where + swap_paths(str(e), swaps)) from None
            plans.append(StagePlan(stage=stage, run_dir=run_dir, export_dir=export_dir, start=start,
                                   overrides=tuple(swap_paths(overrides, swaps)),
                                   status=stage_status(run_dir, export_dir),
                                   recipe=swap_paths(cfg.to_dict(), swaps)))
    _check_stale(chain, plans)
    return plans, results


def _check_stale(chain: StageChain, plans: list[StagePlan]) -> None:
    """Refuse to keep a later stage's run when a stage it (indirectly) starts from trains again."""
    again = {p.stage.name for p in plans if p.status in ("partial", "new")}
    for p in plans:
        if p.status == "new":
            continue
        source = p.stage.source
        while source is not None:
            if source in again:
                raise StagesError(
                    f"stages {chain.path}: stage '{p.stage.name}' already holds a run ({p.run_dir}) started "
                    f"from stage '{source}', which has not finished and trains again; delete {p.run_dir} so "
                    f"it starts from the new weights.")
            source = chain.stage(source).source


def _native_only(meta: dict[str, Any], tag: Path) -> bool:
    """Whether the Tessera model of a checkpoint has no transformers class (it is then exported natively)."""
    try:
        to_hf_config(checkpoint_model_args(meta, tag))
    except ModelConfigError:
        return True
    return False


def export_stage(plan: StagePlan) -> Path:
    """Export the stage's ``checkpoint`` (latest or best) to its export directory, adapters merged (a model
    transformers has no class for: its native export); return the directory."""
    root = checkpoint_root(plan.run_dir)
    if plan.stage.checkpoint == "best":
        best = root / "best"
        if not best.is_file():
            raise StagesError(f"stage '{plan.stage.name}': checkpoint=best but {plan.run_dir} has no best "
                              f"checkpoint (it never evaluated: set train.eval_interval), or use checkpoint: "
                              f"latest.")
        tag: Path | None = root / best.read_text().strip()
    else:
        tag = latest_complete(plan.run_dir)
    if tag is None or not tag.is_dir():
        raise StagesError(f"stage '{plan.stage.name}': no complete checkpoint in {root} to export.")
    try:
        meta = read_meta(tag)
        if not meta.get("hf") and not meta.get("research") and _native_only(meta, tag):
            return export_native(tag, plan.export_dir)
        return export_hf(tag, plan.export_dir, merge=bool(meta.get("hf")))
    except (ExportError, ModelConfigError) as e:
        raise StagesError(f"stage '{plan.stage.name}': export of {tag} failed: {e}") from None
