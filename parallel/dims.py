"""Parallel degrees of a job and their consistency with the world size."""

from __future__ import annotations

from dataclasses import dataclass


class ParallelConfigError(ValueError):
    """Parallel degrees that cannot tile the world; the message names the degree and the fix."""


@dataclass(frozen=True)
class ParallelDims:
    """How ``world_size`` ranks are split: ``world_size = dp * tp * pp``."""

    world_size: int
    tp: int = 1  # tensor-parallel degree: ranks that share each layer
    pp: int = 1  # pipeline-parallel degree: stages of the layer list

    def __post_init__(self) -> None:
        for name in ("world_size", "tp", "pp"):
            if getattr(self, name) < 1:
                raise ParallelConfigError(f"parallel.{name}={getattr(self, name)}: must be >= 1.")
        if self.world_size % (self.tp * self.pp):
            raise ParallelConfigError(
                f"world size {self.world_size} is not divisible by parallel.tp={self.tp} x parallel.pp={self.pp}: "
                f"launch a multiple of {self.tp * self.pp} processes or change the degrees."
            )

    @property
    def dp(self) -> int:
        """Data-parallel degree: model replicas that see different samples."""
        return self.world_size // (self.tp * self.pp)

    def require_supported(self) -> None:
        """This release trains data-parallel replicas (with ZeRO); TP and PP layers are not in it yet."""
        for name in ("tp", "pp"):
            if getattr(self, name) != 1:
                raise ParallelConfigError(
                    f"parallel.{name}={getattr(self, name)}: this release runs data parallelism with ZeRO 0-3 only; "
                    f"set parallel.{name}=1 and use a ZeRO-3 config to shard large models."
                )
