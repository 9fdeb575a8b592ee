"""Research recipes through the real entry point: declared modules train, are saved and restored bitwise under
ZeRO-0 and ZeRO-3, hooks compose with tensor parallelism, bad terms stop the run in one line."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from model import ModelArgs
from model.model import build_model
from tests.conftest import copy_run_until, python_main, read_rows, run_job, train_losses
from tests.e2e.test_train_e2e import _common, _deepspeed
from tests.hf_models import make_hf_model, write_sft
from train.export.consolidate import consolidated_state_dict

pytestmark = pytest.mark.slow

STEPS = ["train.steps=8", "train.eval_interval=4", "train.save_interval=4", "train.keep_last=0",
         "sample.max_new_tokens=4"]
OPTIONS = "{layers: '1-2', scale: 1.0, source: variational, rank: 8, max_new_tokens: 4}"
HEAD = ["research.recipe=injection", f"research.options={OPTIONS}", "research.groups=[{params: 'head.*', lr: 0.01}]"]


def _head(tag: Path) -> dict[str, torch.Tensor]:
    return {k: v for k, v in consolidated_state_dict(tag).items() if k.startswith("head.")}


def _resume(tmp_path: Path, out: Path, launch: list[str], args: list[str], step: int = 4) -> Path:
    """A copy of checkpoint ``step`` resumed to the end with the same command."""
    resumed = copy_run_until(out, step, tmp_path / f"{out.name}-resumed")
    run_job([*launch, *[a for a in args if not a.startswith("train.out_dir=")], f"train.out_dir={resumed}",
             "--resume", "auto"], tmp_path)
    return resumed


@pytest.mark.parametrize("stage", ["zero0", "zero3"])
def test_declared_modules_train_and_resume_bitwise(tmp_path: Path, data_cache: Path, zero3_test_config: Path,
                                                   stage: str) -> None:
    out = tmp_path / stage
    args = [*_common(out, data_cache, *STEPS, *HEAD, "research.diagnostics_interval=2")]
    if stage == "zero0":
        launch = python_main("--ds_config", "cpu")
    else:
        launch = _deepspeed(2, "--ds_config", str(zero3_test_config))
    proc = run_job([*launch, *args], tmp_path)
    assert "ZeRO stage 3" in proc.stderr if stage == "zero3" else "ZeRO stage 0" in proc.stderr
    rows = [r for r in read_rows(out) if "loss" in r]
    assert all("term_lm" in r and "term_kl" in r and "weight_kl" in r for r in rows)
    assert rows[0]["weight_kl"] == 0.0 and rows[-1]["weight_kl"] == pytest.approx(0.01 * 7 / 100)

    first, last = _head(out / "checkpoints/step_00000004"), _head(out / "checkpoints/step_00000008")
    assert set(first) == {"head.down_weight", "head.down_bias", "head.up_weight", "head.up_bias"}
    assert all(not torch.equal(first[k], last[k]) for k in first)  # every declared parameter moved
    if stage == "zero0":  # in the optimizer, with the group's own rate (its schedule factor applied)
        opt = torch.load(out / "checkpoints/step_00000008/mp_rank_00_model_states.pt", weights_only=False)["optimizer"]
        assert len(opt["state"]) == 4  # the head's four tensors, nothing of the frozen base
        assert opt["param_groups"][0]["initial_lr"] == 0.01
        assert all(k in consolidated_state_dict(out / "checkpoints/step_00000008") for k in first)

    diag = [json.loads(line) for line in (out / "diagnostics.jsonl").read_text().splitlines()]
    train_rows = [r for r in diag if r["kind"] == "train"]
    assert [r["step"] for r in train_rows] == [2, 4, 6, 8]
    for r in train_rows:  # the declared module by name; the frozen base has a parameter norm and no gradient
        assert r["grad_norm"]["head"] > 0 and r["grad_norm"]["base"] is None and r["param_norm"]["base"] > 0
        assert set(r["loss"]) >= {"term_lm", "term_kl"}
    assert {r["step"] for r in diag if r["kind"] == "first_token"} == {4, 8}

    resumed = _resume(tmp_path, out, launch, args)
    assert {s: v for s, v in train_losses(resumed).items() if s > 4} == \
        {s: v for s, v in train_losses(out).items() if s > 4}
    again = _head(resumed / "checkpoints/step_00000008")
    assert all(torch.equal(again[k], last[k]) for k in last)
    if stage == "zero3":  # the export rebuilds the recipe around its base with the trained weights
        _export_reloads(tmp_path, out)
    consistency = [json.loads(line) for line in (out / "consistency.jsonl").read_text().splitlines()]
    assert [r["turn"] for r in consistency] == [0, 1] and all("base" in r and "modified" in r for r in consistency)


def _export_reloads(tmp_path: Path, out: Path) -> None:
    from train.export.research import load_research, rebuild_base

    export = tmp_path / "export"
    proc = run_job([sys.executable, "tools/export_hf.py", str(out), "--out", str(export)], tmp_path)
    assert proc.stdout.strip() == str(export)
    ext = load_research(export)
    trained = _head(out / "checkpoints/step_00000008")
    assert all(torch.equal(ext.state_dict()[k], v) for k, v in trained.items())
    base = rebuild_base(export)
    meta = json.loads((out / "checkpoints/step_00000008/tessera.json").read_text())
    built = build_model(ModelArgs(**meta["model_args"]), torch.device("cpu"), meta["config"]["train"]["seed"])
    for name, value in built.state_dict().items():  # the export's base is the run's, as the run built it
        assert torch.equal(base.state_dict()[name], value), name
    x = torch.randint(0, 512, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(ext.base.embed_tokens.weight, base.embed_tokens.weight)  # the run's frozen base
        with ext.base_only():
            assert torch.equal(ext({"input_ids": x, "labels": x})["logits"], base(x))
        assert not torch.allclose(ext({"input_ids": x, "labels": x})["logits"], base(x))


def test_injection_hooks_under_tp2_follow_one_process(tmp_path: Path, data_cache: Path) -> None:
    """The hooks fire on the TP-sharded blocks (and on sequence slices): the loss curve of one process."""
    args = ["train.steps=6", "train.eval_interval=6", "train.save_interval=6", "sample.max_new_tokens=0", *HEAD]
    ref = tmp_path / "one"
    run_job(python_main(*_common(ref, data_cache, *args), "--ds_config", "cpu"), tmp_path)
    for sp in ("false", "true"):
        out = tmp_path / f"tp2-sp{sp}"
        run_job(_deepspeed(2, *_common(out, data_cache, *args, "parallel.tp=2", f"parallel.sequence_parallel={sp}",
                                       "research.diagnostics_interval=3"), "--ds_config", "cpu"), tmp_path)
        got, want = train_losses(out), train_losses(ref)
        assert sorted(got) == list(range(1, 7))
        for step, loss in want.items():
            assert got[step] == pytest.approx(loss, abs=1e-4), (sp, step)
        diag = [json.loads(line) for line in (out / "diagnostics.jsonl").read_text().splitlines()]
        first = [r for r in diag if r["kind"] == "first_token"]
        assert [r["n"] for r in first] == [16]  # the validation rows once, not once per TP rank
        assert [r["step"] for r in diag if r["kind"] == "train"] == [3, 6]
        kl = {r["step"]: r["term_kl"] for r in read_rows(out) if "term_kl" in r}
        for r in read_rows(ref):
            if "term_kl" in r:
                assert kl[r["step"]] == pytest.approx(r["term_kl"], rel=1e-4), (sp, r["step"])


def test_injection_on_a_4bit_base_with_lora(tmp_path: Path) -> None:
    """QLoRA base + a variational head: the adapters and the head train, the base stays 4-bit and frozen."""
    root = tmp_path / "hf"
    model_dir = make_hf_model(root, "llama")
    data = write_sft(root / "sft.jsonl")
    out = tmp_path / "run"
    args = ["--config", "train/configs/smoke.yaml", f"hf.path={model_dir}", "data.corpus=sft",
            f"data.files=[{data}]", "data.seq_len=32", "data.val_fraction=0.25", "train.lr=3e-3", "train.steps=12",
            "train.warmup_steps=2", "train.eval_interval=6", "train.save_interval=6", "train.eval_batches=2",
            f"train.out_dir={out}", "log.progress=false", "lora.r=8", "hf.quantization=4bit",
            "research.recipe=injection", "research.options={layers: '0-1', source: variational, max_new_tokens: 4}",
            "sample.max_new_tokens=4"]
    proc = run_job(python_main(*args), tmp_path)
    assert "4bit" in proc.stderr
    losses = list(train_losses(out).values())
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.2, losses
    state = torch.load(out / "checkpoints/step_00000012/mp_rank_00_model_states.pt", weights_only=False)["module"]
    assert any(k.startswith("head.") for k in state) and any("lora_A" in k for k in state)
    assert (out / "checkpoints/step_00000012/adapter/adapter_config.json").is_file()
    rows = [json.loads(line) for line in (out / "consistency.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all(isinstance(r["base"], str) and isinstance(r["modified"], str) for r in rows)


def test_a_nonfinite_term_stops_the_run_naming_it(tmp_path: Path, data_cache: Path) -> None:
    out = tmp_path / "nan"
    proc = run_job(python_main(*_common(out, data_cache, "train.steps=8", "train.save_interval=2",
                                        "train.eval_interval=8", "research.recipe=tests.research_recipes:NaNRatio",
                                        "research.options={nan_after: 6}", "research.freeze_base=false")),
                   tmp_path, check=False)
    assert proc.returncode == 1, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if "tessera: error:" in line]
    assert len(errors) == 1 and "loss term 'ratio' is nan at step 4" in errors[0], errors
    assert (out / "checkpoints/step_00000002/tessera.json").is_file()  # what was written stays


def test_a_term_that_is_not_a_scalar_and_a_group_that_matches_nothing(tmp_path: Path, data_cache: Path) -> None:
    out = tmp_path / "vector"
    proc = run_job(python_main(*_common(out, data_cache, "train.steps=6",
                                        "research.recipe=tests.research_recipes:NotScalar")), tmp_path, check=False)
    assert proc.returncode == 1
    assert "loss term 'per_token' returned (256,); a loss term must be a scalar" in proc.stderr
    out = tmp_path / "zero_dim"
    proc = run_job(python_main(*_common(out, data_cache, "train.steps=6",
                                        "research.recipe=tests.research_recipes:ZeroDim")), tmp_path, check=False)
    assert proc.returncode == 1
    assert "parameter 'scale' is 0-dimensional, which DeepSpeed cannot broadcast" in proc.stderr
    out = tmp_path / "group"
    proc = run_job(python_main(*_common(out, data_cache, "train.steps=6", *HEAD[:2],
                                        "research.groups=[{params: 'heads.*', lr: 0.1}]")), tmp_path, check=False)
    assert proc.returncode == 1
    assert "research.groups[0].params='heads.*' matches no trainable parameter; the trainable ones are: " \
           "head.down_weight" in proc.stderr
    assert not (out / "metrics.jsonl").exists() and not (out / "checkpoints").exists()


def test_the_readme_example_recipe_runs(tmp_path: Path, data_cache: Path) -> None:
    """The README's Steer class and YAML: its parameter trains in its own group, its terms are logged."""
    out = tmp_path / "steer"
    run_job(python_main(*_common(out, data_cache, "train.steps=6", "train.eval_interval=6", "train.save_interval=6",
                                 "model.n_layers=8", "sample.max_new_tokens=0",
                                 "research.recipe=tests.research_recipes:Steer", "research.options={scale: 0.5}",
                                 "research.terms={norm: {weight: 0.05, schedule: cosine, start: 1, end: 5}}",
                                 "research.groups=[{params: shift, lr: 0.01, weight_decay: 0.0}]")), tmp_path)
    rows = [r for r in read_rows(out) if "term_norm" in r]
    assert [r["weight_norm"] for r in rows][:2] == [0.0, 0.0] and rows[-1]["weight_norm"] == pytest.approx(0.05)
    shift = consolidated_state_dict(out / "checkpoints/step_00000006")["shift"]
    assert shift.shape == (1, 128) and shift.abs().sum() > 0


def _complex_views(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The complex parameters of a ComplexLM state dict (real pairs in a trailing dimension of 2), by name."""
    from model.complex import ComplexArgs, ComplexLM

    names = [n.removeprefix("base.") for n in state if n.startswith("base.")]
    model = ComplexLM(ComplexArgs(vocab_size=512, dim=32, n_layers=2, n_heads=4, max_seq_len=64))
    complex_names = {f"base.{k}" for k in dict(model.named_parameters()) if getattr(
        model.get_parameter(k), "complex_view", False)}
    assert complex_names and complex_names <= {f"base.{n}" for n in names}
    return {k: torch.view_as_complex(state[k].float().contiguous()) for k in sorted(complex_names)}


def test_complex_recipe_keeps_imaginary_parts_through_zero3_resume_and_export(
        tmp_path: Path, data_cache: Path, zero3_test_config: Path) -> None:
    from train.export.research import load_research

    out = tmp_path / "complex"
    args = _common(out, data_cache, *STEPS, "research.recipe=complex", "research.options={dim: 32, n_layers: 2}",
                   "research.terms={coherence: {weight: 0.01}}", "research.diagnostics_interval=4")
    launch = _deepspeed(2, "--ds_config", str(zero3_test_config))
    run_job([*launch, *args], tmp_path)
    losses = list(train_losses(out).values())
    # from ln(512) = 6.24, 8 steps (5 of warm-up) fall by 0.08-0.1 over seeds; batch noise at the start is ~0.01
    assert sum(losses[-2:]) / 2 < sum(losses[:2]) / 2 - 0.03, losses
    rows = [r for r in read_rows(out) if "term_energy" in r]
    assert rows and all(r["term_energy"] >= 0 and 0 <= r["term_coherence"] <= 1 for r in rows)

    first = _complex_views(consolidated_state_dict(out / "checkpoints/step_00000004"))
    last = _complex_views(consolidated_state_dict(out / "checkpoints/step_00000008"))
    for name, z in last.items():  # trained, with imaginary parts that are neither zero nor a copy of the start
        assert z.dtype == torch.complex64 and z.imag.abs().sum() > 0, name
        assert not torch.equal(z.imag, first[name].imag), name
    diag = [json.loads(line) for line in (out / "diagnostics.jsonl").read_text().splitlines()]
    assert {"base.layers", "base.head", "base.amp_embed"} <= set(diag[0]["grad_norm"])

    resumed = _resume(tmp_path, out, launch, args)
    assert {s: v for s, v in train_losses(resumed).items() if s > 4} == \
        {s: v for s, v in train_losses(out).items() if s > 4}
    again = _complex_views(consolidated_state_dict(resumed / "checkpoints/step_00000008"))
    assert all(torch.equal(again[k], last[k]) for k in last)

    export = tmp_path / "export"
    run_job([sys.executable, "tools/export_hf.py", str(out), "--out", str(export)], tmp_path)
    ext = load_research(export, vocab_size=512)
    from model.complex import complex_parameters

    loaded = {f"base.{k}": v for k, v in complex_parameters(ext.base).items()}
    assert loaded.keys() == last.keys() and all(torch.equal(loaded[k], last[k]) for k in last)
    x = torch.randint(0, 512, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        z = ext.base.hidden(x)
    assert z.dtype == torch.complex64 and z.imag.abs().mean() > 1e-3
