"""Embedding-only vocabulary extension through the real entry point: only the new rows train (also on a 4-bit
base), snapshots every N steps, exact resume, a new run from a snapshot, export, the probe tool."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import SMOKE, python_main, read_rows, run_job
from tests.e2e.test_hf_finetune import _resume_matches
from tests.hf_models import make_hf_model

pytestmark = pytest.mark.slow
WORDS = ["zorblax", "quuxify", "flibbertigibbet", "the"]  # "the" is already a token: not added


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("vocab")
    make_hf_model(root, "llama")
    make_hf_model(root, "gpt2")
    make_hf_model(root, "llama", tie=True)
    (root / "lexicon.txt").write_text("# words to add\n" + "\n".join(WORDS) + "\n")
    with open(root / "corpus.jsonl", "w") as f:
        f.writelines(json.dumps({"text": f"the zorblax will quuxify the flibbertigibbet on day {i}. zorblax!"}) + "\n" for i in range(120))
    return root


def _args(root: Path, out: Path, family: str = "llama", *extra: str) -> list[str]:
    return ["--config", str(SMOKE), f"hf.path={root / f'{family}-2l'}", f"vocab.lexicon={root / 'lexicon.txt'}",
            "vocab.snapshot_interval=4", "data.corpus=files", f"data.files=[{root / 'corpus.jsonl'}]",
            "data.seq_len=32", "data.sampling=blocks", "data.val_fraction=0.1", f"data.cache_dir={root / 'cache'}",
            "train.steps=12", "train.lr=1e-2", "train.warmup_steps=2", "train.weight_decay=0", "train.eval_interval=4",
            "train.save_interval=4", "train.keep_last=0", "train.eval_batches=2", f"train.out_dir={out}",
            "log.progress=false", "sample.prompt='the zorblax'", "sample.max_new_tokens=4", *extra]


def _embedding(saved: dict[str, torch.Tensor]) -> torch.Tensor:
    (name,) = [k for k in saved if k.endswith(("embed_tokens.weight", "wte.weight"))]
    return saved[name]


def _check_rows(root: Path, out: Path, family: str) -> None:
    """Base rows bitwise the base model's, new rows moved away from their initial values; nothing else saved."""
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(str(root / f"{family}-2l")).get_input_embeddings().weight
    tag = out / "checkpoints" / "step_00000012"
    saved = torch.load(tag / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)["module"]
    # no frozen weight is saved (a 4-bit base's small quantization constants ride along with DeepSpeed's module state)
    weights = [k for k in saved if ".weight." not in k]
    assert all("embed" in k or "wte" in k or "lm_head" in k for k in weights), sorted(weights)
    trained = _embedding(saved)
    n = base.shape[0]
    assert trained.shape[0] == n + 3
    assert torch.equal(trained[:n], base.detach())
    first = json.loads((out / "embeddings" / "step_00000004" / "snapshot.json").read_text())
    assert first["step"] == 4 and first["info"]["new_tokens"] == WORDS[:3]
    from safetensors.torch import load_file

    early = load_file(str(out / "embeddings" / "step_00000004" / "embeddings.safetensors"))["input"]
    assert not torch.equal(early, trained[n:])  # the new rows kept training after step 4


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_only_the_new_rows_train_and_snapshots_resume_and_export(tmp_path: Path, root: Path, family: str) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "run"
    args = _args(root, out, family)
    proc = run_job(python_main(*args), tmp_path)
    assert "3 new" in proc.stderr
    val = [r["val_loss"] for r in read_rows(out) if "val_loss" in r]  # the same held-out blocks each time
    assert len(val) == 3 and val[0] > val[1] > val[2], val
    assert sorted(p.name for p in (out / "embeddings").iterdir()) == [f"step_{s:08d}" for s in (4, 8, 12)]
    _check_rows(root, out, family)
    if family == "gpt2":
        return
    _resume_matches(tmp_path, out, args)

    exported = tmp_path / "hf"
    run_job([sys.executable, "tools/export_hf.py", str(out), "--out", str(exported)], tmp_path)
    tok = AutoTokenizer.from_pretrained(str(exported))
    model = AutoModelForCausalLM.from_pretrained(str(exported))
    assert len(tok.encode("zorblax", add_special_tokens=False)) == 1
    assert model.get_input_embeddings().weight.shape[0] == len(tok)

    probe = run_job([sys.executable, "tools/embedding_probe.py", str(root / "llama-2l"), "--snapshot",
                     str(out / "embeddings" / "step_00000012"), "--neighbours", "zorblax", "--metrics",
                     str(out / "metrics.jsonl"), "--json", str(tmp_path / "probe.json")], tmp_path)
    report = json.loads((tmp_path / "probe.json").read_text())
    assert "zorblax" in probe.stdout and report


def _logits(model: torch.nn.Module, ids: list[int]) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float()


def _check_4bit_export(tmp_path: Path, root: Path, out: Path, family: str) -> None:
    """The export (with and without --merge) is the full-precision base with the trained rows, head still tied:
    its logits are exactly those of the full-precision base plus the final snapshot. (The trained model's body
    was nf4: on these tiny random models its rounding alone moves the base's logits by several units.)"""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from train.vocab.snapshot import load_embedding_snapshot

    base_dir, snapshot = root / f"{family}-2l", out / "embeddings" / "step_00000012"
    reference = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32)
    load_embedding_snapshot(reference, AutoTokenizer.from_pretrained(str(base_dir)), snapshot)
    tag = out / "checkpoints" / "step_00000012"
    trained = _embedding(torch.load(tag / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)["module"])
    for flags in ([], ["--merge"]):
        exported = tmp_path / f"hf{''.join(flags)}"
        run_job([sys.executable, "tools/export_hf.py", str(out), "--out", str(exported), *flags], tmp_path)
        tok = AutoTokenizer.from_pretrained(str(exported))
        model = AutoModelForCausalLM.from_pretrained(str(exported), dtype=torch.float32)
        assert model.get_output_embeddings().weight is model.get_input_embeddings().weight  # still tied
        assert not any("absmax" in k or "quant" in k for k in model.state_dict())
        assert torch.equal(model.get_input_embeddings().weight, trained.float())  # the rows as trained
        ids = tok.encode("the zorblax will quuxify the flibbertigibbet", add_special_tokens=False)
        assert any(i >= trained.shape[0] - 3 for i in ids)
        assert torch.equal(_logits(model, ids), _logits(reference, ids))  # full-precision base + the new rows


def test_a_4bit_base_exports_and_a_new_run_from_a_snapshot(tmp_path: Path, root: Path) -> None:
    out = tmp_path / "q"
    proc = run_job(python_main(*_args(root, out, "llama-tied", "hf.quantization=4bit")), tmp_path)
    assert "4bit" in proc.stderr
    _check_rows(root, out, "llama-tied")
    _check_4bit_export(tmp_path, root, out, "llama-tied")

    # a fresh run starts from the step-8 rows, with its own optimizer and schedule from step 0
    again = tmp_path / "again"
    snapshot = out / "embeddings" / "step_00000008"
    args = [a for a in _args(root, again, "llama-tied", "hf.quantization=4bit") if not a.startswith("vocab.lexicon")]
    proc = run_job(python_main(*args, f"vocab.from_snapshot={snapshot}", "train.steps=4"), tmp_path)
    assert f"new embedding rows from {snapshot} (step 8)" in proc.stderr
    first = next(r for r in read_rows(again) if "loss" in r)
    assert first["step"] == 1 and first["lr"] < 1e-2  # warm-up again: a fresh schedule
    from safetensors.torch import load_file

    start = load_file(str(snapshot / "embeddings.safetensors"))["input"]
    later = load_file(str(again / "embeddings" / "step_00000004" / "embeddings.safetensors"))["input"]
    assert start.shape == later.shape and not torch.equal(start, later)
