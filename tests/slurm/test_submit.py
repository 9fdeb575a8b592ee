"""Submit time: profiles and overrides, the sbatch script they render, sweeps, and input refused before
queueing."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from slurm.plan import plan_submission
from slurm.profile import (
    PROFILE_DIR,
    JobShape,
    Profile,
    SlurmConfigError,
    choose_signal_delay,
    known_profiles,
    load_profile,
    resolve,
    with_values,
)
from slurm.submit import main as submit_main
from slurm.sweep import format_table, load_sweep, point_name, point_overrides
from tests.conftest import REPO, SMOKE, child_env
from train.config.load import load_config

SUBMIT = REPO / "slurm" / "submit.py"
# A global batch every profile's data-parallel size divides (8 x H100: 8 ranks x micro 4).
BATCH = ["train.global_batch_size=32", "train.micro_batch_size=4"]


def _script_lines(text: str) -> list[str]:
    return text.splitlines()


def test_shipped_profiles_load_and_resolve() -> None:
    assert {"h100x8", "rtx4090", "local"} <= set(known_profiles())
    for name in known_profiles():
        shape = resolve(load_profile(name))
        p = shape.profile
        assert p.description and p.partition in p.partitions
        # one task per GPU on GPU profiles; CPU tasks otherwise
        assert shape.tasks_per_node == (p.gpus_per_node or p.tasks_per_node)
        assert 30 <= shape.signal_delay_s <= 300


def test_command_line_values_override_the_profile() -> None:
    base = load_profile("h100x8")
    merged = with_values(base, {"nodes": 4, "time_min": 120, "partition": "gpu-preempt", "qos": None},
                         where="command line")
    assert (merged.nodes, merged.time_min, merged.partition) == (4, 120, "gpu-preempt")
    assert merged.constraint == base.constraint == "h100" and merged.qos is None  # None leaves the profile's
    shape = resolve(merged, gpus_per_node=4)
    assert shape.tasks_per_node == 4 and shape.world_size == 16 and shape.mem_gb == 4 * base.mem_gb_per_task
    with pytest.raises(SlurmConfigError, match="unknown field 'gpus'"):
        with_values(base, {"gpus": 2}, where="command line")
    with pytest.raises(SlurmConfigError, match=r"nodes='two': expected int"):
        with_values(base, {"nodes": "two"}, where="profile x")


@pytest.mark.parametrize("time_min, delay", [(3, 30), (30, 180), (60, 300), (1440, 300)])
def test_signal_delay_follows_the_time_limit(time_min: int, delay: int) -> None:
    assert choose_signal_delay(time_min) == delay
    assert resolve(with_values(Profile(name="t"), {"time_min": time_min}, where="t")).signal_delay_s == delay


@pytest.mark.parametrize("name", ["h100x8", "rtx4090", "local"])
def test_sbatch_rendering_for_each_profile(name: str, tmp_path: Path) -> None:
    profile = load_profile(name)
    shape = resolve(profile)
    sub = plan_submission(shape, config=str(SMOKE), overrides=[*BATCH, f"train.out_dir={tmp_path / 'run'}"],
                          ds_config=None)
    lines = _script_lines(sub.sbatch_script())
    assert lines[0] == "#!/bin/bash"
    tasks = profile.gpus_per_node or profile.tasks_per_node
    expected = [f"#SBATCH --ntasks-per-node={tasks}", f"#SBATCH --nodes={profile.nodes}",
                f"#SBATCH --cpus-per-task={profile.cpus_per_task}", f"#SBATCH --time={profile.time_min}",
                f"#SBATCH --partition={profile.partition}", f"#SBATCH --signal=USR2@{shape.signal_delay_s}",
                "#SBATCH --job-name=tessera-run", f"#SBATCH --output={tmp_path}/run/slurm/%j_0_log.out"]
    if profile.gpus_per_node:
        expected.append(f"#SBATCH --gpus-per-node={profile.gpus_per_node}")
    else:
        assert not any("gpus" in line for line in lines)
    if profile.constraint:
        expected.append(f"#SBATCH --constraint={profile.constraint}")
    for key, value in profile.sbatch.items():
        expected.append(f"#SBATCH --{key}" if value is True else f"#SBATCH --{key}={value}")
    for line in expected:
        assert line in lines, (line, lines)
    mem = profile.mem_gb_per_task * tasks
    assert f"#SBATCH --mem={int(mem)}GB" in lines
    for setup in profile.setup:
        assert setup in lines
    srun = next(line for line in lines if line.startswith("srun "))
    assert "--kill-on-bad-exit=1" in srun
    assert srun.endswith(f"{sys.executable} -u -m submitit.core._submit {tmp_path}/run/slurm")
    # the run resumes automatically when its directory holds a checkpoint, and starts fresh otherwise
    assert sub.runs[0].argv()[:4] == ["--config", str(SMOKE), "--resume", "auto"]
    assert sub.runs[0].ds_config == profile.ds_config


def _submit(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(SUBMIT), *args], cwd=REPO, env=child_env(tmp_path),
                          capture_output=True, text=True, timeout=120, check=False)


def test_dry_run_prints_job_recipe_and_script_and_writes_nothing(tmp_path: Path) -> None:
    out = tmp_path / "run"
    proc = _submit(tmp_path, "--profile", "local", "--config", str(SMOKE), "--dry-run", "--time", "45",
                   "--sbatch", "mail-type=END", "--setup", "echo hello", "train.steps=7",
                   f"train.out_dir={out}")
    assert proc.returncode == 0, proc.stderr
    text = proc.stdout
    assert "# job (profile local; nothing was queued)" in text and "time_min: 45" in text
    assert "signal_delay_s: 270" in text and "world_size: 2" in text
    assert "  steps: 7" in text and "  progress: false" in text  # the resolved recipe
    assert "#SBATCH --mail-type=END" in text and "\necho hello\n" in text and "#SBATCH --time=45" in text
    assert not out.exists()


# Each: (arguments, a fragment of the one error line). All are refused before anything is queued.
BAD = [
    (["--profile", "a100x4"], "--profile a100x4: no such profile; choose one of h100x8, local, rtx4090"),
    (["--profile", "local", "--partition", "gpu"], "--partition gpu: not a partition of profile local"),
    (["--profile", "h100x8", "--gpus-per-node", "9", *BATCH],
     "--gpus-per-node 9: profile h100x8 nodes have 8 GPUs"),
    (["--profile", "rtx4090", "--nodes", "2"], "--nodes 2: profile rtx4090 allows at most 1 nodes"),
    (["--profile", "h100x8", "--time", "45", *BATCH],
     "--time 45: shorter than the checkpoint interval (--checkpoint-every-min 60)"),
    (["--profile", "local", "--time", "2"], "--time 2: the warning signal comes 30 s before the limit"),
    (["--profile", "local", "train.lrr=1e-3"], "Unknown config key 'train.lrr'. Did you mean 'train.lr'?"),
    (["--profile", "local", "--tasks-per-node", "3"], "global_batch_size"),
    (["--profile", "local", "model.n_heads=5"], "model"),
    (["--profile", "local", "--ds_config", "zero9"], "--ds_config zero9: no such file"),
    (["--profile", "local", "--sbatch", "exclusive"], "--sbatch 'exclusive': expected KEY=VALUE"),
    (["--profile", "local", "research.recipe=injection", "research.options={layers: '2-7'}"],
     "research.options.layers='2-7': layer 4 does not exist; the model has 4 layers"),
    (["--profile", "local", "research.recipe=injection", "research.terms={rec: {weight: 1}}"],
     "research.terms.rec: Injection has no loss term 'rec'"),
]


@pytest.mark.parametrize("args, fragment", BAD, ids=[b[1][:40] for b in BAD])
def test_bad_input_is_one_line_before_anything_is_queued(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                         args: list[str], fragment: str) -> None:
    out = tmp_path / "run"
    code = submit_main([*args, "--config", str(SMOKE), "--dry-run", f"train.out_dir={out}"])
    captured = capsys.readouterr()
    assert code == 2, captured.out + captured.err
    errors = [line for line in captured.err.splitlines() if line.startswith("tessera: error:")]
    assert len(errors) == 1 and fragment in errors[0], captured.err
    assert not captured.out and not out.exists()


# Input that would reach the sbatch script: a newline ends a directive and what follows runs as a shell line
# (or, as an #SBATCH line, silently replaces Tessera's own directives). Each: (arguments, fragment).
SMUGGLED = "#SBATCH --time=525600"
BAD_SCRIPT = [
    (["--sbatch", f"mail-type\n{SMUGGLED}=END"],
     "--sbatch 'mail-type\\n#SBATCH --time': not an sbatch option"),
    (["--sbatch", f"mail-type=END\n{SMUGGLED}"],
     "--sbatch mail-type='END\\n#SBATCH --time=525600': the value holds a newline"),
    (["--sbatch", f"comment=x {SMUGGLED}"],
     "--sbatch comment='x #SBATCH --time=525600': the value holds '#SBATCH'"),
    (["--sbatch", "comment=a\\b"], "the value holds a backslash"),
    (["--sbatch", "mail-type="], "--sbatch mail-type='': empty"),
    (["--sbatch", "mail type=END"], "--sbatch 'mail type': not an sbatch option name"),
    (["--sbatch", "signal=USR1@10"],
     "--sbatch 'signal': Tessera sets --signal itself (use --signal-delay-s)"),
    (["--sbatch=--time=525600"], "Tessera sets --time itself (use --time)"),
    (["--name", f"run\n{SMUGGLED}"], "--name='run\\n#SBATCH --time=525600': the value holds a newline"),
    (["--partition", f"local\n{SMUGGLED}"], "--partition='local\\n#SBATCH --time=525600': the value holds a"),
    (["--setup", SMUGGLED], "--setup '#SBATCH --time=525600': the line holds '#SBATCH'"),
    (["--setup", "echo a\nsleep 1"], "--setup 'echo a\\nsleep 1': the line holds a newline"),
    (["--setup", "cat <<EOF"], "bash cannot run it as one line (warning: here-document"),
    (["--setup", "module load cuda &&"], "bash cannot run it as one line (syntax error"),
]


@pytest.mark.parametrize("args, fragment", BAD_SCRIPT, ids=[b[1][:40] for b in BAD_SCRIPT])
def test_what_reaches_the_script_is_checked(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                            args: list[str], fragment: str) -> None:
    test_bad_input_is_one_line_before_anything_is_queued(tmp_path, capsys, ["--profile", "local", *args],
                                                         fragment)


@pytest.mark.parametrize(
    "field, fragment",
    [
        (f"partition: \"local\\n{SMUGGLED}\"", "profile mine: partition='local\\n#SBATCH"),
        (f"account: \"a {SMUGGLED}\"", "profile mine: account='a #SBATCH --time=525600': the value holds"),
        (f"sbatch: {{\"mail-type\\n{SMUGGLED}\": END}}", "profile mine: sbatch 'mail-type\\n#SBATCH"),
        (f"sbatch: {{mail-type: \"END\\n{SMUGGLED}\"}}", "profile mine: sbatch mail-type='END\\n#SBATCH"),
        ("sbatch: {requeue: false}", "sbatch requeue=False: not an sbatch value; leave the key out"),
        ("sbatch: {job_name: x}", "sbatch 'job_name': Tessera sets --job-name itself (use --name)"),
        ("sbatch: [exclusive]", "profile mine: sbatch=['exclusive']: expected dict"),
        ("setup: [\"if true; then\"]", "profile mine: setup line 'if true; then': bash cannot run it"),
        ("setup: [1]", "profile mine: setup line 1: a setup line must be a string"),
    ],
)
def test_a_bad_profile_field_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str], field: str,
                                         fragment: str) -> None:
    profile = tmp_path / "mine.yaml"
    profile.write_text((REPO / "slurm" / "profiles" / "local.yaml").read_text() + field + "\n")
    test_bad_input_is_one_line_before_anything_is_queued(tmp_path, capsys, ["--profile", str(profile)],
                                                         fragment)


def test_a_run_directory_that_would_break_the_script(tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    out = f'"{tmp_path}/run\\n{SMUGGLED}"'  # YAML: a newline in the directory's name
    code = submit_main(["--profile", "local", "--config", str(SMOKE), "--dry-run", f"train.out_dir={out}"])
    captured = capsys.readouterr()
    assert code == 2 and "# sbatch script" not in captured.out and captured.err.count("\n") == 1, captured.err
    assert captured.err.startswith(f"tessera: error: train.out_dir='{tmp_path}/run\\n#SBATCH --time=525600': "
                                   f"the value holds a newline"), captured.err


def test_a_valid_script_is_rendered_as_before(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The whole script of a valid job, as submitit rendered it before the checks existed."""
    run = tmp_path / "run"
    args = ["--profile", "local", "--config", str(SMOKE), "--dry-run", "--sbatch", "mail-type=END",
            "--sbatch", "comment=a b", "--sbatch=--reservation=big", "--setup", "echo hello && echo 'a b'",
            "--name", "myjob", f"train.out_dir={run}"]
    assert submit_main(args) == 0, capsys.readouterr().err
    script = capsys.readouterr().out.split("# sbatch script\n", 1)[1]
    logs = f"{run}/slurm/%j"
    assert script == "\n".join([
        "#!/bin/bash", "", "# Parameters", "#SBATCH --comment='a b'", "#SBATCH --cpus-per-task=1",
        f"#SBATCH --error={logs}_0_log.err", "#SBATCH --job-name=myjob", "#SBATCH --mail-type=END",
        "#SBATCH --mem=8GB", "#SBATCH --nodes=1", "#SBATCH --ntasks-per-node=2", "#SBATCH --open-mode=append",
        f"#SBATCH --output={logs}_0_log.out", "#SBATCH --partition=local", "#SBATCH --reservation=big",
        "#SBATCH --signal=USR2@180", "#SBATCH --time=30", "#SBATCH --wckey=submitit", "", "# setup",
        "export OMP_NUM_THREADS=1", "echo hello && echo 'a b'", "", "# command",
        "export SUBMITIT_EXECUTOR=slurm",
        (f"srun --unbuffered --output {logs}_%t_log.out --error {logs}_%t_log.err --kill-on-bad-exit=1 "
        f"{sys.executable} -u -m submitit.core._submit {run}/slurm"), "", ""])


@pytest.mark.parametrize(
    "slurm, fragment",
    [
        ({"setup": [SMUGGLED]}, "stage 'pre' slurm: setup line '#SBATCH --time=525600': the line holds"),
        ({"sbatch": {"dependency": "afterok:1"}}, "sbatch dependency: the chain sets --dependency itself"),
        ({"partition": f"local\n{SMUGGLED}"}, "stage 'pre' slurm: partition='local\\n#SBATCH"),
    ],
)
def test_a_stage_chain_checks_what_reaches_its_scripts(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                       slurm: dict, fragment: str) -> None:
    stages = tmp_path / "stages.yaml"
    stages.write_text(yaml.safe_dump({"name": "chain", "out_dir": str(tmp_path / "runs"), "stages": [
        {"name": "pre", "config": str(SMOKE), "slurm": slurm}]}))
    assert submit_main(["stages", str(stages), "--profile", "local", "--dry-run"]) == 2
    captured = capsys.readouterr()
    assert "# sbatch script" not in captured.out and captured.err.count("\n") == 1, captured.err
    assert captured.err.startswith("tessera: error: stages ") and fragment in captured.err, captured.err


def test_a_smuggled_directive_from_the_real_command_line(tmp_path: Path) -> None:
    proc = _submit(tmp_path, "--profile", "local", "--config", str(SMOKE), "--dry-run", "--sbatch",
                   f"mail-type=END\n{SMUGGLED}", f"train.out_dir={tmp_path / 'run'}")
    assert proc.returncode == 2 and "# sbatch script" not in proc.stdout
    assert proc.stderr.splitlines() == [
        ("tessera: error: --sbatch mail-type='END\\n#SBATCH --time=525600': the value holds a newline; an "
        "sbatch value must be one line without it.")]
    assert not (tmp_path / "run").exists()


def test_bad_input_from_the_command_line(tmp_path: Path) -> None:
    proc = _submit(tmp_path, "--profile", "h100x8", "--gpus-per-node", "16", "--config", str(SMOKE),
                   "--dry-run")
    assert proc.returncode == 2 and not proc.stdout
    assert proc.stderr.splitlines() == [(
        "tessera: error: --gpus-per-node 16: profile h100x8 nodes have 8 GPUs; ask for at most 8 per node "
        "(and more nodes with --nodes) or use another profile.")]


def test_a_used_run_directory_needs_resume(tmp_path: Path) -> None:
    out = tmp_path / "run"
    (out / "checkpoints").mkdir(parents=True)
    proc = _submit(tmp_path, "--profile", "local", "--config", str(SMOKE), "--dry-run",
                   f"train.out_dir={out}")
    assert proc.returncode == 2 and "already holds a run: pass --resume auto" in proc.stderr
    again = _submit(tmp_path, "--profile", "local", "--config", str(SMOKE), "--dry-run", "--resume", "auto",
                    f"train.out_dir={out}")
    assert again.returncode == 0, again.stderr


def test_profile_from_a_path_and_its_type_errors(tmp_path: Path) -> None:
    good = tmp_path / "mine.yaml"
    good.write_text("partition: batch\nnodes: 2\ngpus_per_node: 4\ncpus_per_task: 6\nmem_gb_per_task: 30\n"
                    "time_min: 240\nexclusive: true\nsbatch: {requeue: true, reservation: big}\n")
    shape: JobShape = resolve(load_profile(str(good)))
    params = shape.slurm_parameters()
    assert params["gpus_per_node"] == 4 and params["ntasks_per_node"] == 4 and params["nodes"] == 2
    assert params["additional_parameters"] == {"requeue": True, "reservation": "big"}
    assert params["exclusive"] is True
    assert shape.profile.name == "mine" and PROFILE_DIR.is_dir()
    bad = tmp_path / "bad.yaml"
    bad.write_text("time_min: soon\n")
    with pytest.raises(SlurmConfigError, match=r"profile bad: time_min='soon': expected int"):
        load_profile(str(bad))
    with pytest.raises(SlurmConfigError, match="this cluster has no such partition"):
        resolve(with_values(load_profile("local"), {"partitions": []}, where="t"), live_partitions=["debug"])


# ----------------------------------------------------------------------------- sweeps


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "grid.yaml"
    path.write_text(text)
    return path


def test_grid_points_names_and_overrides(tmp_path: Path) -> None:
    sweep = load_sweep(_write(tmp_path, f"out_dir: {tmp_path / 'sw'}\ngrid:\n"
                                        f"  train.lr: [1.0e-3, 3.0e-3, 0.01]\n"
                                        f"  data.sampling: [random, blocks]\n"))
    assert sweep.name == "grid" and sweep.out_dir == tmp_path / "sw"
    points = sweep.points()
    assert len(points) == 6 and points[1] == {"train.lr": 1e-3, "data.sampling": "blocks"}
    assert point_name(1, points[1]) == "001-lr=0.001-sampling=blocks"
    assert point_name(7, {"model.overrides": {"dim": 64}}) == "007-overrides=__dim___64_"
    overrides = point_overrides(points[5])
    assert overrides == ["train.lr=0.01", "data.sampling=blocks"]
    cfg = load_config(str(SMOKE), overrides)  # the recipe loader reads the values back as they were
    assert cfg.train.lr == 0.01 and cfg.data.sampling == "blocks"


@pytest.mark.parametrize(
    "text, fragment",
    [
        ("grid: {}\n", "non-empty 'grid:'"),
        ("grid:\n  lr: [1, 2]\n", "grid key 'lr' must be section.key"),
        ("grid:\n  train.lr: 0.1\n", "grid.train.lr=0.1: give a non-empty list"),
        ("grid:\n  train.lr: [0.1]\nrepeat: 2\n", "unknown field 'repeat'"),
    ],
)
def test_bad_sweep_files(tmp_path: Path, text: str, fragment: str) -> None:
    with pytest.raises(SlurmConfigError, match=fragment):
        load_sweep(_write(tmp_path, text))
    with pytest.raises(SlurmConfigError, match="no such file"):
        load_sweep(tmp_path / "missing.yaml")


def test_sweep_becomes_one_array_with_a_directory_per_point(tmp_path: Path) -> None:
    sweep = load_sweep(_write(tmp_path, f"name: seeds\nout_dir: {tmp_path / 'sw'}\ngrid:\n"
                                        f"  train.seed: [1, 2, 3]\n"))
    shape = resolve(load_profile("local"), tasks_per_node=1)
    sub = plan_submission(shape, config=str(SMOKE), overrides=["train.steps=6"], ds_config=None, sweep=sweep)
    assert [r.name for r in sub.runs] == ["000-seed=1", "001-seed=2", "002-seed=3"]
    assert [r.out_dir for r in sub.runs] == [str(tmp_path / "sw" / r.name) for r in sub.runs]
    assert sub.runs[2].overrides[-2:] == ("train.seed=3", f"train.out_dir={tmp_path / 'sw' / '002-seed=3'}")
    assert [r["train"]["seed"] for r in sub.recipes] == [1, 2, 3]
    assert sub.folder == tmp_path / "sw" / "slurm"
    script = sub.sbatch_script().splitlines()
    assert "#SBATCH --array=0-2%3" in script and "#SBATCH --job-name=tessera-seeds" in script
    assert f"#SBATCH --output={tmp_path}/sw/slurm/%A_%a_0_log.out" in script
    # every point is validated: a point whose recipe is wrong refuses the whole sweep
    bad = load_sweep(_write(tmp_path, "grid:\n  train.micro_batch_size: [4, 3]\n"))
    with pytest.raises(Exception, match="micro_batch_size"):
        plan_submission(shape, config=str(SMOKE), overrides=[], ds_config=None, sweep=bad)


def test_summary_table_puts_the_best_first() -> None:
    rows = [{"name": "000-lr=0.1", "train.lr": 0.1, "state": "FAILED", "val_loss": None},
            {"name": "001-lr=0.01", "train.lr": 0.01, "state": "COMPLETED", "val_loss": 4.25},
            {"name": "002-lr=0.001", "train.lr": 0.001, "state": "COMPLETED", "val_loss": 5.5}]
    lines = format_table(rows).splitlines()
    assert lines[0].split() == ["name", "train.lr", "state", "val_loss"]
    assert [line.split()[0] for line in lines[1:]] == ["001-lr=0.01", "002-lr=0.001", "000-lr=0.1"]
    assert lines[1].split()[-1] == "4.2500" and lines[3].split()[-1] == "-"


def test_an_hf_recipe_is_checked_at_submit_time(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from tests.hf_models import make_hf_model, write_sft

    model = make_hf_model(tmp_path, "llama")
    data = write_sft(tmp_path / "sft.jsonl", n=16)
    args = ["--profile", "local", "--config", "train/configs/sft_lora.yaml", "--dry-run", f"hf.path={model}",
            f"data.files=[{data}]", "data.seq_len=64", f"train.out_dir={tmp_path / 'run'}"]
    assert submit_main(args) == 0, capsys.readouterr().err
    assert f"path: {model}" in capsys.readouterr().out
    assert submit_main([*args, "lora.target_modules=[c_attn]"]) == 2
    assert "match no linear layer; the blocks' linear layers are named" in capsys.readouterr().err
