"""LoRA / QLoRA through PEFT, with targets chosen by module name and by block index.

    names = lora_targets(model, ["q_proj", "v_proj"], layers=[0, 1, 2])  # full module names, or an error
    model = apply_lora(model, names, r=8, alpha=16, dropout=0.05)         # a peft.PeftModel

Targets are resolved to full module names before PEFT sees them, so what is adapted is exactly what the
recipe asked for, is recorded in the adapter's `adapter_config.json`, and a selection that matches nothing is
an error listing what exists. The LM head (the output embedding) is never a LoRA target by default.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from torch import nn

from model.args import ModelConfigError

_BLOCK_INDEX = re.compile(r"\.(\d+)\.")  # model.layers.3.self_attn.q_proj / transformer.h.3.attn.c_attn


def _is_linear(module: nn.Module) -> bool:
    """nn.Linear, GPT-2's Conv1D and the bitsandbytes 4/8-bit linears (all subclass or mimic nn.Linear)."""
    if isinstance(module, nn.Linear):
        return True
    return type(module).__name__ in ("Conv1D", "Linear4bit", "Linear8bitLt")


def block_index(name: str) -> int | None:
    """The decoder-block index in a module name (the first numeric path component), or None."""
    m = _BLOCK_INDEX.search(f".{name}.")
    return int(m.group(1)) if m else None


def _head_names(model: nn.Module) -> set[str]:
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    return {name for name, module in model.named_modules() if head is not None and module is head} | {"lm_head"}


def lora_targets(model: nn.Module, target_modules: Sequence[str] = (), layers: Sequence[int] | None = None) -> list[str]:
    """Full names of the linear layers to adapt: those whose name equals or ends with ``.<target>`` (every
    linear layer inside a block when ``target_modules`` is empty), restricted to blocks ``layers``."""
    heads = _head_names(model)
    linears = [name for name, module in model.named_modules() if _is_linear(module) and name not in heads]
    blocks = sorted({i for i in map(block_index, linears) if i is not None})
    if layers is not None:
        missing = sorted(set(layers) - set(blocks))
        if missing:
            raise ModelConfigError(f"lora.layers: blocks {missing} do not exist; the model has blocks "
                                   f"{blocks[0]}-{blocks[-1]}." if blocks else "lora.layers: the model has no blocks.")
    chosen = []
    for name in linears:
        idx = block_index(name)
        if idx is None or (layers is not None and idx not in layers):
            continue
        if not target_modules or any(name == t or name.endswith("." + t) for t in target_modules):
            chosen.append(name)
    if not chosen:
        kinds = sorted({n.rsplit(".", 1)[-1] for n in linears if block_index(n) is not None})
        raise ModelConfigError(f"lora.target_modules={list(target_modules)} match no linear layer"
                               f"{'' if layers is None else f' in blocks {list(layers)}'}; the blocks' linear "
                               f"layers are named: {', '.join(kinds) or 'none'}.")
    return chosen


def lora_param_names(model: nn.Module) -> list[str]:
    """Names of the trainable parameters of a PEFT model (the adapters and any modules_to_save)."""
    return [name for name, p in model.named_parameters() if p.requires_grad]


def apply_lora(model: nn.Module, targets: Sequence[str], *, r: int, alpha: float, dropout: float = 0.0,
               bias: str = "none", modules_to_save: Sequence[str] = (), quantized: bool = False,
               gradient_checkpointing: bool = False) -> Any:
    """Wrap ``model`` with LoRA adapters on ``targets`` (full names from `lora_targets`); returns a PeftModel.

    quantized: the base was loaded in 4/8 bits: PEFT's k-bit preparation runs first (norms in fp32, input
    gradients enabled so the adapters receive gradients through the frozen base).
    """
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    if quantized:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing)
    task = "CAUSAL_LM" if hasattr(model, "get_output_embeddings") and hasattr(model, "generation_config") else None
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=list(targets), bias=bias,
                        modules_to_save=list(modules_to_save) or None, task_type=task)
    peft_model = get_peft_model(model, config)
    if not any(p.requires_grad for p in peft_model.parameters()):
        raise ModelConfigError("LoRA left no trainable parameter; check lora.target_modules.")
    return peft_model
