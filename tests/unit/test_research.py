"""The research extension API: term schedules, options, optimizer groups, loss-term checks, layer hooks, and the
hidden-state injection recipe against its base."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch import nn

from model import ModelArgs, Transformer
from model.hooks import HookError, LayerHooks, decoder_layers
from parallel.perf import apply_activation_checkpointing
from tests.hf_models import FAMILIES, make_hf_model
from train.config.fields import ConfigError
from train.config.load import load_config
from train.objectives.lm import lm_loss
from train.research.api import (
    LossTermError,
    RecipeContext,
    Term,
    check_finite,
    param_groups,
    parse_options,
    resolve_recipe,
    resolve_terms,
    weigh_terms,
)
from train.research.injection import Injection, InjectionOptions

ARGS = ModelArgs(dim=32, n_layers=4, n_heads=4, n_kv_heads=2, vocab_size=64, max_seq_len=32)


def _native(seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    model = Transformer(ARGS)
    model.init_weights()
    return model


def _ctx(model: nn.Module, dim: int, n_layers: int, **kw: object) -> RecipeContext:
    return RecipeContext(dim=dim, n_layers=n_layers, vocab_size=64, device=torch.device("cpu"), out_dir=Path("."),
                         rank=0, seed=3, lm_loss=lm_loss, **kw)


# ------------------------------------------------------------------------------------------- schedules


def test_term_schedules_give_the_expected_weights() -> None:
    assert [Term(0.5).at(s) for s in (0, 10, 1000)] == [0.5, 0.5, 0.5]
    lin = Term(1.0, schedule="linear", start=10, end=20, initial=0.2)
    assert [lin.at(s) for s in (0, 9, 10, 15, 20, 50)] == pytest.approx([0.2, 0.2, 0.2, 0.6, 1.0, 1.0])
    cos = Term(2.0, schedule="cosine", start=0, end=100)
    assert [cos.at(s) for s in (0, 50, 100)] == pytest.approx([0.0, 1.0, 2.0])
    assert cos.at(25) == pytest.approx(2.0 * 0.5 * (1 - math.cos(math.pi / 4)))
    warm = Term(0.3, schedule="warmup", start=5)
    assert [warm.at(s) for s in (0, 4, 5, 6)] == [0.0, 0.0, 0.3, 0.3]
    step_change = Term(1.0, schedule="linear", start=7, end=7)
    assert [step_change.at(s) for s in (6, 7)] == [0.0, 1.0]


def test_terms_from_the_recipe_section_override_the_class_defaults() -> None:
    terms = resolve_terms(Injection, {"kl": {"weight": 0.5, "schedule": "cosine", "end": 10}})
    assert terms["kl"].at(10) == 0.5 and terms["kl"].at(0) == 0.0 and terms["lm"].at(0) == 1.0
    with pytest.raises(ConfigError, match=r"research.terms.rec: Injection has no loss term 'rec'.*lm, kl"):
        resolve_terms(Injection, {"rec": {"weight": 1.0}})
    with pytest.raises(ConfigError, match=r"research.terms.kl: .*ends at step 1, before its start 5"):
        resolve_terms(Injection, {"kl": {"schedule": "linear", "start": 5, "end": 1}})


# ------------------------------------------------------------------------------------------- options and config


def test_options_are_checked_by_name_and_type() -> None:
    assert parse_options(Injection, {"layers": "1-2", "scale": 2}).scale == 2.0
    with pytest.raises(ConfigError, match=r"research.options.lyers: not an option of Injection; it takes layers"):
        parse_options(Injection, {"lyers": "1"})
    with pytest.raises(ConfigError, match=r"research.options.rank='big': expected an integer"):
        parse_options(Injection, {"rank": "big"})
    with pytest.raises(ConfigError, match=r"source='magic': use one of fixed, head, variational"):
        parse_options(Injection, {"source": "magic"})


def test_recipe_section_errors_name_the_key() -> None:
    with pytest.raises(ConfigError, match=r"research.options is set but research.recipe is not"):
        load_config(None, ["research.options={layers: 1}"])
    with pytest.raises(ConfigError, match=r"research.recipe='injection' with parallel.pp=2"):
        load_config(None, ["research.recipe=injection", "parallel.pp=2"])
    with pytest.raises(ConfigError, match=r"research.groups\[0\].lrate: unknown key"):
        load_config(None, ["research.recipe=injection", "research.groups=[{params: 'head.*', lrate: 1}]"])
    with pytest.raises(ConfigError, match=r"research.recipe='nope': use one of 'injection', 'soft_prompt', 'complex'"):
        resolve_recipe("nope")
    with pytest.raises(ConfigError, match=r"cannot import no_such_pkg.mod:Cls"):
        resolve_recipe("no_such_pkg.mod:Cls")
    with pytest.raises(ConfigError, match=r"is not a train.research.api.Extension subclass"):
        resolve_recipe("torch.nn:Linear")


def test_a_layer_that_does_not_exist_is_refused_with_the_depth() -> None:
    with pytest.raises(ConfigError, match=r"research.options.layers='2-4': layer 4 does not exist; the model has 4 "
                                          r"layers \(0-3\)"):
        Injection.check(InjectionOptions(layers="2-4"), _ctx(None, 32, 4))
    with pytest.raises(HookError, match=r"layers='a-b': write an index"):
        LayerHooks(_native()).add("a-b", lambda i, h: None)


# ------------------------------------------------------------------------------------------- optimizer groups


def test_groups_take_their_parameters_with_their_own_rates() -> None:
    model = nn.ModuleDict({"base": nn.Linear(4, 4), "head": nn.Linear(4, 2), "gate": nn.Linear(2, 1)})
    model["base"].requires_grad_(False)
    groups = param_groups(model, [{"params": "head.*", "lr": 1e-2}], lr=1e-3, weight_decay=0.1)
    assert groups[0]["lr"] == 1e-2 and {id(p) for p in groups[0]["params"]} == {id(p) for p in
                                                                                 model["head"].parameters()}
    rest = [p for g in groups[1:] for p in g["params"]]
    assert {id(p) for p in rest} == {id(p) for p in model["gate"].parameters()}  # the frozen base in none
    assert all(g["lr"] == 1e-3 for g in groups[1:])
    with pytest.raises(ConfigError, match=r"research.groups\[0\].params='base.\*' matches no trainable parameter; "
                                          r"the trainable ones are: head.weight, head.bias, gate.weight"):
        param_groups(model, [{"params": "base.*"}], lr=1e-3, weight_decay=0.0)


# ------------------------------------------------------------------------------------------- loss terms


def test_weighted_terms_and_their_errors() -> None:
    schedule = {"a": Term(1.0), "b": Term(0.5, schedule="linear", end=10)}
    total, logged = weigh_terms({"a": torch.tensor(2.0), "b": torch.tensor(4.0)}, schedule, step=5)
    assert total.item() == pytest.approx(2.0 + 0.25 * 4.0)
    assert logged["weight_b"].item() == 0.25 and logged["term_b"].item() == 4.0
    with pytest.raises(LossTermError, match=r"loss term 'b' returned \(3,\); a loss term must be a scalar"):
        weigh_terms({"a": torch.tensor(1.0), "b": torch.ones(3)}, schedule, step=0)
    with pytest.raises(LossTermError, match=r"loss term 'c' is not declared"):
        weigh_terms({"c": torch.tensor(1.0)}, schedule, step=0)
    check_finite({"term_a": 1.0, "weight_a": 1.0}, step=3)
    with pytest.raises(LossTermError, match=r"loss term 'b' is nan at step 3"):
        check_finite({"term_a": 1.0, "term_b": float("nan")}, step=3)


# ------------------------------------------------------------------------------------------- hooks


def test_hooks_fire_at_the_chosen_layers_only_and_modify_the_stream() -> None:
    model = _native()
    x = torch.randint(0, 64, (2, 12))
    with torch.no_grad():
        base = model(x)
    seen: list[int] = []
    hooks = LayerHooks(model)
    handle = hooks.add("1,3", lambda i, h: seen.append(i))  # read only
    with torch.no_grad():
        assert torch.equal(model(x), base)
    assert seen == [1, 3] and handle.calls == 2
    handle.remove()
    hooks.add([2], lambda i, h: h + 1.0)
    with torch.no_grad():
        changed = model(x)
        with hooks.disabled():
            assert torch.equal(model(x), base)
    assert not torch.allclose(changed, base)
    bad = LayerHooks(model)
    bad.add(0, lambda i, h: h[:, :1])
    with pytest.raises(HookError, match=r"hook on layer 0 returned shape \(2, 1, 32\); the hidden state is "
                                        r"\(2, 12, 32\)"):
        model(x)


def test_hooks_compose_with_activation_checkpointing() -> None:
    """Recomputing a block in backward neither runs its hook twice nor changes the gradients."""
    x = torch.randint(0, 64, (2, 12))
    y = torch.randint(0, 64, (2, 12))
    grads, calls = [], []
    for ac in (False, True):
        model = _native()
        if ac:
            apply_activation_checkpointing(model, "full")
        shift = nn.Parameter(torch.full((32,), 0.1))
        handle = LayerHooks(model).add("1-2", lambda i, h, s=shift: h + s)
        lm_loss(model(x), y).backward()
        grads.append(shift.grad.clone())
        calls.append(handle.calls)
    assert calls == [2, 2]
    torch.testing.assert_close(grads[0], grads[1], rtol=0, atol=1e-6)


@pytest.mark.parametrize("family", FAMILIES)
def test_hooks_on_hf_models(tmp_path_factory: pytest.TempPathFactory, family: str) -> None:
    from model.hf_causal import CausalLM, load_causal_lm

    root = tmp_path_factory.getbasetemp() / "research_hf"
    model = CausalLM(load_causal_lm(make_hf_model(root, family), dtype=torch.float32)).eval()
    layers = decoder_layers(model)
    assert len(layers) == 2
    x = torch.randint(0, 200, (1, 10))
    with torch.no_grad():
        base = model(x)
        hooks = LayerHooks(model)
        seen = []
        hooks.add(1, lambda i, h: (seen.append(tuple(h.shape)), h * 0.0)[1])
        changed = model(x)
    assert seen == [(1, 10, 32)] and not torch.allclose(changed, base)


# ------------------------------------------------------------------------------------------- injection


def _injection(base: nn.Module, dim: int, n_layers: int, **options: object) -> Injection:
    torch.manual_seed(1)
    return Injection(base, _ctx(base, dim, n_layers), InjectionOptions(**options))


@pytest.mark.parametrize("source", ["fixed", "head", "variational"])
def test_injection_with_lambda_zero_is_the_base_exactly(source: str) -> None:
    base = _native()
    batch = {"input_ids": torch.randint(0, 64, (2, 12)), "labels": torch.randint(0, 64, (2, 12))}
    with torch.no_grad():
        ref = base(batch["input_ids"])
    ext = _injection(base, 32, 4, layers="1-3", scale=0.0, source=source).eval()
    with torch.no_grad():
        out = ext(batch)
    assert torch.equal(out["logits"], ref)
    assert torch.equal(out["terms"]["lm"], lm_loss(ref, batch["labels"]))
    ext.scale = 0.5
    with torch.no_grad():
        assert not torch.allclose(ext(batch)["logits"], ref)
        with ext.base_only():
            assert torch.equal(ext(batch)["logits"], ref)


def test_injection_on_an_hf_base_with_lambda_zero_is_the_base(tmp_path_factory: pytest.TempPathFactory) -> None:
    from model.hf_causal import CausalLM, load_causal_lm

    root = tmp_path_factory.getbasetemp() / "research_hf"
    base = CausalLM(load_causal_lm(make_hf_model(root, "qwen2"), dtype=torch.float32)).eval()
    x = torch.randint(0, 200, (2, 10))
    with torch.no_grad():
        ref = base(x)
        ext = _injection(base, 32, 2, layers="0-1", scale=0.0, source="variational").eval()
        assert torch.equal(ext({"input_ids": x, "labels": x})["logits"], ref)


def test_variational_injection_trains_its_head_and_reports_kl() -> None:
    base = _native()
    base.requires_grad_(False)
    ext = _injection(base, 32, 4, layers="2", scale=1.0, source="variational", rank=4)
    batch = {"input_ids": torch.randint(0, 64, (2, 12)), "labels": torch.randint(0, 64, (2, 12))}
    out = ext(batch)
    assert set(out["terms"]) == {"lm", "kl"} and out["terms"]["kl"].item() > 0
    (out["terms"]["lm"] + out["terms"]["kl"]).backward()
    assert ext.head.down_weight.grad.abs().sum() > 0 and ext.head.up_weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in base.parameters())
    assert set(ext.declared_modules()) == {"head"}


def test_shipped_research_recipes_plan() -> None:
    from train.research.run import plan_research

    configs = Path(__file__).resolve().parents[2] / "train" / "configs"
    cfg = load_config(configs / "injection.yaml")
    args = cfg.model_args(512)
    plan = plan_research(cfg, dim=args.dim, n_layers=args.n_layers, vocab_size=512)
    assert plan.cls is Injection and plan.terms["kl"].at(50) == pytest.approx(0.005)
    cfg = load_config(configs / "injection_qlora.yaml")
    plan = plan_research(cfg, dim=4096, n_layers=32, vocab_size=128256)  # a Llama-3-8B's shape
    assert plan.options.layers == "8-15" and plan.terms["kl"].schedule == "cosine"
    with pytest.raises(ConfigError, match=r"layers='8-15': layer 12 does not exist; the model has 12 layers"):
        plan_research(cfg, dim=768, n_layers=12, vocab_size=50257)
