"""Bad data input: one clear error naming the file / field, the value and the fix; nothing prepared is touched."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import SMOKE
from train.config.fields import ConfigError
from train.config.load import load_config
from train.data import DataError, TokenizerMismatchError, iter_documents, prepare, train_bpe_tokenizer
from train.data.setup import setup_data
from train.data.shards import HEADER_FILE, PreparedData

TEXT = "\n".join(f"line {i}: to be or not to be, that is the question {i}." for i in range(200))


@pytest.fixture(scope="module")
def two(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Data prepared with tokenizer a, and tokenizers a and b."""
    root = tmp_path_factory.mktemp("bad_data")
    docs = [root / "x.txt", root / "y.txt"]
    docs[0].write_text(TEXT)
    docs[1].write_text(TEXT.upper())
    tok_a = train_bpe_tokenizer(docs, 300, root / "tok_a")
    tok_b = train_bpe_tokenizer(docs, 320, root / "tok_b")
    prepare(docs, tok_a, root / "data_a", val_fraction=0.5)
    prepare(docs, tok_b, root / "data_b", val_fraction=0.5)
    return {"root": root, "tok_a": tok_a, "tok_b": tok_b, "data_a": root / "data_a", "data_b": root / "data_b"}


def _cfg(tmp_path: Path, *overrides: str):
    return load_config(SMOKE, [f"data.cache_dir={tmp_path}", "data.seq_len=16", *overrides])


def test_prepared_data_from_another_tokenizer_is_refused(two: dict[str, Path], tmp_path: Path) -> None:
    cfg = _cfg(tmp_path, "data.corpus=prepared", f"data.blend=[{{path: {two['data_a']}}}]", f"data.tokenizer={two['tok_b']}")
    with pytest.raises(TokenizerMismatchError, match=r"data\.blend\[0\] path=.*data_a was tokenized with .*tok_a"):
        setup_data(cfg.data)
    mixed = _cfg(tmp_path, "data.corpus=prepared", f"data.blend=[{{path: {two['data_a']}}}, {{path: {two['data_b']}}}]")
    with pytest.raises(TokenizerMismatchError, match=r"data\.blend\[1\] path=.*data_b was tokenized with .*tok_b"):
        setup_data(mixed.data)
    bundle = setup_data(_cfg(tmp_path, "data.corpus=prepared", f"data.blend=[{{path: {two['data_a']}}}]").data)
    assert bundle.tokenizer_dir == two["tok_a"] and bundle.vocab_size == bundle.data.vocab_size


@pytest.mark.parametrize(
    ("blend", "match"),
    [
        ("[{path: a, weight: 0}, {path: b, weight: 0.0}]", r"weights \[0\.0, 0\.0\] do not sum to a positive number"),
        ("[{path: a, weight: -1}]", r"data\.blend\[0\]\.weight=-1: must be a number >= 0"),
        ("[{path: a, weight: heavy}]", r"data\.blend\[0\]\.weight='heavy'"),
        ("[{file: a}]", r"data\.blend\[0\]=\{'file': 'a'\}: each entry is \{path:"),
        ("[]", r"data\.corpus='prepared' but data\.blend is empty"),
    ],
)
def test_blend_config_errors(blend: str, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        load_config(SMOKE, ["data.corpus=prepared", f"data.blend={blend}"])


def test_doc_masking_is_refused_under_pipeline_parallelism() -> None:
    with pytest.raises(ConfigError, match=r"data\.doc_mask=true with parallel\.pp=2: .*set data\.doc_mask=false"):
        load_config(SMOKE, ["data.doc_mask=true", "parallel.pp=2"])


def test_stream_needs_a_tokenizer_and_existing_sources(tmp_path: Path, two: dict[str, Path]) -> None:
    with pytest.raises(ConfigError, match=r"data\.corpus='stream' needs data\.tokenizer"):
        load_config(SMOKE, ["data.corpus=stream", "data.blend=[{path: a.jsonl}]"])
    cfg = _cfg(tmp_path, "data.corpus=stream", f"data.blend=[{{path: {tmp_path}/none*.jsonl}}]",
               f"data.tokenizer={two['tok_a']}")
    with pytest.raises(DataError, match=r"data\.blend path=.*none\*\.jsonl: the glob matches nothing"):
        setup_data(cfg.data)


def test_a_missing_or_damaged_blend_member_names_its_entry(two: dict[str, Path], tmp_path: Path) -> None:
    cfg = _cfg(tmp_path, "data.corpus=prepared", f"data.blend=[{{path: {two['data_a']}}}, {{path: {tmp_path}/nope}}]")
    with pytest.raises(DataError, match=r"data\.blend\[1\]: data_dir=.*nope: no header\.json"):
        setup_data(cfg.data)


def test_header_claiming_a_vocab_beyond_its_dtype(two: dict[str, Path], tmp_path: Path) -> None:
    copy = tmp_path / "copy"
    copy.mkdir()
    for f in two["data_a"].iterdir():
        (copy / f.name).write_bytes(f.read_bytes())
    header = json.loads((copy / HEADER_FILE).read_text())
    (copy / HEADER_FILE).write_text(json.dumps({**header, "vocab_size": 70_000}))
    with pytest.raises(DataError, match=r"vocab_size=70000 does not fit dtype=uint16"):
        PreparedData.open(copy)


def test_invalid_utf8_jsonl_line_names_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "docs.jsonl"
    path.write_bytes(b'{"text": "fine"}\n\n{"text": "caf\xe9"}\n')
    with pytest.raises(DataError, match=r"docs\.jsonl:3: not valid UTF-8"):
        list(iter_documents([path]))


def test_existing_output_is_never_overwritten_without_the_flag(two: dict[str, Path], tmp_path: Path) -> None:
    before = {p.name: p.read_bytes() for p in two["data_a"].iterdir()}
    with pytest.raises(DataError, match=r"out_dir=.*data_a already exists; .*overwrite=True"):
        prepare([two["root"] / "x.txt"], two["tok_b"], two["data_a"])
    assert {p.name: p.read_bytes() for p in two["data_a"].iterdir()} == before
