"""Recipe sections for fine-tuning and alignment: ``hf`` (an HF model as it is), ``lora``, ``vocab`` (embedding-only
vocabulary extension), ``dpo``, and the checks that tie them to ``train.objective`` and the data."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING

from train.config.fields import ConfigError, _f, _positive

if TYPE_CHECKING:
    from train.config.schema import JobConfig


@dataclass
class HFSection:
    path: str | None = _f(None, "Local HF causal-LM directory trained as it is with transformers (replaces "
                                "model.preset); its tokenizer is used unless data.tokenizer is set.")
    dtype: str = _f("auto", "Weights dtype: 'auto' (follows the DeepSpeed config: bf16/fp16 when enabled, else "
                            "float32), 'float32', 'bfloat16' or 'float16'.")
    attn_implementation: str = _f("sdpa", "transformers attention: 'sdpa', 'eager' or 'flash_attention_2' (CUDA).")
    quantization: str = _f("none", "'none', '4bit' (QLoRA) or '8bit': load the frozen base through bitsandbytes.")
    quant_type: str = _f("nf4", "4-bit data type: 'nf4' or 'fp4'.")
    double_quant: bool = _f(True, "4-bit: quantize the quantization constants too.")
    compute_dtype: str = _f("auto", "4/8-bit compute dtype: 'auto' (the weights dtype), 'float32', 'bfloat16', "
                                    "'float16'.")
    quant_storage: str = _f("auto", "4-bit storage dtype: 'auto' (the compute dtype under ZeRO-3, so DeepSpeed can "
                                    "shard it; else uint8), 'uint8', 'bfloat16', 'float16', 'float32'.")
    gradient_checkpointing: bool = _f(False, "Recompute each decoder layer in backward (transformers' own).")


@dataclass
class LoraSection:
    r: int = _f(0, "LoRA rank; 0 trains the model's own weights (full fine-tune).")
    alpha: float = _f(16.0, "LoRA alpha (the update is scaled by alpha / r).")
    dropout: float = _f(0.0, "Dropout on the LoRA input.")
    target_modules: list[str] = _f([], "Linear layers to adapt, by name or dotted suffix (e.g. [q_proj, v_proj]); "
                                       "[] adapts every linear layer of the blocks (never the LM head).")
    layers: str | None = _f(None, "Block indices to adapt, e.g. '0-11' or '0,2,4' (None: every block).")
    bias: str = _f("none", "Biases trained with the adapters: 'none', 'lora_only' or 'all'.")
    modules_to_save: list[str] = _f([], "Modules trained in full and saved with the adapter (e.g. [lm_head]).")


@dataclass
class DPOSection:
    beta: float = _f(0.1, "Strength of the KL-regularised preference (sigmoid DPO loss).")
    label_smoothing: float = _f(0.0, "Probability that a preference label is flipped (conservative DPO), in [0, 0.5).")
    reference: str = _f("auto", "'auto' (the base with the adapters off under LoRA, else a frozen copy of the "
                                "starting weights), 'copy', 'adapters', or 'cached' (the starting weights' log-probs "
                                "computed once before training; no second model in memory).")
    reference_from: str | None = _f(None, "A local HF model directory of the policy's architecture the reference "
                                          "copy loads instead of the policy's starting weights (e.g. the SFT model).")


@dataclass
class VocabSection:
    lexicon: str | None = _f(None, "Embedding-only vocabulary extension: a file of words (one per line, or a JSON "
                                   "list) added as tokens where the tokenizer lacks them; only their rows train.")
    init_scale: float = _f(1.0, "New rows start on a sphere of this multiple of the mean base-row norm.")
    pad_to_multiple_of: int | None = _f(None, "Pad the embedding rows to a multiple of this (None: no padding).")
    snapshot_interval: int = _f(0, "Write the new rows to <out_dir>/embeddings/step_N every this many steps "
                                   "(0: only at the end).")
    from_snapshot: str | None = _f(None, "Start from an embedding snapshot (its tokens and rows) with a fresh "
                                         "optimizer and schedule.")


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


def parse_layers(spec: str | None) -> list[int] | None:
    """'0-11' / '0,2,4' / '0-3,8' -> sorted block indices; None -> None (every block)."""
    if spec is None:
        return None
    out: set[int] = set()
    try:
        for part in str(spec).split(","):
            lo_s, _, hi_s = part.strip().partition("-")
            lo, hi = int(lo_s), int(hi_s) if hi_s else int(lo_s)
            if lo < 0 or hi < lo:
                raise ValueError
            out.update(range(lo, hi + 1))
    except ValueError:
        raise ConfigError(f"lora.layers={spec!r}: give block indices like '0-11' or '0,2,4'.") from None
    return sorted(out)
