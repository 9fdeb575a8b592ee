"""Every tool under tools/ and slurm/submit.py reports bad input the same way: `tessera: error: ...`, exit 2.

Each tool is run in this process (its `main(argv)`, as `python tools/X.py` runs it) with a bad option and with
one bad value its own checks catch; one tool also runs as a script. A bare `slurm/submit.py` picks the local
cluster's profile only when that cluster is up, else lists the profiles.
"""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from slurm import profile as slurm_profile
from slurm.submit import main as submit_main
from tests.conftest import REPO
from tools import (
    bench,
    embedding_probe,
    estimate_memory,
    evaluate_generations,
    export_hf,
    import_hf,
    plot_metrics,
    prepare_data,
    run_stages,
    tiny_hf_models,
    train_tokenizer,
)

Main = Callable[[list[str]], int]


def _cases(tmp: Path) -> list[tuple[str, Main, list[str], str]]:
    """(tool, main, argv, a fragment of the error line) for every tool: first a usage error, then its own check."""
    (tmp / "exists").mkdir(exist_ok=True)
    (tmp / "data.jsonl").write_text('{"prompt": "1+1=", "answer": "2"}\n', encoding="utf-8")
    out: list[tuple[str, Main, list[str], str]] = []
    own = {
        "bench": (bench.main, ["train-step", "--seq", "100000"], "exceeds the model's max_seq_len"),
        "bench_data": (bench.main, ["data-index", "--out", str(tmp / "exists")], "exists; give a new directory"),
        "embedding_probe": (embedding_probe.main, [str(tmp), "--k", "0"], "--k 0 is too small"),
        "estimate_memory": (estimate_memory.main, ["--suggest", "abacus"], "--suggest abacus: use"),
        "evaluate_generations": (evaluate_generations.main,
                                 ["--policy", str(tmp), "--data", str(tmp / "data.jsonl"), "--n", "3"],
                                 "need a verifier"),
        "export_hf": (export_hf.main, [str(tmp / "nope")], "nope"),
        "import_hf": (import_hf.main, [str(tmp / "nope")], "nope"),
        "plot_metrics": (plot_metrics.main, [str(tmp / "nope")], "no such metrics file"),
        "prepare_data": (prepare_data.main, [str(tmp / "nope"), "--tokenizer", str(tmp), "--out", str(tmp / "o")],
                         "does not exist"),
        "run_stages": (run_stages.main, [str(tmp / "nope.yaml")], "nope.yaml"),
        "tiny_hf_models": (tiny_hf_models.main, ["--seed", "many"], "invalid int value: 'many'"),
        "train_tokenizer": (train_tokenizer.main, ["--vocab-size", "300", "--out", str(tmp / "t")], "no inputs"),
        "slurm/submit.py": (submit_main, ["--profile", "nope", "--dry-run"], "--profile nope: no such profile"),
        "slurm/submit.py status": (submit_main, ["status", str(tmp / "nope")], "nope"),
        "slurm/submit.py stages": (submit_main, ["stages", str(tmp / "nope.yaml"), "--profile", "local",
                                                 "--dry-run"], "nope.yaml"),
    }
    for name, (main, argv, fragment) in own.items():
        valid = [] if name == "tiny_hf_models" else argv  # its own check is a usage error already
        out.append((name, main, [*valid, "--no-such-option"], "unrecognized arguments: --no-such-option"))
        out.append((name, main, argv, fragment))
    return out


def _run(main: Main, argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[object, str]:
    try:
        code: object = main(argv)
    except SystemExit as e:
        code = e.code
    return code, capsys.readouterr().err


def test_every_tool_says_tessera_error_and_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(slurm_profile, "local_cluster_up", lambda **_: False)
    failures = []
    for name, main, argv, fragment in _cases(tmp_path):
        code, err = _run(main, argv, capsys)
        lines = [line for line in err.splitlines() if "error" in line.lower()]
        ok = code == 2 and len(lines) == 1 and lines[0].startswith("tessera: error: ") and fragment in lines[0] \
            and "Traceback" not in err
        if not ok:
            failures.append(f"{name} {argv}: exit {code}, stderr {err!r}")
    assert not failures, "\n".join(failures)


def test_a_tool_run_as_a_script_exits_2_with_the_line(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, str(REPO / "tools" / "estimate_memory.py"), "--suggest", "abacus"],
                          capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 2
    assert proc.stderr.startswith("tessera: error: --suggest abacus: use ") and proc.stderr.count("\n") == 1


def _fake_sinfo(bin_dir: Path, answer: str) -> None:
    bin_dir.mkdir(exist_ok=True)
    script = bin_dir / "sinfo"
    script.write_text(f"#!/bin/sh\n[ \"$3\" = local ] || exit 3\necho '{answer}'\n")
    script.chmod(script.stat().st_mode | stat.S_IEXEC)


def test_the_local_cluster_is_detected_from_its_config_and_sinfo(tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    conf = tmp_path / "slurm.conf"
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
    _fake_sinfo(tmp_path / "bin", "up")
    assert not slurm_profile.local_cluster_up(conf=conf)  # no configuration at all
    conf.write_text("ClusterName=site\n")
    assert not slurm_profile.local_cluster_up(conf=conf)  # another cluster's
    conf.write_text(f"{slurm_profile.LOCAL_CLUSTER_MARK}: one node, root runs everything.\n")
    assert slurm_profile.local_cluster_up(conf=conf)
    _fake_sinfo(tmp_path / "bin", "down")
    assert not slurm_profile.local_cluster_up(conf=conf)


def test_bare_submit_uses_the_local_cluster_or_lists_the_profiles(monkeypatch: pytest.MonkeyPatch,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(slurm_profile, "local_cluster_up", lambda **_: False)
    assert submit_main([]) == 2
    err = capsys.readouterr().err
    assert err.startswith("tessera: error: no --profile given and no local cluster is up")
    for name in slurm_profile.known_profiles():
        assert f"\n  {name} " in err
    monkeypatch.setattr(slurm_profile, "local_cluster_up", lambda **_: True)
    assert submit_main(["--dry-run"]) == 0
    out, err = capsys.readouterr()
    assert "profile local: the local cluster (slurm/local_cluster.sh) is up" in err
    assert "# job (profile local; nothing was queued)" in out
    assert "train/configs/shakespeare.yaml" in out  # the default recipe


def test_submit_help_lists_every_command_with_an_example(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as done:
        submit_main(["--help"])
    assert done.value.code == 0
    text = capsys.readouterr().out
    for command in ("status 12", "tail 12", "cancel runs/", "summary runs/", "profiles", "stages train/"):
        assert f"python slurm/submit.py {command}" in text
