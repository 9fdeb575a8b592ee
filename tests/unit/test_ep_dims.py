"""Expert-parallel layout: the EP and expert-data-parallel groups (DeepSpeed's expert-then-data layout), and
the one-line refusals of an ep the model, the world or the run cannot take."""

from __future__ import annotations

import pytest

from model.args import ModelArgs
from parallel.dims import ParallelConfigError, ParallelDims

MOE = ModelArgs(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=64, n_experts=4, moe_ffn_dim=16)


def test_ep_groups_are_blocks_of_the_dp_group_and_edp_strides() -> None:
    dims = ParallelDims(8, ep=4)
    assert dims.dp == 8 and dims.edp == 2
    assert dims.ep_groups() == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert dims.edp_groups() == [[0, 4], [1, 5], [2, 6], [3, 7]]
    # as deepspeed.utils.groups._create_expert_and_data_parallel makes them at tp = pp = 1
    full = ParallelDims(2, ep=2)
    assert full.ep_groups() == [[0, 1]] and full.edp_groups() == [[0], [1]]
    assert ParallelDims(4).ep_groups() == [[0], [1], [2], [3]]
    # with tp = 2 the groups are carved from each TP rank's data-parallel group: ranks of equal TP rank
    with_tp = ParallelDims(8, tp=2, ep=2)
    assert with_tp.ep_groups() == [[0, 2], [4, 6], [1, 3], [5, 7]]
    assert with_tp.edp_groups() == [[0, 4], [2, 6], [1, 5], [3, 7]]
    assert all(len({with_tp.coords(r)[2] for r in g}) == 1 for g in with_tp.ep_groups() + with_tp.edp_groups())


@pytest.mark.parametrize(("dims", "args", "zero", "words"), [
    (lambda: ParallelDims(4, ep=2), ModelArgs(dim=32, n_layers=2, n_heads=4, vocab_size=64), 2,
     ["parallel.ep=2", "without MoE layers"]),
    (lambda: ParallelDims(6, ep=3), MOE, 2, ["parallel.ep=3", "4 experts", "model.n_experts"]),
    (lambda: ParallelDims(4, pp=2, ep=2), MOE, 1, ["parallel.pp=2", "parallel.pp=1"]),
    (lambda: ParallelDims(4, ep=2), MOE, 3, ["ZeRO-3", "zero1 or zero2"]),
    (lambda: ParallelDims(4, ep=2), MOE, 0, ["ZeRO-0"]),
])
def test_ep_refusals_name_the_field_and_the_fix(dims, args: ModelArgs, zero: int, words: list[str]) -> None:
    with pytest.raises(ParallelConfigError) as err:
        dims().check_experts(args, zero_stage=zero)
    assert all(w in str(err.value) for w in words), str(err.value)
    assert "\n" not in str(err.value)


def test_ep_must_divide_the_data_parallel_size() -> None:
    with pytest.raises(ParallelConfigError, match=r"parallel.ep=3 does not divide the data-parallel size 4"):
        ParallelDims(4, ep=3)
    ParallelDims(4, ep=2).check_experts(MOE, zero_stage=2)  # accepted
    ParallelDims(8, tp=2, ep=2).check_experts(MOE, zero_stage=1)  # with tensor parallelism too
    ParallelDims(4).check_experts(ModelArgs(dim=32, n_layers=2, n_heads=4, vocab_size=64), zero_stage=0)


def test_estimate_memory_splits_experts_and_counts_all_to_all() -> None:
    from tools.estimate_memory import Layout, analytic_ep_bytes, estimate

    args = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=128, max_seq_len=64, n_experts=8,
                     moe_top_k=2, moe_ffn_dim=32).validate()
    experts = 2 * 8 * 3 * 32 * 64
    whole = estimate(args, Layout(gpus=4, zero=2, seq=64, dtype="fp32", fused=False))
    split = estimate(args, Layout(gpus=4, ep=4, zero=2, seq=64, dtype="fp32", fused=False))
    assert whole["params"] - split["params"] == pytest.approx(4 * experts * 3 / 4)  # 3 of 4 experts' weights gone
    # optimizer: dense 12 B / dp; experts 12 B x E/ep / (dp/ep) = the same per-expert share as without ep
    assert split["optimizer"] == pytest.approx(whole["optimizer"])
    assert whole["all_to_all_sent"] == 0.0
    assert split["all_to_all_sent"] == analytic_ep_bytes(args, 4, 64) == 2 * 4 * 64 * 2 * 3 / 4 * 64 * 4


def test_export_of_an_expert_parallel_checkpoint_missing_its_files_is_one_error(tmp_path) -> None:
    import json

    from train.export.consolidate import ExportError, consolidated_state_dict

    tag = tmp_path / "step_00000004"
    tag.mkdir()
    (tag / "tessera.json").write_text(json.dumps({"config": {"parallel": {"ep": 2}}}))
    with pytest.raises(ExportError, match=r"no ZeRO 1/2 optimizer files .*Export another checkpoint"):
        consolidated_state_dict(tag)
