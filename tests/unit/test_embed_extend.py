"""Embedding-only vocabulary extension (train/vocab/extend.py, embed_snapshot.py) on tiny random HF models."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.unit.embed_models import (
    NEW_WORDS,
    TRAIN_TEXT,
    load_model,
    make_tokenizer,
    save_model,
    train_new_rows,
)
from train.data.corpus import DataError
from train.data.tokenizer import load_tokenizer
from train.vocab.extend import (
    VocabError,
    encode_blocks,
    extend_vocabulary,
    freeze_all_but_new_rows,
    plan_new_tokens,
    read_lexicon,
    row_norms,
)
from train.vocab.snapshot import load_embedding_snapshot, save_embedding_snapshot


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("embed")


@pytest.fixture(scope="module")
def tok_dir(root: Path) -> Path:
    return make_tokenizer(root)


def _weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def test_read_lexicon_text_and_json(tmp_path: Path) -> None:
    text = tmp_path / "lex.txt"
    text.write_text("# domain words\n  zorblax \n\nNew York\nsnerg\n# comment\nzorblax\nquuxite\n", encoding="utf-8")
    assert read_lexicon(text) == ["zorblax", "New York", "snerg", "quuxite"]
    js = tmp_path / "lex.json"
    js.write_text(json.dumps(["#tag", " spaced", "#tag", "b"]), encoding="utf-8")
    assert read_lexicon(js) == ["#tag", " spaced", "b"]


def test_read_lexicon_errors_name_file_and_line(tmp_path: Path) -> None:
    with pytest.raises(VocabError, match="no such file"):
        read_lexicon(tmp_path / "missing.txt")
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"ok\n\xff\xfe broken\n")
    with pytest.raises(VocabError, match=r"bad\.txt:2: not UTF-8"):
        read_lexicon(bad)
    empty = tmp_path / "empty.txt"
    empty.write_text("# nothing\n\n   \n")
    with pytest.raises(VocabError, match="no entries"):
        read_lexicon(empty)
    js = tmp_path / "lex.json"
    js.write_text('{"a": 1}')
    with pytest.raises(VocabError, match="JSON dict"):
        read_lexicon(js)
    js.write_text('["a", 3]')
    with pytest.raises(VocabError, match="item 1 is 3"):
        read_lexicon(js)


def test_plan_new_tokens_keeps_only_missing_words(tok_dir: Path) -> None:
    tokenizer = load_tokenizer(tok_dir)
    vocab = tokenizer.get_vocab()
    assert "Ġfox" in vocab and "fox" not in vocab  # byte-level BPE: the word exists after a space only
    assert plan_new_tokens(tokenizer, ["snerg", "fox", "the", "zorblax", "a", "snerg"]) == ["snerg", "zorblax"]
    with pytest.raises(VocabError, match=r"all 3 lexicon entries are already single tokens.*'fox', 'the', 'a'"):
        plan_new_tokens(tokenizer, ["fox", "the", "a"])


@pytest.mark.parametrize(
    ("kind", "tied"),
    [("llama", False), ("llama", True), ("qwen2", False), ("qwen2", True), ("gpt2", True), ("gpt2", False)],
)
def test_extend_then_train_only_new_rows(root: Path, tok_dir: Path, kind: str, tied: bool) -> None:
    model = load_model(save_model(root, tok_dir, kind, tied))
    tokenizer = load_tokenizer(tok_dir)
    before = _weights(model)
    base_vocab = len(tokenizer)
    info = extend_vocabulary(model, tokenizer, plan_new_tokens(tokenizer, NEW_WORDS), init_scale=0.5, seed=3)

    assert info.new_tokens == NEW_WORDS and info.new_ids == [base_vocab, base_vocab + 1, base_vocab + 2]
    assert (info.base_vocab_size, info.new_vocab_size, info.num_embeddings) == (base_vocab, base_vocab + 3, base_vocab + 3)
    assert tokenizer.encode(" zorblax snerg", add_special_tokens=False)[1::2] == [info.new_ids[0], info.new_ids[2]]
    emb = model.get_input_embeddings().weight
    head = model.get_output_embeddings().weight
    assert info.tied is tied and (head is emb) is tied
    assert model.config.vocab_size == base_vocab + 3
    base_norms = row_norms(before[next(n for n in before if "wte" in n or "embed_tokens" in n)], base_vocab)
    assert info.mean_base_norm == pytest.approx(base_norms.mean().item(), rel=1e-6)
    new_norms = emb[base_vocab:].detach().norm(dim=1)
    torch.testing.assert_close(new_norms, torch.full((3,), 0.5 * info.mean_base_norm), rtol=1e-5, atol=0)
    if not tied:
        head_norms = head[base_vocab:].detach().norm(dim=1)
        torch.testing.assert_close(head_norms, torch.full((3,), info.head_init_radius), rtol=1e-5, atol=0)
        assert info.head_init_radius == pytest.approx(0.5 * row_norms(head, base_vocab).mean().item(), rel=1e-6)
    assert torch.equal(emb[:base_vocab], before[next(n for n in before if "wte" in n or "embed_tokens" in n)])

    extended = _weights(model)
    losses = train_new_rows(model, tokenizer, info, steps=8)
    assert losses[-1] < losses[0] - 0.3, losses
    assert model.get_input_embeddings().weight is emb  # the optimizer trained the live Parameter
    for name, p in model.named_parameters():
        if p is emb or p is head:
            assert torch.equal(p[:base_vocab], extended[name][:base_vocab]), name  # bitwise
            assert not torch.equal(p[base_vocab:], extended[name][base_vocab:]), name
            assert p.requires_grad
        else:
            assert torch.equal(p, extended[name]), name
            assert not p.requires_grad, name


def test_gradient_hook_zeroes_base_rows_exactly(root: Path, tok_dir: Path) -> None:
    model, tokenizer = load_model(save_model(root, tok_dir, "llama", True)), load_tokenizer(tok_dir)
    info = extend_vocabulary(model, tokenizer, NEW_WORDS, pad_to_multiple_of=16)
    freeze_all_but_new_rows(model, info)
    (emb,) = freeze_all_but_new_rows(model, info)  # a second call replaces the hook
    assert len(emb._backward_hooks) == 1
    (emb.sum() * float("nan")).backward()  # a non-finite gradient on every row
    grad = emb.grad
    assert not grad[: info.base_vocab_size].any() and not grad[info.new_vocab_size :].any()  # exact zeros
    assert grad[info.base_vocab_size : info.new_vocab_size].isnan().all()


def test_same_seed_same_rows_and_other_seed_differs(root: Path, tok_dir: Path) -> None:
    path = save_model(root, tok_dir, "llama", False)
    rows = []
    for seed in (0, 0, 1):
        model, tokenizer = load_model(path), load_tokenizer(tok_dir)
        info = extend_vocabulary(model, tokenizer, NEW_WORDS, seed=seed)
        rows.append(model.get_input_embeddings().weight[info.base_vocab_size :].detach().clone())
    assert torch.equal(rows[0], rows[1]) and not torch.equal(rows[0], rows[2])


def test_padding_and_spare_rows(root: Path, tok_dir: Path) -> None:
    model, tokenizer = load_model(save_model(root, tok_dir, "llama", True)), load_tokenizer(tok_dir)
    base_vocab = len(tokenizer)
    info = extend_vocabulary(model, tokenizer, NEW_WORDS, pad_to_multiple_of=64)
    assert info.num_embeddings == -(-(base_vocab + 3) // 64) * 64 == model.get_input_embeddings().weight.shape[0]
    padding = model.get_input_embeddings().weight[info.new_vocab_size :]
    assert padding.shape[0] > 0 and not padding.any()
    train_new_rows(model, tokenizer, info, steps=2)
    assert not model.get_input_embeddings().weight[info.new_vocab_size :].any()  # frozen zero rows

    # A model with spare rows past its tokenizer (as some HF models have): the new tokens use them, no resize.
    model, tokenizer = load_model(save_model(root, tok_dir, "llama", False, extra_rows=5)), load_tokenizer(tok_dir)
    before = _weights(model)
    info = extend_vocabulary(model, tokenizer, NEW_WORDS)
    assert info.num_embeddings == info.base_num_embeddings == base_vocab + 5
    emb = model.get_input_embeddings().weight
    assert torch.equal(emb[info.new_vocab_size :], before["model.embed_tokens.weight"][info.new_vocab_size :])
    assert not torch.equal(emb[base_vocab : info.new_vocab_size], before["model.embed_tokens.weight"][base_vocab:-2])


def test_untied_head_bias_gets_the_mean_base_bias(root: Path, tok_dir: Path) -> None:
    model, tokenizer = load_model(save_model(root, tok_dir, "llama", False)), load_tokenizer(tok_dir)
    old = model.lm_head
    model.lm_head = torch.nn.Linear(old.in_features, old.out_features, bias=True)
    with torch.no_grad():
        model.lm_head.weight.copy_(old.weight)
        model.lm_head.bias.copy_(torch.linspace(-1.0, 2.0, old.out_features))
    info = extend_vocabulary(model, tokenizer, NEW_WORDS, pad_to_multiple_of=16)
    bias = model.lm_head.bias.detach()
    assert bias.shape[0] == info.num_embeddings
    torch.testing.assert_close(bias[info.base_vocab_size : info.new_vocab_size], torch.full((3,), 0.5))
    assert not bias[info.new_vocab_size :].any()


def test_extend_refuses_bad_arguments(root: Path, tok_dir: Path) -> None:
    model, tokenizer = load_model(save_model(root, tok_dir, "llama", True)), load_tokenizer(tok_dir)
    size = len(tokenizer)
    with pytest.raises(VocabError, match="init_scale=0"):
        extend_vocabulary(model, tokenizer, NEW_WORDS, init_scale=0.0)
    with pytest.raises(VocabError, match="already in the vocabulary"):
        extend_vocabulary(model, tokenizer, ["zorblax", "Ġfox"])
    with pytest.raises(VocabError, match="repeat"):
        extend_vocabulary(model, tokenizer, ["zorblax", "zorblax"])
    with pytest.raises(VocabError, match="nothing to add"):
        extend_vocabulary(model, tokenizer, [])
    assert len(tokenizer) == size and model.get_input_embeddings().weight.shape[0] == size


def test_encode_blocks_uses_new_tokens(root: Path, tok_dir: Path) -> None:
    model, tokenizer = load_model(save_model(root, tok_dir, "llama", True)), load_tokenizer(tok_dir)
    info = extend_vocabulary(model, tokenizer, NEW_WORDS)
    data = encode_blocks(tokenizer, [TRAIN_TEXT, TRAIN_TEXT], 16)
    ids = tokenizer.encode(TRAIN_TEXT, add_special_tokens=False) + [tokenizer.eos_token_id]
    assert len(data) == (2 * len(ids) - 1) // 16
    x, y = data[1]
    assert x.tolist() == ids[16:32] and y.tolist() == ids[17:33]  # block 1: non-overlapping inputs
    assert set(info.new_ids) <= set(ids)
    with pytest.raises(VocabError, match="fewer than seq_len"):
        encode_blocks(tokenizer, ["the dog"], 64)


def test_four_bit_base_trains_only_new_rows(root: Path, tok_dir: Path) -> None:
    import bitsandbytes as bnb

    for tied in (False, True):
        model, tokenizer = load_model(save_model(root, tok_dir, "llama", tied), four_bit=True), load_tokenizer(tok_dir)
        assert isinstance(model.model.layers[0].self_attn.q_proj, bnb.nn.Linear4bit)
        before = _weights(model)
        info = extend_vocabulary(model, tokenizer, NEW_WORDS)
        head = model.get_output_embeddings()
        assert type(head) is torch.nn.Linear and head.weight.dtype == torch.float32  # lm_head is not quantized
        assert (head.weight is model.get_input_embeddings().weight) is tied
        extended = _weights(model)
        losses = train_new_rows(model, tokenizer, info, steps=8)
        assert losses[-1] < losses[0] - 0.3, losses
        trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        assert trainable == ({"model.embed_tokens.weight"} if tied else {"model.embed_tokens.weight", "lm_head.weight"})
        new = slice(info.base_vocab_size, None)
        for name, p in model.named_parameters():
            if name in trainable:
                assert torch.equal(p[: info.base_vocab_size], before[name]), name
                assert not torch.equal(p[new], extended[name][new]), name
            else:
                assert torch.equal(p, before[name]), name  # the packed 4-bit weights too


@pytest.mark.parametrize(("kind", "tied"), [("llama", False), ("gpt2", True)])
def test_snapshot_round_trip_is_bitwise(root: Path, tok_dir: Path, tmp_path: Path, kind: str, tied: bool) -> None:
    path = save_model(root, tok_dir, kind, tied)
    model, tokenizer = load_model(path), load_tokenizer(tok_dir)
    info = extend_vocabulary(model, tokenizer, NEW_WORDS, pad_to_multiple_of=8)
    train_new_rows(model, tokenizer, info, steps=3)
    snap = save_embedding_snapshot(model, info, tmp_path / "step_00000003", 3, tokenizer=tokenizer)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_00000003"]  # no temporary dir left
    with pytest.raises(DataError, match="already exists"):
        save_embedding_snapshot(model, info, snap, 3)

    fresh, fresh_tok = load_model(path), load_tokenizer(tok_dir)
    loaded, step = load_embedding_snapshot(fresh, fresh_tok, snap)
    assert step == 3 and loaded.new_ids == info.new_ids and loaded.num_embeddings == info.num_embeddings
    for a, b in ((model.get_input_embeddings(), fresh.get_input_embeddings()),
                 (model.get_output_embeddings(), fresh.get_output_embeddings())):
        assert torch.equal(a.weight, b.weight)
    assert fresh_tok.encode(TRAIN_TEXT) == tokenizer.encode(TRAIN_TEXT)
    x = torch.tensor([tokenizer.encode(TRAIN_TEXT)[:40]])
    with torch.no_grad():  # eval mode: GPT-2 has dropout
        assert torch.equal(model.eval()(input_ids=x).logits, fresh.eval()(input_ids=x).logits)


def test_snapshot_from_another_base_is_refused(root: Path, tok_dir: Path, tmp_path: Path) -> None:
    model, tokenizer = load_model(save_model(root, tok_dir, "llama", False)), load_tokenizer(tok_dir)
    info = extend_vocabulary(model, tokenizer, NEW_WORDS)
    snap = save_embedding_snapshot(model, info, tmp_path / "snap", 7)

    other, other_tok = load_model(save_model(root, tok_dir, "llama", False, seed=1)), load_tokenizer(tok_dir)
    with pytest.raises(VocabError, match="another base: embedding_sha256"):
        load_embedding_snapshot(other, other_tok, snap)
    assert len(other_tok) == info.base_vocab_size  # nothing was changed
    assert other.get_input_embeddings().weight.shape[0] == info.base_num_embeddings

    same_bf16 = load_model(save_model(root, tok_dir, "llama", False), dtype=torch.bfloat16)
    with pytest.raises(VocabError, match="embedding_dtype is 'float32' there but 'bfloat16' here; load the base"):
        load_embedding_snapshot(same_bf16, load_tokenizer(tok_dir), snap)
    qwen = load_model(save_model(root, tok_dir, "qwen2", False))
    with pytest.raises(VocabError, match="another base: (model_type|embedding_sha256|head_sha256)"):
        load_embedding_snapshot(qwen, load_tokenizer(tok_dir), snap)
    with pytest.raises(VocabError, match="no snapshot.json"):
        load_embedding_snapshot(other, other_tok, tmp_path)


def test_four_bit_snapshot_resume(root: Path, tok_dir: Path, tmp_path: Path) -> None:
    """Train on a 4-bit base, snapshot, rebuild on a fresh 4-bit base and continue with a fresh optimizer."""
    path = save_model(root, tok_dir, "llama", False)
    model, tokenizer = load_model(path, four_bit=True), load_tokenizer(tok_dir)
    info = extend_vocabulary(model, tokenizer, NEW_WORDS)
    first = train_new_rows(model, tokenizer, info, steps=6)
    snap = save_embedding_snapshot(model, info, tmp_path / "snap", 6, tokenizer=tokenizer)
    fresh, fresh_tok = load_model(path, four_bit=True), load_tokenizer(tok_dir)
    loaded, step = load_embedding_snapshot(fresh, fresh_tok, snap)
    assert step == 6
    x = torch.tensor([tokenizer.encode(TRAIN_TEXT)[:40]])
    with torch.no_grad():
        assert torch.equal(model(input_ids=x).logits, fresh(input_ids=x).logits)
    resumed = train_new_rows(fresh, fresh_tok, loaded, steps=4)
    assert resumed[0] < first[0] - 0.3 and resumed[-1] < resumed[0]
    base = np.s_[: loaded.base_vocab_size]
    reference = load_model(path, four_bit=True).get_input_embeddings().weight
    assert torch.equal(fresh.get_input_embeddings().weight[base], reference[base])
