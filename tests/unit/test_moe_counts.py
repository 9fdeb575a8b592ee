"""MoE parameter and FLOP counts (ModelArgs) and tools/estimate_memory.py on a MoE model: total vs active
parameters by hand, FLOPs per token from the active experts as torch's FLOP counter sees them, the estimated CPU
peak against the measured one, the TP split of the experts (per-rank bytes, all-reduce and all-to-all bytes)."""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import model.moe
from model import ModelArgs, Transformer
from parallel.dims import ParallelConfigError, ParallelDims
from parallel.perf import apply_activation_checkpointing
from tools.estimate_memory import Layout, estimate, main
from tools.live_memory import LiveBytes
from train.objectives.lm import lm_loss

ARGS = ModelArgs(dim=128, n_layers=4, n_heads=4, n_kv_heads=2, vocab_size=512, max_seq_len=256, n_experts=8,
                 moe_top_k=2, moe_ffn_dim=96, moe_layers=[1, 3], ffn_hidden_dim=256)


def test_total_and_active_parameters_by_hand() -> None:
    args = ModelArgs(dim=16, n_layers=2, n_heads=2, vocab_size=10, ffn_hidden_dim=32, n_experts=4, moe_top_k=1,
                     moe_ffn_dim=8, moe_layers=[1], moe_shared_ffn_dim=6, moe_shared_gate=True)
    model = Transformer(args)
    assert sum(p.numel() for p in model.parameters()) == args.num_params()
    expert, shared, router, gate = 3 * 16 * 8, 3 * 16 * 6, 4 * 16, 16
    assert args.num_params() - args.num_active_params() == 3 * expert  # 3 of the 4 experts idle per token
    moe_layer = sum(p.numel() for p in model.layers[1].mlp.parameters())
    assert moe_layer == 4 * expert + shared + router + gate


def test_flops_per_token_counts_the_active_experts(monkeypatch: pytest.MonkeyPatch) -> None:
    # torch's FLOP counter does not see grouped GEMMs: run the per-expert loop, whose matmuls it counts
    monkeypatch.setattr(model.moe, "_GROUPED_MM", None)
    net = Transformer(ARGS)
    x = torch.randint(0, 512, (2, 32))
    with FlopCounterMode(display=False) as counter:
        lm_loss(net(x), x).backward()
    # every matmul forward and backward (the CPU attention kernel is not counted): top_k experts per token
    assert counter.get_total_flops() == 6 * ARGS.matmul_params() * 64
    assert ARGS.flops_per_token(32) == 6 * ARGS.matmul_params() + 12 * 4 * 4 * 32 * 32


@pytest.mark.parametrize("ac", [pytest.param("none", marks=pytest.mark.slow), "full"])
def test_estimate_is_within_10_percent_of_the_measured_moe_cpu_peak(ac: str) -> None:
    data = torch.randint(0, ARGS.vocab_size, (2, 4, 129), generator=torch.Generator().manual_seed(0))
    with LiveBytes() as mem:
        model = Transformer(ARGS)
        apply_activation_checkpointing(model, ac)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        for x in data:
            lm_loss(model(x[:, :-1]), x[:, 1:]).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
    est = estimate(ARGS, Layout(micro_batch=4, seq=128, ac=ac, dtype="fp32", fused=False))["peak"]
    assert abs(est / mem.peak - 1) < 0.10, f"estimated {est:,} bytes, measured {mem.peak:,}"


def test_estimate_reports_active_parameters_and_takes_tp(capsys: pytest.CaptureFixture) -> None:
    assert main(["--preset", "moe-tiny", "--device", "cpu", "--seq", "128"]) == 0
    assert "active per token (MoE)" in capsys.readouterr().out
    assert main(["--preset", "moe-tiny", "--gpus", "2", "--tp", "2", "--seq", "128"]) == 0


def test_pipeline_with_moe_refused_and_tp_needs_whole_expert_units() -> None:
    with pytest.raises(ParallelConfigError, match=r"parallel.pp=2 with MoE layers .*parallel.pp=1"):
        ParallelDims(2, pp=2).check_pipeline(ARGS, zero_stage=1, grad_accum=2)
    ParallelDims(2, tp=2).check_model(ARGS, seq_len=64, sequence_parallel=True)  # experts split over TP ranks
    odd = ModelArgs(dim=128, n_layers=4, n_heads=4, vocab_size=512, ffn_hidden_dim=256, n_experts=8, moe_ffn_dim=90,
                    moe_shared_ffn_dim=64)
    with pytest.raises(ParallelConfigError, match=r"parallel.tp=4 does not divide the model's 90 hidden units of "
                                                  r"each expert \(model.moe_ffn_dim\)"):
        ParallelDims(4, tp=4).check_model(odd, seq_len=64, sequence_parallel=False)
    shared = ModelArgs(dim=128, n_layers=4, n_heads=4, vocab_size=512, ffn_hidden_dim=256, n_experts=8,
                       moe_ffn_dim=96, moe_shared_ffn_dim=66)
    with pytest.raises(ParallelConfigError, match=r"66 hidden units of the shared expert \(model.moe_shared_ffn_dim"):
        ParallelDims(4, tp=4).check_model(shared, seq_len=64, sequence_parallel=False)


def test_dense_equivalent_has_the_active_parameters() -> None:
    from model import get_preset
    from tools.bench_step import dense_equivalent

    moe = get_preset("moe-tiny")
    dense = dense_equivalent(moe)
    assert dense.n_moe_layers == 0 and dense.ffn_dim == 2 * 256
    router = moe.n_layers * moe.n_experts * moe.dim
    assert dense.num_params() == moe.num_active_params() - router
    assert dense.matmul_params() == moe.matmul_params() - router


def test_estimate_splits_experts_over_tp_and_counts_its_bytes() -> None:
    from tools.estimate_memory import analytic_moe_tp_bytes

    args = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=128, max_seq_len=64, n_experts=8,
                     moe_top_k=2, moe_ffn_dim=32, moe_shared_ffn_dim=16).validate()
    common = {"zero": 2, "seq": 64, "dtype": "fp32", "fused": False}
    ep = estimate(args, Layout(gpus=4, ep=2, **common))
    ep_tp = estimate(args, Layout(gpus=8, tp=2, ep=2, **common))
    experts = 2 * 8 * 3 * 32 * 64  # gate_up_proj + down_proj of both MoE layers
    assert ep["expert_weights"] == experts / 2 * 4 and ep_tp["expert_weights"] == experts / 4 * 4
    routers_norms = 2 * 8 * 64 + 5 * 64  # replicated on every TP rank
    dense = args.num_params() - experts
    assert ep_tp["params"] == pytest.approx(4 * ((dense - routers_norms) // 2 + routers_norms + experts / 4))
    assert ep_tp["all_to_all_sent"] == ep["all_to_all_sent"] > 0  # every TP rank sends its micro-batch's rows
    # per MoE layer: the output all-reduce and the input's backward all-reduce ((64, 64) fp32 each, ring over 2
    # ranks: half of 2 x the bytes), the routing weights' (64 x 2) and no shared gate
    act, ring = 64 * 64 * 4, 0.5
    assert ep["moe_tp_sent"] == 0.0
    assert ep_tp["moe_tp_sent"] == 2 * (2 * 2 * ring * act + 2 * ring * 64 * 2 * 4)
    # sequence parallel (all-gather before routing, reduce-scatter after, and their duals): the same bytes
    assert estimate(args, Layout(gpus=8, tp=2, ep=2, sequence_parallel=True, **common))["moe_tp_sent"] == \
        ep_tp["moe_tp_sent"] == analytic_moe_tp_bytes(args, 2, 64)
