"""tools/estimate_memory.py: hand-computed cases, DeepSpeed's own ZeRO estimators, measured CPU peaks, bad input."""

from __future__ import annotations

import pytest
import torch

from model import ModelArgs, Transformer, get_preset
from tools.estimate_memory import EstimateError, Layout, estimate, main, suggest
from tools.live_memory import LiveBytes

ARGS = ModelArgs(dim=128, n_layers=4, n_heads=4, n_kv_heads=2, vocab_size=512, ffn_hidden_dim=384, max_seq_len=256,
                 tie_embeddings=True)
CPU = {"dtype": "fp32", "fused": False}


def test_fp32_parts_by_hand() -> None:
    P = ARGS.num_params()
    B, T, D, Dkv, F, V, L = 4, 128, 128, 64, 384, 512, 4
    est = estimate(ARGS, Layout(micro_batch=B, seq=T, **CPU))
    assert (est["params"], est["grads"], est["optimizer"], est["buckets"]) == (4 * P, 4 * P, 8 * P, 0)
    per_token = L * (8 * D + 2 * Dkv + 4 * F) * 4 + 3 * D * 4  # blocks + the final norm
    assert est["activations"] == per_token * B * T
    assert est["logits"] == 8 * V * B * T
    assert est["peak"] == 12 * P + est["activations"] + est["logits"]  # gradients are freed before the forward
    full = estimate(ARGS, Layout(micro_batch=B, seq=T, ac="full", **CPU))
    assert full["activations"] == (L * D * 4 + (8 * D + 2 * Dkv + 4 * F) * 4 + 3 * D * 4) * B * T
    every2 = estimate(ARGS, Layout(micro_batch=B, seq=T, ac="selective", ac_every=2, **CPU))
    attn = (2 * D + 2 * Dkv) * 4
    assert every2["activations"] == est["activations"] - (2 - 1) * attn * B * T  # 2 of 4 drop it, 1 recomputed
    zero2 = estimate(ARGS, Layout(gpus=2, zero=2, micro_batch=B, seq=T, **CPU))
    assert (zero2["grads"], zero2["optimizer"], zero2["buckets"]) == (2 * P, 6 * P, 2 * 5e8 * 4)


def test_parallel_layouts_by_hand() -> None:
    args = get_preset("llama3-8b")
    P = args.num_params()
    norms = (2 * args.n_layers + 1) * args.dim
    tp = estimate(args, Layout(gpus=8, tp=4, zero=1, seq=4096))
    assert tp["params"] == 2 * ((P - norms) // 4 + norms)
    sp = estimate(args, Layout(gpus=8, tp=4, zero=1, seq=4096, sequence_parallel=True))
    assert sp["activations"] < tp["activations"] and sp["params"] == tp["params"]
    pp = estimate(args, Layout(gpus=8, pp=4, zero=1, seq=4096))
    assert P / 4 * 2 < pp["params"] < P / 3 * 2  # the most loaded of 4 balanced stages
    assert pp["logits"] == 0  # the first stage holds no head
    fused_ce = estimate(args, Layout(seq=4096, fused_ce=True))
    assert fused_ce["logits"] == 0 and estimate(args, Layout(seq=4096))["logits"] == 10 * args.vocab_size * 4096


def _largest_module(args: ModelArgs) -> int:
    with torch.device("meta"):
        model = Transformer(args)
    return max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules())


@pytest.mark.parametrize(("preset", "gpus"), [("llama3-8b", 8), ("llama3-1b", 1), ("small-125m", 4)])
def test_bf16_model_states_equal_deepspeeds_estimators(preset: str, gpus: int) -> None:
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    args = get_preset(preset)
    P, largest = args.num_params(), _largest_module(args)

    def states(**kw) -> float:
        est = estimate(args, Layout(gpus=gpus, seq=1024, **kw))
        return est["params"] + est["grads"] + est["optimizer"]

    for offload in (False, True):
        _, gpu = estimate_zero2_model_states_mem_needs(P, num_gpus_per_node=gpus, cpu_offload=offload)
        assert states(zero=2, offload="optimizer" if offload else "none") == pytest.approx(gpu, rel=1e-6)
    for offload, params in ((False, False), (True, False), (True, True)):
        _, gpu, _ = estimate_zero3_model_states_mem_needs(P, largest, num_gpus_per_node=gpus, cpu_offload=offload,
                                                          cpu_offload_params=params)
        kind = "all" if params else "optimizer" if offload else "none"
        assert states(zero=3, offload=kind) == pytest.approx(gpu, rel=1e-6)


def _measured_peak(ac: str, batch: int, seq: int) -> int:
    """Live tensor bytes at the worst moment of two steps of a plain loop (what ZeRO-0 holds)."""
    from parallel.perf import apply_activation_checkpointing
    from train.objectives.lm import lm_loss

    g = torch.Generator().manual_seed(0)
    data = torch.randint(0, ARGS.vocab_size, (2, batch, seq + 1), generator=g)
    with LiveBytes() as mem:
        model = Transformer(ARGS)
        apply_activation_checkpointing(model, ac)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        for x in data:
            lm_loss(model(x[:, :-1]), x[:, 1:]).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
    return mem.peak


@pytest.mark.parametrize("ac", ["none", "selective", "full"])
@pytest.mark.parametrize(("batch", "seq"), [(4, 128), pytest.param(1, 256, marks=pytest.mark.slow)])
def test_estimate_is_within_10_percent_of_the_measured_cpu_peak(ac: str, batch: int, seq: int) -> None:
    measured = _measured_peak(ac, batch, seq)
    est = estimate(ARGS, Layout(micro_batch=batch, seq=seq, ac=ac, **CPU))["peak"]
    assert abs(est / measured - 1) < 0.10, f"estimated {est:,} bytes, measured {measured:,}"


def test_live_bytes_counts_views_once_and_frees() -> None:
    with LiveBytes() as mem:
        a = torch.ones(1000)  # 4000 bytes
        view = a[10:]
        b = a * 2
        assert mem.current == 8000
        del a, view, b
        torch.zeros(10)  # the next operator notices the frees
        assert mem.current == 40 and mem.peak == 8000


@pytest.mark.parametrize(("argv", "message"), [
    (["--preset", "gpt5"], "unknown model preset 'gpt5'"),
    (["--preset", "llama3-8b", "--gpus", "6", "--tp", "3"], "parallel.tp=3 does not divide the model's 32 query"),
    (["--preset", "llama3-8b", "--gpus", "6", "--tp", "4"], "world size 6 is not divisible by parallel.tp=4"),
    (["--preset", "llama3-1b", "--offload", "optimizer"], "needs ZeRO 1-3"),
    (["--preset", "llama3-1b", "--zero", "2", "--offload", "all"], "needs --zero 3"),
    (["--preset", "llama3-1b", "--gpus", "2", "--pp", "2", "--zero", "2"], "with a ZeRO-2 DeepSpeed config"),
    (["--preset", "tiny", "--seq", "4096"], "--seq 4096 exceeds the model's max_seq_len=256"),
    (["--preset", "tiny", "--ac", "most"], "--ac most: use one of none, selective, full"),
    (["--preset", "llama3-8b", "--gpus", "2", "--tp", "2", "--fused-ce"], "--fused-ce needs tp = pp = 1"),
    (["--preset", "tiny", "--suggest", "big"], "--suggest big: use h100, 4090, 3060 or a size in GB"),
])
def test_bad_input_is_one_line(argv: list[str], message: str, capsys: pytest.CaptureFixture) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("tessera: error: ") and message in err and err.count("\n") == 1


def test_suggestions_fit_the_device(capsys: pytest.CaptureFixture) -> None:
    args = get_preset("llama3-1b")
    fits = suggest(args, 12, gpus=1, seq=2048)
    assert fits and all(est["peak"] <= 12e9 * 0.9 - 1e9 for _, est in fits)
    assert all(lay.offload != "none" for lay, _ in fits)  # 16 bytes per parameter of state alone is 19.8 GB
    assert all(est["peak"] <= 80e9 * 0.9 - 1e9 for _, est in suggest(args, 80, gpus=1, seq=4096))
    assert suggest(args, 80, gpus=1, seq=4096)[0][0].offload == "none"
    assert main(["--preset", "llama3-70b", "--seq", "4096", "--suggest", "3060"]) == 1
    assert "nothing fits 12 GB" in capsys.readouterr().out
    assert main(["--preset", "llama3-1b", "--seq", "2048", "--suggest", "4090"]) == 0
    with pytest.raises(EstimateError, match="--ac sometimes"):
        estimate(args, Layout(ac="sometimes"))


def measure_engine_peaks(rank: int, world: int, cases: list[tuple[str, str, int]]) -> list[tuple[int, float]]:
    """(measured, estimated) peak bytes of two steps through the real DeepSpeed engine, per (config, ac, zero)."""
    import os

    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    os.environ.update(LOCAL_RANK=str(rank), RANK=str(rank), WORLD_SIZE=str(world))  # DeepSpeed asks for them
    from tools import bench_step

    B, T = 4, 128
    pool = torch.randint(0, ARGS.vocab_size, (8, B, T + 1), generator=torch.Generator().manual_seed(0))
    state = bench_step._reference_state(ARGS)
    out = []
    for ds_name, ac, zero in cases:
        with LiveBytes() as mem:
            step = bench_step._tessera(ARGS, B, T, pool, torch.device("cpu"), ds_name,
                                       [f"activation_checkpointing={ac}"], state)
            step()
            step()
        out.append((mem.peak, estimate(ARGS, Layout(zero=zero, ac=ac, micro_batch=B, seq=T, **CPU))["peak"]))
    return out


@pytest.mark.slow
def test_estimate_matches_the_engine_with_zero_buckets() -> None:
    from tests.gloo import run_ranks

    [results] = run_ranks(1, measure_engine_peaks, ([("cpu", "selective", 0), ("zero2", "none", 2)],))
    for measured, est in results:
        assert abs(est / measured - 1) < 0.10, f"estimated {est:,} bytes, measured {measured:,}"
    assert results[1][0] > 4e9  # ZeRO-2's two 5e8-element fp32 buckets dominate a small model
