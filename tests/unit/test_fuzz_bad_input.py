"""Generated bad input, each case through the real entry point in-process (``train.main.main``): one line on
stderr starting ``tessera: error:``, no traceback, exit code 2, and nothing written in the run directory or
among the case's input files.

The cases are built from the recipe's own dataclasses (a wrong type at every field of every section, a
misspelled key in every section, a bad value for every choice, NaN and infinities at every number), DeepSpeed
configs derived from the shipped ones, broken tokenizer files, HF ``config.json`` files, checkpoint metadata
and launcher variables, plus hand-picked edge cases. A seeded generator picks among the wrong values, so a run
is reproducible (``FUZZ_SEED`` changes the seed).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import random
import re
import shutil
import types
import typing
from pathlib import Path
from typing import Any

import pytest
import yaml

import train.main
from model import ModelArgs
from tests.conftest import REPO, SMOKE
from tests.hf_models import make_hf_model, make_tokenizer
from train.config.load import _SECTIONS
from train.config.schema import ModelSection

SEED = int(os.environ.get("FUZZ_SEED", "20261207"))
RNG = random.Random(SEED)
# Values of every kind YAML can write; a field's wrong values are those its annotation does not take.
POOL: list[Any] = ["abc", "", 1.5, 7, -3, True, None, [1, 2], [], {"k": 1}, [[1]], [{"k": "v"}]]


@dataclasses.dataclass(frozen=True)
class Case:
    """One bad input. Strings may hold ``{in}`` (this case's input directory) and ``{fx}`` (shared files)."""

    id: str
    overrides: tuple[str, ...] = ()
    recipe: Any = None  # a dict merged into the base recipe, or raw str / bytes written as the recipe file
    ds: Any = None  # a dict, str or bytes written as the --ds_config file
    files: tuple[tuple[str, Any], ...] = ()  # (path under {in}, str / bytes / dict as JSON / 'hf:' copy)
    env: tuple[tuple[str, str], ...] = ()  # launcher variables
    args: tuple[str, ...] = ()  # more command-line arguments (e.g. --resume)


# ------------------------------------------------------------------------------------------- the recipe


def _accepts(tp: Any, v: Any) -> bool:
    """What the recipe loader takes for an annotation (train/config/load.py ``_coerce``), written again."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is typing.Literal:
        return (v in args and not isinstance(v, bool)) or (isinstance(v, (int, float)) and str(v) in args)
    if origin in (typing.Union, types.UnionType):
        return any(_accepts(a, v) for a in args)
    if tp is type(None):
        return v is None
    if origin is list:
        return all(_accepts(args[0], x) for x in (v if isinstance(v, list) else [v]))
    if origin is dict or tp is dict:
        return isinstance(v, dict)
    if tp is bool:
        return isinstance(v, bool)
    if tp is int:
        return isinstance(v, int) and not isinstance(v, bool)
    if tp is float:
        return isinstance(v, (int, float)) and not isinstance(v, bool)
    if tp is str:
        return isinstance(v, (str, int, float)) and not isinstance(v, bool)
    raise AssertionError(f"no rule for {tp!r}")


def _fields() -> list[tuple[str, str, Any]]:
    """(section, key, annotation) of every recipe key: the model section (preset, init_from and the ModelArgs
    fields) and every dataclass section of train/config."""
    hints = typing.get_type_hints(ModelSection)
    out = [("model", name, hints[name]) for name in ("preset", "init_from")]
    hints = typing.get_type_hints(ModelArgs)
    out += [("model", f.name, hints[f.name]) for f in dataclasses.fields(ModelArgs)]
    for section, cls in _SECTIONS.items():
        hints = typing.get_type_hints(cls)
        out += [(section, f.name, hints[f.name]) for f in dataclasses.fields(cls)]
    return out


def _floats(tp: Any) -> bool:
    return tp is float or float in typing.get_args(tp)


def _mutate(name: str, taken: set[str]) -> str:
    """A misspelling of ``name`` that is no key of ``taken``."""
    while True:
        i = RNG.randrange(len(name))
        op = RNG.choice(("drop", "double", "swap", "add"))
        if op == "drop" and len(name) > 2:
            out = name[:i] + name[i + 1:]
        elif op == "double":
            out = name[:i] + name[i] + name[i:]
        elif op == "swap" and i + 1 < len(name):
            out = name[:i] + name[i + 1] + name[i] + name[i + 2:]
        else:
            out = name + RNG.choice("sxe")
        if out not in taken and out != name:
            return out


def recipe_cases() -> list[Case]:
    cases = []
    fields = _fields()
    for section, key, tp in fields:  # a wrong type at every field (two, picked by the seed)
        wrong = [v for v in POOL if not _accepts(tp, v)]
        for v in RNG.sample(wrong, min(2, len(wrong))):
            cases.append(Case(f"type-{section}.{key}-{POOL.index(v)}{type(v).__name__}",
                              recipe={section: {key: v}}))
        if typing.get_origin(tp) is typing.Literal or any(typing.get_origin(a) is typing.Literal
                                                          for a in typing.get_args(tp)):
            choices = [c for a in (tp, *typing.get_args(tp)) if typing.get_origin(a) is typing.Literal
                       for c in typing.get_args(a)]
            bad = _mutate(str(RNG.choice(choices)), {str(c) for c in choices})
            cases.append(Case(f"choice-{section}.{key}", overrides=(f"{section}.{key}={bad}",)))
        if _floats(tp):  # NaN and the infinities at every number
            text = RNG.choice((".nan", ".inf", "-.inf", "nan", "inf", "-Infinity", "1e999"))
            cases.append(Case(f"nonfinite-{section}.{key}", overrides=(f"{section}.{key}={text}",)))
    for text in (".nan", ".NaN", ".inf", "-.inf", "nan", "inf", "-inf", "Infinity", "1e400"):
        cases.append(Case(f"nonfinite-train.lr-{text}", overrides=(f"train.lr={text}",)))
    cases.append(Case("nonfinite-blend-weight", recipe={"data": {"corpus": "prepared", "blend": [
        {"path": "{in}", "weight": float("nan")}]}}))
    cases.append(Case("nonfinite-research-group-lr", recipe={"research": {"recipe": "injection", "groups": [
        {"params": "*", "lr": float("inf")}]}}))
    by_section: dict[str, set[str]] = {}
    for section, key, _ in fields:
        by_section.setdefault(section, set()).add(key)
    for section, keys in sorted(by_section.items()):  # a misspelled key in every section
        for key in RNG.sample(sorted(keys), 2):
            typo = _mutate(key, keys)
            cases.append(Case(f"unknown-{section}.{typo}", overrides=(f"{section}.{typo}=1",)))
        typo = _mutate(section, set(by_section))
        cases.append(Case(f"unknown-section-{typo}", recipe={typo: {"x": 1}}))
    cases += [
        Case("override-no-equals", overrides=("train.lr",)),
        Case("override-three-parts", overrides=("train.lr.x=1",)),
        Case("override-bad-yaml", overrides=("train.lr=[1,",)),
        Case("override-section-not-mapping", recipe={"train": [1, 2]}),
        Case("section-scalar", recipe={"log": 5}),
        Case("key-not-a-string", recipe={"train": {1: 2}}),
        Case("model-not-mapping", recipe={"model": "tiny"}),
        Case("preset-unknown", overrides=("model.preset=huge-99b",)),
    ]
    return cases


def yaml_cases() -> list[Case]:
    cases = [
        Case("yaml-list", recipe="- a\n- b\n"),
        Case("yaml-int", recipe="42\n"),
        Case("yaml-string", recipe="just some words\n"),
        Case("yaml-false", recipe="false\n"),
        Case("yaml-zero", recipe="0\n"),
        Case("yaml-unclosed", recipe="train: {lr: 1\n"),
        Case("yaml-tab", recipe="train:\n\tlr: 1\n"),
        Case("yaml-bad-indent", recipe="train:\n  lr: 1\n bad: 2\n"),
        Case("yaml-nul", recipe="train:\n  lr: \x00\n"),
        Case("yaml-not-utf8", recipe=b"train:\n  lr: \xff\xfe\n"),
        Case("yaml-deep-list", recipe="[" * 5000 + "]" * 5000),
        Case("yaml-deep-map", recipe="".join("  " * i + "a:\n" for i in range(300)) + "  " * 300 + "b\n"),
        Case("yaml-unhashable-key", recipe="? [a, b]\n: 1\n"),
    ]
    alphabet = "ab:-[]{},#&*!|>'\"%@` \n\t0.9"
    while len([c for c in cases if c.id.startswith("yaml-random")]) < 12:  # random text that is no recipe
        text = "".join(RNG.choice(alphabet) for _ in range(RNG.randrange(1, 40)))
        try:
            parsed = yaml.safe_load(text)
        except yaml.YAMLError:
            parsed = "error"
        if parsed is not None and not isinstance(parsed, dict):
            cases.append(Case(f"yaml-random-{len(cases)}", recipe=text))
    return cases


# ------------------------------------------------------------------------------------- DeepSpeed configs


def _shipped_ds() -> dict[str, Any]:
    shipped = json.loads((REPO / "ds_configs" / "zero3_offload.json").read_text())
    return {k: v for k, v in shipped.items() if not k.startswith("_")}


def ds_cases() -> list[Case]:
    base = _shipped_ds()
    cases = [Case("ds-misspelled-zero", ds={**base, "zero_optimizationn": {"stage": 3}})]
    for key in sorted(base):  # a misspelled top-level key, and one inside each section
        cases.append(Case(f"ds-unknown-{key}", ds={**{k: v for k, v in base.items() if k != key},
                                                   _mutate(key, set(base)): base[key]}))
        if isinstance(base[key], dict):
            inner = base[key]
            sub = RNG.choice(sorted(inner))
            broken = {**{k: v for k, v in inner.items() if k != sub}, _mutate(sub, set(inner)): inner[sub]}
            cases.append(Case(f"ds-unknown-{key}.{sub}", ds={**base, key: broken}))
            bad = RNG.choice((True, 3, "x", [1]))
            cases.append(Case(f"ds-section-{key}-{type(bad).__name__}", ds={**base, key: bad}))
    z = base["zero_optimization"]
    for name, section in [("stage-word", {**z, "stage": "three"}), ("stage-7", {**z, "stage": 7}),
                          ("bucket-word", {**z, "overlap_comm": "maybe"}),
                          ("offload-device", {**z, "offload_param": {"device": "gpu"}}),
                          ("offload-typo", {**z, "offload_optimizer": {"device": "cpu", "pin_memroy": True}}),
                          ("threshold-list", {**z, "stage3_param_persistence_threshold": [1]})]:
        cases.append(Case(f"ds-zero-{name}", ds={**base, "zero_optimization": section}))
    cases += [
        Case("ds-scheduler", ds={**base, "scheduler": {"type": "WarmupLR"}}),
        Case("ds-optimizer-params-list", ds={**base, "optimizer": {"type": "AdamW", "params": [1]}}),
        Case("ds-bool-for-flag", ds={**base, "wall_clock_breakdown": "yes"}),
        Case("ds-clip-word", ds={**base, "gradient_clipping": "big"}),
        Case("ds-removed-elasticity", ds={**base, "elasticity": {"enabled": True}}),
        Case("ds-pipeline-typo", ds={**base, "pipeline": {"stage": 2}}),
        Case("ds-activation-typo", ds={**base, "activation_checkpointing": {"partition_activation": True}}),
        Case("ds-json-list", ds="[1, 2]"), Case("ds-json-string", ds='"zero3"'),
        Case("ds-json-null", ds="null"), Case("ds-json-number", ds="3"), Case("ds-empty", ds=""),
        Case("ds-truncated", ds='{"zero_optimization":'), Case("ds-nan", ds='{"gradient_clipping": NaN}'),
        Case("ds-infinity", ds='{"gradient_clipping": Infinity}'),
        Case("ds-single-quotes", ds="{'zero_optimization': {'stage': 1}}"),
        Case("ds-trailing-comma", ds='{"steps_per_print": 10,}'), Case("ds-binary", ds=b"\x80\x81\xfe{"),
        Case("ds-missing", args=("--ds_config", "{in}/nope.json")),
    ]
    return cases


# ------------------------------------------------------------- tokenizers, HF configs, checkpoints, launchers


def tokenizer_cases() -> list[Case]:
    texts = {"empty": "", "truncated": '{"version": "1.0", "model": {', "list": "[]", "null": "null",
             "object": "{}", "wrong-model": '{"model": 3}', "binary": b"\x00\x01\xff\xfe",
             "random": "".join(RNG.choice("{}[]:,\"ab01 ") for _ in range(60))}
    cases = [Case(f"tokenizer-{name}", files=(("tok/tokenizer.json", text),),
                  overrides=("data.tokenizer={in}/tok",)) for name, text in texts.items()]
    good = ("tok/tokenizer.json", "copy:{fx}/tokenizer/tokenizer.json")
    for name, text in (("garbage", "{not json"), ("list", "[1]"), ("binary", b"\xff")):
        cases.append(Case(f"tokenizer-config-{name}", files=(good, ("tok/tokenizer_config.json", text)),
                          overrides=("data.tokenizer={in}/tok",)))
    cases.append(Case("tokenizer-missing", files=(("tok/readme.txt", "no tokenizer here"),),
                      overrides=("data.tokenizer={in}/tok",)))
    return cases


HF_WRONG = {"hidden_size": "big", "num_hidden_layers": "x", "num_attention_heads": 0, "vocab_size": [1],
            "intermediate_size": {"k": 1}, "max_position_embeddings": "long", "rms_norm_eps": "tiny",
            "num_key_value_heads": 1.5, "rope_parameters": "x", "initializer_range": [0.02]}


def hf_cases() -> list[Case]:
    cases = []
    for key in ("model.init_from", "hf.path"):
        name = key.split(".")[0]
        for field, value in HF_WRONG.items():
            cases.append(Case(f"hfconfig-{name}-{field}", files=(("hf", {field: value}),),
                              overrides=(f"{key}={{in}}/hf",)))
        for what, text in (("not-json", '{"model_type": "llama",'), ("list", "[1]"), ("empty", ""),
                           ("model-type-number", '{"model_type": 7}'), ("no-model-type", "{}")):
            cases.append(Case(f"hfconfig-{name}-{what}", files=(("hf", text),),
                              overrides=(f"{key}={{in}}/hf",)))
    return cases


def checkpoint_cases() -> list[Case]:
    metas = {"not-json": "{", "empty": "", "list": "[]", "step-word": {"step": "x", "model_args": {}},
             "model-args-word": {"step": 5, "model_args": "x"},
             "model-args-typed": {"model_args": {"dim": "big"}},
             "config-list": {"step": 5, "config": []}, "tp-word": {"config": {"parallel": {"tp": "x"}}},
             "tokenizer-list": {"step": 5, "model_args": {}, "tokenizer": []}, "binary": b"\xff\x00"}
    cases = [Case(f"ckpt-resume-path-{name}", files=(("ckpt/step_00000005/tessera.json", meta),),
                  args=("--resume", "{in}/ckpt/step_00000005")) for name, meta in metas.items()]
    for name in ("not-json", "list", "step-word"):
        cases.append(Case(f"ckpt-resume-auto-{name}", args=("--resume", "auto"), files=(
            ("run/checkpoints/step_00000005/tessera.json", metas[name]),
            ("run/checkpoints/latest", "step_00000005"))))
    return cases


def launcher_cases() -> list[Case]:
    """A two-process launch of rank 0 with one variable broken: not a number, empty, negative, out of range or
    missing (rank 0 is the rank that prints)."""
    good = {"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "2",
            "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}
    broken: dict[str, dict[str, str | None]] = {
        "RANK": {"word": "x", "empty": "", "negative": "-1", "equal-world": "2", "float": "0.5"},
        "WORLD_SIZE": {"word": "two", "empty": "", "zero": "0", "negative": "-2", "missing": None},
        "LOCAL_RANK": {"word": "a", "negative": "-1", "equal-local-world": "2"},
        "LOCAL_WORLD_SIZE": {"zero": "0", "above-world": "3", "word": "x"},
        "MASTER_ADDR": {"empty": "", "missing": None},
        "MASTER_PORT": {"word": "abc", "too-big": "70000", "zero": "0", "negative": "-5", "missing": None},
    }
    cases = []
    for var, values in broken.items():
        for name, value in values.items():
            env = {**good, var: value}
            kept = tuple((k, v) for k, v in env.items() if v is not None)
            cases.append(Case(f"launch-{var}-{name}", env=kept))
    return cases


CASES = [*recipe_cases(), *yaml_cases(), *ds_cases(), *tokenizer_cases(), *hf_cases(), *checkpoint_cases(),
         *launcher_cases()]
assert len({c.id for c in CASES}) == len(CASES), "case ids must be unique"
LAUNCHER_KEYS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "LOCAL_SIZE", "MASTER_ADDR",
                 "MASTER_PORT")


# ----------------------------------------------------------------------------------------------- running


@pytest.fixture(scope="module")
def fx(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Shared good inputs: two documents, a tokenizer, a tiny HF Llama, a data cache."""
    root = tmp_path_factory.mktemp("fuzz")
    make_tokenizer(root)  # root/tokenizer, trained on root/corpus.txt
    make_hf_model(root, "llama")  # root/llama-2l
    text = "\n".join(f"Line {i}: to be or not to be, that is the question number {i}." for i in range(400))
    (root / "a.txt").write_text(text)
    (root / "b.txt").write_text(text.upper())
    return root


def _write(path: Path, content: Any, fx: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif isinstance(content, str) and content.startswith("copy:"):
        shutil.copy(content[5:].replace("{fx}", str(fx)), path)
    elif isinstance(content, str):
        path.write_text(content)
    else:
        path.write_text(json.dumps(content))


def _materialise(case: Case, inputs: Path, fx: Path) -> None:
    for rel, content in case.files:
        if rel == "hf":  # a copy of the tiny HF model, its config.json patched (a dict) or replaced (text)
            shutil.copytree(fx / "llama-2l", inputs / "hf")
            cfg = inputs / "hf" / "config.json"
            if isinstance(content, dict):
                cfg.write_text(json.dumps({**json.loads(cfg.read_text()), **content}))
            else:
                cfg.write_text(content)
        else:
            _write(inputs / rel, content, fx)


def _snapshot(root: Path) -> dict[str, str]:
    if not root.exists():
        return {}
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(root.rglob("*"))}


def _sub(value: Any, inputs: Path, fx: Path) -> Any:
    """``value`` with ``{in}`` and ``{fx}`` replaced in every string it holds."""
    if isinstance(value, str):
        return value.replace("{in}", str(inputs)).replace("{fx}", str(fx))
    if isinstance(value, list):
        return [_sub(v, inputs, fx) for v in value]
    if isinstance(value, dict):
        return {k: _sub(v, inputs, fx) for k, v in value.items()}
    return value


def _argv(case: Case, inputs: Path, fx: Path) -> list[str]:
    base = yaml.safe_load(SMOKE.read_text())
    base["data"].update(corpus="files", files=[str(fx / "a.txt"), str(fx / "b.txt")], val_fraction=0.5,
                        tokenizer=str(fx / "tokenizer"), seq_len=32, cache_dir=str(fx / "cache"))
    base["log"] = {"wandb": "disabled"}
    base["train"]["out_dir"] = str(inputs / "run")
    recipe = inputs / "recipe.yaml"
    if isinstance(case.recipe, (str, bytes)):
        _write(recipe, case.recipe, fx)
    else:
        for section, values in (case.recipe or {}).items():
            if isinstance(values, dict) and isinstance(base.get(section), dict):
                values = {**base[section], **values}
            base[section] = values
        recipe.write_text(yaml.safe_dump(_sub(base, inputs, fx)))
    argv = ["--config", str(recipe)]
    if case.ds is not None:
        _write(inputs / "ds.json", case.ds if isinstance(case.ds, (str, bytes)) else json.dumps(case.ds), fx)
        argv += ["--ds_config", str(inputs / "ds.json")]
    return [*argv, *(_sub(a, inputs, fx) for a in case.args), *(_sub(o, inputs, fx) for o in case.overrides)]


@pytest.fixture
def isolated(monkeypatch: pytest.MonkeyPatch) -> Any:
    """No launcher variables and no wandb key; whatever the entry point sets in os.environ is undone; a plan
    that wrongly succeeds fails the test instead of training."""
    for key in (*LAUNCHER_KEYS, "WANDB_API_KEY", "WANDB_IDENTITY_TOKEN_FILE"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("NETRC", "/nonexistent/netrc")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    def accepted(*_: Any, **__: Any) -> None:
        raise AssertionError("the bad input was accepted: training would start")

    monkeypatch.setattr(train.main, "run", accepted)
    saved = dict(os.environ)
    yield monkeypatch
    os.environ.clear()
    os.environ.update(saved)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_is_one_line_and_writes_nothing(case: Case, fx: Path, tmp_path: Path, isolated: Any,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    inputs = tmp_path / "in"
    inputs.mkdir()
    _materialise(case, inputs, fx)
    argv = _argv(case, inputs, fx)
    for key, value in case.env:
        isolated.setenv(key, value)
    before = _snapshot(inputs)
    capsys.readouterr()
    rc = train.main.main(argv)  # an exception here (a traceback) fails the case
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert rc == 2, f"exit code {rc}; stderr: {err[-2000:]}"
    assert len(lines) == 1 and lines[0].startswith("tessera: error: "), err[-2000:]
    assert "Traceback" not in err
    assert _snapshot(inputs) == before, "files were written or changed"
    assert not (inputs / "run").exists() or any(rel.startswith("run/") for rel, _ in case.files)


def test_the_base_input_plans(fx: Path, tmp_path: Path, isolated: Any) -> None:
    """Without its one fault a case is a run that plans: each case fails for its fault, not for the base."""
    inputs = tmp_path / "in"
    inputs.mkdir()
    with pytest.raises(AssertionError, match="training would start"):
        train.main.main(_argv(Case("base"), inputs, fx))
    for key, value in launcher_cases()[0].env:
        isolated.setenv(key, value)
    isolated.setenv("RANK", "0")
    with pytest.raises(AssertionError, match="training would start"):  # the launcher cases' good environment
        train.main.main(_argv(Case("base"), inputs, fx))


def test_the_readme_counts_these_cases() -> None:
    """README.md's Reliability paragraph states the number of cases this suite tries."""
    text = (REPO / "README.md").read_text()
    match = re.search(r"on (\d+) generated bad inputs", text)
    assert match is not None and int(match.group(1)) == len(CASES), (match and match.group(1), len(CASES))
