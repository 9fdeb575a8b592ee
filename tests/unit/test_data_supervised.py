"""Supervised formats: only response tokens are trained, padding is masked on either side, bad rows are named."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from model import ModelArgs, Transformer
from train.data.collators import (
    IGNORE_INDEX,
    EmptyLabelsError,
    Example,
    collate_classification,
    collate_lm,
    collate_preference,
    collate_prompts,
)
from train.data.corpus import DataError
from train.data.supervised import Renderer, SupervisedDataset, read_classification
from train.data.tokenizer import load_tokenizer, train_bpe_tokenizer

TEMPLATE = (
    "{% for m in messages %}<|endoftext|>{{ m['role'] }}\n{{ m['content'] }}<|endoftext|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|endoftext|>assistant\n{% endif %}"
)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("sft_tok")
    (root / "c.txt").write_text("user assistant system: hello world, how are you? the answer is 42.\n" * 40)
    return load_tokenizer(train_bpe_tokenizer([root / "c.txt"], 300, root / "tok"))


def _jsonl(path: Path, rows: list[object]) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


def _trained_text(tok, ex: Example) -> str:
    return tok.decode([i for i, t in zip(ex.ids, ex.trained) if t])


def _targets(tok, batch: dict, row: int) -> str:
    labels = batch["labels"][row]
    return tok.decode(labels[labels != IGNORE_INDEX].tolist())


def test_prompt_response_trains_on_the_response_and_eos_only(tokenizer) -> None:
    r = Renderer(tokenizer, max_len=64)
    ex = r.instruction({"prompt": "hello world", "response": "the answer is 42."}, "f:1")
    assert _trained_text(tokenizer, ex) == "the answer is 42.<|endoftext|>"
    batch = collate_lm([ex], r.pad_id)
    assert batch["input_ids"].shape == batch["labels"].shape == (1, len(ex.ids) - 1)
    assert _targets(tokenizer, batch, 0) == "the answer is 42.<|endoftext|>"
    # labels[t] is the token after input t: every trained label equals the next input token
    ids, labels = torch.tensor(ex.ids), batch["labels"][0]
    kept = labels != IGNORE_INDEX
    assert torch.equal(labels[kept], ids[1:][kept])


def test_chat_template_masks_scaffolding_and_every_assistant_turn(tokenizer) -> None:
    tokenizer.chat_template = TEMPLATE
    try:
        r = Renderer(tokenizer, max_len=128)
        msgs = [{"role": "system", "content": "be nice"}, {"role": "user", "content": "hello"},
                {"role": "assistant", "content": "hi you"}, {"role": "user", "content": "how are you?"},
                {"role": "assistant", "content": "the answer"}]
        ex = r.instruction({"messages": msgs}, "f:1")
        spans, cur = [], []
        for i, t in zip([*ex.ids, -1], [*ex.trained, False]):
            if t:
                cur.append(i)
            elif cur:
                spans.append(tokenizer.decode(cur))
                cur = []
        assert spans == ["hi you<|endoftext|>\n", "the answer<|endoftext|>\n"]  # headers and user turns: -100
        assert tokenizer.decode(ex.ids) == tokenizer.apply_chat_template(msgs, tokenize=False)
        prompt = r.prompt(msgs[:2])
        assert tokenizer.decode(prompt).endswith("<|endoftext|>assistant\n")
    finally:
        tokenizer.chat_template = None


@pytest.mark.parametrize("side", ["right", "left"])
def test_padding_is_never_trained_or_attended(tokenizer, side: str) -> None:
    r = Renderer(tokenizer, max_len=64)
    short = r.instruction({"prompt": "hello", "response": "42."}, "f:1")
    long = r.instruction({"prompt": "hello world, how are you?", "response": "the answer is 42."}, "f:2")
    batch = collate_lm([short, long], r.pad_id, side=side)
    n_short = len(short.ids) - 1
    width = batch["input_ids"].shape[1]
    real = batch["attention_mask"][0].bool()
    assert real.sum() == n_short and (real[:n_short].all() if side == "right" else real[width - n_short:].all())
    assert (batch["labels"][0][~real] == IGNORE_INDEX).all() and (batch["doc_ids"][0][~real] == 1).all()
    assert batch["position_ids"][0][real].tolist() == list(range(n_short))
    assert _targets(tokenizer, batch, 0) == "42.<|endoftext|>" and _targets(tokenizer, batch, 1).startswith("the")
    # the model's logits for the short row's real tokens are those of the row alone: padding is not seen
    torch.manual_seed(0)
    model = Transformer(ModelArgs(vocab_size=320, dim=32, n_layers=1, n_heads=2, max_seq_len=64)).eval()
    with torch.no_grad():
        padded = model(batch["input_ids"], position_ids=batch["position_ids"], doc_ids=batch["doc_ids"])[0][real]
        alone = model(torch.tensor([short.ids[:-1]]))[0]
    torch.testing.assert_close(padded, alone, atol=1e-5, rtol=1e-5)


def test_generation_prompts_are_left_padded(tokenizer) -> None:
    batch = collate_prompts([[5, 6, 7], [8]], pad_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [0, 0, 8]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [0, 0, 1]]
    assert batch["position_ids"].tolist() == [[0, 1, 2], [0, 0, 0]]


def test_prompt_longer_than_the_limit(tokenizer, tmp_path: Path) -> None:
    long_prompt = "hello world, how are you? " * 20
    rows = [{"prompt": long_prompt, "response": "the answer is 42."}, {"prompt": "hello", "response": "42."}]
    path = _jsonl(tmp_path / "sft.jsonl", rows)
    ds = SupervisedDataset([path], Renderer(tokenizer, max_len=32))
    assert len(ds) == 1 and ds.dropped == [f"{path}:1"]  # nothing of the response fits: reported, left out
    kept = SupervisedDataset([path], Renderer(tokenizer, max_len=32, max_prompt_len=8))
    assert len(kept) == 2 and not kept.dropped
    ex = kept.examples[0]
    assert ex.trained.index(True) == 8 and _trained_text(tokenizer, ex) == "the answer is 42.<|endoftext|>"
    assert len(ex.ids) <= 33
    x, y, extra = kept.batch(np.array([0, 1]))
    assert x.shape == y.shape == extra["doc_ids"].shape and (y[0] != IGNORE_INDEX).sum() > 0
    with pytest.raises(EmptyLabelsError, match=r"f:9\) has no response token to train on \(all labels -100\)"):
        collate_lm([Example([1, 2, 3], [False, False, False], "f:9")], 0)


def test_preference_pairs_share_the_prompt_and_one_width(tokenizer, tmp_path: Path) -> None:
    path = _jsonl(tmp_path / "pref.jsonl", [{"prompt": "hello", "chosen": "the answer is 42.", "rejected": "no"}])
    ds = SupervisedDataset([path], Renderer(tokenizer, max_len=64), kind="preference")
    chosen, rejected = ds.examples[0]
    first = chosen.trained.index(True)
    assert chosen.ids[:first] == rejected.ids[:first] and rejected.trained.index(True) == first
    batch = collate_preference(ds.examples, 0)
    assert batch["chosen_input_ids"].shape == batch["rejected_input_ids"].shape
    assert _targets(tokenizer, {"labels": batch["rejected_labels"]}, 0) == "no<|endoftext|>"
    assert batch["rejected_attention_mask"].sum() == len(rejected.ids) - 1


def test_classification_labels_and_last_token(tokenizer, tmp_path: Path) -> None:
    path = _jsonl(tmp_path / "cls.jsonl", [{"text": "hello world", "label": "pos"}, {"text": "no", "label": "neg"}])
    rows, names = read_classification([path], tokenizer, max_len=16)
    assert names == ["neg", "pos"] and [label for _, label in rows] == [1, 0]
    for side in ("right", "left"):
        batch = collate_classification(rows, 0, side=side)
        last = batch["input_ids"][torch.arange(2), batch["last_index"]]
        assert last.tolist() == [rows[0][0][-1], rows[1][0][-1]] and batch["labels"].tolist() == [1, 0]
    bad = _jsonl(tmp_path / "bad.jsonl", [{"text": "x", "label": "maybe"}])
    with pytest.raises(DataError, match=r"bad\.jsonl:1: label='maybe' is not one of \['neg', 'pos'\]"):
        read_classification([bad], tokenizer, 16, label_names=["neg", "pos"])


@pytest.mark.parametrize(
    ("rows", "kind", "match"),
    [
        ([{"prompt": "a", "response": "b"}, {"prompt": "a"}], "instruction",
         r"x\.jsonl:2: instruction rows need \['prompt', 'response'\]; missing \['response'\]"),
        ([{"prompt": "a", "chosen": "b"}], "preference", r"x\.jsonl:1: .*missing \['rejected'\]"),
        (["{not json"], "instruction", r"x\.jsonl:1: not a JSON object"),
        ([{"messages": [{"role": "user", "content": "a"}]}], "instruction", r"x\.jsonl:1: .*no assistant message"),
        ([{"prompt": 3, "response": "b"}], "instruction", r"x\.jsonl:1: field 'prompt' holds int"),
    ],
)
def test_bad_rows_name_file_and_line(tokenizer, tmp_path: Path, rows: list, kind: str, match: str) -> None:
    with pytest.raises(DataError, match=match):
        SupervisedDataset([_jsonl(tmp_path / "x.jsonl", rows)], Renderer(tokenizer, 64), kind=kind)


def test_invalid_utf8_and_empty_files(tokenizer, tmp_path: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(b'{"prompt": "a", "response": "b"}\n{"prompt": "\xff", "response": "b"}\n')
    with pytest.raises(DataError, match=r"bad\.jsonl:2: not valid UTF-8"):
        SupervisedDataset([bad], Renderer(tokenizer, 64))
    (tmp_path / "empty.jsonl").touch()
    with pytest.raises(DataError, match=r"empty\.jsonl'\] leave no file to read \(skipped 1 empty file\)"):
        SupervisedDataset([tmp_path / "empty.jsonl"], Renderer(tokenizer, 64))
