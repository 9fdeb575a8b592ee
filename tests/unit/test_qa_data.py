"""QA data for the soft-prompt recipe: SQuAD JSON / JSONL reading, the synthetic set, the one rendering function."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.hf_models import make_tokenizer
from train.data.corpus import DataError
from train.research.qa_data import ENCODER_PAD, QADataset, read_qa, render, synthetic_qa


def test_squad_json_and_jsonl_read_alike(tmp_path: Path) -> None:
    squad = {"data": [{"title": "t", "paragraphs": [{"context": "Alice lives in Paris.", "qas": [
        {"id": "q1", "question": "Where does Alice live?", "answers": [{"text": "Paris", "answer_start": 15}]},
        {"id": "q2", "question": "Unanswerable?", "answers": []}]}]}]}
    (tmp_path / "a.json").write_text(json.dumps(squad))
    (tmp_path / "b.jsonl").write_text(json.dumps({"id": "q3", "context": "Bob lives in Rome.", "question": "Where?",
                                                  "answers": {"text": ["Rome", "rome"]}}) + "\n\n")
    examples = read_qa([tmp_path / "a.json", tmp_path / "b.jsonl"])
    assert [(e.qid, e.answers) for e in examples] == [("q1", ("Paris",)), ("q3", ("Rome", "rome"))]
    assert examples[0].prompt == "Question: Where does Alice live?\nContext: Alice lives in Paris."
    (tmp_path / "bad.jsonl").write_text('{"context": "c"}\n')
    with pytest.raises(DataError, match=r"bad.jsonl:1: expected a JSON object with 'context', 'question'"):
        read_qa([tmp_path / "bad.jsonl"])
    with pytest.raises(DataError, match=r"does not exist"):
        read_qa([tmp_path / "missing.json"])


def test_synthetic_answers_are_in_their_context() -> None:
    examples = synthetic_qa(50, seed=3)
    assert examples == synthetic_qa(50, seed=3) and examples != synthetic_qa(50, seed=4)
    for e in examples:
        assert e.answers[0] in e.context and e.question.split()[2] in e.context


def test_render_and_batches_keep_pad_out_of_the_targets(tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(make_tokenizer(tmp_path)))
    examples = synthetic_qa(6)
    r = render(examples[0], tok, max_prompt_tokens=5, max_answer_tokens=8, anchor="\nAnswer:")
    assert len(r["prompt"]) == 5 and r["answer"][-1] == tok.eos_token_id
    assert tok.decode(r["answer"][:-1]).strip() == examples[0].answers[0]
    data = QADataset(examples, [tok, tok], encoder_tokenizer=None, max_prompt_tokens=64, max_answer_tokens=8,
                     max_encoder_len=40, anchor="\nAnswer:")
    batch = data.batch([0, 3])
    assert batch["enc_ids"].shape == (2, 40) and int(batch["enc_ids"].max()) <= ENCODER_PAD
    for b in (0, 1):
        for key in ("prompt", "anchor", "answer"):
            ids, mask = batch[f"{key}_{b}"], batch[f"{key}_mask_{b}"]
            assert ids.shape == mask.shape
            for row in (0, 1):
                n = int(mask[row].sum())
                assert ids[row, :n].tolist() == data.rendered[b][[0, 3][row]][key]
                assert mask[row, n:].sum() == 0
    assert data.prompt_tokens() > 8
