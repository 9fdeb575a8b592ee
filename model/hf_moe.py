"""HF interchange of the MoE families: Mixtral, Qwen3-MoE and Qwen2-MoE configs and expert weights.

The native block keeps each projection of all experts as one stacked tensor (transformers 5's in-memory
layout, `model/moe.py`); published checkpoints store one matrix per expert. Per layer:

    native (model/moe.py)        Mixtral on disk                           Qwen3-MoE / Qwen2-MoE on disk
    mlp.gate.weight              block_sparse_moe.gate.weight              mlp.gate.weight
    mlp.experts.gate_up_proj[e]  block_sparse_moe.experts.e.{w1; w3}       mlp.experts.e.{gate_proj; up_proj}
    mlp.experts.down_proj[e]     block_sparse_moe.experts.e.w2             mlp.experts.e.down_proj
    mlp.shared_expert.*, mlp.shared_expert_gate.weight                     (Qwen2-MoE only, same names)

`to_hf_moe` splits the stacks into the family's per-expert names; `from_hf_moe` stacks them back and also
takes the stacked names transformers 5 keeps in memory. `moe_family` says which family describes a MoE
`ModelArgs` (or refuses naming the field), `moe_config_fields` / `moe_args_fields` map the config fields.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import torch

from model.args import ModelArgs, ModelConfigError

MOE_MODEL_TYPES = ("mixtral", "qwen3_moe", "qwen2_moe")
"""HF `model_type`s of the MoE families."""
ATTENTION_FAMILY = {"mixtral": "mistral", "qwen3_moe": "qwen3", "qwen2_moe": "qwen2"}
"""The dense family whose attention each MoE family shares."""

_STACKED = re.compile(r"^(.*layers\.\d+\.)mlp\.experts\.(gate_up_proj|down_proj)$")
_PER_EXPERT = re.compile(r"^(.*layers\.\d+\.)(?:mlp|block_sparse_moe)\.experts\.(\d+)\.(\w+)\.weight$")
_MIXTRAL_NAMES = {"gate": "w1", "up": "w3", "down": "w2"}
_QWEN_NAMES = {"gate": "gate_proj", "up": "up_proj", "down": "down_proj"}


def moe_family(args: ModelArgs) -> str | None:
    """The MoE family of `args` (None for a model without MoE layers); a MoE model none describes is refused."""
    if not args.n_experts or not args.n_moe_layers:
        return None
    if args.moe_bias_update_rate:
        raise ModelConfigError(f"ModelArgs.moe_bias_update_rate={args.moe_bias_update_rate} has no equivalent in "
                               f"Mixtral / Qwen3-MoE / Qwen2-MoE (their routers have no selection bias): continue "
                               f"the model natively (model.init_from=<its run dir>) or train with a rate of 0")
    if args.moe_shared_ffn_dim is not None:
        if not args.moe_shared_gate or args.qk_norm or args.o_bias or args.sliding_window is not None:
            raise ModelConfigError("ModelArgs.moe_shared_ffn_dim is exported as Qwen2-MoE only, which gates the shared "
                                   "expert (moe_shared_gate=true) and has no q/k norms, o_proj bias or window: "
                                   "set those or drop the shared expert")
        return "qwen2_moe"
    if args.qk_norm:
        if args.attn_bias != args.o_bias or args.sliding_window is not None:
            raise ModelConfigError("ModelArgs.qk_norm=True with MoE is Qwen3-MoE, whose attention_bias biases q/k/v "
                                   "and o_proj together and which has no window: set o_bias=attn_bias, drop the window")
        return "qwen3_moe"
    layers_all = all(args.is_moe_layer(i) for i in range(args.n_layers))
    if not layers_all or not args.moe_norm_topk_prob or args.attn_bias or args.sliding_layers is not None:
        raise ModelConfigError(
            "ModelArgs with MoE but no qk_norm is Mixtral, which has experts on every layer (moe_layers='all'), "
            "renormalised top-k (moe_norm_topk_prob=true), no biases and a window on every layer or none: change "
            "those fields, or use qk_norm=true (Qwen3-MoE: MoE on some layers, either router)")
    return "mixtral"


def moe_config_fields(args: ModelArgs, family: str) -> dict[str, Any]:
    """The MoE fields of the HF config of `family` for `args` (beside the shared dense fields)."""
    fields: dict[str, Any] = {"num_experts_per_tok": args.moe_top_k, "router_aux_loss_coef": args.moe_aux_loss_coef,
                              "output_router_logits": False}
    if family == "mixtral":
        return {**fields, "num_local_experts": args.n_experts, "intermediate_size": args.expert_dim,
                "router_jitter_noise": 0.0, "sliding_window": args.sliding_window}
    sparse = [i for i in range(args.n_layers) if args.is_moe_layer(i)]
    step = args.moe_layers if isinstance(args.moe_layers, int) and not isinstance(args.moe_layers, bool) else 1
    fields.update(num_experts=args.n_experts, moe_intermediate_size=args.expert_dim,
                  norm_topk_prob=args.moe_norm_topk_prob, decoder_sparse_step=step,
                  mlp_only_layers=[] if step > 1 else [i for i in range(args.n_layers) if i not in sparse])
    if family == "qwen2_moe":
        fields.update(shared_expert_intermediate_size=args.moe_shared_ffn_dim, qkv_bias=args.attn_bias)
    return fields


def moe_args_fields(config: Any, model_type: str) -> dict[str, Any]:
    """ModelArgs' MoE fields of an HF Mixtral / Qwen3-MoE / Qwen2-MoE config (empty for a dense type)."""
    if model_type not in MOE_MODEL_TYPES:
        return {}
    jitter = float(getattr(config, "router_jitter_noise", 0.0) or 0.0)
    if jitter:
        raise ModelConfigError(f"HF config router_jitter_noise={jitter} is not supported (the native router has no "
                               f"jitter): set it to 0.0 in config.json")
    out: dict[str, Any] = {"moe_top_k": config.num_experts_per_tok,
                           "moe_aux_loss_coef": float(getattr(config, "router_aux_loss_coef", 0.0) or 0.0)}
    if model_type == "mixtral":
        return {**out, "n_experts": config.num_local_experts, "moe_norm_topk_prob": True}
    n = config.num_hidden_layers
    step = int(getattr(config, "decoder_sparse_step", 1) or 1)
    dense_only = set(getattr(config, "mlp_only_layers", None) or [])
    sparse = [i for i in range(n) if i not in dense_only and (i + 1) % step == 0]
    layers: str | int | list[int] = "all" if len(sparse) == n else step if not dense_only else sparse
    out.update(n_experts=config.num_experts, moe_ffn_dim=config.moe_intermediate_size, moe_layers=layers,
               moe_norm_topk_prob=bool(config.norm_topk_prob))
    if model_type == "qwen2_moe":
        out.update(moe_shared_ffn_dim=config.shared_expert_intermediate_size, moe_shared_gate=True)
    return out


def to_hf_moe(state: Mapping[str, torch.Tensor], family: str | None) -> dict[str, torch.Tensor]:
    """HF-prefixed native names -> the family's per-expert names of its checkpoints (dense entries pass through);
    `family` None keeps the stacked experts: the names of transformers 5's modules in memory."""
    out: dict[str, torch.Tensor] = {}
    names = _MIXTRAL_NAMES if family == "mixtral" else _QWEN_NAMES
    block = "block_sparse_moe" if family == "mixtral" else "mlp"
    for key, value in state.items():
        stacked = _STACKED.match(key)
        if stacked is None:
            if family == "mixtral" and ".mlp.gate.weight" in key:
                key = key.replace(".mlp.gate.weight", ".block_sparse_moe.gate.weight")
            out[key] = value
            continue
        if family is None:  # transformers 5 keeps the stacks in memory under these very names
            out[key] = value
            continue
        prefix, what = stacked.groups()
        for e, matrix in enumerate(value.detach()):  # clones below: safetensors refuses views of a larger tensor
            base = f"{prefix}{block}.experts.{e}."
            if what == "down_proj":
                out[base + names["down"] + ".weight"] = matrix.clone()
            else:
                gate, up = matrix.chunk(2, dim=0)
                out[base + names["gate"] + ".weight"] = gate.clone()
                out[base + names["up"] + ".weight"] = up.clone()
    return out


def from_hf_moe(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Per-expert HF names (Mixtral's or Qwen's, with or without the `model.` prefix) -> stacked native names."""
    out: dict[str, torch.Tensor] = {}
    experts: dict[str, dict[int, dict[str, torch.Tensor]]] = {}
    role = {**{v: k for k, v in _MIXTRAL_NAMES.items()}, **{v: k for k, v in _QWEN_NAMES.items()}}
    for key, value in state.items():
        match = _PER_EXPERT.match(key)
        if match is not None and match.group(3) in role:
            prefix, e, name = match.groups()
            experts.setdefault(prefix, {}).setdefault(int(e), {})[role[name]] = value
            continue
        out[key.replace(".block_sparse_moe.gate.", ".mlp.gate.")] = value
    for prefix, by_expert in experts.items():
        order = sorted(by_expert)
        if order != list(range(len(order))) or any(len(by_expert[e]) != 3 for e in order):
            raise ModelConfigError(f"{prefix}experts: expert weights are incomplete (experts {order}, each needs "
                                   f"gate, up and down); check that the checkpoint's shards are all there")
        out[prefix + "mlp.experts.gate_up_proj"] = torch.stack(
            [torch.cat([by_expert[e]["gate"], by_expert[e]["up"]]) for e in order])
        out[prefix + "mlp.experts.down_proj"] = torch.stack([by_expert[e]["down"] for e in order])
    return out
