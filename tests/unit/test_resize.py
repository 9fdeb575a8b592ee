"""Resuming on another world size, the parts without processes: the decision, the config, the copy's place."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from train.checkpoint.resize import (
    SOURCE_FILE,
    Resize,
    convert,
    describe,
    is_current,
    plan_resize,
    universal_dir,
    universal_switch,
)
from train.checkpoint.writer import CheckpointError, complete_checkpoints, latest_complete


def _checkpoint(root: Path, step: int, *, saved_at: float = 1.0, world_size: int = 2) -> Path:
    tag_dir = root / "checkpoints" / f"step_{step:08d}"
    tag_dir.mkdir(parents=True)
    (tag_dir / "tessera.json").write_text(json.dumps({"step": step, "saved_at": saved_at, "world_size": world_size}))
    return tag_dir


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_same_world_size_needs_nothing(stage: int) -> None:
    assert plan_resize({"world_size": 4}, world_size=4, zero_stage=stage) is None


def test_unknown_world_size_is_taken_as_the_same() -> None:
    assert plan_resize({}, world_size=3, zero_stage=2) is None


@pytest.mark.parametrize("stage, universal", [(0, False), (1, True), (2, True), (3, True)])
def test_another_world_size_needs_a_universal_copy_only_under_zero_1_to_3(stage: int, universal: bool) -> None:
    resize = plan_resize({"world_size": 2}, world_size=1, zero_stage=stage)
    assert resize == Resize(saved_world_size=2, world_size=1, zero_stage=stage)
    assert resize.needs_universal is universal


class _Config:
    load_universal_checkpoint = False


class _Engine:
    def __init__(self) -> None:
        self._config = _Config()


def test_universal_switch_is_on_inside_the_block_only() -> None:
    engine = _Engine()
    with universal_switch(engine):
        assert engine._config.load_universal_checkpoint is True
    assert engine._config.load_universal_checkpoint is False
    with pytest.raises(ValueError), universal_switch(engine):
        raise ValueError("a failed load")
    assert engine._config.load_universal_checkpoint is False


def test_universal_switch_without_the_switch_is_one_clear_error() -> None:
    with pytest.raises(CheckpointError, match="no load_universal switch"), universal_switch(object()):
        pass


def test_the_copy_lies_beside_the_checkpoint_and_is_never_resumed_from(tmp_path: Path) -> None:
    tag_dir = _checkpoint(tmp_path, 10)
    copy = universal_dir(tag_dir)
    assert copy == tmp_path / "checkpoints" / "step_00000010.universal"
    copy.mkdir()
    (copy / "tessera.json").write_text("{}")  # even with metadata in it
    assert complete_checkpoints(tmp_path) == [tag_dir]
    assert latest_complete(tmp_path) == tag_dir


def test_a_copy_of_this_save_is_reused_without_converting(tmp_path: Path) -> None:
    tag_dir = _checkpoint(tmp_path, 10)
    assert not is_current(tag_dir)
    copy = universal_dir(tag_dir)
    copy.mkdir()
    (copy / SOURCE_FILE).write_text(json.dumps({"tag": tag_dir.name, "step": 10, "saved_at": 1.0,
                                                "world_size": 2}))
    assert is_current(tag_dir)
    assert convert(tag_dir) == copy  # no DeepSpeed files here: a conversion would fail


def test_a_copy_of_an_earlier_save_of_the_same_step_is_stale(tmp_path: Path) -> None:
    tag_dir = _checkpoint(tmp_path, 10, saved_at=2.0)  # saved again after a rollback
    copy = universal_dir(tag_dir)
    copy.mkdir()
    (copy / SOURCE_FILE).write_text(json.dumps({"tag": tag_dir.name, "step": 10, "saved_at": 1.0,
                                                "world_size": 2}))
    assert not is_current(tag_dir)


def test_log_line_says_what_happened(tmp_path: Path) -> None:
    tag_dir = tmp_path / "step_00000010"
    zero0 = describe(Resize(2, 4, 0), tag_dir, reused=False)
    assert zero0 == "world size changed from 2 to 4: the ZeRO-0 checkpoint step_00000010 loads as saved"
    zero2 = describe(Resize(2, 1, 2), tag_dir, reused=False)
    assert zero2 == ("world size changed from 2 to 1: ZeRO-2 checkpoint step_00000010, converted it to a "
                     "universal checkpoint step_00000010.universal")
    assert "reused its universal copy" in describe(Resize(2, 1, 3), tag_dir, reused=True)
