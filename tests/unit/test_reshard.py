"""The pieces of resuming on another layout that need no processes: names, joins, shards, refusals."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from parallel.layers import TPContext, mark_sharded
from slurm.plan import _check_resume_layout
from tools.reshard import main as reshard_main
from train.checkpoint.reshard import (
    Layout,
    _join,
    local_shard,
    needs_reshard,
    plain_name,
    refusal,
    resolve,
    zero_family,
)
from train.checkpoint.reshard_load import _fit_scheduler, matched_groups
from train.checkpoint.writer import CheckpointError
from train.checkpoint.zero_files import read_zero0
from train.config.fields import ConfigError
from train.loop.optim import param_groups


def test_pipeline_names_become_plain_names() -> None:
    assert plain_name("1.layer.self_attn.q_proj.weight", 2) == "layers.0.self_attn.q_proj.weight"
    assert plain_name("2.layer.mlp.down_proj.weight", 2) == "layers.1.mlp.down_proj.weight"
    assert plain_name("3.norm.weight", 2) == "norm.weight"
    assert plain_name("tied_modules.embed.embed_tokens.weight", 2) == "embed_tokens.weight"
    assert plain_name("layers.0.mlp.up_proj.weight", 2) == "layers.0.mlp.up_proj.weight"
    assert plain_name("model.model.layers.0.mlp.up_proj.weight", 2) == "model.model.layers.0.mlp.up_proj.weight"


def test_join_undoes_the_converters_dim0_concatenation() -> None:
    full = torch.arange(5 * 4, dtype=torch.float32).reshape(5, 4)  # 5 vocabulary rows, padded to 6 for tp=2
    padded = torch.cat([full, torch.zeros(1, 4)])
    assert torch.equal(_join({"param": padded, "cat_dim": 0}, (0, 5), 2, "embed"), full)
    row = torch.arange(12.0).reshape(2, 6)  # split on columns: the converter stacked the two (2, 3) shards
    stacked = torch.cat(row.chunk(2, dim=1), dim=0)
    assert torch.equal(_join({"param": stacked, "cat_dim": 0}, (1, None), 2, "o_proj"), row)
    norm = torch.ones(4)
    assert torch.equal(_join({"param": torch.cat([norm, norm]), "cat_dim": 0}, None, 2, "norm"), norm)
    with pytest.raises(CheckpointError, match="not a multiple of the checkpoint's tp=2"):
        _join({"param": torch.zeros(5, 4), "cat_dim": 0}, (0, 5), 2, "embed")


def test_local_shard_pads_the_vocabulary_for_the_new_tp() -> None:
    full = torch.arange(5.0 * 2).reshape(5, 2)
    param = mark_sharded(nn.Parameter(torch.zeros(3, 2)), 0)
    first = local_shard(full, param, TPContext(group=None, size=2, rank=0), "embed")
    second = local_shard(full, param, TPContext(group=None, size=2, rank=1), "embed")
    assert torch.equal(first, full[:3]) and torch.equal(second[:2], full[3:]) and not second[2].any()
    replicated = nn.Parameter(torch.zeros(4))
    with pytest.raises(CheckpointError, match=r"has shape \(5,\), this run's parameter \(4,\)"):
        local_shard(torch.zeros(5), replicated, None, "norm")


def _checkpoint(tmp_path: Path, *, zero: bool) -> tuple[Path, dict]:
    tag = tmp_path / "step_00000010"
    tag.mkdir()
    meta = {"world_size": 4, "config": {"parallel": {"tp": 2, "pp": 2}}}
    (tag / "tessera.json").write_text(json.dumps(meta))
    if zero:
        (tag / "zero_pp_rank_0_mp_rank_00_optim_states.pt").write_bytes(b"")
    return tag, meta


def test_which_resumes_reshard_and_which_are_refused(tmp_path: Path) -> None:
    tag, meta = _checkpoint(tmp_path, zero=True)
    assert needs_reshard(tag, meta, Layout(tp=1, pp=1, world_size=2))
    assert needs_reshard(tag, meta, Layout(tp=2, pp=2, world_size=8))  # another DP size of a tp / pp run
    assert not needs_reshard(tag, meta, Layout(tp=2, pp=2, world_size=4))
    assert refusal(tag, meta, tp=1, pp=4) is None
    (tmp_path / "zero0").mkdir()
    tag0, meta0 = _checkpoint(tmp_path / "zero0", zero=False)  # a ZeRO-0 pipeline checkpoint: keeps its layout
    assert refusal(tag0, meta0, tp=2, pp=2) is None and not needs_reshard(tag0, meta0, Layout(2, 2, 8))
    assert "ZeRO-0 pipeline checkpoint of parallel.tp=2 parallel.pp=2" in refusal(tag0, meta0, tp=2, pp=1)
    same = Layout(tp=2, pp=2, world_size=4)
    assert needs_reshard(tag, meta, same, zero_family(3, bf16=False))  # ZeRO 1-2 -> 3: another format
    assert not needs_reshard(tag, meta, same, zero_family(2, bf16=True))  # ZeRO 1 and 2 share one
    assert needs_reshard(tag0, meta0, same, zero_family(1, bf16=False))  # ZeRO 0 -> 1: through the copy
    meta0["config"]["parallel"] = {"tp": 2, "pp": 1}  # fp32 ZeRO-0 of pp=1: any tp and pp
    assert refusal(tag0, meta0, tp=1, pp=2) is None and needs_reshard(tag0, meta0, Layout(1, 2, 4))


def test_expert_parallel_resumes_reshard_on_another_ep_or_world(tmp_path: Path) -> None:
    tag, meta = _checkpoint(tmp_path, zero=True)
    meta["config"]["parallel"] = {"tp": 1, "pp": 1, "ep": 2}
    meta["world_size"] = 2
    assert not needs_reshard(tag, meta, Layout(tp=1, pp=1, world_size=2, ep=2))  # as saved: native load
    assert needs_reshard(tag, meta, Layout(tp=1, pp=1, world_size=2))  # ep 2 -> 1
    assert needs_reshard(tag, meta, Layout(tp=1, pp=1, world_size=4, ep=2))  # each rank's experts in its files
    assert Layout(tp=1, pp=1, world_size=4, ep=2).describe() == "tp=1, pp=1, ep=2, 4 ranks"


def test_a_tied_head_falls_back_on_the_embedding(tmp_path: Path) -> None:
    (tmp_path / "zero" / "embed_tokens.weight").mkdir(parents=True)
    assert resolve(tmp_path, "lm_head.weight") == tmp_path / "zero" / "embed_tokens.weight"
    with pytest.raises(CheckpointError, match="no parameter layers.9.mlp.up_proj.weight"):
        resolve(tmp_path, "layers.9.mlp.up_proj.weight")


def test_a_parameter_partitioned_at_construction_decays_by_its_full_shape() -> None:
    """An HF model loaded under ZeRO-3 holds flat placeholders: its optimizer groups must match other layouts'."""
    matrix, vector = nn.Parameter(torch.zeros(0)), nn.Parameter(torch.zeros(0))
    matrix.ds_shape, vector.ds_shape = torch.Size([4, 4]), torch.Size([4])
    model = nn.Module()
    model.a, model.b = matrix, vector
    decay, no_decay = param_groups(model, 0.1)
    assert decay["params"] == [matrix] and no_decay["params"] == [vector]


def test_slurm_submission_refuses_only_a_zero0_pipeline_checkpoint_of_another_layout(tmp_path: Path) -> None:
    (tmp_path / "checkpoints").mkdir()
    tag, _ = _checkpoint(tmp_path / "checkpoints", zero=False)
    cfg = SimpleNamespace(parallel=SimpleNamespace(tp=1, pp=1))
    with pytest.raises(ConfigError, match=r"ZeRO-0 pipeline checkpoint .* \(nothing was queued\)"):
        _check_resume_layout(cfg, tmp_path, "auto")
    _check_resume_layout(cfg, tmp_path, "never")
    (tag / "zero_pp_rank_0_mp_rank_00_optim_states.pt").write_bytes(b"")
    _check_resume_layout(cfg, tmp_path, "auto")
    _check_resume_layout(cfg, tmp_path, str(tag))


def test_reshard_tool_reports_bad_targets_in_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    tag, meta = _checkpoint(tmp_path, zero=True)
    meta["model_args"] = {"dim": 128, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "vocab_size": 513}
    (tag / "tessera.json").write_text(json.dumps(meta))
    assert reshard_main([str(tag), "--tp", "3"]) == 2
    assert capsys.readouterr().err.strip().endswith("choose a tp that divides 4.")
    assert reshard_main([str(tag), "--tp", "1", "--pp", "3"]) == 2
    assert "--pp 3: the model has 2 layers" in capsys.readouterr().err
    (tag / "zero_pp_rank_0_mp_rank_00_optim_states.pt").unlink()
    assert reshard_main([str(tag), "--tp", "1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("tessera: error: ") and err.count("\n") == 1 and "ZeRO-0 pipeline checkpoint" in err
    meta["model_args"]["n_experts"], meta["model_args"]["moe_ffn_dim"] = 4, 64
    (tag / "tessera.json").write_text(json.dumps(meta))
    assert reshard_main([str(tag), "--tp", "2", "--pp", "2", "--ep", "3"]) == 2
    assert "--ep 3 does not divide the 4 experts" in capsys.readouterr().err


def test_zero0_adam_state_is_named_by_group_order_and_checked(tmp_path: Path) -> None:
    weights = {"a.weight": torch.ones(2, 3), "b.weight": torch.ones(3)}
    adam = {i: {"step": torch.tensor(4.0), "exp_avg": torch.full_like(w, i + 1.0), "exp_avg_sq": torch.ones_like(w)}
            for i, w in enumerate(weights.values())}
    optim = {"state": adam, "param_groups": [{"params": [0], "weight_decay": 0.1}, {"params": [1], "weight_decay": 0}]}
    torch.save({"module": weights, "optimizer": optim, "ds_version": "0.19.8"}, tmp_path / "mp_rank_00_model_states.pt")
    read = read_zero0(tmp_path, 0, [["a.weight"], ["b.weight"]])
    assert torch.equal(read.states["b.weight"]["exp_avg"], torch.full((3,), 2.0)) and float(read.step) == 4.0
    with pytest.raises(CheckpointError, match=r"hold \[1, 1\] parameters, the model the checkpoint records \[2\]"):
        read_zero0(tmp_path, 0, [["a.weight", "b.weight"]])
    with pytest.raises(CheckpointError, match="parameter b.weight .* no weight or Adam state of its shape"):
        read_zero0(tmp_path, 0, [["b.weight"], ["a.weight"]])


def test_parameter_groups_and_schedule_follow_the_expert_group_across_ep() -> None:
    saved = [{"name": "decay", "lr": 1e-3, "weight_decay": 0.1, "params": [0]},
             {"name": "no_decay", "lr": 1e-3, "weight_decay": 0.0, "params": [1]},
             {"name": "ep_size_2", "moe": True, "lr": 1e-3, "weight_decay": 0.1, "params": [2]}]
    now = [{"name": "decay", "lr": 5.0, "weight_decay": 0.1, "params": []},
           {"name": "no_decay", "lr": 5.0, "weight_decay": 0.0, "params": []},
           {"name": "ep_size_4", "moe": True, "lr": 5.0, "weight_decay": 0.1, "params": []}]
    matched = matched_groups(saved, now)
    assert [g["name"] for g in matched] == ["decay", "no_decay", "ep_size_4"] and matched[2]["lr"] == 1e-3
    assert matched_groups(saved, now[:2]) == saved[:2]  # ep 2 -> 1: the expert group is gone
    state = {"base_lrs": [3e-3] * 3, "_last_lr": [1e-3] * 3, "lr_lambdas": [{"lr": 3e-3}] * 3, "last_epoch": 10}
    assert _fit_scheduler(state, 2) == {**state, "base_lrs": [3e-3] * 2, "_last_lr": [1e-3] * 2,
                                        "lr_lambdas": [{"lr": 3e-3}] * 2}
    assert _fit_scheduler(state, 3) is state
