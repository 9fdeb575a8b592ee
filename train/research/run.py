"""A research recipe inside a run: planned before any device is touched, built around the base, trained
through the ``ResearchObjective`` (weighted loss terms, finiteness checks, diagnostics, first-token
histograms)."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from parallel.comm import gather_last
from train.config.fields import ConfigError
from train.config.schema import JobConfig
from train.data.sampler import is_filler
from train.data.tokenizer import load_tokenizer
from train.eval.loss import TokenLoss, WeightedMean
from train.loop.diagnostics import Diagnostics, collapse_warning, first_token_ids
from train.objectives.lm import Objective, dp_group, forward_kwargs
from train.research.api import (
    Extension,
    LossTermError,
    RecipeContext,
    Term,
    check_finite,
    check_parameters,
    parse_options,
    resolve_recipe,
    resolve_terms,
    weigh_terms,
)
from train.research.warm_start import resolve_source, warm_start

log = logging.getLogger("tessera")


@dataclass
class ResearchPlan:
    """The recipe class, its checked options and its terms' schedules."""

    cls: type[Extension]
    options: Any
    terms: dict[str, Term]
    init_from: Path | None = None  # the checkpoint the recipe's modules warm-start from (research.init_from)


def plan_research(cfg: JobConfig, *, dim: int, n_layers: int, vocab_size: int) -> ResearchPlan:
    """Resolve and check the recipe against the model's shape, before anything is built."""
    r = cfg.research
    cls = resolve_recipe(r.recipe)
    options = parse_options(cls, r.options)
    terms = resolve_terms(cls, r.terms)
    ctx = RecipeContext(dim=dim, n_layers=n_layers, vocab_size=vocab_size, device=torch.device("cpu"),
                        out_dir=Path(cfg.train.out_dir), rank=0, seed=cfg.train.seed, config=cfg)
    cls.check(options, ctx)
    check_best_metric(cfg.train.best_metric, cls, options, terms)
    source = resolve_source(r.init_from) if r.init_from is not None else None
    return ResearchPlan(cls, options, terms, source)


def check_best_metric(name: str, cls: type[Extension], options: Any, terms: dict[str, Term]) -> None:
    """Refuse a ``train.best_metric`` the run will never log, when the recipe says what its evaluation returns:
    ``val_loss``, ``val_<term>`` (and ``val_ppl`` with an ``lm`` term) and ``val_<metric>`` of its ``metrics``."""
    own = cls.metrics(options)
    logged = {"val_loss", *(f"val_{t}" for t in terms), *(["val_ppl"] if "lm" in terms else [])}
    if own is None or name in logged:
        return
    logged |= {f"val_{m}" for m in own}
    if name not in logged:
        raise ConfigError(f"train.best_metric={name!r}: the {cls.__name__} recipe with these options logs "
                          f"{', '.join(sorted(logged))}; choose one of them.")


def model_shape(model: nn.Module) -> tuple[int, int]:
    """(hidden size, decoder layers) of a native Transformer or an HF causal LM."""
    args = getattr(model, "args", None)
    if args is not None:
        return args.dim, args.n_layers
    return config_shape(model.config)


def config_shape(config: Any) -> tuple[int, int]:
    """(hidden size, decoder layers) from an HF config."""
    dim = next(getattr(config, k) for k in ("hidden_size", "n_embd", "d_model") if hasattr(config, k))
    layer_keys = ("num_hidden_layers", "n_layer", "num_layers")
    layers = next(getattr(config, k) for k in layer_keys if hasattr(config, k))
    return int(dim), int(layers)


def build_extension(rp: ResearchPlan, base: nn.Module | None, ctx: RecipeContext, *,
                    freeze_base: bool) -> Extension:
    """The extension around ``base`` (frozen when asked; LoRA adapters of a PEFT base keep training)."""
    if base is not None and freeze_base:
        for name, p in base.named_parameters():
            if "lora_" not in name:
                p.requires_grad_(False)
    torch.manual_seed(ctx.seed + 1)  # the recipe's own modules start from the run's seed, apart from the base
    ext = rp.cls(base, ctx, rp.options)
    if base is None:
        ext.base = ext.build_model()
    check_parameters(ext, ctx.config.research.recipe)  # complex dtypes: real pairs instead (model/complex.py)
    scalars = [name for name, p in ext.named_parameters() if p.dim() == 0]
    # DeepSpeed views every parameter as bytes to broadcast and partition it; 0-d tensors cannot be
    if scalars:
        raise ConfigError(f"research.recipe={ctx.config.research.recipe!r}: parameter {scalars[0]!r} is "
                          f"0-dimensional, which DeepSpeed cannot broadcast or partition; declare it with "
                          f"shape (1,) (e.g. nn.Parameter(torch.ones(1))).")
    trainable = sum(p.numel() for p in ext.parameters() if p.requires_grad)
    if trainable == 0 and ctx.config.train.steps == 0:
        # an evaluation-only run of a recipe with nothing to train (a fixed vector on a frozen base): the engine
        # still needs one parameter for its optimizer, which never steps; nothing reads it and no checkpoint holds it
        ext.register_parameter("eval_only_placeholder", nn.Parameter(torch.zeros(1)))
    elif trainable == 0:
        raise ConfigError(f"research.recipe={ctx.config.research.recipe!r} declares no trainable parameter "
                          f"and the base is frozen (research.freeze_base=true): nothing would train.")
    return ext


def place(ext: Extension, device: torch.device, *, move_base: bool) -> None:
    """Every declared module on the activations' device (a quantized base was placed when it was loaded)."""
    for name, child in ext.named_children():
        if name != "base" or move_base:
            child.to(device)
    for name, buf in list(ext.named_buffers(recurse=False)):
        setattr(ext, name, buf.to(device))


def diagnostic_groups(ext: Extension) -> dict[str, list[nn.Parameter]]:
    """Each declared module by name, and the base's trainable parameters (adapters) as 'base'."""
    groups = {name: list(m.parameters()) for name, m in ext.declared_modules().items() if any(True for _ in
                                                                                             m.parameters())}
    direct = list(ext.parameters(recurse=False))
    if direct:
        groups["extension"] = direct
    if ext.base is not None and not ext.needs_base:  # the recipe's own model: each of its parts
        for name, child in ext.base.named_children():
            groups[f"base.{name}"] = list(child.parameters())
    elif ext.base is not None:
        trainable = [p for p in ext.base.parameters() if p.requires_grad]
        groups["base"] = trainable or list(ext.base.parameters())
    return groups


def as_batch(batch: Any, device: torch.device) -> dict[str, torch.Tensor]:
    """A dataset's batch as the extension's dict: (inputs, labels[, extra]) or a mapping, on ``device``."""
    if isinstance(batch, dict):
        return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v
                for k, v in batch.items()}
    x, y, *rest = batch
    out = {"input_ids": x, "labels": y, **(rest[0] if rest else {})}
    return {k: v.to(device, non_blocking=True) for k, v in out.items()}


class ResearchObjective(Objective):
    """The recipe's weighted terms as the loss; validation reports each term and the total at the final
    weights."""

    def __init__(self, terms: dict[str, Term], *, final_step: int, diagnostics: Any = None,
                 tp_ctx: Any = None, decode: Callable[[int], str] | None = None) -> None:
        super().__init__()
        self.schedule, self.final_step = terms, final_step
        self.diagnostics, self.tp_ctx, self.decode = diagnostics, tp_ctx, decode
        self.step = 1

    def begin_step(self, step: int) -> None:
        self.step = step

    def loss(self, engine: Any, batch: Any,
             device: torch.device) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        out = engine(as_batch(batch, device))
        total, logged = weigh_terms(out["terms"], self.schedule, self.step - 1)
        if total.grad_fn is None:
            names = ", ".join(out["terms"])
            raise LossTermError(f"the weighted loss at step {self.step} ({names}) depends on no trainable "
                                f"parameter: forward must use the recipe's modules (or an unfrozen base).")
        return total, logged

    def before_update(self, engine: Any, step: int) -> None:
        if self.diagnostics is not None and self.diagnostics.due(step):
            self.diagnostics.capture_grads(engine, step)

    def end_step(self, engine: Any, step: int, terms: dict[str, float]) -> None:
        check_finite(terms, step)
        if self.diagnostics is not None and self.diagnostics.due(step):
            self.diagnostics.write(engine, step, terms)

    @torch.no_grad()
    def evaluate(self, engine: Any, batches: Callable[[], Iterator[Any]], device: torch.device,
                 step: int | None = None) -> dict[str, float]:
        """``val_lm`` (and ``val_ppl``) token-weighted like the LM objective's evaluation, every other term
        the mean of its batch values (the evaluation's micro-batches are the same for any layout, fillers
        not counted; sums added over the data-parallel group), ``val_loss`` the terms weighted as at the final
        step, and the recipe's own metrics."""
        engine.eval()
        lm = TokenLoss(device)  # the "lm" term: each batch's mean next-token loss times its labelled tokens
        others: WeightedMean | None = None  # the other terms: one weight per batch
        has_lm, first, histogram = False, [], False  # histogram: every rank gathers first tokens (collective)
        for batch in batches():
            counted = not is_filler(batch)  # a filler runs like the others (collectives stay in step), unseen
            b = as_batch(batch, device)
            out = engine(b)
            terms = dict(out["terms"])
            if "lm" in terms:
                if "labels" not in b:
                    raise LossTermError("the 'lm' term is averaged over the batch's labelled tokens in "
                                        "evaluation, but the validation batch has no 'labels'; name the term "
                                        "otherwise.")
                lm_term = terms.pop("lm")
                if counted:
                    lm.add_mean(lm_term, (b["labels"] != -100).sum())
                has_lm = True
            if others is None:
                others = WeightedMean(sorted(terms), device)
            if set(terms) != set(others.names):
                raise LossTermError(f"validation batches returned different loss terms ({sorted(terms)} "
                                    f"after {list(others.names)}); forward must return the same terms for "
                                    f"every batch.")
            histogram = histogram or (self.diagnostics is not None and out.get("logits") is not None)
            if not counted:
                continue
            others.add_means([terms[k] for k in others.names], 1)
            if self.diagnostics is not None and out.get("logits") is not None:
                first.append(self._first_tokens(out["logits"], out.get("labels", b.get("labels"))))
        extra = engine.module.evaluate(lambda: (as_batch(x, device) for x in batches()), step)
        engine.train()
        # every rank has as many batches and the same terms, so every rank runs the same collectives
        group = dp_group(engine)  # the ranks of a tensor-parallel group saw the same batches
        means: dict[str, float] = {}
        if others is not None:
            others = others.all_reduce(group)
            means |= others.means() if others.names else {}
        lm = lm.all_reduce(group)
        if has_lm:
            means["lm"] = lm.mean_loss
        final = self.final_step - 1
        result = {"val_loss": sum(self.schedule[k].at(final) * v for k, v in sorted(means.items())),
                  **{f"val_{k}": v for k, v in sorted(means.items())}}
        if "lm" in means:
            result["val_ppl"] = lm.perplexity
        result.update({f"val_{k}": v for k, v in extra.items()})
        if histogram:
            self._histogram(torch.cat(first) if first else torch.zeros(0, dtype=torch.long), step)
        return result

    def _first_tokens(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if self.tp_ctx is not None and self.tp_ctx.size > 1:  # vocab-parallel logits: the whole vocabulary
            logits = gather_last(logits.contiguous(), self.tp_ctx.group)
        return first_token_ids(logits, labels).cpu()

    def _histogram(self, ids: torch.Tensor, step: int | None) -> None:
        gathered: list[list[int]] = [[] for _ in range(dist.get_world_size())]
        # the ranks of a TP group saw the same rows
        replica = self.tp_ctx is not None and self.tp_ctx.rank != 0
        dist.all_gather_object(gathered, [] if replica else ids.tolist())
        every = torch.tensor([i for part in gathered for i in part], dtype=torch.long)
        hist = self.diagnostics.write_first_tokens(step or 0, every, self.decode)
        warning = collapse_warning(hist)
        if warning and dist.get_rank() == 0:
            log.warning("%s", warning)


def build_research(rp: ResearchPlan, cfg: JobConfig, base: nn.Module | None, *, loss_fn: Any, tp_ctx: Any,
                   device: torch.device, rank: int, vocab_size: int, tokenizer_dir: Path,
                   val_data: Any) -> Extension:
    """The run's extension around ``base`` (the model as built, perf options and TP applied)."""
    dim, n_layers = model_shape(base) if base is not None else (0, 0)
    split = tp_ctx is not None and tp_ctx.size > 1
    ctx = RecipeContext(dim=dim, n_layers=n_layers, vocab_size=vocab_size, device=device,
                        out_dir=Path(cfg.train.out_dir), rank=rank,
                        seed=cfg.train.seed, lm_loss=loss_fn, forward_kwargs=forward_kwargs(loss_fn),
                        tp_ctx=tp_ctx if split else None, tokenizer=load_tokenizer(tokenizer_dir), config=cfg,
                        terms=rp.terms, val_data=val_data)
    ext = build_extension(rp, base, ctx, freeze_base=cfg.research.freeze_base)
    if rp.init_from is not None:
        started = warm_start(ext, rp.init_from)
        if rank == 0:
            log.info("%s", started.describe())
    return ext


def research_objective(rp: ResearchPlan, cfg: JobConfig, ext: Extension, *, out_dir: Path, rank: int,
                       tp_ctx: Any) -> ResearchObjective:
    """The recipe's weighted terms, with diagnostics when research.diagnostics_interval is set."""
    split = tp_ctx is not None and tp_ctx.size > 1
    diagnostics = None
    if cfg.research.diagnostics_interval > 0:
        diagnostics = Diagnostics(out_dir, interval=cfg.research.diagnostics_interval,
                                  groups=diagnostic_groups(ext), rank=rank,
                                  tp_group=tp_ctx.group if split else None)
    tok = ext.ctx.tokenizer
    return ResearchObjective(rp.terms, final_step=cfg.train.steps, diagnostics=diagnostics,
                             tp_ctx=tp_ctx if split else None,
                             decode=(lambda i: tok.decode([i])) if tok is not None else None)
