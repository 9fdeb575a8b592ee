"""Recipe sections for fine-tuning and alignment: ``hf`` (an HF model as it is), ``lora``, ``vocab``
(embedding-only vocabulary extension) and ``dpo``, each checking its own fields; their combinations with
``train.objective``, the data and parallelism are checked in train/config/checks.py."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal

from model.hf_causal import DtypeName
from train.config.fields import ConfigError, _f, _positive

HFDtype = Literal["auto", DtypeName]  # 'auto': follow the DeepSpeed config (weights) or the weights (compute)
AttnImplementation = Literal["sdpa", "eager", "flash_attention_2"]
Quantization = Literal["none", "4bit", "8bit"]
QuantType = Literal["nf4", "fp4"]
QuantStorage = Literal["auto", "uint8", DtypeName]
LoraBias = Literal["none", "lora_only", "all"]
DPOReference = Literal["auto", "copy", "adapters", "cached"]


@dataclass
class HFSection:
    path: str | None = _f(None, "Local HF causal-LM directory trained as it is with transformers (replaces "
                                "model.preset); its tokenizer is used unless data.tokenizer is set.")
    dtype: HFDtype = _f("auto", "Weights dtype: 'auto' (follows the DeepSpeed config: bf16/fp16 when "
                                "enabled, else float32), 'float32', 'bfloat16' or 'float16'.")
    attn_implementation: AttnImplementation = _f("sdpa", "transformers attention: 'sdpa', 'eager' or "
                                                         "'flash_attention_2' (CUDA).")
    quantization: Quantization = _f("none", "'none', '4bit' (QLoRA) or '8bit': load the frozen base through "
                                            "bitsandbytes.")
    quant_type: QuantType = _f("nf4", "4-bit data type: 'nf4' or 'fp4'.")
    double_quant: bool = _f(True, "4-bit: quantize the quantization constants too.")
    compute_dtype: HFDtype = _f("auto", "4/8-bit compute dtype: 'auto' (the weights dtype), 'float32', "
                                        "'bfloat16', 'float16'.")
    quant_storage: QuantStorage = _f("auto", "4-bit storage dtype: 'auto' (the compute dtype under ZeRO-3, "
                                             "so DeepSpeed can shard it; else uint8), 'uint8', 'bfloat16', "
                                             "'float16', 'float32'.")
    gradient_checkpointing: bool = _f(False, "Recompute each decoder layer in backward (transformers' own).")

    def validate(self) -> None:
        """Without ``path`` every other key keeps its default: they describe how to load that model."""
        if self.path is None:
            changed = [f.name for f in dataclasses.fields(self) if getattr(self, f.name) != f.default]
            if changed:
                raise ConfigError(f"hf.{changed[0]} is set but hf.path is not: name the HF model directory "
                                  f"in hf.path.")


@dataclass
class LoraSection:
    r: int = _f(0, "LoRA rank; 0 trains the model's own weights (full fine-tune).")
    alpha: float = _f(16.0, "LoRA alpha (the update is scaled by alpha / r).")
    dropout: float = _f(0.0, "Dropout on the LoRA input.")
    target_modules: list[str] = _f([], "Linear layers to adapt, by name or dotted suffix (e.g. [q_proj, "
                                       "v_proj]); [] adapts every linear layer of the blocks (never the LM "
                                       "head).")
    layers: str | None = _f(None, "Block indices to adapt, e.g. '0-11' or '0,2,4' (None: every block).")
    bias: LoraBias = _f("none", "Biases trained with the adapters: 'none', 'lora_only' or 'all'.")
    modules_to_save: list[str] = _f([], "Modules trained in full and saved with the adapter (e.g. "
                                        "[lm_head]).")

    def validate(self) -> None:
        """A rank >= 0; with adapters (r > 0), their alpha, dropout and block indices."""
        _positive("lora.r", self.r, allow_zero=True)
        if self.r == 0:
            return
        _positive("lora.alpha", self.alpha)
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"lora.dropout={self.dropout}: must be in [0, 1).")
        parse_layers(self.layers)


@dataclass
class DPOSection:
    beta: float = _f(0.1, "Strength of the KL-regularised preference (sigmoid DPO loss).")
    label_smoothing: float = _f(0.0, "Probability that a preference label is flipped (conservative DPO), in "
                                     "[0, 0.5).")
    reference: DPOReference = _f("auto", "'auto' (the base with the adapters off under LoRA, else a "
                                         "frozen copy of the starting weights), 'copy', 'adapters', or "
                                         "'cached' (the starting weights' log-probs computed once before "
                                         "training; no second model in memory).")
    reference_from: str | None = _f(None, "A local HF model directory of the policy's architecture the "
                                          "reference copy loads instead of the policy's starting weights "
                                          "(e.g. the SFT model).")

    def validate(self) -> None:
        """A positive beta, label smoothing in [0, 0.5), ``reference_from`` only for a copied reference."""
        _positive("dpo.beta", self.beta)
        if not 0.0 <= self.label_smoothing < 0.5:
            raise ConfigError(f"dpo.label_smoothing={self.label_smoothing}: must be in [0, 0.5).")
        if self.reference_from is not None and self.reference not in ("copy", "auto"):
            raise ConfigError(f"dpo.reference_from={self.reference_from} with "
                              f"dpo.reference={self.reference!r}: another model is a frozen copy; set "
                              f"dpo.reference='copy'.")


@dataclass
class VocabSection:
    lexicon: str | None = _f(None, "Embedding-only vocabulary extension: a file of words (one per line, or "
                                   "a JSON list) added as tokens where the tokenizer lacks them; only their "
                                   "rows train.")
    init_scale: float = _f(1.0, "New rows start on a sphere of this multiple of the mean base-row norm.")
    pad_to_multiple_of: int | None = _f(None, "Pad the embedding rows to a multiple of this (None: no "
                                              "padding).")
    snapshot_interval: int = _f(0, "Write the new rows to <out_dir>/embeddings/step_N every this many steps "
                                   "(0: only at the end).")
    from_snapshot: str | None = _f(None, "Start from an embedding snapshot (its tokens and rows) with a "
                                         "fresh optimizer and schedule.")

    @property
    def extends(self) -> bool:
        """Whether this run extends the vocabulary (a lexicon, or a snapshot of an earlier extension)."""
        return self.lexicon is not None or self.from_snapshot is not None

    def validate(self) -> None:
        """A positive initial scale and padding multiple, a snapshot interval >= 0."""
        _positive("vocab.init_scale", self.init_scale)
        _positive("vocab.snapshot_interval", self.snapshot_interval, allow_zero=True)
        if self.pad_to_multiple_of is not None:
            _positive("vocab.pad_to_multiple_of", self.pad_to_multiple_of)


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
