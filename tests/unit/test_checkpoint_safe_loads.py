"""Checkpoint trust with real collectives: DeepSpeed's own loads made weights-only (ZeRO 0-3 and universal
copies, on 2 gloo ranks), and a save whose write fails on one rank failing every rank in one line."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from tests.gloo import run_ranks

pytestmark = pytest.mark.slow

ENGINE_STAGES = (0, 1, 2, 3)


class Payload:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def plant(path: Path, marker: Path) -> None:
    """Add an object whose unpickling creates ``marker`` to a checkpoint file written by this test."""
    import torch

    obj = torch.load(path, weights_only=False, map_location="cpu")
    obj = {**obj, "payload": Payload(str(marker))} if isinstance(obj, dict) else (obj, Payload(str(marker)))
    torch.save(obj, path)


def _ds_env(rank: int, world: int) -> None:
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    os.environ.update(LOCAL_RANK=str(rank), RANK=str(rank), WORLD_SIZE=str(world))  # DeepSpeed asks for them


def _engine(stage: int):
    import deepspeed
    import torch

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    config = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1, "steps_per_print": 10**6,
              "zero_optimization": {"stage": stage, "stage3_param_persistence_threshold": 0},
              "optimizer": {"type": "AdamW", "params": {"lr": 1e-2, "torch_adam": True}}}
    engine, *_ = deepspeed.initialize(model=model, config=config, model_parameters=model.parameters())
    x = torch.randn(2, 16)
    engine.backward(engine(x).square().mean())
    engine.step()
    return engine


def _ds_loads(rank: int, world: int, root: str) -> dict[int, str]:
    """Per ZeRO stage: a clean checkpoint loads through weights_only_loads; one with a payload is refused."""
    import torch.distributed as dist

    from train.checkpoint.safe_load import RefusedFile, weights_only_loads

    _ds_env(rank, world)
    refused = {}
    for stage in ENGINE_STAGES:
        save_dir = Path(root) / f"zero{stage}"
        engine = _engine(stage)
        engine.save_checkpoint(str(save_dir), tag="t")
        with weights_only_loads():
            path, _ = _engine(stage).load_checkpoint(str(save_dir), tag="t")
        assert path is not None
        dist.barrier()
        if rank == 0:  # every rank reads the model states; under ZeRO 1-3 each rank its own optimizer file
            pattern = "*model_states.pt" if stage == 0 else f"*rank_{world - 1}_*optim_states.pt"
            target = next((save_dir / "t").glob(pattern))
            plant(target, Path(root) / f"ran{stage}")
        dist.barrier()
        try:
            with weights_only_loads():
                _engine(stage).load_checkpoint(str(save_dir), tag="t")
            refused[stage] = ""
        except RefusedFile as err:
            refused[stage] = str(err)
        dist.barrier()
    return refused


def test_deepspeed_loads_are_weights_only(tmp_path: Path) -> None:
    results = run_ranks(2, _ds_loads, (str(tmp_path),), timeout=400)
    for stage in ENGINE_STAGES:
        messages = [r[stage] for r in results]
        assert any("holds objects a weights-only load refuses (posix.system)" in m for m in messages), \
            (stage, messages)
        assert not (tmp_path / f"ran{stage}").exists()


def _universal(rank: int, world: int, root: str, stage: int) -> tuple[str, str]:
    """A universal copy loads weights-only; a planted file in it is refused by the preflight and DeepSpeed."""
    import torch.distributed as dist

    from train.checkpoint.resize import load_universal, prepare_universal
    from train.checkpoint.resume import preflight
    from train.checkpoint.safe_load import RefusedFile, weights_only_loads
    from train.checkpoint.writer import CheckpointError

    _ds_env(rank, world)
    save_dir = Path(root)
    _engine(stage).save_checkpoint(str(save_dir), tag="t")
    (save_dir / "t" / "tessera.json").write_text(json.dumps({"step": 1, "world_size": world}))
    universal, _ = prepare_universal(save_dir / "t", rank=rank)
    with weights_only_loads():
        assert load_universal(_engine(stage), universal) is not None
    dist.barrier()
    if rank == 0:
        plant(next(universal.glob("zero/*/fp32.pt")), save_dir / "ran")
    dist.barrier()
    try:
        preflight(save_dir / "t", rank=rank, world_size=world, root=universal)
        by_preflight = ""
    except CheckpointError as err:
        by_preflight = str(err)
    try:
        with weights_only_loads():
            load_universal(_engine(stage), universal)
        by_deepspeed = ""
    except RefusedFile as err:
        by_deepspeed = str(err)
    dist.barrier()
    return by_preflight, by_deepspeed


@pytest.mark.parametrize("stage", [1, 3])
def test_universal_copies_are_read_weights_only(tmp_path: Path, stage: int) -> None:
    results = run_ranks(2, _universal, (str(tmp_path), stage), timeout=400)
    assert all("refuses (posix.system)" in pre for pre, _ in results)  # every rank stops, in one line
    assert any("refuses (posix.system)" in ds for _, ds in results)
    assert not (tmp_path / "ran").exists()


class _FakeEngine:
    """Writes one file per rank as DeepSpeed does; rank ``fail_rank`` fails as torch.save on a full disk."""

    def __init__(self, rank: int, fail_rank: int | None) -> None:
        import torch

        self.rank, self.fail_rank = rank, fail_rank
        self.module = torch.nn.Linear(2, 2)

    def save_checkpoint(self, save_dir: str, tag: str, save_latest: bool,
                        exclude_frozen_parameters: bool) -> None:
        import torch
        import torch.distributed as dist

        path = Path(save_dir) / tag / f"zero_pp_rank_{self.rank}_mp_rank_00_optim_states.pt"
        torch.save({"state": torch.full((1000,), float(self.rank))}, path)
        if self.rank == self.fail_rank:
            path.write_bytes(path.read_bytes()[:100])
            raise RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 128 vs 0")
        dist.barrier()


def _write(rank: int, world: int, root: str) -> tuple[str, list[str], dict]:
    from train.checkpoint.verify import verify
    from train.checkpoint.writer import CheckpointError, CheckpointWriter

    writer = CheckpointWriter(root, rank=rank, keep_last=0, estimate_bytes=1000)
    first = writer.save(_FakeEngine(rank, None), 10, {"consumed_samples": 10})
    try:
        writer.save(_FakeEngine(rank, 1), 20, {"consumed_samples": 20})
        error = ""
    except CheckpointError as err:
        error = str(err)
    return error, sorted(p.name for p in first.parent.iterdir()), verify(first, checksums=True)["files"]


def test_a_failed_write_on_one_rank_fails_every_rank_in_one_line(tmp_path: Path) -> None:
    results = run_ranks(2, _write, (str(tmp_path),))
    errors = {error for error, _, _ in results}
    assert len(errors) == 1
    error = errors.pop()
    assert error.startswith(f"checkpoint at step 20 could not be written to {tmp_path / 'checkpoints'} (")
    assert "MiB free there): rank 1: torch.save failed (unexpected pos 128 vs 0)" in error
    assert error.endswith(f"the previous checkpoint {tmp_path / 'checkpoints' / 'step_00000010'} is intact.")
    assert "\n" not in error
    listing, files = results[0][1], results[0][2]
    assert listing == ["latest", "step_00000010"]  # the partial step_00000020.tmp is gone
    assert sorted(files) == ["rng_rank00000.pt", "rng_rank00001.pt",  # hashed by both ranks, listed by rank 0
                             "zero_pp_rank_0_mp_rank_00_optim_states.pt",
                             "zero_pp_rank_1_mp_rank_00_optim_states.pt"]
