"""The objectives table: one entry per train.objective choice, each making its objective."""

from __future__ import annotations

import typing

from train.config.schema import Objective as ObjectiveName
from train.objectives import OBJECTIVES
from train.objectives.lm import Objective


def test_every_objective_choice_has_one_table_entry() -> None:
    assert set(OBJECTIVES) == set(typing.get_args(ObjectiveName))


def test_sequence_heads_and_samples() -> None:
    heads = {name for name, spec in OBJECTIVES.items() if spec.sequence_head}
    assert heads == {"reward", "classify"}
    assert not any(spec.samples for spec in OBJECTIVES.values() if spec.sequence_head or spec.encoder_decoder)
    assert [name for name, spec in OBJECTIVES.items() if spec.encoder_decoder] == ["seq2seq"]


def test_lm_entry_makes_the_language_model_objective() -> None:
    def loss(logits, labels):
        raise AssertionError

    inputs = typing.cast(typing.Any, type("Inputs", (), {"loss_fn": staticmethod(loss)})())
    made = OBJECTIVES["lm"].make(inputs)
    assert type(made) is Objective and made.loss_fn is loss
