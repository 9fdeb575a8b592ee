"""Research run settings: nested ``research.options`` overrides (command line and sweep grids), evaluation-only
runs (``train.steps=0``), the best checkpoint chosen by any logged validation metric, and pooled injection (one
vector per sequence)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from model import ModelArgs, Transformer
from slurm.profile import SlurmConfigError
from slurm.sweep import load_sweep, point_overrides
from train.config.fields import ConfigError
from train.config.load import load_config
from train.loop.trainer import TrainState, best_metric
from train.objectives.lm import lm_loss
from train.research.api import RecipeContext, resolve_recipe, resolve_terms
from train.research.injection import Injection, InjectionOptions
from train.research.run import check_best_metric
from train.research.soft_prompt import SoftPrompt, SoftPromptOptions

RECIPES = Path(__file__).resolve().parents[2] / "train" / "configs"


def test_nested_option_overrides_compose_with_the_recipe() -> None:
    cfg = load_config(RECIPES / "injection.yaml", ["research.options.scale=0.25", "research.options.layers='0-1'",
                                                   "research.options.extra.depth=2", "research.options.extra.on=yes"])
    o = cfg.research.options
    assert o["scale"] == 0.25 and o["layers"] == "0-1" and o["source"] == "variational"  # the rest kept
    assert o["extra"] == {"depth": 2, "on": True}  # values parsed like YAML
    assert cfg.origin.level("research.options") > cfg.origin.level("research.recipe")  # named on the command line


@pytest.mark.parametrize("override, words", [
    ("train.steps.x=1", ["train.steps is not a mapping field", "research.options.KEY=VALUE"]),
    ("research.options.scale.x=1", ["research.options.scale is 1.0 in the recipe, not a mapping"]),
    ("research.options..x=1", ["must be section.key"]),
])
def test_nested_overrides_that_cannot_apply_are_one_line(override: str, words: list[str]) -> None:
    with pytest.raises(ConfigError) as e:
        load_config(RECIPES / "injection.yaml", [override])
    assert all(w in str(e.value) for w in words), str(e.value)


def test_a_sweep_grid_over_nested_option_keys(tmp_path: Path) -> None:
    path = tmp_path / "zero_shot.yaml"
    path.write_text("grid:\n  research.options.scale: [0.5, 2]\n  research.options.layers: ['0-1', '2']\n"
                    "  train.steps: [0]\n")
    sweep = load_sweep(path)
    points = sweep.points()
    assert len(points) == 4
    cfg = load_config(RECIPES / "injection.yaml", point_overrides(points[1]))
    assert cfg.research.options["scale"] == 0.5 and cfg.research.options["layers"] == "2" and cfg.train.steps == 0
    path.write_text("grid:\n  research..scale: [1]\n")
    with pytest.raises(SlurmConfigError, match="nested key of a mapping"):
        load_sweep(path)


def test_steps_zero_is_an_evaluation_only_run() -> None:
    cfg = load_config(RECIPES / "injection.yaml", ["train.steps=0"])  # the recipe's warm-up needs no scaling
    assert cfg.train.steps == 0 and cfg.train.warmup_steps == 5
    with pytest.raises(ConfigError, match="train.steps=-1"):
        load_config(RECIPES / "injection.yaml", ["train.steps=-1"])


def test_best_is_the_lowest_or_highest_smoothed_metric() -> None:
    low, high = TrainState(), TrainState()
    values = [3.0, 1.0, 4.0, 2.0, 5.0]
    assert [low.observe_val_loss(v, 0.0, "min") for v in values] == [True, True, False, False, False]
    assert [high.observe_val_loss(v, 0.0, "max") for v in values] == [True, False, True, False, True]
    smoothed = TrainState()  # EMA 3, 2, 3, 2.5, 3.75
    assert [smoothed.observe_val_loss(v, 0.5, "max") for v in values] == [True, False, False, False, True]
    assert smoothed.best_val_ema == pytest.approx(3.75)


def test_best_metric_settings_are_checked() -> None:
    cfg = load_config(RECIPES / "injection.yaml", ["train.best_metric=val_lm", "train.best_mode=max"])
    assert (cfg.train.best_metric, cfg.train.best_mode) == ("val_lm", "max")
    with pytest.raises(ConfigError, match="starts with 'val_'"):
        load_config(RECIPES / "injection.yaml", ["train.best_metric=loss"])
    with pytest.raises(ConfigError, match="best_mode"):
        load_config(RECIPES / "injection.yaml", ["train.best_mode=highest"])
    with pytest.raises(ConfigError) as e:  # not known before training: the first evaluation says it
        best_metric({"val_loss": 1.0, "val_accuracy": 0.5}, "val_f1")
    assert "train.best_metric='val_f1'" in str(e.value) and "val_accuracy, val_loss" in str(e.value)


def test_a_metric_the_recipe_never_logs_is_refused_before_training() -> None:
    terms = resolve_terms(SoftPrompt, {})
    options = SoftPromptOptions(bases=["other"])
    check_best_metric("val_b1_latent_f1", SoftPrompt, options, terms)
    check_best_metric("val_kd", SoftPrompt, options, terms)
    with pytest.raises(ConfigError) as e:
        check_best_metric("val_b2_latent_f1", SoftPrompt, options, terms)
    assert "val_b1_latent_f1" in str(e.value) and "val_answer_ce" in str(e.value)
    inj_terms = resolve_terms(Injection, {})
    check_best_metric("val_ppl", Injection, InjectionOptions(), inj_terms)
    with pytest.raises(ConfigError, match="val_kl, val_lm, val_loss, val_ppl"):
        check_best_metric("val_accuracy", Injection, InjectionOptions(), inj_terms)
    assert resolve_recipe("complex").metrics(None) == []


def _pooled(**options: object) -> Injection:
    torch.manual_seed(0)
    base = Transformer(ModelArgs(dim=32, n_layers=4, n_heads=4, n_kv_heads=2, vocab_size=64, max_seq_len=32))
    base.init_weights()
    base.requires_grad_(False)
    ctx = RecipeContext(dim=32, n_layers=4, vocab_size=64, device=torch.device("cpu"), out_dir=Path("."), rank=0,
                        seed=0, lm_loss=lm_loss)
    return Injection(base, ctx, InjectionOptions(layers="1-2", pooled=True, **options))


def test_pooled_injection_is_one_vector_per_sequence_from_its_context() -> None:
    ext = _pooled()
    ids = torch.randint(0, 64, (2, 12))
    labels = ids.clone()
    labels[0, :5], labels[1, :3] = -100, -100  # the unscored prompts
    out = ext({"input_ids": ids, "labels": labels})
    assert ext._v.shape == (2, 1, 32)  # one vector per sequence, added at every position
    first = ext._v.detach().clone()
    later = ids.clone()
    later[:, 6:] = (later[:, 6:] + 1) % 64  # scored tokens only: the vector cannot see them
    ext({"input_ids": later, "labels": labels})
    assert torch.equal(ext._v, first)
    earlier = ids.clone()
    earlier[0, 1] = (earlier[0, 1] + 1) % 64  # a context token of the first sequence
    ext({"input_ids": earlier, "labels": labels})
    assert not torch.allclose(ext._v[0], first[0]) and torch.equal(ext._v[1], first[1])
    out["terms"]["lm"].backward()
    assert ext.head.down_weight.grad.abs().sum() > 0


def test_pooled_injection_needs_a_head_and_unscored_context() -> None:
    ctx = RecipeContext(dim=32, n_layers=4, vocab_size=64, device=torch.device("cpu"), out_dir=Path("."), rank=0,
                        seed=0, config=load_config(RECIPES / "injection.yaml"))
    with pytest.raises(ConfigError, match="data.corpus='shakespeare' every position is scored"):
        Injection.check(InjectionOptions(pooled=True), ctx)
    with pytest.raises(ConfigError, match="source='fixed' has no head"):
        Injection.check(InjectionOptions(pooled=True, source="fixed"), ctx)
