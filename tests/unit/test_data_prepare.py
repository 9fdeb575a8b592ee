"""prepare(): token files round-trip to the documents, deterministic split, dtype, atomic writes, errors."""

from __future__ import annotations

import importlib
import json
import random
from pathlib import Path

import numpy as np
import pytest

from train.data.corpus import DataError
from train.data.prepare import prepare, val_mask
from train.data.shards import HEADER_FILE, PreparedData, token_dtype
from train.data.tokenizer import EOS_TOKEN, load_raw_tokenizer, tokenizer_identity, train_bpe_tokenizer

prepare_module = importlib.import_module("train.data.prepare")  # `train.data.prepare` is the function

_WORDS = ["to", "be", "or", "not", "that", "is", "the", "question", "whether", "tis", "nobler", "in", "mind"]


def _documents(n_docs: int = 20, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    docs = []
    for i in range(n_docs):
        lines = [" ".join(rng.choices(_WORDS, k=rng.randint(2, 8))) for _ in range(rng.randint(1, 6))]
        docs.append(f"DOC {i}.\n" + "\n".join(lines) + ("\n" if i % 2 else "  "))
    docs[3] += " café 🙂\r\n"
    docs[5] = f"a literal {EOS_TOKEN} inside the text\n" + docs[5]
    return docs


def _write_inputs(folder: Path, docs: list[str], fmt: str) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    if fmt == "text":
        paths = [folder / f"{i:03d}.txt" for i in range(len(docs))]
        for path, doc in zip(paths, docs):
            path.write_bytes(doc.encode("utf-8"))
        return paths
    if fmt == "jsonl":
        path = folder / "docs.jsonl"
        path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs), encoding="utf-8")
        return [path]
    if fmt == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.table({"text": docs}), folder / "docs.parquet")
        return [folder / "docs.parquet"]
    import datasets

    datasets.Dataset.from_dict({"text": docs}).save_to_disk(str(folder / "hf"))
    return [folder / "hf"]


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("tok")
    return train_bpe_tokenizer(
        _write_inputs(root / "corpus", _documents(40, seed=1), "text"), 300, root / "bpe"
    )


def _decode_split(out: Path, split: str, tok_dir: Path) -> list[str]:
    """Documents of one split, decoded from its token file (split at the eos separators)."""
    header = json.loads((out / HEADER_FILE).read_text())
    tokens = PreparedData.open(out, verify=True).split(split)[:]
    assert tokens.size == header["splits"][split]["n_tokens"]
    if tokens.size:
        assert tokens[-1] == header["doc_separator_id"]  # every document, the last included, ends with eos
    ends = np.flatnonzero(tokens == header["doc_separator_id"])
    tokenizer = load_raw_tokenizer(tok_dir)
    starts = np.concatenate([[0], ends[:-1] + 1])
    return [tokenizer.decode(tokens[s:e].tolist(), skip_special_tokens=False) for s, e in zip(starts, ends)]


@pytest.mark.parametrize("fmt", ["text", "jsonl", "parquet", "hf"])
def test_round_trip_gives_back_the_documents(tok_dir: Path, tmp_path: Path, fmt: str) -> None:
    docs = _documents()
    header = prepare(_write_inputs(tmp_path / "in", docs, fmt), tok_dir, tmp_path / "out", seed=3)
    train, val = (
        _decode_split(tmp_path / "out", "train", tok_dir),
        _decode_split(tmp_path / "out", "val", tok_dir),
    )
    is_val = val_mask(len(docs), 0.05, 3)
    assert train == [d for d, v in zip(docs, is_val) if not v]  # input order kept within each split
    assert val == [d for d, v in zip(docs, is_val) if v]
    assert (header["splits"]["train"]["n_docs"], header["splits"]["val"]["n_docs"]) == (19, 1)
    assert header["doc_separator"] == EOS_TOKEN and header["dtype"] == "uint16"
    assert header["tokenizer"] == tokenizer_identity(tok_dir) and header["vocab_size"] <= 300


def test_val_split_is_deterministic_by_document(tmp_path: Path) -> None:
    assert val_mask(40, 0.1, seed=0).sum() == 4
    assert np.array_equal(val_mask(40, 0.1, seed=0), val_mask(40, 0.1, seed=0))
    assert not np.array_equal(val_mask(40, 0.1, seed=0), val_mask(40, 0.1, seed=1))
    assert val_mask(3, 0.01, seed=0).sum() == 1  # at least one validation document
    assert val_mask(3, 0.9, seed=0).sum() == 2  # at least one training document
    assert not val_mask(5, 0.0, seed=0).any()
    with pytest.raises(DataError, match=r"val_fraction=1\.0 must be in \[0, 1\)"):
        val_mask(5, 1.0, seed=0)
    with pytest.raises(DataError, match="needs >= 2 documents"):
        val_mask(1, 0.05, seed=0)


def test_same_settings_give_identical_files(tok_dir: Path, tmp_path: Path) -> None:
    inputs = _write_inputs(tmp_path / "in", _documents(), "jsonl")
    a = prepare(inputs, tok_dir, tmp_path / "a", val_fraction=0.2)
    b = prepare(inputs, tok_dir, tmp_path / "b", val_fraction=0.2)
    c = prepare(inputs, tok_dir, tmp_path / "c", val_fraction=0.2, seed=7)
    assert a["splits"] == b["splits"]
    assert a["splits"]["val"]["shards"][0]["sha256"] != c["splits"]["val"]["shards"][0]["sha256"]


def test_dtype_follows_vocab_size(tmp_path: Path) -> None:
    assert token_dtype(300) == np.dtype("<u2") and token_dtype(65535) == np.dtype("<u2")
    assert token_dtype(65536) == np.dtype("<u4") and token_dtype(128256) == np.dtype("<u4")
    with pytest.raises(DataError, match="vocab_size=0"):
        token_dtype(0)


def test_large_vocab_is_stored_as_uint32(tok_dir: Path, tmp_path: Path) -> None:
    tokenizer = load_raw_tokenizer(tok_dir)
    tokenizer.add_tokens([f"<w{i}>" for i in range(65_600)])  # ids beyond 65535
    big = tmp_path / "big"
    big.mkdir()
    tokenizer.save(str(big / "tokenizer.json"))
    (big / "tokenizer_config.json").write_text(json.dumps({"eos_token": EOS_TOKEN}))
    docs = ["plain words", "rare <w65599> token", "<w0> first"]
    header = prepare(_write_inputs(tmp_path / "in", docs, "jsonl"), big, tmp_path / "out", val_fraction=0.0)
    assert header["dtype"] == "uint32" and header["vocab_size"] > 65535
    assert _decode_split(tmp_path / "out", "train", big) == docs
    assert np.fromfile(tmp_path / "out" / "train-00000.bin", dtype="<u4").max() > 65535
    with pytest.raises(DataError, match=r"dtype='uint16' holds ids up to 65535 but the vocabulary has \d+ entries"):
        prepare(_write_inputs(tmp_path / "in", docs, "jsonl"), big, tmp_path / "out16", dtype="uint16")
    assert not (tmp_path / "out16").exists()


def test_custom_separator_and_its_errors(tok_dir: Path, tmp_path: Path) -> None:
    inputs = _write_inputs(tmp_path / "in", _documents(8), "jsonl")
    header = prepare(inputs, tok_dir, tmp_path / "out", doc_separator="!", val_fraction=0.0)
    assert header["doc_separator_id"] == load_raw_tokenizer(tok_dir).token_to_id("!")
    with pytest.raises(DataError, match=r"doc_separator='<sep>' is not a token of"):
        prepare(inputs, tok_dir, tmp_path / "out2", doc_separator="<sep>")
    no_eos = tmp_path / "no_eos"
    no_eos.mkdir()
    (no_eos / "tokenizer.json").write_bytes((tok_dir / "tokenizer.json").read_bytes())
    with pytest.raises(DataError, match="names no eos_token; pass doc_separator"):
        prepare(inputs, no_eos, tmp_path / "out3")
    assert not (tmp_path / "out2").exists() and not (tmp_path / "out3").exists()


class _Interrupted(Exception):
    """Stands for a kill or Ctrl-C in the middle of a preparation."""


def test_interrupted_preparation_resumes_and_keeps_finished_shards(
    tok_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    inputs = _write_inputs(tmp_path / "in", _documents(30), "text")
    reference = prepare(inputs, tok_dir, tmp_path / "ref", shard_chars=200, val_fraction=0.2)
    real = prepare_module.tokenize_shard
    calls: list[int] = []
    fail_at = [4]

    def tokenize_then_fail(job: prepare_module.ShardJob) -> dict:
        calls.append(job.k)
        if len(calls) == fail_at[0]:
            raise _Interrupted  # an interruption in the middle of the fourth shard
        return real(job)

    monkeypatch.setattr(prepare_module, "tokenize_shard", tokenize_then_fail)
    with pytest.raises(_Interrupted):
        prepare(inputs, tok_dir, tmp_path / "data" / "out", shard_chars=200, val_fraction=0.2)
    partial = tmp_path / "data" / ".out.partial"
    assert not (tmp_path / "data" / "out").exists() and len(list(partial.glob("shard-*.json"))) == 3
    (partial / "train-00001.bin").write_bytes(b"\0\0")  # a finished shard damaged meanwhile is redone
    calls.clear()
    fail_at[0] = -1
    header = prepare(inputs, tok_dir, tmp_path / "data" / "out", shard_chars=200, val_fraction=0.2)
    assert calls[0] == 1 and 0 not in calls and 2 not in calls  # shards 0 and 2 were kept
    assert header["splits"] == reference["splits"] and len(header["splits"]["train"]["shards"]) > 4
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == ["out"]
    for split in ("train", "val"):
        assert _decode_split(tmp_path / "data" / "out", split, tok_dir) == _decode_split(tmp_path / "ref", split, tok_dir)
    changed = _write_inputs(tmp_path / "in2", _documents(31), "text")
    calls.clear()
    fail_at[0] = 2
    with pytest.raises(_Interrupted):
        prepare(changed, tok_dir, tmp_path / "x" / "out", shard_chars=200)
    with pytest.raises(DataError, match=r"\.out\.partial holds an interrupted preparation with other inputs"):
        prepare(changed[:-1], tok_dir, tmp_path / "x" / "out", shard_chars=200)


def test_worker_processes_write_the_same_shards(tok_dir: Path, tmp_path: Path) -> None:
    inputs = _write_inputs(tmp_path / "in", _documents(30), "jsonl")
    one = prepare(inputs, tok_dir, tmp_path / "one", shard_chars=300)
    two = prepare(inputs, tok_dir, tmp_path / "two", shard_chars=300, workers=2)
    assert one["splits"] == two["splits"] and len(one["splits"]["train"]["shards"]) >= 3


def test_existing_output_is_kept_unless_overwrite(tok_dir: Path, tmp_path: Path) -> None:
    inputs = _write_inputs(tmp_path / "in", _documents(), "jsonl")
    first = prepare(inputs, tok_dir, tmp_path / "out")
    with pytest.raises(DataError, match=r"out_dir=.*out already exists; .*overwrite=True"):
        prepare(inputs, tok_dir, tmp_path / "out", val_fraction=0.5)
    assert json.loads((tmp_path / "out" / HEADER_FILE).read_text()) == first
    second = prepare(inputs, tok_dir, tmp_path / "out", val_fraction=0.5, overwrite=True)
    assert json.loads((tmp_path / "out" / HEADER_FILE).read_text()) == second
    assert second["splits"]["val"]["n_docs"] == 10
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in", "out"]


def test_missing_or_empty_corpus_is_one_clear_error(tok_dir: Path, tmp_path: Path) -> None:
    (tmp_path / "empty.txt").touch()
    with pytest.raises(DataError, match=r"missing\.txt: does not exist; fix the paths or drop them"):
        prepare([tmp_path / "missing.txt", tmp_path / "empty.txt"], tok_dir, tmp_path / "out")
    with pytest.raises(DataError, match=r"empty\.txt'\] leave no file to read \(skipped 1 empty file\)"):
        prepare([tmp_path / "empty.txt"], tok_dir, tmp_path / "out")
    (tmp_path / "blank.txt").write_text("\n   \n")
    with pytest.raises(DataError, match="hold no non-blank document"):
        prepare([tmp_path / "blank.txt"], tok_dir, tmp_path / "out")
    with pytest.raises(DataError, match=r"tokenizer_dir=.*no tokenizer\.json"):
        prepare([tmp_path / "blank.txt"], tmp_path, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_hf_dataset_read_as_a_stream_prepares_the_same_tokens(tok_dir: Path, tmp_path: Path) -> None:
    inputs = _write_inputs(tmp_path / "in", _documents(), "hf")
    loaded = prepare(inputs, tok_dir, tmp_path / "loaded", val_fraction=0.2)
    streamed = prepare(inputs, tok_dir, tmp_path / "streamed", val_fraction=0.2, streaming=True)
    assert loaded["splits"] == streamed["splits"]
