"""How an MoE block is split under tensor parallelism, without a process group: the layout entries of its tensors
(the strided gate_up_proj among them), tp_split / tp_join as inverse of each other and as the layers cut them,
and a plan that gives an MoE block another style than 'region' refused."""

from __future__ import annotations

import pytest
import torch

from model import ModelArgs
from model.model import build_model
from parallel.layers import TPContext
from parallel.moe_tp import TensorParallelMoE
from parallel.tp import TRANSFORMER_TP_PLAN, TPPlanError, shard_model, tp_join, tp_shard_layout, tp_split

ARGS = ModelArgs(dim=16, n_layers=2, n_heads=4, n_kv_heads=4, vocab_size=37, ffn_hidden_dim=24, max_seq_len=8,
                 n_experts=4, moe_top_k=2, moe_ffn_dim=12, moe_layers=[1], moe_shared_ffn_dim=8, moe_shared_gate=True,
                 moe_bias_update_rate=0.01)


def test_layout_of_an_moe_block() -> None:
    layout = tp_shard_layout(ARGS, 2)
    moe = {k.removeprefix("layers.1.mlp."): v for k, v in layout.items() if k.startswith("layers.1.mlp.")}
    assert moe == {
        "gate.weight": None,  # the router stays whole
        "experts.gate_up_proj": (1, None, 2),  # gate rows and up rows, each split: stride 2
        "experts.down_proj": (2, None),
        "shared_expert.gate_proj.weight": (0, None),
        "shared_expert.up_proj.weight": (0, None),
        "shared_expert.down_proj.weight": (1, None),
        "shared_expert_gate.weight": None,
    }
    assert layout["layers.0.mlp.gate_proj.weight"] == (0, None)  # a dense layer as before
    assert layout["embed_tokens.weight"] == (0, 37)


@pytest.mark.parametrize("tp", [2, 4])
def test_split_matches_the_layers_and_join_inverts_it(tp: int) -> None:
    full = build_model(ARGS, torch.device("cpu"), seed=1)
    state = full.state_dict()
    layout = tp_shard_layout(ARGS, tp)
    shards = []
    for rank in range(tp):
        model = build_model(ARGS, torch.device("cpu"), seed=1)
        shard_model(model, TPContext(group=None, size=tp, rank=rank))
        assert isinstance(model.layers[1].mlp, TensorParallelMoE)
        local = model.state_dict()
        for name, spec in layout.items():
            want = state[name] if spec is None else tp_split(state[name], spec, tp, rank)
            assert torch.equal(local[name], want), (name, rank)
        shards.append(local)
    gate_up = shards[0]["layers.1.mlp.experts.gate_up_proj"]  # rank 0: the first gate and the first up units
    full_gate_up = state["layers.1.mlp.experts.gate_up_proj"]
    torch.testing.assert_close(gate_up, torch.cat([full_gate_up[:, :12 // tp], full_gate_up[:, 12:12 + 12 // tp]], 1))
    for name, spec in layout.items():
        if spec is not None:
            assert torch.equal(tp_join([s[name] for s in shards], spec), state[name]), name


def test_an_moe_block_is_split_as_a_region_only() -> None:
    plan = {**TRANSFORMER_TP_PLAN, "layers.*.mlp": "heads"}
    model = build_model(ARGS, torch.device("cpu"), seed=1)
    with pytest.raises(TPPlanError, match=r"MoE block 'layers.1.mlp' has the TP style 'heads'"):
        shard_model(model, TPContext(group=None, size=2, rank=0), plan)
