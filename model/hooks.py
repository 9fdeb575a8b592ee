"""Residual-stream hooks: read or modify the hidden state after chosen decoder layers.

    hooks = LayerHooks(model)                                    # a native Transformer or an HF causal LM
    handle = hooks.add("2-5", lambda layer, h: h + scale * v)   # (B, T, D) -> (B, T, D), or None to only read
    with hooks.disabled(): base_logits = model(ids)              # the unmodified model
    handle.remove()

A hook runs after the block's forward, on the block's output hidden state (an HF block's tuple output keeps its
other members). It is a module forward hook on the block itself, so it runs once per forward also when the
block's activations are recomputed in backward (activation checkpointing replaces the block's ``forward``; the
hook sits in the call around it), and on any tensor-parallel layout: under sequence parallelism the hook sees
this rank's slice of the sequence, (B, T / tp, D).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

HookFn = Callable[[int, torch.Tensor], torch.Tensor | None]  # (layer index, hidden (B, T, D)) -> new hidden or None


class HookError(ValueError):
    """A hook asked for something the model does not have; the message names it and what exists."""


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The ordered list of decoder blocks of a native Transformer, an HF causal LM or a PEFT model around one."""
    layers = getattr(model, "layers", None)
    if isinstance(layers, nn.ModuleList):
        return layers
    config = getattr(model, "config", None)
    expected = None
    for key in ("num_hidden_layers", "n_layer", "num_layers"):
        if config is not None and isinstance(getattr(config, key, None), int):
            expected = getattr(config, key)
            break
    found = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.ModuleList)
             and name.split(".")[-1] in ("layers", "h", "block", "blocks")]
    for name, m in found:  # the decoder's list (an encoder-decoder has two; causal LMs one)
        if expected is None or len(m) == expected:
            return m
    raise HookError(f"{type(model).__name__}: no list of decoder layers found (looked for a ModuleList named "
                    f"layers / h / block(s){f' of {expected} layers' if expected else ''})")


def parse_layers(spec: int | str | Sequence[int], n_layers: int, *, where: str = "layers") -> list[int]:
    """Layer indices from 3, '2-5' (inclusive), '0,3,7' or [1, 2]; an index outside the model is an error."""
    if isinstance(spec, int):
        out = [spec]
    elif isinstance(spec, str):
        out = []
        for part in spec.replace(" ", "").split(","):
            lo, sep, hi = part.partition("-")
            try:
                out.extend(range(int(lo), int(hi) + 1) if sep else [int(lo)])
            except ValueError:
                raise HookError(f"{where}={spec!r}: write an index (3), an inclusive range ('2-5') or a comma "
                                f"list ('0,3,7')") from None
    else:
        out = [int(i) for i in spec]
    if not out:
        raise HookError(f"{where}={spec!r} names no layer")
    bad = [i for i in out if not 0 <= i < n_layers]
    if bad:
        raise HookError(f"{where}={spec!r}: layer {bad[0]} does not exist; the model has {n_layers} layers "
                        f"(0-{n_layers - 1})")
    return sorted(set(out))


@dataclass
class HookHandle:
    """One registered hook over its layers; ``remove()`` takes it off every one."""

    layers: list[int]
    fn: HookFn
    handles: list[Any] = field(default_factory=list)
    calls: int = 0  # how many times it ran (one per layer per forward)

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()


class LayerHooks:
    """Forward hooks on a model's decoder layers, with a switch that turns all of them off at once."""

    def __init__(self, model: nn.Module) -> None:
        self.layers = decoder_layers(model)
        self.enabled = True
        self.hooks: list[HookHandle] = []

    @property
    def n_layers(self) -> int:
        return len(self.layers)

    def add(self, layers: int | str | Sequence[int], fn: HookFn) -> HookHandle:
        """Run ``fn(layer, hidden)`` after each chosen layer; a returned tensor replaces the hidden state."""
        handle = HookHandle(parse_layers(layers, self.n_layers), fn)
        for i in handle.layers:
            handle.handles.append(self.layers[i].register_forward_hook(self._wrap(i, handle)))
        self.hooks.append(handle)
        return handle

    def _wrap(self, index: int, handle: HookHandle) -> Callable[..., Any]:
        def hook(_module: nn.Module, _args: Any, output: Any) -> Any:
            if not self.enabled:
                return None
            hidden = output[0] if isinstance(output, tuple) else output
            handle.calls += 1
            new = handle.fn(index, hidden)
            if new is None:
                return None
            if new.shape != hidden.shape:
                raise HookError(f"hook on layer {index} returned shape {tuple(new.shape)}; the hidden state is "
                                f"{tuple(hidden.shape)} and a hook must keep it")
            return (new, *output[1:]) if isinstance(output, tuple) else new
        return hook

    @contextlib.contextmanager
    def disabled(self) -> Iterator[None]:
        """The model without any of these hooks (the base), e.g. for a side-by-side comparison."""
        before, self.enabled = self.enabled, False
        try:
            yield
        finally:
            self.enabled = before

    def remove(self) -> None:
        for h in self.hooks:
            h.remove()
        self.hooks.clear()
