"""Checks across recipe sections (and their combinations), each naming the field, the value and the fix."""

from __future__ import annotations

import dataclasses

from model import ModelArgs
from train.config.fields import ConfigError, _positive
from train.config.finetune import HFSection, parse_layers
from train.config.research import GROUP_KEYS, SCHEDULES, TERM_KEYS
from train.config.schema import DataSection, JobConfig, PerfSection


def validate(cfg: JobConfig) -> None:
    """Checks that need no device, files or process group; the rest are in ``check_batch_geometry``."""
    d, t = cfg.data, cfg.train
    _validate_hf(cfg)
    _validate_data(d)
    _validate_objective(cfg)
    validate_research(cfg)
    if d.doc_mask and cfg.parallel.pp > 1:
        raise ConfigError(f"data.doc_mask=true with parallel.pp={cfg.parallel.pp}: the pipeline engine passes only "
                          "(inputs, labels) between stages; set data.doc_mask=false or parallel.pp=1.")
    if d.sampling not in ("blocks", "random"):
        raise ConfigError(f"data.sampling={d.sampling!r}: use 'blocks' or 'random'.")
    _positive("data.seq_len", d.seq_len)
    args = cfg.model_args() if cfg.hf.path is None else None
    if args is not None and d.seq_len > args.max_seq_len:
        raise ConfigError(
            f"data.seq_len={d.seq_len} is longer than the model allows (model.max_seq_len={args.max_seq_len}): "
            f"lower data.seq_len or raise model.max_seq_len."
        )
    if not 0.0 < d.val_fraction < 1.0:
        raise ConfigError(f"data.val_fraction={d.val_fraction}: must be between 0 and 1 (exclusive).")
    if d.tokenizer is None and d.vocab_size < 260:
        raise ConfigError(f"data.vocab_size={d.vocab_size}: a byte-level BPE needs at least 260 tokens.")
    for name in ("steps", "global_batch_size", "micro_batch_size", "lr", "eval_batches", "log_interval"):
        _positive(f"train.{name}", getattr(t, name))
    for name in ("min_lr", "warmup_steps", "weight_decay", "grad_clip", "eval_interval", "save_interval"):
        _positive(f"train.{name}", getattr(t, name), allow_zero=True)
    _positive("train.keep_last", t.keep_last, allow_zero=True)
    _positive("train.max_bad_steps", t.max_bad_steps, allow_zero=True)
    _positive("train.max_rollbacks", t.max_rollbacks, allow_zero=True)
    _positive("train.spike_zscore", t.spike_zscore, allow_zero=True)
    if t.spike_action not in ("warn", "rollback"):
        raise ConfigError(f"train.spike_action={t.spike_action!r}: use 'warn' or 'rollback'.")
    _positive("train.dist_timeout_s", t.dist_timeout_s)
    if not 0.0 <= t.best_smoothing < 1.0:
        raise ConfigError(f"train.best_smoothing={t.best_smoothing}: must be in [0, 1).")
    if t.min_lr > t.lr:
        raise ConfigError(f"train.min_lr={t.min_lr} is above train.lr={t.lr}: the cosine decays from lr to min_lr.")
    if t.warmup_steps > t.steps:
        raise ConfigError(f"train.warmup_steps={t.warmup_steps} exceeds train.steps={t.steps}.")
    if cfg.log.wandb not in ("offline", "online", "disabled"):
        raise ConfigError(f"log.wandb={cfg.log.wandb!r}: use 'offline', 'online' or 'disabled'.")
    _positive("parallel.tp", cfg.parallel.tp)
    _positive("parallel.pp", cfg.parallel.pp)
    if cfg.parallel.partition_method not in ("parameters", "uniform"):
        raise ConfigError(f"parallel.partition_method={cfg.parallel.partition_method!r}: use 'parameters' or "
                          f"'uniform'.")
    _positive("parallel.activation_checkpoint_interval", cfg.parallel.activation_checkpoint_interval,
              allow_zero=True)
    if cfg.sample.temperature < 0:
        raise ConfigError(f"sample.temperature={cfg.sample.temperature}: must be >= 0 (0 is greedy).")
    _validate_perf(cfg, args)


def _validate_data(d: DataSection) -> None:
    """The corpus choice and its blend list."""
    corpora = ("shakespeare", "files", "prepared", "stream", "sft", "preference", "classification", "seq2seq", "qa")
    if d.corpus not in corpora:
        raise ConfigError(f"data.corpus={d.corpus!r}: use one of {', '.join(map(repr, corpora))}.")
    supervised = d.corpus in ("sft", "preference", "classification", "seq2seq")
    if (d.corpus == "files" or supervised) and not d.files:
        what = {"sft": "instruction / chat JSONL", "preference": "preference JSONL",
                "classification": "classification JSONL", "seq2seq": "seq2seq JSONL"}.get(d.corpus, "text/JSONL/parquet")
        raise ConfigError(f"data.corpus={d.corpus!r} but data.files is empty: list {what} files.")
    if d.corpus == "qa" and d.tokenizer is None:
        raise ConfigError("data.corpus='qa' is read by research.recipe='soft_prompt' with hf.path set (its tokenizer "
                          "is used).")
    if supervised and d.tokenizer is None:
        raise ConfigError(f"data.corpus={d.corpus!r} needs a tokenizer: set data.tokenizer, or hf.path (its own is "
                          f"used).")
    if (supervised or d.corpus == "qa") and d.doc_mask:
        raise ConfigError(f"data.corpus={d.corpus!r} pads each example (no packing): set data.doc_mask=false.")
    if d.max_prompt_len is not None:
        _positive("data.max_prompt_len", d.max_prompt_len)
    mixing = d.corpus in ("prepared", "stream")
    if mixing and not d.blend:
        raise ConfigError(f"data.corpus={d.corpus!r} but data.blend is empty: list [{{path: ..., weight: 1.0}}, ...].")
    if d.blend and not mixing:
        raise ConfigError(f"data.blend is set but data.corpus={d.corpus!r}: use corpus 'prepared' or 'stream'.")
    if d.corpus == "stream" and d.tokenizer is None:
        raise ConfigError("data.corpus='stream' needs data.tokenizer (a local HF tokenizer directory).")
    for i, entry in enumerate(d.blend):
        extra = sorted(set(entry) - {"path", "weight"})
        if extra or "path" not in entry or not isinstance(entry["path"], str):
            raise ConfigError(f"data.blend[{i}]={entry!r}: each entry is {{path: <dir or files>, weight: <number>}}.")
        weight = entry.get("weight", 1.0)
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not weight >= 0:
            raise ConfigError(f"data.blend[{i}].weight={weight!r}: must be a number >= 0.")
        entry["weight"] = float(weight)
    if d.blend and not sum(e["weight"] for e in d.blend) > 0:
        raise ConfigError(f"data.blend weights {[e['weight'] for e in d.blend]} do not sum to a positive number: "
                          "give at least one dataset a weight > 0.")
    _positive("data.workers", d.workers)
    _positive("data.stream_val_samples", d.stream_val_samples)


def _validate_perf(cfg: JobConfig, args: ModelArgs | None) -> None:
    """The perf section, and the combinations of it with parallelism that cannot run."""
    p, par = cfg.perf, cfg.parallel
    if cfg.hf.path is not None:
        used = [name for name in ("activation_checkpointing", "compile", "fused_linear_cross_entropy")
                if getattr(p, name) != getattr(PerfSection, name)]
        if used:
            raise ConfigError(f"perf.{used[0]} is set with hf.path: the perf section transforms Tessera models; an "
                              f"HF model recomputes its layers with hf.gradient_checkpointing=true.")
    if p.fused_linear_cross_entropy and cfg.train.objective != "lm":
        raise ConfigError(f"perf.fused_linear_cross_entropy=true with train.objective={cfg.train.objective!r}: the "
                          f"fused head computes the language-model loss only; set it to false.")
    if p.activation_checkpointing not in ("none", "full", "selective"):
        raise ConfigError(f"perf.activation_checkpointing={p.activation_checkpointing!r}: use 'none', 'full' or "
                          f"'selective'.")
    _positive("perf.ac_every", p.ac_every)
    if p.activation_checkpointing != "none" and par.activation_checkpoint_interval > 0:
        raise ConfigError(f"perf.activation_checkpointing={p.activation_checkpointing!r} and parallel."
                          f"activation_checkpoint_interval={par.activation_checkpoint_interval} both recompute "
                          f"activations: set one of them (perf.activation_checkpointing=none or the interval to 0).")
    if p.fused_linear_cross_entropy and (par.tp > 1 or par.pp > 1):
        which = f"parallel.tp={par.tp}" if par.tp > 1 else f"parallel.pp={par.pp}"
        raise ConfigError(f"perf.fused_linear_cross_entropy=true with {which}: the fused loss needs the whole "
                          f"output head on one rank (tp splits it by vocabulary and uses its own vocabulary-parallel "
                          f"loss; pp puts it on the last stage); set perf.fused_linear_cross_entropy=false.")
    if p.compile and p.activation_checkpointing != "none" and par.tp > 1 and args is not None and args.dropout > 0:
        raise ConfigError(f"perf.compile=true with perf.activation_checkpointing={p.activation_checkpointing!r}, "
                          f"parallel.tp={par.tp} and model.dropout={args.dropout}: torch.compile cannot trace the "
                          f"rewind of each rank's dropout stream that recomputation needs; turn one of them off.")


def check_batch_geometry(cfg: JobConfig, dp_size: int) -> int:
    """Gradient-accumulation steps for this data-parallel size, or a ConfigError naming the fields."""
    gb, mb = cfg.train.global_batch_size, cfg.train.micro_batch_size
    if gb % (mb * dp_size):
        raise ConfigError(
            f"train.global_batch_size={gb} does not factor into train.micro_batch_size={mb} x accumulation x "
            f"data-parallel size={dp_size}: choose a global batch that is a multiple of {mb * dp_size}."
        )
    return gb // (mb * dp_size)


_DTYPES = ("float32", "bfloat16", "float16")


def _validate_hf(cfg: JobConfig) -> None:
    """The hf and lora sections; an HF model takes its tokenizer from its directory unless one is named."""
    h, lo = cfg.hf, cfg.lora
    for name, value, allowed in (("dtype", h.dtype, ("auto", *_DTYPES)),
                                 ("attn_implementation", h.attn_implementation, ("sdpa", "eager", "flash_attention_2")),
                                 ("quantization", h.quantization, ("none", "4bit", "8bit")),
                                 ("quant_type", h.quant_type, ("nf4", "fp4")),
                                 ("compute_dtype", h.compute_dtype, ("auto", *_DTYPES)),
                                 ("quant_storage", h.quant_storage, ("auto", "uint8", *_DTYPES))):
        if value not in allowed:
            raise ConfigError(f"hf.{name}={value!r}: use one of {', '.join(map(repr, allowed))}.")
    if h.path is None:
        changed = [f.name for f in dataclasses.fields(HFSection) if getattr(h, f.name) != f.default]
        if changed:
            raise ConfigError(f"hf.{changed[0]} is set but hf.path is not: name the HF model directory in hf.path.")
    else:
        if cfg.model.init_from is not None or cfg.model.overrides:
            key = "init_from" if cfg.model.init_from is not None else min(cfg.model.overrides)
            raise ConfigError(f"model.{key} is set together with hf.path={h.path}: an HF model keeps its own "
                              f"config; remove model.{key} (or hf.path to train a Tessera preset).")
        if cfg.data.tokenizer is None:
            cfg.data.tokenizer = h.path  # the model's own tokenizer
    v = cfg.vocab
    extend = v.lexicon is not None or v.from_snapshot is not None
    if extend:
        _validate_vocab(cfg)
    if h.quantization != "none" and lo.r == 0 and not extend:
        raise ConfigError(f"hf.quantization={h.quantization!r} with lora.r=0: quantized weights cannot be trained; "
                          f"set lora.r (QLoRA) or hf.quantization='none'.")
    _positive("lora.r", lo.r, allow_zero=True)
    if lo.r > 0:
        _positive("lora.alpha", lo.alpha)
        if not 0.0 <= lo.dropout < 1.0:
            raise ConfigError(f"lora.dropout={lo.dropout}: must be in [0, 1).")
        if lo.bias not in ("none", "lora_only", "all"):
            raise ConfigError(f"lora.bias={lo.bias!r}: use 'none', 'lora_only' or 'all'.")
        parse_layers(lo.layers)
    tp_pp = cfg.parallel.tp * cfg.parallel.pp
    if lo.r > 0 and tp_pp > 1:
        raise ConfigError(f"lora.r={lo.r} with parallel.tp={cfg.parallel.tp}, parallel.pp={cfg.parallel.pp}: "
                          f"adapters train with data parallelism and ZeRO only; set parallel.tp=1 and parallel.pp=1.")
    if h.path is not None and cfg.parallel.pp > 1:
        raise ConfigError(f"parallel.pp={cfg.parallel.pp} with hf.path: HF models are not cut into pipeline "
                          f"stages; use ZeRO-3 (--ds_config zero3) to shard them, or parallel.pp=1.")
    if h.path is not None and cfg.data.doc_mask:
        raise ConfigError("data.doc_mask=true with hf.path: HF models take padding masks, not packed-document "
                          "masks; set data.doc_mask=false.")


def _validate_vocab(cfg: JobConfig) -> None:
    """Embedding-only extension: an HF model, only the new rows train, and nothing decays them."""
    v = cfg.vocab
    if cfg.hf.path is None:
        raise ConfigError("vocab.lexicon / vocab.from_snapshot need hf.path: the extension resizes an HF model's "
                          "embeddings.")
    if cfg.lora.r > 0:
        raise ConfigError(f"vocab.lexicon with lora.r={cfg.lora.r}: the extension trains only the new embedding "
                          f"rows; set lora.r=0.")
    if cfg.train.weight_decay != 0:
        raise ConfigError(f"train.weight_decay={cfg.train.weight_decay} with vocab.lexicon: decoupled decay would "
                          f"change the base rows; set train.weight_decay=0.")
    if cfg.parallel.tp * cfg.parallel.pp > 1:
        raise ConfigError("vocab.lexicon with parallel.tp / parallel.pp > 1: the extension needs the whole "
                          "embedding on each rank; use data parallelism (ZeRO 0-2).")
    _positive("vocab.init_scale", v.init_scale)
    _positive("vocab.snapshot_interval", v.snapshot_interval, allow_zero=True)
    if v.pad_to_multiple_of is not None:
        _positive("vocab.pad_to_multiple_of", v.pad_to_multiple_of)


def _validate_objective(cfg: JobConfig) -> None:
    """The objective and its data: preference pairs train with DPO, everything else with the LM loss."""
    t, d, o = cfg.train, cfg.data, cfg.dpo
    corpora = {"lm": ("shakespeare", "files", "prepared", "stream", "sft", "qa"), "dpo": ("preference",),
               "reward": ("preference", "classification"), "classify": ("classification",), "seq2seq": ("seq2seq",)}
    if t.objective not in corpora:
        raise ConfigError(f"train.objective={t.objective!r}: use one of {', '.join(map(repr, corpora))}.")
    if d.corpus not in corpora[t.objective]:
        raise ConfigError(f"train.objective={t.objective!r} with data.corpus={d.corpus!r}: it trains on "
                          f"data.corpus {' or '.join(map(repr, corpora[t.objective]))}.")
    if t.objective == "seq2seq" and cfg.hf.path is None:
        raise ConfigError("train.objective='seq2seq' needs hf.path: an HF encoder-decoder model (e.g. T5).")
    if t.objective in ("reward", "classify", "seq2seq"):
        if cfg.parallel.tp * cfg.parallel.pp > 1:
            raise ConfigError(f"train.objective={t.objective!r} with parallel.tp / parallel.pp > 1: it trains "
                              f"with data parallelism and ZeRO; set both to 1.")
        if cfg.vocab.lexicon is not None:
            raise ConfigError(f"train.objective={t.objective!r} with vocab.lexicon: the vocabulary extension trains "
                              f"a language model; remove one.")
    if t.objective != "dpo":
        return
    _positive("dpo.beta", o.beta)
    if not 0.0 <= o.label_smoothing < 0.5:
        raise ConfigError(f"dpo.label_smoothing={o.label_smoothing}: must be in [0, 0.5).")
    if o.reference not in ("auto", "copy", "adapters", "cached"):
        raise ConfigError(f"dpo.reference={o.reference!r}: use 'auto', 'copy', 'adapters' or 'cached'.")
    if o.reference_from is not None and o.reference not in ("copy", "auto") or \
            o.reference_from is not None and o.reference == "auto" and cfg.lora.r > 0:
        raise ConfigError(f"dpo.reference_from={o.reference_from} with dpo.reference={o.reference!r}"
                          f"{' and LoRA' if cfg.lora.r else ''}: another model is a frozen copy; set "
                          f"dpo.reference='copy'.")
    if o.reference == "adapters" and cfg.lora.r == 0:
        raise ConfigError("dpo.reference='adapters' needs LoRA (lora.r > 0): the reference is the base with the "
                          "adapters switched off; use 'copy' or 'cached' for a full fine-tune.")
    if cfg.parallel.pp > 1 or cfg.parallel.tp > 1:
        raise ConfigError(f"train.objective='dpo' with parallel.tp={cfg.parallel.tp}, parallel.pp="
                          f"{cfg.parallel.pp}: DPO runs with data parallelism and ZeRO; set both to 1.")


def validate_research(cfg: JobConfig) -> None:
    """The section's shape; everything that needs the recipe class is checked when the run is planned."""
    r = cfg.research
    if cfg.data.corpus == "qa" and r.recipe is None:
        raise ConfigError("data.corpus='qa' is read by a research recipe: set research.recipe='soft_prompt'.")
    if r.diagnostics_interval < 0:
        raise ConfigError(f"research.diagnostics_interval={r.diagnostics_interval}: must be >= 0 (0: off).")
    if r.recipe is None:
        for key in ("options", "terms", "groups"):
            if getattr(r, key):
                raise ConfigError(f"research.{key} is set but research.recipe is not: name a recipe ('injection', "
                                  f"'complex' or 'package.module:Class') or remove research.{key}.")
        return
    if cfg.train.objective != "lm":
        raise ConfigError(f"research.recipe={r.recipe!r} with train.objective={cfg.train.objective!r}: a research "
                          f"recipe defines its own losses; set train.objective='lm'.")
    if cfg.parallel.pp > 1:
        raise ConfigError(f"research.recipe={r.recipe!r} with parallel.pp={cfg.parallel.pp}: the pipeline engine "
                          f"runs only the model's own layers; use tensor / data parallelism (parallel.pp=1).")
    if cfg.vocab.lexicon is not None:
        raise ConfigError(f"research.recipe={r.recipe!r} with vocab.lexicon: run the vocabulary extension on its "
                          f"own; remove one.")
    for name, spec in r.terms.items():
        if not isinstance(spec, dict):
            raise ConfigError(f"research.terms.{name}={spec!r}: write a mapping, e.g. {{weight: 0.1, schedule: "
                              f"linear, start: 0, end: 100}}.")
        unknown = sorted(set(spec) - set(TERM_KEYS))
        if unknown:
            raise ConfigError(f"research.terms.{name}.{unknown[0]}: unknown key; a term takes {', '.join(TERM_KEYS)}.")
        if spec.get("schedule", "constant") not in SCHEDULES:
            raise ConfigError(f"research.terms.{name}.schedule={spec['schedule']!r}: use one of "
                              f"{', '.join(SCHEDULES)}.")
    for i, g in enumerate(r.groups):
        if not isinstance(g, dict) or "params" not in g:
            raise ConfigError(f"research.groups[{i}]={g!r}: write {{params: GLOB, lr: ..., weight_decay: ...}}.")
        unknown = sorted(set(g) - set(GROUP_KEYS))
        if unknown:
            raise ConfigError(f"research.groups[{i}].{unknown[0]}: unknown key; a group takes "
                              f"{', '.join(GROUP_KEYS)}.")
        if g.get("lr") is not None and not float(g["lr"]) > 0:
            raise ConfigError(f"research.groups[{i}].lr={g['lr']}: must be > 0.")
