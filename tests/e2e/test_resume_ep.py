"""Resuming an MoE run with another expert-parallel degree (and tp, ZeRO stage, number of ranks), and exporting an
expert-parallel checkpoint to HF.

One uninterrupted 20-step reference (checkpoints every 5 steps): the smoke recipe cut to 2 MoE layers of 4
experts, an odd vocabulary (513 rows, padded under tp=2), the aux-loss-free router bias on, under tp=2 x ep=2 on 4
ranks (ZeRO-2). From it, each resumed run must follow the reference's losses (relative 1e-5) with no sample lost or
repeated, and end on its step-20 weights:

    reference step 5  (tp2 ep2, 4 ranks, ZeRO-2) -> tp1 ep1, 2 ranks, ZeRO-1   (experts joined from 4 ranks)
    that run's step 10 (ep1, 2 ranks, ZeRO-1)    -> ep2, 2 ranks, ZeRO-2       (tools/reshard.py --ep 2 first)
    that run's step 15 (ep2, 2 ranks, ZeRO-2)    -> ep2, 4 ranks, ZeRO-1
    the ep1 run's step 15 (2 ranks, ZeRO-1)      -> one process, ZeRO-1        (a DP resize: universal copy)

An expert-parallel checkpoint (ep=2 on 2 ranks) exports to HF Qwen3-MoE, and transformers gives the logits of
the checkpoint's model.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import MAIN, SMOKE, free_port, read_rows, run_job, train_losses
from tests.e2e.test_moe_e2e import export_gives_checkpoint_logits
from tools.export_hf import main as export_main
from tools.reshard import main as reshard_main
from train.export.consolidate import consolidated_state_dict

pytestmark = pytest.mark.slow

MOE = ("model.n_layers=2", "model.vocab_size=513", "model.n_experts=4", "model.moe_top_k=2", "model.moe_ffn_dim=128",
       "model.moe_aux_loss_coef=0.01", "model.moe_z_loss_coef=0.001", "model.moe_bias_update_rate=0.001")
COMMON = ("data.seq_len=32", "train.micro_batch_size=2", "sample.max_new_tokens=0", "log.progress=false",
          "train.save_interval=5", "train.keep_last=0", "train.eval_interval=0")
REFERENCE = (4, "zero2", ("parallel.tp=2", "parallel.ep=2"))


def _launch(n: int, out: Path, cache: Path, ds_config: str, *extra: str) -> list[str]:
    head = ([str(Path(sys.executable).parent / "torchrun"), "--nproc_per_node", str(n), "--master_port",
             str(free_port())] if n > 1 else [sys.executable])
    return [*head, str(MAIN), "--config", str(SMOKE), f"train.out_dir={out}", f"data.cache_dir={cache}", *COMMON,
            *MOE, "--ds_config", ds_config, *extra]


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory, data_cache: Path) -> Path:
    n, ds, layout = REFERENCE
    out = tmp_path_factory.mktemp("ref_tp2_ep2") / "run"
    run_job(_launch(n, out, data_cache, ds, *layout), out.parent)
    return out


def _stopped_at(source: Path, step: int, out: Path) -> Path:
    """A new run directory holding checkpoint ``step`` of ``source`` and its metrics rows up to that step."""
    tag = f"step_{step:08d}"
    (out / "checkpoints").mkdir(parents=True)
    shutil.copytree(source / "checkpoints" / tag, out / "checkpoints" / tag)
    (out / "checkpoints" / "latest").write_text(tag)
    rows = [r for r in read_rows(source) if r["step"] <= step]
    (out / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return out


def _resume(out: Path, cache: Path, step: int, n: int, ds_config: str, *layout: str,
            changed: str = "parallel layout changed from") -> None:
    proc = run_job([*_launch(n, out, cache, ds_config, *layout), "--resume", "auto"], out.parent)
    assert f"at step {step} ({8 * step} samples consumed)" in proc.stderr, proc.stderr[-3000:]
    assert changed in proc.stderr


def _check_same_run(reference: Path, out: Path, first: int) -> None:
    """Steps ``first``..20 as the reference (each once, no sample lost or repeated), and its step-20 weights."""
    rows = [r for r in read_rows(out) if "loss" in r]
    assert [r["step"] for r in rows] == list(range(1, 21))
    assert [r["consumed_samples"] for r in rows] == [8 * s for s in range(1, 21)]
    want, got = train_losses(reference), train_losses(out)
    for step in range(first, 21):
        assert got[step] == pytest.approx(want[step], rel=1e-5), (step, got[step], want[step])
    mine = consolidated_state_dict(out / "checkpoints" / "step_00000020")
    theirs = consolidated_state_dict(reference / "checkpoints" / "step_00000020")
    assert set(mine) == set(theirs)
    for name, tensor in theirs.items():  # the router bias (a buffer) included
        diff = (mine[name].float() - tensor.float()).norm() / tensor.float().norm().clamp_min(1e-12)
        assert diff < 1e-4, (name, float(diff))


def test_ep_changes_on_resume(reference: Path, tmp_path: Path, data_cache: Path) -> None:
    to_ep1 = _stopped_at(reference, 5, tmp_path / "ep1" / "run")
    _resume(to_ep1, data_cache, 5, 2, "zero1", "parallel.tp=1", "parallel.ep=1")
    _check_same_run(reference, to_ep1, 6)
    free = to_ep1 / "checkpoints" / "step_00000005.universal" / "layout_free" / "zero"
    experts = torch.load(free / "layers.0.mlp.experts.gate_up_proj" / "exp_avg.pt")["param"]
    assert experts.shape == (4, 256, 128) and experts.flatten(1).norm(dim=1).gt(0).all()  # every expert, moved

    to_ep2 = _stopped_at(to_ep1, 10, tmp_path / "ep2" / "run")
    tag = to_ep2 / "checkpoints" / "step_00000010"
    assert reshard_main([str(tag), "--tp", "1", "--ep", "2"]) == 0  # prepared offline, reused by the job
    stamp = (tag.parent / "step_00000010.universal" / "tessera_source.json").stat().st_mtime_ns
    _resume(to_ep2, data_cache, 10, 2, "zero2", "parallel.ep=2")
    assert (tag.parent / "step_00000010.universal" / "tessera_source.json").stat().st_mtime_ns == stamp
    _check_same_run(reference, to_ep2, 11)

    more_ranks = _stopped_at(to_ep2, 15, tmp_path / "ep2_4ranks" / "run")  # ep=2 on 2 ranks -> on 4
    _resume(more_ranks, data_cache, 15, 4, "zero1", "parallel.ep=2")
    _check_same_run(reference, more_ranks, 16)

    one_rank = _stopped_at(to_ep1, 15, tmp_path / "one_rank" / "run")  # ep=1: DeepSpeed's universal copy (DP size)
    _resume(one_rank, data_cache, 15, 1, "zero1", changed="world size changed from 2 to 1")
    _check_same_run(reference, one_rank, 16)  # the router bias (a buffer) carried, which that load does not


def test_expert_parallel_checkpoint_exports_to_qwen3_moe(tmp_path: Path, data_cache: Path) -> None:
    """A Qwen3-MoE-shaped model (q/k norms, top-k weights not renormalised, no router bias) trained 4 steps with
    ep=2 under ZeRO-1: its export holds every expert, and transformers computes the checkpoint's logits."""
    run = tmp_path / "run"
    qwen = ("model.qk_norm=true", "model.moe_norm_topk_prob=false", "model.moe_bias_update_rate=0.0",
            "train.steps=4", "train.save_interval=0", "parallel.ep=2")
    run_job(_launch(2, run, data_cache, "zero1", *qwen), tmp_path)
    tag = run / "checkpoints" / "step_00000004"
    out = tmp_path / "hf"
    assert export_main([str(tag), "--out", str(out)]) == 0
    assert not (tag.parent / f"{tag.name}.universal").exists()  # read from the files, nothing written beside them
    config = export_gives_checkpoint_logits(tag, out)
    assert config["model_type"] == "qwen3_moe" and config["num_local_experts"] == 4
