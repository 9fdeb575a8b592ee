"""Conversion between Tessera `Transformer` and Hugging Face Llama / Mistral / Qwen2 (weights and configs).

Parameter names already match HF Llama apart from the `model.` prefix that HF puts in front of
everything but `lm_head`, and RoPE uses the same rotate-half layout, so weights move without
permutation. Mistral is Llama plus a sliding attention window (accepted when it never binds), and
Qwen2 is Llama plus q/k/v biases (`ModelArgs.attn_bias`).

Import for continued pretraining goes through one function::

    args, state = load_hf_pretrained("path/to/hf_model_dir")  # local dir: config.json + *.safetensors
    model = Transformer(args)
    model.load_state_dict(state)  # strict; a tied head is included under lm_head.weight

transformers and safetensors are imported only inside the functions that need them.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from model.args import ModelArgs, ModelConfigError
from model.model import Transformer

if TYPE_CHECKING:
    from transformers import LlamaConfig, PretrainedConfig

_HF_PREFIX = "model."
_HEAD_KEY = "lm_head.weight"
_EMBED_KEY = "embed_tokens.weight"
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")
"""HF `model_type`s whose checkpoints `load_hf_pretrained` imports."""
SAFETENSORS_FILE = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"


def to_hf_state_dict(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Tessera names -> HF Llama names: prefix everything but the head with `model.`.

    A tied head is kept under `lm_head.weight` too, as `LlamaForCausalLM.state_dict()` does.
    """
    return {key if key == _HEAD_KEY else _HF_PREFIX + key: value for key, value in state_dict.items()}


def from_hf_state_dict(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """HF Llama names -> Tessera names: strip `model.`, drop stale RoPE buffers, fill a tied head.

    Checkpoints of tied models often omit `lm_head.weight`; it is then set to the embedding.
    """
    converted = {
        key.removeprefix(_HF_PREFIX): value
        for key, value in state_dict.items()
        if not key.endswith("rotary_emb.inv_freq")  # older transformers saved this derived buffer
    }
    if _HEAD_KEY not in converted and _EMBED_KEY in converted:
        converted[_HEAD_KEY] = converted[_EMBED_KEY]
    return converted


def _hf_config_fields(args: ModelArgs) -> dict[str, Any]:
    """The config fields Llama, Mistral and Qwen2 share, for the network `Transformer(args)`."""
    args.validate()
    if args.attn_sinks:
        raise ModelConfigError(
            "ModelArgs.attn_sinks=True has no Llama/Qwen2 equivalent in transformers: "
            "export a model built with attn_sinks=False"
        )
    return {
        "vocab_size": args.vocab_size,
        "hidden_size": args.dim,
        "intermediate_size": args.ffn_dim,
        "num_hidden_layers": args.n_layers,
        "num_attention_heads": args.n_heads,
        "num_key_value_heads": args.kv_heads,
        "hidden_act": "silu",
        "max_position_embeddings": args.max_seq_len,
        "initializer_range": args.init_std,
        "rms_norm_eps": args.norm_eps,
        "rope_parameters": {"rope_type": "default", "rope_theta": args.rope_theta},
        "tie_word_embeddings": args.tie_embeddings,
        "attention_dropout": args.dropout,
        "bos_token_id": None,
        "eos_token_id": None,
        "pad_token_id": None,
    }


def to_hf_llama_config(args: ModelArgs) -> LlamaConfig:
    """A `transformers.LlamaConfig` describing the same network as `Transformer(args)`.

    Token ids (bos/eos/pad) are left unset: they belong to the tokenizer, set them on the result.
    HF Llama has no residual dropout; `dropout` maps to its attention dropout. Llama's
    `attention_bias` would also bias o_proj, so `attn_bias=True` is refused here (see `to_hf_config`).
    """
    from transformers import LlamaConfig

    fields = _hf_config_fields(args)
    if args.attn_bias:
        raise ModelConfigError(
            "ModelArgs.attn_bias=True has no LlamaConfig equivalent (Llama's attention_bias also biases "
            "o_proj): use to_hf_config, which describes it as Qwen2"
        )
    return LlamaConfig(**fields, head_dim=args.head_dim, attention_bias=False, mlp_bias=False)


def to_hf_config(args: ModelArgs) -> PretrainedConfig:
    """The HF config of `Transformer(args)`: `LlamaConfig`, or `Qwen2Config` when `attn_bias` (q/k/v biases).

    Token ids are left unset, as in `to_hf_llama_config`.
    """
    if not args.attn_bias:
        return to_hf_llama_config(args)
    from transformers import Qwen2Config

    return Qwen2Config(**_hf_config_fields(args), use_sliding_window=False)


def _rope_theta(config: Any) -> float:
    """RoPE base of an HF config (transformers 5 `rope_parameters`, or the older `rope_theta`)."""
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type != "default":
        raise ModelConfigError(
            f"HF config rope type {rope_type!r} is not supported (only plain RoPE): "
            f"use a model without RoPE scaling, or load it with transformers directly"
        )
    theta = rope.get("rope_theta", getattr(config, "rope_theta", None))
    if theta is None:
        raise ModelConfigError("HF config has no rope_theta: set config.rope_theta (10000.0 for Llama 2)")
    return float(theta)


def _attn_bias(config: Any, model_type: str) -> bool:
    """Whether q/k/v carry biases: always for Qwen2, never for Mistral; Llama's attention_bias is refused."""
    if model_type == "qwen2":
        return True
    if getattr(config, "attention_bias", False):
        raise ModelConfigError(
            f"HF {model_type} config attention_bias=True is not supported: it biases o_proj too, which "
            f"Tessera's attention lacks (only q/k/v biases, as in Qwen2)"
        )
    return False


def _check_sliding_window(config: Any, model_type: str, max_seq_len: int) -> None:
    """Refuse a sliding attention window that would cut a sequence of `max_seq_len` tokens.

    HF lets query i see keys j with i - window < j <= i, so a window >= max_seq_len never binds.
    Mistral applies `sliding_window` to every layer; Qwen2 only to layers marked "sliding_attention".
    """
    window = getattr(config, "sliding_window", None)
    if window is None:
        return
    if model_type == "qwen2" and "sliding_attention" not in (getattr(config, "layer_types", None) or []):
        return
    if window < max_seq_len:
        raise ModelConfigError(
            f"HF {model_type} config sliding_window={window} is shorter than max_seq_len={max_seq_len} and "
            f"Tessera has no sliding-window attention: train on sequences of at most {window} tokens "
            f"(pass max_seq_len={window})"
        )


def args_from_hf_config(config: Any, *, max_seq_len: int | None = None) -> ModelArgs:
    """ModelArgs for an HF Llama, Mistral or Qwen2 config (or any config with Llama's fields).

    max_seq_len: the longest sequence Tessera will see; defaults to `max_position_embeddings`.
    A smaller value keeps the RoPE tables small and lets a Mistral sliding window that is at least
    this long be accepted. A config without `model_type` is read as Llama.
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
    head_dim = getattr(config, "head_dim", None)
    if head_dim is not None and head_dim * config.num_attention_heads != config.hidden_size:
        raise ModelConfigError(
            f"HF config head_dim={head_dim} differs from hidden_size / num_attention_heads "
            f"({config.hidden_size} / {config.num_attention_heads}): Tessera derives head_dim from dim"
        )
    seq_len = config.max_position_embeddings if max_seq_len is None else max_seq_len
    _check_sliding_window(config, model_type, seq_len)
    return ModelArgs(
        dim=config.hidden_size,
        n_layers=config.num_hidden_layers,
        n_heads=config.num_attention_heads,
        n_kv_heads=getattr(config, "num_key_value_heads", None) or config.num_attention_heads,
        vocab_size=config.vocab_size,
        ffn_hidden_dim=config.intermediate_size,
        norm_eps=config.rms_norm_eps,
        rope_theta=_rope_theta(config),
        max_seq_len=seq_len,
        tie_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
        attn_bias=_attn_bias(config, model_type),
        dropout=float(getattr(config, "attention_dropout", 0.0)),
        init_std=getattr(config, "initializer_range", 0.02),
    ).validate()


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
    """Read a local HF Llama / Mistral / Qwen2 dir (config.json + safetensors, single or index-sharded).

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

