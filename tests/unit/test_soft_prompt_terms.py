"""The soft-prompt recipe's auxiliary terms: first-token entropy bonus, latent alignment to the prompt's
embeddings, hidden-state distillation at chosen layers, and alternating text / latent warm-up batches."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from train.config.fields import ConfigError
from train.config.load import load_config
from train.objectives.lm import lm_loss
from train.research.api import RecipeContext, resolve_terms
from train.research.soft_prompt import SoftPrompt, SoftPromptOptions
from train.research.soft_prompt_terms import (
    chunk_means,
    first_token_entropy,
    hidden_distance,
    latent_alignment,
)


def test_the_term_functions() -> None:
    uniform = torch.zeros(2, 3, 10)
    labels = torch.tensor([[1, 2, 3], [-100, -100, -100]])
    assert first_token_entropy(uniform, labels).item() == pytest.approx(-math.log(10))
    peaked = torch.zeros(2, 3, 10)
    peaked[0, 0, 4] = 50.0
    assert first_token_entropy(peaked, labels).item() == pytest.approx(0.0, abs=1e-6)  # the unlabelled row left out
    emb = torch.arange(12.0).reshape(1, 6, 2).repeat(2, 1, 1)  # (B, P, D)
    means = chunk_means(emb, torch.tensor([6, 2]), 3)
    assert means[0].tolist() == [[1.0, 2.0], [5.0, 6.0], [9.0, 10.0]]  # tokens 0-1, 2-3, 4-5
    assert means[1].tolist() == [[0.0, 1.0], [1.0, 2.0], [2.0, 3.0]]  # tokens 0, 0-1, 1: padding never read
    assert latent_alignment(means * 3.0, emb, torch.tensor([6, 2])).item() == pytest.approx(0.0, abs=1e-6)
    mask = torch.tensor([[1, 1, 0]])
    t = torch.ones(1, 3, 4)
    assert hidden_distance(t.clone(), t, mask).item() == 0.0
    s = t.clone()
    s[0, 2] = 9.0  # a padded position: not compared
    assert hidden_distance(s, t, mask).item() == 0.0 and hidden_distance(2 * t, t, mask).item() == pytest.approx(1.0)


def _recipe(bases: Path, tmp: Path, terms: dict, *overrides: str, **options: object) -> tuple[SoftPrompt, object]:
    from model.hf_causal import CausalLM, load_causal_lm

    opts = SoftPromptOptions(synthetic=24, latents=4, encoder_dim=32, max_new_tokens=3, eval_examples=4,
                             bases=[str(bases / "qwen2")], kd_chunk=2, **options)
    cfg = load_config(None, [f"hf.path={bases / 'llama'}", "data.corpus=qa", "research.recipe=soft_prompt",
                             f"train.out_dir={tmp}", "data.val_fraction=0.25", *overrides])
    SoftPrompt.check(opts, RecipeContext(dim=64, n_layers=2, vocab_size=300, device=torch.device("cpu"), out_dir=tmp,
                                         rank=0, seed=0, config=cfg))
    train_ds, val_ds = SoftPrompt.datasets(opts, cfg)
    base = CausalLM(load_causal_lm(bases / "llama"))
    base.requires_grad_(False)
    ctx = RecipeContext(dim=64, n_layers=2, vocab_size=300, device=torch.device("cpu"), out_dir=tmp, rank=0, seed=0,
                        lm_loss=lm_loss, config=cfg, terms=resolve_terms(SoftPrompt, terms), val_data=val_ds)
    torch.manual_seed(0)
    return SoftPrompt(base, ctx, opts), train_ds


def test_entropy_alignment_and_hidden_terms_train_the_encoder(tiny_bases: Path, tmp_path: Path) -> None:
    terms = {"first_entropy": {"weight": 0.1}, "align": {"weight": 1.0}, "hidden": {"weight": 1.0}}
    ext, data = _recipe(tiny_bases, tmp_path, terms, hidden_layers="0-1")
    batch = data.batch([0, 1, 2])
    out = ext(batch)
    assert {"first_entropy", "align", "hidden"} <= set(out["terms"])
    assert out["terms"]["first_entropy"] < 0 and 0 < out["terms"]["align"] < 2 and out["terms"]["hidden"] > 0
    for name in ("first_entropy", "align", "hidden"):
        ext.zero_grad()
        out = ext(batch)
        out["terms"][name].backward()
        assert ext.encoder.queries.grad.abs().sum() > 0, name
    assert all(p.grad is None for b in ext.bases() for p in b.parameters())  # the bases stay frozen


def test_hidden_distillation_of_the_full_prompt_is_zero(tiny_bases: Path, tmp_path: Path) -> None:
    """The student reading the prompt's own embeddings in place of latents has the teacher's states exactly."""
    ext, data = _recipe(tiny_bases, tmp_path, {"hidden": {"weight": 1.0}}, hidden_layers="1")
    batch = data.batch([0])
    n = int(batch["prompt_mask_0"].sum())
    prompt = ext._embed(0, batch["prompt_0"][:, :n])
    with torch.no_grad(), ext.capture.recording(0) as states:
        ext._student(0, batch, prompt, None)
    ext._student_states = dict(states)
    with torch.no_grad():
        assert ext.hidden(0, batch, n).item() == pytest.approx(0.0, abs=1e-10)
        ext._student_states = {1: states[1] + 1.0}
        assert ext.hidden(0, batch, n).item() > 0


def test_text_warmup_alternates_batches_and_needs_lora(tiny_bases: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="text_warmup=4: a text batch trains only the bases' LoRA adapters"):
        _recipe(tiny_bases, tmp_path, {}, text_warmup=4)
    ext, data = _recipe(tiny_bases, tmp_path, {"kd": {"weight": 1.0}}, "lora.r=4", text_warmup=4)
    batch = data.batch([0, 1])
    kinds = [set(ext.train()(batch)["terms"]) for _ in range(6)]
    latent = {"answer_ce", "kd"}
    assert kinds == [latent, {"answer_ce"}, latent, {"answer_ce"}, latent, latent]
    assert int(ext.batches_seen) == 6 and "batches_seen" in ext.state_dict()  # resumed with the checkpoint
    assert set(ext.eval()(batch)["terms"]) == latent and int(ext.batches_seen) == 6  # evaluation never counts
