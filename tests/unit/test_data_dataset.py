"""PreparedData checks (tokenizer identity, truncation, checksums) and BlockDataset sample boundaries."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from train.data.corpus import DataError
from train.data.dataset import BlockDataset, PreparedData
from train.data.prepare import HEADER_FILE, prepare
from train.data.tokenizer import TokenizerMismatchError, tokenizer_identity, train_bpe_tokenizer

_TEXT = "Now is the winter of our discontent made glorious summer by this sun of York.\n"


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(tokenizer_dir, data_dir) of a small prepared corpus with 10 documents."""
    root = tmp_path_factory.mktemp("prepared")
    rows = [{"text": f"{i}: " + _TEXT * (i + 1)} for i in range(10)]
    (root / "docs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    tok_dir = train_bpe_tokenizer([root / "docs.jsonl"], 290, root / "tok")
    prepare([root / "docs.jsonl"], tok_dir, root / "data", val_fraction=0.2)
    return tok_dir, root / "data"


def _copy(data_dir: Path, dest: Path) -> Path:
    dest.mkdir()
    for f in data_dir.iterdir():
        (dest / f.name).write_bytes(f.read_bytes())
    return dest


def test_open_maps_splits_read_only(prepared: tuple[Path, Path]) -> None:
    tok_dir, data_dir = prepared
    data = PreparedData.open(data_dir, expect_tokenizer=tokenizer_identity(tok_dir), verify=True)
    train = data.split("train")
    assert all(isinstance(s, np.memmap) for s in train.shards) and train.dtype == np.dtype("<u2")
    assert train.shape == (data.n_tokens("train"),) and data.n_tokens("val") > 0
    assert data.vocab_size == tokenizer_identity(tok_dir)["vocab_size"]
    tokens = train[:]
    assert (tokens == data.doc_separator_id).sum() == 8 == data.n_docs("train")
    assert np.array_equal(np.flatnonzero(tokens == data.doc_separator_id) + 1, data.doc_ends("train"))
    with pytest.raises(ValueError, match="read-only"):
        train.shards[0][0] = 1
    with pytest.raises(DataError, match=r"split='test' not in .* \(has \['train', 'val'\]\)"):
        data.split("test")


def test_tokenizer_mismatch_is_refused(prepared: tuple[Path, Path], tmp_path: Path) -> None:
    _, data_dir = prepared
    (tmp_path / "c.txt").write_text("A different corpus, a different tokenizer. " * 20)
    other = tokenizer_identity(train_bpe_tokenizer([tmp_path / "c.txt"], 270, tmp_path / "other"))
    with pytest.raises(
        TokenizerMismatchError, match=r"data_dir=.* was tokenized with .*/tok .*prepare the data"
    ):
        PreparedData.open(data_dir, expect_tokenizer=other)


def test_truncated_missing_and_corrupted_files_are_caught(
    prepared: tuple[Path, Path], tmp_path: Path
) -> None:
    data_dir = _copy(prepared[1], tmp_path / "data")
    train_bin = data_dir / "train-00000.bin"
    good = train_bin.read_bytes()
    train_bin.write_bytes(good[:-2])
    with pytest.raises(DataError, match=r"split 'train': .*train-00000\.bin has \d+ bytes, the manifest says .*truncated"):
        PreparedData.open(data_dir)
    train_bin.unlink()
    with pytest.raises(DataError, match=r"split 'train': .*train-00000\.bin is missing"):
        PreparedData.open(data_dir)
    train_bin.write_bytes(bytes([good[0] ^ 1]) + good[1:])  # same size, one bit flipped
    PreparedData.open(data_dir)  # sizes match: only verify=True reads the data
    with pytest.raises(DataError, match=r"train-00000\.bin: sha256 differs from header\.json \(altered"):
        PreparedData.open(data_dir, verify=True)
    train_bin.write_bytes(good)
    index = data_dir / "val-00000.idx"
    index.write_bytes(index.read_bytes()[:-8] + (10**9).to_bytes(8, "little"))  # an altered document index
    with pytest.raises(DataError, match=r"val-00000\.idx: sha256 differs"):
        PreparedData.open(data_dir, verify=True)


def test_bad_headers_are_refused(prepared: tuple[Path, Path], tmp_path: Path) -> None:
    with pytest.raises(
        DataError, match=r"no header\.json, not a prepared dataset; run tools/prepare_data\.py"
    ):
        PreparedData.open(tmp_path)
    data_dir = _copy(prepared[1], tmp_path / "data")
    header = json.loads((data_dir / HEADER_FILE).read_text())
    (data_dir / HEADER_FILE).write_text(json.dumps({**header, "format_version": 99}))
    with pytest.raises(DataError, match="version=99, expected 'tessera-tokens' version 2"):
        PreparedData.open(data_dir)


def test_blocks_cover_every_token_once_and_drop_the_partial_tail() -> None:
    tokens = np.arange(1000, 1103, dtype=np.uint16)  # 103 tokens, T = 10 -> 10 blocks, 2 tokens dropped
    ds = BlockDataset(tokens, 10)
    assert len(ds) == 10
    for i in range(len(ds)):
        inputs, labels = ds[i]
        assert inputs.dtype == labels.dtype == torch.int64 and inputs.shape == labels.shape == (10,)
        assert inputs.tolist() == list(range(1000 + 10 * i, 1010 + 10 * i))  # tokens [i*T, i*T + T)
        assert labels.tolist() == list(range(1001 + 10 * i, 1011 + 10 * i))  # shifted by one
    predicted = torch.cat([ds[i][1] for i in range(len(ds))]).tolist()
    assert predicted == list(range(1001, 1101))  # each token after the first, once, up to the last block
    assert len(BlockDataset(tokens[:101], 10)) == 10 and len(BlockDataset(tokens[:100], 10)) == 9
    inputs, labels = ds.batch(np.array([3, 0, 3]))
    assert inputs.shape == (3, 10) and inputs.is_contiguous() and labels.is_contiguous()
    assert torch.equal(inputs[0], ds[3][0]) and torch.equal(labels[1], ds[0][1])
    with pytest.raises(IndexError):
        ds[10]
    assert len(BlockDataset(tokens, 10, num_samples=4)) == 4


def test_random_mode_is_a_deterministic_function_of_seed_and_index() -> None:
    tokens = np.arange(50, dtype=np.uint32)
    a = BlockDataset(tokens, 8, mode="random", seed=5, num_samples=3000)
    starts = a.offsets(np.arange(3000))
    assert starts.min() == 0 and starts.max() == 50 - 8 - 1  # every valid start, none past the end
    assert len(np.unique(starts)) == 42
    assert np.array_equal(
        BlockDataset(tokens, 8, mode="random", seed=5, num_samples=7).offsets(np.arange(7)), starts[:7]
    )  # independent of num_samples
    assert not np.array_equal(
        BlockDataset(tokens, 8, mode="random", seed=6).offsets(np.arange(6)), starts[:6]
    )
    inputs, labels = a[11]
    assert inputs.tolist() == list(range(starts[11], starts[11] + 8))
    assert labels.tolist() == list(range(starts[11] + 1, starts[11] + 9))
    assert len(BlockDataset(tokens, 8, mode="random")) == 6  # default: as many samples as blocks


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"seq_len": 10}, r"the split has 10 tokens, fewer than seq_len\+1=11; lower seq_len"),
        ({"seq_len": 0}, r"seq_len=0 must be >= 1"),
        ({"seq_len": 4, "mode": "shuffled"}, r"mode='shuffled' is not one of \('blocks', 'random'\)"),
        ({"seq_len": 4, "num_samples": 3}, r"num_samples=3 must be in \[1, 2\]"),
        ({"seq_len": 4, "mode": "random", "num_samples": 0}, r"num_samples=0 must be in \[1, inf\)"),
    ],
)
def test_dataset_errors(kwargs: dict[str, object], match: str) -> None:
    with pytest.raises(DataError, match=match):
        BlockDataset(np.arange(10), **kwargs)  # type: ignore[arg-type]
