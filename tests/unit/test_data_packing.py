"""Packing: documents joined by EOS in fixed blocks, with and without attention stopping at document ends."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from model import ModelArgs, Transformer
from model.attention import attention, varlen_segments
from train.data.dataset import BlockDataset, doc_positions
from train.data.shards import ShardedTokens

SEP = 0


def _model() -> Transformer:
    torch.manual_seed(0)
    return Transformer(ModelArgs(vocab_size=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=32)).eval()


def test_positions_restart_after_every_separator() -> None:
    ends = np.array([[0, 0, 1, 0, 1, 1, 0, 0], [0, 0, 0, 0, 0, 0, 0, 1]], dtype=bool)
    positions, doc_ids = doc_positions(ends)
    assert positions.tolist() == [[0, 1, 2, 0, 1, 0, 0, 1], list(range(8))]
    assert doc_ids.tolist() == [[0, 0, 0, 1, 1, 2, 3, 3], [0] * 8]


def test_block_dataset_with_and_without_doc_mask() -> None:
    tokens = np.array([5, 6, SEP, 7, 8, 9, SEP, 10, SEP, 11, 12, 13, 14], dtype=np.uint16)
    plain = BlockDataset(tokens, 6)
    x, y = plain.batch(np.array([0, 1]))
    assert x[0].tolist() == [5, 6, SEP, 7, 8, 9] and y[0].tolist() == [6, SEP, 7, 8, 9, SEP]
    masked = BlockDataset(tokens, 6, doc_mask=True, separator_id=SEP)
    mx, my, extra = masked.batch(np.array([0, 1]))
    assert torch.equal(mx, x)
    assert my[0].tolist() == [6, SEP, -100, 8, 9, SEP]  # the separator's label (next document's first token)
    assert extra["position_ids"][0].tolist() == [0, 1, 2, 0, 1, 2]
    assert extra["doc_ids"][1].tolist() == [0, 1, 1, 2, 2, 2]  # row 1 starts with the separator of doc 1
    assert masked[1][0].tolist() == x[1].tolist()


def test_with_masking_a_tokens_logits_ignore_the_previous_document() -> None:
    model = _model()
    rng = np.random.default_rng(0)
    doc_b = rng.integers(1, 64, 9).tolist()
    rows = [[*rng.integers(1, 64, n).tolist(), SEP, *doc_b] for n in (6, 6)]  # two different previous documents
    rows.append([*rng.integers(1, 64, 3).tolist(), SEP, *rng.integers(1, 64, 2).tolist(), SEP, *doc_b])
    ds = [BlockDataset(np.array(r + [SEP], dtype=np.uint16), len(r), doc_mask=True, separator_id=SEP) for r in rows]
    with torch.no_grad():
        masked, plain = [], []
        for d in ds:
            x, _, extra = d.batch(np.array([0]))
            masked.append(model(x, **extra)[0, -len(doc_b):])
            plain.append(model(x)[0, -len(doc_b):])
        alone = model(torch.tensor([doc_b]))[0]
    for logits in masked:  # the same as document B alone, whatever came before it
        torch.testing.assert_close(logits, alone, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(plain[0], plain[1], atol=1e-3)  # without masking the previous document leaks in


def test_varlen_segments_match_per_document_attention() -> None:
    torch.manual_seed(1)
    doc_ids = torch.tensor([[0, 0, 0, 1, 1, 2, 2, 2], [0, 0, 0, 0, 0, 0, 1, 1]])
    cu, longest = varlen_segments(doc_ids)
    assert cu.tolist() == [0, 3, 5, 8, 14, 16] and longest == 6 and cu.dtype == torch.int32
    q, k, v = torch.randn(2, 8, 4, 8), torch.randn(2, 8, 2, 8), torch.randn(2, 8, 2, 8)
    out = attention(q, k, v, doc_ids=doc_ids).reshape(16, 4, 8)
    flat = [t.reshape(16, t.shape[2], 8) for t in (q, k, v)]
    for s, e in zip(cu[:-1].tolist(), cu[1:].tolist()):  # what flash-attn's varlen kernel computes per segment
        ref = attention(*(t[None, s:e] for t in flat))[0]
        torch.testing.assert_close(out[s:e], ref, atol=1e-6, rtol=1e-6)
    sinks = torch.zeros(4)
    with_sinks = attention(q, k, v, doc_ids=doc_ids, sinks=sinks).reshape(16, 4, 8)
    for s, e in zip(cu[:-1].tolist(), cu[1:].tolist()):
        ref = attention(*(t[None, s:e] for t in flat), sinks=sinks)[0]
        torch.testing.assert_close(with_sinks[s:e], ref, atol=1e-6, rtol=1e-6)
    with pytest.raises(ValueError, match="doc_ids needs as many queries as keys"):
        attention(q[:, :2], k, v, doc_ids=doc_ids[:, :2])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_doc_masking_matches_cpu() -> None:
    torch.manual_seed(2)
    doc_ids = torch.tensor([[0, 0, 0, 1, 1, 2, 2, 2]] * 2)
    q, k, v = (torch.randn(2, 8, 4, 64) for _ in range(3))
    ref = attention(q, k, v, doc_ids=doc_ids)
    got = attention(*(t.cuda().bfloat16() for t in (q, k, v)), doc_ids=doc_ids.cuda())
    torch.testing.assert_close(got.float().cpu(), ref, atol=3e-2, rtol=3e-2)


def test_sharded_windows_equal_the_flat_stream() -> None:
    flat = np.arange(100, dtype=np.uint16)
    sharded = ShardedTokens([flat[:30], flat[30:31], flat[31:31], flat[31:]])
    starts = np.array([0, 25, 29, 30, 31, 60, 89])
    assert np.array_equal(sharded.windows(starts, 11), flat[starts[:, None] + np.arange(11)])
    assert np.array_equal(sharded[28:45], flat[28:45]) and len(sharded) == 100
    a = BlockDataset(sharded, 8, mode="random", seed=4, num_samples=50)
    b = BlockDataset(flat, 8, mode="random", seed=4, num_samples=50)
    assert all(torch.equal(u, w) for u, w in zip(a.batch(np.arange(50)), b.batch(np.arange(50))))
    with pytest.raises(IndexError):
        sharded.windows(np.array([95]), 11)
