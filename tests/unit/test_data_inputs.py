"""User inputs (files, directories, globs) resolved into what is read, by data.files and both data tools."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from tools import prepare_data, train_tokenizer
from train.config.schema import DataSection
from train.data.corpus import DataError, iter_documents
from train.data.inputs import InputError, resolve_inputs
from train.data.setup import setup_data

TEXT = "It is a truth universally acknowledged, that a single man in possession of a good fortune. " * 6


def _tree(root: Path) -> Path:
    """A user's folder: nested text files, JSONL, a saved dataset, files of other types, hidden, empty."""
    import datasets

    (root / "books" / "vol2").mkdir(parents=True)
    (root / "books" / "b.txt").write_text("B " + TEXT, encoding="utf-8")
    (root / "books" / "a.md").write_text("A " + TEXT, encoding="utf-8")
    (root / "books" / "vol2" / "c.rst").write_text("C " + TEXT, encoding="utf-8")
    (root / "books" / "vol2" / "empty.txt").touch()
    (root / "books" / "cover.png").write_bytes(b"\x89PNG\r\n\x1a\n\x00\xff")
    (root / "books" / "LICENSE").write_text("not a document", encoding="utf-8")
    (root / "books" / ".git").mkdir()
    (root / "books" / ".git" / "HEAD.txt").write_text("hidden", encoding="utf-8")
    (root / "books" / "rows.jsonl").write_text(json.dumps({"text": "row one"}) + "\n", encoding="utf-8")
    datasets.Dataset.from_dict({"text": ["saved one", "saved two"]}).save_to_disk(str(root / "books" / "saved"))
    return root / "books"


def test_a_directory_is_walked_by_suffix_with_the_rest_counted(tmp_path: Path) -> None:
    books = _tree(tmp_path)
    found = resolve_inputs([books])
    assert [p.relative_to(books).as_posix() for p in found.paths] == ["a.md", "b.txt", "rows.jsonl", "saved",
                                                                      "vol2/c.rst"]
    assert found.summary() == ("5 inputs (1 dataset, 1 jsonl, 3 text); skipped 1 empty file; "
                               "2 of other types (1 without suffix, 1 .png)")
    docs = list(iter_documents([books]))
    assert [d[:2] for d in docs] == ["A ", "B ", "ro", "sa", "sa", "C "]


def test_globs_and_named_files(tmp_path: Path) -> None:
    books = _tree(tmp_path)
    (tmp_path / "log.log").write_text("a log line", encoding="utf-8")
    # a glob that names its suffix reads what it names; one that does not reads the known types only
    assert [p.name for p in resolve_inputs([str(tmp_path / "*.log")]).paths] == ["log.log"]
    assert [p.name for p in resolve_inputs([str(books / "*")]).paths] == ["a.md", "b.txt", "rows.jsonl", "saved",
                                                                          "c.rst"]
    assert [p.name for p in resolve_inputs([str(tmp_path / "**" / "*.txt")]).paths] == ["b.txt"]
    (books / "vol2" / "loop").symlink_to(books)  # a link back up the tree is walked once
    assert len(resolve_inputs([books]).paths) == 5
    # a file named on its own is read whatever its suffix; one named twice is read once
    assert [p.name for p in resolve_inputs([books / "LICENSE", books / "b.txt", books]).paths] == [
        "LICENSE", "b.txt", "a.md", "rows.jsonl", "saved", "c.rst"]


def test_unusable_lists_are_one_clear_error(tmp_path: Path) -> None:
    books = _tree(tmp_path)
    with pytest.raises(InputError) as err:
        resolve_inputs([books, tmp_path / "missing", str(tmp_path / "nothing*.txt")], where="data.files")
    assert str(err.value) == (f"data.files: {tmp_path / 'missing'}: does not exist; {tmp_path / 'nothing*.txt'}: "
                              "the glob matches nothing; fix the paths or drop them")
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "x.bin").write_bytes(b"\x00")
    (tmp_path / "junk" / "y.txt").touch()
    with pytest.raises(DataError, match=r"leave no file to read \(skipped 1 empty file; 1 of other types "
                                        r"\(1 \.bin\)\); name non-empty text \(\.txt, "):
        resolve_inputs([tmp_path / "junk"])


def test_data_files_takes_a_directory_and_notices_a_changed_file(tmp_path: Path) -> None:
    texts = tmp_path / "texts"
    (texts / "part").mkdir(parents=True)
    for i in range(4):
        (texts / "part" / f"{i}.txt").write_text(f"{i} {TEXT}", encoding="utf-8")
    (texts / "README").write_text("skipped", encoding="utf-8")
    section = DataSection(corpus="files", files=[str(texts)], cache_dir=str(tmp_path / "cache"), vocab_size=300,
                          val_fraction=0.25)
    first = setup_data(section)
    assert first.data is not None and first.data.header["splits"]["train"]["n_docs"] == 3
    assert first.data.header["inputs"] == [str((texts / "part" / f"{i}.txt").resolve()) for i in range(4)]
    (texts / "part" / "0.txt").write_text(f"changed {TEXT}", encoding="utf-8")
    assert setup_data(section).prepared_dir != first.prepared_dir  # never stale tokens of an edited file


def test_the_tools_read_directories_and_report_bad_input_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    books = _tree(tmp_path)
    caplog.set_level(logging.INFO, logger="tessera")
    assert train_tokenizer.main([str(books), "--vocab-size", "300", "--out", str(tmp_path / "tok")]) == 0
    assert "inputs: 5 inputs (1 dataset, 1 jsonl, 3 text); skipped 1 empty file" in caplog.text
    assert prepare_data.main([str(books / "*.txt"), str(books / "vol2"), "--tokenizer", str(tmp_path / "tok"),
                              "--out", str(tmp_path / "data"), "--no-progress", "--val-fraction", "0.3"]) == 0
    header = json.loads((tmp_path / "data" / "header.json").read_text())
    assert [Path(p).name for p in header["inputs"]] == ["b.txt", "c.rst"]
    capsys.readouterr()
    assert prepare_data.main([str(tmp_path / "none"), "--tokenizer", str(tmp_path / "tok"),
                              "--out", str(tmp_path / "data2")]) == 2
    assert capsys.readouterr().err == f"tessera: error: inputs: {tmp_path / 'none'}: does not exist; " \
                                      "fix the paths or drop them\n"
    assert train_tokenizer.main(["--vocab-size", "300", "--out", str(tmp_path / "tok2")]) == 2
    assert capsys.readouterr().err.startswith("tessera: error: no inputs: pass files, directories or globs")
