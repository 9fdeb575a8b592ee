"""Per-node status, per-node logs, restarts and lost time, read from recorded job data: the submitit logs and
checkpoint of a 2-node job that lost a node and was requeued onto one (no cluster needed)."""

from __future__ import annotations

import dataclasses
import json
from datetime import datetime
from pathlib import Path

import pytest

from slurm import jobs
from slurm.runlog import JobHistory, format_seconds, job_history, node_views, parse_accounted, task_starts
from slurm.submit import main as submit_main

JOB = "7"


def _start(when: str, host: str, local: int, node: int, nodes: int, rank: int, world: int) -> str:
    return (f"submitit INFO (2026-12-07 {when},896) - Starting with JobEnvironment(job_id={JOB}, hostname={host}, "
            f"local_rank={local}({world // nodes}), node={node}({nodes}), global_rank={rank}({world}))\n"
            f"submitit INFO (2026-12-07 {when},897) - Loading pickle: /x/{JOB}_submitted.pkl\n")


def _recorded_job(tmp_path: Path, *, requeued: bool = True, keep_checkpoint: bool = True,
                  restart_at: str = "13:03:20", saved_in_log: bool = False) -> jobs.JobRecord:
    """Run 1 on n1 + n2 (2 tasks each) saved step 50 at 13:02:40 and lost n2; run 2, on n1 alone, resumed
    step 50 at 13:03:31."""
    out, folder = tmp_path / "run", tmp_path / "run" / "slurm"
    folder.mkdir(parents=True)
    ckpt = out / "checkpoints" / "step_00000050"
    if keep_checkpoint:
        ckpt.mkdir(parents=True)
        saved = datetime(2026, 12, 7, 13, 2, 40).timestamp()
        (ckpt / "tessera.json").write_text(json.dumps({"step": 50, "saved_at": saved}))
    for rank in range(4):
        node, host = divmod(rank, 2)[0], f"n{rank // 2 + 1}"
        text = _start("13:02:17", host, rank % 2, node, 2, rank, 4)
        if requeued and rank < 2:
            text += _start(restart_at, "n1", rank, 0, 1, rank, 2)
        (folder / f"{JOB}_{rank}_log.out").write_text(text)
        err = f"13:02:30 tessera: world 4 (dp 4 x tp 1 x pp 1)\nstep 50: checkpoint saved to {ckpt}\n" \
            if rank == 0 else ""
        if requeued and rank == 0:
            err += "srun: error: n2: tasks 2-3: Killed\n" \
                   f"13:03:31 tessera: resumed from {ckpt} at step 50 (400 samples consumed)" + \
                   (", saved 2026-12-07 13:02:40\n" if saved_in_log else "\n")
        (folder / f"{JOB}_{rank}_log.err").write_text(err + f"task {rank} last line\n")
    (out / "metrics.jsonl").write_text(json.dumps({"step": 60, "loss": 2.0}) + "\n")
    record = jobs.JobRecord(job_id=JOB, folder=str(folder), out_dir=str(out), tasks=4, name="run")
    (out / jobs.RECORD_FILE).write_text(json.dumps(dataclasses.asdict(record)))
    return record


def test_each_task_is_placed_on_its_node(tmp_path: Path) -> None:
    record = _recorded_job(tmp_path, requeued=False)
    starts = task_starts(Path(record.folder, f"{JOB}_3_log.out").read_text())
    assert [(s.task, s.hostname, s.node, s.local_rank, s.world_size) for s in starts] == [(3, "n2", 1, 1, 4)]
    views = node_views(record.folder, JOB, {"n1": "allocated", "n2": "down"})
    assert [(v.index, v.name, v.tasks, v.state) for v in views] == [(0, "n1", [0, 1], "allocated"),
                                                                     (1, "n2", [2, 3], "down")]
    assert views[1].log == Path(record.folder) / f"{JOB}_2_log.err"
    assert views[1].line() == f"node 1 n2: down, tasks 2-3, log {views[1].log}"
    # after the requeue onto n1 alone, tasks 2-3 of the earlier run are not part of the job's nodes
    record = _recorded_job(tmp_path / "again")
    assert [(v.name, v.tasks, v.state) for v in node_views(record.folder, JOB)] == [("n1", [0, 1], "-")]


def test_restarts_and_lost_time(tmp_path: Path) -> None:
    record = _recorded_job(tmp_path)
    ended = parse_accounted(f"{JOB}|NODE_FAIL\n{JOB}|RUNNING\n8|COMPLETED\n", JOB)
    assert ended == ["NODE_FAIL", "RUNNING"]
    past = job_history(record.folder, JOB, ended)
    assert past.restarts == 1 and [r.hosts for r in past.runs] == [["n1", "n2"], ["n1"]]
    first, second = past.runs
    assert first.resumed_step is None and first.ended_as == "NODE_FAIL" and second.ended_as is None
    assert second.resumed_step == 50 and second.resumed_at == datetime(2026, 12, 7, 13, 3, 31)
    assert second.lost_s == 51.0 and past.lost_s == 51.0 and past.lost_words() == "51s"
    assert past.lines() == ["start: 2026-12-07 13:02:17 on n1,n2, from step 0; ended NODE_FAIL",
                            "restart 1: 2026-12-07 13:03:20 on n1, resumed step 50, lost 51s"]
    # the checkpoint removed since (train.keep_last): the restart is counted, its lost time is not known
    gone = job_history(_recorded_job(tmp_path / "gone", keep_checkpoint=False).folder, JOB)
    assert gone.restarts == 1 and gone.runs[1].lost_s is None and gone.unknown == 1
    assert gone.lost_text() == "0s+1?" and "whose checkpoint is gone" in gone.lost_words()
    assert "lost time not known" in gone.lines()[1]
    # the trainer's line says when the checkpoint was saved: known without the checkpoint
    said = _recorded_job(tmp_path / "said", keep_checkpoint=False, saved_in_log=True)
    assert job_history(said.folder, JOB).runs[1].lost_s == 51.0
    # a requeue that starts again 20 s later: each task's start still goes with its own run
    fast = _recorded_job(tmp_path / "fast", restart_at="13:02:37")
    assert [r.hosts for r in job_history(fast.folder, JOB).runs] == [["n1", "n2"], ["n1"]]
    assert [v.name for v in node_views(fast.folder, JOB)] == ["n1"]


def test_a_resumed_line_after_midnight_belongs_to_its_run(tmp_path: Path) -> None:
    folder = tmp_path / "slurm"
    folder.mkdir()
    (folder / f"{JOB}_0_log.out").write_text(
        _start("23:59:50", "n1", 0, 0, 1, 0, 1).replace("2026-12-07", "2026-12-06"))
    (folder / f"{JOB}_0_log.err").write_text("00:00:05 tessera: resumed from /gone at step 3 (9 samples)\n")
    run = job_history(folder, JOB).runs[0]
    assert run.resumed_at == datetime(2026, 12, 7, 0, 0, 5) and run.resumed_step == 3
    assert JobHistory(runs=[run]).restarts == 0  # a job that starts from an earlier job's checkpoint
    assert [format_seconds(s) for s in (0, 59.6, 75, 3725)] == ["0s", "1m00s", "1m15s", "1h02m"]


def test_status_and_summary_text(tmp_path: Path) -> None:
    record = _recorded_job(tmp_path)
    past = job_history(record.folder, JOB, ["NODE_FAIL", "RUNNING"])
    state = jobs.JobState(job_id=JOB, state="RUNNING", exit_code="0:0", elapsed="00:00:30", restarts=0)
    nodes = node_views(record.folder, JOB, {"n1": "allocated"})
    lines = jobs.status_text(record, state, nodes, past).splitlines()
    assert lines[0] == f"{JOB}  run  RUNNING  exit 0:0  elapsed 00:00:30  restarts 1  step 60"
    assert lines[1] == f"  node 0 n1: allocated, tasks 0-1, log {record.folder}/{JOB}_0_log.err"
    assert lines[2].startswith("  restarts: 1, lost 51s (details: python slurm/submit.py summary ")
    assert jobs.status_text(record, None, [], JobHistory(runs=[])).splitlines()[1:3] == [
        "  nodes: none yet (no task has started)", f"  run: {record.out_dir}"]
    Path(record.out_dir, "summary.json").write_text(json.dumps({"val_loss": 1.98764}))
    summary = jobs.summary_text(record, dataclasses.replace(state, state="COMPLETED"), past).splitlines()
    assert summary[0] == f"{JOB}  run  COMPLETED (exit 0:0)  step 60  val_loss 1.9876"
    assert summary[1:] == ["restarts: 1, lost 51s", *(f"  {line}" for line in past.lines())]


def test_tail_by_node(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    record = _recorded_job(tmp_path, requeued=False)
    assert submit_main(["tail", record.out_dir, "--node", "all", "--lines", "1"]) == 0
    out = capsys.readouterr().out
    assert out.count("=== node ") == 2 and "task 0 last line" in out and "task 2 last line" in out
    assert "task 1 last line" not in out  # each node's first task only
    assert submit_main(["tail", record.out_dir, "--node", "n2", "--lines", "1"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("=== node 1 n2: -, tasks 2-3") and "task 0 last line" not in out
    assert submit_main(["tail", record.out_dir, "--node", "n9"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [(f"tessera: error: --node n9: not a node of job {JOB}; its nodes are 0 (n1), 1 (n2), or "
                    "give all.")]


def test_summary_of_a_directory_that_is_neither_run_nor_sweep(tmp_path: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    assert submit_main(["summary", str(tmp_path)]) == 2
    assert capsys.readouterr().err.strip() == (
        f"tessera: error: summary {tmp_path}: neither a sweep (sweep.json) nor a submitted run "
        f"(slurm_job.json); give the out_dir of a run or sweep slurm/submit.py submitted.")
