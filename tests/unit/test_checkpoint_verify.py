"""Checkpoint trust without a training run: weights-only loads, the RNG file format, file lists and checks."""

from __future__ import annotations

import json
import logging
import os
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from train.checkpoint.files import FILES_KEY, checkpoint_files, describe_files
from train.checkpoint.safe_load import RefusedFile, UnreadableFile, load, probe, weights_only_loads
from train.checkpoint.verify import BadCheckpoint, damage_report, newest_verified, verified, verify
from train.checkpoint.writer import (
    META_FILE,
    CheckpointError,
    _short,
    check_free_space,
    check_out_dir,
    rng_state,
    set_rng_state,
)


class Payload:
    """Pickles as a call of os.system: loading it with weights_only=False creates ``marker``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _planted(tmp_path: Path) -> tuple[Path, Path]:
    marker, path = tmp_path / "ran", tmp_path / "evil.pt"
    torch.save({"weight": torch.ones(3), "extra": Payload(marker)}, path)
    return path, marker


def test_payload_is_refused_in_one_line_and_never_runs(tmp_path: Path) -> None:
    path, marker = _planted(tmp_path)
    for read in (lambda: load(path), lambda: probe(path)):
        with pytest.raises(RefusedFile) as err:
            read()
        assert str(path) in str(err.value) and "holds objects a weights-only load refuses (posix.system)" in \
            str(err.value)
        assert "\n" not in str(err.value)
    assert not marker.exists()
    torch.load(path, weights_only=False)  # the payload is real: an unguarded load runs it
    assert marker.exists()


def test_deepspeed_style_call_inside_the_block_is_weights_only(tmp_path: Path) -> None:
    """DeepSpeed calls torch.load(..., weights_only=False); inside weights_only_loads that call is refused."""
    path, marker = _planted(tmp_path)
    original = torch.load
    with weights_only_loads():
        assert torch.load is not original
        with pytest.raises(RefusedFile):
            torch.load(path, map_location="cpu", weights_only=False)
        good = tmp_path / "good.pt"
        torch.save({"w": torch.arange(4)}, good)
        assert torch.equal(torch.load(good, weights_only=False)["w"], torch.arange(4))
    assert torch.load is original
    assert not marker.exists()


def test_damaged_file_is_unreadable_not_refused(tmp_path: Path) -> None:
    path = tmp_path / "t.pt"
    torch.save({"w": torch.randn(1000)}, path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(UnreadableFile, match="unreadable"):
        load(path)
    with pytest.raises(FileNotFoundError):  # DeepSpeed probes optional files and handles their absence
        load(tmp_path / "absent.pt")


def test_rng_file_is_weights_only_and_restores_every_generator(tmp_path: Path) -> None:
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    path = tmp_path / "rng_rank00000.pt"
    torch.save(rng_state(), path)
    want = (random.random(), np.random.rand(), torch.rand(1).item())
    random.seed(9)
    np.random.seed(9)
    torch.manual_seed(9)
    set_rng_state(load(path))  # no numpy allowance needed
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == want


def test_rng_file_of_the_first_format_loads_weights_only(tmp_path: Path) -> None:
    np.random.seed(5)
    path = tmp_path / "rng_rank00000.pt"
    torch.save({"python": random.getstate(), "numpy": np.random.get_state(),
                "torch": torch.get_rng_state()}, path)
    want = np.random.rand()
    with pytest.raises(RefusedFile):  # numpy arrays are allowed only where the old RNG format needs them
        load(path)
    set_rng_state(load(path, rng=True))
    assert np.random.rand() == want


def _checkpoint(root: Path, step: int, *, files: bool = True) -> Path:
    """A fake complete checkpoint: two files and a tessera.json listing them."""
    tag = root / "checkpoints" / f"step_{step:08d}"
    tag.mkdir(parents=True)
    torch.save({"module": {"w": torch.full((256,), float(step))}}, tag / "mp_rank_00_model_states.pt")
    torch.save(rng_state(), tag / "rng_rank00000.pt")
    meta = {"step": step}
    if files:
        meta[FILES_KEY] = describe_files(tag, checkpoint_files(tag, meta_file=META_FILE))
    (tag / META_FILE).write_text(json.dumps(meta))
    return tag


def _flip_byte(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 1
    path.write_bytes(bytes(data))


def test_file_list_catches_a_cut_file_always_and_a_flipped_byte_with_checksums(tmp_path: Path) -> None:
    tag = _checkpoint(tmp_path, 10)
    assert verify(tag, checksums=True)["step"] == 10
    model = tag / "mp_rank_00_model_states.pt"
    saved = model.read_bytes()
    _flip_byte(model, len(saved) // 2)  # inside tensor data: loads without error
    assert torch.load(model, weights_only=True)["module"]["w"].shape == (256,)
    verify(tag, checksums=False)  # same size
    with pytest.raises(BadCheckpoint, match="mp_rank_00_model_states.pt differs from the file saved"):
        verify(tag, checksums=True)
    model.write_bytes(saved[:-10])
    with pytest.raises(BadCheckpoint, match=r"has [\d,]+ bytes, [\d,]+ were saved"):
        verify(tag, checksums=False)
    model.unlink()
    with pytest.raises(BadCheckpoint, match="is missing"):
        verify(tag, checksums=False)


def test_auto_falls_back_to_the_newest_checkpoint_that_verifies(tmp_path: Path) -> None:
    _checkpoint(tmp_path, 10)
    second = _checkpoint(tmp_path, 20)
    third = _checkpoint(tmp_path, 30)
    (third / META_FILE).write_text("{not json")
    model = second / "mp_rank_00_model_states.pt"
    model.write_bytes(model.read_bytes()[:100])
    warnings: list[str] = []
    found = newest_verified(tmp_path, checksums=False, warn=warnings.append)
    assert found is not None and found.name == "step_00000010"
    assert len(warnings) == 2
    assert "step_00000030" in warnings[0] and "not valid JSON" in warnings[0]
    assert "step_00000020" in warnings[1] and str(model) in warnings[1]
    with pytest.raises(BadCheckpoint, match="not valid JSON"):  # named outright: an error
        verified(third, checksums=False)


def test_a_planted_file_is_refused_not_skipped(tmp_path: Path) -> None:
    _checkpoint(tmp_path, 10)
    tag = _checkpoint(tmp_path, 20)
    marker = tmp_path / "ran"
    torch.save({"module": {}, "x": Payload(marker)}, tag / "mp_rank_00_model_states.pt")  # size changes
    with pytest.raises(RefusedFile, match="posix.system"):
        newest_verified(tmp_path, checksums=False)
    assert not marker.exists()


def test_checkpoint_without_file_list_loads_with_a_note(tmp_path: Path) -> None:
    tag = _checkpoint(tmp_path, 10, files=False)
    notes: list[str] = []
    assert newest_verified(tmp_path, checksums=True, info=notes.append) == tag
    assert len(notes) == 1 and "without a file list" in notes[0]


def test_damage_report_compares_with_the_recorded_checksum(tmp_path: Path) -> None:
    tag = _checkpoint(tmp_path, 10)
    model = tag / "mp_rank_00_model_states.pt"
    assert "it was written this way" in damage_report(tag, model)
    _flip_byte(model, 40)
    assert "damaged after the save" in damage_report(tag, model)
    assert "--verify-checksums" in damage_report(tag, model)


def test_out_dir_below_a_file_is_one_line(tmp_path: Path) -> None:
    afile = tmp_path / "afile"
    afile.write_text("x")
    for out in (afile / "run", afile / "a" / "b", afile):
        with pytest.raises(CheckpointError, match=f"{afile} is a file, not a directory"):
            check_out_dir(out)
        with pytest.raises(CheckpointError, match="is a file"):
            check_free_space(out, 1, "one checkpoint")
    check_out_dir(tmp_path / "new" / "run")


def test_write_errors_are_one_short_line() -> None:
    enforce = RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 128 vs 0\nframe #0: .")
    assert _short(enforce) == "torch.save failed (unexpected pos 128 vs 0)"
    assert _short(OSError(28, "No space left on device")) == "[Errno 28] No space left on device"
    assert _short(ValueError("bad\nmore")) == "ValueError: bad"


def test_verification_logs_nothing_for_a_good_checkpoint(tmp_path: Path,
                                                         caplog: pytest.LogCaptureFixture) -> None:
    tag = _checkpoint(tmp_path, 10)
    with caplog.at_level(logging.INFO, logger="tessera"):
        assert newest_verified(tmp_path, checksums=True) == tag
    assert not caplog.records


@pytest.mark.parametrize("meta, field", [
    ({"step": "x"}, "step is str"), ({"model_args": "x"}, "model_args is str"),
    ({"config": []}, "config is list"),
    ({"config": {"parallel": {"tp": "2"}}}, "config.parallel.tp is str"), ({"files": [1]}, "files is list"),
    ({"world_size": True}, "world_size is bool"),
])
def test_metadata_of_the_wrong_shape_is_damage(tmp_path: Path, meta: dict, field: str) -> None:
    tag = _checkpoint(tmp_path, 10)
    (tag / META_FILE).write_text(json.dumps(meta))
    with pytest.raises(BadCheckpoint, match=f"tessera.json: {field} "):
        verified(tag, checksums=False)
    assert newest_verified(tmp_path, checksums=False, warn=lambda msg: None) is None
