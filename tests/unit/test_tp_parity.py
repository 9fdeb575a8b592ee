"""Tensor parallelism on 2 and 4 gloo ranks equals the single-process model: logits, loss, every gradient."""

from __future__ import annotations

import copy

import pytest
import torch

from tests.gloo import run_ranks

TOL = 1e-5


def _args(**overrides):
    from model import ModelArgs

    base = {"dim": 64, "n_layers": 2, "n_heads": 8, "n_kv_heads": 4, "vocab_size": 101, "ffn_hidden_dim": 96,
            "max_seq_len": 32}
    base.update(overrides)
    return ModelArgs(**base)


def _reference(args, seed: int = 0):
    from model import Transformer

    torch.manual_seed(seed)
    model = Transformer(args)
    for p in model.parameters():  # norms and sinks away from their init, so their gradients are informative
        if p.dim() == 1:
            p.data.add_(0.1 * torch.randn_like(p))
    return model


def _batch(args, batch: int = 2, seq: int = 16):
    g = torch.Generator().manual_seed(7)
    x = torch.randint(0, args.vocab_size, (batch, seq), generator=g)
    y = torch.randint(0, args.vocab_size, (batch, seq), generator=g)
    y[0, :3] = -100  # ignored positions
    return x, y


def check_parity(rank: int, world: int, overrides: dict, sequence_parallel: bool) -> float:
    import torch.distributed as dist
    import torch.nn.functional as F

    from parallel.tp import FullLogits, apply_tp, gather_full_grads, tp_lm_loss

    args = _args(**overrides)
    ref = _reference(args)
    x, y = _batch(args)
    ref_logits = ref(x)
    ref_loss = F.cross_entropy(ref_logits.flatten(0, 1), y.flatten(), ignore_index=-100)
    ref_loss.backward()
    ref_grads = {n: p.grad for n, p in ref.named_parameters(remove_duplicate=False)}

    model = _reference(args)
    ctx = apply_tp(model, dist.group.WORLD, sequence_parallel=sequence_parallel)
    assert ctx.size == world and ctx.sequence_parallel == sequence_parallel
    local_logits = model(x)
    loss = tp_lm_loss(model, ctx)(local_logits, y)
    loss.backward()
    worst = abs(loss.item() - ref_loss.item())
    assert worst < TOL, f"loss {loss.item()} vs {ref_loss.item()}"
    with torch.no_grad():
        full = FullLogits(model, ctx)(x)
    assert full.shape == ref_logits.shape
    worst = max(worst, (full - ref_logits).abs().max().item())
    grads = gather_full_grads(model)
    assert grads.keys() == ref_grads.keys()
    for name, g in grads.items():
        err = (g - ref_grads[name]).abs().max().item()
        assert err < TOL, f"{name}: gradient differs by {err}"
        worst = max(worst, err)
    assert worst < TOL
    return worst


CASES = {
    "gqa": {},
    "tied-sinks-bias": {"tie_embeddings": True, "attn_sinks": True, "attn_bias": True},
}


@pytest.mark.slow
@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("sequence_parallel", [False, True], ids=["tp", "tp+sp"])
@pytest.mark.parametrize("case", list(CASES))
def test_tp_equals_single_process(world: int, sequence_parallel: bool, case: str) -> None:
    worst = run_ranks(world, check_parity, (CASES[case], sequence_parallel))
    assert max(worst) < TOL


def check_local_copy_is_untouched(rank: int, world: int) -> None:
    """apply_tp on a deep copy leaves the original whole (the transformation is in place on its argument)."""
    import torch.distributed as dist

    from parallel.tp import apply_tp

    ref = _reference(_args())
    twin = copy.deepcopy(ref)
    apply_tp(twin, dist.group.WORLD)
    assert ref.layers[0].mlp.up_proj.weight.shape == (96, 64)
    assert twin.layers[0].mlp.up_proj.weight.shape == (96 // world, 64)


@pytest.mark.slow
def test_apply_tp_shards_in_place() -> None:
    run_ranks(2, check_local_copy_is_untouched)
