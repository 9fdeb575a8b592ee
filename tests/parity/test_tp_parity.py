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

    from parallel.tp import FullLogits, apply_tp, gather_full_grads, gather_full_state_dict, tp_lm_loss

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
    full_state = gather_full_state_dict(model)  # the way back: the plain model's state dict
    assert full_state.keys() == ref.state_dict().keys()
    for name, tensor in ref.state_dict().items():
        assert torch.equal(full_state[name], tensor), name
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


def check_rng_streams(rank: int, world: int, sequence_parallel: bool) -> list[float]:
    """Dropout on: replicated activations stay identical across TP ranks, and so does the default generator;
    the TP context's generators differ between ranks."""
    import torch.distributed as dist

    from parallel.comm import _gather
    from parallel.tp import apply_tp

    args = _args(dropout=0.2)
    torch.manual_seed(0)
    model = _reference(args)
    ctx = apply_tp(model, dist.group.WORLD, sequence_parallel=sequence_parallel, seed=5)
    model.train()
    torch.manual_seed(1234)  # the default stream: the same on every rank (as a launcher seeds it)
    hidden = {}
    model.norm.register_forward_hook(lambda m, i, o: hidden.setdefault("h", o.detach()))
    model(_batch(args)[0])
    h = _gather(hidden["h"], 1, dist.group.WORLD) if sequence_parallel else hidden["h"]
    copies = _gather(h.unsqueeze(0), 0, dist.group.WORLD)  # (world, B, T, dim)
    assert all(torch.equal(copies[0], c) for c in copies), "replicated activations differ across TP ranks"
    default = _gather(torch.rand(8).unsqueeze(0), 0, dist.group.WORLD)  # per-rank draws did not move it
    assert all(torch.equal(default[0], d) for d in default), "the default generator differs across TP ranks"
    assert isinstance(ctx.generator("cpu"), torch.Generator) and set(ctx.rng_state()) == {"cpu"}
    own = torch.rand(8, generator=ctx.generator("cpu"))
    streams = _gather(own.unsqueeze(0), 0, dist.group.WORLD)
    assert not torch.equal(streams[0], streams[1]), \
        "TP ranks drew the same dropout masks over different heads"
    again = torch.rand(8, generator=ctx.generator("cpu"))
    assert not torch.equal(own, again)  # the generator advances, it is not reseeded each time
    return own.tolist()


@pytest.mark.slow
@pytest.mark.parametrize("sequence_parallel", [False, True], ids=["tp", "tp+sp"])
def test_rng_streams_are_shared_and_split_where_they_must_be(sequence_parallel: bool) -> None:
    run_ranks(2, check_rng_streams, (sequence_parallel,))


def check_inputs_embeds(rank: int, world: int, sequence_parallel: bool) -> float:
    """Soft prompts through ``inputs_embeds``: the same logits, and the same gradient reaches the
    embeddings."""
    import torch.distributed as dist

    from parallel.tp import FullLogits, apply_tp, tp_lm_loss

    args = _args()
    ref = _reference(args)
    x, y = _batch(args)
    embeds = ref.embed_tokens(x).detach().requires_grad_(True)  # (B, T, dim), as an adapter would produce
    ref_logits = ref(inputs_embeds=embeds)
    torch.nn.functional.cross_entropy(ref_logits.flatten(0, 1), y.flatten(), ignore_index=-100).backward()
    ref_grad = embeds.grad.clone()

    model = _reference(args)
    ctx = apply_tp(model, dist.group.WORLD, sequence_parallel=sequence_parallel)
    mine = embeds.detach().clone().requires_grad_(True)
    tp_lm_loss(model, ctx)(model(inputs_embeds=mine), y).backward()
    worst = (mine.grad - ref_grad).abs().max().item()
    with torch.no_grad():
        worst = max(worst, (FullLogits(model, ctx)(inputs_embeds=embeds) - ref_logits).abs().max().item())
    assert worst < TOL, worst
    return worst


@pytest.mark.slow
@pytest.mark.parametrize("sequence_parallel", [False, True], ids=["tp", "tp+sp"])
def test_inputs_embeds_under_tp(sequence_parallel: bool) -> None:
    run_ranks(2, check_inputs_embeds, (sequence_parallel,))
