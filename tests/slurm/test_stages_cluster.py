"""A chain of stages on the local SLURM cluster: one job per stage chained with afterok; a failed stage
cancels the rest."""

from __future__ import annotations

import itertools
import json
import subprocess
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
import yaml

from slurm.jobs import JobRecord, wait_final
from tests.conftest import REPO, SMOKE
from tests.slurm.test_cluster import cluster, job_env, submit  # noqa: F401  (module fixtures, shared cluster)

pytestmark = pytest.mark.slow

EXAMPLE = REPO / "train" / "configs" / "stages_cpu.yaml"
JOB_TIMEOUT_S = 420


def _times(job_id: str) -> tuple[datetime, datetime]:
    out = subprocess.run(["sacct", "-j", job_id, "-X", "-n", "-P", "-o", "Start,End"], capture_output=True,
                         text=True, timeout=30, check=True).stdout.split()[-1]
    start, end = out.split("|")
    return datetime.fromisoformat(start), datetime.fromisoformat(end)


def _dependency(job_id: str) -> str:
    out = subprocess.run(["scontrol", "-o", "show", "job", job_id], capture_output=True, text=True,
                         timeout=30, check=True).stdout
    return next(t for t in out.split() if t.startswith("Dependency=")).split("=", 1)[1]


def _jobs(out_dir: Path) -> list[dict[str, Any]]:
    return json.loads((out_dir / "stage_jobs.json").read_text())


def test_stages_run_as_a_chain_of_dependent_jobs(cluster: None, job_env: dict[str, str],  # noqa: F811
                                                 data_cache: Path, tmp_path: Path) -> None:
    raw = yaml.safe_load(EXAMPLE.read_text())
    # pretrain -> SFT -> DPO (the reward stage runs in tests/e2e/test_stages_e2e.py)
    raw["stages"] = raw["stages"][:3]
    raw["out_dir"] = str(tmp_path / "runs")
    raw["overrides"] += [f"data.cache_dir={data_cache}"]
    raw["stages"][0]["overrides"] += ["train.steps=20", "train.eval_interval=10", "train.save_interval=10"]
    path = tmp_path / "stages.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    # the second chain's first stage fails in its job (an SFT file without responses): the rest never runs
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "Question: what is 1 plus 1? Answer:"}\n')
    failing = tmp_path / "failing.yaml"
    failing.write_text(yaml.safe_dump({
        "out_dir": str(tmp_path / "failing"), "overrides": [f"data.cache_dir={data_cache}"], "stages": [
            {"name": "first", "config": str(SMOKE),
             "overrides": ["data.corpus=files", f"data.files=[{bad}]"]},
            {"name": "second", "config": str(SMOKE), "start_key": "model.init_from"}]}))

    proc = submit(job_env, "stages", str(path), "--profile", "local")
    assert proc.returncode == 0, proc.stderr
    jobs = _jobs(tmp_path / "runs")
    ids = [j["job_id"] for j in jobs]
    assert [j["stage"] for j in jobs] == ["pretrain", "sft", "dpo"]
    assert [j["after"] for j in jobs] == [None, *ids[:2]]
    assert proc.stdout.splitlines()[:3] == [
        f"submitted {ids[0]}: stage pretrain -> {tmp_path / 'runs' / 'pretrain'}",
        f"submitted {ids[1]}: stage sft (after {ids[0]}) -> {tmp_path / 'runs' / 'sft'}",
        f"submitted {ids[2]}: stage dpo (after {ids[1]}) -> {tmp_path / 'runs' / 'dpo'}"]
    assert _dependency(ids[1]) == f"afterok:{ids[0]}(unfulfilled)"  # queued behind the pretraining job
    bad_proc = submit(job_env, "stages", str(failing), "--profile", "local", "--wait", str(JOB_TIMEOUT_S),
                      timeout=JOB_TIMEOUT_S * 2 + 60)
    assert bad_proc.returncode == 1, bad_proc.stdout + bad_proc.stderr
    bad_ids = [j["job_id"] for j in _jobs(tmp_path / "failing")]
    assert f"{bad_ids[0]} (first): FAILED (exit " in bad_proc.stdout, bad_proc.stdout
    assert "tessera: error: " in bad_proc.stderr, bad_proc.stderr  # the failed job's log tail
    assert f"{bad_ids[1]} (second): CANCELLED" in bad_proc.stdout  # its dependency can never be met
    assert not (tmp_path / "failing" / "second" / "metrics.jsonl").exists()

    for job_id in ids:
        state = wait_final(job_id, JOB_TIMEOUT_S)
        run_dir = tmp_path / "runs" / jobs[ids.index(job_id)]["stage"]
        record = JobRecord(**json.loads((run_dir / "slurm_job.json").read_text()))
        assert state.state == "COMPLETED", submit(job_env, "tail", record.job_id).stdout
    spans = [_times(job_id) for job_id in ids]
    print("stage jobs (start, end):", [(s.isoformat(), e.isoformat()) for s, e in spans])
    for (_, end), (start, _) in itertools.pairwise(spans):
        assert start >= end  # each stage started after the one before it ended
    runs = tmp_path / "runs"
    for name in ("pretrain", "sft", "dpo"):
        assert (runs / name / "summary.json").is_file()
        assert (runs / name / "export" / "model.safetensors").is_file()
    sft_log = Path(runs / "sft" / "slurm" / f"{ids[1]}_0_log.err").read_text()
    assert f"HF model {runs / 'pretrain' / 'export'} (llama" in sft_log
    assert f"stage 'sft': latest checkpoint exported to {runs / 'sft' / 'export'}" in sft_log
    # submitted again, the finished chain queues nothing
    again = submit(job_env, "stages", str(path), "--profile", "local")
    assert again.returncode == 0 and "submitted" not in again.stdout, again.stdout + again.stderr
    assert again.stdout.splitlines() == [f"stage {n}: finished, not queued"
                                         for n in ("pretrain", "sft", "dpo")]
