"""End to end: an evaluation measures the same thing for any layout of the same run.

Every evaluation reads 5 micro-batches of 2 (train.eval_batches=5), which do not share out evenly over 2 or 4
data-parallel ranks (fillers run on the ranks left over). Its validation metrics (summary.json) must match the
one-process run's to 1e-5: the same samples, each counted once, weighted by tokens (or examples, pairs) whatever
the ranks. The language model takes one step at a learning rate of 1e-9 (its weights stay its layout-independent
initial ones to ~1e-9) on 1 and 4 ranks, tp=2 x dp=2 and pp=2 x dp=2. SFT, DPO, a classifier and a research
recipe train 2 steps in one process, and the finished run is resumed on 2 ranks, which only evaluates the same
weights again (DPO's policy has moved away from its reference by then, so its metrics are not trivial).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import copy_run_until, python_main, run_job
from tests.e2e.test_train_e2e import _common, _deepspeed
from tests.hf_models import make_tokenizer, write_classification, write_preferences, write_sft

pytestmark = pytest.mark.slow

LAYOUT_FREE = ("train.eval_interval=0", "train.save_interval=0", "train.keep_last=0", "train.micro_batch_size=2",
               "train.global_batch_size=8", "train.eval_batches=5", "sample.max_new_tokens=0")
SAME_WEIGHTS = (*LAYOUT_FREE, "train.steps=1", "train.lr=1e-9", "train.min_lr=0", "train.warmup_steps=0")
TRAINED = (*LAYOUT_FREE, "train.steps=2", "train.warmup_steps=1")
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
    argv = [*_common(out, cache, *args), "--ds_config", ds_config]
    run_job(python_main(*argv) if ranks == 1 else _deepspeed(ranks, *argv), tmp_path)
    summary = json.loads((out / "summary.json").read_text())
    metrics = {k: v for k, v in summary.items() if k.startswith("val_")}
    assert "val_loss" in metrics, summary
    return metrics


def _assert_same(got: dict[str, float], want: dict[str, float], what: str) -> None:
    assert sorted(got) == sorted(want), what
    for key, value in want.items():
        assert got[key] == pytest.approx(value, rel=1e-5, abs=1e-6), (what, key, got[key], value)


def test_language_model_validation_is_the_same_on_1_and_4_ranks_tp_and_pp(tmp_path: Path, data_cache: Path) -> None:
    want = _evaluation(tmp_path, data_cache, "one", 1, list(SAME_WEIGHTS))
    assert set(want) == {"val_loss", "val_ppl"}
    # 2 ranks: the other objectives' test below
    for name, ranks, extra, ds in [("dp4", 4, [], "cpu"), ("tp2dp2", 4, ["parallel.tp=2"], "cpu"),
                                   ("pp2dp2", 4, ["parallel.pp=2"], "zero1")]:
        _assert_same(_evaluation(tmp_path, data_cache, name, ranks, [*SAME_WEIGHTS, *extra], ds), want, name)


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
    args = [*own, *data, *TRAINED]
    one = _evaluation(tmp_path, data_cache, "one", 1, args)
    copy_run_until(tmp_path / "one", 2, tmp_path / "dp2")
    _assert_same(_evaluation(tmp_path, data_cache, "dp2", 2, [*args, "--resume", "auto"]), one, f"{kind}, dp=2")
    if kind == "dpo":
        assert one["val_margin"] > 1e-3, one  # the policy moved
