"""Diagnostics: first-token histograms by hand; group gradient and parameter norms through real DeepSpeed
engines (ZeRO 0-3, fp32 and bf16, data and tensor parallel) against one process of plain autograd."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tests.gloo import run_ranks
from train.loop.diagnostics import Diagnostics, collapse_warning, first_token_histogram, first_token_ids

REPO = Path(__file__).resolve().parents[2]

# ---- first generated token ------------------------------------------------------------------------------


def test_histogram_by_hand() -> None:
    ids = torch.tensor([7, 7, 7, 3, 3, 9, 7, 1])  # 7: 4, 3: 2, 9: 1, 1: 1
    hist = first_token_histogram(ids, decode=lambda i: f"<{i}>", top=3)
    assert hist["n"] == 8 and hist["distinct"] == 4
    assert hist["top"] == [[7, "<7>", 4], [3, "<3>", 2], [1, "<1>", 1]]  # ties: the lower id first
    assert hist["top_share"] == 0.5
    assert hist["entropy"] == pytest.approx(1.75)  # -(1/2 log 1/2 + 1/4 log 1/4 + 2 * 1/8 log 1/8)
    json.dumps(hist, allow_nan=False)  # plain JSON values


def test_histogram_of_one_token_and_of_nothing() -> None:
    hist = first_token_histogram(torch.full((5,), 42))
    assert hist == {"n": 5, "distinct": 1, "top": [[42, None, 5]], "top_share": 1.0, "entropy": 0.0}
    assert first_token_histogram(torch.tensor([], dtype=torch.long))["n"] == 0
    uniform = first_token_histogram(torch.arange(16))
    assert uniform["entropy"] == pytest.approx(4.0) and uniform["top_share"] == 1 / 16
    assert len(uniform["top"]) == 10


def test_first_token_ids_use_the_first_supervised_position() -> None:
    B, T, V = 3, 5, 11
    logits = torch.zeros(B, T, V)
    labels = torch.full((B, T), -100)
    labels[0, 2:] = 4  # prompt of 2 tokens: the first label is the target at position 2
    labels[2, 0:] = 1  # no prompt
    logits[0, 2, 6] = 1.0  # the argmax at the first supervised position
    logits[0, 1, 3] = 5.0  # just before it: ignored
    logits[0, 3, 9] = 5.0  # later positions: ignored
    logits[1, :, 2] = 9.0  # row 1 has no label: dropped
    logits[2, 0, 8] = 1.0
    ids = first_token_ids(logits, labels)
    assert ids.tolist() == [6, 8] and ids.dtype == torch.long
    assert first_token_ids(logits, torch.full((B, T), -100)).numel() == 0


def test_collapse_warning() -> None:
    collapsed = {**first_token_histogram(torch.tensor([5] * 19 + [2]), decode=lambda i: "\n"), "step": 40}
    msg = collapse_warning(collapsed)
    assert msg is not None and "\n" not in msg
    assert msg.startswith("step 40: ") and "19/20" in msg and "95%" in msg and "token 5 '\\n'" in msg
    assert collapse_warning(collapsed, threshold=0.96) is None
    assert collapse_warning(first_token_histogram(torch.tensor([5, 5, 5]))) is None  # too few to tell
    assert collapse_warning(first_token_histogram(torch.tensor([5] * 10 + [1] * 10))) is None


def test_first_token_rows(tmp_path: Path) -> None:
    diag = Diagnostics(tmp_path / "new" / "dir", interval=5, groups={}, rank=0)
    assert [s for s in range(1, 16) if diag.due(s)] == [5, 10, 15]
    assert not Diagnostics(tmp_path, interval=0, groups={}, rank=0).due(5)
    hist = diag.write_first_tokens(10, torch.tensor([3, 3, 4]), decode=str)
    [row] = _rows(tmp_path / "new" / "dir")
    assert row == hist == {"step": 10, "kind": "first_token", "n": 3, "distinct": 2,
                           "top": [[3, "3", 2], [4, "4", 1]], "top_share": 2 / 3,
                           "entropy": pytest.approx(0.9182958)}
    other = Diagnostics(tmp_path / "r1", interval=5, groups={}, rank=1)
    assert other.write_first_tokens(10, torch.tensor([3]), decode=None)["n"] == 1  # every rank returns it
    assert not (tmp_path / "r1").exists()  # only rank 0 writes


def test_train_row_format_in_one_process(tmp_path: Path) -> None:
    """Without an engine or a process group (full parameters on one rank): parameter norms, terms, nulls."""
    model = Tiny()
    with torch.no_grad():
        model.head.bias[0] = float("inf")
    diag = Diagnostics(tmp_path, interval=3, groups=_groups(model), rank=0)
    diag.write(None, 3, {"lm": torch.tensor(2.5), "kl": float("nan")})  # no capture_grads this step
    text = (tmp_path / "diagnostics.jsonl").read_text()
    assert text.count("\n") == 1 and "NaN" not in text and "Infinity" not in text
    [row] = _rows(tmp_path)
    want_emb = math.sqrt(sum(float(p.double().pow(2).sum()) for p in model.emb.parameters()))
    assert row == {"step": 3, "kind": "train", "grad_norm": None,
                   "param_norm": {"emb": pytest.approx(want_emb, rel=1e-12), "body": pytest.approx(
                       _norms([p.detach() for p in model.body.parameters()]), rel=1e-12), "head": None},
                   "loss": {"lm": 2.5, "kl": None}, "nonfinite": ["head"]}
    Diagnostics(tmp_path / "r1", interval=3, groups=_groups(model), rank=1).write(None, 3, {"lm": 1.0})
    assert not (tmp_path / "r1").exists()


def _rows(out_dir: Path) -> list[dict[str, Any]]:
    with open(out_dir / "diagnostics.jsonl") as f:
        return [json.loads(line) for line in f]


# ---- norms through real DeepSpeed engines -----------------------------------------------------------------

MICRO, ACCUM, STEPS, INTERVAL, CLIP, LR = 4, 2, 4, 2, 0.05, 1e-2


class Tiny(nn.Module):
    """A frozen input layer, then two trainable modules; odd sizes so ZeRO partitions need padding."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Linear(6, 8)
        self.body = nn.Linear(8, 16)
        self.head = nn.Linear(16, 3)
        self.emb.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.body(torch.tanh(self.emb(x)))))


def _groups(model: nn.Module) -> dict[str, list[nn.Parameter]]:
    return {"emb": list(model.emb.parameters()), "body": list(model.body.parameters()),
            "head": list(model.head.parameters())}


def _data(world: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and targets per (step, rank, micro-batch)."""
    g = torch.Generator().manual_seed(1)
    return torch.randn(STEPS, world, ACCUM, MICRO, 6, generator=g), 3 * torch.randn(STEPS, world, ACCUM, MICRO, 3,
                                                                                    generator=g)


def _norms(tensors: list[torch.Tensor]) -> float:
    return math.sqrt(sum(float(t.double().pow(2).sum()) for t in tensors))


def reference_rows(world: int) -> dict[int, dict[str, dict[str, float | None]]]:
    """One process, plain autograd: the mean loss of every rank's micro-batches, clipping, torch AdamW."""
    torch.manual_seed(0)
    model = Tiny()
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=LR)
    xs, ys = _data(world)
    rows = {}
    for step in range(1, STEPS + 1):
        opt.zero_grad()
        loss = sum(F.mse_loss(model(xs[step - 1, r, k]), ys[step - 1, r, k])
                   for r in range(world) for k in range(ACCUM)) / (world * ACCUM)
        loss.backward()
        grads = {name: None if not any(p.requires_grad for p in ps) else _norms([p.grad for p in ps])
                 for name, ps in _groups(model).items()}
        torch.nn.utils.clip_grad_norm_(trainable, CLIP)
        opt.step()
        if step % INTERVAL == 0:
            params = {name: _norms([p.detach() for p in ps]) for name, ps in _groups(model).items()}
            rows[step] = {"grad_norm": grads, "param_norm": params}
    return rows


def _ds_config(stage: int, *, world_dp: int, bf16: bool = False, **zero: Any) -> dict[str, Any]:
    """The project's ds_configs/zero<stage>.json with the recipe's values filled in and tiny buckets (so
    gradients cross bucket boundaries; the shipped 5e8-element buckets would take gigabytes)."""
    cfg = json.loads((REPO / "ds_configs" / f"zero{stage}.json").read_text())
    cfg.update(train_batch_size=MICRO * ACCUM * world_dp, train_micro_batch_size_per_gpu=MICRO,
               gradient_accumulation_steps=ACCUM, gradient_clipping=CLIP, bf16={"enabled": bf16})
    z = cfg["zero_optimization"]
    for key in ("reduce_bucket_size", "allgather_bucket_size", "stage3_prefetch_bucket_size"):
        if key in z:
            z[key] = 50
    if stage == 3:
        z["stage3_param_persistence_threshold"] = 0  # partition even the tiny parameters (FACTS.md)
    z.update(zero)
    return cfg


def _ds_env(rank: int, world: int) -> None:
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    os.environ.update(LOCAL_RANK=str(rank), RANK=str(rank), WORLD_SIZE=str(world))  # DeepSpeed asks for them


def train_with_diagnostics(rank: int, world: int, cases: list[dict[str, Any]], out_root: str) -> list[Any]:
    """For each case, a fresh engine trains STEPS steps with diagnostics; the rows this rank wrote (None: no
    file)."""
    _ds_env(rank, world)
    import deepspeed

    xs, ys = _data(world)
    results = []
    for case in cases:
        bf16 = case.get("bf16", False)
        torch.manual_seed(0)
        model = Tiny().to(torch.bfloat16 if bf16 else torch.float32)
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR)
        config = _ds_config(case["stage"], world_dp=world, bf16=bf16, **case.get("zero", {}))
        config.update(case.get("extra", {}))
        engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=config)
        out = Path(out_root) / case["name"] / f"rank{rank}"
        diag = Diagnostics(out, interval=INTERVAL, groups=_groups(engine.module), rank=rank)
        for step in range(1, STEPS + 1):
            for k in range(ACCUM):
                x = xs[step - 1, rank, k].to(next(engine.module.parameters()).dtype)
                loss = F.mse_loss(engine(x).float(), ys[step - 1, rank, k])
                engine.backward(loss)
                if k == ACCUM - 1 and diag.due(step):
                    diag.capture_grads(engine, step)
                engine.step()
            if diag.due(step):
                diag.write(engine, step, {"mse": float(loss), "aux": 0.5})
        results.append(_rows(out) if (out / "diagnostics.jsonl").exists() else None)
    return results


def _check_rows(rows: list[dict[str, Any]], ref: dict[int, dict[str, dict[str, float | None]]],
                rel: float, what: str) -> None:
    assert [r["step"] for r in rows] == sorted(ref), what
    for row in rows:
        assert row["kind"] == "train" and set(row["loss"]) == {"mse", "aux"} and "nonfinite" not in row, what
        assert isinstance(row["loss"]["mse"], float), what
        want = ref[row["step"]]
        assert row["grad_norm"]["emb"] is None, what  # frozen
        assert row["grad_norm"]["head"] > CLIP, what  # reported before clipping
        for kind in ("grad_norm", "param_norm"):
            for name in ("body", "head") if kind == "grad_norm" else ("emb", "body", "head"):
                assert row[kind][name] == pytest.approx(want[kind][name], rel=rel), (what, row["step"], kind, name)


FP32_CASES = [
    {"name": "zero0", "stage": 0},
    {"name": "zero1", "stage": 1},
    {"name": "zero2", "stage": 2},
    {"name": "zero2_no_overlap", "stage": 2, "zero": {"overlap_comm": False, "contiguous_gradients": False}},
    {"name": "zero3", "stage": 3},
    {"name": "zero3_persistent", "stage": 3, "zero": {"stage3_param_persistence_threshold": 10**5}},
]
BF16_CASES = [  # DeepSpeed's bf16 runs on the CPU accelerator: FP16_UnfusedOptimizer, ZeRO, BF16_Optimizer
    {"name": "bf16_zero0", "stage": 0, "bf16": True},
    {"name": "bf16_zero1_fp32_accum", "stage": 1, "bf16": True, "extra": {"data_types": {"grad_accum_dtype": "fp32"}}},
    {"name": "bf16_zero2", "stage": 2, "bf16": True},
    {"name": "bf16_zero3", "stage": 3, "bf16": True},
]


@pytest.mark.slow  # one spawn of two gloo ranks runs every case in turn: about 10 s
def test_norms_match_one_process_under_every_zero_stage(tmp_path: Path) -> None:
    """Group norms over 2 data-parallel ranks x 2 micro-batches equal plain autograd on the whole batch (fp32
    to 1e-5; bf16 to the bf16 rounding of weights and activations); the frozen group has no gradient norm;
    rank 1 writes nothing."""
    cases = FP32_CASES + BF16_CASES
    ref = reference_rows(2)
    rank0, rank1 = run_ranks(2, train_with_diagnostics, (cases, str(tmp_path)), timeout=300)
    assert rank1 == [None] * len(cases)
    for case, rows in zip(cases, rank0, strict=True):
        _check_rows(rows, ref, 2e-2 if case.get("bf16") else 1e-5, case["name"])


def nonfinite_rows(rank: int, world: int, out_root: str) -> list[dict[str, Any]]:
    """ZeRO-2: a NaN loss on rank 1 at step 2 poisons the averaged gradient of every group."""
    _ds_env(rank, world)
    import deepspeed

    torch.manual_seed(0)
    model = Tiny()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR)
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=_ds_config(2, world_dp=world))
    diag = Diagnostics(Path(out_root), interval=1, groups=_groups(engine.module), rank=rank)
    xs, ys = _data(world)
    for step in (1, 2):
        for k in range(ACCUM):
            loss = F.mse_loss(engine(xs[step - 1, rank, k]), ys[step - 1, rank, k])
            engine.backward(loss * float("nan") if (step, rank, k) == (2, 1, 0) else loss)
            if k == ACCUM - 1:
                diag.capture_grads(engine, step)
            engine.step()
        diag.write(engine, step, {"mse": float("nan") if step == 2 else 1.0})
    return _rows(Path(out_root)) if rank == 0 else []


@pytest.mark.slow  # two spawned gloo ranks: about 5 s
def test_nonfinite_norms_are_null_and_named(tmp_path: Path) -> None:
    rows, _ = run_ranks(2, nonfinite_rows, (str(tmp_path),), timeout=120)
    first, second = rows
    assert "nonfinite" not in first and all(v is not None for v in first["param_norm"].values())
    assert second["grad_norm"] == {"emb": None, "body": None, "head": None}
    assert second["nonfinite"] == ["body", "head"]  # the frozen group has no gradient; its weights are fine
    assert second["loss"] == {"mse": None}
    assert second["param_norm"] == first["param_norm"]  # DeepSpeed skipped the update


# ---- tensor parallelism -----------------------------------------------------------------------------------


class TinyTP(nn.Module):
    """Column-parallel then row-parallel linear (shards) with a replicated row bias and a frozen replica."""

    def __init__(self, ctx: Any) -> None:
        super().__init__()
        from parallel.layers import ColumnParallelLinear, RowParallelLinear

        torch.manual_seed(0)
        self.emb, up, down = nn.Linear(6, 6), nn.Linear(6, 8), nn.Linear(8, 3)
        self.emb.requires_grad_(False)
        self.up, self.down = ColumnParallelLinear(up, ctx), RowParallelLinear(down, ctx)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(torch.tanh(self.up(torch.tanh(self.emb(x)))))


def _tp_groups(model: nn.Module) -> dict[str, list[nn.Parameter]]:
    return {"emb": list(model.emb.parameters()), "up": list(model.up.parameters()),
            "down": list(model.down.parameters())}


def reference_tp_rows() -> dict[int, dict[str, dict[str, float | None]]]:
    """The same model unsplit, one process: the batch of the single data-parallel replica."""
    torch.manual_seed(0)
    emb, up, down = nn.Linear(6, 6), nn.Linear(6, 8), nn.Linear(8, 3)
    emb.requires_grad_(False)
    model = nn.ModuleDict({"emb": emb, "up": up, "down": down})
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=LR)
    xs, ys = _data(1)
    rows = {}
    for step in range(1, STEPS + 1):
        opt.zero_grad()
        loss = sum(F.mse_loss(down(torch.tanh(up(torch.tanh(emb(xs[step - 1, 0, k]))))), ys[step - 1, 0, k])
                   for k in range(ACCUM)) / ACCUM
        loss.backward()
        grads = {name: None if name == "emb" else _norms([p.grad for p in m.parameters()])
                 for name, m in model.items()}
        torch.nn.utils.clip_grad_norm_(trainable, CLIP)
        opt.step()
        if step % INTERVAL == 0:
            rows[step] = {"grad_norm": grads,
                          "param_norm": {name: _norms([q.detach() for q in m.parameters()])
                                         for name, m in model.items()}}
    return rows


def train_tp_with_diagnostics(rank: int, world: int, stages: list[int], out_root: str) -> list[Any]:
    """tp=2, dp=1: both ranks see the same batch; DeepSpeed gets the groups as its mpu."""
    _ds_env(rank, world)
    import deepspeed

    from parallel.dims import ParallelDims
    from parallel.groups import build_process_groups
    from parallel.layers import TPContext

    groups = build_process_groups(ParallelDims(world, tp=world))
    xs, ys = _data(1)
    results = []
    for stage in stages:
        model = TinyTP(TPContext.for_group(groups.tp_group))
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR)
        engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=_ds_config(stage, world_dp=1),
                                          mpu=groups)
        out = Path(out_root) / f"zero{stage}" / f"rank{rank}"
        diag = Diagnostics(out, interval=INTERVAL, groups=_tp_groups(engine.module), rank=rank,
                           tp_group=groups.tp_group)
        for step in range(1, STEPS + 1):
            for k in range(ACCUM):
                engine.backward(F.mse_loss(engine(xs[step - 1, 0, k]), ys[step - 1, 0, k]))
                if k == ACCUM - 1 and diag.due(step):
                    diag.capture_grads(engine, step)
                engine.step()
            if diag.due(step):
                diag.write(engine, step, {"mse": 0.0, "aux": 0.0})
        results.append(_rows(out) if (out / "diagnostics.jsonl").exists() else None)
    return results


@pytest.mark.slow  # one spawn of two gloo ranks: about 6 s
def test_tensor_parallel_shards_sum_and_replicas_count_once(tmp_path: Path) -> None:
    stages = [0, 1, 2, 3]
    ref = reference_tp_rows()
    rank0, rank1 = run_ranks(2, train_tp_with_diagnostics, (stages, str(tmp_path)), timeout=300)
    assert rank1 == [None] * len(stages)
    for stage, rows in zip(stages, rank0, strict=True):
        assert [r["step"] for r in rows] == sorted(ref)
        for row in rows:
            want = ref[row["step"]]
            assert row["grad_norm"]["emb"] is None
            for kind, names in (("grad_norm", ("up", "down")), ("param_norm", ("emb", "up", "down"))):
                for name in names:
                    assert row[kind][name] == pytest.approx(want[kind][name], rel=1e-5), (stage, kind, name)
