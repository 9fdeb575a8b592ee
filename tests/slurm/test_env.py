"""SLURM task variables, read by submitit's JobEnvironment, become torch.distributed's rendezvous
variables."""

from __future__ import annotations

import pytest
import submitit

from slurm.env import PORT_RANGE, DistVars, SlurmEnvError, dist_vars, rendezvous_port

SLURM_KEYS = ("SLURM_JOB_ID", "SLURM_NTASKS", "SLURM_JOB_NUM_NODES", "SLURM_NODEID", "SLURM_JOB_NODELIST",
              "SLURM_PROCID", "SLURM_LOCALID", "SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID",
              "SLURM_RESTART_COUNT", "TESSERA_MASTER_PORT", "SLURMD_NODENAME")


@pytest.fixture
def slurm_task(monkeypatch: pytest.MonkeyPatch):
    """Set the variables SLURM gives one task of a job; submitit reads them as in a real job."""
    for key in SLURM_KEYS:
        monkeypatch.delenv(key, raising=False)

    def task(job: str, nodes: int, tasks: int, nodelist: str, proc: int, local: int, node: int,
             **extra: str) -> submitit.JobEnvironment:
        monkeypatch.setenv("SUBMITIT_EXECUTOR", "slurm")
        monkeypatch.setenv("SLURM_JOB_ID", job)
        monkeypatch.setenv("SLURM_JOB_NUM_NODES", str(nodes))
        monkeypatch.setenv("SLURM_NTASKS", str(tasks))
        monkeypatch.setenv("SLURM_JOB_NODELIST", nodelist)
        monkeypatch.setenv("SLURM_PROCID", str(proc))
        monkeypatch.setenv("SLURM_LOCALID", str(local))
        monkeypatch.setenv("SLURM_NODEID", str(node))
        for key, value in extra.items():
            monkeypatch.setenv(key, value)
        env = submitit.JobEnvironment()
        assert env.cluster == "slurm"
        return env

    return task


def test_single_node_two_tasks(slurm_task) -> None:
    v = dist_vars(slurm_task("41", nodes=1, tasks=2, nodelist="vm", proc=1, local=1, node=0))
    assert (v.rank, v.local_rank, v.world_size, v.local_world_size, v.num_nodes) == (1, 1, 2, 2, 1)
    assert v.master_addr == "vm" and PORT_RANGE[0] <= v.master_port < PORT_RANGE[1]
    env = v.as_env()
    assert env == {"RANK": "1", "LOCAL_RANK": "1", "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2",
                   "MASTER_ADDR": "vm", "MASTER_PORT": str(v.master_port)}


@pytest.mark.parametrize(
    "nodelist, nodes, per_node, proc, master",
    [
        ("gpu[003-004,010]", 3, 8, 17, "gpu003"),  # 3 x 8 H100: rank 17 is local 1 on the third node
        ("node-a,node-b", 2, 4, 4, "node-a"),
        ("rack1-n[1-4]", 4, 1, 3, "rack1-n1"),
        ("h[100-163]", 64, 8, 511, "h100"),  # 512 ranks
    ],
)
def test_multi_node_shapes(slurm_task, nodelist: str, nodes: int, per_node: int, proc: int,
                           master: str) -> None:
    node, local = divmod(proc, per_node)
    v = dist_vars(slurm_task("7", nodes=nodes, tasks=nodes * per_node, nodelist=nodelist, proc=proc,
                             local=local, node=node))
    assert v == DistVars(rank=proc, local_rank=local, world_size=nodes * per_node, local_world_size=per_node,
                         node_rank=node, num_nodes=nodes, master_addr=master, master_port=v.master_port,
                         node_name=v.node_name)
    first = dist_vars(slurm_task("7", nodes=nodes, tasks=nodes * per_node, nodelist=nodelist, proc=0, local=0,
                                 node=0))
    assert first.node_name == master and (v.node_name == master) == (node == 0)


def test_second_node_of_a_multi_slurmd_cluster(slurm_task) -> None:
    """Several slurmd on one machine share its host name: the node is SLURMD_NODENAME, ranks come from the
    node's place in the node list, and MASTER_ADDR is the first node's name (resolved as each node does)."""
    seen = [dist_vars(slurm_task("12", nodes=2, tasks=4, nodelist="tessera-n[1-2]", proc=r, local=r % 2,
                                 node=r // 2, SLURMD_NODENAME=f"tessera-n{r // 2 + 1}")) for r in range(4)]
    assert [(v.rank, v.local_rank, v.node_rank, v.node_name) for v in seen] == [
        (0, 0, 0, "tessera-n1"), (1, 1, 0, "tessera-n1"), (2, 0, 1, "tessera-n2"), (3, 1, 1, "tessera-n2")]
    assert {v.master_addr for v in seen} == {"tessera-n1"} and {v.world_size for v in seen} == {4}
    assert {v.local_world_size for v in seen} == {2}


def test_a_node_name_the_node_list_does_not_place_there_is_refused(slurm_task) -> None:
    with pytest.raises(SlurmEnvError, match=r"SLURMD_NODENAME=tessera-n1 but SLURM_NODEID=1 names tessera-n2"):
        dist_vars(slurm_task("12", nodes=2, tasks=4, nodelist="tessera-n[1-2]", proc=2, local=0, node=1,
                             SLURMD_NODENAME="tessera-n1"))


def test_every_task_of_a_run_derives_the_same_port_and_a_requeue_another(slurm_task) -> None:
    ports = {dist_vars(slurm_task("99", nodes=2, tasks=4, nodelist="a,b", proc=r, local=r % 2,
                                  node=r // 2)).master_port for r in range(4)}
    assert len(ports) == 1
    requeued = dist_vars(slurm_task("99", nodes=2, tasks=4, nodelist="a,b", proc=0, local=0, node=0,
                                    SLURM_RESTART_COUNT="1")).master_port
    assert requeued != ports.pop() and requeued == rendezvous_port("99", 1)
    chosen = dist_vars(slurm_task("99", nodes=1, tasks=1, nodelist="a", proc=0, local=0, node=0,
                                  TESSERA_MASTER_PORT="29512"))
    assert chosen.master_port == 29512


def test_array_tasks_get_their_own_port(slurm_task) -> None:
    a = slurm_task("120", nodes=1, tasks=1, nodelist="vm", proc=0, local=0, node=0, SLURM_ARRAY_JOB_ID="118",
                   SLURM_ARRAY_TASK_ID="2")
    assert a.job_id == "118_2"
    assert dist_vars(a).master_port == rendezvous_port("118_2", 0) != rendezvous_port("118_1", 0)


def test_export_replaces_what_a_launcher_left(slurm_task, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RANK", "5")
    v = dist_vars(slurm_task("3", nodes=1, tasks=2, nodelist="vm", proc=0, local=0, node=0))
    environ: dict[str, str] = {"RANK": "5", "OTHER": "x"}
    v.export(environ)
    assert environ["RANK"] == "0" and environ["WORLD_SIZE"] == "2" and environ["OTHER"] == "x"


@pytest.mark.parametrize(
    "nodes, tasks, nodelist, proc, local, node, fragment",
    [
        (2, 3, "a,b", 0, 0, 0, "same number of tasks on every node"),
        (1, 2, "a", 2, 0, 0, "does not fit 2 tasks"),
        (2, 4, "a", 0, 0, 0, "names 1 hosts"),
    ],
)
def test_inconsistent_variables_are_refused(slurm_task, nodes: int, tasks: int, nodelist: str, proc: int,
                                            local: int, node: int, fragment: str) -> None:
    with pytest.raises(SlurmEnvError, match=fragment):
        dist_vars(slurm_task("5", nodes=nodes, tasks=tasks, nodelist=nodelist, proc=proc, local=local,
                             node=node))


@pytest.mark.parametrize("port", ["abc", "0", "70000", "-1", ""])
def test_a_chosen_port_that_is_not_a_port_is_refused(slurm_task, port: str) -> None:
    with pytest.raises(SlurmEnvError, match=rf"TESSERA_MASTER_PORT='{port}': not a TCP port; set it"):
        dist_vars(slurm_task("99", nodes=1, tasks=1, nodelist="a", proc=0, local=0, node=0,
                             TESSERA_MASTER_PORT=port))
