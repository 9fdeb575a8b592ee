"""Shared fixtures: run the real entry point as a subprocess, with its caches kept inside the test run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
MAIN = REPO / "train" / "main.py"
SMOKE = REPO / "train" / "configs" / "smoke.yaml"


def free_port() -> int:
    from train.distributed import free_port as _free_port

    return _free_port()


def child_env(tmp: Path) -> dict[str, str]:
    """Environment for a launched training job: no inherited rendezvous, caches under ``tmp``."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    env.update(PYTHONUNBUFFERED="1", WANDB_MODE="offline", WANDB_DIR=str(tmp / "wandb"), HF_HUB_OFFLINE="1",
               HF_DATASETS_OFFLINE="1", DS_ACCELERATOR="cpu")
    return env


def run_job(cmd: list[str], tmp: Path, *, timeout: int = 600, env: dict[str, str] | None = None,
            check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run a launcher command from the repo root; a hang becomes a test failure after ``timeout`` seconds."""
    proc = subprocess.run(cmd, cwd=REPO, env=env or child_env(tmp), capture_output=True, text=True,
                          timeout=timeout, check=False)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}\n--- stderr ---\n{proc.stderr[-6000:]}")
    return proc


def python_main(*args: str) -> list[str]:
    return [sys.executable, str(MAIN), *args]


def read_rows(run_dir: Path) -> list[dict]:
    with open(run_dir / "metrics.jsonl") as f:
        return [json.loads(line) for line in f if line.strip()]


def copy_run_until(out: Path, step: int, resumed: Path) -> Path:
    """A new run directory holding only checkpoint ``step`` of ``out`` and its metrics rows up to that step."""
    import shutil

    tag = out / "checkpoints" / f"step_{step:08d}"
    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copytree(tag, resumed / "checkpoints" / tag.name)
    rows = [r for r in read_rows(out) if r["step"] <= step]
    (resumed / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return resumed


def train_losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_rows(run_dir) if "loss" in r}


def assert_same_weights(got: dict, want: dict, what: str = "", rel: float = 1e-3) -> None:
    """Two runs' weights after the same training, from different layouts: same names and shapes, and each tensor
    within ``rel`` of the reference in relative Frobenius norm. An element-wise bound would be the wrong test:
    AdamW moves a weight by about the learning rate whatever its gradient's size, so a gradient within rounding
    of zero can step either way under another summation order (another CPU's kernels); a wrong shard or a
    missed update is off by order one."""
    assert got.keys() == want.keys(), (what, sorted(got.keys() ^ want.keys()))
    for name, ref in want.items():
        assert got[name].shape == ref.shape, (what, name)
        err = ((got[name].float() - ref.float()).norm() / ref.float().norm().clamp_min(1e-12)).item()
        assert err < rel, (what, name, err)


@pytest.fixture(scope="session")
def data_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One corpus/tokenizer/prepared-data cache for every end-to-end test of the session."""
    return tmp_path_factory.mktemp("data_cache")


@pytest.fixture(scope="session")
def zero3_test_config(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """ds_configs/zero3.json with every parameter partitioned, however small (FACTS.md)."""
    cfg = json.loads((REPO / "ds_configs" / "zero3.json").read_text())
    cfg["zero_optimization"]["stage3_param_persistence_threshold"] = 0
    path = tmp_path_factory.mktemp("ds") / "zero3_test.json"
    path.write_text(json.dumps(cfg))
    return path


@pytest.fixture(scope="session")
def tiny_bases(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two tiny random HF bases (tools/tiny_hf_models.py): ``llama`` (300 tokens) and ``qwen2`` (360 tokens)."""
    from tools.tiny_hf_models import write_model

    root = tmp_path_factory.mktemp("tiny_bases")
    write_model(root, "llama", 300)
    write_model(root, "qwen2", 360)
    return root


@pytest.fixture
def fake_world():
    """A fake process group of the requested size and rank; torn down after the test."""
    import torch.distributed as dist
    from torch.testing._internal.distributed.fake_pg import FakeStore

    def start(world_size: int, rank: int) -> None:
        dist.init_process_group("fake", rank=rank, world_size=world_size, store=FakeStore())

    yield start
    if dist.is_initialized():
        dist.destroy_process_group()
