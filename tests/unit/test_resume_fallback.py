"""Which checkpoint a resume takes when the newest one is damaged: ``auto`` and ``latest`` fall back to the
previous complete one with a warning naming the file; a damaged checkpoint named outright is one error."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from tests.conftest import SMOKE
from train.checkpoint.files import FILES_KEY, describe_files
from train.checkpoint.writer import CheckpointError
from train.config.load import load_config
from train.plan import _resume_target


def _checkpoint(root: Path, step: int) -> Path:
    """A complete checkpoint directory with one file and its recorded size and sha256."""
    tag = root / "checkpoints" / f"step_{step:08d}"
    tag.mkdir(parents=True)
    (tag / "mp_rank_00_model_states.pt").write_bytes(bytes(range(256)) * 40)
    files = describe_files(tag, ["mp_rank_00_model_states.pt"])
    (tag / "tessera.json").write_text(json.dumps({"step": step, FILES_KEY: files}))
    return tag


@pytest.mark.parametrize("resume", ["auto", "latest"])
def test_damaged_newest_falls_back_with_a_warning(tmp_path: Path, resume: str,
                                                  caplog: pytest.LogCaptureFixture) -> None:
    run = tmp_path / "run"
    older, newest = _checkpoint(run, 10), _checkpoint(run, 20)
    (run / "checkpoints" / "latest").write_text(newest.name)
    damaged = newest / "mp_rank_00_model_states.pt"
    damaged.write_bytes(damaged.read_bytes()[:1000])  # cut short, as by a full disk or a failed copy
    cfg = load_config(SMOKE, [f"train.out_dir={run}"])
    with caplog.at_level(logging.WARNING, logger="tessera"):
        assert _resume_target(cfg, resume) == older
    assert f"skipping step_00000020: {damaged} has 1,000 bytes, 10,240 were saved" in caplog.text

    with pytest.raises(CheckpointError, match=rf"--resume {newest}: {damaged} has 1,000 bytes"):
        _resume_target(cfg, str(newest))

    (older / "tessera.json").write_text('{"step": 10,')  # nothing left that verifies
    with pytest.raises(CheckpointError, match=rf"--resume {resume}: no checkpoint in .* verifies"):
        _resume_target(cfg, resume)
