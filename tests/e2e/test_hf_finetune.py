"""HF models through the real entry point: LoRA / QLoRA / full SFT, ZeRO-3 on two gloo ranks, adapters in every
checkpoint, exact resume, export (adapter and merged)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import (
    MAIN,
    SMOKE,
    assert_same_weights,
    copy_run_until,
    free_port,
    python_main,
    read_rows,
    run_job,
    train_losses,
)
from tests.hf_models import FAMILIES, make_hf_model, write_sft

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def hf_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("hf_models")
    for family in FAMILIES:
        make_hf_model(root, family)
    write_sft(root / "sft.jsonl")
    return root


def _sft(root: Path, out: Path, family: str = "llama", *extra: str) -> list[str]:
    return ["--config", str(SMOKE), f"hf.path={root / f'{family}-2l'}", "data.corpus=sft",
            f"data.files=[{root / 'sft.jsonl'}]", "data.seq_len=32", "data.val_fraction=0.25", "train.lr=3e-3",
            "train.steps=12", "train.warmup_steps=2", "train.eval_interval=4", "train.save_interval=4",
            "train.eval_batches=2", "train.keep_last=0", f"train.out_dir={out}", "log.progress=false",
            "sample.prompt='Question: what is 2 plus 3? Answer:'", "sample.max_new_tokens=4", *extra]


def _falls(out: Path) -> None:
    losses = list(train_losses(out).values())
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.2, losses
    norms = [r["grad_norm"] for r in read_rows(out) if "grad_norm" in r]
    assert norms and all(n > 0 for n in norms), norms  # adapters (or weights) really receive gradients


def _resume_matches(tmp_path: Path, out: Path, args: list[str], step: int = 8) -> None:
    """Resume a copy of checkpoint ``step`` and replay the remaining steps with exactly the same losses."""
    resumed = copy_run_until(out, step, tmp_path / f"{out.name}-resumed")
    run_job(python_main(*args, f"train.out_dir={resumed}", "--resume", "auto"), tmp_path)
    assert train_losses(resumed) == train_losses(out)


def _adapter_logits(base: Path, adapter: Path, x: torch.Tensor, **load: object) -> torch.Tensor:
    from peft import PeftModel

    from model.hf_causal import load_causal_lm

    model = PeftModel.from_pretrained(load_causal_lm(base, **load), str(adapter))
    with torch.no_grad():
        return model(input_ids=x).logits


@pytest.mark.parametrize("family", FAMILIES)
def test_lora_sft_trains_each_family(tmp_path: Path, hf_root: Path, family: str) -> None:
    out = tmp_path / "run"
    proc = run_job(python_main(*_sft(hf_root, out, family, "lora.r=8")), tmp_path)
    assert "LoRA r=8" in proc.stderr and "--- sample ---\nQuestion: what is 2 plus 3? Answer:" in proc.stdout
    _falls(out)
    for tag in sorted((out / "checkpoints").glob("step_*")):
        assert (tag / "adapter" / "adapter_config.json").is_file() and (tag / "adapter" / "tokenizer.json").is_file()


def test_lora_checkpoints_reload_exactly_and_resume_and_export(tmp_path: Path, hf_root: Path) -> None:
    from transformers import AutoModelForCausalLM

    from model.hf_causal import CausalLM, load_causal_lm
    from model.lora import apply_lora

    out = tmp_path / "run"
    args = _sft(hf_root, out, "llama", "lora.r=8", "lora.target_modules=[q_proj, v_proj, down_proj]",
                "lora.layers='1'", "lora.dropout=0.1")
    run_job(python_main(*args), tmp_path)
    _falls(out)
    base = hf_root / "llama-2l"
    x = torch.randint(0, 250, (2, 16))
    best = out / "checkpoints" / (out / "checkpoints" / "best").read_text().strip()
    for tag in (out / "checkpoints" / "step_00000012", best):
        # the engine's own copy of the trained weights, in the model the run built
        saved = torch.load(tag / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)["module"]
        assert saved and all("lora_" in k for k in saved)  # the frozen base is not duplicated in checkpoints
        meta = json.loads((tag / "tessera.json").read_text())
        targets = json.loads((tag / "adapter" / "adapter_config.json").read_text())["target_modules"]
        assert sorted(targets) == sorted(f"model.layers.1.{n}" for n in ("self_attn.q_proj", "self_attn.v_proj",
                                                                            "mlp.down_proj"))
        model = CausalLM(apply_lora(load_causal_lm(base), targets, r=8, alpha=16, dropout=0.1))
        model.load_state_dict(saved, strict=False)
        with torch.no_grad():
            expect = model.eval()(x)
        assert torch.equal(_adapter_logits(base, tag / "adapter", x), expect), meta["step"]
        assert meta["hf"]["model_type"] == "llama"
    _resume_matches(tmp_path, out, args)

    adapter_out, merged_out = tmp_path / "adapter", tmp_path / "merged"
    export = [sys.executable, "tools/export_hf.py", str(out)]
    run_job([*export, "--out", str(adapter_out)], tmp_path)
    run_job([*export, "--out", str(merged_out), "--merge"], tmp_path)
    peft_logits = _adapter_logits(base, adapter_out, x)
    with torch.no_grad():
        merged = AutoModelForCausalLM.from_pretrained(str(merged_out)).eval()(input_ids=x).logits
    torch.testing.assert_close(merged, peft_logits, atol=1e-5, rtol=1e-5)


def test_qlora_trains_on_a_4bit_base_and_resumes_exactly(tmp_path: Path, hf_root: Path) -> None:
    from model.hf_causal import quantization_config

    out = tmp_path / "run"
    args = _sft(hf_root, out, "qwen2", "lora.r=8", "hf.quantization=4bit")
    proc = run_job(python_main(*args), tmp_path)
    assert "4bit" in proc.stderr
    _falls(out)
    tag = out / "checkpoints" / "step_00000012"
    x = torch.randint(0, 250, (2, 16))
    quant = quantization_config("4bit", compute_dtype=torch.float32)
    a = _adapter_logits(hf_root / "qwen2-2l", tag / "adapter", x, quantization=quant)
    b = _adapter_logits(hf_root / "qwen2-2l", tag / "adapter", x, quantization=quant)
    assert torch.equal(a, b) and torch.isfinite(a).all()
    _resume_matches(tmp_path, out, args)


def test_zero3_full_finetune_on_two_ranks_exports_the_trained_model(tmp_path: Path, hf_root: Path) -> None:
    from transformers import AutoModelForCausalLM

    out = tmp_path / "run"
    launcher = str(Path(sys.executable).parent / "torchrun")
    cmd = [launcher, "--nproc_per_node", "2", "--master_port", str(free_port()), str(MAIN),
           *_sft(hf_root, out, "llama", "--ds_config", "zero3")]
    proc = run_job(cmd, tmp_path)
    assert "ZeRO stage 3" in proc.stderr and "0 trainable" not in proc.stderr
    _falls(out)
    exported = tmp_path / "hf"
    run_job([sys.executable, "tools/export_hf.py", str(out), "--out", str(exported)], tmp_path)
    trained = AutoModelForCausalLM.from_pretrained(str(exported))
    base = AutoModelForCausalLM.from_pretrained(str(hf_root / "llama-2l"))
    changed = [n for n, p in trained.named_parameters() if not torch.equal(p, base.get_parameter(n))]
    assert len(changed) == len(list(base.parameters()))  # every weight trained, none lost in consolidation


@pytest.mark.parametrize("family", ["llama", "qwen2-tied"])
def test_tp2_follows_one_process_and_exports_the_same_weights(tmp_path: Path, hf_root: Path, family: str) -> None:
    """The native TP plan on an HF model: two tensor-parallel ranks train as one process does."""
    from safetensors.torch import load_file

    if family == "qwen2-tied":
        make_hf_model(hf_root, "qwen2", tie=True)
    one, two = tmp_path / "one", tmp_path / "two"
    args = _sft(hf_root, one, family.split("-")[0], "train.steps=8", "sample.max_new_tokens=0")
    if family == "qwen2-tied":
        args = [a.replace("qwen2-2l", "qwen2-tied-2l") for a in args]
    run_job(python_main(*args), tmp_path)
    launcher = str(Path(sys.executable).parent / "torchrun")
    proc = run_job([launcher, "--nproc_per_node", "2", "--master_port", str(free_port()), str(MAIN), *args,
                    f"train.out_dir={two}", "parallel.tp=2", "sample.max_new_tokens=4"], tmp_path)
    assert "tp 2" in proc.stderr and "--- sample ---" in proc.stdout
    a, b = train_losses(one), train_losses(two)
    assert a.keys() == b.keys() and all(abs(a[k] - b[k]) < 1e-5 for k in a), (a, b)
    for run in (one, two):
        run_job([sys.executable, "tools/export_hf.py", str(run), "--out", str(run / "hf")], tmp_path)
    exported = [load_file(str(run / "hf" / "model.safetensors")) for run in (two, one)]
    assert_same_weights(*exported)


def test_qlora_under_zero3_on_two_ranks(tmp_path: Path, hf_root: Path) -> None:
    """The 4-bit weights stored in the compute dtype (hf.quant_storage=auto) so ZeRO-3 can partition them."""
    out = tmp_path / "run"
    launcher = str(Path(sys.executable).parent / "torchrun")
    proc = run_job([launcher, "--nproc_per_node", "2", "--master_port", str(free_port()), str(MAIN),
                    *_sft(hf_root, out, "llama", "lora.r=8", "hf.quantization=4bit", "--ds_config", "zero3")], tmp_path)
    assert "ZeRO stage 3" in proc.stderr and "4bit" in proc.stderr
    _falls(out)
    assert (out / "checkpoints" / "step_00000012" / "adapter" / "adapter_model.safetensors").is_file()
