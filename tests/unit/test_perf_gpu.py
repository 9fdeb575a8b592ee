"""Fused kernels and flash attention against their references, and the TP ranks' CUDA dropout generators, on
CUDA (skipped without it).

Run on a GPU machine: ``python -m pytest -m gpu tests/unit/test_perf_gpu.py``.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

from model import attention as attn_mod
from model.attention import attention
from model.kernels import (
    liger_apply_rope,
    liger_linear_cross_entropy,
    liger_rms_norm,
    liger_swiglu,
    linear_cross_entropy,
)
from model.ops import apply_rope, precompute_rope, rms_norm, swiglu
from parallel.layers import TPContext, TPDropout

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]
needs_liger = pytest.mark.skipif(importlib.util.find_spec("liger_kernel") is None, reason="needs liger-kernel")
DTYPES = [torch.float32, torch.bfloat16]
TOL = {torch.float32: 1e-4, torch.bfloat16: 2e-2}


def _grads(fn, *inputs: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    leaves = [t.detach().clone().requires_grad_(True) for t in inputs]
    out = fn(*leaves)
    out = out if isinstance(out, torch.Tensor) else torch.cat([o.flatten() for o in out])
    g = torch.Generator(device=out.device).manual_seed(9)
    out.backward(torch.randn(out.shape, generator=g, device=out.device, dtype=out.dtype))
    return out.detach().float(), [leaf.grad.float() for leaf in leaves]


def _same(fused, reference, *inputs: torch.Tensor, tol: float) -> None:
    out, grads = _grads(fused, *inputs)
    ref_out, ref_grads = _grads(reference, *inputs)
    torch.testing.assert_close(out, ref_out, atol=tol, rtol=tol)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, atol=tol * 4, rtol=tol * 4)


@needs_liger
@pytest.mark.parametrize("dtype", DTYPES)
def test_liger_rms_norm(dtype: torch.dtype) -> None:
    x = torch.randn(2, 64, 256, device="cuda", dtype=dtype)
    w = (1 + 0.1 * torch.randn(256, device="cuda")).to(dtype)
    _same(lambda a, b: liger_rms_norm(a, b, 1e-5), lambda a, b: rms_norm(a, b, 1e-5), x, w, tol=TOL[dtype])


@needs_liger
@pytest.mark.parametrize("dtype", DTYPES)
def test_liger_swiglu(dtype: torch.dtype) -> None:
    gate, up = (torch.randn(2, 64, 384, device="cuda", dtype=dtype) for _ in range(2))
    _same(liger_swiglu, swiglu, gate, up, tol=TOL[dtype])


@needs_liger
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("packed", [False, True], ids=["positions", "doc-positions"])
def test_liger_rope(dtype: torch.dtype, packed: bool) -> None:
    cos, sin = precompute_rope(64, 128, 10000.0, device="cuda")
    q = torch.randn(2, 32, 8, 64, device="cuda", dtype=dtype)
    k = torch.randn(2, 32, 2, 64, device="cuda", dtype=dtype)  # GQA: fewer key heads
    pos = torch.arange(32, device="cuda")
    if packed:  # positions restarting per document, per row
        pos = torch.stack([torch.cat([torch.arange(10), torch.arange(22)]), torch.arange(32)]).cuda()
    _same(lambda a, b: liger_apply_rope(a, b, cos, sin, pos), lambda a, b: apply_rope(a, b, cos, sin, pos),
          q, k, tol=TOL[dtype])


@needs_liger
@pytest.mark.parametrize("dtype", DTYPES)
def test_liger_linear_cross_entropy(dtype: torch.dtype) -> None:
    h = torch.randn(2, 64, 128, device="cuda", dtype=dtype)
    w = (0.05 * torch.randn(1000, 128, device="cuda")).to(dtype)
    y = torch.randint(0, 1000, (2, 64), device="cuda")
    y[0, :5] = -100

    def fused(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return liger_linear_cross_entropy(a, b, y)

    def ref(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return linear_cross_entropy(a, b, y)

    _same(fused, ref, h, w, tol=TOL[dtype])


@pytest.mark.parametrize("doc_mask", [False, True], ids=["causal", "doc-mask"])
def test_flash_backends_match_sdpa(doc_mask: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    if attn_mod._FLASH_ATTN_FUNC is None and attn_mod._FLASH_ATTN3_FUNC is None:
        pytest.skip("neither flash-attn nor FlashAttention-3 is installed")
    q = torch.randn(2, 64, 8, 64, device="cuda", dtype=torch.bfloat16)
    k, v = (torch.randn(2, 64, 2, 64, device="cuda", dtype=torch.bfloat16) for _ in range(2))  # GQA
    doc_ids = torch.tensor([[0] * 20 + [1] * 44, [0] * 64], device="cuda") if doc_mask else None
    got = attention(q, k, v, doc_ids=doc_ids)
    for name in ("_FLASH_ATTN_FUNC", "_FLASH_ATTN3_FUNC"):  # the same call on SDPA
        monkeypatch.setattr(attn_mod, name, None)
    ref = attention(q, k, v, doc_ids=doc_ids)
    torch.testing.assert_close(got.float(), ref.float(), atol=2e-2, rtol=2e-2)


def test_tp_dropout_generators_on_cuda() -> None:
    """Sequence-parallel dropout draws from the TP context's CUDA generator, attention dropout borrows its
    state (the kernels take no generator) and hands the default CUDA generator back; rewinding redraws."""
    ctx = TPContext(group=None, size=2, rank=1, sequence_parallel=True, seed=5)
    x = torch.randn(2, 64, 128, device="cuda")
    torch.cuda.manual_seed(0)
    default = torch.cuda.get_rng_state()
    y = TPDropout(0.25, ctx).train()(x)
    assert torch.equal(torch.cuda.get_rng_state(), default)
    own = torch.Generator(device="cuda").manual_seed(5 + 2718 + 1)
    assert torch.equal(y, x * (torch.empty_like(x).bernoulli_(0.75, generator=own) / 0.75))

    q = torch.randn(2, 64, 8, 64, device="cuda", dtype=torch.bfloat16)
    k, v = (torch.randn(2, 64, 2, 64, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    state = ctx.rng_state()
    with ctx.default_rng():
        first = attention(q, k, v, dropout_p=0.2)
    assert torch.equal(torch.cuda.get_rng_state(), default)
    with ctx.replay_rng(state), ctx.default_rng():  # what activation recomputation does
        assert torch.equal(attention(q, k, v, dropout_p=0.2), first)
    with ctx.default_rng():  # the generator went on
        assert not torch.equal(attention(q, k, v, dropout_p=0.2), first)
    other = TPContext(group=None, size=2, rank=0, sequence_parallel=True, seed=5)
    with other.default_rng():  # another TP rank draws other masks
        assert not torch.equal(attention(q, k, v, dropout_p=0.2), first)
