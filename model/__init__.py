"""Tessera's plain PyTorch model: configuration, the Llama-style Transformer and generation."""

from model.args import PRESETS, ModelArgs, ModelConfigError, get_preset
from model.cache import KVCache
from model.generate import generate
from model.model import Transformer

__all__ = ["PRESETS", "KVCache", "ModelArgs", "ModelConfigError", "Transformer", "generate", "get_preset"]
