"""A user's own files for every corpus that reads them: directories and globs for the supervised corpora
(sft, preference, classification, seq2seq) and for streamed sources, resolved by `train.data.inputs`."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from train.config.schema import DataSection
from train.data.corpus import DataError
from train.data.setup import _supervised_datasets, setup_data
from train.data.streaming import _open_source, source_files
from train.data.supervised import Renderer, SupervisedDataset, read_classification, supervised_files
from train.data.tokenizer import load_tokenizer, train_bpe_tokenizer

WORDS = "user assistant system: hello world, how are you? the answer is 42. good bad\n"


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("own_tok")
    (root / "c.txt").write_text(WORDS * 40)
    return train_bpe_tokenizer([root / "c.txt"], 300, root / "tok")


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def _chat(i: int) -> dict:
    return {"messages": [{"role": "user", "content": f"question {i}"}, {"role": "assistant", "content": f"{i}"}]}


def test_sft_reads_a_directory_tree_sorted_with_empty_and_other_files_counted(
    tok_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    chats = tmp_path / "chats"
    _jsonl(chats / "b" / "part2.jsonl", [_chat(i) for i in range(6, 10)])
    _jsonl(chats / "a.jsonl", [_chat(i) for i in range(3)])
    _jsonl(chats / "b" / "part1.json", [_chat(i) for i in range(3, 6)])
    (chats / "b" / "empty.jsonl").touch()
    (chats / "README.md").write_text("how these chats were collected\n")
    assert supervised_files([chats]).paths == [chats / "a.jsonl", chats / "b" / "part1.json",
                                               chats / "b" / "part2.jsonl"]
    d = DataSection(corpus="sft", files=[str(chats)], tokenizer=str(tok_dir), seq_len=32, val_fraction=0.2)
    with caplog.at_level("INFO", logger="tessera"):
        bundle = setup_data(d)
    assert "data.files: 3 inputs (3 jsonl); skipped 1 empty file; 1 of other types (1 .md)" in caplog.text
    train, val = _supervised_datasets(d, bundle)
    assert len(train) + len(val) == 10 and len(val) == 2
    # the held-out examples are the same whichever way the same files are named
    named = [str(chats / "a.jsonl"), str(chats / "b" / "part1.json"), str(chats / "b" / "part2.jsonl")]
    _, val_named = _supervised_datasets(DataSection(**{**vars(d), "files": named}), bundle)
    assert val.indices == val_named.indices
    assert [val.dataset.examples[i].ids for i in val.indices] == [
        val_named.dataset.examples[i].ids for i in val_named.indices]


def test_preference_and_classification_read_globs_and_parquet(tok_dir: Path, tmp_path: Path) -> None:
    tokenizer = load_tokenizer(tok_dir)
    pairs = [{"prompt": f"question {i}", "chosen": "good", "rejected": "bad"} for i in range(4)]
    _jsonl(tmp_path / "pref" / "day1.jsonl", pairs[:2])
    _jsonl(tmp_path / "pref" / "sub" / "day2.jsonl", pairs[2:])
    (tmp_path / "pref" / "sub" / "day3.jsonl").touch()
    data = SupervisedDataset([str(tmp_path / "pref" / "**" / "*.jsonl")], Renderer(tokenizer, 32), kind="preference")
    assert len(data) == 4
    assert [tokenizer.decode(c.ids).split("\n")[0] for c, _ in data.examples] == [f"user: question {i}"
                                                                                 for i in range(4)]
    pq.write_table(pa.Table.from_pylist([{"text": "hello world", "label": "good"},
                                         {"text": "how are you", "label": "bad"}]), tmp_path / "cls.parquet")
    _jsonl(tmp_path / "more" / "x.jsonl", [{"text": "the answer", "label": "good"}])
    rows, names = read_classification([tmp_path / "cls.parquet", tmp_path / "more"], tokenizer, 16)
    assert names == ["bad", "good"] and [label for _, label in rows] == [1, 0, 1]


def test_unusable_supervised_inputs_are_one_clear_error(tok_dir: Path, tmp_path: Path) -> None:
    (tmp_path / "texts").mkdir()
    (tmp_path / "texts" / "a.txt").write_text("not a chat\n")
    d = DataSection(corpus="sft", files=[str(tmp_path / "texts")], tokenizer=str(tok_dir))
    with pytest.raises(DataError, match=r"leave no file to read \(skipped 1 of other types \(1 \.txt\)\); name "
                                        r"non-empty \.jsonl / \.json / \.parquet files"):
        setup_data(d)
    with pytest.raises(DataError, match=r"data\.files: .*nothing\*\.jsonl: the glob matches nothing"):
        setup_data(DataSection(**{**vars(d), "files": [str(tmp_path / "nothing*.jsonl")]}))
    saved = tmp_path / "saved"
    saved.mkdir()
    (saved / "state.json").write_text("{}")
    with pytest.raises(DataError, match=r"saved is a dataset saved by `datasets` \(save_to_disk\); supervised "
                                        r"corpora read \.jsonl / \.json / \.parquet files"):
        setup_data(DataSection(**{**vars(d), "files": [str(saved)]}))


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
