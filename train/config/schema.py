"""The job configuration: a YAML recipe plus ``key=value`` overrides, validated before anything runs.

A recipe has one section per concern (``model``, ``data``, ``train``, ``parallel``, ``log``, ``sample``).
Every field carries a one-line ``help``; unknown keys, wrong types and impossible values are reported as one
``ConfigError`` that names the key, the value and the fix.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from model import ModelArgs, ModelConfigError, get_preset
from model.hf import args_from_hf_config, load_hf_config
from train.config.fields import ConfigError, _f, _positive
from train.config.finetune import (
    DPOSection,
    HFSection,
    LoraSection,
    VocabSection,
    _validate_hf,
    _validate_objective,
)
from train.config.research import ResearchSection, validate_research

# ModelArgs fields a recipe may still set when starting from pretrained weights.
INIT_FROM_OVERRIDES = {"max_seq_len", "dropout"}


@dataclass
class ModelSection:
    preset: str = _f("tiny", "Named ModelArgs preset (model/args.py PRESETS); other keys here override its fields.")
    init_from: str | None = _f(None, "Local HF Llama / Mistral / Qwen2 directory to start from (replaces preset).")
    overrides: dict[str, Any] = _f({}, "ModelArgs fields that replace the preset's (written inline in YAML).")


@dataclass
class DataSection:
    corpus: str = _f("shakespeare", "'shakespeare' (built in), 'files' (prepare `files`), 'prepared' (mix the "
                                    "prepared dirs of `blend`), 'stream' (stream the raw sources of `blend`) or "
                                    "'sft' (instruction / chat JSONL `files`, loss on responses only) or 'qa' "
                                    "(SQuAD-format `files`, read by research.recipe='soft_prompt').")
    files: list[str] = _f([], "Text / JSONL / parquet files or HF dataset directories (corpus='files'), or "
                              "instruction / chat JSONL files (corpus='sft').")
    max_prompt_len: int | None = _f(None, "corpus='sft': keep at most this many prompt tokens (the most recent).")
    max_target_len: int | None = _f(None, "corpus='seq2seq': target tokens kept (None: data.seq_len).")
    labels: list[str] = _f([], "corpus='classification': the class names in order (string labels map to their "
                               "position, integer labels must be below their count); [] takes the sorted names.")
    text_field: str = _f("text", "Field holding the document text in JSONL, parquet and HF datasets.")
    tokenizer: str | None = _f(None, "Local HF tokenizer directory; None trains a byte-level BPE on the corpus.")
    vocab_size: int = _f(2048, "Vocabulary size of the BPE trained when `tokenizer` is None.")
    prepared_dir: str | None = _f(None, "Prepared token data directory; None derives one under cache_dir.")
    cache_dir: str = _f(".cache/tessera", "Where corpora, trained tokenizers and prepared data are cached.")
    val_fraction: float = _f(0.05, "Fraction of documents held out for validation when preparing.")
    split_seed: int = _f(0, "Seed of the document-level train/validation split (independent of train.seed).")
    seq_len: int = _f(256, "Training sequence length in tokens (at most model.max_seq_len).")
    sampling: str = _f("random", "'blocks': disjoint consecutive blocks; 'random': blocks at random offsets.")
    samples_per_epoch: int | None = _f(None, "Samples in one pass for sampling='random', or a blend's length (None: "
                                             "tokens / seq_len; a blend: at least the run's samples).")
    blend: list[dict[str, Any]] = _f([], "Datasets to mix, [{path: P, weight: W}, ...]: prepared dirs (corpus="
                                         "'prepared') or files / globs / dataset dirs (corpus='stream').")
    doc_mask: bool = _f(False, "Packed samples: attention and positions restart at every document boundary.")
    verify: bool = _f(True, "Check every shard's sha256 against the manifest when opening prepared data.")
    workers: int = _f(1, "Tokenizing processes when data is prepared on first use.")
    stream_val_samples: int = _f(64, "corpus='stream': the stream's first samples, held out for validation.")


@dataclass
class TrainSection:
    objective: str = _f("lm", "'lm' (next-token loss; response tokens only with data.corpus='sft'), 'dpo' "
                              "(data.corpus='preference'; see the dpo section), 'reward' (a scalar head: pairwise on "
                              "data.corpus='preference', pointwise 0/1 on 'classification'), 'classify', or 'seq2seq' (an "
                              "HF encoder-decoder on data.corpus='seq2seq', evaluated with ROUGE).")
    steps: int = _f(1000, "Optimizer steps to run.")
    global_batch_size: int = _f(32, "Sequences per optimizer step over all data-parallel ranks.")
    micro_batch_size: int = _f(8, "Sequences per forward/backward on one rank; accumulation makes up the rest.")
    lr: float = _f(1e-3, "Peak learning rate after warm-up.")
    min_lr: float = _f(1e-4, "Learning rate at the end of the cosine decay.")
    warmup_steps: int = _f(100, "Linear warm-up steps from 0 to lr.")
    weight_decay: float = _f(0.1, "AdamW weight decay on matrices (norms and biases are never decayed).")
    beta1: float = _f(0.9, "AdamW beta1.")
    beta2: float = _f(0.95, "AdamW beta2.")
    eps: float = _f(1e-8, "AdamW epsilon.")
    grad_clip: float = _f(1.0, "Global gradient-norm clipping threshold (0 disables).")
    seed: int = _f(1337, "Seed for weight initialisation, data order and sampling.")
    eval_interval: int = _f(200, "Evaluate validation loss every this many steps (0: only at the end).")
    eval_batches: int = _f(20, "Validation micro-batches per evaluation, split across data-parallel ranks.")
    log_interval: int = _f(10, "Write a metrics row every this many steps.")
    save_interval: int = _f(0, "Save a checkpoint every this many steps (0: only at the end).")
    max_bad_steps: int = _f(3, "Skipped (non-finite) steps in a row before rolling back to the last checkpoint "
                                  "and moving past those batches (0: stop at the first).")
    max_rollbacks: int = _f(3, "Rollbacks allowed in one run before it stops with an error.")
    spike_zscore: float = _f(6.0, "A loss this many standard deviations above its running EMA is a spike (0: off).")
    spike_action: str = _f("warn", "On a loss spike: 'warn' logs it; 'rollback' also rolls back past the batch.")
    keep_last: int = _f(3, "Newest complete checkpoints kept besides the best one (0 keeps all).")
    best_smoothing: float = _f(0.5, "EMA factor of the validation loss that picks the best checkpoint (0: raw).")
    dist_timeout_s: int = _f(1800, "Seconds a collective waits for the other ranks; a dead rank then ends the job.")
    out_dir: str = _f("runs/shakespeare", "Run directory: checkpoints, metrics.jsonl, resolved config, wandb.")


@dataclass
class ParallelSection:
    tp: int = _f(1, "Tensor-parallel degree (ranks that split each layer).")
    pp: int = _f(1, "Pipeline-parallel degree (stages the layer list is cut into).")
    sequence_parallel: bool = _f(
        False, "With tp > 1, split norms, dropout and residuals along the sequence (less activation memory)."
    )
    partition_method: str = _f("parameters", "With pp > 1, cut stages by 'parameters' (balanced) or 'uniform'.")
    activation_checkpoint_interval: int = _f(
        0, "With pp > 1, recompute activations in backward every this many pieces (0: off)."
    )


@dataclass
class LogSection:
    wandb: str = _f("offline", "wandb mode: 'offline' (local files), 'online', or 'disabled'.")
    wandb_project: str = _f("tessera", "wandb project name.")
    run_name: str | None = _f(None, "Run name for wandb and plots (None: the out_dir's name).")
    progress: bool = _f(True, "Show a progress bar on rank 0.")


@dataclass
class SampleSection:
    prompt: str = _f("ROMEO:", "Prompt for the sample generated at the end of training.")
    max_new_tokens: int = _f(120, "Tokens to generate for the final sample (0 skips it).")
    temperature: float = _f(0.8, "Sampling temperature (0: greedy).")
    top_k: int | None = _f(50, "Keep only the k most likely tokens (None: off).")
    top_p: float | None = _f(None, "Nucleus sampling threshold (None: off).")
    repetition_penalty: float = _f(1.0, "Penalty > 1 discourages tokens already in the sequence.")


@dataclass
class PerfSection:
    fused_rms_norm: bool = _f(True, "RMSNorm as a liger-kernel kernel on CUDA (elsewhere the reference, logged).")
    fused_swiglu: bool = _f(True, "SwiGLU as a liger-kernel kernel on CUDA (elsewhere the reference, logged).")
    fused_rope: bool = _f(True, "RoPE as a liger-kernel kernel on CUDA (elsewhere the reference, logged).")
    fused_linear_cross_entropy: bool = _f(
        False, "Head + cross-entropy in chunks, never the full logits (liger on CUDA; tp = pp = 1 only).")
    activation_checkpointing: str = _f("none", "Recompute in backward: 'none', 'full' (blocks) or 'selective' "
                                               "(attention only).")
    ac_every: int = _f(1, "Checkpoint blocks 0, k, 2k, ... only (1: every block).")
    compile: bool = _f(False, "torch.compile each transformer block.")


@dataclass
class JobConfig:
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    train: TrainSection = field(default_factory=TrainSection)
    parallel: ParallelSection = field(default_factory=ParallelSection)
    log: LogSection = field(default_factory=LogSection)
    sample: SampleSection = field(default_factory=SampleSection)
    hf: HFSection = field(default_factory=HFSection)
    lora: LoraSection = field(default_factory=LoraSection)
    vocab: VocabSection = field(default_factory=VocabSection)
    dpo: DPOSection = field(default_factory=DPOSection)
    perf: PerfSection = field(default_factory=PerfSection)
    research: ResearchSection = field(default_factory=ResearchSection)

    def model_args(self, vocab_size: int | None = None) -> ModelArgs:
        """The preset (or the HF model of ``init_from``) with this recipe's overrides, validated.

        A preset's vocabulary follows the tokenizer (``vocab_size``); a pretrained model keeps its own.
        """
        m = self.model
        if self.hf.path is not None:
            raise ConfigError("hf.path is set: the model is the HF model's own, it has no ModelArgs.")
        try:
            if m.init_from is not None:
                shape = sorted(set(m.overrides) - INIT_FROM_OVERRIDES)
                if shape:
                    raise ConfigError(
                        f"model.{shape[0]} cannot be changed for model.init_from={m.init_from} (the weights fix "
                        f"the shape); only {', '.join(sorted(INIT_FROM_OVERRIDES))} can be set."
                    )
                hf_config = load_hf_config(m.init_from)
                args = args_from_hf_config(hf_config, max_seq_len=m.overrides.get("max_seq_len"))
                return dataclasses.replace(args, **m.overrides).validate()
            args = dataclasses.replace(get_preset(m.preset), **m.overrides)
            if vocab_size is not None and "vocab_size" not in m.overrides:
                args = dataclasses.replace(args, vocab_size=vocab_size)
            return args.validate()
        except ModelConfigError as e:
            where = f"model.init_from={m.init_from}" if m.init_from else "model"
            raise ConfigError(f"{where}: {e}") from None

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["model"] = {"preset": self.model.preset, "init_from": self.model.init_from, **self.model.overrides}
        return d


# ----------------------------------------------------------------------------- parsing and validation


def _suggest(key: str, choices: list[str]) -> str:
    close = difflib.get_close_matches(key, choices, n=1, cutoff=0.5)
    return f" Did you mean '{close[0]}'?" if close else f" Known keys: {', '.join(sorted(choices))}."


def _coerce(where: str, value: Any, tp: Any) -> Any:
    """Check ``value`` against the annotation ``tp``; ints are accepted where floats are expected."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(tp)
        if value is None and type(None) in options:
            return None
        errors = []
        for opt in options:
            if opt is type(None):
                continue
            try:
                return _coerce(where, value, opt)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0])
    if origin is list:
        if not isinstance(value, list):
            value = [value]  # a single path is a list of one
        (item_tp,) = typing.get_args(tp)
        return [_coerce(f"{where}[{i}]", v, item_tp) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}.")
        return dict(value)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {value!r}.")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}.")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML reads 1e-3 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}.")
        return float(value)
    if tp is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ConfigError(f"{where}: expected a string, got {value!r}.")
        return str(value)
    raise TypeError(f"unsupported annotation {tp!r} at {where}")


def _section_from_dict(name: str, cls: type, raw: Any) -> Any:
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{name}: expected a mapping of keys, got {raw!r}.")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in raw.items():
        if key not in names:
            raise ConfigError(f"Unknown config key '{name}.{key}'.{_suggest(key, names)}")
        kwargs[key] = _coerce(f"{name}.{key}", value, hints[key])
    return cls(**kwargs)


def _model_section(raw: Any) -> ModelSection:
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"model: expected a mapping of keys, got {raw!r}.")
    raw = dict(raw)
    preset = raw.pop("preset", ModelSection.preset)
    init_from = _coerce("model.init_from", raw.pop("init_from", None), str | None)
    arg_fields = {f.name: f for f in dataclasses.fields(ModelArgs)}
    hints = typing.get_type_hints(ModelArgs)
    overrides = {}
    for key, value in raw.items():
        if key not in arg_fields:
            known = ["preset", "init_from", *arg_fields]
            raise ConfigError(f"Unknown config key 'model.{key}'.{_suggest(key, known)}")
        overrides[key] = _coerce(f"model.{key}", value, hints[key])
    return ModelSection(preset=str(preset), init_from=init_from, overrides=overrides)


_SECTIONS: dict[str, type] = {
    "data": DataSection,
    "train": TrainSection,
    "parallel": ParallelSection,
    "log": LogSection,
    "sample": SampleSection,
    "hf": HFSection,
    "lora": LoraSection,
    "vocab": VocabSection,
    "dpo": DPOSection,
    "perf": PerfSection,
    "research": ResearchSection,
}


def config_from_dict(raw: dict[str, Any]) -> JobConfig:
    """Build and validate a JobConfig from a nested dict (the parsed YAML with overrides applied)."""
    if not isinstance(raw, dict):
        raise ConfigError(f"A recipe must be a mapping of sections, got {type(raw).__name__}.")
    known = ["model", *_SECTIONS]
    for key in raw:
        if key not in known:
            raise ConfigError(f"Unknown config section '{key}'.{_suggest(key, known)}")
    cfg = JobConfig(
        model=_model_section(raw.get("model")),
        **{k: _section_from_dict(k, cls, raw.get(k)) for k, cls in _SECTIONS.items()},
    )
    validate(cfg)
    return cfg


def apply_override(raw: dict[str, Any], override: str) -> None:
    """Apply one ``section.key=value`` override to the nested dict; the value is parsed as YAML."""
    if "=" not in override:
        raise ConfigError(f"Override '{override}' is not of the form section.key=value (e.g. train.lr=3e-4).")
    dotted, text = override.split("=", 1)
    parts = dotted.strip().split(".")
    if len(parts) != 2 or not all(parts):
        raise ConfigError(f"Override key '{dotted}' must be section.key (e.g. train.steps=100, model.n_layers=2).")
    section, key = parts
    raw.setdefault(section, {})
    if not isinstance(raw[section], dict):
        raise ConfigError(f"Override '{override}': section '{section}' is not a mapping in the recipe.")
    raw[section][key] = yaml.safe_load(text) if text.strip() else None


def load_config(path: str | Path | None, overrides: list[str] = ()) -> JobConfig:
    """Read a YAML recipe (None: all defaults), apply overrides, validate."""
    raw: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"--config {path}: no such file. Recipes live in train/configs/.")
        try:
            raw = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"--config {path}: not valid YAML ({e}).") from None
    for o in overrides:
        apply_override(raw, o)
    return config_from_dict(raw)


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


def describe_fields() -> str:
    """Every recipe key with its default and help line, for ``main.py --help-config``."""
    lines = ["model:"]
    for f in dataclasses.fields(ModelSection)[:2]:
        lines.append(f"  {f.name} = {f.default!r}  # {f.metadata['help']}")
    lines += [f"  {f.name}  # {f.metadata['help']}" for f in dataclasses.fields(ModelArgs)]
    for section, cls in _SECTIONS.items():
        lines.append(f"{section}:")
        for f in dataclasses.fields(cls):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            lines.append(f"  {f.name} = {default!r}  # {f.metadata['help']}")
    return "\n".join(lines)
