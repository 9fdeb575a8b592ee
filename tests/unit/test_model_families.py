"""Llama 3.x, Mistral, Qwen2 and Qwen3 in the native model, number by number against transformers.

Each family's tiny random model (tests/family_models.py: odd vocabulary, one KV head, head_dim != dim / heads,
scaled RoPE, a sliding window shorter than the sequence, tied and untied heads) is imported; its fp32 logits
equal transformers' within 1e-5 and 20 greedy tokens are identical. Then it trains 5 steps, is written as an HF
directory with the export's own functions, and transformers (no custom code) loads it with the same logits.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from model import PRESETS, ModelArgs, ModelConfigError, Transformer, generate, get_preset
from model.hf import hf_model_type, load_hf_pretrained, to_hf_config, to_hf_state_dict
from tests.family_models import FAMILIES, WINDOWS, load_reference, make_family_model, sample_ids
from tools import import_hf as import_cli

TOL = 1e-5
CLASSES = {"llama3": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
           "qwen3": "Qwen3ForCausalLM"}


@pytest.fixture(scope="module")
def family_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("families")
    return {family: make_family_model(root, family) for family in FAMILIES}


@pytest.mark.parametrize("family", FAMILIES)
def test_import_matches_transformers_logits_and_greedy_tokens(family: str, family_dirs: dict[str, Path]) -> None:
    ref = load_reference(family_dirs[family])
    args, state = load_hf_pretrained(family_dirs[family])
    model = Transformer(args).eval()
    model.load_state_dict(state)
    ids = sample_ids(args.vocab_size)
    with torch.no_grad():
        diff = (model(ids) - ref(ids).logits).abs().max().item()
    assert diff < TOL, f"{family}: logits differ by {diff}"
    prompt = ids[:, :4]
    expected = ref.generate(prompt, max_new_tokens=20, min_new_tokens=20, do_sample=False)
    assert torch.equal(generate(model, prompt, 20), expected)
    assert torch.equal(generate(model, prompt, 20, use_cache=False), expected)  # the cache masks the window too


def test_imports_see_each_familys_features(family_dirs: dict[str, Path]) -> None:
    args = {family: load_hf_pretrained(path)[0] for family, path in family_dirs.items()}
    assert args["llama3"].rope_type == "llama3" and args["llama3"].rope_factor == 8.0
    assert args["llama3"].attn_bias and args["llama3"].o_bias and args["llama3"].head_dim == 16
    assert args["mistral"].sliding_window == WINDOWS["mistral"] and args["mistral"].sliding_layers is None
    assert args["qwen2"].attn_bias and not args["qwen2"].o_bias and args["qwen2"].sliding_layers == [1]
    assert args["qwen2"].rope_type == "linear"
    assert args["qwen3"].qk_norm and args["qwen3"].head_dim == 16 and args["qwen3"].tie_embeddings
    for family, a in args.items():
        assert hf_model_type(a) == CLASSES[family].removesuffix("ForCausalLM").lower()
        assert a.num_params() == sum(p.numel() for p in Transformer(a).parameters())


@pytest.mark.parametrize("family", FAMILIES)
def test_trained_model_exports_and_transformers_loads_it(family: str, family_dirs: dict[str, Path],
                                                         tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    args, state = load_hf_pretrained(family_dirs[family])
    model = Transformer(args)
    model.load_state_dict(state)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    ids = sample_ids(args.vocab_size, seed=5)
    for _ in range(5):
        logits = model(ids[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
    config = to_hf_config(args)
    assert type(config).__name__ == CLASSES[family].replace("ForCausalLM", "Config")
    hf = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    hf.load_state_dict(to_hf_state_dict(model.state_dict()), strict=True)
    hf.save_pretrained(tmp_path / "export")
    written = json.loads((tmp_path / "export" / "config.json").read_text())
    assert written["architectures"] == [CLASSES[family]] and "auto_map" not in written
    loaded = load_reference(tmp_path / "export")
    model.eval()
    with torch.no_grad():
        diff = (model(ids) - loaded(ids).logits).abs().max().item()
    assert diff < TOL, f"{family}: exported logits differ by {diff}"
    assert load_hf_pretrained(tmp_path / "export")[0] == args  # the round trip keeps every field


def test_head_dim_is_derived_again_after_replace_and_new_fields_validate() -> None:
    base = ModelArgs(dim=64, n_layers=2, n_heads=4, vocab_size=97, max_seq_len=32)
    assert base.head_dim == 16 and base.head_dim_is_derived
    assert dataclasses.replace(base, dim=128).head_dim == 32  # not the stale 16
    explicit = dataclasses.replace(base, head_dim=24)
    assert explicit.head_dim == 24 and dataclasses.replace(explicit, dim=128).head_dim == 24
    model = Transformer(dataclasses.replace(base, head_dim=24, qk_norm=True))
    assert model.layers[0].self_attn.q_proj.weight.shape == (96, 64)
    for bad, name in (({"head_dim": 7}, "head_dim"), ({"sliding_window": 0}, "sliding_window"),
                      ({"sliding_layers": [5], "sliding_window": 4}, "sliding_layers"),
                      ({"sliding_layers": [0]}, "sliding_layers"), ({"o_bias": True}, "o_bias"),
                      ({"rope_type": "dynamic"}, "rope_type"), ({"rope_factor": 0.0}, "rope_factor"),
                      ({"rope_type": "llama3", "rope_low_freq_factor": 4.0}, "rope_high_freq_factor")):
        with pytest.raises(ModelConfigError, match=name):
            dataclasses.replace(base, **bad).validate()


def test_exports_without_a_transformers_family_are_refused_naming_the_field() -> None:
    base = ModelArgs(dim=64, n_layers=2, n_heads=4, vocab_size=97, max_seq_len=32)
    with pytest.raises(ModelConfigError, match="attn_sinks=True"):
        to_hf_config(dataclasses.replace(base, attn_sinks=True))
    with pytest.raises(ModelConfigError, match="sliding_layers=\\[1\\]"):
        to_hf_config(dataclasses.replace(base, sliding_window=8, sliding_layers=[1]))
    with pytest.raises(ModelConfigError, match="qk_norm=True with attn_bias=True"):
        to_hf_config(dataclasses.replace(base, qk_norm=True, attn_bias=True))


@pytest.mark.parametrize(("name", "billions"), [
    ("llama3.2-1b", 1.236), ("llama3.2-3b", 3.213), ("llama3.1-8b", 8.030), ("qwen2.5-0.5b", 0.494),
    ("qwen2.5-1.5b", 1.544), ("qwen2.5-7b", 7.616), ("qwen3-0.6b", 0.596), ("qwen3-1.7b", 1.721),
    ("qwen3-8b", 8.191), ("mistral-7b", 7.242),
])
def test_presets_have_the_published_parameter_counts(name: str, billions: float) -> None:
    args = get_preset(name)
    assert name in PRESETS and round(args.num_params() / 1e9, 3) == billions
    hf_model_type(args)  # each preset describes a transformers family


def test_import_check_names_what_stops_the_native_path(family_dirs: dict[str, Path], tmp_path: Path,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    assert import_cli.main(["--check", str(family_dirs["qwen3"])]) == 0
    line = capsys.readouterr().out
    assert line.startswith("native: yes (qwen3: ") and "q/k norm" in line and "head_dim 16" in line
    config = json.loads((family_dirs["llama3"] / "config.json").read_text())
    config["rope_parameters"] = {"rope_type": "dynamic", "rope_theta": 1e4, "factor": 4.0}
    (tmp_path / "config.json").write_text(json.dumps(config))
    (tmp_path / "model.safetensors").write_bytes((family_dirs["llama3"] / "model.safetensors").read_bytes())
    assert import_cli.main(["--check", str(tmp_path)]) == 1
    out = capsys.readouterr().out
    assert out.startswith("native: no: ") and "rope_type='dynamic'" in out and out.count("\n") == 1


def _flash_varlen_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_q: torch.Tensor,
                            cu_k: torch.Tensor, max_q: int, max_k: int, *, dropout_p: float, softmax_scale: float,
                            causal: bool, window_size: tuple[int, int]) -> torch.Tensor:
    """flash-attn's variable-length contract in plain torch: each segment alone, query i of a segment sees keys
    j with i - left <= j <= i + right (-1: unbounded), and j <= i when causal."""
    out = torch.empty_like(q)
    left, right = window_size
    for start, end in zip(cu_q[:-1].tolist(), cu_q[1:].tolist()):
        qs, ks, vs = q[start:end], k[start:end], v[start:end]  # (L, H, D)
        ks = ks.repeat_interleave(qs.shape[1] // ks.shape[1], dim=1)
        vs = vs.repeat_interleave(qs.shape[1] // vs.shape[1], dim=1)
        scores = torch.einsum("ihd,jhd->hij", qs, ks) * softmax_scale
        i = torch.arange(end - start)[:, None]
        j = torch.arange(end - start)[None, :]
        allowed = torch.ones_like(i - j, dtype=torch.bool)
        if causal:
            allowed &= j <= i
        if left >= 0:
            allowed &= j >= i - left
        if right >= 0:
            allowed &= j <= i + right
        out[start:end] = torch.einsum("hij,jhd->ihd", scores.masked_fill(~allowed, float("-inf")).softmax(-1), vs)
    return out


def test_flash_attn_window_size_matches_the_sdpa_window_mask(monkeypatch: pytest.MonkeyPatch) -> None:
    """The flash-attn path (GPU only) passes window_size=(W - 1, 0): checked on CPU against flash-attn's documented
    contract, on packed documents, against the SDPA path's explicit mask."""
    from model import attention as attn

    monkeypatch.setattr(attn, "_FLASH_ATTN_VARLEN_FUNC", _flash_varlen_reference)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 12, heads, 8, generator=g) for heads in (4, 2, 2))
    doc_ids = torch.tensor([[0] * 7 + [1] * 5, [0] * 12])
    for window in (1, 3, 5):
        flash = attn._flash_varlen(q, k, v, doc_ids, causal=True, dropout_p=0.0, scale=8 ** -0.5,
                                   window=(window - 1, 0))
        sdpa = attn.attention(q, k, v, doc_ids=doc_ids, window=window)
        assert (flash - sdpa).abs().max().item() < 1e-5, window
    assert attn.describe_attention(torch.device("cpu"), torch.float32, window=True) == "sdpa_window_mask"


@pytest.mark.parametrize("mode", ["full", "selective"])
def test_activation_checkpointing_keeps_each_familys_gradients(mode: str, family_dirs: dict[str, Path]) -> None:
    from parallel.perf import apply_activation_checkpointing

    for family in ("llama3", "qwen3"):  # o_proj biases and scaled RoPE; q/k norms and a window layer
        args, state = load_hf_pretrained(family_dirs[family])
        plain, recomputed = Transformer(args), Transformer(args)
        plain.load_state_dict(state)
        recomputed.load_state_dict(state)
        assert apply_activation_checkpointing(recomputed, mode) == args.n_layers
        ids = sample_ids(args.vocab_size)
        for model in (plain, recomputed):
            model(ids).logsumexp(-1).mean().backward()
        for (name, a), b in zip(plain.named_parameters(), recomputed.parameters()):
            assert torch.allclose(a.grad, b.grad, atol=1e-6), f"{family} {mode}: {name}"


@pytest.mark.parametrize("rope", [{}, {"attention_factor": 1.3, "beta_fast": 16.0, "truncate": False},
                                  {"mscale": 1.0, "mscale_all_dim": 0.5}], ids=["defaults", "explicit", "mscale"])
def test_yarn_rope_matches_transformers_and_exports(rope: dict[str, object], tmp_path: Path) -> None:
    """Qwen2.5 / Qwen3 long-context configs: YaRN frequencies and cos/sin scale, imported and written back."""
    from transformers import AutoModelForCausalLM

    from tests.family_models import family_config, perturb

    config = family_config("qwen3")
    config.rope_parameters = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                              "original_max_position_embeddings": 16, **rope}
    torch.manual_seed(0)
    ref = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    perturb(ref, 0)
    ref.eval().save_pretrained(tmp_path / "yarn")
    args, state = load_hf_pretrained(tmp_path / "yarn")
    assert args.rope_type == "yarn" and args.rope_factor == 4.0
    model = Transformer(args).eval()
    model.load_state_dict(state)
    ids = sample_ids(args.vocab_size)
    with torch.no_grad():
        assert (model(ids) - ref(ids).logits).abs().max().item() < TOL
        plain = Transformer(dataclasses.replace(args, rope_type="default")).eval()
        plain.load_state_dict(state)
        assert (plain(ids) - ref(ids).logits).abs().max().item() > 1e-2  # the scaling is seen
    exported = AutoModelForCausalLM.from_config(to_hf_config(args), dtype=torch.float32).eval()
    exported.load_state_dict(to_hf_state_dict(model.state_dict()))
    with torch.no_grad():
        assert (model(ids) - exported(ids).logits).abs().max().item() < TOL
