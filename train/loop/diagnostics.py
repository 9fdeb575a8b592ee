"""Training diagnostics at an interval: per-module gradient and parameter norms, loss terms, first tokens.

    diag = Diagnostics(out_dir, interval=50, groups={"head": [...], "base.lora": [...]}, rank=rank,
                       tp_group=tp_ctx.group)
    ...last micro-batch: engine.backward(loss)
    if diag.due(step): diag.capture_grads(engine, step)     # every rank: gradients exist only until step()
    engine.step()
    if diag.due(step): diag.write(engine, step, terms)       # every rank: parameter norms; rank 0 writes

Rows go to ``<out_dir>/diagnostics.jsonl`` (rank 0 only; the other ranks take part in the collectives):

    {"step": 100, "kind": "train", "grad_norm": {"head": 0.41, "base.lora": 0.02}, "param_norm": {...},
     "loss": {"lm": 2.31}}
    {"step": 100, "kind": "first_token", "n": 64, "distinct": 3, "top": [[13, "\\n", 60], ...],
     "top_share": 0.94, "entropy": 0.39}

Norms are global L2 norms over data and tensor parallelism. Gradients are the averaged ones the optimizer
applies (before clipping). Where the numbers come from, per DeepSpeed's layout of a parameter:

| layout                       | gradient                                  | parameter                              |
|------------------------------|-------------------------------------------|----------------------------------------|
| no ZeRO (fp32, bf16)         | ``p.grad`` (reduced in backward)          | ``p`` (the model's copy)               |
| ZeRO 1/2, bf16 optimizer     | ``safe_get_full_grad``: an all-reduce     | ``safe_get_full_fp32_param``: an       |
| (``_hp_mapping``)            | of the full size over the dp group        | all-reduce of the full size, dp group  |
| ZeRO 3 (``ds_id``)           | ``safe_get_local_grad`` + one all-reduce  | ``safe_get_local_fp32_param`` (frozen: |
|                              | of squared sums over the partition group  | ``p.ds_tensor``) + the same all-reduce |

Every rank walks the groups in the same order and takes the same branch for a parameter (the branch
depends on the parameter's layout and ``requires_grad``, which agree across ranks), so the collectives
match. DeepSpeed's pipeline engine is not covered (its ``train_batch`` runs backward and step together).
Under tensor parallelism, parameters flagged ``tensor_model_parallel`` are shards whose squared
norms are summed over ``tp_group``; the others are replicas, counted once (from TP rank 0).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

ProcessGroup = Any  # torch.distributed.ProcessGroup


def first_token_ids(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Greedy prediction at each row's first supervised position; rows without a label are dropped.

    Labels are already shifted (``labels[b, t]`` is the target of ``logits[b, t]``, as in ``lm_loss``), so
    the first generated token is the argmax at the first ``t`` with ``labels[b, t] != -100``.
    """
    # logits: (B, T, V), labels: (B, T)
    supervised = labels != -100  # (B, T)
    has = supervised.any(dim=1)  # (B,)
    first = supervised.int().argmax(dim=1)  # (B,) index of the first True (0 where none)
    rows = torch.arange(labels.shape[0], device=labels.device)
    ids = logits[rows, first].argmax(dim=-1)  # (B,)
    return ids[has]


def first_token_histogram(token_ids: torch.Tensor, decode: Callable[[int], str] | None = None,
                          top: int = 10) -> dict[str, Any]:
    """Counts of the first generated tokens: how many distinct, the most common, their share, entropy in bits."""
    ids = token_ids.reshape(-1).long().cpu()
    n = ids.numel()
    if n == 0:
        return {"n": 0, "distinct": 0, "top": [], "top_share": 0.0, "entropy": 0.0}
    values, counts = torch.unique(ids, return_counts=True)
    order = sorted(range(values.numel()), key=lambda i: (-int(counts[i]), int(values[i])))  # ties: lower id
    probs = counts.double() / n
    entropy = float(-(probs * torch.log2(probs)).sum()) + 0.0  # + 0.0 turns -0.0 into 0.0
    return {
        "n": n,
        "distinct": int(values.numel()),
        "top": [[int(values[i]), decode(int(values[i])) if decode is not None else None, int(counts[i])]
                for i in order[:top]],
        "top_share": int(counts.max()) / n,
        "entropy": entropy,
    }


def collapse_warning(hist: dict[str, Any], threshold: float = 0.9, *, min_n: int = 8) -> str | None:
    """A one-line warning when one token starts at least ``threshold`` of at least ``min_n`` generations."""
    n = hist.get("n", 0)
    if n < min_n or hist.get("top_share", 0.0) < threshold or not hist.get("top"):
        return None
    token, text, count = hist["top"][0]
    shown = f"token {token}" + (f" {text!r}" if text is not None else "")
    at = f"step {hist['step']}: " if "step" in hist else ""
    return (f"{at}first generated token collapsed: {count}/{n} prompts ({count / n:.0%}) start with {shown}; "
            f"{hist.get('distinct', '?')} distinct first tokens")


def _valid_local(local: torch.Tensor, param: torch.nn.Parameter, group: ProcessGroup) -> torch.Tensor:
    """This rank's ZeRO-3 partition of ``param`` without the padding the last partitions carry."""
    local = local.reshape(-1)
    start = dist.get_rank(group=group) * local.numel()
    return local[: max(0, min(local.numel(), param.ds_numel - start))]


class _Squares:
    """Squared-norm sums per group: full tensors add at once, ZeRO-3 partitions wait for one all-reduce per
    partition group, and TP shards for one all-reduce over the TP group."""

    def __init__(self, n_groups: int, tp_group: ProcessGroup | None) -> None:
        self.n = n_groups
        self.tp_group = tp_group
        self.tp_split = tp_group is not None and dist.get_world_size(group=tp_group) > 1
        self.tp_rank = dist.get_rank(group=tp_group) if self.tp_split else 0
        self.full = torch.zeros(n_groups, dtype=torch.float64)  # complete on this rank already
        self.partial: dict[ProcessGroup, torch.Tensor] = {}  # ZeRO-3 partitions, by partition group
        self.order: list[ProcessGroup] = []  # partition groups in first-seen order (the same on every rank)

    def _counted(self, param: torch.nn.Parameter) -> bool:
        """Whether this rank counts ``param``: shards always, replicas on TP rank 0 only."""
        return not self.tp_split or self.tp_rank == 0 or getattr(param, "tensor_model_parallel", False)

    def add(self, i: int, param: torch.nn.Parameter, tensor: torch.Tensor | None) -> None:
        if tensor is not None and self._counted(param):
            self.full[i] += torch.linalg.vector_norm(tensor.detach().double()).cpu() ** 2

    def add_partition(self, i: int, param: torch.nn.Parameter, local: torch.Tensor | None) -> None:
        group = param.ds_process_group
        if group not in self.partial:
            self.partial[group] = torch.zeros(self.n, dtype=torch.float64)
            self.order.append(group)
        if local is not None and self._counted(param):
            valid = _valid_local(local.detach(), param, group)
            self.partial[group][i] += torch.linalg.vector_norm(valid.double()).cpu() ** 2

    def norms(self, device: torch.device) -> list[float]:
        total = self.full.clone()
        for group in self.order:  # all-reduce squared sums of the partitions (every rank, same order)
            part = self.partial[group].to(device)
            dist.all_reduce(part, group=group)
            total += part.cpu()
        if self.tp_split:
            total = total.to(device)
            dist.all_reduce(total, group=self.tp_group)
            total = total.cpu()
        return total.sqrt().tolist()


class Diagnostics:
    """Per-group gradient and parameter norms and loss terms every ``interval`` optimizer steps."""

    def __init__(self, out_dir: Path, *, interval: int, groups: dict[str, list[torch.nn.Parameter]],
                 rank: int, tp_group: ProcessGroup | None = None) -> None:
        if interval < 0:
            raise ValueError(f"diagnostics interval={interval}: use 0 (off) or a positive number of steps")
        self.path = Path(out_dir) / "diagnostics.jsonl"
        self.interval, self.rank, self.tp_group = interval, rank, tp_group
        self.names = list(groups)
        self.groups = [list(dict.fromkeys(params)) for params in groups.values()]  # each parameter once
        # where collectives run: the parameters' device (gloo on CPU, NCCL on CUDA)
        self.device = next((p.device for ps in self.groups for p in ps), torch.device("cpu"))
        self._grads: tuple[int, dict[str, float | None]] | None = None  # (step, norms) from capture_grads

    def due(self, step: int) -> bool:
        """True when optimizer step ``step`` (1-based) is one to record."""
        return self.interval > 0 and step % self.interval == 0

    # ---- gradients and parameters ----
    @torch.no_grad()
    def capture_grads(self, engine: Any, step: int) -> None:
        """Gradient norms of every group; on every rank after the last backward of ``step``, before its
        ``engine.step()`` (DeepSpeed frees or reuses the partitioned gradients in the step)."""
        boundary = getattr(engine, "is_gradient_accumulation_boundary", None)
        if boundary is not None and not boundary():
            raise RuntimeError(f"Diagnostics.capture_grads at step {step}: call it after the backward of the "
                               f"last micro-batch (the accumulation boundary), before engine.step()")
        from deepspeed.utils import safe_get_full_grad, safe_get_local_grad

        squares = _Squares(len(self.groups), self.tp_group)
        for i, params in enumerate(self.groups):
            for p in params:
                if not p.requires_grad:
                    continue
                if hasattr(p, "ds_id"):  # ZeRO-3: this rank's partition of the averaged gradient
                    squares.add_partition(i, p, safe_get_local_grad(p))
                elif hasattr(p, "_hp_mapping"):  # ZeRO-1/2: reassembled over the data-parallel group
                    squares.add(i, p, safe_get_full_grad(p))
                else:  # no ZeRO: the engine has averaged p.grad over data parallelism in backward
                    squares.add(i, p, p.grad)
        norms = squares.norms(self.device)
        self._grads = (step, {name: (norms[i] if self._trainable(i) else None)
                              for i, name in enumerate(self.names)})

    @torch.no_grad()
    def param_norms(self) -> dict[str, float]:
        """Parameter norm of every group (fp32 master weights where the optimizer keeps them); collective."""
        from deepspeed.utils import safe_get_full_fp32_param, safe_get_local_fp32_param

        squares = _Squares(len(self.groups), self.tp_group)
        for i, params in enumerate(self.groups):
            for p in params:
                if hasattr(p, "ds_id"):  # ZeRO-3: the partition (frozen parameters have no fp32 master)
                    squares.add_partition(i, p, safe_get_local_fp32_param(p) if p.requires_grad else p.ds_tensor)
                elif p.requires_grad and hasattr(p, "_hp_mapping"):  # ZeRO-1/2 and DeepSpeed's bf16 optimizer
                    squares.add(i, p, safe_get_full_fp32_param(p))
                else:
                    squares.add(i, p, p)
        norms = squares.norms(self.device)
        return dict(zip(self.names, norms, strict=True))

    def _trainable(self, i: int) -> bool:
        return any(p.requires_grad for p in self.groups[i])

    def write(self, engine: Any, step: int, terms: dict[str, float]) -> None:
        """After ``engine.step()`` of a due step, on every rank: parameter norms (collective), then rank 0
        appends the row with the gradient norms from ``capture_grads`` and the averaged loss terms."""
        params = self.param_norms()
        grads = self._grads[1] if self._grads is not None and self._grads[0] == step else None
        self._grads = None
        if self.rank != 0:
            return
        nonfinite = sorted({name for norms in (grads or {}, params) for name, v in norms.items()
                            if v is not None and not math.isfinite(v)})
        row: dict[str, Any] = {
            "step": step,
            "kind": "train",
            "grad_norm": None if grads is None else {k: _finite(v) for k, v in grads.items()},
            "param_norm": {k: _finite(v) for k, v in params.items()},
            "loss": {k: _finite(float(v)) for k, v in terms.items()},
        }
        if nonfinite:
            row["nonfinite"] = nonfinite
        self._append(row)

    # ---- first generated token ----
    def write_first_tokens(self, step: int, token_ids: torch.Tensor,
                           decode: Callable[[int], str] | None) -> dict[str, Any]:
        """Histogram of the first generated tokens (already gathered); rank 0 appends it. No collectives."""
        hist = {"step": step, "kind": "first_token", **first_token_histogram(token_ids, decode)}
        if self.rank == 0:
            self._append(hist)
        return hist

    def _append(self, row: dict[str, Any]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        line = json.dumps(row, allow_nan=False) + "\n"
        with open(self.path, "a") as f:  # one write of the whole row, then flush
            f.write(line)
            f.flush()


def _finite(v: float | None) -> float | None:
    return v if v is not None and math.isfinite(v) else None
