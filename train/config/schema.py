"""The job configuration: a YAML recipe plus ``key=value`` overrides, validated before anything runs.

A recipe has one section per concern (``model``, ``data``, ``train``, ``parallel``, ``log``, ``sample``).
Every field carries a one-line ``help``; unknown keys, wrong types and impossible values are reported as one
``ConfigError`` that names the key, the value and the fix.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from model import ModelArgs, ModelConfigError, get_preset
from model.hf import args_from_hf_config, load_hf_config
from train.config.fields import ConfigError, _f
from train.config.finetune import (
    DPOSection,
    HFSection,
    LoraSection,
    VocabSection,
)
from train.config.research import ResearchSection

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




