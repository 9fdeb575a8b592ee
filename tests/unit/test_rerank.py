"""Generation evaluation and best-of-N reranking (train/eval/rerank.py, tools/evaluate_generations.py) with a tiny
random policy and a tiny random verifier built from configs."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.hf_models import hf_config, make_hf_model, make_tokenizer
from train.data.supervised import Renderer
from train.eval import evaluate_generations, exact_match, numeric_match, read_predictions, token_f1
from train.eval.rerank import RerankError, Settings, evaluate, load_models, read_items, run

REPO = Path(__file__).resolve().parents[2]
KINDS = ("em", "f1", "numeric")
PROMPTS = [("what is 2 plus 2?", "4"), ("what colour is the sky?", "blue 7"), ("name a number", "3")]


def _verifier(root: Path, tok_dir: Path, name: str, *, seed: int = 1) -> Path:
    """A random LlamaForSequenceClassification (1 output) saved with the tokenizer of `tok_dir`."""
    from transformers import AutoTokenizer, LlamaForSequenceClassification

    out = root / name
    tok = AutoTokenizer.from_pretrained(str(tok_dir))
    config = hf_config("llama", len(tok), eos_id=tok.eos_token_id)
    config.num_labels = 1
    torch.manual_seed(seed)
    LlamaForSequenceClassification(config).save_pretrained(str(out))
    tok.save_pretrained(str(out))
    return out


def _data(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("rerank")
    make_hf_model(root, "llama")
    _verifier(root, make_tokenizer(root), "verifier")
    _data(root / "data.jsonl", [{"prompt": p, "answer": a} for p, a in PROMPTS])
    return root


@pytest.fixture(scope="module")
def models(root: Path) -> tuple:
    return load_models(root / "llama-2l", root / "verifier", torch.device("cpu"))


def _bon(n: int = 4, seed: int = 3) -> Settings:
    return Settings(n=n, max_new_tokens=6, temperature=1.0, seed=seed, kinds=KINDS)


def test_chosen_answer_is_the_argmax_of_independently_recomputed_scores(root: Path, models: tuple) -> None:
    from transformers import AutoModelForSequenceClassification

    policy, tok, scorer = models
    metrics, rows = evaluate(read_items(root / "data.jsonl"), policy, tok, scorer, _bon())
    clf = AutoModelForSequenceClassification.from_pretrained(str(root / "verifier")).eval()
    # transformers' own pooling (the last token that is not the pad token) is where training reads the score
    renderer = Renderer(tok, 256)
    for row in rows:
        scores = []
        for a in row["answers"]:  # one pair at a time, no padding, transformers' own forward
            ids = renderer.example([{"role": "user", "content": row["prompt"]},
                                    {"role": "assistant", "content": a["text"]}], "t").ids[:-1]
            with torch.no_grad():
                scores.append(clf(input_ids=torch.tensor([ids])).logits[0, 0].item())
        assert [a["score"] for a in row["answers"]] == pytest.approx(scores, abs=1e-4)
        assert row["chosen"] == max(range(len(scores)), key=lambda j, s=scores: s[j])
        assert row["prediction"] == row["answers"][row["chosen"]]["text"]
    assert len({a["text"] for r in rows for a in r["answers"]}) > 3  # the samples differ
    assert metrics["n"] == 4 and metrics["count"] == 3
    mean = sum(a["score"] for r in rows for a in r["answers"]) / 12
    assert metrics["verifier_score_mean"] == pytest.approx(mean)


def test_n1_is_plain_greedy_evaluation(root: Path, models: tuple) -> None:
    from model.generate import generate

    policy, tok, _ = models
    items = read_items(root / "data.jsonl")
    metrics, rows = evaluate(items, policy, tok, None, Settings(n=1, max_new_tokens=6, kinds=KINDS))
    renderer, eos = Renderer(tok, 256), tok.eos_token_id
    answers = []
    for it in items:
        ids = renderer.prompt([{"role": "user", "content": it.prompt}])
        new = generate(policy, torch.tensor([ids]), 6)[0, len(ids):].tolist()
        answers.append(tok.decode(new[: new.index(eos)] if eos in new else new, skip_special_tokens=True))
    assert [r["prediction"] for r in rows] == answers
    plain = evaluate_generations(answers, [it.references for it in items], KINDS).metrics
    for view in ("best_of_n", "first", "oracle"):
        assert metrics[view] == plain
    assert "verifier_score_mean" not in metrics and all(r["chosen"] == 0 for r in rows)


def _check_views(metrics: dict, rows: list[dict], kinds: tuple[str, ...]) -> None:
    """Every view's metrics recomputed from the predictions' texts; the oracle bounds the other two."""
    score = {"em": exact_match, "f1": token_f1, "numeric": lambda t, refs: max(numeric_match(t, r) for r in refs)}
    for view in ("best_of_n", "first", "oracle"):
        per_row = []
        for r in rows:
            j = {"best_of_n": r["chosen"], "first": 0}.get(view)
            texts = [a["text"] for a in r["answers"]] if j is None else [r["answers"][j]["text"]]
            per_row.append({k: max(score[k](t, r["references"]) for t in texts) for k in kinds})
        assert metrics[view] == pytest.approx({**{k: 100 * sum(p[k] for p in per_row) / len(rows) for k in kinds},
                                               "count": len(rows)})
    for k in kinds:
        assert metrics["oracle"][k] >= metrics["best_of_n"][k] and metrics["oracle"][k] >= metrics["first"][k]


def test_files_are_consistent_deterministic_and_oracle_bounds_the_others(root: Path, tmp_path: Path) -> None:
    out = tmp_path / "eval"
    metrics = run(root / "llama-2l", root / "data.jsonl", _bon(n=5), verifier=root / "verifier", out_dir=out)
    rows = read_predictions(out / "predictions.jsonl")
    assert json.loads((out / "metrics.json").read_text()) == metrics
    assert [r["id"] for r in rows] == [0, 1, 2] and [r["references"] for r in rows] == [[a] for _, a in PROMPTS]
    _check_views(metrics, rows, KINDS)
    # references that one sample of each prompt matches exactly: the same seed repeats the samples, the oracle
    # finds them
    rigged = _data(tmp_path / "rigged.jsonl", [{"id": f"q{i}", "prompt": r["prompt"],
                                                "answers": [r["answers"][2]["text"], "unlikely"]}
                                               for i, r in enumerate(rows)])
    settings = Settings(n=5, max_new_tokens=6, temperature=1.0, seed=3, kinds=("em", "f1"))
    metrics = run(root / "llama-2l", rigged, settings, verifier=root / "verifier", out_dir=out)
    rows2 = read_predictions(out / "predictions.jsonl")
    assert [[a["text"] for a in r["answers"]] for r in rows2] == [[a["text"] for a in r["answers"]] for r in rows]
    assert [r["id"] for r in rows2] == ["q0", "q1", "q2"] and metrics["oracle"]["em"] == 100.0
    _check_views(metrics, rows2, ("em", "f1"))


@pytest.mark.parametrize("case, message", [
    ("no_data", "does not exist"),
    ("no_policy", "no such directory"),
    ("n_without_verifier", "need a verifier"),
    ("row_without_answer", "data.jsonl:2: no 'answer'"),
    ("foreign_tokenizer", "another tokenizer"),
    ("not_a_verifier", "ForSequenceClassification with one output"),
    ("greedy_n", "identical greedy answers"),
    ("bad_metric", "choose one or more of em, f1, numeric"),
])
def test_bad_input_is_one_clear_error(root: Path, tmp_path: Path, case: str, message: str) -> None:
    data, policy, verifier = root / "data.jsonl", root / "llama-2l", root / "verifier"
    settings = _bon(n=2)
    if case == "no_data":
        data = tmp_path / "missing.jsonl"
    elif case == "no_policy":
        policy = tmp_path / "missing"
    elif case == "n_without_verifier":
        verifier = None
    elif case == "row_without_answer":
        data = _data(tmp_path / "data.jsonl", [{"prompt": "a", "answer": "1"}, {"prompt": "b", "response": "2"}])
    elif case == "foreign_tokenizer":
        verifier = _verifier(tmp_path, make_tokenizer(tmp_path, vocab_size=280), "foreign")
    elif case == "not_a_verifier":
        verifier = policy
    elif case == "greedy_n":
        settings = Settings(n=2, temperature=0.0)
    else:
        settings = Settings(kinds=("em", "bleu"))
    with pytest.raises(RerankError, match=message):
        run(policy, data, settings, verifier=verifier, out_dir=tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_cli_error_is_one_line_exit_2() -> None:
    proc = subprocess.run([sys.executable, str(REPO / "tools" / "evaluate_generations.py"), "--policy", "nowhere",
                           "--data", "missing.jsonl", "--n", "3"], check=False, capture_output=True, text=True,
                          timeout=120, cwd=REPO)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert proc.stderr.startswith("tessera: error: n=3 samples per prompt need a verifier")


@pytest.mark.slow
def test_cli_writes_next_to_the_policy(root: Path, tmp_path: Path) -> None:
    policy = shutil.copytree(root / "llama-2l", tmp_path / "policy")
    ok = subprocess.run([sys.executable, str(REPO / "tools" / "evaluate_generations.py"), "--policy", str(policy),
                         "--data", str(root / "data.jsonl"), "--metrics", "em,f1", "--max-new-tokens", "4"],
                        check=False, capture_output=True, text=True, timeout=300, cwd=REPO)
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout) == json.loads((policy / "eval" / "metrics.json").read_text())
    assert len(read_predictions(policy / "eval" / "predictions.jsonl")) == 3
