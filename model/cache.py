"""The key/value cache of incremental decoding: one preallocated buffer per layer."""

from __future__ import annotations

import torch

from model.args import ModelArgs


class KVCache:
    """Keys and values of every layer, preallocated as (B, max_len, Hkv, D) and filled left to right.

    Each attention layer calls `update` with its new keys/values; the model calls `advance` once
    per forward, after all layers, so `length` is the number of positions already cached.
    """

    def __init__(
        self,
        n_layers: int,
        batch_size: int,
        max_len: int,
        n_kv_heads: int,
        head_dim: int,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        # Allocated per layer on first use, with the head count of the keys written (under tensor parallelism
        # a rank caches only its own heads, fewer than n_kv_heads).
        self.shape = (batch_size, max_len, n_kv_heads, head_dim)
        self.device, self.dtype = device, dtype
        self.k: list[torch.Tensor | None] = [None] * n_layers
        self.v: list[torch.Tensor | None] = [None] * n_layers
        self.max_len = max_len
        self.length = 0

    @classmethod
    def for_model(
        cls,
        args: ModelArgs,
        batch_size: int,
        max_len: int,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> KVCache:
        """A cache shaped for a `Transformer(args)`."""
        return cls(
            args.n_layers, batch_size, max_len, args.kv_heads, args.head_dim, device=device, dtype=dtype
        )

    def update(self, layer_id: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v (B, T, Hkv, D) after the cached positions; return all of them (B, length+T, Hkv, D)."""
        end = self.length + k.shape[1]
        if end > self.max_len:
            raise ValueError(
                f"KVCache holds max_len={self.max_len} positions, {end} needed: allocate a larger max_len"
            )
        k_all, v_all = self.k[layer_id], self.v[layer_id]
        if k_all is None or v_all is None:
            B, max_len, _, D = self.shape
            shape = (B, max_len, k.shape[2], D)  # (B, max_len, Hkv, D)
            k_all = self.k[layer_id] = torch.zeros(shape, device=self.device, dtype=self.dtype)
            v_all = self.v[layer_id] = torch.zeros(shape, device=self.device, dtype=self.dtype)
        k_all[:, self.length : end] = k
        v_all[:, self.length : end] = v
        return k_all[:, :end], v_all[:, :end]

    def advance(self, n: int) -> None:
        """Mark n more positions as cached (called once per forward, after every layer has updated)."""
        self.length += n
