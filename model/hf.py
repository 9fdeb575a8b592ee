"""Conversion between Tessera `Transformer` and Hugging Face Llama / Mistral / Qwen2 / Qwen3 (weights and configs).

Parameter names already match HF Llama apart from the `model.` prefix that HF puts in front of
everything but `lm_head`, and RoPE uses the same rotate-half layout, so weights move without
permutation. Llama 3.1+ is Llama with `rope_type='llama3'` (and `attention_bias` is `attn_bias` + `o_bias`),
Mistral is Llama plus a sliding attention window on every layer, Qwen2 is Llama plus q/k/v biases
(`ModelArgs.attn_bias`) and sliding windows on the layers its `layer_types` mark, Qwen3 is Qwen2 without the
biases but with q/k RMSNorm (`qk_norm`) and an explicit `head_dim`. `hf_support` says, for a config, whether
the native model can take it and which field stops it.

Import for continued pretraining goes through one function::

    args, state = load_hf_pretrained("path/to/hf_model_dir")  # local dir: config.json + *.safetensors
    model = Transformer(args)
    model.load_state_dict(state)  # strict; a tied head is included under lm_head.weight

transformers and safetensors are imported only inside the functions that need them.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from model.args import ModelArgs, ModelConfigError
from model.hf_moe import (
    ATTENTION_FAMILY,
    MOE_MODEL_TYPES,
    from_hf_moe,
    moe_args_fields,
    moe_config_fields,
    moe_family,
    to_hf_moe,
)
from model.model import Transformer

if TYPE_CHECKING:
    from transformers import LlamaConfig, PretrainedConfig

_HF_PREFIX = "model."
_HEAD_KEY = "lm_head.weight"
_EMBED_KEY = "embed_tokens.weight"
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", *MOE_MODEL_TYPES)
"""HF `model_type`s whose checkpoints `load_hf_pretrained` imports."""
SAFETENSORS_FILE = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"


def to_hf_state_dict(state_dict: Mapping[str, torch.Tensor], model_type: str | None = None) -> dict[str, torch.Tensor]:
    """Tessera names -> HF Llama names: prefix everything but the head with `model.`.

    A tied head is kept under `lm_head.weight` too, as `LlamaForCausalLM.state_dict()` does. A MoE model's
    stacked experts become the per-expert names of `model_type`'s checkpoints (`hf_model_type`: mixtral,
    qwen3_moe, qwen2_moe); without it they stay stacked, as transformers 5's modules hold them in memory.
    """
    prefixed = {key if key == _HEAD_KEY else _HF_PREFIX + key: value for key, value in state_dict.items()}
    return to_hf_moe(prefixed, model_type if model_type in MOE_MODEL_TYPES else None)


def from_hf_state_dict(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """HF Llama names -> Tessera names: strip `model.`, drop stale RoPE buffers, fill a tied head.

    Checkpoints of tied models often omit `lm_head.weight`; it is then set to the embedding. Per-expert MoE
    weights (Mixtral, Qwen3-MoE, Qwen2-MoE) are stacked into the native layout (`model/hf_moe.py`).
    """
    converted = {
        key.removeprefix(_HF_PREFIX): value
        for key, value in from_hf_moe(state_dict).items()
        if not key.endswith("rotary_emb.inv_freq")  # older transformers saved this derived buffer
    }
    if _HEAD_KEY not in converted and _EMBED_KEY in converted:
        converted[_HEAD_KEY] = converted[_EMBED_KEY]
    return converted


def _hf_config_fields(args: ModelArgs) -> dict[str, Any]:
    """The config fields Llama, Mistral, Qwen2 and Qwen3 share, for the network `Transformer(args)`."""
    args.validate()
    if args.attn_sinks:
        raise ModelConfigError(
            "ModelArgs.attn_sinks=True has no equivalent in transformers (no Llama / Mistral / Qwen class has sink "
            "logits): continue the model natively with model.init_from=<its run dir>, or train it with "
            "attn_sinks=False to export it"
        )
    rope: dict[str, Any] = {"rope_type": args.rope_type, "rope_theta": args.rope_theta}
    if args.rope_type != "default":
        rope["factor"] = args.rope_factor
    if args.rope_type == "llama3":
        rope.update(low_freq_factor=args.rope_low_freq_factor, high_freq_factor=args.rope_high_freq_factor,
                    original_max_position_embeddings=args.rope_original_max_seq_len)
    if args.rope_type == "yarn":
        rope.update(original_max_position_embeddings=args.rope_original_max_seq_len, beta_fast=args.rope_beta_fast,
                    beta_slow=args.rope_beta_slow, truncate=args.rope_truncate)
        if args.rope_attention_factor is not None:
            rope["attention_factor"] = args.rope_attention_factor
    return {
        "vocab_size": args.vocab_size,
        "hidden_size": args.dim,
        "intermediate_size": args.ffn_dim,
        "num_hidden_layers": args.n_layers,
        "num_attention_heads": args.n_heads,
        "num_key_value_heads": args.kv_heads,
        "head_dim": int(args.head_dim),  # type: ignore[arg-type]
        "hidden_act": "silu",
        "max_position_embeddings": args.max_seq_len,
        "initializer_range": args.init_std,
        "rms_norm_eps": args.norm_eps,
        "rope_parameters": rope,
        "tie_word_embeddings": args.tie_embeddings,
        "attention_dropout": args.dropout,
        "bos_token_id": None,
        "eos_token_id": None,
        "pad_token_id": None,
    }


def to_hf_llama_config(args: ModelArgs) -> LlamaConfig:
    """A `transformers.LlamaConfig` describing the same network as `Transformer(args)`.

    Token ids (bos/eos/pad) are left unset: they belong to the tokenizer, set them on the result.
    HF Llama has no residual dropout; `dropout` maps to its attention dropout. Llama's `attention_bias`
    biases q/k/v and o_proj together, so `attn_bias` alone (Qwen2) is refused here (see `to_hf_config`),
    and so are q/k norms and sliding windows, which Llama lacks.
    """
    from transformers import LlamaConfig

    fields = _hf_config_fields(args)
    if args.attn_bias != args.o_bias:
        raise ModelConfigError(
            f"ModelArgs.attn_bias={args.attn_bias} with o_bias={args.o_bias} has no LlamaConfig equivalent (Llama's "
            f"attention_bias biases q/k/v and o_proj together): use to_hf_config, which describes it as Qwen2"
        )
    for name in ("qk_norm", "sliding_window"):
        if getattr(args, name):
            raise ModelConfigError(f"ModelArgs.{name}={getattr(args, name)!r} has no LlamaConfig equivalent: use "
                                   f"to_hf_config (Qwen3 / Mistral / Qwen2)")
    return LlamaConfig(**fields, attention_bias=args.attn_bias, mlp_bias=False)


def hf_model_type(args: ModelArgs) -> str:
    """The transformers family that describes `Transformer(args)` exactly: qwen3 (q/k norms), qwen2 (q/k/v biases
    without o_proj's), mistral (a window on every layer), llama; a model none of them describes is refused
    naming the field."""
    _hf_config_fields(args)  # validates, refuses sinks
    family = moe_family(args)  # mixtral, qwen3_moe, qwen2_moe, or None for a dense model
    if family is not None:
        return family
    windowed_some = args.sliding_window is not None and args.sliding_layers is not None
    if args.qk_norm:
        if args.attn_bias != args.o_bias:
            raise ModelConfigError(f"ModelArgs.qk_norm=True with attn_bias={args.attn_bias}, o_bias={args.o_bias} "
                                   f"has no transformers family (Qwen3's attention_bias biases q/k/v and o_proj "
                                   f"together): set o_bias equal to attn_bias")
        return "qwen3"
    if args.attn_bias and not args.o_bias:
        return "qwen2"
    if args.sliding_window is not None:
        if args.attn_bias or windowed_some:
            what = "o_bias=True" if args.attn_bias else f"sliding_layers={args.sliding_layers}"
            raise ModelConfigError(f"ModelArgs.{what} with sliding_window={args.sliding_window} has no transformers "
                                   f"family (Mistral windows every layer without biases, Qwen2 has q/k/v biases "
                                   f"only): drop {what.split('=')[0]} or the window")
        return "mistral"
    return "llama"


def _layer_types(args: ModelArgs) -> list[str]:
    return ["sliding_attention" if args.layer_window(i) is not None else "full_attention"
            for i in range(args.n_layers)]


def to_hf_config(args: ModelArgs) -> PretrainedConfig:
    """The HF config of `Transformer(args)`, of the family `hf_model_type` names (Llama, Mistral, Qwen2, Qwen3).

    Token ids are left unset, as in `to_hf_llama_config`. `AutoModelForCausalLM.from_config` builds the same
    network with no custom code.
    """
    family = hf_model_type(args)
    fields = _hf_config_fields(args)
    if family == "llama":
        return to_hf_llama_config(args)
    if family in MOE_MODEL_TYPES:
        return _moe_config(args, family, fields)
    if family == "mistral":
        from transformers import MistralConfig

        return MistralConfig(**fields, sliding_window=args.sliding_window)
    window = {"use_sliding_window": args.sliding_window is not None, "sliding_window": args.sliding_window,
              "max_window_layers": args.n_layers, "layer_types": _layer_types(args)}
    if family == "qwen2":
        from transformers import Qwen2Config

        return Qwen2Config(**fields, **window)
    from transformers import Qwen3Config

    return Qwen3Config(**fields, **window, attention_bias=args.attn_bias)


def _moe_config(args: ModelArgs, family: str, fields: dict[str, Any]) -> PretrainedConfig:
    """The HF Mixtral / Qwen3-MoE / Qwen2-MoE config of a MoE `Transformer(args)`."""
    from transformers import MixtralConfig, Qwen2MoeConfig, Qwen3MoeConfig

    fields = {**fields, **moe_config_fields(args, family)}
    if family == "mixtral":
        return MixtralConfig(**fields)
    if family == "qwen3_moe":
        return Qwen3MoeConfig(**fields, attention_bias=args.attn_bias)
    return Qwen2MoeConfig(**fields)


def _rope_fields(config: Any) -> dict[str, Any]:
    """ModelArgs' RoPE fields of an HF config (transformers 5 `rope_parameters`, or the older `rope_scaling` +
    `rope_theta`); a scheme the native model lacks is refused naming the field."""
    rope = dict(getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {})
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in ("default", "linear", "llama3", "yarn"):
        raise ModelConfigError(
            f"HF config rope_parameters.rope_type={rope_type!r} is not supported by the native model (it computes "
            f"default, linear, llama3 and yarn RoPE): load it with hf.path (transformers) instead"
        )
    partial = rope.get("partial_rotary_factor", getattr(config, "partial_rotary_factor", 1.0))
    if partial not in (None, 1.0):
        raise ModelConfigError(f"HF config partial_rotary_factor={partial} is not supported (the native model "
                               f"rotates whole heads): load it with hf.path instead")
    theta = rope.get("rope_theta", getattr(config, "rope_theta", None))
    if theta is None:
        raise ModelConfigError("HF config has no rope_theta: set config.rope_theta (10000.0 for Llama 2)")
    out: dict[str, Any] = {"rope_theta": float(theta), "rope_type": rope_type}
    if rope_type == "yarn":
        out.update(_yarn_fields(config, rope))
    elif rope_type != "default":
        out["rope_factor"] = float(rope["factor"])
    if rope_type == "llama3":
        out.update(rope_low_freq_factor=float(rope["low_freq_factor"]),
                   rope_high_freq_factor=float(rope["high_freq_factor"]),
                   rope_original_max_seq_len=int(rope["original_max_position_embeddings"]))
    return out


def _yarn_fields(config: Any, rope: dict[str, Any]) -> dict[str, Any]:
    """ModelArgs' YaRN fields, with transformers' defaults (factor from the context ratio, beta 32 / 1, the
    cos/sin scale from mscale / mscale_all_dim when both are given)."""
    original = int(rope.get("original_max_position_embeddings") or config.max_position_embeddings)
    factor = float(rope.get("factor") or config.max_position_embeddings / original)
    attention = rope.get("attention_factor")
    mscale, mscale_all = rope.get("mscale"), rope.get("mscale_all_dim")
    if attention is None and mscale and mscale_all:
        attention = _mscale(factor, mscale) / _mscale(factor, mscale_all)
    return {"rope_factor": factor, "rope_original_max_seq_len": original,
            "rope_beta_fast": float(rope.get("beta_fast") or 32), "rope_beta_slow": float(rope.get("beta_slow") or 1),
            "rope_attention_factor": None if attention is None else float(attention),
            "rope_truncate": bool(rope.get("truncate", True))}


def _mscale(factor: float, mscale: float) -> float:
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def _attention_fields(config: Any, model_type: str) -> dict[str, Any]:
    """Biases, q/k norms and the sliding window of an HF attention: Qwen2 always biases q/k/v (never o_proj);
    Llama and Qwen3's attention_bias biases all four; Qwen3 normalises q and k per head."""
    bias = model_type == "qwen2" or bool(getattr(config, "attention_bias", False))
    out: dict[str, Any] = {"attn_bias": bias, "o_bias": bias and model_type != "qwen2",
                           "qk_norm": model_type == "qwen3"}
    window = getattr(config, "sliding_window", None)
    if model_type == "mistral":
        out["sliding_window"] = window
        return out
    if model_type == "llama":
        return out
    layer_types = list(getattr(config, "layer_types", None) or [])
    unknown = sorted(set(layer_types) - {"full_attention", "sliding_attention"})
    if unknown:
        raise ModelConfigError(f"HF config layer_types has {unknown[0]!r}: the native model has full_attention "
                               f"and sliding_attention layers only; load it with hf.path instead")
    sliding = [i for i, kind in enumerate(layer_types) if kind == "sliding_attention"]
    if sliding and window is not None:
        out["sliding_window"] = window
        out["sliding_layers"] = None if len(sliding) == config.num_hidden_layers else sliding
    return out


def args_from_hf_config(config: Any, *, max_seq_len: int | None = None) -> ModelArgs:
    """ModelArgs for an HF Llama, Mistral, Qwen2 or Qwen3 config (or any config with Llama's fields).

    max_seq_len: the longest sequence Tessera will see; defaults to `max_position_embeddings` (a smaller value
    keeps the RoPE tables small). A config without `model_type` is read as Llama. Anything the native model
    cannot compute is a ModelConfigError naming the field.
    """
    model_type = getattr(config, "model_type", None) or "llama"
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ModelConfigError(
            f"HF model_type={model_type!r} is not supported: "
            f"Tessera imports {', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    for name, expected in (("hidden_act", "silu"), ("mlp_bias", False)):
        value = getattr(config, name, expected)
        if value != expected:
            raise ModelConfigError(
                f"HF config {name}={value!r} is not supported: Tessera models use {name}={expected!r}"
            )
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None)
    derived = head_dim is None or (head_dim * heads == config.hidden_size)
    seq_len = config.max_position_embeddings if max_seq_len is None else max_seq_len
    attention = _attention_fields(config, ATTENTION_FAMILY.get(model_type, model_type))
    if model_type == "qwen2_moe":  # q/k/v biases as its qkv_bias says
        attention.update(attn_bias=bool(getattr(config, "qkv_bias", True)), o_bias=False)
    return ModelArgs(
        dim=config.hidden_size,
        n_layers=config.num_hidden_layers,
        n_heads=heads,
        n_kv_heads=getattr(config, "num_key_value_heads", None) or heads,
        head_dim=None if derived else int(head_dim),
        vocab_size=config.vocab_size,
        ffn_hidden_dim=config.intermediate_size,
        norm_eps=config.rms_norm_eps,
        max_seq_len=seq_len,
        tie_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
        dropout=float(getattr(config, "attention_dropout", 0.0)),
        init_std=getattr(config, "initializer_range", 0.02),
        **_rope_fields(config),
        **attention,
        **moe_args_fields(config, model_type),
    ).validate()


def hf_support(path: str | Path) -> tuple[ModelArgs | None, str]:
    """Whether the native model can take the local HF dir `path`: (its ModelArgs, "") or (None, the one line
    naming the field that stops it)."""
    try:
        args = args_from_hf_config(load_hf_config(path))
        weight_files(path)
    except ModelConfigError as e:
        return None, str(e)
    return args, ""


def expected_shapes(args: ModelArgs) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every entry of `Transformer(args).state_dict()` (built on the meta device)."""
    with torch.device("meta"):
        model = Transformer(args)
    return {name: tuple(tensor.shape) for name, tensor in model.state_dict().items()}


def check_state_dict(args: ModelArgs, state_dict: Mapping[str, torch.Tensor], source: str) -> None:
    """Raise `ModelConfigError` unless `state_dict` has exactly the names and shapes of `Transformer(args)`.

    source names where the weights came from, for the message.
    """
    expected = expected_shapes(args)
    missing = sorted(expected.keys() - state_dict.keys())
    unexpected = sorted(state_dict.keys() - expected.keys())
    if missing or unexpected:
        raise ModelConfigError(
            f"{source}: weights do not match the model its config describes: missing {missing[:5]}"
            f"{' ...' if len(missing) > 5 else ''}, unexpected {unexpected[:5]}"
            f"{' ...' if len(unexpected) > 5 else ''}; check that the weights belong to this config"
        )
    for name, shape in expected.items():
        if tuple(state_dict[name].shape) != shape:
            raise ModelConfigError(
                f"{source}: {name} has shape {tuple(state_dict[name].shape)} but the config gives {shape}; "
                f"check that the weights belong to this config"
            )


def read_config_json(config_file: Path, where: str) -> dict[str, Any]:
    """The JSON object of an HF ``config.json``; a file that is not JSON, or not an object, is a
    ModelConfigError starting with ``where``."""
    try:
        raw = json.loads(config_file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ModelConfigError(f"{where}: {config_file.name} is not valid JSON ({str(e).splitlines()[0]}); "
                               f"re-save the model with save_pretrained") from None
    if not isinstance(raw, dict):
        raise ModelConfigError(f"{where}: {config_file.name} holds a JSON {type(raw).__name__}, not an "
                               f"object of config fields; re-save the model with save_pretrained")
    return raw


def auto_config(directory: Path, where: str, **kwargs: Any) -> PretrainedConfig:
    """``AutoConfig.from_pretrained`` of a local directory; a field of the wrong type or an impossible value
    (transformers' strict config checks) is a ModelConfigError naming the field."""
    from huggingface_hub.errors import StrictDataclassError
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(str(directory), **kwargs)
    except StrictDataclassError as e:
        cause = e.__cause__ if e.__cause__ is not None else e
        why = str(cause).splitlines()[0] if str(cause) else type(cause).__name__
        raise ModelConfigError(f"{where}: config.json is refused by transformers ({why}); correct that field "
                               f"in {directory / 'config.json'}") from None
    except (ValueError, TypeError, KeyError, AttributeError, ArithmeticError) as e:
        raise ModelConfigError(f"{where}: config.json cannot be read by transformers ({type(e).__name__}: "
                               f"{str(e).splitlines()[0] if str(e) else 'no detail'}); correct it in "
                               f"{directory / 'config.json'}") from None


def load_hf_config(path: str | Path) -> PretrainedConfig:
    """The config of a local HF model dir; refuses a missing dir and unsupported model types (no hub)."""
    directory = Path(path)
    config_file = directory / "config.json"
    if not config_file.is_file():
        raise ModelConfigError(
            f"HF model dir {directory}: no config.json there; "
            f"pass a local directory written by save_pretrained"
        )
    where = f"HF model dir {directory}"
    model_type = read_config_json(config_file, where).get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ModelConfigError(
            f"{where}: model_type={model_type!r} is not supported; "
            f"Tessera imports {', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    return auto_config(directory, where)


def weight_files(path: str | Path) -> list[Path]:
    """The safetensors files of a local HF model dir: `model.safetensors`, or the shards its index names."""
    directory = Path(path)
    index = directory / SAFETENSORS_INDEX
    if index.is_file():
        weight_map: dict[str, str] = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        files = [directory / name for name in sorted(set(weight_map.values()))]
    elif (directory / SAFETENSORS_FILE).is_file():
        files = [directory / SAFETENSORS_FILE]
    else:
        raise ModelConfigError(
            f"HF model dir {directory}: no {SAFETENSORS_FILE} or {SAFETENSORS_INDEX}; re-save the model with "
            f"save_pretrained (transformers writes safetensors)"
        )
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise ModelConfigError(
            f"HF model dir {directory}: shard files {missing} named by the index are missing; copy them there"
        )
    return files


def load_hf_pretrained(
    path: str | Path, *, max_seq_len: int | None = None, dtype: torch.dtype | None = torch.float32
) -> tuple[ModelArgs, dict[str, torch.Tensor]]:
    """Read a local HF Llama / Mistral / Qwen2 / Qwen3 dir (config.json + safetensors, single or index-sharded).

    Returns (args, state_dict): `Transformer(args).load_state_dict(state_dict)` then holds the HF
    model's weights (strict; with tied embeddings `lm_head.weight` is the embedding tensor itself).
    max_seq_len: see `args_from_hf_config`. dtype: cast floating tensors to it (None keeps the
    stored dtype). Every refusal is a `ModelConfigError` naming the dir and the fix.
    """
    from safetensors.torch import load_file

    config = load_hf_config(path)
    args = args_from_hf_config(config, max_seq_len=max_seq_len)
    hf_state: dict[str, torch.Tensor] = {}
    for file in weight_files(path):
        shard = load_file(str(file))
        clash = hf_state.keys() & shard.keys()
        if clash:
            raise ModelConfigError(f"HF model dir {path}: {sorted(clash)[:3]} appear in more than one shard")
        hf_state.update(shard)
    state = from_hf_state_dict(hf_state)
    if args.tie_embeddings and _EMBED_KEY in state:
        state[_HEAD_KEY] = state[_EMBED_KEY]  # transformers ties too, ignoring a stored head
    check_state_dict(args, state, f"HF model dir {path}")
    if dtype is not None:
        cast = {id(t): t.to(dtype) for t in state.values() if t.is_floating_point()}
        state = {name: cast.get(id(t), t) for name, t in state.items()}  # a tied pair stays one tensor
    return args, state

