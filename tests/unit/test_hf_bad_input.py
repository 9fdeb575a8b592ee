"""Bad HF / LoRA / SFT input ends in one clear error from the planning step, before any weight is read."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from tests.conftest import SMOKE
from tests.hf_models import make_hf_model, make_tokenizer, write_sft
from train.config.fields import ConfigError
from train.config.load import load_config
from train.main import parse_args
from train.plan import USER_ERRORS, plan


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("hf_bad")
    make_hf_model(root, "llama")
    write_sft(root / "sft.jsonl", n=16)
    t5 = root / "t5"
    t5.mkdir()
    (t5 / "config.json").write_text('{"model_type": "t5", "d_model": 32}')
    return root


@pytest.fixture(autouse=True)
def no_launcher(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setitem(os.environ, "DS_ACCELERATOR", "cpu")


def _plan(root: Path, tmp_path: Path, *extra: str, ds: str = "cpu") -> None:
    argv = ["--config", str(SMOKE), "--ds_config", ds, f"hf.path={root / 'llama-2l'}", "data.corpus=sft",
            f"data.files=[{root / 'sft.jsonl'}]", "data.seq_len=32", "data.val_fraction=0.25",
            f"train.out_dir={tmp_path / 'run'}", *extra]
    plan(parse_args(argv))


@pytest.mark.parametrize(("extra", "message"), [
    ([], None),
    (["hf.path=/nonexistent/model"], r"hf.path=/nonexistent/model: no such directory"),
    (["lora.r=8", "lora.target_modules=[c_attn]"],
     (r"lora.target_modules=\['c_attn'\] match no linear layer; the blocks' linear layers are named: "
      r"down_proj, gate_proj, k_proj, o_proj, q_proj, up_proj, v_proj")),
    (["lora.r=8", "lora.layers='0-7'"], r"lora.layers: blocks \[2, 3, 4, 5, 6, 7\] do not exist"),
    (["lora.r=8", "lora.layers=first"], r"lora.layers='first': give block indices like '0-11'"),
    (["hf.quantization=4bit"], r"hf.quantization='4bit' with lora.r=0: quantized weights cannot be trained"),
    (["hf.dtype=bfloat16"], r"hf.dtype=bfloat16 but the DeepSpeed config trains in torch.float32"),
    (["model.n_layers=4"], r"model.n_layers is set together with hf.path"),
    (["lora.r=8", "parallel.tp=2"], r"adapters train with data parallelism and ZeRO only"),
    (["data.seq_len=512"], r"data.seq_len=512 is longer than hf.path=.* allows \(256 positions\)"),
    (["hf.quant_type=int4", "lora.r=8", "hf.quantization=4bit"],
     r"hf.quant_type='int4': use 'nf4' or 'fp4'. Did you mean 'nf4'\?"),
    (["data.corpus=files", "data.doc_mask=true"], r"data.doc_mask=true with hf.path"),
    (["data.doc_mask=true"], r"data.corpus='sft' pads each example \(no packing\): set data.doc_mask=false"),
    (["data.files=[/nonexistent/sft.jsonl]"], r"data.files: /nonexistent/sft.jsonl: does not exist"),
])
def test_each_mistake_is_one_clear_error_and_nothing_is_written(root: Path, tmp_path: Path, extra: list[str],
                                                               message: str | None) -> None:
    if message is None:
        _plan(root, tmp_path)  # the baseline plans cleanly
        return
    with pytest.raises(USER_ERRORS, match=message):
        _plan(root, tmp_path, *extra)
    assert not (tmp_path / "run").exists()


def test_not_a_causal_lm_and_8bit_under_zero3(root: Path, tmp_path: Path) -> None:
    with pytest.raises(USER_ERRORS, match=r"model_type='t5' is not a causal language model"):
        _plan(root, tmp_path, f"hf.path={root / 't5'}")
    with pytest.raises(USER_ERRORS, match=r"'8bit' under ZeRO-3: DeepSpeed cannot shard int8 weights"):
        _plan(root, tmp_path, "lora.r=8", "hf.quantization=8bit", ds="zero3")


def test_a_foreign_tokenizer_larger_than_the_embedding_is_refused(root: Path, tmp_path: Path) -> None:
    big = make_tokenizer(tmp_path / "big", vocab_size=400)
    with pytest.raises(USER_ERRORS, match=r"has \d+ tokens but hf.path=.* has 300 embedding rows"):
        _plan(root, tmp_path, f"data.tokenizer={big}")


def test_hf_options_without_a_model_and_sft_without_a_tokenizer() -> None:
    with pytest.raises(ConfigError, match=r"hf.quantization is set but hf.path is not"):
        load_config(str(SMOKE), ["hf.quantization=4bit"])
    with pytest.raises(ConfigError, match=r"data.corpus='sft' needs a tokenizer"):
        load_config(str(SMOKE), ["data.corpus=sft", "data.files=[a.jsonl]"])


def test_the_shipped_sft_recipe_plans_on_a_local_model(root: Path, tmp_path: Path) -> None:
    argv = ["--config", "train/configs/sft_lora.yaml", "--ds_config", "cpu", f"hf.path={root / 'llama-2l'}",
            f"data.files=[{root / 'sft.jsonl'}]", "data.seq_len=64", "data.val_fraction=0.25",
            "train.micro_batch_size=2", "train.global_batch_size=4", f"train.out_dir={tmp_path / 'run'}"]
    p = plan(parse_args(argv))
    assert p.hf is not None and len(p.hf.lora_targets) == 14 and p.model_args is None
    assert len(p.train_ds) + len(p.val_ds) == 16


def test_tensor_parallel_hf_models_need_a_plan_and_full_precision(root: Path, tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    for key, value in {"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "2",
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}.items():
        monkeypatch.setenv(key, value)  # planned as rank 0 of two (no process group is started)
    make_hf_model(root, "gpt2")
    _plan(root, tmp_path, "parallel.tp=2")  # llama: the native plan covers it
    with pytest.raises(USER_ERRORS,
                       match=r"model_type='gpt2' has no TP plan \(covered: llama, mistral, qwen2\)"):
        _plan(root, tmp_path, "parallel.tp=2", f"hf.path={root / 'gpt2-2l'}")
    with pytest.raises(USER_ERRORS, match=r"lora.r=4 with parallel.tp=2, parallel.pp=1: adapters train with "
                                          r"data parallelism and ZeRO only"):  # QLoRA never with TP
        _plan(root, tmp_path, "parallel.tp=2", "hf.quantization=4bit", "lora.r=4")
    with pytest.raises(USER_ERRORS, match=r"sequence parallelism covers Tessera models only"):
        _plan(root, tmp_path, "parallel.tp=2", "parallel.sequence_parallel=true")


def test_vocabulary_extension_mistakes(root: Path, tmp_path: Path) -> None:
    known = tmp_path / "known.txt"
    known.write_text("a\ne\n")  # single characters: tokens of every byte-level BPE
    new = tmp_path / "new.txt"
    new.write_text("zorblax\n")
    base = [f"data.cache_dir={tmp_path / 'cache'}", "train.weight_decay=0"]
    with pytest.raises(USER_ERRORS, match=r"vocab: .*already"):
        _plan(root, tmp_path, *base, f"vocab.lexicon={known}")
    with pytest.raises(USER_ERRORS, match=r"train.weight_decay=0.1 with vocab.lexicon: decoupled decay"):
        _plan(root, tmp_path, f"vocab.lexicon={new}", "train.weight_decay=0.1")
    with pytest.raises(USER_ERRORS, match=r"vocab.lexicon with lora.r=8"):
        _plan(root, tmp_path, *base, f"vocab.lexicon={new}", "lora.r=8")
    with pytest.raises(USER_ERRORS, match=r"vocab.lexicon under ZeRO-3"):
        _plan(root, tmp_path, *base, f"vocab.lexicon={new}", ds="zero3")
    with pytest.raises(USER_ERRORS, match=r"vocab.from_snapshot=/nope: not found"):
        _plan(root, tmp_path, *base, "vocab.from_snapshot=/nope")
    with pytest.raises(ConfigError, match=r"need hf.path"):
        load_config(str(SMOKE), [f"vocab.lexicon={new}"])
    p = plan(parse_args(["--config", str(SMOKE), "--ds_config", "cpu", f"hf.path={root / 'llama-2l'}", *base,
                         f"vocab.lexicon={new}", "data.corpus=sft", f"data.files=[{root / 'sft.jsonl'}]",
                         "data.seq_len=32", "data.val_fraction=0.25", f"train.out_dir={tmp_path / 'run'}"]))
    assert p.hf is not None and p.hf.vocab is not None and p.hf.vocab.ids == (300,)
    assert p.bundle.vocab_size == 301  # the data are tokenized with the extended tokenizer


def test_classification_labels_outside_the_classes(root: Path, tmp_path: Path) -> None:
    data = tmp_path / "three.jsonl"
    labels = ["a", "b", "c"]
    data.write_text("".join(f'{{"text": "item {i}", "label": "{labels[i % 3]}"}}\n' for i in range(24)))
    base = ["train.objective=classify", "data.corpus=classification", f"data.files=[{data}]"]
    with pytest.raises(USER_ERRORS, match=r"three.jsonl:3: label='c' is not one of \['a', 'b'\]"):
        _plan(root, tmp_path, *base, "data.labels=[a, b]")
    with pytest.raises(USER_ERRORS,
                       match=r"train.objective='reward' on data.corpus='classification' scores labels 0"):
        _plan(root, tmp_path, *base[1:], "train.objective=reward")
    with pytest.raises(USER_ERRORS, match=r"train.objective='classify' with data.corpus='preference'"):
        _plan(root, tmp_path, "train.objective=classify", "data.corpus=preference")
    p = plan(parse_args(["--config", str(SMOKE), "--ds_config", "cpu", f"hf.path={root / 'llama-2l'}", *base,
                         "data.seq_len=32", "data.val_fraction=0.25", f"train.out_dir={tmp_path / 'run'}"]))
    assert p.hf is not None and p.hf.head_labels == 3


def test_a_dpo_reference_of_another_architecture_is_refused(root: Path, tmp_path: Path) -> None:
    from tests.hf_models import write_preferences

    prefs = write_preferences(tmp_path / "pref.jsonl", n=16)
    other = make_hf_model(tmp_path / "other", "llama", layers=3)
    same = make_hf_model(tmp_path / "same", "llama", seed=1)
    dpo = ["train.objective=dpo", "data.corpus=preference", f"data.files=[{prefs}]", "data.seq_len=64"]
    with pytest.raises(USER_ERRORS,
                       match=r"dpo.reference_from=.*: num_hidden_layers=3 there but 2 in the policy"):
        _plan(root, tmp_path, *dpo, f"dpo.reference_from={other}")
    with pytest.raises(USER_ERRORS, match=r"model_type='t5' is not a causal language model"):
        _plan(root, tmp_path, *dpo, f"dpo.reference_from={root / 't5'}")
    with pytest.raises(USER_ERRORS, match=r"another model is a frozen copy; set dpo.reference='copy'"):
        _plan(root, tmp_path, *dpo, f"dpo.reference_from={same}", "lora.r=4")
    _plan(root, tmp_path, *dpo, f"dpo.reference_from={same}")  # same architecture, other weights: fine


@pytest.mark.parametrize(("patch", "message"), [
    ({"hidden_size": "big"}, r"Field 'hidden_size' expected int, got str \(value: 'big'\)"),
    ({"rms_norm_eps": [1]}, r"Field 'rms_norm_eps' expected float"),
    ({"num_attention_heads": 0}, r"ZeroDivisionError"),
    ("[1]", r"config.json holds a JSON list"),
    ('{"model_type": "llama",', r"config.json is not valid JSON"),
])
def test_a_config_json_of_wrong_types_is_one_model_error(root: Path, tmp_path: Path, patch: dict | str,
                                                         message: str) -> None:
    bad = tmp_path / "bad"
    shutil.copytree(root / "llama-2l", bad)
    config = bad / "config.json"
    if isinstance(patch, dict):
        patch = json.dumps({**json.loads(config.read_text()), **patch})
    config.write_text(patch)
    with pytest.raises(USER_ERRORS, match=rf"hf.path={bad}: .*{message}"):
        _plan(root, tmp_path, f"hf.path={bad}")
    with pytest.raises(ConfigError, match=rf"model.init_from={bad}: .*{message}"):
        load_config(SMOKE, [f"model.init_from={bad}", f"train.out_dir={tmp_path / 'run'}"])
    assert not (tmp_path / "run").exists()
