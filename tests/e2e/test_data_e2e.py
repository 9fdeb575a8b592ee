"""The entry point on blended prepared datasets with document masking, and on a streamed corpus resumed exactly."""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO, SMOKE, python_main, run_job, train_losses
from train.data import train_bpe_tokenizer

pytestmark = pytest.mark.slow

_WORDS = ["to", "be", "or", "not", "that", "is", "the", "question", "whether", "tis", "nobler", "in", "mind",
          "suffer", "slings", "arrows"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two small corpora (text files and a JSONL) and a tokenizer trained on both."""
    root = tmp_path_factory.mktemp("data_e2e")
    rng = random.Random(0)
    (root / "texts").mkdir()
    for i in range(30):
        lines = [" ".join(rng.choices(_WORDS, k=12)) for _ in range(rng.randint(5, 40))]
        (root / "texts" / f"{i:02d}.txt").write_text(f"Play {i}.\n" + "\n".join(lines) + "\n")
    rows = [{"text": " ".join(rng.choices(_WORDS[::-1], k=rng.randint(20, 200)))} for _ in range(200)]
    (root / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    tok = train_bpe_tokenizer([*sorted((root / "texts").glob("*.txt")), root / "rows.jsonl"], 300, root / "tok")
    return {"root": root, "tok": tok}


def _common(tmp_path: Path, *extra: str) -> list[str]:
    return ["--config", str(SMOKE), "data.seq_len=32", f"data.cache_dir={tmp_path / 'cache'}", "log.progress=false",
            "sample.max_new_tokens=0", "train.warmup_steps=1", *extra]


def test_blend_of_prepared_datasets_with_doc_masking(tmp_path: Path, corpus: dict[str, Path]) -> None:
    root = corpus["root"]
    prep = [sys.executable, str(REPO / "tools" / "prepare_data.py"), "--tokenizer", str(corpus["tok"]), "--no-progress"]
    run_job([*prep, *map(str, sorted((root / "texts").glob("*.txt"))), "--out", str(tmp_path / "a"),
             "--workers", "2", "--shard-chars", "3000", "--val-fraction", "0.2"], tmp_path)
    run_job([*prep, str(root / "rows.jsonl"), "--out", str(tmp_path / "b"), "--val-fraction", "0.2"], tmp_path)
    assert len(json.loads((tmp_path / "a" / "header.json").read_text())["splits"]["train"]["shards"]) > 2
    blend = f"data.blend=[{{path: {tmp_path / 'a'}, weight: 0.6}}, {{path: {tmp_path / 'b'}, weight: 0.4}}]"
    run = tmp_path / "run"
    run_job(python_main(*_common(tmp_path, "data.corpus=prepared", blend, "data.doc_mask=true", "train.steps=4",
                                 f"train.out_dir={run}")), tmp_path)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 4 and summary["val_loss"] < 6.0
    assert len(list((tmp_path / "cache" / "index").glob("blend-*"))) == 2  # train and validation index, cached


def test_streamed_corpus_resumes_with_the_same_batches(tmp_path: Path, corpus: dict[str, Path]) -> None:
    root = corpus["root"]
    blend = f"data.blend=[{{path: {root / 'rows.jsonl'}, weight: 0.5}}, {{path: {root / 'texts' / '*.txt'}, weight: 0.5}}]"
    args = _common(tmp_path, "data.corpus=stream", blend, f"data.tokenizer={corpus['tok']}", "data.stream_val_samples=8",
                   "data.doc_mask=true", "train.steps=6", "train.save_interval=3", "train.eval_interval=0")
    full = tmp_path / "full"
    run_job(python_main(*args, f"train.out_dir={full}"), tmp_path)
    meta = json.loads((full / "checkpoints" / "step_00000003" / "tessera.json").read_text())
    assert meta["data_state"]["consumed"] == 3 * 8
    resumed = tmp_path / "resumed"
    run_job(python_main(*args, f"train.out_dir={resumed}", "--resume", str(full / "checkpoints" / "step_00000003")),
            tmp_path)
    reference, got = train_losses(full), train_losses(resumed)
    assert sorted(got) == [4, 5, 6] and all(got[s] == reference[s] for s in got)
