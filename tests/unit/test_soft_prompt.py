"""The soft-prompt recipe's parts in one process: the inputs_embeds path against the text path, chunked
distillation, RMS calibration, KV prefixes, PAD never a target."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from train.config.load import load_config
from train.objectives.lm import lm_loss
from train.research.api import RecipeContext, resolve_terms
from train.research.qa_data import synthetic_qa
from train.research.soft_prompt import SoftPrompt, SoftPromptOptions


@pytest.fixture(scope="module")
def bases(tiny_bases: Path) -> Path:
    return tiny_bases


def _recipe(bases: Path, tmp: Path, **options: object) -> tuple[SoftPrompt, object]:
    from model.hf_causal import CausalLM, load_causal_lm

    opts = SoftPromptOptions(synthetic=24, latents=4, encoder_dim=32, max_new_tokens=3, eval_examples=4,
                             bases=[str(bases / "qwen2")], **options)
    cfg = load_config(None, [f"hf.path={bases / 'llama'}", "data.corpus=qa", "research.recipe=soft_prompt",
                             f"train.out_dir={tmp}", "data.val_fraction=0.25"])
    train_ds, val_ds = SoftPrompt.datasets(opts, cfg)
    base = CausalLM(load_causal_lm(bases / "llama"))
    base.requires_grad_(False)
    ctx = RecipeContext(dim=64, n_layers=2, vocab_size=300, device=torch.device("cpu"), out_dir=tmp, rank=0, seed=0,
                        lm_loss=lm_loss, config=cfg, terms=resolve_terms(SoftPrompt, {"kd": {"weight": 1.0}}),
                        val_data=val_ds)
    torch.manual_seed(0)
    return SoftPrompt(base, ctx, opts), train_ds


def test_the_embeds_path_with_the_text_prompt_equals_the_text_baseline(bases: Path, tmp_path: Path) -> None:
    """Latents off, the full prompt through inputs_embeds: the answer logits of the plain text run, exactly."""
    ext, data = _recipe(bases, tmp_path)
    for b in (0, 1):
        for i in range(4):
            batch = data.batch([i])
            n = int(batch[f"prompt_mask_{b}"].sum())
            prompt = ext._embed(b, batch[f"prompt_{b}"][:, :n])
            with torch.no_grad():
                assert torch.equal(ext._student(b, batch, prompt, None), ext._text(b, batch))


def test_distillation_is_the_same_for_any_teacher_chunk(bases: Path, tmp_path: Path) -> None:
    ext, data = _recipe(bases, tmp_path)
    batch = data.batch(list(range(6)))
    z = ext.latents(batch)
    losses = []
    for chunk in (1, 4, 6):
        ext.options.kd_chunk = chunk
        prefix, kv = ext.adapters[1](z)
        logits = ext._student(1, batch, prefix, kv)
        labels = batch["answer_1"].masked_fill(batch["answer_mask_1"] == 0, -100)
        losses.append(ext.distill(1, batch, logits, labels))
    assert losses[0].item() > 0
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(losses[0], losses[2], rtol=1e-6, atol=1e-7)


def test_terms_adapters_and_kv_prefixes(bases: Path, tmp_path: Path) -> None:
    ext, data = _recipe(bases, tmp_path, kv_prefix=True, recon_tokens=4)
    ext.ctx.terms = resolve_terms(SoftPrompt, {"kd": {"weight": 1.0}, "recon": {"weight": 0.1},
                                               "k_token_ce": {"weight": 0.1}, "first_token_ce": {"weight": 0.1}})
    batch = data.batch([0, 1, 2])
    out = ext(batch)
    assert set(out["terms"]) == {"answer_ce", "first_token_ce", "k_token_ce", "kd", "recon"}
    assert all(torch.isfinite(v) and v.dim() == 0 for v in out["terms"].values())
    labels = out["labels"]
    assert (labels[batch["answer_mask_0"] == 0] == -100).all()  # PAD never a target
    sum(out["terms"].values()).backward()
    assert ext.encoder.queries.grad.abs().sum() > 0
    for adapter in ext.adapters:  # every base's adapter, its KV generator included, is trained
        assert adapter.proj.weight.grad.abs().sum() > 0 and adapter.kv.weight.grad.abs().sum() > 0
    assert all(p.grad is None for b in ext.bases() for p in b.parameters())  # the bases stay frozen
    z = ext.latents(batch)
    for b, base in enumerate(ext.bases()):
        prefix, kv = ext.adapters[b](z)
        rows = base.model.get_input_embeddings().weight.float().pow(2).mean(-1).sqrt().mean()
        torch.testing.assert_close(prefix.float().pow(2).mean(-1).sqrt(), rows.expand(3, 4), rtol=1e-3, atol=1e-4)
        n_kv = base.config.num_key_value_heads
        assert len(kv) == base.config.num_hidden_layers and kv[0][0].shape == (3, n_kv, 4, 16)


def test_evaluation_reports_every_mode_for_every_base(bases: Path, tmp_path: Path) -> None:
    import torch.distributed as dist

    from tests.conftest import free_port

    ext, _ = _recipe(bases, tmp_path)
    val = ext.ctx.val_data
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        with torch.no_grad():
            metrics = ext.eval().evaluate(lambda: iter([val.batch([0, 1]), val.batch([2, 3])]), step=5)
    finally:
        dist.destroy_process_group()
    for b in (0, 1):
        for mode in ("text", "truncated", "latent"):
            for m in ("em", "f1", "top1", "top5"):
                assert 0.0 <= metrics[f"b{b}_{mode}_{m}"] <= 100.0
        assert metrics[f"b{b}_compression"] > 2
    rows = (tmp_path / "predictions" / "qa_step_5.jsonl").read_text().splitlines()
    assert len(rows) == 8  # 4 questions x 2 bases
    assert synthetic_qa(24)  # the set the rows came from


def test_a_token_encoder_over_the_base_embeddings_and_reconstruction(bases: Path, tmp_path: Path) -> None:
    ext, data = _recipe(bases, tmp_path, encoder="tokens", recon_tokens=3)
    ext.ctx.terms = resolve_terms(SoftPrompt, {"recon": {"weight": 0.5}})
    batch = data.batch([0, 1])
    assert batch["enc_ids"].max() < 300  # the first base's token ids, not bytes
    out = ext(batch)
    assert set(out["terms"]) == {"answer_ce", "recon"}
    (out["terms"]["answer_ce"] + out["terms"]["recon"]).backward()
    assert ext.token_proj.weight.grad.abs().sum() > 0
    assert ext.base.model.get_input_embeddings().weight.grad is None  # read, never trained


def test_the_tiny_bases_have_two_vocabularies(bases: Path) -> None:
    from transformers import AutoConfig

    sizes = {AutoConfig.from_pretrained(str(bases / f)).vocab_size for f in ("llama", "qwen2")}
    assert len(sizes) == 2


def test_kv_prefixes_with_gradient_checkpointing_are_refused_up_front(bases: Path, tmp_path: Path) -> None:
    from train.config.fields import ConfigError
    from train.research.run import plan_research

    cfg = load_config(None, [f"hf.path={bases / 'llama'}", "data.corpus=qa", "research.recipe=soft_prompt",
                             "research.options={synthetic: 16, kv_prefix: true}", "hf.gradient_checkpointing=true"])
    with pytest.raises(ConfigError, match=r"kv_prefix=true with hf.gradient_checkpointing=true"):
        plan_research(cfg, dim=64, n_layers=2, vocab_size=300)
