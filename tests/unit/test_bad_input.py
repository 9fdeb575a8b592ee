"""Bad input stops the entry point with one clear line before any training, and touches nothing on disk."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
from pathlib import Path

import pytest

from tests.conftest import REPO, SMOKE, child_env, python_main
from train.config.fields import ConfigError
from train.data import DataError, prepare, train_bpe_tokenizer
from train.main import parse_args
from train.plan import USER_ERRORS, plan

TEXT = "\n".join(f"Line {i}: to be or not to be, that is the question number {i}." for i in range(400))


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """No launcher variables, and whatever the entry point sets is undone after the test."""
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(key, raising=False)
    saved = dict(os.environ)
    yield monkeypatch
    os.environ.clear()
    os.environ.update(saved)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two documents, two different tokenizers, and data prepared with the first."""
    root = tmp_path_factory.mktemp("corpus")
    docs = [root / "a.txt", root / "b.txt"]
    docs[0].write_text(TEXT)
    docs[1].write_text(TEXT.upper())
    tok_a = train_bpe_tokenizer(docs, 300, root / "tok_a")
    tok_b = train_bpe_tokenizer(docs, 320, root / "tok_b")
    prepare(docs, tok_a, root / "prepared_a", val_fraction=0.5)
    return {"root": root, "a": docs[0], "b": docs[1], "tok_a": tok_a, "tok_b": tok_b,
            "prepared": root / "prepared_a"}


def _launch(env: pytest.MonkeyPatch, *, rank: int, world: int) -> None:
    """The variables a launcher (torchrun, deepspeed) sets for ``rank`` of a one-node job of ``world``."""
    for key, value in {"RANK": rank, "WORLD_SIZE": world, "LOCAL_RANK": rank, "LOCAL_WORLD_SIZE": world,
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": 29500}.items():
        env.setenv(key, str(value))


def _files_args(corpus: dict[str, Path], tmp_path: Path, *extra: str) -> list[str]:
    return ["--config", str(SMOKE), "data.corpus=files", f"data.files=[{corpus['a']}, {corpus['b']}]",
            "data.val_fraction=0.5", f"data.cache_dir={tmp_path / 'cache'}",
            f"train.out_dir={tmp_path / 'run'}", "data.seq_len=32", *extra]


def _snapshot(*roots: Path) -> dict[str, tuple[int, int, str]]:
    out = {}
    for root in roots:
        for p in sorted(root.rglob("*")):
            if p.is_file():
                digest = hashlib.sha256(p.read_bytes()).hexdigest()
                out[str(p)] = (p.stat().st_size, p.stat().st_mtime_ns, digest)
    return out


def test_cli_prints_one_line_and_exits_2(tmp_path: Path) -> None:
    argv = python_main("--config", str(SMOKE), "train.lrr=1e-3", f"train.out_dir={tmp_path}/r")
    proc = subprocess.run(argv, cwd=REPO, env=child_env(tmp_path), capture_output=True, text=True,
                          timeout=120, check=False)
    assert proc.returncode == 2
    errors = [line for line in proc.stderr.splitlines() if line.startswith("tessera: error:")]
    assert len(errors) == 1 and "Unknown config key 'train.lrr'" in errors[0]
    assert "Did you mean 'train.lr'" in errors[0]
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "r").exists()


def test_valid_plan_prepares_data_once(clean_env: pytest.MonkeyPatch, corpus: dict, tmp_path: Path) -> None:
    p = plan(parse_args(_files_args(corpus, tmp_path)))
    assert p.model_args.vocab_size == p.bundle.data.vocab_size == 512  # data.vocab_size of smoke.yaml
    assert p.ds_config["gradient_accumulation_steps"] == 2 and p.resume_from is None
    again = plan(parse_args(_files_args(corpus, tmp_path)))
    assert again.bundle.prepared_dir == p.bundle.prepared_dir  # cached, not rebuilt


@pytest.mark.parametrize(
    "extra, error, fragment",
    [
        (["model.n_heads=3"], ConfigError, "n_heads"),
        (["data.seq_len=4096"], ConfigError, "data.seq_len=4096 is longer than the model allows"),
        (["data.files=[/nonexistent/corpus.txt]"], DataError, "data.files: /nonexistent/corpus.txt: does not exist"),
        (["model.vocab_size=100"], ConfigError, "model.vocab_size=100 is smaller than the tokenizer's 512"),
        (["data.seq_len=256", "train.micro_batch_size=64", "train.global_batch_size=64"], ConfigError,
         "fewer than train.micro_batch_size=64 x 1 data-parallel ranks needed to evaluate"),
    ],
)
def test_config_errors_before_anything_runs(clean_env: pytest.MonkeyPatch, corpus: dict, tmp_path: Path,
                                            extra: list[str], error: type, fragment: str) -> None:
    with pytest.raises(error) as err:
        plan(parse_args(_files_args(corpus, tmp_path, *extra)))
    assert fragment in str(err.value)
    assert not (tmp_path / "run").exists()


def test_batch_that_does_not_factor_over_the_world(clean_env: pytest.MonkeyPatch, corpus: dict,
                                                   tmp_path: Path) -> None:
    _launch(clean_env, rank=0, world=3)
    with pytest.raises(ConfigError) as err:
        plan(parse_args(_files_args(corpus, tmp_path)))
    assert "train.global_batch_size=8 cannot be split over 3 data-parallel ranks" in str(err.value)


def test_empty_corpus(clean_env: pytest.MonkeyPatch, corpus: dict, tmp_path: Path) -> None:
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(DataError) as err:
        plan(parse_args(_files_args(corpus, tmp_path, f"data.files=[{empty}]")))
    assert "empty.txt" in str(err.value)


def test_tokenizer_that_does_not_match_the_prepared_data(clean_env: pytest.MonkeyPatch, corpus: dict,
                                                         tmp_path: Path) -> None:
    before = _snapshot(corpus["prepared"])
    args = _files_args(corpus, tmp_path, f"data.tokenizer={corpus['tok_b']}",
                       f"data.prepared_dir={corpus['prepared']}")
    with pytest.raises(DataError) as err:
        plan(parse_args(args))
    assert "tokenized with" in str(err.value) and "tok_a" in str(err.value)
    assert _snapshot(corpus["prepared"]) == before
    assert isinstance(err.value, USER_ERRORS)


def test_used_run_directory_is_refused_and_kept(clean_env: pytest.MonkeyPatch, corpus: dict,
                                                tmp_path: Path) -> None:
    ckpt = tmp_path / "run" / "checkpoints" / "step_00000005"
    ckpt.mkdir(parents=True)
    (ckpt / "tessera.json").write_text(json.dumps({"step": 5, "model_args": {}}))
    (tmp_path / "run" / "checkpoints" / "latest").write_text("step_00000005")
    (tmp_path / "run" / "metrics.jsonl").write_text('{"step": 5, "loss": 3.0}\n')
    before = _snapshot(tmp_path / "run")
    with pytest.raises(ConfigError, match="already holds a run: pass --resume auto"):
        plan(parse_args(_files_args(corpus, tmp_path)))
    # resuming into a model that differs from the checkpoint's is refused too
    with pytest.raises(ConfigError, match="holds a different model"):
        plan(parse_args([*_files_args(corpus, tmp_path), "--resume", "auto"]))
    assert _snapshot(tmp_path / "run") == before


@pytest.mark.parametrize(
    "world, extra, fragment",
    [
        ("4", ["parallel.tp=4"], "parallel.tp=4 does not divide the model's 2 key/value heads"),
        ("3", ["parallel.tp=2"], "world size 3 is not divisible by parallel.tp=2 x parallel.pp=1"),
        ("2", ["parallel.tp=2", "parallel.sequence_parallel=true", "data.seq_len=33"],
         "data.seq_len=33 is not divisible by 2"),
        ("8", ["parallel.pp=8", "--ds_config", "zero1"],
         "parallel.pp=8 stages for a model of 4 blocks (model.n_layers)"),
        ("2", ["parallel.pp=2"], "parallel.pp=2 with a ZeRO-0 DeepSpeed config"),
        ("2", ["parallel.pp=2", "--ds_config", "zero2"], "parallel.pp=2 with a ZeRO-2 DeepSpeed config"),
    ],
)
def test_parallel_layout_errors_before_any_process_group(clean_env: pytest.MonkeyPatch, corpus: dict,
                                                         tmp_path: Path, world: str, extra: list[str],
                                                         fragment: str) -> None:
    _launch(clean_env, rank=1, world=int(world))  # any rank: every rank reaches the same verdict first
    from parallel.dims import ParallelConfigError

    with pytest.raises(ParallelConfigError) as err:
        plan(parse_args(_files_args(corpus, tmp_path, *extra)))
    assert fragment in str(err.value)
    assert isinstance(err.value, USER_ERRORS) and not (tmp_path / "run").exists()


def test_resume_of_a_zero0_pipeline_checkpoint_with_another_layout_is_refused(
        clean_env: pytest.MonkeyPatch, corpus: dict, tmp_path: Path) -> None:
    """A ZeRO-0 pipeline checkpoint (no per-rank optimizer partitions, per-stage files) keeps its tp and pp; other
    checkpoints are re-split."""
    ckpt = tmp_path / "run" / "checkpoints" / "step_00000005"
    ckpt.mkdir(parents=True)
    meta = {"step": 5, "model_args": {}, "world_size": 4, "config": {"parallel": {"tp": 2, "pp": 2}}}
    (ckpt / "tessera.json").write_text(json.dumps(meta))
    (tmp_path / "run" / "checkpoints" / "latest").write_text("step_00000005")
    before = _snapshot(tmp_path / "run")
    resume = [*_files_args(corpus, tmp_path), "--resume", "auto"]
    with pytest.raises(ConfigError, match=r"ZeRO-0 pipeline checkpoint of parallel.tp=2 parallel.pp=2; its "
                                          r"optimizer state cannot be re-split for tp=1, pp=1"):
        plan(parse_args(resume))
    assert _snapshot(tmp_path / "run") == before
