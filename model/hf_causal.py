"""Hugging Face causal LMs trained as they are: loading (dtype, attention, 4/8-bit) and a Tessera-shaped wrapper.

`model.hf` converts Llama-family checkpoints into Tessera's own `Transformer`; this module instead keeps the HF
model (any `AutoModelForCausalLM` architecture: Llama, Qwen2, GPT-2, ...) and wraps it so the trainer, the
losses and `generate` see the same interface as the native model::

    config = causal_lm_config("path/to/model")          # refuses a missing dir or a non-causal-LM
    hf_model = load_causal_lm("path/to/model", dtype=torch.bfloat16, attn_implementation="sdpa")
    model = CausalLM(hf_model)
    logits = model(input_ids, position_ids=..., doc_ids=...)  # (B, T, V)

`doc_ids` follows the collators' convention (train/data/collators.py): 0 marks a real token, anything else
padding; it becomes the HF attention mask. ZeRO-3 loading (`HfDeepSpeedConfig`) is set up by the caller, since
this package never imports DeepSpeed.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, get_args

import torch
from torch import nn

from model.args import ModelConfigError
from model.hf import auto_config, read_config_json

if TYPE_CHECKING:
    from transformers import PretrainedConfig, PreTrainedModel

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
DtypeName = Literal["float32", "bfloat16", "float16"]  # weight dtypes a recipe or an export names
DTYPES: dict[DtypeName, torch.dtype] = {name: getattr(torch, name) for name in get_args(DtypeName)}


def causal_lm_config(path: str | Path, *, where: str = "hf.path", seq2seq: bool = False) -> PretrainedConfig:
    """The config of a local HF causal-LM directory (``seq2seq``: an encoder-decoder, e.g. T5); a missing dir,
    missing weights or another kind of model is refused."""
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES,
    )

    directory = Path(path)
    if not directory.is_dir():
        raise ModelConfigError(f"{where}={path}: no such directory; give a local directory written by "
                               f"save_pretrained (Tessera never downloads models).")
    config_file = directory / "config.json"
    if not config_file.is_file():
        raise ModelConfigError(f"{where}={path}: no config.json there; give a directory written by "
                               f"save_pretrained.")
    model_type = read_config_json(config_file, f"{where}={path}").get("model_type")
    if seq2seq and model_type not in MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES:
        raise ModelConfigError(f"{where}={path}: model_type={model_type!r} is not an encoder-decoder model "
                               f"(AutoModelForSeq2SeqLM has no class for it); give e.g. a t5 or bart model.")
    if not seq2seq and model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise ModelConfigError(f"{where}={path}: model_type={model_type!r} is not a causal language model "
                               f"(AutoModelForCausalLM has no class for it); give a decoder such as llama, qwen2 "
                               f"or gpt2.")
    if not any((directory / name).is_file() for name in WEIGHT_FILES):
        raise ModelConfigError(f"{where}={path}: no weights ({' / '.join(WEIGHT_FILES[:2])}) next to config.json; "
                               f"save the model with save_pretrained.")
    return auto_config(directory, f"{where}={path}")


def num_parameters(config: PretrainedConfig) -> int:
    """Parameters of the model a config describes, counted on the meta device (no memory, no weights)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return sum(p.numel() for p in model.parameters())


def meta_model(config: PretrainedConfig) -> PreTrainedModel:
    """The model on the meta device: module names and shapes, for checks before anything is loaded."""
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

    auto = AutoModelForSeq2SeqLM if getattr(config, "is_encoder_decoder", False) else AutoModelForCausalLM
    with torch.device("meta"):
        return auto.from_config(config)


def quantization_config(kind: str, *, compute_dtype: torch.dtype, quant_type: str = "nf4",
                        double_quant: bool = True, quant_storage: torch.dtype | None = None,
                        skip_modules: list[str] | None = None) -> Any:
    """bitsandbytes settings for '4bit' (QLoRA) or '8bit' loading; None for 'none'. ``skip_modules`` stay in
    full precision (a sequence head that trains)."""
    if kind == "none":
        return None
    try:
        import bitsandbytes  # noqa: F401
        from transformers import BitsAndBytesConfig
    except ImportError as err:
        raise ModelConfigError(f"hf.quantization={kind!r} needs bitsandbytes ({err}); pip install bitsandbytes, "
                               f"or set hf.quantization='none'.") from None
    if kind == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip_modules)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quant_type, bnb_4bit_compute_dtype=compute_dtype,
                              bnb_4bit_use_double_quant=double_quant,
                              bnb_4bit_quant_storage=quant_storage or torch.uint8, llm_int8_skip_modules=skip_modules)


def load_causal_lm(path: str | Path, *, dtype: torch.dtype = torch.float32, attn_implementation: str = "sdpa",
                   quantization: Any = None, device: torch.device | None = None,
                   num_labels: int | None = None) -> PreTrainedModel:
    """`AutoModelForCausalLM.from_pretrained` from a local directory, in training mode.

    quantization: a `quantization_config(...)` (bitsandbytes); the weights are quantized on `device`.
    num_labels: load `AutoModelForSequenceClassification` with this many outputs instead (the decoder's weights,
    a new `score` head; the pad token id is set to the eos id when the config names none). An encoder-decoder
    directory loads as `AutoModelForSeq2SeqLM`.
    """
    from transformers import (
        AutoConfig,
        AutoModelForCausalLM,
        AutoModelForSeq2SeqLM,
        AutoModelForSequenceClassification,
    )

    kwargs: dict[str, Any] = {"dtype": dtype, "attn_implementation": attn_implementation}
    if quantization is not None:
        kwargs["quantization_config"] = quantization
        if device is not None and device.type == "cuda":
            kwargs["device_map"] = {"": device.index or 0}
    if num_labels is not None:
        config = AutoConfig.from_pretrained(str(path), num_labels=num_labels)
        if config.pad_token_id is None:
            config.pad_token_id = config.eos_token_id
        kwargs["config"] = config
    auto = AutoModelForCausalLM if num_labels is None else AutoModelForSequenceClassification
    if num_labels is None and getattr(AutoConfig.from_pretrained(str(path)), "is_encoder_decoder", False):
        auto = AutoModelForSeq2SeqLM
    try:
        model = auto.from_pretrained(str(path), **kwargs)
    except (ValueError, ImportError) as err:  # e.g. flash_attention_2 without flash-attn, bnb without a backend
        raise ModelConfigError(f"hf.path={path}: transformers could not load it ({err}).") from None
    # On CPUs with AVX512-BF16, bitsandbytes repacks 4-bit weights for inference on the first eval-mode no-grad
    # forward (an evaluation), after which LoRA gradients are silently zero (and layers narrower than one
    # quantization block fail). Training and evaluation keep the one layout that trains.
    for module in model.modules():
        if getattr(module, "support_avx512bf16_for_cpu", False):
            module.support_avx512bf16_for_cpu = False
    model.train()
    return model


class HFCache:
    """The HF key/value cache of one `generate` call, shaped like `model.generate.KVCache` for the loop."""

    def __init__(self, max_len: int) -> None:
        self.past: Any = None
        self.length = 0
        self.max_len = max_len

    def advance(self, n: int) -> None:
        self.length += n


class CausalLM(nn.Module):
    """An HF causal LM (or a PEFT model around one) with the native model's call: inputs -> logits (B, T, V)."""

    def __init__(self, hf_model: nn.Module) -> None:
        super().__init__()
        self.model = hf_model

    @property
    def config(self) -> PretrainedConfig:
        return self.model.config

    @property
    def max_seq_len(self) -> int:
        c = self.config
        for name in ("max_position_embeddings", "n_positions", "max_sequence_length"):
            if getattr(c, name, None):
                return int(getattr(c, name))
        return 2**31 - 1  # no learned limit (e.g. RoPE without a recorded length)

    def new_cache(self, batch_size: int, max_len: int, **_: Any) -> HFCache:
        return HFCache(max_len)

    def forward(self, input_ids: torch.Tensor | None = None, *, inputs_embeds: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, doc_ids: torch.Tensor | None = None,
                cache: HFCache | None = None) -> torch.Tensor:
        source = input_ids if input_ids is not None else inputs_embeds
        if source is None:
            raise ValueError("CausalLM: pass input_ids or inputs_embeds")
        B, T = source.shape[:2]
        attention_mask = None if doc_ids is None else (doc_ids == 0).long()  # (B, T): 1 = real token
        if cache is not None:
            if position_ids is None:
                position_ids = torch.arange(cache.length, cache.length + T, device=source.device).expand(B, T)
            if attention_mask is None:
                attention_mask = torch.ones(B, cache.length + T, dtype=torch.long, device=source.device)
        out = self.model(input_ids=input_ids, inputs_embeds=inputs_embeds, position_ids=position_ids,
                         attention_mask=attention_mask, past_key_values=None if cache is None else cache.past,
                         use_cache=cache is not None)
        if cache is not None:
            cache.past = out.past_key_values
            cache.advance(T)
        return out.logits


class Seq2SeqLM(nn.Module):
    """An HF encoder-decoder (or a PEFT model around one): (source ids, mask, target labels) -> logits (B, T', V).

    The decoder reads the labels shifted right (the model's own `decoder_start_token_id` first); label -100 is
    padding. `generate` is the model's own (beam-free greedy or sampled decoding of the target).
    """

    def __init__(self, hf_model: nn.Module) -> None:
        super().__init__()
        self.model = hf_model

    @property
    def config(self) -> PretrainedConfig:
        return self.model.config

    def forward(self, input_ids: torch.Tensor, *, attention_mask: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).logits

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, max_new_tokens: int,
                 **kwargs: Any) -> torch.Tensor:
        return self.model.generate(input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=max_new_tokens,
                                   do_sample=False, **kwargs)
