"""A model with attention sinks goes on past pretraining: the shipped sinks chain (train/configs/
stages_cpu_sinks.yaml) runs pretrain -> SFT -> DPO -> reward model through tools/run_stages.py, every stage
handing on a native export that the next one starts from with model.init_from."""

from __future__ import annotations

import itertools
import json
import sys
from pathlib import Path

import pytest
import torch
import yaml

from tests.conftest import REPO, run_job

pytestmark = pytest.mark.slow

EXAMPLE = REPO / "train" / "configs" / "stages_cpu_sinks.yaml"
RUNNER = REPO / "tools" / "run_stages.py"
STAGES = ("pretrain", "sft", "dpo", "reward")


def test_sinks_chain_runs_through_dpo_and_the_reward_model(tmp_path: Path, data_cache: Path) -> None:
    from safetensors.torch import load_file

    from model import Transformer
    from train.export.native import NATIVE_FILE, load_start

    raw = yaml.safe_load(EXAMPLE.read_text())
    raw["out_dir"] = str(tmp_path / "runs")
    raw["overrides"] += [f"data.cache_dir={data_cache}", "log.progress=false"]
    raw["stages"][0]["overrides"] += ["train.steps=10", "train.eval_interval=10", "train.save_interval=10"]
    path = tmp_path / "stages.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    proc = run_job([sys.executable, str(RUNNER), str(path)], tmp_path, timeout=900)
    out = proc.stdout + proc.stderr
    assert "stages 'stages_cpu_sinks' finished" in out, out[-3000:]

    runs = tmp_path / "runs"
    exports = {name: runs / name / "export" for name in STAGES}
    for name, export in exports.items():  # native exports: transformers has no class for sinks
        assert (export / NATIVE_FILE).is_file() and not (export / "config.json").exists(), name
        assert (export / "tokenizer.json").is_file(), name
        info = json.loads((export / NATIVE_FILE).read_text())
        assert info["model_args"]["attn_sinks"] is True
    for before, after in itertools.pairwise(STAGES):
        assert f"weights loaded from {exports[before]}" in out, f"{after} did not start from {before}"
    # each stage trained on: the sinks moved between stages
    sinks = {name: load_file(str(exports[name] / "model.safetensors")) for name in ("pretrain", "sft", "dpo")}
    key = "layers.0.self_attn.sinks"
    assert not torch.equal(sinks["pretrain"][key], sinks["sft"][key])
    assert not torch.equal(sinks["sft"][key], sinks["dpo"][key])
    assert "val_accuracy" in (runs / "dpo" / "metrics.jsonl").read_text()  # DPO evaluated its pairs
    reward = load_file(str(exports["reward"] / "model.safetensors"))
    assert reward["model.score.weight"].shape[0] == 1  # the verifier's scalar head
    args, state = load_start(exports["reward"])  # the reward model's decoder can start yet another run
    Transformer(args).load_state_dict(state)


def test_qwen3_import_trains_and_exports_through_the_tools(tmp_path: Path, data_cache: Path) -> None:
    """train/main.py from an awkward Qwen3 (head_dim != dim / heads, q/k norms, a window on layer 1 shorter than
    the sequence, 1 KV head, odd vocabulary) for 5 steps, tools/export_hf.py, then transformers loads the export
    with no custom code and its logits equal the native model's."""
    from transformers import AutoModelForCausalLM

    from model import Transformer
    from tests.conftest import SMOKE, python_main
    from tests.family_models import family_config, perturb, sample_ids
    from train.export.native import load_start

    config = family_config("qwen3")
    config.vocab_size = 521  # above the smoke recipe's 512-token BPE
    torch.manual_seed(0)
    hf = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    perturb(hf, 0)
    hf.save_pretrained(tmp_path / "qwen3")
    out = tmp_path / "run"
    run_job(python_main("--config", str(SMOKE), f"model.init_from={tmp_path / 'qwen3'}", "model.max_seq_len=64",
                        f"train.out_dir={out}", f"data.cache_dir={data_cache}", "log.progress=false",
                        "train.steps=5", "train.warmup_steps=1", "train.eval_interval=0", "train.save_interval=0",
                        "sample.max_new_tokens=0", "data.seq_len=32"), tmp_path)
    run_job([sys.executable, str(REPO / "tools" / "export_hf.py"), str(out), "--out", str(tmp_path / "export")],
            tmp_path)
    written = json.loads((tmp_path / "export" / "config.json").read_text())
    assert written["architectures"] == ["Qwen3ForCausalLM"] and written["layer_types"][1] == "sliding_attention"
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "export", dtype=torch.float32).eval()
    args, state = load_start(out)
    assert args.qk_norm and args.head_dim == 16 and args.sliding_layers == [1]
    native = Transformer(args).eval()
    native.load_state_dict(state)
    ids = sample_ids(521, seq_len=32)
    with torch.no_grad():
        assert (native(ids) - exported(ids).logits).abs().max().item() < 1e-5
        assert (native(ids) - hf(ids).logits).abs().max().item() > 1e-3  # it trained
