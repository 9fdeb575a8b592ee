"""One two-rank launch under the deepspeed launcher (which sets LOCAL_SIZE, so DeepSpeed's shm_comm op maps
a shared-memory buffer per rank): a recipe written for one process (micro-batch = global batch) runs on two
ranks with the micro-batch fitted and its warm-up scaled to a short run, and the run leaves /dev/shm as it found
it (train/distributed.py unlinks each rank's buffer once every rank has opened them)."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import MAIN, SMOKE, free_port, run_job

SHM = Path("/dev/shm")


@pytest.mark.slow  # about 40 s on 2 cores, once DeepSpeed's shm_comm op is built (about 30 s more the first time)
def test_one_process_recipe_on_two_ranks_leaves_no_shm(tmp_path: Path, data_cache: Path) -> None:
    recipe = yaml.safe_load(SMOKE.read_text())
    recipe["train"].update(global_batch_size=8, micro_batch_size=8, eval_batches=2, warmup_steps=5)
    path = tmp_path / "one_process.yaml"
    path.write_text(yaml.safe_dump(recipe))
    out, port = tmp_path / "run", free_port()
    mine = f"deepspeed_allreduce_buffer_{os.getuid()}_"

    def buffers() -> set[str]:  # this run's: its port ends each name but the rank
        return {p.name for p in SHM.glob(f"{mine}*_{port}_*")}

    assert not buffers()
    proc = run_job([str(Path(sys.executable).parent / "deepspeed"), "--num_accelerators", "2", "--master_port",
                    str(port), str(MAIN), "--config", str(path), f"train.out_dir={out}",
                    f"data.cache_dir={data_cache}", "train.steps=3", "train.eval_interval=0", "train.save_interval=0",
                    "log.progress=false", "sample.max_new_tokens=0"], tmp_path)
    log = proc.stdout + proc.stderr
    assert "shm_comm" in log and "built successfully" in log  # DeepSpeed's op that creates the buffers ran
    assert "train.micro_batch_size: 4 (the recipe's 8 does not divide train.global_batch_size=8 over 2" in log
    assert "train.eval_batches: 4 micro-batches of 4 (the same 16 validation samples)" in log
    assert "train.warmup_steps: 1 (the recipe's 5 is longer than train.steps=3" in log
    assert "requested but" not in log  # kernels left at their default fall back quietly on CPU
    ds = json.loads((out / "ds_config.json").read_text())
    assert (ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"], ds["train_batch_size"]) == \
        (4, 1, 8)
    saved = yaml.safe_load((out / "config.yaml").read_text())["train"]
    assert (saved["micro_batch_size"], saved["warmup_steps"], saved["eval_batches"]) == (4, 1, 4)
    assert json.loads((out / "summary.json").read_text())["steps"] == 3
    left = sorted(buffers())
    for name in left:  # this run's only (its port): a regression must not fill the RAM-backed tmpfs
        (SHM / name).unlink(missing_ok=True)
    assert not left, f"left in /dev/shm: {left}"
