"""Recipe loading, overrides and DeepSpeed config resolution: every bad input is one clear error."""

from __future__ import annotations

import dataclasses
import json
import re
import types
import typing
from pathlib import Path

import pytest
import torch

from train.config.checks import check_batch_geometry
from train.config.deepspeed import DS_CONFIG_DIR, find_ds_config, load_ds_config, resolve_ds_config
from train.config.fields import ConfigError
from train.config.load import describe_fields, load_config
from train.config.schema import JobConfig

RECIPES = Path(__file__).resolve().parents[2] / "train" / "configs"


def test_shipped_recipes_load() -> None:
    for path in RECIPES.glob("*.yaml"):
        if path.name.startswith("stages"):  # chains of recipes: tests/unit/test_stages.py plans them
            continue
        cfg = load_config(path)
        assert isinstance(cfg, JobConfig)
        if cfg.hf.path is None:  # an HF model's length is checked against its config when planning
            assert cfg.data.seq_len <= cfg.model_args().max_seq_len


def test_overrides_are_typed_and_applied() -> None:
    cfg = load_config(RECIPES / "smoke.yaml", ["train.lr=1e-3", "model.n_layers=3", "data.files=[a.txt]",
                                               "data.corpus=files", "sample.top_k=null"])
    assert cfg.train.lr == pytest.approx(1e-3) and isinstance(cfg.train.lr, float)
    assert cfg.model_args().n_layers == 3
    assert cfg.data.files == ["a.txt"]
    assert cfg.sample.top_k is None


def test_command_line_overrides_go_before_and_after_the_flags() -> None:
    from train.main import parse_args

    args = parse_args(["--config", "a.yaml", "train.steps=30", "--ds_config", "zero3", "train.lr=1",
                       "--resume", "auto", "train.lr=2"])
    assert (args.config, args.ds_config, args.resume) == ("a.yaml", "zero3", "auto")
    assert args.overrides == ["train.steps=30", "train.lr=1", "train.lr=2"]  # in order: the last one wins
    cfg = load_config(RECIPES / "smoke.yaml", args.overrides)
    assert cfg.train.steps == 30 and cfg.train.lr == 2


@pytest.mark.parametrize(
    "override, fragment",
    [
        ("train.lrr=1e-3", "Did you mean 'train.lr'"),
        ("trian.lr=1e-3", "Did you mean 'train'"),
        ("model.n_layer=2", "Did you mean 'model.n_layers'"),
        ("train.steps=ten", "train.steps: expected an integer"),
        ("train.lr=fast", "train.lr: expected a number"),
        ("log.progress=maybe", "log.progress: expected true or false"),
        ("data.seq_len=100000", "longer than the model allows"),
        ("data.sampling=shuffled", "data.sampling='shuffled'"),
        ("train.min_lr=1", "train.min_lr=1.0 is above train.lr"),
        ("train.steps=-1", "train.steps=-1: must be >= 0"),  # 0: an evaluation-only run
        ("train.warmup_steps=99999", "train.warmup_steps=99999 exceeds"),
        ("log.wandb=cloud", "log.wandb='cloud'"),
        ("data.corpus=files", "data.files is empty"),
        ("trainlr", "section.key=value"),
    ],
)
def test_bad_recipe_values_name_the_key(override: str, fragment: str) -> None:
    with pytest.raises(ConfigError, match=None) as err:
        load_config(RECIPES / "smoke.yaml", [override])
    assert fragment in str(err.value), str(err.value)


def test_impossible_model_shape_is_a_config_error() -> None:
    with pytest.raises(ConfigError) as err:
        load_config(RECIPES / "smoke.yaml", ["model.n_heads=3"])
    assert "model" in str(err.value) and "n_heads" in str(err.value)


def test_missing_recipe_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no such file"):
        load_config(tmp_path / "nope.yaml")


def test_batch_geometry() -> None:
    cfg = load_config(RECIPES / "smoke.yaml", ["train.global_batch_size=16", "train.micro_batch_size=4"])
    assert check_batch_geometry(cfg.train, 1) == 4
    assert check_batch_geometry(cfg.train, 2) == 2
    assert check_batch_geometry(cfg.train, 4) == 1
    with pytest.raises(ConfigError) as err:
        check_batch_geometry(cfg.train, 3)
    msg = str(err.value)
    assert "train.global_batch_size=16" in msg and "train.micro_batch_size=4" in msg and "size=3" in msg


def test_every_key_is_documented() -> None:
    text = describe_fields()
    for key in ("seq_len", "global_batch_size", "wandb", "temperature", "tp", "preset", "n_kv_heads",
                "rope_theta"):
        assert key in text
    assert "#" in text


# ----------------------------------------------------------------------------- DeepSpeed configs


def test_all_shipped_ds_configs_resolve() -> None:
    cfg = load_config(RECIPES / "smoke.yaml")
    names = sorted(p.stem for p in DS_CONFIG_DIR.glob("*.json"))
    shipped = {"cpu", "zero0", "zero1", "zero2", "zero3", "zero3_offload", "rtx3060", "rtx4090", "h100"}
    assert shipped <= set(names)
    for name in names:
        ds = resolve_ds_config(load_ds_config(name), cfg, dp_size=2, bf16_supported=True)
        assert ds["train_batch_size"] == 8
        assert ds["train_micro_batch_size_per_gpu"] == 4
        assert ds["gradient_accumulation_steps"] == 1
        assert ds["gradient_clipping"] == cfg.train.grad_clip
        assert "auto" not in json.dumps(ds)


def test_auto_precision_follows_the_device() -> None:
    cfg = load_config(RECIPES / "smoke.yaml")
    cpu = resolve_ds_config(load_ds_config("zero3"), cfg, dp_size=1, bf16_supported=False)
    gpu = resolve_ds_config(load_ds_config("zero3"), cfg, dp_size=1, bf16_supported=True)
    assert cpu["bf16"]["enabled"] is False and gpu["bf16"]["enabled"] is True
    with pytest.raises(ConfigError, match="bf16"):
        resolve_ds_config(load_ds_config("rtx4090"), cfg, dp_size=1, bf16_supported=False)


def test_explicit_ds_values_must_agree_with_the_recipe() -> None:
    cfg = load_config(RECIPES / "smoke.yaml")
    ds = {**load_ds_config("cpu"), "train_micro_batch_size_per_gpu": 2}
    with pytest.raises(ConfigError) as err:
        resolve_ds_config(ds, cfg, dp_size=1, bf16_supported=False)
    assert "train_micro_batch_size_per_gpu=2" in str(err.value) and "train.micro_batch_size" in str(err.value)
    agreeing = {**load_ds_config("cpu"), "train_micro_batch_size_per_gpu": 4}
    resolved = resolve_ds_config(agreeing, cfg, dp_size=1, bf16_supported=False)
    assert resolved["gradient_accumulation_steps"] == 2


def test_offload_optimizer_gets_recipe_hyperparameters() -> None:
    cfg = load_config(RECIPES / "smoke.yaml", ["train.lr=5e-4"])
    ds = resolve_ds_config(load_ds_config("zero3_offload"), cfg, dp_size=1, bf16_supported=True)
    params = ds["optimizer"]["params"]
    assert params["lr"] == pytest.approx(5e-4)
    assert params["betas"] == [cfg.train.beta1, cfg.train.beta2]


def test_ds_scheduler_section_is_refused() -> None:
    cfg = load_config(RECIPES / "smoke.yaml")
    ds = {**load_ds_config("cpu"), "scheduler": {"type": "WarmupLR"}}
    with pytest.raises(ConfigError, match="scheduler"):
        resolve_ds_config(ds, cfg, dp_size=1, bf16_supported=False)


def test_ds_config_lookup(tmp_path: Path) -> None:
    assert find_ds_config("zero3") == DS_CONFIG_DIR / "zero3.json"
    assert find_ds_config("ds_configs/zero2.json").name == "zero2.json"
    with pytest.raises(ConfigError, match="zero3"):
        find_ds_config("zero9")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_ds_config(str(bad))


def test_init_from_reads_the_pretrained_shape(tmp_path: Path) -> None:
    from transformers import LlamaConfig

    LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=600, max_position_embeddings=512).save_pretrained(tmp_path)
    cfg = load_config(RECIPES / "smoke.yaml", [f"model.init_from={tmp_path}", "model.max_seq_len=128"])
    args = cfg.model_args(vocab_size=512)
    assert (args.dim, args.n_layers, args.kv_heads, args.ffn_dim) == (64, 2, 2, 128)
    assert args.vocab_size == 600 and args.max_seq_len == 128  # the weights keep their vocabulary
    with pytest.raises(ConfigError, match="model.dim cannot be changed for model.init_from"):
        load_config(RECIPES / "smoke.yaml", [f"model.init_from={tmp_path}", "model.dim=128"])
    with pytest.raises(ConfigError, match="model.init_from="):
        load_config(RECIPES / "smoke.yaml", [f"model.init_from={tmp_path / 'missing'}"])


# ----------------------------------------------------------------------------- choice fields and sections


def _sections() -> dict[str, type]:
    from train.config.load import _SECTIONS
    from train.config.schema import ModelSection

    return {"model": ModelSection, **_SECTIONS}


def _choices(tp: object) -> tuple[object, ...] | None:
    """The choices of a Literal annotation, also inside ``X | None``; None for any other annotation."""
    if typing.get_origin(tp) is typing.Literal:
        return typing.get_args(tp)
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        for arg in typing.get_args(tp):
            if typing.get_origin(arg) is typing.Literal:
                return typing.get_args(arg)
    return None


@pytest.mark.parametrize(
    "override, message",
    [
        ("data.sampling=rndom", "data.sampling='rndom': use 'blocks' or 'random'. Did you mean 'random'?"),
        ("train.objective=dop", ("train.objective='dop': use 'lm', 'dpo', 'reward', 'classify' or 'seq2seq'. "
                                 "Did you mean 'dpo'?")),
        ("perf.activation_checkpointing=ful", ("perf.activation_checkpointing='ful': use 'none', 'full' or "
                                               "'selective'. Did you mean 'full'?")),
        ("hf.dtype=bf16", ("hf.dtype='bf16': use 'auto', 'float32', 'bfloat16' or 'float16'. Did you mean "
                           "'bfloat16'?")),
        ("lora.bias=every", "lora.bias='every': use 'none', 'lora_only' or 'all'."),
        ("log.wandb=7", "log.wandb=7: use 'offline', 'online' or 'disabled'."),
    ],
)
def test_a_value_outside_a_literal_names_the_key_the_choices_and_the_closest(override: str,
                                                                           message: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(RECIPES / "smoke.yaml", [override])
    assert str(err.value) == message


def test_a_term_schedule_is_one_of_the_schedules() -> None:
    with pytest.raises(ConfigError) as err:
        load_config(RECIPES / "smoke.yaml", ["research.recipe=injection",
                                             "research.terms={kl: {schedule: cosin}}"])
    assert str(err.value) == ("research.terms.kl.schedule='cosin': use 'constant', 'linear', 'cosine' or "
                              "'warmup'. Did you mean 'cosine'?")


def test_every_choice_field_is_a_literal_with_its_default_among_the_choices() -> None:
    open_ended = {"research.recipe", "lora.layers"}  # examples in the help, not a closed set
    literals = 0
    for section, cls in _sections().items():
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            key, tp = f"{section}.{f.name}", hints[f.name]
            choices = _choices(tp)
            if choices is not None:
                literals += 1
                assert f.default in choices, f"{key}: default {f.default!r} is not one of {choices}"
                continue
            quoted = re.findall(r"'([^'\s]+)'", f.metadata["help"])
            if tp in (str, str | None) and len(quoted) >= 2 and key not in open_ended:
                raise AssertionError(f"{key} lists choices {quoted} in its help but is annotated {tp}: "
                                     f"make it a Literal")
    assert literals >= 15


def test_choice_lists_are_defined_once_at_their_owner() -> None:
    from model.hf_causal import DTYPES
    from parallel.perf import AC_MODES
    from parallel.pipeline import PARTITION_METHODS
    from train.config.finetune import HFSection
    from train.config.research import SCHEDULES
    from train.config.schema import ParallelSection, PerfSection

    assert _choices(typing.get_type_hints(PerfSection)["activation_checkpointing"]) == AC_MODES
    assert _choices(typing.get_type_hints(ParallelSection)["partition_method"]) == PARTITION_METHODS
    hf = typing.get_type_hints(HFSection)
    assert _choices(hf["dtype"]) == _choices(hf["compute_dtype"]) == ("auto", *DTYPES)
    assert _choices(hf["quant_storage"]) == ("auto", "uint8", *DTYPES)
    assert tuple(DTYPES) == ("float32", "bfloat16", "float16")
    assert all(isinstance(v, torch.dtype) for v in DTYPES.values())
    assert SCHEDULES == ("constant", "linear", "cosine", "warmup")


def test_help_config_shows_the_choices() -> None:
    text = describe_fields()
    assert "sampling: 'blocks' | 'random' = 'random'" in text
    assert "activation_checkpointing: 'none' | 'full' | 'selective' = 'none'" in text
    assert "top_k: int | None = 50" in text


def test_every_section_validates_its_own_fields() -> None:
    from train.config.finetune import DPOSection, LoraSection, VocabSection
    from train.config.schema import DataSection, ParallelSection, SampleSection, TrainSection

    for section in _sections().values():
        section().validate()  # the defaults are valid
    cases = [
        (TrainSection(steps=-1), "train.steps=-1: must be >= 0"),
        (TrainSection(min_lr=1.0), "train.min_lr=1.0 is above train.lr"),
        (DataSection(val_fraction=1.0), "data.val_fraction=1.0: must be between 0 and 1"),
        (DataSection(corpus="prepared"), "data.corpus='prepared' but data.blend is empty"),
        (ParallelSection(tp=0), "parallel.tp=0: must be > 0"),
        (SampleSection(temperature=-1.0), "sample.temperature=-1.0: must be >= 0"),
        (LoraSection(r=4, dropout=1.0), "lora.dropout=1.0: must be in [0, 1)"),
        (DPOSection(label_smoothing=0.5), "dpo.label_smoothing=0.5: must be in [0, 0.5)"),
        (VocabSection(init_scale=0.0), "vocab.init_scale=0.0: must be > 0"),
    ]
    for section, message in cases:
        with pytest.raises(ConfigError) as err:
            section.validate()
        assert message in str(err.value), str(err.value)


def test_checks_across_sections_name_both_keys() -> None:
    with pytest.raises(ConfigError) as err:
        load_config(RECIPES / "smoke.yaml", ["perf.activation_checkpointing=full",
                                             "parallel.activation_checkpoint_interval=1"])
    assert "perf.activation_checkpointing='full'" in str(err.value)
    assert "parallel.activation_checkpoint_interval=1" in str(err.value)


# ----------------------------------------------------------------------------- bad values and files


def test_misspelled_ds_keys_are_refused_with_the_closest_key(tmp_path: Path) -> None:
    from train.config.ds_schema import ds_schema

    cases = {
        "top": ({"zero_optimizationn": {"stage": 3}}, "unknown key 'zero_optimizationn'. Did you mean "
                                                      "'zero_optimization'?"),
        "zero": ({"zero_optimization": {"stage": 3, "stage3_param_persistance_threshold": 0}},
                 "Did you mean 'zero_optimization.stage3_param_persistence_threshold'?"),
        "offload": ({"zero_optimization": {"stage": 3, "offload_param": {"devic": "cpu"}}},
                    "Did you mean 'zero_optimization.offload_param.device'?"),
        "optimizer": ({"optimizer": {"typ": "AdamW"}}, "Did you mean 'optimizer.type'?"),
        "section": ({"bf16": True}, "'bf16' is True; write a JSON object"),
        "flag": ({"wall_clock_breakdown": "no"}, "DeepSpeed expects true or false"),
    }
    for name, (raw, message) in cases.items():
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps(raw))
        with pytest.raises(ConfigError) as err:
            load_ds_config(str(path))
        assert str(err.value).startswith(f"--ds_config {path}: "), str(err.value)
        assert message in str(err.value), str(err.value)
    # the lists come from DeepSpeed: its aliases, nested models and pipeline defaults are known
    keys = ds_schema().keys
    zero = keys["zero_optimization"]
    assert {"stage", "stage3_param_persistence_threshold", "param_persistence_threshold"} <= zero
    assert "pin_memory" in keys["zero_optimization.offload_optimizer"] and "stages" in keys["pipeline"]
    assert {"bf16", "fp16", "gradient_clipping", "steps_per_print"} <= keys[""]


def test_ds_values_are_checked_by_deepspeeds_models() -> None:
    cfg = load_config(RECIPES / "smoke.yaml")
    zero = {**load_ds_config("zero3"), "zero_optimization": {"stage": 3, "reduce_bucket_size": "big"}}
    with pytest.raises(ConfigError,
                       match=r"zero_optimization.reduce_bucket_size='big': Input should be a valid integer"):
        resolve_ds_config(zero, cfg, dp_size=1, bf16_supported=False)


@pytest.mark.parametrize("text", [".nan", ".inf", "-.inf", "nan", "-Infinity", "1e999"])
def test_non_finite_numbers_are_refused(text: str) -> None:
    with pytest.raises(ConfigError, match=r"train.lr=.*: not a finite number"):
        load_config(RECIPES / "smoke.yaml", [f"train.lr={text}"])
    with pytest.raises(ConfigError, match=r"sample.top_p=.*: not a finite number"):
        load_config(RECIPES / "smoke.yaml", [f"sample.top_p={text}"])


@pytest.mark.parametrize(("text", "message"), [
    ("- a\n- b\n", "holds a YAML list, not a recipe"),
    ("42\n", "holds a YAML int, not a recipe"),
    ("train: {lr: 1\n", "not valid YAML (expected ',' or '}'"),
    ("[" * 3000 + "]" * 3000, "nested too deeply"),
])
def test_a_recipe_that_is_no_mapping_is_one_line(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_config(path, ["train.lr=1e-3"])
    assert message in str(err.value) and "\n" not in str(err.value)


def test_online_wandb_needs_a_key(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for key in ("WANDB_API_KEY", "WANDB_IDENTITY_TOKEN_FILE", "WANDB_BASE_URL"):
        monkeypatch.delenv(key, raising=False)
    netrc = tmp_path / "netrc"
    monkeypatch.setenv("NETRC", str(netrc))
    with pytest.raises(ConfigError, match=r"log.wandb='online' but wandb has no API key .* or set "
                                          r"log.wandb=offline"):
        load_config(RECIPES / "smoke.yaml", ["log.wandb=online"])
    netrc.write_text("machine example.org login user password secret\n")
    with pytest.raises(ConfigError, match="no entry for api.wandb.ai"):
        load_config(RECIPES / "smoke.yaml", ["log.wandb=online"])
    netrc.write_text("machine api.wandb.ai login user password 0123456789abcdef\n")
    assert load_config(RECIPES / "smoke.yaml", ["log.wandb=online"]).log.wandb == "online"
    netrc.unlink()
    monkeypatch.setenv("WANDB_API_KEY", "0123456789abcdef")
    assert load_config(RECIPES / "smoke.yaml", ["log.wandb=online"]).log.wandb == "online"
