"""model.init_from takes Tessera models: a run dir, a checkpoint dir or a native export (weights only), and its
tokenizer comes along; a chain hands a sinks model on natively and refuses an hf.path start from it."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from model import ModelArgs, ModelConfigError, Transformer
from tests.conftest import REPO, SMOKE
from tests.hf_models import make_tokenizer
from train.config.fields import ConfigError
from train.config.load import load_config
from train.data.tokenizer import tokenizer_identity
from train.export.native import (
    NATIVE_FILE,
    export_native,
    load_start,
    source_kind,
    start_args,
    start_tokenizer,
)


def _run(root: Path, tok_dir: Path, **overrides: object) -> tuple[Path, Transformer]:
    """A run dir whose checkpoints/step_4 holds a ZeRO-0 model file and tessera.json (a sinks model)."""
    args = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=320, max_seq_len=64, multiple_of=32,
                     tie_embeddings=True, attn_sinks=True, **overrides)  # type: ignore[arg-type]
    torch.manual_seed(4)
    model = Transformer(args)
    with torch.no_grad():
        for layer in model.layers:
            layer.self_attn.sinks.normal_()
    tag = root / "checkpoints" / "step_00000004"
    tag.mkdir(parents=True)
    torch.save({"module": model.state_dict(), "ds_config": {"zero_optimization": {"stage": 0}}},
               tag / "mp_rank_00_model_states.pt")
    meta = {"model_args": dataclasses.asdict(args), "tokenizer": tokenizer_identity(tok_dir),
            "tokenizer_dir": str(tok_dir), "step": 4}
    (tag / "tessera.json").write_text(json.dumps(meta))
    (root / "checkpoints" / "latest").write_text(tag.name)
    return root, model


def _same(state: dict[str, torch.Tensor], model: Transformer) -> None:
    expected = model.state_dict()
    assert state.keys() == expected.keys()
    for name, tensor in expected.items():
        assert torch.equal(state[name], tensor), name


def test_run_checkpoint_and_native_export_are_starts(tmp_path: Path) -> None:
    tok = make_tokenizer(tmp_path / "tok")
    run, model = _run(tmp_path / "run", tok)
    tag = run / "checkpoints" / "step_00000004"
    for source in (run, tag):
        assert source_kind(source) == "run" and start_args(source) == model.args
        _same(load_start(source)[1], model)
        assert start_tokenizer(source) == str(tok)
    assert start_args(run, max_seq_len=32).max_seq_len == 32
    export = export_native(run, tmp_path / "export")
    assert source_kind(export) == "native" and (export / "tokenizer.json").is_file()
    assert json.loads((export / NATIVE_FILE).read_text())["model_args"]["attn_sinks"] is True
    args, state = load_start(export)
    assert args == model.args and state["lm_head.weight"] is state["embed_tokens.weight"]
    _same(state, model)
    with pytest.raises(ModelConfigError, match="neither an HF model dir"):
        start_args(tmp_path / "tok" / "missing")


def test_sft_recipe_starts_from_a_tessera_run_with_its_tokenizer(tmp_path: Path) -> None:
    tok = make_tokenizer(tmp_path / "tok")
    run, model = _run(tmp_path / "run", tok)
    sft = [f"model.init_from={run}", "data.corpus=sft", f"data.files=[{REPO / 'train/configs/data/sft_arith.jsonl'}]",
           f"train.out_dir={tmp_path / 'sft'}"]
    cfg = load_config(SMOKE, sft)
    assert cfg.data.tokenizer == str(tok) and cfg.model_args() == model.args
    for objective, corpus in (("dpo", "preference"), ("reward", "preference"), ("classify", "classification")):
        cfg = load_config(SMOKE, [*sft, f"train.objective={objective}", f"data.corpus={corpus}"])
        assert cfg.model_args().attn_sinks
    with pytest.raises(ConfigError, match=r"model.dim cannot be changed for model.init_from"):
        load_config(SMOKE, [*sft, "model.dim=32"])
    with pytest.raises(ConfigError, match=rf"model.init_from={tmp_path / 'nothing'}: .*neither an HF model dir"):
        load_config(SMOKE, [f"model.init_from={tmp_path / 'nothing'}", f"train.out_dir={tmp_path / 'x'}"])
