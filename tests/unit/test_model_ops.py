"""Reference ops (RMSNorm, SwiGLU, RoPE) and the attention entry point (masking, GQA, sinks, logging)."""

from __future__ import annotations

import logging
import math

import pytest
import torch
import torch.nn.functional as F

from model.attention import _log_first_use, attention
from model.ops import apply_rope, precompute_rope, rms_norm, swiglu

D = 16


def rope_at(x: torch.Tensor, position: int, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate a single vector x (D,) as if it sat at `position`."""
    x = x.view(1, 1, 1, -1)  # (B, T, H, D)
    rotated, _ = apply_rope(x, x, cos, sin, torch.tensor([position]))
    return rotated.view(-1)


def reference_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sinks: torch.Tensor | None = None
) -> torch.Tensor:
    """Textbook causal attention, one query at a time: (B, T, Hq, D), (B, S, Hkv, D) -> (B, T, Hq, D)."""
    B, T, Hq, _ = q.shape
    S, Hkv = k.shape[1], k.shape[2]
    out = torch.zeros_like(q)
    for i in range(T):
        visible = S - T + i + 1  # query i is the (S - T + i)-th position of the sequence
        for h in range(Hq):
            kv_head = h // (Hq // Hkv)
            scores = torch.einsum("bd,bsd->bs", q[:, i, h], k[:, :visible, kv_head]) / math.sqrt(q.shape[-1])
            if sinks is not None:
                scores = torch.cat((scores, sinks[h].expand(B, 1)), dim=-1)
            probs = scores.softmax(dim=-1)[:, :visible]
            out[:, i, h] = (probs.unsqueeze(-1) * v[:, :visible, kv_head]).sum(dim=1)
    return out


def test_rms_norm_and_swiglu() -> None:
    x = torch.randn(3, 5, D)
    weight = torch.randn(D)
    expected = x / torch.sqrt((x * x).mean(dim=-1, keepdim=True) + 1e-5) * weight
    torch.testing.assert_close(rms_norm(x, weight, 1e-5), expected)
    assert rms_norm(x.bfloat16(), weight.bfloat16(), 1e-5).dtype == torch.bfloat16
    gate, up = torch.randn(2, 7), torch.randn(2, 7)
    torch.testing.assert_close(swiglu(gate, up), gate * torch.sigmoid(gate) * up)


def test_rope_scores_depend_only_on_relative_position() -> None:
    cos, sin = precompute_rope(D, 64, 10000.0)
    q, k = torch.randn(D), torch.randn(D)
    for offset in (0, 3, 17):
        scores = [rope_at(q, m, cos, sin) @ rope_at(k, m - offset, cos, sin) for m in range(offset, 40, 7)]
        torch.testing.assert_close(torch.stack(scores), scores[0].expand(len(scores)), atol=1e-5, rtol=1e-5)
    # ... and they do change with the distance (otherwise the check above would be empty).
    assert not torch.allclose(rope_at(q, 5, cos, sin) @ rope_at(k, 0, cos, sin), q @ k, atol=1e-3)


def test_rope_preserves_norms_and_position_zero_is_identity() -> None:
    cos, sin = precompute_rope(D, 64, 500000.0)
    q, k = torch.randn(2, 10, 4, D), torch.randn(2, 10, 2, D)
    position_ids = torch.arange(10).expand(2, 10)
    q_rot, k_rot = apply_rope(q, k, cos, sin, position_ids)
    torch.testing.assert_close(q_rot.norm(dim=-1), q.norm(dim=-1))
    torch.testing.assert_close(k_rot.norm(dim=-1), k.norm(dim=-1))
    torch.testing.assert_close(q_rot[:, 0], q[:, 0])
    assert not torch.allclose(q_rot[:, 1:], q[:, 1:])


def test_rope_position_offset_equals_slicing() -> None:
    cos, sin = precompute_rope(D, 64, 10000.0)
    q, k = torch.randn(2, 12, 4, D), torch.randn(2, 12, 2, D)
    q_full, k_full = apply_rope(q, k, cos, sin, torch.arange(12))
    q_tail, k_tail = apply_rope(q[:, 5:], k[:, 5:], cos, sin, torch.arange(5, 12))
    torch.testing.assert_close(q_tail, q_full[:, 5:])
    torch.testing.assert_close(k_tail, k_full[:, 5:])


def test_precompute_rope_rejects_odd_head_dim() -> None:
    with pytest.raises(ValueError, match="head_dim"):
        precompute_rope(15, 8, 10000.0)


@pytest.mark.parametrize(("T", "S"), [(7, 7), (3, 7), (1, 7)])
@pytest.mark.parametrize("kv_heads", [4, 2, 1])
def test_attention_matches_reference_with_bottom_right_mask(T: int, S: int, kv_heads: int) -> None:
    q, k, v = torch.randn(2, T, 4, D), torch.randn(2, S, kv_heads, D), torch.randn(2, S, kv_heads, D)
    torch.testing.assert_close(attention(q, k, v), reference_attention(q, k, v), atol=1e-5, rtol=1e-5)


def test_attention_gqa_equals_mha_with_repeated_kv_heads() -> None:
    q, k, v = torch.randn(2, 6, 8, D), torch.randn(2, 6, 2, D), torch.randn(2, 6, 2, D)
    mha = attention(q, k.repeat_interleave(4, dim=2), v.repeat_interleave(4, dim=2))
    torch.testing.assert_close(attention(q, k, v), mha)


def test_attention_non_causal_sees_the_future() -> None:
    q, k, v = torch.randn(1, 5, 2, D), torch.randn(1, 5, 2, D), torch.randn(1, 5, 2, D)
    expected = F.softmax(torch.einsum("bthd,bshd->bhts", q, k) / math.sqrt(D), dim=-1)
    expected = torch.einsum("bhts,bshd->bthd", expected, v)
    torch.testing.assert_close(attention(q, k, v, causal=False), expected, atol=1e-5, rtol=1e-5)


def test_attention_rejects_bad_head_counts() -> None:
    with pytest.raises(ValueError, match="multiple"):
        attention(torch.randn(1, 2, 3, D), torch.randn(1, 2, 2, D), torch.randn(1, 2, 2, D))


@pytest.mark.parametrize("T", [6, 2])
def test_sinks_very_negative_equal_no_sinks(T: int) -> None:
    q, k, v = torch.randn(2, T, 4, D), torch.randn(2, 6, 2, D), torch.randn(2, 6, 2, D)
    for sink in (float("-inf"), -1e4):
        out = attention(q, k, v, sinks=torch.full((4,), sink))
        torch.testing.assert_close(out, attention(q, k, v), atol=1e-6, rtol=1e-5)


def test_sinks_match_reference_and_closed_form() -> None:
    q, k, v = torch.randn(2, 5, 4, D), torch.randn(2, 5, 2, D), torch.randn(2, 5, 2, D)
    sinks = torch.randn(4)
    torch.testing.assert_close(attention(q, k, v, sinks=sinks), reference_attention(q, k, v, sinks))
    # The first query sees one key: its weight is e^s / (e^s + e^sink) = sigmoid(s - sink).
    score = (q[:, 0] * k[:, 0].repeat_interleave(2, dim=1)).sum(-1) / math.sqrt(D)  # (B, Hq)
    expected = torch.sigmoid(score - sinks).unsqueeze(-1) * v[:, 0].repeat_interleave(2, dim=1)
    torch.testing.assert_close(attention(q, k, v, sinks=sinks)[:, 0], expected)


def test_large_sinks_shrink_the_output_toward_zero() -> None:
    q, k, v = torch.randn(2, 6, 4, D), torch.randn(2, 6, 4, D), torch.randn(2, 6, 4, D)
    norms = [attention(q, k, v, sinks=torch.full((4,), s)).norm().item() for s in (-5.0, 0.0, 5.0, 10.0)]
    assert norms == sorted(norms, reverse=True)
    assert attention(q, k, v, sinks=torch.full((4,), 40.0)).abs().max() < 1e-8


def test_sinks_stay_causal_and_get_gradients() -> None:
    q, k, v = torch.randn(1, 6, 4, D), torch.randn(1, 6, 2, D), torch.randn(1, 6, 2, D)
    sinks = torch.zeros(4, requires_grad=True)
    out = attention(q, k, v, sinks=sinks)
    k2, v2 = k.clone(), v.clone()
    k2[:, 4:], v2[:, 4:] = torch.randn(1, 2, 2, D), torch.randn(1, 2, 2, D)
    out2 = attention(q, k2, v2, sinks=sinks)
    torch.testing.assert_close(out2[:, :4], out[:, :4])
    assert not torch.allclose(out2[:, 4:], out[:, 4:])
    out.sum().backward()
    assert sinks.grad is not None and sinks.grad.abs().min() > 0


def test_backend_is_logged_once(caplog: pytest.LogCaptureFixture) -> None:
    _log_first_use.cache_clear()
    q = torch.randn(1, 3, 2, D)
    with caplog.at_level(logging.INFO, logger="tessera"):
        for _ in range(3):
            attention(q, q, q)
            attention(q, q, q, sinks=torch.zeros(2))
    messages = [r.getMessage() for r in caplog.records if r.name == "tessera"]
    assert messages == ["attention backend: sdpa", "attention backend: eager_sinks"]
