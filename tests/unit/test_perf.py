"""Performance transformations: the FLOP formula, kernel choice, the head-computed loss, activation
checkpointing (same gradients as without, dropout masks included), the TP ranks' own dropout generators,
torch.compile, and the perf config's errors. Their order and the loss choice are `parallelize`'s
(tests/unit/test_parallelize.py)."""

from __future__ import annotations

import copy
import logging

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from model import ModelArgs, Transformer
from model.kernels import (
    KernelChoice,
    LinearCrossEntropyHead,
    liger_apply_rope,
    liger_rms_norm,
    liger_swiglu,
    linear_cross_entropy,
    resolve_kernels,
)
from model.ops import apply_rope, rms_norm, swiglu
from parallel.layers import TPContext, TPDropout
from parallel.loss import HeadLoss
from parallel.perf import PerfConfigError, apply_activation_checkpointing, apply_compile, apply_kernels
from train.objectives.lm import forward_kwargs, lm_loss


def _args(**kw) -> ModelArgs:
    base = {"dim": 64, "n_layers": 4, "n_heads": 4, "n_kv_heads": 2, "vocab_size": 97, "ffn_hidden_dim": 96,
            "max_seq_len": 64}
    base.update(kw)
    return ModelArgs(**base)


def _batch(args: ModelArgs, b: int = 2, t: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    x = torch.randint(0, args.vocab_size, (b, t), generator=g)
    y = torch.randint(0, args.vocab_size, (b, t), generator=g)
    y[0, :4] = -100
    return x, y


def _loss_and_grads(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, seed: int = 11,
                    loss_fn=lm_loss) -> tuple[float, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)  # the dropout masks
    loss = loss_fn(model(x, **forward_kwargs(loss_fn)), y)
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _assert_same(a: tuple[float, dict], b: tuple[float, dict], tol: float = 1e-6) -> None:
    assert a[0] == pytest.approx(b[0], abs=tol)
    assert a[1].keys() == b[1].keys()
    for name, g in a[1].items():
        assert torch.allclose(g, b[1][name], atol=tol, rtol=0), f"{name}: {(g - b[1][name]).abs().max()}"


# ----------------------------------------------------------------------------- FLOPs


@pytest.mark.parametrize("kw", [{}, {"n_kv_heads": 4, "tie_embeddings": True}, {"attn_bias": True}],
                         ids=["gqa", "mha-tied", "qkv-bias"])
def test_flops_per_token_is_what_the_flop_counter_counts(kw: dict) -> None:
    args = _args(**kw)
    model = Transformer(args)
    B, T = 2, 48
    x, y = _batch(args, B, T)
    # the math backend runs attention as matmuls the counter sees (it has no formula for the CPU flash kernel)
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        lm_loss(model(x), y).backward()
    assert counter.get_total_flops() == args.flops_per_token(T) * B * T
    attention = 12 * args.n_layers * args.n_heads * args.head_dim * T * B * T
    assert counter.get_flop_counts()["Global"][torch.ops.aten.bmm] == attention


# ----------------------------------------------------------------------------- kernels


def test_cpu_falls_back_to_the_references_and_logs_it(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="tessera"):
        choice = resolve_kernels(torch.device("cpu"), rms_norm=True, swiglu=True, rope=True,
                                 linear_cross_entropy=True)
    assert (choice.rms_norm, choice.swiglu, choice.rope, choice.linear_cross_entropy) == ("reference",) * 4
    assert choice.rms_norm_fn() is rms_norm and choice.swiglu_fn() is swiglu
    assert choice.rope_fn() is apply_rope
    assert choice.linear_cross_entropy_fn() is linear_cross_entropy
    assert choice.attention == "sdpa"
    text = caplog.text
    assert "kernels: attention=sdpa, rms_norm=reference" in text
    assert ("fused rms_norm, swiglu, rope, linear_cross_entropy requested but liger-kernel needs a CUDA "
            "device") in text


def test_switches_off_log_no_fallback(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="tessera"):
        choice = resolve_kernels(torch.device("cpu"), rms_norm=False, swiglu=False, rope=False)
    assert choice.linear_cross_entropy is None
    assert "requested" not in caplog.text
    assert resolve_kernels(torch.device("cpu"), attention={"sinks": True}).attention == "eager_sinks"


def test_apply_kernels_puts_the_chosen_ops_into_every_slot() -> None:
    model = Transformer(_args())
    apply_kernels(model, KernelChoice(rms_norm="liger", swiglu="liger", rope="liger"))
    norms = [m for m in model.modules() if hasattr(m, "norm_fn")]
    assert len(norms) == 2 * 4 + 1 and all(m.norm_fn is liger_rms_norm for m in norms)
    assert all(block.mlp.act_fn is liger_swiglu and block.self_attn.rope_fn is liger_apply_rope
               for block in model.layers)
    assert type(model.lm_head) is torch.nn.Linear  # no head-computed loss asked for
    apply_kernels(model, KernelChoice())
    assert all(m.norm_fn is rms_norm for m in norms)


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_head_computed_loss_equals_logits_loss(tied: bool) -> None:
    args = _args(tie_embeddings=tied)
    torch.manual_seed(0)
    ref = Transformer(args)
    model = copy.deepcopy(ref)
    apply_kernels(model, KernelChoice(linear_cross_entropy="reference"))
    assert isinstance(model.lm_head, LinearCrossEntropyHead)
    assert (model.lm_head.weight is model.embed_tokens.weight) == tied
    assert model.state_dict().keys() == ref.state_dict().keys()
    loss_fn = HeadLoss(model.lm_head)
    assert forward_kwargs(loss_fn) == {"return_hidden": True}
    x, y = _batch(args)
    _assert_same(_loss_and_grads(model, x, y, loss_fn=loss_fn), _loss_and_grads(ref, x, y), tol=1e-6)
    with torch.no_grad():  # generation still gets logits from the same head
        assert torch.allclose(model(x), ref(x), atol=1e-6)


def test_head_computed_loss_refuses_a_vocabulary_parallel_head() -> None:
    from parallel.tp import shard_model

    model = Transformer(_args())
    shard_model(model, TPContext(group=None, size=2, rank=0))  # shapes only: no process group needed
    with pytest.raises(PerfConfigError, match="cannot run with tensor or pipeline parallelism"):
        apply_kernels(model, KernelChoice(linear_cross_entropy="reference"))


# ----------------------------------------------------------------------------- activation checkpointing


@pytest.mark.parametrize(("mode", "every", "wrapped"), [("full", 1, 4), ("selective", 1, 4), ("full", 2, 2),
                                                        ("selective", 3, 2)])
def test_activation_checkpointing_keeps_loss_and_gradients(mode: str, every: int, wrapped: int) -> None:
    args = _args(dropout=0.2)  # attention and residual dropout: recomputation must redraw the same masks
    torch.manual_seed(0)
    ref = Transformer(args)
    model = copy.deepcopy(ref)
    assert apply_activation_checkpointing(model, mode, every=every) == wrapped
    assert model.state_dict().keys() == ref.state_dict().keys()
    x, y = _batch(args)
    _assert_same(_loss_and_grads(model, x, y), _loss_and_grads(ref, x, y))
    copied = copy.deepcopy(model)  # the wrapped forward follows the copy, not the original
    _assert_same(_loss_and_grads(copied, x, y), _loss_and_grads(ref, x, y))


def test_activation_checkpointing_recomputes_in_backward() -> None:
    args = _args(n_layers=2)
    model = Transformer(args)
    apply_activation_checkpointing(model, "full")
    calls = []
    act = model.layers[0].mlp.act_fn

    def counted(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        calls.append(1)
        return act(gate, up)

    model.layers[0].mlp.act_fn = counted
    x, y = _batch(args)
    loss = lm_loss(model(x), y)
    assert len(calls) == 1
    loss.backward()
    assert len(calls) == 2  # the block ran again for its gradients
    with torch.no_grad():
        model(x)
    assert len(calls) == 3  # no recomputation bookkeeping without gradients


def _per_rank_dropout(model: Transformer, ctx: TPContext) -> None:
    """The dropout wiring `apply_tp` gives a TP rank (attention and sequence-parallel residual dropout draw
    from the rank's own generator), on a one-process model: no collectives are involved in drawing masks."""
    for block in model.layers:
        block.self_attn.dropout_rng = ctx.default_rng
        block.resid_dropout = TPDropout(block.resid_dropout.p, ctx)


def test_activation_checkpointing_replays_the_tp_rank_stream() -> None:
    args = _args(dropout=0.2)
    torch.manual_seed(0)
    base = Transformer(args)
    x, y = _batch(args)

    def run(ac: bool, rewind: bool) -> tuple[float, dict]:
        model = copy.deepcopy(base)
        ctx = TPContext(group=None, size=2, rank=1, sequence_parallel=True, seed=5)
        _per_rank_dropout(model, ctx)
        if ac:
            apply_activation_checkpointing(model, "full", tp_ctx=ctx if rewind else None)
        first = _loss_and_grads(model, x, y, seed=1)
        second = _loss_and_grads(model, x, y, seed=2)  # the stream goes on where the first step left it
        return first[0] + second[0], {**first[1], **{k + "@2": v for k, v in second[1].items()}}

    _assert_same(run(ac=True, rewind=True), run(ac=False, rewind=False))
    # without rewinding the rank's stream, recomputation draws other masks: the gradients differ
    _, grads = run(ac=True, rewind=False)
    _, ref_grads = run(ac=False, rewind=False)
    assert any(not torch.allclose(g, ref_grads[n], atol=1e-4) for n, g in grads.items())


# ----------------------------------------------------------------------------- the TP ranks' generators


def test_tp_context_owns_a_generator_per_rank_and_leaves_the_default_one_alone() -> None:
    """Sequence-parallel dropout draws its mask from the TP context's generator (seed + 2718 + rank), not from
    the process-wide one; attention kernels, which take no generator, borrow its state for the call only."""
    ctx = TPContext(group=None, size=2, rank=1, sequence_parallel=True, seed=5)
    assert ctx.rng_state() == {}  # made at the first draw, on the activations' device
    g = ctx.generator("cpu")
    assert isinstance(g, torch.Generator) and ctx.generator(torch.device("cpu")) is g
    assert torch.equal(g.get_state(), torch.Generator().manual_seed(5 + 2718 + 1).get_state())
    assert not torch.equal(g.get_state(), TPContext(None, 2, 0, seed=5).generator("cpu").get_state())

    drop = TPDropout(0.3, ctx).train()
    x = torch.randn(2, 8, 16)
    expected_keep = torch.empty_like(x).bernoulli_(0.7, generator=torch.Generator().manual_seed(5 + 2718 + 1))
    torch.manual_seed(0)
    default = torch.get_rng_state()
    y = drop(x)
    assert torch.equal(torch.get_rng_state(), default)  # the default generator did not move
    assert torch.equal(y, x * (expected_keep / 0.7))  # F.dropout on the CPU, with the rank's generator
    assert not torch.equal(drop(x), y)  # the generator goes on, it is not reseeded

    before = ctx.rng_state()["cpu"]
    with ctx.default_rng():  # what attention dropout runs under
        lent = torch.rand(4)
    assert torch.equal(lent, torch.rand(4, generator=torch.Generator().set_state(before)))
    assert torch.equal(torch.get_rng_state(), default)  # handed back
    assert not torch.equal(ctx.rng_state()["cpu"], before)  # and the rank's generator kept what was drawn


def test_tp_generator_state_rewinds_and_resumes() -> None:
    ctx = TPContext(group=None, size=4, rank=2, seed=1)
    ctx.generator("cpu")
    state = ctx.rng_state()
    first = torch.rand(5, generator=ctx.generator("cpu"))
    with ctx.replay_rng(state):  # recomputation redraws the first pass's numbers
        assert torch.equal(torch.rand(5, generator=ctx.generator("cpu")), first)
    after = torch.rand(5, generator=ctx.generator("cpu"))  # ... and the stream goes on as without it
    twin = TPContext(group=None, size=4, rank=2, seed=1)
    torch.rand(5, generator=twin.generator("cpu"))
    assert torch.equal(after, torch.rand(5, generator=twin.generator("cpu")))

    resumed = TPContext(group=None, size=4, rank=2, seed=1)  # a checkpoint keeps rng_state, a resume sets it
    resumed.set_rng_state({k: v.clone() for k, v in ctx.rng_state().items()})
    assert torch.equal(torch.rand(5, generator=resumed.generator("cpu")),
                       torch.rand(5, generator=ctx.generator("cpu")))
    with ctx.replay_rng({}):  # a snapshot from before the first draw: the stream starts from the seed again
        assert torch.equal(torch.rand(5, generator=ctx.generator("cpu")), first)


def test_activation_checkpointing_bad_input() -> None:
    model = Transformer(_args())
    with pytest.raises(PerfConfigError, match="mode 'blocks'"):
        apply_activation_checkpointing(model, "blocks")
    with pytest.raises(PerfConfigError, match="every=0"):
        apply_activation_checkpointing(model, "full", every=0)
    apply_activation_checkpointing(model, "full")
    with pytest.raises(PerfConfigError, match="already checkpointed"):
        apply_activation_checkpointing(model, "full")
    tp_model = Transformer(_args(dropout=0.1))
    apply_activation_checkpointing(tp_model, "full", tp_ctx=TPContext(group=None, size=2, rank=0))
    with pytest.raises(PerfConfigError, match="torch.compile cannot trace"):
        apply_compile(tp_model)


@pytest.mark.slow
def test_compiled_blocks_match_eager() -> None:
    args = _args(n_layers=2)
    torch.manual_seed(0)
    ref = Transformer(args)
    model = copy.deepcopy(ref)
    apply_activation_checkpointing(model, "full")
    assert apply_compile(model) == 2
    assert model.state_dict().keys() == ref.state_dict().keys()
    x, y = _batch(args)
    _assert_same(_loss_and_grads(model, x, y), _loss_and_grads(ref, x, y), tol=1e-5)


# ----------------------------------------------------------------------------- config


@pytest.mark.parametrize(("overrides", "message"), [
    (["perf.activation_checkpointing=blocks"], "perf.activation_checkpointing='blocks': use 'none', 'full'"),
    (["perf.ac_every=0"], "perf.ac_every=0: must be > 0"),
    (["perf.fused_linear_cross_entropy=true", "parallel.tp=2"], "with parallel.tp=2: the fused loss needs"),
    (["perf.fused_linear_cross_entropy=true", "parallel.pp=2"], "with parallel.pp=2: the fused loss needs"),
    (["perf.activation_checkpointing=full", "parallel.activation_checkpoint_interval=1"], "set one of them"),
    (["perf.compile=maybe"], "perf.compile: expected true or false"),
    (["perf.compile=true", "perf.activation_checkpointing=full", "parallel.tp=2", "model.dropout=0.1"],
     "torch.compile cannot trace the rewind"),
    (["perf.fused_rmsnorm=true"], "Did you mean 'perf.fused_rms_norm'?"),
])
def test_perf_config_errors(overrides: list[str], message: str) -> None:
    from train.config.fields import ConfigError
    from train.config.load import load_config

    with pytest.raises(ConfigError) as excinfo:
        load_config(None, overrides)
    assert message in str(excinfo.value)
