"""Parallel degrees of a job, their consistency with the world size and with the model's shape.

Every check here runs before any process group exists, on every rank alike, so a bad layout ends
the job with one message instead of a hang in the first collective.
"""

from __future__ import annotations

from dataclasses import dataclass

from model.args import ModelArgs


class ParallelConfigError(ValueError):
    """Parallel degrees that cannot tile the world or the model; the message names the degree and the fix."""


@dataclass(frozen=True)
class ParallelDims:
    """How ``world_size`` ranks are split: ``world_size = pp * dp * tp``.

    Rank order is Megatron's: tensor-parallel ranks are adjacent (they talk most, so they share a node),
    then data-parallel, then pipeline stages: ``rank = (pp_rank * dp + dp_rank) * tp + tp_rank``.

    Expert parallelism is carved from the data-parallel group, as DeepSpeed-MoE's default (expert then data)
    layout: ``ep`` adjacent data-parallel ranks split the experts between them (the expert-parallel group),
    and the ranks at the same place of every such block hold the same experts (the expert-data-parallel
    group, ``dp / ep`` ranks). Both are carved from a data-parallel group, so their ranks share a TP rank (and a
    pipeline stage): under tensor parallelism each expert-parallel group trades the same TP slice of the experts.
    """

    world_size: int
    tp: int = 1  # tensor-parallel degree: ranks that share each layer
    pp: int = 1  # pipeline-parallel degree: stages of the layer list
    ep: int = 1  # expert-parallel degree: data-parallel ranks that split each MoE layer's experts

    def __post_init__(self) -> None:
        for name in ("world_size", "tp", "pp", "ep"):
            if getattr(self, name) < 1:
                raise ParallelConfigError(f"parallel.{name}={getattr(self, name)}: must be >= 1.")
        if self.world_size % (self.tp * self.pp):
            raise ParallelConfigError(
                f"world size {self.world_size} is not divisible by parallel.tp={self.tp} x parallel.pp={self.pp}: "
                f"launch a multiple of {self.tp * self.pp} processes or change the degrees."
            )
        if self.ep > 1 and self.dp % self.ep:
            raise ParallelConfigError(
                f"parallel.ep={self.ep} does not divide the data-parallel size {self.dp} (world {self.world_size} / "
                f"(tp={self.tp} x pp={self.pp})): experts are split over data-parallel ranks; choose an ep that "
                f"divides {self.dp}.")

    @property
    def dp(self) -> int:
        """Data-parallel degree: model replicas that see different samples."""
        return self.world_size // (self.tp * self.pp)

    def coords(self, rank: int) -> tuple[int, int, int]:
        """(pp_rank, dp_rank, tp_rank) of a global rank."""
        if not 0 <= rank < self.world_size:
            raise ParallelConfigError(f"rank {rank} is outside the world of {self.world_size}")
        return rank // (self.dp * self.tp), (rank // self.tp) % self.dp, rank % self.tp

    def rank_of(self, pp_rank: int, dp_rank: int, tp_rank: int) -> int:
        """Global rank at the given coordinates (the inverse of `coords`)."""
        return (pp_rank * self.dp + dp_rank) * self.tp + tp_rank

    def tp_groups(self) -> list[list[int]]:
        """Ranks of every tensor-parallel group (adjacent ranks)."""
        return [[self.rank_of(p, d, t) for t in range(self.tp)] for p in range(self.pp) for d in range(self.dp)]

    def dp_groups(self) -> list[list[int]]:
        """Ranks of every data-parallel group (same stage and TP slice, different replica)."""
        return [[self.rank_of(p, d, t) for d in range(self.dp)] for p in range(self.pp) for t in range(self.tp)]

    def pp_groups(self) -> list[list[int]]:
        """Ranks of every pipeline (same replica and TP slice, one rank per stage)."""
        return [[self.rank_of(p, d, t) for p in range(self.pp)] for d in range(self.dp) for t in range(self.tp)]

    @property
    def edp(self) -> int:
        """Expert-data-parallel degree: replicas of each expert (ranks that average its gradients)."""
        return self.dp // self.ep

    def ep_groups(self) -> list[list[int]]:
        """Ranks of every expert-parallel group: ``ep`` adjacent data-parallel ranks (same stage and TP slice)."""
        return [dp_ranks[i:i + self.ep] for dp_ranks in self.dp_groups() for i in range(0, self.dp, self.ep)]

    def edp_groups(self) -> list[list[int]]:
        """Ranks of every expert-data-parallel group: the same place in every expert-parallel block."""
        return [dp_ranks[i::self.ep] for dp_ranks in self.dp_groups() for i in range(self.ep)]

    def mp_groups(self) -> list[list[int]]:
        """Ranks of every model-parallel group: one whole replica (all its stages and TP slices)."""
        return [[self.rank_of(p, d, t) for p in range(self.pp) for t in range(self.tp)] for d in range(self.dp)]

    def check_pipeline(self, args: ModelArgs, *, zero_stage: int, grad_accum: int) -> None:
        """Refuse a pipeline DeepSpeed's engine cannot run well: ZeRO other than 1, more stages than blocks."""
        if self.pp == 1:
            return
        if args.n_moe_layers:
            raise ParallelConfigError(
                f"parallel.pp={self.pp} with MoE layers (model.n_experts={args.n_experts}): the pipeline stages do not "
                f"carry the router losses yet; train MoE models with parallel.pp=1.")
        if zero_stage != 1:
            why = ("it refuses ZeRO-2/3" if zero_stage > 1 else
                   "without ZeRO its gradient clipping counts tied embeddings twice and no gradient norm is reported")
            raise ParallelConfigError(
                f"parallel.pp={self.pp} with a ZeRO-{zero_stage} DeepSpeed config: Tessera runs the pipeline engine "
                f"with ZeRO-1 ({why}); use --ds_config zero1."
            )
        if args.n_layers < self.pp:
            raise ParallelConfigError(
                f"parallel.pp={self.pp} stages for a model of {args.n_layers} blocks (model.n_layers): every stage "
                f"needs at least one block; use parallel.pp <= {args.n_layers}."
            )
        if grad_accum < 1:
            raise ParallelConfigError(f"parallel.pp={self.pp} needs at least one micro-batch per step per replica.")

    def check_experts(self, args: ModelArgs, *, zero_stage: int) -> None:
        """Refuse an expert-parallel degree the model or the layout cannot run (tp > 1 is fine: `check_model`
        checks that it splits every expert's hidden units)."""
        if self.ep == 1:
            return
        if not args.n_moe_layers:
            raise ParallelConfigError(
                f"parallel.ep={self.ep} for a model without MoE layers (model.n_experts={args.n_experts}): expert "
                f"parallelism splits experts; set parallel.ep=1 or give the model experts.")
        if args.n_experts % self.ep:
            raise ParallelConfigError(
                f"parallel.ep={self.ep} does not divide the {args.n_experts} experts of each MoE layer "
                f"(model.n_experts): every expert-parallel rank keeps n_experts / ep whole experts; choose an ep "
                f"that divides {args.n_experts}.")
        if self.pp > 1:
            raise ParallelConfigError(
                f"parallel.ep={self.ep} with parallel.pp={self.pp}: expert parallelism runs without pipeline stages "
                f"(the stages do not carry the router losses); keep ep and set parallel.pp=1.")
        if zero_stage not in (1, 2):
            raise ParallelConfigError(
                f"parallel.ep={self.ep} with a ZeRO-{zero_stage} DeepSpeed config: expert parallelism trains with "
                f"DeepSpeed's MoE parameter groups under ZeRO-1 or ZeRO-2 only; use --ds_config zero1 or zero2.")

    def check_model(self, args: ModelArgs, *, seq_len: int, sequence_parallel: bool) -> None:
        """Refuse a tensor-parallel degree the model's shape (or the sequence length) cannot be split by."""
        if self.tp == 1:
            return
        checks = [
            ("n_heads", args.n_heads, "query heads"),
            ("n_kv_heads", args.kv_heads, "key/value heads"),
            ("ffn_hidden_dim", args.ffn_dim, "SwiGLU hidden units"),
        ]
        if args.n_moe_layers:  # every expert's FFN (and the shared expert) is split like a dense MLP
            checks.append(("moe_ffn_dim", args.expert_dim, "hidden units of each expert"))
            if args.moe_shared_ffn_dim:
                checks.append(("moe_shared_ffn_dim", args.moe_shared_ffn_dim, "hidden units of the shared expert"))
        for field_name, value, what in checks:
            if value % self.tp:
                raise ParallelConfigError(
                    f"parallel.tp={self.tp} does not divide the model's {value} {what} (model.{field_name}): "
                    f"each tensor-parallel rank must own whole {what}; choose a tp that divides {value}."
                )
        if sequence_parallel and seq_len % self.tp:
            raise ParallelConfigError(
                f"parallel.sequence_parallel=true splits each sequence over parallel.tp={self.tp} ranks, but "
                f"data.seq_len={seq_len} is not divisible by {self.tp}: choose a seq_len that is a multiple of "
                f"{self.tp} or turn sequence parallelism off."
            )


def padded_vocab_size(vocab_size: int, tp: int, multiple: int = 1) -> int:
    """The vocabulary rounded up so each of ``tp`` ranks holds the same number of rows (times ``multiple``)."""
    unit = tp * multiple
    return -(-vocab_size // unit) * unit
