"""The shipped CPU chain of stages (pretrain -> SFT -> DPO -> reward model) through tools/run_stages.py:
each stage starts from the previous stage's exported weights, finished stages are skipped, a failing stage
stops the chain."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import REPO, SMOKE, read_rows, run_job

pytestmark = pytest.mark.slow

EXAMPLE = REPO / "train" / "configs" / "stages_cpu.yaml"
RUNNER = REPO / "tools" / "run_stages.py"


def _stages_file(tmp: Path, data_cache: Path, extra: list[dict[str, Any]] = ()) -> Path:
    """The shipped example with its runs and data cache under the test's directories, 20 pretraining steps."""
    raw = yaml.safe_load(EXAMPLE.read_text())
    raw["out_dir"] = str(tmp / "runs")
    raw["overrides"] += [f"data.cache_dir={data_cache}", "log.progress=false"]
    raw["stages"][0]["overrides"] += ["train.steps=20", "train.eval_interval=10", "train.save_interval=10"]
    raw["stages"] += list(extra)
    path = tmp / f"stages{len(raw['stages'])}.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def _weights(export: Path) -> dict[str, Any]:
    from safetensors.torch import load_file

    return load_file(str(export / "model.safetensors"))


@pytest.fixture(scope="module")
def chain(tmp_path_factory: pytest.TempPathFactory, data_cache: Path) -> dict[str, Any]:
    tmp = tmp_path_factory.mktemp("stages")
    path = _stages_file(tmp, data_cache)
    proc = run_job([sys.executable, str(RUNNER), str(path)], tmp, timeout=900)
    return {"tmp": tmp, "path": path, "runs": tmp / "runs", "proc": proc}


def test_each_stage_starts_from_the_previous_stages_export(chain: dict[str, Any]) -> None:
    import torch

    runs, out = chain["runs"], chain["proc"].stdout + chain["proc"].stderr
    exports = {name: runs / name / "export" for name in ("pretrain", "sft", "dpo")}
    assert f"HF model {exports['pretrain']} (llama" in out and f"HF model {exports['sft']} (llama" in out
    assert f"HF model {exports['dpo']} (llama" in out  # the reward model starts from the DPO policy
    assert "stages 'stages_cpu' finished" in out
    weights = {name: _weights(path) for name, path in exports.items()}
    for before, after in (("pretrain", "sft"), ("sft", "dpo")):
        a, b = weights[before], weights[after]
        assert a.keys() == b.keys()
        # LoRA adapts the blocks' linear layers only: the rest is the previous stage's export, bit for bit ...
        for key in ("model.embed_tokens.weight", "model.layers.0.input_layernorm.weight"):
            assert torch.equal(a[key], b[key]), (before, after, key)
        # ... and the adapters trained in this stage are merged into the exported weights
        q = "model.layers.0.self_attn.q_proj.weight"
        assert not torch.equal(a[q], b[q]), (before, after)
    for name in ("pretrain", "sft", "dpo", "reward"):
        assert json.loads((runs / name / "summary.json").read_text())["steps"] == 20
    dpo = [r for r in read_rows(runs / "dpo") if "accuracy" in r]
    # at step 1 the policy is its reference, the SFT model
    assert dpo[0]["step"] == 1 and dpo[0]["accuracy"] == 0.0
    reward = _weights(runs / "reward" / "export")  # a sequence classifier on the DPO decoder
    assert reward["score.weight"].shape[0] == 1 and "lm_head.weight" not in reward
    assert [r for r in read_rows(runs / "reward") if "val_accuracy" in r][-1]["val_accuracy"] > 0.5


def test_running_again_skips_the_finished_stages(chain: dict[str, Any]) -> None:
    runs = chain["runs"]
    stamps = {p: p.stat().st_mtime_ns for p in runs.glob("*/export/model.safetensors")}
    proc = run_job([sys.executable, str(RUNNER), str(chain["path"])], chain["tmp"], timeout=300)
    skipped = [line for line in proc.stdout.splitlines() if "finished, skipped" in line]
    assert [line.split("'")[1] for line in skipped] == ["pretrain", "sft", "dpo", "reward"], proc.stdout
    assert "train/main.py" not in proc.stdout
    assert {p: p.stat().st_mtime_ns for p in runs.glob("*/export/model.safetensors")} == stamps
    assert len(stamps) == 4


def test_a_failing_stage_stops_the_chain_and_a_rerun_continues_there(chain: dict[str, Any],
                                                                     data_cache: Path) -> None:
    tmp, runs = chain["tmp"], chain["runs"]
    bad = tmp / "bad.jsonl"
    bad.write_text('{"prompt": "Question: what is 1 plus 1? Answer:"}\n')  # no response
    extra = [
        {"name": "cpt", "config": str(SMOKE), "from": "pretrain", "start_key": "model.init_from",
         "overrides": ["train.steps=4", "train.warmup_steps=1", "train.eval_interval=0",
                       "train.save_interval=0", "sample.max_new_tokens=0"]},
        {"name": "broken", "config": str(SMOKE), "from": "sft",
         "overrides": ["data.corpus=sft", f"data.files=[{bad}]", "data.seq_len=64", "lora.r=8"]},
        {"name": "after", "config": str(SMOKE), "overrides": ["data.corpus=sft", f"data.files=[{bad}]"]},
    ]
    path = _stages_file(tmp, data_cache, extra)
    proc = run_job([sys.executable, str(RUNNER), str(path)], tmp, timeout=600, check=False)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    # a Tessera-model stage from an earlier (not the previous) stage: the pretrain export's weights and
    # tokenizer
    assert f"weights loaded from {runs / 'pretrain' / 'export'}" in proc.stderr
    assert (runs / "cpt" / "export" / "model.safetensors").is_file()
    assert proc.stderr.strip().splitlines()[-1] == (
        f"tessera: error: stage 'broken' failed with exit code 2 (its output is above; run "
        f"{runs / 'broken'}); later stages did not run. Run the same command again to continue from this "
        f"stage.")
    assert not (runs / "after").exists()
    again = run_job([sys.executable, str(RUNNER), str(path)], tmp, timeout=600, check=False)
    assert again.returncode == 2
    started = [line for line in again.stdout.splitlines() if "train/main.py" in line]
    assert len(started) == 1 and started[0].startswith("run_stages: stage 6/7 'broken' from "), again.stdout
