"""Stages files: checks before anything runs, stage planning, placeholders for exports that do not exist yet,
skipping finished stages, and the local runner's dry run and refusals."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO, SMOKE
from tools.run_stages import main as run_stages_main
from train.stages import StagesError, export_stage, load_stages, plan_stages

EXAMPLE = REPO / "train" / "configs" / "stages_cpu.yaml"


def _write(tmp_path: Path, stages: list[dict], **top: object) -> Path:
    path = tmp_path / "stages.yaml"
    raw = {"out_dir": str(tmp_path / "runs"), **top, "stages": stages}
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def _stage(name: str, *overrides: str, **fields: object) -> dict:
    return {"name": name, "config": str(SMOKE), "overrides": list(overrides), **fields}


SFT = ("data.corpus=sft", f"data.files=[{REPO / 'train/configs/data/sft_arith.jsonl'}]", "data.seq_len=64",
       "data.val_fraction=0.25", "lora.r=8")


@pytest.fixture
def in_repo(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(REPO)  # the example's paths are relative to the repository root


def test_the_shipped_example_plans_four_chained_stages(in_repo: None, tmp_path: Path) -> None:
    raw = yaml.safe_load(EXAMPLE.read_text())
    raw["out_dir"] = str(tmp_path / "runs")
    path = tmp_path / "example.yaml"
    path.write_text(yaml.safe_dump(raw))
    plans, _ = plan_stages(load_stages(path))
    assert [p.stage.name for p in plans] == ["pretrain", "sft", "dpo", "reward"]
    assert [p.stage.source for p in plans] == [None, "pretrain", "sft", "dpo"]
    assert [p.status for p in plans] == ["new", "new", "new", "new"]
    runs = tmp_path / "runs"
    assert plans[0].start is None and not any(o.startswith("hf.path=") for o in plans[0].overrides)
    assert plans[1].overrides[-2:] == (f"hf.path={runs / 'pretrain' / 'export'}",
                                       f"train.out_dir={runs / 'sft'}")
    assert plans[2].start == runs / "sft" / "export" and plans[2].recipe["train"]["objective"] == "dpo"
    assert plans[2].recipe["hf"]["path"] == str(runs / "sft" / "export")  # the real path, not a placeholder
    assert plans[1].main_args()[:4] == ["--config", str(SMOKE), "--resume", "auto"]


def test_a_tessera_stage_gets_init_from_and_the_exports_tokenizer(tmp_path: Path) -> None:
    path = _write(tmp_path, [_stage("pre"), _stage("cpt", "train.lr=1e-3", start_key="model.init_from")])
    plans, _ = plan_stages(load_stages(path))
    export = tmp_path / "runs" / "pre" / "export"
    assert f"model.init_from={export}" in plans[1].overrides
    assert f"data.tokenizer={export}" in plans[1].overrides
    assert plans[1].recipe["model"]["init_from"] == str(export)
    # a tokenizer the stage names itself is kept
    path = _write(tmp_path, [_stage("pre"), _stage("cpt", "data.tokenizer=tok", start_key="model.init_from")])
    plans, _ = plan_stages(load_stages(path))
    assert not any(o == f"data.tokenizer={export}" for o in plans[1].overrides)


def test_placeholders_carry_the_previous_stages_model(tmp_path: Path) -> None:
    """The export does not exist yet, but its shape does: test-1m allows 256 positions."""
    path = _write(tmp_path, [_stage("pre"), _stage("cpt", "data.seq_len=512", start_key="model.init_from")])
    export = tmp_path / "runs" / "pre" / "export"
    longer = r"stage 'cpt' .*data.seq_len=512 is longer than the model allows"
    with pytest.raises(StagesError, match=longer) as e:
        plan_stages(load_stages(path))
    assert "tessera-stages-" not in str(e.value)  # messages name real paths
    path = _write(tmp_path, [_stage("pre"), _stage("cpt", "model.n_layers=2", start_key="model.init_from")])
    with pytest.raises(StagesError, match=rf"model.n_layers cannot be changed for model.init_from={export}"):
        plan_stages(load_stages(path))


def test_an_hf_model_stage_chain_checks_the_models_config(tmp_path: Path) -> None:
    from tests.hf_models import make_hf_model

    base = make_hf_model(tmp_path / "models", "gpt2")
    ok = _write(tmp_path, [_stage("sft", f"hf.path={base}", *SFT[:-1]), _stage("dpo", *SFT)])
    plans, _ = plan_stages(load_stages(ok))
    assert plans[1].recipe["hf"]["path"] == str(tmp_path / "runs" / "sft" / "export")
    # GPT-2 weights cannot be imported as a Tessera model: refused before anything runs
    bad = _write(tmp_path, [_stage("sft", f"hf.path={base}", *SFT[:-1]),
                            _stage("cpt", start_key="model.init_from")])
    with pytest.raises(StagesError, match=r"stage 'cpt' .*model_type='gpt2' is not supported"):
        plan_stages(load_stages(bad))
    # LoRA targets are resolved on the config the earlier stage will export
    bad = _write(tmp_path, [_stage("sft", f"hf.path={base}", *SFT[:-1]),
                            _stage("dpo", *SFT, "lora.target_modules=[q_proj]")])
    with pytest.raises(StagesError, match=rf"stage 'dpo' .*hf.path={tmp_path / 'runs/sft/export'}: "
                                            rf"lora.target_modules=\['q_proj'\] match no linear layer"):
        plan_stages(load_stages(bad))


@pytest.mark.parametrize("stages, top, message", [
    ([], {}, r"expected a mapping with a non-empty 'stages:' list"),
    ([_stage("a")], {"stage": 1},
     r"unknown field 'stage'; a stages file has name, out_dir, overrides, stages"),
    ([_stage("a"), _stage("a")], {}, r"stages\[1\]: name='a' is used by an earlier stage"),
    ([_stage("a/b")], {}, r"stages\[0\]: name='a/b': give a name of letters"),
    ([_stage("a", **{"from": "previous"})], {}, r"stage 'a': from=previous: the first stage has no previous"),
    ([_stage("a"), _stage("b", **{"from": "c"}), _stage("c")], {},
     r"stage 'b': from='c': a later stage; use previous, none, or one of a \(stages run in file order\)"),
    ([_stage("a"), _stage("b", **{"from": "zz"})], {}, r"stage 'b': from='zz': not a stage"),
    ([{"name": "a", "config": "nowhere.yaml"}], {}, r"stage 'a': config='nowhere.yaml': no such recipe file"),
    ([_stage("a", "train.lr")], {}, r"stage 'a': override 'train.lr' is not of the form section.key=value"),
    ([_stage("a", "train.out_dir=x")], {}, r"override 'train.out_dir=x': the chain sets train.out_dir"),
    ([_stage("a"), _stage("b", "hf.path=x")], {},
     r"stage 'b': override 'hf.path=x': the chain sets hf.path to"),
    ([_stage("a", epochs=2)], {}, r"stage 'a': unknown field 'epochs'"),
    ([_stage("a", checkpoint="last")], {}, r"stage 'a': checkpoint='last': use latest .* or best"),
    ([_stage("a"), _stage("b", start_key="model.path")], {},
     r"stage 'b': start_key='model.path': use hf.path"),
    ([_stage("a", start_key="hf.path")], {},
     r"stage 'a': start_key is set but the stage starts from no earlier"),
    ([_stage("a", nproc=0)], {}, r"stage 'a': nproc=0: give a whole number of processes"),
    ([_stage("a")], {"overrides": "train.lr=1"}, r"overrides='train.lr=1': give a list"),
])
def test_bad_stages_files_are_one_error(tmp_path: Path, stages: list[dict], top: dict, message: str) -> None:
    with pytest.raises(StagesError, match=message) as e:
        load_stages(_write(tmp_path, stages, **top))
    assert "\n" not in str(e.value) and str(e.value).startswith(f"stages {tmp_path / 'stages.yaml'}: ")


@pytest.mark.parametrize("stage, message", [
    (_stage("b", "train.lrr=1e-3"),
     r"stage 'b' \(.*smoke.yaml\): Unknown config key 'train.lrr'. Did you mean 'train.lr'"),
    (_stage("b", "train.global_batch_size=7", nproc=2), r"stage 'b' .*global_batch_size"),
    (_stage("b", "model.attn_sinks=true", **{"from": "none"}),  # its successor asks for an HF export
     r"stage 'c' .*starts from stage 'b' with hf.path.*cannot be exported as a Hugging Face model.*attn_sinks"),
    (_stage("b", ds_config="zero9"), r"stage 'b' .*--ds_config zero9: no such file"),
])
def test_every_stage_recipe_is_checked_before_anything_runs(tmp_path: Path, stage: dict,
                                                              message: str) -> None:
    later = [_stage("c", **{"from": "b"})] if "from" in stage else []
    path = _write(tmp_path, [_stage("a"), {**stage, "overrides": [*stage["overrides"]],
                                           **({} if "from" in stage else {"start_key": "model.init_from"})},
                             *later])
    with pytest.raises(StagesError, match=message):
        plan_stages(load_stages(path))
    assert not (tmp_path / "runs").exists()


def _finish(run: Path, *, export: bool = True) -> None:
    run.mkdir(parents=True, exist_ok=True)
    (run / "metrics.jsonl").write_text("{}\n")
    (run / "summary.json").write_text("{}")
    if export:
        (run / "export").mkdir()
        (run / "export" / "config.json").write_text("{}")


def test_status_of_each_stage_and_stale_later_runs(tmp_path: Path) -> None:
    path = _write(tmp_path, [_stage("a"), _stage("b", start_key="model.init_from"),
                             _stage("c", start_key="model.init_from"),
                             _stage("d", **{"from": "a"}, start_key="model.init_from")])
    runs = tmp_path / "runs"
    _finish(runs / "a")
    _finish(runs / "b", export=False)
    (runs / "c").mkdir()
    (runs / "c" / "metrics.jsonl").write_text("{}\n")
    plans, _ = plan_stages(load_stages(path))
    assert [p.status for p in plans] == ["done", "trained", "partial", "new"]
    # 'a' has to train again (its summary is gone) while 'b' and 'c' hold runs started from its old weights
    (runs / "a" / "summary.json").unlink()
    stale = (rf"stage 'b' already holds a run \({runs / 'b'}\) started from stage 'a', which has not "
             rf"finished and trains again; delete {runs / 'b'}")
    with pytest.raises(StagesError, match=stale):
        plan_stages(load_stages(path))


def test_export_of_the_best_checkpoint_needs_one(tmp_path: Path) -> None:
    path = _write(tmp_path, [_stage("a", checkpoint="best")])
    plans, _ = plan_stages(load_stages(path))
    (plans[0].run_dir / "checkpoints").mkdir(parents=True)
    with pytest.raises(StagesError, match=r"stage 'a': checkpoint=best but .* has no best checkpoint"):
        export_stage(plans[0])
    path = _write(tmp_path, [_stage("a")])
    with pytest.raises(StagesError, match=r"stage 'a': no complete checkpoint in .*checkpoints to export"):
        export_stage(plan_stages(load_stages(path))[0][0])


def test_runner_dry_run_prints_each_launch(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = _write(tmp_path, [_stage("a"), _stage("b", "train.micro_batch_size=2", nproc=2,
                                                 start_key="model.init_from")])
    _finish(tmp_path / "runs" / "a")
    assert run_stages_main([str(path), "--dry-run"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("# stage 1/2 'a': done;") and out[2].startswith("# stage 2/2 'b': new;")
    assert "-m torch.distributed.run --nproc_per_node 2 --master_port" in out[3]
    export = tmp_path / "runs/a/export"
    assert out[3].endswith(f"model.init_from={export} data.tokenizer={export} "
                           f"train.out_dir={tmp_path / 'runs/b'}")
    assert not (tmp_path / "runs" / "b").exists()


def test_runner_refuses_in_one_line_with_exit_code_2(tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    path = _write(tmp_path, [_stage("a"), _stage("b", "train.lrr=1", start_key="model.init_from")])
    assert run_stages_main([str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("tessera: error: stages ")
    assert "Unknown config key" in err[0]
    path = _write(tmp_path, [_stage("a"), _stage("b", start_key="model.init_from")])
    assert run_stages_main([str(path), "--only", "b"]) == 2
    err = capsys.readouterr().err
    assert "stage 'b' starts from stage 'a', which has not finished (new); run it first" in err
    assert run_stages_main([str(path), "--only", "zz"]) == 2
    assert "no stage 'zz'; its stages are a, b" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()
