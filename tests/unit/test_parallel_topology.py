"""Process-group layout, TP plans and shard shapes on a fake process group (one process, up to 1024 ranks)."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.distributed as dist

from model import ModelArgs, Transformer
from parallel.dims import ParallelConfigError, ParallelDims, padded_vocab_size
from parallel.groups import build_process_groups
from parallel.layers import ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding
from parallel.tp import TRANSFORMER_TP_PLAN, TPPlanError, apply_tp, match_plan

SHAPES = [(8, 2, 1), (8, 8, 1), (16, 4, 2), (64, 8, 4), (1024, 8, 8), (1024, 4, 1), (96, 2, 3)]


@pytest.mark.parametrize(("world", "tp", "pp"), SHAPES)
def test_groups_tile_the_world_in_megatron_order(world: int, tp: int, pp: int) -> None:
    dims = ParallelDims(world, tp=tp, pp=pp)
    for layout in (dims.tp_groups(), dims.dp_groups(), dims.pp_groups()):
        flat = sorted(itertools.chain.from_iterable(layout))
        assert flat == list(range(world)), "every rank in exactly one group of each kind"
    for group in dims.tp_groups():  # TP ranks are adjacent (one node)
        assert group == list(range(group[0], group[0] + tp))
    assert len(dims.tp_groups()) == world // tp and len(dims.dp_groups()) == tp * pp
    for rank in range(0, world, max(1, world // 37)):
        p, d, t = dims.coords(rank)
        assert dims.rank_of(p, d, t) == rank
        assert rank in dims.tp_groups()[p * dims.dp + d]
    # a model-parallel group is one replica: all its stages and TP slices
    assert all(len(g) == tp * pp for g in dims.mp_groups())


@pytest.mark.parametrize(("world", "tp", "pp", "rank"), [(8, 2, 1, 5), (64, 8, 2, 37), (1024, 8, 4, 1000)])
def test_process_groups_on_a_fake_world(fake_world, world: int, tp: int, pp: int, rank: int) -> None:
    fake_world(world, rank)
    dims = ParallelDims(world, tp=tp, pp=pp)
    groups = build_process_groups(dims)
    assert dist.get_world_size(groups.tp_group) == tp
    assert dist.get_world_size(groups.dp_group) == dims.dp
    assert dist.get_world_size(groups.pp_group) == pp
    p, d, t = dims.coords(rank)
    assert (groups.pp_rank, groups.dp_rank, groups.tp_rank) == (p, d, t)
    assert dist.get_rank(groups.tp_group) == t and dist.get_rank(groups.dp_group) == d
    # the mpu interface DeepSpeed reads
    assert groups.get_data_parallel_world_size() == dims.dp
    assert groups.get_tensor_model_parallel_world_size() == tp
    assert groups.get_model_parallel_world_size() == tp * pp
    assert groups.get_tensor_model_parallel_src_rank() == rank - t
    assert not hasattr(groups, "initialize_sequence_parallel")  # DeepSpeed would then ignore the TP group


def test_dims_errors() -> None:
    with pytest.raises(ParallelConfigError, match=r"world size 12 is not divisible by parallel.tp=8"):
        ParallelDims(12, tp=8)
    args = ModelArgs(dim=256, n_layers=2, n_heads=8, n_kv_heads=2, vocab_size=100, ffn_hidden_dim=512)
    with pytest.raises(ParallelConfigError, match=r"parallel.tp=4 does not divide the model's 2 key/value heads"):
        ParallelDims(8, tp=4).check_model(args, seq_len=64, sequence_parallel=False)
    with pytest.raises(ParallelConfigError, match=r"parallel.tp=16 does not divide the model's 8 query heads"):
        ParallelDims(16, tp=16).check_model(args, seq_len=64, sequence_parallel=False)
    with pytest.raises(ParallelConfigError, match=r"data.seq_len=65 is not divisible by 2"):
        ParallelDims(2, tp=2).check_model(args, seq_len=65, sequence_parallel=True)
    ParallelDims(2, tp=2).check_model(args, seq_len=65, sequence_parallel=False)
    assert padded_vocab_size(50257, 8) == 50264 and padded_vocab_size(50257, 8, 64) == 50688


def _meta_model(**kw) -> Transformer:
    args = ModelArgs(**{"dim": 512, "n_layers": 3, "n_heads": 16, "n_kv_heads": 8, "vocab_size": 32003,
                        "ffn_hidden_dim": 1024, "max_seq_len": 64, **kw})
    with torch.device("meta"):
        return Transformer(args)


def test_plan_covers_every_layer_of_the_model() -> None:
    model = _meta_model(attn_sinks=True)
    matched = match_plan(model, TRANSFORMER_TP_PLAN)
    linears = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear | torch.nn.Embedding)]
    assert set(linears) <= set(matched)
    assert matched["layers.2.self_attn.o_proj"] == "row" and matched["lm_head"] == "vocab_head"
    partial = {k: v for k, v in TRANSFORMER_TP_PLAN.items() if "down_proj" not in k}
    with pytest.raises(TPPlanError, match=r"'layers.0.mlp.down_proj' \(Linear\) is not covered"):
        match_plan(model, partial)
    with pytest.raises(TPPlanError, match="unknown style 'diagonal'"):
        match_plan(model, {**TRANSFORMER_TP_PLAN, "norm": "diagonal"})


@pytest.mark.parametrize(("world", "tp", "rank"), [(8, 8, 3), (1024, 8, 1023), (16, 2, 1)])
def test_apply_tp_shard_shapes(fake_world, world: int, tp: int, rank: int) -> None:
    fake_world(world, rank)
    groups = build_process_groups(ParallelDims(world, tp=tp))
    model = _meta_model(attn_sinks=True, tie_embeddings=True)
    ctx = apply_tp(model, groups.tp_group, sequence_parallel=True)
    assert (ctx.size, ctx.rank, ctx.sequence_parallel) == (tp, rank % tp, True)
    attn, mlp = model.layers[1].self_attn, model.layers[1].mlp
    head_dim = 512 // 16
    assert isinstance(attn.q_proj, ColumnParallelLinear) and attn.q_proj.weight.shape == (16 // tp * head_dim, 512)
    assert attn.k_proj.weight.shape == (8 // tp * head_dim, 512)
    assert isinstance(attn.o_proj, RowParallelLinear) and attn.o_proj.weight.shape == (512, 16 // tp * head_dim)
    assert attn.sinks.shape == (16 // tp,)
    assert mlp.gate_proj.weight.shape == (1024 // tp, 512) and mlp.down_proj.weight.shape == (512, 1024 // tp)
    rows = padded_vocab_size(32003, tp) // tp
    assert isinstance(model.embed_tokens, VocabParallelEmbedding) and model.embed_tokens.weight.shape == (rows, 512)
    assert model.lm_head.weight is model.embed_tokens.weight  # still tied, shard for shard
    assert model.lm_head.start == (rank % tp) * rows
    sharded = {n for n, p in model.named_parameters() if getattr(p, "tensor_model_parallel", False)}
    replicated = {n for n, _ in model.named_parameters()} - sharded
    assert replicated == {"norm.weight"} | {f"layers.{i}.{n}.weight" for i in range(3)
                                           for n in ("input_layernorm", "post_attention_layernorm")}


def test_apply_tp_refuses_heads_that_do_not_split(fake_world) -> None:
    fake_world(8, 0)
    groups = build_process_groups(ParallelDims(8, tp=8))
    model = _meta_model(n_kv_heads=4)
    with pytest.raises(ParallelConfigError, match="parallel.tp=8 does not divide the model's 4 key/value heads"):
        apply_tp(model, groups.tp_group)


@pytest.mark.slow  # DeepSpeed's communication start-up builds its CPU op on a fresh machine (~30 s)
@pytest.mark.parametrize("method", ["parameters", "uniform"])
def test_pipeline_stages_for_80_blocks_over_8(fake_world, monkeypatch: pytest.MonkeyPatch, method: str) -> None:
    """80 blocks over pp=8 (tp=2 around them): this rank's stage and a balanced cut of every stage."""
    from parallel.pipeline import BlockPipe, build_pipeline

    monkeypatch.setenv("LOCAL_RANK", "0")
    world, rank = 16, 3
    fake_world(world, rank)
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False, verbose=False)  # adopts the fake one
    dims = ParallelDims(world, tp=2, pp=8)
    args = ModelArgs(dim=16, n_layers=80, n_heads=2, vocab_size=64, ffn_hidden_dim=32, max_seq_len=16)
    torch.manual_seed(0)
    pipe = build_pipeline(Transformer(args), dims, loss_fn=lambda out, y: out.sum(), partition_method=method)
    assert pipe.stage_id == dims.coords(rank)[0] == 1
    parts = pipe.parts  # piece boundaries: 82 pieces = embedding, 80 blocks, norm + head
    assert len(parts) == 9 and parts[0] == 0 and parts[-1] == 83
    blocks_per_stage = [sum(1 for i in range(a, b) if 1 <= i <= 80) for a, b in itertools.pairwise(parts)]
    assert sum(blocks_per_stage) == 80 and min(blocks_per_stage) >= 8 and max(blocks_per_stage) <= 11
    local = [m for m in pipe.forward_funcs if isinstance(m, BlockPipe)]
    assert len(local) == blocks_per_stage[1]  # this stage holds its own blocks only
    if method == "parameters":  # balanced: no stage carries more than one block's worth above the lightest
        block = sum(p.numel() for p in local[0].parameters())
        weights = [sum(block for i in range(a, b) if 1 <= i <= 80) + (64 * 16 if a == 0 else 0) for a, b in
                   itertools.pairwise(parts)]
        assert max(weights) - min(weights) <= 2 * block + 64 * 16
