"""Resuming on another parallel layout (tp, pp, DP size, ZeRO stage) through the layout-free copy.

Five uninterrupted 20-step reference runs (checkpoints at 10 and 20) of the smoke recipe cut to 2 layers and
32 tokens, with an odd vocabulary (513 rows, padded under tp=2): (tp2, pp2, dp1, ZeRO-1), (tp1, dp4, ZeRO-3),
(tp2, dp1, ZeRO-2) and (tp2, dp1, fp32 ZeRO-0, whose Adam state is the torch optimizer's); and the tiny HF
Llama (hf.path) under (tp2, ZeRO-1). Changes of ep are in test_resume_ep.py. Each step-10 checkpoint is copied into a fresh run directory and resumed on another
layout; steps 11-20 must follow the reference (relative 1e-5) and the step-20 weights match it.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import MAIN, SMOKE, free_port, read_rows, run_job, train_losses
from train.export.consolidate import consolidated_state_dict

pytestmark = pytest.mark.slow

TAG = "step_00000010"
COMMON = ["data.seq_len=32", "train.micro_batch_size=2", "sample.max_new_tokens=0", "log.progress=false"]
SMALL = ["model.n_layers=2", "model.vocab_size=513"]  # the native model: 2 layers, an odd vocabulary


def _launch(n: int, out: Path, cache: Path, ds_config: str, *extra: str) -> list[str]:
    torchrun = str(Path(sys.executable).parent / "torchrun")
    model = [] if any(a.startswith("hf.path=") for a in extra) else SMALL
    return [torchrun, "--nproc_per_node", str(n), "--master_port", str(free_port()), str(MAIN), "--config",
            str(SMOKE), f"train.out_dir={out}", f"data.cache_dir={cache}", *COMMON, *model, "--ds_config",
            ds_config, *extra]


REFERENCES = {  # name -> ranks, ds config (zero3: the test config), layout overrides
    "tp2_pp2_zero1": (4, "zero1", ("parallel.tp=2", "parallel.pp=2")),
    "dp4_zero3": (4, "zero3", ()),
    "tp2_zero2": (2, "zero2", ("parallel.tp=2",)),
    "tp2_zero0": (2, "cpu", ("parallel.tp=2",)),  # fp32 ZeRO 0
    "hf_tp2_zero1": (2, "zero1", ("parallel.tp=2",)),  # the tiny HF Llama (tools/tiny_hf_models.py)
}


@pytest.fixture(scope="module")
def references(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, data_cache: Path,
               zero3_test_config: Path):
    """Per reference layout, made on first use: the run directory of its uninterrupted 20-step run."""
    made: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in made:
            n, ds, extra = REFERENCES[name]
            if name.startswith("hf_"):
                extra = (*extra, f"hf.path={request.getfixturevalue('tiny_bases') / 'llama'}")
            out = tmp_path_factory.mktemp(f"ref_{name}") / "run"
            run_job(_launch(n, out, data_cache, str(zero3_test_config) if ds == "zero3" else ds, *extra), out.parent)
            made[name] = out
        return made[name]

    return get


def _resume(reference: Path, tmp: Path, cache: Path, n: int, ds_config: str, *layout: str) -> Path:
    """A copy of ``reference`` stopped right after its step-10 checkpoint, resumed with ``layout`` on n ranks."""
    out = tmp / "run"
    (out / "checkpoints").mkdir(parents=True)
    shutil.copytree(reference / "checkpoints" / TAG, out / "checkpoints" / TAG)
    (out / "checkpoints" / "latest").write_text(TAG)
    rows = [r for r in read_rows(reference) if r["step"] <= 10]
    (out / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    proc = run_job([*_launch(n, out, cache, ds_config, *layout), "--resume", "auto"], tmp)
    assert f"resumed from {out / 'checkpoints' / TAG} at step 10 (80 samples consumed)" in proc.stderr
    assert "parallel layout changed from" in proc.stderr
    return out


def _check_same_run(reference: Path, out: Path) -> None:
    """Steps 11-20 as the reference (each once, no sample lost or repeated), and its step-20 weights."""
    rows = [r for r in read_rows(out) if "loss" in r]
    assert [r["step"] for r in rows] == list(range(1, 21))
    assert [r["consumed_samples"] for r in rows] == [8 * s for s in range(1, 21)]
    want, got = train_losses(reference), train_losses(out)
    for step in range(11, 21):
        assert got[step] == pytest.approx(want[step], rel=1e-5), (step, got[step], want[step])
    mine = consolidated_state_dict(out / "checkpoints" / "step_00000020")
    theirs = consolidated_state_dict(reference / "checkpoints" / "step_00000020")
    assert set(mine) == set(theirs)
    for name, tensor in theirs.items():
        diff = (mine[name].float() - tensor.float()).norm() / tensor.float().norm().clamp_min(1e-12)
        assert diff < 1e-4, (name, float(diff))


@pytest.mark.parametrize(("n", "ds_config", "layout"), [
    (2, "zero1", ("parallel.tp=1", "parallel.pp=1")),
    (4, "zero1", ("parallel.tp=2", "parallel.pp=1", "parallel.sequence_parallel=true")),
    (4, "zero1", ("parallel.tp=1", "parallel.pp=2")),
], ids=["to_dp2", "to_tp2_dp2_sp", "to_pp2_dp2"])
def test_from_tp2_pp2(references, tmp_path: Path, data_cache: Path, n: int, ds_config: str,
                      layout: tuple[str, ...]) -> None:
    reference = references("tp2_pp2_zero1")
    out = _resume(reference, tmp_path, data_cache, n, ds_config, *layout)
    _check_same_run(reference, out)
    assert (reference / "checkpoints" / f"{TAG}").is_dir()
    free = out / "checkpoints" / f"{TAG}.universal" / "layout_free"
    assert (free / "zero" / "embed_tokens.weight" / "exp_avg.pt").is_file()  # plain names, full tensors
    assert torch.load(free / "zero" / "embed_tokens.weight" / "fp32.pt")["param"].shape[0] == 513  # unpadded


def test_zero3_dp4_to_tp2_zero1(references, tmp_path: Path, data_cache: Path) -> None:
    reference = references("dp4_zero3")
    _check_same_run(reference, _resume(reference, tmp_path, data_cache, 4, "zero1", "parallel.tp=2"))


def test_tp2_zero2_to_zero3(references, tmp_path: Path, data_cache: Path, zero3_test_config: Path) -> None:
    reference = references("tp2_zero2")
    _check_same_run(reference, _resume(reference, tmp_path, data_cache, 2, str(zero3_test_config), "parallel.tp=1"))


def test_tp2_zero2_to_zero0(references, tmp_path: Path, data_cache: Path) -> None:
    """fp32 ZeRO 0: weights and Adam state placed into the module and the torch optimizer directly."""
    reference = references("tp2_zero2")
    _check_same_run(reference, _resume(reference, tmp_path, data_cache, 2, "cpu", "parallel.tp=1"))


def test_hf_tp2_zero1_to_zero3(references, tmp_path: Path, data_cache: Path, zero3_test_config: Path,
                               tiny_bases: Path) -> None:
    """An hf.path full fine-tune: tensor-parallel under ZeRO-1, resumed without TP under ZeRO-3."""
    reference = references("hf_tp2_zero1")
    out = _resume(reference, tmp_path, data_cache, 2, str(zero3_test_config), "parallel.tp=1",
                  f"hf.path={tiny_bases / 'llama'}")
    _check_same_run(reference, out)


def test_tp2_zero0_to_pp2_zero1(references, tmp_path: Path, data_cache: Path) -> None:
    """fp32 ZeRO 0 (weights and torch Adam state per TP rank) -> another tp and pp under ZeRO-1, Adam state kept."""
    reference = references("tp2_zero0")
    out = _resume(reference, tmp_path, data_cache, 4, "zero1", "parallel.tp=1", "parallel.pp=2")
    _check_same_run(reference, out)
    free = out / "checkpoints" / f"{TAG}.universal" / "layout_free" / "zero"
    assert torch.load(free / "layers.0.mlp.up_proj.weight" / "exp_avg_sq.pt")["param"].abs().sum() > 0
