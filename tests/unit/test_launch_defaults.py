"""What the entry point derives where the user left it open, and how it answers before training starts:

- the micro-batch (and with it the accumulation and the evaluation's micro-batch count) fitted to the
  data-parallel size where the user did not give it, an explicit contradiction refused in one line;
- a recipe's (or the schema's) warm-up scaled down to a short run, an explicit one kept and checked;
- ``--help-config`` lists the values the recipe and overrides give, the schema's default beside them;
- fused kernels left at their default fall back quietly on CPU, an explicit request says it could not be met;
- ``--resume`` with a path that does not exist, ``latest``, and a word it does not know;
- did-you-mean suggestions name the full key;
- ``--help``, ``--help-config`` and a bad key answer without importing DeepSpeed or transformers;
- DeepSpeed's compiled ops are cached per Python / torch / DeepSpeed version.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from model.kernels import resolve_kernels
from slurm.plan import _check_out_dir as check_submit_resume
from tests.conftest import MAIN, REPO, SMOKE
from train.checkpoint.writer import CheckpointError
from train.config.deepspeed import load_ds_config, resolve_ds_config
from train.config.fields import ConfigError
from train.config.load import describe_fields, load_config
from train.config.schema import PerfSection
from train.distributed import shm_buffer_path, use_extensions_dir
from train.plan import _resume_target

DEFAULT = REPO / "train" / "configs" / "shakespeare.yaml"


def _resolve(cfg, dp: int) -> dict:
    return resolve_ds_config(load_ds_config("zero2"), cfg, dp_size=dp, bf16_supported=False)


def test_micro_batch_is_fitted_to_the_data_parallel_size(caplog: pytest.LogCaptureFixture) -> None:
    # the default recipe: global 16, micro 16, 16 evaluation micro-batches (256 validation samples)
    for dp, micro, accum in ((1, 16, 1), (2, 8, 1), (4, 4, 1), (8, 2, 1), (16, 1, 1)):
        cfg = load_config(DEFAULT)
        with caplog.at_level(logging.INFO, logger="tessera"):
            ds = _resolve(cfg, dp)
        assert (cfg.train.micro_batch_size, ds["train_micro_batch_size_per_gpu"]) == (micro, micro), dp
        assert ds["gradient_accumulation_steps"] == accum and ds["train_batch_size"] == 16
        assert cfg.train.eval_batches * cfg.train.micro_batch_size == 256, dp  # the same validation samples
    assert ("train.micro_batch_size: 8 (the recipe's 16 does not divide train.global_batch_size=16 over 2 "
            "data-parallel ranks), gradient accumulation 1") in caplog.text
    # a global batch given on the command line: the largest divisor of the per-rank batch below the recipe's 16
    cfg = load_config(DEFAULT, ["train.global_batch_size=24"])
    assert _resolve(cfg, 1)["gradient_accumulation_steps"] == 2 and cfg.train.micro_batch_size == 12
    cfg = load_config(DEFAULT, ["train.global_batch_size=96"])
    assert _resolve(cfg, 2)["gradient_accumulation_steps"] == 3 and cfg.train.micro_batch_size == 16


def test_an_explicit_micro_batch_that_cannot_fit_is_one_error() -> None:
    cfg = load_config(DEFAULT, ["train.micro_batch_size=16"])
    with pytest.raises(ConfigError) as err:
        _resolve(cfg, 2)
    msg = str(err.value)
    assert msg.startswith("train.global_batch_size=16 does not factor into train.micro_batch_size=16 x "
                          "accumulation x data-parallel size=2: drop the train.micro_batch_size override")
    with pytest.raises(ConfigError, match=r"train.global_batch_size=16 cannot be split over 3 data-parallel ranks"):
        _resolve(load_config(DEFAULT), 3)
    assert _resolve(load_config(DEFAULT, ["train.micro_batch_size=4"]), 2)["gradient_accumulation_steps"] == 2


def test_default_warmup_is_scaled_to_a_short_run(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="tessera"):
        cfg = load_config(DEFAULT, ["train.steps=20"])  # the recipe's warm-up is 50 steps
    assert cfg.train.warmup_steps == 2
    assert "train.warmup_steps: 2 (the recipe's 50 is longer than train.steps=20" in caplog.text
    assert load_config(DEFAULT, ["train.steps=3"]).train.warmup_steps == 1
    assert load_config(DEFAULT, ["train.steps=60"]).train.warmup_steps == 50  # fits: kept
    recipe = tmp_path / "short.yaml"
    recipe.write_text("train:\n  steps: 30\n")  # the schema's warm-up (100) under the recipe's steps
    assert load_config(recipe).train.warmup_steps == 3
    # set by the user at the level of the steps (or above): their contradiction, one line naming both keys
    with pytest.raises(ConfigError, match=r"train.warmup_steps=50 exceeds train.steps=20: lower"):
        load_config(DEFAULT, ["train.steps=20", "train.warmup_steps=50"])
    with pytest.raises(ConfigError, match=r"train.warmup_steps=700 exceeds train.steps=600"):
        load_config(DEFAULT, ["train.warmup_steps=700"])  # over the recipe's steps
    recipe.write_text("train:\n  steps: 30\n  warmup_steps: 40\n")
    with pytest.raises(ConfigError, match=r"train.warmup_steps=40 exceeds train.steps=30"):
        load_config(recipe)


def test_help_config_shows_the_recipes_values() -> None:
    text = describe_fields(load_config(DEFAULT, ["train.lr=5e-4"]))
    assert "  steps: int = 600  (default 1000)  # Optimizer steps to run (0: evaluate" in text
    assert "  lr: float = 0.0005  (default 0.001)" in text
    assert "  eval_interval: int = 200  # " in text  # the recipe's value is the schema's: no default shown
    assert "  n_layers: int = 4  (the preset)" in text
    assert "  vocab_size: int = the tokenizer's" in text
    assert "  steps: int = 1000  # " in describe_fields()  # no recipe: the schema's defaults


def test_help_config_from_the_command_line(tmp_path: Path) -> None:
    out = subprocess.run([sys.executable, str(MAIN), "--help-config", "--config", str(SMOKE), "train.steps=7"],
                         capture_output=True, text=True, timeout=120, cwd=REPO, check=False)
    assert out.returncode == 0, out.stderr
    assert "  steps: int = 7  (default 1000)" in out.stdout
    assert "  preset: str = 'test-1m'  (default 'tiny')" in out.stdout
    bad = subprocess.run([sys.executable, str(MAIN), "--help-config", "train.stepz=7"], capture_output=True,
                         text=True, timeout=120, cwd=REPO, check=False)
    want = "tessera: error: Unknown config key 'train.stepz'. Did you mean 'train.steps'?"
    assert (bad.returncode, bad.stderr.strip()) == (2, want)


@pytest.mark.parametrize("override, suggestion", [
    ("train.lrr=1", "Did you mean 'train.lr'?"),
    ("model.n_layer=2", "Did you mean 'model.n_layers'?"),
    ("perf.fused_rmsnorm=true", "Did you mean 'perf.fused_rms_norm'?"),
    ("trian.lr=1", "Did you mean 'train'?"),
    ("sample.zzzzzz=1", "Known keys: sample.max_new_tokens, sample.prompt"),
])
def test_suggestions_name_the_full_key(override: str, suggestion: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(SMOKE, [override])
    assert suggestion in str(err.value)


def test_default_kernels_fall_back_quietly(caplog: pytest.LogCaptureFixture) -> None:
    perf = PerfSection()
    assert (perf.fused_rms_norm, perf.fused_swiglu, perf.fused_rope) == (None, None, None)
    with caplog.at_level(logging.INFO, logger="tessera"):
        choice = resolve_kernels(torch.device("cpu"), rms_norm=perf.fused_rms_norm, swiglu=perf.fused_swiglu,
                                 rope=perf.fused_rope)
    assert (choice.rms_norm, choice.swiglu, choice.rope) == ("reference",) * 3
    assert "kernels: attention=sdpa" in caplog.text and "requested" not in caplog.text
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="tessera"):
        resolve_kernels(torch.device("cpu"), rms_norm=True, swiglu=False)
    assert "fused rms_norm requested but liger-kernel needs a CUDA device" in caplog.text
    assert load_config(SMOKE, ["perf.fused_rope=true"]).perf.fused_rope is True


def test_resume_names_what_is_wrong(tmp_path: Path) -> None:
    cfg = load_config(SMOKE, [f"train.out_dir={tmp_path / 'run'}"])
    missing = tmp_path / "run" / "checkpoints" / "step_00000010"
    with pytest.raises(CheckpointError, match=rf"--resume {missing}: no such checkpoint directory; give auto, "
                                              r"latest, never or an existing checkpoint directory"):
        _resume_target(cfg, str(missing))
    with pytest.raises(CheckpointError, match=r"--resume last: no such checkpoint directory"):
        _resume_target(cfg, "last")
    with pytest.raises(CheckpointError, match=r"--resume latest: train.out_dir=.* holds no complete checkpoint; "
                                              r"check train.out_dir, or pass --resume auto"):
        _resume_target(cfg, "latest")
    assert _resume_target(cfg, "auto") is None  # auto starts fresh
    (tmp_path / "run").mkdir()
    with pytest.raises(ConfigError, match=r"not a complete Tessera checkpoint \(no tessera.json in it\)\.$"):
        _resume_target(cfg, str(tmp_path / "run"))
    (tmp_path / "run" / "checkpoints" / "step_00000005").mkdir(parents=True)
    (tmp_path / "run" / "checkpoints" / "step_00000005" / "tessera.json").write_text("{}")
    with pytest.raises(ConfigError, match=r"\(no tessera.json in it\) \(the newest complete one in it is "
                                          r".*checkpoints/step_00000005\)\.$"):
        _resume_target(cfg, str(tmp_path / "run"))  # the run directory instead of one of its checkpoints
    (tmp_path / "file").write_text("x")
    with pytest.raises(CheckpointError, match=r"a file, not a checkpoint directory"):
        _resume_target(cfg, str(tmp_path / "file"))
    check_submit_resume(tmp_path / "run", "latest")  # slurm/submit.py passes it on to the job's own check
    with pytest.raises(ConfigError, match=r"--resume .*step_00000010: no such checkpoint directory"):
        check_submit_resume(tmp_path / "run", str(missing))


HEAVY = ("deepspeed", "transformers", "datasets", "peft", "train.session", "train.build", "torch")
PROBE = """
import json, runpy, sys
watch = json.loads(sys.argv[2])
sys.argv = ["train/main.py", *json.loads(sys.argv[1])]
code = 0
try:
    runpy.run_path(sys.argv[0], run_name="__main__")
except SystemExit as e:
    code = e.code
heavy = [m for m in watch if m in sys.modules]
print(json.dumps({"code": code, "heavy": heavy}), file=sys.stderr)
"""


@pytest.mark.parametrize("argv, code, heavy", [
    (["--help"], 0, []),  # argparse alone
    (["train.lrr=1"], 2, ["torch"]), (["--help-config"], 0, ["torch"]), (["--config", "nope.yaml"], 2, ["torch"]),
    (["--ds_config", "nope"], 2, ["train.session", "train.build", "torch"]),  # a valid recipe: the plan's stack
])
def test_answers_before_the_training_stack_is_imported(argv: list[str], code: int, heavy: list[str]) -> None:
    out = subprocess.run([sys.executable, "-c", PROBE, json.dumps(argv), json.dumps(HEAVY)], cwd=REPO,
                         capture_output=True, text=True, timeout=120, check=False)
    probe = json.loads(out.stderr.strip().splitlines()[-1])
    assert probe == {"code": code, "heavy": heavy}, out.stderr[-2000:]


def test_compiled_ops_are_cached_per_version(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TORCH_EXTENSIONS_DIR", raising=False)
    path = use_extensions_dir()
    assert path.endswith(f"py{sys.version_info.major}{sys.version_info.minor}-torch{torch.__version__}-"
                         f"deepspeed{importlib.metadata.version('deepspeed')}")
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", "/somewhere/else")
    assert use_extensions_dir() == "/somewhere/else"  # the user's choice stands


def test_shm_buffer_name_follows_deepspeed(monkeypatch: pytest.MonkeyPatch) -> None:
    """The name train.distributed unlinks is the one DeepSpeed's shm.cpp creates."""
    spec = importlib.util.find_spec("deepspeed")
    assert spec is not None and spec.origin is not None
    source = (Path(spec.origin).parent / "ops" / "csrc" / "cpu" / "comm" / "shm.cpp").read_text()
    assert '#define SHM_BUFFER_NAME "deepspeed_allreduce_buffer"' in source
    assert '"%s_%d_%s_%s",\n             SHM_BUFFER_NAME,\n             getuid(),' in source  # uid, addr, port
    assert 'snprintf(shm_name, NAME_BUF_SIZE, "%s_%d", shm_name_prefix, rank);' in source
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "29555")
    assert shm_buffer_path(1) == f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_127.0.0.1_29555_1"
