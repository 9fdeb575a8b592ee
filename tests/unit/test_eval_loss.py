"""One perplexity and one token-weighted reduction (train/eval/loss.py) for every evaluation path."""

from __future__ import annotations

import math
from pathlib import Path
from typing import ClassVar

import pytest
import torch
import torch.distributed as dist

from tests.gloo import run_ranks
from train.data.sampler import filler
from train.eval import (
    MAX_LOG_PERPLEXITY,
    EvalInputError,
    TokenLoss,
    WeightedMean,
    all_reduce_token_loss,
    perplexity,
)
from train.objectives.lm import Objective, evaluate, lm_loss
from train.research.api import Extension, NoOptions, RecipeContext, Term, outputs
from train.research.run import ResearchObjective

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


def _seq2seq_eval(scale: float, batches: list[tuple[torch.Tensor, torch.Tensor]], fillers: int = 0
                  ) -> dict[str, float]:
    from types import SimpleNamespace

    from train.objectives.seq2seq import Seq2SeqObjective

    class Seq2Seq(Lookup):
        def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, max_new_tokens: int,
                     synced_gpus: bool = False) -> torch.Tensor:
            return input_ids[:, :max_new_tokens]

    texts = [("source", "a target") for _ in range(2 * len(batches))]
    dicts = [{"input_ids": x, "attention_mask": torch.ones_like(x), "labels": y,
              "index": torch.arange(2 * i, 2 * i + 2)} for i, (x, y) in enumerate(batches)]
    dicts += [filler(dicts[0]) for _ in range(fillers)]  # what a rank past the end of the evaluation runs
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


def test_a_filler_batch_runs_and_counts_nothing_on_every_path(one_rank: None) -> None:
    """The micro-batch a rank runs past the end of an evaluation (train.data.sampler.filler) changes no metric."""
    batches = _uneven_batches()
    padded = [*batches, filler(batches[0])]
    engine = Engine(Lookup())
    assert evaluate(engine, lambda: iter(padded), torch.device("cpu")) == \
        evaluate(engine, lambda: iter(batches), torch.device("cpu"))
    objective, research_engine = _research(1.0)
    assert objective.evaluate(research_engine, lambda: iter(padded), torch.device("cpu")) == \
        objective.evaluate(research_engine, lambda: iter(batches), torch.device("cpu"))
    plain = _seq2seq_eval(1.0, batches)
    with_filler = _seq2seq_eval(1.0, batches, fillers=1)
    assert with_filler == plain and "val_rouge1" in plain
