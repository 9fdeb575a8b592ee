"""Streaming mixes: token-level source weights (a source's weight is its share of tokens, not of documents),
per-source caps on documents, exact resume of both, and the config keys that set them."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import SMOKE
from train.config.fields import ConfigError
from train.config.load import load_config
from train.data.corpus import DataError
from train.data.setup import setup_data
from train.data.streaming import StreamSource, TokenStream
from train.data.tokenizer import load_raw_tokenizer, train_bpe_tokenizer

T = 16


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Source 'long': documents of 40 words 'red'; 'short': documents of 4 words 'blue' (10x fewer tokens)."""
    root = tmp_path_factory.mktemp("stream_mix")
    (root / "long.jsonl").write_text("".join(json.dumps({"text": f"doc{i} " + "red " * 40}) + "\n"
                                             for i in range(30)))
    (root / "short.jsonl").write_text("".join(json.dumps({"text": f"doc{i} " + "blue " * 4}) + "\n"
                                              for i in range(30)))
    train_bpe_tokenizer([root / "long.jsonl", root / "short.jsonl"], 300, root / "tok")
    return root


def _stream(root: Path, by: str, *, cap: int | None = None, weights: tuple[float, float] = (0.5, 0.5)) -> TokenStream:
    sources = [StreamSource(str(root / "long.jsonl"), weights[0], cap), StreamSource(str(root / "short.jsonl"),
                                                                                     weights[1])]
    return TokenStream(sources, tokenizer_file=str(root / "tok" / "tokenizer.json"), separator_id=0, seq_len=T,
                       seed=0, blend_by=by)


def _words(root: Path, chunk: np.ndarray) -> str:
    return load_raw_tokenizer(root / "tok").decode(chunk[:, :-1].ravel().tolist())


@pytest.mark.parametrize("weights", [(0.5, 0.5), (0.2, 0.8)])
def test_token_weights_are_shares_of_tokens(root: Path, weights: tuple[float, float]) -> None:
    tok = load_raw_tokenizer(root / "tok")
    per_doc = [len(tok.encode("doc7 " + w * n).ids) + 1 for w, n in (("red ", 40), ("blue ", 4))]  # + separator
    text = _words(root, _stream(root, "tokens", weights=weights).take(300))
    red, blue = (len(re.findall(rf"doc\d+ {w}", text)) * n for w, n in zip(("red", "blue"), per_doc))
    assert red / (red + blue) == pytest.approx(weights[0], abs=0.03)  # long documents get no more tokens
    by_docs = _words(root, _stream(root, "documents", weights=weights).take(300))
    assert by_docs.count("red") > 2 * by_docs.count("blue")  # by documents, the long source takes most tokens


@pytest.mark.parametrize("by", ["documents", "tokens"])
def test_max_docs_caps_a_source_and_the_stream_resumes(root: Path, by: str) -> None:
    stream = _stream(root, by, cap=3)
    stream.take(7)
    state = json.loads(json.dumps(stream.state_dict()))  # a checkpoint holds it as JSON
    expected = stream.take(150)  # past the capped source's end several times
    long_docs = {w for w in _words(root, expected).split() if w.startswith("doc")}
    assert {"doc0", "doc1", "doc2"} <= long_docs  # the long source restarts within its first 3 documents
    text = _words(root, expected)
    for i in range(3, 30):  # a document of 'long' beyond the cap never appears (short docs are followed by blue)
        assert f"doc{i} red" not in text
    again = _stream(root, by, cap=3)
    again.load_state_dict(state)
    assert np.array_equal(again.take(150), expected)
    other = _stream(root, "documents" if by == "tokens" else "tokens", cap=3)
    with pytest.raises(DataError, match=f"taken with data.blend_by={by}"):
        other.load_state_dict(state)


def test_config_keys(root: Path, tmp_path: Path) -> None:
    blend = (f"data.blend=[{{path: {root / 'long.jsonl'}, weight: 1, max_docs: 5}}, "
             f"{{path: {root / 'short.jsonl'}, weight: 2}}]")
    base = ["data.corpus=stream", f"data.tokenizer={root / 'tok'}", f"train.out_dir={tmp_path}"]
    cfg = load_config(str(SMOKE), [*base, blend, "data.blend_by=tokens"])
    bundle = setup_data(cfg.data)
    assert [(s.weight, s.max_docs) for s in bundle.sources] == [(1.0, 5), (2.0, None)]
    with pytest.raises(ConfigError, match=r"data.blend\[0\].max_docs=0: an integer >= 1"):
        load_config(str(SMOKE), [*base, blend.replace("max_docs: 5", "max_docs: 0")])
    with pytest.raises(ConfigError, match=r"data.blend_by"):
        load_config(str(SMOKE), [*base, blend, "data.blend_by=bytes"])
