"""A resumed research run keeps its recipe, options and loss terms on every base (hf.path and native), unless
term weights change on purpose; a complex-dtype parameter in a recipe is refused before training."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import pytest
import torch
from torch import nn

from tests.conftest import SMOKE
from tests.hf_models import make_hf_model, write_sft
from train.config.fields import ConfigError
from train.config.load import load_config
from train.main import parse_args
from train.plan import plan
from train.research.api import Extension, RecipeContext, outputs
from train.research.run import ResearchPlan, build_extension


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("research_resume")
    make_hf_model(root, "llama")
    write_sft(root / "sft.jsonl", n=16)
    return root


@pytest.fixture(autouse=True)
def no_launcher(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setitem(os.environ, "DS_ACCELERATOR", "cpu")


def _argv(root: Path, out: Path, base: str, *extra: str) -> list[str]:
    model = [f"hf.path={root / 'llama-2l'}"] if base == "hf" else [f"data.tokenizer={root / 'tokenizer'}"]
    return ["--config", str(SMOKE), *model, "data.corpus=sft", f"data.files=[{root / 'sft.jsonl'}]",
            f"data.cache_dir={root / 'cache'}", "data.seq_len=32", "data.val_fraction=0.25", f"train.out_dir={out}",
            "research.recipe=injection", "research.options.layers='0-1'", "research.options.scale=0.5",
            "research.options.source=variational",
            "research.terms.kl.weight=0.02", *extra]


def _checkpoint(root: Path, out: Path, base: str) -> None:
    """The tessera.json a run of this recipe writes (what resume planning reads), from the run's own plan."""
    p = plan(parse_args(_argv(root, out, base)))
    meta = {"step": 5, "world_size": 1, "config": p.cfg.to_dict(), "hf": p.hf.identity if p.hf else None,
            "model_args": None if p.model_args is None else dataclasses.asdict(p.model_args),
            "research": {"recipe": p.cfg.research.recipe, "options": p.cfg.research.options},
            "tokenizer": p.bundle.tokenizer_id}
    tag = out / "checkpoints" / "step_00000005"
    tag.mkdir(parents=True)
    (tag / "tessera.json").write_text(json.dumps(meta))
    (out / "checkpoints" / "latest").write_text(tag.name)


@pytest.mark.parametrize("base", ["hf", "native"])
def test_resume_refuses_a_changed_recipe_option_or_term(root: Path, tmp_path: Path, base: str) -> None:
    out = tmp_path / "run"
    _checkpoint(root, out, base)

    def resume(*extra: str) -> None:
        plan(parse_args([*_argv(root, out, base, *extra), "--resume", "auto"]))

    resume()  # the same recipe resumes
    resume("research.options.scale=0.50", "research.options.rank=16")  # the same values, written differently
    for extra, key in [(["research.options.layers='0'"], r"research.options.layers='0' here but '0-1'"),
                       (["research.options.scale=0.25"], r"research.options.scale=0.25 here but 0.5"),
                       (["research.freeze_base=false"], r"research.freeze_base=False here but True"),
                       (["research.terms.kl.weight=0.5"], r"research.terms.kl.weight=0.5 here but 0.02"),
                       (["research.terms.kl.schedule=constant"], r"research.terms.kl.schedule='constant'")]:
        with pytest.raises(ConfigError, match=key) as err:
            resume(*extra)
        assert "\n" not in str(err.value) and str(out / "checkpoints" / "step_00000005") in str(err.value)
    with pytest.raises(ConfigError, match=r"add research.resume_new_terms=true"):
        resume("research.terms.kl.weight=0.5")
    resume("research.terms.kl.weight=0.5", "research.resume_new_terms=true")  # on purpose: accepted
    with pytest.raises(ConfigError, match=r"research.recipe=None here but 'injection'"):
        plan(parse_args([a for a in _argv(root, out, base) if not a.startswith("research.")] + ["--resume", "auto"]))


class ComplexGate(Extension):
    """A user's recipe that declares a complex parameter directly (what DeepSpeed cannot train)."""

    def setup(self) -> None:
        self.gate = nn.Parameter(torch.ones(3, 4, dtype=torch.complex64))

    def forward(self, batch: dict[str, torch.Tensor]) -> dict:
        lm, logits = self.base_lm(batch)
        return outputs({"lm": lm}, logits=logits)


def test_a_complex_parameter_is_refused_naming_the_helpers(tmp_path: Path) -> None:
    recipe = f"{__name__}:ComplexGate"
    cfg = load_config(str(SMOKE), [f"research.recipe={recipe}", f"train.out_dir={tmp_path}"])
    ctx = RecipeContext(dim=8, n_layers=1, vocab_size=16, device=torch.device("cpu"), out_dir=tmp_path, rank=0,
                        seed=0, config=cfg)
    base = nn.Linear(8, 8)
    with pytest.raises(ConfigError) as err:
        build_extension(ResearchPlan(ComplexGate, ComplexGate.Options(), dict(ComplexGate.terms)), base, ctx,
                        freeze_base=True)
    message = str(err.value)
    assert message.startswith("gate: a complex64 parameter") and "\n" not in message
    assert "complex_param(3, 4)" in message and "as_complex" in message
