"""The host-memory snapshot of an asynchronous save: independent of later in-place updates, sharing kept, and
for DeepSpeed ZeRO 0-3 on 2 gloo ranks the files written from it after more optimizer steps equal a synchronous
save of the same moment; a failed background write is kept for the training thread."""

from __future__ import annotations

import errno
import functools
import os
from pathlib import Path

import pytest
import torch

from tests.gloo import run_ranks
from train.checkpoint.async_save import BackgroundWrite, snapshot

STAGES = (0, 1, 2, 3)


def test_snapshot_is_a_copy_that_keeps_sharing() -> None:
    flat = torch.arange(10.0)
    state = {"a": flat[:4], "b": flat[4:].view(2, 3), "p": torch.nn.Parameter(torch.ones(2)), "n": [1, (2, "x")]}
    copy = snapshot(state)
    flat.add_(100.0)  # the optimizer's next step, in place
    state["p"].data.zero_()
    assert copy["a"].tolist() == [0.0, 1.0, 2.0, 3.0] and copy["b"].tolist() == [[4.0, 5.0, 6.0], [7.0, 8.0, 9.0]]
    assert copy["a"].untyped_storage().data_ptr() == copy["b"].untyped_storage().data_ptr()  # one storage
    assert isinstance(copy["p"], torch.nn.Parameter) and copy["p"].tolist() == [1.0, 1.0]
    assert copy["n"] == [1, (2, "x")]


def test_background_write_keeps_its_error(tmp_path: Path) -> None:
    def full_disk(state: object, path: str) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)

    ok = BackgroundWrite([({"x": torch.ones(3)}, str(tmp_path / "a.pt"), torch.save)], tmp_path, step=1)
    ok.start()
    ok.join()
    assert ok.error is None and set(ok.files) == {"a.pt"} and ok.files["a.pt"]["size"] > 0
    bad = BackgroundWrite([({"x": torch.ones(3)}, str(tmp_path / "b.pt"), full_disk)], tmp_path, step=1)
    bad.start()
    bad.join()
    assert isinstance(bad.error, OSError) and bad.error.errno == errno.ENOSPC and bad.files == {}


def _engine(stage: int):
    import deepspeed

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    config = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1, "steps_per_print": 10**6,
              "zero_optimization": {"stage": stage, "stage3_param_persistence_threshold": 0},
              "optimizer": {"type": "AdamW", "params": {"lr": 1e-2, "torch_adam": True}}}
    engine, *_ = deepspeed.initialize(model=model, config=config, model_parameters=model.parameters())
    return engine


def _step(engine) -> None:
    x = torch.randn(2, 16)
    engine.backward(engine(x).square().mean())
    engine.step()


def _tensors(obj: object, prefix: str = "") -> dict[str, torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        return {prefix: obj}
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, (list, tuple)) else ()
    out: dict[str, torch.Tensor] = {}
    for key, value in items:
        out.update(_tensors(value, f"{prefix}/{key}"))
    return out


def _snapshot_vs_sync(rank: int, world: int, root: str) -> dict[int, list[str]]:
    """Per stage: the files whose tensors differ between a sync save and an async one written two steps later."""
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    os.environ.update(LOCAL_RANK=str(rank), RANK=str(rank), WORLD_SIZE=str(world))
    import torch.distributed as dist

    from train.checkpoint.async_save import take_snapshot

    differing: dict[int, list[str]] = {}
    for stage in STAGES:
        engine = _engine(stage)
        _step(engine)
        base = Path(root) / f"zero{stage}"
        engine.save_checkpoint(str(base), tag="sync", save_latest=False)
        save = functools.partial(engine.save_checkpoint, str(base), tag="async", save_latest=False)
        queue = take_snapshot(engine, save)
        for _ in range(2):
            _step(engine)  # in-place updates of weights, moments and ZeRO's flat partitions
        write = BackgroundWrite(queue, base / "async", step=1)
        write.start()
        write.join()
        assert write.error is None, write.error
        dist.barrier()
        names = sorted(p.name for p in (base / "sync").iterdir() if p.suffix == ".pt")
        assert names == sorted(p.name for p in (base / "async").iterdir() if p.suffix == ".pt")
        differing[stage] = []
        for name in names:
            want = _tensors(torch.load(base / "sync" / name, weights_only=False))
            got = _tensors(torch.load(base / "async" / name, weights_only=False))
            if want.keys() != got.keys() or not all(torch.equal(want[k], got[k]) for k in want):
                differing[stage].append(name)
        dist.barrier()
    return differing


@pytest.mark.slow
def test_snapshot_files_equal_a_sync_save_under_zero(tmp_path: Path) -> None:
    results = run_ranks(2, _snapshot_vs_sync, (str(tmp_path),), timeout=400)
    for stage in STAGES:
        assert all(r[stage] == [] for r in results), (stage, results)
