"""Checks across recipe sections, each naming the fields, the values and the fix.

``validate`` is the one place a loaded recipe is checked: an hf.path model lends its tokenizer, every section
checks its own fields (its ``validate``), then the combinations below are checked. What needs a device, files
or a process group is checked later (``check_batch_geometry``, the run plan).

Values Tessera derives where the user left them open: a recipe is written for one machine, and must also run on
another number of ranks or for a few steps. A value set at a lower level (``Origin``: the schema's default < the
recipe file < an override) than the one it contradicts is adapted, and the log says so once
(``adapt_warmup``, ``derive_micro_batch``); when the user set both sides at the same level the contradiction is
theirs, one ConfigError naming the keys and the fix.
"""

from __future__ import annotations

import dataclasses
import logging

from model import ModelArgs
from train.config.fields import ConfigError
from train.config.schema import JobConfig, PerfSection, TrainSection
from train.export.native import start_tokenizer

log = logging.getLogger("tessera")

# The corpora each objective trains on.
OBJECTIVE_CORPORA = {
    "lm": ("shakespeare", "files", "prepared", "stream", "sft", "qa"),
    "dpo": ("preference",),
    "reward": ("preference", "classification"),
    "classify": ("classification",),
    "seq2seq": ("seq2seq",),
}


def validate(cfg: JobConfig) -> None:
    """Every check that needs no device, files or process group; the rest are in ``check_batch_geometry``."""
    if cfg.hf.path is not None and cfg.data.tokenizer is None:
        cfg.data.tokenizer = cfg.hf.path  # an HF model's own tokenizer, unless another one is named
    if cfg.model.init_from is not None and cfg.hf.path is None and cfg.data.tokenizer is None:
        cfg.data.tokenizer = start_tokenizer(cfg.model.init_from)  # a Tessera run's own (None for an HF dir)
    for section in dataclasses.fields(cfg):
        getattr(cfg, section.name).validate()
    _check_hf(cfg)
    _check_objective(cfg)
    _check_research(cfg)
    d, par = cfg.data, cfg.parallel
    if d.doc_mask and par.pp > 1:
        raise ConfigError(f"data.doc_mask=true with parallel.pp={par.pp}: the pipeline engine passes only "
                          "(inputs, labels) between stages; set data.doc_mask=false or parallel.pp=1.")
    args = cfg.model_args() if cfg.hf.path is None else None
    if args is not None and d.seq_len > args.max_seq_len:
        raise ConfigError(
            f"data.seq_len={d.seq_len} is longer than the model allows "
            f"(model.max_seq_len={args.max_seq_len}): lower data.seq_len or raise model.max_seq_len."
        )
    _check_perf(cfg, args)


def check_batch_geometry(t: TrainSection, dp_size: int) -> int:
    """Gradient-accumulation steps for this data-parallel size, or a ConfigError naming the fields."""
    gb, mb = t.global_batch_size, t.micro_batch_size
    if gb % (mb * dp_size):
        raise ConfigError(
            f"train.global_batch_size={gb} does not factor into train.micro_batch_size={mb} x accumulation x "
            f"data-parallel size={dp_size}: choose a global batch that is a multiple of {mb * dp_size}."
        )
    return gb // (mb * dp_size)


# A warm-up scaled down for a short run lasts this share of it (the schema's own ratio: 100 of 1000 steps).
WARMUP_SHARE = 0.1


def adapt_warmup(cfg: JobConfig) -> None:
    """``train.warmup_steps`` longer than ``train.steps``: when the warm-up was set at a lower level than the
    steps (e.g. the recipe's warm-up and ``train.steps=20`` on the command line), scale it down to a tenth of the
    run, logged. Otherwise it is left for ``TrainSection.validate`` to refuse."""
    t, origin = cfg.train, cfg.origin
    if not 0 < t.steps < t.warmup_steps:
        return
    if origin.level("train.warmup_steps") >= origin.level("train.steps"):
        return  # the user's own contradiction: TrainSection.validate names both keys
    scaled = max(1, int(t.steps * WARMUP_SHARE))
    log.info("train.warmup_steps: %d (%s's %d is longer than train.steps=%d; set train.warmup_steps to choose)",
             scaled, origin.source("train.warmup_steps"), t.warmup_steps, t.steps)
    t.warmup_steps = scaled


def derive_micro_batch(cfg: JobConfig, dp_size: int) -> int:
    """The gradient-accumulation steps of ``train.global_batch_size`` on ``dp_size`` data-parallel ranks.

    A micro-batch that does not divide the global batch per rank is replaced by the largest one below it that
    does (logged), unless the user gave it on the command line: then the contradiction is one ConfigError. The
    global batch is never changed (it is an optimisation hyper-parameter, not a layout detail)."""
    t, origin = cfg.train, cfg.origin
    gb, mb = t.global_batch_size, t.micro_batch_size
    if gb % (mb * dp_size) == 0:
        return gb // (mb * dp_size)
    if gb % dp_size:
        raise ConfigError(
            f"train.global_batch_size={gb} cannot be split over {dp_size} data-parallel ranks: set "
            f"train.global_batch_size to a multiple of {dp_size}, or launch a number of ranks that divides it."
        )
    per_rank = gb // dp_size
    if origin.level("train.micro_batch_size") == 2:  # the user's own choice, on the command line
        raise ConfigError(
            f"train.global_batch_size={gb} does not factor into train.micro_batch_size={mb} x accumulation x "
            f"data-parallel size={dp_size}: drop the train.micro_batch_size override (Tessera then takes the "
            f"largest micro-batch that fits) or set it to a divisor of {per_rank}, or set train.global_batch_size "
            f"to a multiple of {mb * dp_size}."
        )
    micro = max(m for m in range(1, min(mb, per_rank) + 1) if per_rank % m == 0)
    log.info("train.micro_batch_size: %d (%s's %d does not divide train.global_batch_size=%d over %d data-parallel "
             "ranks), gradient accumulation %d", micro, origin.source("train.micro_batch_size"), mb, gb, dp_size,
             per_rank // micro)
    t.micro_batch_size = micro
    _keep_eval_samples(cfg, mb, micro)
    return per_rank // micro


def _keep_eval_samples(cfg: JobConfig, was: int, micro: int) -> None:
    """An evaluation reads ``train.eval_batches`` micro-batches: with a smaller micro-batch it reads more of them,
    so that it sees the samples it would have seen with the micro-batch of the recipe (logged)."""
    t = cfg.train
    samples = t.eval_batches * was
    if samples % micro:
        log.warning("train.eval_batches=%d of %d sequences (%d validation samples) cannot be kept with micro-batches "
                    "of %d: set train.micro_batch_size to a divisor of %d to compare evaluations across layouts",
                    t.eval_batches, was, samples, micro, samples)
        return
    log.info("train.eval_batches: %d micro-batches of %d (the same %d validation samples)", samples // micro,
             micro, samples)
    t.eval_batches = samples // micro


def _check_perf(cfg: JobConfig, args: ModelArgs | None) -> None:
    """The perf section with an HF model, the objective and parallelism: the combinations that cannot run."""
    p, par, ac = cfg.perf, cfg.parallel, cfg.perf.activation_checkpointing
    if cfg.hf.path is not None:
        used = [name for name in ("activation_checkpointing", "compile", "fused_linear_cross_entropy")
                if getattr(p, name) != getattr(PerfSection, name)]
        if used:
            raise ConfigError(f"perf.{used[0]} is set with hf.path: the perf section transforms Tessera "
                              f"models; an HF model recomputes its layers with "
                              f"hf.gradient_checkpointing=true.")
    if p.fused_linear_cross_entropy and cfg.train.objective != "lm":
        raise ConfigError(f"perf.fused_linear_cross_entropy=true with train.objective="
                          f"{cfg.train.objective!r}: the fused head computes the language-model loss only; "
                          f"set it to false.")
    if ac != "none" and par.activation_checkpoint_interval > 0:
        raise ConfigError(f"perf.activation_checkpointing={ac!r} and parallel.activation_checkpoint_interval="
                          f"{par.activation_checkpoint_interval} both recompute activations: set one of them "
                          f"(perf.activation_checkpointing=none or the interval to 0).")
    if p.fused_linear_cross_entropy and (par.tp > 1 or par.pp > 1):
        which = f"parallel.tp={par.tp}" if par.tp > 1 else f"parallel.pp={par.pp}"
        raise ConfigError(f"perf.fused_linear_cross_entropy=true with {which}: the fused loss needs the "
                          f"whole output head on one rank (tp splits it by vocabulary and uses its own "
                          f"vocabulary-parallel loss; pp puts it on the last stage); set "
                          f"perf.fused_linear_cross_entropy=false.")
    if p.compile and ac != "none" and par.tp > 1 and args is not None and args.dropout > 0:
        raise ConfigError(f"perf.compile=true with perf.activation_checkpointing={ac!r}, "
                          f"parallel.tp={par.tp} and model.dropout={args.dropout}: torch.compile cannot "
                          f"trace the rewind of each rank's dropout stream that recomputation needs; turn "
                          f"one of them off.")


def _check_hf(cfg: JobConfig) -> None:
    """An HF model with the model section, quantization with LoRA, adapters and HF models with parallelism and
    packing, and the vocabulary extension."""
    h, lo, par = cfg.hf, cfg.lora, cfg.parallel
    if h.path is not None and (cfg.model.init_from is not None or cfg.model.overrides):
        key = "init_from" if cfg.model.init_from is not None else min(cfg.model.overrides)
        raise ConfigError(f"model.{key} is set together with hf.path={h.path}: an HF model keeps its own "
                          f"config; remove model.{key} (or hf.path to train a Tessera preset).")
    if cfg.vocab.extends:
        _check_vocab(cfg)
    if h.quantization != "none" and lo.r == 0 and not cfg.vocab.extends:
        raise ConfigError(f"hf.quantization={h.quantization!r} with lora.r=0: quantized weights cannot be "
                          f"trained; set lora.r (QLoRA) or hf.quantization='none'.")
    if lo.r > 0 and par.tp * par.pp > 1:
        raise ConfigError(f"lora.r={lo.r} with parallel.tp={par.tp}, parallel.pp={par.pp}: adapters train "
                          f"with data parallelism and ZeRO only; set parallel.tp=1 and parallel.pp=1.")
    if h.path is not None and par.pp > 1:
        raise ConfigError(f"parallel.pp={par.pp} with hf.path: HF models are not cut into pipeline stages; "
                          f"use ZeRO-3 (--ds_config zero3) to shard them, or parallel.pp=1.")
    if h.path is not None and cfg.data.doc_mask:
        raise ConfigError("data.doc_mask=true with hf.path: HF models take padding masks, not "
                          "packed-document masks; set data.doc_mask=false.")


def _check_vocab(cfg: JobConfig) -> None:
    """Embedding-only extension: an HF model, only the new rows train, and nothing decays them."""
    if cfg.hf.path is None:
        raise ConfigError("vocab.lexicon / vocab.from_snapshot need hf.path: the extension resizes an HF "
                          "model's embeddings.")
    if cfg.lora.r > 0:
        raise ConfigError(f"vocab.lexicon with lora.r={cfg.lora.r}: the extension trains only the new "
                          f"embedding rows; set lora.r=0.")
    if cfg.train.weight_decay != 0:
        raise ConfigError(f"train.weight_decay={cfg.train.weight_decay} with vocab.lexicon: decoupled decay "
                          f"would change the base rows; set train.weight_decay=0.")
    if cfg.parallel.tp * cfg.parallel.pp > 1:
        raise ConfigError("vocab.lexicon with parallel.tp / parallel.pp > 1: the extension needs the whole "
                          "embedding on each rank; use data parallelism (ZeRO 0-2).")


def _check_objective(cfg: JobConfig) -> None:
    """The objective and its data: preference pairs train with DPO, everything else with the LM loss."""
    t, d, o, par = cfg.train, cfg.data, cfg.dpo, cfg.parallel
    corpora = OBJECTIVE_CORPORA[t.objective]
    if d.corpus not in corpora:
        raise ConfigError(f"train.objective={t.objective!r} with data.corpus={d.corpus!r}: it trains on "
                          f"data.corpus {' or '.join(map(repr, corpora))}.")
    if t.objective == "seq2seq" and cfg.hf.path is None:
        raise ConfigError("train.objective='seq2seq' needs hf.path: an HF encoder-decoder model (e.g. T5).")
    if t.objective in ("reward", "classify", "seq2seq"):
        if par.tp * par.pp > 1:
            raise ConfigError(f"train.objective={t.objective!r} with parallel.tp / parallel.pp > 1: it "
                              f"trains with data parallelism and ZeRO; set both to 1.")
        if cfg.vocab.lexicon is not None:
            raise ConfigError(f"train.objective={t.objective!r} with vocab.lexicon: the vocabulary extension "
                              f"trains a language model; remove one.")
    if t.objective != "dpo":
        return
    if o.reference_from is not None and o.reference == "auto" and cfg.lora.r > 0:
        raise ConfigError(f"dpo.reference_from={o.reference_from} with dpo.reference={o.reference!r} and "
                          f"LoRA: another model is a frozen copy; set dpo.reference='copy'.")
    if o.reference == "adapters" and cfg.lora.r == 0:
        raise ConfigError("dpo.reference='adapters' needs LoRA (lora.r > 0): the reference is the base with "
                          "the adapters switched off; use 'copy' or 'cached' for a full fine-tune.")
    if par.pp > 1 or par.tp > 1:
        raise ConfigError(f"train.objective='dpo' with parallel.tp={par.tp}, parallel.pp={par.pp}: DPO runs "
                          f"with data parallelism and ZeRO; set both to 1.")


def _check_research(cfg: JobConfig) -> None:
    """A research recipe with the data, the objective, the pipeline and the vocabulary extension."""
    r = cfg.research
    if cfg.data.corpus == "qa" and r.recipe is None:
        raise ConfigError("data.corpus='qa' is read by a research recipe: set research.recipe='soft_prompt'.")
    if r.recipe is None:
        return
    if cfg.train.objective != "lm":
        raise ConfigError(f"research.recipe={r.recipe!r} with train.objective={cfg.train.objective!r}: a "
                          f"research recipe defines its own losses; set train.objective='lm'.")
    if cfg.parallel.pp > 1:
        raise ConfigError(f"research.recipe={r.recipe!r} with parallel.pp={cfg.parallel.pp}: the pipeline "
                          f"engine runs only the model's own layers; use tensor / data parallelism "
                          f"(parallel.pp=1).")
    if cfg.vocab.lexicon is not None:
        raise ConfigError(f"research.recipe={r.recipe!r} with vocab.lexicon: run the vocabulary extension on "
                          f"its own; remove one.")
