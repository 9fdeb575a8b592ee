"""A recipe's `hf` and `lora` sections: plan (checks before any weight is read), build, checkpoint extras.

`plan_hf` reads only config files: it resolves dtypes against the DeepSpeed config, checks the model against the
data (sequence length, vocabulary) and the parallel layout, and resolves LoRA targets on a meta-device copy of
the model, so every mistake is one line before a weight is loaded. `build_hf` then loads the weights (under
ZeRO-3 through `HfDeepSpeedConfig`, so each rank only ever holds its partition; 4/8-bit through bitsandbytes)
and wraps them with PEFT. Every checkpoint of an adapter run also holds the adapter in PEFT's own format
(`<checkpoint>/adapter/`), loadable with `PeftModel.from_pretrained` on the base model.
"""

from __future__ import annotations

import hashlib
import logging
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from model.args import ModelConfigError
from model.heads import SequenceScorer
from model.hf_causal import (
    DTYPES,
    CausalLM,
    Seq2SeqLM,
    causal_lm_config,
    load_causal_lm,
    meta_model,
    quantization_config,
)
from model.lora import apply_lora, lora_targets
from parallel.dims import ParallelDims
from parallel.tp import HF_TP_MODEL_TYPES
from train.config.fields import ConfigError
from train.config.finetune import parse_layers
from train.config.schema import JobConfig
from train.objectives import OBJECTIVES
from train.vocab.setup import VocabPlan, apply_vocab

ADAPTER_DIR = "adapter"
log = logging.getLogger("tessera")


@dataclass
class HFPlan:
    """What `build_hf` loads, decided and checked before any weight is read."""

    path: Path
    config: Any  # transformers PretrainedConfig
    n_params: int
    dtype: torch.dtype
    quantization: Any  # a BitsAndBytesConfig, or None
    zero3: bool
    lora_targets: list[str] = field(default_factory=list)  # full module names; [] without LoRA
    identity: dict[str, Any] = field(default_factory=dict)  # recorded in every checkpoint
    trainable_estimate: int = 0  # parameters a checkpoint holds (all of them, or the adapters')
    vocab: VocabPlan | None = None  # the embedding-only vocabulary extension (train/vocab/setup.py)
    head_labels: int | None = None  # a sequence head with this many outputs (reward: 1) instead of the LM head

    @property
    def adapters(self) -> bool:
        return bool(self.lora_targets)


def _ds_dtype(ds_config: dict[str, Any]) -> torch.dtype:
    if ds_config.get("bf16", {}).get("enabled"):
        return torch.bfloat16
    if ds_config.get("fp16", {}).get("enabled"):
        return torch.float16
    return torch.float32


def model_identity(path: Path) -> dict[str, Any]:
    """The base model a run trains on: its directory and a hash of its config (weights are too big to hash)."""
    config_text = (path / "config.json").read_bytes()
    return {"path": str(path.resolve()), "config_sha256": hashlib.sha256(config_text).hexdigest()}


def plan_hf(cfg: JobConfig, ds_config: dict[str, Any], dims: ParallelDims, tokenizer_vocab: int,
            vocab: VocabPlan | None = None) -> HFPlan:
    """Check the HF model of ``cfg.hf.path`` against the recipe; raise ConfigError / ModelConfigError."""
    h, lo = cfg.hf, cfg.lora
    path = Path(str(h.path))
    config = causal_lm_config(path, seq2seq=OBJECTIVES[cfg.train.objective].encoder_decoder)
    stage = int(ds_config.get("zero_optimization", {}).get("stage", 0))
    engine_dtype = _ds_dtype(ds_config)
    dtype = engine_dtype if h.dtype == "auto" else DTYPES[h.dtype]
    if dtype != engine_dtype:
        raise ConfigError(f"hf.dtype={h.dtype} but the DeepSpeed config trains in {engine_dtype}: set hf.dtype='auto' "
                          f"or choose a DeepSpeed config with that precision.")
    if dims.tp > 1:
        _check_tp(cfg, config, dims.tp)
    quant = None
    if h.quantization != "none":
        compute = dtype if h.compute_dtype == "auto" else DTYPES[h.compute_dtype]
        storage = None
        if h.quant_storage == "auto":
            storage = compute if stage == 3 else None
        elif h.quant_storage != "uint8":
            storage = DTYPES[h.quant_storage]
        if stage == 3 and h.quantization == "8bit":
            raise ConfigError("hf.quantization='8bit' under ZeRO-3: DeepSpeed cannot shard int8 weights; use '4bit' "
                              "(its storage follows hf.quant_storage) or ZeRO 0-2.")
        quant = quantization_config(h.quantization, compute_dtype=compute, quant_type=h.quant_type,
                                    double_quant=h.double_quant, quant_storage=storage,
                                    skip_modules=["score"] if OBJECTIVES[cfg.train.objective].sequence_head else None)
    rows = int(getattr(config, "vocab_size", 0) or 0)
    if vocab is not None and stage == 3:
        raise ConfigError("vocab.lexicon under ZeRO-3: resizing needs the whole embedding on each rank; use ZeRO "
                          "0-2 (only the embedding trains, so its optimizer state is small).")
    if tokenizer_vocab > rows and vocab is None:
        raise ConfigError(f"data.tokenizer={cfg.data.tokenizer} has {tokenizer_vocab} tokens but hf.path={path} has "
                          f"{rows} embedding rows: use the model's own tokenizer (leave data.tokenizer unset).")
    model = meta_model(config)
    limit = CausalLM(model).max_seq_len
    if cfg.data.seq_len > limit:
        raise ConfigError(f"data.seq_len={cfg.data.seq_len} is longer than hf.path={path} allows ({limit} positions): "
                          f"lower data.seq_len.")
    targets: list[str] = []
    if lo.r > 0:
        try:
            targets = lora_targets(model, lo.target_modules, parse_layers(lo.layers))
        except ModelConfigError as err:
            raise ConfigError(f"hf.path={path}: {err}") from None
    n_params = sum(p.numel() for p in model.parameters())
    shapes = [model.get_submodule(name).weight.shape for name in targets]
    trainable = sum(lo.r * (s[0] + s[1]) for s in shapes) if targets else n_params
    if vocab is not None:
        trainable = 2 * tokenizer_vocab * int(config.hidden_size)  # the (resized) embedding and an untied head
    identity = {**model_identity(path), "model_type": config.model_type}
    return HFPlan(path, config, n_params, dtype, quant, stage == 3, targets, identity, trainable, vocab)


def _check_tp(cfg: JobConfig, config: Any, tp: int) -> None:
    """Tensor parallelism of an HF model: Tessera's TP layers with the native plan (HF_LLAMA_TP_PLAN). Adapters
    (LoRA, QLoRA) never run with tp > 1: `train.config.checks` refuses that combination."""
    where = f"parallel.tp={tp} with hf.path={cfg.hf.path}"
    if config.model_type not in HF_TP_MODEL_TYPES:
        raise ConfigError(f"{where}: model_type={config.model_type!r} has no TP plan (covered: "
                          f"{', '.join(HF_TP_MODEL_TYPES)}); shard it with ZeRO-3 and parallel.tp=1.")
    if cfg.parallel.sequence_parallel:
        raise ConfigError(f"{where}: sequence parallelism covers Tessera models only; set "
                          f"parallel.sequence_parallel=false.")
    sizes = {"num_attention_heads": config.num_attention_heads,
             "num_key_value_heads": getattr(config, "num_key_value_heads", None) or config.num_attention_heads,
             "intermediate_size": config.intermediate_size}
    for name, value in sizes.items():
        if value % tp:
            raise ConfigError(f"{where}: its {name}={value} does not split into {tp} equal parts; choose a "
                              f"parallel.tp that divides it.")


def build_hf(p: HFPlan, cfg: JobConfig, ds_config: dict[str, Any], device: torch.device) -> tuple[Any, Any]:
    """Load the weights and add adapters; returns the wrapped model and an object to keep alive until
    `deepspeed.initialize` is done (the `HfDeepSpeedConfig` that makes transformers load partitioned).

    With tp > 1 every rank loads the whole model on the host and `train.build` splits it (like Tessera models).
    """
    # New weights (LoRA matrices, a sequence head) start from the run's seed: torch seeds itself at random when a
    # process starts, so without this two runs of one recipe would differ.
    torch.manual_seed(cfg.train.seed)
    keep = None
    if p.zero3 and cfg.parallel.tp == 1:
        from transformers.integrations import HfDeepSpeedConfig

        keep = HfDeepSpeedConfig(ds_config)  # transformers holds it by weak reference
    hf = load_causal_lm(p.path, dtype=p.dtype, attn_implementation=cfg.hf.attn_implementation,
                        quantization=p.quantization, device=device, num_labels=p.head_labels)
    if cfg.hf.gradient_checkpointing:
        hf.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    extension = None
    if p.adapters:
        lo = cfg.lora
        whole = [*lo.modules_to_save, *(["score"] if p.head_labels is not None else [])]  # a new head trains whole
        hf = apply_lora(hf, p.lora_targets, r=lo.r, alpha=lo.alpha, dropout=lo.dropout, bias=lo.bias,
                        modules_to_save=whole, quantized=p.quantization is not None,
                        gradient_checkpointing=cfg.hf.gradient_checkpointing)
    elif p.vocab is not None:
        extension = apply_vocab(hf, p.vocab, cfg)
    else:
        hf.requires_grad_(True)
    if p.head_labels is not None:
        model: Any = SequenceScorer.hf(hf)
    elif OBJECTIVES[cfg.train.objective].encoder_decoder:
        model = Seq2SeqLM(hf)
    else:
        model = CausalLM(hf)
    model.extension = extension  # (ExtensionInfo, tokenizer) of a vocabulary extension, for its snapshots
    trainable = sum(getattr(x, "ds_numel", x.numel()) for x in model.parameters() if x.requires_grad)
    log.info("HF model %s (%s, %s%s): %s parameters, %s trainable%s", p.path, p.config.model_type,
             str(p.dtype).removeprefix("torch."), f", {cfg.hf.quantization}" if p.quantization is not None else "",
             f"{p.n_params:,}", f"{trainable:,}",
             f" (LoRA r={cfg.lora.r} on {len(p.lora_targets)} layers)" if p.adapters else "")
    return model, keep


def save_adapter(model: CausalLM, out: Path, *, rank: int, tokenizer_dir: Path | None = None) -> None:
    """Write the adapter in PEFT format (`adapter_config.json` + `adapter_model.safetensors`) to ``out``.

    Collective under ZeRO-3 (each adapter parameter is gathered); rank 0 writes.
    """
    peft_model = model.model
    params = [(name, q) for name, q in peft_model.named_parameters() if q.requires_grad]
    state: dict[str, torch.Tensor] = {}
    for name, q in params:
        if hasattr(q, "ds_id"):  # a ZeRO-3 partition: gather the whole tensor for the copy
            import deepspeed

            with deepspeed.zero.GatheredParameters([q], modifier_rank=None):
                state[name] = q.detach().clone().cpu()
        else:
            state[name] = q.detach().clone().cpu()
    if rank != 0:
        return
    out.mkdir(parents=True, exist_ok=True)
    peft_model.save_pretrained(str(out), state_dict=state)
    if tokenizer_dir is not None:
        for f in tokenizer_dir.iterdir():
            if f.is_file() and (f.name.startswith(("tokenizer", "special_tokens")) or f.suffix in (".model",)):
                shutil.copy2(f, out / f.name)
