"""Peak live tensor memory on any device, including CPU (which has no allocator statistics in torch).

    with LiveBytes() as mem:
        ...                       # every tensor an operator creates in here is counted until it is freed
    mem.peak, mem.current         # bytes of distinct tensor storages alive at the worst moment / now

A `TorchDispatchMode` sees each operator's outputs (autograd's backward included); their storages are counted
once (views share them) and dropped from the count when a weak reference says they were freed. What it does
not see: tensors that existed before the block (pass them to ``track``), and scratch memory an operator
allocates and frees inside its own kernel.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


class LiveBytes(TorchDispatchMode):
    """Bytes of live tensor storages created under this mode (and of those given to `track`)."""

    def __init__(self) -> None:
        super().__init__()
        self.live: dict[int, tuple[StorageWeakRef, int]] = {}
        self.current = 0
        self.peak = 0

    def track(self, *tensors: Any) -> None:
        """Count existing tensors (any nesting of lists / dicts) as live from now on."""
        for t in tree_flatten(tensors)[0]:
            if isinstance(t, torch.Tensor) and t.device.type != "meta":
                storage = t.untyped_storage()
                key = storage._cdata
                if key not in self.live:
                    self.live[key] = (StorageWeakRef(storage), storage.nbytes())
                    self.current += storage.nbytes()
        self.peak = max(self.peak, self.current)

    def _sweep(self) -> None:
        for key, (ref, nbytes) in list(self.live.items()):
            if ref.expired():
                del self.live[key]
                self.current -= nbytes

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        out = func(*args, **(kwargs or {}))
        self._sweep()  # first: a storage freed during this op may have left its address to an output
        self.track(out)
        return out
