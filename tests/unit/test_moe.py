"""MoE block (model/moe.py): routing and outputs equal transformers' Mixtral / Qwen3-MoE / Qwen2-MoE blocks, the
balancing loss and the aux-free bias step against hand-computed cases, grouped GEMM against the per-expert loop,
capacity and dropless counts, and balancing lowering the max / mean expert load in a short run."""

from __future__ import annotations

import pytest
import torch
from transformers import MixtralConfig, Qwen2MoeConfig, Qwen3MoeConfig
from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock, load_balancing_loss_func
from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeSparseMoeBlock
from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock

from model import ModelArgs, ModelConfigError
from model.generate import generate
from model.model import Transformer
from model.moe import MoEFeedForward, grouped_mm, looped_mm
from parallel.perf import apply_activation_checkpointing
from train.objectives.moe import MoETerms

DIM, WIDTH = 12, 10


def _ours(n_experts: int, top_k: int, norm: bool, **kw: object) -> MoEFeedForward:
    block = MoEFeedForward(DIM, n_experts=n_experts, top_k=top_k, hidden_dim=WIDTH, norm_topk_prob=norm, **kw)
    block.init_weights(0.3, 0.3)
    return block


def _copy_routed(ours: MoEFeedForward, theirs: torch.nn.Module) -> None:
    with torch.no_grad():
        theirs.gate.weight.copy_(ours.gate.weight)
        theirs.experts.gate_up_proj.copy_(ours.experts.gate_up_proj)
        theirs.experts.down_proj.copy_(ours.experts.down_proj)


@pytest.mark.parametrize("top_k", [1, 2, 3])
def test_mixtral_block_equal(top_k: int) -> None:
    torch.manual_seed(top_k)
    ours = _ours(5, top_k, True)
    cfg = MixtralConfig(hidden_size=DIM, intermediate_size=WIDTH, num_local_experts=5, num_experts_per_tok=top_k)
    theirs = MixtralSparseMoeBlock(cfg)
    _copy_routed(ours, theirs)
    x = torch.randn(3, 7, DIM)
    _, ref_w, ref_i = theirs.gate(x.view(-1, DIM))
    _, chosen, weights = ours.gate(x.view(-1, DIM))
    assert torch.equal(chosen, ref_i)
    torch.testing.assert_close(weights, ref_w, rtol=0, atol=1e-7)
    torch.testing.assert_close(ours(x), theirs(x), rtol=0, atol=1e-6)


@pytest.mark.parametrize("norm", [False, True])
def test_qwen3_moe_block_equal(norm: bool) -> None:
    torch.manual_seed(int(norm))
    ours = _ours(6, 2, norm)
    cfg = Qwen3MoeConfig(hidden_size=DIM, moe_intermediate_size=WIDTH, num_experts=6, num_experts_per_tok=2,
                         norm_topk_prob=norm)
    theirs = Qwen3MoeSparseMoeBlock(cfg)
    _copy_routed(ours, theirs)
    x = torch.randn(2, 9, DIM)
    _, ref_w, ref_i = theirs.gate(x.view(-1, DIM))
    _, chosen, weights = ours.gate(x.view(-1, DIM))
    assert torch.equal(chosen, ref_i)
    torch.testing.assert_close(weights, ref_w, rtol=0, atol=1e-7)
    torch.testing.assert_close(ours(x), theirs(x), rtol=0, atol=1e-6)


def test_qwen2_moe_shared_expert_gate_equal() -> None:
    torch.manual_seed(3)
    ours = _ours(4, 2, False, shared_hidden_dim=7, shared_gate=True)
    cfg = Qwen2MoeConfig(hidden_size=DIM, moe_intermediate_size=WIDTH, shared_expert_intermediate_size=7,
                         num_experts=4, num_experts_per_tok=2, norm_topk_prob=False)
    theirs = Qwen2MoeSparseMoeBlock(cfg)
    _copy_routed(ours, theirs)
    theirs.shared_expert.load_state_dict(ours.shared_expert.state_dict())
    theirs.shared_expert_gate.load_state_dict(ours.shared_expert_gate.state_dict())
    x = torch.randn(2, 5, DIM)
    torch.testing.assert_close(ours(x), theirs(x), rtol=0, atol=1e-6)


def test_aux_loss_equals_transformers_and_hand_case() -> None:
    torch.manual_seed(0)
    ours = _ours(4, 2, True, aux_loss=True, z_loss=True)
    x = torch.randn(16, DIM)
    ours(x)
    logits = torch.nn.functional.linear(x, ours.gate.weight)
    ref = load_balancing_loss_func((logits,), num_experts=4, top_k=2)
    torch.testing.assert_close(ours.last.aux_loss, ref, rtol=1e-6, atol=0)
    torch.testing.assert_close(ours.last.z_loss, torch.logsumexp(logits, -1).square().mean())
    # hand case: 2 experts, top-1, logits (0, 0) for both tokens: P = (1/2, 1/2); ties pick expert 0 for both
    # tokens, f = (1, 0): loss = 2 * (1 * 1/2 + 0 * 1/2) = 1; z = log(2)^2
    hand = MoEFeedForward(2, n_experts=2, top_k=1, hidden_dim=3, norm_topk_prob=True, aux_loss=True, z_loss=True)
    hand.init_weights(0.1, 0.1)
    with torch.no_grad():
        hand.gate.weight.zero_()
    hand(torch.ones(2, 2))
    assert hand.last.aux_loss.item() == pytest.approx(1.0)
    assert hand.last.z_loss.item() == pytest.approx(torch.log(torch.tensor(2.0)).item() ** 2)
    assert hand.last.load.tolist() == [2, 0]


def test_bias_update_hand_case_and_selection_only() -> None:
    block = _ours(4, 1, True, bias_balancing=True)
    block.update_bias(torch.tensor([6.0, 2.0, 4.0, 4.0]), rate=0.01)  # mean 4: over, under, equal, equal
    assert block.gate.e_score_correction_bias.tolist() == pytest.approx([-0.01, 0.01, 0.0, 0.0])
    # a large bias moves the choice, never the weight: top-1 weight stays the (renormalised) probability 1
    with torch.no_grad():
        block.gate.e_score_correction_bias.copy_(torch.tensor([0.0, 0.0, 5.0, 0.0]))
    _, chosen, weights = block.gate(torch.randn(8, DIM))
    assert chosen.eq(2).all() and torch.allclose(weights, torch.ones_like(weights))
    assert "gate.e_score_correction_bias" in block.state_dict()


@pytest.mark.parametrize(("k", "n"), [(8, 4), (5, 3)])  # 16-byte strides (the grouped kernel), odd (the loop)
def test_grouped_mm_equals_per_expert_loop_with_empty_groups(k: int, n: int) -> None:
    torch.manual_seed(0)
    x, w = torch.randn(9, k, requires_grad=True), torch.randn(4, k, n, requires_grad=True)
    counts = torch.tensor([3, 0, 6, 0])
    ref = torch.cat([x[:3] @ w[0], x[3:] @ w[2]])
    out = grouped_mm(x, w, counts)
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(looped_mm(x, w, counts), ref)
    grads = torch.autograd.grad(out.square().sum(), (x, w))
    ref_grads = torch.autograd.grad(ref.square().sum(), (x, w))
    for got, want in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(got, want)


def test_dropless_loses_no_token_and_capacity_counts_drops() -> None:
    torch.manual_seed(0)
    x = torch.randn(40, DIM)
    dropless = _ours(4, 2, True)
    dropless(x)
    assert int(dropless.last.load.sum()) == 80 and int(dropless.last.dropped) == 0
    capped = _ours(4, 2, True, capacity_factor=0.5)  # capacity ceil(0.5 * 40 * 2 / 4) = 10 per expert
    capped.load_state_dict(dropless.state_dict())
    capped(x)
    load = capped.last.load
    assert int(capped.last.dropped) == int((load - load.clamp(max=10)).sum()) > 0
    with pytest.raises(ModelConfigError, match="moe_top_k"):
        ModelArgs(dim=16, n_layers=1, n_heads=2, n_experts=2, moe_top_k=3).validate()
    with pytest.raises(ModelConfigError, match="moe_layers"):
        ModelArgs(dim=16, n_layers=2, n_heads=2, n_experts=2, moe_layers=[5]).validate()


def _train_load(aux: float, bias: float) -> float:
    """Max / mean expert load of the last steps of a short seeded run of a tiny MoE LM."""
    torch.manual_seed(0)
    args = ModelArgs(dim=32, n_layers=1, n_heads=2, vocab_size=64, max_seq_len=32, n_experts=8, moe_top_k=1,
                     moe_ffn_dim=16, moe_aux_loss_coef=aux, moe_bias_update_rate=bias, init_std=0.2)
    model = Transformer(args)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    terms = MoETerms()
    data = torch.randint(0, 64, (8, 33), generator=torch.Generator().manual_seed(1))
    ratios = []
    for step in range(20):
        terms.begin_step()
        logits = model(data[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), data[:, 1:].flatten())
        loss, logged = terms.add(model, loss)
        loss.backward()
        opt.step()
        opt.zero_grad()
        terms.end_step(model, None)
        if step >= 12:
            ratios.append(float(logged["moe_max_mean.L0"]))
    return sum(ratios) / len(ratios)


@pytest.mark.slow
def test_balancing_lowers_max_over_mean_load() -> None:
    none = _train_load(0.0, 0.0)
    assert _train_load(0.1, 0.0) < none
    assert _train_load(0.0, 0.01) < none


def _tiny_moe(**kw: object) -> Transformer:
    torch.manual_seed(0)
    return Transformer(ModelArgs(dim=32, n_layers=3, n_heads=2, vocab_size=61, max_seq_len=48, n_experts=4,
                                 moe_top_k=2, moe_ffn_dim=24, moe_layers=[0, 2], moe_aux_loss_coef=0.1,
                                 moe_z_loss_coef=0.01, init_std=0.2, **kw))


def test_activation_checkpointing_keeps_loss_and_gradients() -> None:
    data = torch.randint(0, 61, (2, 17), generator=torch.Generator().manual_seed(3))
    grads = []
    for mode in ("none", "full"):
        model = _tiny_moe()
        apply_activation_checkpointing(model, mode)
        loss = torch.nn.functional.cross_entropy(model(data[:, :-1]).flatten(0, 1), data[:, 1:].flatten())
        loss, terms = MoETerms().add(model, loss)
        assert set(terms) >= {"moe_aux", "moe_z", "moe_max_mean.L0", "moe_max_mean.L2"}
        loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, rtol=0, atol=1e-6, msg=name)
    assert grads[0]["layers.0.mlp.gate.weight"].abs().sum() > 0


def test_kv_cache_generation_equals_full_recompute() -> None:
    model = _tiny_moe(moe_capacity_factor=None)
    prompt = torch.randint(0, 61, (2, 5), generator=torch.Generator().manual_seed(4))
    cached = generate(model, prompt, 12, use_cache=True)
    assert torch.equal(cached, generate(model, prompt, 12, use_cache=False))
