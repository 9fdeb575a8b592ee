"""The job configuration: a YAML recipe plus ``key=value`` overrides, validated before anything runs.

A recipe has one section per concern (``model``, ``data``, ``train``, ``parallel``, ``log``, ``sample``).
Every field carries a one-line ``help``; a field with a fixed set of values is a ``Literal``. Unknown keys,
wrong types and impossible values are reported as one ``ConfigError`` that names the key, the value and the
fix. Each section's ``validate`` checks what needs only its own fields; train/config/checks.py checks the
combinations across sections.
"""

from __future__ import annotations

import dataclasses
import math
import netrc
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

from model import ModelArgs, ModelConfigError, get_preset
from parallel.perf import ACMode
from parallel.pipeline import PartitionMethod
from train.config.fields import ConfigError, Origin, _f, _positive
from train.config.finetune import (
    DPOSection,
    HFSection,
    LoraSection,
    VocabSection,
)
from train.config.research import ResearchSection
from train.data.dataset import Sampling
from train.export.native import start_args

# ModelArgs fields a recipe may still set when starting from pretrained weights.
INIT_FROM_OVERRIDES = {"max_seq_len", "dropout"}

Corpus = Literal[
    "shakespeare", "files", "prepared", "stream", "sft", "preference", "classification", "seq2seq", "qa"
]
# Corpora of labelled examples, one padded example a sample ('qa' pads too but is read by a research recipe).
SUPERVISED_CORPORA: tuple[Corpus, ...] = ("sft", "preference", "classification", "seq2seq")
Objective = Literal["lm", "dpo", "reward", "classify", "seq2seq"]
SpikeAction = Literal["warn", "rollback"]
BestMode = Literal["min", "max"]
ResumeSchedule = Literal["extend", "recompute"]
WandbMode = Literal["offline", "online", "disabled"]


@dataclass
class ModelSection:
    preset: str = _f("tiny", "Named ModelArgs preset (model/args.py PRESETS); other keys here override its "
                             "fields.")
    init_from: str | None = _f(None, "Weights to start from (replaces preset; fresh optimizer): a local HF "
                                     "Llama / Mistral / Qwen2 / Qwen3 dir, a native export, or a Tessera run or "
                                     "checkpoint dir.")
    overrides: dict[str, Any] = _f({}, "ModelArgs fields that replace the preset's (written inline in YAML).")

    def validate(self) -> None:
        """Pretrained weights fix the shape: with ``init_from`` only INIT_FROM_OVERRIDES may be set. The
        preset and the values of the overrides are checked when ModelArgs are built (``model_args``)."""
        if self.init_from is None:
            return
        shape = sorted(set(self.overrides) - INIT_FROM_OVERRIDES)
        if shape:
            raise ConfigError(
                f"model.{shape[0]} cannot be changed for model.init_from={self.init_from} (the weights fix "
                f"the shape); only {', '.join(sorted(INIT_FROM_OVERRIDES))} can be set."
            )


@dataclass
class DataSection:
    corpus: Corpus = _f("shakespeare", "'shakespeare' (built in), 'files' (prepare `files`), 'prepared' (mix "
                                       "the prepared dirs of `blend`), 'stream' (stream the raw sources of "
                                       "`blend`), 'sft' (instruction / chat JSONL `files`, loss on responses "
                                       "only), 'preference' / 'classification' / 'seq2seq' (JSONL `files` of "
                                       "those objectives) or 'qa' (SQuAD-format `files`, read by "
                                       "research.recipe='soft_prompt').")
    files: list[str] = _f([], "Files, directories (walked recursively; text / JSONL / parquet by suffix, other "
                              "files skipped) and globs; the supervised corpora take only JSONL / parquet from "
                              "directories and globs.")
    max_prompt_len: int | None = _f(None, "corpus='sft': keep at most this many prompt tokens (the most "
                                          "recent).")
    max_target_len: int | None = _f(None, "corpus='seq2seq': target tokens kept (None: data.seq_len).")
    labels: list[str] = _f([], "corpus='classification': the class names in order (string labels map to "
                               "their position, integer labels must be below their count); [] takes the "
                               "sorted names.")
    text_field: str = _f("text", "Field holding the document text in JSONL, parquet and HF datasets.")
    tokenizer: str | None = _f(None, "Local HF tokenizer directory; None trains a byte-level BPE on the "
                                     "corpus.")
    vocab_size: int = _f(2048, "Vocabulary size of the BPE trained when `tokenizer` is None.")
    prepared_dir: str | None = _f(None, "Prepared token data directory; None derives one under cache_dir.")
    cache_dir: str = _f(".cache/tessera", "Where corpora, trained tokenizers and prepared data are cached.")
    val_fraction: float = _f(0.05, "Fraction of documents held out for validation when preparing.")
    split_seed: int = _f(0, "Seed of the document-level train/validation split (independent of train.seed).")
    seq_len: int = _f(256, "Training sequence length in tokens (at most model.max_seq_len).")
    sampling: Sampling = _f("random", "'blocks': disjoint consecutive blocks; 'random': blocks at random "
                                      "offsets.")
    samples_per_epoch: int | None = _f(None, "Samples in one pass for sampling='random', or a blend's length "
                                             "(None: tokens / seq_len; a blend: at least the run's samples).")
    blend: list[dict[str, Any]] = _f([], "Datasets to mix, [{path: P, weight: W}, ...]: prepared dirs "
                                         "(corpus='prepared') or files / directories / globs / saved "
                                         "datasets (corpus='stream').")
    doc_mask: bool = _f(False, "Packed samples: attention and positions restart at every document boundary.")
    verify: bool = _f(True, "Check every shard's sha256 against the manifest when opening prepared data.")
    workers: int = _f(1, "Tokenizing processes when data is prepared on first use.")
    blend_by: Literal["documents", "tokens"] = _f("documents", "corpus='stream': what a blend weight is a share "
                                                               "of: 'documents' drawn, or 'tokens'.")
    stream_val_samples: int = _f(64, "corpus='stream': the stream's first samples, held out for validation.")

    def validate(self) -> None:
        """The corpus and what it reads (files, blend, tokenizer), lengths and fractions. An hf.path model
        lends its tokenizer before this runs (train/config/checks.py)."""
        c = self.corpus
        supervised = c in SUPERVISED_CORPORA
        if (c == "files" or supervised) and not self.files:
            what = {"sft": "instruction / chat JSONL", "preference": "preference JSONL",
                    "classification": "classification JSONL", "seq2seq": "seq2seq JSONL"}
            raise ConfigError(f"data.corpus={c!r} but data.files is empty: list "
                              f"{what.get(c, 'text/JSONL/parquet')} files.")
        if c == "qa" and self.tokenizer is None:
            raise ConfigError("data.corpus='qa' is read by research.recipe='soft_prompt' with hf.path set "
                              "(its tokenizer is used).")
        if supervised and self.tokenizer is None:
            raise ConfigError(f"data.corpus={c!r} needs a tokenizer: set data.tokenizer, or hf.path (its own "
                              f"is used).")
        if (supervised or c == "qa") and self.doc_mask:
            raise ConfigError(f"data.corpus={c!r} pads each example (no packing): set data.doc_mask=false.")
        if self.max_prompt_len is not None:
            _positive("data.max_prompt_len", self.max_prompt_len)
        self._validate_blend()
        _positive("data.workers", self.workers)
        _positive("data.stream_val_samples", self.stream_val_samples)
        _positive("data.seq_len", self.seq_len)
        if not 0.0 < self.val_fraction < 1.0:
            raise ConfigError(f"data.val_fraction={self.val_fraction}: must be between 0 and 1 (exclusive).")
        if self.tokenizer is None and self.vocab_size < 260:
            raise ConfigError(f"data.vocab_size={self.vocab_size}: a byte-level BPE needs at least 260 "
                              f"tokens.")

    def _validate_blend(self) -> None:
        """corpus 'prepared' and 'stream' mix the entries of ``blend``; their weights become floats here."""
        c = self.corpus
        mixing = c in ("prepared", "stream")
        if mixing and not self.blend:
            raise ConfigError(f"data.corpus={c!r} but data.blend is empty: list "
                              f"[{{path: ..., weight: 1.0}}, ...].")
        if self.blend and not mixing:
            raise ConfigError(f"data.blend is set but data.corpus={c!r}: use corpus 'prepared' or 'stream'.")
        if c == "stream" and self.tokenizer is None:
            raise ConfigError("data.corpus='stream' needs data.tokenizer (a local HF tokenizer directory).")
        for i, entry in enumerate(self.blend):
            extra = sorted(set(entry) - {"path", "weight", "max_docs"}, key=str)
            if extra or "path" not in entry or not isinstance(entry["path"], str):
                raise ConfigError(f"data.blend[{i}]={entry!r}: each entry is "
                                  f"{{path: <dir or files>, weight: <number>, max_docs: <int, stream only>}}.")
            cap = entry.get("max_docs")
            if cap is not None and (c != "stream" or isinstance(cap, bool) or not isinstance(cap, int) or cap < 1):
                raise ConfigError(f"data.blend[{i}].max_docs={cap!r}: an integer >= 1, for data.corpus='stream' "
                                  f"(a prepared dataset is capped when it is prepared).")
            weight = entry.get("weight", 1.0)
            if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not 0 <= weight < math.inf:
                raise ConfigError(f"data.blend[{i}].weight={weight!r}: must be a number >= 0 and finite.")
            entry["weight"] = float(weight)
        if self.blend and not sum(e["weight"] for e in self.blend) > 0:
            raise ConfigError(f"data.blend weights {[e['weight'] for e in self.blend]} do not sum to a "
                              "positive number: give at least one dataset a weight > 0.")


@dataclass
class TrainSection:
    objective: Objective = _f("lm", "'lm' (next-token loss; response tokens only with data.corpus='sft'), "
                                    "'dpo' (data.corpus='preference'; see the dpo section), 'reward' (a "
                                    "scalar head: pairwise on data.corpus='preference', pointwise 0/1 on "
                                    "'classification'), 'classify', or 'seq2seq' (an HF encoder-decoder on "
                                    "data.corpus='seq2seq', evaluated with ROUGE).")
    steps: int = _f(1000, "Optimizer steps to run (0: evaluate the starting weights only, no optimizer step).")
    global_batch_size: int = _f(32, "Sequences per optimizer step over all data-parallel ranks.")
    micro_batch_size: int = _f(8, "Sequences per forward/backward on one rank; accumulation makes up the "
                                  "rest.")
    lr: float = _f(1e-3, "Peak learning rate after warm-up.")
    min_lr: float = _f(1e-4, "Learning rate at the end of the cosine decay.")
    warmup_steps: int = _f(100, "Linear warm-up steps from 0 to lr.")
    resume_schedule: ResumeSchedule = _f(
        "extend", "A resumed run whose steps / lr / min_lr / warmup_steps differ from its checkpoint's: 'extend' "
                  "keeps the rate reached and decays from it to min_lr at the new steps (no jump); 'recompute' "
                  "follows the new settings' schedule as if planned from step 0 (the rate may jump).")
    weight_decay: float = _f(0.1, "AdamW weight decay on matrices (norms and biases are never decayed).")
    beta1: float = _f(0.9, "AdamW beta1.")
    beta2: float = _f(0.95, "AdamW beta2.")
    eps: float = _f(1e-8, "AdamW epsilon.")
    grad_clip: float = _f(1.0, "Global gradient-norm clipping threshold (0 disables).")
    seed: int = _f(1337, "Seed for weight initialisation, data order and sampling.")
    eval_interval: int = _f(200, "Evaluate validation loss every this many steps (0: only at the end).")
    eval_batches: int = _f(20, "Validation micro-batches of micro_batch_size sequences per evaluation: the first "
                               "eval_batches * micro_batch_size samples of the split (fewer if it is shorter), "
                               "the same for every layout, shared out over the data-parallel ranks.")
    log_interval: int = _f(10, "Write a metrics row every this many steps.")
    save_interval: int = _f(0, "Save a checkpoint every this many steps (0: only at the end).")
    max_bad_steps: int = _f(3, "Skipped (non-finite) steps in a row before rolling back to the last "
                               "checkpoint and moving past those batches (0: stop at the first).")
    max_rollbacks: int = _f(3, "Rollbacks allowed in one run before it stops with an error.")
    spike_zscore: float = _f(6.0, "A loss this many standard deviations above its running EMA is a spike "
                                  "(0: off).")
    spike_action: SpikeAction = _f("warn", "On a loss spike: 'warn' logs it; 'rollback' also rolls back past "
                                           "the batch.")
    keep_last: int = _f(3, "Newest complete checkpoints kept besides the best one (0 keeps all).")
    async_save: bool = _f(False, "Write checkpoints in the background: training pauses only to copy the state "
                                 "to host memory (one more checkpoint's worth of host RAM per rank while it "
                                 "writes); 'latest' moves once the files are written and hashed.")
    best_smoothing: float = _f(0.5, "EMA factor of the validation loss that picks the best checkpoint "
                                    "(0: raw).")
    best_metric: str = _f("val_loss", "The logged validation metric that picks the best checkpoint, smoothed "
                                      "by best_smoothing (e.g. val_loss, val_accuracy, val_b0_latent_f1).")
    best_mode: BestMode = _f("min", "Whether the best checkpoint has the lowest ('min') or highest ('max') "
                                    "smoothed best_metric.")
    dist_timeout_s: int = _f(1800, "Seconds a collective waits for the other ranks; a dead rank then ends "
                                   "the job.")
    out_dir: str = _f("runs/shakespeare", "Run directory: checkpoints, metrics.jsonl, resolved config, "
                                          "wandb.")

    def validate(self) -> None:
        """Positive sizes and rates, and the schedule's order (min_lr <= lr, the warm-up within the run)."""
        for name in ("global_batch_size", "micro_batch_size", "lr", "eval_batches", "log_interval"):
            _positive(f"train.{name}", getattr(self, name))
        for name in ("steps", "min_lr", "warmup_steps", "weight_decay", "grad_clip", "eval_interval", "save_interval",
                     "keep_last", "max_bad_steps", "max_rollbacks", "spike_zscore"):
            _positive(f"train.{name}", getattr(self, name), allow_zero=True)
        _positive("train.dist_timeout_s", self.dist_timeout_s)
        if not self.best_metric.startswith("val_"):
            raise ConfigError(f"train.best_metric={self.best_metric!r}: name a logged validation metric, which "
                              f"starts with 'val_' (e.g. val_loss, val_accuracy).")
        if not 0.0 <= self.best_smoothing < 1.0:
            raise ConfigError(f"train.best_smoothing={self.best_smoothing}: must be in [0, 1).")
        if self.min_lr > self.lr:
            raise ConfigError(f"train.min_lr={self.min_lr} is above train.lr={self.lr}: the cosine decays "
                              f"from lr to min_lr.")
        if self.steps and self.warmup_steps > self.steps:  # steps=0 (evaluation only) has no schedule
            raise ConfigError(f"train.warmup_steps={self.warmup_steps} exceeds train.steps={self.steps}: lower "
                              f"train.warmup_steps or raise train.steps (a warm-up you did not set is scaled down "
                              f"to a short run by itself).")


@dataclass
class ParallelSection:
    tp: int = _f(1, "Tensor-parallel degree (ranks that split each layer).")
    pp: int = _f(1, "Pipeline-parallel degree (stages the layer list is cut into).")
    ep: int = _f(1, "Expert-parallel degree: data-parallel ranks that split each MoE layer's experts (divides dp).")
    sequence_parallel: bool = _f(
        False, "With tp > 1, split norms, dropout and residuals along the sequence (less activation memory)."
    )
    partition_method: PartitionMethod = _f(
        "parameters", "With pp > 1, cut stages by 'parameters' (balanced) or 'uniform'."
    )
    activation_checkpoint_interval: int = _f(
        0, "With pp > 1, recompute activations in backward every this many pieces (0: off)."
    )

    def validate(self) -> None:
        """Degrees of at least 1, and a pipeline checkpoint interval >= 0."""
        _positive("parallel.tp", self.tp)
        _positive("parallel.pp", self.pp)
        _positive("parallel.ep", self.ep)
        _positive("parallel.activation_checkpoint_interval", self.activation_checkpoint_interval,
                  allow_zero=True)


@dataclass
class LogSection:
    wandb: WandbMode = _f("offline", "wandb mode: 'offline' (local files), 'online', or 'disabled'.")
    wandb_project: str = _f("tessera", "wandb project name.")
    run_name: str | None = _f(None, "Run name for wandb and plots (None: the out_dir's name).")
    progress: bool = _f(True, "Show a progress bar on rank 0.")

    def validate(self) -> None:
        """An online wandb run needs an API key where wandb looks for one (checked before anything is
        written, not at the first logged step)."""
        if self.wandb == "online" and wandb_key_source() is None:
            raise ConfigError(
                f"log.wandb='online' but wandb has no API key here (no WANDB_API_KEY, no entry for "
                f"{_wandb_host()} in {_netrc_path()}): run `wandb login` or export WANDB_API_KEY, or set "
                f"log.wandb=offline (upload later with `wandb sync`)."
            )


def _wandb_host() -> str:
    return urlsplit(os.environ.get("WANDB_BASE_URL") or "https://api.wandb.ai").netloc or "api.wandb.ai"


def _netrc_path() -> Path:
    """The netrc file wandb reads: $NETRC, else ~/.netrc, else ~/_netrc."""
    if os.environ.get("NETRC"):
        return Path(os.environ["NETRC"]).expanduser()
    home = Path("~/.netrc").expanduser()
    windows = Path("~/_netrc").expanduser()
    return windows if not home.exists() and windows.exists() else home


def wandb_key_source() -> str | None:
    """Where wandb would find its credentials (WANDB_API_KEY, an identity token file, the netrc entry for its
    host), or None."""
    for name in ("WANDB_API_KEY", "WANDB_IDENTITY_TOKEN_FILE"):
        if os.environ.get(name):
            return name
    path = _netrc_path()
    try:
        entry = netrc.netrc(str(path)).authenticators(_wandb_host())
    except (OSError, netrc.NetrcParseError):
        return None
    return str(path) if entry and entry[2] else None


@dataclass
class SampleSection:
    prompt: str = _f("ROMEO:", "Prompt for the sample generated at the end of training.")
    max_new_tokens: int = _f(120, "Tokens to generate for the final sample (0 skips it).")
    temperature: float = _f(0.8, "Sampling temperature (0: greedy).")
    top_k: int | None = _f(50, "Keep only the k most likely tokens (None: off).")
    top_p: float | None = _f(None, "Nucleus sampling threshold (None: off).")
    repetition_penalty: float = _f(1.0, "Penalty > 1 discourages tokens already in the sequence.")

    def validate(self) -> None:
        """A temperature >= 0 (0: greedy)."""
        if self.temperature < 0:
            raise ConfigError(f"sample.temperature={self.temperature}: must be >= 0 (0 is greedy).")


@dataclass
class PerfSection:
    fused_rms_norm: bool | None = _f(None, "RMSNorm as a liger-kernel kernel: None where it can run (CUDA), "
                                           "true asks for it (a fallback is logged), false: the reference.")
    fused_swiglu: bool | None = _f(None, "SwiGLU as a liger-kernel kernel: None where it can run (CUDA), true "
                                         "asks for it (a fallback is logged), false: the reference.")
    fused_rope: bool | None = _f(None, "RoPE as a liger-kernel kernel: None where it can run (CUDA), true asks "
                                       "for it (a fallback is logged), false: the reference.")
    fused_linear_cross_entropy: bool = _f(
        False, "Head + cross-entropy in chunks, never the full logits (liger on CUDA; tp = pp = 1 only).")
    activation_checkpointing: ACMode = _f("none", "Recompute in backward: 'none', 'full' (blocks) or "
                                                  "'selective' (attention only).")
    ac_every: int = _f(1, "Checkpoint blocks 0, k, 2k, ... only (1: every block).")
    compile: bool = _f(False, "torch.compile each transformer block.")

    def validate(self) -> None:
        """A checkpoint stride of at least 1; the combinations with parallelism are checked in checks.py."""
        _positive("perf.ac_every", self.ac_every)


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

    def __post_init__(self) -> None:
        # Which keys the recipe file and the overrides set (train/config/load.py); not a section, never saved.
        self.origin = Origin()

    def model_args(self, vocab_size: int | None = None) -> ModelArgs:
        """The preset (or the HF model of ``init_from``) with this recipe's overrides, validated.

        A preset's vocabulary follows the tokenizer (``vocab_size``); a pretrained model keeps its own.
        """
        m = self.model
        if self.hf.path is not None:
            raise ConfigError("hf.path is set: the model is the HF model's own, it has no ModelArgs.")
        m.validate()
        try:
            if m.init_from is not None:
                args = start_args(m.init_from, max_seq_len=m.overrides.get("max_seq_len"))
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
