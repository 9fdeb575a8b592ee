"""Evaluation helpers against hand-computed values: SQuAD EM/F1, numeric answers, classification, ROUGE,
perplexity, token-weighted losses over ranks, predictions files."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import ClassVar

import numpy as np
import pytest
import torch
import torch.distributed as dist

from tests.gloo import run_ranks
from train.eval import (
    MAX_LOG_PERPLEXITY,
    EvalInputError,
    TokenLoss,
    WeightedMean,
    accuracy,
    all_reduce_token_loss,
    classification_metrics,
    confusion_matrix,
    evaluate_generations,
    exact_match,
    extract_number,
    f1_score,
    normalize_answer,
    numeric_match,
    perplexity,
    predictions_path,
    read_predictions,
    rouge,
    summarize,
    token_f1,
    write_predictions,
)
from train.objectives.lm import Objective, evaluate, lm_loss
from train.research.api import Extension, NoOptions, RecipeContext, Term, outputs
from train.research.run import ResearchObjective

# ---- SQuAD normalisation, exact match, token F1 -------------------------------------------------------


@pytest.mark.parametrize(("text", "normalised"), [
    ("The Cat!", "cat"),
    ("  Hello,   World  ", "hello world"),
    ("U.S. Army", "us army"),  # punctuation is dropped, not replaced by a space
    ("don't", "dont"),
    ("Theresa and the banana", "theresa and banana"),  # articles only as whole words
    ("A an THE", ""),
    ("the\tDenver\nBroncos.", "denver broncos"),
])
def test_normalize_answer(text: str, normalised: str) -> None:
    assert normalize_answer(text) == normalised


def test_exact_match_and_f1_by_hand() -> None:
    # [cat, sat] vs [cat, sat, on, mat]: P = 1, R = 1/2, F1 = 2/3
    assert exact_match("the cat sat", "cat sat on mat") == 0.0
    assert token_f1("the cat sat", "cat sat on mat") == pytest.approx(2 / 3)
    # repeated tokens count once per occurrence: [x, x, y] vs [y, x]: overlap 2, P = 2/3, R = 1, F1 = 0.8
    assert token_f1("x x y", "y x") == pytest.approx(0.8)
    # the best reference counts
    assert exact_match("Denver Broncos", ["Broncos", "The Denver Broncos!"]) == 1.0
    assert token_f1("paris france", ["london", "paris"]) == pytest.approx(2 / 3)
    assert token_f1("London", "Paris") == 0.0
    # answers that normalise to nothing: equal when both are empty (SQuAD v2), else 0
    assert exact_match("The", "an") == 1.0 and token_f1("The", "an") == 1.0
    assert token_f1("", "x") == 0.0 and token_f1("x", "a") == 0.0


# ---- numeric answers ------------------------------------------------------------------------------------

GSM8K_SOLUTION = ("Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n"
                  "Natalia sold 48+24 = <<48+24=72>>72 clips altogether in April and May.\n#### 72")


@pytest.mark.parametrize(("text", "value"), [
    (GSM8K_SOLUTION, 72.0),
    ("so she has 5 left.\n#### 1,234", 1234.0),
    ("#### -7", -7.0),
    ("The total is 3, then 17. #### 18 apples (not 20)", 18.0),  # first number after the marker
    ("#### unsure. Earlier I found 12", 12.0),  # a marker without a number: the last number
    ("The answer is $1,234.50.", 1234.5),
    ("It costs -$5 per day", -5.0),
    ("x = -3", -3.0),
    ("(-12) is the result", -12.0),
    ("pages 3-4", 4.0),  # a dash between numbers is not a sign
    ("It was 2.5.", 2.5),  # the sentence's full stop is not a decimal point
    ("3/4 of them", 0.75),
    ("1,000,000 people", 1_000_000.0),
    ("divide 1/0 and get 5", 5.0),  # a zero denominator is not a number
    ("I cannot tell.", None),
    ("", None),
])
def test_extract_number(text: str, value: float | None) -> None:
    assert extract_number(text) == value


def test_numeric_match() -> None:
    assert numeric_match("So the answer is 72.", GSM8K_SOLUTION) == 1.0
    assert numeric_match("#### 72.0", "72") == 1.0
    assert numeric_match("It is 71", 72) == 0.0
    assert numeric_match("no idea", "72") == 0.0
    assert numeric_match("1/3", "0.3333", tol=1e-3) == 1.0
    assert numeric_match("1/3", "0.3333", tol=1e-6) == 0.0
    with pytest.raises(ValueError, match=r"reference='seventy' holds no number"):
        numeric_match("72", "seventy")
    with pytest.raises(ValueError, match=r"tol=-1"):
        numeric_match("72", "72", tol=-1)


# ---- classification -------------------------------------------------------------------------------------

# Confusion matrix (rows: truth, columns: prediction), checked by hand:
#   t=0: [2, 1, 0]   t=1: [1, 2, 1]   t=2: [1, 0, 2]
LABELS = [0, 0, 0, 1, 1, 1, 1, 2, 2, 2]
PREDS = [0, 0, 1, 1, 1, 2, 0, 2, 2, 0]


def test_multiclass_metrics_by_hand() -> None:
    assert confusion_matrix(PREDS, LABELS, 3) == [[2, 1, 0], [1, 2, 1], [1, 0, 2]]
    m = classification_metrics(PREDS, LABELS, 3)
    assert m.accuracy == accuracy(PREDS, LABELS) == pytest.approx(0.6)
    assert m.precision == pytest.approx([2 / 4, 2 / 3, 2 / 3])  # TP / column sums 4, 3, 3
    assert m.recall == pytest.approx([2 / 3, 2 / 4, 2 / 3])  # TP / row sums 3, 4, 3
    assert m.f1 == pytest.approx([4 / 7, 4 / 7, 2 / 3])
    assert m.support == [3, 4, 3]
    assert m.macro_f1 == pytest.approx(38 / 63)  # (4/7 + 4/7 + 2/3) / 3
    assert m.micro_f1 == pytest.approx(0.6)  # pooled counts: equals accuracy
    assert m.binary_f1 is None
    assert f1_score(PREDS, LABELS, 3, average="binary", positive_label=2) == pytest.approx(2 / 3)
    assert json.loads(json.dumps(m.as_dict()))["confusion"] == m.confusion
    # a fourth class that occurs nowhere has F1 0 but is not averaged into macro-F1
    m4 = classification_metrics(PREDS, LABELS, 4)
    assert m4.f1[3] == 0.0 and m4.macro_f1 == pytest.approx(38 / 63)


def test_binary_metrics_by_hand() -> None:
    labels = [1, 1, 1, 0, 0, 0, 0, 1]
    preds = [1, 0, 0, 1, 0, 0, 0, 1]
    # class 1: TP 2, FP 1, FN 2 -> P 2/3, R 1/2, F1 4/7; class 0: TP 3, FP 2, FN 1 -> P 3/5, R 3/4, F1 2/3
    m = classification_metrics(preds, labels, 2)
    assert m.positive_label == 1 and m.binary_f1 == pytest.approx(4 / 7)
    assert m.accuracy == pytest.approx(5 / 8)
    assert m.macro_f1 == pytest.approx(13 / 21)
    assert f1_score(preds, labels, 2, average="binary") == pytest.approx(4 / 7)
    assert f1_score(preds, labels, 2, average="binary", positive_label=0) == pytest.approx(2 / 3)
    assert f1_score(preds, labels, 2, average="macro") == pytest.approx(13 / 21)
    assert f1_score(preds, labels, 2, average="micro") == pytest.approx(5 / 8)
    # tensors and numpy arrays of integer labels work too
    assert classification_metrics(torch.tensor(preds), np.array(labels), 2).binary_f1 == pytest.approx(4 / 7)


@pytest.mark.parametrize(("call", "message"), [
    (lambda: confusion_matrix([0, 5], [0, 1], 3), r"predictions\[1\]=5 is outside the class range \[0, 3\)"),
    (lambda: classification_metrics([0, 1], [0, -1], 2), r"labels\[1\]=-1 is outside"),
    (lambda: accuracy([0, 1, 1], [0, 1]), r"predictions has 3 entries but labels has 2"),
    (lambda: accuracy([], []), r"labels is empty"),
    (lambda: accuracy([0.5], [0]), r"predictions\[0\]=0.5 is not an integer label"),
    (lambda: confusion_matrix([0], [0], 1), r"num_classes=1 must be an integer >= 2"),
    (lambda: classification_metrics([0], [0], 2, positive_label=2), r"positive_label\[0\]=2 is outside"),
    (lambda: f1_score([0], [0], 3, average="binary"), r"needs a positive_label"),
    (lambda: f1_score([0], [0], 2, average="weighted"), r"average='weighted'"),
])
def test_classification_bad_input(call, message: str) -> None:
    with pytest.raises(EvalInputError, match=message):
        call()


# ---- ROUGE ----------------------------------------------------------------------------------------------


def test_rouge_by_hand() -> None:
    # ref [the cat sat on the mat], pred [the cat sat]: unigrams 3/3 vs 3/6 -> F 2/3; bigrams 2/2 vs 2/5
    # -> F 4/7; LCS 3 -> F 2/3
    assert rouge("the cat sat", "the cat sat on the mat") == pytest.approx(
        {"rouge1": 2 / 3, "rouge2": 4 / 7, "rougeL": 2 / 3})
    # same words, other order: unigrams 4/4; bigrams "the gunman", "police killed" 2/3; LCS 2 -> 1/2
    assert rouge("the gunman police killed", "police killed the gunman") == pytest.approx(
        {"rouge1": 1.0, "rouge2": 2 / 3, "rougeL": 0.5})
    # several references: the best per type
    assert rouge("the cat sat", ["a dog barked", "the cat sat on the mat"])["rouge1"] == pytest.approx(2 / 3)


def test_rouge_stemming_and_tokenizer() -> None:
    # without stemming only "the" and "running" overlap (2/4); stemmed, cats -> cat and running -> run (3/4)
    assert rouge("the cats were running", "the cat was running")["rouge1"] == pytest.approx(0.5)
    assert rouge("the cats were running", "the cat was running", stem=True)["rouge1"] == pytest.approx(0.75)
    # the default tokenizer keeps [a-z0-9] only: Cyrillic text has no tokens unless a tokenizer is given
    assert rouge("привет мир", "привет мир")["rouge1"] == 0.0
    assert rouge("привет мир", "привет мир", tokenize=str.split)["rougeL"] == 1.0


# ---- perplexity and token-weighted losses ---------------------------------------------------------------


def test_perplexity() -> None:
    assert MAX_LOG_PERPLEXITY == 50.0
    assert perplexity(0.0) == 1.0
    assert perplexity(math.log(20.0)) == pytest.approx(20.0)
    assert perplexity(torch.tensor(math.log(7.0))) == pytest.approx(7.0)
    assert perplexity(3.25) == math.exp(3.25)  # below the cap: exactly exp, as logged before
    cap = math.exp(50.0)
    # capped, and no OverflowError
    assert perplexity(50.0) == perplexity(50.5) == perplexity(800.0) == perplexity(math.inf) == cap
    assert math.isnan(perplexity(float("nan")))  # a diverged evaluation is reported, not an exception
    with pytest.raises(EvalInputError, match=r"mean_loss=-0.5"):
        perplexity(-0.5)
    with pytest.raises(EvalInputError, match=r"mean_loss must be a single number"):
        perplexity(torch.zeros(2))


def test_token_loss_weights_by_tokens() -> None:
    totals = TokenLoss()
    totals.add_mean(2.0, 10)  # 20 nats over 10 tokens
    totals.add(torch.tensor(120.0), torch.tensor(30))  # 120 nats over 30 tokens
    assert totals.tokens == 40 and totals.mean_loss == pytest.approx(3.5)  # not the batch mean 3.0
    reduced = totals.all_reduce()  # no process group: unchanged
    assert (reduced.loss_sum, reduced.tokens) == (140.0, 40) and isinstance(reduced, TokenLoss)
    assert reduced.perplexity == pytest.approx(math.exp(3.5))
    assert all_reduce_token_loss(1.5, 3) == (1.5, 3)
    with pytest.raises(EvalInputError, match=r"tokens=0: nothing was added"):
        _ = TokenLoss().mean_loss
    with pytest.raises(EvalInputError, match=r"tokens=2.5 must be a whole number"):
        totals.add(1.0, 2.5)
    with pytest.raises(EvalInputError, match=r"group=.* torch.distributed is not initialised"):
        all_reduce_token_loss(1.0, 1, group=object())  # type: ignore[arg-type]


def test_weighted_mean_shares_one_weight() -> None:
    totals = WeightedMean(("loss", "accuracy"))
    totals.add_sums([torch.tensor(3.0), 2.0], 2)  # two pairs
    totals.add_means([torch.tensor(1.0), 0.0], 3)  # three pairs
    assert totals.weight == 5
    assert totals.all_reduce().means() == pytest.approx({"loss": 6 / 5, "accuracy": 2 / 5})
    with pytest.raises(EvalInputError, match=r"sums has 1 values for the 2 names"):
        totals.add_sums([1.0], 1)
    with pytest.raises(EvalInputError, match=r"weight=0: nothing was added"):
        WeightedMean(("loss",)).means()


def _reduce_on_rank(rank: int, world: int) -> tuple[tuple[float, int], tuple[float, int]]:
    totals = TokenLoss()
    totals.add_mean([2.0, 5.0][rank], [4, 6][rank])  # rank 0: 8 nats / 4 tokens, rank 1: 30 nats / 6 tokens
    world_sum = totals.all_reduce()
    group_sum = totals.all_reduce(dist.new_group(list(range(world))))
    return (world_sum.loss_sum, world_sum.tokens), (group_sum.loss_sum, group_sum.tokens)


@pytest.mark.slow  # two spawned processes: about 3 s
def test_token_loss_all_reduce_on_two_gloo_ranks() -> None:
    results = run_ranks(2, _reduce_on_rank, timeout=60)
    assert results == [((38.0, 10), (38.0, 10))] * 2  # mean 3.8 on both ranks


# ---- one perplexity and one token-weighted reduction for every evaluation path ---------------------------
# The training run's `evaluate` (train/objectives/lm.py), the research objective, the seq2seq objective and
# the tools' `TokenLoss` must report the same numbers for the same losses.

VOCAB = 11


class Lookup(torch.nn.Module):
    """A bigram model: the logits of position t are a row of a table picked by the input token."""

    def __init__(self, scale: float = 1.0) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.table = torch.nn.Parameter(torch.randn(VOCAB, VOCAB) * scale)

    def forward(self, input_ids: torch.Tensor, **_: object) -> torch.Tensor:
        return self.table[input_ids]  # (B, T, V)


class Engine:
    """The part of a DeepSpeed engine an objective uses: calling it, `.module`, eval() / train()."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.module = module

    def __call__(self, *args: object, **kwargs: object) -> object:
        return self.module(*args, **kwargs)

    def eval(self) -> None:
        self.module.eval()

    def train(self) -> None:
        self.module.train()


def _uneven_batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Two batches of shape (2, 6) with 3 and 10 labelled tokens: batch and token means differ."""
    g = torch.Generator().manual_seed(1)
    batches = []
    for kept in (3, 10):
        x = torch.randint(0, VOCAB, (2, 6), generator=g)
        y = torch.randint(0, VOCAB, (2, 6), generator=g).flatten()
        y[kept:] = -100
        batches.append((x, y.view(2, 6)))
    return batches


class WithAux(Extension):
    """A research recipe: the base's LM loss and one more term (the batch's labelled tokens), weighted 0.5."""

    terms: ClassVar[dict[str, Term]] = {"lm": Term(), "aux": Term(0.5)}

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, object]:
        lm, logits = self.base_lm(batch)
        return outputs({"lm": lm, "aux": (batch["labels"] != -100).sum().float()}, logits=logits)


def _research(scale: float) -> tuple[ResearchObjective, Engine]:
    ctx = RecipeContext(dim=VOCAB, n_layers=1, vocab_size=VOCAB, device=torch.device("cpu"),
                        out_dir=Path("."), rank=0, seed=0, lm_loss=lm_loss)
    ext = WithAux(Lookup(scale), ctx, NoOptions())
    return ResearchObjective(dict(WithAux.terms), final_step=1), Engine(ext)


def _seq2seq_eval(scale: float, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> dict[str, float]:
    from types import SimpleNamespace

    from train.objectives.seq2seq import Seq2SeqObjective

    class Seq2Seq(Lookup):
        def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, max_new_tokens: int,
                     synced_gpus: bool = False) -> torch.Tensor:
            return input_ids[:, :max_new_tokens]

    texts = [("source", "a target") for _ in range(2 * len(batches))]
    dicts = [{"input_ids": x, "attention_mask": torch.ones_like(x), "labels": y,
              "index": torch.arange(2 * i, 2 * i + 2)} for i, (x, y) in enumerate(batches)]
    tokenizer = SimpleNamespace(batch_decode=lambda ids, skip_special_tokens: ["a target"] * len(ids))
    objective = Seq2SeqObjective(SimpleNamespace(texts=texts), tokenizer, max_new_tokens=2, zero3=False,
                                 out_dir=None, rank=0)
    return objective.evaluate(Engine(Seq2Seq(scale)), lambda: iter(dicts), torch.device("cpu"))


@pytest.fixture
def one_rank() -> None:
    """A one-rank gloo group, as the trainer runs under (the seq2seq objective gathers predictions)."""
    store = dist.HashStore()
    dist.init_process_group("gloo", rank=0, world_size=1, store=store)
    yield
    dist.destroy_process_group()


def _by_hand(model: torch.nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> TokenLoss:
    totals = TokenLoss()
    with torch.no_grad():
        for x, y in batches:
            totals.add_mean(lm_loss(model(x), y), (y != -100).sum())
    return totals


@pytest.mark.parametrize("process_group", [False, True])
def test_a_huge_loss_gives_the_same_capped_perplexity_on_every_path(process_group: bool,
                                                                     request: pytest.FixtureRequest) -> None:
    if process_group:
        request.getfixturevalue("one_rank")
    batches = _uneven_batches()
    engine = Engine(Lookup(scale=1e4))  # confident and wrong: a mean token loss in the thousands of nats
    loss, ppl = evaluate(engine, lambda: iter(batches), torch.device("cpu"))
    assert loss > 1000 and ppl == math.exp(MAX_LOG_PERPLEXITY)
    assert Objective().evaluate(engine, lambda: iter(batches), torch.device("cpu")) == {"val_loss": loss,
                                                                                       "val_ppl": ppl}
    objective, research_engine = _research(1e4)
    research = objective.evaluate(research_engine, lambda: iter(batches), torch.device("cpu"))
    tool = _by_hand(Lookup(scale=1e4), batches)
    assert research["val_lm"] == tool.mean_loss == loss
    assert research["val_ppl"] == tool.perplexity == perplexity(loss) == ppl
    if process_group:
        seq2seq = _seq2seq_eval(1e4, batches)
        # seq2seq sums its token losses (float32) where the others multiply means: the loss agrees closely
        assert seq2seq["val_loss"] == pytest.approx(loss, rel=1e-6) and seq2seq["val_ppl"] == ppl


def test_validation_loss_is_token_weighted_and_the_same_on_every_path(one_rank: None) -> None:
    batches = _uneven_batches()
    model = Lookup()
    with torch.no_grad():
        means = [lm_loss(model(x), y).double().item() for x, y in batches]
    tokens = [int((y != -100).sum()) for _, y in batches]
    assert tokens == [3, 10]
    token_mean = (means[0] * 3 + means[1] * 10) / 13
    assert abs(token_mean - sum(means) / 2) > 1e-3  # the batch mean is another number

    loss, ppl = evaluate(Engine(model), lambda: iter(batches), torch.device("cpu"))
    assert loss == pytest.approx(token_mean, rel=1e-12) and ppl == math.exp(loss)
    # the reduction's order is the one the logged (golden) val_loss was computed with: float64 sums of
    # mean * tokens on the device, one all-reduce, one division
    totals = torch.zeros(2, dtype=torch.float64)
    with torch.no_grad():
        for x, y in batches:
            n = (y != -100).sum()
            totals += torch.stack([lm_loss(model(x), y).double() * n, n.double()])
    assert loss == (totals[0] / totals[1].clamp(min=1)).item()

    objective, research_engine = _research(1.0)
    research = objective.evaluate(research_engine, lambda: iter(batches), torch.device("cpu"))
    assert research["val_lm"] == loss and research["val_ppl"] == ppl
    assert research["val_aux"] == pytest.approx(6.5)  # the other terms: the mean of the batch values (3, 10)
    assert research["val_loss"] == pytest.approx(loss + 0.5 * 6.5)
    assert _by_hand(model, batches).mean_loss == loss
    # seq2seq sums its token losses instead of multiplying means: close, not bit for bit
    assert _seq2seq_eval(1.0, batches)["val_loss"] == pytest.approx(loss, rel=1e-6)


def test_an_evaluation_without_labelled_tokens_raises() -> None:
    x, y = _uneven_batches()[0]
    with pytest.raises(EvalInputError, match=r"tokens=0: nothing was added"):
        evaluate(Engine(Lookup()), lambda: iter([(x, torch.full_like(y, -100))]), torch.device("cpu"))


def test_lm_loss_reductions_and_the_losses_built_on_it() -> None:
    from train.objectives.dpo import sequence_logps

    logits = torch.randn(2, 4, VOCAB, generator=torch.Generator().manual_seed(3))
    labels = torch.tensor([[1, 2, -100, 3], [-100, -100, 4, 5]])
    per_token = lm_loss(logits, labels, reduction="none")
    assert per_token.shape == (8,) and per_token[2] == 0 and per_token[4] == 0
    assert lm_loss(logits, labels, reduction="sum") == pytest.approx(per_token.sum().item())
    assert lm_loss(logits, labels) == pytest.approx(per_token.sum().item() / 5)
    assert torch.equal(sequence_logps(logits, labels), (-per_token).view(2, 4).sum(-1))


def test_the_evaluation_wing_imports_no_objective_or_loop() -> None:
    """Imports flow objectives -> eval, never back (no cycle between the wings)."""
    import ast

    root = Path(__file__).resolve().parents[2]
    for path in sorted((root / "train" / "eval").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            bad = [n for n in names if n.startswith(("train.objectives", "train.loop", "train.research"))]
            assert not bad, f"{path.name} imports {bad}"


# ---- corpus evaluation, summaries and predictions files -------------------------------------------------


def test_evaluate_generations_by_hand(tmp_path: Path) -> None:
    preds = ["3 apples", "cat sat 2", "#### 18"]
    refs = [["3 apples", "3"], "The cat sat 3 times.", "She has 18 eggs.\n#### 18"]
    metrics, rows = evaluate_generations(preds, refs, kinds=("em", "f1", "numeric"), ids=["a", "b", "c"],
                                         prompts=["how many?", "what?", "how many eggs?"])
    # EM: 1, 0, 0 (the third normalises to "18", its reference to the whole solution).
    # F1: 1; [cat, sat, 2] vs [cat, sat, 3, times] -> P 2/3, R 1/2 -> 4/7; [18] vs [she, has, 18, eggs, 18]
    # -> P 1, R 1/5 -> 1/3. Numeric: 3 = 3, 2 != 3, 18 = 18.
    assert metrics["count"] == 3
    assert metrics["em"] == pytest.approx(100 / 3)
    assert metrics["f1"] == pytest.approx(100 * (1 + 4 / 7 + 1 / 3) / 3)
    assert metrics["numeric"] == pytest.approx(200 / 3)
    assert rows[2] == {"id": "c", "prompt": "how many eggs?", "prediction": "#### 18",
                       "references": [refs[2]], "extracted": 18.0,
                       "metrics": {"em": 0.0, "f1": pytest.approx(1 / 3), "numeric": 1.0}}
    assert rows[1]["extracted"] == 2.0 and rows[1]["metrics"]["numeric"] == 0.0
    assert summarize(rows) == pytest.approx(metrics)
    path = write_predictions(predictions_path(tmp_path, 200), rows)
    assert path == tmp_path / "predictions" / "eval_step_00000200.jsonl"
    assert read_predictions(path) == rows


def test_evaluate_generations_rouge_and_defaults() -> None:
    metrics, rows = evaluate_generations(["the cat sat"], ["the cat sat on the mat"], kinds=("rouge",))
    assert metrics == pytest.approx({"rouge1": 200 / 3, "rouge2": 400 / 7, "rougeL": 200 / 3, "count": 1})
    assert rows[0]["id"] == 0 and "prompt" not in rows[0] and "extracted" not in rows[0]


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"predictions": ["a", "b"], "references": ["a"]}, r"references has 1 entries but predictions has 2"),
    ({"predictions": ["a"], "references": [[]]}, r"references\[0\]=\[\] is empty"),
    ({"predictions": [None], "references": ["a"]}, r"predictions\[0\]=None is a NoneType, not a string"),
    ({"predictions": [], "references": []}, r"predictions is empty"),
    ({"predictions": ["a"], "references": ["a"], "kinds": ("bleu",)}, r"kinds=\['bleu'\]"),
    ({"predictions": ["a"], "references": ["a"], "ids": [1, 2]}, r"ids has 2 entries"),
    ({"predictions": ["4"], "references": [["4", "four"]], "kinds": ("numeric",)},
     r"references\[0\]\[1\]='four' holds no number"),
])
def test_evaluate_generations_bad_input(kwargs: dict, message: str) -> None:
    with pytest.raises(EvalInputError, match=message):
        evaluate_generations(**kwargs)


def test_summarize() -> None:
    assert summarize([{"acc": True, "loss": 0.5}, {"acc": False, "loss": 1.5}], scale=1.0) == {
        "acc": 0.5, "loss": 1.0, "count": 2}
    with pytest.raises(EvalInputError, match=r"metric_rows\[1\] has metrics \['b'\]"):
        summarize([{"a": 1.0}, {"b": 1.0}])
    with pytest.raises(EvalInputError, match=r"metric_rows\[0\]\['a'\]='x' is not a number"):
        summarize([{"a": "x"}])
    with pytest.raises(EvalInputError, match=r"metric_rows is empty"):
        summarize([])


def test_predictions_round_trip(tmp_path: Path) -> None:
    rows = [{"id": 0, "prompt": "2+2?", "prediction": "4", "references": ["4"],
             "metrics": {"em": np.float32(1.0)}, "logits": torch.tensor([0.5, -1.0])},
            {"id": 1, "prompt": "héllo", "prediction": "naïve ✓", "references": ["x"],
             "metrics": {"em": 0.0}}]
    path = write_predictions(tmp_path / "p.jsonl", rows)
    back = read_predictions(path)
    assert back[0]["metrics"] == {"em": 1.0} and back[0]["logits"] == [0.5, -1.0]
    assert back[1] == rows[1]
    assert "naïve ✓" in path.read_text(encoding="utf-8")  # written as UTF-8, not \u escapes
    plain = tmp_path / "plain.txt"
    plain.write_text("")
    assert path.stat().st_mode == plain.stat().st_mode  # the usual permissions, not a temporary file's 0600


def _rows_then_failure():
    yield {"id": 0, "prediction": "ok"}
    raise RuntimeError("generation crashed")


@pytest.mark.parametrize(("rows", "error", "message"), [
    ([{"id": 0, "prediction": "ok"}, {"id": 1, "prediction": {1, 2}}], EvalInputError,
     r"rows\[1\] cannot be written as JSON"),
    ([{"id": 0, "prediction": "ok"}, {"id": 1, "prediction": float("nan")}], EvalInputError, r"rows\[1\]"),
    ([{"id": 0, "prediction": "ok"}, {"id": 1}], EvalInputError,
     r"rows\[1\] must be a mapping with a 'prediction'"),
    (_rows_then_failure(), RuntimeError, r"generation crashed"),
])
def test_write_predictions_is_atomic(tmp_path: Path, rows, error: type[Exception], message: str) -> None:
    path = tmp_path / "preds.jsonl"
    path.write_text('{"id": 9, "prediction": "previous"}\n')
    with pytest.raises(error, match=message):
        write_predictions(path, rows)
    assert path.read_text() == '{"id": 9, "prediction": "previous"}\n'  # the old file is intact
    assert sorted(p.name for p in tmp_path.iterdir()) == ["preds.jsonl"]  # and no temporary file is left
