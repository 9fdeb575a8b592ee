"""Hugging Face interchange: importing Llama / Mistral / Qwen2 dirs, exporting checkpoints, refusals.

The import tests save tiny random HF models with `save_pretrained` and compare logits with Tessera's.
The export tests write a ZeRO-0 style checkpoint (a DeepSpeed `mp_rank_00_model_states.pt` holding the
`module` state dict, plus tessera.json) by hand; real multi-rank ZeRO checkpoints are exported in
tests/e2e/test_export_hf.py.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers

from model import ModelArgs, ModelConfigError, Transformer
from model.hf import load_hf_pretrained, to_hf_config, to_hf_llama_config, to_hf_state_dict
from tools import export_hf as export_cli
from tools import import_hf as import_cli
from train.data.tokenizer import tokenizer_identity, train_bpe_tokenizer
from train.export.consolidate import ExportError, consolidated_state_dict
from train.export.hf import export_hf

VOCAB = 97
HF_SIZES = {"vocab_size": VOCAB, "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2,
            "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 64,
            "initializer_range": 0.1}


def save_tiny_hf(
    kind: str, path: Path, *, max_shard_size: str | None = None, **overrides: Any
) -> torch.nn.Module:
    """A random `kind` ("llama" | "mistral" | "qwen2") CausalLM with random biases, saved at `path`."""
    classes = {
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
        "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
    }
    config_cls, model_cls = classes[kind]
    torch.manual_seed(0)
    model = model_cls(config_cls(**{**HF_SIZES, **overrides})).eval()
    with torch.no_grad():  # HF initialises biases to zero, which would hide a bias that is not mapped
        for name, param in model.named_parameters():
            if name.endswith("bias"):
                param.normal_(0.0, 0.5)
    model.save_pretrained(path, **({"max_shard_size": max_shard_size} if max_shard_size else {}))
    return model


def logit_diff(model: Transformer, hf: torch.nn.Module, tokens: torch.Tensor) -> float:
    with torch.no_grad():  # no KV cache: transformers' cache set-up costs more than this forward
        return (model(tokens) - hf(tokens, use_cache=False).logits).abs().max().item()


@pytest.mark.parametrize(
    ("kind", "overrides", "shard"),
    [
        ("llama", {}, None),
        ("llama", {"tie_word_embeddings": True, "rope_theta": 500000.0}, None),
        ("mistral", {"sliding_window": None}, None),
        ("mistral", {"sliding_window": 64}, "40KB"),  # a window of max_seq_len never binds; sharded files
        ("qwen2", {"tie_word_embeddings": True}, None),
        ("qwen2", {"rope_theta": 1e6}, "40KB"),
    ],
    ids=["llama", "llama-tied", "mistral", "mistral-window-sharded", "qwen2-tied", "qwen2-sharded"],
)
def test_import_matches_hf_logits(
    tmp_path: Path, kind: str, overrides: dict[str, Any], shard: str | None
) -> None:
    hf = save_tiny_hf(kind, tmp_path, max_shard_size=shard, **overrides)
    if shard:
        assert (tmp_path / "model.safetensors.index.json").is_file()
    args, state = load_hf_pretrained(tmp_path)
    assert args.attn_bias == (kind == "qwen2") and args.tie_embeddings == hf.config.tie_word_embeddings
    model = Transformer(args).eval()
    model.load_state_dict(state, strict=True)
    assert sum(p.numel() for p in model.parameters()) == args.num_params() == hf.num_parameters()
    tokens = torch.randint(0, VOCAB, (2, 40))
    assert logit_diff(model, hf, tokens) < 1e-5


def test_import_keeps_a_tied_pair_shared_and_casts(tmp_path: Path) -> None:
    save_tiny_hf("qwen2", tmp_path, tie_word_embeddings=True)
    _, state = load_hf_pretrained(tmp_path, dtype=torch.bfloat16)
    assert state["lm_head.weight"] is state["embed_tokens.weight"]
    assert {t.dtype for t in state.values()} == {torch.bfloat16}


def _edit_config(path: Path, **changes: Any) -> None:
    config = json.loads((path / "config.json").read_text())
    config.update(changes)
    (path / "config.json").write_text(json.dumps(config))


def test_import_refusals_are_clear(tmp_path: Path) -> None:
    dynamic = {"rope_type": "dynamic", "rope_theta": 500000.0, "factor": 4.0}
    save_tiny_hf("llama", tmp_path / "scaled", rope_parameters=dynamic)
    with pytest.raises(ModelConfigError, match="rope_parameters.rope_type='dynamic' is not supported"):
        load_hf_pretrained(tmp_path / "scaled")

    save_tiny_hf("mistral", tmp_path / "window", sliding_window=16)  # a window is imported, not refused
    assert load_hf_pretrained(tmp_path / "window")[0].sliding_window == 16

    save_tiny_hf("qwen2", tmp_path / "qwen_window", use_sliding_window=True, sliding_window=16,
                 max_window_layers=1)
    args = load_hf_pretrained(tmp_path / "qwen_window")[0]
    assert (args.sliding_window, args.sliding_layers) == (16, [1])

    save_tiny_hf("llama", tmp_path / "bias", attention_bias=True)
    args = load_hf_pretrained(tmp_path / "bias")[0]
    assert args.attn_bias and args.o_bias

    save_tiny_hf("llama", tmp_path / "other")
    _edit_config(tmp_path / "other", model_type="gpt2")
    with pytest.raises(ModelConfigError, match="model_type='gpt2' is not supported"):
        load_hf_pretrained(tmp_path / "other")

    save_tiny_hf("llama", tmp_path / "wrong_shape")
    _edit_config(tmp_path / "wrong_shape", num_hidden_layers=3)
    with pytest.raises(ModelConfigError, match=r"missing \['layers.2"):
        load_hf_pretrained(tmp_path / "wrong_shape")

    (tmp_path / "wrong_shape" / "model.safetensors").unlink()
    with pytest.raises(ModelConfigError, match="no model.safetensors"):
        load_hf_pretrained(tmp_path / "wrong_shape")
    with pytest.raises(ModelConfigError, match="no config.json"):
        load_hf_pretrained(tmp_path / "missing")


def test_attn_bias_args_count_validate_and_export_as_qwen2() -> None:
    args = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=VOCAB, max_seq_len=64,
                     multiple_of=32, init_std=0.1, attn_bias=True)
    torch.manual_seed(0)
    model = Transformer(args).eval()
    assert sum(p.numel() for p in model.parameters()) == args.num_params()
    assert args.num_params() - dataclasses.replace(args, attn_bias=False).num_params() == 2 * (64 + 2 * 32)
    with pytest.raises(ModelConfigError, match="attn_bias='yes'"):
        dataclasses.replace(args, attn_bias="yes").validate()
    with pytest.raises(ModelConfigError, match="o_proj"):
        to_hf_llama_config(args)
    with torch.no_grad():
        model.layers[0].self_attn.k_proj.bias.normal_(0.0, 0.5)
    hf = transformers.Qwen2ForCausalLM(to_hf_config(args)).eval()
    hf.load_state_dict(to_hf_state_dict(model.state_dict()), strict=True)
    assert logit_diff(model, hf, torch.randint(0, VOCAB, (2, 40))) < 1e-5


# ----------------------------------------------------------------------------- export


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("tok")
    text = root / "corpus.txt"
    text.write_text("To be, or not to be, that is the question:\n"
                    "Whether 'tis nobler in the mind to suffer\n" * 40)
    return train_bpe_tokenizer([text], 300, root / "bpe")


def write_checkpoint(
    run_dir: Path, tok_dir: Path, step: int = 3, **overrides: Any
) -> tuple[Path, Transformer]:
    """A run dir whose checkpoints/step_N holds a ZeRO-0 DeepSpeed model file and tessera.json."""
    args = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=320, max_seq_len=64,
                     multiple_of=32, init_std=0.1, tie_embeddings=True, **overrides)
    torch.manual_seed(step)
    model = Transformer(args).eval()
    tag_dir = run_dir / "checkpoints" / f"step_{step:08d}"
    tag_dir.mkdir(parents=True)
    torch.save({"module": model.state_dict(), "ds_config": {"zero_optimization": {"stage": 0}}},
               tag_dir / "mp_rank_00_model_states.pt")
    meta = {"model_args": dataclasses.asdict(args), "tokenizer": tokenizer_identity(tok_dir),
            "tokenizer_dir": str(tok_dir), "step": step}
    (tag_dir / "tessera.json").write_text(json.dumps(meta))
    (run_dir / "checkpoints" / "latest").write_text(tag_dir.name)
    return tag_dir, model


@pytest.mark.parametrize("attn_bias", [False, True], ids=["llama", "qwen2"])
def test_export_loads_in_transformers_with_same_logits_and_tokenizer(
    tmp_path: Path, tokenizer_dir: Path, attn_bias: bool
) -> None:
    tag_dir, model = write_checkpoint(tmp_path / "run", tokenizer_dir, attn_bias=attn_bias)
    if attn_bias:
        with torch.no_grad():
            model.layers[1].self_attn.q_proj.bias.normal_(0.0, 0.5)
        torch.save({"module": model.state_dict()}, tag_dir / "mp_rank_00_model_states.pt")
    assert export_cli.main([str(tmp_path / "run")]) == 0  # default --out: RUN_DIR/hf/step_N
    out = tmp_path / "run" / "hf" / tag_dir.name
    hf = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(hf).__name__ == ("Qwen2ForCausalLM" if attn_bias else "LlamaForCausalLM")
    tok = transformers.AutoTokenizer.from_pretrained(out)
    original = transformers.AutoTokenizer.from_pretrained(tokenizer_dir)
    text = "Whether 'tis nobler in the mind to suffer the slings and arrows"
    assert tok.encode(text) == original.encode(text)
    assert (hf.config.eos_token_id, hf.config.bos_token_id) == (original.eos_token_id, original.bos_token_id)
    assert hf.generation_config.eos_token_id == original.eos_token_id
    tokens = torch.tensor([original.encode(text)])  # (1, T)
    assert logit_diff(model, hf, tokens) < 1e-5
    assert not list(out.parent.glob(".*tmp*")), "temporary export dir left behind"


def test_export_dtype_overwrite_and_refusals(tmp_path: Path, tokenizer_dir: Path, capsys: Any) -> None:
    tag_dir, model = write_checkpoint(tmp_path / "run", tokenizer_dir)
    out = tmp_path / "hf"
    assert export_cli.main([str(tag_dir), "--out", str(out), "--dtype", "bfloat16"]) == 0
    assert capsys.readouterr().out.strip() == str(out)
    from safetensors.torch import load_file

    saved = load_file(out / "model.safetensors")
    assert "lm_head.weight" not in saved  # tied: transformers re-ties it
    assert torch.equal(saved["model.embed_tokens.weight"], model.embed_tokens.weight.to(torch.bfloat16))

    assert export_cli.main([str(tag_dir), "--out", str(out)]) == 2  # never overwrites silently
    assert "already exists" in capsys.readouterr().err
    assert export_cli.main([str(tag_dir), "--out", str(out), "--overwrite"]) == 0
    assert load_file(out / "model.safetensors")["model.norm.weight"].dtype == torch.float32

    sinks_tag, _ = write_checkpoint(tmp_path / "sinks", tokenizer_dir, attn_sinks=True)
    with pytest.raises(ExportError, match="attn_sinks=True has no"):
        export_hf(sinks_tag, tmp_path / "hf_sinks")
    partial = tmp_path / "partial" / "step_00000009"
    partial.mkdir(parents=True)
    torch.save({"module": model.state_dict()}, partial / "mp_rank_00_model_states.pt")
    with pytest.raises(ExportError, match="incomplete checkpoint"):
        export_hf(partial, tmp_path / "hf_partial")
    (tag_dir / "mp_rank_00_model_states.pt").unlink()
    with pytest.raises(ExportError, match="no DeepSpeed model states"):
        consolidated_state_dict(tag_dir)
    assert not (tmp_path / "hf_sinks").exists() and not (tmp_path / "hf_partial").exists()


def test_export_refuses_a_changed_tokenizer(tmp_path: Path, tokenizer_dir: Path, capsys: Any) -> None:
    tag_dir, _ = write_checkpoint(tmp_path / "run", tokenizer_dir)
    meta = json.loads((tag_dir / "tessera.json").read_text())
    meta["tokenizer"]["sha256"] = "0" * 64
    (tag_dir / "tessera.json").write_text(json.dumps(meta))
    assert export_cli.main([str(tag_dir), "--out", str(tmp_path / "hf")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("tessera: error: ") and "differs from the tokenizer the run trained with" in err
    assert err.count("\n") == 1 and not (tmp_path / "hf").exists()


def test_import_cli_reports_and_refuses(tmp_path: Path, capsys: Any) -> None:
    save_tiny_hf("qwen2", tmp_path / "qwen")
    assert import_cli.main([str(tmp_path / "qwen"), "--check-logits"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["model_type"] == "qwen2" and report["model_args"]["attn_bias"] is True
    assert report["max_logit_diff"] < 1e-5 and report["num_params"] > 0
    save_tiny_hf("llama", tmp_path / "dynamic", rope_parameters={"rope_type": "dynamic", "rope_theta": 1e4,
                                                                  "factor": 2.0})
    capsys.readouterr()
    assert import_cli.main([str(tmp_path / "dynamic")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("tessera: error: ") and "rope_type='dynamic'" in err and err.count("\n") == 1
