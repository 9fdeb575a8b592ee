"""Multi-node job options: node ranges, exclusions, exclusive nodes, GPU binding, CPU binding and the network
interfaces, each as a profile field and a command-line option: the sbatch script they render, and the one-line
refusals before anything is queued."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
import submitit

from slurm.options import add_job_options, with_command_line
from slurm.plan import partition_nodes, plan_submission
from slurm.profile import JobShape, SlurmConfigError, load_profile, resolve, with_values
from slurm.submit import main as submit_main
from tests.conftest import SMOKE

BATCH = ["train.global_batch_size=48", "train.micro_batch_size=1", "train.eval_batches=1"]


def _shape(argv: list[str], profile: str = "h100x8", live: dict[str, int] | None = None) -> JobShape:
    parser = argparse.ArgumentParser()
    add_job_options(parser, profile_required=False)
    args = parser.parse_args(argv)
    merged = with_command_line(load_profile(profile), args)
    return resolve(merged, gpus_per_node=args.gpus_per_node, tasks_per_node=args.tasks_per_node,
                   live_partitions=live)


def _script(shape: JobShape, tmp_path: Path) -> list[str]:
    sub = plan_submission(shape, config=str(SMOKE), overrides=[*BATCH, f"train.out_dir={tmp_path / 'run'}"],
                          ds_config="cpu")
    return sub.sbatch_script().splitlines()


def test_a_node_range_and_an_exclusion_reach_sbatch(tmp_path: Path) -> None:
    shape = _shape(["--nodes", "1-3", "--exclude", "node[2-3],node7"], profile="local")
    assert (shape.profile.min_nodes, shape.profile.nodes) == (1, 3) and list(shape.node_counts) == [1, 2, 3]
    assert shape.world_size == 6 and shape.as_dict()["world_size"] == "2-6"
    lines = _script(shape, tmp_path)
    assert "#SBATCH --nodes=1-3" in lines and "#SBATCH --exclude='node[2-3],node7'" in lines
    assert sum(line.startswith("#SBATCH --nodes") for line in lines) == 1
    # submitit's own executor takes the parameters and counts the tasks of the most nodes (its task ids)
    params = shape.slurm_parameters()
    assert params["nodes"] == 3 and params["additional_parameters"] == {"nodes": "1-3"}
    executor = submitit.SlurmExecutor(folder=tmp_path / "submitit")
    executor.update_parameters(**params)
    assert executor._num_tasks() == 6
    exact = _shape(["--nodes", "2"], profile="local")
    assert exact.slurm_parameters()["nodes"] == 2 and "exclude" not in exact.slurm_parameters()
    # a profile's range, then an exact count on the command line: the count wins
    ranged = with_values(load_profile("local"), {"nodes": "2-3"}, where="profile p")
    assert (ranged.min_nodes, ranged.nodes) == (2, 3)
    assert with_values(ranged, {"nodes": 2}, where="command line").min_nodes is None


def test_every_node_count_of_a_range_is_checked(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = submit_main(["--profile", "local", "--nodes", "2-4", "--config", str(SMOKE), "--dry-run",
                        "train.global_batch_size=16", f"train.out_dir={tmp_path / 'run'}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert err[0].startswith("tessera: error: --nodes 2-4: on 3 node(s) (6 tasks) the job would stop: "
                             "train.global_batch_size=16 cannot be split over 6 data-parallel ranks")
    assert err[0].endswith("; narrow the range or change the recipe.")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("argv, fragment", [
    (["--nodes", "two"], "nodes='two': expected int nodes or a range MIN-MAX (e.g. 2 or 1-2"),
    (["--nodes", "3-1"], "--nodes 3-1: a range MIN-MAX needs 1 <= MIN <= MAX"),
    (["--nodes", "0-2"], "--nodes 0-2: a range MIN-MAX needs 1 <= MIN <= MAX"),
    (["--nodes", "65"], "--nodes 65: profile h100x8 allows at most 64 nodes"),
    (["--exclude", "node1 node2"], "exclude='node1 node2': not a Slurm host list"),
    (["--exclude", "n[1-2"], "exclude='n[1-2': not a Slurm host list"),
    (["--cpu-bind", "corez"], "cpu_bind='corez': not an srun --cpu-bind type"),
    (["--nccl-socket-ifname", "eth0;reboot"], "nccl_socket_ifname='eth0;reboot': not a network interface list"),
    (["--gloo-socket-ifname", "^lo"], "gloo_socket_ifname='^lo': not a network interface list"),
    (["--ntasks-per-node", "9"], "--ntasks-per-node 9: profile h100x8 nodes have 8 GPUs (a GPU job runs one"),
    (["--ntasks-per-node", "4", "--gpus-per-node", "8"], "--ntasks-per-node 4: a GPU job runs one task per GPU"),
])
def test_bad_multi_node_options_are_one_line(argv: list[str], fragment: str) -> None:
    with pytest.raises(SlurmConfigError) as e:
        _shape(argv)
    assert fragment in str(e.value) and "\n" not in str(e.value)


def test_bad_fields_in_a_profile_file(tmp_path: Path) -> None:
    for text, fragment in [("gpus_per_task: 2\n", "--gpus-per-task 2: Tessera runs one rank per GPU"),
                           ("exclusive: 1\n", "exclusive=1: expected bool"),
                           ("nodes: 1-2\nmin_nodes: 1\n", "give the range once"),
                           ("nodes: 2\nmin_nodes: 3\n", "--nodes 3-2: a range MIN-MAX needs 1 <= MIN <= MAX")]:
        path = tmp_path / "p.yaml"
        path.write_text("gpus_per_node: 4\n" + text)
        with pytest.raises(SlurmConfigError, match=None) as e:
            resolve(load_profile(str(path)))
        assert fragment in str(e.value), (text, str(e.value))
    with pytest.raises(SlurmConfigError, match="--gpus-per-task 1: this job uses no GPU"):
        _shape(["--gpus-per-task", "1"], profile="local")


def test_the_live_cluster_bounds_the_node_count() -> None:
    live = partition_nodes("local n1\nlocal n2\nlocal n2\ndebug n3\n")  # a node listed once per state line
    assert live == {"debug": 1, "local": 2}
    assert _shape(["--nodes", "2"], profile="local", live=live).world_size == 4
    assert _shape(["--nodes", "1-2"], profile="local", live=live).node_counts == range(1, 3)
    with pytest.raises(SlurmConfigError, match=r"--nodes 3: partition local has 2 node\(s\) \(sinfo\); ask for "
                                               r"at most 2, or a range such as --nodes 1-2"):
        _shape(["--nodes", "3"], profile="local", live=live)
    assert load_profile("local").max_nodes is None  # the local profile takes what the running cluster has


def test_bindings_exclusive_nodes_and_interfaces_in_the_script(tmp_path: Path) -> None:
    default = _script(_shape([]), tmp_path / "a")  # h100x8's own choices
    assert "#SBATCH --exclusive" in default and "#SBATCH --gpus-per-node=8" in default
    assert "export NCCL_SOCKET_IFNAME='^docker,lo'" in default
    assert not any("GLOO_SOCKET_IFNAME" in line for line in default)
    (srun,) = [line for line in default if line.startswith("srun ")]
    assert " --kill-on-bad-exit=1 --cpu-bind=cores " in srun
    shape = _shape(["--gpus-per-task", "1", "--ntasks-per-node", "4", "--no-exclusive", "--cpu-bind", "none",
                    "--nccl-socket-ifname", "ib0,ib1", "--gloo-socket-ifname", "eth0", "--nodes", "2"])
    assert (shape.tasks_per_node, shape.world_size) == (4, 8)
    lines = _script(shape, tmp_path / "b")
    assert "#SBATCH --gpus-per-task=1" in lines and "#SBATCH --ntasks-per-node=4" in lines
    assert not any(line.startswith(("#SBATCH --gpus-per-node", "#SBATCH --exclusive")) for line in lines)
    setup = lines[lines.index("# setup") + 1:lines.index("# command") - 1]
    assert setup[-2:] == ["export NCCL_SOCKET_IFNAME=ib0,ib1", "export GLOO_SOCKET_IFNAME=eth0"]  # last: they win
    assert "--cpu-bind=none" in next(line for line in lines if line.startswith("srun "))
    # each bound task checks it sees one GPU (not the node's four)
    sub = plan_submission(shape, config=str(SMOKE), overrides=[*BATCH, f"train.out_dir={tmp_path / 'c'}"],
                          ds_config="cpu")
    assert sub.needs.gpus_per_node == 1
    assert plan_submission(_shape(["--ntasks-per-node", "4"]), config=str(SMOKE), ds_config="cpu",
                           overrides=[*BATCH, f"train.out_dir={tmp_path / 'd'}"]).needs.gpus_per_node == 4


def test_an_option_tessera_sets_is_refused_as_sbatch_extra(capsys: pytest.CaptureFixture[str]) -> None:
    for key, option in (("exclusive", "--exclusive"), ("exclude", "--exclude"), ("gpus-per-task", "--gpus-per-task"),
                        ("ntasks", "--nodes and --ntasks-per-node")):
        assert submit_main(["--profile", "local", "--sbatch", f"{key}=x", "--dry-run"]) == 2
        err = capsys.readouterr().err
        assert f"Tessera sets --{key} itself (use {option}" in err, err


def test_dry_run_shows_the_multi_node_script(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = submit_main(["--profile", "local", "--nodes", "1-2", "--exclude", "tessera-n3", "--config", str(SMOKE),
                        "--gloo-socket-ifname", "lo", "--dry-run", "train.global_batch_size=8",
                        f"train.out_dir={tmp_path / 'run'}"])
    out = capsys.readouterr().out
    assert code == 0 and not (tmp_path / "run").exists()
    job = out[:out.index("\n# run ")]
    assert "\nnodes: 2\nmin_nodes: 1\n" in job and "\nworld_size: 2-4\n" in job
    script = out[out.index("# sbatch script\n"):].splitlines()
    assert "#SBATCH --nodes=1-2" in script and "#SBATCH --exclude=tessera-n3" in script
    assert "export GLOO_SOCKET_IFNAME=lo" in script
