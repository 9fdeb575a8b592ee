"""Recipe loading, overrides and DeepSpeed config resolution: every bad input is one clear error."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

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
        ("train.lrr=1e-3", "Did you mean 'lr'"),
        ("trian.lr=1e-3", "Did you mean 'train'"),
        ("model.n_layer=2", "Did you mean 'n_layers'"),
        ("train.steps=ten", "train.steps: expected an integer"),
        ("train.lr=fast", "train.lr: expected a number"),
        ("log.progress=maybe", "log.progress: expected true or false"),
        ("data.seq_len=100000", "longer than the model allows"),
        ("data.sampling=shuffled", "data.sampling='shuffled'"),
        ("train.min_lr=1", "train.min_lr=1.0 is above train.lr"),
        ("train.steps=0", "train.steps=0: must be > 0"),
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
    assert check_batch_geometry(cfg, 1) == 4
    assert check_batch_geometry(cfg, 2) == 2
    assert check_batch_geometry(cfg, 4) == 1
    with pytest.raises(ConfigError) as err:
        check_batch_geometry(cfg, 3)
    msg = str(err.value)
    assert "train.global_batch_size=16" in msg and "train.micro_batch_size=4" in msg and "size=3" in msg


def test_every_key_is_documented() -> None:
    text = describe_fields()
    for key in ("seq_len", "global_batch_size", "wandb", "temperature", "tp", "preset", "n_kv_heads", "rope_theta"):
        assert key in text
    assert "#" in text


# ----------------------------------------------------------------------------- DeepSpeed configs


def test_all_shipped_ds_configs_resolve() -> None:
    cfg = load_config(RECIPES / "smoke.yaml")
    names = sorted(p.stem for p in DS_CONFIG_DIR.glob("*.json"))
    assert {"cpu", "zero0", "zero1", "zero2", "zero3", "zero3_offload", "rtx3060", "rtx4090", "h100"} <= set(names)
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
    assert resolve_ds_config(agreeing, cfg, dp_size=1, bf16_supported=False)["gradient_accumulation_steps"] == 2


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
