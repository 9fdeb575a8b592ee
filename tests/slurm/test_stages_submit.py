"""A chain of stages on SLURM at submit time: each stage checked as a job, the afterok chain, the dry run."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from slurm.profile import SlurmConfigError, load_profile
from slurm.stages import job_parameters, plan_jobs, sbatch_script, stages_parser
from slurm.submit import main as submit_main
from tests.conftest import SMOKE
from train.stages import StagesError, load_stages


def _stages_file(tmp_path: Path, *stages: dict) -> Path:
    path = tmp_path / "stages.yaml"
    raw = {"name": "chain", "out_dir": str(tmp_path / "runs"), "stages": list(stages)}
    path.write_text(yaml.safe_dump(raw))
    return path


def _stage(name: str, *overrides: str, **fields: object) -> dict:
    return {"name": name, "config": str(SMOKE), "overrides": list(overrides), **fields}


def _two_stages(tmp_path: Path) -> Path:
    return _stages_file(tmp_path, _stage("pre"), _stage("cpt", "train.micro_batch_size=8",
                                                        start_key="model.init_from",
                                                        slurm={"tasks_per_node": 1, "time_min": 20}))


def test_each_stage_is_a_checked_job_with_its_own_shape(tmp_path: Path) -> None:
    jobs = plan_jobs(load_stages(_two_stages(tmp_path)), load_profile("local"))
    runs = tmp_path / "runs"
    assert [j.submission.shape.world_size for j in jobs] == [2, 1]  # the profile's 2 tasks; the stage's 1
    assert [j.submission.shape.name for j in jobs] == ["tessera-chain-pre", "tessera-chain-cpt"]
    assert jobs[1].submission.shape.profile.time_min == 20
    argv = jobs[1].run.argv()
    assert argv[:4] == ["--config", str(SMOKE), "--resume", "auto"]
    assert f"model.init_from={runs / 'pre' / 'export'}" in argv
    assert argv[-1] == f"train.out_dir={runs / 'cpt'}"
    assert "log.progress=false" in argv
    assert jobs[1].submission.recipes[0]["model"]["init_from"] == str(runs / "pre" / "export")
    assert jobs[1].submission.folder == runs / "cpt" / "slurm"


def test_jobs_wait_for_the_previous_one_and_die_with_it(tmp_path: Path) -> None:
    jobs = plan_jobs(load_stages(_two_stages(tmp_path)), load_profile("local"))
    first, second = job_parameters(jobs[0], None), job_parameters(jobs[1], "41")
    assert "dependency" not in first and second["dependency"] == "afterok:41"
    for params in (first, second):
        assert params["additional_parameters"] == {"kill-on-invalid-dep": "yes"}
        assert params["ntasks_per_node"] in (1, 2) and params["partition"] == "local"
    lines = sbatch_script(jobs[1], "41").splitlines()
    assert "#SBATCH --dependency=afterok:41" in lines and "#SBATCH --kill-on-invalid-dep=yes" in lines
    assert "#SBATCH --ntasks-per-node=1" in lines
    assert f"#SBATCH --output={tmp_path}/runs/cpt/slurm/%j_0_log.out" in lines


def test_the_command_line_overrides_a_stages_slurm_fields(tmp_path: Path) -> None:
    cli = stages_parser().parse_args([str(tmp_path), "--profile", "local", "--tasks-per-node", "2",
                                      "--time", "40"])
    path = _stages_file(tmp_path, _stage("pre"), _stage("cpt", start_key="model.init_from",
                                                        slurm={"tasks_per_node": 1, "time_min": 20}))
    jobs = plan_jobs(load_stages(path), load_profile("local"), cli=cli)
    assert [j.submission.shape.world_size for j in jobs] == [2, 2]
    assert [j.submission.shape.profile.time_min for j in jobs] == [40, 40]


def test_dry_run_prints_the_chain_and_queues_nothing(tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    path = _stages_file(tmp_path, _stage("pre"), _stage("mid", start_key="model.init_from"),
                        _stage("last", start_key="model.init_from"))
    done = tmp_path / "runs" / "pre"
    (done / "export").mkdir(parents=True)
    (done / "export" / "config.json").write_text("{}")
    (done / "summary.json").write_text("{}")
    assert submit_main(["stages", str(path), "--profile", "local", "--dry-run"]) == 0
    out = capsys.readouterr().out
    heads = [line for line in out.splitlines() if line.startswith("# stage ")]
    assert heads == [f"# stage 1/3 'pre': done; finished, not queued (export {done / 'export'})",
                     "# stage 2/3 'mid': new; no dependency (nothing was queued)",
                     "# stage 3/3 'last': new; after the job of stage 'mid' (nothing was queued)"]
    scripts = out.split("# sbatch script\n")[1:]
    assert "--dependency" not in scripts[0] and "#SBATCH --dependency=afterok:JOB_OF_mid" in scripts[1]
    assert f"model.init_from={tmp_path / 'runs/mid/export'}" in out
    assert not (tmp_path / "runs" / "mid").exists() and not (tmp_path / "runs" / "stage_jobs.json").exists()


def test_placeholders_go_through_the_submit_checks(tmp_path: Path) -> None:
    """The HF model of the SFT export does not exist yet; its LoRA targets are still resolved on its
    config."""
    from tests.hf_models import make_hf_model, write_sft

    base = make_hf_model(tmp_path / "models", "llama")
    sft = ["data.corpus=sft", f"data.files=[{write_sft(tmp_path / 'sft.jsonl')}]", "data.seq_len=64",
           "data.val_fraction=0.25"]
    path = _stages_file(tmp_path, _stage("sft", f"hf.path={base}", *sft),
                        _stage("more", *sft, "lora.r=4", "lora.target_modules=[qkv_proj]"))
    with pytest.raises(StagesError) as e:
        plan_jobs(load_stages(path), load_profile("local"))
    message = str(e.value)
    assert message.startswith(f"stages {path}: stage 'more' ")
    assert "qkv_proj" in message and "\n" not in message
    assert "tessera-stages-" not in message


def test_a_bad_stage_slurm_field_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = _stages_file(tmp_path, _stage("pre", slurm={"gpus": 1}))
    with pytest.raises(SlurmConfigError, match=r"stage 'pre': stage 'pre' slurm: unknown field 'gpus'"):
        plan_jobs(load_stages(path), load_profile("local"))
    assert submit_main(["stages", str(path), "--profile", "local", "--dry-run"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("tessera: error: stages ")
