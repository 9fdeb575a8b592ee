"""A user's own files for every corpus that reads them: directories and globs for the supervised corpora
(sft, preference, classification, seq2seq) and for streamed sources, resolved by `train.data.inputs`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from train.data.corpus import DataError
from train.data.streaming import _open_source, source_files


def test_a_stream_source_directory_of_text_files_is_one_document_per_file(tmp_path: Path) -> None:
    folder = tmp_path / "notes"
    (folder / "sub").mkdir(parents=True)
    (folder / "a.txt").write_text("first line of a\nsecond line of a\n")
    (folder / "sub" / "b.md").write_text("b, one\nb, two\nb, three\n")
    (folder / "empty.txt").touch()
    (folder / "picture.png").write_bytes(b"\x89PNG")
    assert source_files(str(folder)) == [folder / "a.txt", folder / "sub" / "b.md"]
    docs = [row["text"] for row in _open_source(str(folder), "text")]
    assert docs == ["first line of a\nsecond line of a\n", "b, one\nb, two\nb, three\n"]
    (tmp_path / "mixed").mkdir()
    (tmp_path / "mixed" / "a.txt").write_text("text\n")
    (tmp_path / "mixed" / "b.jsonl").write_text(json.dumps({"text": "row"}) + "\n")
    with pytest.raises(DataError, match=r"mixes file types \['json', 'text'\]"):
        _open_source(str(tmp_path / "mixed"), "text")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "data.bin").write_bytes(b"\0\1")
    with pytest.raises(DataError, match=r"leave no file to read \(skipped 1 of other types \(1 \.bin\)\)"):
        source_files(str(tmp_path / "other"))
