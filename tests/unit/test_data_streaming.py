"""Streaming mode: weighted interleaving of raw sources, packed on the fly, resumed exactly from its state."""

from __future__ import annotations

import json
from itertools import islice
from pathlib import Path

import numpy as np
import pytest
import torch

from train.data.corpus import DataError
from train.data.streaming import StreamBatches, StreamSource, TokenStream, source_files
from train.data.tokenizer import load_raw_tokenizer, train_bpe_tokenizer

T = 16


@pytest.fixture(scope="module")
def sources(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("stream")
    rows = [{"body": f"alpha {i} " + "one two three " * (i % 5 + 1)} for i in range(60)]
    (root / "a.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (root / "b").mkdir()
    for i in range(12):
        (root / "b" / f"{i:02d}.txt").write_text(f"beta {i} " + "four five six seven " * (i % 3 + 1))
    tok = train_bpe_tokenizer([root / "a.jsonl", *sorted((root / "b").glob("*.txt"))], 300, root / "tok",
                              text_field="body")
    return {"root": root, "tok": tok}


def _stream(sources: dict, seed: int = 0) -> TokenStream:
    root = sources["root"]
    return TokenStream([StreamSource(str(root / "a.jsonl"), 0.7), StreamSource(str(root / "b" / "*.txt"), 0.3)],
                       tokenizer_file=str(sources["tok"] / "tokenizer.json"), separator_id=0, seq_len=T, seed=seed,
                       text_field="body")


def test_state_restores_the_same_next_samples_across_passes(sources: dict) -> None:
    stream = _stream(sources)
    stream.take(5)
    state = json.loads(json.dumps(stream.state_dict()))  # the state survives a JSON checkpoint
    expected = stream.take(200)  # long enough to run past the end of the mixture and start a new pass
    assert stream.state_dict()["pass"] >= 1
    again = _stream(sources)
    again.load_state_dict(state)
    assert np.array_equal(again.take(200), expected)
    text = load_raw_tokenizer(sources["tok"]).decode(expected[:, :-1].ravel().tolist())
    assert text.count("alpha") > text.count("beta") > 0  # both sources, weighted


def test_samples_are_consecutive_windows_of_the_packed_stream(sources: dict) -> None:
    chunk = _stream(sources).take(4)
    assert chunk.shape == (4, T + 1)
    assert all(chunk[i, -1] == chunk[i + 1, 0] for i in range(3))  # step T, windows of T+1
    assert (chunk == 0).any()  # documents end with the separator


def test_batches_do_not_depend_on_dp_and_resume_with_another_dp(sources: dict) -> None:
    def run(dp: int, start: dict, consumed: int, steps: int) -> tuple[list[torch.Tensor], dict]:
        rows, state = [], start
        for _ in range(steps):
            step = []
            for rank in range(dp):
                it = StreamBatches(_stream(sources), consumed=consumed, global_batch=8, micro_batch=2,
                                   dp_rank=rank, dp_size=dp, doc_mask=True, start=state)
                step += [b[0] for b in islice(it, 4 // dp)]
                if rank == 0:
                    new_state = it.state_dict()
            rows.append(torch.cat(step))
            state, consumed = new_state, consumed + 8
        return rows, state

    s = _stream(sources)
    start = {"consumed": 0, "stream": s.state_dict()}
    reference, _ = run(1, start, 0, 4)
    first, state = run(2, start, 0, 2)
    assert state["consumed"] == 16
    second, _ = run(4, json.loads(json.dumps(state)), 16, 2)
    assert all(torch.equal(a, b) for a, b in zip(first + second, reference))
    skipped = StreamBatches(_stream(sources), consumed=16, global_batch=8, micro_batch=8, dp_rank=0, dp_size=1,
                            doc_mask=False, start=start)  # no saved state at 16: replays from the start
    assert torch.equal(next(skipped)[0], reference[2])


def test_bad_sources_are_reported(sources: dict, tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"path='.*nothing\*\.jsonl': .*nothing\*\.jsonl: the glob matches nothing"):
        source_files(str(tmp_path / "nothing*.jsonl"))
    (tmp_path / "empty.jsonl").touch()
    with pytest.raises(DataError, match=r"empty\.jsonl'\] leave no file to read \(skipped 1 empty file\)"):
        source_files(str(tmp_path / "empty.jsonl"))
    with pytest.raises(DataError, match=r"weights must be finite, >= 0 and sum to a positive number"):
        TokenStream([StreamSource(str(sources["root"] / "a.jsonl"), 0.0)],
                    tokenizer_file=str(sources["tok"] / "tokenizer.json"), separator_id=0, seq_len=T, seed=0)
    with pytest.raises(DataError, match=r"no column text_field='text'"):
        TokenStream([StreamSource(str(sources["root"] / "a.jsonl"), 1.0)],
                    tokenizer_file=str(sources["tok"] / "tokenizer.json"), separator_id=0, seq_len=T, seed=0)
