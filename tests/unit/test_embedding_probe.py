"""tools/embedding_probe.py: its functions on hand-checked cases, and the command line on a real snapshot."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.unit.embed_models import (
    NEW_WORDS,
    TRAIN_TEXT,
    load_model,
    make_tokenizer,
    save_model,
    train_new_rows,
)
from tools.embedding_probe import (
    eval_perplexity,
    format_loss_table,
    isotropy,
    loss_curve,
    main,
    nearest_neighbours,
    norm_stats,
)
from train.data.tokenizer import load_tokenizer
from train.vocab.extend import VocabError, encode_blocks, extend_vocabulary, freeze_all_but_new_rows
from train.vocab.snapshot import save_embedding_snapshot

REPO = Path(__file__).resolve().parents[2]


def test_norm_stats_by_hand() -> None:
    w = torch.tensor([[3.0, 4.0], [0.0, 1.0], [0.0, 0.0], [6.0, 8.0]])
    s = norm_stats(w, [0, 1, 3])
    assert (s.count, s.mean, s.min, s.max) == (3, pytest.approx(16 / 3), 1.0, 10.0)
    assert s.std == pytest.approx(math.sqrt(((5 - 16 / 3) ** 2 + (1 - 16 / 3) ** 2 + (10 - 16 / 3) ** 2) / 3))
    with pytest.raises(VocabError, match="ids=\\[\\]"):
        norm_stats(w, [])


def test_isotropy_by_hand() -> None:
    eye = torch.eye(8) * torch.arange(1.0, 9.0)[:, None]  # orthogonal rows of different lengths
    assert isotropy(eye, range(8)) == pytest.approx(0.0, abs=1e-7)
    same = torch.tensor([[1.0, -2.0, 0.5]]).repeat(5, 1) * torch.arange(1.0, 6.0)[:, None]
    assert isotropy(same, range(5)) == pytest.approx(1.0, abs=1e-6)
    pairs = torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, 1.0]])
    assert isotropy(pairs, [0, 1, 2]) == pytest.approx((2 * math.sqrt(0.5) + 0.0) / 3, abs=1e-6)
    torch.manual_seed(0)
    rand = torch.randn(1000, 256)
    a, b = isotropy(rand, range(1000), sample=100, seed=1), isotropy(rand, range(1000), sample=100, seed=1)
    assert a == b and abs(a) < 0.01 and a != isotropy(rand, range(1000), sample=100, seed=2)
    with pytest.raises(VocabError, match=">= 2 rows"):
        isotropy(rand, [3])


def test_nearest_neighbours_by_hand() -> None:
    w = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [-1.0, 0.0], [2.0, 0.0]])
    found = nearest_neighbours(w, 0, k=3)
    assert [i for i, _ in found[:2]] in ([0, 4], [4, 0]) and found[2][0] == 1  # itself (and its multiple) first
    assert found[0][1] == pytest.approx(1.0)
    assert [i for i, _ in nearest_neighbours(w, 2, k=1, exclude_self=True)] == [1]
    assert [i for i, _ in nearest_neighbours(w, 0, k=9, limit=3, exclude_self=True)] == [1, 2]
    with pytest.raises(VocabError, match="outside"):
        nearest_neighbours(w, 4, limit=3)


def test_loss_curve_and_table(tmp_path: Path) -> None:
    rows = [{"step": s, "loss": 10.0 - s / 10, "lr": 1e-3} for s in range(1, 101)]
    rows += [{"step": 50, "val_loss": 6.5, "val_ppl": 665.1}, {"step": 100, "val_loss": 6.0, "val_ppl": 403.4}]
    path = tmp_path / "metrics.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    curve = loss_curve(path, max_rows=5)
    assert [r["step"] for r in curve] == [1, 26, 50, 51, 75, 100]
    assert curve[0] == {"step": 1, "loss": 9.9, "val_loss": None}
    assert curve[2] == {"step": 50, "loss": None, "val_loss": 6.5} and curve[-1]["val_loss"] == 6.0
    table = format_loss_table(curve).splitlines()
    assert table[0].split() == ["step", "loss", "val_loss"] and table[-1].split() == ["100", "0.0000", "6.0000"]
    assert table[3].split() == ["50", "-", "6.5000"]


@pytest.fixture(scope="module")
def extended(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """(base model dir with its tokenizer, snapshot dir after 4 steps, metrics file)."""
    root = tmp_path_factory.mktemp("probe")
    base = save_model(root, make_tokenizer(root), "llama", False)
    model, tokenizer = load_model(base), load_tokenizer(base)
    info = extend_vocabulary(model, tokenizer, NEW_WORDS)
    losses = train_new_rows(model, tokenizer, info, steps=4)
    snap = save_embedding_snapshot(model, info, root / "snap", 4, tokenizer=tokenizer)
    metrics = root / "metrics.jsonl"
    metrics.write_text("".join(json.dumps({"step": i + 1, "loss": v}) + "\n" for i, v in enumerate(losses)))
    return base, snap, metrics


def test_eval_perplexity_matches_hf_loss(extended: tuple[Path, Path, Path]) -> None:
    model, tokenizer = load_model(extended[0]), load_tokenizer(extended[0])
    data = encode_blocks(tokenizer, [TRAIN_TEXT], 24)
    result = eval_perplexity(model, data, batch_size=3)
    assert model.training  # the mode is restored
    x, y = data.batch(np.arange(len(data)))[:2]
    with torch.no_grad():
        logits = model.eval()(input_ids=x).logits
    expected = torch.nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten()).item()
    assert result["loss"] == pytest.approx(expected, rel=1e-5) and result["ppl"] == pytest.approx(math.exp(expected))
    assert (result["tokens"], result["blocks"]) == (y.numel(), len(data))


def test_eval_on_a_four_bit_model_leaves_training_gradients_intact(extended: tuple[Path, Path, Path]) -> None:
    """Evaluating between steps must not repack the 4-bit weights (which corrupts later gradients on AVX512-BF16)."""
    grads = []
    for evaluate in (False, True):
        model, tokenizer = load_model(extended[0], four_bit=True), load_tokenizer(extended[0])
        info = extend_vocabulary(model, tokenizer, NEW_WORDS)
        (emb, *_) = freeze_all_but_new_rows(model, info)
        data = encode_blocks(tokenizer, [TRAIN_TEXT], 24)
        if evaluate:
            eval_perplexity(model, data)
        x, y = data.batch(np.arange(4))[:2]
        logits = model(input_ids=x).logits
        torch.nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten()).backward()
        grads.append(emb.grad[info.base_vocab_size :].clone())
    assert grads[0].abs().sum() > 0 and torch.equal(grads[0], grads[1])


def test_cli_report_and_json(extended: tuple[Path, Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    base, snap, metrics = extended
    text = tmp_path / "val.txt"
    text.write_text(TRAIN_TEXT, encoding="utf-8")
    out = tmp_path / "probe.json"
    argv = [str(base), "--snapshot", str(snap), "--neighbours", "zorblax", "Ġdog", "--k", "3", "--metrics",
            str(metrics), "--eval-text", str(text), "--seq-len", "32", "--json", str(out)]
    assert main(argv) == 0
    report = capsys.readouterr().out
    result = json.loads(out.read_text())
    assert result["step"] == 4 and result["vocab"]["base_vocab_size"] + 3 == result["vocab"]["vocab_size"]
    assert result["input"]["new"]["count"] == 3 and result["output"]["new"]["count"] == 3
    assert result["input"]["new"]["mean"] != pytest.approx(result["input"]["base"]["mean"])  # trained away
    assert [len(v) for v in result["neighbours"].values()] == [3, 3]
    assert "zorblax" not in [n["token"] for n in result["neighbours"]["zorblax"]]
    assert [r["step"] for r in result["loss_curve"]] == [1, 2, 3, 4]
    assert result["eval"]["ppl"] == pytest.approx(math.exp(result["eval"]["loss"]))
    assert "snapshot" in report and "neighbours of 'zorblax'" in report and "eval: loss" in report


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["{tmp}"], "no config.json"),
        (["{base}", "--snapshot", "{tmp}"], "no snapshot.json"),
        (["{base}", "--neighbours", "zorblax"], "is not one token"),
        (["{base}", "--base-vocab", "100000"], "--base-vocab 100000 must be in"),
        (["{base}", "--metrics", "{tmp}/none.jsonl"], "no such metrics file"),
    ],
)
def test_cli_bad_input_is_one_line(
    extended: tuple[Path, Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str], message: str
) -> None:
    argv = [a.format(tmp=tmp_path, base=extended[0]) for a in args]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("tessera: error: ") and message in err and len(err.strip().splitlines()) == 1


@pytest.mark.slow
def test_cli_as_a_process(extended: tuple[Path, Path, Path]) -> None:
    base, snap, _ = extended
    tool = str(REPO / "tools" / "embedding_probe.py")
    proc = subprocess.run([sys.executable, tool, str(base), "--snapshot", str(snap), "--neighbours", "snerg"],
                          capture_output=True, text=True, timeout=300, cwd=REPO, check=False)
    assert proc.returncode == 0, proc.stderr
    assert "neighbours of 'snerg'" in proc.stdout
    bad = subprocess.run([sys.executable, tool, str(base), "--seq-len", "0"], capture_output=True, text=True,
                         timeout=300, cwd=REPO, check=False)
    assert bad.returncode == 2 and "--seq-len 0 is too small" in bad.stderr
