"""End to end: an evaluation measures the same thing for any layout of the same run.

Every run takes one optimizer step at a learning rate of 1e-9, so its weights are its (layout-independent)
initial weights to ~1e-9, and evaluates at that step: 5 micro-batches of 2 (train.eval_batches=5), which do not
share out evenly over 2 or 4 data-parallel ranks (fillers run on the ranks left over). Every validation metric
of the final evaluation (summary.json) must match the one-process run's to 1e-5: the same samples, each
counted once, weighted by tokens (or examples, pairs) whatever the ranks. The language model also runs under
tp=2 x dp=2 and pp=2 x dp=2; the SFT, DPO, classifier and research-recipe evaluations on 2 ranks.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import python_main, run_job
from tests.e2e.test_train_e2e import _common, _deepspeed
from tests.hf_models import make_tokenizer, write_classification, write_preferences, write_sft

pytestmark = pytest.mark.slow

SAME_WEIGHTS = ("train.steps=1", "train.lr=1e-9", "train.min_lr=0", "train.warmup_steps=0", "train.eval_interval=0",
                "train.save_interval=0", "train.keep_last=0", "train.micro_batch_size=2", "train.global_batch_size=8",
                "train.eval_batches=5", "sample.max_new_tokens=0")
INJECTION = ("research.recipe=injection",
             "research.options={layers: '1-2', scale: 1.0, source: variational, rank: 8, max_new_tokens: 4}")


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("eval_parity")
    write_sft(root / "sft.jsonl")
    write_preferences(root / "pref.jsonl")
    write_classification(root / "reviews.jsonl")
    make_tokenizer(root)
    return root


def _evaluation(tmp_path: Path, cache: Path, name: str, ranks: int, args: list[str], ds_config: str = "cpu"
                ) -> dict[str, float]:
    """The validation metrics of the final evaluation of a run on ``ranks`` processes."""
    out = tmp_path / name
    argv = [*_common(out, cache, *SAME_WEIGHTS, *args), "--ds_config", ds_config]
    run_job(python_main(*argv) if ranks == 1 else _deepspeed(ranks, *argv), tmp_path)
    summary = json.loads((out / "summary.json").read_text())
    metrics = {k: v for k, v in summary.items() if k.startswith("val_")}
    assert "val_loss" in metrics, summary
    return metrics


def _assert_same(got: dict[str, float], want: dict[str, float], what: str) -> None:
    assert sorted(got) == sorted(want), what
    for key, value in want.items():
        assert got[key] == pytest.approx(value, rel=1e-5, abs=1e-6), (what, key, got[key], value)


def test_language_model_validation_is_the_same_on_1_2_4_ranks_tp_and_pp(tmp_path: Path, data_cache: Path) -> None:
    want = _evaluation(tmp_path, data_cache, "one", 1, [])
    assert set(want) == {"val_loss", "val_ppl"}
    _assert_same(_evaluation(tmp_path, data_cache, "dp2", 2, []), want, "dp=2")
    _assert_same(_evaluation(tmp_path, data_cache, "dp4", 4, []), want, "dp=4")
    _assert_same(_evaluation(tmp_path, data_cache, "tp2dp2", 4, ["parallel.tp=2"]), want, "tp=2 x dp=2")
    _assert_same(_evaluation(tmp_path, data_cache, "pp2dp2", 4, ["parallel.pp=2"], "zero1"), want, "pp=2 x dp=2")


@pytest.mark.parametrize("kind", ["sft", "dpo", "classify", "research"])
def test_objective_validation_is_the_same_on_1_and_2_ranks(tmp_path: Path, data_cache: Path, files: Path,
                                                           kind: str) -> None:
    data = {
        "sft": ["data.corpus=sft", f"data.files=[{files / 'sft.jsonl'}]"],
        "dpo": ["train.objective=dpo", "data.corpus=preference", f"data.files=[{files / 'pref.jsonl'}]"],
        "classify": ["train.objective=classify", "data.corpus=classification",
                     f"data.files=[{files / 'reviews.jsonl'}]"],
        "research": list(INJECTION),
    }[kind]
    own = [] if kind == "research" else [f"data.tokenizer={files / 'tokenizer'}", "data.seq_len=64",
                                          "data.val_fraction=0.25"]
    want = _evaluation(tmp_path, data_cache, "one", 1, [*own, *data])
    _assert_same(_evaluation(tmp_path, data_cache, "dp2", 2, [*own, *data]), want, f"{kind}, dp=2")
