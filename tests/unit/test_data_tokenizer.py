"""Byte-level BPE training, loading through transformers, and tokenizer identity."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from train.data.corpus import DataError
from train.data.tokenizer import (
    EOS_TOKEN,
    TokenizerMismatchError,
    check_same_tokenizer,
    eos_token,
    load_raw_tokenizer,
    load_tokenizer,
    same_tokenizer,
    tokenizer_identity,
    train_bpe_tokenizer,
)

_WORDS = ["the", "king", "queen", "crown", "sword", "night", "day", "love", "death", "speak", "hath", "thou"]


def _corpus(folder: Path, n_docs: int = 12, seed: int = 0) -> list[Path]:
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    files = []
    for i in range(n_docs):
        lines = [" ".join(rng.choices(_WORDS, k=rng.randint(3, 9))).capitalize() + "." for _ in range(20)]
        files.append(folder / f"doc{i}.txt")
        files[-1].write_text("\n".join(lines) + "\n", encoding="utf-8")
    return files


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("tok")
    return train_bpe_tokenizer(_corpus(root / "corpus"), 320, root / "bpe")


def test_autotokenizer_loads_it_with_eos_bos_pad(tok_dir: Path) -> None:
    tok = load_tokenizer(tok_dir)
    assert tok.eos_token == tok.bos_token == tok.pad_token == EOS_TOKEN
    assert tok.eos_token_id == tok.convert_tokens_to_ids(EOS_TOKEN)
    assert len(tok) == tokenizer_identity(tok_dir)["vocab_size"] <= 320
    text = "The king hath spoken.\n\n  Ünïcode 🙂 and tabs\tstay exact , ok"
    ids = tok(text)["input_ids"]
    assert tok.eos_token_id not in ids  # no special tokens added by encoding
    assert tok.decode(ids) == text  # byte-level: every string round-trips
    assert len(tok("the king the queen")["input_ids"]) < len("the king the queen")  # merges were learnt


def test_training_is_deterministic_and_identity_follows_content(tok_dir: Path, tmp_path: Path) -> None:
    corpus = _corpus(tmp_path / "corpus")
    again = train_bpe_tokenizer(corpus, 320, tmp_path / "again")
    a, b = tokenizer_identity(tok_dir), tokenizer_identity(again)
    assert a["path"] != b["path"] and a["name"] == "bpe" and b["name"] == "again"
    assert same_tokenizer(a, b)
    check_same_tokenizer(a, b, "data_dir=x")
    other = tokenizer_identity(train_bpe_tokenizer(corpus, 300, tmp_path / "smaller"))
    assert not same_tokenizer(a, other)
    with pytest.raises(
        TokenizerMismatchError, match=r"data_dir=x was tokenized with .*prepare the data again"
    ):
        check_same_tokenizer(a, other, "data_dir=x")


def test_training_errors_and_overwrite(tok_dir: Path, tmp_path: Path) -> None:
    corpus = _corpus(tmp_path / "corpus", n_docs=2)
    with pytest.raises(DataError, match=r"vocab_size=200 is too small; use >= 257"):
        train_bpe_tokenizer(corpus, 200, tmp_path / "t")
    with pytest.raises(DataError, match="does not exist"):
        train_bpe_tokenizer([tmp_path / "missing.txt"], 300, tmp_path / "t")
    assert not (tmp_path / "t").exists()
    with pytest.raises(DataError, match="already exists"):
        train_bpe_tokenizer(corpus, 300, tok_dir)
    replaced = train_bpe_tokenizer(corpus, 280, tmp_path / "t2")
    train_bpe_tokenizer(corpus, 300, replaced, overwrite=True)
    assert load_raw_tokenizer(replaced).get_vocab_size() > 280


def test_directories_without_tokenizer_json_are_rejected(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"tokenizer_dir=.*: no tokenizer\.json; train one"):
        tokenizer_identity(tmp_path)
    with pytest.raises(DataError, match="no tokenizer.json"):
        load_tokenizer(tmp_path)


def test_eos_token_is_read_from_hf_config_files(tmp_path: Path) -> None:
    assert eos_token(tmp_path) is None
    (tmp_path / "special_tokens_map.json").write_text(json.dumps({"eos_token": {"content": "</s>"}}))
    assert eos_token(tmp_path) == "</s>"
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|end_of_text|>"}))
    assert eos_token(tmp_path) == "<|end_of_text|>"


@pytest.mark.parametrize(("content", "message"), [
    ("", "tokenizer.json is empty"),
    ('{"version": "1.0", "model": {', "tokenizer.json is not a valid tokenizer"),
    ("[]", "tokenizer.json is not a valid tokenizer"),
    (b"\xff\xfe\x00", "tokenizer.json is not a valid tokenizer"),
])
def test_a_broken_tokenizer_json_is_one_data_error(tmp_path: Path, content: str | bytes,
                                                   message: str) -> None:
    path = tmp_path / "tokenizer.json"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    for load in (load_raw_tokenizer, load_tokenizer, tokenizer_identity):
        with pytest.raises(DataError) as err:
            load(tmp_path)
        assert message in str(err.value) and f"tokenizer_dir={tmp_path}" in str(err.value)
        assert "\n" not in str(err.value)


def test_a_broken_tokenizer_config_is_one_data_error(tok_dir: Path, tmp_path: Path) -> None:
    (tmp_path / "tokenizer.json").write_bytes((tok_dir / "tokenizer.json").read_bytes())
    (tmp_path / "tokenizer_config.json").write_text("{not json")
    with pytest.raises(DataError, match="tokenizer_config.json is not valid JSON"):
        eos_token(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text("[1, 2]")
    with pytest.raises(DataError, match="tokenizer_config.json holds a JSON list"):
        load_tokenizer(tmp_path)
